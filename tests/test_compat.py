"""One test per private Lightning/torch internal that ``lightning_compress.compat`` reaches for: a new release
that moves one fails here, by name."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import compat
from lightning_compress.app.models import ImageClassifier

from conftest import quiet_trainer


def test_cpu_has_vnni_answers_a_bool():
    assert isinstance(compat.cpu_has_vnni(), bool)
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        assert not compat.cpu_has_vnni()


@pytest.mark.parametrize("source", ["dataloaders", "datamodule"])
def test_training_dataloader_is_reachable_in_setup(tmp_path: Path, digits, source: str):
    seen = []

    class Probe(L.Callback):
        def setup(self, trainer, pl_module, stage):
            seen.append(next(iter(compat.training_dataloader(trainer)))[0].shape)

    trainer = quiet_trainer(tmp_path, [Probe()], 1, limit_train_batches=1, limit_val_batches=0)
    model = ImageClassifier(architecture="cnn")
    if source == "datamodule":
        trainer.fit(model, datamodule=digits)
    else:
        images, labels = digits.train_set.tensors
        trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(images[:32], labels[:32]), batch_size=16))
    assert seen and seen[0][1:] == (1, 8, 8)


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_tensor_like_keeps_the_quantization_parameters(per_channel: bool):
    weights = torch.randn(4, 3)
    if per_channel:
        quantized = torch.quantize_per_channel(weights, torch.rand(4) + 0.01, torch.zeros(4, dtype=torch.long), 0, torch.qint8)
    else:
        quantized = torch.quantize_per_tensor(weights, 0.02, 0, torch.qint8)
    values = quantized.int_repr().clamp(-5, 5)
    rebuilt = compat.quantized_tensor_like(quantized, values)
    assert torch.equal(rebuilt.int_repr(), values)
    assert rebuilt.qscheme() == quantized.qscheme()
    if per_channel:
        assert torch.equal(rebuilt.q_per_channel_scales(), quantized.q_per_channel_scales())
    else:
        assert rebuilt.q_scale() == quantized.q_scale()


def test_inductor_freezing_is_on_inside_and_restored_after():
    import torch._inductor.config as inductor_config

    before = inductor_config.freezing
    with compat.inductor_freezing():
        assert inductor_config.freezing is True
    assert inductor_config.freezing == before
