"""Reliability in real 4-process gloo runs (one launch, ``tests/mp_scripts/reliability_checks.py``): gradient
accumulation for algorithms that move the parameters before the step, the DDP-equivalent all-reduce
baseline with Adam, and what a push-sum checkpoint gives when loaded or evaluated at another world size."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from mp_launch import launch
from mp_scripts.tiny_model import TinyClassifier, flat_params

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsDataModule

pytestmark = pytest.mark.slow
RANKS = 4


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("reliability_checks")
    proc = launch("reliability_checks.py", str(out), "--devices", str(RANKS), cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    yield [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(RANKS)]
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("algorithm", ["gut", "gradient_tracking"])
def test_accumulating_two_micro_batches_equals_one_batch_twice_as_large(ranks: list[dict], algorithm: str) -> None:
    # GUT gossips in before_step: its gradient must be taken at the gossiped model for every micro-batch.
    for r in ranks:
        micro, large = r[f"accumulation/{algorithm}"]
        assert (micro - large).abs().max() < 1e-10


def test_the_all_reduce_baseline_equals_ddp_with_adam(ranks: list[dict]) -> None:
    for r in ranks:
        adam = r["adam"]
        assert (adam["allreduce"] - adam["ddp"]).abs().max() < 1e-9
        # Averaging the parameters after each rank's own Adam step (the old baseline) is not DDP.
        assert (adam["complete"] - adam["ddp"]).abs().max() > 1e-4


@pytest.fixture(scope="module")
def push_sum(ranks: list[dict]) -> dict:
    """The push-sum checkpoint's paths and its network average ``(1/n) sum_i v_i z_i``."""
    runs = [r["push_sum"] for r in ranks]
    assert len({round(run["v"], 6) for run in runs}) > 1  # the weights really differ on this digraph
    average = sum(run["v"] * run["z"] for run in runs) / RANKS
    assert (runs[0]["z"] - average).abs().max() > 1e-4  # and rank 0's replica is not the average
    return {"average": average, "best": runs[0]["best"], "last": runs[0]["last"]}


def test_the_reported_checkpoint_is_the_push_sum_weighted_network_average(push_sum: dict) -> None:
    for path in (push_sum["last"],):
        restored = TinyClassifier.load_from_checkpoint(path)
        assert (flat_params(restored) - push_sum["average"]).abs().max() < 1e-6


def single_process_trainer(strategy) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=2, limit_test_batches=2,
    )  # fmt: skip


def test_evaluating_a_sharded_checkpoint_at_another_world_size_evaluates_its_average(push_sum: dict) -> None:
    # Before: another world size evaluated rank 0's shard, and with push-sum the unweighted mean.
    model = TinyClassifier()
    strategy = DecentralizedStrategy(topology="challenging_digraph", algorithm="push_sum")
    trainer = single_process_trainer(strategy)
    trainer.validate(model, DigitsDataModule(), ckpt_path=push_sum["last"], verbose=False)
    assert (model.evaluated[-1] - push_sum["average"]).abs().max() < 1e-6
    trainer.test(model, DigitsDataModule(), ckpt_path=push_sum["best"], verbose=False)
    best = torch.load(push_sum["best"], weights_only=True)["state_dict"]
    assert torch.equal(model.evaluated[-1], torch.cat([t.reshape(-1).double() for t in best.values()]))
    assert torch.equal(flat_params(model), model.evaluated[-1])  # after test the model is the average
    ddp = TinyClassifier()
    single_process_trainer("ddp").validate(ddp, DigitsDataModule(), ckpt_path=push_sum["last"], verbose=False)
    assert (ddp.evaluated[-1] - push_sum["average"]).abs().max() < 1e-6
