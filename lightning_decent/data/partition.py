"""Label-skewed (heterogeneous) splits of a dataset over ranks, as a ``DistributedSampler``.

Decentralized methods differ most when every rank sees a different label distribution. The
schemes here split the indices of any map-style dataset with integer labels into disjoint shards
that cover the dataset, one per rank:

- ``iid``: a uniformly random split into equal shards.
- ``dirichlet``: for each class, the shares of the ranks are drawn from ``Dirichlet(alpha)``
  (Hsu, Qi & Brown 2019) over the ranks that hold fewer than ``ceil(N / n)`` samples so far. Small
  ``alpha`` gives each rank few classes, large ``alpha`` approaches ``iid``.
- ``shards``: the indices sorted by label are cut into ``n * shards_per_rank`` equal shards and
  each rank gets ``shards_per_rank`` of them (McMahan et al. 2017): at most that many classes
  per rank when the classes are larger than a shard.

Every rank builds the same split from the shared seed, so no communication is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DistributedSampler

Scheme = Literal["iid", "dirichlet", "shards"]
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "shards")
Labels = Sequence[int] | np.ndarray | torch.Tensor
_MAX_DIRICHLET_DRAWS = 100


def _as_array(labels: Labels) -> np.ndarray:
    return np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)


def partition_indices(
    labels: Labels,
    num_parts: int,
    scheme: Scheme = "iid",
    alpha: float = 0.5,
    shards_per_part: int = 2,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split ``range(len(labels))`` into ``num_parts`` disjoint, covering, sorted index arrays.

    Args:
        labels: one integer label per sample (any values; they are only compared).
        num_parts: number of shards (ranks).
        scheme: ``"iid"``, ``"dirichlet"`` or ``"shards"`` (see the module docstring).
        alpha: Dirichlet concentration (``dirichlet`` only), > 0.
        shards_per_part: label shards per rank (``shards`` only), >= 1.
        seed: the split is a deterministic function of the seed.

    Raises:
        ValueError: for an unknown scheme, bad parameters, fewer samples than shards, or a
            Dirichlet draw that keeps leaving a rank empty (the message names the fix).
    """
    y = _as_array(labels)
    if scheme not in SCHEMES:
        raise ValueError(f"Unknown partition scheme {scheme!r}; valid: {', '.join(SCHEMES)}.")
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}.")
    if len(y) < num_parts:
        raise ValueError(f"Cannot split {len(y)} samples into {num_parts} non-empty shards; use fewer ranks.")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(len(y)), num_parts)]
    if scheme == "shards":
        return _label_shards(y, num_parts, shards_per_part, rng)
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}.")
    for _ in range(_MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_split(y, num_parts, alpha, rng)
        if all(len(p) for p in parts):
            return parts
    raise ValueError(
        f"Dirichlet(alpha={alpha}) left a rank without samples in {_MAX_DIRICHLET_DRAWS} draws "
        f"({len(np.unique(y))} classes, {num_parts} ranks). Raise data.partition.alpha, use fewer ranks, "
        f"or use data.partition.scheme=shards."
    )


def _dirichlet_split(y: np.ndarray, n: int, alpha: float, rng: np.random.Generator) -> list[np.ndarray]:
    capacity = math.ceil(len(y) / n)
    sizes = np.zeros(n, dtype=np.int64)
    chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
    for label in rng.permutation(np.unique(y)):
        members = rng.permutation(np.flatnonzero(y == label))
        open_ranks = np.flatnonzero(sizes < capacity)  # never empty: the ranks hold fewer than N samples
        shares = np.zeros(n)
        shares[open_ranks] = rng.dirichlet(np.full(len(open_ranks), alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).round().astype(np.int64)
        for rank, chunk in enumerate(np.split(members, cuts)):
            chunks[rank].append(chunk)
            sizes[rank] += len(chunk)
    return [np.sort(np.concatenate(c)) for c in chunks]


def _label_shards(y: np.ndarray, n: int, shards_per_part: int, rng: np.random.Generator) -> list[np.ndarray]:
    if shards_per_part < 1:
        raise ValueError(f"shards_per_rank must be >= 1, got {shards_per_part}.")
    if len(y) < n * shards_per_part:
        raise ValueError(
            f"{len(y)} samples cannot be cut into {n} ranks x {shards_per_part} shards; lower shards_per_rank."
        )
    shuffled = rng.permutation(len(y))  # random order within each label
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    shards = np.array_split(by_label, n * shards_per_part)
    owner = rng.permutation(n * shards_per_part)
    return [np.sort(np.concatenate([shards[s] for s in owner[r::n]])) for r in range(n)]


def label_histograms(labels: Labels, parts: Sequence[np.ndarray]) -> np.ndarray:
    """``[num_parts, num_classes]`` counts; classes are the sorted distinct values of ``labels``."""
    _, codes = np.unique(_as_array(labels), return_inverse=True)
    num_classes = int(codes.max()) + 1 if len(codes) else 0
    return np.stack([np.bincount(codes[p], minlength=num_classes) for p in parts])


def label_skew(histograms: np.ndarray | torch.Tensor) -> float:
    """Mean total-variation distance between each rank's label distribution and the global one.

    0 for identical distributions; ``1 - 1/n`` for ``n`` equal ranks that own disjoint classes.
    """
    h = np.asarray(histograms.cpu() if isinstance(histograms, torch.Tensor) else histograms, dtype=np.float64)
    per_rank = h / np.maximum(h.sum(axis=1, keepdims=True), 1.0)
    overall = h.sum(axis=0) / max(h.sum(), 1.0)
    return float(0.5 * np.abs(per_rank - overall).sum(axis=1).mean())


class LabelPartitionSampler(DistributedSampler):
    """A ``DistributedSampler`` whose rank draws only from its own label-skewed shard.

    Lightning leaves a ``DistributedSampler`` it finds in a training ``DataLoader`` alone (it
    only injects its own into loaders that have none), so this sampler works with the default
    ``use_distributed_sampler=True``, and validation loaders stay evenly sharded by Lightning.

    Every rank yields ``ceil(N / num_replicas)`` indices per epoch, like ``DistributedSampler``,
    so all ranks take the same number of optimizer steps: a smaller shard is cycled through fresh
    permutations, a larger one is sub-sampled (differently every epoch, see ``set_epoch``).

    Args:
        dataset_labels: one integer label per sample of the dataset.
        num_replicas: number of ranks.
        rank: this rank.
        scheme: ``"iid"``, ``"dirichlet"`` or ``"shards"``.
        alpha: Dirichlet concentration.
        shards_per_rank: label shards per rank for ``"shards"``.
        seed: seed of the split and of the per-epoch order (the same on every rank).
        shuffle: draw the shard in a random order each epoch.
    """

    def __init__(
        self,
        dataset_labels: Labels,
        num_replicas: int,
        rank: int,
        scheme: Scheme = "dirichlet",
        alpha: float = 0.5,
        shards_per_rank: int = 2,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        labels = _as_array(dataset_labels)
        super().__init__(labels, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.scheme = scheme
        self.indices = partition_indices(labels, num_replicas, scheme, alpha, shards_per_rank, seed)[rank]
        self.classes = np.unique(labels)
        self._histogram = label_histograms(labels, [self.indices])[0]

    def label_histogram(self) -> torch.Tensor:
        """Samples per class (in the order of ``self.classes``) in this rank's shard."""
        return torch.as_tensor(self._histogram, dtype=torch.long)

    def __iter__(self) -> Iterator[int]:
        rng = np.random.default_rng((self.seed, self.epoch, self.rank))
        rounds = math.ceil(self.num_samples / len(self.indices))
        orders = [rng.permutation(self.indices) if self.shuffle else self.indices for _ in range(rounds)]
        return iter(np.concatenate(orders)[: self.num_samples].tolist())

    def __len__(self) -> int:
        return self.num_samples


@dataclass(frozen=True)
class Partition:
    """How a recipe's training set is split over ranks (the ``data.partition`` config).

    Args:
        scheme: ``"iid"``, ``"dirichlet"`` or ``"shards"``. Recipes leave ``iid`` to Lightning's
            own ``DistributedSampler``.
        alpha: Dirichlet concentration.
        shards_per_rank: label shards per rank for ``"shards"``.
        seed: seed of the split.
    """

    scheme: Scheme = "iid"
    alpha: float = 0.5
    shards_per_rank: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"data.partition.scheme={self.scheme!r} is not one of {', '.join(SCHEMES)}.")

    def sampler(self, labels: Labels, num_replicas: int, rank: int) -> LabelPartitionSampler:
        """The sampler of ``rank``'s shard."""
        return LabelPartitionSampler(
            labels, num_replicas, rank, self.scheme, self.alpha, self.shards_per_rank, self.seed
        )
