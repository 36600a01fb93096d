"""``python -m lightning_decent.topology``: see :mod:`lightning_decent.topology.cli`."""

import sys

from lightning_decent.topology.cli import main

sys.exit(main())
