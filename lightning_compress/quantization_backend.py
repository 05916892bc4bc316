"""The seam between the quantization callbacks (*when*) and a quantization library (*how*).

``QuantizationAwareTraining``, ``PostTrainingQuantization``, the sensitivity study and the report talk to a
``QuantizationBackend`` and to nothing else that quantizes. A backend is chosen by the type of its frozen
config, as torchao chooses a handler by config type: ``QuantizationConfig`` is ``torch.ao``'s FX graph mode
(``fx_quantization``), ``InductorQuantizationConfig`` is torchao's pt2e flow with ``X86InductorQuantizer``
(``pt2e_quantization``). The two modules register themselves below; ``quantization_config`` turns the
``backend`` setting users write (``"x86"``, ``"x86_inductor"``) into the right config.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from lightning_compress.inputs import same_outputs

QUANTIZABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layers with int8 weights and activations."""

WEIGHT_ONLY_LAYERS = (nn.Embedding,)
"""Layers with int8 weights only: a lookup has no activation to quantize."""

RECURRENT_LAYERS = (nn.LSTM, nn.GRU)

DYNAMIC_LAYERS = (nn.Linear, *RECURRENT_LAYERS)
"""Layers that dynamic quantization can give int8 weights, their activations quantized at each call."""

_FX_MODULE = "lightning_compress.fx_quantization"
_FLOWS = {
    # backend name -> (module that defines its config, the config class, the package it needs)
    "x86_inductor": ("lightning_compress.pt2e_quantization", "InductorQuantizationConfig", "torchao"),
    "x86": (_FX_MODULE, "QuantizationConfig", "torch"),
    "fbgemm": (_FX_MODULE, "QuantizationConfig", "torch"),
    "qnnpack": (_FX_MODULE, "QuantizationConfig", "torch"),
}
BACKEND_NAMES = tuple(_FLOWS)

DEFAULT_BACKEND = "x86_inductor"
"""The engine the callbacks quantize with unless told otherwise: torchao's pt2e flow. It exports whole transformers
(FX graph mode cannot trace them), its QAT is as accurate, its int8 CNNs run close to FX's (0.7x to 1.1x its speed
on AVX-512 VNNI, faster at 224x224 on AVX2: the QAT benchmark), and it does not rest on torch.ao.quantization, which
PyTorch deprecates and will remove."""

BatchNormRecord = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor, float], None]
"""What ``QuantizationBackend.batch_norm_inputs`` shows each BatchNorm call to: its name, input, running mean,
running variance and epsilon."""

FX_DEPRECATION = (
    "is torch.ao's FX graph mode, which PyTorch deprecates and will remove (torch.ao.quantization and quantized "
    "tensors); the default, backend='x86_inductor' (torchao's pt2e flow, models exported with torch.export), replaces it"
)


