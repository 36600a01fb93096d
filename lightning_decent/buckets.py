"""Flat parameter buckets: parameters become views of a few contiguous tensors.

Gossip then moves one message per bucket and peer (no per-parameter messages), and algorithms
update a whole bucket with a handful of element-wise kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_decent.algorithms import Algorithm, Bucket
from lightning_decent.comm import Communicator


class ParamBucket:
    """A contiguous tensor holding the values of ``params``, which are rebound to views of it."""

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        first = params[0]
        self.params = list(params)
        self.flat = torch.empty(sum(p.numel() for p in params), dtype=first.dtype, device=first.device)
        self._param_views = self._views(self.flat)
        with torch.no_grad():
            for view, p in zip(self._param_views, self.params):
                view.copy_(p)
                p.data = view
        self.grad: torch.Tensor | None = None
        self._grad_views: list[torch.Tensor] = []

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        views, offset = [], 0
        for p in self.params:
            views.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return views

    def enable_flat_grad(self) -> None:
        """Allocate a flat gradient buffer for algorithms that rewrite gradients."""
        self.grad = torch.zeros_like(self.flat)
        self._grad_views = self._views(self.grad)

    @torch.no_grad()
    def gather_grads(self) -> None:
        """Copy the parameters' gradients into the flat buffer (zeros where a gradient is missing)."""
        assert self.grad is not None
        for view, p in zip(self._grad_views, self.params):
            if p.grad is None:
                view.zero_()
            else:
                view.copy_(p.grad)

    def scatter_grads(self) -> None:
        """Point every parameter's ``.grad`` at its slice of the (rewritten) flat buffer."""
        for view, p in zip(self._grad_views, self.params):
            p.grad = view


def build_buckets(params: Iterable[nn.Parameter], bucket_bytes: int) -> list[ParamBucket]:
    """Group parameters (in the given order) by dtype and device into buckets of at most ``bucket_bytes``.

    A parameter larger than ``bucket_bytes`` gets a bucket of its own.
    """
    open_groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    sizes: dict[tuple[torch.dtype, torch.device], int] = {}
    buckets: list[ParamBucket] = []
    for p in params:
        key = (p.dtype, p.device)
        size = p.numel() * p.element_size()
        group = open_groups.setdefault(key, [])
        if group and sizes[key] + size > bucket_bytes:
            buckets.append(ParamBucket(group))
            group = open_groups[key] = []
            sizes[key] = 0
        group.append(p)
        sizes[key] = sizes.get(key, 0) + size
    buckets.extend(ParamBucket(group) for group in open_groups.values() if group)
    return buckets


def bucket_optimizers(
    optimizers: Iterable[torch.optim.Optimizer], algorithm: Algorithm, bucket_bytes: int
) -> dict[torch.optim.Optimizer, tuple[list[ParamBucket], list[Bucket]]]:
    """Each optimizer's parameters packed into flat buckets (a parameter shared by two optimizers belongs to
    the first), with the algorithm's per-bucket state initialised."""
    packed: dict[torch.optim.Optimizer, tuple[list[ParamBucket], list[Bucket]]] = {}
    seen: set[int] = set()
    for optimizer in optimizers:
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in seen]
        seen.update(id(p) for p in params)
        algorithm.check_optimizer(optimizer)
        param_buckets = build_buckets(params, bucket_bytes) if params else []
        algo_buckets = []
        for pb in param_buckets:
            if algorithm.transforms_gradients:
                pb.enable_flat_grad()
            bucket = Bucket(pb.flat, pb.grad)
            algorithm.init_state(bucket)
            algo_buckets.append(bucket)
        packed[optimizer] = (param_buckets, algo_buckets)
    return packed


def with_gradient_transform(
    closure: Callable[[], Any],
    algorithm: Algorithm,
    comm: Communicator,
    param_buckets: list[ParamBucket],
    buckets: list[Bucket],
    step: int,
) -> Callable[[], Any]:
    """``closure`` (forward, backward) followed by the algorithm's gradient transform on the flat gradients."""

    def run() -> Any:
        output = closure()
        for pb in param_buckets:
            pb.gather_grads()
        algorithm.transform_gradients(buckets, comm, step)
        for pb in param_buckets:
            pb.scatter_grads()
        return output

    return run
