"""Byte-level language modelling with a small GPT-style decoder on any folder of text files.

Tokens are the files' raw bytes (a vocabulary of 256; nothing to download). The default corpus is
the Python standard library's own source tree (``sysconfig.get_paths()["stdlib"]``, ``*.py``),
capped by ``max_bytes``. For a non-iid ``partition`` a block's label is the top-level folder of
its file (for the standard library: ``asyncio``, ``email``, ...; ``.`` for top-level modules).
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.text import Perplexity

from lightning_decent.data import Partition
from lightning_decent.recipes.common import (
    Config,
    DataRootError,
    OptimizerFactory,
    RecipeDataModule,
    RecipeModule,
    ScheduleFactory,
    build,
    require_paths,
)

VOCAB_SIZE = 256

LAYOUT = """\
  ROOT/**/<files matching data.pattern>   any folder tree of text files (read as raw bytes), e.g.
                                          data.root=/data/corpus data.pattern='**/*.txt'"""


class TokenBlocks(Dataset):
    """``(input, target)`` pairs from ``[N, block_size + 1]`` byte blocks; the target is the input shifted by one."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        block = self.blocks[index].long()
        return block[:-1], block[1:]


def read_corpus(
    root: Path, pattern: str, max_bytes: int, exclude_dirs: Sequence[str], seed: int
) -> list[tuple[Path, bytes]]:
    """Files under ``root`` matching ``pattern`` (none inside ``exclude_dirs``), in a seeded random
    order, until ``max_bytes`` are read (the last file is truncated)."""
    files = sorted(
        p for p in root.glob(pattern) if p.is_file() and not set(p.relative_to(root).parts[:-1]) & set(exclude_dirs)
    )
    corpus, total = [], 0
    for index in np.random.default_rng(seed).permutation(len(files)):
        if total >= max_bytes:
            break
        data = files[index].read_bytes()[: max_bytes - total]
        corpus.append((files[index], data))
        total += len(data)
    return corpus


class TextDataModule(RecipeDataModule):
    """Non-overlapping byte blocks of every file, split at random into training and validation blocks.

    Args:
        root: the corpus folder (default: the Python standard library's source tree).
        pattern: glob of the files under ``root`` (recursive with ``**``).
        max_bytes: read at most this many bytes.
        exclude_dirs: folder names to skip anywhere under ``root`` (third-party packages, caches).
        block_size: tokens per training sequence.
        val_fraction: share of blocks held out for validation.
        split_seed: seed of the file order and of the split (the same on every rank).
        batch_size: sequences per rank and step.
        num_workers: ``DataLoader`` workers per rank.
        partition: the training split over ranks (labels: a block's top-level folder).
    """

    def __init__(
        self,
        root: str | None = None,
        pattern: str = "**/*.py",
        max_bytes: int = 2_000_000,
        exclude_dirs: Sequence[str] = ("site-packages", "dist-packages", "__pycache__"),
        block_size: int = 128,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        partition: Partition | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, partition)
        self.root = root or sysconfig.get_paths()["stdlib"]
        self.pattern = pattern
        self.max_bytes = max_bytes
        self.exclude_dirs = tuple(exclude_dirs)
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | None = None
        self._train_labels: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        root = require_paths("language_model", self.root, LAYOUT)
        corpus = read_corpus(root, self.pattern, self.max_bytes, self.exclude_dirs, self.split_seed)
        blocks, groups = [], []
        for path, data in corpus:
            count = (len(data) - 1) // self.block_size
            if count < 1:  # shorter than one block (or empty)
                continue
            tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            starts = torch.arange(count) * self.block_size
            blocks.append(tokens[starts[:, None] + torch.arange(self.block_size + 1)])
            relative = path.relative_to(root).parts
            groups += [relative[0] if len(relative) > 1 else "."] * count
        if len(groups) < 2:
            raise DataRootError(
                f"language_model: {root} has no files matching {self.pattern!r} with more than "
                f"data.block_size={self.block_size} bytes. Expected the layout\n{LAYOUT}"
            )
        all_blocks = torch.cat(blocks)
        labels = torch.as_tensor(np.unique(groups, return_inverse=True)[1])
        order = torch.randperm(len(all_blocks), generator=torch.Generator().manual_seed(self.split_seed))
        held_out = max(1, int(self.val_fraction * len(order)))
        self.val_set = TokenBlocks(all_blocks[order[:held_out]])
        self.train_set = TokenBlocks(all_blocks[order[held_out:]])
        self._train_labels = labels[order[held_out:]]

    def train_labels(self) -> Sequence[int]:
        assert self._train_labels is not None
        return self._train_labels

    def train_dataloader(self) -> DataLoader:
        assert self.train_set is not None
        return self._train_loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        assert self.val_set is not None
        return self._eval_loader(self.val_set)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where each position sees only itself and earlier positions."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} must be divisible by n_head={n_head}.")
        self.n_head = n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        y = F.scaled_dot_product_attention(*heads, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = CausalSelfAttention(d_model, n_head, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attention(self.norm1(x)))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A GPT-style decoder-only transformer with learned positions and tied input/output embeddings.

    Args:
        vocab_size: number of token ids (256 for bytes).
        block_size: the longest sequence (positions).
        n_layer: decoder blocks.
        n_head: attention heads per block.
        d_model: embedding width.
        dropout: dropout on embeddings, attention and residual branches.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        block_size: int = 128,
        n_layer: int = 4,
        n_head: int = 4,
        d_model: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.block_size = block_size
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(block_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*(DecoderBlock(d_model, n_head, dropout) for _ in range(n_layer)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.tokens.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[batch, length]`` token ids -> ``[batch, length, vocab_size]`` next-token logits."""
        length = tokens.shape[1]
        if length > self.block_size:
            raise ValueError(f"sequence of {length} tokens is longer than block_size={self.block_size}.")
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.tokens(tokens) + self.positions(positions))
        return self.head(self.norm(self.blocks(x)))


class LanguageModel(RecipeModule):
    """Next-token cross-entropy; logs ``train/loss``, ``val/loss`` and ``val/perplexity`` (torchmetrics).

    Args:
        net: a model mapping token ids to next-token logits (e.g. :class:`GPT`).
        optimizer: ``params -> Optimizer``.
        scheduler: optional per-step schedule factory (see :mod:`lightning_decent.recipes.schedules`).
        decay_bias_and_norm: apply weight decay to biases and norm weights too.
    """

    def __init__(
        self,
        net: nn.Module | Config,
        optimizer: OptimizerFactory | Config,
        scheduler: ScheduleFactory | Config | None = None,
        decay_bias_and_norm: bool = False,
    ) -> None:
        super().__init__(optimizer, scheduler, decay_bias_and_norm)
        self.net: nn.Module = build(net)
        self.val_perplexity = Perplexity()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self.net(inputs).flatten(0, 1), targets.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        logits = self.net(inputs)
        self.log("val/loss", F.cross_entropy(logits.flatten(0, 1), targets.flatten()), sync_dist=True)
        self.val_perplexity(logits, targets)
        self.log("val/perplexity", self.val_perplexity, prog_bar=True)
