"""Whole attention heads: the channels of attention that can be removed.

A head is ``head_size`` consecutive output rows of the query, key and value layers, and as many input columns of
the layer that projects the heads' joined outputs back to the residual width (the output projection). Removing
channels from inside heads regroups every head, so those channels stay; whole heads can go. In grouped-query
attention (Llama and its family) several query heads read one key-value head: the unit removed is a key-value
head with the query heads that read it, so the ratio of query heads to key-value heads, which the model's config
states once for all layers, stays.

Masking a unit computes what removing it does: its zero query and key rows give scores of zero, so its attention
spreads evenly over values that are zero, and the output projection's zero columns read nothing of it.

The layouts recognized are transformers': BERT, ViT and the like (``query``/``key``/``value`` layers beside an
``attention_head_size``, with the ``output.dense`` beside the module projecting back) and Llama and the like
(``q_proj``/``k_proj``/``v_proj``/``o_proj`` beside a ``head_dim``). Both reshape to ``-1`` heads at each call, so
slicing the layers is all a removal takes. A module with such layers that fits neither is named with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

PROJECTION_NAMES = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))
"""Names of the query, key and value layers inside an attention module."""

HEAD_SIZE_ATTRIBUTES = ("attention_head_size", "head_dim")

HEAD_COUNT_ATTRIBUTES = {"num_attention_heads": "heads", "num_heads": "heads", "num_key_value_heads": "key_value_heads"}
"""Attributes of an attention module that state its head counts, kept true after a removal."""


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of one attention module live (layer names within the network)."""

    attention: str
    query: str
    key: str
    value: str
    output: str
    head_size: int
    heads: int
    key_value_heads: int

    @property
    def projections(self) -> tuple[str, str, str]:
        return self.query, self.key, self.value

    @property
    def query_heads_per_unit(self) -> int:
        return self.heads // self.key_value_heads

    def owned_indices(self) -> dict[str, tuple[bool, list[tuple[int, int]]]]:
        """For each layer: whether the units own its output rows (else its input columns), and the pairs
        ``(row or column, unit)``. Unit ``u`` is key-value head ``u`` with the query heads that read it."""
        query_width = self.query_heads_per_unit * self.head_size
        query = [(index, index // query_width) for index in range(self.heads * self.head_size)]
        key_value = [(index, index // self.head_size) for index in range(self.key_value_heads * self.head_size)]
        return {
            self.query: (True, query),
            self.key: (True, key_value),
            self.value: (True, key_value),
            self.output: (False, query),
        }


def find_attention(network: nn.Module) -> tuple[list[HeadLayout], dict[str, tuple[list[str], str]]]:
    """The attention modules of ``network`` whose heads can be removed, and those that have query, key and value
    layers but cannot (name -> (those layers, why))."""
    layouts, unknown = [], {}
    for name, module in network.named_modules():
        for names in PROJECTION_NAMES:
            layers = [getattr(module, child, None) for child in names]
            if not all(isinstance(layer, nn.Linear) for layer in layers):
                continue
            projections = [f"{name}.{child}" if name else child for child in names]
            layout = _layout(network, name, module, projections)
            if isinstance(layout, str):
                unknown[name] = (projections, layout)
            else:
                layouts.append(layout)
    return layouts, unknown


def remove_heads(network: nn.Module, layout: HeadLayout, dropped: list[int]) -> None:
    """Remove the units ``dropped`` (key-value heads with their query heads) from ``layout``'s layers, in place,
    and bring the attention module's own head counts up to date."""
    if not dropped:
        return
    for name, (outputs, pairs) in layout.owned_indices().items():
        indices = [index for index, unit in pairs if unit in dropped]
        linear_pruning(outputs)(network.get_submodule(name), indices)
    counts = {
        "key_value_heads": layout.key_value_heads - len(dropped),
        "heads": layout.heads - len(dropped) * layout.query_heads_per_unit,
    }
    attention = network.get_submodule(layout.attention)
    for attribute, count in HEAD_COUNT_ATTRIBUTES.items():
        if isinstance(getattr(attention, attribute, None), int):
            setattr(attention, attribute, counts[count])
    if isinstance(getattr(attention, "all_head_size", None), int):
        attention.all_head_size = counts["heads"] * layout.head_size


def linear_pruning(outputs: bool):  # noqa: ANN201 - a bound method of Torch-Pruning's Linear pruner
    """Torch-Pruning's removal of a Linear layer's output rows (``outputs``) or input columns: what removes a head's
    entries, and what derives its masks."""
    import torch_pruning

    return torch_pruning.prune_linear_out_channels if outputs else torch_pruning.prune_linear_in_channels


def _layout(network: nn.Module, name: str, module: nn.Module, projections: list[str]) -> HeadLayout | str:
    """``module``'s head layout, or why its heads cannot be removed."""
    head_size = next((getattr(module, key) for key in HEAD_SIZE_ATTRIBUTES if isinstance(getattr(module, key, None), int)), None)
    if not head_size:
        return f"its heads cannot be removed: {type(module).__name__} states no head size ({' or '.join(HEAD_SIZE_ATTRIBUTES)})"
    output = _output_projection(network, name, module)
    if output is None:
        return (
            f"its heads cannot be removed: no output projection where transformers puts one (o_proj inside "
            f"{type(module).__name__}, or output.dense beside it)"
        )
    query, key, value = (network.get_submodule(layer) for layer in projections)
    heads, key_value_heads = query.out_features // head_size, key.out_features // head_size
    whole = (
        query.out_features == heads * head_size
        and key.out_features == value.out_features == key_value_heads * head_size
        and key_value_heads
        and heads % key_value_heads == 0
        and network.get_submodule(output).in_features == query.out_features
    )
    if not whole:
        return f"its heads cannot be removed: its layers are not whole heads of {head_size}"
    return HeadLayout(name, *projections, output, head_size, heads, key_value_heads)


def _output_projection(network: nn.Module, name: str, module: nn.Module) -> str | None:
    if isinstance(getattr(module, "o_proj", None), nn.Linear):
        return f"{name}.o_proj" if name else "o_proj"
    if not name:
        return None
    parent = name.rpartition(".")[0]
    candidate = f"{parent}.output.dense" if parent else "output.dense"
    try:
        return candidate if isinstance(network.get_submodule(candidate), nn.Linear) else None
    except AttributeError:
        return None
