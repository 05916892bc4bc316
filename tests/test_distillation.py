"""DistillationModule on real digits: the loss, a teacher that never changes, student-only checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import DistillationModule, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier, SmallCNN, build_network
from lightning_compress.distillation import distillation_loss
from lightning_compress.fx_quantization import is_prepared
from lightning_compress.report import count_parameters, models_to_report

from conftest import quiet_trainer, run_train


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """A real teacher: the default CNN trained on digits for 3 epochs."""
    folder = tmp_path_factory.mktemp("teacher")
    L.seed_everything(0)
    teacher = ImageClassifier(architecture="cnn")
    trainer = quiet_trainer(folder, [], 3)
    trainer.fit(teacher, datamodule=DigitsDataModule())
    trainer.save_checkpoint(folder / "teacher.ckpt", weights_only=True)
    return folder / "teacher.ckpt"


def _student() -> torch.nn.Module:
    return build_network("cnn", num_classes=10, in_channels=1, widths=[8, 16])


def _teacher(teacher_checkpoint: Path) -> torch.nn.Module:
    return build_network("cnn", num_classes=10, in_channels=1, checkpoint=str(teacher_checkpoint))


def _module(teacher_checkpoint: Path, **options) -> DistillationModule:
    return DistillationModule(student=_student(), teacher=_teacher(teacher_checkpoint), **options)


def test_loss_matches_a_hand_computation(digits):
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    labels = digits.train_set.tensors[1][:4]
    temperature, alpha = 3.0, 0.7
    total, kd, ce = distillation_loss(student, teacher, labels, temperature, alpha)
    expected_kd = 0.0
    for row in range(4):
        p = [math.exp(v / temperature) for v in teacher[row].tolist()]
        q = [math.exp(v / temperature) for v in student[row].tolist()]
        p = [v / sum(p) for v in p]
        q = [v / sum(q) for v in q]
        expected_kd += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    expected_kd = expected_kd / 4 * temperature**2
    expected_ce = (
        sum(
            -math.log(math.exp(student[row, labels[row]].item()) / sum(math.exp(v) for v in student[row].tolist()))
            for row in range(4)
        )
        / 4
    )
    assert kd.item() == pytest.approx(expected_kd, rel=1e-5)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-5)
    assert total.item() == pytest.approx(alpha * expected_kd + (1 - alpha) * expected_ce, rel=1e-5)


def test_teacher_is_bit_identical_after_fit_and_absent_from_checkpoints(tmp_path: Path, teacher_checkpoint: Path):
    module = _module(teacher_checkpoint)
    before = {key: value.clone() for key, value in module.teacher.state_dict().items()}
    assert any("running_mean" in key for key in before)  # BN buffers are part of the check
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, [checkpoints], 2)  # validation runs after each epoch
    trainer.fit(module, datamodule=DigitsDataModule())
    after = module.teacher.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    assert not module.teacher.training and all(not p.requires_grad for p in module.teacher.parameters())
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in module.teacher.parameters()}

    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(key.startswith(("net.", "train_", "val_", "test_", "teacher_accuracy")) for key in state)
    assert not any(key.startswith("teacher.") or "_teacher" in key for key in state)
    restored = DistillationModule.load_from_checkpoint(
        tmp_path / "last.ckpt", weights_only=True, student=_student(), teacher=_teacher(teacher_checkpoint)
    )
    assert torch.equal(restored.student.classifier.weight, module.student.classifier.weight)


def test_save_teacher_keeps_teacher_weights_on_request(tmp_path: Path, teacher_checkpoint: Path):
    module = _module(teacher_checkpoint, save_teacher=True)
    quiet_trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path)], 1, limit_train_batches=2, limit_val_batches=1).fit(
        module, datamodule=DigitsDataModule()
    )
    (path,) = tmp_path.glob("*.ckpt")
    saved = torch.load(path, weights_only=True)["teacher_state_dict"]
    assert torch.equal(saved["classifier.weight"], module.teacher.classifier.weight)


def test_distilled_student_learns_and_teacher_accuracy_is_reported(tmp_path: Path, teacher_checkpoint: Path):
    L.seed_everything(0)
    module = _module(teacher_checkpoint, lr=1e-2)
    trainer = quiet_trainer(tmp_path, [], 8)
    digits = DigitsDataModule()
    trainer.fit(module, datamodule=digits)
    (results,) = trainer.test(module, datamodule=digits)
    teacher_only = quiet_trainer(tmp_path).test(ImageClassifier.load_from_checkpoint(teacher_checkpoint), datamodule=digits)
    assert results["test/teacher_acc"] == pytest.approx(teacher_only[0]["test/acc"], abs=1e-6)
    assert results["test/acc"] >= 0.85
    assert results["test/teacher_minus_student"] == pytest.approx(results["test/teacher_acc"] - results["test/acc"])
    assert module.teacher_val_accuracy is not None and module.teacher_val_accuracy > 0.9


def test_qat_acts_on_the_student_only(tmp_path: Path, teacher_checkpoint: Path):
    module = _module(teacher_checkpoint)
    qat = QuantizationAwareTraining(backend="x86", export_format="none")
    quiet_trainer(tmp_path, [qat], 1, limit_train_batches=3, limit_val_batches=1).fit(module, datamodule=DigitsDataModule())
    assert qat.prepared_names == ["net"]
    assert is_prepared(module.student) and not is_prepared(module.teacher)
    int8 = qat.quantized_model
    assert isinstance(int8.teacher, SmallCNN)  # the teacher is no part of what gets quantized
    assert not any(key.startswith("teacher") for key in int8.state_dict() if "accuracy" not in key)


def test_teacher_follows_the_student_to_its_device(teacher_checkpoint: Path):
    module = _module(teacher_checkpoint).to(torch.float64)
    assert module.teacher.classifier.weight.dtype == torch.float64


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"temperature": 0.0}, ValueError, r"temperature=0.0 is invalid: it must be > 0"),
        ({"alpha": 1.5}, ValueError, r"alpha=1.5 is invalid: it must lie in \[0, 1\]"),
        ({"student": "cnn"}, TypeError, r"student='cnn' is invalid: it must be an nn.Module"),
        ({"teacher": None}, TypeError, r"teacher=None is invalid: it must be an nn.Module"),
        ({"hint_weight": -1.0}, ValueError, r"hint_weight=-1.0 is invalid: it must be 0 or more"),
        ({"ignore_index": 0.5}, ValueError, r"ignore_index=0.5 is invalid: it must be an integer, or None"),
    ],
)
def test_bad_settings_fail_at_construction(teacher_checkpoint: Path, options, error, message):
    settings = {"student": _student(), "teacher": _teacher(teacher_checkpoint), **options}
    with pytest.raises(error, match=message):
        DistillationModule(**settings)


# Loading a teacher is the app's work now (the library wraps modules): its errors name the app's argument.
@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"checkpoint": "missing.ckpt"}, FileNotFoundError, r"checkpoint='missing.ckpt' does not exist"),
        ({"architecture": "resnet18"}, ValueError, r"checkpoint=.* of another model: key 'conv1.weight' is missing"),
    ],
)
def test_a_teacher_file_that_does_not_fit_fails_when_built(teacher_checkpoint: Path, options, error, message):
    settings = {"architecture": "cnn", "num_classes": 10, "in_channels": 1, "checkpoint": str(teacher_checkpoint), **options}
    with pytest.raises(error, match=message):
        build_network(**settings)


def test_output_shapes_that_differ_fail_before_training(tmp_path: Path):
    module = DistillationModule(student=SmallCNN(num_classes=7), teacher=SmallCNN(num_classes=10))
    trainer = quiet_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"teacher and student outputs differ: teacher \(2, 10\), student \(2, 7\)"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0


def test_one_command_trains_the_teacher_then_distills(tmp_path: Path):
    result = run_train(
        "+compress=distill",
        "trainer.max_epochs=2",
        "teacher.max_epochs=1",
        "teacher.architecture=cnn",
        "teacher.architecture_options=null",
        "report.latency_runs=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "teacher" / "teacher.ckpt").is_file()
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "teacher"}
    assert rows["teacher"]["parameters"] > rows["fp32"]["parameters"]
    assert 0 < rows["teacher"]["accuracy"] <= 1 and 0 < rows["fp32"]["accuracy"] <= 1


def test_teacher_checkpoint_from_the_command_line(tmp_path: Path, teacher_checkpoint: Path):
    result = run_train(
        "+compress=distill",
        "trainer.max_epochs=1",
        "teacher.architecture=cnn",
        "teacher.architecture_options=null",
        f"teacher.checkpoint={teacher_checkpoint}",
        "report.latency_runs=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "teacher").exists()  # loaded, not trained
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert rows["teacher"]["accuracy"] >= 0.9


def test_pruning_acts_on_the_student_only(tmp_path: Path, teacher_checkpoint: Path):
    from lightning_compress import MagnitudePruning

    module = _module(teacher_checkpoint)
    teacher_before = {key: value.clone() for key, value in module.teacher.state_dict().items()}
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, export_format="none", plot=False)
    quiet_trainer(tmp_path, [pruning], 1).fit(module, datamodule=DigitsDataModule())
    assert pruning.masks and all(name.startswith("net.") for name in pruning.masks)
    assert pruning.measured_sparsity(module)[0] == pytest.approx(0.5, abs=0.01)
    assert all(torch.equal(teacher_before[key], value) for key, value in module.teacher.state_dict().items())


HINT = {"features.4": "features.4"}  # the second conv of both CNNs: 4x4 maps, 16 student and 64 teacher channels


def test_hints_pull_student_features_towards_the_teacher_and_survive_checkpoints(tmp_path: Path, teacher_checkpoint: Path):
    L.seed_everything(0)
    module = _module(teacher_checkpoint, hints=HINT, hint_weight=1.0, lr=1e-2)
    digits = DigitsDataModule()
    digits.setup()
    images = digits.val_set.tensors[0]

    def hint_loss() -> float:
        with torch.no_grad(), module._hint_features() as (student, teacher):
            module.eval()(images)
            module.teacher(images)
            return module.hint_loss(student, teacher).item()

    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = quiet_trainer(tmp_path, [checkpoints], 4)
    trainer.fit(module, datamodule=digits)
    assert isinstance(module.hint_adapters["0"], torch.nn.Conv2d) and module.hint_adapters["0"].weight.shape == (64, 16, 1, 1)
    trained = hint_loss()
    module.hint_adapters["0"].reset_parameters()  # the same student with an untrained adapter
    assert trained < 0.5 * hint_loss()
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in module.hint_adapters.parameters()} <= optimized
    assert trainer.callback_metrics["val/acc"] >= 0.6  # still learning the task (chance is 0.1)

    restored = DistillationModule.load_from_checkpoint(  # strict load
        tmp_path / "last.ckpt", weights_only=True, student=_student(), teacher=_teacher(teacher_checkpoint)
    )
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(restored.hint_adapters["0"].weight, saved["hint_adapters.0.weight"])


def test_hints_under_qat_and_pruning_leave_the_adapters_alone(tmp_path: Path, teacher_checkpoint: Path):
    from lightning_compress import MagnitudePruning

    module = _module(teacher_checkpoint, hints=HINT)
    qat = QuantizationAwareTraining(backend="x86", export_dir=str(tmp_path))
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, export_format="none", plot=False)
    trainer = quiet_trainer(tmp_path, [qat, pruning], 1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=DigitsDataModule())
    assert qat.prepared_names == ["net"] and not is_prepared(module.hint_adapters["0"])
    assert pruning.masks and all(name.startswith("net.") for name in pruning.masks)
    assert trainer.callback_metrics["train/hint_loss"] > 0
    # the adapters only help train: no report row counts them and the exported int8 student lacks them
    student_weights = sum(p.numel() for p in module.student.parameters())
    assert {name: count_parameters(model)[0] for name, model in models_to_report(trainer, module).items()}[
        "fp32"
    ] == student_weights
    exported = torch.jit.load(qat.export_path)
    assert not any("hint_adapters" in key for key in exported.state_dict())
    assert "hint_adapters" in dict(module.named_children())  # training could go on


def test_hints_on_a_layer_qat_fuses_away_fail_before_training(tmp_path: Path, teacher_checkpoint: Path):
    module = _module(teacher_checkpoint, hints={"features.6": "features.6"})  # a ReLU: QAT folds it into the conv
    trainer = quiet_trainer(tmp_path, [QuantizationAwareTraining(export_format="none")], 1)
    with pytest.raises(ValueError, match=r"hints: student layers \['features.6'\] do not exist in the student \(after QAT"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    ("hints", "message"),
    [
        ({"features.9": "features.4"}, r"hints: student layers \['features.9'\] do not exist in the student; its layers"),
        ({"features.4": "head"}, r"hints: teacher layers \['head'\] do not exist in the teacher"),
    ],
)
def test_hints_naming_missing_layers_fail_at_construction(teacher_checkpoint: Path, hints, message):
    with pytest.raises(ValueError, match=message):
        _module(teacher_checkpoint, hints=hints)


def test_hints_with_different_map_sizes_fail_before_training(tmp_path: Path, teacher_checkpoint: Path):
    module = _module(teacher_checkpoint, hints={"features.0": "features.4"})  # 8x8 student map, 4x4 teacher map
    trainer = quiet_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"student layer 'features.0' \(2, 8, 8, 8\) cannot be matched to teacher layer"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0


class OwnStudent(L.LightningModule):
    """A user's student: a forward and its own optimizer, no training_step (distillation provides it)."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = SmallCNN(widths=(8, 16))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)}


