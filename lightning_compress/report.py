"""The compression report: the yardstick every feature is judged by.

Each model in the report (the fp32 model, and whatever the compression callbacks produced) is measured the
same way: test accuracy over the same loader, weights counted exactly (quantized weights included, zeros
counted on the dequantized values), the byte size of its serialized ``state_dict``, and the median latency
of a batch-1 forward on one CPU thread, after warm-up, in eval mode and without autograd.

Callbacks (and the LightningModule) contribute models by implementing ``ReportsModels``
(``report_models() -> dict[str, nn.Module]``);
a name they return replaces the same name from earlier sources (the QAT callback, for one, supplies the true
fp32 model, since the trained module itself holds fake-quant observers).
"""

from __future__ import annotations

import copy
import io
import json
import math
import random
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_compress import compat, sharding
from lightning_compress.network_call import NetworkCall, logits_of
from lightning_compress.runtimes import RuntimeModel
from lightning_compress.selection import without_training_aids

if TYPE_CHECKING:  # the callbacks import this module: their result types are read, never imported at run time
    from lightning_compress.quantization_plan import QuantizedPart
    from lightning_compress.sensitivity import LayerSensitivity

BASELINE = "fp32"


@contextmanager
def _measuring(model: nn.Module, threads: int | None = None) -> Iterator[None]:
    """Eval mode, no autograd, optionally a fixed thread count; everything restored afterwards.

    Deterministic algorithms are switched off meanwhile: ``Trainer(deterministic=True)`` leaves them on
    after ``fit``, and int8 kernels have no deterministic implementation, so they would refuse to run.
    """
    was_training = model.training
    deterministic = torch.are_deterministic_algorithms_enabled()
    previous_threads = torch.get_num_threads()
    model.eval()
    torch.use_deterministic_algorithms(False)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(deterministic)
        model.train(was_training)


