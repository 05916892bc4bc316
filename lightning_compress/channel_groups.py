"""Which output channels must be pruned together, and how to remove them for real.

Removing output channel ``c`` of a convolution also removes channel ``c`` of the BatchNorm after it, input
channel ``c`` of every layer that reads it, the matching slice of a concatenation, the gate channel of a
squeeze-excitation, and, through a residual add, the same channel of every layer writing into the add.
Finding these couplings is Torch-Pruning's ``DependencyGraph`` (Fang et al., CVPR 2023), a maintained library
made for exactly this: it follows autograd on the observed call, so Python control flow is no obstacle, and
it knows grouped and depthwise convolutions, normalization layers, concatenation and attention.

What this module adds is the promise the pruning callback makes: during training the dropped channels are
*masked* (their weights zeroed), and removing them at the end must change nothing. ``channel_masks`` derives
the masks from Torch-Pruning's own removal functions (it removes channels from a copy whose entries hold
their own indices, and zeroes whatever did not survive), so masks and removal cannot disagree on which
entries a channel owns. Where zeroing is not removal (a LayerNorm over channels normalizes over the zeros
too; a group that reaches the network's output changes its shape), ``find_channel_groups`` finds out by
trying: it masks and removes half of each group's channels and compares the outputs, and leaves a group that
differs alone, saying why.

Attention is the exception to following Torch-Pruning's couplings: channels inside a head cannot go (removing them
regroups every head), whole heads can. Where ``attention_heads`` recognizes an attention module, its query, key and
value layers are left out of Torch-Pruning's analysis and its heads form a group of their own, whose "channels"
are key-value heads with the query heads that read them; the same masks, checks and removal serve it.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_compress import attention_heads, model_configs
from lightning_compress.inputs import _tensors_in, first_line, same_outputs
from lightning_compress.network_call import whole_sequence_arguments

ROOT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Layers whose output channels define a group (and whose weight rows rank the group's channels)."""


@dataclass
class _Removal:
    """One removal a group implies: ``handler`` (a Torch-Pruning pruning function) applied to ``target`` (a
    module, or a parameter outside any layer) along ``dim``, at ``indices`` ``(index in target, group channel)``."""

    target: str
    handler: Callable
    dim: int
    indices: list[tuple[int, int]]
    is_parameter: bool = False
    removes_outputs: bool = False


@dataclass
class ChannelGroup:
    """Channels removed together, indexed by the output channels of ``root``.

    ``producers`` are the Conv/Linear layers that lose output channels (``root`` first): their weights rank
    the channels and are the ones reported as pruned. Where a grouped convolution reads the channels, they
    fall into ``blocks`` equal runs, one per convolution group, which must lose the same positions (see
    ``kept_channels``). ``blocked_by`` says why the group is left alone.
    """

    root: str
    size: int
    producers: list[str] = field(default_factory=list)
    removals: list[_Removal] = field(default_factory=list)
    norm_dims: dict[str, int] = field(default_factory=dict)
    blocks: int = 1
    blocked_by: str = ""

    @property
    def prunable(self) -> bool:
        return not self.blocked_by and self.size > 1


