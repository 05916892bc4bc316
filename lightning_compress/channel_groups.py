"""Which output channels must be pruned together, and how to remove them for real.

Removing output channel ``c`` of a convolution also removes channel ``c`` of the BatchNorm after it and
input channel ``c`` of every layer that reads it. Through a residual add, the channels of both operands are
the same channels, so every layer that writes into the add must lose the same ones. ``find_channel_groups``
traces a network with ``torch.fx`` and collects these couplings (union-find over the channel dimension);
a group touching anything it does not understand (the network's input or output, concatenation, a
reshape, a non-zero-preserving op such as sigmoid) is left alone, so that pruning never changes what the
network computes beyond the zeroed channels. ``remove_channels`` then shrinks the layers: the smaller
network computes exactly what the masked one did.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

# Ops that map channel c to channel c and keep zeros zero.
_PASS_THROUGH_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardswish,
    nn.SiLU,
    nn.GELU,
    nn.Tanh,
    nn.Dropout,
    nn.Identity,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_PASS_THROUGH_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.hardswish,
    F.silu,
    F.gelu,
    torch.relu,
    torch.tanh,
    F.dropout,
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}
_PASS_THROUGH_METHODS = {"relu", "relu_", "contiguous", "clone"}
_MERGING_FUNCTIONS = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul}


@dataclass
class ChannelGroup:
    """Channels pruned together: rows of ``producers``, entries of ``norms`` and ``depthwise`` filters,
    and the input slices of ``consumers`` (each with how many features one channel spans there)."""

    size: int
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    depthwise: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    blocked_by: str = ""

    @property
    def prunable(self) -> bool:
        return not self.blocked_by and bool(self.producers)

    def merge(self, other: ChannelGroup) -> None:
        self.producers += other.producers
        self.norms += other.norms
        self.depthwise += other.depthwise
        self.consumers += other.consumers
        self.blocked_by = self.blocked_by or other.blocked_by


class _Groups:
    """Union-find over channel groups."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.groups: list[ChannelGroup] = []

    def new(self, size: int, blocked_by: str = "") -> int:
        self.parent.append(len(self.parent))
        self.groups.append(ChannelGroup(size, blocked_by=blocked_by))
        return len(self.parent) - 1

    def find(self, index: int) -> int:
        while self.parent[index] != index:
            self.parent[index] = self.parent[self.parent[index]]
            index = self.parent[index]
        return index

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a != b:
            if self.groups[a].size != self.groups[b].size:
                self.groups[a].blocked_by = "operands of different widths"
            self.parent[b] = a
            self.groups[a].merge(self.groups[b])
        return a

    def get(self, index: int) -> ChannelGroup:
        return self.groups[self.find(index)]

    def block(self, index: int, reason: str) -> None:
        group = self.get(index)
        group.blocked_by = group.blocked_by or reason

    def roots(self) -> list[ChannelGroup]:
        return [self.groups[i] for i in range(len(self.parent)) if self.find(i) == i]


def find_channel_groups(network: nn.Module, *args: Any, **kwargs: Any) -> list[ChannelGroup]:
    """Trace ``network`` and return its channel groups (prunable or not), its shapes propagated from the
    arguments it was seen called with. Raises if it cannot be traced."""
    traced = fx.symbolic_trace(network)
    was_training = network.training
    traced.eval()  # the traced graph shares the network's BatchNorm layers: their statistics must not move
    try:
        with torch.no_grad():
            ShapeProp(traced).propagate(*args, *kwargs.values())
    finally:
        network.train(was_training)
    modules = dict(traced.named_modules())
    groups = _Groups()
    # node -> (group index, features per channel) for tensors whose dimension 1 is a channel group
    channels: dict[fx.Node, tuple[int, int]] = {}

    def inputs_of(node: fx.Node) -> list[fx.Node]:
        return [arg for arg in node.all_input_nodes if arg in channels]

    def block_inputs(node: fx.Node, reason: str) -> None:
        for arg in inputs_of(node):
            groups.block(channels[arg][0], reason)

    for node in traced.graph.nodes:
        if node.op == "placeholder":
            shape = node.meta["tensor_meta"].shape
            channels[node] = (groups.new(shape[1], blocked_by="network input"), 1)
        elif node.op == "output":
            block_inputs(node, "network output")
        elif node.op == "call_module":
            module = modules[node.target]
            source = channels.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
            if isinstance(module, nn.Conv2d) and module.groups == 1 or isinstance(module, nn.Linear):
                if source is not None:
                    groups.get(source[0]).consumers.append((node.target, source[1]))
                    if isinstance(module, nn.Conv2d) and source[1] != 1:
                        groups.block(source[0], f"{node.target} reads flattened features")
                width = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
                channels[node] = (groups.new(width), 1)
                groups.get(channels[node][0]).producers.append(node.target)
            elif isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels:
                if source is None:
                    continue
                groups.get(source[0]).depthwise.append(node.target)
                channels[node] = source
            elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm1d) and source is not None:
                groups.get(source[0]).norms.append(node.target)
                channels[node] = source
            elif isinstance(module, _PASS_THROUGH_MODULES) and source is not None:
                channels[node] = source
            elif isinstance(module, nn.Flatten) and source is not None:
                channels[node] = _flattened(node, source)
            else:
                block_inputs(node, f"{node.target} ({type(module).__name__})")
        elif node.op in ("call_function", "call_method"):
            target = node.target
            tensor_inputs = inputs_of(node)
            if target in _MERGING_FUNCTIONS and len(tensor_inputs) >= 1:
                repeats = {channels[arg][1] for arg in tensor_inputs}
                merged = channels[tensor_inputs[0]][0]
                for arg in tensor_inputs[1:]:
                    merged = groups.union(merged, channels[arg][0])
                if len(repeats) > 1:
                    groups.block(merged, f"{node.name} mixes layouts")
                channels[node] = (merged, repeats.pop())
            elif (target in _PASS_THROUGH_FUNCTIONS or target in _PASS_THROUGH_METHODS) and tensor_inputs:
                channels[node] = channels[tensor_inputs[0]]
            elif target in (torch.flatten, "flatten") and tensor_inputs:
                channels[node] = _flattened(node, channels[tensor_inputs[0]])
            elif target == "mean" and tensor_inputs and _reduces_spatial_only(node):
                channels[node] = channels[tensor_inputs[0]]
            elif target in (getattr, "size", "dim") or not tensor_inputs:
                continue
            else:
                block_inputs(node, f"{node.name} ({getattr(target, '__name__', target)})")
    return groups.roots()


