"""Where a callback finds an input for the model: a user's ``example_input_array``, or a real batch."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def model_input(batch: Any, device: torch.device | str = "cpu") -> torch.Tensor:
    """The model input of a batch: the tensor itself, or the first item of an ``(input, target)`` pair."""
    item = batch[0] if isinstance(batch, list | tuple) else batch
    if not isinstance(item, torch.Tensor):
        raise ValueError(
            f"cannot tell the model input in a batch of type {type(batch).__name__}: "
            "set `example_input_array` on your LightningModule."
        )
    return item.to(device)


def example_input(trainer: L.Trainer, pl_module: L.LightningModule, size: int = 2) -> Any:
    """``pl_module.example_input_array`` if set, else the first ``size`` samples of a training batch."""
    if pl_module.example_input_array is not None:
        return pl_module.example_input_array
    # The fit loop's data source covers both a datamodule and dataloaders passed to fit().
    dataloader = trainer.fit_loop._data_source.dataloader()
    return model_input(next(iter(dataloader)), pl_module.device)[:size]
