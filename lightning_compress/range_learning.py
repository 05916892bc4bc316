"""How learned quantization ranges (LSQ) are stepped: at a pace relative to each range, apart from the model's optimizer.

LSQ (Esser et al. 2019) trains each scale with the straight-through gradient of its quantizer and, for SGD,
scales that gradient by ``1 / sqrt(N * Qp)`` so that a scale changes, relative to itself, about as fast as
its weights do. Adam undoes any such scaling (it divides each gradient by its own running magnitude), so a
scale in the model's Adam moves by about the learning rate *in absolute terms* at every step, whatever its
size. A scale's size is set by its grid: at a learning rate of 3e-4, Adam's steps are up to 15% of an 8-bit
weight scale of 0.002 and 0.06% of a 3-bit activation scale of 0.5. Measured on digits, in the model's AdamW:
the starved CNN's 3-bit scales moved 2% in five epochs (one fold), and in ``benchmarks/qat.py`` learned
ranges tied or trailed the observers' in every regime (mobilenet_v2 at 4 bits: -1.74 ± 0.51 points).

Here each scale takes Adam steps on its logarithm instead: it changes by about ``learning_rate`` *of itself*
per step, at 2 bits as at 8. Zero-points, which count grid steps, take ordinary Adam steps of about
``learning_rate`` steps. The learning rate follows the model's schedule down (the ratio of its current
learning rate to its initial one, at most 1), and the ranges carry no weight decay, which would pull every
range towards zero.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from lightning_compress import sharding

DEFAULT_LEARNING_RATE = 0.01  # the best of 0.001, 0.003, 0.01 and 0.03 on one seed of digits (3 and 4 bits)
BETAS = (0.9, 0.999)
# Adam's own default. Gradients of a log-scale ran from 1e-14 to 0.2 on trained digits models: a range whose gradient
# is far below this hardly affects the loss, and its steps shrink rather than follow the noise at full pace.
EPSILON = 1e-8


def learned_ranges(module: nn.Module, prefix: str = "") -> dict[str, nn.Parameter]:
    """The range parameters of ``module``'s learned-range fake-quant modules (each engine's ``LearnedRangeFakeQuantize``,
    which says ``learns_range``) by name (with ``prefix``): each scale, and each zero-point of an asymmetric grid (a
    symmetric one has none to learn)."""
    ranges = {}
    for name, fake_quantize in module.named_modules():
        if getattr(fake_quantize, "learns_range", False):
            path = ".".join(filter(None, (prefix, name)))
            ranges[f"{path}.scale"] = fake_quantize.scale
            if not fake_quantize.symmetric:
                ranges[f"{path}.zero_point"] = fake_quantize.zero_point
    return ranges


def keep_observed_ranges(module: nn.Module) -> None:
    """Write the range each observing fake-quant's observer holds into its range parameters, as they are laid out.

    A fake-quant writes its observer's range into the parameters at each call, which is what they hold when the
    observers freeze and the ranges start to learn. Under FSDP2 that write lands in the gathered copy of the
    parameters, which FSDP2 frees after the step: each rank's slices would keep their initial ranges (ones), and the
    ranges would start learning (and a checkpoint, and validation, would fake-quantize) from those. Called after each
    training step where the parameters are sharded, once the ranks hold rank 0's observers."""
    for fake_quantize in module.modules():
        if getattr(fake_quantize, "learns_range", False) and fake_quantize.observing:
            with torch.no_grad():
                for parameter, value in zip(
                    (fake_quantize.scale, fake_quantize.zero_point), fake_quantize.observed_range(), strict=True
                ):
                    whole = value.to(parameter.dtype).reshape(parameter.shape)
                    sharding.local(parameter).copy_(sharding.local(sharding.like(whole, parameter)))