def quantization_config(backend: str, **settings: Any) -> Any:
    """The config of the flow that ``backend`` names, built from ``settings`` (each config checks them).

    ``x86_inductor`` (the default) is torchao's pt2e flow, whose int8 model runs under ``torch.compile``;
    ``x86``, ``fbgemm`` and ``qnnpack`` are torch.ao's FX flow on those int8 engines: chosen by name only, with one
    ``FutureWarning`` each time, and refused in one line where this torch no longer has it.
    """
    if backend not in _FLOWS:
        raise ValueError(f"backend={backend!r} is unknown: allowed values are {list(BACKEND_NAMES)}.")
    module_name, class_name, package = _FLOWS[backend]
    if importlib.util.find_spec(package) is None:
        raise ValueError(f"backend={backend!r} needs the {package!r} package: pip install {package}.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if module_name != _FX_MODULE:
            raise
        raise ValueError(
            f"backend={backend!r} is torch.ao's FX graph mode, which this torch no longer has ({error}); "
            f"use the default, backend={DEFAULT_BACKEND!r}."
        ) from None
    if module_name == _FX_MODULE:
        warnings.warn(f"backend={backend!r} {FX_DEPRECATION}.", FutureWarning, stacklevel=_first_caller_outside_package())
    return getattr(module, class_name)(backend=backend, **settings)


def _first_caller_outside_package() -> int:
    """The ``stacklevel`` at which a warning issued by this module's caller names the user's line (the callback's
    construction in their script, or Hydra's), not a line of this package."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(2), 2
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def chosen_config(config: Any | None, owner: type, backend: str, **settings: Any) -> Any:
    """The config a callback of class ``owner`` quantizes with: ``config`` itself, a config object as torchao takes
    (``LowBitLinearConfig``, say), or else the one that ``backend`` and the flow's ``settings`` build. With
    ``config``, those settings must keep ``owner``'s defaults: they would say something else."""
    if config is None:
        return quantization_config(backend, **settings)
    _register_builtin_backends()
    if type(config) not in _BACKENDS:
        known = [config_type.__name__ for config_type in _BACKENDS]
        raise ValueError(f"config={config!r} is not a quantization config: known types are {known}.")
    defaults = {name: parameter.default for name, parameter in inspect.signature(owner.__init__).parameters.items()}
    for name, value in {"backend": backend, **settings}.items():
        if value != defaults[name]:
            raise ValueError(
                f"{name}={value!r} is a setting of the backend= flows; with config={type(config).__name__}(...), which says "
                "how to quantize, leave it at its default."
            )
    return config


def config_from_state(state: dict[str, Any]) -> Any:
    """The config a checkpoint recorded (``config_type``, ``config_version`` and its fields); checkpoints
    written before backends were recorded hold an FX ``QuantizationConfig``."""
    _register_builtin_backends()
    fields = dict(state["config"])
    config_class = _BACKENDS_BY_NAME.get(state.get("config_type", "QuantizationConfig"))
    if config_class is None:
        backend = fields.get("backend", "x86")
        config_class = type(quantization_config(backend)) if backend in _FLOWS else None
    if config_class is None:
        raise ValueError(f"the checkpoint's quantization config {state.get('config_type')!r} is unknown to this version.")
    version = state.get("config_version", 1)
    if version > config_class.version:
        raise ValueError(
            f"the checkpoint's {config_class.__name__} is version {version}; this lightning-compress reads up to "
            f"{config_class.version}: upgrade it."
        )
    upgrade = getattr(config_class, "fields_as_written", None)
    return config_class(**(upgrade(fields, version) if upgrade is not None else fields))


def config_state(config: Any) -> dict[str, Any]:
    """What a checkpoint records of ``config``: its fields, its type and the version of that type."""
    return {"config": asdict(config), "config_type": type(config).__name__, "config_version": type(config).version}


def check_backend_exports(backend: QuantizationBackend, export_format: str | Sequence[str] | None) -> tuple[str, ...]:
    """The export formats asked for (``None``: the backend's own), each one the backend can write."""
    from lightning_compress.export import check_export_format

    formats = check_export_format(backend.native_export if export_format is None else export_format)
    for name in formats:
        if name not in backend.export_formats:
            raise ValueError(
                f"export_format={name!r} is not written by backend={backend.name!r}: it writes {list(backend.export_formats)}"
                + (" (torch_export needs backend='x86_inductor')." if name == "torch_export" else ".")
            )
    return formats


@runtime_checkable
class HoldsFakeQuant(Protocol):
    """A callback that has put fake-quant into the module it trains (``QuantizationAwareTraining``). Another
    callback that ships a copy of the module (channel pruning's ``pruned_model``) asks it for the float one."""

    @property
    def prepared_names(self) -> list[str]:
        """The parts of the module that hold fake-quant (none: the module is as it was)."""
        ...

    def float_model(self, pl_module: nn.Module) -> nn.Module:
        """A plain float copy of ``pl_module`` with its current weights, on the CPU, in eval mode."""
        ...

    @property
    def hides_layers(self) -> bool:
        """Whether a prepared part holds its layers' parameters without the layers (an exported graph): their
        kinds are then read from ``float_model``."""
        ...

    def parameter_name(self, name: str) -> str:
        """The name in the live module of the parameter ``name`` of its float model."""
        ...


_BACKENDS: dict[type, type[QuantizationBackend]] = {}
_BACKENDS_BY_NAME: dict[str, type] = {}


def register_backend(config_type: type):
    """Class decorator: the backend that handles configs of ``config_type``."""

    def register(backend_class: type[QuantizationBackend]) -> type[QuantizationBackend]:
        _BACKENDS[config_type] = backend_class
        _BACKENDS_BY_NAME[config_type.__name__] = config_type
        return backend_class

    return register


def backend_for(config: Any) -> QuantizationBackend:
    """The backend that handles ``config``, chosen by its type."""
    _register_builtin_backends()
    backend_class = _BACKENDS.get(type(config))
    if backend_class is None:
        raise TypeError(f"no quantization backend handles {type(config).__name__}; known: {[t.__name__ for t in _BACKENDS]}.")
    return backend_class(config)


class QuantizationBackend(ABC):
    """How one quantization library inserts fake-quant, observes, converts and exports.

    A part (a network, or a submodule of one) goes through ``prepare_qat`` (or ``prepare_ptq``), trains or
    calibrates with the switches below, and becomes int8 through ``convert``; ``restore_qat`` rebuilds the
    prepared structure of a checkpoint before its weights load. ``prepare_*`` raise when a part cannot be
    handled; the callbacks then try its children and, last, swap its layers (``module_swap``).
    """

    native_export: ClassVar[str]
    """The export format that holds this backend's int8 model and runs with torch alone."""

    export_formats: ClassVar[tuple[str, ...]]
    """Every export format this backend can write."""

    prepares_whole_forward: ClassVar[bool] = False
    """Whether a LightningModule's own forward over several networks can be prepared as one graph."""

    keeps_layer_modules: ClassVar[bool] = True
    """Whether a prepared part still holds Conv/Linear modules (an exported graph holds only their parameters)."""

    def prepared_name(self, name: str) -> str:
        """The name in a part this backend prepared of what was the part's own parameter ``name``."""
        return name

    has_ranges: ClassVar[bool] = True
    """Whether observers learn ranges that calibration sets and a freeze can stop (static int8 grids do;
    per-call dynamic scales do not)."""

    swaps_modules: ClassVar[bool] = False
    """Whether ``prepare_qat`` swaps layers itself, without tracing: its failure is then no reason to try a
    part's children or the FX module swap instead."""

    def __init__(self, config: Any) -> None:
        self.config = config

    @property
    def name(self) -> str:
        return self.config.backend

    def activate(self) -> None:
        """Process-wide settings the int8 kernels need (the engine of torch.ao's quantized ops)."""
        return None

    def check_settings(self, training: bool) -> None:
        """Raise if the config asks for something this backend cannot do in QAT (``training``) or PTQ."""
        return None

    def check_layers(self, module: nn.Module, prefix: str, skip_names: list[str], skip_types: list[type]) -> None:
        """Raise, naming the layer (``prefix`` is ``module``'s name), if a layer it would quantize cannot be:
        called before training, so that a setting that cannot work fails at once."""
        return None

    def conversion_note(self) -> str:
        """What the parts table says of every converted part (how its weights are stored, what runs them)."""
        return ""

    # ---------------------------------------------------------------- preparing

    @abstractmethod
    def prepare_qat(
        self, module: nn.Module, args: tuple, kwargs: dict[str, Any], skip_names: list[str], skip_types: list[type]
    ) -> nn.Module:
        """``module`` with fake-quant inserted for training, sharing its parameters; raises if it cannot be."""

    @abstractmethod
    def restore_qat(self, module: nn.Module, inputs: Any, skip_names: list[str], skip_types: list[type]) -> nn.Module:
        """``prepare_qat`` without data: ``inputs`` is what ``input_record`` kept when the part was prepared."""

    def input_record(self, args: tuple, kwargs: dict[str, Any]) -> Any:
        """What ``restore_qat`` needs to know about a part's inputs, kept in the checkpoint (``None``: nothing)."""
        return None

    @abstractmethod
    def prepare_ptq(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], skip_names: list[str]) -> nn.Module:
        """An eval-mode copy of ``module`` with observers inserted: run calibration data through it, then ``convert``."""

    @abstractmethod
    def is_prepared(self, module: nn.Module) -> bool: ...

    # ---------------------------------------------------------------- the schedule's switches

    @abstractmethod
    def set_fake_quant(self, module: nn.Module, enabled: bool) -> None: ...

    @abstractmethod
    def set_observers(self, module: nn.Module, enabled: bool) -> None: ...

    @abstractmethod
    def freeze_batch_norm(self, module: nn.Module) -> None:
        """Stop updating the running statistics of BatchNorm trained fused with a convolution."""

    def batch_norms_to_freeze(self, module: nn.Module) -> list[tuple[str, nn.Module]]:
        """The BatchNorm layers ``freeze_batch_norm`` will freeze, by name (to check their statistics first)."""
        return []

    @contextlib.contextmanager
    def batch_norm_inputs(self, module: nn.Module, record: BatchNormRecord) -> Iterator[None]:
        """While open, each call of a BatchNorm that ``freeze_batch_norm`` will freeze is shown to ``record`` (its
        name, input, running mean, running variance and epsilon): the callback checks, on one training batch, that
        the statistics it is about to freeze describe the network. Here through the layers ``batch_norms_to_freeze``
        names; a backend whose BatchNorm is no module (an exported graph's op) watches its own way."""
        handles = [
            batch_norm.register_forward_pre_hook(
                lambda layer, args, name=name: record(name, args[0], layer.running_mean, layer.running_var, layer.eps)
            )
            for name, batch_norm in self.batch_norms_to_freeze(module)
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    # ---------------------------------------------------------------- results

    @abstractmethod
    def convert(self, prepared: nn.Module) -> nn.Module:
        """An int8 copy of a prepared (and trained or calibrated) part, on the CPU; ``prepared`` is untouched."""

    @abstractmethod
    def layers_by_kind(self, converted: nn.Module) -> tuple[list[str], list[str]]:
        """Layers of a converted part that run int8 kernels, and Conv/Linear/Embedding/LSTM/GRU left in float."""

    def fake_quant_for_export(self, prepared: nn.Module) -> nn.Module:
        """A prepared part written as ONNX's QuantizeLinear/DequantizeLinear and OpenVINO read it."""
        raise NotImplementedError(f"backend={self.name!r} writes no ONNX/OpenVINO export")

    dynamic_layers: ClassVar[tuple[type, ...]] = ()
    """The layer types ``quantize_dynamic`` gives int8 weights and per-call activation scales; others stay float."""

    def quantize_dynamic(
        self,
        module: nn.Module,
        layers: tuple[type, ...] = DYNAMIC_LAYERS,
        call: tuple[tuple, dict] | None = None,
        skip_names: Sequence[str] = (),
    ) -> nn.Module:
        """An int8 copy of ``module`` (CPU, eval) whose ``layers`` of the ``dynamic_layers`` types store int8 weights
        and quantize activations at each call, except the submodules ``skip_names`` names (relative to ``module``);
        ``call`` (args, kwargs) is an observed call of ``module``, which a backend that exports needs. Without such
        layers ``module`` itself comes back, unchanged."""
        return module

    # ---------------------------------------------------------------- shared by every backend

    @staticmethod
    def has_quantizable_layers(module: nn.Module) -> bool:
        return any(isinstance(child, QUANTIZABLE_LAYERS + WEIGHT_ONLY_LAYERS) for child in module.modules())

    @staticmethod
    def has_recurrent_layers(module: nn.Module) -> bool:
        return any(isinstance(child, RECURRENT_LAYERS) for child in module.modules())

    @staticmethod
    def tensor_names(original: nn.Module, prepared: nn.Module) -> dict[str, str]:
        """Map each parameter/buffer name of ``original`` to its name in ``prepared``: the same tensor, or a
        tensor on the same memory (a QAT layer may wrap the weight it is given in a new Parameter)."""
        by_identity = {id(tensor): name for name, tensor in _tensors(prepared)}
        by_memory = {_memory(tensor): name for name, tensor in _tensors(prepared) if isinstance(tensor, torch.Tensor)}
        names = {}
        for name, tensor in _tensors(original):
            prepared_name = by_identity.get(id(tensor))
            if prepared_name is None and isinstance(tensor, torch.Tensor):
                prepared_name = by_memory.get(_memory(tensor))
            if prepared_name is None:
                raise RuntimeError(f"tensor {name!r} was not carried into the prepared module")
            names[name] = prepared_name
        return names

    def check_same_output(self, module: nn.Module, prepared: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        """Raise unless ``prepared``, with fake-quant and observers off, computes what ``module`` does on a call.

        A trace that silently took one branch of Python control flow, or made a placeholder of an argument given as
        ``None`` (transformers' ``inputs_embeds``), would compute something else, or fail, on the calls training makes.
        """
        self.set_fake_quant(prepared, enabled=False)
        self.set_observers(prepared, enabled=False)
        was_training = module.training
        module.eval()
        prepared.eval()
        try:
            with torch.no_grad():
                expected, actual = module(*args, **kwargs), prepared(*args, **kwargs)
            if not same_outputs(expected, actual):
                raise RuntimeError("the traced graph computes a different output (data-dependent control flow?)")
        finally:
            module.train(was_training)
            prepared.train(was_training)
            self.set_fake_quant(prepared, enabled=True)
            self.set_observers(prepared, enabled=True)

    @staticmethod
    def float_copy(template: nn.Module, prepared: nn.Module, names: dict[str, str]) -> nn.Module:
        """``template`` (a float module, its tensors on the meta device: see ``structure_only``) filled with copies,
        on the CPU, of the current weights of ``prepared``; ``names`` maps template tensor names to prepared ones
        (see ``tensor_names``: fusion renames BN tensors, not the tensors). Tied parameters stay tied."""
        state = prepared.state_dict()
        float_module = copy.deepcopy(template)
        values = {name: state[prepared_name].detach().to("cpu", copy=True) for name, prepared_name in names.items()}
        float_module.load_state_dict(values, assign=True)
        _tie_as(float_module, template)
        return float_module.eval()


def structure_only(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose parameters and persistent buffers are on the meta device: its structure, shapes,
    dtypes and tied parameters, without the memory of a second model. What a QAT part's float version is rebuilt
    from (``float_copy``), kept for the whole fit; a whole copy would cost every process one more model. Buffers no
    state_dict carries (transformers' position ids, say) stay as they are: nothing would fill them again."""
    memo: dict[int, Any] = {}
    for parameter in module.parameters():  # a tied parameter once: its copies stay one parameter
        memo[id(parameter)] = nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad)
    for owner in module.modules():
        for name, buffer in owner._buffers.items():
            if buffer is not None and name not in owner._non_persistent_buffers_set:
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
    return copy.deepcopy(module, memo)


def _tie_as(module: nn.Module, template: nn.Module) -> None:
    """Give ``module`` the parameter ties ``template`` has (an embedding shared with an output layer): a state_dict
    loads each name into a parameter of its own."""
    names_by_parameter: dict[int, list[str]] = {}
    for name, parameter in template.named_parameters(remove_duplicate=False):
        names_by_parameter.setdefault(id(parameter), []).append(name)
    for first, *others in (names for names in names_by_parameter.values() if len(names) > 1):
        shared = module.get_parameter(first)
        for name in others:
            owner, _, attribute = name.rpartition(".")
            setattr(module.get_submodule(owner), attribute, shared)


def _memory(tensor: torch.Tensor) -> tuple:
    return tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride())


def _tensors(module: nn.Module) -> list[tuple[str, Any]]:
    return list(module.state_dict(keep_vars=True).items())


def _register_builtin_backends() -> None:
    """Import the backend modules so that they register; pt2e only where torchao is installed."""
    try:
        importlib.import_module(_FX_MODULE)
    except ImportError:  # torch.ao.quantization is gone (or its FX flow is): the torch.export engine remains
        pass
    if importlib.util.find_spec("torchao") is not None:
        importlib.import_module("lightning_compress.pt2e_quantization")
        importlib.import_module("lightning_compress.lowbit_quantization")
