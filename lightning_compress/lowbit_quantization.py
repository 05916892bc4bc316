"""The low-bit Linear backend: torchao's QAT of Linear layers (int4 weights, int8 dynamic activations).

What transformers are compressed with: Linear layers with int4 weights in groups and int8 activations
quantized per token at each call ("8da4w"), int4 weights alone, or int8 weights per channel with int8
dynamic activations. torchao does the mechanics by module swap (``quantize_(model, QATConfig(base_config,
step="prepare"))`` puts ``FakeQuantizedLinear`` in place of each ``nn.Linear``, ``step="convert"`` puts real
low-bit tensors in their weights), with no graph tracing, so it works whatever the forward does. This module
gives that a config and a ``QuantizationBackend``, so ``QuantizationAwareTraining(config=LowBitLinearConfig(...))``
adds the schedule, checkpoints, resume, DDP and the report.

There are no ranges to observe: activation scales come from each token at each call, weight scales from the
current weights of each group, so the observer and BatchNorm freezes of the int8 CNN flows do not apply.
torchao 0.18 has no x86 CPU kernel for these tensors (its C++ low-bit kernels are not in the PyPI wheel, and
``Int4WeightOnlyConfig`` needs CUDA's), so the converted model computes exactly what fake-quant trained but
dequantizes its weights at each call: it is smaller (int4 values stored one per byte, beside a scale per
group), not faster. The parts table says so.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
from torchao.quantization import (
    Int8DynamicActivationIntxWeightConfig,
    IntxWeightOnlyConfig,
    MappingType,
    PerAxis,
    PerGroup,
    quantize_,
)
from torchao.quantization.qat import QATConfig
from torchao.quantization.qat.linear import FakeQuantizedLinear, enable_linear_fake_quant
from torchao.quantization.utils import pack_tinygemm_scales_and_zeros
from torchao.utils import TorchAOBaseTensor

from lightning_compress.quantization_backend import QuantizationBackend, register_backend
from lightning_compress.selection import is_skipped

SCHEMES = ("8da4w", "int4_weight_only", "int8_dynamic")
"""``8da4w``: int8 dynamic per-token activations, int4 weights per group; ``int4_weight_only``: int4 weights per
group, float activations; ``int8_dynamic``: int8 dynamic per-token activations, int8 weights per output channel."""


@dataclass(frozen=True)
class LowBitLinearConfig:
    """Which low-bit scheme torchao applies to the Linear layers.

    Args:
        scheme: ``8da4w``, ``int4_weight_only`` or ``int8_dynamic`` (see ``SCHEMES``).
        group_size: input features that share one weight scale (the int4 schemes); it must divide the input
            width of every quantized Linear layer. ``int8_dynamic`` has one scale per output channel.
        symmetric_weights: a symmetric weight grid (no zero-point), or an asymmetric one.
    """

    version: ClassVar[int] = 1
    backend: ClassVar[str] = "torchao_linear"
    learnable_ranges: ClassVar[bool] = False  # scales are computed at each call: there is no range to learn

    scheme: str = "8da4w"
    group_size: int = 32
    symmetric_weights: bool = True

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"scheme={self.scheme!r} is unknown: allowed values are {list(SCHEMES)}.")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} is invalid: it must be a positive integer.")
        if self.scheme == "int4_weight_only" and not self.symmetric_weights:
            raise ValueError(
                "symmetric_weights=False is not offered with scheme='int4_weight_only': torchao's QAT of int4 "
                "weight-only layers takes symmetric grids only; use symmetric_weights=True, or scheme='8da4w'."
            )

    @property
    def converts_to_int8(self) -> bool:
        """Every scheme converts to real low-bit tensors (int4 values are stored in int8)."""
        return True

    @property
    def weight_bits(self) -> int:
        return 8 if self.scheme == "int8_dynamic" else 4

    @property
    def grouped(self) -> bool:
        return self.scheme != "int8_dynamic"

    def torchao_config(self) -> Any:
        """torchao's post-training config of the scheme: what QAT infers its fake-quant from, and converts with."""
        mapping = MappingType.SYMMETRIC if self.symmetric_weights else MappingType.ASYMMETRIC
        if self.scheme == "int4_weight_only":
            return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.group_size), mapping_type=mapping)
        return Int8DynamicActivationIntxWeightConfig(
            weight_dtype=torch.int4 if self.grouped else torch.int8,
            weight_granularity=PerGroup(self.group_size) if self.grouped else PerAxis(0),
            weight_mapping_type=mapping,
        )

    def describe(self) -> str:
        weights = f"int{self.weight_bits} weights" + (f" in groups of {self.group_size}" if self.grouped else " per channel")
        activations = "float activations" if self.scheme == "int4_weight_only" else "int8 dynamic activations"
        return f"{self.scheme}: {weights}, {activations}"


