"""Shared test fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

CONF = Path(__file__).resolve().parents[1] / "conf"


def _restored() -> Iterator[None]:
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


# Lightning sets MASTER_PORT, LOCAL_RANK, WORLD_SIZE, ... when it starts a process group in-process; a
# later subprocess launch must not inherit them (it would take itself for an already launched rank).
_restore_environment_per_module = pytest.fixture(autouse=True, scope="module")(_restored)
_restore_environment_per_test = pytest.fixture(autouse=True)(_restored)


@pytest.fixture(scope="module")
def hydra_context() -> Iterator[None]:
    """Hydra initialised with the repository's ``conf/`` for ``hydra.compose`` in a test module."""
    from lightning_decent.app.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()
