"""Saving compressed models where a user finds them, in a form that runs without this package."""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_compress import compat
from lightning_compress.inputs import first_line, on_cpu
from lightning_compress.selection import without_training_aids

EXPORT_FORMATS = ("torchscript", "torch_export", "onnx", "openvino")
"""What the compression callbacks can write: ``torchscript`` (runs with torch alone), ``torch_export``
(a ``.pt2`` ``ExportedProgram``, for ``torch.export.load``), ``onnx`` (QDQ int8 for ONNX Runtime and
TensorRT, plain ONNX for float models), ``openvino`` (IR ``.xml`` + ``.bin``)."""

_EXTRAS = {"onnx": (("onnx", "onnxruntime"), "onnx"), "openvino": (("openvino",), "openvino")}  # format -> (packages, extra)


def check_export_format(export_format: str | Sequence[str]) -> tuple[str, ...]:
    """The formats asked for, as a tuple (``"none"`` or an empty list: none), checked before any training:
    each must exist and have its package installed."""
    formats = (export_format,) if isinstance(export_format, str) else tuple(export_format)
    formats = tuple(name for name in formats if name != "none")
    for name in formats:
        if name not in EXPORT_FORMATS:
            raise ValueError(
                f"export_format={export_format!r}: {name!r} is unknown; allowed are {list(EXPORT_FORMATS)}, "
                "a list of them, or 'none'."
            )
        packages, extra = _EXTRAS.get(name, ((), None))
        for package in packages:
            if importlib.util.find_spec(package) is None:
                raise ValueError(
                    f"export_format={name!r} needs the {package!r} package: pip install 'lightning-compress[{extra}]'."
                )
    return formats


def write_exports(
    model: nn.Module, args: tuple | None, kwargs: dict[str, Any], folder: Path, stem: str, formats: Sequence[str]
) -> dict[str, Path]:
    """Export ``model`` in each of ``formats`` as ``folder/stem`` plus the format's suffix; returns the files
    written. A failed export is a one-line warning (see ``export_torchscript``): the others still happen."""
    writers = {
        "torchscript": (export_torchscript, ".pt"),
        "torch_export": (export_program, ".pt2"),
        "onnx": (export_onnx, ".onnx"),
        "openvino": (export_openvino, "_openvino.xml"),
    }
    args, kwargs = on_cpu((args, kwargs))  # exports are made on the CPU, whatever device trained the model
    written = {}
    for name in formats:
        writer, suffix = writers[name]
        path = writer(model, args, kwargs, folder / f"{stem}{suffix}")
        if path is not None:
            written[name] = path
    return written


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


def write_int8_exports(
    int8_model: nn.Module,
    runtime_model: Callable[[], nn.Module],
    args: tuple | None,
    kwargs: dict[str, Any],
    folder: Path,
    formats: Sequence[str],
) -> dict[str, Path]:
    """``model_int8.*`` in each of ``formats``: TorchScript and torch.export hold the int8 model itself; ONNX and
    OpenVINO hold the quantize-dequantize model that ``runtime_model()`` builds (only when one of them is asked
    for), which their own int8 kernels run."""
    own = ("torchscript", "torch_export")
    written = write_exports(int8_model, args, kwargs, folder, "model_int8", [name for name in formats if name in own])
    runtimes = [name for name in formats if name not in own]
    if runtimes:
        written |= write_exports(runtime_model(), args, kwargs, folder, "model_int8", runtimes)
    return written


def export_torchscript(model: nn.Module, args: tuple | None, kwargs: dict[str, Any], path: Path) -> Path | None:
    """Trace ``model`` (without its training aids) on an example input and save it; ``torch.jit.load`` runs
    it with torch alone. Returns the path, or ``None`` when the export fails: that is a one-line warning
    naming the file, the format and why, never an error, because the trained model and its checkpoints
    are worth more than one of their exports.

    TorchScript, not ``torch.export``: torch.export cannot serialize the packed int8 weights of
    the FX backend's quantized modules (their script objects have no ``__obj_flatten__``).
    """
    with _recording_failure(path, "TorchScript"):
        with compat.detached_tracing(), torch.no_grad():  # tracing probes `trainer`, which raises when detached
            traced = torch.jit.trace(
                without_training_aids(model).eval(), _call(args), example_kwarg_inputs=kwargs or None, check_trace=False
            )
        torch.jit.save(traced, str(path))
        rank_zero_info(f"Saved {path.name} (TorchScript) to {path.parent}")
        return path
    return None


