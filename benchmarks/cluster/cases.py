"""The measurements one rank of the emulated cluster runs, by name (see :data:`CASES`).

Every case runs on all ranks at once (the worker calls them in the same order everywhere) and
returns this rank's numbers: per-step (or per-round) durations after the warm-up, or a training
curve. Names may carry ``@slow=SECONDS``: the last rank then does that much extra work per step.

* ``raw_exchange`` / ``raw_allreduce``: plain gloo on one flat model-sized tensor, the transport's
  own speed (one-peer exchange ``i -> i - 1``, and an all-reduce).
* ``comm:<topology>`` / ``comm:allreduce``: one blocking round of the library's communicator on the
  model's buckets (a barrier before each round); ``comm:hierarchical:<intra_machine>`` picks how the
  machine's reduce-scatter and all-gather run (``shared_memory``, the default, or ``process_group``).
* ``machine:<intra_machine>``: that reduce-scatter and all-gather alone (the machine's exact average,
  nothing across machines), through shared memory or the machine's gloo group.
* ``lightning_local``: plain Lightning on one device per rank, no communication (compute only).
* ``isolated``: ``DecentralizedStrategy`` on a graph without edges (the strategy, no network).
* ``torch_ddp``, ``lightning_ddp``: AllReduce data parallelism (torch, and Lightning's DDPStrategy).
* ``raw_overlap``: plain torch training while raw gloo moves one model ``i -> i - 1`` each step, and
  nothing else: the fastest an overlapped one-peer step can be on this machine.
* ``decent_dp:<topology>``: decent-dp's ``DecentralizedDataParallel`` (if installed), e.g.
  ``decent_dp:alternating-exp-ring`` on a two-level cluster (its ``local_world_size`` is the machine's).
* ``ours:<topology>[:overlap]``: ``DecentralizedStrategy`` (D-SGD), blocking or overlapped; besides the
  library's topologies, ``alternating_pairs`` is decent-dp's "ring" (perfect matchings of neighbours,
  alternating between even and odd pairs: one peer per step). ``hierarchical`` takes the machines from
  ``$LOCAL_WORLD_SIZE`` and gossips one-peer exponentially between them.
* ``accuracy:ddp`` / ``accuracy:<topology>[:overlap]``: the digits recipe with a wide CNN; validation
  accuracy (of the network average) against training time, evaluation time excluded.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.cluster.workloads import Classifier, ModelSpec, StepClock, step_summary, synthetic_loader
from lightning_decent import DecentralizedStrategy
from lightning_decent.buckets import build_buckets
from lightning_decent.comm import HierarchicalCommunicator, P2PCommunicator
from lightning_decent.comm.p2p import average_all_reduce
from lightning_decent.topology import HierarchicalTopology, Topology, get_topology

BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class Context:
    """What every case of one run shares."""

    rank: int
    world: int
    spec: ModelSpec
    steps: int
    warmup: int
    batch: int
    lr: float
    epochs: int
    accuracy_hidden: int
    accuracy_lr: float
    local_world_size: int = 1  # ranks per machine (two-level cluster); rank = machine x L + local rank

    def layout(self, distributed: bool = True) -> dict[str, int]:
        """The Trainer's ``devices`` and ``num_nodes``: L devices on each of the world / L machines."""
        if not distributed:
            return {"devices": 1, "num_nodes": 1}
        return {"devices": self.local_world_size, "num_nodes": self.world // self.local_world_size}

    def delay(self, slow: float) -> float:
        """Extra seconds per step on this rank: the last rank is the straggler."""
        return slow if self.rank == self.world - 1 else 0.0


def run_case(name: str, ctx: Context) -> dict[str, Any]:
    """Run case ``name`` (``kind[:arg[:arg]][@slow=S]``) on this rank and return its numbers."""
    base, _, slow_text = name.partition("@slow=")
    slow = float(slow_text) if slow_text else 0.0
    kind, *args = base.split(":")
    if kind not in CASES:
        raise ValueError(f"Unknown case {name!r}; kinds: {', '.join(CASES)}.")
    return CASES[kind](ctx, *args, slow=slow)


# ---- communication only ---------------------------------------------------------------------------
def _timed_rounds(ctx: Context, round_fn: Callable[[int], None]) -> dict[str, Any]:
    durations = []
    for k in range(ctx.warmup + ctx.steps):
        dist.barrier()
        start = time.perf_counter()
        round_fn(k)
        durations.append(time.perf_counter() - start)
    timed = durations[ctx.warmup :]
    return {"steps": timed, "median": statistics.median(timed), "mean": statistics.fmean(timed)}


def _model_buffers(ctx: Context) -> list[torch.Tensor]:
    return [bucket.flat for bucket in build_buckets(list(ctx.spec.build().parameters()), BUCKET_BYTES)]


def raw_exchange(ctx: Context, slow: float = 0.0) -> dict[str, Any]:
    sent = torch.randn(ctx.spec.parameters)
    received = torch.empty_like(sent)

    def exchange(_: int) -> None:
        receive = dist.irecv(received, (ctx.rank + 1) % ctx.world)
        send = dist.isend(sent, (ctx.rank - 1) % ctx.world)
        receive.wait()
        send.wait()

    return _timed_rounds(ctx, exchange)


def raw_allreduce(ctx: Context, slow: float = 0.0) -> dict[str, Any]:
    flat = torch.randn(ctx.spec.parameters)
    return _timed_rounds(ctx, lambda _: dist.all_reduce(flat))


def alternating_pairs(n: int) -> Topology:
    """decent-dp's ``ring`` (even n): pairs (0,1), (2,3), ... average at even steps, (1,2), ..., (n-1,0) at odd ones."""
    if n % 2:
        raise ValueError(f"alternating_pairs needs an even number of ranks, got {n}.")
    phases = []
    for offset in (0, 1):
        w = np.zeros((n, n))
        for i in range(offset, n + offset, 2):
            a, b = i % n, (i + 1) % n
            w[a, a] = w[a, b] = w[b, a] = w[b, b] = 0.5
        phases.append(w)
    return Topology(phases, name="alternating_pairs")


def _topology(name: str, n: int) -> str | Topology:
    """A library topology by name (the strategy builds it), or the benchmark's ``alternating_pairs``."""
    return alternating_pairs(n) if name == "alternating_pairs" else name


def comm_round(ctx: Context, topology: str, intra_machine: str = "shared_memory", slow: float = 0.0) -> dict[str, Any]:
    buffers = _model_buffers(ctx)
    if topology == "allreduce":
        return _timed_rounds(ctx, lambda _: average_all_reduce(buffers))
    graph = _topology(topology, ctx.world)
    graph = graph if isinstance(graph, Topology) else get_topology(graph, ctx.world)
    rounds = ctx.warmup + ctx.steps
    if isinstance(graph, HierarchicalTopology):
        hierarchical = HierarchicalCommunicator(graph, ctx.rank, intra_machine=intra_machine)
        result = _timed_rounds(ctx, lambda k: hierarchical.mix(buffers, k))
        between = hierarchical.between_machines.bytes_sent / rounds
        return {**result, "bytes_sent_per_round": hierarchical.stats.bytes_sent / rounds, "bytes_between": between}
    comm = P2PCommunicator(graph, ctx.rank)
    result = _timed_rounds(ctx, lambda k: comm.mix(buffers, k))
    return {**result, "bytes_sent_per_round": comm.stats.bytes_sent / rounds}


def machine_round(ctx: Context, intra_machine: str, slow: float = 0.0) -> dict[str, Any]:
    """The intra-machine stage of a hierarchical round alone: reduce-scatter and all-gather of the model."""
    graph = get_topology("hierarchical", ctx.world, local_world_size=ctx.local_world_size)
    hierarchical = HierarchicalCommunicator(graph, ctx.rank, intra_machine=intra_machine)
    buffers = _model_buffers(ctx)
    result = _timed_rounds(ctx, lambda _: hierarchical.machine_average(buffers))
    hierarchical.close()
    return result


# ---- training steps -------------------------------------------------------------------------------
def _fit(ctx: Context, strategy: Any, distributed: bool, slow: float) -> dict[str, Any]:
    torch.manual_seed(0)
    clock = StepClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        **ctx.layout(distributed),
        strategy=strategy,
        max_steps=ctx.warmup + ctx.steps + 1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[clock],
    )
    module = Classifier(ctx.spec.build(), lr=ctx.lr, delay=ctx.delay(slow))
    batches = (ctx.warmup + ctx.steps + 2) * (ctx.world if distributed else 1)
    trainer.fit(module, synthetic_loader(ctx.spec, ctx.batch, batches, seed=ctx.rank))
    return step_summary(clock.ends, ctx.warmup)