def find_channel_groups(network: nn.Module, *args: Any, **kwargs: Any) -> list[ChannelGroup]:
    """The channel groups of ``network`` as it runs on the observed ``args``/``kwargs``, each either prunable
    (masking half its channels computes what removing them does) or ``blocked_by`` a reason; attention heads
    (see ``attention_heads``) are groups too."""
    kwargs = {**kwargs, **whole_sequence_arguments(network, kwargs)}
    layouts, unknown_attention = attention_heads.find_attention(network)
    graph = _dependency_graph(network, args, kwargs)
    names = {module: name for name, module in network.named_modules()}
    parameter_names = {parameter: name for name, parameter in network.named_parameters()}
    # heads are removed whole, never channel by channel: Torch-Pruning's channels of these layers are not groups
    attention_layers = [layer for layout in layouts for layer in layout.projections]
    attention_layers += [layer for layers, _ in unknown_attention.values() for layer in layers]
    ignored = [network.get_submodule(layer) for layer in attention_layers]
    groups = []
    for full_group in graph.get_all_groups(ignored_layers=ignored, root_module_types=ROOT_TYPES):
        root = full_group[0].dep.target.module
        group = ChannelGroup(names[root], graph.get_out_channels(root))
        for dependency, indices in full_group:
            target = dependency.target.module
            if isinstance(target, nn.Parameter) and target in parameter_names:  # a position embedding, say
                name, is_parameter = parameter_names[target], True
            elif isinstance(target, nn.Module) and target in names:
                name, is_parameter = names[target], False
            else:
                continue  # an op (add, concat, reshape) without parameters: nothing to mask or remove
            pairs = [(int(getattr(index, "idx", index)), int(getattr(index, "root_idx", index))) for index in indices]
            if any(not 0 <= channel < group.size for _, channel in pairs):
                # Torch-Pruning shifts the root indices along with the indices through a concatenation or a
                # flatten; both map the channels in order, each onto the same number of indices
                if len(pairs) % group.size:
                    group.blocked_by = f"cannot tell which of {name}'s indices belong to which channel"
                    continue
                per_channel = len(pairs) // group.size
                pairs = [(index, position // per_channel) for position, (index, _) in enumerate(pairs)]
            if isinstance(target, nn.modules.conv._ConvNd) and 1 < target.groups < target.in_channels:
                group.blocks = max(group.blocks, target.groups)
                if group.size % group.blocks:
                    group.blocked_by = f"{name}'s {target.groups} convolution groups do not divide its channels evenly"
            removes_outputs = graph.is_out_channel_pruning_fn(dependency.handler)
            removal = _Removal(name, dependency.handler, dependency.target.pruning_dim, pairs, is_parameter, removes_outputs)
            group.removals.append(removal)
            if not is_parameter and removes_outputs and isinstance(target, ROOT_TYPES) and name not in group.producers:
                group.producers.append(name)
        groups.append(group)
    groups += [_head_group(layout) for layout in layouts]
    groups += [ChannelGroup(name, 0, layers, blocked_by=why) for name, (layers, why) in unknown_attention.items()]
    _find_layer_norm_layouts(network, groups, args, kwargs)
    _block_what_masking_cannot_promise(network, [group for group in groups if group.prunable], args, kwargs)
    return groups


def channel_importance(network: nn.Module, group: ChannelGroup, norm: int = 2) -> torch.Tensor:
    """Summed L1/L2 norm of each channel's weight rows over the group's producers."""
    importance = torch.zeros(group.size)
    for removal in group.removals:
        if removal.target not in group.producers or not removal.removes_outputs:
            continue
        weight = network.get_submodule(removal.target).weight.detach()
        rows, channels = zip(*removal.indices, strict=True)
        values = weight[list(rows)].flatten(1).norm(p=norm, dim=1).cpu().float()
        importance.index_add_(0, torch.tensor(channels), values)
    return importance


def channels_kept_now(network: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Which of ``group``'s channels are still there: those owning a row of the first producer that is not all zero."""
    removal = next(r for r in group.removals if r.target == group.producers[0] and r.removes_outputs)
    weight = network.get_submodule(removal.target).weight.detach()
    alive = weight.flatten(1).abs().sum(dim=1).cpu() != 0
    rows, channels = (torch.tensor(column) for column in zip(*removal.indices, strict=True))
    kept = torch.zeros(group.size, dtype=torch.int64).index_add_(0, channels, alive[rows].long())
    return kept > 0


def kept_channels(group: ChannelGroup, importance: torch.Tensor, dropped: int) -> torch.Tensor:
    """Keep all but the ``dropped`` least important channels of ``group`` (one always stays).

    Through a grouped convolution every convolution group must lose the same positions (Torch-Pruning's
    removal of its input channels assumes so): positions are then ranked by their importance averaged over
    the groups, and ``dropped`` rounds down to a multiple of the number of groups.
    """
    per_block = group.size // group.blocks
    dropped_positions = min(dropped // group.blocks, per_block - 1)
    ranked = importance.view(group.blocks, per_block).mean(0).argsort()[:dropped_positions]
    keep = torch.ones(group.blocks, per_block, dtype=torch.bool)
    keep[:, ranked] = False
    return keep.flatten()


def channel_masks(network: nn.Module, group: ChannelGroup, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-parameter masks (by name within ``network``) that zero every entry removing the dropped channels
    of ``group`` would remove. Producers' rows and biases, norms' scales and shifts and consumers' input
    columns all go to zero, so the dropped channels neither carry a value nor are read."""
    masks: dict[str, torch.Tensor] = {}
    for removal in group.removals:
        dropped = [index for index, channel in removal.indices if not keep[channel]]
        if not dropped:
            continue
        for name, mask in _surviving_entries(network, removal, dropped).items():
            masks[name] = masks[name] & mask if name in masks else mask
    return masks


def remove_channels(
    network: nn.Module, groups: list[ChannelGroup], keeps: list[torch.Tensor], *args: Any, **kwargs: Any
) -> list[str]:
    """Physically drop the channels whose ``keep`` entry is False, in place (Torch-Pruning removes them,
    group by group, re-deriving each group on the network as it shrinks); as ``remove_dropped_channels``."""
    return remove_dropped_channels(network, dropped_channels(groups, keeps), *args, **kwargs)


def dropped_channels(groups: list[ChannelGroup], keeps: list[torch.Tensor]) -> list[tuple[str, list[int]]]:
    """Each group's root layer and the output channels it drops: all a later process needs to shrink a fresh
    copy of the network the same way (``remove_dropped_channels``), kept in checkpoints."""
    return [(group.root, (~keep).nonzero().flatten().tolist()) for group, keep in zip(groups, keeps, strict=True)]


def remove_dropped_channels(network: nn.Module, dropped: list[tuple[str, list[int]]], *args: Any, **kwargs: Any) -> list[str]:
    """Drop, in place and in order, the given output channels of each root layer and everything coupled to them
    (an attention module's "channels" are its key-value heads); then bring the config of every transformers model
    inside up to date. Returns why a config still cannot describe its model (see ``model_configs``)."""
    kwargs = {**kwargs, **whole_sequence_arguments(network, kwargs)}
    layouts = {layout.attention: layout for layout in attention_heads.find_attention(network)[0]}
    widths = model_configs.layer_widths(network)
    graph = _dependency_graph(network, args, kwargs)
    for root_name, channels in dropped:
        if channels and root_name not in layouts:
            root = network.get_submodule(root_name)
            graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, channels).prune()
    for root_name, channels in dropped:  # after Torch-Pruning's removals, whose graph knows the layers as they were
        if root_name in layouts:
            attention_heads.remove_heads(network, layouts[root_name], channels)
    return model_configs.describe_pruned_models(network, widths, list(layouts.values()))


KEPT_CHANNELS = "kept_channels"
"""The buffer through which a LayerNorm of a pruned group knows its kept channels."""


def mask_layer_norms(network: nn.Module, groups: list[ChannelGroup]) -> None:
    """Make every LayerNorm of ``groups`` normalize over its kept channels only, as it will once the others
    are removed (zeroing a channel's scale and shift would still count it in the mean and variance).

    Each gets a non-persistent ``kept_channels`` buffer (all True: no effect yet), which
    ``update_layer_norm_masks`` sets from the parameter masks, and a forward hook that uses it.
    """
    for group in groups:
        for name, dim in group.norm_dims.items():
            norm = network.get_submodule(name)
            if KEPT_CHANNELS not in norm._buffers:
                kept = torch.ones(group.size, dtype=torch.bool, device=norm.weight.device)
                norm.register_buffer(KEPT_CHANNELS, kept, persistent=False)
                norm.register_forward_hook(partial(_normalize_kept_channels, dim=dim))


def update_layer_norm_masks(network: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Tell each masked LayerNorm of ``network`` which channels it keeps (``masks`` by parameter name)."""
    for name, norm in network.named_modules():
        kept = norm._buffers.get(KEPT_CHANNELS)
        mask = masks.get(f"{name}.weight" if name else "weight")
        if kept is not None and mask is not None:
            kept.copy_(mask.to(kept.device))


def unmask_layer_norms(network: nn.Module) -> None:
    """Back to plain LayerNorms (their hooks become no-ops): for a network whose channels were removed."""
    for norm in network.modules():
        norm._buffers.pop(KEPT_CHANNELS, None)


# ---------------------------------------------------------------------- helpers of this module


def _head_group(layout: attention_heads.HeadLayout) -> ChannelGroup:
    """The heads of one attention module as a group whose channels are its key-value heads."""
    group = ChannelGroup(layout.attention, layout.key_value_heads, list(layout.projections))
    for name, (outputs, pairs) in layout.owned_indices().items():
        group.removals.append(_Removal(name, attention_heads.linear_pruning(outputs), -1, pairs, removes_outputs=outputs))
    if layout.key_value_heads < 2:
        group.blocked_by = "its attention has a single key-value head"
    return group


def _normalize_kept_channels(norm: nn.LayerNorm, args: tuple, output: torch.Tensor, dim: int) -> torch.Tensor | None:
    kept = norm._buffers.get(KEPT_CHANNELS)
    if kept is None or bool(kept.all()):
        return None
    features = args[0].movedim(dim, -1)
    normalized = torch.nn.functional.layer_norm(
        features[..., kept], (int(kept.sum()),), norm.weight[kept], norm.bias[kept] if norm.bias is not None else None, norm.eps
    )
    result = features.new_zeros(features.shape)
    result[..., kept] = normalized
    return result.movedim(-1, dim)


def _find_layer_norm_layouts(network: nn.Module, groups: list[ChannelGroup], args: tuple, kwargs: dict) -> None:
    """Which dimension of its input each LayerNorm of a group normalizes (``nn.LayerNorm``: the last; a
    channels-first subclass such as torchvision's ``LayerNorm2d``: the second), found by recomputing its
    output both ways on the observed call. A LayerNorm that is neither, or has no scale, blocks its group."""
    norms = {
        removal.target: group
        for group in groups
        for removal in group.removals
        if not removal.is_parameter and isinstance(network.get_submodule(removal.target), nn.LayerNorm)
    }
    if not norms:
        return
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        seen.setdefault(name, (inputs[0], output))

    handles = [network.get_submodule(name).register_forward_hook(partial(record, name)) for name in norms]
    was_training = network.training
    try:
        with torch.no_grad():
            network.eval()(*args, **kwargs)
    finally:
        network.train(was_training)
        for handle in handles:
            handle.remove()
    for name, group in norms.items():
        norm = network.get_submodule(name)
        if name not in seen or norm.weight is None or len(norm.normalized_shape) != 1:
            group.blocked_by = group.blocked_by or f"{name} (LayerNorm) normalizes over more than its channels, or has no scale"
            continue
        features, output = seen[name]
        for dim in (-1, 1):
            if features.dim() > 1 and features.shape[dim] == norm.normalized_shape[0]:
                expected = torch.nn.functional.layer_norm(
                    features.movedim(dim, -1), norm.normalized_shape, norm.weight, norm.bias, norm.eps
                ).movedim(-1, dim)
                if expected.shape == output.shape and torch.allclose(expected, output, atol=1e-5):
                    group.norm_dims[name] = dim
                    break
        else:
            group.blocked_by = group.blocked_by or f"{name} ({type(norm).__name__}) normalizes in a layout this cannot follow"


def _dependency_graph(network: nn.Module, args: tuple, kwargs: dict):  # noqa: ANN202 - torch_pruning's type
    import torch_pruning

    was_training = network.training
    try:
        with torch.enable_grad(), warnings.catch_warnings():  # it follows autograd; it warns of what it prunes by default
            warnings.simplefilter("ignore")
            return torch_pruning.DependencyGraph().build_dependency(
                network, example_inputs=args, forward_fn=lambda module, _: module(*args, **kwargs), verbose=False
            )
    finally:
        network.train(was_training)  # Torch-Pruning traces in eval mode and leaves it so


def _surviving_entries(network: nn.Module, removal: _Removal, dropped: list[int]) -> dict[str, torch.Tensor]:
    """Which entries of each parameter of ``removal.target`` survive removing ``dropped``: the removal is
    run on a copy whose entries hold their own flat indices."""
    removal.handler.__self__.pruning_dim = removal.dim
    if removal.is_parameter:
        original = network.get_parameter(removal.target)
        numbered = nn.Parameter(torch.arange(original.numel(), dtype=torch.float64).view_as(original))
        survivors = {removal.target: removal.handler(numbered, dropped)}
        originals = {removal.target: original}
    else:
        layer = network.get_submodule(removal.target)
        numbered = copy.deepcopy(layer).double()
        with torch.no_grad():
            for parameter in numbered.parameters():
                parameter.copy_(torch.arange(parameter.numel(), dtype=torch.float64).view_as(parameter))
        removal.handler(numbered, dropped)
        prefix = f"{removal.target}."
        survivors = {prefix + name: parameter for name, parameter in numbered.named_parameters()}
        originals = {prefix + name: parameter for name, parameter in layer.named_parameters()}
    masks = {}
    for name, original in originals.items():
        mask = torch.zeros(original.numel(), dtype=torch.bool)
        mask[survivors[name].detach().flatten().long().cpu()] = True
        masks[name] = mask.view_as(original)
    return masks


def _block_what_masking_cannot_promise(network: nn.Module, groups: list[ChannelGroup], args: tuple, kwargs: dict) -> None:
    """Mark the groups for which masking half the channels does not compute what removing them does.

    All groups are tried at once; a set that fails is halved until each failing group stands alone, so the
    usual case (only the group that reaches the output fails) costs a few trials, not one per group.
    """
    failure = _removal_differs(network, groups, args, kwargs)
    if failure is None:
        return
    if len(groups) == 1:
        groups[0].blocked_by = failure
        return
    half = len(groups) // 2
    _block_what_masking_cannot_promise(network, groups[:half], args, kwargs)
    _block_what_masking_cannot_promise(network, groups[half:], args, kwargs)


def _removal_differs(network: nn.Module, groups: list[ChannelGroup], args: tuple, kwargs: dict) -> str | None:
    """Why masking half of each group's channels does not compute what removing them does, or ``None``.

    Tried on the network's weights jittered at the scale that keeps activations at unit size (``1/sqrt(fan_in)``
    for a layer's weight, 0.1 for a vector; both copies alike): masking must equal removal whatever the weights,
    and an untrained network can make them agree by coincidence. At initialization a transformer's attention is
    near uniform, so removing channels from inside its heads (which regroups every head) computed the same as
    masking them; trained, it would not have.
    """
    keeps = [kept_channels(group, (torch.arange(group.size) % 2).float(), group.size // 2) for group in groups]
    jittered = copy.deepcopy(network).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in jittered.parameters():
            if parameter.is_floating_point():
                scale = parameter[0].numel() ** -0.5 if parameter.dim() > 1 else 0.1
                noise = torch.randn(parameter.shape, generator=generator).to(parameter.device, parameter.dtype)
                parameter.add_(noise * scale)
    masked, shrunken = jittered, copy.deepcopy(jittered)
    try:
        masks: dict[str, torch.Tensor] = {}
        for group, keep in zip(groups, keeps, strict=True):
            for name, mask in channel_masks(masked, group, keep).items():
                masks[name] = masks[name] & mask if name in masks else mask
        with torch.no_grad():
            parameters = dict(masked.named_parameters())
            for name, mask in masks.items():
                parameters[name].mul_(mask.to(parameters[name].device))
        mask_layer_norms(masked, groups)
        update_layer_norm_masks(masked, masks)
        remove_channels(shrunken, groups, keeps, *args, **kwargs)
        with torch.no_grad():
            expected, actual = masked(*args, **kwargs), shrunken(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - any failure: these channels cannot be removed safely
        return f"removing its channels fails ({first_line(error, limit=100)})"
    if not same_outputs(expected, actual):
        if [tensor.shape for tensor in _tensors_in(expected)] != [tensor.shape for tensor in _tensors_in(actual)]:
            return "its channels reach the network's output"
        attention = [removal.target for group in groups for removal in group.removals if _is_attention(network, removal)]
        if attention:
            return (
                f"its channels are {attention[0]}'s embedding width: nn.MultiheadAttention splits it into heads, so "
                "removing channels regroups every head"
            )
        return "removing its channels changes what the network computes"
    return None


def _is_attention(network: nn.Module, removal: _Removal) -> bool:
    return not removal.is_parameter and isinstance(network.get_submodule(removal.target), nn.MultiheadAttention)
