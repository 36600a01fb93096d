"""Time to quality on the language-model recipe: one rank of the ``time_to_quality`` suite.

Started in a network namespace per rank by ``benchmarks/emulated_cluster.py --suites time_to_quality``
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, ``RANK_ADDRESS``: this rank's address).
Every run trains the recipe's byte-level GPT from the same seed on the same batches (rank ``r`` takes
the same blocks of the standard library's source at every step in every run) with the same inner
optimizer (AdamW) for the same number of steps, and records, with evaluation excluded:

* the training wall-clock and the bytes this rank's interface sent (``tx_bytes`` of ``eth0``, read at the
  start and end of every training segment, so evaluation traffic is not counted);
* the validation loss of the network average of the replicas every ``eval_every`` steps (the same
  held-out blocks on every rank).

Runs (``--cases``): ``compute`` (plain Lightning, no communication), ``loop`` (the peers' plain torch
loop, no communication), ``ddp`` (Lightning DDPStrategy), ``post_local_sgd:H`` (torch's
``PostLocalSGDOptimizer`` + ``PeriodicModelAverager``), ``torchft:diloco:H`` / ``torchft:streaming:H``
(torchft 0.2.0 DiLoCo, one replica group per rank), ``decent_dp`` (one-peer exponential),
``ours:<config>[:H[:tau]]`` (:data:`OURS`; ``tau``: streaming's delay); ``run#k`` is the k-th repeat of
a run (``--ttq-repeats``). A run that fails writes its
error instead of numbers; the suite reports it.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.language_model import GPT, LanguageModel
from lightning_decent.recipes.text_tokens import TokenBlocks

INTERFACE = "eth0"
OUTER = {"outer_lr": 0.7, "outer_momentum": 0.9}  # DiLoCo's defaults, for torchft and ours alike
FRAGMENTS = 4
DELAY = 1  # inner steps a streamed fragment's exchange overlaps (tau)
HS = (16, 64)  # synchronisation periods of the local-steps runs

#: Every run of the suite, in the order it runs (the goals' runs first: a suite stopped early keeps them).
TTQ_CASES = [
    "compute",
    "loop",
    "ddp",
    *(
        run
        for h in HS
        for run in (
            f"ours:diloco:{h}",
            f"ours:gasloc_int8_streaming:{h}",
            f"torchft:diloco:{h}",
            f"torchft:streaming:{h}",
        )
    ),
    *(f"post_local_sgd:{h}" for h in HS),
    *(f"ours:local_sgd:{h}" for h in HS),
    "decent_dp",
    "ours:dsgd_overlap",
    "ours:choco_int8_ring",
    "ours:choco_int8_exponential",
    "ours:choco_int4_ring",
    "ours:no_sync",
]


@dataclass(frozen=True)
class Workload:
    """What every run trains: the recipe's GPT, per-rank batches, AdamW, and when to evaluate."""

    n_layer: int = 4
    d_model: int = 128
    n_head: int = 4
    block: int = 32
    batch: int = 2
    steps: int = 320
    eval_every: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.01
    val_sequences: int = 64
    seed: int = 0

    def net(self) -> GPT:
        torch.manual_seed(self.seed)  # the same initial model on every rank and in every run
        return GPT(block_size=self.block, n_layer=self.n_layer, n_head=self.n_head, d_model=self.d_model)

    def optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    def module(self) -> LanguageModel:
        """The recipe's module; weight decay on every parameter, so a per-bucket AdamW (decent-dp) is the same."""
        return LanguageModel(self.net(), optimizer=self.optimizer, decay_bias_and_norm=True)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.net().parameters())


# ---- pure pieces (tested) -------------------------------------------------------------------------
def tx_bytes(interface: str = INTERFACE) -> int:
    """Bytes the interface has sent so far (the kernel's counter)."""
    return int(Path(f"/sys/class/net/{interface}/statistics/tx_bytes").read_text())


