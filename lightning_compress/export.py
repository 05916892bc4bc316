"""Saving compressed models where a user finds them, in a form that runs without this package."""

from __future__ import annotations

import contextlib
import importlib.util
import io
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
from lightning_compress.inputs import first_line
from lightning_compress.network_call import FlatNetwork, NetworkCall, export_dynamic_shapes, flat_network, named_outputs
from lightning_compress.runtimes import RUNTIMES
from lightning_compress.selection import without_training_aids

EXPORT_FORMATS = ("torchscript", "torch_export", "onnx", "openvino", "executorch")
"""What the compression callbacks can write: ``torchscript`` (runs with torch alone), ``torch_export``
(a ``.pt2`` ``ExportedProgram``, for ``torch.export.load``), ``onnx`` (QDQ int8 for ONNX Runtime and
TensorRT, plain ONNX for float models), ``openvino`` (IR ``.xml`` + ``.bin``), ``executorch`` (a ``.pte`` program
lowered to XNNPACK, for ExecuTorch's runtime: low-bit Linear layers and float models)."""

_EXTRAS = {  # format -> (the packages it needs, the extra that installs them)
    "onnx": (("onnx", "onnxruntime"), "onnx"),
    "openvino": (("openvino",), "openvino"),
    "executorch": (("executorch",), "executorch"),
}


def format_installed(name: str) -> bool:
    """Whether the packages export format ``name`` needs (its runtime) are installed."""
    packages, _ = _EXTRAS.get(name, ((), None))
    return all(importlib.util.find_spec(package) is not None for package in packages)


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


FLOAT_TOLERANCE = 1e-3
"""How far an export's outputs may lie from the torch model's, as a fraction of their mean magnitude (mean over
every value): a float model in another runtime differs by the order of its float rounding."""

INT8_TOLERANCE = 0.05
"""The same for int8 models: each runtime's int8 kernels round each layer's requantization their own way (one
grid step here and there), and the steps add up over the layers."""


def write_exports(
    model: nn.Module,
    call: NetworkCall | str | None,
    folder: Path,
    stem: str,
    formats: Sequence[str],
    tolerance: float = FLOAT_TOLERANCE,
) -> dict[str, Path]:
    """Export the network of ``model`` that ``call`` goes to (see ``network_call``), called as training called it,
    in each of ``formats`` as ``folder/stem`` plus the format's suffix; returns the files written.

    Every file is loaded back into its runtime and run on the observed call and on its first sample (batch 1),
    and counts only if its outputs agree with the torch model's within ``tolerance``. A failed or disagreeing
    export is a one-line warning naming the file, the format and why (``call`` given as a string is why there
    is no call to export), and the file is not left behind: the others still happen, and the run goes on,
    because the trained model and its checkpoints are worth more than one of their exports.
    """
    if not formats:
        return {}
    written = {}
    flat, why_not = None, call if isinstance(call, str) else "training_step calls no network"
    if isinstance(call, NetworkCall):
        call = call.on_cpu()  # exports are made on the CPU, whatever device trained the model
        try:
            flat = flat_network(without_training_aids(call.network(model)).eval(), call)
        except Exception as error:  # noqa: BLE001 - a compressed network that fails on the call: no format can hold it
            why_not = f"the network fails on the call training made ({first_line(error, 120)})"
    for name in formats:
        writers, suffix = _WRITERS[name]
        path = folder / f"{stem}{suffix}"
        with _recording_failure(path, _FORMAT_NAMES[name]):
            if flat is None:
                raise ExportError(f"there is nothing to export: {why_not}")
            _write_one_that_agrees(writers, name, flat, call, path, tolerance)
            rank_zero_info(f"Saved {path.name} ({_FORMAT_NAMES[name]}; inputs {', '.join(call.input_names)}) to {path.parent}")
            written[name] = path
    return written


