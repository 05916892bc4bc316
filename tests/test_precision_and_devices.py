"""Train in mixed precision or on a GPU, ship for the CPU.

Under ``Trainer(precision="bf16-mixed")`` (Lightning supports it on the CPU, so CI runs these) convolutions
and matrix products compute in bf16 while the weights, the fake-quant ranges and the masks stay float32;
observers see the bf16 activations, which are what training feeds forward, and conversion builds the int8
model in float32 on the CPU. The ``gpu`` tests run the same paths on CUDA and are skipped without it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import DistillationModule, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier, SmallCNN
from lightning_compress.distillation import distillation_loss

from conftest import quiet_trainer

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fit(
    tmp_path: Path, callbacks: list, epochs: int, precision: str = "bf16-mixed", accelerator: str = "cpu", model=None, **options
):
    L.seed_everything(0)
    model = model or ImageClassifier()
    digits = DigitsDataModule(batch_size=64)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=epochs,
        accelerator=accelerator,
        devices=1,
        precision=precision,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(callback, ModelCheckpoint) for callback in callbacks),
        callbacks=callbacks,
        **options,
    )
    trainer.fit(model, datamodule=digits)
    digits.setup()
    return trainer, model, digits


def _qat_agrees_with_fake_quant(model: ImageClassifier, qat: QuantizationAwareTraining, digits: DigitsDataModule) -> None:
    """The int8 model (on the CPU) computes what the fake-quant model computes, within the bound the fp32 test uses."""
    images = digits.test_set.tensors[0]
    with torch.no_grad():
        fake_quant = model.eval()(images.to(model.device)).float().cpu()
        int8 = qat.quantized_model(images)
    assert next(qat.quantized_model.buffers(), torch.empty(0)).device.type == "cpu"
    assert (int8 - fake_quant).abs().max() <= 4 * float(qat.quantized_model.net.classifier.scale)
    assert (int8.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.99


def test_qat_in_bf16_mixed_converts_to_int8_that_agrees(tmp_path: Path):
    qat = QuantizationAwareTraining(
        start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3, backend="x86", export_format="none"
    )
    _, model, digits = _fit(tmp_path, [qat], 4)
    assert all(parameter.dtype == torch.float32 for parameter in model.parameters())  # bf16 only inside autocast
    _qat_agrees_with_fake_quant(model, qat, digits)


def test_channel_pruning_in_bf16_mixed_removes_channels_exactly(tmp_path: Path):
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none")
    _, model, digits = _fit(tmp_path, [pruning], 2)
    images = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        assert torch.allclose(pruning.pruned_model(images), model.eval()(images), atol=1e-4)
    assert sum(p.numel() for p in pruning.pruned_model.parameters()) < 0.4 * sum(p.numel() for p in model.parameters())


def test_the_distillation_loss_is_float32_whatever_the_logits():
    student = torch.randn(8, 10, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(8, 10, dtype=torch.bfloat16)
    labels = torch.randint(0, 10, (8,))
    total, kd, ce = distillation_loss(student, teacher, labels, temperature=4.0, alpha=0.5)
    assert total.dtype == kd.dtype == ce.dtype == torch.float32
    _, float_kd, _ = distillation_loss(student.float(), teacher.float(), labels, temperature=4.0, alpha=0.5)
    assert torch.equal(kd, float_kd)


def test_distillation_in_bf16_mixed_keeps_the_teacher_frozen(tmp_path: Path):
    teacher = SmallCNN()
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    module = DistillationModule(student=SmallCNN(widths=(8, 16, 32)), teacher=teacher, temperature=4.0, alpha=0.7)
    trainer, module, _ = _fit(tmp_path, [], 2, model=module)
    assert all(torch.equal(before[name], value) for name, value in module._teacher.state_dict().items())
    assert torch.isfinite(torch.tensor(float(trainer.callback_metrics["train/kd_loss"])))


def test_resume_mid_qat_in_bf16_mixed_matches_uninterrupted(tmp_path: Path):
    schedule = {"start_epoch": 1, "freeze_bn_epoch": 2, "freeze_observer_epoch": 3, "export_format": "none"}
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    full = QuantizationAwareTraining(**schedule)
    _, _, digits = _fit(tmp_path / "full", [full, every_epoch], 4)
    resumed = QuantizationAwareTraining(**schedule)
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path / "resumed", [resumed], 4, precision="bf16-mixed")
    trainer.fit(ImageClassifier(), datamodule=DigitsDataModule(batch_size=64), ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    images = digits.test_set.tensors[0]
    with torch.no_grad():
        expected, actual = full.quantized_model(images), resumed.quantized_model(images)
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    assert torch.allclose(actual, expected, atol=1e-5)


# ---------------------------------------------------------------------- on a GPU (skipped without CUDA)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_qat_on_the_gpu_converts_to_int8_on_the_cpu(tmp_path: Path, precision: str):
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3, export_format="torchscript")
    _, model, digits = _fit(tmp_path, [qat], 4, precision=precision, accelerator="gpu")
    assert model.device.type == "cuda"  # the live module was never moved
    _qat_agrees_with_fake_quant(model, qat, digits)
    assert qat.export_path is not None and torch.jit.load(str(qat.export_path)) is not None


@pytest.mark.gpu
@gpu
def test_channel_pruning_on_the_gpu_ships_a_shrunken_cpu_model(tmp_path: Path):
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_dir=str(tmp_path))
    _, model, digits = _fit(tmp_path, [pruning], 2, precision="32-true", accelerator="gpu")
    assert model.device.type == "cuda"
    images = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        assert torch.allclose(pruning.pruned_model(images), model.eval()(images.cuda()).cpu(), atol=1e-4)
    assert pruning.export_path is not None


@pytest.mark.gpu
@gpu
def test_distillation_on_the_gpu_keeps_the_teacher_frozen(tmp_path: Path):
    teacher = SmallCNN()
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    module = DistillationModule(student=SmallCNN(widths=(8, 16, 32)), teacher=teacher)
    _fit(tmp_path, [], 2, precision="16-mixed", accelerator="gpu", model=module)
    assert module._teacher.training is False
    assert all(torch.equal(before[name], value.cpu()) for name, value in module._teacher.state_dict().items())


@pytest.mark.gpu
@gpu
def test_a_gpu_qat_checkpoint_resumes_on_the_cpu(tmp_path: Path):
    schedule = {"start_epoch": 1, "freeze_bn_epoch": 2, "freeze_observer_epoch": 3, "export_format": "none"}
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "gpu", filename="{epoch}", save_top_k=-1)
    _fit(tmp_path / "gpu", [QuantizationAwareTraining(**schedule), every_epoch], 2, precision="32-true", accelerator="gpu")
    resumed = QuantizationAwareTraining(**schedule)
    trainer = quiet_trainer(tmp_path / "cpu", [resumed], 4)
    trainer.fit(ImageClassifier(), datamodule=DigitsDataModule(batch_size=64), ckpt_path=tmp_path / "gpu" / "epoch=1.ckpt")
    assert resumed.quantized_model is not None


@pytest.mark.gpu
@gpu
def test_pruning_and_qat_under_fsdp2_on_the_gpu_ship_an_int8_model_on_the_cpu(tmp_path: Path):
    """FSDP2 on one GPU (ModelParallelStrategy, the user's fully_shard in configure_model): masks on the sharded
    weights, fake-quant trained there, the int8 model converted from the gathered weights on the CPU."""
    from fsdp2_fit import ShardedClassifier
    from lightning.pytorch.strategies import ModelParallelStrategy

    from lightning_compress.sharding import full_tensor, is_sharded

    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, export_format="none", plot=False)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, export_format="torchscript", export_dir=str(tmp_path))
    trainer = L.Trainer(
        max_epochs=3,
        accelerator="gpu",
        devices=1,
        strategy=ModelParallelStrategy(),
        callbacks=[pruning, qat],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )
    model = ShardedClassifier()
    digits = DigitsDataModule(batch_size=64)
    trainer.fit(model, datamodule=digits)
    assert is_sharded(model.net) and not is_sharded(qat.quantized_model)
    weights = {name: full_tensor(tensor.detach()).cpu() for name, tensor in model.net.state_dict().items()}
    for name, mask in pruning.masks.items():
        assert torch.count_nonzero(weights[name.removeprefix("net.")][~mask.bool().cpu()]) == 0, name
    images, labels = digits.test_set.tensors
    with torch.no_grad():
        predictions = qat.quantized_model(images)
    assert (predictions.argmax(1) == labels).float().mean() >= 0.9
    assert qat.export_path is not None and qat.export_path.is_file()
