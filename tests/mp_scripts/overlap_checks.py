"""Overlapped D-SGD in one 4-process launch; every rank writes what it saw as JSON.

Used by ``tests/test_overlap_multiprocess.py``. Usage: ``python overlap_checks.py OUT_DIR [--devices 4]``.

1. ``recursion``: float64, full-batch (exact) gradients, SGD with momentum and weight decay on the
   one-peer exponential graph; every rank also computes, alone, the hand-written recursion
   ``x^{k+1} = W(k) x^k - lr m^{k+1}`` for all nodes and compares its own row.
2. ``accumulate``: accumulation, bf16 autocast, clipping and an LR scheduler under overlap.
3. ``evaluation``: validation in the middle of training (an exchange in flight) evaluates the
   network average of the replicas, and the replicas come back afterwards.
4. ``resume*``: 2 epochs straight vs 1 epoch, a checkpoint, and a resumed second epoch (D-SGD, and the
   overlapped CHOCO-SGD, gradient tracking and Exact-Diffusion).
"""

from __future__ import annotations

import argparse
import json
import os
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule, load_digits_tensors
from lightning_decent.topology import get_topology

LR, MOMENTUM, DECAY, STEPS, PER_RANK = 0.2, 0.9, 1e-3, 8, 64


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def trainer(devices: int, strategy, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# ---- 1. the recursion ------------------------------------------------------------------------------
def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10))