def _write_one_that_agrees(
    writers: Sequence[Callable[[FlatNetwork, NetworkCall, Path], None]],
    export_format: str,
    flat: FlatNetwork,
    call: NetworkCall,
    path: Path,
    tolerance: float,
) -> None:
    """Write ``path`` with each of ``writers`` in turn until one writes a file that computes what ``flat`` does, at
    any sequence length. A file that agrees at the observed length only (a traced graph that fixed it) is kept when
    no later way does better, with a warning. Raises with every way's failure when none agrees, leaving no file
    behind."""
    failures = []
    fixed_length: tuple[Callable, str] | None = None  # the first way that agreed at the observed length only
    for writer in writers:
        try:
            writer(flat, call, path)
            runner = load_export(export_format, path)
            disagreement = _disagreement(flat, runner, call, tolerance)
            if disagreement is None:
                fixed = _fixed_sequence_length(runner, call)
                if fixed is None:
                    return
                fixed_length = fixed_length or (writer, fixed)
                failures.append(f"it runs at the observed sequence length only ({fixed})")
            else:
                failures.append(f"it does not compute what the torch model does ({disagreement})")
        except Exception as error:  # noqa: BLE001 - any failure of this way to write it: the next way's turn
            failures.append(f"{type(error).__name__}: {first_line(error, 160)}")
        _remove(path)  # nothing half-written, nothing wrong left behind
    if fixed_length is None:
        raise ExportError("; from the exported program: ".join(failures))
    writer, fixed = fixed_length
    writer(flat, call, path)
    rank_zero_warn(f"{path.name} ({_FORMAT_NAMES[export_format]}) runs at the observed sequence length only ({fixed}).")


def load_export(export_format: str, path: Path) -> Callable[..., Any]:
    """The exported file at ``path`` loaded into its runtime: called with the tensors of a call in input order,
    it returns one tensor or a tuple (TorchScript, torch.export) or, from ONNX Runtime and OpenVINO, one tensor or
    a dict by output name."""
    if export_format == "torchscript":
        return torch.jit.load(str(path))
    if export_format == "torch_export":
        return torch.export.load(str(path)).module()
    runner = RUNTIMES[export_format][1]
    return runner(path, parameter_counts=(0, 0))


def _disagreement(flat: FlatNetwork, runner: Callable[..., Any], call: NetworkCall, tolerance: float) -> str | None:
    """Why the export ``runner`` does not compute what ``flat`` does on the observed call and on its first
    sample (batch 1, what the report times and a server often gets), or ``None``."""
    checks = [("the observed batch", call), ("one sample", call.sample(1))]
    for label, checked in checks:
        tensors = checked.tensors()
        with torch.no_grad():
            expected = [tensor for _, tensor in named_outputs(flat(*tensors))]
            try:
                actual = [tensor for _, tensor in named_outputs(runner(*tensors))]
            except Exception as error:  # noqa: BLE001 - a runtime that cannot run the file: say so
                return f"on {label} it fails: {first_line(error, 120)}"
        if len(actual) != len(expected):
            return f"on {label} it returns {len(actual)} outputs, the torch model {len(expected)}"
        for name, want, have in zip(flat.output_names, expected, actual, strict=True):
            have = torch.as_tensor(have)
            if tuple(have.shape) != tuple(want.shape):
                return f"on {label}, output {name} has shape {tuple(have.shape)}, not {tuple(want.shape)}"
            error = (have.float() - want.float()).abs().mean() / want.float().abs().mean().clamp_min(1e-6)
            if error > tolerance:
                return f"on {label}, output {name} is {float(error):.2%} off on average (allowed {tolerance:.1%})"
    return None


def _fixed_sequence_length(runner: Callable[..., Any], call: NetworkCall) -> str | None:
    """Why an export of a sequence model does not run on shorter sequences (its length was fixed when it was
    traced), or ``None``: said in a warning, as the export still serves inputs of the observed length."""
    shorter = call.shorter()
    if shorter is None:
        return None
    try:
        with torch.no_grad():
            runner(*shorter.sample(1).tensors())
    except Exception as error:  # noqa: BLE001 - any failure: the sequence length is fixed in this file
        return first_line(error, 120)
    return None


def _remove(path: Path) -> None:
    """``path`` and the files written beside it: OpenVINO's weights (``.bin``), ONNX's external data (``.data``)."""
    for file in (path, path.with_suffix(".bin"), Path(f"{path}.data")):
        if file.is_file() and (file == path or path.suffix in (".xml", ".onnx")):
            file.unlink()


