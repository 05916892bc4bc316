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


def run_before_weights_load(pl_module: L.LightningModule, hook: Callable[[dict[str, Any]], None], order: int) -> None:
    """Run ``hook(checkpoint)`` before Lightning loads a checkpoint's weights into ``pl_module``, then the
    module's own ``on_load_checkpoint``. Hooks run by ``order``, lowest first, whichever registered first: a
    structure built on another (fake-quant inserted into a network whose channels were removed) is rebuilt
    after it, whatever the order of the callbacks in the Trainer.

    Lightning 2.6 loads the module's state_dict before any callback's ``load_state_dict`` or
    ``on_load_checkpoint``, and ``trainer.ckpt_path`` is unset in ``setup``: a callback that changes the
    module's structure must rebuild it in the one hook that runs before the weights load, the module's.
    """
    hooks = pl_module.__dict__.get(_HOOKS_BEFORE_WEIGHTS_LOAD)
    if hooks is None:
        hooks = pl_module.__dict__[_HOOKS_BEFORE_WEIGHTS_LOAD] = []
        own_hook = pl_module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            for _, registered in sorted(hooks, key=lambda entry: entry[0]):
                registered(checkpoint)
            own_hook(checkpoint)

        pl_module.on_load_checkpoint = on_load_checkpoint
    hooks.append((order, hook))


_HOOKS_BEFORE_WEIGHTS_LOAD = "_lightning_compress_hooks_before_weights_load"

CHANNELS_REMOVED, FAKE_QUANT_INSERTED = 0, 1
"""The ``order`` of the structures callbacks rebuild before the weights load: QAT inserts fake-quant into the
network as channel pruning's shrink left it."""


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
