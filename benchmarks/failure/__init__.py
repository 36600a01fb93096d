"""Failure-schedule benchmark: workers, events and report (``benchmarks/failure_schedule.py``)."""
