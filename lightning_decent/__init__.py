"""lightning-decent: decentralized (gossip) data-parallel training as a PyTorch Lightning strategy."""

from lightning_decent.strategy import DecentralizedStrategy

__version__ = "0.1.0"

__all__ = ["DecentralizedStrategy", "__version__"]
