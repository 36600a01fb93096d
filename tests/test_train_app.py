"""The application end to end: the embedded default command, a sweep, and the report it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_cli import failure_message, run_dirs, run_train, summary

from lightning_decent.app.callbacks import batch_size_of, format_label_table
from lightning_decent.app.report import (
    CONSENSUS,
    RunResult,
    plot_runs,
    plotted,
    read_metrics_csv,
    read_summary,
    summary_markdown,
    write_summary,
)
from lightning_decent.app.sweep import summarize_sweep


def test_default_command_gossip_matches_ddp_on_digits(tmp_path: Path) -> None:
    # `python -m lightning_decent.train` with fewer epochs: 4 CPU processes gossiping on the one-peer
    # exponential graph, then Lightning's DDP on the same data and epochs in the same processes.
    proc = run_train(tmp_path, "trainer.max_epochs=6", timeout=300)
    assert proc.returncode == 0, failure_message(proc)
    (run_dir,) = run_dirs(tmp_path)  # the child ranks used rank 0's directory ...
    assert {p.name for p in run_dir.glob("train_ddp_process_*.log")} == {
        f"train_ddp_process_{r}.log" for r in (1, 2, 3)
    }
    gossip, ddp = summary(run_dir)["runs"]
    assert gossip["name"].startswith("gossip one_peer_exponential/dsgd") and ddp["name"] == "DDP"
    assert gossip["metrics"]["val/acc"] >= 0.9
    assert gossip["metrics"]["val/acc"] >= ddp["metrics"]["val/acc"] - 0.03
    assert gossip["steps"] == ddp["steps"] > 0
    assert gossip["samples_per_s"] > 0 and gossip["train_time_s"] > 0 and ddp["train_time_s"] > 0
    param_bytes = 151_306 * 4  # digits_cnn(32, 128) in float32; one peer per step on the one-peer graph
    assert gossip["bytes_sent_per_step"] == pytest.approx(param_bytes)
    for name in ("config.yaml", "summary.md", "training_curves.png", "checkpoints/last.ckpt"):
        assert (run_dir / name).exists(), name
    # Both fits on the same logger, each with the resolved config as hyper-parameters; the curves and the
    # (digits: on by default) consensus distance come from their CSV logs.
    for label, run in (("gossip", gossip), ("ddp", ddp)):
        assert run["metrics_csv"] == str(run_dir / "csv" / label / "metrics.csv")
        assert "run_label: " + label in (run_dir / "csv" / label / "hparams.yaml").read_text()
    gossip_log, ddp_log = (read_metrics_csv(run_dir / "csv" / label / "metrics.csv") for label in ("gossip", "ddp"))
    assert {"train/loss", "train/time", "val/acc", "gossip/consensus_distance"} <= set(gossip_log)
    assert "gossip/consensus_distance" not in ddp_log and {"train/loss", "train/time"} <= set(ddp_log)
    assert "| gossip one_peer_exponential/dsgd" in proc.stdout + proc.stderr
    # train.log holds the run's log: Lightning's messages and the summary table.
    run_log = (run_dir / "train.log").read_text()
    assert "`Trainer.fit` stopped" in run_log and "| DDP |" in run_log


@pytest.mark.slow
def test_the_documented_push_diging_example_learns_the_digits(tmp_path: Path) -> None:
    # Push-DIGing on a user's directed graph of 4 processes with the optimizer group it selects (plain SGD at
    # the effective step of the recipe's momentum SGD). At the momentum rate it reached 0.42 after 10 epochs.
    proc = run_train(tmp_path, "experiment=directed_push_diging", "compare_with_ddp=false", timeout=600)
    assert proc.returncode == 0, failure_message(proc)
    (run,) = summary(run_dirs(tmp_path)[0])["runs"]
    assert run["name"] == "gossip directed_graph/push_diging (p2p)"
    assert run["metrics"]["val/acc"] >= 0.9 and run["metrics"]["test/acc"] >= 0.9  # measured: 0.964


@pytest.mark.slow
def test_a_sweep_writes_one_directory_per_job(tmp_path: Path) -> None:
    proc = run_train(
        tmp_path, "-m", "topology=ring,exponential", "trainer.devices=2", "trainer.max_epochs=1",
        "compare_with_ddp=false", timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, failure_message(proc)
    dirs = run_dirs(tmp_path)
    assert len(dirs) == 2 and dirs[0].parent == dirs[1].parent  # outputs/multirun/<run id>/{0,1}
    names = [summary(d)["runs"][0]["name"] for d in dirs]
    assert names[0].startswith("gossip ring/") and names[1].startswith("gossip exponential/")
    for run_dir in dirs:
        assert (run_dir / "train_ddp_process_1.log").is_file()  # rank 1 followed each job into its directory
        assert (run_dir / "checkpoints" / "last.ckpt").exists()
    _, rows = read_summary(dirs[0].parent)  # the sweep's own summary over both jobs
    assert [row.name.split(" / ")[0] for row in rows] == ["0: topology=ring", "1: topology=exponential"]
    assert (dirs[0].parent / "training_curves.png").is_file() and (dirs[0].parent / "summary.md").is_file()


def test_summary_table_has_one_row_per_run() -> None:
    runs = [
        RunResult("gossip ring/dsgd (p2p)", {"val/acc": 0.95}, 60, 2.5, 2400.0, 605224.0),
        RunResult("DDP", {"val/acc": 0.94}, 60, 2.0, 3000.0),
    ]
    table = summary_markdown(runs, "digits").splitlines()
    assert table[2] == "| run | val/acc | steps | train time (s) | samples/s | bytes sent/step |"
    assert table[4] == "| gossip ring/dsgd (p2p) | 0.95 | 60 | 2.5 | 2400 | 6.052e+05 |"
    assert table[5] == "| DDP | 0.94 | 60 | 2 | 3000 | - |"


def _write_metrics(path: Path, rows: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rows)
    return path


def test_curves_of_several_runs_share_axes(tmp_path: Path) -> None:
    gossip = _write_metrics(
        tmp_path / "gossip.csv",
        "epoch,step,train/loss,train/time,val/acc,gossip/consensus_distance\n"
        "0,9,2.3,1.0,,0.01\n0,11,,,0.3,\n1,19,1.1,3.0,,0.001\n1,23,,,0.8,\n",
    )
    assert read_metrics_csv(gossip)["train/loss"] == ([9.0, 19.0], [2.3, 1.1])
    ddp = read_metrics_csv(_write_metrics(tmp_path / "ddp.csv", "epoch,step,train/loss,val/acc\n0,9,2.2,\n0,11,,0.4\n"))
    png = plot_runs([("gossip", read_metrics_csv(gossip)), ("DDP", ddp)], "val/acc", tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_runs([("DDP", ddp)], "val/map", tmp_path / "none.png") is not None  # the training loss alone
    assert plot_runs([("empty", {})], "val/acc", tmp_path / "none.png") is None


def test_the_consensus_panel_shows_positive_distances_and_is_left_out_without_any(tmp_path: Path) -> None:
    # A local-steps run logs 0 while every replica equals the anchor: nothing a log axis can show.
    series = {"train/loss": ([1.0, 2.0], [2.0, 1.0]), CONSENSUS: ([4.0, 8.0, 12.0], [0.0, 0.02, 0.0])}
    assert plotted(series, CONSENSUS) == ([8.0], [0.02])
    assert plotted(series, "train/loss") == series["train/loss"]
    zeros = {"train/loss": series["train/loss"], CONSENSUS: ([4.0, 8.0], [0.0, 0.0])}
    assert plotted(zeros, CONSENSUS) == ([], [])
    without = plot_runs([("diloco", zeros)], "val/acc", tmp_path / "without.png")
    with_panel = plot_runs([("diloco", series)], "val/acc", tmp_path / "with.png")
    assert without is not None and with_panel is not None
    height = {png: int.from_bytes(png.read_bytes()[20:24], "big") for png in (without, with_panel)}  # PNG IHDR
    assert 2 * height[without] == pytest.approx(height[with_panel], abs=2)  # the loss alone; loss and consensus


def test_a_sweep_summary_has_every_job_and_run(tmp_path: Path) -> None:
    for job, topology, acc in (("0", "ring", 0.9), ("1", "exponential", 0.95)):
        job_dir = tmp_path / job
        metrics = _write_metrics(
            job_dir / "csv" / "metrics.csv", f"epoch,step,train/loss,val/acc\n0,4,1.0,\n0,5,,{acc}\n"
        )
        _write_metrics(job_dir / ".hydra" / "overrides.yaml", f"- topology={topology}\n- trainer.devices=2\n")
        run = RunResult(f"gossip {topology}/dsgd (p2p)", {"val/acc": acc}, 5, metrics_csv=str(metrics))
        write_summary(job_dir, [run, RunResult("DDP", {"val/acc": 0.93}, 5)], "digits", {"monitor": "val/acc"})
    markdown = summarize_sweep(tmp_path)
    assert markdown is not None and "| 1: topology=exponential / DDP | 0.93 |" in markdown
    info, rows = read_summary(tmp_path)
    assert [r.name for r in rows] == [
        "0: topology=ring / gossip ring/dsgd (p2p)", "0: topology=ring / DDP",
        "1: topology=exponential / gossip exponential/dsgd (p2p)", "1: topology=exponential / DDP",
    ]  # fmt: skip
    overrides = [job["overrides"] for job in info["jobs"]]
    assert overrides == [["topology=ring", "trainer.devices=2"], ["topology=exponential", "trainer.devices=2"]]
    assert (tmp_path / "training_curves.png").is_file()
    assert summarize_sweep(tmp_path / "0" / "csv") is None  # no job below


def test_batch_sizes_of_every_recipe_batch() -> None:
    images, labels = torch.zeros(5, 3, 8, 8), torch.zeros(5)
    assert batch_size_of((images, labels)) == 5  # classification, token blocks
    assert batch_size_of(((images[0], images[1]), ({}, {}))) == 2  # detection: a tuple of images
    assert batch_size_of({"x": images}) == 5


def test_label_table_rows_are_ranks() -> None:
    table = format_label_table(torch.tensor([[3, 0, 1], [0, 4, 0]]), [0, 1, 2], max_classes=2).splitlines()
    assert table == ["rank 0 1 ... total", "   0 3 0 ...     4", "   1 0 4 ...     4"]
