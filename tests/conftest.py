"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


def _restored() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# Lightning sets MASTER_PORT, LOCAL_RANK, WORLD_SIZE, ... when it starts a process group in-process; a
# later subprocess launch must not inherit them (it would take itself for an already launched rank).
_restore_environment_per_module = pytest.fixture(autouse=True, scope="module")(_restored)
_restore_environment_per_test = pytest.fixture(autouse=True)(_restored)
