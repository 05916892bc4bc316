"""The FX backend: fake-quant inserted and int8 models built by ``torch.ao.quantization`` FX graph mode.

``prepare_qat_fx``/``convert_fx`` give real int8 kernels on x86 CPUs (the ``x86`` engine: resnet18 2.4x
faster than fp32 at 224x224 on AVX2, 10x with VNNI) whose models run eagerly and export as TorchScript.
torch.ao is deprecated upstream in favour of torchao's pt2e flow (``pt2e_quantization``); both sit behind
``quantization_backend.QuantizationBackend``, chosen by the config's type (``QuantizationConfig`` here).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.intrinsic import qat as intrinsic_qat
from torch.ao.quantization import (
    FakeQuantize,
    FakeQuantizeBase,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    QConfig,
    QConfigMapping,
    default_embedding_qat_qconfig,
    get_default_qat_qconfig_mapping,
)
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize  # private: no public class learns ranges
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx
from torch.fx import GraphModule
from torch.nn.utils.fusion import fuse_conv_bn_weights

from lightning_compress import compat
from lightning_compress.module_swap import set_fake_quant, set_observers
from lightning_compress.quantization_backend import (
    DYNAMIC_LAYERS,
    QUANTIZABLE_LAYERS,
    RECURRENT_LAYERS,
    WEIGHT_ONLY_LAYERS,
    QuantizationBackend,
    register_backend,
)
from lightning_compress.quantization_config import GridConfig, int16_saturating_kernels
from lightning_compress.quantize_dequantize import QuantizeDequantize

BACKENDS = ("x86", "fbgemm", "qnnpack")


class PercentileObserver(HistogramObserver):
    """Clips the activation range to the ``percentile`` of the observed values on each side."""

    def __init__(self, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(**kwargs)
        self.percentile = percentile

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        bin_width = (self.max_val - self.min_val) / self.bins
        cumulative = torch.cumsum(self.histogram, dim=0) / self.histogram.sum()
        tail = (100.0 - self.percentile) / 100.0
        bounds = torch.tensor([tail, 1.0 - tail], dtype=cumulative.dtype, device=cumulative.device)
        start_bin, end_bin = (int(index) for index in torch.searchsorted(cumulative, bounds))
        end_bin = min(max(end_bin, start_bin), self.bins - 1)
        return self.min_val + bin_width * start_bin, self.min_val + bin_width * (end_bin + 1)


class EntropyObserver(HistogramObserver):
    """Chooses the range that minimises the KL divergence between the observed distribution and its quantized
    version, as TensorRT's entropy calibrator (and NVIDIA's pytorch-quantization) does.

    Unsigned activations (nothing below zero, as after a ReLU) search the upper end of the range. Signed ones are
    folded onto their magnitudes and a symmetric threshold is searched with half the levels, as TensorRT does:
    searching only the upper end, as this observer did before, never clipped a negative tail, however far out.
    All-negative ones are mirrored and search their lower end.

    The bin holding zero weighs as its neighbour in the search (TensorRT's ``bins[0] = bins[1]``). Zero lies
    exactly on the grid at any range, so its mass carries no quantization error; counted as it is, the spike of
    exact zeros after a ReLU (half the values or more) dominates the divergence, and since every wider range
    merges the spike with more of its neighbours, the search shrank the range with the size of the spike: on a
    resnet18 it clipped ReLU outputs at 40% of their maximum and cost 3 points that ``mse`` does not lose. The
    same holds for signed values: in torch.ao a ReLU6 shares its input's observer, which sees the signed
    pre-activation and the clamped output (a quarter of it exact zeros) together, and on a mobilenet_v2 the
    spike narrowed those ranges further and cost 16 points on a test split.

    A histogram that the whole range already quantizes without merging any two occupied bins keeps its whole
    range: its values are discrete and each has a level of its own, so there is nothing to trade, and the
    divergence, zero at any range where each level holds at most one occupied bin, no longer measures anything.
    That is the case of discrete inputs, such as the 17 grey levels of the digits images, which the search
    otherwise clipped to a tenth of their range.
    """

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        histogram = self.histogram.double().cpu()  # a short search over a small vector: on the CPU
        levels = self.quant_max - self.quant_min + 1
        width = (self.max_val - self.min_val) / self.bins
        if self.min_val < 0 < self.max_val:
            centers = self.min_val.cpu().double() + width.cpu().double() * (torch.arange(self.bins, dtype=torch.float64) + 0.5)
            folded = (centers.abs() / width.cpu().double()).long().clamp_max(self.bins - 1)
            magnitudes = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, folded, histogram)
            threshold = width * kl_threshold(magnitudes, levels // 2, first_bin_is_zero=True)
            return torch.maximum(self.min_val, -threshold), torch.minimum(self.max_val, threshold)
        if self.max_val <= 0 < self.max_val - self.min_val:  # all negative: the far end is the lower one
            kept = kl_threshold(histogram.flip(0), levels, first_bin_is_zero=bool(self.max_val == 0))
            return self.max_val - width * kept, self.max_val
        kept = kl_threshold(histogram, levels, first_bin_is_zero=bool(self.min_val == 0))
        return self.min_val, self.min_val + width * kept


def kl_threshold(histogram: torch.Tensor, levels: int, first_bin_is_zero: bool = False) -> int:
    """How many bins, from the first, to keep so that quantizing them to ``levels`` levels (what lies beyond
    clipped onto the last kept bin) loses the least information (KL divergence). Where the first bin holds
    zero, it weighs as its neighbour; where the whole range gives each occupied bin a level of its own, all are
    kept (see ``EntropyObserver``)."""
    occupied = int(torch.nonzero(histogram).max()) + 1 if bool(histogram.any()) else len(histogram)
    per_level = torch.zeros(levels).index_add_(0, torch.arange(occupied) * levels // occupied, (histogram[:occupied] > 0).float())
    if float(per_level.max()) <= 1:  # discrete values, each already on a level of its own at the whole range
        return occupied
    if first_bin_is_zero and len(histogram) > 1:
        histogram = histogram.clone()
        histogram[0] = histogram[1]
    step = max(len(histogram) // 256, 1)
    best_end, best_divergence = occupied, float("inf")
    for end in [*range(min(levels, occupied), occupied, step), occupied]:
        reference = histogram[:end].clone()
        reference[-1] += histogram[end:].sum()  # clipped values pile up at the edge
        # the same mass, merged into `levels` buckets and spread back over each bucket's non-empty bins
        bucket = torch.arange(end) * levels // end
        nonempty = (histogram[:end] > 0).double()
        mass = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, histogram[:end])
        count = torch.zeros(levels, dtype=torch.float64).index_add_(0, bucket, nonempty)
        expanded = nonempty * (mass / count.clamp_min(1.0))[bucket]
        p, q = reference / reference.sum(), expanded / max(float(expanded.sum()), 1e-12)
        mask = p > 0
        divergence = float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum())
        if divergence < best_divergence:
            best_end, best_divergence = end, divergence
    return best_end


class LearnedRangeFakeQuantize(_LearnableFakeQuantize):
    """Learned step size quantization (LSQ, Esser et al. 2019): the scale (and, for an asymmetric grid, the
    zero-point) is a parameter trained with the straight-through gradient of the quantizer. LSQ's gradient
    scale ``1 / sqrt(N * Qp)`` paces SGD; the ranges here are stepped by ``range_learning.RangeOptimizer``, an
    Adam that sets its own pace and is blind to a constant factor, so the gradient is left unscaled (the
    factor, as small as 1e-4, would only bring it nearer Adam's epsilon).

    It starts from the observer: while observers are on (``enable_observer``), the observer sets the
    parameters as ``FakeQuantize`` sets its ranges; once they are frozen, the parameters learn instead of
    staying where the observer left them. A per-channel weight grid is sized for its layer by ``size_for``.
    """

    learns_range: ClassVar[bool] = True  # what range_learning looks for, in either engine

    def __init__(self, observer: Any = MovingAverageMinMaxObserver, quant_min: int = 0, quant_max: int = 255, **kwargs: Any):
        super().__init__(observer, quant_min, quant_max, use_grad_scaling=False, **kwargs)
        self.is_per_channel = self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.symmetric = self.qscheme in (torch.per_channel_symmetric, torch.per_tensor_symmetric)
        self.enable_observer(True)

    @property
    def observing(self) -> bool:
        return bool(self.static_enabled[0])

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero-point a call writes into the parameters while the observer is on."""
        return self.activation_post_process.calculate_qparams()

    def size_for(self, channels: int) -> None:
        """One scale and zero-point per output channel of the layer this grid quantizes the weights of."""
        if self.is_per_channel and self.scale.numel() != channels:
            learning = bool(self.learning_enabled[0])
            self.scale = nn.Parameter(torch.ones(channels, device=self.scale.device))
            self.zero_point = nn.Parameter(torch.zeros(channels, device=self.zero_point.device))
            self.toggle_qparam_learning(learning)

    def enable_observer(self, enabled: bool = True) -> None:
        """Observers on: the observer sets the range; off: the range learns (LSQ), where ``FakeQuantize`` would freeze."""
        self.toggle_observer_update(enabled)
        self._learn_if_used()

    def disable_observer(self) -> None:
        self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.toggle_fake_quant(enabled)
        self._learn_if_used()

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    def _learn_if_used(self) -> None:
        """Ranges learn (require gradients) only while they quantize and no observer sets them: a parameter that
        requires a gradient but gets none (fake-quant off, before ``start_epoch``) would stall DDP's reduction."""
        learning = bool(self.fake_quant_enabled[0]) and not bool(self.static_enabled[0])
        self.toggle_qparam_learning(learning)
        if self.symmetric:  # a symmetric grid has no zero-point to learn
            self.zero_point.requires_grad_(False)


@dataclass(frozen=True)
class QuantizationConfig(GridConfig):
    """``GridConfig`` on torch.ao's int8 engines: ``backend`` is ``x86`` (fastest on x86 CPUs), ``fbgemm`` or
    ``qnnpack`` (ARM); ``learnable_ranges`` trains scales with ``LearnedRangeFakeQuantize``."""

    backend: str = "x86"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown: allowed values are {list(BACKENDS)}.")
        if self.backend not in torch.backends.quantized.supported_engines:
            raise ValueError(
                f"backend={self.backend!r} is not supported by this CPU/torch build: supported here are "
                f"{[engine for engine in BACKENDS if engine in torch.backends.quantized.supported_engines]}."
            )
        super().__post_init__()

    def activation_observer(self) -> type | partial:
        """The observer class (with its arguments) that ``observer`` and ``range_method`` name."""
        if self.observer == "minmax":
            return MinMaxObserver
        if self.observer == "moving_average_minmax":
            return MovingAverageMinMaxObserver
        return {
            "max": MinMaxObserver,  # a histogram's range with nothing clipped is the observed min and max
            "mse": HistogramObserver,  # torch's search minimises the L2 quantization error
            "percentile": PercentileObserver.with_args(percentile=self.percentile),
            "entropy": EntropyObserver,
        }[self.range_method]


def is_depthwise(layer: nn.Module) -> bool:
    """A convolution with one input channel per group (mobilenets' 3x3 and 5x5 layers)."""
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and layer.groups == layer.in_channels


def _qconfig(config: QuantizationConfig, depthwise: bool = False) -> QConfig:
    activation_min, activation_max = config.activation_range()
    weight_min, weight_max = config.weight_range()
    if config.converts_to_int8 and int16_saturating_kernels(config.backend, depthwise):
        # Keep activations on the full 8-bit grid and give weights 7 bits (-63..63, as ONNX Runtime's
        # reduce_range does): 255 x 63 x 2 = 32130 fits int16. torch.ao's default instead gives activations
        # 7 bits (0..127), but its int8 quantize ops still saturate at 255, so fake-quant clamps an
        # out-of-range activation at 127 steps where the int8 model does not: QAT would train a different
        # function from the one it ships. A symmetric narrow grid also makes the largest weight map exactly
        # onto 63, which the int8 kernels (clamping at 127 only) reproduce.
        weight_min, weight_max = -63, 63
    fake_quantize = LearnedRangeFakeQuantize if config.learnable_ranges else FakeQuantize
    activation = fake_quantize.with_args(
        observer=config.activation_observer(),
        quant_min=activation_min,
        quant_max=activation_max,
        dtype=torch.qint8 if config.signed_activations else torch.quint8,
        qscheme=torch.per_tensor_affine,
    )
    per_channel = config.per_channel_weights
    weight = fake_quantize.with_args(
        observer=MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver,
        quant_min=weight_min,
        quant_max=weight_max,
        dtype=torch.qint8,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
    )
    return QConfig(activation=activation, weight=weight)


def qconfig_mapping(
    config: QuantizationConfig, skip_names: list[str] = (), skip_types: list[type] = (), module: nn.Module | None = None
) -> QConfigMapping:
    """The backend's default mapping (it keeps fixed ranges for sigmoid-like ops) with our global qconfig, and
    7-bit weights for the depthwise convolutions of ``module`` where the kernels need them (see
    ``int16_saturating_kernels``); ``skip_names`` (relative to ``module``) and ``skip_types`` stay in float."""
    mapping = get_default_qat_qconfig_mapping(config.backend).set_global(_qconfig(config))
    saturating = int16_saturating_kernels(config.backend)
    if module is not None and int16_saturating_kernels(config.backend, depthwise=True) and not saturating:
        depthwise = _qconfig(config, depthwise=True)
        for name, layer in module.named_modules():
            if is_depthwise(layer):
                mapping.set_module_name(name, depthwise)
    # Embeddings have int8 kernels only for weights, quantized per row with float scales: torch.ao refuses
    # any other qconfig for them, which would make every model holding one untraceable.
    mapping.set_object_type(nn.Embedding, default_embedding_qat_qconfig)
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
    for layer in prepared.modules():  # learned per-channel ranges get one scale per output channel of their layer
        if isinstance(getattr(layer, "weight_fake_quant", None), LearnedRangeFakeQuantize):
            layer.weight_fake_quant.size_for(layer.weight.shape[0])
    module.train(was_training)
    return prepared.train(was_training)


def prepare_static(module: nn.Module, mapping: QConfigMapping) -> GraphModule:
    """Post-training quantization: trace an eval-mode copy of ``module`` with BN folded into the convolutions
    and observers inserted; run calibration data through it, then ``convert``."""
    float_module = copy.deepcopy(module).eval()
    if not any(True for _ in float_module.children()):
        float_module = nn.Sequential(float_module)  # see prepare()
    return prepare_fx(float_module, mapping, ())


def quantize_dynamic(module: nn.Module, layers: tuple[type, ...] = DYNAMIC_LAYERS, skip_names: Sequence[str] = ()) -> nn.Module:
    """An int8 copy with dynamically quantized ``layers`` (Linear, LSTM, GRU) outside the submodules ``skip_names``
    names: weights stored in int8, activations quantized on the fly at each call (no calibration), by fbgemm's eager
    kernels."""
    layers = tuple(layer for layer in layers if layer in DYNAMIC_LAYERS)
    if not any(isinstance(child, layers) for child in module.modules()):
        return module
    # a name's entry overrides its type's in torch.ao's propagation: None keeps that submodule float
    settings = {layer: torch.ao.quantization.default_dynamic_qconfig for layer in layers} | dict.fromkeys(skip_names)
    if isinstance(module, layers):  # torch swaps children only: a lone layer is swapped as one
        return torch.ao.quantization.quantize_dynamic(nn.Sequential(copy.deepcopy(module).cpu().eval()), settings)[0]
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(module).cpu().eval(), settings)


def convert(prepared: nn.Module) -> nn.Module:
    """An int8 copy of a prepared module, on the CPU, with float input and output; the prepared module (on
    any device) is untouched."""
    weight_grids = {
        name: (module.weight_fake_quant.quant_min, module.weight_fake_quant.quant_max)
        for name, module in prepared.named_modules()
        if isinstance(getattr(module, "weight_fake_quant", None), FakeQuantizeBase)
    }
    converted = convert_fx(copy.deepcopy(prepared).cpu().eval())  # int8 kernels are CPU kernels
    for name, (grid_min, grid_max) in weight_grids.items():
        _clamp_packed_weight(converted.get_submodule(name), grid_min, grid_max)
    return converted


def _clamp_packed_weight(module: nn.Module, grid_min: int, grid_max: int) -> None:
    """Clamp an int8 layer's weights to the grid its fake-quant trained on.

    Weights go on training after the observers freeze, and fake-quant clamps one that outgrows the frozen
    scale at the grid's edge; conversion saturates only at the int8 limits (+-127). On a narrower grid (7-bit
    weights without VNNI, ``narrow_range``) the int8 model would then compute with weights that training
    never saw, and without VNNI could overflow the kernels' int16 sums.
    """
    if not hasattr(module, "set_weight_bias"):
        return
    weight = module.weight()
    values = weight.int_repr()
    if int(values.min()) >= grid_min and int(values.max()) <= grid_max:
        return
    clamped = compat.quantized_tensor_like(weight, values.clamp(grid_min, grid_max))
    module.set_weight_bias(clamped, module.bias())


def layers_by_kind(module: nn.Module) -> tuple[list[str], list[str]]:
    """Names of the layers of a converted ``module`` that run int8 kernels (static or dynamic), and of the
    Conv/Linear/Embedding/LSTM/GRU layers that stayed float: read from the module itself, not from what was intended."""
    int8, floating = [], []
    for name, layer in module.named_modules():
        if type(layer).__module__.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized")):
            if callable(getattr(layer, "weight", None)) or hasattr(layer, "_all_weight_values"):  # not packed-params holders
                int8.append(name)
        elif isinstance(layer, QUANTIZABLE_LAYERS + WEIGHT_ONLY_LAYERS + RECURRENT_LAYERS):
            floating.append(name)
    return int8, floating


def use_backend(config: QuantizationConfig) -> None:
    """Route int8 kernels to the configured engine (a process-wide torch setting)."""
    torch.backends.quantized.engine = config.backend


def freeze_batch_norm(module: nn.Module) -> None:
    """Stop updating the running statistics of fused Conv-BN modules (they then fold the frozen ones)."""
    module.apply(intrinsic_qat.freeze_bn_stats)


def is_prepared(module: nn.Module) -> bool:
    return any(isinstance(child, FakeQuantizeBase) for child in module.modules())


# ---------------------------------------------------------------------- fake-quant as deployment runtimes read it


def fake_quant_for_export(prepared: nn.Module) -> nn.Module:
    """A copy of a prepared (fake-quant) module written the way ONNX's QuantizeLinear/DequantizeLinear and
    OpenVINO's FakeQuantize read it, computing what the fake-quant model computes in eval mode.

    Three rewrites. BatchNorm is folded into the convolution it was trained fused with (QAT keeps it apart
    to go on updating its statistics; a runtime wants one convolution whose weight grid it can read).
    Weights are replaced by their fake-quantized values and re-quantized on the full int8 grid: exact, and
    within what ONNX allows (it accepts no 7-bit grid, which weights use on CPUs without VNNI). Activation
    fake-quants become plain quantize-dequantize calls with constant scales and zero-points (the module's
    own observers and switches do not export). Layers with a weight grid other than Conv/Linear (an
    Embedding) keep their fake-quantized weights in float.
    """
    model = copy.deepcopy(prepared).cpu().eval()
    replaced: dict[int, nn.Module] = {}
    done: list[str] = []  # prefixes already rewritten: what lies under them went with them
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not name or any(name.startswith(f"{prefix}.") for prefix in done):
            continue
        if id(module) not in replaced:
            if isinstance(getattr(module, "weight_fake_quant", None), FakeQuantizeBase):
                quantized_weight = isinstance(module, QUANTIZABLE_LAYERS)
                replaced[id(module)] = (_QuantizedWeightLayer if quantized_weight else _FakeQuantizedWeightLayer).from_qat(module)
            elif _observed_layer(module) is not None:  # post-training: weights get their grid at conversion
                replaced[id(module)] = _QuantizedWeightLayer.from_observed(module)
            elif isinstance(module, FakeQuantizeBase):
                replaced[id(module)] = QuantizeDequantize(module)
            else:
                continue
        model.set_submodule(name, replaced[id(module)])  # again for a fake-quant serving several places
        done.append(name)
    return model


class _QuantizedWeightLayer(nn.Module):
    """A Conv/Linear (with its ReLU, if fused) whose weight goes through quantize-dequantize on the int8 grid."""

    def __init__(
        self, layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, weight_grid: FakeQuantizeBase, relu: bool
    ) -> None:
        super().__init__()
        scale, zero_point = weight_grid.calculate_qparams()
        with torch.no_grad():
            self.weight = nn.Parameter(weight_grid(weight.detach()).detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.per_channel = bool(weight_grid.is_per_channel)
        self.register_buffer("scale", scale.detach().float().flatten())
        self.register_buffer("zero_point", zero_point.detach().int().flatten())
        self.scalar_scale, self.scalar_zero_point = float(self.scale[0]), int(self.zero_point[0])
        self.relu = relu
        self.linear = isinstance(layer, nn.Linear)
        if not self.linear:
            self.stride, self.padding, self.dilation, self.groups = layer.stride, layer.padding, layer.dilation, layer.groups
            self.convolution = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[weight.dim() - 2]

    @classmethod
    def from_qat(cls, layer: nn.Module) -> _QuantizedWeightLayer:
        weight, bias = layer.weight, layer.bias
        batch_norm = getattr(layer, "bn", None)
        if isinstance(batch_norm, nn.modules.batchnorm._BatchNorm):
            weight, bias = fuse_conv_bn_weights(
                weight, bias, batch_norm.running_mean, batch_norm.running_var, batch_norm.eps, batch_norm.weight, batch_norm.bias
            )
        return cls(layer, weight, bias, layer.weight_fake_quant, relu="ReLU" in type(layer).__name__)

    @classmethod
    def from_observed(cls, module: nn.Module) -> _QuantizedWeightLayer:
        """From a layer prepared for post-training quantization, with the weight grid conversion would give it."""
        layer = _observed_layer(module)
        weight_grid = module.qconfig.weight()
        weight_grid(layer.weight.detach())  # observe the weights, as conversion does
        return cls(
            layer, layer.weight, layer.bias, weight_grid, relu=any(isinstance(child, nn.ReLU) for child in module.children())
        )

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            weight = torch.fake_quantize_per_channel_affine(self.weight, self.scale, self.zero_point, 0, -128, 127)
        else:
            weight = torch.fake_quantize_per_tensor_affine(self.weight, self.scalar_scale, self.scalar_zero_point, -128, 127)
        if self.linear:
            output = F.linear(values, weight, self.bias)
        else:
            output = self.convolution(values, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.relu(output) if self.relu else output


def _observed_layer(module: nn.Module) -> nn.Module | None:
    """The Conv/Linear of a module prepared for post-training quantization (itself, or the first layer of a
    fused Conv-ReLU), if it has a weight qconfig."""
    qconfig = getattr(module, "qconfig", None)
    if qconfig is None or qconfig.weight is None:
        return None
    if isinstance(module, QUANTIZABLE_LAYERS):
        return module
    first = next(iter(module.children()), None) if isinstance(module, nn.Sequential) else None
    return first if isinstance(first, QUANTIZABLE_LAYERS) else None


class _FakeQuantizedWeightLayer:
    """Layers with a weight grid but no int8 kernel in the runtimes (an Embedding): their float version,
    holding the fake-quantized weights."""

    @staticmethod
    def from_qat(layer: nn.Module) -> nn.Module:
        plain = layer.to_float()
        with torch.no_grad():
            plain.weight.copy_(layer.weight_fake_quant(layer.weight.detach()))
        return plain.eval()


@register_backend(QuantizationConfig)
class FxBackend(QuantizationBackend):
    """torch.ao FX graph mode on the ``x86``, ``fbgemm`` or ``qnnpack`` engine: eager int8 models, TorchScript."""

    native_export = "torchscript"
    export_formats = ("torchscript", "onnx", "openvino")
    prepares_whole_forward = True

    def activate(self) -> None:
        use_backend(self.config)

    def prepare_qat(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], skip_names: list[str], skip_types: list[type]
    ) -> nn.Module:
        return prepare(module, qconfig_mapping(self.config, skip_names, skip_types, module), args)

    def restore_qat(self, module: nn.Module, inputs: Any, skip_names: list[str], skip_types: list[type]) -> nn.Module:
        return prepare(module, qconfig_mapping(self.config, skip_names, skip_types, module))  # FX traces without data

    def prepare_ptq(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], skip_names: list[str]) -> nn.Module:
        return prepare_static(module, qconfig_mapping(self.config, skip_names, module=module))

    def batch_norms_to_freeze(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        return [
            (name, layer.bn)
            for name, layer in module.named_modules()
            if hasattr(layer, "freeze_bn") and isinstance(getattr(layer, "bn", None), nn.modules.batchnorm._BatchNorm)
        ]

    dynamic_layers = DYNAMIC_LAYERS

    def quantize_dynamic(
        self,
        module: nn.Module,
        layers: tuple[type, ...] = DYNAMIC_LAYERS,
        call: tuple[tuple, dict] | None = None,
        skip_names: Sequence[str] = (),
    ) -> nn.Module:
        return quantize_dynamic(module, layers, skip_names)

    is_prepared = staticmethod(is_prepared)
    set_fake_quant = staticmethod(set_fake_quant)
    set_observers = staticmethod(set_observers)
    freeze_batch_norm = staticmethod(freeze_batch_norm)
    convert = staticmethod(convert)
    layers_by_kind = staticmethod(layers_by_kind)
    fake_quant_for_export = staticmethod(fake_quant_for_export)