@register_backend(LowBitLinearConfig)
class LowBitLinearBackend(QuantizationBackend):
    """torchao's ``QATConfig`` on Linear layers: fake-quant by module swap, then torchao's low-bit tensors."""

    native_export = "torch_export"
    export_formats = ("torch_export", "executorch")
    keeps_layer_modules = True  # FakeQuantizedLinear is an nn.Linear: unstructured pruning masks it as before
    has_ranges = False
    swaps_modules = True

    @staticmethod
    def has_quantizable_layers(module: nn.Module) -> bool:
        return any(type(layer) is nn.Linear for layer in module.modules())

    def check_layers(self, module: nn.Module, prefix: str, skip_names: list[str], skip_types: list[type]) -> None:
        if not self.config.grouped:
            return
        for name, layer in _linear_layers(module, prefix, skip_names, skip_types):
            if layer.in_features % self.config.group_size:
                divisors = [size for size in range(1, layer.in_features + 1) if layer.in_features % size == 0]
                raise ValueError(
                    f"group_size={self.config.group_size} does not divide the input width {layer.in_features} of "
                    f"{name!r}: group sizes allowed for it are {divisors}; or skip it (skip=[{name!r}])."
                )

    def prepare_qat(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], skip_names: list[str], skip_types: list[type]
    ) -> nn.Module:
        return self.restore_qat(module, None, skip_names, skip_types)

    def restore_qat(self, module: nn.Module, inputs: Any, skip_names: list[str], skip_types: list[type]) -> nn.Module:
        # a new structure over the same parameters and buffers, as the FX backend's graph is: the float module
        # stays as it was (the callback keeps it as the template of the float copy)
        prepared = copy.deepcopy(module, memo={id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())})
        chosen = {name for name, _ in _linear_layers(prepared, "", skip_names, skip_types)}
        return _swapped(prepared, QATConfig(self.config.torchao_config(), step="prepare"), chosen)

    def prepare_ptq(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], skip_names: list[str]) -> nn.Module:
        # nothing to calibrate: the prepared copy only marks which layers convert
        return self.restore_qat(copy.deepcopy(module), None, skip_names, []).eval()

    def is_prepared(self, module: nn.Module) -> bool:
        return any(isinstance(layer, FakeQuantizedLinear) for layer in module.modules())

    def set_fake_quant(self, module: nn.Module, enabled: bool) -> None:
        for layer in module.modules():
            if isinstance(layer, FakeQuantizedLinear):
                enable_linear_fake_quant(layer, enabled)

    def set_observers(self, module: nn.Module, enabled: bool) -> None:
        return None  # scales are computed at each call: nothing observes

    def freeze_batch_norm(self, module: nn.Module) -> None:
        return None  # no BatchNorm is fused into a Linear layer

    def convert(self, prepared: nn.Module) -> nn.Module:
        converted = copy.deepcopy(prepared).cpu().eval()
        chosen = {name for name, layer in converted.named_modules() if isinstance(layer, FakeQuantizedLinear)}
        converted = _swapped(converted, QATConfig(self.config.torchao_config(), step="convert"), chosen)
        if self._packs_for_the_cpu_kernel():
            for name, layer in list(converted.named_modules()):
                if isinstance(layer, nn.Linear) and isinstance(layer.weight, TorchAOBaseTensor):
                    packed = Int4KernelLinear.from_converted(layer)
                    if name:
                        converted.set_submodule(name, packed)
                    else:
                        converted = packed
        return converted

    def _packs_for_the_cpu_kernel(self) -> bool:
        return (
            self.config.scheme == "int4_weight_only" and self.config.group_size in INT4_KERNEL_GROUP_SIZES and int4_cpu_kernel()
        )

    def layers_by_kind(self, converted: nn.Module) -> tuple[list[str], list[str]]:
        low_bit, floating = [], []
        for name, layer in converted.named_modules():
            if isinstance(layer, nn.Linear) and isinstance(layer.weight, TorchAOBaseTensor):
                low_bit.append(name)
            elif isinstance(layer, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LSTM, nn.GRU)):
                floating.append(name)
        return low_bit, floating

    def conversion_note(self) -> str:
        if self._packs_for_the_cpu_kernel():
            return (
                f"{self.config.describe()}; packed for torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu), "
                "scales in bf16, activations in bf16 around each layer"
            )
        stored = "int4 values stored one per byte" if self.config.weight_bits == 4 else "int8 weights"
        reason = (
            f"torch's CPU int4 kernel takes group sizes {list(INT4_KERNEL_GROUP_SIZES)}, not {self.config.group_size}"
            if self.config.scheme == "int4_weight_only" and int4_cpu_kernel()
            else "torchao 0.18 has no x86 kernel for them in torch"
        )
        return f"{self.config.describe()}; {stored} (torchao's unpacked_to_int8 tensors): {reason}, each call dequantizes"


