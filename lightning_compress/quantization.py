"""``QuantizationAwareTraining``: the QAT schedule as a Lightning callback.

The callback holds *when* things happen (insert, calibrate, freeze BN, freeze observers, convert); the
mechanism (*how*) is a ``QuantizationBackend`` chosen by the ``backend`` setting (``quantization_backend``).
Fake-quant modules are inserted in ``setup``, before Lightning builds the optimizer, wraps the model for
DDP or loads a checkpoint's weights, so the module's structure is the same for the whole run and every
checkpoint of it. Before ``start_epoch`` they are switched off and the model trains in fp32. Observers are
off during validation and test, so evaluation data never moves the quantization ranges.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_compress import compat, module_swap, optimizers, range_learning, sharding
from lightning_compress.export import output_folder, write_int8_exports
from lightning_compress.forward_graph import forward_holder, install_forward, installed_forward
from lightning_compress.inputs import first_calls, first_line, on_cpu, runs, training_batches, watch_training_step
from lightning_compress.network_call import computes_its_loss, observe_network_call
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.quantization_backend import (
    DEFAULT_BACKEND,
    RECURRENT_LAYERS,
    QuantizationBackend,
    backend_for,
    check_backend_exports,
    chosen_config,
    config_from_state,
    config_state,
    structure_only,
)
from lightning_compress.quantization_plan import QuantizedPart
from lightning_compress.report import ReportsModels, count_parameters, print_quantized_parts
from lightning_compress.runtimes import RUNTIMES, runtime_models
from lightning_compress.selection import compressible_children, resolve_module_type, split_skip, within
from lightning_compress.validation import check_integer, check_number, is_integer

log = logging.getLogger(__name__)


class QuantizationAwareTraining(Callback, ReportsModels):
    r"""Train with fake-quantized weights and activations, then convert to a real int8 model.

    .. code-block:: python

        from lightning_compress import QuantizationAwareTraining

        qat = QuantizationAwareTraining(start_epoch=2, freeze_bn_epoch=6, freeze_observer_epoch=7)
        trainer = Trainer(max_epochs=8, callbacks=[qat])
        trainer.fit(model, datamodule=datamodule)
        int8_model = qat.quantized_model  # compiled by Inductor; saved as a torch.export program (model_int8.pt2)

        # FX graph mode instead (deprecated upstream): an eager int8 model, saved as TorchScript
        qat = QuantizationAwareTraining(start_epoch=2, backend="x86")

    By default every child of the LightningModule that holds trainable parameters is quantized (metrics and
    frozen modules, such as a distillation teacher, never are). A child that cannot be traced symbolically
    (data-dependent control flow, say) is split into its own children, down to single Conv/Linear layers, or,
    where that breaks it, has its Linear and Embedding layers swapped for fake-quant ones (see
    ``module_swap``); how each part went, and what stays in float and why, is printed in one table at setup
    and kept in ``parts``.

    With a ``MagnitudePruning(mode="channels", shrink_epoch=...)`` in the same Trainer (before or after this
    callback in the list), preparation waits for the shrink: at ``start_epoch`` (at or after ``shrink_epoch``)
    the smaller network is prepared, and the optimizers are rebuilt over its parameters, keeping their state.

    Args:
        start_epoch: epoch at which fake-quant switches on; earlier epochs train in fp32.
        freeze_bn_epoch: epoch from which fused BatchNorm statistics stop updating (``None``: never).
        freeze_observer_epoch: epoch from which scales and zero-points stop updating (``None``: never).
        backend: how and for which kernels: ``x86_inductor`` (default: the pt2e flow with
            ``X86InductorQuantizer``, each part exported with ``torch.export``, the int8 model compiled by
            Inductor on its first call; 8-bit grids and the default observer only; see ``pt2e_quantization``), or
            FX graph mode, deprecated upstream and chosen by name only (one ``FutureWarning``): ``x86``
            (int8 models that run eagerly; any grid from 2 to 8 bits, every observer), ``fbgemm`` or ``qnnpack``
            (ARM) likewise.
        per_channel_weights: one weight scale per output channel (default) or one per tensor.
        observer: activation observer, ``moving_average_minmax``, ``minmax`` or ``histogram``.
        weight_bits: weight grid, 2 to 8 bits. Below 8 bits (e.g. 4) the model trains on that grid with
            straight-through gradients and is reported as fake-quant only: no int8 kernel runs it faster.
        activation_bits: activation grid, 2 to 8 bits.
        narrow_range: symmetric weight grid without its lowest level.
        signed_activations: activations on a signed grid.
        modules: names of submodules to quantize (e.g. ``["net"]``) instead of the default choice.
        skip: names (``"net.classifier"``) or types (``torch.nn.Linear`` or ``"torch.nn.Linear"``) of
            layers to keep in float; first and last layers are common choices.
        calibration_batches: training batches run through the model with observers on and fake-quant off
            when fake-quant starts, so that a trained model starts QAT from calibrated ranges.
        convert_on_fit_end: build the int8 model at the end of ``fit``.
        export_format: one format or a list; ``None`` (default): the backend's own, ``torch_export`` for
            ``x86_inductor`` and ``torchscript`` for the FX backends. ``torchscript`` writes the int8 model as
            ``model_int8.pt`` (``torch.jit.load`` runs it without this package); ``torch_export`` writes
            ``model_int8.pt2`` (``torch.export.load``, after the import ``pt2e_quantization`` names); ``onnx``
            writes ``model_int8.onnx``, whose QuantizeLinear/DequantizeLinear pairs hold the trained scales
            (ONNX Runtime, TensorRT);
            ``openvino`` writes ``model_int8_openvino.xml``/``.bin`` (OpenVINO runs its convolutions in
            int8); ``none`` writes nothing. Files go next to the checkpoints.
        export_dir: where to write the export (default: the checkpoint folder, else the log folder).
        learnable_ranges: learned step size quantization (LSQ, Esser et al. 2019): from ``freeze_observer_epoch``
            on, every scale (and asymmetric zero-point) is a parameter trained with LSQ's gradient, starting where
            the observers left it, instead of staying frozen; checkpointed and resumed with the weights, converted
            to the same int8 kernels, on either engine; layers quantized by module swap keep observed ranges.
            The ranges are stepped by this callback, not by the model's optimizer (see ``range_learning``): Adam
            there moves every range by about its learning rate in absolute terms, far too fast for an 8-bit scale
            of 0.002 and far too slow for a 3-bit one of 0.5.
        range_learning_rate: with ``learnable_ranges``, how far a scale moves per optimizer step, relative to
            itself (a zero-point: in grid steps), following the model's learning-rate schedule; default 0.01,
            the best of 0.001, 0.003, 0.01 and 0.03 on one seed of digits (a starved CNN at 3 bits, mobilenet_v2
            at 4). No weight decay applies to the ranges.
        config: a config object that says how to quantize, instead of ``backend`` and its settings (which then
            keep their defaults): ``lowbit_quantization.LowBitLinearConfig(scheme="8da4w", group_size=32)``
            trains Linear layers for int4/int8 low-bit schemes (transformers), with no ranges to freeze or
            calibrate; its models export as ``torch_export``.
    """

    def __init__(
        self,
        start_epoch: int = 0,
        freeze_bn_epoch: int | None = None,
        freeze_observer_epoch: int | None = None,
        backend: str = DEFAULT_BACKEND,
        per_channel_weights: bool = True,
        observer: str = "moving_average_minmax",
        weight_bits: int = 8,
        activation_bits: int = 8,
        narrow_range: bool = False,
        signed_activations: bool = False,
        modules: Sequence[str] | None = None,
        skip: Sequence[str | type] = (),
        calibration_batches: int = 0,
        convert_on_fit_end: bool = True,
        export_format: str | Sequence[str] | None = None,
        export_dir: str | None = None,
        config: Any | None = None,
        learnable_ranges: bool = False,
        range_learning_rate: float | None = None,
    ) -> None:
        check_integer("start_epoch", start_epoch, minimum=0)
        if range_learning_rate is not None and not learnable_ranges:
            raise ValueError(
                f"range_learning_rate={range_learning_rate!r} has nothing to act on: it paces learned ranges; "
                "set learnable_ranges=True, or leave range_learning_rate unset."
            )
        default_rate = range_learning.DEFAULT_LEARNING_RATE
        check_number("range_learning_rate", range_learning_rate, 0.0, 1.0, low_open=True, none=f"the default, {default_rate}")
        for name, epoch in (("freeze_bn_epoch", freeze_bn_epoch), ("freeze_observer_epoch", freeze_observer_epoch)):
            if epoch is not None and (not is_integer(epoch) or epoch < start_epoch):
                raise ValueError(f"{name}={epoch!r} is invalid: it must be an integer >= start_epoch ({start_epoch}), or None.")
        check_integer("calibration_batches", calibration_batches, minimum=0)
        for name, bits in (("weight_bits", weight_bits), ("activation_bits", activation_bits)):
            check_integer(name, bits, minimum=2, maximum=8)
        self.config = chosen_config(
            config,
            type(self),
            backend,
            per_channel_weights=per_channel_weights,
            observer=observer,
            weight_bits=weight_bits,
            activation_bits=activation_bits,
            narrow_range=narrow_range,
            signed_activations=signed_activations,
            learnable_ranges=learnable_ranges,
        )
        self.backend: QuantizationBackend = backend_for(self.config)
        if learnable_ranges and freeze_observer_epoch is None:
            raise ValueError(
                "learnable_ranges=True needs freeze_observer_epoch: the observers set the ranges until that epoch and "
                "the ranges learn from then on; with None they would never learn."
            )
        if not self.backend.has_ranges:
            for name, value in (
                ("freeze_bn_epoch", freeze_bn_epoch),
                ("freeze_observer_epoch", freeze_observer_epoch),
                ("calibration_batches", calibration_batches or None),
            ):
                if value is not None:
                    raise ValueError(
                        f"{name}={value!r} has nothing to act on with {type(self.config).__name__}: its scales are computed "
                        "at each call, from the weights and from each token, and no BatchNorm is fused; leave it unset."
                    )
        elif freeze_observer_epoch == start_epoch and calibration_batches == 0:
            raise ValueError(
                f"freeze_observer_epoch={freeze_observer_epoch} equals start_epoch: no observer would ever see data, "
                "so fake-quant would run without ranges. Freeze later, or set calibration_batches > 0."
            )
        self.backend.check_settings(training=True)
        self.export_formats = check_backend_exports(self.backend, export_format)
        self.start_epoch = start_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.freeze_observer_epoch = freeze_observer_epoch
        self.modules = list(modules) if modules is not None else None
        self.skip_names, self.skip_types = split_skip(skip)
        self.calibration_batches = calibration_batches
        self.convert_on_fit_end = convert_on_fit_end
        runtime_formats = [name for name in self.export_formats if name in RUNTIMES]
        if runtime_formats and not self.config.converts_to_int8:
            raise ValueError(
                f"export_format={runtime_formats[0]!r} runs models in int8: weight_bits={weight_bits} and "
                f"activation_bits={activation_bits} have no int8 kernel there; use 8 bits or export_format='none'."
            )
        self.export_format = export_format
        self.export_dir = export_dir

        self.parts: list[QuantizedPart] = []
        self.quantized_model: nn.Module | None = None
        self.export_path: Path | None = None  # the TorchScript file
        self.export_paths: dict[str, Path] = {}  # every file written, by format
        self._calibrated = False
        self._float_templates: dict[str, nn.Module] = {}
        self._float_names: dict[str, dict[str, str]] = {}
        self._example_inputs: dict[str, tuple[tuple, dict]] = {}
        self._shrinks: list[MagnitudePruning] = []  # channel pruning that shrinks the network before QAT prepares it
        self._ranges_synchronized = False  # learned ranges wrapped by DDP since they began to learn, in this fit
        self._range_optimizer = range_learning.RangeOptimizer(range_learning_rate or default_rate)
        self._learned_ranges: dict[str, nn.Parameter] = {}  # the ranges it steps, found once the structure is settled
        self._ranges_held_by: tuple[int, int] | None = None  # the optimizer group whose schedule the ranges follow
        self._ranges_in_model_optimizer = False  # resumed from a checkpoint of a version whose model optimizer stepped them

    # ------------------------------------------------------------------ Lightning hooks

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(backend=self.config.backend)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.prepared_names:
            return
        if stage != "fit":
            # test/validate/predict(ckpt_path=...) on a fresh float module: Lightning loads the weights
            # before any callback hook runs, but after the module's own on_load_checkpoint.
            self._restore_before_weights_load(pl_module)
            if sharding.under_fsdp2(trainer):
                # a distributed checkpoint loads its weights into the networks configure_model sharded as floats:
                # the fake-quant structure is rebuilt in whole copies of them, which configure_model then shards
                # again (Lightning calls it once per stage: it is written to shard only what is not yet sharded)
                compat.run_before_distributed_weights_load(
                    trainer,
                    pl_module,
                    lambda: sharding.gather_sharded_children(pl_module),
                    pl_module.configure_model,
                    by=self.state_key,
                )
            return
        sharding.check_strategy(trainer, "QuantizationAwareTraining")
        if sharding.under_fsdp2(trainer):  # a resumed fit: observers' ranges take the shapes they were saved with
            compat.run_before_distributed_weights_load(trainer, pl_module, by=self.state_key)
        # Not an error: a run trained for fewer epochs now may be resumed with a larger max_epochs later.
        late = [
            f"{name}={epoch}"
            for name, epoch in (
                ("start_epoch", self.start_epoch),
                ("freeze_bn_epoch", self.freeze_bn_epoch),
                ("freeze_observer_epoch", self.freeze_observer_epoch),
            )
            if epoch is not None and trainer.max_epochs not in (None, -1) and epoch >= trainer.max_epochs
        ]
        if late:
            rank_zero_warn(
                f"QuantizationAwareTraining: max_epochs={trainer.max_epochs} ends this fit before {', '.join(late)}: "
                "what they schedule does not happen in it (it may in a resumed, longer one)."
            )
        # registered before either path prepares: a shrink's path rebuilds from the checkpoint's config, and a state
        # written from this callback's config must describe what was rebuilt
        compat.run_before_weights_load(
            pl_module, self._refuse_another_config, order=compat.SETTINGS_CHECKED, by=f"{self.state_key} settings"
        )
        pruning = [callback for callback in trainer.callbacks if isinstance(callback, MagnitudePruning)]
        self._shrinks = self._shrinks_before_start(pruning, pl_module)
        if self._shrinks:
            # Prepared at start_epoch, once the channels are gone; a checkpoint written after that holds the
            # prepared structure, rebuilt (on top of the shrink's) before its weights load.
            self._check_names(pl_module)
            self._restore_before_weights_load(pl_module)
            return
        self._prepare(trainer, pl_module)

    def _refuse_another_config(self, checkpoint: dict[str, Any]) -> None:
        """A resumed fit quantizes as its checkpoint was trained: fake-quant prepared otherwise would place its
        observers elsewhere (the graph's ``activation_post_process_<n>`` then name other tensors) or in other
        numbers, and the checkpoint's ranges would load into the wrong places or fail to load."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not state or "config" not in state:
            return
        written = config_from_state(state)
        if written == self.config:
            return
        if type(written) is type(self.config):
            differences = [
                f"{field.name}={getattr(written, field.name)!r}"
                for field in dataclasses.fields(written)
                if getattr(written, field.name) != getattr(self.config, field.name)
            ]
        else:
            differences = [f"config={type(written).__name__}"]
        raise ValueError(
            f"QuantizationAwareTraining: the checkpoint was trained with {', '.join(differences)}, which this run "
            f"sets otherwise; resume it with config={type(written).__module__}.{written!r}."
        )

    def _prepare(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Insert fake-quant into the module's networks, switched off; the parts table says how each went."""
        targets = self._targets(pl_module)
        if not targets:
            rank_zero_warn("QuantizationAwareTraining: nothing quantizable (no Conv/Linear layers); model unchanged.")
            return
        for name in targets:  # a layer that cannot be quantized as asked: one line, before anything is prepared
            prefix = f"{name}."
            skip_names = [entry[len(prefix) :] for entry in self.skip_names if entry.startswith(prefix)]
            self.backend.check_layers(_get(pl_module, name), name, skip_names, self.skip_types)
        self.backend.activate()
        self._example_inputs = first_calls(pl_module, training_batches(trainer, pl_module, 1), targets)
        whole = None
        # not under FSDP2: the graph calls the networks' layers, never the networks configure_model shards, whose
        # forward is where FSDP2 gathers their parameters
        one_graph = self.backend.prepares_whole_forward and not sharding.under_fsdp2(trainer)
        if self.modules is None and len(targets) > 1 and "" in self._example_inputs and one_graph:
            # the forward may also use children without parameters (pooling, activations): they join the graph
            stateless = [name for name, child in pl_module.named_children() if not any(True for _ in child.parameters())]
            whole = self._quantize_forward(
                pl_module, targets + [n for n in stateless if not isinstance(pl_module.get_submodule(n), Metric)], trainer
            )
        if whole is not None:  # several networks, not traced as one graph: each on its own
            self.parts.append(QuantizedPart("", False, f"forward not quantized as one graph: {whole}"))
        if not self.prepared_names:
            for name in targets:
                self._quantize(pl_module, name)
        if not self.prepared_names:
            rank_zero_warn("QuantizationAwareTraining: no submodule could be quantized; model unchanged.")
        self._show_parts()
        if sharding.under_fsdp2(trainer):
            # the FX engine's prepare leaves the float layers it traced in reference cycles (each qconfig closes over
            # its own module) that share the prepared layers' parameters; once configure_model shards those, the
            # cycles alone hold every whole float parameter until Python's next full collection, which a training
            # loop may never reach (129 MiB per process for an MLP of 33.7M parameters, measured)
            gc.collect()
        # Off until on_train_epoch_start of start_epoch, also when that is 0: the sanity-check validation
        # would otherwise fake-quantize with ranges that no observer has set yet.
        self._switch(pl_module, fake_quant=False, observers=False)

    def _shrinks_before_start(self, pruning: list[MagnitudePruning], pl_module: L.LightningModule) -> list[MagnitudePruning]:
        """The channel-pruning callbacks of this fit, each of which removes its channels at or before
        ``start_epoch`` (at ``start_epoch`` where its ``shrink_epoch`` is unset): QAT then prepares the smaller
        network. Channel pruning that would remove channels later, from a network already holding fake-quant, is
        refused."""
        shrinking = [callback for callback in pruning if callback.mode == "channels"]
        for callback in shrinking:
            if callback.shrink_epoch is None:
                # channels come out of the float network, which QAT then prepares: the latest moment is QAT's start
                callback.shrink_at(self.start_epoch, pl_module)
                rank_zero_info(
                    f"QuantizationAwareTraining: MagnitudePruning(mode='channels') removes its channels at start_epoch="
                    f"{self.start_epoch}, from the float network QAT then prepares (shrink_epoch was unset)."
                )
            if callback.shrink_epoch > self.start_epoch:
                raise ValueError(
                    f"shrink_epoch={callback.shrink_epoch} is after start_epoch={self.start_epoch}: QuantizationAwareTraining "
                    "would prepare the network before MagnitudePruning removes its channels; shrink at or before start_epoch."
                )
        return shrinking

    def _prepare_after_the_shrink(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Prepare the network mid-fit, once every shrink due has happened (the pruning callbacks may come
        after this one in the Trainer), then give the optimizers and DDP the prepared network's parameters."""
        for pruning in self._shrinks:
            pruning.shrink_if_due(trainer, pl_module)
        sharded = sharding.is_sharded(pl_module)
        if sharded:
            sharding.reshard(pl_module)  # the optimizers hold the shards, by which their state is found
        states = optimizers.optimizer_states(trainer, pl_module)
        if sharded:
            # under FSDP2, QAT prepares whole networks (gathered from the ranks), which the user's configure_model then
            # shards again; the optimizer state is gathered whole too, and laid out as the new shards
            states = optimizers.whole_states(states)
            gathered = sharding.gather_sharded_children(pl_module)
        self._prepare(trainer, pl_module)
        if sharded:
            sharding.shard_again(pl_module, gathered, "QuantizationAwareTraining", "once fake-quant was inserted")
        elif not self.prepared_names:
            return
        compat.rewrap_distributed(trainer)  # every process prepared alike: synchronize the new parameters
        new_names = {
            ".".join(filter(None, (part, old))): ".".join(filter(None, (part, new)))
            for part, names in self._float_names.items()
            for old, new in names.items()
        }
        optimizers.rebuild_optimizers(trainer, pl_module, optimizers.renamed(states, new_names), "QuantizationAwareTraining")
        self._take_ranges_from_optimizers(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # before Lightning restores a checkpoint's optimizer state, which was saved without the ranges too
        self._take_ranges_from_optimizers(trainer, pl_module)
        if self._shrinks and self.prepared_names and not self._example_inputs:
            # resumed from a checkpoint written after QAT prepared the shrunken network: how its parts are
            # called, for the int8 model's check and the exports
            self._example_inputs = first_calls(pl_module, training_batches(trainer, pl_module, 1), self.prepared_names)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Apply the schedule for this epoch; derived from the epoch alone, so a resumed run matches."""
        epoch = trainer.current_epoch
        if epoch >= self.start_epoch and self._shrinks and not self.prepared_names:
            self._prepare_after_the_shrink(trainer, pl_module)
        if epoch < self.start_epoch or not self.prepared_names:
            return
        if epoch == self.start_epoch and self.calibration_batches and not self._calibrated:
            self._calibrate(trainer, pl_module)
        if epoch == self.freeze_bn_epoch:
            self._warn_if_batch_norm_unsettled(trainer, pl_module)
        self._switch(pl_module, fake_quant=True, observers=self._observers_on(epoch))
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            for module in self._prepared_modules(pl_module):
                self.backend.freeze_batch_norm(module)
        if self.config.learnable_ranges and not self._observers_on(epoch) and not self._ranges_synchronized:
            # the ranges now need gradients: DDP reduces only the parameters that required them when it wrapped
            compat.rewrap_distributed(trainer)
            self._ranges_synchronized = True
        if epoch == self.start_epoch and not self.backend.has_ranges:
            rank_zero_info(f"QuantizationAwareTraining: epoch {epoch}: fake-quant on ({self.config.describe()}).")
        elif epoch in (self.start_epoch, self.freeze_bn_epoch, self.freeze_observer_epoch):
            rank_zero_info(
                f"QuantizationAwareTraining: epoch {epoch}: fake-quant on, observers "
                f"{'on' if self._observers_on(epoch) else 'frozen'}, BatchNorm statistics "
                f"{'frozen' if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch else 'updating'}."
            )

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        sharding.synchronize_buffers(trainer, pl_module)  # the ranges every rank fake-quantizes with: rank 0's
        if self.config.learnable_ranges and sharding.under_fsdp2(trainer):
            for module in self._prepared_modules(pl_module):
                range_learning.keep_observed_ranges(module)

    @override
    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        """Step the learned ranges with the gradients of the step the model's optimizer is about to take."""
        if self._learned_ranges:
            pace = range_learning.schedule_pace(trainer.optimizers, self._ranges_held_by)
            self._range_optimizer.step(self._learned_ranges, pace)

    def _take_ranges_from_optimizers(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Learned ranges are this callback's to step: out of the optimizers the module built over all its parameters.
        Called once the module's structure is settled for the fit (at its start, after a shrink's prepare)."""
        self._learned_ranges = {}  # none left from an earlier fit: a legacy resume's model optimizer steps them
        if not self.config.learnable_ranges or self._ranges_in_model_optimizer:
            return
        for name in self.prepared_names:
            self._learned_ranges.update(range_learning.learned_ranges(_get(pl_module, name), prefix=name))
        self._ranges_held_by = range_learning.take_from_optimizers(trainer.optimizers, self._learned_ranges)

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Observers also record in eval mode: validation data must not move the quantization ranges.
        self._switch(pl_module, observers=False)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":
            self._switch(pl_module, observers=self._observers_on(trainer.current_epoch))

    @override
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_start(trainer, pl_module)

    def _warn_if_batch_norm_unsettled(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Warn when the BatchNorm statistics about to be frozen do not describe the network yet.

        Frozen, fused BatchNorm normalizes training batches with its running statistics, as evaluation does.
        Early in training these lag far behind the batch statistics: resnet18 on digits after 20 steps from
        scratch had batch variances up to 35x the running ones and means 4 running stds off; its loss jumped
        from 0.6 to 3.5 on the first frozen step and it fell to chance. Measured on one training batch.
        """
        measured: dict[str, tuple[float, float]] = {}

        def measure(name: str, inputs: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> None:
            values = inputs.detach().transpose(0, 1).flatten(1).float()
            running_std = (running_var + eps).sqrt()
            shift = ((values.mean(1) - running_mean).abs() / running_std).median().item()
            measured.setdefault(name, (shift, (values.var(1) / running_std**2).median().item()))

        with contextlib.ExitStack() as watching:
            for part in self.prepared_names:

                def record(name: str, *values: Any, part: str = part) -> None:
                    measure(".".join(filter(None, (part, name))), *values)

                watching.enter_context(self.backend.batch_norm_inputs(_get(pl_module, part), record))
            watch_training_step(pl_module, training_batches(trainer, pl_module, 1))
        unsettled = {name: value for name, value in measured.items() if value[0] > 1 or not 0.25 <= value[1] <= 4}
        if unsettled:
            name, (shift, ratio) = max(unsettled.items(), key=lambda item: item[1][0] + abs(math.log2(max(item[1][1], 1e-12))))
            rank_zero_warn(
                f"QuantizationAwareTraining: freeze_bn_epoch={self.freeze_bn_epoch} freezes BatchNorm statistics that do not "
                f"describe the network yet (after {trainer.global_step} optimizer steps): in {len(unsettled)} of "
                f"{len(measured)} fused Conv-BN layers a training batch's mean is over 1 running std off or its variance "
                f"over 4x off (worst {name}: mean {shift:.1f} std off, variance x{ratio:.2f}). Frozen, training normalizes "
                "with these statistics and may collapse to chance: freeze BatchNorm later, or start QAT from a trained model."
            )

    def _observers_on(self, epoch: int) -> bool:
        return self.start_epoch <= epoch and (self.freeze_observer_epoch is None or epoch < self.freeze_observer_epoch)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.prepared_names:
            return
        # Training is over: the ranges are final, and evaluating the model must not move them.
        self._switch(pl_module, observers=False)
        for module in self._prepared_modules(pl_module):
            sharding.broadcast_buffers(module, trainer)  # every rank converts rank 0's ranges, whatever its last batch saw
        if not self.convert_on_fit_end:
            return
        if trainer.current_epoch <= self.start_epoch and not self._calibrated:
            # No epoch trained with fake-quant and nothing calibrated: the observers hold no ranges to convert.
            rank_zero_info("QuantizationAwareTraining: fake-quant never ran in this fit; no int8 model is built.")
            return
        if not self.config.converts_to_int8:
            rank_zero_info(
                f"QuantizationAwareTraining: {self.config.weight_bits}-bit weights and {self.config.activation_bits}-bit "
                "activations have no int8 kernel: the model stays fake-quantized (no int8 conversion or export)."
            )
            return
        # Under FSDP2 gathered whole once, on every rank, for the conversion and rank 0's exports, and freed after
        # them: the report gathers the live module again when it is built. Kept, it would cost every rank a model.
        self._convert_and_export(trainer, sharding.full_copy(pl_module).cpu() if sharding.is_sharded(pl_module) else pl_module)
        sharding.free_dropped_copies(pl_module)

    def _convert_and_export(self, trainer: L.Trainer, pl_module: nn.Module) -> None:
        self.quantized_model = self.convert(pl_module)
        if self.export_formats:
            self.export_paths = self._export(trainer, pl_module) or {}
            self.export_path = self.export_paths.get("torchscript")

    @override
    def state_dict(self) -> dict[str, Any]:
        forward_networks = [name for name, _ in self._float_templates[""].named_children()] if "" in self.prepared_names else []
        return {
            "start_epoch": self.start_epoch,
            "freeze_bn_epoch": self.freeze_bn_epoch,
            "freeze_observer_epoch": self.freeze_observer_epoch,
            **config_state(self.config),
            "inputs": {
                name: self.backend.input_record(*self._example_inputs[name])
                for name in self.prepared_names
                if name in self._example_inputs and name not in self._swapped_parts()
            },
            "prepared": self.prepared_names,
            "swapped": self._swapped_parts(),
            "forward_networks": forward_networks,
            "skip_names": self.skip_names,
            "skip_types": [f"{t.__module__}.{t.__qualname__}" for t in self.skip_types],
            "calibrated": self._calibrated,
            "range_optimizer": self._range_optimizer.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        changed = [
            key
            for key in ("start_epoch", "freeze_bn_epoch", "freeze_observer_epoch", "prepared")
            if state_dict.get(key) != (self.prepared_names if key == "prepared" else getattr(self, key))
        ]
        if changed:
            rank_zero_warn(f"QuantizationAwareTraining: the checkpoint was made with other settings for {changed}.")
        self._calibrated = state_dict.get("calibrated", False)
        if "range_optimizer" in state_dict:
            self._range_optimizer.load_state_dict(state_dict["range_optimizer"])
        elif self.config.learnable_ranges and state_dict.get("config", {}).get("learnable_ranges"):
            # Written before this callback stepped the ranges: the checkpoint's optimizer state holds them, and
            # must load as it was saved; the run goes on as it began.
            self._ranges_in_model_optimizer = True
            rank_zero_warn(
                "QuantizationAwareTraining: the checkpoint was written by a version whose model optimizer stepped the "
                "learned ranges; they stay there for this run (range_learning_rate does not apply to it)."
            )

    # ------------------------------------------------------------------ results

    @property
    def prepared_names(self) -> list[str]:
        return [part.name for part in self.parts if part.quantized]

    @property
    def hides_layers(self) -> bool:
        return bool(self.prepared_names) and not self.backend.keeps_layer_modules

    def parameter_name(self, name: str) -> str:
        """The name in the live module of the float model's parameter ``name``: a part the backend prepared may
        hold it under another (an exported graph: ``net.graph.conv1.weight`` for ``net.conv1.weight``)."""
        for part in self.parts:
            if part.quantized and part.name and not part.swapped_layers and within(name, part.name):
                return f"{part.name}.{self.backend.prepared_name(name[len(part.name) + 1 :])}"
        return name

    def convert(self, pl_module: nn.Module) -> nn.Module:
        """An int8 copy of ``pl_module``: each fake-quant part converted; a part whose int8 version fails
        to run (an op with no int8 kernel) is kept in float and marked so in ``parts``."""
        pl_module = sharding.unsharded(pl_module)  # whole, gathered from the ranks (collective) under FSDP2
        quantized = self._copy_without_parts(pl_module)
        for part in self.parts:
            if not part.quantized:
                continue
            if part.swapped_layers:
                int8_part = module_swap.convert_swapped(copy.deepcopy(_get(pl_module, part.name)).cpu().eval())
            else:
                int8_part = self.backend.convert(_prepared(pl_module, part.name))
            if self.backend.has_recurrent_layers(int8_part):  # no static int8 LSTM/GRU: the dynamic kind instead
                int8_part = self.backend.quantize_dynamic(int8_part, RECURRENT_LAYERS)
            if part.name in self._example_inputs:  # not after a test-only restore: nothing was observed
                args, kwargs = on_cpu(self._example_inputs[part.name])
                try:
                    with torch.no_grad():
                        int8_part(*args, **kwargs)
                except Exception as error:  # noqa: BLE001 - any failure: this part ships in float
                    part.reason = f"kept in float: its int8 version fails to run ({first_line(error, limit=120)})"
                    int8_part = self._float_part(pl_module, part.name)
            _put(quantized, part.name, int8_part)
            int8_layers, float_layers = self.backend.layers_by_kind(_prepared(quantized, part.name))
            part.int8_layers, part.float_layers = len(int8_layers), float_layers
            part.reason = part.reason or self.backend.conversion_note()
        self._show_parts()
        return quantized

    def float_model(self, pl_module: nn.Module) -> nn.Module:
        """A plain fp32 copy of ``pl_module`` with the current weights (separate Conv and BN again)."""
        pl_module = sharding.unsharded(pl_module)  # whole, gathered from the ranks (collective) under FSDP2
        float_module = self._copy_without_parts(pl_module)
        for name in self.prepared_names:
            _put(float_module, name, self._float_part(pl_module, name).cpu())
        return float_module

    def fake_quant_for_export(self, pl_module: nn.Module) -> nn.Module:
        """A copy of ``pl_module`` whose fake-quant parts are written as ONNX and OpenVINO read them (see
        the backend's ``fake_quant_for_export``): what the ``onnx`` and ``openvino`` exports hold."""
        pl_module = sharding.unsharded(pl_module)  # whole, gathered from the ranks (collective) under FSDP2
        deployable = self._copy_without_parts(pl_module)
        for part in self.parts:
            if part.quantized:
                _put(deployable, part.name, self.backend.fake_quant_for_export(_prepared(pl_module, part.name)))
        return deployable

    def report_models(self) -> dict[str, nn.Module]:
        """fp32, fake-quant and int8 models for the compression report, and each runtime export, run there."""
        if self._pl_module is None or not self.prepared_names:
            return {}
        models = {"fp32": self.float_model(self._pl_module), "fake-quant": self._pl_module}
        if self.quantized_model is not None:
            models["int8"] = self.quantized_model
            models |= runtime_models("int8", self.export_paths, count_parameters(self.quantized_model))
        return models

    # ------------------------------------------------------------------ internals

    _pl_module: nn.Module | None = None

    def _check_names(self, pl_module: L.LightningModule) -> dict[str, nn.Module]:
        """``skip`` and ``modules`` must name submodules; the module's submodules by name."""
        names = dict(pl_module.named_modules())
        for entry in self.skip_names:
            if entry not in names:
                raise ValueError(f"skip={entry!r} names no submodule; submodules are e.g. {_some(names)}.")
        for name in self.modules or []:
            if name not in names or name == "":
                raise ValueError(f"modules={name!r} names no submodule; submodules are e.g. {_some(names)}.")
        return names

    def _targets(self, pl_module: L.LightningModule) -> list[str]:
        self._pl_module = pl_module
        names = self._check_names(pl_module)
        if self.modules is not None:
            candidates = self.modules
        else:
            candidates = [name for name, _ in compressible_children(pl_module)]
            for name, child in pl_module.named_children():
                if name not in candidates and not isinstance(child, Metric) and any(True for _ in child.parameters()):
                    self.parts.append(QuantizedPart(name, False, "frozen (no trainable parameters)"))
        return [name for name in candidates if self.backend.has_quantizable_layers(names[name])]

    def _quantize_forward(self, pl_module: L.LightningModule, networks: list[str], trainer: L.Trainer) -> str | None:
        """Prepare the LightningModule's own forward over its ``networks`` as one graph, so that int8 flows from
        network to network with no dequantize/quantize at their edges; returns why not, or ``None``."""
        args, kwargs = self._example_inputs[""]
        holder = forward_holder(pl_module, networks)
        template = copy.deepcopy(holder)
        try:
            prepared = self.backend.prepare_qat(holder, args, kwargs, self.skip_names, self.skip_types)
            self.backend.check_same_output(holder, prepared, args, kwargs)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: quantize each network instead
            # FX swaps layers in place inside modules the trace kept whole (a torch.nn container)
            install_forward(pl_module, template)
            return first_line(error, limit=120)
        names = self.backend.tensor_names(holder, prepared)
        install_forward(pl_module, prepared)
        failure = runs(pl_module, training_batches(trainer, pl_module, 1))
        if failure:  # training_step calls a network directly, say, which now is only part of the graph
            install_forward(pl_module, template)
            return f"training_step fails with it ({failure})"
        self._float_templates[""], self._float_names[""] = structure_only(template), names
        self.parts.append(QuantizedPart("", True, f"one graph: forward over {', '.join(networks)}"))
        return None

    def _quantize(self, pl_module: nn.Module, name: str) -> None:
        """Prepare ``name`` as one graph; failing that, its children one by one, as long as ``name`` still
        computes the same with them; failing that, by swapping its Linear and Embedding layers."""
        module = _get(pl_module, name)
        if name in self.skip_names or isinstance(module, tuple(self.skip_types)):
            self.parts.append(QuantizedPart(name, False, "skipped by the skip setting"))
            return
        if not self.backend.has_quantizable_layers(module):
            return
        children = [child for child, _ in module.named_children()]
        if name not in self._example_inputs:
            if not children:  # a layer whose parent reads its weights (MultiheadAttention's out_proj)
                self.parts.append(QuantizedPart(name, False, "not called in forward"))
            for child in children:  # a container (ModuleList, ModuleDict): its members are called
                self._quantize(pl_module, f"{name}.{child}")
            return
        args, kwargs = self._example_inputs[name]
        prefix = f"{name}."
        skip_names = [entry[len(prefix) :] for entry in self.skip_names if entry.startswith(prefix)]
        template = copy.deepcopy(module)
        try:
            loss_inside = None if self.backend.swaps_modules else computes_its_loss(module, kwargs)
            if loss_inside:
                raise ValueError(loss_inside)
            prepared = self.backend.prepare_qat(module, args, kwargs, skip_names, self.skip_types)
            self.backend.check_same_output(module, prepared, args, kwargs)
        except Exception as error:  # noqa: BLE001 - any tracing failure means: try the children instead
            if self.backend.swaps_modules:  # no tracing to fail: the children would fail alike
                raise
            reason = first_line(error, limit=120)
            # a trace that got as far as preparing may have swapped layers in place inside torch.nn leaves
            module = copy.deepcopy(template)
            pl_module.set_submodule(name, module)
            if children:
                parts_before = len(self.parts)
                for child in children:
                    self._quantize(pl_module, f"{name}.{child}")
                try:
                    self.backend.check_same_output(template, module, args, kwargs)
                    self.parts.insert(parts_before, QuantizedPart(name, False, f"split into its children: {reason}"))
                    return
                except Exception as split_error:  # noqa: BLE001 - the parent reads its children's weights, say
                    self._undo_parts(pl_module, self.parts[parts_before:])
                    del self.parts[parts_before:]
                    pl_module.set_submodule(name, template)
                    reason = f"its children quantized alone break it ({first_line(split_error, limit=120)})"
            self._swap(pl_module, name, reason if children else f"cannot be traced ({reason})")
            return
        self._float_templates[name] = structure_only(template)
        self._float_names[name] = self.backend.tensor_names(module, prepared)
        pl_module.set_submodule(name, prepared)
        note = (
            "LSTM/GRU inside: float during QAT, dynamically quantized at conversion"
            if self.backend.has_recurrent_layers(module)
            else ""
        )
        self.parts.append(QuantizedPart(name, True, note))

    def _swap(self, pl_module: nn.Module, name: str, why: str) -> None:
        """Quantize ``name`` by module swap: its code untouched, its Linear and Embedding layers replaced by
        fake-quant versions (dynamic int8 Linear and int8 Embedding after conversion). Kept only if, with
        fake-quant off, it computes what it did, and its int8 version runs."""
        prefix = f"{name}."
        module = _get(pl_module, name)
        layers = module_swap.swappable_layers(
            module, [entry[len(prefix) :] for entry in self.skip_names if entry.startswith(prefix)], tuple(self.skip_types)
        )
        if not layers:
            self.parts.append(QuantizedPart(name, False, f"{why}; no Linear/Embedding to swap"))
            return
        args, kwargs = self._example_inputs[name]
        template = copy.deepcopy(module)
        swapped = [".".join(filter(None, (name, layer))) for layer in layers]
        module_swap.swap_in_fake_quant(pl_module, swapped, self.config)
        module = _get(pl_module, name)  # a new object where the part is itself a layer
        try:
            self.backend.check_same_output(template, module, args, kwargs)
            trial = copy.deepcopy(module).eval()
            with torch.no_grad():
                trial(*args, **kwargs)  # observers see the weights: conversion needs their scales
                module_swap.convert_swapped(trial)(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - the swapped layers break the part: it stays float
            pl_module.set_submodule(name, template)
            reason = f"{why}; swapping its layers breaks it too ({first_line(error, limit=120)})"
            self.parts.append(QuantizedPart(name, False, reason))
            return
        self.parts.append(QuantizedPart(name, True, f"module swap: {why}", swapped_layers=swapped))

    def _undo_parts(self, pl_module: nn.Module, parts: list[QuantizedPart]) -> None:
        """Put the float versions of ``parts``, prepared moments ago at setup, back in place."""
        for part in parts:
            if part.swapped_layers:
                pl_module.set_submodule(part.name, module_swap.float_swapped(_get(pl_module, part.name)))
            elif part.quantized:
                pl_module.set_submodule(part.name, self._float_part(pl_module, part.name).train(pl_module.training))
                self._float_templates.pop(part.name)
                self._float_names.pop(part.name)

    def _restore_before_weights_load(self, pl_module: L.LightningModule) -> None:
        def restore(checkpoint: dict[str, Any]) -> None:
            if self.prepared_names:  # prepared in this process already (a later test(ckpt_path=...)): nothing to rebuild
                return
            restored = _restore_parts(pl_module, checkpoint)
            if restored:
                self._pl_module = pl_module
            for name, (template, names, _) in restored.items():
                if template is not None:
                    self._float_templates[name], self._float_names[name] = structure_only(template), names
            self.parts = [
                QuantizedPart(name, True, "restored from the checkpoint", swapped_layers=swapped)
                for name, (_, _, swapped) in restored.items()
            ]

        compat.run_before_weights_load(pl_module, restore, order=compat.FAKE_QUANT_INSERTED, by=f"{self.state_key} parts")

    def _float_part(self, pl_module: nn.Module, name: str) -> nn.Module:
        if name in self._swapped_parts():
            return module_swap.float_swapped(copy.deepcopy(_get(pl_module, name))).eval()
        return self.backend.float_copy(self._float_templates[name], _prepared(pl_module, name), self._float_names[name])

    def _copy_without_parts(self, pl_module: nn.Module) -> nn.Module:
        """A CPU copy of ``pl_module`` in eval mode whose prepared parts are empty modules, for the caller to put a
        converted, float or exportable version of each in: copying a part only to replace it would hold one more
        copy of its weights at once, for a large model the memory of a whole model on every process. (The module's
        forward quantized as one graph, part ``""``, holds its networks: that copy keeps them.)"""
        memo: dict[int, Any] = {id(_get(pl_module, name)): nn.Module() for name in self.prepared_names if name}
        return copy.deepcopy(pl_module, memo).cpu().eval()

    def _swapped_parts(self) -> dict[str, list[str]]:
        return {part.name: part.swapped_layers for part in self.parts if part.quantized and part.swapped_layers}

    def _prepared_modules(self, pl_module: nn.Module) -> list[nn.Module]:
        return [_prepared(pl_module, name) for name in self.prepared_names]

    def _switch(self, pl_module: nn.Module, fake_quant: bool | None = None, observers: bool | None = None) -> None:
        """Turn the fake-quant and observers of every prepared part on or off (``None``: as they are), each by the
        mechanism that prepared it: swapped layers are the FX engine's (``module_swap``), the rest the backend's."""
        swapped = self._swapped_parts()
        for name in self.prepared_names:
            switches = module_swap if name in swapped else self.backend
            if fake_quant is not None:
                switches.set_fake_quant(_get(pl_module, name), fake_quant)
            if observers is not None:
                switches.set_observers(_get(pl_module, name), observers)

    def _calibrate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Observe activation ranges on a few batches before fake-quant starts, BN statistics untouched."""
        was_training = pl_module.training
        pl_module.eval()
        self._switch(pl_module, fake_quant=False, observers=True)
        batches = training_batches(trainer, pl_module, self.calibration_batches)
        watch_training_step(pl_module, batches, restore_buffers=False)  # BatchNorm statistics stay (eval mode)
        pl_module.train(was_training)
        self._calibrated = True
        rank_zero_info(f"QuantizationAwareTraining: calibrated observers on {len(batches)} batches.")

    @rank_zero_only
    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Path]:
        return write_int8_exports(
            self.quantized_model,
            lambda: self.fake_quant_for_export(pl_module),
            observe_network_call(trainer, pl_module),
            output_folder(trainer, self.export_dir),
            self.export_formats,
        )

    @rank_zero_only
    def _show_parts(self) -> None:
        print_quantized_parts(self.parts, self.config.backend)


def restore_quantization(pl_module: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Give a float module the fake-quant structure recorded in a QAT checkpoint, so its weights load.

    Call it from your LightningModule's ``on_load_checkpoint`` to make ``load_from_checkpoint`` work on
    QAT checkpoints (``ImageClassifier`` does). Parts that are already prepared are left alone.
    Returns the names of the fake-quant parts.
    """
    return list(_restore_parts(pl_module, checkpoint))


def _restore_parts(
    pl_module: nn.Module, checkpoint: dict[str, Any]
) -> dict[str, tuple[nn.Module | None, dict[str, str], list[str]]]:
    """``restore_quantization``, returning for each part its float template and tensor names (``None`` and
    an empty mapping for a part that was already prepared or is swapped) and its swapped layers."""
    restored: dict[str, tuple[nn.Module | None, dict[str, str], list[str]]] = {}
    for key, state in checkpoint.get("callbacks", {}).items():
        if not key.startswith("QuantizationAwareTraining"):
            continue
        backend = backend_for(config_from_state(state))
        skip_types = [resolve_module_type(entry, "skip") for entry in state["skip_types"]]
        backend.activate()
        swapped = state.get("swapped", {})
        for name in state["prepared"]:
            if name in swapped:
                unswapped = [layer for layer in swapped[name] if not module_swap.is_swapped(pl_module.get_submodule(layer))]
                module_swap.swap_in_fake_quant(pl_module, unswapped, backend.config)
                restored[name] = (None, {}, swapped[name])
                continue
            if name == "" and installed_forward(pl_module) is None:
                module = forward_holder(pl_module, state["forward_networks"])
            elif name == "" or backend.is_prepared(_get(pl_module, name)):
                restored[name] = (None, {}, [])
                continue
            else:
                module = _get(pl_module, name)
            prefix = f"{name}." if name else ""
            skip_names = [entry[len(prefix) :] for entry in state["skip_names"] if entry.startswith(prefix)]
            template = copy.deepcopy(module)
            prepared = backend.restore_qat(module, state.get("inputs", {}).get(name), skip_names, skip_types)
            restored[name] = (template, backend.tensor_names(module, prepared), [])
            _put(pl_module, name, prepared)
    return restored


# ---------------------------------------------------------------------- helpers of this module


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def _prepared(root: nn.Module, name: str) -> nn.Module:
    """The prepared part ``name``; ``""`` is the module's forward quantized as one graph."""
    return installed_forward(root) if name == "" else root.get_submodule(name)


def _put(root: nn.Module, name: str, part: nn.Module) -> None:
    """Put a version of part ``name`` (prepared, float or int8) into ``root``."""
    if name == "":
        install_forward(root, part)
    else:
        root.set_submodule(name, part)


def _some(names: dict[str, nn.Module]) -> list[str]:
    return [name for name in names if name][:8]
