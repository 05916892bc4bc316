"""Saving compressed models where a user finds them, in a form that runs without this package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.module import _jit_is_scripting
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
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


@dataclass(frozen=True)
class ExportFailure:
    """An export that did not happen: the file it was to write, its format and why."""

    path: Path
    export_format: str
    reason: str


_recorders: list[list[ExportFailure]] = []


@contextmanager
def recording_export_failures() -> Iterator[list[ExportFailure]]:
    """Collect the exports that fail inside the block (an app checks the list at the end to set its exit code)."""
    failures: list[ExportFailure] = []
    _recorders.append(failures)
    try:
        yield failures
    finally:
        _recorders.remove(failures)


def export_torchscript(model: nn.Module, args: tuple | None, kwargs: dict[str, Any], path: Path) -> Path | None:
    """Trace ``model`` (without its training aids) on an example input and save it; ``torch.jit.load`` runs
    it with torch alone. Returns the path, or ``None`` when the export fails: that is a one-line warning
    naming the file, the format and why, never an error, because the trained model and its checkpoints
    are worth more than one of their exports.

    TorchScript, not ``torch.export``: torch.export cannot serialize the packed int8 weights of
    torch.ao quantized modules (their script objects have no ``__obj_flatten__``).
    """
    try:
        if args is None:
            raise ValueError("training_step never calls the LightningModule's forward: there is no call to trace")
        with _jit_is_scripting(), torch.no_grad():  # tracing probes `trainer`, which raises when detached
            traced = torch.jit.trace(
                without_training_aids(model).eval(), args, example_kwarg_inputs=kwargs or None, check_trace=False
            )
        torch.jit.save(traced, str(path))
    except Exception as error:  # noqa: BLE001 - any failure of tracing or saving: the run goes on without this file
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        failure = ExportFailure(Path(path), "TorchScript", f"{type(error).__name__}: {reason}")
        for failures in _recorders:
            failures.append(failure)
        rank_zero_warn(f"Export of {failure.path.name} ({failure.export_format}) failed, the run goes on: {failure.reason}")
        return None
    rank_zero_info(f"Saved {path.name} (TorchScript) to {path.parent}")
    return path
