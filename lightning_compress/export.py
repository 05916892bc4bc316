"""Saving compressed models where a user finds them, in a form that runs without this package."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.module import _jit_is_scripting
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lightning_compress.selection import without_training_aids

EXPORT_FORMATS = ("torchscript", "none")


def check_export_format(export_format: str) -> None:
    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export_format={export_format!r} is unknown: allowed values are {list(EXPORT_FORMATS)}.")


def output_folder(trainer: L.Trainer, export_dir: str | None = None) -> Path:
    """``export_dir`` if given, else next to the checkpoints, else the log folder."""
    folder = Path(
        export_dir or getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def export_torchscript(model: nn.Module, args: tuple, kwargs: dict[str, Any], path: Path) -> Path:
    """Trace ``model`` (without its training aids) on an example input and save it; ``torch.jit.load`` runs
    it with torch alone.

    TorchScript, not ``torch.export``: torch.export cannot serialize the packed int8 weights of
    torch.ao quantized modules (their script objects have no ``__obj_flatten__``).
    """
    with _jit_is_scripting(), torch.no_grad():  # tracing probes `trainer`, which raises when detached
        traced = torch.jit.trace(
            without_training_aids(model).eval(), args, example_kwarg_inputs=kwargs or None, check_trace=False
        )
    torch.jit.save(traced, str(path))
    rank_zero_info(f"Saved {path.name} (TorchScript) to {path.parent}")
    return path
