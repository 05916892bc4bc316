"""Quantization after training: static (calibrated) and dynamic, as callbacks that act at fit end.

``PostTrainingQuantization`` observes activation ranges on a few training batches and converts to the same
real int8 model as QAT, with no training at all when the Trainer runs zero epochs on a trained checkpoint
(``python train.py +compress=ptq model.checkpoint=...``). ``DynamicQuantization`` stores Linear, LSTM and
GRU weights in int8 and quantizes activations on the fly: the usual way to ship LSTM and Linear-heavy
models. The mechanism is ``fx_quantization``'s, shared with QAT.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import nn
from typing_extensions import override

from lightning_compress import fx_quantization as backend
from lightning_compress import sensitivity
from lightning_compress.export import check_export_format, export_torchscript, output_folder
from lightning_compress.fx_quantization import QuantizationConfig
from lightning_compress.inputs import example_input, model_input, model_inputs, training_dataloader
from lightning_compress.selection import compressible_children


class PostTrainingQuantization(Callback):
    r"""Calibrate on training batches at the end of ``fit`` and convert to int8, without quantization-aware
    training.

    .. code-block:: python

        ptq = PostTrainingQuantization(calibration_batches=16, observer="histogram", range_method="entropy")
        Trainer(max_epochs=0, callbacks=[ptq]).fit(trained_model, datamodule=datamodule)  # no training
        ptq.quantized_model

    Args:
        calibration_batches: training batches whose activations set the ranges (at least 1).
        backend: ``x86``, ``fbgemm`` or ``qnnpack``.
        per_channel_weights: one weight scale per output channel, or one per tensor.
        observer: ``minmax``, ``moving_average_minmax`` or ``histogram``.
        range_method: ``max``, ``percentile``, ``entropy`` or ``mse`` (all but ``max`` need ``histogram``).
        percentile: kept percentile for ``range_method="percentile"``, in (0, 100].
        modules: submodules to quantize (default: the module's networks, as for QAT).
        accuracy_budget: when set (accuracy points), first measure each layer's sensitivity on the validation
            data (quantized alone), then keep the most sensitive layers in float until the quantized model is
            within this budget of the float one; prints the table and writes ``quantization_sensitivity.png``.
            The quantized network must take the batch's input and return logits.
        export_format: ``torchscript`` writes ``model_int8.pt``; ``none`` writes nothing.
        export_dir: where to write it (default: the checkpoint folder, else the log folder).
    """

    def __init__(
        self,
        calibration_batches: int = 32,
        backend: str = "x86",
        per_channel_weights: bool = True,
        observer: str = "histogram",
        range_method: str = "mse",
        percentile: float = 99.99,
        modules: Sequence[str] | None = None,
        accuracy_budget: float | None = None,
        export_format: str = "torchscript",
        export_dir: str | None = None,
    ) -> None:
        if accuracy_budget is not None and accuracy_budget < 0:
            raise ValueError(f"accuracy_budget={accuracy_budget!r} is invalid: it must be >= 0 (accuracy points).")
        if not isinstance(calibration_batches, int) or calibration_batches < 1:
            raise ValueError(f"calibration_batches={calibration_batches!r} is invalid: it must be a positive integer.")
        check_export_format(export_format)
        self.config = QuantizationConfig(backend, per_channel_weights, observer, range_method, percentile)
        self.calibration_batches = calibration_batches
        self.modules = list(modules) if modules is not None else None
        self.accuracy_budget = accuracy_budget
        self.float_layers: dict[str, list[str]] = {}
        self.sensitivity: dict | None = None
        self.sensitivity_plot: Path | None = None
        self.export_format = export_format
        self.export_dir = export_dir
        self.quantized_model: nn.Module | None = None
        self.export_path: Path | None = None
        self.calibrated_batches = 0
        self._targets: list[str] = []

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        names = dict(pl_module.named_modules())
        for name in self.modules or []:
            if not name or name not in names:
                raise ValueError(f"modules={name!r} names no submodule; submodules are e.g. {list(names)[1:9]}.")
        candidates = self.modules if self.modules is not None else [name for name, _ in compressible_children(pl_module)]
        self._targets = [name for name in candidates if backend.has_quantizable_layers(names[name])]
        if not self._targets:
            raise ValueError("PostTrainingQuantization: the model has no Conv or Linear layer to quantize.")
        if self.accuracy_budget is not None and trainer.datamodule is None:
            raise ValueError("accuracy_budget needs a datamodule: the sensitivity study measures on its val_dataloader().")
        try:
            example_input(trainer, pl_module)
        except Exception as error:  # noqa: BLE001 - any failure here means: nothing to calibrate on
            raise ValueError(f"PostTrainingQuantization needs training data to calibrate on ({error}).") from error

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        backend.use_backend(self.config)
        calibration = self._calibration_inputs(trainer, pl_module)
        if self.accuracy_budget is not None:
            self._choose_float_layers(trainer, pl_module, calibration)
        quantized = copy.deepcopy(pl_module).eval()
        for name in self._targets:
            mapping = backend.qconfig_mapping(self.config, skip_names=self.float_layers.get(name, []))
            quantized.set_submodule(name, backend.prepare_static(quantized.get_submodule(name), mapping))
        with torch.no_grad():
            for images in calibration:
                quantized(images)
        for name in self._targets:
            quantized.set_submodule(name, backend.convert(quantized.get_submodule(name)))
        self.quantized_model = quantized
        rank_zero_info(
            f"PostTrainingQuantization: {self.config.observer} observer, range {self.config.range_method}, "
            f"{'per-channel' if self.config.per_channel_weights else 'per-tensor'} weights, "
            f"calibrated on {self.calibrated_batches} batches."
        )
        if self.export_format == "torchscript":
            self.export_path = self._export(trainer, pl_module)

    def _calibration_inputs(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[torch.Tensor]:
        inputs = model_inputs(training_dataloader(trainer), self.calibration_batches, pl_module.device)
        self.calibrated_batches = len(inputs)
        return inputs

    def _choose_float_layers(self, trainer: L.Trainer, pl_module: L.LightningModule, calibration: list) -> None:
        validation = [(model_input(batch, pl_module.device), batch[1]) for batch in trainer.datamodule.val_dataloader()]

        def accuracy(network: nn.Module) -> float:
            network.eval()
            with torch.no_grad():
                correct = sum(int((network(images).argmax(1) == labels).sum()) for images, labels in validation)
            return correct / sum(len(labels) for _, labels in validation)

        for name in self._targets:
            network = pl_module.get_submodule(name)
            reference, ranking = sensitivity.layer_sensitivity(network, self.config, calibration, accuracy)
            keep, _ = sensitivity.propose_float_layers(
                network, self.config, calibration, accuracy, reference, ranking, self.accuracy_budget
            )
            self.float_layers[name] = keep
            self.sensitivity = {"reference": reference, "ranking": ranking, "float_layers": keep}
            if trainer.is_global_zero:
                sensitivity.show(reference, ranking, keep)
                self.sensitivity_plot = sensitivity.plot(
                    ranking, output_folder(trainer, self.export_dir) / "quantization_sensitivity.png"
                )

    def report_models(self) -> dict[str, nn.Module]:
        return {} if self.quantized_model is None else {"int8": self.quantized_model}

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        path = output_folder(trainer, self.export_dir) / "model_int8.pt"
        return export_torchscript(self.quantized_model, (example_input(trainer, pl_module),), {}, path)


class DynamicQuantization(Callback):
    r"""At the end of ``fit``, an int8 copy with dynamically quantized Linear, LSTM and GRU layers.

    .. code-block:: python

        dynamic = DynamicQuantization()
        Trainer(max_epochs=5, callbacks=[dynamic]).fit(lstm_model, datamodule=datamodule)
        dynamic.quantized_model

    Args:
        export_format: ``torchscript`` writes ``model_dynamic_int8.pt``; ``none`` writes nothing.
        export_dir: where to write it (default: the checkpoint folder, else the log folder).
    """

    def __init__(self, export_format: str = "torchscript", export_dir: str | None = None) -> None:
        check_export_format(export_format)
        self.export_format = export_format
        self.export_dir = export_dir
        self.quantized_model: nn.Module | None = None
        self.export_path: Path | None = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and not any(
            isinstance(module, backend.DYNAMIC_LAYERS)
            for _, child in compressible_children(pl_module)
            for module in child.modules()
        ):
            raise ValueError("DynamicQuantization: the model has no Linear, LSTM or GRU layer to quantize.")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.quantized_model = backend.quantize_dynamic(pl_module)
        if self.export_format == "torchscript":
            self.export_path = self._export(trainer, pl_module)

    def report_models(self) -> dict[str, nn.Module]:
        return {} if self.quantized_model is None else {"int8 dynamic": self.quantized_model}

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        path = output_folder(trainer, self.export_dir) / "model_dynamic_int8.pt"
        return export_torchscript(self.quantized_model, (example_input(trainer, pl_module),), {}, path)