def _by_position(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Logits as (positions, classes) and labels as (positions,), or ``None`` where the output is no prediction
    of these labels (a loss). A language model's (N, T, V) logits against (N, T) labels have their classes last; a
    classifier's (N, C) or (N, C, ...) have them on dim 1."""
    if logits.dim() == labels.dim() + 1 and logits.shape[:-1] == labels.shape:
        return logits.flatten(0, -2), labels.flatten()
    if logits.dim() == labels.dim() + 1 and logits.shape[:1] + logits.shape[2:] == labels.shape:
        return logits.movedim(1, -1).flatten(0, -2), labels.flatten()
    return None


def _output(model: nn.Module, example: torch.Tensor | NetworkCall) -> object:
    """``model`` called on ``example``: a tensor, or a call of the network as training made it (``network_call``)."""
    return example.run(model) if isinstance(example, NetworkCall) else model(example)


def evaluate(model: nn.Module, dataloader: Iterable) -> tuple[float | None, float | None]:
    """Top-1 accuracy (fraction of positions: samples, or tokens) of ``model`` over ``(inputs, labels)`` batches or
    over calls of its network with their targets (``network_call.NetworkCall``), and for outputs with a position
    dimension (a language model's) the perplexity, ``exp`` of the mean cross-entropy per token; ``None`` for one
    label per sample. The prediction is the output itself or its ``logits``; where there is none for the labels
    (a network that returns its loss) or no labels, both are ``None``."""
    correct = total = 0
    cross_entropy = 0.0
    sequences = False
    with _measuring(model):
        for batch in dataloader:
            if isinstance(batch, NetworkCall):
                output, labels = batch.run(model), batch.targets
            else:
                inputs, labels = batch
                output = model(inputs)
            logits = logits_of(output)
            by_position = None if logits is None or labels is None else _by_position(logits, labels)
            if by_position is None:
                return None, None
            logits, flat_labels = by_position
            sequences = labels.dim() > 1
            correct += int((logits.argmax(dim=-1) == flat_labels).sum())
            cross_entropy += float(torch.nn.functional.cross_entropy(logits.float(), flat_labels, reduction="sum"))
            total += len(flat_labels)
    return correct / total, (math.exp(cross_entropy / total) if sequences else None)


def top1_accuracy(model: nn.Module, dataloader: Iterable) -> float | None:
    """Top-1 accuracy (fraction) of ``model`` over ``(inputs, labels)`` batches, per sample or per token."""
    return evaluate(model, dataloader)[0]


def _weights(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every weight and bias once, float or int8. The FX backend's int8 Conv/Linear keep theirs packed, with the
    packed holder as a child that exposes them again, so the walk stops at the first module that unpacks them."""
    packed = compat.packed_weight_and_bias(module)
    if packed is not None:
        yield from _tensors_in(packed)
        yield from module.parameters(recurse=False)
        return
    yield from module.parameters(recurse=False)
    # int8 weights a converted torch.export graph keeps as plain buffers (pt2e); 1-D ones are zero-points
    yield from (buffer for buffer in module.buffers(recurse=False) if buffer.dtype == torch.int8 and buffer.dim() >= 2)
    for child in module.children():
        yield from _weights(child)


def _tensors_in(value) -> Iterator[torch.Tensor]:
    """Tensors inside what ``compat.packed_weight_and_bias`` returns: a pair for Conv/Linear, nested dicts for dynamic LSTMs."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors_in(item)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """All weights and biases, float or quantized, and how many of them are not zero. Of a network FSDP2 shards,
    the whole weights' counts: collective, every rank must call it."""
    total = nonzero = 0
    for tensor in _weights(model):
        # torch's quantized tensors, and tensor subclasses that hold low-bit integers, count as the
        # values they stand for; an FSDP2 shard (DTensor) counts as the whole tensor it is part of
        low_bit = tensor.is_quantized or type(tensor) not in (torch.Tensor, nn.Parameter, DTensor)
        values = tensor.detach().dequantize() if low_bit else tensor.detach()
        total += values.numel()
        nonzero += int(torch.count_nonzero(values))
    return total, nonzero


def serialized_size(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: what a user stores and ships."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def latency_ms(
    models: dict[str, nn.Module],
    example_input: torch.Tensor | NetworkCall,
    runs: int = 50,
    warmup: int = 10,
    calls_per_turn: int = 1,
) -> dict[str, float]:
    """Median milliseconds of one single-threaded forward on ``example_input`` (a tensor, or a call of the network
    as training made it), per model.

    The models take turns, one forward each per round, in a new random order each round, so that a burst
    of load on a shared machine, or the caches a large model evicts, slows all of them alike and their
    ratios stay fair: each model starts its turn with the caches the previous one left. With ``calls_per_turn``
    above one a turn is that many forwards in a row, and the first of each turn is not timed: a model's pace when
    it runs on its own, as a language model generating one token after another does, its weights staying in the
    CPU's caches where they fit.
    """
    if calls_per_turn < 1:
        raise ValueError(f"calls_per_turn={calls_per_turn!r}: at least 1.")
    timings: dict[str, list[float]] = {name: [] for name in models}
    with ExitStack() as stack:
        for model in models.values():
            stack.enter_context(_measuring(model, threads=1))
        for _ in range(warmup):
            for model in models.values():
                _output(model, example_input)
        order = list(models.items())
        shuffler = random.Random(0)
        for _ in range(runs):
            # a new order each round: a model timed right after a large one pays for the caches it evicted
            shuffler.shuffle(order)
            for name, model in order:
                for call in range(calls_per_turn):
                    start = time.perf_counter()
                    _output(model, example_input)
                    if call > 0 or calls_per_turn == 1:
                        timings[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(values) for name, values in timings.items()}


def compile_ms(model: nn.Module) -> float | None:
    """Milliseconds a model spent compiling on its first call (the pt2e engine's int8 programs, which Inductor
    compiles then; a later batch size or sequence length may compile again, not counted here), summed over its
    compiled parts; ``None`` for a model that compiles nothing. Read after the model has run: the latency's warm-up
    keeps the compile out of the latency."""
    times = [part.compile_ms for part in model.modules() if getattr(part, "compile_ms", None) is not None]
    return sum(times) if times else None


@dataclass(frozen=True)
class Measurement:
    name: str
    accuracy: float | None
    parameters: int
    nonzero_parameters: int
    size_bytes: int
    latency_ms: float
    # at the deployment resolution, when the report is asked for one and the model runs at it
    deployment_latency_ms: float | None = None
    # language models: exp of the mean cross-entropy per token (lower is better)
    perplexity: float | None = None
    # what compiling it took on its first call (models Inductor compiles)
    compile_ms: float | None = None


def runs_on(model: nn.Module, example_input: torch.Tensor | NetworkCall) -> bool:
    """Whether ``model`` runs on ``example_input``: an exported graph or runtime file with a fixed input size,
    or a network whose shape is tied to its training images, does not run at another resolution."""
    try:
        with _measuring(model):
            _output(model, example_input)
    except Exception:  # noqa: BLE001 - any failure means: no figure at this size
        return False
    return True


def measure(
    name: str,
    model: nn.Module,
    dataloader: Iterable | None,
    latency: float,
    known_accuracy: float | None = None,
    deployment_latency: float | None = None,
) -> Measurement:
    """Measure one model; ``latency`` comes from ``latency_ms``, ``known_accuracy`` skips evaluating a
    figure computed elsewhere."""
    exported = isinstance(model, RuntimeModel)  # run by ONNX Runtime or OpenVINO: counted from its source
    total, nonzero = model.parameter_counts if exported else count_parameters(model)
    perplexity = None
    if known_accuracy is None and dataloader is not None:
        known_accuracy, perplexity = evaluate(model, dataloader)
    return Measurement(
        name=name,
        accuracy=known_accuracy,
        parameters=total,
        nonzero_parameters=nonzero,
        size_bytes=sum(file.stat().st_size for file in model.files) if exported else serialized_size(model),
        latency_ms=latency,
        deployment_latency_ms=deployment_latency,
        perplexity=perplexity,
        compile_ms=None if exported else compile_ms(model),
    )


def _batch_size(example: torch.Tensor | NetworkCall) -> int | None:
    return example.batch_size if isinstance(example, NetworkCall) else example.shape[0]


def _input_shape(example: torch.Tensor | NetworkCall) -> list[int] | dict[str, list[int]]:
    """The shape of what latency is timed on; of each input by name where a call holds several."""
    if isinstance(example, torch.Tensor):
        return list(example.shape)
    shapes = {name: list(tensor.shape) for name, tensor in zip(example.input_names, example.tensors(), strict=True)}
    return next(iter(shapes.values())) if len(shapes) == 1 else shapes


@dataclass
class CompressionReport:
    """Measurements side by side, with ratios against the ``fp32`` row."""

    measurements: list[Measurement]
    settings: dict = field(default_factory=dict)

    @classmethod
    def from_models(
        cls,
        models: dict[str, nn.Module],
        dataloader: Iterable,
        example_input: torch.Tensor | NetworkCall,
        runs: int = 50,
        warmup: int = 10,
        accuracies: dict[str, float] | None = None,
        deployment_input: torch.Tensor | NetworkCall | None = None,
    ) -> CompressionReport:
        """Measure every model; ``accuracies`` gives figures already computed (the teacher's, say).

        ``dataloader`` yields ``(inputs, labels)`` batches, or calls of the network as training made them, each with
        its targets (``network_call.test_calls``): how a model whose forward takes keywords or dict batches is fed.
        ``example_input`` is what latency is timed on, a tensor or such a call.

        ``deployment_input`` (one input at the resolution the models will serve, say 224x224 for models trained
        on 32x32 images) adds a second latency, timed the same way among the models that run at that size:
        convolution costs grow with the pixels, so the speedups that matter in deployment show there.
        """
        accuracies = accuracies or {}
        latencies = latency_ms(models, example_input, runs, warmup)
        deployment: dict[str, float] = {}
        if deployment_input is not None:
            runnable = {name: model for name, model in models.items() if runs_on(model, deployment_input)}
            deployment = latency_ms(runnable, deployment_input, runs, warmup) if runnable else {}
        measurements = [
            measure(name, model, dataloader, latencies[name], accuracies.get(name), deployment.get(name))
            for name, model in models.items()
        ]
        settings = {
            "batch_size": _batch_size(example_input),
            "input_shape": _input_shape(example_input),
            **({"deployment_input_shape": _input_shape(deployment_input)} if deployment_input is not None else {}),
            "threads": 1,
            "latency_runs": runs,
            "warmup_runs": warmup,
            "latency_statistic": "median, models interleaved in random order",
            "torch": torch.__version__,
            "quantized_engine": torch.backends.quantized.engine,
        }
        return cls(measurements, settings)

    def rows(self) -> list[dict]:
        """Each measurement with its ratios to the baseline (absent when there is no ``fp32`` row)."""
        baseline = next((row for row in self.measurements if row.name == BASELINE), None)
        rows = []
        for row in self.measurements:
            values = asdict(row)
            if baseline is not None:
                values["accuracy_delta_points"] = (
                    None if row.accuracy is None or baseline.accuracy is None else 100.0 * (row.accuracy - baseline.accuracy)
                )
                values["size_ratio"] = row.size_bytes / baseline.size_bytes
                values["nonzero_ratio"] = row.nonzero_parameters / max(baseline.nonzero_parameters, 1)
                values["speedup"] = baseline.latency_ms / row.latency_ms
                if row.deployment_latency_ms is not None and baseline.deployment_latency_ms is not None:
                    values["deployment_speedup"] = baseline.deployment_latency_ms / row.deployment_latency_ms
            rows.append(values)
        return rows

    def table(self) -> Table:
        table = Table(title=f"Compression report (batch {self.settings['batch_size']}, 1 thread)")
        with_perplexity = any(row.perplexity is not None for row in self.measurements)
        sides = self.settings.get("deployment_input_shape", [])[2:]
        size = str(sides[0]) if len(set(sides)) == 1 else "x".join(str(side) for side in sides)
        deployment_columns = (f"ms @{size}", f"speedup @{size}") if size else ()
        for column in (
            "model",
            "test acc",
            *(("perplexity",) if with_perplexity else ()),
            "params",
            "non-zero",
            "size",
            "latency ms",
            "compile s",
            "Δacc pts",
            "size x",
            "speedup",
            *deployment_columns,
        ):
            table.add_column(column, justify="left" if column == "model" else "right")
        for row in self.rows():
            deployment_cells = (
                "-" if row["deployment_latency_ms"] is None else f"{row['deployment_latency_ms']:.3f}",
                "-" if "deployment_speedup" not in row else f"{row['deployment_speedup']:.2f}x",
            )
            table.add_row(
                row["name"],
                "-" if row["accuracy"] is None else f"{100 * row['accuracy']:.2f}%",
                *(("-" if row["perplexity"] is None else f"{row['perplexity']:.3f}",) if with_perplexity else ()),
                f"{row['parameters']:,}",
                f"{row['nonzero_parameters']:,}",
                f"{row['size_bytes'] / 1024:,.1f} KiB",
                f"{row['latency_ms']:.3f}",
                "-" if row["compile_ms"] is None else f"{row['compile_ms'] / 1000:.1f}",
                "-" if row.get("accuracy_delta_points") is None else f"{row['accuracy_delta_points']:+.2f}",
                "-" if "size_ratio" not in row else f"{row['size_ratio']:.3f}",
                "-" if "speedup" not in row else f"{row['speedup']:.2f}x",
                *(deployment_cells if size else ()),
            )
        return table

    def slower_than_fp32(self) -> dict[str, float]:
        """The rows that run slower than the ``fp32`` row, with their speedup (below 1): said under the table, since a
        compressed model can lose to its float original (a small transformer's int8 matrix products, a low-bit layer
        without a kernel for this CPU)."""
        return {row["name"]: row["speedup"] for row in self.rows() if row.get("speedup", 1.0) < 1.0}

    def print(self, console: Console | None = None) -> None:
        console = console or Console(width=max(Console().width, 120))
        console.print(self.table())
        slower = self.slower_than_fp32()
        if slower:
            listed = ", ".join(f"{name} ({speedup:.2f}x)" for name, speedup in slower.items())
            console.print(f"Slower than fp32 at batch {self.settings['batch_size']} on one thread: {listed}.")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"settings": self.settings, "rows": self.rows()}, indent=2))

    def log_to(self, loggers: Iterable) -> None:
        """Every figure as a metric ``report/<model>/<field>``; W&B also gets the table itself."""
        metrics = {
            f"report/{row['name']}/{key}": float(value)
            for row in self.rows()
            for key, value in row.items()
            if key != "name" and value is not None
        }
        for logger in loggers:
            logger.log_metrics(metrics)
            if hasattr(logger, "log_table"):
                rows = self.rows()
                columns = list(rows[0])
                logger.log_table(key="report", columns=columns, data=[[row.get(c) for c in columns] for row in rows])


