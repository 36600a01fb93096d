"""The topology inspector, in-process and once through ``python -m lightning_decent.topology``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_decent.topology import from_matrix
from lightning_decent.topology.cli import inspect_topology, main

REPO = Path(__file__).resolve().parents[1]
ROW_FIELDS = {
    "name",
    "n",
    "max_degree",
    "period",
    "directed",
    "doubly_stochastic",
    "rho_per_round",
    "rho_over_period",
    "gap_over_period",
    "gap_per_round",
    "transient_iid",
    "transient_non_iid",
    "beta_pi",
    "kappa_pi",
    "pi",
}


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "rows.json"
    argv = ["ring", "exponential", "one_peer_exponential", "torus", "--n", "16", "--json", str(out_json)]
    code, out, _ = run(argv, capsys)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["topology", "n", "max", "deg"]
    ring_row = next(line for line in lines if line.startswith("ring "))
    assert ring_row.split()[1:6] == ["16", "2", "1", "0.9493", "0.9493"]
    assert "1.291e+06" in ring_row and "5.015e+08" in ring_row
    assert any(line.startswith("exponential ") and "0.6000" in line for line in lines)
    assert "rho = rho/round (static graphs)" in out  # footnote saying which rho the transient counts use

    rows = json.loads(out_json.read_text())
    assert [r["name"] for r in rows] == ["ring", "exponential", "one_peer_exponential", "torus"]
    assert all(set(r) == ROW_FIELDS for r in rows)
    ring_json, exp_json, one_peer, _ = rows
    assert ring_json["rho_per_round"] == pytest.approx(0.9492530217, abs=1e-9)
    assert exp_json["transient_iid"] == pytest.approx(3317.76, rel=1e-9)
    assert exp_json["directed"] is True and exp_json["beta_pi"] is None
    assert one_peer["period"] == 4 and one_peer["max_degree"] == 1
    assert one_peer["rho_over_period"] == pytest.approx(0.0, abs=1e-12)
    # Finite (Ying et al. 2021: Õ(n³) up to log factors): its period of 4 averages exactly, so the per-step gap
    # is 1/4 and rho^4 n^3 / (1 - rho)^2 = 0.75^4 * 16^3 * 16 = 20736.
    assert one_peer["transient_iid"] == pytest.approx(20736.0, rel=1e-9)


def test_digraph_rows(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "rows.json"
    code, out, _ = run(["challenging_digraph", "--n", "4", "--json", str(out_json)], capsys)
    assert code == 0
    assert "beta_pi" in out.splitlines()[0] and "pi(challenging_digraph)" in out
    (row,) = json.loads(out_json.read_text())
    assert row["beta_pi"] == pytest.approx(0.7071067812, abs=1e-9)
    assert row["kappa_pi"] == pytest.approx(8.0)
    assert row["pi"] == pytest.approx([8 / 15, 4 / 15, 2 / 15, 1 / 15])
    assert row["transient_iid"] is None


def test_options_go_to_the_topologies_that_take_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json = tmp_path / "rows.json"
    argv = ["ring", "erdos-renyi", "--n", "16", "--option", "p=0.5", "--option", "seed=0", "--json", str(out_json)]
    code, _, _ = run(argv, capsys)
    assert code == 0
    ring_row, er_row = json.loads(out_json.read_text())
    assert er_row["rho_per_round"] == pytest.approx(0.6642305935, abs=1e-9)
    assert ring_row["rho_per_round"] == pytest.approx(0.9492530217, abs=1e-9)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["hypercube", "--n", "8"], "valid names"),
        (["ring", "--n", "8", "--option", "p=0.5"], "No topology among ['ring'] takes option(s) ['p']"),
        (["grid", "--n", "7"], "composite n"),
    ],
)
def test_bad_input_exits_2_with_the_fix(argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert fragment in err


def test_plot_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "graphs.png"
    argv = ["ring", "one_peer_exponential", "challenging_digraph", "--n", "8", "--rounds", "20", "--plot", str(png)]
    code, _, _ = run(argv, capsys)
    assert code == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_families_for_any_n_are_listed_and_plotted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """n = 12: Base-2 and the hierarchical graph average exactly after their periods (rho/period 0),
    EquiDyn's drawn sequence is plotted as one union (its 1,000 phases would not fit a legend)."""
    png, rows_json = tmp_path / "families.png", tmp_path / "rows.json"
    argv = ["base", "equistatic", "equidyn", "hierarchical", "--n", "12", "--option", "local_world_size=3"]
    code, out, _ = run([*argv, "--rounds", "10", "--plot", str(png), "--json", str(rows_json)], capsys)
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {row["name"]: row for row in json.loads(rows_json.read_text())}
    assert (rows["base"]["max_degree"], rows["base"]["period"]) == (1, 5) and rows["base"]["rho_over_period"] < 1e-12
    assert rows["equidyn"]["period"] == 1000 and rows["equidyn"]["max_degree"] == 1
    assert rows["equistatic"]["period"] == 1 and 0 < rows["equistatic"]["rho_per_round"] < 1
    assert rows["hierarchical"]["period"] == 2 and abs(rows["hierarchical"]["rho_over_period"]) < 1e-12
    assert all(line.split()[0] in rows for line in out.splitlines()[2:6])


def test_module_entry_point() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_decent.topology", "ring", "--n", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "0.8047" in result.stdout


def test_row_stochastic_only_rows_leave_push_sum_fields_empty() -> None:
    row = inspect_topology(from_matrix([[0.5, 0.5], [0.25, 0.75]], require="row"))
    assert row["doubly_stochastic"] is False
    assert row["beta_pi"] is None and row["transient_iid"] is None