def output_folder(trainer: L.Trainer, export_dir: str | None = None) -> Path:
    """``export_dir`` if given, else next to the checkpoints, else the log folder."""
    folder = Path(
        export_dir or getattr(trainer.checkpoint_callback, "dirpath", None) or trainer.log_dir or trainer.default_root_dir
    )
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class ExportError(Exception):
    """An export that could not be written, or computed something else, its message saying why (every way tried)."""


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
    call: NetworkCall | str | None,
    folder: Path,
    formats: Sequence[str],
) -> dict[str, Path]:
    """``model_int8.*`` in each of ``formats``: TorchScript, torch.export and ExecuTorch hold the int8 model itself;
    ONNX and OpenVINO hold the quantize-dequantize model that ``runtime_model()`` builds (only when one of them is
    asked for), which their own int8 kernels run."""
    own = ("torchscript", "torch_export", "executorch")
    written = write_exports(int8_model, call, folder, "model_int8", [name for name in formats if name in own], INT8_TOLERANCE)
    runtimes = [name for name in formats if name not in own]
    if runtimes:
        written |= write_exports(runtime_model(), call, folder, "model_int8", runtimes, INT8_TOLERANCE)
    return written


def export_torchscript(flat: FlatNetwork, call: NetworkCall, path: Path) -> None:
    """Trace the network on the observed call and save it; ``torch.jit.load`` runs it with torch alone, taking
    the call's tensors in input order (the traced graph's inputs bear their names).

    TorchScript, not only ``torch.export``: torch.export cannot serialize the packed int8 weights of the FX
    backend's quantized modules (their script objects have no ``__obj_flatten__``).
    """
    with compat.detached_tracing(), torch.no_grad():  # tracing probes `trainer`, which raises when detached
        traced = torch.jit.trace(flat, tuple(call.tensors()), check_trace=False)
    torch.jit.save(traced, str(path))


def exported_program(flat: FlatNetwork, call: NetworkCall) -> torch.export.ExportedProgram:
    """``torch.export`` of the network called as training called it, its batch and sequence dimensions free
    (``Dim.AUTO``: where the network fixes one, the program keeps it fixed, and the check on one sample says so)."""
    tensors = tuple(call.tensors())
    with torch.no_grad():
        return torch.export.export(flat, tensors, dynamic_shapes=export_dynamic_shapes(flat, tensors, {}))


def export_program(flat: FlatNetwork, call: NetworkCall, path: Path) -> None:
    """Save the ``torch.export`` program as ``.pt2``; ``torch.export.load(path).module()`` runs it (an int8 program
    of the pt2e backend needs the import ``pt2e_quantization`` documents first, which defines its quantize ops).
    The output names go with it, as the file's ``outputs.txt``."""
    torch.export.save(exported_program(flat, call), str(path), extra_files={"outputs.txt": "\n".join(flat.output_names)})


ONNX_OPSET = 17
"""QuantizeLinear/DequantizeLinear with per-channel axes need opset 13; 17 is read by ONNX Runtime, TensorRT
8.6+ and OpenVINO alike."""


def onnx_from_trace(flat: FlatNetwork, call: NetworkCall, path: Path) -> None:
    """The network as ONNX (opset ``ONNX_OPSET``) by torch's TorchScript-based exporter, inputs and outputs named,
    batch and sequence dimensions dynamic; fake-quant (see ``quantize_dequantize``) becomes QuantizeLinear/
    DequantizeLinear pairs that ONNX Runtime and TensorRT run in int8."""
    with compat.detached_tracing(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notices, once per op
        torch.onnx.export(
            flat,
            tuple(call.tensors()),
            str(path),
            input_names=list(call.input_names),
            output_names=flat.output_names,
            dynamic_axes={
                **{name: dims for name, dims in call.dynamic_dimensions().items() if dims},
                **_output_dimensions(flat, call),
            },
            opset_version=ONNX_OPSET,
            dynamo=False,
        )


def onnx_from_program(flat: FlatNetwork, call: NetworkCall, path: Path) -> None:
    """The network as ONNX from its ``torch.export`` program, by torch's dynamo exporter (``onnxscript``, in the
    ``onnx`` extra): for networks the tracing exporter cannot write (transformers' Llama masks use ``aten::diff``)
    or writes for one shape only (a graph that was itself exported)."""
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it narrates its steps
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exported_program(flat, call),
            (),
            str(path),
            input_names=list(call.input_names),
            output_names=flat.output_names,
            dynamo=True,
            external_data=False,  # one file, as the tracing exporter writes (up to ONNX's 2 GB)
        )


