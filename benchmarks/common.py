"""What every benchmark here does the same way: train quietly on digits, timing the fit; keep the rows a
run did not re-measure."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.app.data import DigitsDataModule

# Every result row names the machine it was measured on: int8 speed and numerics differ between CPU kinds.
MACHINE = f"{torch.get_num_threads()} threads available, {torch.backends.cpu.get_cpu_capability()}"


def quiet_trainer(epochs: int, callbacks: list = (), **settings) -> L.Trainer:
    """A CPU Trainer for ``epochs`` with no logger, bar, summary or checkpoint (``settings``: any other Trainer setting)."""
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=list(callbacks),
        **settings,
    )


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
    trainer = quiet_trainer(epochs, callbacks)
    start = time.perf_counter()
    if train_dataloaders is not None:
        trainer.fit(model, train_dataloaders=train_dataloaders)
    else:
        trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=64))
    return time.perf_counter() - start


def with_earlier_rows(measured: list[dict], path: Path, section: str, key: str, order: Iterable[str]) -> list[dict]:
    """``measured`` beside the rows of ``section`` that this run did not re-measure, kept from the last run's
    results at ``path`` (each row carries its own folds, seeds and machine), matched by ``key``, in ``order``."""
    earlier = json.loads(path.read_text()).get(section, []) if path.exists() else []
    by_name = {row[key]: row for row in earlier if "arms" in row} | {row[key]: row for row in measured}
    return [by_name[name] for name in order if name in by_name]
