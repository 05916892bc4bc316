"""Quantization by module swap: the fallback for parts of a network that FX cannot trace.

Tracing fails on Python control flow that depends on the inputs (``nn.TransformerEncoderLayer``'s checks of
its masks, say); splitting such a part into its children helps only where the children are called as
modules and their parent never reads their weights itself. What always works is to leave the part's code
alone and replace its layers: each ``nn.Linear`` and ``nn.Embedding`` becomes torch.ao's QAT version in
place (weights fake-quantized on the grid conversion uses), and at conversion a dynamically quantized int8
Linear (activations quantized at each call from their own range, so there is no range to learn and none is
fake-quantized) or an int8 Embedding. Layers that a parent reads instead of calling
(``MultiheadAttention``'s ``out_proj``, a ``NonDynamicallyQuantizableLinear``) cannot be swapped and stay float.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.ao.nn import qat, quantized
from torch.ao.nn.qat import dynamic as qat_dynamic
from torch.ao.nn.quantized import dynamic as quantized_dynamic
from torch.ao.quantization import (
    FakeQuantize,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    default_dynamic_fake_quant,
    default_embedding_qat_qconfig,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)

from lightning_compress.quantization_config import GridConfig

SWAPPED_LAYERS = (qat_dynamic.Linear, qat.Embedding)


def swappable_layers(module: nn.Module, skip_names: list[str] = (), skip_types: tuple[type, ...] = ()) -> list[str]:
    """Names (relative to ``module``) of the Linear and Embedding layers a swap would quantize."""
    return [
        name
        for name, layer in module.named_modules()
        if type(layer) in (nn.Linear, nn.Embedding)  # exact types: NonDynamicallyQuantizableLinear says why
        and name not in skip_names
        and not isinstance(layer, skip_types)
    ]


def swap_in_fake_quant(module: nn.Module, names: list[str], config: GridConfig) -> None:
    """Replace the layers ``names`` of ``module`` by their QAT versions, in place; they keep the same
    parameter tensors."""
    for name in names:
        layer = module.get_submodule(name)
        layer.qconfig = _linear_qconfig(config) if isinstance(layer, nn.Linear) else default_embedding_qat_qconfig
        swapped = (qat_dynamic.Linear if isinstance(layer, nn.Linear) else qat.Embedding).from_float(layer)
        del layer.qconfig
        _keep_parent_off_its_fused_path(swapped)
        swapped.train(layer.training)
        module.set_submodule(name, swapped)


def convert_swapped(module: nn.Module) -> nn.Module:
    """Replace each swapped layer under ``module`` by its int8 version, in place; returns ``module``.

    A Linear's weights are quantized with the scales its fake-quant trained with, clamped to its grid, so the
    int8 layer computes with exactly the weights training saw. Where ``module`` is itself a swapped layer, its
    int8 version is returned.
    """
    if isinstance(module, SWAPPED_LAYERS):
        return convert_swapped(nn.Sequential(module))[0]
    for name, layer in list(module.named_modules()):
        if isinstance(layer, qat_dynamic.Linear):
            fake_quant = layer.weight_fake_quant
            scale, zero_point = fake_quant.calculate_qparams()
            weight = (
                torch.quantize_per_channel(layer.weight.detach().float(), scale.float(), zero_point.long(), 0, torch.qint8)
                if fake_quant.is_per_channel
                else torch.quantize_per_tensor(layer.weight.detach().float(), float(scale), int(zero_point), torch.qint8)
            )
            weight = _clamped(weight, fake_quant.quant_min, fake_quant.quant_max)
            int8 = quantized_dynamic.Linear(layer.in_features, layer.out_features, bias_=layer.bias is not None)
            int8.set_weight_bias(weight, None if layer.bias is None else layer.bias.detach().float())
        elif isinstance(layer, qat.Embedding):
            int8 = quantized.Embedding.from_float(layer)
        else:
            continue
        _keep_parent_off_its_fused_path(int8)
        module.set_submodule(name, int8)
    return module


def float_swapped(module: nn.Module) -> nn.Module:
    """Replace each swapped layer under ``module`` by a plain float layer with its current weights, in place;
    returns ``module``, or its float version where ``module`` is itself a swapped layer."""
    if isinstance(module, SWAPPED_LAYERS):
        return float_swapped(nn.Sequential(module))[0]
    for name, layer in list(module.named_modules()):
        if isinstance(layer, qat_dynamic.Linear):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        elif isinstance(layer, qat.Embedding):
            plain = nn.Embedding(layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx)
        else:
            continue
        plain.load_state_dict(dict(layer.named_parameters(recurse=False)))
        module.set_submodule(name, plain.train(layer.training))
    return module


def is_swapped(layer: nn.Module) -> bool:
    return isinstance(layer, SWAPPED_LAYERS)


def set_fake_quant(module: nn.Module, enabled: bool) -> None:
    """Turn torch.ao's fake-quant under ``module`` on or off: the swapped layers' (whichever backend prepared the
    rest of the model), and the FX engine's, which uses these two switches as its own."""
    module.apply(enable_fake_quant if enabled else disable_fake_quant)


def set_observers(module: nn.Module, enabled: bool) -> None:
    module.apply(enable_observer if enabled else disable_observer)


def _linear_qconfig(config: GridConfig) -> QConfig:
    """Weights per output channel on the configured grid, observed afresh at every step (averaging constant
    1), so the scale training uses is the one conversion uses. The activation entry is never applied: torch.ao
    requires a memoryless one for dynamic QAT."""
    weight_min, weight_max = config.weight_range()
    weight = FakeQuantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver,
        averaging_constant=1,
        quant_min=weight_min,
        quant_max=weight_max,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric,
    )
    return QConfig(activation=default_dynamic_fake_quant, weight=weight)


def _clamped(weight: torch.Tensor, grid_min: int, grid_max: int) -> torch.Tensor:
    """Weights trained on after the observers froze may outgrow the scale: fake-quant clamps them at the
    grid's edge, and so must the int8 layer."""
    values = weight.int_repr().clamp(grid_min, grid_max)
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return torch._make_per_channel_quantized_tensor(
            values, weight.q_per_channel_scales(), weight.q_per_channel_zero_points(), weight.q_per_channel_axis()
        )
    return torch._make_per_tensor_quantized_tensor(values, weight.q_scale(), weight.q_zero_point())


def _computed_by_its_own_forward(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing: its presence is the point.

    ``nn.TransformerEncoderLayer`` in eval mode skips its layers' forwards and runs one fused float kernel
    on their ``.weight`` tensors, unless a forward hook is attached to one of its modules (PyTorch's own
    rule). Without it, evaluation would bypass the fake-quant, and the int8 layers, whose ``weight`` is a
    method, would break it.
    """


def _keep_parent_off_its_fused_path(layer: nn.Module) -> None:
    layer.register_forward_pre_hook(_computed_by_its_own_forward)
