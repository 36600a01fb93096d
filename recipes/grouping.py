"""Aspect-ratio grouping of detection images (torchvision's detection reference, ``--aspect-ratio-group-factor``).

Batching images of similar shape wastes less padding: the model pads every image of a batch to the
largest one. torchvision keeps its grouped batch sampler in its reference scripts, not in the library, so
it is written here, as a sampler (a ``DistributedSampler``, so Lightning keeps it and calls ``set_epoch``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import DistributedSampler


def aspect_ratio_groups(aspect_ratios: Sequence[float], factor: int) -> list[int]:
    """The group of each width/height ratio: ``2 * factor`` bins between 1/2 and 2, spaced evenly in
    log2, plus one below and one above (torchvision's reference bins)."""
    bins = 2.0 ** np.linspace(-1.0, 1.0, 2 * factor + 1)
    return np.digitize(np.asarray(aspect_ratios, dtype=np.float64), bins).tolist()


class GroupedSampler(DistributedSampler):
    """This rank's indices from ``sampler``, reordered so that every ``batch_size`` consecutive indices
    share a group (the leftovers of each group fill the last batches).

    Every index of ``sampler`` is kept and ``len`` is unchanged, so all ranks still take the same
    number of steps per epoch.

    Args:
        sampler: the rank's sampler (Lightning-style ``DistributedSampler``, or a non-iid partition).
        group_ids: the group of every dataset index (see :func:`aspect_ratio_groups`).
        batch_size: the loader's batch size.
    """

    def __init__(self, sampler: DistributedSampler, group_ids: Sequence[int], batch_size: int) -> None:
        super().__init__(sampler.dataset, num_replicas=sampler.num_replicas, rank=sampler.rank, shuffle=False)
        self.sampler = sampler
        self.group_ids = list(group_ids)
        self.batch_size = batch_size

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[int]:
        pending: dict[int, list[int]] = defaultdict(list)
        for index in self.sampler:
            group = pending[self.group_ids[index]]
            group.append(index)
            if len(group) == self.batch_size:
                yield from group
                group.clear()
        for group in pending.values():
            yield from group