class Meter:
    """Training time and interface bytes summed over training segments, the validation curve, and the
    time of every step (where a synchronisation's cost lands).

    ``start()``/``stop()`` bracket training; evaluation happens between a ``stop()`` and the next
    ``start()`` and is counted in neither. ``step_done()`` ends a step: its time runs from the previous
    step's end or the segment's start. ``read_bytes`` is the interface counter (injectable for tests).
    """

    def __init__(self, read_bytes: Callable[[], int] = tx_bytes, clock: Callable[[], float] = time.perf_counter):
        self.read_bytes = read_bytes
        self.clock = clock
        self.seconds = 0.0
        self.bytes = 0
        self.curve: list[tuple[float, float]] = []
        self.step_seconds: list[float] = []
        self._since: tuple[float, int] | None = None
        self._step_began = 0.0

    def start(self) -> None:
        if self._since is None:
            self._since = (self.clock(), self.read_bytes())
            self._step_began = self._since[0]

    def step_done(self) -> None:
        now = self.clock()
        self.step_seconds.append(now - self._step_began)
        self._step_began = now

    def stop(self) -> None:
        if self._since is not None:
            began, sent = self._since
            self.seconds += self.clock() - began
            self.bytes += self.read_bytes() - sent
            self._since = None

    def record(self, loss: float) -> None:
        """A validation loss at the training time so far (call between ``stop()`` and ``start()``)."""
        self.curve.append((self.seconds, float(loss)))


def time_to_target(curve: list[tuple[float, float]], target: float) -> float | None:
    """The training time of the first evaluation whose loss is at most ``target`` (``None``: never)."""
    return next((seconds for seconds, loss in curve if loss <= target), None)


def rank_batch_indices(blocks: int, world: int, rank: int, steps: int, batch: int, seed: int) -> np.ndarray:
    """``[steps, batch]`` training-block indices of ``rank``: one seeded permutation dealt out step by step,
    ``world x batch`` blocks per step (wrapping around after an epoch)."""
    order = np.random.default_rng(seed).permutation(blocks)
    positions = (np.arange(steps)[:, None] * world + rank) * batch + np.arange(batch)[None, :]
    return order[positions % blocks]