def lightning_local(ctx: Context, slow: float = 0.0) -> dict[str, Any]:
    return _fit(ctx, SingleDeviceStrategy(device=torch.device("cpu")), False, slow)


def isolated(ctx: Context, slow: float = 0.0) -> dict[str, Any]:
    """The decentralized strategy on a graph with no edges: everything but the network."""
    no_edges = Topology([np.eye(ctx.world)], name="isolated")
    return _fit(ctx, DecentralizedStrategy(topology=no_edges), True, slow)


def lightning_ddp(ctx: Context, slow: float = 0.0) -> dict[str, Any]:
    return _fit(ctx, DDPStrategy(process_group_backend="gloo"), True, slow)


def ours(ctx: Context, topology: str, *mode: str, slow: float = 0.0) -> dict[str, Any]:
    if mode not in ((), ("overlap",)):
        raise ValueError(f"ours:{topology}:{':'.join(mode)}: the only mode is 'overlap'.")
    strategy = DecentralizedStrategy(topology=_topology(topology, ctx.world), overlap=bool(mode))
    result = _fit(ctx, strategy, True, slow)
    return {**result, "bytes_sent_per_step": strategy.comm_stats.bytes_sent / max(strategy.gossip_step, 1)}


def _loop(ctx: Context, step: Callable[[torch.Tensor, torch.Tensor], None]) -> dict[str, Any]:
    loader = synthetic_loader(ctx.spec, ctx.batch, ctx.warmup + ctx.steps + 1, seed=ctx.rank)
    ends = []
    for inputs, labels in loader:
        step(inputs, labels)
        ends.append(time.perf_counter())
    return step_summary(ends, ctx.warmup)


