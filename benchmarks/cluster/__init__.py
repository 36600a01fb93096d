"""The emulated-cluster benchmark's parts: workloads, per-rank cases, the worker and the report."""
