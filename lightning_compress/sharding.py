"""Compression of networks sharded with FSDP2 (``fully_shard``, as Lightning's ``ModelParallelStrategy`` runs it
in ``configure_model``), and the strategies the callbacks take.

Under FSDP2 each rank holds a slice of every parameter (a ``DTensor``), and a sharded module refuses
``copy.deepcopy``. The callbacks copy the module to measure, convert and export it, and compute masks from whole
weights; here they get the whole tensors, gathered from every rank, and plain copies built from them. Every
function that gathers is collective: each rank must call it, in the same order, as the callbacks' hooks do.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

SUPPORTED_STRATEGIES = (
    "single device",
    "ddp (DDPStrategy, any start method)",
    "ModelParallelStrategy with fully_shard (FSDP2), tensor_parallel_size=1",
)


def check_strategy(trainer: L.Trainer, callback: str) -> None:
    """One line, before training, where ``callback`` cannot compress under the Trainer's strategy."""
    from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    strategy = trainer.strategy
    name = type(strategy).__name__
    # Lightning's DeepSpeedStrategy is a DDPStrategy that partitions parameters and optimizer states its own way
    if isinstance(strategy, SingleDeviceStrategy | DDPStrategy) and "DeepSpeed" not in name:
        return
    if isinstance(strategy, ModelParallelStrategy):
        if strategy._tensor_parallel_size not in (1, "auto") and trainer.world_size > 1:
            raise ValueError(
                f"{callback} cannot compress a tensor-parallel network (ModelParallelStrategy with "
                f"tensor_parallel_size={strategy._tensor_parallel_size}): supported are {', '.join(SUPPORTED_STRATEGIES)}."
            )
        return
    hint = (
        "; for sharding, use ModelParallelStrategy and call torch.distributed.fsdp.fully_shard in configure_model (FSDP2)"
        if "FSDP" in name or "DeepSpeed" in name
        else ""
    )
    raise ValueError(f"{callback} cannot run under strategy {name}: supported are {', '.join(SUPPORTED_STRATEGIES)}{hint}.")


def is_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 shards any part of ``module``."""
    return any(isinstance(child, FSDPModule) for child in module.modules())


def shard_if_whole(module: nn.Module, mesh: Any) -> None:
    """``fully_shard(module)`` over ``mesh`` unless FSDP2 already shards its parameters (a ``configure_model`` that
    shards the LightningModule as a whole shards it too). ``module`` must be called itself: FSDP2 gathers the
    parameters in its forward."""
    from torch.distributed.fsdp import fully_shard

    if not any(isinstance(parameter, DTensor) for parameter in module.parameters()):
        fully_shard(module, mesh=mesh)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: gathered from every rank where it is a ``DTensor`` (collective), else itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of ``tensor`` where it is a ``DTensor`` (sharing its storage: an in-place change of the
    slice changes the ``DTensor``), else ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def true_on_every_rank(flags: list[bool]) -> list[bool]:
    """Each of ``flags`` and-ed over every process (collective where several run): for a decision each rank makes
    from its own slices that every rank must take alike."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1 or not flags:
        return flags
    agreed = torch.tensor(flags, dtype=torch.int32)
    torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
    return [bool(flag) for flag in agreed]


def like(tensor: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole, the same on every rank) laid out as ``parameter`` is: this rank's slice of it where
    ``parameter`` is a ``DTensor`` (no communication), else ``tensor`` on ``parameter``'s device."""
    if isinstance(parameter, DTensor):
        return distribute_tensor(tensor.to(parameter.device), parameter.device_mesh, parameter.placements, src_data_rank=None)
    return tensor.to(parameter.device)


def unsharded(module: nn.Module) -> nn.Module:
    """``module`` itself where nothing in it is sharded; else a plain copy with whole parameters (collective)."""
    return full_copy(module) if is_sharded(module) else module


def free_dropped_copies(module: nn.Module) -> None:
    """Where ``module`` is sharded, free the whole copies a callback's fit end gathered and has dropped: a copy
    holding FX graphs (a prepared or converted part: each graph and its module point at each other) is freed only by
    the garbage collector, and until it runs, the fit end's copies (dense, float, calibrated, converted) pile up on
    every rank. A full collection takes a few hundred milliseconds in a process with transformers loaded: once per
    callback's fit end, not at every gather (channel pruning gathers at each mask update)."""
    if is_sharded(module):
        gc.collect()


def mesh_of(module: nn.Module) -> Any:
    """The device mesh FSDP2 shards ``module``'s parameters over, or ``None`` where none is sharded."""
    return next((parameter.device_mesh for parameter in module.parameters() if isinstance(parameter, DTensor)), None)


