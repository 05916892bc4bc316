"""Fake-quant as the deployment runtimes read it, whatever quantization library trained it.

ONNX writes ``torch.fake_quantize_per_tensor_affine`` and ``..._per_channel_affine`` as QuantizeLinear/
DequantizeLinear pairs, which ONNX Runtime and TensorRT run in int8, and OpenVINO reads them as FakeQuantize,
whose neighbours its CPU plugin runs in int8. A fake-quant module of any backend's library, or an observer after
calibration, holds its range in its own way and switches (observing, enabled) that do not export; each becomes a
``QuantizeDequantize`` with the constant scale and zero-point it ended with, computing what it computed in eval
mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_compress import compat

PER_CHANNEL_SCHEMES = (torch.per_channel_symmetric, torch.per_channel_affine)


class QuantizeDequantize(nn.Module):
    """Quantize then dequantize with constant parameters: those of ``range_holder``, a fake-quant module or an
    observer (anything with ``calculate_qparams``, ``quant_min``, ``quant_max`` and
    ``qscheme``; a per-channel one also ``ch_axis``)."""

    def __init__(self, range_holder: Any) -> None:
        super().__init__()
        scale, zero_point = range_holder.calculate_qparams()
        self.per_channel = range_holder.qscheme in PER_CHANNEL_SCHEMES
        self.axis = int(getattr(range_holder, "ch_axis", 0))
        self.quant_min, self.quant_max = int(range_holder.quant_min), int(range_holder.quant_max)
        self.register_buffer("scale", scale.detach().float().flatten())
        self.register_buffer("zero_point", zero_point.detach().int().flatten())
        # per-tensor parameters as Python numbers: exported as scalars, which ONNX Runtime's fusions require
        self.scalar_scale, self.scalar_zero_point = float(self.scale[0]), int(self.zero_point[0])

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_exporting():  # the same values, as ops an exported program keeps for the runtimes
            return self._decomposed(values)
        if self.per_channel:
            return torch.fake_quantize_per_channel_affine(
                values, self.scale, self.zero_point, self.axis, self.quant_min, self.quant_max
            )
        return torch.fake_quantize_per_tensor_affine(
            values, self.scalar_scale, self.scalar_zero_point, self.quant_min, self.quant_max
        )

    def _decomposed(self, values: torch.Tensor) -> torch.Tensor:
        ops = compat.decomposed_quantize_ops()
        dtype = torch.uint8 if self.quant_min >= 0 else torch.int8
        if self.per_channel:
            grid = (self.scale, self.zero_point.long(), self.axis, self.quant_min, self.quant_max, dtype)
            return ops.dequantize_per_channel(ops.quantize_per_channel(values, *grid), *grid)
        grid = (self.scalar_scale, self.scalar_zero_point, self.quant_min, self.quant_max, dtype)
        return ops.dequantize_per_tensor(ops.quantize_per_tensor(values, *grid), *grid)
