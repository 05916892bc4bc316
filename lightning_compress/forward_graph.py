"""A LightningModule's own forward over several networks, quantized as one graph.

Where a module's forward passes tensors from network to network (a backbone and a head), preparing that
forward as one graph lets int8 flow across their edges with no dequantize/quantize between them. The graph
needs a module to trace: ``forward_holder`` builds one that holds the networks and runs the module's forward;
``install_forward`` puts the prepared (or converted, or float) holder back in place.

Each engine's graph is an ``fx.GraphModule`` whose children are the networks (FX keeps them as modules; an exported
program keeps containers of their parameters under the same names) beside the engine's own children (activation
fake-quants): FX's graph is that module itself, the torch.export engine's a module holding it (which follows the
training mode and feeds the graph). Either way the networks go back into the LightningModule under their own names,
so its state_dict, checkpoints and masks keep theirs.
"""

from __future__ import annotations

from torch import nn
from torch.fx import GraphModule

FORWARD_OBSERVERS = "quantization_observers"
"""The child under which a LightningModule quantized as one graph keeps the graph's activation fake-quants."""

GRAPH_TENSORS = "graph_tensors"
"""The child of a graph that holds the tensors the graph held itself (an int8 program's weights and scales)."""


def forward_holder(pl_module: nn.Module, networks: list[str]) -> nn.Module:
    """A module whose children are ``pl_module``'s ``networks`` (the same objects) and whose forward is the
    LightningModule's own: what FX traces to quantize the module's forward as one graph."""
    holder_type = type(
        f"{type(pl_module).__name__}Forward", (nn.Module,), {"forward": type(pl_module).forward, "runs_module_forward": True}
    )
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

    The networks become the graph's (fusion rebuilds their containers; an exported graph holds containers of their
    parameters), the graph's other children (activation fake-quants) a ``quantization_observers`` child, so every
    tensor has one name in the state_dict and moves with the module; ``forward`` calls the graph, or the class's
    own forward again for a float holder. A graph that follows a module's training mode (``follow_mode_of``) is
    given the LightningModule's: it is not a child, so ``.train()``/``.eval()`` do not reach it.
    """
    inner = _graph_module(graph)
    holder = graph if inner is None else inner
    if inner is not None and inner is not graph:
        hold_own_tensors(inner)  # the graph is not a child: its own tensors would be in no state_dict
    children = {name for name, _ in pl_module.named_children()}
    networks = [name for name, _ in holder.named_children() if name in children and name != FORWARD_OBSERVERS]
    for name in networks:
        setattr(pl_module, name, getattr(holder, name))
    observers = {name: child for name, child in holder.named_children() if name not in networks}
    if FORWARD_OBSERVERS in children:
        delattr(pl_module, FORWARD_OBSERVERS)
    if observers:
        pl_module.add_module(FORWARD_OBSERVERS, nn.ModuleDict(observers))
    if inner is not None:
        pl_module.forward = graph.forward
        follow = getattr(graph, "follow_mode_of", None)
        if follow is not None:
            follow(pl_module)
    else:
        pl_module.__dict__.pop("forward", None)


def installed_forward(pl_module: nn.Module) -> nn.Module | None:
    """The graph ``install_forward`` made the module's forward, if any."""
    graph = getattr(pl_module.__dict__.get("forward"), "__self__", None)
    return graph if isinstance(graph, nn.Module) and _graph_module(graph) is not None else None


def _graph_module(graph: nn.Module) -> GraphModule | None:
    """The ``GraphModule`` that holds the networks: ``graph`` itself (FX), or its one ``GraphModule`` child (an
    engine's module around an exported program); ``None`` for a float holder."""
    if isinstance(graph, GraphModule):
        return graph
    if getattr(graph, "runs_module_forward", False):
        return None
    inner = [child for child in graph.children() if isinstance(child, GraphModule)]
    return inner[0] if len(inner) == 1 else None


def hold_own_tensors(graph: GraphModule) -> None:
    """Move the tensors ``graph`` holds itself (not in a child: an exported program's constants, a converted
    program's int8 weights) into a child, ``graph_tensors``, and read them there. A module whose graph is not
    among its children (a forward installed by ``install_forward``) then still has them in its state_dict, moves
    them with ``.to()``, and counts them in its size. Call it before the graph is compiled."""
    own = {**graph._parameters, **graph._buffers}
    if not own:
        return
    if GRAPH_TENSORS not in graph._modules:
        graph.add_module(GRAPH_TENSORS, nn.Module())
    holder = graph.get_submodule(GRAPH_TENSORS)
    for name in own:
        if name in graph._parameters:
            holder.register_parameter(name, graph._parameters.pop(name))
        else:
            holder.register_buffer(name, graph._buffers.pop(name), persistent=name not in graph._non_persistent_buffers_set)
            graph._non_persistent_buffers_set.discard(name)
    for node in graph.graph.nodes:
        if node.op == "get_attr" and node.target in own:
            node.target = f"{GRAPH_TENSORS}.{node.target}"
    graph.recompile()
