"""Is a resume bitwise? The largest parameter difference between a run trained straight and the same run
stopped at a checkpoint and resumed, at an epoch boundary and mid-epoch, with a plain shuffling
``DataLoader`` and with torchdata's ``StatefulDataLoader`` (whose position Lightning saves and restores).

``python benchmarks/resume_mid_epoch.py [--loaders plain,stateful]`` (one process, digits, D-SGD through
``DecentralizedStrategy``, 2 epochs of the 57 batches of 32 digits, resumed after steps 57 (the end of
epoch 0) and 30 (mid-epoch); about two minutes). The
multi-rank resume is bitwise at epoch boundaries (``tests/test_reliability_multiprocess.py``); what this
measures is the loader's part, which is the same on every rank.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lightning_decent import DecentralizedStrategy
from lightning_decent.recipes.digits import DigitsClassifier, load_digits_tensors

STEPS_PER_EPOCH, EPOCHS, MID_EPOCH = 57, 2, 30  # 1,797 digits in batches of 32: 57 batches per epoch


class Digits(pl.LightningDataModule):
    def __init__(self, loader: str) -> None:
        super().__init__()
        self.loader = loader
        self.data = TensorDataset(*load_digits_tensors())

    def train_dataloader(self) -> DataLoader:
        if self.loader == "stateful":
            from torchdata.stateful_dataloader import StatefulDataLoader

            return StatefulDataLoader(self.data, batch_size=32, shuffle=True)
        return DataLoader(self.data, batch_size=32, shuffle=True)


def train(root: Path, loader: str, resume_from: Path | None = None) -> torch.Tensor:
    pl.seed_everything(0)
    saver = ModelCheckpoint(dirpath=root, every_n_train_steps=3, save_top_k=-1)  # steps 30 and 57 among them
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        strategy=DecentralizedStrategy(topology="ring"),
        max_epochs=EPOCHS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[saver] if resume_from is None else [],
        enable_checkpointing=resume_from is None,
        default_root_dir=root,
    )
    model = DigitsClassifier()
    trainer.fit(model, Digits(loader), ckpt_path=resume_from)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loaders", default="plain,stateful")
    args = parser.parse_args()
    print("| loader | resumed after step | max abs difference from training straight |\n|---|---|---|")
    for loader in args.loaders.split(","):
        with tempfile.TemporaryDirectory() as root:
            straight = train(Path(root), loader)
            for step in (STEPS_PER_EPOCH, MID_EPOCH):
                epoch = (step - 1) // STEPS_PER_EPOCH
                resumed = train(Path(root) / "resumed", loader, Path(root) / f"epoch={epoch}-step={step}.ckpt")
                print(f"| {loader} | {step} | {(resumed - straight).abs().max().item():.3g} |", flush=True)


if __name__ == "__main__":
    main()
