"""The Hydra configuration of ``python -m lightning_decent.train``, installed as ``lightning_decent.conf``."""