@runtime_checkable
class ReportsModels(Protocol):
    """A callback or LightningModule with models worth a row in the compression report.

    The compression callbacks and ``DistillationModule`` implement it; a user's own callback does by
    defining the method (subclassing this class is optional, and documents it).
    """

    def report_models(self) -> dict[str, nn.Module]:
        """Row name -> model, measured like every other row; an empty dict while there is nothing to show."""
        ...


def models_to_report(trainer, pl_module: nn.Module) -> dict[str, nn.Module]:
    """The trained module as ``fp32``, then what the module itself (a distillation teacher, say) and each
    compression callback contribute; each without its training aids (hint adapters), which are never shipped.

    Under FSDP2 a model still sharded (the trained module, a sharded teacher) is given as a plain copy with its
    parameters gathered whole: call this on every process (the gathers are collective), then measure on one; a
    sharded model measured on one process alone would wait forever for the others' slices."""
    models: dict[str, nn.Module] = {BASELINE: pl_module}
    for source in (pl_module, *trainer.callbacks):
        if isinstance(source, ReportsModels):
            models.update(source.report_models())
    return {name: without_training_aids(_on_the_cpu(sharding.unsharded(model))) for name, model in models.items()}


def _on_the_cpu(model: nn.Module) -> nn.Module:
    """``model``, or a CPU copy of it if it was trained elsewhere: the report measures for the CPU, and the
    live module stays where it is."""
    on_device = any(tensor.device.type != "cpu" for tensor in (*model.parameters(), *model.buffers()))
    return copy.deepcopy(model).cpu() if on_device else model