class RangeOptimizer:
    """Adam on each scale's logarithm (relative steps) and on each zero-point (steps of the grid).

    It consumes the gradients it steps on (sets them to ``None``): the ranges belong to no other optimizer,
    so nothing else would clear them before the next backward pass.

    Args:
        learning_rate: the relative change of a scale per step (and the zero-point's change in grid steps)
            that Adam's normalized step gives when the gradient keeps its sign.
    """

    def __init__(self, learning_rate: float) -> None:
        self.learning_rate = learning_rate
        self.state: dict[str, dict[str, Any]] = {}

    @torch.no_grad()
    def step(self, ranges: Mapping[str, nn.Parameter], pace: float = 1.0) -> None:
        """One Adam step of every range that holds a gradient, at ``learning_rate * pace``; a non-finite gradient
        (an overflowing mixed-precision step, which the model's optimizer skips too) is dropped, on every rank alike.

        Under FSDP2 a range is a ``DTensor`` whose slices the ranks hold: Adam is elementwise, so each rank steps
        its slice (its state sliced alike), and only the finiteness check is agreed between the ranks."""
        stepped = {name: parameter for name, parameter in ranges.items() if parameter.grad is not None}
        gradients = {}
        for name, parameter in stepped.items():
            gradients[name], parameter.grad = parameter.grad, None
        finite = [bool(torch.isfinite(sharding.local(gradient)).all()) for gradient in gradients.values()]
        if any(isinstance(parameter, DTensor) for parameter in stepped.values()):
            finite = sharding.true_on_every_rank(finite)
        beta1, beta2 = BETAS
        for (name, parameter), is_finite in zip(stepped.items(), finite, strict=True):
            if not is_finite:
                continue
            value, gradient = sharding.local(parameter), sharding.local(gradients[name])
            is_scale = name.endswith("scale")
            if is_scale:
                gradient = gradient * value  # d loss / d log(scale)
            state = self._state_laid_out_as(name, parameter)
            state["steps"] += 1
            mean, square = sharding.local(state["mean"]), sharding.local(state["square"])
            mean.mul_(beta1).add_(gradient, alpha=1 - beta1)
            square.mul_(beta2).addcmul_(gradient, gradient, value=1 - beta2)
            root_mean_square = (square / (1 - beta2 ** state["steps"])).sqrt()
            update = self.learning_rate * pace * (mean / (1 - beta1 ** state["steps"])) / (root_mean_square + EPSILON)
            if is_scale:
                value.mul_(torch.exp(-update))
            else:
                value.sub_(update)

    def _state_laid_out_as(self, name: str, parameter: nn.Parameter) -> dict[str, Any]:
        """The Adam state of range ``name``, laid out as ``parameter`` is (its slices under FSDP2, on its device):
        new where the range has none yet or has been resized; a checkpoint's whole tensors sliced as it is."""
        state = self.state.get(name)
        if state is None or state["mean"].shape != parameter.shape:
            zeros = torch.zeros_like(parameter)
            state = self.state[name] = {"steps": 0, "mean": zeros, "square": zeros.clone()}
        elif isinstance(state["mean"], DTensor) != isinstance(parameter, DTensor) or state["mean"].device != parameter.device:
            # restored from a checkpoint (whole, loaded onto the CPU)
            state["mean"], state["square"] = sharding.like(state["mean"], parameter), sharding.like(state["square"], parameter)
        return state

    def state_dict(self) -> dict[str, Any]:
        """Whole tensors, gathered where the ranges are sharded (collective there: every rank calls it, as Lightning
        does when it writes a checkpoint)."""
        return {
            "learning_rate": self.learning_rate,
            "ranges": {
                name: {
                    key: sharding.full_tensor(value) if isinstance(value, torch.Tensor) else value for key, value in state.items()
                }
                for name, state in self.state.items()
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.state = {name: dict(state) for name, state in state_dict.get("ranges", {}).items()}


def take_from_optimizers(optimizers: list[torch.optim.Optimizer], ranges: Mapping[str, nn.Parameter]) -> tuple[int, int] | None:
    """Remove ``ranges`` from ``optimizers`` (a model's ``configure_optimizers`` sees them among its parameters);
    where the first of them was (optimizer and parameter group), whose schedule they then follow."""
    taken = {id(parameter) for parameter in ranges.values()}
    held_by = None
    for optimizer_index, optimizer in enumerate(optimizers):
        for group_index, group in enumerate(optimizer.param_groups):
            kept = [parameter for parameter in group["params"] if id(parameter) not in taken]
            if len(kept) != len(group["params"]) and held_by is None:
                held_by = (optimizer_index, group_index)
            group["params"] = kept
    return held_by


def schedule_pace(optimizers: list[torch.optim.Optimizer], held_by: tuple[int, int] | None) -> float:
    """Where the schedule of the group that held the ranges stands: its learning rate over its initial one
    (which a learning-rate scheduler records), at most 1; 1 without a scheduler.

    At most 1, so that ``range_learning_rate`` is the largest relative step: a one-cycle schedule starts at a
    25th of its peak, and following it up would step the ranges by a quarter of themselves at the peak."""
    if held_by is None or held_by[0] >= len(optimizers) or held_by[1] >= len(optimizers[held_by[0]].param_groups):
        return 1.0
    group = optimizers[held_by[0]].param_groups[held_by[1]]
    initial = group.get("initial_lr")
    pace = group["lr"] / initial if initial else 1.0
    return min(pace, 1.0) if math.isfinite(pace) else 1.0