def _output_dimensions(flat: FlatNetwork, call: NetworkCall) -> dict[str, dict[int, str]]:
    """The batch and sequence dimensions of each output, for the ONNX file to declare them dynamic."""
    with torch.no_grad():
        outputs = [tensor for _, tensor in named_outputs(flat(*call.tensors()))]
    batch = call.batch_size
    dynamic = call.dynamic_dimensions()
    sequences = {tensor.shape[1] for name, tensor in zip(call.input_names, call.tensors(), strict=True) if 1 in dynamic[name]}
    dimensions = {}
    for name, tensor in zip(flat.output_names, outputs, strict=True):
        dims = {0: "batch"} if tensor.dim() > 0 and tensor.shape[0] == batch else {}
        if tensor.dim() >= 2 and tensor.shape[1] in sequences:
            dims[1] = "sequence"
        if dims:
            dimensions[name] = dims
    return dimensions


def openvino_from_trace(flat: FlatNetwork, call: NetworkCall, path: Path) -> None:
    """The network as OpenVINO IR (``path`` is the ``.xml``, the weights go beside it in a ``.bin``), converted from
    the network traced as TorchScript, inputs and outputs named, weights kept in float32 (OpenVINO's default halves
    them, which would move fake-quantized weights off their grid); its FakeQuantize nodes run as int8 on x86 CPUs."""
    import openvino

    with compat.detached_tracing(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _save_openvino(openvino.convert_model(flat, example_input=tuple(call.tensors())), flat, call, path)


def openvino_from_program(flat: FlatNetwork, call: NetworkCall, path: Path) -> None:
    """The same, converted from the network's ``torch.export`` program: where OpenVINO's TorchScript frontend
    fails, or a graph that was itself exported would hold one shape only."""
    import openvino

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            converted = openvino.convert_model(exported_program(flat, call))
        except Exception as error:  # noqa: BLE001 - OpenVINO's message opens with an internal check: name the ops
            refused = [line for line in str(error).splitlines() if "Conversion is failed for" in line]
            if refused:
                raise ValueError(f"OpenVINO cannot convert {refused[-1].split(':', 1)[1].strip()}") from error
            raise
        _save_openvino(converted, flat, call, path)


def _save_openvino(converted: Any, flat: FlatNetwork, call: NetworkCall, path: Path) -> None:
    import openvino

    ports = [*zip(converted.inputs, call.input_names, strict=True), *zip(converted.outputs, flat.output_names, strict=True)]
    for port, name in ports:
        port.get_tensor().set_names({name})
    openvino.save_model(converted, str(path), compress_to_fp16=False)


def export_executorch(flat: FlatNetwork, call: NetworkCall, path: Path) -> None:
    """The network's ``torch.export`` program lowered to ExecuTorch's XNNPACK backend and saved as a ``.pte``, which
    ``executorch.runtime`` runs without torch's Python: low-bit Linear layers with int8 dynamic activations and int4
    or int8 weights (``LowBitLinearConfig``'s ``8da4w`` and ``int8_dynamic``) become XNNPACK's quantized matrix
    products. Operators XNNPACK does not take run as ExecuTorch's portable kernels; the check against the torch model
    says whether what was lowered computes the same (the ``int4_weight_only`` scheme's layers did not)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = to_edge_transform_and_lower(exported_program(flat, call), partitioner=[XnnpackPartitioner()]).to_executorch()
    path.write_bytes(program.buffer)


_WRITERS = {
    # format -> (the ways to write it, each tried in turn until one writes a file that agrees; the file's suffix)
    "torchscript": ((export_torchscript,), ".pt"),
    "torch_export": ((export_program,), ".pt2"),
    "onnx": ((onnx_from_trace, onnx_from_program), ".onnx"),
    "openvino": ((openvino_from_trace, openvino_from_program), "_openvino.xml"),
    "executorch": ((export_executorch,), ".pte"),
}
_FORMAT_NAMES = {
    "torchscript": "TorchScript",
    "torch_export": "torch.export",
    "onnx": "ONNX",
    "openvino": "OpenVINO",
    "executorch": "ExecuTorch",
}


@contextmanager
def _recording_failure(path: Path, export_format: str) -> Iterator[None]:
    """Turn any failure inside into a one-line warning naming the file, the format and why, recorded for the
    app's exit code; the block then ends early."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure of export or saving: the run goes on without this file
        reason = first_line(error) if isinstance(error, ExportError) else f"{type(error).__name__}: {first_line(error)}"
        failure = ExportFailure(Path(path), export_format, reason)
        for failures in _recorders:
            failures.append(failure)
        rank_zero_warn(f"Export of {failure.path.name} ({failure.export_format}) failed, the run goes on: {failure.reason}")