def batch_dynamic_shapes(value: Any) -> Any:
    """``torch.export``'s ``dynamic_shapes`` for ``value``: the first dimension of each tensor free (batches of any
    size), everything else as traced."""
    if isinstance(value, torch.Tensor):
        return {0: torch.export.Dim.AUTO} if value.dim() > 0 else None
    if isinstance(value, list | tuple):
        return type(value)(batch_dynamic_shapes(item) for item in value)
    if isinstance(value, dict):
        return {key: batch_dynamic_shapes(item) for key, item in value.items()}
    return None


def dynamic_batch(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``dynamic_shapes`` for ``torch.export.export(module, args, kwargs)``: the batch dimension of every tensor
    argument free, by the name of the argument it is passed as."""
    bound = inspect.signature(module.forward).bind(*args, **kwargs)
    return {name: batch_dynamic_shapes(value) for name, value in bound.arguments.items()}


def export_program(model: nn.Module, args: tuple | None, kwargs: dict[str, Any], path: Path) -> Path | None:
    """``torch.export`` ``model`` (without its training aids, batch dimension dynamic) and save the program as
    ``.pt2``; ``torch.export.load(path).module()`` runs it (an int8 program of the pt2e backend needs
    the import ``pt2e_quantization`` documents first, which defines its quantize ops). ``None`` when it fails: a
    one-line warning, as for ``export_torchscript``."""
    with _recording_failure(path, "torch.export"):
        with torch.no_grad():
            module = without_training_aids(model).eval()
            args, kwargs = tuple(_call(args)), kwargs or {}
            program = torch.export.export(module, args, kwargs or None, dynamic_shapes=dynamic_batch(module, args, kwargs))
        torch.export.save(program, str(path))
        rank_zero_info(f"Saved {path.name} (torch.export) to {path.parent}")
        return path
    return None


ONNX_OPSET = 17
"""QuantizeLinear/DequantizeLinear with per-channel axes need opset 13; 17 is read by ONNX Runtime, TensorRT
8.6+ and OpenVINO alike."""


def export_onnx(model: nn.Module, args: tuple | None, kwargs: dict[str, Any], path: Path) -> Path | None:
    """``model`` as ONNX (opset ``ONNX_OPSET``, the batch dimension of every input and output dynamic);
    fake-quant models (see ``fx_quantization.fake_quant_for_export``) become QuantizeLinear/DequantizeLinear
    pairs that ONNX Runtime and TensorRT run in int8. Uses torch's TorchScript-based exporter, which maps
    torch's fake-quantize ops to QDQ pairs. ``None`` (and a warning) if it fails."""
    with _recording_failure(path, "ONNX"):
        args = _call(args)
        names = [f"input_{index}" for index in range(len(args))] + list(kwargs)
        with compat.detached_tracing(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation notices, once per op
            torch.onnx.export(
                without_training_aids(model).eval(),
                args,
                str(path),
                kwargs=kwargs or None,
                input_names=names,
                output_names=["output"],
                dynamic_axes={name: {0: "batch"} for name in [*names, "output"]},
                opset_version=ONNX_OPSET,
                dynamo=False,
            )
        rank_zero_info(f"Saved {path.name} (ONNX, opset {ONNX_OPSET}) to {path.parent}")
        return path
    return None


def export_openvino(model: nn.Module, args: tuple | None, kwargs: dict[str, Any], path: Path) -> Path | None:
    """``model`` as OpenVINO IR (``path`` is the ``.xml``, the weights go beside it in a ``.bin``), weights
    kept in float32 (OpenVINO's default halves them, which would move fake-quantized weights off their
    grid); its FakeQuantize nodes run as int8 on x86 CPUs. ``None`` (and a warning) if it fails."""
    with _recording_failure(path, "OpenVINO"):
        import openvino

        args = _call(args)
        with compat.detached_tracing(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            converted = openvino.convert_model(
                without_training_aids(model).eval(), example_input={**dict(enumerate(args)), **kwargs} if kwargs else args
            )
            openvino.save_model(converted, str(path), compress_to_fp16=False)
        rank_zero_info(f"Saved {path.name} + .bin (OpenVINO IR) to {path.parent}")
        return path
    return None


def _call(args: tuple | None) -> tuple:
    if args is None:
        raise ValueError("training_step never calls the LightningModule's forward: there is no call to export")
    return args


@contextmanager
def _recording_failure(path: Path, export_format: str) -> Iterator[None]:
    """Turn any failure inside into a one-line warning naming the file, the format and why, recorded for the
    app's exit code; the block then ends early."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure of export or saving: the run goes on without this file
        reason = first_line(error)
        failure = ExportFailure(Path(path), export_format, f"{type(error).__name__}: {reason}")
        for failures in _recorders:
            failures.append(failure)
        rank_zero_warn(f"Export of {failure.path.name} ({failure.export_format}) failed, the run goes on: {failure.reason}")
