"""A transformers model's config, kept true to the model after channels and heads are removed.

transformers rebuilds a saved model from its config (``from_pretrained``), so a pruned model whose config still
states the original widths saves but does not load. After a removal, each transformers model inside the network
gets the widths it now has where its config can state them: the MLP width (``intermediate_size``) when every layer
of that width kept the same number of channels, and the head counts (``num_attention_heads``,
``num_key_value_heads``) where the config states the head size on its own (``head_dim``, as Llama's does; BERT's
and ViT's derive it from ``hidden_size / num_attention_heads``, so fewer heads of the same size cannot be stated).
Whether the config then describes the model is checked, not assumed: the model is built from it on the meta
device (no memory) and every parameter's shape compared.
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
            _update(model.config, prefix, widths_before, widths_after, inside, network)
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
    config: object,
    prefix: str,
    before: dict[str, tuple[int, int]],
    after: dict[str, tuple[int, int]],
    layouts: list[HeadLayout],
    network: nn.Module,
) -> None:
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
    if layouts and getattr(config, "head_dim", None) == layouts[0].head_size:
        heads = {network.get_submodule(layout.query).out_features // layout.head_size for layout in layouts}
        key_value_heads = {network.get_submodule(layout.key).out_features // layout.head_size for layout in layouts}
        if len(heads) == len(key_value_heads) == 1 and isinstance(getattr(config, "num_attention_heads", None), int):
            config.num_attention_heads = heads.pop()
            if isinstance(getattr(config, "num_key_value_heads", None), int):
                config.num_key_value_heads = key_value_heads.pop()


def _mismatch(model: nn.Module, config: object) -> str | None:
    """The first parameter whose shape the model built from ``config`` does not have, or ``None``."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(config))  # transformers writes settings into the config it builds from
    except Exception as error:  # noqa: BLE001 - a config that cannot even build the model describes nothing
        return f"building the model from it fails: {type(error).__name__}"
    finally:
        logger.setLevel(level)
    built = {name: tuple(parameter.shape) for name, parameter in fresh.named_parameters()}
    for name, parameter in model.named_parameters():
        if built.get(name) != tuple(parameter.shape):
            return f"{name} is {list(parameter.shape)}, built from the config {list(built.get(name, ()))}"
    return None
