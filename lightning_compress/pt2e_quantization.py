"""The pt2e backend: torchao's ``torch.export``-based quantization with ``X86InductorQuantizer``.

Each part is exported with ``torch.export`` (strict: torchvision's BasicBlock calls one ReLU module twice,
which the default non-strict export turns into an activation the quantizer cannot annotate) from the inputs
it received in a training step, with its batch dimension left dynamic; torchao inserts fake-quant
(``prepare_qat_pt2e``) or observers (``prepare_pt2e``) into the exported graph, and ``convert_pt2e`` gives
a graph of quantize/dequantize and float ops that Inductor fuses into int8 oneDNN kernels under
``torch.compile``. On AVX2 that ran resnet18 at 224x224 2.7x faster than fp32 eager (torch.ao FX: 2.4x).

A saved int8 program (``export_format="torch_export"``, ``model_int8.pt2``) loads with torch alone, after
``import torchao.quantization.pt2e``, which defines its quantize ops: ``torch.export.load(path).module()``.

Exported graphs ignore ``.train()``/``.eval()``: ``ExportedPart`` rewrites the ``training`` flag of their
BatchNorm and dropout ops when it is switched, and keeps BatchNorm in eval once its statistics are frozen.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import operator
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils import _pytree as pytree
from torchao.quantization.pt2e import (
    FakeQuantize,
    FakeQuantizeBase,
    FusedMovingAvgObsFakeQuantize,
    ObserverBase,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
)
from torchao.quantization.pt2e.learnable_fake_quantize import LearnableFakeQuantize
from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import get_module_name_filter
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    QUANT_ANNOTATION_KEY,
    X86InductorQuantizer,
    _X86InductorQuantizationAnnotation,
    get_default_x86_inductor_quantization_config,
)

from lightning_compress import compat
from lightning_compress.forward_graph import hold_own_tensors
from lightning_compress.inputs import call_record, first_line, on_cpu, replayed_call
from lightning_compress.network_call import (
    call_tensors,
    export_dynamic_shapes,
    varying_dimensions,
    whole_sequence_arguments,
)
from lightning_compress.quantization_backend import (
    DYNAMIC_LAYERS,
    QUANTIZABLE_LAYERS,
    RECURRENT_LAYERS,
    WEIGHT_ONLY_LAYERS,
    BatchNormRecord,
    QuantizationBackend,
    register_backend,
)
from lightning_compress.quantization_config import GridConfig, int16_saturating_kernels
from lightning_compress.quantize_dequantize import QuantizeDequantize

_BATCH_NORM = torch.ops.aten.batch_norm.default
_DROPOUT = torch.ops.aten.dropout.default
_ATTENTION = torch.ops.aten.scaled_dot_product_attention.default
_RESHAPES = {  # ops that only move a tensor's values: quantizing before or after them is the same
    torch.ops.aten.view.default,
    torch.ops.aten.reshape.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.transpose.int,
    torch.ops.aten.permute.default,
    torch.ops.aten.contiguous.default,
}
_TRAINING_DROPOUT = "lightning_compress_training_dropout_p"  # node meta: the attention dropout exported in training
_LAYER_OPS = {
    torch.ops.aten.conv1d.default,
    torch.ops.aten.conv2d.default,
    torch.ops.aten.conv3d.default,
    torch.ops.aten.linear.default,
}


@dataclass(frozen=True)
class InductorQuantizationConfig(GridConfig):
    """torchao's ``X86InductorQuantizer`` settings: int8 activations (0..255, per tensor, affine) and int8
    weights (per output channel, symmetric). QAT observes with moving averages, PTQ with histograms and the
    least-squares range; other settings of ``GridConfig`` have no counterpart and are refused.

    Without VNNI, oneDNN adds u8 x s8 products pairwise in saturating int16, as fbgemm does: weights then use
    a 7-bit grid (-63..63), as the FX backend's do, and fake-quant trains on it. torchao's own advice for such
    CPUs, ``reduce_range`` (activations 0..127), still left the compiled int8 model of a digits CNN up to 0.95
    logits away from its reference graph here (AVX2); with 7-bit weights the two agree to 2e-4.

    Args:
        attention_query_key: also quantize the query and key that enter ``scaled_dot_product_attention``
            (per tensor, on a grid centred on zero), so that OpenVINO computes attention's score product in int8,
            where NNCF's transformer preset places it; QAT trains on that placement. Off, attention runs in float
            between the int8 projections (checkpoints written before this setting existed resume that way).
    """

    version: ClassVar[int] = 2
    """2: ``attention_query_key`` (version 1 had no such quantization: read as False)."""

    backend: str = "x86_inductor"
    attention_query_key: bool = True

    def __post_init__(self) -> None:
        if self.backend != "x86_inductor":
            raise ValueError(f"backend={self.backend!r}: InductorQuantizationConfig is backend='x86_inductor'.")
        super().__post_init__()
        refused = {
            "per_channel_weights": (self.per_channel_weights, True),
            "weight_bits": (self.weight_bits, 8),
            "activation_bits": (self.activation_bits, 8),
            "narrow_range": (self.narrow_range, False),
            "signed_activations": (self.signed_activations, False),
        }
        for name, (value, supported) in refused.items():
            if value != supported:
                raise ValueError(
                    f"{name}={value!r} is not supported by backend='x86_inductor' (only {supported!r}); use backend='x86'."
                )
        for name, allowed in (("observer", ("moving_average_minmax", "histogram")), ("range_method", ("max", "mse"))):
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is not supported by backend='x86_inductor' (allowed: {list(allowed)}: "
                    "moving averages for QAT, a histogram with the least-squares range for PTQ); use backend='x86'."
                )

        if not isinstance(self.attention_query_key, bool):
            raise ValueError(f"attention_query_key={self.attention_query_key!r} is invalid: it must be True or False.")

    @classmethod
    def fields_as_written(cls, fields: dict[str, Any], version: int) -> dict[str, Any]:
        return {"attention_query_key": False, **fields} if version < 2 else fields

    @property
    def seven_bit_weights(self) -> bool:
        return int16_saturating_kernels(self.backend)


class AttentionQueryKeyQuantizer(X86InductorQuantizer):
    """``X86InductorQuantizer`` that also quantizes the query and key entering ``scaled_dot_product_attention``,
    per tensor on a grid centred on zero (0..255, zero-point 128: the signed grid NNCF's transformer preset puts
    there, and the one OpenVINO's CPU plugin needs to compute the score product ``QK^T`` in int8; an off-centre
    zero-point left attention in bf16). X86InductorQuantizer's own placement (its global config: convolutions,
    Linear layers, pooling) leaves attention float. Unsigned, not int8: Inductor fuses each quantize into the
    Linear before it, and its fused Linear labels an int8 output as uint8 (torch 2.14.1), which fails compilation.

    On a transformers BERT (6 x 512, 128 tokens, batch 1, one thread, AVX-512 VNNI; three runs, models in turns) our
    QAT model in OpenVINO took 16.1-16.5 ms with the query and key in int8, 16.4-16.7 ms without (NNCF's int8:
    16.0-16.4 ms); in torch under Inductor and in ONNX Runtime it ran as fast either way.

    Left float: the query or key of an attention whose projection is float (skipped, by name or by type: the quantize
    would fuse into nothing), one that is also the value (one observer per producer and consumer: the value would be
    quantized too), and everything under dynamic quantization (no observed ranges). QAT observes these two with
    ``FakeQuantize`` rather than torchao's fused kernel, whose scale for a centred grid (max/127, and zero-point 0
    for inputs of one sign) is not the one conversion computes (max/127.5, zero-point 128): the model that trains is
    the one that ships."""

    def annotate(self, model: GraphModule) -> GraphModule:
        super().annotate(model)
        for node in model.graph.nodes:
            if node.op != "call_function" or node.target is not _ATTENTION:
                continue
            config = next(
                (config for name, config in self.module_name_qconfig.items() if get_module_name_filter(name)(node)),
                self.global_config,
            )
            activation = config.input_activation if config is not None else None
            if activation is None or activation.is_dynamic:
                continue
            centred = dataclasses.replace(
                activation,
                qscheme=torch.per_tensor_symmetric,
                quant_min=None,
                quant_max=None,
                observer_or_fake_quant_ctr=_consistent_fake_quant(activation.observer_or_fake_quant_ctr),
            )
            for argument in node.args[:2]:
                if argument is node.args[2]:  # also the value
                    continue
                consumer, producer = _first_reshape(node, argument)
                if producer.op == "call_function" and producer.target in _LAYER_OPS and not _quantized(producer):
                    continue  # a float projection
                annotation = consumer.meta.setdefault(QUANT_ANNOTATION_KEY, _X86InductorQuantizationAnnotation())
                annotation.input_qspec_map[producer] = centred
                annotation._annotated = True
        return model


def _consistent_fake_quant(constructor: Any) -> Any:
    """``constructor``, unless it is torchao's fused fake-quant kernel: then ``FakeQuantize`` over the same moving
    averages, whose scale and zero-point are those conversion computes."""
    made = getattr(getattr(constructor, "p", None), "func", constructor)
    if isinstance(made, type) and issubclass(made, FusedMovingAvgObsFakeQuantize):
        return FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=2**-12)
    return constructor


def _quantized(node: Any) -> bool:
    """Whether the annotation of layer ``node`` quantizes its inputs (a skipped layer's is empty)."""
    annotation = node.meta.get(QUANT_ANNOTATION_KEY)
    return annotation is not None and bool(annotation.input_qspec_map)


def _first_reshape(attention: Any, value: Any) -> tuple[Any, Any]:
    """The edge on which to quantize ``value``, an input of ``attention``: before the reshapes that split it into
    heads, where its producer (the query or key projection) wrote it, so that OpenVINO fuses the quantize into that
    Linear's output. Quantized at attention's input instead, after ``view -> transpose``, OpenVINO ran the quantize
    as an op of its own with reorders around it, and the BERT above took 0.2 ms longer than with attention in
    float. Returns (consumer, producer); a reshape another op also reads ends the walk."""
    consumer = attention
    while (
        getattr(value, "op", None) == "call_function"
        and value.target in _RESHAPES
        and len(value.users) == 1
        and QUANT_ANNOTATION_KEY not in value.meta
    ):
        consumer, value = value, value.args[0]
    return consumer, value


class LearnedRangeFakeQuantize(LearnableFakeQuantize):
    """Learned step size quantization (LSQ) on the exported graph: torchao's learnable fake-quant with the
    schedule the FX engine's has. While observers are on, the observer sets the range; once they are frozen, the
    scale (and an asymmetric zero-point) learns, while fake-quant is on. Unlike torchao's, the parameters exist
    from construction (the callback hands them to its range optimizer before the first batch) and keep their
    identity: the observer's first ranges are copied into them, resized to the weight's channels, and a
    checkpoint's are loaded into them at its shapes."""

    learns_range: ClassVar[bool] = True

    def __init__(self, observer: Any, quant_min: int | None = None, quant_max: int | None = None, **observer_kwargs: Any) -> None:
        if quant_min is None or quant_max is None:  # the dtype's whole grid (a spec that leaves the range to the dtype)
            unsigned = observer_kwargs.get("dtype", torch.quint8) in (torch.quint8, torch.uint8)
            quant_min, quant_max = (0, 255) if unsigned else (-128, 127)
        super().__init__(observer, quant_min, quant_max, use_grad_scaling=False, **observer_kwargs)
        self.is_per_channel = self.qscheme in (torch.per_channel_symmetric, torch.per_channel_affine)
        self.symmetric = self.qscheme in (torch.per_channel_symmetric, torch.per_tensor_symmetric)
        # torchao zeroes a symmetric grid's zero-point at each call, which is wrong for an unsigned grid centred on
        # zero (attention's query and key: zero-point 128); the affine op with a zero-point that never learns is
        # the same symmetric grid, wherever its centre lies
        self.qscheme = torch.per_channel_affine if self.is_per_channel else torch.per_tensor_affine
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.zero_point = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.enable_observer(True)

    def enable_observer(self, enabled: bool = True) -> None:
        self.observer_enabled[0] = int(enabled)
        self._learn_if_used()

    def disable_observer(self) -> None:
        self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        self.fake_quant_enabled[0] = int(enabled)
        self._learn_if_used()

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    def _learn_if_used(self) -> None:
        """Ranges learn only while they quantize and no observer sets them (a parameter that requires a gradient
        but gets none would stall DDP's reduction); a symmetric grid has no zero-point to learn."""
        learning = bool(self.fake_quant_enabled[0]) and not bool(self.observer_enabled[0])
        self.learning_enabled[0] = int(learning)
        self.scale.requires_grad_(learning)
        self.zero_point.requires_grad_(learning and not self.symmetric)

    @property
    def observing(self) -> bool:
        return bool(self.observer_enabled[0])

    def observed_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero-point a call writes into the parameters while the observer is on."""
        return self._grid(*self.activation_post_process.calculate_qparams())

    def _grid(self, scale: torch.Tensor, zero_point: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.symmetric:  # the grid's centre (observers given a range put an unsigned one at 127)
            zero_point = torch.full_like(zero_point, (self.quant_min + self.quant_max + 1) // 2)
        return scale, zero_point

    def _initialize_or_update_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        scale, zero_point = self._grid(scale, zero_point)
        self._resize(scale.shape)
        self.scale.data.copy_(scale)
        self.zero_point.data.copy_(zero_point.float())
        self._initialized = True

    def _resize(self, shape: torch.Size) -> None:
        if self.scale.shape != shape:
            self.scale.data = torch.ones(shape, device=self.scale.device)
            self.zero_point.data = torch.zeros(shape, device=self.zero_point.device)

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        if f"{prefix}scale" in state_dict:  # a checkpoint's ranges, per channel where the weight has channels
            self._resize(state_dict[f"{prefix}scale"].shape)
            self._initialized = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _size_learned_ranges(graph: GraphModule) -> None:
    """One learned scale per channel of each weight a learned-range fake-quant quantizes per channel, from the shape
    the export recorded: sized before FSDP2 shards the graph (a ``DTensor`` cannot be resized), not at the first call."""
    for node in graph.graph.nodes:
        if node.op != "call_module":
            continue
        fake_quantize = graph.get_submodule(node.target)
        value = node.args[0].meta.get("val") if node.args and hasattr(node.args[0], "meta") else None
        if isinstance(fake_quantize, LearnedRangeFakeQuantize) and fake_quantize.is_per_channel and value is not None:
            fake_quantize._resize(torch.Size([value.shape[fake_quantize.ch_axis]]))


class ExportedPart(nn.Module):
    """A part prepared as an exported graph, made to follow ``.train()``/``.eval()`` like an eager module:
    the ``training`` argument of the graph's BatchNorm and dropout ops is rewritten to the module's mode. After
    ``freeze_batch_norm`` BatchNorm uses its running statistics in training too (the weights go on training).

    The mode is applied when it is switched and checked again at each call: Lightning restores modes after
    validation by setting each module's ``training`` attribute, never calling ``.train()``; the graph then kept
    evaluating BatchNorm with running statistics for the rest of training, which cost the digits CNN 6 points (93.3%
    against 99.3% for the same fit without validation) and was the "DDP gap" (its test validated, the
    single-process comparison did too, with half as many steps).

    ``added_arguments`` are keyword arguments the export added to the observed call (``use_cache=False``, see
    ``network_call.whole_sequence_arguments``): each call adds them too, as the graph's inputs must match."""

    def __init__(self, graph: GraphModule, added_arguments: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.graph = _with_train_and_eval(graph)
        self.added_arguments = dict(added_arguments or {})
        self.batch_norm_frozen = False
        self.graph_mode: tuple[bool, bool] | None = None  # (BatchNorm, dropout) training flags the ops hold now
        self.__dict__["_mode_source"] = None

    def follow_mode_of(self, module: nn.Module) -> None:
        """Take ``module``'s training mode at each call: a LightningModule's forward prepared as one graph, whose
        ``.train()``/``.eval()`` do not reach this part (it is not a child; its networks are)."""
        self.__dict__["_mode_source"] = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not (torch.compiler.is_exporting() or torch.compiler.is_compiling()):  # a trace sees the graph as it is
            source = self.__dict__.get("_mode_source")
            if source is not None:
                self.training = source.training
            self._follow_mode()
        return self.graph(*args, **{**self.added_arguments, **kwargs})

    def train(self, mode: bool = True) -> ExportedPart:
        super().train(mode)
        self._follow_mode()
        return self

    def _follow_mode(self) -> None:
        wanted = (self.training and not self.batch_norm_frozen, self.training)
        if wanted != self.graph_mode:
            _set_graph_training(self.graph, batch_norm=wanted[0], dropout=wanted[1])
            self.graph_mode = wanted


def _with_train_and_eval(graph: GraphModule) -> GraphModule:
    """``graph`` with ``nn.Module``'s own ``train``/``eval``: ``torch.export`` replaces them with methods that raise,
    which would make every ``.eval()`` of a model holding the graph fail. Its ops are switched separately."""
    graph.__dict__.pop("train", None)
    graph.__dict__.pop("eval", None)
    return graph


def _set_graph_training(graph: GraphModule, batch_norm: bool, dropout: bool) -> None:
    """Rewrite the training switches of ``graph``'s ops: BatchNorm's and dropout's ``training`` flags, the step of
    its ``num_batches_tracked`` counter (an in-place add export keeps apart from the BatchNorm op: counted only while
    BatchNorm trains, as in eager mode, so evaluations do not count and a resumed run counts as the uninterrupted
    one), and the ``dropout_p`` of attention (transformers pass ``dropout if self.training else 0.0``, which export
    fixed at its training value: kept in the node's meta and restored when training resumes)."""
    changed = False
    for node in graph.graph.nodes:
        if _counts_batches(node):
            if node.args[1] != int(batch_norm):
                node.args = (node.args[0], int(batch_norm), *node.args[2:])
                changed = True
            continue
        if node.op != "call_function" or node.target not in (_BATCH_NORM, _DROPOUT, _ATTENTION):
            continue
        if node.target is _ATTENTION:
            if len(node.args) < 5:
                continue
            training_p = node.meta.setdefault(_TRAINING_DROPOUT, node.args[4])
            index, value = 4, training_p if dropout else 0.0
        else:
            index, value = (5, batch_norm) if node.target is _BATCH_NORM else (2, dropout)
        if node.args[index] != value:
            node.args = (*node.args[:index], value, *node.args[index + 1 :])
            changed = True
    if changed:
        graph.recompile()


def _counts_batches(node: Any) -> bool:
    """Whether ``node`` is BatchNorm's ``num_batches_tracked += step`` in an exported graph."""
    return (
        node.op == "call_function"
        and node.target == torch.ops.aten.add_.Tensor
        and getattr(node.args[0], "op", None) == "get_attr"
        and str(node.args[0].target).endswith("num_batches_tracked")
    )


def _drop_batch_counters(graph: GraphModule) -> None:
    """Remove BatchNorm's batch counters from a graph about to be converted: inference never counts batches (torchao
    removes those it recognizes by a step of 1; an evaluating graph's step is 0)."""
    for node in [node for node in graph.graph.nodes if _counts_batches(node)]:
        if not node.users:
            graph.graph.erase_node(node)
    graph.recompile()


class CompiledProgram(nn.Module):
    """A converted int8 graph, compiled by Inductor (with freezing, which prepacks the int8 weights for
    oneDNN) on its first call: eagerly the graph runs reference quantize/dequantize ops, slower than fp32.
    ``compile_ms`` is how long that first call took (the report's compile column). ``added_arguments``: as
    ``ExportedPart``'s.

    The batch dimension is compiled as a symbol (``maybe_mark_dynamic``), so that a new batch size does not compile
    again: one graph serves every batch size above 1 (Dynamo compiles batch 1 on its own), except where a kernel's
    choice depends on the size (Inductor guarded the digits CNN on 2 <= batch <= 15, so batch 16 and up took a
    graph of their own). A language model's first ``STATIC_SEQUENCE_LENGTHS`` sequence lengths compile as they
    are, the next one with its sequence symbolic too, a graph every later length takes (Dynamo compiles a function
    at most 8 times, then runs it eagerly: its reference ops). Other dimensions stay as they are. Compiled for a
    symbolic batch, resnet18 at 64x64 ran 15% slower at batch 4 and 8% at batch 8 than graphs compiled for those
    sizes, a BERT and a Llama decoder within 1% (``benchmarks/batch_sizes.py``, AVX-512 VNNI). A program that
    convolves a single-channel input (grayscale images) compiles for each batch size: for a symbolic batch
    Inductor expects the int8 convolution's output in one memory layout and oneDNN writes it in the other (a
    one-channel tensor is both contiguous and channels-last), and the compiled code's stride check fails (torch
    2.14). Where compiling for a symbolic batch fails otherwise, the program warns once
    and compiles for each batch size from then on."""

    def __init__(self, program: GraphModule, added_arguments: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.program = _with_train_and_eval(program)
        self.added_arguments = dict(added_arguments or {})
        self.__dict__["_compiled"] = None
        self.compile_ms: float | None = None

    symbolic_batch = True  # False once compiling for a symbolic batch failed (a class default: programs pickled before it)
    # How many sequence lengths compile as they are before one graph takes them all: Dynamo compiles a function
    # at most 8 times (``recompile_limit``) and then runs it eagerly, which for an int8 graph means its reference
    # quantize/dequantize ops (a small Llama: 160 ms a call against 1.2 ms compiled); each length can take two
    # graphs (batch 1 and the symbolic batch), so three lengths leave room for the symbolic sequence's.
    STATIC_SEQUENCE_LENGTHS: ClassVar[int] = 3
    # How many graphs a program compiled per batch size may hold (one per size; each a few seconds to compile):
    # past Dynamo's default of 8 it would run eagerly from the ninth size on.
    PER_SIZE_GRAPHS: ClassVar[int] = 64

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = {**self.added_arguments, **kwargs}
        if torch.compiler.is_exporting() or torch.compiler.is_compiling():  # exported as the graph it is
            return self.program(*args, **kwargs)
        if self.__dict__["_compiled"] is not None:
            # Most calls: a graph compiled before fits. Such a call needs none of the settings and marks that a
            # compile does (entered on every call, they cost a small CNN's int8 forward ~0.1 ms of 1); a call that
            # would compile raises at once, and compiles below.
            try:
                with torch.no_grad(), compat.only_compiled_code():
                    return self.__dict__["_compiled"](*args, **kwargs)
            except RuntimeError as error:
                if not compat.would_compile(error):
                    raise
        first_call = self.__dict__["_compiled"] is None
        if first_call:
            self.symbolic_batch = self.symbolic_batch and not _convolves_one_channel(self.program)
            self.__dict__["_compiled"] = torch.compile(self.program, dynamic=None if self.symbolic_batch else False)
        start = time.perf_counter()
        if not self.symbolic_batch:
            output = self._compiled_call(args, kwargs)
        else:
            try:
                tensors = call_tensors(args, kwargs)
                dimensions = varying_dimensions(tensors)
                sequence = self._sequence_symbolic(tensors, dimensions)
                _mark_symbolic(tensors, dimensions, sequence=sequence)
                output = self._compiled_call(args, kwargs, marked_only=not sequence)
            except Exception as error:  # noqa: BLE001 - whatever failed, the per-shape compile is the fallback
                per_shape = torch.compile(self.program, dynamic=False)
                unmarked = pytree.tree_map_only(torch.Tensor, lambda tensor: tensor.view(tensor.shape), (args, kwargs))
                # views carry no marks; where this call fails too, the input was at fault: it raises, nothing changes
                output = self._compiled_call(*unmarked, compiled=per_shape)
                warnings.warn(
                    f"Compiling the int8 graph for any batch size failed ({first_line(error, limit=160)}); it compiles "
                    "for each batch size instead.",
                    stacklevel=2,
                )
                self.symbolic_batch = False
                self.__dict__["_compiled"] = per_shape
        if first_call:
            self.compile_ms = (time.perf_counter() - start) * 1000.0
        return output

    def _sequence_symbolic(self, tensors: list[torch.Tensor], dimensions: list[dict[int, str]]) -> bool:
        """Whether a call with ``tensors`` (their ``varying_dimensions``) compiles its sequence dimension as a
        symbol: once the program has seen more than ``STATIC_SEQUENCE_LENGTHS`` lengths, from then on (a model
        generating or reading text of every length)."""
        lengths = self.__dict__.setdefault("_sequence_lengths", set())
        lengths.update(
            tensor.shape[1] for tensor, varying in zip(tensors, dimensions, strict=True) if varying.get(1) == "sequence"
        )
        return len(lengths) > self.STATIC_SEQUENCE_LENGTHS

    def _compiled_call(
        self, args: tuple, kwargs: dict[str, Any], compiled: Callable | None = None, marked_only: bool = True
    ) -> Any:
        """The compiled program's output for the call; ``marked_only``: no dimension but those marked becomes
        symbolic, else Dynamo's default too (a dimension whose size changed compiles as a symbol), which a graph
        break's later graphs need (their inputs are the earlier one's outputs, which nothing marks)."""
        dimensions = compat.only_marked_dimensions_dynamic() if marked_only else contextlib.nullcontext()
        # compiled per batch size, a program takes a graph for each size a server sends it
        sizes = (
            contextlib.nullcontext() if self.symbolic_batch and compiled is None else compat.compiles_up_to(self.PER_SIZE_GRAPHS)
        )
        with torch.no_grad(), compat.inductor_freezing(), dimensions, sizes:
            return (self.__dict__["_compiled"] if compiled is None else compiled)(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_compiled"] = None  # a copy compiles again: compiled code is tied to the module it was made for
        state["compile_ms"] = None
        state.pop("_sequence_lengths", None)  # ... and counts the lengths it compiles for anew
        return state


def _convolves_one_channel(program: GraphModule) -> bool:
    """Whether a 2-D convolution of ``program`` takes a single-channel input (its weight's input channels times
    its groups; a depthwise convolution's weights have one input channel each but its input has many)."""
    for node in program.graph.nodes:
        if node.target is not torch.ops.aten.conv2d.default:
            continue
        weight = node.args[1]
        while isinstance(weight, torch.fx.Node) and weight.op == "call_function":  # dequantize(int8 weight, ...)
            weight = weight.args[0]
        if not isinstance(weight, torch.fx.Node) or weight.op != "get_attr":
            continue
        groups = node.args[6] if len(node.args) > 6 else 1
        if operator.attrgetter(weight.target)(program).shape[1] * groups == 1:
            return True
    return False


def _mark_symbolic(tensors: list[torch.Tensor], dimensions: list[dict[int, str]], sequence: bool) -> None:
    """Mark the batch dimension of a call's ``tensors`` (of their ``varying_dimensions``), and their sequence
    dimension where ``sequence``, as ones ``torch.compile`` may leave symbolic (a weak mark, kept by the caller's
    tensors: a graph compiled for one size, or a graph that fixes the size, ignores it); their other dimensions are
    compiled as they are. On every call: any call may compile again."""
    for tensor, varying in zip(tensors, dimensions, strict=True):
        for dimension, kind in varying.items():
            if kind == "batch" or (sequence and kind == "sequence"):
                torch._dynamo.maybe_mark_dynamic(tensor, dimension)


def _export(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[GraphModule, dict[str, Any]]:
    """``module``'s graph, exported from the call ``module(*args, **kwargs)`` with its batch and sequence left free,
    and the keyword arguments the export added to that call (``whole_sequence_arguments``)."""
    added = whole_sequence_arguments(module, kwargs)
    kwargs = {**kwargs, **added}
    program = torch.export.export(
        module, tuple(args), kwargs or None, dynamic_shapes=export_dynamic_shapes(module, args, kwargs), strict=True
    )
    return program.module(), added


@register_backend(InductorQuantizationConfig)
class InductorBackend(QuantizationBackend):
    """torchao pt2e with ``X86InductorQuantizer``: exported graphs, int8 under ``torch.compile``, ``.pt2`` exports."""

    native_export = "torch_export"
    export_formats = ("torch_export", "onnx", "openvino")
    keeps_layer_modules = False  # an exported graph holds its layers' parameters, not the layers
    prepares_whole_forward = True

    def prepared_name(self, name: str) -> str:
        return f"graph.{name}"  # ExportedPart.graph keeps the network's own names (the parameters are shared)

    def _quantizer(
        self, is_qat: bool, skip_names: list[str], skip_types: list[type] = (), dynamic: bool = False
    ) -> X86InductorQuantizer:
        settings = get_default_x86_inductor_quantization_config(is_qat=is_qat, is_dynamic=dynamic)
        if self.config.seven_bit_weights:
            settings = dataclasses.replace(settings, weight=dataclasses.replace(settings.weight, quant_min=-63, quant_max=63))
        if is_qat and self.config.learnable_ranges:  # the same observers, their ranges learned once they freeze
            # one constructor for both activation roles: equal specs are how a producer's output and its consumer's
            # input come to share one fake-quant
            activation = LearnedRangeFakeQuantize.with_args(observer=MovingAverageMinMaxObserver)
            learned = {
                "input_activation": activation,
                "output_activation": activation,
                "weight": LearnedRangeFakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver),
            }
            settings = dataclasses.replace(
                settings,
                **{
                    role: dataclasses.replace(getattr(settings, role), observer_or_fake_quant_ctr=constructor)
                    for role, constructor in learned.items()
                    if getattr(settings, role) is not None
                },
            )
        quantizer_class = AttentionQueryKeyQuantizer if self.config.attention_query_key else X86InductorQuantizer
        quantizer = quantizer_class().set_global(settings)
        for name in skip_names:
            quantizer.set_module_name_qconfig(name, None)
        for module_type in skip_types:
            quantizer.set_module_type_qconfig(module_type, None)
        return quantizer

    def check_settings(self, training: bool) -> None:
        wanted = ("moving_average_minmax", "max") if training else ("histogram", "mse")
        if (self.config.observer, self.config.range_method) != wanted:
            kind = "quantization-aware training" if training else "post-training quantization"
            raise ValueError(
                f"observer={self.config.observer!r}, range_method={self.config.range_method!r}: backend='x86_inductor' "
                f"observes {kind} with observer={wanted[0]!r}, range_method={wanted[1]!r}."
            )

    def prepare_qat(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], skip_names: list[str], skip_types: list[type]
    ) -> nn.Module:
        was_training = module.training
        module.train()
        try:
            exported, added = _export(module, args, kwargs)
            with compat.quick_conv_batch_norm_rewrites():
                graph = prepare_qat_pt2e(exported, self._quantizer(True, skip_names, skip_types))
        finally:
            module.train(was_training)
        _size_learned_ranges(graph)
        return ExportedPart(graph, added).train(was_training)

    def input_record(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        return call_record(args, kwargs)

    def restore_qat(self, module: nn.Module, inputs: Any, skip_names: list[str], skip_types: list[type]) -> nn.Module:
        if inputs is None:
            raise ValueError("the checkpoint does not record the inputs of this part, which backend='x86_inductor' exports")
        return self.prepare_qat(module, *replayed_call(inputs), skip_names, skip_types)

    def prepare_ptq(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], skip_names: list[str]) -> nn.Module:
        float_module = copy.deepcopy(module).eval()
        exported, added = _export(float_module, args, kwargs)
        return ExportedPart(prepare_pt2e(exported, self._quantizer(False, skip_names)), added).eval()

    def is_prepared(self, module: nn.Module) -> bool:
        return any(isinstance(child, ExportedPart) for child in module.modules())

    def set_fake_quant(self, module: nn.Module, enabled: bool) -> None:
        module.apply(enable_fake_quant if enabled else disable_fake_quant)

    def set_observers(self, module: nn.Module, enabled: bool) -> None:
        module.apply(enable_observer if enabled else disable_observer)

    def freeze_batch_norm(self, module: nn.Module) -> None:
        for part in module.modules():
            if isinstance(part, ExportedPart) and not part.batch_norm_frozen:
                part.batch_norm_frozen = True
                part.train(part.training)

    @contextlib.contextmanager
    def batch_norm_inputs(self, module: nn.Module, record: BatchNormRecord) -> Iterator[None]:
        """An exported graph's BatchNorm is an op, not a module to hook: while open, each BatchNorm op of the
        graphs under ``module`` calls a function that shows its input and running statistics to ``record`` (named
        after the BatchNorm layer it came from) and then runs the op; on exit the graphs are as they were."""
        parts = [(path, part) for path, part in module.named_modules() if isinstance(part, ExportedPart)]
        try:
            for path, part in parts:
                for node in part.graph.graph.nodes:
                    statistics = node.args[3:5] if node.op == "call_function" and node.target is _BATCH_NORM else ()
                    if len(statistics) == 2 and all(getattr(arg, "op", None) == "get_attr" for arg in statistics):
                        stack = list(node.meta.get("nn_module_stack", {}).values())
                        name = ".".join(filter(None, (path, stack[-1][0] if stack else node.name)))
                        node.target = _recording_batch_norm(name, node, part.graph, record)
                part.graph.recompile()
            yield
        finally:
            for _, part in parts:
                for node in part.graph.graph.nodes:
                    if getattr(node.target, "batch_norm", None) is _BATCH_NORM:
                        node.target = _BATCH_NORM
                part.graph.recompile()

    def convert(self, prepared: nn.Module) -> nn.Module:
        part = prepared if isinstance(prepared, ExportedPart) else None
        if part is None:
            raise TypeError(f"backend='x86_inductor' converts parts it prepared, not {type(prepared).__name__}")
        graph = copy.deepcopy(part.graph).cpu()
        _set_graph_training(graph, batch_norm=False, dropout=False)
        _drop_batch_counters(graph)
        with compat.quick_conv_batch_norm_rewrites():
            converted = convert_pt2e(graph)
        _drop_unused_tensors(converted)
        hold_own_tensors(converted)  # its int8 weights: in the state_dict also where it becomes a module's forward
        return CompiledProgram(converted, part.added_arguments)

    def fake_quant_for_export(self, prepared: nn.Module) -> nn.Module:
        """A copy of a prepared (trained or calibrated) part whose graphs hold ``QuantizeDequantize`` in place of
        torchao's fake-quant modules and observers, in eval mode: ONNX writes them as QuantizeLinear/
        DequantizeLinear, OpenVINO reads them as FakeQuantize, and both run the matrix products between them in
        int8, placed where ``X86InductorQuantizer`` placed them, which is where QAT trained them."""
        model = copy.deepcopy(prepared).cpu().eval()
        for part in model.modules():
            if not isinstance(part, ExportedPart):
                continue
            for node in part.graph.graph.nodes:
                if node.op == "call_module" and isinstance(
                    part.graph.get_submodule(node.target), (FakeQuantizeBase, ObserverBase)
                ):
                    part.graph.set_submodule(node.target, QuantizeDequantize(part.graph.get_submodule(node.target)))
        return model

    def layers_by_kind(self, converted: nn.Module) -> tuple[list[str], list[str]]:
        int8, floating = [], []
        for module in converted.modules():
            if not isinstance(module, GraphModule):
                continue
            for node in module.graph.nodes:
                if node.op != "call_function" or node.target not in _LAYER_OPS:
                    continue
                stack = list(node.meta.get("nn_module_stack", {}).values())
                name = stack[-1][0] if stack else node.name
                weight = node.args[1]
                quantized = getattr(weight, "op", None) == "call_function" and "dequantize" in str(weight.target)
                (int8 if quantized else floating).append(name)
        floating += [
            name
            for name, layer in converted.named_modules()
            if isinstance(layer, QUANTIZABLE_LAYERS + WEIGHT_ONLY_LAYERS + RECURRENT_LAYERS)
        ]
        return int8, floating

    dynamic_layers = (nn.Linear,)  # LSTM/GRU have no int8 kernel under Inductor: they stay float, named

    def quantize_dynamic(
        self,
        module: nn.Module,
        layers: tuple[type, ...] = DYNAMIC_LAYERS,
        call: tuple[tuple, dict] | None = None,
        skip_names: Sequence[str] = (),
    ) -> nn.Module:
        """``module`` exported from ``call``, its Linear layers annotated by ``X86InductorQuantizer``'s dynamic
        config (int8 weights per channel; activations quantized per tensor from each call's own range) and
        compiled by Inductor into oneDNN's int8 matrix products: no torch.ao, no calibration.

        Layers whose inputs in ``call`` lie wholly above or below zero stay float: Inductor's fused dynamic int8
        Linear (torch 2.14.1, torchao 0.18) computes them wrong where its reference graph is right (inputs uniform in
        [1, 2]: outputs off by 1.2 at a magnitude of 2.9, against 0.01 for the reference; [0, 1] and [-1, 1] agree).

        Measured beside torchao's other int8 paths (AVX-512 VNNI, one thread, an MLP 512 -> 2048 -> 512 on 128
        tokens, fp32 6.6 ms): this 1.84 ms, torch.ao's fbgemm dynamic Linear 1.62 ms,
        ``Int8DynamicActivationInt8WeightConfig`` under ``torch.compile`` 2.86 ms (eager 3.1 ms)."""
        if nn.Linear not in layers or not any(isinstance(child, nn.Linear) for child in module.modules()):
            return module
        if call is None:
            raise ValueError("backend='x86_inductor' exports what it quantizes: dynamic int8 needs the module's inputs")
        args, kwargs = on_cpu(call)
        float_module = copy.deepcopy(module).cpu().eval()
        one_signed = _inputs_of_one_sign(float_module, args, kwargs)
        exported, added = _export(float_module, args, kwargs)
        graph = prepare_pt2e(exported, self._quantizer(False, [*skip_names, *one_signed], dynamic=True))
        with torch.no_grad():
            graph(*args, **{**kwargs, **added})  # the weights' observers see the weights (activations need no range)
        with compat.quick_conv_batch_norm_rewrites():
            converted = convert_pt2e(graph)
        _drop_unused_tensors(converted)
        return CompiledProgram(converted, added)


def _recording_batch_norm(name: str, node: Any, graph: GraphModule, record: BatchNormRecord) -> Callable[..., Any]:
    """A stand-in for the BatchNorm op of ``node`` that shows ``record`` what the op is given, then runs it."""
    running_mean, running_var = (operator.attrgetter(node.args[index].target)(graph) for index in (3, 4))
    eps = float(node.args[7]) if len(node.args) > 7 else 1e-5

    def batch_norm(inputs: torch.Tensor, *arguments: Any) -> Any:
        record(name, inputs, running_mean, running_var, eps)
        return _BATCH_NORM(inputs, *arguments)

    batch_norm.batch_norm = _BATCH_NORM  # how the context that swapped it in finds it again
    return batch_norm


def _inputs_of_one_sign(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> list[str]:
    """Names of ``module``'s Linear layers whose input, in this call, holds no zero between its smallest and largest
    value (every value above zero, or every value below): those the dynamic int8 kernel gets wrong."""
    ranges: dict[str, tuple[float, float]] = {}

    def record(name: str, inputs: tuple) -> None:  # returns None: a pre-hook's result would replace the inputs
        ranges.setdefault(name, (float(inputs[0].min()), float(inputs[0].max())))

    handles = [
        layer.register_forward_pre_hook(lambda _layer, inputs, name=name: record(name, inputs))
        for name, layer in module.named_modules()
        if isinstance(layer, nn.Linear)
    ]
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return [name for name, (low, high) in ranges.items() if low > 0 or high < 0]


def _drop_unused_tensors(graph: GraphModule) -> None:
    """Delete the parameters and buffers no node reads: conversion stores each weight again in int8 and leaves
    the fp32 original behind (resnet18: 56.7 MB saved instead of 12)."""
    graph.graph.eliminate_dead_code()
    graph.recompile()
    used = {node.target for node in graph.graph.nodes if node.op == "get_attr"}
    for name in [name for name, _ in graph.named_parameters()] + [name for name, _ in graph.named_buffers()]:
        if name not in used:
            owner_name, _, attribute = name.rpartition(".")
            delattr(graph.get_submodule(owner_name) if owner_name else graph, attribute)