def _flattened(node: fx.Node, source: tuple[int, int]) -> tuple[int, int]:
    shape = node.all_input_nodes[0].meta["tensor_meta"].shape
    spatial = 1
    for size in shape[2:]:
        spatial *= size
    return source[0], source[1] * spatial


def _reduces_spatial_only(node: fx.Node) -> bool:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    return bool(dims) and all(dim >= 2 or dim < 0 for dim in dims)


def channel_importance(network: nn.Module, group: ChannelGroup, norm: int = 2) -> torch.Tensor:
    """Summed L1/L2 norm of each channel's rows over the group's producers."""
    importance = torch.zeros(group.size)
    for name in group.producers:
        weight = network.get_submodule(name).weight.detach()
        importance += weight.flatten(1).norm(p=norm, dim=1).cpu()
    return importance


def channel_masks(network: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-parameter masks (by name within ``network``) that zero the dropped channels of ``group``.

    Zeroing producer rows and biases, and the affine BatchNorm parameters, makes the dropped channels
    exactly zero downstream, so that removing them later changes nothing.
    """
    masks: dict[str, torch.Tensor] = {}
    for name in group.producers + group.norms + group.depthwise:
        module = network.get_submodule(name)
        for parameter_name in ("weight", "bias"):
            parameter = getattr(module, parameter_name, None)
            if parameter is None:
                continue
            shape = [group.size] + [1] * (parameter.dim() - 1)
            masks[f"{name}.{parameter_name}"] = keep.to(parameter.dtype).reshape(shape).expand_as(parameter).clone()
    return masks


def remove_channels(network: nn.Module, groups: list[ChannelGroup], keeps: list[torch.Tensor]) -> None:
    """Physically drop the channels whose ``keep`` entry is False, in place."""
    for group, keep in zip(groups, keeps, strict=True):
        kept = keep.nonzero().flatten()
        for name in group.producers:
            module = network.get_submodule(name)
            _select(module, "weight", 0, kept)
            _select(module, "bias", 0, kept)
            if isinstance(module, nn.Conv2d):
                module.out_channels = len(kept)
            else:
                module.out_features = len(kept)
        for name in group.depthwise:
            module = network.get_submodule(name)
            _select(module, "weight", 0, kept)
            _select(module, "bias", 0, kept)
            module.in_channels = module.out_channels = module.groups = len(kept)
        for name in group.norms:
            module = network.get_submodule(name)
            for attribute in ("weight", "bias", "running_mean", "running_var"):
                _select(module, attribute, 0, kept)
            module.num_features = len(kept)
        for name, features_per_channel in group.consumers:
            module = network.get_submodule(name)
            columns = (kept[:, None] * features_per_channel + torch.arange(features_per_channel)).flatten()
            _select(module, "weight", 1, columns)
            if isinstance(module, nn.Conv2d):
                module.in_channels = len(kept)
            else:
                module.in_features = len(columns)


def _select(module: nn.Module, attribute: str, dim: int, index: torch.Tensor) -> None:
    tensor = getattr(module, attribute, None)
    if tensor is None:
        return
    selected = tensor.detach().index_select(dim, index.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, attribute, nn.Parameter(selected, requires_grad=tensor.requires_grad))
    else:
        setattr(module, attribute, selected)
