"""Channels removed mid-run, then QAT on the smaller network, in one fit: the two factors of speed combined."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.ao.quantization import FakeQuantizeBase

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.report import count_parameters, top1_accuracy

from conftest import quiet_trainer

PRUNING = {"mode": "channels", "final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 2, "update_every": None, "plot": False}
QAT = {"freeze_bn_epoch": 4, "freeze_observer_epoch": 5}


class TrainingRecord(L.Callback):
    """Each epoch's mean training loss, whether the optimizer then held exactly the module's parameters with
    Adam's moments shaped like them, and the moments it holds at each epoch's end and (after the other
    callbacks' epoch-start work: the shrink, QAT's preparation) at each epoch's start."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.optimizer_matches_module: list[bool] = []
        self.moments_at_end: list[list[torch.Tensor]] = []
        self.moments_at_start: list[list[torch.Tensor]] = []
        self._sum = self._count = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.moments_at_start.append(self._moments(trainer))

    @staticmethod
    def _moments(trainer) -> list[torch.Tensor]:
        return [state["exp_avg"].clone() for state in trainer.optimizers[0].state.values()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sum, self._count = self._sum + float(outputs["loss"]), self._count + 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(self._sum / self._count)
        self._sum = self._count = 0.0
        optimizer = trainer.optimizers[0]
        optimized = [parameter for group in optimizer.param_groups for parameter in group["params"]]
        self.optimizer_matches_module.append(
            {id(p) for p in optimized} == {id(p) for p in pl_module.parameters()}
            and all(state["exp_avg"].shape == parameter.shape for parameter, state in optimizer.state.items())
        )
        self.moments_at_end.append(self._moments(trainer))


def _holds_fake_quant(module: torch.nn.Module) -> bool:
    return any(isinstance(child, FakeQuantizeBase) for child in module.modules())


def _width(model: torch.nn.Module, layer: str) -> int:
    """Output channels of a convolution, float, fake-quant or int8 (FX keeps the layer names, not the containers)."""
    return model.get_submodule(layer).out_channels


def _predictions(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(images)


def _fit(
    tmp_path: Path,
    shrink_epoch: int | None,
    start_epoch: int,
    qat_first: bool,
    max_epochs: int = 6,
    extra=(),
    backend: str = "x86",
    **kwargs,
):
    L.seed_everything(0)
    model = ImageClassifier()
    pruning = MagnitudePruning(shrink_epoch=shrink_epoch, export_format="torchscript", **PRUNING)
    qat = QuantizationAwareTraining(
        start_epoch=start_epoch, backend=backend, export_format="torchscript" if backend == "x86" else "torch_export", **QAT
    )
    callbacks = [qat, pruning] if qat_first else [pruning, qat]
    trainer = quiet_trainer(tmp_path, [*callbacks, *extra], max_epochs, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    return trainer, model, pruning, qat


@pytest.mark.slow  # 38 s: six epochs, then Inductor compiles the int8 program
def test_pt2e_qat_exports_the_shrunken_network_and_converts_it_to_int8(tmp_path: Path, digits):
    """The torch.export engine beside channel pruning: the channels come out at shrink_epoch, QAT exports the
    smaller float network at start_epoch, the optimizer follows both, and the int8 program is the smaller one."""
    record = TrainingRecord()
    trainer, model, pruning, qat = _fit(tmp_path, 2, 3, False, extra=[record], backend="x86_inductor")
    assert pruning.shrunk and [part.name for part in qat.parts if part.quantized] == ["net"]
    assert qat.parts[0].int8_layers == 4
    assert all(record.optimizer_matches_module) and record.losses[-1] < record.losses[2]
    dense_parameters, _ = count_parameters(pruning.report_models()["dense"])
    assert count_parameters(qat.quantized_model)[0] < 0.3 * dense_parameters
    images = digits.test_set.tensors[0]
    fake_quant, quantized = _predictions(model, images), _predictions(qat.quantized_model, images)
    assert (quantized.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.98
    assert top1_accuracy(qat.quantized_model, digits.test_dataloader()) >= 0.9


@pytest.mark.parametrize(
    ("shrink_epoch", "start_epoch", "qat_first"),
    [(2, 3, False), (2, 3, True), pytest.param(3, 3, True, marks=pytest.mark.slow), (None, 3, False)],
    ids=["shrink-then-qat", "qat-listed-first", "same-epoch-qat-listed-first", "unset-shrinks-at-qat-start"],
)
def test_qat_prepares_the_shrunken_network_and_converts_it_to_int8(
    tmp_path: Path, digits, shrink_epoch: int | None, start_epoch: int, qat_first: bool
):
    record = TrainingRecord()
    trainer, model, pruning, qat = _fit(tmp_path, shrink_epoch, start_epoch, qat_first, extra=[record])
    assert pruning.shrunk and [part.name for part in qat.parts if part.quantized] == ["net"]
    assert pruning.shrink_epoch == (start_epoch if shrink_epoch is None else shrink_epoch)
    dense_parameters, _ = count_parameters(pruning.report_models()["dense"])
    int8 = qat.quantized_model
    assert count_parameters(int8)[0] < 0.3 * dense_parameters  # half the channels: about a quarter of the weights
    assert _width(int8, "net.features.0") == 16  # the int8 network is the shrunken one
    # the optimizer follows the shrink and then the preparation, with its moments, and training goes on
    assert all(record.optimizer_matches_module) and record.losses[-1] < record.losses[start_epoch - 1]
    before, after = record.moments_at_end[start_epoch - 1], record.moments_at_start[start_epoch]
    if (
        shrink_epoch is not None and shrink_epoch < start_epoch
    ):  # QAT renames the BatchNorm parameters it fuses: each keeps its moments
        assert len(after) == len(before) and all(any(torch.equal(old, new) for new in after) for old in before)
    images = digits.test_set.tensors[0]
    fake_quant, quantized = _predictions(model, images), _predictions(int8, images)
    assert (quantized.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.98
    assert (quantized - fake_quant).abs().max() <= 4 * float(int8.net.classifier.scale)
    assert top1_accuracy(int8, digits.test_dataloader()) >= 0.9
    # the pruned model pruning ships is the float network with its channels removed, QAT's fp32 row
    assert not _holds_fake_quant(pruning.pruned_model) and _width(pruning.pruned_model, "net.features.0") == 16
    assert list(pruning.report_models()) == ["dense"] and list(qat.report_models()) == ["fp32", "fake-quant", "int8"]
    exported = torch.jit.load(str(pruning.export_path))
    assert torch.allclose(exported(images), _predictions(qat.float_model(model), images), atol=1e-5)
    assert torch.equal(torch.jit.load(str(qat.export_path))(images).argmax(1), quantized.argmax(1))


@pytest.mark.slow
def test_resume_before_and_after_qat_prepared_the_shrunken_network_equals_the_uninterrupted_run(tmp_path: Path, digits):
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    _, uninterrupted, _, full = _fit(tmp_path / "full", 2, 3, False, extra=[every_epoch], enable_checkpointing=True)
    images = digits.test_set.tensors[0]
    expected = _predictions(full.quantized_model, images)
    # after epoch 2: shrunk, not yet prepared; after epoch 3: shrunk and prepared (QAT listed first this time)
    for epoch in (2, 3):
        L.seed_everything(0)
        model = ImageClassifier()
        pruning = MagnitudePruning(shrink_epoch=2, export_format="none", **PRUNING)
        qat = QuantizationAwareTraining(start_epoch=3, backend="x86", export_format="none", **QAT)  # as _fit's
        trainer = quiet_trainer(tmp_path / f"resumed{epoch}", [qat, pruning], 6)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=tmp_path / "full" / f"epoch={epoch}.ckpt")
        assert pruning.shrunk and qat.quantized_model is not None
        actual = _predictions(qat.quantized_model, images)
        assert torch.equal(actual.argmax(1), expected.argmax(1)) and torch.allclose(actual, expected, atol=1e-5), epoch
    # without the callbacks: load_from_checkpoint and trainer.test rebuild the shrunken, prepared structure first
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "full" / "epoch=5.ckpt", weights_only=True)
    assert _holds_fake_quant(loaded.net) and _width(loaded, "net.features.0") == 16
    reference = _predictions(uninterrupted, images)
    assert torch.allclose(_predictions(loaded, images), reference, atol=1e-5)
    tester = quiet_trainer(
        tmp_path / "test",
        [
            QuantizationAwareTraining(start_epoch=3, backend="x86", **QAT),
            MagnitudePruning(shrink_epoch=2, export_format="none", **PRUNING),
        ],
    )
    fresh = ImageClassifier()
    (metrics,) = tester.test(fresh, datamodule=digits, ckpt_path=tmp_path / "full" / "epoch=5.ckpt", weights_only=True)
    assert _width(fresh, "net.features.0") == 16 and metrics["test/acc"] >= 0.9


@pytest.mark.slow
def test_resnet18_shrinks_then_trains_int8_that_agrees_with_fake_quant(tmp_path: Path):
    L.seed_everything(0)
    digits = DigitsDataModule(batch_size=64)
    model = ImageClassifier(architecture="resnet18")
    pruning = MagnitudePruning(shrink_epoch=2, export_format="none", **PRUNING)
    schedule = {"start_epoch": 2, "freeze_bn_epoch": 3, "freeze_observer_epoch": 4}
    qat = QuantizationAwareTraining(backend="x86", export_format="none", **schedule)
    record = TrainingRecord()
    trainer = quiet_trainer(tmp_path, [qat, pruning, record], 5, limit_train_batches=8)
    trainer.fit(model, datamodule=digits)
    int8 = qat.quantized_model
    assert pruning.shrunk and _width(int8, "net.conv1") == 32 and _width(int8, "net.layer4.1.conv2") == 256
    assert all(record.optimizer_matches_module) and record.losses[-1] < record.losses[1]
    digits.setup()
    images = digits.test_set.tensors[0]
    fake_quant, quantized = _predictions(model, images), _predictions(int8, images)
    assert (quantized.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.95


@pytest.mark.parametrize(
    ("pruning_options", "message"),
    [
        (
            {"shrink_epoch": 3},
            r"shrink_epoch=3 is after start_epoch=2: QuantizationAwareTraining would prepare the network before "
            r"MagnitudePruning removes its channels",
        ),
        (
            {"end_epoch": 3},
            r"MagnitudePruning\(mode='channels'\) would have to remove its channels at epoch 2, before its end_epoch=3",
        ),
    ],
)
def test_channels_removed_after_qat_prepared_the_network_are_refused_before_training(
    tmp_path: Path, pruning_options: dict, message: str
):
    pruning = MagnitudePruning(export_format="none", **(PRUNING | pruning_options))
    trainer = quiet_trainer(tmp_path, [pruning, QuantizationAwareTraining(start_epoch=2, export_format="none")], 4)
    with pytest.raises(ValueError, match=message):
        trainer.fit(ImageClassifier(), datamodule=DigitsDataModule())
    assert trainer.global_step == 0