def torch_ddp(ctx: Context, slow: float = 0.0) -> dict[str, Any]:
    torch.manual_seed(0)
    model = DistributedDataParallel(ctx.spec.build())
    optimizer = torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=0.9)

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> None:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    return _loop(ctx, step)


def raw_overlap(ctx: Context, slow: float = 0.0) -> dict[str, Any]:
    """The machine's floor for an overlapped one-peer step: plain torch forward/backward/SGD while raw
    gloo moves one model-sized message ``i -> i - 1``, with nothing else (no copy, no combine)."""
    torch.manual_seed(0)
    model = ctx.spec.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=ctx.lr, momentum=0.9)
    sent, received = torch.randn(ctx.spec.parameters), torch.empty(ctx.spec.parameters)

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> None:
        works = [dist.irecv(received, (ctx.rank + 1) % ctx.world), dist.isend(sent, (ctx.rank - 1) % ctx.world)]
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
        for work in works:
            work.wait()

    return _loop(ctx, step)


def decent_dp(ctx: Context, topology: str, slow: float = 0.0) -> dict[str, Any]:
    try:
        from decent_dp.ddp import DecentralizedDataParallel
    except ImportError:
        return {"skipped": "decent-dp is not installed (pip install decent-dp)"}
    torch.manual_seed(0)
    model = DecentralizedDataParallel(
        ctx.spec.build(),
        optim_fn=lambda named: torch.optim.SGD([p for _, p in named], lr=ctx.lr, momentum=0.9),
        topology=topology,
        bucket_size_in_mb=BUCKET_BYTES // 2**20,
        _local_world_size=ctx.local_world_size,
    )

    def step(inputs: torch.Tensor, labels: torch.Tensor) -> None:
        nn.functional.cross_entropy(model(inputs), labels).backward()  # it steps inside backward hooks

    result = _loop(ctx, step)
    model.global_avg(will_revert=False)  # finishes its exchanges in flight before the next case
    return result


# ---- time to accuracy -----------------------------------------------------------------------------
class TrainingClock(pl.Callback):
    """Training time with evaluation excluded, and the validation accuracy after each epoch."""

    def __init__(self) -> None:
        self.trained = 0.0
        self._since: float | None = None
        self.curve: list[tuple[float, float]] = []

    def on_train_start(self, *args: object) -> None:
        self._since = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, *args: object) -> None:
        if self._since is not None:
            self.trained += time.perf_counter() - self._since
            self._since = None

    def on_validation_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.sanity_checking:
            return
        self.curve.append((self.trained, float(trainer.callback_metrics["val/acc"])))
        self._since = time.perf_counter()


def accuracy(ctx: Context, which: str, *mode: str, slow: float = 0.0) -> dict[str, Any]:
    from lightning_decent.recipes.digits import DigitsClassifier, DigitsDataModule, digits_cnn

    if which == "ddp":
        strategy: Any = DDPStrategy(process_group_backend="gloo")
    else:
        strategy = DecentralizedStrategy(topology=which, overlap=mode == ("overlap",))
    pl.seed_everything(0)
    clock = TrainingClock()
    trainer = pl.Trainer(
        accelerator="cpu",
        **ctx.layout(),
        strategy=strategy,
        max_epochs=ctx.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    optimizer = partial(torch.optim.SGD, lr=ctx.accuracy_lr, momentum=0.9)
    model = DigitsClassifier(net=digits_cnn(width=32, hidden=ctx.accuracy_hidden), optimizer=optimizer)
    trainer.fit(model, DigitsDataModule(batch_size=ctx.batch))
    params = sum(p.numel() for p in model.parameters())
    return {"curve": clock.curve, "parameters": params, "optimizer_steps": trainer.global_step}


CASES: dict[str, Callable[..., dict[str, Any]]] = {
    "raw_exchange": raw_exchange,
    "raw_allreduce": raw_allreduce,
    "comm": comm_round,
    "machine": machine_round,
    "lightning_local": lightning_local,
    "isolated": isolated,
    "torch_ddp": torch_ddp,
    "raw_overlap": raw_overlap,
    "lightning_ddp": lightning_ddp,
    "decent_dp": decent_dp,
    "ours": ours,
    "accuracy": accuracy,
}
