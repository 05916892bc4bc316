"""A transformers model's config, kept true to the model after channels and heads are removed.

transformers rebuilds a saved model from its config (``from_pretrained``), so a pruned model whose config still
states the original widths saves but does not load. After a removal, each transformers model inside the network
gets the widths it now has where its config can state them: the MLP width (``intermediate_size``) when every layer
of that width kept the same number of channels, and the head counts (``num_attention_heads``,
``num_key_value_heads``) when every attention kept as many heads, with the head size stated beside them
(``head_dim``). Llama's config has ``head_dim``; ViT's does not, but its attention reads one when the config holds
it, so it is added; BERT's attention derives the head size from ``hidden_size / num_attention_heads`` whatever the
config holds, so fewer heads of the same size cannot be stated, and its config keeps its heads. Which is which is
not looked up by class: the model is built from the config on the meta device (no memory) and every parameter's
shape compared, for the head counts (stated only where that makes more of the model match) and for the whole.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from lightning_compress.attention_heads import HeadLayout


def layer_widths(network: nn.Module) -> dict[str, tuple[int, int]]:
    """Each Linear layer's (input, output) width: what ``describe_pruned_models`` compares after a removal."""
    return {
        name: (layer.in_features, layer.out_features) for name, layer in network.named_modules() if isinstance(layer, nn.Linear)
    }


def describe_pruned_models(network: nn.Module, widths_before: dict[str, tuple[int, int]], layouts: list[HeadLayout]) -> list[str]:
    """Update the config of every transformers model in ``network`` to the widths it has now (``widths_before``:
    ``layer_widths`` before the removal; ``layouts``: its attention as it was); why any config still cannot
    describe its model (its ``save_pretrained`` output would not load), one line each."""
    models = [
        (name, model)
        for name, model in network.named_modules()
        if hasattr(type(model), "from_pretrained") and hasattr(getattr(model, "config", None), "to_dict")
    ]
    widths_after = layer_widths(network)
    updated: set[int] = set()
    for name, model in reversed(models):  # inner models first: a composite's sub-configs are theirs
        if id(model.config) not in updated:
            updated.add(id(model.config))
            prefix = f"{name}." if name else ""
            inside = [layout for layout in layouts if layout.attention.startswith(prefix) or not name]
            _update(model, prefix, widths_before, widths_after, inside, network)
    problems = []
    checked: list[str] = []
    for name, model in models:  # each outermost model, built from its config as from_pretrained would
        if any(name == outer or name.startswith(f"{outer}.") or not outer for outer in checked):
            continue
        checked.append(name)
        problem = _mismatch(model, model.config)
        if problem:
            problems.append(f"{name or type(model).__name__}'s config cannot describe it ({problem})")
    return problems


def _update(
    model: nn.Module,
    prefix: str,
    before: dict[str, tuple[int, int]],
    after: dict[str, tuple[int, int]],
    layouts: list[HeadLayout],
    network: nn.Module,
) -> None:
    config = model.config
    old = getattr(config, "intermediate_size", None)
    if isinstance(old, int):
        widths = {
            after[name][side]
            for name, dims in before.items()
            if name.startswith(prefix) and name in after
            for side in (0, 1)
            if dims[side] == old and dims[1 - side] != old
        }
        if len(widths) == 1:
            config.intermediate_size = widths.pop()
    if layouts and isinstance(getattr(config, "num_attention_heads", None), int):
        _state_head_counts(model, layouts, network)


def _state_head_counts(model: nn.Module, layouts: list[HeadLayout], network: nn.Module) -> None:
    """The head counts every attention in ``layouts`` has now, and the head size beside them, written into
    ``model``'s config where the model built from it then matches more of ``model`` than before."""
    config = model.config
    head_size = {layout.head_size for layout in layouts}
    heads = {network.get_submodule(layout.query).out_features // layout.head_size for layout in layouts}
    key_value_heads = {network.get_submodule(layout.key).out_features // layout.head_size for layout in layouts}
    if len(head_size) != 1 or len(heads) != 1 or len(key_value_heads) != 1:
        return  # the attentions differ: one count cannot state them
    stated = copy.deepcopy(config)
    stated.head_dim, stated.num_attention_heads = head_size.pop(), heads.pop()
    if isinstance(getattr(config, "num_key_value_heads", None), int):
        stated.num_key_value_heads = key_value_heads.pop()
    if len(_mismatches(model, stated)) < len(_mismatches(model, config)):
        for setting in ("head_dim", "num_attention_heads", "num_key_value_heads"):
            if hasattr(stated, setting):
                setattr(config, setting, getattr(stated, setting))


def _mismatch(model: nn.Module, config: object) -> str | None:
    """The first parameter whose shape the model built from ``config`` does not have, or ``None``."""
    mismatches = _mismatches(model, config)
    return mismatches[0] if mismatches else None


def _mismatches(model: nn.Module, config: object) -> list[str]:
    """Every parameter of ``model`` whose shape the model built from ``config`` (on the meta device) does not have,
    one line each; one line if it cannot be built at all."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(config))  # transformers writes settings into the config it builds from
    except Exception as error:  # noqa: BLE001 - a config that cannot even build the model describes nothing
        return [f"building the model from it fails: {type(error).__name__}"]
    finally:
        logger.setLevel(level)
    built = {name: tuple(parameter.shape) for name, parameter in fresh.named_parameters()}
    return [
        f"{name} is {list(parameter.shape)}, built from the config {list(built.get(name, ()))}"
        for name, parameter in model.named_parameters()
        if built.get(name) != tuple(parameter.shape)
    ]
