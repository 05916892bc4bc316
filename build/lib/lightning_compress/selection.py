"""What compression acts on: a LightningModule's own networks, and layers chosen by name or type.

One vocabulary for every compression callback: ``modules`` names the submodules to compress (the layers in
and under them), ``skip`` names submodules or layer types to leave alone (a type as a class or an import
path such as ``"torch.nn.Linear"``, a submodule by its qualified name such as ``"net.classifier"``; a skipped
submodule's layers are all skipped).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from torch import nn
from torchmetrics import Metric

from lightning_compress import compat


def compressible_children(pl_module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children that hold trainable parameters. Metrics hold none worth compressing, a frozen network
    (a distillation teacher passed as a child) is not what is being trained, and the children a module
    names in ``training_aids`` (distillation's hint adapters) only help train: they are never deployed."""
    aids = set(getattr(pl_module, "training_aids", ()))
    return [
        (name, child)
        for name, child in pl_module.named_children()
        if name not in aids and not isinstance(child, Metric) and any(parameter.requires_grad for parameter in child.parameters())
    ]


def without_training_aids(model: nn.Module) -> nn.Module:
    """``model`` minus the children it names in ``training_aids``: what gets measured and shipped.

    A shallow copy sharing every parameter; ``model`` itself keeps its children (training may go on).
    """
    aids = set(getattr(model, "training_aids", ())) & {name for name, _ in model.named_children()}
    return compat.without_children(model, aids) if aids else model


def resolve_module_type(entry: type | str, setting: str) -> type[nn.Module]:
    """A module class, given as itself or as an import path such as ``"torch.nn.Linear"``."""
    if isinstance(entry, type):
        resolved = entry
    else:
        module_name, _, class_name = entry.rpartition(".")
        try:
            resolved = getattr(importlib.import_module(module_name or "torch.nn"), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"{setting}={entry!r} names no importable module type (nor, for skip, a submodule).") from error
    if not (isinstance(resolved, type) and issubclass(resolved, nn.Module)):
        raise ValueError(f"{setting}={entry!r} is not an nn.Module type.")
    return resolved


def split_skip(skip: Sequence[str | type], setting: str = "skip") -> tuple[list[str], list[type[nn.Module]]]:
    """``skip`` entries as (submodule names, layer types)."""
    names = [entry for entry in skip if not names_a_type(entry)]
    types = [resolve_module_type(entry, setting) for entry in skip if names_a_type(entry)]
    return names, types


def names_a_type(entry: str | type) -> bool:
    """Classes are CamelCase, submodule names are not: ``"torch.nn.Linear"`` versus ``"net.classifier"``."""
    return isinstance(entry, type) or entry.rsplit(".", 1)[-1][:1].isupper()


def within(name: str, submodule: str) -> bool:
    """Whether the layer ``name`` is the submodule ``submodule`` or lies inside it."""
    return name == submodule or name.startswith(f"{submodule}.")


def type_path(module_type: type) -> str:
    return f"{module_type.__module__}.{module_type.__qualname__}"


def check_submodule_names(pl_module: nn.Module, setting: str, names: Sequence[str]) -> None:
    """Every entry of ``names`` must be a submodule of ``pl_module``: one line naming the first that is not."""
    submodules = {name for name, _ in pl_module.named_modules() if name}
    for entry in names:
        if entry not in submodules:
            raise ValueError(f"{setting}={entry!r} names no submodule; submodules are e.g. {sorted(submodules)[:6]}.")


def is_skipped(name: str, module: nn.Module, skip_names: Sequence[str], skip_types: Sequence[type]) -> bool:
    """Whether ``skip`` leaves the submodule ``name`` alone: it is named, inside one named, or of a skipped type."""
    return any(within(name, entry) for entry in skip_names) or isinstance(module, tuple(skip_types))


def skipped_layers(network: nn.Module, prefix: str, skip_names: Sequence[str], skip_types: Sequence[type]) -> list[str]:
    """The submodules of ``network`` (called ``prefix`` in the module) that ``skip`` leaves alone, named
    relative to ``network``."""
    return [
        name
        for name, module in network.named_modules()
        if name and is_skipped(f"{prefix}.{name}", module, skip_names, skip_types)
    ]
