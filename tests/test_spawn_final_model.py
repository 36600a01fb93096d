"""What ``fit`` hands back with the spawn launcher: the network average, not rank 0's replica.

Lightning's spawn launcher returns rank 0's weights to the calling process. With
``final_model="average"`` (the default) every replica is the network average when ``fit`` ends,
so the caller's model is the average of the local replicas recorded on each rank just before.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule
from lightning_decent.topology import Topology

RANKS = 2
#: Two nodes that keep 3/4 of their own model per round, so the replicas stay different.
LAZY_PAIR = Topology([np.array([[0.75, 0.25], [0.25, 0.75]])], name="lazy_pair")


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in module.parameters()])


class RecordLocalReplica(pl.Callback):
    """Each rank writes its replica at the end of training (callbacks run before the strategy's hook)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(flat(module).tolist()))


@pytest.mark.parametrize("final_model", ["average", "local"])
def test_spawn_returns_the_network_average(tmp_path: Path, final_model: str) -> None:
    pl.seed_everything(0)
    model = DigitsClassifier()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=RANKS,
        strategy=DecentralizedStrategy(topology=LAZY_PAIR, start_method="spawn", final_model=final_model),
        max_steps=4,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RecordLocalReplica(tmp_path)],
    )
    trainer.fit(model, DigitsDataModule(batch_size=32))
    local = [
        torch.tensor(json.loads((tmp_path / f"rank{r}.json").read_text()), dtype=torch.float64) for r in range(RANKS)
    ]
    assert (local[0] - local[1]).abs().max() > 1e-4  # the ranks trained on different shards
    expected = torch.stack(local).mean(0) if final_model == "average" else local[0]
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-6)
