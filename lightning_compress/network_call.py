"""How training calls the user's network, as the exporters, the runtimes and the report must call it too.

A LightningModule's ``training_step`` decides how its network is called: ``self(images)``, or
``self.model(**batch)`` with a transformers model and a dict batch, or a keyword-only ``forward(*, pixels,
scale)``. A ``NetworkCall`` is one such call observed on a real training batch: which network (the
LightningModule's own forward, or the submodule the step called itself), its arguments, each tensor among them
named after the argument it is passed as (``input_ids``, ``attention_mask``), and the targets taken out (a
``labels`` argument that the network takes only to compute its loss: shipped models are not given labels).

``flat_network`` makes the module the exporters write from it: the named tensors in, in order, the output's
tensors out, named after where they sat (a transformers ``ModelOutput``, a dataclass, a dict or a tuple become
``logits``, ``output_0`` and so on). Exports take their input and output names, and their dynamic batch and
sequence dimensions, from here.
"""

from __future__ import annotations

import dataclasses
import inspect
import keyword
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.utils._pytree as pytree
from torch import nn

from lightning_compress.inputs import (
    Call,
    TrainingStepError,
    first_line,
    on_cpu,
    outermost_calls,
    training_batches,
    transfer_batch,
)

TARGET_NAMES = ("labels", "label", "targets", "target")
"""Arguments that hold what the network is trained to predict: left out of a shipped model's inputs when the
network's forward can go without them (they only feed its loss)."""