# ---- data -----------------------------------------------------------------------------------------
def _stack(blocks: TokenBlocks, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = [blocks[int(i)] for i in indices]
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def train_batches(tokens: Path, w: Workload, rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    blocks = TokenBlocks(tokens / "train.bin", w.block)
    return [_stack(blocks, row) for row in rank_batch_indices(len(blocks), world, rank, w.steps, w.batch, w.seed)]


def val_batches(tokens: Path, w: Workload) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``val_sequences`` held-out blocks in batches of 16 (the same on every rank)."""
    blocks = TokenBlocks(tokens / "val.bin", w.block)
    count = min(w.val_sequences, len(blocks))
    return [_stack(blocks, np.arange(s, min(s + 16, count))) for s in range(0, count, 16)]


@torch.no_grad()
def validation_loss(net: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    net.eval()
    losses = [F.cross_entropy(net(x).flatten(0, 1), y.flatten()) for x, y in batches]
    net.train()
    return float(torch.stack(losses).mean())


@dataclass
class Context:
    rank: int
    world: int
    address: str
    workload: Workload
    train: list[tuple[torch.Tensor, torch.Tensor]]
    val: list[tuple[torch.Tensor, torch.Tensor]]
    port: int  # free ports from here on for this run (torchft's lighthouse, stores, managers)


# ---- Lightning runs: compute only, DDP, ours ------------------------------------------------------
class MeterCallback(pl.Callback):
    """Drives a :class:`Meter` from Lightning's hooks: validation pauses it and adds a curve point.

    ``lockstep``: a barrier (outside the meter) before and after every validation, so that ranks which
    do not communicate (compute only) evaluate together, as the distributed runs do, instead of one
    rank's evaluation competing for the cores with the others' training."""

    def __init__(self, meter: Meter, lockstep: bool = False) -> None:
        self.meter = meter
        self.lockstep = lockstep

    def on_train_start(self, *args: object) -> None:
        self.meter.start()

    def on_train_batch_end(self, *args: object) -> None:
        self.meter.step_done()

    def on_validation_start(self, *args: object) -> None:
        self.meter.stop()
        if self.lockstep:
            dist.barrier()

    def on_validation_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.meter.record(float(trainer.callback_metrics["val/loss"]))
        if self.lockstep:
            dist.barrier()
        self.meter.start()

    def on_train_end(self, *args: object) -> None:
        self.meter.stop()


def _lightning(ctx: Context, strategy: Any, distributed: bool = True) -> dict[str, Any]:
    w = ctx.workload
    steps = w.steps
    meter = Meter()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=ctx.world if distributed else 1,
        strategy=strategy,
        max_steps=steps,
        val_check_interval=w.eval_every,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[MeterCallback(meter, lockstep=not distributed)],
    )
    loader = partial(torch.utils.data.DataLoader, batch_size=None, shuffle=False)
    trainer.fit(w.module(), loader(ctx.train[:steps]), loader(ctx.val))
    return {"seconds": meter.seconds, "bytes": meter.bytes, "steps": steps, "curve": meter.curve,
            "step_seconds": meter.step_seconds}  # fmt: skip


def compute_only(ctx: Context) -> dict[str, Any]:
    """Plain Lightning on one device per rank, every rank at once, the same steps: no network at all.

    Every rank evaluates its own replica as often as the other runs evaluate theirs, all ranks at once
    (the meter excludes it, as for every run), so the compute-only loop differs from theirs in the
    network only."""
    return _lightning(ctx, SingleDeviceStrategy(device=torch.device("cpu")), distributed=False)


def ddp(ctx: Context) -> dict[str, Any]:
    return _lightning(ctx, DDPStrategy(process_group_backend="gloo"))


#: Our configurations by name: the strategy's arguments (``H`` comes from the case name).
OURS: dict[str, dict[str, Any]] = {
    # the strategy with nothing to send (a sync period beyond any run): its own cost per step, a floor
    "no_sync": {"algorithm": "local_sgd", "algorithm_options": {"H": 10**9}},
    "dsgd_overlap": {"topology": "one_peer_exponential", "overlap": True},
    # CHOCO keeps public copies of its neighbours, so it needs a static graph (one-peer graphs change every step)
    "choco_int8_ring": {"topology": "ring", "algorithm": "choco", "compression": "int8"},
    "choco_int8_exponential": {"topology": "exponential", "algorithm": "choco", "compression": "int8"},
    "choco_int4_ring": {"topology": "ring", "algorithm": "choco", "compression": "int4"},
    "diloco": {"algorithm": "diloco", "algorithm_options": dict(OUTER)},
    "local_sgd": {"algorithm": "local_sgd"},  # plain averaging every H steps: torch's post-local SGD's recursion
    "gasloc_int8_streaming": {
        "topology": "one_peer_exponential",
        "algorithm": "gasloc",
        "algorithm_options": {**OUTER, "fragments": FRAGMENTS, "delay": DELAY, "compression": "int8"},
    },
}


def ours(ctx: Context, config: str, h: str | None = None, delay: str | None = None) -> dict[str, Any]:
    """``ours:<config>[:H[:tau]]``: the strategy with :data:`OURS` ``[config]``, ``H`` and streaming's delay set."""
    kwargs = {**OURS[config]}
    chosen = {key: int(value) for key, value in (("H", h), ("delay", delay)) if value is not None}
    if chosen:
        kwargs["algorithm_options"] = {**kwargs.get("algorithm_options", {}), **chosen}
    strategy = DecentralizedStrategy(**kwargs)
    result = _lightning(ctx, strategy)
    return {**result, "counted_bytes": strategy.comm_stats.bytes_sent}


# ---- plain torch loops: post-local SGD, torchft, decent-dp ----------------------------------------
def _averaged_loss(ctx: Context, net: nn.Module) -> float:
    """Validation loss of the network average of every rank's ``net`` (its own parameters untouched)."""
    average = ctx.workload.net()
    with torch.no_grad():
        for mine, avg in zip(net.parameters(), average.parameters()):
            avg.copy_(mine)
            dist.all_reduce(avg)
            avg.div_(ctx.world)
    return validation_loss(average, ctx.val)


def _loop(
    ctx: Context, step: Callable[[torch.Tensor, torch.Tensor], None], evaluate: Callable[[], float]
) -> dict[str, Any]:
    meter = Meter()
    meter.start()
    for k, (x, y) in enumerate(ctx.train):
        step(x, y)
        meter.step_done()
        if (k + 1) % ctx.workload.eval_every == 0:
            meter.stop()
            meter.record(evaluate())
            meter.start()
    meter.stop()
    return {"seconds": meter.seconds, "bytes": meter.bytes, "steps": len(ctx.train), "curve": meter.curve,
            "step_seconds": meter.step_seconds}  # fmt: skip


def _backward(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    F.cross_entropy(net(x).flatten(0, 1), y.flatten()).backward()


def plain_loop(ctx: Context) -> dict[str, Any]:
    """The plain torch loop of the peers' runs (post-local SGD, torchft, decent-dp) with no network in it:
    their compute-only step, as ``compute`` is Lightning's."""
    net = ctx.workload.net()
    optimizer = ctx.workload.optimizer(net.parameters())

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        _backward(net, x, y)
        optimizer.step()

    return _loop(ctx, step, lambda: _averaged_loss(ctx, net))


def post_local_sgd(ctx: Context, h: str) -> dict[str, Any]:
    """torch's own: AdamW wrapped in ``PostLocalSGDOptimizer``, parameters averaged every ``H`` steps."""
    from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
    from torch.distributed.optim import PostLocalSGDOptimizer

    net = ctx.workload.net()
    optimizer = PostLocalSGDOptimizer(ctx.workload.optimizer(net.parameters()), PeriodicModelAverager(int(h)))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        optimizer.zero_grad()
        _backward(net, x, y)
        optimizer.step()

    return _loop(ctx, step, lambda: _averaged_loss(ctx, net))


def _fragments(net: GPT) -> list[nn.Module]:
    """Four fragments covering every parameter, in model order (the head is tied to the embedding)."""
    blocks = list(net.blocks)
    return [
        nn.ModuleList([net.tokens, net.positions, blocks[0]]),
        blocks[1],
        blocks[2],
        nn.ModuleList([blocks[3], net.norm]),
    ]


def torchft_diloco(ctx: Context, variant: str, h: str) -> dict[str, Any]:
    """torchft 0.2.0 DiLoCo (``diloco``) or Streaming DiLoCo (``streaming``: 4 fragments, delay 1) on gloo,
    every rank its own replica group, the lighthouse in rank 0's process."""
    from torchft import Manager, ProcessGroupGloo
    from torchft._torchft import LighthouseServer
    from torchft.local_sgd import DiLoCo

    logging.getLogger("torchft").setLevel(logging.WARNING)
    lighthouse_port, store_port, manager_port = ctx.port, ctx.port + 1, ctx.port + 2
    lighthouse = None
    if ctx.rank == 0:
        lighthouse = LighthouseServer(bind=f"{ctx.address}:{lighthouse_port}", min_replicas=ctx.world)
    first = [ctx.address]
    dist.broadcast_object_list(first, src=0)
    dist.barrier()
    store = dist.TCPStore(ctx.address, store_port, is_master=True, wait_for_workers=False)
    net = ctx.workload.net()
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timedelta(seconds=120)),
        load_state_dict=net.load_state_dict,
        state_dict=net.state_dict,
        min_replica_size=ctx.world,
        use_async_quorum=False,
        timeout=timedelta(seconds=120),
        quorum_timeout=timedelta(seconds=600),
        rank=0,
        world_size=1,
        store_addr=ctx.address,
        store_port=store_port,
        lighthouse_addr=f"http://{first[0]}:{lighthouse_port}",
        replica_id=f"ttq{ctx.rank}",
        port=manager_port,
        hostname=ctx.address,
        init_sync=False,
    )
    streaming = variant == "streaming"
    fragments = _fragments(net) if streaming else [net]
    outer = [torch.optim.SGD(f.parameters(), lr=OUTER["outer_lr"], momentum=OUTER["outer_momentum"], nesterov=True)
             for f in fragments]  # fmt: skip
    inner = ctx.workload.optimizer(net.parameters())
    diloco = DiLoCo(manager, fragments, inner, outer, sync_every=int(h), pin_memory=False,
                    fragment_sync_delay=DELAY if streaming else 0)  # fmt: skip

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        inner.zero_grad()
        _backward(net, x, y)
        inner.step()  # torchft's hooks count the step and synchronise fragments

    try:
        with diloco:
            result = _loop(ctx, step, lambda: _averaged_loss(ctx, net))
        expected = len(ctx.train) // (int(h) // len(fragments))
        committed = manager.current_step()
    finally:
        manager.shutdown(wait=False)
        del store
        dist.barrier()
        if lighthouse is not None:
            lighthouse.shutdown()
    result.update(syncs_expected=expected, syncs_committed=committed)
    if committed < expected:
        result["error"] = f"only {committed} of {expected} torchft syncs committed"
    return result


def decent_dp(ctx: Context) -> dict[str, Any]:
    """decent-dp 0.2.3 on its one-peer exponential graph (it steps inside backward hooks)."""
    from decent_dp.ddp import DecentralizedDataParallel

    w = ctx.workload
    model = DecentralizedDataParallel(
        w.net(), optim_fn=lambda named: w.optimizer([p for _, p in named]), topology="one-peer-exp"
    )

    def evaluate() -> float:
        model.global_avg(will_revert=True)
        loss = validation_loss(model._model, ctx.val)
        model.revert_global_avg()
        return loss

    result = _loop(ctx, lambda x, y: _backward(model, x, y), evaluate)
    model.global_avg(will_revert=False)  # finish its exchanges in flight
    return result


def run_case(name: str, ctx: Context) -> dict[str, Any]:
    """Run ``name`` (``kind[:args]``, optionally ``#k``: the k-th repeat of the same run)."""
    kind, *args = name.partition("#")[0].split(":")
    runs: dict[str, Callable[..., dict[str, Any]]] = {
        "compute": compute_only,
        "loop": plain_loop,
        "ddp": ddp,
        "ours": ours,
        "post_local_sgd": post_local_sgd,
        "torchft": torchft_diloco,
        "decent_dp": decent_dp,
    }
    if kind not in runs:
        raise ValueError(f"Unknown time-to-quality run {name!r}; kinds: {', '.join(runs)}.")
    return runs[kind](ctx, *args)


# ---- worker ---------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=Path, required=True, help="folder of train.bin/val.bin/meta.json")
    parser.add_argument("--cases", required=True)
    parser.add_argument("--workload", required=True, help="the Workload as JSON")
    parser.add_argument("--port", type=int, default=29850, help="first of the ports runs may bind")
    return parser.parse_args()


def _cases(names: str) -> Iterator[tuple[int, str]]:
    yield from enumerate(n for n in names.split(",") if n)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(minutes=10))
    rank, world = dist.get_rank(), dist.get_world_size()
    workload = Workload(**json.loads(args.workload))
    train, val = train_batches(args.tokens, workload, rank, world), val_batches(args.tokens, workload)
    results = args.out / f"rank{rank}.jsonl"
    for index, name in _cases(args.cases):
        ctx = Context(rank, world, os.environ["RANK_ADDRESS"], workload, train, val, args.port + 10 * index)
        dist.barrier()
        try:
            record = {"case": name, "rank": rank, **run_case(name, ctx)}
        except Exception:
            record = {"case": name, "rank": rank, "error": traceback.format_exc()}
            with results.open("a") as f:
                f.write(json.dumps(record) + "\n")
            raise  # the other ranks may be stuck in a collective: the launcher stops them all
        gc.collect()
        with results.open("a") as f:
            f.write(json.dumps(record) + "\n")
    dist.barrier()
    dist.destroy_process_group()


def workload_json(w: Workload) -> str:
    return json.dumps(asdict(w))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
