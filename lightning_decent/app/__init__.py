"""Pieces of the Hydra application (``python -m lightning_decent.train``): run directories, callbacks, reports."""