# ---------------------------------------------------------------------- the callbacks' tables and plots
# Drawn here, from the plain results the callbacks hold, so that a change of presentation touches one module.


def _console() -> Console:
    return Console(width=max(Console().width, 120))


def print_quantized_parts(parts: Sequence[QuantizedPart], backend: str) -> None:
    """QAT's table: each part of the module, whether it was quantized and why (after conversion, its int8
    and float layers, read back from the int8 model)."""
    converted = any(part.int8_layers is not None for part in parts)
    table = Table(title=f"Quantization-aware training ({backend} backend{', converted' if converted else ''})")
    for column in ("submodule", "quantized", *(("int8 layers", "float layers") if converted else ()), "note"):
        table.add_column(column)
    for part in parts:
        counts = (str(part.int8_layers or 0), ", ".join(part.float_layers) or "-") if converted else ()
        table.add_row(part.name or "(forward)", "yes" if part.quantized else "no", *counts, part.reason)
    _console().print(table)


def print_sensitivity(reference: float, ranking: Sequence[LayerSensitivity], keep: Sequence[str], title: str = "") -> None:
    """PTQ's sensitivity study: each layer's accuracy when quantized alone, and which stay float."""
    table = Table(title=f"Quantization sensitivity{f' of {title}' if title else ''} (float accuracy {100 * reference:.2f}%)")
    for column in ("layer", "accuracy when quantized alone", "drop (points)", "proposal"):
        table.add_column(column)
    for result in ranking:
        table.add_row(
            result.layer,
            f"{100 * result.accuracy:.2f}%",
            f"{result.drop_points:+.2f}",
            "keep float" if result.layer in keep else "int8",
        )
    _console().print(table)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def plot_sensitivity(ranking: Sequence[LayerSensitivity], path: Path) -> Path:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(ranking) + 1.5))
    axis.barh([result.layer for result in ranking][::-1], [result.drop_points for result in ranking][::-1])
    axis.set(xlabel="accuracy drop when quantized alone (points)", title="quantization sensitivity per layer")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_pruning(
    path: Path,
    schedule_kind: str,
    schedule_curve: Sequence[tuple[int, float]],
    history: Sequence[dict[str, float]],
    per_layer: dict[str, float],
) -> Path:
    """Pruning's plot: the sparsity schedule with its targets and measured values at each mask update, and
    the fraction of zeros in each pruned layer."""
    plt = _pyplot()
    figure, (schedule_axis, layer_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    if schedule_curve:
        schedule_axis.plot([step for step, _ in schedule_curve], [target for _, target in schedule_curve], label="schedule")
    steps = [entry["step"] for entry in history]
    schedule_axis.step(steps, [entry["target"] for entry in history], where="post", label="target at updates")
    schedule_axis.plot(steps, [entry["measured"] for entry in history], "o", markersize=3, label="measured")
    schedule_axis.set(xlabel="optimizer step", ylabel="sparsity", title=f"{schedule_kind} schedule")
    schedule_axis.legend()
    layer_axis.barh(list(per_layer), list(per_layer.values()))
    layer_axis.set(xlabel="fraction of zero weights", title="sparsity per layer", xlim=(0, 1))
    layer_axis.tick_params(axis="y", labelsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
