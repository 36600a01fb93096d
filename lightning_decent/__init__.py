"""lightning-decent: decentralized (gossip) data-parallel training as a PyTorch Lightning strategy.

Importing the package registers ``Trainer(strategy="decentralized")`` and ``"decentralized_spawn"``.
Run as ``python -m lightning_decent.<tool>`` (the training application, the topology and simulator
CLIs), the package imports the strategy on first use instead: the tool imports what it needs, so that
``--help`` and ``--cfg job`` answer without loading torch (Python sets ``sys.argv[0]`` to ``"-m"`` while
it imports the package of the module it runs).
"""

import sys
from typing import Any

from lightning_decent._version import __version__

__all__ = ["DecentralizedStrategy", "__version__"]

if sys.argv[:1] != ["-m"]:
    from lightning_decent.strategy import DecentralizedStrategy


def __getattr__(name: str) -> Any:
    if name == "DecentralizedStrategy":
        from lightning_decent.strategy import DecentralizedStrategy

        return DecentralizedStrategy
    raise AttributeError(f"module 'lightning_decent' has no attribute {name!r}")