def full_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that FSDP2 does not manage: the original classes, every parameter whole (gathered
    from the ranks, on the device its shard was on), rank 0's buffers (FSDP2 leaves each rank its own BatchNorm
    statistics; the copy must be the same model on every rank), FSDP's hooks and state left behind; any other hook
    and attribute copied as ``copy.deepcopy`` copies them, a sharded module kept as a plain attribute (not a
    child) copied as this copies. Collective where ``module`` is sharded."""
    if not is_sharded(module):
        return copy.deepcopy(module)
    memo: dict[int, Any] = {}
    for parameter in module.parameters():  # in registration order, on every rank alike
        if isinstance(parameter, DTensor):
            whole = parameter.full_tensor().detach().clone()
            memo[id(parameter)] = nn.Parameter(whole, requires_grad=parameter.requires_grad)
    # a sharded module held only as a plain attribute (DistillationModule's teacher); one that is also a child (its
    # LightningModule student, held as both) is copied as the child it is
    children = {id(layer) for layer in module.modules()}
    for layer in module.modules():
        for value in vars(layer).values():
            if isinstance(value, nn.Module) and id(value) not in children and id(value) not in memo and is_sharded(value):
                memo[id(value)] = full_copy(value)
    with _without_fsdp(module):
        replica = copy.deepcopy(module, memo)
    if torch.distributed.is_initialized():
        _broadcast_from_rank_zero(list(replica.buffers()))
    return replica


class ShardedCopy:
    """What ``full_copy(module)`` would return, kept until it is read with each rank holding only its slices of
    the sharded parameters: a whole copy per rank is what FSDP2 exists to avoid (pruning's dense baseline, read at
    fit end, held 129 MiB per process of a 33.7M-parameter model for the whole fit). The structure is kept on the
    meta device, buffers whole. ``whole()`` gathers (collective)."""

    def __init__(self, module: nn.Module, state: dict[str, torch.Tensor] | None = None, mesh: Any = None) -> None:
        """``module`` as it is now (its sharded parameters' slices cloned, no communication); or, given ``state``
        (whole tensors by ``module``'s state_dict names, read from a checkpoint), those values, each parameter
        sliced over ``mesh`` along its first dimension as FSDP2 slices (kept whole without a mesh)."""
        self._slices: dict[int, torch.Tensor] = {}  # by id of the structure's meta parameter
        memo: dict[int, Any] = {}
        for name, parameter in module.named_parameters():  # tied ones once
            meta = nn.Parameter(torch.empty(parameter.shape, dtype=parameter.dtype, device="meta"), parameter.requires_grad)
            memo[id(parameter)] = meta
            if state is None:
                self._slices[id(meta)] = parameter.detach().clone()  # a DTensor: this rank's slice
                continue
            value = state[name].to(parameter.device if mesh is None else mesh.device_type)
            self._slices[id(meta)] = value if mesh is None else distribute_tensor(value, mesh, [Shard(0)], src_data_rank=None)
        with _without_fsdp(module):
            self.structure = copy.deepcopy(module, memo)
            """The copy's modules, parameters on the meta device: changed here, changed in ``whole()``."""
        if state is not None:
            buffers = dict(self.structure.named_buffers())
            with torch.no_grad():
                for name, buffer in buffers.items():
                    if name in state:
                        buffer.copy_(state[name])

    def whole(self) -> nn.Module:
        """The plain copy: whole parameters (gathered from every rank), rank 0's buffers (collective)."""
        replica = copy.deepcopy(self.structure)
        wholes = {  # in the structure's order, alike on every rank
            id(meta): nn.Parameter(full_tensor(self._slices[id(meta)]).detach().clone(), requires_grad=meta.requires_grad)
            for meta in self.structure.parameters()
        }
        originals = {id(copied): id(meta) for meta, copied in zip(self.structure.parameters(), replica.parameters(), strict=True)}
        for layer in replica.modules():  # tied parameters stay tied
            for key, parameter in layer._parameters.items():
                if parameter is not None:
                    layer._parameters[key] = wholes[originals[id(parameter)]]
        if torch.distributed.is_initialized():
            _broadcast_from_rank_zero(list(replica.buffers()))
        return replica


@contextlib.contextmanager
def _without_fsdp(module: nn.Module) -> Iterator[None]:
    """Each FSDP-managed submodule seen as its own class, without FSDP's state and hooks, for the time of a copy."""
    saved = []
    for child in module.modules():
        if not isinstance(child, FSDPModule):
            continue
        state = {key: value for key, value in child.__dict__.items() if _is_fsdp_state(key, value)}
        hooks = {key: child.__dict__[key] for key in ("_forward_pre_hooks", "_forward_hooks")}
        saved.append((child, type(child), state, hooks))
        for key in state:
            del child.__dict__[key]
        for key, table in hooks.items():
            child.__dict__[key] = OrderedDict((k, hook) for k, hook in table.items() if not _is_fsdp_hook(hook))
        child.__class__ = _original_class(type(child))
    try:
        yield
    finally:
        for child, cls, state, hooks in saved:
            child.__class__ = cls
            child.__dict__.update(state)
            child.__dict__.update(hooks)


def _original_class(cls: type) -> type:
    """The class ``fully_shard`` subclassed (it puts ``FSDPModule`` right before it in the MRO)."""
    mro = cls.__mro__
    return mro[mro.index(FSDPModule) + 1]


def _is_fsdp_state(key: str, value: Any) -> bool:
    if key in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
        return True
    # torch.distributed._composable.contract keeps each composable API's state in a dict under a generated key
    return key.startswith("__composable_api_state_key") or key.startswith("_fsdp")


def _is_fsdp_hook(hook: Any) -> bool:
    """FSDP's forward hooks: its state's bound methods, or wrappers closing over them (a group of modules)."""
    cells = getattr(hook, "__closure__", None) or ()
    return _from_fsdp(hook) or any(_from_fsdp(_cell(cell)) for cell in cells)


def _from_fsdp(value: Any) -> bool:
    owner = getattr(value, "__self__", None)
    where = type(owner).__module__ if owner is not None else getattr(value, "__module__", None) or ""
    return where.startswith("torch.distributed.fsdp")


def _cell(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def reshard(module: nn.Module) -> None:
    """Leave every FSDP2 part of ``module`` sharded again after a forward outside training (an observed step, a
    calibration): FSDP2 keeps a root module whole after its forward until the backward, and the checkpoint loader and
    the optimizer expect the shards."""
    for child in module.modules():
        if isinstance(child, FSDPModule):
            child.reshard()


def gather_sharded_children(module: nn.Module) -> list[str]:
    """Replace each child of ``module`` that FSDP2 shards by a plain copy with whole parameters (collective): for a
    structure rebuilt after ``configure_model`` sharded the one it replaces (``configure_model`` then shards the new
    one). A module sharded as a whole holds FSDP's state for every parameter in it: no child can be swapped. The
    names of the children replaced."""
    if isinstance(module, FSDPModule):
        raise ValueError(
            f"{type(module).__name__}'s configure_model shards the LightningModule itself, so the networks of a "
            "distributed checkpoint (fake-quant, or with channels removed) cannot be rebuilt in a fresh one: shard its "
            "networks (fully_shard(self.net)) instead, or test the module the fit trained."
        )
    gathered = []
    for name, child in list(module.named_children()):
        if is_sharded(child):  # itself, or blocks inside it
            setattr(module, name, full_copy(child))
            gathered.append(name)
    return gathered


def shard_again(pl_module: L.LightningModule, networks: list[str], by: str, when: str) -> None:
    """The user's ``configure_model`` shards ``networks`` (names in ``pl_module``), rebuilt whole by ``by`` (``when``),
    as it sharded the ones they replace: it is written to shard what is not yet sharded, as Lightning's later stages
    need too. One line where it left one whole."""
    pl_module.configure_model()
    unsharded = [name for name in networks if not is_sharded(pl_module.get_submodule(name))]
    if unsharded:
        raise RuntimeError(
            f"{by}: {type(pl_module).__name__}.configure_model left {unsharded[0]!r} unsharded {when}: shard each "
            "network that is not yet an FSDPModule (if not isinstance(self.net, FSDPModule): fully_shard(self.net, ...))."
        )


def under_fsdp2(trainer: L.Trainer) -> bool:
    """Whether the Trainer's strategy is the one that shards with FSDP2 (``ModelParallelStrategy``)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def synchronize_buffers(trainer: L.Trainer, module: nn.Module) -> None:
    """Under FSDP2, every rank takes rank 0's buffers of the whole module after each training step, as DDP does
    before each forward: FSDP2 leaves each rank its own BatchNorm statistics and observer ranges, so the ranks would
    compress different models, and a checkpoint (which holds one rank's buffers) would resume another one."""
    if under_fsdp2(trainer):
        broadcast_buffers(module, trainer)


def broadcast_buffers(module: nn.Module, trainer: L.Trainer) -> None:
    """Every rank takes rank 0's buffers of ``module`` (observers' ranges, BatchNorm statistics), as DDP does before
    each forward; FSDP2 leaves buffers to each rank. Collective where several processes run."""
    if trainer.world_size > 1 and torch.distributed.is_initialized():
        _broadcast_from_rank_zero(list(module.buffers()))


def _broadcast_from_rank_zero(tensors: list[torch.Tensor]) -> None:
    """Every rank's ``tensors`` (the same list on each) take rank 0's values: one broadcast per dtype and device,
    not one per tensor. A transformer's observers hold hundreds of small buffers, broadcast after every step; each
    collective costs its own round trip (tens of microseconds with gloo), whatever its size."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for tensor in tensors:
        groups.setdefault((tensor.dtype, tensor.device), []).append(tensor)
    for group in groups.values():
        flat = torch.cat([tensor.detach().reshape(-1) for tensor in group])
        torch.distributed.broadcast(flat, src=0)
        for tensor, values in zip(group, flat.split([tensor.numel() for tensor in group]), strict=True):
            tensor.detach().copy_(values.view_as(tensor))
