"""``MagnitudePruning``: gradual magnitude pruning on a schedule, as a Lightning callback.

Masks live in the callback, not in the model: the model's weights are plain tensors whose pruned entries
are exactly zero, so its ``state_dict`` never gains ``_orig``/``_mask`` keys, checkpoints load into an
unmodified module, and other callbacks (QAT) see ordinary layers. The masks and the schedule position are
the callback's ``state_dict``, so a resumed run continues where it stopped. After every optimizer step
the masks are applied again, so neither momentum nor weight decay can revive a pruned weight.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_deprecation, rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn
from torch.distributed.fsdp import FSDPModule
from typing_extensions import override

from lightning_compress import channel_groups, compat, optimizers, sharding
from lightning_compress.export import check_export_format, output_folder, write_exports
from lightning_compress.inputs import (
    call_record,
    first_calls,
    first_line,
    on_cpu,
    on_device,
    replayed_call,
    runs,
    same_outputs,
    training_batches,
)
from lightning_compress.network_call import observe_network_call
from lightning_compress.quantization_backend import HoldsFakeQuant
from lightning_compress.report import ReportsModels, count_parameters, plot_pruning
from lightning_compress.runtimes import runtime_models
from lightning_compress.schedules import SCHEDULES, SparsitySchedule
from lightning_compress.selection import (
    check_submodule_names,
    compressible_children,
    resolve_module_type,
    split_skip,
    type_path,
    within,
)
from lightning_compress.validation import check_integer

MODES = ("unstructured", "channels")
SCOPES = ("global", "layer")


class MagnitudePruning(Callback, ReportsModels):
    r"""Prune the smallest weights (or output channels) to a target sparsity that ramps up over training.

    .. code-block:: python

        from lightning_compress import MagnitudePruning

        pruning = MagnitudePruning(final_sparsity=0.8, start_epoch=1, end_epoch=6)
        trainer = Trainer(max_epochs=8, callbacks=[pruning])
        trainer.fit(model, datamodule=datamodule)
        pruning.pruned_model  # with mode="channels": pruned channels physically removed

    Args:
        final_sparsity: fraction of weights (or channels) pruned at ``end_epoch`` and after, in [0, 1).
        initial_sparsity: fraction pruned at ``start_epoch``, in [0, ``final_sparsity``].
        start_epoch: epoch at whose start pruning begins.
        end_epoch: epoch at whose start ``final_sparsity`` is reached (after ``start_epoch``). Beyond the
            Trainer's ``max_epochs`` it is a warning: the fit stops part-way up the ramp, and a run resumed
            from its checkpoint with a larger ``max_epochs`` continues it.
        schedule: ``cubic`` (Zhu and Gupta), ``linear`` or ``constant``.
        update_every: optimizer steps between mask updates; ``None`` updates once per epoch.
        mode: ``unstructured`` (single weights) or ``channels`` (whole output channels, ranked by norm,
            kept consistent with every layer that shares them: see ``lightning_compress.channel_groups``).
        scope: ``global`` ranks weights across all pruned layers, ``layer`` prunes each layer alike
            (``channels`` always ranks within each coupled channel group).
        layer_types: layer classes (or their import paths) to prune.
        modules: names of submodules whose layers are pruned (e.g. ``["net.features"]``) instead of all the
            module's networks; as in ``QuantizationAwareTraining``.
        skip: submodule names (``"net.classifier"``: that layer, or every layer inside that submodule) or
            layer types (``torch.nn.Linear`` or ``"torch.nn.Linear"``) left dense, as in
            ``QuantizationAwareTraining``; the first and last layers are common choices. Deprecated: a name
            that is no submodule is read as a regular expression searched in layer names (with a warning).
        names: deprecated, use ``modules``: regular expressions; only layers whose name matches one are pruned.
        channel_norm: 1 or 2, the norm that ranks channels.
        export_format: one format or a list, written at fit end: ``torchscript`` (``model_pruned.pt``),
            ``onnx`` (``model_pruned.onnx``), ``openvino`` (``model_pruned_openvino.xml``/``.bin``), all in
            float; ``none`` writes nothing.
        export_dir: where to write it (default: the checkpoint folder, else the log folder).
        plot: write ``pruning.png`` (schedule and per-layer sparsity) at fit end, and log it to W&B.
        shrink_epoch: ``mode="channels"`` only: at the start of this epoch (at or after ``end_epoch``, when the
            masks have reached ``final_sparsity``) the pruned channels are physically removed from the live
            network and training goes on with the smaller, faster network; the optimizer keeps its state for
            the kept channels and the learning-rate schedulers their position. Checkpoints written after it
            hold the smaller network and resume into it. ``None`` (default): the live network keeps its
            masks; the channels are removed from the copy made at fit end (``pruned_model``).
    """

    def __init__(
        self,
        final_sparsity: float = 0.8,
        initial_sparsity: float = 0.0,
        start_epoch: int = 0,
        end_epoch: int = 5,
        schedule: str = "cubic",
        update_every: int | None = 10,
        mode: str = "unstructured",
        scope: str = "global",
        layer_types: Sequence[type | str] = (nn.Conv2d, nn.Linear),
        names: Sequence[str] | None = None,
        skip: Sequence[str | type] = (),
        channel_norm: int = 2,
        export_format: str | Sequence[str] = "torchscript",
        export_dir: str | None = None,
        plot: bool = True,
        modules: Sequence[str] | None = None,
        shrink_epoch: int | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is unknown: allowed values are {list(MODES)}.")
        if scope not in SCOPES:
            raise ValueError(f"scope={scope!r} is unknown: allowed values are {list(SCOPES)}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r} is unknown: allowed values are {list(SCHEDULES)}.")
        check_integer("start_epoch", start_epoch, minimum=0)
        check_integer("end_epoch", end_epoch)
        if end_epoch <= start_epoch:
            raise ValueError(f"end_epoch={end_epoch!r} is invalid: it must be an integer after start_epoch={start_epoch}.")
        check_integer("channel_norm", channel_norm, minimum=1, maximum=2)
        check_integer("shrink_epoch", shrink_epoch, minimum=0, none="channels removed from a copy at fit end")
        if shrink_epoch is not None and mode != "channels":
            raise ValueError(f"shrink_epoch={shrink_epoch} removes channels: it needs mode='channels', not mode={mode!r}.")
        if shrink_epoch is not None and shrink_epoch < end_epoch:
            raise ValueError(
                f"shrink_epoch={shrink_epoch} is before end_epoch={end_epoch}: channels can be removed only once the "
                "masks have reached final_sparsity, at or after end_epoch."
            )
        self.shrink_epoch = shrink_epoch
        self.export_formats = check_export_format(export_format)
        check_integer("update_every", update_every, minimum=1, none="per epoch")
        # Checks the sparsities now, before any training; the steps are set in on_train_start.
        SparsitySchedule(schedule, initial_sparsity, final_sparsity, 0, 1, update_every or 1)
        self.final_sparsity = final_sparsity
        self.initial_sparsity = initial_sparsity
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.schedule_kind = schedule
        self.update_every = update_every
        self.mode = mode
        self.scope = scope
        self.layer_types = tuple(resolve_module_type(entry, "layer_types") for entry in layer_types)
        self.modules = list(modules) if modules is not None else None
        if names is not None:
            rank_zero_deprecation(
                "MagnitudePruning(names=...) is deprecated: give modules=[submodule names], the setting's name in "
                "every compression callback."
            )
        self.names = [re.compile(pattern) for pattern in names] if names else None
        self.skip = list(skip)
        self.skip_names, self.skip_types = split_skip(skip)
        self._skip_patterns: list[re.Pattern] = []  # skip names that name no submodule (deprecated meaning)
        self.channel_norm = channel_norm
        self.export_format = export_format
        self.export_dir = export_dir
        self.plot = plot

        self.schedule: SparsitySchedule | None = None
        self.masks: dict[str, torch.Tensor] = {}
        self._laid_out_masks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (mask, as the parameter is)
        self.history: list[dict[str, float]] = []
        self.pruned_model: nn.Module | None = None
        self.channels_removed = False  # whether pruned_model is physically smaller (mode="channels", removal kept)
        self.dense_model: nn.Module | None = None
        self._dense_slices: sharding.ShardedCopy | None = None  # under FSDP2 the dense baseline until fit end
        self.export_path: Path | None = None  # the TorchScript file
        self.export_paths: dict[str, Path] = {}  # every file written, by format
        self.plot_path: Path | None = None
        self._last_update_step = -1
        self._dense_state_dict: dict[str, torch.Tensor] | None = None
        self._targets: list[str] = []  # the pruned weights' names (unstructured modes)
        self._groups: dict[str, list[channel_groups.ChannelGroup]] = {}
        self._batches: list = []
        self._calls: dict = {}
        # after shrink_epoch: root network -> (group root layer, dropped output channels), and the inputs that
        # rebuild the smaller structure in a fresh process (both kept in checkpoints)
        self._dropped: dict[str, list[tuple[str, list[int]]]] = {}
        self._dropped_inputs: dict[str, dict] = {}
        self._sparsity_at_shrink: dict[str, Any] = {}  # measured_sparsity just before the shrink
        self._unshrunk_copy: nn.Module | None = None  # the module as built, before a resume shrank it
        self._float_from: HoldsFakeQuant | None = None  # the callback whose float copy pruned_model is
        self._fake_quant: HoldsFakeQuant | None = None  # QAT in the same fit: it may hold the weights under other names

    @property
    def shrunk(self) -> bool:
        """Whether the live network has had its pruned channels removed (``shrink_epoch``)."""
        return bool(self._dropped)

    # ------------------------------------------------------------------ Lightning hooks

    @property
    @override
    def state_key(self) -> str:
        # Two MagnitudePruning callbacks (say, one by channel, one unstructured on other layers) keep apart.
        return self._generate_state_key(
            mode=self.mode,
            layer_types=[type_path(t) for t in self.layer_types],
            names=self._patterns(self.names),
            skip=[entry if isinstance(entry, str) else type_path(entry) for entry in self.skip],
            **({"modules": self.modules} if self.modules is not None else {}),
        )

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.shrink_epoch is not None:
            self._restore_shrink_before_weights_load(pl_module)
            if sharding.under_fsdp2(trainer):
                # a distributed checkpoint written after the shrink loads into the smaller network: the networks
                # configure_model sharded are gathered whole, shrunk as recorded, sharded again, and given new
                # optimizers, all before the shards (weights and optimizer state) load
                compat.run_before_distributed_weights_load(
                    trainer,
                    pl_module,
                    lambda: sharding.gather_sharded_children(pl_module),
                    lambda: self._shard_again(trainer, pl_module, optimizers_too=stage == "fit"),
                    by=self.state_key,
                )
        if stage != "fit":
            return
        sharding.check_strategy(trainer, "MagnitudePruning")
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            return
        # Not an error: a run trained for fewer epochs now may be resumed with a larger max_epochs later.
        if self.start_epoch >= trainer.max_epochs:
            rank_zero_warn(
                f"MagnitudePruning: start_epoch={self.start_epoch} is at or beyond max_epochs ({trainer.max_epochs}): "
                "no pruning happens in this fit (it may in a resumed, longer one)."
            )
        elif self.end_epoch > trainer.max_epochs:
            rank_zero_warn(
                f"MagnitudePruning: end_epoch={self.end_epoch} is beyond max_epochs ({trainer.max_epochs}): this fit "
                "ends part-way up the ramp, below final_sparsity (a resumed, longer one continues it)."
            )

    def shrink_at(self, epoch: int, pl_module: L.LightningModule) -> None:
        """Remove the channels from the live network at the start of ``epoch``, as ``shrink_epoch=epoch`` would: what
        a callback that needs the smaller network asks for when ``shrink_epoch`` was left unset (QAT, at its
        ``start_epoch``). Called in ``setup``."""
        if epoch < self.end_epoch:
            raise ValueError(
                f"MagnitudePruning(mode='channels') would have to remove its channels at epoch {epoch}, before its "
                f"end_epoch={self.end_epoch}: end the ramp by then, or set shrink_epoch."
            )
        self.shrink_epoch = epoch
        self._restore_shrink_before_weights_load(pl_module)

    def _restore_shrink_before_weights_load(self, pl_module: L.LightningModule) -> None:
        """A checkpoint written after the shrink holds the smaller network: rebuild it before its weights load."""
        compat.run_before_weights_load(
            pl_module,
            lambda checkpoint: self._restore_shrink(pl_module, checkpoint),
            order=compat.CHANNELS_REMOVED,
            by=f"{self.state_key} shrink",
        )

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resolve what to prune (after other callbacks such as QAT have set the model up)."""
        # How the networks are called, seen in a real training step: for the channel analysis, the check of
        # the shrunken model and the export.
        self._batches = training_batches(trainer, pl_module, 1)
        self._fake_quant = next((callback for callback in trainer.callbacks if isinstance(callback, HoldsFakeQuant)), None)
        roots = [name for name, _ in compressible_children(pl_module)]
        self._calls = first_calls(pl_module, self._batches, roots)
        if self.mode == "channels" and trainer.world_size > 1:
            # the groups, and the check of the shrunken network, follow rank 0's batch: the same on every rank (sent
            # from the CPU: a tensor unpickled on another rank would land on rank 0's GPU)
            shared = trainer.strategy.broadcast(on_cpu((self._batches, self._calls)))
            self._batches, self._calls = on_device(shared, pl_module.device)
        self._resolve_names(pl_module)
        if self.shrink_epoch is not None and self.mode == "channels" and isinstance(pl_module, FSDPModule):
            raise ValueError(
                f"MagnitudePruning(mode='channels', shrink_epoch={self.shrink_epoch}): {type(pl_module).__name__}'s "
                "configure_model shards the LightningModule itself, which then holds the parameters the shrink "
                "replaces: shard its networks instead (fully_shard(self.net)), which configure_model shards again "
                "once smaller."
            )
        if self.mode == "channels" and not self.shrunk:  # resumed after the shrink: nothing to mask any more
            self._find_groups(trainer, pl_module)
            if self.shrink_epoch is not None:
                self._check_the_module_runs_shrunk(pl_module)
        elif self.mode != "channels":  # chosen by layer kind: where QAT exported them, the float model has the kinds
            hidden = self._fake_quant is not None and self._fake_quant.hides_layers
            self._targets = list(self._select_layers(self._fake_quant.float_model(pl_module) if hidden else pl_module))
        self._apply_masks(pl_module)  # masks restored from a checkpoint take effect at once

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_dense_model(pl_module)
        steps_per_epoch = max(trainer.num_training_batches // trainer.accumulate_grad_batches, 1)
        start_step = self.start_epoch * steps_per_epoch
        end_step = self.end_epoch * steps_per_epoch
        if self.end_epoch == trainer.max_epochs:  # reach final_sparsity at the last step that runs, not one that never does
            end_step -= 1
        # Beyond max_epochs the ramp keeps its slope: this fit stops part-way, a longer resumed one goes on.
        end_step = max(end_step, start_step + 1)
        self.schedule = SparsitySchedule(
            self.schedule_kind,
            self.initial_sparsity,
            self.final_sparsity,
            start_step,
            end_step,
            self.update_every or steps_per_epoch,
        )

    def _restore_dense_model(self, pl_module: L.LightningModule) -> None:
        """The report's dense baseline from the checkpoint of a run resumed after pruning began. At train start:
        a strategy that shards (FSDP2) restores the callbacks' state only after ``on_fit_start``."""
        if self._dense_state_dict is None or self.dense_model is not None:
            self._unshrunk_copy = None
            return
        # after the shrink, the dense model has the structure the module had before it was rebuilt smaller
        self._keep_dense(pl_module, self._unshrunk_copy if self.shrunk else pl_module, self._dense_state_dict)
        self._dense_state_dict = None
        self._unshrunk_copy = None

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.shrink_if_due(trainer, pl_module)

    def shrink_if_due(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        """Remove the pruned channels from the live network now if ``shrink_epoch`` has come and they are still
        there; whether it did. Called at the start of every epoch, and by ``QuantizationAwareTraining`` before it
        prepares the network, whichever of the two runs first in the Trainer's callbacks."""
        if self.shrink_epoch is None or trainer.current_epoch < self.shrink_epoch or self.shrunk:
            return False
        self._shrink(trainer, pl_module)
        return True

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.shrunk or self.schedule is None or step == self._last_update_step or not self.schedule.is_update_step(step):
            return
        self._prune_to(trainer, pl_module, step)

    def _prune_to(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Update the masks to the schedule's target at ``step``, apply them, record and log the result."""
        if self.dense_model is None and self._dense_slices is None and not self.masks:
            self._keep_dense(pl_module, pl_module)
        target = self.schedule.target(step)
        self._update_masks(pl_module, target)
        self._apply_masks(pl_module)
        self._last_update_step = step
        measured, per_layer = self.measured_sparsity(pl_module)
        self.history.append({"step": step, "target": target, "measured": measured})
        metrics = {
            "pruning/target_sparsity": target,
            "pruning/sparsity": measured,
            **{f"pruning/sparsity/{name}": value for name, value in per_layer.items()},
        }
        # Straight to the loggers: self.log would only keep the updates that fall on log_every_n_steps.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    @override
    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._apply_masks(pl_module)  # after the optimizer step: pruned weights stay exactly zero
        sharding.synchronize_buffers(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._dense_slices is not None:  # every rank
            self.dense_model = self._dense_slices.whole().cpu().eval()
            self._dense_slices = None
        self._apply_masks(pl_module)
        self.pruned_model = self._float_copy(trainer, pl_module)  # shipped and measured on the CPU
        if self.mode == "channels" and not self.shrunk:
            for root, groups in self._groups.items():
                network = self.pruned_model.get_submodule(root)
                channel_groups.unmask_layer_norms(network)  # removal makes them normalize over the kept channels
                keeps = [channel_groups.channels_kept_now(network, group) for group in groups]
                args, kwargs = on_cpu(self._calls[root])
                try:
                    self._warn_of_configs(channel_groups.remove_channels(network, groups, keeps, *args, **kwargs))
                except Exception as error:  # noqa: BLE001 - reported below as a model that does not run
                    rank_zero_warn(
                        f"MagnitudePruning: removing the channels of {root!r} failed ({first_line(error, limit=None)})."
                    )
            failure = self._shrunken_differs(pl_module)
            if failure:
                rank_zero_warn(f"MagnitudePruning: the masked model is kept, channels not removed: {failure}.")
                self.pruned_model = self._float_copy(trainer, pl_module)
            self.channels_removed = not failure
        elif self.mode == "channels":  # removed from the live network at shrink_epoch
            self.channels_removed = True
        if self.export_formats:
            self.export_paths = self._export(trainer, pl_module) or {}
            self.export_path = self.export_paths.get("torchscript")
        if self.plot:
            _, per_layer = self.measured_sparsity(pl_module)  # every rank: under FSDP2 it gathers the weights
            self.plot_path = self._plot(trainer, per_layer)
        sharding.free_dropped_copies(pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {name: mask.cpu() for name, mask in self.masks.items()},
            "last_update_step": self._last_update_step,
            "history": self.history,
            **{key: getattr(self, attribute) for key, attribute in _SAVED_SETTINGS.items()},
            # The report's dense row: without it a run resumed after pruning began would report one row less.
            "dense_state_dict": self._dense_state(),
            "dropped_channels": {
                root: [[layer, list(channels)] for layer, channels in dropped] for root, dropped in self._dropped.items()
            },
            "dropped_inputs": self._dropped_inputs,
            "sparsity_at_shrink": self._sparsity_at_shrink,
        }

    def _dense_state(self) -> dict[str, torch.Tensor] | None:
        if self._dense_slices is not None:  # every rank writes a checkpoint's state: each gathers it
            return _cpu_state_dict(self._dense_slices.whole())
        return None if self.dense_model is None else _cpu_state_dict(self.dense_model)

    @override
    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before MagnitudePruning had a state_key saved its state under the class name.
        states = checkpoint.get("callbacks", {})
        if self.state_key not in states and "MagnitudePruning" in states:
            states[self.state_key] = states.pop("MagnitudePruning")

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["mode"] != self.mode:
            raise ValueError(f"the checkpoint was pruned with mode={state_dict['mode']!r}, not mode={self.mode!r}.")
        changed = [
            f"{key}={state_dict[key]!r} (now {getattr(self, attribute)!r})"
            for key, attribute in _SAVED_SETTINGS.items()
            if key in state_dict and state_dict[key] != getattr(self, attribute)
        ]
        if changed:
            rank_zero_warn(
                f"MagnitudePruning: the checkpoint was pruned with other settings: {', '.join(changed)}; "
                "the resumed run follows the new ones."
            )
        self.masks = dict(state_dict["masks"])
        self._last_update_step = state_dict["last_update_step"]
        self.history = list(state_dict["history"])
        self._dense_state_dict = state_dict.get("dense_state_dict")
        self._sparsity_at_shrink = dict(state_dict.get("sparsity_at_shrink", {}))

    # ------------------------------------------------------------------ results

    def measured_sparsity(self, pl_module: nn.Module) -> tuple[float, dict[str, float]]:
        """Exact fraction of zeros over the pruned weight tensors, overall and per layer; after the shrink,
        the fraction of output channels removed from each layer (its weights hold no zeros any more)."""
        if self.shrunk:
            return self._sparsity_at_shrink.get("overall", 0.0), dict(self._sparsity_at_shrink.get("per_layer", {}))
        parameters = self._parameters(pl_module)
        zeros = total = 0
        per_layer = {}
        for name in self._weight_names():
            weight = sharding.full_tensor(parameters[name].detach())
            layer_zeros = weight.numel() - int(torch.count_nonzero(weight))
            per_layer[name.removesuffix(".weight")] = layer_zeros / weight.numel()
            zeros += layer_zeros
            total += weight.numel()
        return (zeros / total if total else 0.0), per_layer

    def report_models(self) -> dict[str, nn.Module]:
        """The dense model from when pruning began and, for channel pruning, the physically smaller one."""
        models: dict[str, nn.Module] = {}
        if self.dense_model is not None:
            models["dense"] = self.dense_model
        # shrunk before QAT, the float copy is the report's fp32 row already (QAT's): no second row of it; a masked model
        # whose channels could not be removed is the trained module itself, the fp32 row, and is never called removed
        if self.channels_removed and self.pruned_model is not None and not (self.shrunk and self._float_from):
            models["channels removed"] = self.pruned_model
        if self.pruned_model is not None:
            name = "channels removed" if self.channels_removed else "pruned"
            models |= runtime_models(name, self.export_paths, count_parameters(self.pruned_model))
        return models

    # ------------------------------------------------------------------ internals

    def _weight_names(self) -> list[str]:
        if self.mode == "unstructured":
            return list(self._targets)
        return [
            f"{root}.{name}.weight" if root else f"{name}.weight"
            for root, groups in self._groups.items()
            for group in groups
            for name in group.producers
        ]

    def _resolve_names(self, pl_module: nn.Module) -> None:
        """Check ``modules`` and ``skip`` against the module; a skip name that is no submodule but matches
        layer names as a regular expression keeps its old meaning, with a deprecation warning."""
        check_submodule_names(pl_module, "modules", self.modules or [])
        names = {name for name, _ in pl_module.named_modules() if name}
        self._skip_patterns = []
        for entry in self.skip_names:
            if entry in names:
                continue
            try:
                pattern = re.compile(entry)
            except re.error:
                pattern = None
            if pattern is None or not any(pattern.search(name) for name in names):
                raise ValueError(f"skip={entry!r} names no submodule; submodules are e.g. {sorted(names)[:6]}.")
            rank_zero_deprecation(
                f"MagnitudePruning(skip={entry!r}): skip names submodules now, as in every compression callback; "
                "reading it as a regular expression is deprecated: list the submodule names instead."
            )
            self._skip_patterns.append(pattern)

    def _selected(self, name: str, module: nn.Module) -> bool:
        return (
            isinstance(module, self.layer_types)
            and (self.modules is None or any(within(name, entry) for entry in self.modules))
            and (self.names is None or any(pattern.search(name) for pattern in self.names))
            and not any(within(name, entry) for entry in self.skip_names)
            and not any(pattern.search(name) for pattern in self._skip_patterns)
            and not isinstance(module, tuple(self.skip_types))
        )

    def _chosen_explicitly(self) -> bool:
        return self.modules is not None or self.names is not None

    def _select_layers(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        targets = {}
        for root, child in compressible_children(pl_module):
            for name, module in child.named_modules():
                full_name = f"{root}.{name}" if name else root
                weight = getattr(module, "weight", None)
                if isinstance(weight, nn.Parameter) and weight.requires_grad and self._selected(full_name, module):
                    targets[f"{full_name}.weight"] = weight
        if not targets:
            raise ValueError(
                "MagnitudePruning selects no layer: layer_types="
                f"{[t.__name__ for t in self.layer_types]}, modules={self.modules}, names={self._patterns(self.names)}, "
                f"skip={self.skip} match nothing with trainable weights."
            )
        return targets

    def _find_groups(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        roots = [name for name, _ in compressible_children(pl_module)]
        selected_layers = set()
        why_not: dict[str, str] = {}  # layer -> why its channels stay
        for root in roots:
            network = pl_module.get_submodule(root)
            for name, module in network.named_modules():
                if name and self._selected(f"{root}.{name}", module):
                    selected_layers.add(f"{root}.{name}")
            if root not in self._calls:
                raise ValueError(f"mode='channels' cannot prune {root!r}: training_step never calls it.")
            args, kwargs = self._calls[root]
            try:  # on whole weights: under FSDP2, a plain copy gathered from the ranks
                groups = channel_groups.find_channel_groups(sharding.unsharded(network), *args, **kwargs)
            except Exception as error:  # noqa: BLE001 - a network whose couplings are unknown cannot be shrunk safely
                raise ValueError(
                    f"mode='channels' cannot prune {root!r}: its channel dependencies cannot be found "
                    f"({str(error).splitlines()[0]})."
                ) from error
            self._groups[root] = [
                group
                for group in groups
                if group.prunable and all(f"{root}.{name}" in selected_layers for name in group.producers)
            ]
            for group in groups:
                left_out = [f"{root}.{name}" for name in group.producers if f"{root}.{name}" not in selected_layers]
                reason = group.blocked_by or ("it has a single output channel" if group.size < 2 else "")
                if not reason and left_out:
                    reason = f"its channels go with those of {left_out[0]!r}, which modules/skip/layer_types leave out"
                why_not.update({f"{root}.{name}": reason for name in group.producers if reason})
        prunable = {f"{root}.{name}" for root, groups in self._groups.items() for g in groups for name in g.producers}
        unshrinkable = sorted(name for name in selected_layers - prunable if self._chosen_explicitly() and name in why_not)
        if unshrinkable:
            raise ValueError(f"mode='channels' cannot shrink {unshrinkable[0]!r}: {why_not[unshrinkable[0]]}.")
        if self._chosen_explicitly() and not prunable:
            chosen = f"modules={self.modules}" if self.modules is not None else f"names={self._patterns(self.names)}"
            raise ValueError(f"{chosen} selects no layer that mode='channels' can shrink.")
        if not prunable:
            raise ValueError("mode='channels' found no channel group it can shrink in this model.")
        for root, groups in self._groups.items():
            channel_groups.mask_layer_norms(pl_module.get_submodule(root), groups)
        left_alone = sorted({f"{name} ({reason})" for name, reason in why_not.items() if reason})
        if left_alone:
            rank_zero_info(
                f"MagnitudePruning: {len(left_alone)} layers keep all their output channels: {'; '.join(left_alone[:4])}"
                + (f"; and {len(left_alone) - 4} more." if len(left_alone) > 4 else ".")
            )

    def _check_the_module_runs_shrunk(self, pl_module: L.LightningModule) -> None:
        """Before training: a copy with one channel per group removed must still run a training step (a
        distillation hint adapter reading a shrinking layer, say, would fail only at shrink_epoch)."""
        trial = sharding.full_copy(pl_module)  # whole, gathered from the ranks (collective) under FSDP2
        for root, groups in self._groups.items():
            keeps = [channel_groups.kept_channels(group, torch.zeros(group.size), group.blocks) for group in groups]
            network = trial.get_submodule(root)
            channel_groups.unmask_layer_norms(network)
            channel_groups.remove_channels(network, groups, keeps, *self._calls[root][0], **self._calls[root][1])
        failure = runs(trial, self._batches)
        if failure:
            raise ValueError(
                f"shrink_epoch={self.shrink_epoch}: the module's training step fails once channels are removed "
                f"({failure}); leave shrink_epoch=None to remove them from a copy at fit end."
            )

    def _shrink(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Remove the pruned channels from the live network, check it computes what the masked one did, and
        rebuild the optimizers (their state cut to the kept channels) and schedulers (their position kept)."""
        step = trainer.global_step  # the update due at this step would come with its first batch: too late
        if self.schedule is not None and (not self.history or self.history[-1]["target"] != self.schedule.target(step)):
            self._prune_to(trainer, pl_module, step)
        self._apply_masks(pl_module)
        self._sparsity_at_shrink = dict(zip(("overall", "per_layer"), self.measured_sparsity(pl_module), strict=True))
        sharded = sharding.is_sharded(pl_module)
        if sharded:
            # a forward outside training (a resumed fit's observed step) leaves FSDP2's whole parameters registered;
            # the optimizers hold the shards, by which their state is found
            sharding.reshard(pl_module)
        # whole (gathered from the ranks under FSDP2, in the same order on each): cut as the weights are cut
        states = optimizers.whole_states(optimizers.optimizer_states(trainer, pl_module))
        shrunken: dict[str, nn.Module] = {}
        for root, groups in self._groups.items():
            network = sharding.unsharded(pl_module.get_submodule(root))  # whole: every rank removes the same channels
            dropped = channel_groups.dropped_channels(
                groups, [channel_groups.channels_kept_now(network, group) for group in groups]
            )
            args, kwargs = self._calls[root]
            smaller = copy.deepcopy(network)
            channel_groups.unmask_layer_norms(smaller)  # removal makes them normalize over the kept channels
            self._warn_of_configs(channel_groups.remove_dropped_channels(smaller, dropped, *args, **kwargs))
            if not _computes_the_same(network, smaller, args, kwargs):
                raise RuntimeError(
                    f"MagnitudePruning: {root!r} computes something else after its channels are removed at "
                    f"shrink_epoch={self.shrink_epoch}; leave shrink_epoch=None to keep the masks until fit end."
                )
            _cut_optimizer_states(states, root, network, dropped, args, kwargs)
            shrunken[root], self._dropped[root] = smaller, dropped
            self._dropped_inputs[root] = call_record(*on_cpu((args, kwargs)))
        for root, smaller in shrunken.items():
            pl_module.set_submodule(root, smaller)
        self.masks = {}
        if sharded:
            self._shard_again(trainer, pl_module, optimizers_too=False)
        compat.rewrap_distributed(trainer)  # every process shrank alike (same weights, same masks): sync the new ones
        optimizers.rebuild_optimizers(trainer, pl_module, states, changed_by="MagnitudePruning's shrink")
        removed = sum(len(channels) for dropped in self._dropped.values() for _, channels in dropped)
        rank_zero_info(
            f"MagnitudePruning: removed {removed} channels at epoch {trainer.current_epoch}; training goes on with "
            f"{count_parameters(pl_module)[0]:,} parameters."
        )

    def _shard_again(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizers_too: bool) -> None:
        """Under FSDP2: the user's ``configure_model`` shards the smaller networks as it sharded the larger ones
        (it shards what is not yet sharded, as Lightning's later stages need too); with ``optimizers_too``, the
        module's optimizers are built again over the new shards (a resume, before their state loads)."""
        sharding.shard_again(pl_module, list(self._dropped), "MagnitudePruning", "once its channels were removed")
        if optimizers_too:
            trainer.strategy.setup_optimizers(trainer)

    def _restore_shrink(self, pl_module: nn.Module, checkpoint: dict[str, Any]) -> None:
        """Shrink a fresh network as the checkpoint's was, so that its weights load."""
        if self.shrunk:  # shrunk in this process already (a later test(ckpt_path=...)): nothing to rebuild
            return
        states = checkpoint.get("callbacks", {})
        key = self.state_key if self.state_key in states else "MagnitudePruning"
        state = states.get(key, {})
        if state.get("dropped_channels"):
            if state.get("dense_state_dict") is not None:  # the report's dense row needs the original structure
                self._unshrunk_copy = copy.deepcopy(pl_module).cpu()
            # a distributed checkpoint's metadata holds no weights: the network is the full one just gathered
            _shrink_as_recorded(pl_module, state, checkpoint.get("state_dict"))
            self._dropped = {
                root: [(layer, list(channels)) for layer, channels in entries]
                for root, entries in state["dropped_channels"].items()
            }
            self._dropped_inputs = dict(state["dropped_inputs"])
            self.masks = {}

    def _float_copy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> nn.Module:
        """A CPU copy of the module to ship; where QAT has put fake-quant into the network (after the shrink, or
        around unstructured masks), the float copy QAT makes of it, so that ``model_pruned`` is a float model."""
        self._float_from = next(
            (callback for callback in trainer.callbacks if isinstance(callback, HoldsFakeQuant) and callback.prepared_names),
            None,
        )
        if self._float_from is not None:
            return self._float_from.float_model(pl_module)
        return sharding.full_copy(pl_module).cpu().eval()

    @staticmethod
    def _warn_of_configs(problems: list[str]) -> None:
        """Say where the shipped model's own config cannot describe it after the removal (see ``model_configs``)."""
        if problems:
            rank_zero_warn(
                f"MagnitudePruning: {problems[0]}: its save_pretrained output would not load with from_pretrained; "
                "save it with torch.save or ship an export."
            )

    def _update_masks(self, pl_module: nn.Module, target: float) -> None:
        if self.mode == "channels":
            masks: dict[str, torch.Tensor] = {}  # a layer reading one group's channels and writing another's has two
            for root, groups in self._groups.items():
                network = sharding.unsharded(pl_module.get_submodule(root))  # whole weights: the same masks on every rank
                for group in groups:
                    importance = channel_groups.channel_importance(network, group, self.channel_norm)
                    keep = channel_groups.kept_channels(group, importance, round(target * group.size))
                    for name, mask in channel_groups.channel_masks(network, group, keep).items():
                        full_name = f"{root}.{name}" if root else name
                        masks[full_name] = masks[full_name] & mask if full_name in masks else mask
            self.masks.update(masks)
            return
        # whole weights, the same on every rank (gathered under FSDP2, one layer at a time): the ranks compute the
        # same masks. One float copy of the magnitudes at most: the weights' size, where ranking them used to take
        # seven times it (an MLP of 33.7M parameters peaked 0.95 GB above its training here).
        parameters = self._parameters(pl_module)
        if self.scope == "layer":
            for name in self._targets:
                magnitude = sharding.full_tensor(parameters[name].detach()).abs()
                self.masks[name] = _keep_largest(magnitude.flatten(), round(target * magnitude.numel())).view_as(magnitude)
            return
        shapes = {name: parameters[name].shape for name in self._targets}
        sizes = [shape.numel() for shape in shapes.values()]
        flat = torch.empty(sum(sizes), dtype=torch.float32, device=parameters[self._targets[0]].device)
        for name, chunk in zip(shapes, flat.split(sizes), strict=True):
            chunk.copy_(sharding.full_tensor(parameters[name].detach()).flatten()).abs_()
        keep = _keep_largest(flat, round(target * flat.numel()))
        del flat
        for name, chunk in zip(shapes, keep.split(sizes), strict=True):
            self.masks[name] = chunk.view(shapes[name])

    def _parameters(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        """The module's parameters by their names in the float model, which masks and targets use: QAT's exported
        parts (``x86_inductor``) hold them under other names. Looked up at each use, never kept: FSDP2 swaps the
        registered parameters between its shards and whole ones whose storage it frees."""
        live = dict(pl_module.named_parameters())
        if self._fake_quant is None:
            return live
        return {name: live[self._fake_quant.parameter_name(name)] for name in {*self.masks, *self._weight_names()}}

    def _keep_dense(self, pl_module: nn.Module, structure: nn.Module, state: dict[str, torch.Tensor] | None = None) -> None:
        """The report's dense baseline: ``structure`` (with ``state``'s values, from a checkpoint, where given) as a
        whole CPU copy; under FSDP2 as each rank's slices, gathered whole at fit end."""
        if sharding.is_sharded(pl_module):
            self._dense_slices = sharding.ShardedCopy(structure, state, sharding.mesh_of(pl_module))
            channel_groups.unmask_layer_norms(self._dense_slices.structure)
            return
        self.dense_model = sharding.full_copy(structure).cpu().eval()
        channel_groups.unmask_layer_norms(self.dense_model)
        if state is not None:
            self.dense_model.load_state_dict(state)

    def _apply_masks(self, pl_module: nn.Module) -> None:
        if not self.masks:
            return
        if self.mode == "channels":
            channel_groups.update_layer_norm_masks(pl_module, self.masks)
        parameters = self._parameters(pl_module)
        with torch.no_grad():
            for name, mask in self.masks.items():
                parameter = parameters[name]
                laid_out = self._laid_out_masks.get(name)
                if laid_out is None or laid_out[0] is not mask or type(laid_out[1]) is not type(parameter.data):
                    # this rank's slice of it under FSDP2 (the parameter is whole between forward and backward)
                    self._laid_out_masks[name] = laid_out = (mask, sharding.like(mask, parameter.data))
                parameter.mul_(laid_out[1])

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Path]:
        call = observe_network_call(trainer, pl_module)  # every rank: under FSDP2 the step's forward gathers weights
        if not trainer.is_global_zero:
            return {}
        return write_exports(
            self.pruned_model, call, output_folder(trainer, self.export_dir), "model_pruned", self.export_formats
        )

    def _shrunken_differs(self, pl_module: L.LightningModule) -> str | None:
        """Why the network with channels removed does not compute what the masked one does, or ``None``.

        Each shrunken network is run on the arguments its masked original received in a training step;
        then the whole module's training_step must run with them.
        """
        whole = {root: sharding.unsharded(pl_module.get_submodule(root)) for root in self._groups}  # every rank gathers
        for root in self._groups:
            args, kwargs = self._calls[root]
            masked, shrunken = whole[root], self.pruned_model.get_submodule(root)
            was_training = masked.training
            masked.eval()
            try:
                with torch.no_grad():
                    cpu_args, cpu_kwargs = on_cpu((args, kwargs))
                    expected, actual = masked(*args, **kwargs), shrunken(*cpu_args, **cpu_kwargs)
            except Exception as error:  # noqa: BLE001 - any failure: this network cannot ship
                return f"{root!r} fails to run after channel removal ({type(error).__name__}: {str(error).splitlines()[0]})"
            finally:
                masked.train(was_training)
            if not same_outputs(expected, actual):
                return f"{root!r} computes something else after channel removal"
        return runs(self.pruned_model, self._batches)

    @rank_zero_only
    def _plot(self, trainer: L.Trainer, per_layer: dict[str, float]) -> Path:
        curve = []
        if self.schedule is not None:
            steps = range(0, max(self.schedule.end_step + 1, trainer.global_step + 1))
            curve = [(step, self.schedule.target(step)) for step in steps]
        path = output_folder(trainer, self.export_dir) / "pruning.png"
        plot_pruning(path, self.schedule_kind, curve, self.history, per_layer)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key="pruning/sparsity", images=[str(path)])
        return path

    @staticmethod
    def _patterns(patterns: list[re.Pattern] | None) -> list[str] | None:
        return None if patterns is None else [pattern.pattern for pattern in patterns]


# checkpoint key -> attribute: the settings a resumed run compares with its own
_SAVED_SETTINGS = {
    "final_sparsity": "final_sparsity",
    "initial_sparsity": "initial_sparsity",
    "start_epoch": "start_epoch",
    "end_epoch": "end_epoch",
    "schedule": "schedule_kind",
    "mode": "mode",
}


def restore_pruned_channels(pl_module: nn.Module, checkpoint: dict[str, Any]) -> list[str]:
    """Give a module the smaller structure recorded in a checkpoint written after ``shrink_epoch``, so its
    weights load; networks already that small are left alone.

    Call it from your LightningModule's ``on_load_checkpoint`` to make ``load_from_checkpoint`` work on such
    checkpoints without the callback (``ImageClassifier`` and ``DistillationModule`` do). Returns the names of
    the networks it shrank.
    """
    shrunk = []
    for key, state in checkpoint.get("callbacks", {}).items():
        if key.startswith("MagnitudePruning") and state.get("dropped_channels"):
            shrunk += _shrink_as_recorded(pl_module, state, checkpoint.get("state_dict", {}))
    return shrunk


def _shrink_as_recorded(pl_module: nn.Module, state: dict[str, Any], weights: dict[str, torch.Tensor] | None) -> list[str]:
    """Remove the channels ``state`` recorded from ``pl_module``'s networks, each not already as small as
    ``weights`` (the checkpoint's; ``None``: unknown, every network shrinks); the networks shrunk."""
    shrunk = []
    for root, entries in state["dropped_channels"].items():
        network = pl_module.get_submodule(root)
        saved = {name.removeprefix(f"{root}."): value for name, value in (weights or {}).items() if name.startswith(f"{root}.")}
        # parameters only: fake-quant buffers (per-channel scales) are shaped when they first observe
        if weights is not None and all(
            _saved_shape(saved, name) in (None, value.shape) for name, value in network.named_parameters()
        ):
            continue  # already as small as the checkpoint's
        args, kwargs = replayed_call(state["dropped_inputs"][root])
        channel_groups.unmask_layer_norms(network)
        dropped = [(layer, list(channels)) for layer, channels in entries]
        channel_groups.remove_dropped_channels(network, dropped, *args, **kwargs)
        shrunk.append(root)
    return shrunk


def _saved_shape(saved: dict[str, torch.Tensor], name: str) -> torch.Size | None:
    """The shape a checkpoint holds for the network's parameter ``name``: under that name, or one level down, where
    a part that QAT exported holds the network (``graph.<name>``); ``None`` where it holds none."""
    if name in saved:
        return saved[name].shape
    nested = [value.shape for key, value in saved.items() if key.partition(".")[2] == name]
    return nested[0] if len(nested) == 1 else None


def _cut_optimizer_states(
    states: optimizers.OptimizerStates,
    root: str,
    network: nn.Module,
    dropped: list[tuple[str, list[int]]],
    args: tuple,
    kwargs: dict,
) -> None:
    """Cut the per-parameter state tensors of ``root``'s parameters (momentum, Adam's moments) as the channel
    removal cuts the weights, by applying the same removal to a copy of the network that holds them. A state
    not shaped like its parameter (a factored one, say) cannot follow: that parameter's state starts afresh."""
    prefix = f"{root}."
    shapes = {name: parameter.shape for name, parameter in network.named_parameters()}
    for per_name in states:
        owners = {name.removeprefix(prefix): state for name, state in per_name.items() if name.startswith(prefix)}
        for name, state in list(owners.items()):
            tensors = [value for value in state.values() if isinstance(value, torch.Tensor) and value.dim() > 0]
            if any(value.shape != shapes[name] for value in tensors):
                del per_name[prefix + name], owners[name]
        keys = {
            key
            for state in owners.values()
            for key, value in state.items()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        }
        for key in sorted(keys):
            twin = copy.deepcopy(network)
            with torch.no_grad():
                for name, parameter in twin.named_parameters():
                    parameter.copy_(owners[name][key] if key in owners.get(name, {}) else torch.zeros_like(parameter))
            channel_groups.remove_dropped_channels(twin, dropped, *args, **kwargs)
            for name, parameter in twin.named_parameters():
                if key in owners.get(name, {}):
                    owners[name][key] = parameter.detach()


def _computes_the_same(network: nn.Module, smaller: nn.Module, args: tuple, kwargs: dict) -> bool:
    was_training = network.training
    network.eval()
    smaller.eval()
    try:
        with torch.no_grad():
            return same_outputs(network(*args, **kwargs), smaller(*args, **kwargs))
    finally:
        network.train(was_training)
        smaller.train(was_training)


def _cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().cpu().clone() for name, value in module.state_dict().items()}


def _keep_largest(magnitudes: torch.Tensor, pruned: int) -> torch.Tensor:
    """A boolean mask that drops exactly ``pruned`` entries of ``magnitudes`` (none negative), the smallest, and of
    equal ones those that come first (already-zero ones first of all).

    Without sorting: ``topk`` of half a 33.7M-entry tensor allocated its values, its int64 indices and a sort's
    buffers, several times the tensor. Non-negative floats order as their bit patterns do, read as integers; a
    binary search over those finds the ``pruned``-th smallest in 32 counting passes, each a boolean the size of
    the tensor, counted without copying it (a boolean's ``sum`` makes an int64 copy), and the entries equal to it are
    dropped in index order, a chunk at a time."""
    count = magnitudes.numel()
    if pruned <= 0:
        return torch.ones_like(magnitudes, dtype=torch.bool)
    if pruned >= count:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    bits = magnitudes.float().contiguous().view(torch.int32)
    low, high = 0, int(bits.max())
    while low < high:  # the smallest pattern with at least ``pruned`` entries at or below it
        middle = (low + high) // 2
        if int(torch.count_nonzero(bits <= middle)) >= pruned:
            high = middle
        else:
            low = middle + 1
    keep = bits >= low
    ties_to_drop = pruned - int(torch.count_nonzero(bits < low))  # of the entries equal to the threshold, the first ones
    for start in range(0, count, _TIE_CHUNK):
        if ties_to_drop == 0:
            break
        ties = (bits[start : start + _TIE_CHUNK] == low).nonzero().flatten()[:ties_to_drop]
        keep[start + ties] = False
        ties_to_drop -= len(ties)
    return keep


_TIE_CHUNK = 1 << 20
