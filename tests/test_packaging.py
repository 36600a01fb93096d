"""Packaging: one version, the declared Lightning range, the configs inside the package, optional
dependencies that only the features using them need."""

from __future__ import annotations

import importlib.resources
import subprocess
import sys
from pathlib import Path

import pytest

import lightning_decent
from lightning_decent import _lightning_private
from lightning_decent._extras import MissingExtraError, require
from lightning_decent.recipes.digits import load_digits_tensors

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_lightning_range_checked_at_import_is_the_declared_one() -> None:
    (declared,) = (d for d in PYPROJECT["project"]["dependencies"] if d.startswith("lightning"))
    assert declared == "lightning" + _lightning_private.TESTED_LIGHTNING


def test_a_missing_private_lightning_attribute_fails_naming_the_range() -> None:
    class Loop:
        pass

    with pytest.raises(_lightning_private.UnsupportedLightningError, match=r"Loop\._broadcast_sigterm_tensor.*"):
        _lightning_private.check_attributes(Loop, "_broadcast_sigterm_tensor")
    with pytest.raises(ImportError, match=r"tested with lightning>=2\.6,<2\.7: pip install 'lightning>=2\.6,<2\.7'"):
        _lightning_private.check_attributes(Loop(), "procs")


def test_the_version_has_one_source() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "lightning_decent._version.__version__"}
    assert lightning_decent.__version__ == lightning_decent._version.__version__


def test_configs_and_recipes_ship_inside_the_package() -> None:
    conf = importlib.resources.files("lightning_decent.conf")
    assert (conf / "train.yaml").is_file() and (conf / "recipe" / "digits.yaml").is_file()
    assert (importlib.resources.files("lightning_decent") / "py.typed").is_file()
    # The editable install serves the repository's own conf/ folder (mapped into the package, not copied).
    assert Path(str(conf)).resolve() == (ROOT / "conf").resolve()


def test_the_strategy_needs_no_app_extra_and_nothing_installs_top_level_recipes(tmp_path: Path) -> None:
    # A fresh interpreter outside the repository: which modules the strategy and its topologies import,
    # and whether a top-level ``recipes`` or ``conf`` module can be found.
    probe = (
        "import sys, importlib.util as u; from lightning_decent import DecentralizedStrategy; "
        "from lightning_decent.topology import get_topology; DecentralizedStrategy(topology='ring'); "
        "[get_topology(n, 8) for n in ('ring', 'one_peer_exponential', 'torus')]; "
        "print(sorted({'sklearn', 'networkx', 'hydra'} & set(sys.modules)), "
        "u.find_spec('recipes'), u.find_spec('conf'))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["[]", "None", "None"]


def test_a_missing_optional_dependency_names_its_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    with pytest.raises(MissingExtraError, match=r"the digits recipe needs the 'sklearn' module.*\[app\]"):
        load_digits_tensors()
    with pytest.raises(MissingExtraError, match=r"lightning-decent\[wandb\]"):
        require("wandb_that_is_not_installed", "wandb", "logger=wandb")