class FullBatch(pl.LightningModule):
    """Node i trains on samples i, i + n, i + 2n, ... in one batch: exact local gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.net = tiny_net()

    def train_dataloader(self) -> DataLoader:
        images, labels = node_data(self.trainer.world_size)[self.global_rank :: self.trainer.world_size]
        return DataLoader(TensorDataset(images, labels), batch_size=PER_RANK)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return nn.functional.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=DECAY)


def node_data(devices: int) -> TensorDataset:
    images, labels = load_digits_tensors()
    return TensorDataset(images[: devices * PER_RANK].double(), labels[: devices * PER_RANK])


def reference(devices: int, initial: torch.Tensor) -> torch.Tensor:
    """All nodes by hand, node i on samples i, i + n, i + 2n, ... (as :class:`FullBatch`)."""
    data = node_data(devices)
    graph = get_topology("one_peer_exponential", devices)
    net = tiny_net().double()
    x = initial.expand(devices, -1).clone()
    m = torch.zeros_like(x)
    for k in range(STEPS):
        grads = []
        for i in range(devices):
            torch.nn.utils.vector_to_parameters(x[i], net.parameters())
            images, labels = data[i::devices]
            net.zero_grad()
            nn.functional.cross_entropy(net(images), labels).backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        m = MOMENTUM * m + torch.stack(grads) + DECAY * x
        x = graph.weights(k) @ x - LR * m
    return graph.weights(STEPS) @ x  # the exchange in flight at the end of fit is applied


def check_recursion(devices: int) -> dict:
    pl.seed_everything(0)
    model = FullBatch()
    initial = flat(model).double()
    strategy = DecentralizedStrategy(topology="one_peer_exponential", overlap=True, final_model="local")
    t = trainer(
        devices,
        strategy,
        max_steps=STEPS,
        precision="64-true",
        use_distributed_sampler=False,
        enable_checkpointing=False,
    )
    t.fit(model)
    expected = reference(devices, initial)[dist.get_rank()]
    return {
        "max_abs_diff": (flat(model) - expected).abs().max().item(),
        "moved": (flat(model) - initial).abs().max().item(),
        "gossip_step": strategy.gossip_step,
    }


# ---- 2. accumulation, bf16, clipping, scheduler -----------------------------------------------------
def check_accumulate(devices: int) -> dict:
    pl.seed_everything(0)
    strategy = DecentralizedStrategy(topology="ring", overlap=True, final_model="local")
    scheduler = partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    model = DigitsClassifier(scheduler=scheduler)
    t = trainer(
        devices,
        strategy,
        max_steps=5,
        accumulate_grad_batches=2,
        precision="bf16-mixed",
        gradient_clip_val=0.5,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        enable_checkpointing=False,
    )
    t.fit(model, DigitsDataModule(batch_size=32))
    assert strategy.topology is not None
    rank = dist.get_rank()
    return {
        "global_step": t.global_step,
        "gossip_step": strategy.gossip_step,
        "lr": t.optimizers[0].param_groups[0]["lr"],
        "finite": bool(torch.isfinite(flat(model)).all()),
        "bytes_sent": strategy.comm_stats.bytes_sent,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "out_degree": len(strategy.topology.out_neighbors(rank, 0)),
    }


# ---- 3. evaluation while an exchange is in flight ----------------------------------------------------
class SeenByValidation(pl.Callback):
    """Records the replicas' mean just before the strategy averages them, what validation evaluates,
    and the replica at the next training batch (after the strategy restored it)."""

    def __init__(self) -> None:
        self.expected: list[torch.Tensor] = []
        self.evaluated: list[torch.Tensor] = []
        self.local_before: list[torch.Tensor] = []
        self.local_after: list[torch.Tensor] = []

    def on_validation_start(self, trainer, module) -> None:  # runs before the strategy's hook
        local = flat(module).clone()
        total = local.clone()
        dist.all_reduce(total)
        self.local_before.append(local)
        self.expected.append(total / dist.get_world_size())

    def on_validation_batch_start(self, trainer, module, *args) -> None:
        if len(self.evaluated) < len(self.expected):
            self.evaluated.append(flat(module).clone())

    def on_train_batch_start(self, trainer, module, *args) -> None:
        if len(self.local_after) < len(self.local_before):
            self.local_after.append(flat(module).clone())


def check_evaluation(devices: int) -> dict:
    pl.seed_everything(0)
    seen = SeenByValidation()
    strategy = DecentralizedStrategy(topology="ring", overlap=True, final_model="local")
    model = DigitsClassifier()
    t = trainer(
        devices,
        strategy,
        max_steps=9,
        val_check_interval=4,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        callbacks=[seen],
        enable_checkpointing=False,
    )
    t.fit(model, DigitsDataModule(batch_size=32))
    before = flat(model).clone()
    t.validate(model, DigitsDataModule(batch_size=32), verbose=False)
    seen.local_after.append(flat(model).clone())
    pairs = list(zip(seen.expected, seen.evaluated))
    return {
        "validations": len(pairs),
        "max_diff_to_average": max((e - v).abs().max().item() for e, v in pairs),
        "replicas_restored": all(torch.equal(b, a) for b, a in zip(seen.local_before, seen.local_after)),
        "restored_after_validate": bool(torch.equal(before, seen.local_after[-1])),
        "replicas_differ": bool((seen.expected[0] - seen.local_before[0]).abs().max() > 0),
    }


# ---- 4. exact resume ----------------------------------------------------------------------------------
#: The overlapped algorithms resumed: D-SGD (x^k sent again), CHOCO-SGD (the round completed into its inbox
#: before the checkpoint, applied after the resume), gradient tracking and Exact-Diffusion (sent again).
RESUMED = {
    "resume": {"topology": "one_peer_exponential"},
    "resume_choco": {"topology": "ring", "algorithm": "choco", "compression": "int8"},
    "resume_gradient_tracking": {"topology": "ring", "algorithm": "gradient_tracking"},
    "resume_exact_diffusion": {"topology": "ring", "algorithm": "exact_diffusion"},
}


def resume_trainer(devices: int, epochs: int, options: dict, callbacks=()) -> pl.Trainer:
    return trainer(
        devices,
        DecentralizedStrategy(overlap=True, final_model="local", **options),
        max_epochs=epochs,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=list(callbacks),
        enable_checkpointing=bool(callbacks),
    )


def resume_model() -> DigitsClassifier:
    pl.seed_everything(0)
    return DigitsClassifier(optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4))


def check_resume(devices: int, out: Path, options: dict) -> dict:
    straight = resume_model()
    resume_trainer(devices, 2, options).fit(straight, DigitsDataModule())
    first = resume_model()
    saver = ModelCheckpoint(dirpath=out, every_n_epochs=1, save_top_k=-1, save_last=True)
    resume_trainer(devices, 1, options, [saver]).fit(first, DigitsDataModule())
    resumed = resume_model()
    resume_trainer(devices, 2, options).fit(resumed, DigitsDataModule(), ckpt_path=str(out / "last.ckpt"))
    return {"bitwise_equal": bool(torch.equal(flat(straight), flat(resumed)))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "recursion": check_recursion(args.devices),
        "accumulate": check_accumulate(args.devices),
        "evaluation": check_evaluation(args.devices),
        **{name: check_resume(args.devices, args.out / name, options) for name, options in RESUMED.items()},
    }
    (args.out / f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
