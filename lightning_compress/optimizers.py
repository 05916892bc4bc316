"""Optimizers rebuilt mid-fit, after a callback changed the module's parameters.

Two callbacks change the parameters while training goes on: channel pruning's shrink (smaller tensors) and
QAT prepared after it (new modules, tensors renamed by fusion). Lightning built its optimizers and
schedulers once, over the old parameters; they must be built again, from the module's own
``configure_optimizers``, without losing what training has accumulated: each parameter's state (momentum,
Adam's moments), found again by the parameter's name, the hyperparameters the schedulers have moved (the
learning rate), and the schedulers' positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_compress import sharding

OptimizerStates = list[dict[str, dict[str, Any]]]
"""Per optimizer, each parameter's state by the parameter's name in the module."""


def optimizer_states(trainer: L.Trainer, pl_module: nn.Module) -> OptimizerStates:
    """What each optimizer holds for each parameter, by the parameter's name in ``pl_module``."""
    names = {id(parameter): name for name, parameter in pl_module.named_parameters()}
    return [
        {names[id(parameter)]: dict(state) for parameter, state in optimizer.state.items() if id(parameter) in names}
        for optimizer in trainer.optimizers
    ]


def whole_states(states: OptimizerStates) -> OptimizerStates:
    """``states`` with each state tensor whole: gathered from the ranks where FSDP2 shards it (collective: every
    rank holds the same optimizers, whose states are listed in the same order), else as it is."""
    return [
        {
            name: {key: sharding.full_tensor(value) if isinstance(value, torch.Tensor) else value for key, value in state.items()}
            for name, state in per_name.items()
        }
        for per_name in states
    ]


def renamed(states: OptimizerStates, new_names: Mapping[str, str]) -> OptimizerStates:
    """``states`` with each parameter under its new name (``new_names``: old -> new; others keep theirs)."""
    return [{new_names.get(name, name): state for name, state in per_name.items()} for per_name in states]


def rebuild_optimizers(trainer: L.Trainer, pl_module: nn.Module, states: OptimizerStates, changed_by: str) -> None:
    """New optimizers and schedulers from the module's ``configure_optimizers`` over its current parameters,
    with the old optimizers' hyperparameters, each parameter's old state found by its name (``states`` already
    cut to new shapes or renamed by the caller, ``changed_by``), and the old schedulers' positions."""
    old_optimizers = list(trainer.optimizers)
    old_schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    if len(trainer.optimizers) != len(old_optimizers) or len(trainer.lr_scheduler_configs) != len(old_schedulers):
        raise RuntimeError(f"{changed_by}: configure_optimizers returned other optimizers once the parameters changed.")
    names = {id(parameter): name for name, parameter in pl_module.named_parameters()}
    for old, new, per_name in zip(old_optimizers, trainer.optimizers, states, strict=True):
        for old_group, new_group in zip(old.param_groups, new.param_groups, strict=False):
            new_group.update({key: value for key, value in old_group.items() if key != "params"})
        for group in new.param_groups:
            for parameter in group["params"]:
                state = per_name.get(names.get(id(parameter)))
                if state is not None:
                    new.state[parameter] = {key: _laid_out_as(value, parameter) for key, value in state.items()}
    for old, config in zip(old_schedulers, trainer.lr_scheduler_configs, strict=True):
        config.scheduler.load_state_dict(old.state_dict())


def _laid_out_as(value: Any, parameter: torch.Tensor) -> Any:
    """A whole state tensor shaped like ``parameter`` as ``parameter`` is laid out (this rank's shard of it under
    FSDP2); any other tensor (a step count) on its device."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() > 0 and value.shape == parameter.shape:
        return sharding.like(value, parameter)
    return value.to(parameter.device)
