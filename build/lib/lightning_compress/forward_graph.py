"""A LightningModule's own forward over several networks, quantized as one graph.

Where a module's forward passes tensors from network to network (a backbone and a head), preparing that
forward as one graph lets int8 flow across their edges with no dequantize/quantize between them. The graph
needs a module to trace: ``forward_holder`` builds one that holds the networks and runs the module's forward;
``install_forward`` puts the prepared (or converted, or float) holder back in place.
"""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

FORWARD_OBSERVERS = "quantization_observers"
"""The child under which a LightningModule quantized as one graph keeps the graph's activation fake-quants."""


def forward_holder(pl_module: nn.Module, networks: list[str]) -> nn.Module:
    """A module whose children are ``pl_module``'s ``networks`` (the same objects) and whose forward is the
    LightningModule's own: what FX traces to quantize the module's forward as one graph."""
    holder_type = type(f"{type(pl_module).__name__}Forward", (nn.Module,), {"forward": type(pl_module).forward})
    holder = holder_type()
    for name in networks:
        holder.add_module(name, pl_module.get_submodule(name))
    for name, parameter in pl_module.named_parameters(recurse=False):  # a learned position embedding, say
        holder.register_parameter(name, parameter)
    for name, buffer in pl_module.named_buffers(recurse=False):
        holder.register_buffer(name, buffer)
    return holder.train(pl_module.training)


def install_forward(pl_module: nn.Module, graph: nn.Module) -> None:
    """Make ``graph`` (a holder: prepared, converted or float) the module's forward and networks.

    The networks become the graph's (fusion rebuilds their containers), the graph's own activation
    fake-quants a ``quantization_observers`` child, so every tensor has one name in the state_dict and moves
    with the module; ``forward`` calls the graph, or the class's own forward again for a float holder.
    """
    children = {name for name, _ in pl_module.named_children()}
    networks = [name for name, _ in graph.named_children() if name in children and name != FORWARD_OBSERVERS]
    for name in networks:
        setattr(pl_module, name, getattr(graph, name))
    observers = {name: child for name, child in graph.named_children() if name not in networks}
    if FORWARD_OBSERVERS in children:
        delattr(pl_module, FORWARD_OBSERVERS)
    if observers:
        pl_module.add_module(FORWARD_OBSERVERS, nn.ModuleDict(observers))
    if isinstance(graph, GraphModule):
        pl_module.forward = graph.forward
    else:
        pl_module.__dict__.pop("forward", None)


def installed_forward(pl_module: nn.Module) -> GraphModule | None:
    """The graph ``install_forward`` made the module's forward, if any."""
    graph = getattr(pl_module.__dict__.get("forward"), "__self__", None)
    return graph if isinstance(graph, GraphModule) else None
