"""Label-skewed splits over ranks: disjoint covering shards, measured skew, the sampler's epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_decent.data import LabelPartitionSampler, Partition, label_histograms, label_skew, partition_indices

N, CLASSES, RANKS = 2000, 10, 8
LABELS = np.random.default_rng(0).integers(0, CLASSES, N)


def _skew(scheme: str, seeds: range = range(5), **options: float) -> float:
    """Mean label skew over a few seeds (one draw of a Dirichlet split is noisy)."""
    return float(
        np.mean([label_skew(label_histograms(LABELS, partition_indices(LABELS, RANKS, scheme, seed=s, **options)))
                 for s in seeds])
    )  # fmt: skip


@pytest.mark.parametrize(
    ("scheme", "options"),
    [("iid", {}), ("shards", {"shards_per_part": 2}), ("dirichlet", {"alpha": 0.05}), ("dirichlet", {"alpha": 10.0})],
)
def test_shards_are_disjoint_and_cover_the_dataset(scheme: str, options: dict) -> None:
    parts = partition_indices(LABELS, RANKS, scheme, seed=3, **options)
    assert len(parts) == RANKS and all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == N
    assert np.array_equal(np.sort(joined), np.arange(N))


def test_the_split_is_a_function_of_the_seed() -> None:
    first = partition_indices(LABELS, RANKS, "dirichlet", alpha=0.3, seed=7)
    again = partition_indices(LABELS, RANKS, "dirichlet", alpha=0.3, seed=7)
    other = partition_indices(LABELS, RANKS, "dirichlet", alpha=0.3, seed=8)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    alphas = [100.0, 1.0, 0.3, 0.1]
    skews = [_skew("dirichlet", alpha=a) for a in alphas]
    assert skews == sorted(skews), dict(zip(alphas, skews))
    assert _skew("iid") < 0.1 < skews[1]  # iid is close to the global label distribution
    assert skews[-1] > 0.6  # alpha = 0.1: most ranks hold one or two classes (the maximum is 1 - 1/8)


def test_label_shards_limit_the_classes_per_rank() -> None:
    sorted_labels = np.repeat(np.arange(CLASSES), N // CLASSES)  # 200 per class, shards of 125
    parts = partition_indices(sorted_labels, RANKS, "shards", shards_per_part=2, seed=0)
    assert max(len(np.unique(sorted_labels[p])) for p in parts) <= 4  # 2 shards, each spanning <= 2 classes
    assert {len(p) for p in parts} == {N // RANKS}


def test_label_skew_of_disjoint_classes_is_one_minus_one_over_n() -> None:
    assert label_skew(np.eye(4) * 10) == pytest.approx(0.75)
    assert label_skew(np.ones((4, 3))) == pytest.approx(0.0)


def test_sampler_epochs_have_equal_length_and_stay_in_the_shard() -> None:
    samplers = [LabelPartitionSampler(LABELS, RANKS, r, "dirichlet", alpha=0.1, seed=1) for r in range(RANKS)]
    sizes = {len(s.indices) for s in samplers}
    assert len(sizes) > 1  # unequal shards ...
    for sampler in samplers:
        epoch0 = list(sampler)
        sampler.set_epoch(1)
        epoch1 = list(sampler)
        assert len(epoch0) == len(epoch1) == len(sampler) == -(-N // RANKS)  # ... but equal steps per epoch
        assert set(epoch0) <= set(sampler.indices.tolist())
        assert epoch0 != epoch1
        assert int(sampler.label_histogram().sum()) == len(sampler.indices)


def test_sampler_is_a_distributed_sampler_so_lightning_keeps_it() -> None:
    # Lightning only injects its own DistributedSampler into loaders without one
    # (``_DataConnector._requires_distributed_sampler``), so the partition survives ``use_distributed_sampler``.
    sampler = Partition("shards").sampler(torch.as_tensor(LABELS), num_replicas=RANKS, rank=0)
    assert isinstance(sampler, torch.utils.data.DistributedSampler)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: partition_indices(LABELS, RANKS, "zipf"), "valid: iid, dirichlet, shards"),
        (lambda: partition_indices(LABELS, RANKS, "dirichlet", alpha=0.0), "alpha must be > 0"),
        (lambda: partition_indices(LABELS[:5], RANKS), "use fewer ranks"),
        (lambda: partition_indices(np.zeros(40) + np.arange(40) % 2, 16, "dirichlet", alpha=1e-4), "Raise"),
        (lambda: Partition("label_shards"), r"data\.partition\.scheme"),
    ],
)
def test_bad_partitions_fail_with_the_fix(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
