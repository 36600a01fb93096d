"""lightning-decent: decentralized (gossip) data-parallel training as a PyTorch Lightning strategy.

Importing the package registers ``Trainer(strategy="decentralized")`` and ``"decentralized_spawn"``.
"""

from lightning_decent._version import __version__
from lightning_decent.strategy import DecentralizedStrategy

__all__ = ["DecentralizedStrategy", "__version__"]
