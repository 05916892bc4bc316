"""What every benchmark here does the same way: train quietly on digits, timing the fit."""

from __future__ import annotations

import time

import lightning as L
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.app.data import DigitsDataModule


def fit(
    model: nn.Module,
    epochs: int,
    callbacks: list = (),
    seed: int = 0,
    datamodule: L.LightningDataModule | None = None,
    train_dataloaders: DataLoader | None = None,
) -> float:
    """Seed, then fit ``model`` for ``epochs`` on ``datamodule`` (default: digits, batch 64), or on ``train_dataloaders``, with no
    logger, bar or checkpoint; seconds taken."""
    L.seed_everything(seed)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
    )
    start = time.perf_counter()
    if train_dataloaders is not None:
        trainer.fit(model, train_dataloaders=train_dataloaders)
    else:
        trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=64))
    return time.perf_counter() - start