def test_a_users_lightning_module_student_keeps_its_optimizer_and_learns_from_a_plain_teacher(
    tmp_path: Path, teacher_checkpoint: Path
):
    L.seed_everything(0)
    teacher = _teacher(teacher_checkpoint)
    assert type(teacher) is SmallCNN  # a plain nn.Module, not a LightningModule
    student = OwnStudent()
    module = DistillationModule(student=student, teacher=teacher, hints={"body.features.4": "features.4"})
    trainer = quiet_trainer(tmp_path, [], 4)
    trainer.fit(module, datamodule=DigitsDataModule())
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9  # the student's own
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**4)  # its own scheduler stepped each epoch
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in student.parameters()} | {id(p) for p in module.hint_adapters.parameters()} == optimized
    assert trainer.callback_metrics["val/acc"] >= 0.6  # chance is 0.1
    assert module.student is student


def test_a_users_student_under_qat_optimizes_the_prepared_network(tmp_path: Path, teacher_checkpoint: Path):
    student = OwnStudent()
    module = DistillationModule(student=student, teacher=_teacher(teacher_checkpoint))
    qat = QuantizationAwareTraining(backend="x86", export_format="none")
    trainer = quiet_trainer(tmp_path, [qat], 1, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(module, datamodule=DigitsDataModule())
    assert is_prepared(module.student)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert optimized == {id(p) for p in module.parameters()}  # the fake-quant network's, not the float original's


def test_token_level_loss_ignores_padding_and_matches_the_per_token_computation():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)  # (batch, tokens, vocabulary)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100  # padding
    total, kd, ce = distillation_loss(student, teacher, labels, 2.0, 0.5, class_dim=-1, ignore_index=-100)
    kept = labels != -100
    reference = distillation_loss(student[kept], teacher[kept], labels[kept], 2.0, 0.5)  # (tokens, vocabulary)
    assert all(torch.allclose(a, b) for a, b in zip((total, kd, ce), reference, strict=True))
    # the classes on dim 1 of (batch, vocabulary, tokens) logits give the same numbers
    moved = distillation_loss(student.transpose(1, 2), teacher.transpose(1, 2), labels, 2.0, 0.5, 1, -100)
    assert all(torch.allclose(a, b) for a, b in zip(moved, reference, strict=True))
    padded_student = student.clone()
    padded_student[1, 3:] += 100.0  # what the student says at padding changes nothing
    assert torch.equal(distillation_loss(padded_student, teacher, labels, 2.0, 0.5, -1, -100)[0], total)
