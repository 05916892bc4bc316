"""The quantization mechanism: how fake-quant is inserted and how a model becomes int8.

This is the one module that talks to a quantization library. It uses ``torch.ao.quantization`` FX graph
mode (``prepare_qat_fx``/``convert_fx``), which on x86 CPUs gives real int8 kernels (resnet18 ran 10x
faster than fp32 at 224x224 with the ``x86`` engine here). torch.ao is deprecated upstream in favour of
torchao's pt2e flow, which still fails on torchvision's resnet18 (a residual add with two consumers), so the
schedule in ``quantization.py`` only calls the functions below: moving to torchao later replaces this file.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.ao.nn.intrinsic import qat as intrinsic_qat
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    HistogramObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    get_default_qat_qconfig_mapping,
)
from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx
from torch.fx import GraphModule

BACKENDS = ("x86", "fbgemm", "qnnpack")
OBSERVERS = ("moving_average_minmax", "histogram")


@dataclass(frozen=True)
class QuantizationConfig:
    """How weights and activations are observed and quantized.

    Args:
        backend: int8 kernel library: ``x86`` (fastest on x86 CPUs), ``fbgemm`` or ``qnnpack`` (ARM).
        per_channel_weights: one scale per output channel (more accurate) or one per tensor.
        observer: activation range observer, ``moving_average_minmax`` or ``histogram``.
    """

    backend: str = "x86"
    per_channel_weights: bool = True
    observer: str = "moving_average_minmax"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown: allowed values are {list(BACKENDS)}.")
        if self.backend not in torch.backends.quantized.supported_engines:
            raise ValueError(
                f"backend={self.backend!r} is not supported by this CPU/torch build: supported here are "
                f"{[engine for engine in BACKENDS if engine in torch.backends.quantized.supported_engines]}."
            )
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer={self.observer!r} is unknown: allowed values are {list(OBSERVERS)}.")


def _qconfig(config: QuantizationConfig) -> QConfig:
    # Without VNNI, x86/fbgemm kernels accumulate in saturating int16 and need 7-bit activations. With VNNI
    # they accumulate in int32, and a full 8-bit range also keeps fake-quant and int8 clamping alike.
    reduce_range = config.backend in ("x86", "fbgemm") and not torch.cpu._is_vnni_supported()
    activation_observer = HistogramObserver if config.observer == "histogram" else MovingAverageMinMaxObserver
    activation = FakeQuantize.with_args(
        observer=activation_observer,
        quant_min=0,
        quant_max=127 if reduce_range else 255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    if config.per_channel_weights:
        weight = FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_channel_symmetric,
        )
    else:
        weight = FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver,
            quant_min=-128,
            quant_max=127,
            dtype=torch.qint8,
            qscheme=torch.per_tensor_symmetric,
        )
    return QConfig(activation=activation, weight=weight)


def qconfig_mapping(config: QuantizationConfig, skip_names: list[str] = (), skip_types: list[type] = ()) -> QConfigMapping:
    """The backend's default mapping (it keeps fixed ranges for sigmoid-like ops) with our global qconfig;
    ``skip_names`` (relative to the prepared module) and ``skip_types`` stay in float."""
    mapping = get_default_qat_qconfig_mapping(config.backend).set_global(_qconfig(config))
    for name in skip_names:
        mapping.set_module_name(name, None)
    for module_type in skip_types:
        mapping.set_object_type(module_type, None)
    return mapping


def prepare(module: nn.Module, mapping: QConfigMapping, example_args: tuple = ()) -> GraphModule:
    """Trace ``module`` and insert fake-quant, fusing Conv-BN(-ReLU) the QAT way (BN folded into the
    weights while its statistics keep updating). The returned module shares ``module``'s parameters and
    buffers; raises if the module cannot be traced symbolically."""
    was_training = module.training
    if not any(True for _ in module.children()):
        # Traced as the root, a lone layer converts to functional int8 ops with opaque packed weights;
        # as a child it converts to a quantized module that reports, saves and prints like one.
        module = nn.Sequential(module)
    prepared = prepare_qat_fx(module.train(), mapping, example_args)
    module.train(was_training)
    return prepared.train(was_training)


def convert(prepared: nn.Module) -> nn.Module:
    """An int8 copy of a prepared module, with float input and output; the prepared module is untouched."""
    return convert_fx(copy.deepcopy(prepared).eval())


def use_backend(config: QuantizationConfig) -> None:
    """Route int8 kernels to the configured engine (a process-wide torch setting)."""
    torch.backends.quantized.engine = config.backend


def set_fake_quant(module: nn.Module, enabled: bool) -> None:
    module.apply(enable_fake_quant if enabled else disable_fake_quant)


def set_observers(module: nn.Module, enabled: bool) -> None:
    module.apply(enable_observer if enabled else disable_observer)


def freeze_batch_norm(module: nn.Module) -> None:
    """Stop updating the running statistics of fused Conv-BN modules (they then fold the frozen ones)."""
    module.apply(intrinsic_qat.freeze_bn_stats)


def float_copy(template: nn.Module, prepared: nn.Module, names: dict[str, str]) -> nn.Module:
    """``template`` (a float module) filled with the current weights of ``prepared``.

    ``names`` maps template tensor names to prepared ones (see ``shared_tensor_names``): fusion renames BN
    tensors (``features.1.weight`` becomes ``features.0.bn.weight``) but keeps the tensors themselves.
    """
    state = prepared.state_dict()
    float_module = copy.deepcopy(template)
    float_module.load_state_dict({name: state[prepared_name] for name, prepared_name in names.items()})
    return float_module.eval()


def shared_tensor_names(original: nn.Module, prepared: nn.Module) -> dict[str, str]:
    """Map each parameter/buffer name of ``original`` to its name in ``prepared``, by tensor identity."""
    by_identity = {id(tensor): name for name, tensor in _tensors(prepared)}
    names = {}
    for name, tensor in _tensors(original):
        if id(tensor) not in by_identity:
            raise RuntimeError(f"tensor {name!r} was not carried into the prepared module")
        names[name] = by_identity[id(tensor)]
    return names


def _tensors(module: nn.Module) -> list[tuple[str, Any]]:
    return list(module.state_dict(keep_vars=True).items())


def is_prepared(module: nn.Module) -> bool:
    return any(isinstance(child, FakeQuantizeBase) for child in module.modules())


def has_quantizable_layers(module: nn.Module) -> bool:
    return any(isinstance(child, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear) for child in module.modules())
