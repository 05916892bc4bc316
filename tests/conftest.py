from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress.app.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Tests never touch the network: W&B writes to disk only, in the test's own folder.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")


# What a process group started in the test process (a one-process ModelParallelStrategy fit) leaves behind: inherited
# by a later test's subprocess, MASTER_PORT makes its launcher bind a port still in use (EADDRINUSE), and LOCAL_RANK
# makes it think it is a launched rank.
_PROCESS_GROUP_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "RANK")


def forget_process_group() -> None:
    """Destroy the process group a one-process fit started in this process, and take what it set out of the
    environment: before a subprocess launches ranks of its own."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key in _PROCESS_GROUP_ENVIRONMENT:
        os.environ.pop(key, None)


@pytest.fixture(autouse=True)
def _no_process_group_left_behind():
    before = {key: os.environ[key] for key in _PROCESS_GROUP_ENVIRONMENT if key in os.environ}
    yield
    forget_process_group()
    os.environ.update(before)


@pytest.fixture(scope="session")
def digits() -> DigitsDataModule:
    datamodule = DigitsDataModule(batch_size=64)
    datamodule.setup()
    return datamodule


def run_train(*overrides: str, cwd: Path = ROOT, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``python train.py`` as a user would, returning its exit code and output."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def quiet_trainer(tmp_path: Path, callbacks: list = (), max_epochs: int = 1, **kwargs) -> L.Trainer:
    """A CPU Trainer without progress bar, summary or logger; it checkpoints only when given a ModelCheckpoint."""
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", any(isinstance(callback, ModelCheckpoint) for callback in callbacks))
    return L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=max_epochs,
        accelerator="cpu",
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
