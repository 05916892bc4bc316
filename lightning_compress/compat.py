"""The one place that reaches into private Lightning or torch internals.

Each function here names what it needs and why no public API gives it; ``tests/test_compat.py`` checks every
one against the installed versions, so a new Lightning or torch release is vetted by one test file.
"""

from __future__ import annotations

from collections.abc import Iterable

import lightning as L
import torch


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
