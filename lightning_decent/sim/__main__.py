"""``python -m lightning_decent.sim``: see :mod:`lightning_decent.sim.cli`."""

import sys

from lightning_decent.sim.cli import main

sys.exit(main())
