"""Byte-level language modelling with a small GPT-style decoder on any folder of text files.

Tokens are the files' raw bytes (a vocabulary of 256; nothing to download), written once into
memory-mapped token files (:mod:`lightning_decent.recipes.text_tokens`). The default corpus is the
Python standard library's own source tree (``sysconfig.get_paths()["stdlib"]``, ``*.py``), capped by
``max_bytes``. For a non-iid ``partition`` a block's label is the top-level folder of its file (for the
standard library: ``asyncio``, ``email``, ...; ``.`` for top-level modules).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
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
from lightning_decent.recipes.text_tokens import (
    DEFAULT_EXCLUDE,
    VOCAB_SIZE,
    TokenBlocks,
    default_corpus,
    is_prepared,
    prepare,
)

LAYOUT = """\
  ROOT/**/<files matching data.pattern>   any folder tree of text files (read as raw bytes), e.g.
                                          data.root=/data/corpus data.pattern='**/*.txt'"""


class TextDataModule(RecipeDataModule):
    """Non-overlapping byte blocks of memory-mapped token files (:mod:`lightning_decent.recipes.text_tokens`).

    ``prepare_data`` (Lightning runs it on global rank 0 before every rank's ``setup``) writes the token
    files into ``tokens_dir`` from the corpus under ``root`` unless they are there already, e.g. from
    ``python -m lightning_decent.recipes.text_tokens``.

    Args:
        tokens_dir: the folder of ``train.bin``, ``val.bin`` and ``meta.json``.
        root: the corpus folder (default: the Python standard library's source tree).
        pattern: glob of the files under ``root`` (recursive with ``**``).
        max_bytes: read at most this many bytes of the corpus.
        exclude_dirs: folder names to skip anywhere under ``root`` (third-party packages, caches).
        block_size: tokens per training sequence.
        val_fraction: share of the bytes (whole files) held out for validation.
        split_seed: seed of the file order and of the split.
        batch_size: sequences per rank and step.
        num_workers: ``DataLoader`` workers per rank.
        partition: the training split over ranks (labels: the top-level folder of a block's file).
    """

    def __init__(
        self,
        tokens_dir: str,
        root: str | None = None,
        pattern: str = "**/*.py",
        max_bytes: int | None = 2_000_000,
        exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE,
        block_size: int = 128,
        val_fraction: float = 0.05,
        split_seed: int = 0,
        batch_size: int = 32,
        num_workers: int = 0,
        partition: Partition | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, partition)
        self.tokens_dir = Path(tokens_dir)
        self.root = root or default_corpus()
        self.pattern = pattern
        self.max_bytes = max_bytes
        self.exclude_dirs = tuple(exclude_dirs)
        self.block_size = block_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.train_set: TokenBlocks | None = None
        self.val_set: TokenBlocks | None = None
        # One process of the whole run writes the token files (several machines share the run directory).
        self.prepare_data_per_node = False

    def prepare_data(self) -> None:
        if is_prepared(self.tokens_dir):
            return
        root = require_paths("language_model", self.root, LAYOUT)
        try:
            prepare(root, self.tokens_dir, self.pattern, self.max_bytes, self.exclude_dirs, self.val_fraction,
                    self.split_seed)  # fmt: skip
        except ValueError as error:
            raise DataRootError(f"language_model: {error}. Expected the layout\n{LAYOUT}") from error

    def setup(self, stage: str | None = None) -> None:
        if not is_prepared(self.tokens_dir):  # used without a Trainer, which calls prepare_data first
            self.prepare_data()
        self.train_set = TokenBlocks(self.tokens_dir / "train.bin", self.block_size)
        self.val_set = TokenBlocks(self.tokens_dir / "val.bin", self.block_size)
        if not len(self.train_set) or not len(self.val_set):
            raise DataRootError(
                f"language_model: {self.tokens_dir} holds fewer than data.block_size={self.block_size} + 1 training "
                f"or validation tokens; use a larger corpus or a smaller block size. Expected the layout\n{LAYOUT}"
            )

    def train_labels(self) -> Sequence[int]:
        assert self.train_set is not None
        files = json.loads((self.tokens_dir / "meta.json").read_text())["train_files"]
        file_of_block = np.searchsorted([f["offset"] for f in files], self.train_set.block_starts(), side="right") - 1
        return np.unique([f["group"] for f in files], return_inverse=True)[1][file_of_block]

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
        net: a model mapping token ids to next-token logits (e.g. :class:`GPT`), or its config.
        optimizer: ``params -> Optimizer``, or its config.
        scheduler: optional per-step schedule factory or its config (see :mod:`lightning_decent.recipes.schedules`).
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
