"""Which layers lose the most when quantized? Quantize one layer at a time and measure.

Each Conv/Linear layer of a network is quantized alone (static PTQ: calibrate, convert) while the rest
stays float, and the network's accuracy on held-out data is compared with the float network's. Layers are
then kept in float, most sensitive first, until fully quantizing the rest stays within an accuracy budget:
a mixed-precision proposal. ``PostTrainingQuantization(accuracy_budget=...)`` runs this at fit end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_compress.inputs import Call
from lightning_compress.quantization_backend import QUANTIZABLE_LAYERS, backend_for


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str
    accuracy: float
    drop_points: float


def quantizable_layers(network: nn.Module) -> list[str]:
    return [name for name, module in network.named_modules() if isinstance(module, QUANTIZABLE_LAYERS)]


def quantize(
    network: nn.Module,
    config: Any,
    calibration: list[Call],
    only: str | None = None,
    keep_float: tuple[str, ...] = (),
) -> nn.Module:
    """Static int8 copy of ``network``: every layer, or ``only`` one, minus ``keep_float``; calibrated by
    replaying ``calibration``, the calls the network received in training steps."""
    floats = set(keep_float)
    if only is not None:
        floats |= {name for name in quantizable_layers(network) if name != only}
    backend = backend_for(config)
    args, kwargs = calibration[0] if calibration else ((), {})
    prepared = backend.prepare_ptq(network, args, kwargs, sorted(floats))
    with torch.no_grad():
        for args, kwargs in calibration:
            prepared(*args, **kwargs)
    return backend.convert(prepared)


def layer_sensitivity(
    network: nn.Module, config: Any, calibration: list[Call], accuracy: Callable[[nn.Module], float]
) -> tuple[float, list[LayerSensitivity]]:
    """Float accuracy, and each layer's accuracy when it alone is quantized, most sensitive first."""
    backend_for(config).activate()
    reference = accuracy(network)
    results = []
    for layer in quantizable_layers(network):
        score = accuracy(quantize(network, config, calibration, only=layer))
        results.append(LayerSensitivity(layer, score, 100.0 * (reference - score)))
    return reference, sorted(results, key=lambda result: result.drop_points, reverse=True)


def propose_float_layers(
    network: nn.Module,
    config: Any,
    calibration: list[Call],
    accuracy: Callable[[nn.Module], float],
    reference: float,
    ranking: list[LayerSensitivity],
    budget_points: float,
) -> tuple[list[str], float]:
    """Keep the most sensitive layers in float until the quantized rest is within ``budget_points``."""
    keep: list[str] = []
    score = accuracy(quantize(network, config, calibration))
    for result in ranking:
        if 100.0 * (reference - score) <= budget_points:
            break
        keep.append(result.layer)
        score = accuracy(quantize(network, config, calibration, keep_float=tuple(keep)))
    return keep, score
