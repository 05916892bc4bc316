"""Quantization after training: static (calibrated) and dynamic, as callbacks that act at fit end.

``PostTrainingQuantization`` observes activation ranges on a few training batches and converts to the same
real int8 model as QAT, with no training at all when the Trainer runs zero epochs on a trained checkpoint
(``python train.py +compress=ptq model.checkpoint=...``). ``DynamicQuantization`` stores Linear, LSTM and
GRU weights in int8 and quantizes activations on the fly: the usual way to ship LSTM and Linear-heavy
models. Both go through the same ``QuantizationBackend`` as QAT, chosen by ``backend``: the FX engine's eager
dynamic layers (``x86``) or exported networks under Inductor (``x86_inductor``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_compress import sensitivity, sharding
from lightning_compress.export import INT8_TOLERANCE, check_export_format, output_folder, write_exports, write_int8_exports
from lightning_compress.inputs import (
    first_calls,
    first_line,
    first_tensor,
    keep_what_runs,
    training_batches,
    watch_training_step,
)
from lightning_compress.network_call import computes_its_loss, observe_network_call
from lightning_compress.quantization_backend import (
    DEFAULT_BACKEND,
    DYNAMIC_LAYERS,
    QuantizationBackend,
    backend_for,
    check_backend_exports,
    chosen_config,
    quantization_config,
)
from lightning_compress.report import ReportsModels, count_parameters, plot_sensitivity, print_sensitivity
from lightning_compress.runtimes import runtime_models
from lightning_compress.selection import (
    check_submodule_names,
    compressible_children,
    is_skipped,
    skipped_layers,
    split_skip,
    within,
)
from lightning_compress.validation import check_integer, check_number


class PostTrainingQuantization(Callback, ReportsModels):
    r"""Calibrate on training batches at the end of ``fit`` and convert to int8, without quantization-aware
    training.

    .. code-block:: python

        ptq = PostTrainingQuantization(calibration_batches=16)  # histogram ranges, least squares (mse)
        Trainer(max_epochs=0, callbacks=[ptq]).fit(trained_model, datamodule=datamodule)  # no training
        ptq.quantized_model

    Args:
        calibration_batches: training batches whose activations set the ranges (at least 1).
        backend: ``x86_inductor`` (default: the pt2e flow, compiled by Inductor; ``histogram`` observer with the
            ``mse`` range only), or FX graph mode, deprecated upstream and chosen by name only (one
            ``FutureWarning``): ``x86``, ``fbgemm`` or ``qnnpack``, with every observer and range method below.
        per_channel_weights: one weight scale per output channel, or one per tensor.
        observer: ``minmax``, ``moving_average_minmax`` or ``histogram``.
        range_method: ``max``, ``percentile``, ``entropy`` or ``mse`` (all but ``max`` need ``histogram``).
        percentile: kept percentile for ``range_method="percentile"``, in (0, 100].
        modules: submodules to quantize (default: the module's networks), as in every compression callback.
        accuracy_budget: when set (accuracy points), first measure each layer's sensitivity on the validation
            data (quantized alone), then keep the most sensitive layers in float until the quantized model is
            within this budget of the float one; prints the table and writes ``quantization_sensitivity.png``.
            The quantized network must take the batch's input and return logits.
        export_format: one format or a list (``None``: the backend's own): ``torch_export`` (``x86_inductor``)
            writes ``model_int8.pt2``; ``torchscript`` (FX backends) writes the int8 model as ``model_int8.pt``;
            ``onnx`` (``model_int8.onnx``, QuantizeLinear/DequantizeLinear pairs with the calibrated ranges)
            and ``openvino`` (``model_int8_openvino.xml``/``.bin``) are run in int8 by their runtimes;
            ``none`` writes nothing.
        export_dir: where to write it (default: the checkpoint folder, else the log folder).
        skip: submodule names (``"net.classifier"``, or every layer inside a named submodule) or layer types
            (``torch.nn.Linear`` or ``"torch.nn.Linear"``) kept in float, as in every compression callback.
        config: a config object instead of ``backend`` and its settings, as in ``QuantizationAwareTraining``:
            ``LowBitLinearConfig(scheme="8da4w")`` quantizes Linear layers with the low-bit schemes after training
            (nothing to calibrate: their scales are computed at each call).
    """

    def __init__(
        self,
        calibration_batches: int = 32,
        backend: str = DEFAULT_BACKEND,
        per_channel_weights: bool = True,
        observer: str = "histogram",
        range_method: str = "mse",
        percentile: float = 99.99,
        modules: Sequence[str] | None = None,
        accuracy_budget: float | None = None,
        export_format: str | Sequence[str] | None = None,
        export_dir: str | None = None,
        skip: Sequence[str | type] = (),
        config: Any | None = None,
    ) -> None:
        check_number("accuracy_budget", accuracy_budget, low=0.0, none="no sensitivity study")
        check_integer("calibration_batches", calibration_batches, minimum=1)
        check_number("percentile", percentile, 0.0, 100.0, low_open=True)
        self.config = chosen_config(
            config,
            type(self),
            backend,
            per_channel_weights=per_channel_weights,
            observer=observer,
            range_method=range_method,
            percentile=percentile,
        )
        self.backend: QuantizationBackend = backend_for(self.config)
        self.backend.check_settings(training=False)
        if accuracy_budget is not None and not self.backend.has_ranges:
            raise ValueError(
                f"accuracy_budget={accuracy_budget!r} studies calibrated int8 layers one at a time; it is not offered "
                f"with config={type(self.config).__name__}(...), which calibrates nothing."
            )
        self.export_formats = check_backend_exports(self.backend, export_format)
        self.calibration_batches = calibration_batches
        self.modules = list(modules) if modules is not None else None
        self.skip_names, self.skip_types = split_skip(skip)
        self.accuracy_budget = accuracy_budget
        self.float_layers: dict[str, list[str]] = {}
        self.sensitivity: dict[str, dict] = {}
        self.sensitivity_plots: dict[str, Path] = {}
        self.export_format = export_format
        self.export_dir = export_dir
        self.quantized_model: nn.Module | None = None
        self.export_path: Path | None = None  # the TorchScript file
        self.export_paths: dict[str, Path] = {}  # every file written, by format
        self.calibrated_batches = 0
        self._targets: list[str] = []
        self._skipped: dict[str, list[str]] = {}  # target -> its layers that skip keeps in float
        self._calls: dict = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        sharding.check_strategy(trainer, "PostTrainingQuantization")
        names = dict(pl_module.named_modules())
        check_submodule_names(pl_module, "modules", self.modules or [])
        check_submodule_names(pl_module, "skip", self.skip_names)
        candidates = self.modules if self.modules is not None else [name for name, _ in compressible_children(pl_module)]
        self._targets = [
            name
            for name in candidates
            if self.backend.has_quantizable_layers(names[name])
            and not is_skipped(name, names[name], self.skip_names, self.skip_types)
        ]
        self._skipped = {name: skipped_layers(names[name], name, self.skip_names, self.skip_types) for name in self._targets}
        for name in self._targets:  # a layer that cannot be quantized as asked: one line, before any training
            self.backend.check_layers(names[name], name, self._skipped[name], self.skip_types)
        if not self._targets:
            raise ValueError("PostTrainingQuantization: the model has no Conv or Linear layer to quantize.")
        if self.accuracy_budget is not None and trainer.datamodule is None:
            raise ValueError("accuracy_budget needs a datamodule: the sensitivity study measures on its val_dataloader().")
        # Before any training: the calibration at fit end replays these steps, so they must run now.
        self._calls = first_calls(pl_module, training_batches(trainer, pl_module, 1), self._targets)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # the BatchNorm statistics the int8 model is built from: rank 0's on every rank, so a checkpoint (which holds
        # one rank's buffers) resumes the fit this one is
        sharding.synchronize_buffers(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module = sharding.unsharded(pl_module)  # under FSDP2: a whole copy, gathered once, calibrated and converted
        self.backend.activate()
        batches = training_batches(trainer, pl_module, self.calibration_batches)
        self.calibrated_batches = len(batches)
        if self.accuracy_budget is not None:
            calls = watch_training_step(pl_module, batches, self._targets, calls_per_module=len(batches))
            self._choose_float_layers(trainer, pl_module, calls)
        calibrated = copy.deepcopy(pl_module).eval()
        parts = [
            part
            for name in self._targets
            for part in self._prepare(calibrated, name, sorted({*self.float_layers.get(name, []), *self._skipped[name]}))
        ]
        watch_training_step(calibrated, batches, restore_buffers=False, inference_fastpath=False)  # observers record
        for name in parts:  # each rank saw its own batches: all convert rank 0's ranges
            sharding.broadcast_buffers(calibrated.get_submodule(name), trainer)
        quantized = copy.deepcopy(pl_module).cpu().eval()  # int8 kernels are CPU kernels
        int8_parts = {name: self.backend.convert(calibrated.get_submodule(name)) for name in parts}
        kept_float = keep_what_runs(quantized, int8_parts, batches[:1])
        for name, failure in kept_float.items():
            rank_zero_warn(
                f"PostTrainingQuantization: {name!r} stays in float: with its int8 version the module fails ({failure})."
            )
        self.quantized_model = quantized
        rank_zero_info(f"PostTrainingQuantization: {self.config.describe()}, calibrated on {self.calibrated_batches} batches.")
        if self.export_formats:

            def runtime_model() -> nn.Module:  # ONNX and OpenVINO read the calibrated ranges
                model = copy.deepcopy(pl_module).cpu().eval()
                for name in parts:
                    if name not in kept_float:
                        model.set_submodule(name, self.backend.fake_quant_for_export(calibrated.get_submodule(name)))
                return model

            self.export_paths = self._export(trainer, pl_module, runtime_model) or {}
            self.export_path = self.export_paths.get("torchscript")
        sharding.free_dropped_copies(trainer.lightning_module)  # under FSDP2 the whole and calibrated copies

    def _prepare(self, model: nn.Module, name: str, float_layers: list[str]) -> list[str]:
        """Insert observers into ``name`` whole or, where it cannot be traced (or is never called itself, as a
        ``ModuleList``), into its children; returns the prepared names."""
        module = model.get_submodule(name)
        if not self.backend.has_quantizable_layers(module):
            return []
        loss_inside = computes_its_loss(module, self._calls[name][1]) if name in self._calls else None
        if loss_inside:
            rank_zero_info(f"PostTrainingQuantization: {name!r} split into its children ({loss_inside}).")
        elif name in self._calls:
            try:
                args, kwargs = self._calls[name]
                prepared = self.backend.prepare_ptq(module, args, kwargs, float_layers)
                self.backend.check_same_output(module, prepared, args, kwargs)
                model.set_submodule(name, prepared)
                return [name]
            except Exception as error:  # noqa: BLE001 - any tracing failure means: try the children instead
                rank_zero_info(
                    f"PostTrainingQuantization: {name!r} split into its children ({str(error).splitlines()[0][:120]})."
                )
        prepared = []
        for child, _ in module.named_children():
            prefix = f"{child}."
            inner = [layer[len(prefix) :] for layer in float_layers if layer.startswith(prefix)]
            prepared += self._prepare(model, f"{name}.{child}", inner)
        return prepared

    def _choose_float_layers(self, trainer: L.Trainer, pl_module: L.LightningModule, calls: dict) -> None:
        validation = [(first_tensor(batch).to(pl_module.device), batch[1]) for batch in trainer.datamodule.val_dataloader()]

        def accuracy(network: nn.Module) -> float:
            network.eval()
            with torch.no_grad():
                correct = sum(int((network(images).argmax(1) == labels).sum()) for images, labels in validation)
            return correct / sum(len(labels) for _, labels in validation)

        self.sensitivity = {}
        for name in self._targets:
            network = pl_module.get_submodule(name)
            calibration = calls.get(name, [])
            reference, ranking = sensitivity.layer_sensitivity(network, self.config, calibration, accuracy)
            keep, _ = sensitivity.propose_float_layers(
                network, self.config, calibration, accuracy, reference, ranking, self.accuracy_budget
            )
            self.float_layers[name] = keep
            self.sensitivity[name] = {"reference": reference, "ranking": ranking, "float_layers": keep}
            if trainer.is_global_zero:
                print_sensitivity(reference, ranking, keep, title=name)
                plot_name = "quantization_sensitivity.png" if len(self._targets) == 1 else f"quantization_sensitivity_{name}.png"
                self.sensitivity_plots[name] = plot_sensitivity(ranking, output_folder(trainer, self.export_dir) / plot_name)

    @property
    def sensitivity_plot(self) -> Path | None:
        """The sensitivity plot, when one network was studied (``sensitivity_plots`` holds one per network)."""
        return next(iter(self.sensitivity_plots.values()), None) if len(self.sensitivity_plots) == 1 else None

    def report_models(self) -> dict[str, nn.Module]:
        if self.quantized_model is None:
            return {}
        return {"int8": self.quantized_model, **runtime_models("int8", self.export_paths, count_parameters(self.quantized_model))}

    @rank_zero_only
    def _export(
        self, trainer: L.Trainer, pl_module: L.LightningModule, runtime_model: Callable[[], nn.Module]
    ) -> dict[str, Path]:
        call = observe_network_call(trainer, pl_module)
        folder = output_folder(trainer, self.export_dir)
        return write_int8_exports(self.quantized_model, runtime_model, call, folder, self.export_formats)


class DynamicQuantization(Callback, ReportsModels):
    r"""At the end of ``fit``, an int8 copy with dynamically quantized Linear (and, on the FX engines, LSTM
    and GRU) layers: int8 weights, activations quantized at each call from their own range, nothing calibrated.

    .. code-block:: python

        dynamic = DynamicQuantization()
        Trainer(max_epochs=5, callbacks=[dynamic]).fit(lstm_model, datamodule=datamodule)
        dynamic.quantized_model

    Args:
        backend: ``x86_inductor`` (default): each network exported from the call a training step makes
            (``torch.export``), its Linear layers quantized by ``X86InductorQuantizer`` and run under
            ``torch.compile`` (oneDNN's int8 kernels, nothing of the deprecated FX engine); LSTM/GRU stay float
            there, named. A network that does not export is quantized child by child. ``x86``, ``fbgemm`` or
            ``qnnpack``: the FX engine's eager dynamic layers (Linear, LSTM, GRU), deprecated upstream, chosen by
            name only (one ``FutureWarning``).
        export_format: ``torch_export`` (``x86_inductor``: ``model_dynamic_int8.pt2``) or ``torchscript``
            (``x86``: ``model_dynamic_int8.pt``); ``None``: the backend's own; ``none`` writes nothing.
            (ONNX and OpenVINO have no dynamically quantized layers to map these onto: export the QAT or PTQ model.)
        export_dir: where to write it (default: the checkpoint folder, else the log folder).
        modules: submodules to quantize (default: the module's networks), as in every compression callback.
        skip: submodule names (``"net.classifier"``, or every layer inside a named submodule) or layer types
            (``torch.nn.LSTM`` or ``"torch.nn.LSTM"``) kept in float, as in every compression callback.
    """

    def __init__(
        self,
        export_format: str | Sequence[str] | None = None,
        export_dir: str | None = None,
        modules: Sequence[str] | None = None,
        skip: Sequence[str | type] = (),
        backend: str = DEFAULT_BACKEND,
    ) -> None:
        self.modules = list(modules) if modules is not None else None
        self.skip_names, self.skip_types = split_skip(skip)
        self.backend: QuantizationBackend = backend_for(quantization_config(backend))
        formats = check_export_format(self.backend.native_export if export_format is None else export_format)
        if set(formats) - {self.backend.native_export}:
            raise ValueError(
                f"DynamicQuantization: export_format={export_format!r}: only 'torchscript' (backend='x86'), 'torch_export' "
                "(backend='x86_inductor') or 'none'; ONNX Runtime and OpenVINO runs of int8 models come from "
                "QuantizationAwareTraining or PostTrainingQuantization."
            )
        self.export_formats = formats
        self.export_format = export_format
        self.export_dir = export_dir
        self.quantized_model: nn.Module | None = None
        self.export_path: Path | None = None
        self.export_paths: dict[str, Path] = {}
        self.float_layers: list[str] = []
        self._targets: list[str] = []
        self._batches: list = []
        self._calls: dict = {}

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        sharding.check_strategy(trainer, "DynamicQuantization")
        check_submodule_names(pl_module, "modules", self.modules or [])
        check_submodule_names(pl_module, "skip", self.skip_names)
        names = dict(pl_module.named_modules())
        candidates = self.modules if self.modules is not None else [name for name, _ in compressible_children(pl_module)]
        self._targets = [
            name
            for name in candidates
            if any(isinstance(module, DYNAMIC_LAYERS) for module in names[name].modules())
            and not is_skipped(name, names[name], self.skip_names, self.skip_types)
        ]
        if not self._targets:
            raise ValueError("DynamicQuantization: the model has no Linear, LSTM or GRU layer to quantize.")
        self._batches = training_batches(trainer, pl_module, 1)
        self._calls = first_calls(pl_module, self._batches, self._targets)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sharding.synchronize_buffers(trainer, pl_module)  # as PostTrainingQuantization does, for the same reason

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Quantize the module's networks (not its metrics or a frozen teacher), keeping in float any layer
        whose int8 version stops the module from running (a parent that reads ``layer.weight`` directly,
        as ``nn.TransformerEncoderLayer``'s inference fast path does)."""
        quantized = sharding.full_copy(pl_module).cpu().eval()  # int8 kernels are CPU kernels
        self.float_layers = []
        replacements = {}
        for name in self._targets:
            replacements |= self._replacements(quantized, name)
        refused = keep_what_runs(quantized, replacements, self._batches)
        kept = [name for name in replacements if name not in refused]
        for name, failure in refused.items():
            layers = {}  # a network whose int8 version breaks the module: its layers one by one
            for layer_name, layer in quantized.get_submodule(name).named_modules():
                full_name = f"{name}.{layer_name}" if layer_name else name
                if isinstance(layer, DYNAMIC_LAYERS) and full_name not in replacements:
                    layers |= self._replacements(quantized, full_name)
            if not layers:
                self._keep_float(name, f"with it in int8 the module fails: {failure}")
            layers_refused = keep_what_runs(quantized, layers, self._batches)
            kept += [layer_name for layer_name in layers if layer_name not in layers_refused]
            for layer_name, layer_failure in layers_refused.items():
                self._keep_float(layer_name, f"with it in int8 the module fails: {layer_failure}")
        self._name_what_stayed_float(pl_module, quantized, kept)
        self.quantized_model = quantized
        if self.export_formats:
            self.export_paths = self._export(trainer, pl_module) or {}
            self.export_path = self.export_paths.get("torchscript")
        sharding.free_dropped_copies(pl_module)

    def _replacements(self, model: nn.Module, name: str) -> dict[str, nn.Module]:
        """The int8 version of ``model``'s submodule ``name`` (from the call a training step made of it, the layers
        ``skip`` keeps left float) or, where it computes its loss inside (``labels=``: an exported graph would then
        demand labels) or cannot be quantized whole (not exported, never called itself), of its children."""
        module = model.get_submodule(name)
        if not any(isinstance(layer, DYNAMIC_LAYERS) for layer in module.modules()) or is_skipped(
            name, module, self.skip_names, self.skip_types
        ):
            return {}
        call = self._calls.get(name)
        why_split = computes_its_loss(module, call[1]) if call is not None else None
        if not why_split:
            try:
                skipped = skipped_layers(module, name, self.skip_names, self.skip_types)
                return {name: self.backend.quantize_dynamic(module, DYNAMIC_LAYERS, call, skipped)}
            except Exception as error:  # noqa: BLE001 - a part that does not export: its children instead
                why_split = first_line(error)
        if isinstance(module, DYNAMIC_LAYERS):
            self._keep_float(name, why_split)
            return {}
        rank_zero_info(f"DynamicQuantization: {name!r} is quantized child by child ({why_split}).")
        replacements = {}
        for child, _ in module.named_children():
            replacements |= self._replacements(model, f"{name}.{child}")
        return replacements

    def _name_what_stayed_float(self, pl_module: nn.Module, quantized: nn.Module, kept: list[str]) -> None:
        """Add to ``float_layers`` every Linear/LSTM/GRU of the targets that the int8 model does not run in int8, as read
        back from it: layers with no kernel in this backend (LSTM/GRU under ``x86_inductor``) and those the backend
        kept float itself."""
        int8 = set()
        for name in kept:
            layers, _ = self.backend.layers_by_kind(quantized.get_submodule(name))
            int8 |= {f"{name}.{layer}" if layer else name for layer in layers}
        unconverted = [
            name
            for name, layer in pl_module.named_modules()
            if isinstance(layer, DYNAMIC_LAYERS)
            and any(within(name, target) for target in self._targets)
            and not is_skipped(name, layer, self.skip_names, self.skip_types)
            and name not in int8
            and name not in self.float_layers
        ]
        if unconverted:
            rank_zero_info(
                f"DynamicQuantization: {unconverted} stay float: backend={self.backend.name!r} has no dynamic int8 kernel "
                "for them (LSTM/GRU under x86_inductor, or a Linear whose input never crosses zero)."
            )
        self.float_layers += unconverted

    def _keep_float(self, layer_name: str, why: str) -> None:
        self.float_layers.append(layer_name)
        rank_zero_warn(f"DynamicQuantization: {layer_name!r} stays in float ({why}).")

    def report_models(self) -> dict[str, nn.Module]:
        return {} if self.quantized_model is None else {"int8 dynamic": self.quantized_model}

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Path]:
        call = observe_network_call(trainer, pl_module)
        folder = output_folder(trainer, self.export_dir)
        return write_exports(self.quantized_model, call, folder, "model_dynamic_int8", self.export_formats, INT8_TOLERANCE)
