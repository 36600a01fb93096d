"""The extension guide's worked example (docs/extending.md) works as written: its code blocks, registered as
the guide says, build by name, meet the contracts the registry-wide tests hold every component to, and train
in the simulator and inside the strategy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mp_launch import ROOT, launch

GUIDE = ROOT / "docs" / "extending.md"
EXAMPLE = {
    "lightning_decent/algorithms/relaxed_dsgd.py",
    "conf/algorithm/relaxed_dsgd.yaml",
    "lightning_decent/topology/band_ring.py",
    "conf/topology/band_ring.yaml",
}


def guide_files() -> dict[str, str]:
    """The guide's code blocks by the file their first line names (``# path``)."""
    return dict(re.findall(r"```(?:python|yaml)\n# (\S+)\n(.*?)```", GUIDE.read_text(), flags=re.S))


def test_the_guide_names_every_file_its_example_touches() -> None:
    text = GUIDE.read_text()
    assert set(guide_files()) == EXAMPLE
    registries = ["lightning_decent/algorithms/__init__.py", "lightning_decent/topology/graphs.py"]
    assert all(f"Register it in `{registry}`" in text for registry in registries)
    touched = EXAMPLE | set(registries) | {"tests/test_extending.py"}
    assert f"touches **{len(touched)} files**" in text
    assert not any((ROOT / path).exists() for path in EXAMPLE)  # the example is not shipped in the library


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("extending")
    for path, body in guide_files().items():
        (folder / Path(path).name).write_text(body)
    proc = launch("extending_example.py", str(folder), cwd=folder, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_example_is_built_by_name_with_the_options_of_its_signature_and_yaml(example: dict) -> None:
    assert example["algorithm_options"] == ["gamma", "global_average_every", "adaptive_global_average", "gossip_rounds"]
    assert example["topology_options"] == ["hops"]
    assert example["gamma"] == 0.5 and example["persistent_state"] == 0  # extra_memory = 0: no bucket.state
    assert example["strategy"] == ["relaxed_dsgd", 0.8]
    assert example["bad_option"].startswith("algorithm 'relaxed_dsgd' does not take option(s) ['gama']")
    assert "0 < gamma <= 1" in example["bad_gamma"] and "integer hops >= 1" in example["bad_hops"]
    assert "algorithm='relaxed_dsgd' cannot overlap" in example["overlap"]


def test_the_band_ring_is_a_doubly_stochastic_circulant_at_every_size(example: dict) -> None:
    assert example["topology_name"] == "band_ring" and example["lazy_name"] == "lazy_band_ring"
    assert example["row"] == pytest.approx([0.2, 0.2, 0.2, 0, 0, 0, 0.2, 0.2])  # offsets -2..2 of node 0
    assert example["doubly_stochastic"] and example["gossip_rounds"] == 4  # out-degree 4: four matchings
    # Offsets that coincide for small n add up: n = 2 has 3/5 on itself and 2/5 on the other node.
    assert example["small_n_rows"] == {"1": [1.0], "2": pytest.approx([0.6, 0.4]), "3": pytest.approx([0.2, 0.4, 0.4])}


def test_gamma_one_is_dsgd_and_one_half_is_dsgd_on_the_lazy_graph(example: dict) -> None:
    assert example["gamma_one_vs_dsgd"] == 0.0
    assert example["half_vs_lazy_dsgd"] < 1e-12  # x + (W x - x) / 2 = ((I + W) / 2) x, up to rounding
    model_bytes = 2 * 8  # the quadratic's d = 2 float64 values
    assert example["bytes"] == [4 * model_bytes, 4 * model_bytes, 2 * model_bytes]  # rounds x buffers x out-degree
    dsgd_consensus, relaxed_consensus = example["consensus"]
    assert relaxed_consensus > dsgd_consensus  # damped mixing: the nodes agree less at the same step size