@dataclass(frozen=True)
class CallLayout:
    """Where each tensor of a call sits among its arguments, and its name; everything else in the call (flags,
    ``None``) is kept as a constant. Holds no tensor: shared by an exported module and the runtimes."""

    input_names: tuple[str, ...]
    spec: pytree.TreeSpec
    constants: tuple[Any, ...]  # the call's leaves, with None where a tensor goes
    tensor_positions: tuple[int, ...]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict[str, Any]]:
        """The arguments ``(args, kwargs)`` of a call with ``tensors`` in the places of the observed one's."""
        leaves = list(self.constants)
        for position, tensor in zip(self.tensor_positions, tensors, strict=True):
            leaves[position] = tensor
        return pytree.tree_unflatten(leaves, self.spec)

    def tensors(self, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
        """The tensors of a call laid out as the observed one, in input order."""
        tensors = call_tensors(args, kwargs)
        if len(tensors) != len(self.input_names):
            raise ValueError(f"the call holds {len(tensors)} tensors; the network was exported with {list(self.input_names)}")
        return tensors


@dataclass(frozen=True)
class NetworkCall:
    """One call of the user's network, as ``training_step`` made it (targets taken out into ``targets``).

    ``path`` is where the network sits in the LightningModule: ``""`` for the module's own forward, else the
    submodule the step called (``"model"`` for ``self.model(**batch)``).
    """

    path: str
    args: tuple
    kwargs: dict[str, Any]
    layout: CallLayout
    targets: torch.Tensor | None = None

    @classmethod
    def of(cls, network: nn.Module, path: str, args: tuple, kwargs: dict[str, Any]) -> NetworkCall:
        """The call ``network(*args, **kwargs)``, its targets taken out and its tensors named."""
        kwargs = {**kwargs, **whole_sequence_arguments(network, kwargs)}
        target_name = target_argument(network, kwargs)
        targets = kwargs.pop(target_name) if target_name else None
        args = tuple(args)
        paths_and_leaves, spec = pytree.tree_flatten_with_path((args, kwargs))
        positional = _positional_names(network)
        names, positions = [], []
        for position, (path_keys, leaf) in enumerate(paths_and_leaves):
            if isinstance(leaf, torch.Tensor):
                names.append(_input_name(path_keys, positional))
                positions.append(position)
        constants = tuple(None if isinstance(leaf, torch.Tensor) else leaf for _, leaf in paths_and_leaves)
        layout = CallLayout(tuple(_unique(names)), spec, constants, tuple(positions))
        return cls(path, args, kwargs, layout, targets)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.layout.input_names

    def tensors(self) -> list[torch.Tensor]:
        return self.layout.tensors(self.args, self.kwargs)

    @property
    def batch_size(self) -> int | None:
        return next((tensor.shape[0] for tensor in self.tensors() if tensor.dim() > 0), None)

    def network(self, model: nn.Module) -> nn.Module:
        """The network this call goes to inside ``model``: a LightningModule (the trained module, or a compressed
        copy of it) holds it at ``path``; anything else (a runtime's model, a bare network) is called itself."""
        if self.path and isinstance(model, L.LightningModule):
            return model.get_submodule(self.path)
        return model

    def run(self, model: nn.Module) -> Any:
        """Call ``model``'s network as training did."""
        return self.network(model)(*self.args, **self.kwargs)

    def sample(self, count: int = 1) -> NetworkCall:
        """The same call on the first ``count`` samples of the batch: every tensor whose first dimension is the
        batch's is cut there."""
        batch = self.batch_size
        args, kwargs = pytree.tree_map_only(
            torch.Tensor,
            lambda tensor: tensor[:count] if tensor.dim() > 0 and tensor.shape[0] == batch else tensor,
            (self.args, self.kwargs),
        )
        targets = self.targets[:count] if self.targets is not None and self.targets.dim() > 0 else self.targets
        return dataclasses.replace(self, args=args, kwargs=kwargs, targets=targets)

    def on_cpu(self) -> NetworkCall:
        args, kwargs = on_cpu((self.args, self.kwargs))
        return dataclasses.replace(self, args=args, kwargs=kwargs, targets=on_cpu(self.targets))

    def dynamic_dimensions(self) -> dict[str, dict[int, str]]:
        """Each input's dimensions that may change between calls (see ``varying_dimensions``), by input name."""
        return dict(zip(self.input_names, varying_dimensions(self.tensors()), strict=True))

    def shorter(self) -> NetworkCall | None:
        """The call with its sequences cut to three quarters of their length (``None`` without a sequence): how an
        export shows that its sequence dimension is free."""
        dynamic = self.dynamic_dimensions()
        if not any(1 in dims for dims in dynamic.values()):
            return None
        return self.with_tensors(
            [
                tensor[:, : max(1, 3 * tensor.shape[1] // 4)] if 1 in dynamic[name] else tensor
                for name, tensor in zip(self.input_names, self.tensors(), strict=True)
            ]
        )

    def with_tensors(self, tensors: Sequence[torch.Tensor]) -> NetworkCall:
        """The same call with other tensors in its inputs' places (an image resized, say)."""
        args, kwargs = self.layout.rebuild(tensors)
        return dataclasses.replace(self, args=args, kwargs=kwargs)


def call_tensors(args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors of the call ``(*args, **kwargs)``, in input order (nested containers flattened)."""
    return [leaf for leaf in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(leaf, torch.Tensor)]


def varying_dimensions(tensors: Sequence[torch.Tensor]) -> list[dict[int, str]]:
    """The dimensions of each of a call's tensors that may change between calls: the batch (the first dimension,
    where it is the batch's size: the first tensor's) and the sequence (the second, where it is as long as that of
    a 2-D integer tensor: token ids and their masks). An image's sides stay as observed."""
    batch = next((tensor.shape[0] for tensor in tensors if tensor.dim() > 0), None)
    sequence = next(
        (tensor.shape[1] for tensor in tensors if tensor.dim() == 2 and not tensor.is_floating_point() and tensor.shape[1] > 1),
        None,
    )
    dimensions = []
    for tensor in tensors:
        varying = {0: "batch"} if tensor.dim() > 0 and tensor.shape[0] == batch else {}
        if sequence is not None and tensor.dim() >= 2 and tensor.shape[1] == sequence:
            varying[1] = "sequence"
        dimensions.append(varying)
    return dimensions


def export_dynamic_shapes(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``dynamic_shapes`` for ``torch.export.export(module, args, kwargs)``, by argument name: the batch and sequence
    dimensions of every tensor (``varying_dimensions``) left to the exporter (``Dim.AUTO``: a network that fixes one
    keeps it fixed), everything else as traced."""
    leaves, spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    varying = iter(varying_dimensions([leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]))
    shapes = [
        {dim: torch.export.Dim.AUTO for dim in next(varying)} or None if isinstance(leaf, torch.Tensor) else None
        for leaf in leaves
    ]
    shaped_args, shaped_kwargs = pytree.tree_unflatten(shapes, spec)
    return dict(inspect.signature(module.forward).bind(*shaped_args, **shaped_kwargs).arguments)


def observe_network_call(trainer: L.Trainer, module: L.LightningModule) -> NetworkCall | str:
    """The call ``training_step`` makes into the user's network on the first training batch, or why there is no
    single one: the module's own forward if the step calls it, else the one submodule with trainable parameters
    that the step calls itself (``self.model(**batch)``). A frozen teacher or a metric the step also calls is not
    the network."""
    try:
        calls = outermost_calls(module, training_batches(trainer, module, 1))[0]
    except TrainingStepError as error:
        return first_line(error)
    networks: dict[str, Call] = {}
    for name, call in calls:
        submodule = module.get_submodule(name) if name else module
        if name == "" or any(parameter.requires_grad for parameter in submodule.parameters()):
            networks.setdefault(name, call)
    if "" in networks:
        return NetworkCall.of(module, "", *networks[""])
    if not networks:
        return "training_step calls no network with trainable parameters"
    if len(networks) > 1:
        return (
            f"training_step calls {', '.join(networks)} one after another, not one network; call them from the "
            "LightningModule's forward, and that from training_step"
        )
    [(name, call)] = networks.items()
    return NetworkCall.of(module.get_submodule(name), name, *call)


def test_calls(trainer: L.Trainer, module: L.LightningModule, dataloader: Iterable) -> list[NetworkCall]:
    """Each batch of ``dataloader`` as the call ``training_step`` makes of it into the network (see
    ``observe_network_call``), on the CPU, with its targets: the call's own (``labels=``) or else the batch's (its
    ``labels`` entry, or the last item of a tuple). How the report feeds every model, whatever its forward takes.

    Raises ``ValueError`` naming why when there is no one network to call.
    """
    observed = observe_network_call(trainer, module)
    if isinstance(observed, str):
        raise ValueError(f"the report cannot call the trained network as training does: {observed}.")
    network = observed.network(module)
    batches = [transfer_batch(trainer, module, batch) for batch in dataloader]
    calls = []
    for batch, per_batch in zip(batches, outermost_calls(module, batches), strict=True):
        arguments = next((call for name, call in per_batch if name == observed.path), None)
        if arguments is None:
            raise ValueError(
                f"the report cannot call the trained network: training_step did not call {observed.path} on a test batch."
            )
        call = NetworkCall.of(network, observed.path, *arguments)
        if call.targets is None:
            call = dataclasses.replace(call, targets=_batch_targets(batch))
        calls.append(call.on_cpu())
    return calls


def _batch_targets(batch: Any) -> torch.Tensor | None:
    """The labels of a batch: its entry under one of ``TARGET_NAMES``, or the last item of a tuple or list."""
    if isinstance(batch, Mapping):
        return next((batch[name] for name in TARGET_NAMES if isinstance(batch.get(name), torch.Tensor)), None)
    if isinstance(batch, list | tuple) and len(batch) > 1 and isinstance(batch[-1], torch.Tensor):
        return batch[-1]
    return None


def target_argument(network: nn.Module, kwargs: dict[str, Any]) -> str | None:
    """The keyword among ``kwargs`` that gives ``network`` its targets (``labels=``), which its forward can go
    without: the network then computes its loss itself, as transformers' models do."""
    return next(
        (name for name in TARGET_NAMES if isinstance(kwargs.get(name), torch.Tensor) and _optional_argument(network, name)),
        None,
    )


def computes_its_loss(network: nn.Module, kwargs: dict[str, Any]) -> str | None:
    """Why ``network``, called with ``kwargs``, is quantized as its children rather than whole, or ``None``: its
    forward computes the loss from targets (``labels=``), and the int8 model is called without them (a graph
    traced with them would need them); its children are what computes the prediction."""
    name = target_argument(network, kwargs)
    if name is None or not any(True for _ in network.children()):
        return None
    return f"its forward computes the loss from {name}=, which the int8 model is called without: its children are quantized"


# ---------------------------------------------------------------------- outputs


def named_outputs(output: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a network's output, each named after where it sits: ``output`` for a lone tensor,
    ``output_0``... for a tuple, the keys of a dict or of a transformers ``ModelOutput``, the fields of a
    dataclass; nested ones joined by ``_``."""
    return [(name or "output", tensor) for name, tensor in _named(output, "")]


def _named(value: Any, prefix: str) -> list[tuple[str, torch.Tensor]]:
    join = lambda key: f"{prefix}_{key}" if prefix else str(key)  # noqa: E731 - a one-line naming rule
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, Mapping):  # a ModelOutput is one, and leaves out its None fields
        return [pair for key, item in value.items() for pair in _named(item, join(key))]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [pair for field in dataclasses.fields(value) for pair in _named(getattr(value, field.name), join(field.name))]
    if isinstance(value, list | tuple):
        keys = (
            value._fields
            if hasattr(value, "_fields")
            else [f"output_{index}" if not prefix else index for index in range(len(value))]
        )
        return [pair for key, item in zip(keys, value, strict=True) for pair in _named(item, join(key))]
    return []


def logits_of(output: Any) -> torch.Tensor | None:
    """What a classifier or language model predicts in ``output``: a lone tensor, else the one named ``logits``,
    else the first."""
    outputs = dict(named_outputs(output))
    return outputs.get("logits", next(iter(outputs.values()), None))


class FlatNetwork(nn.Module):
    """``network`` called as training called it, with the call's tensors as its only arguments (named, in order)
    and the tensors of its output as its result (one tensor, or a tuple in the order of ``output_names``): what
    TorchScript, torch.export, ONNX and OpenVINO write, each with named inputs and outputs."""

    def __init__(self, network: nn.Module, layout: CallLayout, output_names: Sequence[str]) -> None:
        super().__init__()
        self.network = network
        self.layout = layout
        self.output_names = list(output_names)

    def run(self, tensors: tuple[torch.Tensor, ...]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        args, kwargs = self.layout.rebuild(tensors)
        outputs = tuple(tensor for _, tensor in named_outputs(self.network(*args, **kwargs)))
        return outputs[0] if len(outputs) == 1 else outputs


def flat_network(network: nn.Module, call: NetworkCall) -> FlatNetwork:
    """A ``FlatNetwork`` of ``network`` for ``call``, whose ``forward`` takes the call's input names as its
    parameters (torch.export and TorchScript name a graph's inputs after them)."""
    with torch.no_grad():
        output_names = [name for name, _ in named_outputs(network.eval()(*call.args, **call.kwargs))]
    names = call.input_names
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {', '.join(names)}):\n    return self.run(({', '.join(names)},))\n", namespace)  # noqa: S102 - names are identifiers (see _identifier)
    flat_class = type(f"Flat{type(network).__name__}", (FlatNetwork,), {"forward": namespace["forward"]})
    return flat_class(network, call.layout, output_names).eval()


# ---------------------------------------------------------------------- helpers of this module


def _optional_argument(network: nn.Module, name: str) -> bool:
    """Whether ``network``'s forward can be called without the argument ``name`` (it has a default, or the
    forward takes any keyword)."""
    try:
        parameters = inspect.signature(network.forward).parameters
    except (TypeError, ValueError):
        return False
    if name in parameters:
        return parameters[name].default is not inspect.Parameter.empty
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values())


def whole_sequence_arguments(network: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments to add to a call of ``network`` that an export, the report or an int8 graph makes
    over a whole sequence: ``use_cache=False`` where the network takes ``use_cache`` and the call leaves it out.
    transformers' decoders otherwise build a key-value cache for generating token by token, which an exported
    graph cannot return; the logits are the same without it."""
    return {"use_cache": False} if _takes_argument(network, "use_cache") and "use_cache" not in kwargs else {}


def _takes_argument(network: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(network.forward).parameters
    except (TypeError, ValueError):
        return False


def _positional_names(network: nn.Module) -> list[str]:
    try:
        parameters = inspect.signature(network.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [parameter.name for parameter in parameters if parameter.kind in kinds]


def _input_name(path_keys: tuple, positional: list[str]) -> str:
    """``images`` for the first positional argument of ``forward(self, images)``, ``input_ids`` for a keyword,
    ``batch_images`` for a dict's entry; ``input_2`` for the third of ``*args``."""
    (_, position_or_keyword), rest = path_keys[:2], path_keys[2:]
    if isinstance(position_or_keyword, pytree.SequenceKey):  # a positional argument
        index = position_or_keyword.idx
        parts = [positional[index] if index < len(positional) else f"input_{index}"]
    else:
        parts = [str(position_or_keyword.key)]
    for key in rest:
        parts.append(str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key)))))
    return _identifier("_".join(parts))


def _identifier(name: str) -> str:
    name = re.sub(r"\W", "_", name)
    if not name or name[0].isdigit():
        name = f"input_{name}"
    return f"{name}_" if keyword.iskeyword(name) or name in ("self",) else name


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    unique = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        unique.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return unique
