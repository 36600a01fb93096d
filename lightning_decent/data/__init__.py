"""Data helpers: heterogeneous (label-skewed) partitions of a dataset over ranks."""

from lightning_decent.data.partition import (
    SCHEMES,
    LabelPartitionSampler,
    Partition,
    label_histograms,
    label_skew,
    partition_indices,
)

__all__ = ["SCHEMES", "LabelPartitionSampler", "Partition", "label_histograms", "label_skew", "partition_indices"]
