"""Where a callback finds an input for the model: a user's ``example_input_array``, or a real batch."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
from torch import nn


def model_input(batch: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model input of a batch: the tensor itself, or the first item of an ``(input, target)`` pair."""
    item = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(item, torch.Tensor):
        raise ValueError(
            f"cannot tell the model input in a batch of type {type(batch).__name__}: "
            "set `example_input_array` on your LightningModule."
        )
    return item.to(device)


def training_dataloader(trainer: L.Trainer) -> Iterable:
    """The training data of ``fit``, usable before the fit loop has loaded it (in ``setup``, at fit end)."""
    # The fit loop's data source covers both a datamodule and dataloaders passed to fit().
    return trainer.fit_loop._data_source.dataloader()


def model_inputs(dataloader: Iterable, count: int, device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The model inputs of the first ``count`` batches (fewer if the data runs out): calibration data."""
    inputs = []
    for batch in dataloader:
        if len(inputs) == count:
            break
        inputs.append(model_input(batch, device))
    return inputs


def example_input(trainer: L.Trainer, pl_module: L.LightningModule, size: int = 2) -> Any:
    """``pl_module.example_input_array`` if set, else the first ``size`` samples of a training batch."""
    if pl_module.example_input_array is not None:
        return pl_module.example_input_array
    return model_input(next(iter(training_dataloader(trainer))), pl_module.device)[:size]


def capture_inputs(pl_module: nn.Module, example: Any, targets: list[str]) -> dict[str, tuple[tuple, dict]]:
    """Run ``pl_module`` once (eval, no grad) and record the arguments each target submodule receives,
    and those of all their descendants (needed when a target must be split)."""
    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for target in targets:
        for name, module in pl_module.get_submodule(target).named_modules():
            full_name = f"{target}.{name}" if name else target

            def record(module, args, kwargs, full_name=full_name):
                captured.setdefault(full_name, (args, kwargs))

            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    was_training = pl_module.training
    pl_module.eval()
    try:
        with torch.no_grad():
            if isinstance(example, dict):
                pl_module(**example)
                captured[""] = ((), example)
            elif isinstance(example, tuple):
                pl_module(*example)
                captured[""] = (example, {})
            else:
                pl_module(example)
                captured[""] = ((example,), {})
    finally:
        for handle in handles:
            handle.remove()
        pl_module.train(was_training)
    return captured
