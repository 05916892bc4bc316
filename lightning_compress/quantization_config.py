"""What every int8 engine reads from a config: how ranges are observed and which integer grids hold weights and
activations, and the one fact about this CPU that changes the grid.

The engines' own configs (``fx_quantization.QuantizationConfig`` for FX graph mode, ``pt2e_quantization.
InductorQuantizationConfig`` for the torch.export engine) derive from ``GridConfig`` and add or refuse settings; neither engine
module imports the other, so either can go (FX graph mode is deprecated upstream) without breaking the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lightning_compress import compat

OBSERVERS = ("minmax", "moving_average_minmax", "histogram")
RANGE_METHODS = ("max", "percentile", "entropy", "mse")


def int16_saturating_kernels(backend: str, depthwise: bool = False) -> bool:
    """Whether the int8 kernels of ``backend`` add products in saturating 16-bit integers on this CPU, for
    depthwise convolutions (one input channel per group) or for every other layer.

    Without VNNI, x86/fbgemm (FX) and oneDNN (``x86_inductor``) multiply u8 activations by s8 weights with
    ``vpmaddubsw``, which sums each adjacent pair of products into a saturating int16: 255 x 127 x 2 = 64770
    overflows it, and the int8 model then computes something other than what fake-quant trained. With VNNI the
    sums are int32 and any 8-bit grid is exact, except in FBGEMM's depthwise convolution kernels, which both FX
    engines use and which saturate on every CPU: on an AMD EPYC with AVX-512 VNNI (torch 2.14.1) a third of the
    output channels of a 384-channel depthwise 3x3 were wrong by up to 113 steps with 8-bit weights, none with 7-bit
    ones, and mobilenet_v2's int8 model lost 2 points that its fake-quant model did not. oneDNN's depthwise kernels
    under Inductor matched their reference graph to 6e-6 there; qnnpack accumulates in int32.
    """
    if backend in ("x86", "fbgemm"):
        return depthwise or not compat.cpu_has_vnni()
    return backend == "x86_inductor" and not compat.cpu_has_vnni()


@dataclass(frozen=True)
class GridConfig:
    """How weights and activations are observed and quantized: the settings the engines share.

    Args:
        backend: the engine that runs the int8 model (each engine's config says which it takes).
        per_channel_weights: one scale per output channel (more accurate) or one per tensor.
        observer: activation observer, ``minmax``, ``moving_average_minmax`` or ``histogram``.
        range_method: how a histogram becomes a range: ``max`` (observed extremes), ``percentile``,
            ``entropy`` (KL) or ``mse`` (least squared quantization error); all but ``max`` need
            ``observer="histogram"``.
        percentile: the percentile kept by ``range_method="percentile"``, in (0, 100].
        weight_bits: bits of the weight grid, 2 to 8; below 8, fake-quant trains on that grid (gradients
            pass straight through), and no int8 kernel runs it faster.
        activation_bits: bits of the activation grid, 2 to 8.
        narrow_range: weights use a symmetric grid without its lowest level (-127..127 at 8 bits).
        signed_activations: activations on a signed grid (-128..127) instead of 0..255.
        learnable_ranges: QAT trains each scale (and asymmetric zero-point) with LSQ's gradient once observers
            are frozen, starting from where the observers left it.
    """

    version: ClassVar[int] = 1
    """Bumped when a field changes meaning, so that old checkpoints are read as they were written."""

    backend: str
    per_channel_weights: bool = True
    observer: str = "moving_average_minmax"
    range_method: str = "max"
    percentile: float = 99.99
    weight_bits: int = 8
    activation_bits: int = 8
    narrow_range: bool = False
    signed_activations: bool = False
    learnable_ranges: bool = False

    def __post_init__(self) -> None:
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer={self.observer!r} is unknown: allowed values are {list(OBSERVERS)}.")
        if self.range_method not in RANGE_METHODS:
            raise ValueError(f"range_method={self.range_method!r} is unknown: allowed values are {list(RANGE_METHODS)}.")
        if self.range_method != "max" and self.observer != "histogram":
            raise ValueError(f"range_method={self.range_method!r} needs observer='histogram', not {self.observer!r}.")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile={self.percentile!r} is invalid: it must lie in (0, 100].")
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"{name}={bits!r} is invalid: it must be an integer from 2 to 8.")

    @classmethod
    def fields_as_written(cls, fields: dict[str, Any], version: int) -> dict[str, Any]:
        """The fields of a config a checkpoint recorded at ``version``, as this version reads them: a setting added
        since is given the value that reproduces what that checkpoint trained."""
        return fields

    @property
    def converts_to_int8(self) -> bool:
        """Only 8-bit grids map onto the int8 kernels; narrower ones stay fake-quantized."""
        return self.weight_bits == 8 and self.activation_bits == 8

    def describe(self) -> str:
        weights = "per-channel" if self.per_channel_weights else "per-tensor"
        return f"{self.observer} observer, range {self.range_method}, {weights} weights"

    def weight_range(self) -> tuple[int, int]:
        half = 2 ** (self.weight_bits - 1)
        return -half + int(self.narrow_range), half - 1

    def activation_range(self) -> tuple[int, int]:
        levels = 2**self.activation_bits
        return (-levels // 2, levels // 2 - 1) if self.signed_activations else (0, levels - 1)
