"""The one place that reaches into private Lightning or torch internals.

Each function here names what it needs and why no public API gives it; ``tests/test_compat.py`` checks every
one against the installed versions, so a new Lightning or torch release is vetted by one test file.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import lightning as L
import torch
from torch import nn


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI (AVX-512 VNNI or AVX-VNNI) int8 dot-product instructions.

    torch only exposes this privately; the capability string (``AVX2``/``AVX512``) does not tell it.
    """
    return bool(torch.cpu._is_vnni_supported())


def training_dataloader(trainer: L.Trainer) -> Iterable:
    """The training data of ``fit`` before the fit loop has loaded it (in ``setup``), and after it ends.

    Lightning has no public handle on dataloaders passed to ``fit()`` before its loop requests them; its fit
    loop's data source covers both those and a datamodule. Without it, the datamodule is asked directly.
    """
    source = getattr(trainer.fit_loop, "_data_source", None)
    if source is not None and source.is_defined():
        return source.dataloader()
    if trainer.datamodule is not None:
        return trainer.datamodule.train_dataloader()
    raise ValueError("no training data: pass a datamodule or train_dataloaders to fit().")


def quantized_tensor_like(quantized: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A quantized tensor with ``quantized``'s scales, zero-points and axis, holding the integers ``values``.

    torch builds one from integers only through these private constructors.
    """
    if quantized.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return torch._make_per_channel_quantized_tensor(
            values, quantized.q_per_channel_scales(), quantized.q_per_channel_zero_points(), quantized.q_per_channel_axis()
        )
    return torch._make_per_tensor_quantized_tensor(values, quantized.q_scale(), quantized.q_zero_point())


def inductor_freezing():
    """A context in which ``torch.compile`` freezes parameters into constants, as Inductor's int8 path needs
    (it prepacks quantized weights for oneDNN only when frozen; unfrozen, the graph fails to compile).

    The setting lives in the private ``torch._inductor.config``; ``torch.compile(options={"freezing": True})``
    fails on quantized graphs in torch 2.14 (onednn.qconv_prepack meets fake tensors).
    """
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


def only_marked_dimensions_dynamic():
    """A context in which ``torch.compile`` leaves symbolic only the dimensions marked so
    (``torch._dynamo.maybe_mark_dynamic``): by default a dimension whose size changed between calls becomes
    symbolic when it compiles again (``automatic_dynamic_shapes``), a language model's sequence included. The
    setting lives in the private ``torch._dynamo.config``."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(automatic_dynamic_shapes=False)


def only_compiled_code():
    """A context in which a ``torch.compile``d function runs only graphs it compiled before: a call whose guards
    match none raises instead of compiling (``would_compile`` tells that error apart), so that the settings a
    compile needs can be left out of calls that need none (``torch.compiler.set_stance``)."""
    return torch.compiler.set_stance("fail_on_recompile")


def would_compile(error: BaseException) -> bool:
    """Whether ``error`` is the one a call raises in ``only_compiled_code`` where it would have compiled (a plain
    ``RuntimeError``, known by its message in torch 2.14)."""
    return isinstance(error, RuntimeError) and "stance is 'fail_on_recompile'" in str(error)


def compiles_up_to(graphs: int):
    """A context in which Dynamo compiles a function up to ``graphs`` times before it runs it eagerly
    (``recompile_limit``, 8 by default: a function compiled per input shape reaches it at its ninth shape). The
    setting lives in the private ``torch._dynamo.config``."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=graphs)


def decomposed_quantize_ops() -> Any:
    """``torch.ops.quantized_decomposed``: quantize and dequantize ops that ``torch.export`` keeps whole and that
    ONNX's dynamo exporter (QuantizeLinear/DequantizeLinear) and OpenVINO's FX frontend (FakeQuantize) read;
    ``torch.fake_quantize_*`` has no meta kernel there. torch defines them in a private module of ``torch.ao``."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401 - registers the ops

    return torch.ops.quantized_decomposed


def executorch_threads(count: int) -> None:
    """Run ExecuTorch's kernels (XNNPACK's) on ``count`` threads, process-wide: the report times every model on one.
    Its Python bindings offer only a private call for this."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(count)


def training_batch_index(trainer: L.Trainer) -> int:
    """The index, within its epoch, of the training batch being prepared (in ``on_after_batch_transfer``).

    ``batch_idx`` reaches ``training_step`` but not the batch hooks; the fit loop's progress counter has it.
    A resumed run restores the counter, so per-batch random draws seeded by it repeat exactly.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.current.ready


def detached_tracing() -> AbstractContextManager:
    """A context in which a ``LightningModule`` without a ``Trainer`` can be traced or exported.

    Tracers probe every attribute, and ``LightningModule.trainer`` raises when detached unless Lightning's
    own scripting flag is set; Lightning's ``to_torchscript`` sets it with this private context manager.
    """
    from lightning.pytorch.core.module import _jit_is_scripting

    return _jit_is_scripting()


def without_children(module: nn.Module, names: Iterable[str]) -> nn.Module:
    """A shallow copy of ``module`` without the children ``names``; ``module`` itself keeps them.

    ``copy.copy`` shares the registry of children with the original, so deleting from the copy would
    delete from both; the copy gets a registry of its own, which ``nn.Module`` keeps in ``_modules``.
    """
    dropped = set(names)
    copied = copy.copy(module)
    copied._modules = {name: child for name, child in module._modules.items() if name not in dropped}
    return copied


def packed_weight_and_bias(module: nn.Module) -> Any:
    """The weight and bias an int8 module of the FX backend keeps packed for its kernel
    (a pair for Conv/Linear, nested dicts for dynamic LSTMs), or ``None`` for any other module.

    They are neither parameters nor buffers; only the private ``_weight_bias`` unpacks them all alike.
    """
    packed = getattr(module, "_weight_bias", None)
    return packed() if callable(packed) else None


def run_before_weights_load(pl_module: L.LightningModule, hook: Callable[[dict[str, Any]], None], order: int, by: str) -> None:
    """Run ``hook(checkpoint)`` before Lightning loads a checkpoint's weights into ``pl_module``, then the
    module's own ``on_load_checkpoint``. Hooks run by ``order``, lowest first, whichever registered first: a
    structure built on another (fake-quant inserted into a network whose channels were removed) is rebuilt
    after it, whatever the order of the callbacks in the Trainer. ``by`` names the hook (its callback's state key
    and what it does): registered again, at each fit's ``setup``, it replaces the one of that name, so that a
    module fitted several times runs each once, and the hooks of an earlier fit's callback give way to the
    callback that takes its place.

    Lightning 2.6 loads the module's state_dict before any callback's ``load_state_dict`` or
    ``on_load_checkpoint``, and ``trainer.ckpt_path`` is unset in ``setup``: a callback that changes the
    module's structure must rebuild it in the one hook that runs before the weights load, the module's.
    """
    hooks = pl_module.__dict__.get(_HOOKS_BEFORE_WEIGHTS_LOAD)
    if hooks is None:
        hooks = pl_module.__dict__[_HOOKS_BEFORE_WEIGHTS_LOAD] = {}
        own_hook = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            _run_hooks_before_weights_load(pl_module, checkpoint)
            own_hook(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
    hooks[by] = (order, hook)


_HOOKS_BEFORE_WEIGHTS_LOAD = "_lightning_compress_hooks_before_weights_load"


def _run_hooks_before_weights_load(pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    for _, hook in sorted(pl_module.__dict__.get(_HOOKS_BEFORE_WEIGHTS_LOAD, {}).values(), key=lambda entry: entry[0]):
        hook(checkpoint)


def run_before_distributed_weights_load(
    trainer: L.Trainer,
    pl_module: L.LightningModule,
    before: Callable[[], None] = lambda: None,
    after: Callable[[], None] = lambda: None,
    by: str = "",
) -> None:
    """Run the hooks of ``run_before_weights_load`` also where the Trainer's strategy loads a distributed checkpoint
    (a folder, as ``ModelParallelStrategy`` writes), between ``before()`` and ``after()``.

    Such a load reads the weights into the module inside the strategy's ``load_checkpoint``, before the module's
    ``on_load_checkpoint`` runs, so the structure must be rebuilt earlier still: the strategy's ``load_checkpoint``
    is wrapped, and the hooks read the folder's ``meta.pt`` (Lightning's private layout: everything but the module
    and optimizer state, the callbacks' states included). Every folder load also gives the module's buffers the
    shapes the checkpoint saved them with (see ``_shape_buffers_as_saved``), hooks or not. A full checkpoint (one
    file, ``save_distributed_checkpoint=False``) is read inside ``load_checkpoint`` too: the hooks read the file
    (memory-mapped, whole weights included) first.

    Several callbacks may ask, each ``by`` its own name (asked again, its steps replace the ones it gave): every
    ``before`` runs, then the hooks, then every ``after``, whichever callback came first in the Trainer. Each step
    must do nothing where it has nothing to do (gathering what is already whole, sharding what is sharded).
    """
    from pathlib import Path

    from lightning.fabric.utilities.load import _METADATA_FILENAME

    strategy = trainer.strategy
    if strategy.__dict__.get(_WRAPPED_LOAD) is pl_module:
        strategy.__dict__[_LOAD_STEPS][by] = (before, after)
        return
    original = type(strategy).load_checkpoint.__get__(strategy)
    steps = {by: (before, after)}

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(strategy, "lightning_module", pl_module) is not pl_module:  # the trainer now runs another module
            return original(checkpoint_path, *args, **kwargs)
        metadata = Path(checkpoint_path) / _METADATA_FILENAME
        # the user's own checkpoint: one file holding the whole state dict (read once, for the hooks and the buffers),
        # or a folder whose metadata holds all but the weights
        full = torch.load(checkpoint_path, **_READ_WHOLE) if Path(checkpoint_path).is_file() else None
        if pl_module.__dict__.get(_HOOKS_BEFORE_WEIGHTS_LOAD) and (metadata.is_file() or full is not None):
            for before, _ in steps.values():
                before()
            _run_hooks_before_weights_load(pl_module, full if full is not None else torch.load(metadata, **_READ_WHOLE))
            for _, after in steps.values():
                after()
        if metadata.is_file():
            _shape_buffers_as_saved(pl_module, Path(checkpoint_path))
        loaded = original(checkpoint_path, *args, **kwargs)
        if full is not None:
            _buffers_as_saved(pl_module, full["state_dict"])
        return loaded

    strategy.load_checkpoint = load_checkpoint
    strategy.__dict__[_WRAPPED_LOAD] = pl_module
    strategy.__dict__[_LOAD_STEPS] = steps


_WRAPPED_LOAD = "_lightning_compress_wrapped_load_for"
_LOAD_STEPS = "_lightning_compress_load_steps"
_READ_WHOLE = {"map_location": "cpu", "weights_only": False, "mmap": True}  # a file read in pages, as it is used


def _buffers_as_saved(pl_module: nn.Module, state_dict: dict[str, Any]) -> None:
    """Give each buffer of ``pl_module`` the value ``state_dict`` (a full checkpoint's) saved, after
    ``ModelParallelStrategy`` loaded it: Lightning hands an FSDP2 module a full checkpoint one tensor at a time, in
    dicts without the ``_metadata`` that says which version of a module wrote them, and torch's observers read such a
    dict as written by their first version, resetting ``eps`` to float32's (the torch.export engine's QAT observers
    use 2**-12). A distributed checkpoint loads into the tensors in place and keeps it."""
    with torch.no_grad():
        for name, buffer in pl_module.named_buffers():
            saved = state_dict.get(name)
            if isinstance(saved, torch.Tensor) and saved.shape == buffer.shape:
                buffer.copy_(saved)


def _shape_buffers_as_saved(pl_module: nn.Module, folder: Any) -> None:
    """Give each buffer of ``pl_module`` the shape the distributed checkpoint in ``folder`` saved it with.

    A distributed checkpoint loads into the module's tensors in place, so a buffer whose shape is set by the data it
    first sees (a per-channel observer's range, a fake-quant's per-channel scale) must have that shape before it
    loads; a full checkpoint's ``load_state_dict`` reshapes such buffers itself. Lightning saves the module's state
    under ``state_dict.`` (its private layout); the sizes come from the checkpoint's public metadata.
    """
    from torch.distributed.checkpoint import FileSystemReader

    saved = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    for module_name, module in pl_module.named_modules():
        for name, buffer in list(module._buffers.items()):
            entry = saved.get(f"state_dict.{module_name}.{name}" if module_name else f"state_dict.{name}")
            size = getattr(entry, "size", None)
            if buffer is not None and size is not None and tuple(size) != tuple(buffer.shape):
                module._buffers[name] = torch.empty(size, dtype=buffer.dtype, device=buffer.device)


SETTINGS_CHECKED, CHANNELS_REMOVED, FAKE_QUANT_INSERTED = -1, 0, 1
"""The ``order`` of the hooks that run before the weights load: a checkpoint's settings are checked before anything
is rebuilt, and QAT inserts fake-quant into the network as channel pruning's shrink left it."""


def rewrap_distributed(trainer: L.Trainer) -> None:
    """Wrap the module in ``DistributedDataParallel`` again after its parameters changed (a network shrunk
    mid-run): DDP registers the parameters it synchronizes when it wraps, so new ones would never be reduced.

    Lightning has no public "re-wrap"; its DDP strategy's ``configure_ddp`` wraps whatever ``strategy.model``
    is, which is the bare module again once set so.
    """
    from lightning.pytorch.strategies import DDPStrategy
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, DistributedDataParallel):
        strategy.model = strategy.lightning_module
        strategy.configure_ddp()


_PATTERN_GRAPHS: dict[Any, Any] = {}


def _pattern_key(pattern: Callable, example_inputs: tuple, is_cuda: bool, kwargs: dict[str, Any]) -> Any:
    """What a pattern's exported graph depends on: its code, the values it closes over (flags, the conv
    function, an epsilon) and the shapes and dtypes of its example inputs, never their random values."""

    def described(value: Any) -> Any:
        return ("tensor", tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value

    function = getattr(pattern, "fn", pattern)  # torchao wraps some patterns in a module holding the function
    if not hasattr(function, "__code__"):
        raise TypeError(f"{type(pattern).__name__} is no function")
    closure = tuple(cell.cell_contents for cell in function.__closure__ or ())
    key = (
        function.__code__,
        closure,
        tuple(described(value) for value in example_inputs),
        is_cuda,
        tuple(sorted((name, described(value)) for name, value in kwargs.items())),
    )
    hash(key)  # a closure over something unhashable: not cached
    return key


def pattern_graph(pattern: Callable, example_inputs: tuple, kwargs: dict[str, Any]) -> Any:
    """The aten graph of a rewrite pattern, as torchao's pt2e rewrites match it, exported without dynamo:
    dead code, the unused ``copy_`` nodes export adds for mutated inputs and the input-guard call non-strict
    export adds removed (a pattern matches whatever it is given)."""
    graph_module = torch.export.export(pattern, example_inputs, kwargs, strict=False).module()
    for node in list(graph_module.graph.nodes):
        unused_copy = node.op == "call_function" and node.target == torch.ops.aten.copy_.default and not node.users
        if unused_copy or (node.op == "call_module" and node.target == "_guards_fn"):
            graph_module.graph.erase_node(node)
    if hasattr(graph_module, "_guards_fn"):
        delattr(graph_module, "_guards_fn")
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return graph_module


def quick_conv_batch_norm_rewrites() -> AbstractContextManager:
    """A context in which torchao's pt2e QAT prepares and converts convolutions with BatchNorm in seconds, not
    tens of seconds.

    ``prepare_qat_pt2e`` and ``convert_pt2e`` rewrite conv + BatchNorm subgraphs by matching pattern graphs, each
    made by a strict ``torch.export`` of a small function (about 0.2 s each): converting the digits CNN exported 96
    of them (16.6 s of a 24 s fit), for all four kinds of convolution (1d, 2d, transposed) whichever the graph
    holds, again at every call. Inside this context a kind the graph does not hold is not rewritten (nothing would
    match), each pattern graph is exported once per process (a copy is handed out: the rewrite reads it), and
    without dynamo (non-strict export: the same aten graph, checked by ``tests/test_compat.py``, in a third of
    the time). The helpers are private (``torchao.quantization.pt2e.qat_utils``); where they are missing,
    nothing changes.
    """
    import contextlib

    try:
        from torchao.quantization.pt2e import qat_utils
        from torchao.quantization.pt2e import utils as pt2e_utils
    except ImportError:
        return contextlib.nullcontext()
    names = ("_get_aten_graph_module_for_pattern", "_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
    if not all(hasattr(qat_utils, name) for name in names) or not hasattr(pt2e_utils, names[0]):
        return contextlib.nullcontext()
    export_pattern = pt2e_utils._get_aten_graph_module_for_pattern

    def exported_once(pattern: Callable, example_inputs: tuple, is_cuda: bool = False, **kwargs: Any) -> Any:
        try:
            key = _pattern_key(pattern, example_inputs, is_cuda, kwargs)
        except TypeError:
            return export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        if key not in _PATTERN_GRAPHS:
            try:
                _PATTERN_GRAPHS[key] = pattern_graph(pattern, example_inputs, kwargs) if not is_cuda else None
            except Exception:  # noqa: BLE001 - what the non-strict export cannot trace, torchao's strict one may
                _PATTERN_GRAPHS[key] = None
            if _PATTERN_GRAPHS[key] is None:
                _PATTERN_GRAPHS[key] = export_pattern(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(_PATTERN_GRAPHS[key])

    def only_kinds_present(rewrite: Callable) -> Callable:
        def rewrite_if_present(graph_module: Any, conv_fn: Callable, *args: Any, **kwargs: Any) -> Any:
            present = {
                getattr(getattr(node.target, "overloadpacket", None), "__name__", None)
                for node in graph_module.graph.nodes
                if node.op == "call_function"
            }
            if conv_fn.__name__ not in present:
                return graph_module
            return rewrite(graph_module, conv_fn, *args, **kwargs)

        return rewrite_if_present

    @contextlib.contextmanager
    def patched() -> Any:
        originals = {name: getattr(qat_utils, name) for name in names}
        replacements = {
            names[0]: exported_once,
            names[1]: only_kinds_present(originals[names[1]]),
            names[2]: only_kinds_present(originals[names[2]]),
        }
        try:
            for name, replacement in replacements.items():
                setattr(qat_utils, name, replacement)
            pt2e_utils._get_aten_graph_module_for_pattern = exported_once
            yield
        finally:
            for name, original in originals.items():
                setattr(qat_utils, name, original)
            pt2e_utils._get_aten_graph_module_for_pattern = export_pattern

    return patched()
