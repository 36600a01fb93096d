"""The application end to end: the embedded default command, a sweep, and the report it writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_cli import failure_message, run_dirs, run_train, summary

from lightning_decent.app.callbacks import batch_size_of, format_label_table
from lightning_decent.app.report import RunResult, plot_training_curves, read_metrics_csv, summary_markdown


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
    for name in ("config.yaml", "summary.md", "training_curves.png", "csv/metrics.csv", "checkpoints/last.ckpt"):
        assert (run_dir / name).exists(), name
    assert "| gossip one_peer_exponential/dsgd" in proc.stdout and "| DDP |" in proc.stdout


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


def test_summary_table_has_one_row_per_run() -> None:
    runs = [
        RunResult("gossip ring/dsgd (p2p)", {"val/acc": 0.95}, 60, 2.5, 2400.0, 605224.0),
        RunResult("DDP", {"val/acc": 0.94}, 60, 2.0, 3000.0),
    ]
    table = summary_markdown(runs, "digits").splitlines()
    assert table[2] == "| run | val/acc | steps | train time (s) | samples/s | bytes sent/step |"
    assert table[4] == "| gossip ring/dsgd (p2p) | 0.95 | 60 | 2.5 | 2400 | 6.052e+05 |"
    assert table[5] == "| DDP | 0.94 | 60 | 2 | 3000 | - |"


def test_training_curves_are_plotted_from_the_csv_log(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text("epoch,step,train/loss,val/acc\n0,9,2.3,\n0,11,,0.3\n1,19,1.1,\n1,23,,0.8\n")
    assert read_metrics_csv(csv) == {"train/loss": ([9.0, 19.0], [2.3, 1.1]), "val/acc": ([11.0, 23.0], [0.3, 0.8])}
    png = plot_training_curves(csv, tmp_path / "curves.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_training_curves(tmp_path / "missing.csv", tmp_path / "none.png") is None


def test_batch_sizes_of_every_recipe_batch() -> None:
    images, labels = torch.zeros(5, 3, 8, 8), torch.zeros(5)
    assert batch_size_of((images, labels)) == 5  # classification, token blocks
    assert batch_size_of(((images[0], images[1]), ({}, {}))) == 2  # detection: a tuple of images
    assert batch_size_of({"x": images}) == 5


def test_label_table_rows_are_ranks() -> None:
    table = format_label_table(torch.tensor([[3, 0, 1], [0, 4, 0]]), [0, 1, 2], max_classes=2).splitlines()
    assert table == ["rank 0 1 ... total", "   0 3 0 ...     4", "   1 0 4 ...     4"]