INT4_KERNEL_GROUP_SIZES = (32, 64, 128)
"""Group sizes torch's CPU int4 kernel takes."""


@functools.cache
def int4_cpu_kernel() -> bool:
    """Whether this torch build runs int4 weight-only matrix products on the CPU (``_weight_int4pack_mm_for_cpu``,
    tinygemm's kernel): tried once on a small layer."""
    try:
        weight = torch.randn(16, 64)
        packed = Int4OpaqueTensor.from_hp(weight.to(torch.bfloat16), [1, 32])
        torch.nn.functional.linear(torch.randn(1, 64, dtype=torch.bfloat16), packed)
    except Exception:  # noqa: BLE001 - any failure means: no kernel here
        return False
    return True


class Int4KernelLinear(nn.Linear):
    """A Linear whose int4 weight is packed for torch's CPU int4 kernel, which takes bf16 activations: the input goes
    in as bf16 and the output comes back in the input's dtype. At widths of 2048 and more it runs a token 3x faster
    than fp32 on one thread (AVX-512 VNNI); at small widths the bf16 casts cost more than they save."""

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(values.to(torch.bfloat16), self.weight, self.bias).to(values.dtype)

    @classmethod
    def from_converted(cls, layer: nn.Linear) -> Int4KernelLinear:
        """The same weights as ``layer``'s symmetric int4 tensor (torchao's ``IntxUnpackedToInt8Tensor``, values -8..7
        with a scale per group), in the kernel's layout: values 0..15 around its midpoint 8 and a zero of 0, so the
        grid QAT trained is kept exactly; the scales are rounded to bf16, the kernel's precision (a relative change
        of at most 2**-9)."""
        weight = layer.weight
        values = (weight.qdata.to(torch.int32) + 8).contiguous()
        scale = weight.scale.to(torch.bfloat16)
        packed = Int4OpaqueTensor(
            qdata=torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1),
            scale_and_zero=pack_tinygemm_scales_and_zeros(scale, torch.zeros_like(scale), torch.bfloat16),
            block_size=list(weight.block_size),
            shape=weight.shape,
            act_pre_scale=None,
        )
        kernel_layer = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        kernel_layer.weight = nn.Parameter(packed, requires_grad=False)
        if layer.bias is not None:
            kernel_layer.bias = nn.Parameter(layer.bias.detach().to(torch.bfloat16), requires_grad=False)
        return kernel_layer


def _linear_layers(module: nn.Module, prefix: str, skip_names: list[str], skip_types: list[type]) -> list[tuple[str, nn.Linear]]:
    """The plain ``nn.Linear`` layers of ``module`` that ``skip`` leaves to quantize, named with ``prefix``
    (skip names are relative to ``module``)."""
    return [
        (".".join(filter(None, (prefix, name))), layer)
        for name, layer in module.named_modules()
        if type(layer) is nn.Linear and not is_skipped(name, layer, skip_names, skip_types)
    ]


def _swapped(module: nn.Module, config: QATConfig, chosen: set[str]) -> nn.Module:
    """``quantize_`` on the layers ``chosen`` (names relative to ``module``); a lone layer is swapped too
    (``quantize_`` replaces children only)."""
    holder = nn.Sequential(module) if not any(True for _ in module.children()) else None
    target = holder if holder is not None else module
    names = {f"0.{name}" if name else "0" for name in chosen} if holder is not None else chosen
    quantize_(target, config, filter_fn=lambda layer, name: name in names)
    return holder[0] if holder is not None else target


def stored_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight holds as stored: for a torchao low-bit tensor, the tensors inside it (its integers, one
    int4 value per byte in torchao 0.18's x86 layouts, its scales and zero-points), so that a size ratio counts
    what the converted model keeps rather than the logical shape."""
    if isinstance(tensor, TorchAOBaseTensor):
        inner, _ = tensor.__tensor_flatten__()
        return sum(stored_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()
