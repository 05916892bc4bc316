"""QuantizationAwareTraining on real digits with real models, as a user would add it to a Trainer."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.ao.nn.intrinsic.quantized import ConvReLU2d as ConvReLU2dInt8
from torch.ao.nn.quantized import Conv2d as Conv2dInt8
from torch.ao.nn.quantized import Linear as LinearInt8

from lightning_compress import PostTrainingQuantization, QuantizationAwareTraining, compat
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.fx_quantization import is_prepared
from lightning_compress.report import serialized_size, top1_accuracy

from conftest import quiet_trainer


def _predictions(model: nn.Module, datamodule: DigitsDataModule) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.eval()(images) for images, _ in datamodule.test_dataloader()])


def freeze_observers(model: nn.Module) -> None:
    """Observers record in eval mode too; freeze them so that comparing outputs does not move the ranges."""
    for module in model.modules():
        if hasattr(module, "observer_enabled"):
            module.observer_enabled.zero_()


def _fit_qat(tmp_path, architecture="cnn", max_epochs=4, datamodule=None, checkpoint=None, **qat_options):
    L.seed_everything(0)
    datamodule = datamodule or DigitsDataModule(batch_size=64)
    model = ImageClassifier(architecture=architecture, num_classes=10, in_channels=datamodule.num_channels)
    qat = QuantizationAwareTraining(**{"backend": "x86", **qat_options})  # this file tests the FX engine's int8 layers
    callbacks = [qat] + ([checkpoint] if checkpoint else [])
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs, enable_checkpointing=checkpoint is not None)
    trainer.fit(model, datamodule=datamodule)
    return trainer, model, qat, datamodule


def test_default_cnn_trains_fake_quant_and_converts_to_int8(tmp_path: Path):
    trainer, model, qat, digits = _fit_qat(tmp_path, start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3)
    assert [(part.name, part.quantized) for part in qat.parts] == [("net", True)]
    int8 = qat.quantized_model
    assert any(isinstance(m, ConvReLU2dInt8) for m in int8.net.modules())
    assert any(isinstance(m, LinearInt8) for m in int8.net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.net.modules())  # folded into int8 convs

    fake_quant, quantized = _predictions(model, digits), _predictions(int8, digits)
    fp32 = _predictions(qat.float_model(model), digits)
    # int8 reproduces the fake-quant model up to a few output quantization steps
    output_scale = float(int8.net.classifier.scale)
    assert (quantized - fake_quant).abs().max() <= 4 * output_scale
    assert (quantized.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.98
    accuracy = top1_accuracy(int8, digits.test_dataloader())
    assert accuracy >= 0.95 and abs(accuracy - top1_accuracy(qat.float_model(model), digits.test_dataloader())) <= 0.02
    assert not torch.equal(fp32, fake_quant)  # the fp32 copy really runs without fake-quant

    # the schedule was applied: BN frozen, observers frozen, fake-quant on
    fused = [m for m in model.net.modules() if hasattr(m, "freeze_bn")]
    assert fused and all(m.freeze_bn for m in fused)
    observers = [m for m in model.net.modules() if hasattr(m, "observer_enabled")]
    assert observers and all(int(m.observer_enabled) == 0 and int(m.fake_quant_enabled) == 1 for m in observers)

    # the exported TorchScript runs in a process that never imports this package
    assert qat.export_path == tmp_path / "model_int8.pt" or qat.export_path.is_file()
    images = next(iter(digits.test_dataloader()))[0][:4]
    torch.save(images, tmp_path / "images.pt")
    script = (
        "import sys, torch; model = torch.jit.load(sys.argv[1]); images = torch.load(sys.argv[2]);"
        "print(' '.join(map(str, model(images).argmax(1).tolist())));"
        "assert 'lightning_compress' not in sys.modules"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(qat.export_path), str(tmp_path / "images.pt")],
        capture_output=True,
        text=True,
        check=True,
    )
    with torch.no_grad():
        expected = int8(images).argmax(1).tolist()
    assert result.stdout.split() == [str(label) for label in expected]


@pytest.mark.parametrize("vnni", [False, True])
def test_int8_matches_fake_quant_with_and_without_vnni(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, vnni: bool):
    """The grid chosen for CPUs without VNNI (7-bit weights, 8-bit activations) is checked on every machine:
    its int8 model must compute what fake-quant trained. Forcing VNNI on a CPU without it is only allowed
    where the kernels cannot overflow, so that case is checked where it is true."""
    if vnni and not compat.cpu_has_vnni():
        pytest.skip("8-bit weights overflow the int16 sums of int8 kernels on a CPU without VNNI")
    monkeypatch.setattr(compat, "cpu_has_vnni", lambda: vnni)
    _, model, qat, digits = _fit_qat(tmp_path, max_epochs=3, start_epoch=1, freeze_observer_epoch=2, export_format="none")
    int8 = qat.quantized_model
    weights = [m.weight().int_repr() for m in int8.net.modules() if isinstance(m, Conv2dInt8 | LinearInt8)]
    largest = max(int(w.abs().max()) for w in weights)  # the weights use the grid's full width, and no more
    assert 63 < largest <= 128 if vnni else largest == 63
    fake_quant, quantized = _predictions(model, digits), _predictions(int8, digits)
    assert (quantized - fake_quant).abs().max() <= 4 * float(int8.net.classifier.scale)


def _largest_weights(int8: nn.Module) -> tuple[int, int]:
    """The largest integer weight of the int8 depthwise convolutions, and of the other int8 layers."""
    depthwise, other = [0], [0]
    for layer in int8.modules():
        if isinstance(layer, Conv2dInt8 | LinearInt8):
            largest = int(layer.weight().int_repr().abs().max())
            is_depthwise = isinstance(layer, Conv2dInt8) and layer.groups == layer.in_channels > 1
            (depthwise if is_depthwise else other).append(largest)
    return max(depthwise), max(other)


@pytest.mark.slow  # 25 s, the FX engine's (no longer the default) depthwise kernels
def test_depthwise_convolutions_get_seven_bit_weights_on_every_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """FBGEMM's depthwise kernels add products in saturating int16 pairs even on CPUs with VNNI: with 8-bit
    weights mobilenet_v2's int8 model computed something else than its fake-quant model there (2 points lost
    by PTQ). Its depthwise layers get 7-bit weights on every CPU, the other layers 8 bits where VNNI allows,
    and the int8 model computes what fake-quant trained."""
    digits = DigitsDataModule(batch_size=64)
    _, model, qat, _ = _fit_qat(
        tmp_path, "mobilenet_v2", max_epochs=2, datamodule=digits, start_epoch=0, freeze_observer_epoch=1, export_format="none"
    )
    int8 = qat.quantized_model
    depthwise, other = _largest_weights(int8)
    assert depthwise == 63 and (other > 63 if compat.cpu_has_vnni() else other == 63)
    fake_quant, quantized = _predictions(model, digits), _predictions(int8, digits)
    head = [layer for layer in int8.modules() if isinstance(layer, LinearInt8)][-1]
    assert (quantized - fake_quant).abs().max() <= 4 * float(head.scale)
    monkeypatch.setattr(compat, "cpu_has_vnni", lambda: True)  # the grids of a VNNI CPU, checked on any machine
    ptq = PostTrainingQuantization(backend="x86", calibration_batches=2, export_format="none")
    quiet_trainer(tmp_path, [ptq], 0).fit(qat.float_model(model), datamodule=digits)
    depthwise, other = _largest_weights(ptq.quantized_model)
    assert depthwise == 63 and other > 63


def test_before_start_epoch_the_model_trains_in_fp32(tmp_path: Path):
    digits = DigitsDataModule(batch_size=64)
    digits.setup()
    images = digits.test_set.tensors[0][:64]
    gaps = {}

    class Probe(L.Callback):
        """Distance between the trained module and its plain fp32 copy, at the end of each epoch."""

        def on_train_epoch_end(self, trainer, pl_module):
            with torch.no_grad():
                reference = qat.float_model(pl_module)(images)
                pl_module.eval()
                gaps[trainer.current_epoch] = float((pl_module(images) - reference).abs().max())
                pl_module.train()

    L.seed_everything(0)
    model = ImageClassifier(architecture="cnn")
    qat = QuantizationAwareTraining(backend="x86", start_epoch=1, export_format="none")
    quiet_trainer(tmp_path, [qat, Probe()], 2).fit(model, datamodule=digits)
    assert is_prepared(model.net)  # inserted at setup, before the optimizer was built
    assert gaps[0] < 1e-4  # fake-quant off: the prepared model computes exactly the fp32 model
    assert gaps[1] > 1e-2  # fake-quant on from start_epoch


@pytest.mark.slow  # 30 s for both, on the FX engine (no longer the default)
@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_models(tmp_path: Path, architecture: str):
    digits = DigitsDataModule(batch_size=32, image_size=16, channels=3)
    L.seed_everything(0)
    model = ImageClassifier(architecture=architecture, num_classes=10, in_channels=3)
    qat = QuantizationAwareTraining(backend="x86", start_epoch=1, export_format="none")
    trainer = quiet_trainer(tmp_path, [qat], 2, limit_train_batches=20, limit_val_batches=2)
    trainer.fit(model, datamodule=digits)
    assert qat.prepared_names == ["net"]
    int8 = qat.quantized_model
    assert any(isinstance(m, ConvReLU2dInt8 | Conv2dInt8) for m in int8.net.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in int8.net.modules())
    fake_quant, quantized = _predictions(model, digits), _predictions(int8, digits)
    assert (quantized - fake_quant).abs().mean() <= 0.25 * fake_quant.std()
    # Logits lie on the output grid, so a one-step difference flips an image whose top two fake-quant logits
    # tie; compare predictions where fake-quant decides by more than two steps (a barely trained network may
    # decide none: mobilenet_v3_small after 40 steps).
    output_step = float([m for m in int8.net.modules() if hasattr(m, "zero_point")][-1].scale)
    top_two = fake_quant.topk(2, dim=1).values
    decided = top_two[:, 0] - top_two[:, 1] > 2 * output_step
    assert (quantized.argmax(1) == fake_quant.argmax(1))[decided].float().mean() >= 0.95 or not decided.any()
    if architecture == "resnet18":  # mobilenet_v3_small barely learns in 40 steps; resnet18 does
        assert decided.float().mean() >= 0.5
        assert top1_accuracy(int8, digits.test_dataloader()) >= 0.85


class _Branchy(nn.Module):
    """A data-dependent branch (untraceable) around two traceable parts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, images: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        features = self.stem(images)
        if features.mean() > 10.0:  # Python control flow on a tensor value: FX cannot trace this
            features = features / 2
        return self.head(features.flatten(1)) / temperature


class _BranchyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = _Branchy()

    def forward(self, images: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
        return self.body(images, temperature=temperature)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images, temperature=1.0), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def test_untraceable_branch_and_keyword_input_are_quantized_piecewise(tmp_path: Path, capsys):
    L.seed_everything(0)
    digits = DigitsDataModule(batch_size=64)
    model = _BranchyClassifier()
    qat = QuantizationAwareTraining(backend="x86", export_format="torchscript")
    trainer = quiet_trainer(tmp_path, [qat], 2)
    trainer.fit(model, datamodule=digits)
    parts = {part.name: part for part in qat.parts}
    assert not parts["body"].quantized and "split into its children" in parts["body"].reason
    assert parts["body.stem"].quantized and parts["body.head"].quantized
    assert "split into its children" in capsys.readouterr().out  # the table was printed
    int8 = qat.quantized_model
    assert any(isinstance(m, ConvReLU2dInt8) for m in int8.body.stem.modules())
    assert any(isinstance(m, LinearInt8) for m in int8.body.head.modules())
    assert top1_accuracy(int8, digits.test_dataloader()) >= 0.9
    assert qat.export_path.is_file()


@pytest.mark.parametrize("backend", ["x86", pytest.param("x86_inductor", marks=pytest.mark.slow)])
def test_resume_mid_qat_matches_uninterrupted_run(tmp_path: Path, backend: str):
    schedule = {"start_epoch": 1, "freeze_bn_epoch": 2, "freeze_observer_epoch": 3, "export_format": "none", "backend": backend}
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    _, _, full, digits = _fit_qat(tmp_path / "full", max_epochs=4, checkpoint=every_epoch, **schedule)
    expected = _predictions(full.quantized_model, digits)

    # a new process's view: fresh model, callback and trainer, resumed from the checkpoint after epoch 1
    L.seed_everything(0)
    model = ImageClassifier(architecture="cnn")
    resumed = QuantizationAwareTraining(**schedule)
    trainer = quiet_trainer(tmp_path / "resumed", [resumed], 4)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    actual = _predictions(resumed.quantized_model, digits)
    assert torch.allclose(actual, expected, atol=1e-5)
    assert torch.equal(actual.argmax(1), expected.argmax(1))


def test_qat_checkpoints_load_in_test_and_load_from_checkpoint(tmp_path: Path):
    best = ModelCheckpoint(dirpath=tmp_path, monitor="val/acc", mode="max", save_last=True)
    trainer, model, qat, digits = _fit_qat(tmp_path, max_epochs=3, start_epoch=1, checkpoint=best, export_format="none")
    freeze_observers(model)
    last_epoch = _predictions(model, digits)
    results = trainer.test(model, datamodule=digits, ckpt_path="best")
    assert results[0]["test/acc"] >= 0.9

    # a fresh float module with no callback: the QAT structure is rebuilt from the checkpoint
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert is_prepared(restored.net)
    freeze_observers(restored)
    assert torch.allclose(_predictions(restored, digits), last_epoch, atol=1e-5)

    # trainer.test(ckpt_path=...) on a fresh float module, the callback attached to the trainer
    tester_qat = QuantizationAwareTraining(backend="x86")
    tester = quiet_trainer(tmp_path / "test", [tester_qat], 1)
    fresh = ImageClassifier()
    tested = tester.test(fresh, datamodule=digits, ckpt_path=tmp_path / "last.ckpt", weights_only=True)
    expected = (last_epoch.argmax(1) == digits.test_set.tensors[1]).float().mean()
    assert tested[0]["test/acc"] == pytest.approx(float(expected), abs=1e-6)
    # and the restored callback still makes the float and int8 models (it observed no inputs in this run)
    float_model, int8 = tester_qat.float_model(fresh), tester_qat.convert(fresh)
    assert not is_prepared(float_model.net)
    assert any(isinstance(m, LinearInt8) for m in int8.net.modules())
    assert (_predictions(int8, digits).argmax(1) == last_epoch.argmax(1)).float().mean() >= 0.95


def test_calibration_batches_set_ranges_before_fake_quant(tmp_path: Path):
    _, model, qat, _ = _fit_qat(
        tmp_path, max_epochs=1, start_epoch=0, calibration_batches=3, convert_on_fit_end=False, freeze_bn_epoch=None
    )
    assert qat.state_dict()["calibrated"] is True
    scales = [float(m.scale.max()) for m in model.net.modules() if hasattr(m, "observer_enabled")]
    assert all(scale != 1.0 for scale in scales)  # 1.0 is the uncalibrated default


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"start_epoch": 2, "freeze_bn_epoch": 1},
            r"freeze_bn_epoch=1 is invalid: it must be an integer >= start_epoch",
        ),
        ({"start_epoch": 2, "freeze_observer_epoch": 0}, r"freeze_observer_epoch=0 is invalid"),
        ({"start_epoch": -1}, r"start_epoch=-1 is invalid"),
        ({"backend": "tensorrt"}, r"backend='tensorrt' is unknown: allowed values are \['x86_inductor', 'x86', 'fbgemm'"),
        ({"observer": "entropy"}, r"observer='entropy' is unknown"),
        ({"export_format": "tflite"}, r"export_format='tflite': 'tflite' is unknown"),
        ({"skip": ["torch.nn.Nope"]}, r"skip='torch.nn.Nope' names no importable module type"),
        ({"calibration_batches": -2}, r"calibration_batches=-2 is invalid"),
        ({"start_epoch": 1, "freeze_observer_epoch": 1}, r"freeze_observer_epoch=1 equals start_epoch: no observer would ever"),
    ],
)
def test_bad_settings_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"modules": ["net.nope"]}, r"modules='net.nope' names no submodule"),
        ({"skip": ["net.nope"]}, r"skip='net.nope' names no submodule"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path: Path, options, message):
    model = ImageClassifier(architecture="cnn")
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainer = quiet_trainer(tmp_path, [QuantizationAwareTraining(**options)], 2)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_nothing_quantizable_warns_and_leaves_the_model_alone(tmp_path: Path):
    class NoLayers(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, images):
            return images.flatten(1)[:, :10] * self.scale

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    qat = QuantizationAwareTraining(backend="x86")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, [qat], 1, limit_train_batches=2).fit(NoLayers(), datamodule=DigitsDataModule())
    assert any("nothing quantizable" in str(w.message) for w in caught)
    assert qat.parts == [] and qat.quantized_model is None


def test_skip_keeps_named_layers_and_types_in_float(tmp_path: Path):
    _, model, qat, digits = _fit_qat(
        tmp_path, max_epochs=2, start_epoch=1, skip=["net.classifier", "torch.nn.MaxPool2d"], export_format="none"
    )
    int8 = qat.quantized_model
    assert isinstance(int8.net.classifier, nn.Linear)  # still float
    assert any(isinstance(m, ConvReLU2dInt8) for m in int8.net.modules())
    assert top1_accuracy(int8, digits.test_dataloader()) > 0.8


def test_four_bit_fake_quant_lies_on_a_16_level_grid_and_passes_gradients(tmp_path: Path):
    _, model, qat, digits = _fit_qat(
        tmp_path, max_epochs=3, start_epoch=1, weight_bits=4, activation_bits=4, export_format="none"
    )
    assert qat.quantized_model is None  # no int8 kernel runs a 4-bit grid: reported as fake-quant only
    assert set(qat.report_models()) == {"fp32", "fake-quant"}
    fake_quant = model.net.classifier.weight_fake_quant
    weight = model.net.classifier.weight.detach().clone().requires_grad_(True)
    quantized = fake_quant(weight)
    levels = quantized / fake_quant.scale[:, None]
    assert torch.allclose(levels, levels.round(), atol=1e-4)
    assert levels.round().min() >= -8 and levels.round().max() <= 7
    assert all(len(row.unique()) <= 16 for row in levels)
    quantized.sum().backward()  # straight-through: gradient 1 inside the range
    assert weight.grad is not None and (weight.grad == 1).float().mean() > 0.9
    assert top1_accuracy(model, digits.test_dataloader()) >= 0.8


@pytest.mark.parametrize(("bits", "message"), [(1, "weight_bits=1 is invalid"), (9, "weight_bits=9 is invalid")])
def test_bit_widths_outside_2_to_8_are_refused(bits: int, message: str):
    with pytest.raises(ValueError, match=message + ": it must be an integer from 2 to 8"):
        QuantizationAwareTraining(weight_bits=bits)


def test_lstm_layers_fall_back_to_dynamic_quantization(tmp_path: Path, capsys):
    L.seed_everything(0)
    model = ImageClassifier(architecture="lstm", architecture_options={"hidden_size": 64})
    qat = QuantizationAwareTraining(backend="x86", start_epoch=0, export_format="none")
    quiet_trainer(tmp_path, [qat], 1, limit_train_batches=5, limit_val_batches=1).fit(model, datamodule=DigitsDataModule())
    (part,) = qat.parts
    assert part.quantized and "dynamically quantized at conversion" in part.reason
    assert "dynamically quantized at conversion" in capsys.readouterr().out
    int8 = qat.quantized_model
    assert isinstance(int8.net.lstm, torch.ao.nn.quantized.dynamic.LSTM)
    assert any(isinstance(m, LinearInt8) for m in int8.net.modules())
    images = next(iter(DigitsDataModule().test_dataloader()))[0]
    with torch.no_grad():
        assert int8(images).shape == (64, 10)


class _LayersAsChildren(L.LightningModule):
    """A user's module with its layers as direct children and a traceable forward."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.MaxPool2d(2)
        self.block2 = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.block2(self.down(self.block1(self.stem(images)))), 1))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.log("test/acc", (self(images).argmax(1) == labels).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_layers_as_direct_children_are_quantized_as_one_graph(tmp_path: Path, digits):
    L.seed_everything(0)
    model = _LayersAsChildren()
    qat = QuantizationAwareTraining(backend="x86", start_epoch=1, export_dir=str(tmp_path))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(tmp_path, [qat, checkpoint], 3, limit_val_batches=0).fit(model, datamodule=digits)
    assert [(part.name, part.quantized) for part in qat.parts] == [("", True)]

    int8 = qat.quantized_model
    int8_layers = [m for m in int8.modules() if isinstance(m, ConvReLU2dInt8 | Conv2dInt8 | LinearInt8)]
    # the table is read back from the converted model: 3 convolutions and the linear layer, none left float
    assert qat.parts[0].int8_layers == len(int8_layers) == 4 and qat.parts[0].float_layers == []
    graph = int8.forward.__self__.graph
    # one graph: int8 flows from network to network, quantized once at the input and dequantized once at the end
    assert [node.target for node in graph.nodes].count(torch.quantize_per_tensor) == 1
    assert sum(node.op == "call_method" and node.target == "dequantize" for node in graph.nodes) == 1

    fake_quant, quantized = _predictions(model, digits), _predictions(int8, digits)
    assert (quantized - fake_quant).abs().max() <= 4 * float(int8.fc.scale)
    assert (quantized.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.98
    exported = torch.jit.load(str(qat.export_path))
    with torch.no_grad():
        images = digits.test_set.tensors[0][:16]
        assert torch.equal(exported(images).argmax(1), int8(images).argmax(1))

    # a fresh float module tested from the checkpoint gets the same one-graph structure back
    tester_qat = QuantizationAwareTraining(backend="x86")
    fresh = _LayersAsChildren()
    tested = quiet_trainer(tmp_path / "test", [tester_qat], 1).test(
        fresh, datamodule=digits, ckpt_path=tmp_path / "last.ckpt", weights_only=True
    )
    expected = (fake_quant.argmax(1) == digits.test_set.tensors[1]).float().mean()
    assert tested[0]["test/acc"] == pytest.approx(float(expected), abs=1e-6)
    assert not is_prepared(tester_qat.float_model(fresh))


@pytest.mark.slow  # 13 s: a fit, Inductor's compile, two exports each run in its runtime, a test from the checkpoint
def test_the_torch_export_engine_quantizes_a_forward_over_several_networks_as_one_graph(tmp_path: Path, digits):
    """The default engine exports the LightningModule's own forward over its networks (stem, blocks, pooling, head)
    as one program: one part, every layer int8 in one compiled graph, the networks' parameters under their own
    names; the graph follows the module's training mode (it is not a child); a fresh module tested from the
    checkpoint gets the same graph back and scores what the trained fake-quant model scores."""
    from lightning_compress.pt2e_quantization import CompiledProgram, ExportedPart

    L.seed_everything(0)
    model = _LayersAsChildren()
    qat = QuantizationAwareTraining(start_epoch=1, export_dir=str(tmp_path), export_format=["torch_export", "onnx"])
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(tmp_path, [qat, checkpoint], 3, limit_train_batches=12, limit_val_batches=0).fit(model, datamodule=digits)
    assert [(part.name, part.quantized) for part in qat.parts] == [("", True)]
    assert qat.parts[0].int8_layers == 4 and qat.parts[0].float_layers == []
    assert isinstance(model.forward.__self__, ExportedPart) and "stem.0.weight" in model.state_dict()

    int8 = qat.quantized_model
    assert isinstance(int8.forward.__self__, CompiledProgram)
    assert not any(isinstance(child, ExportedPart | CompiledProgram) for child in int8.modules())  # no part per network
    # the program's int8 weights are in the model's state_dict (what the report's size counts), the float ones gone
    assert sum(tensor.dtype == torch.int8 for tensor in int8.state_dict().values()) == 4
    assert serialized_size(int8) < 0.5 * serialized_size(qat.float_model(model))
    fake_quant, quantized = _predictions(model, digits), _predictions(int8, digits)
    assert (quantized.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.98
    images = digits.test_set.tensors[0][:16]
    with torch.no_grad():
        shipped = torch.export.load(str(qat.export_paths["torch_export"])).module()(images)
        assert torch.equal(shipped.argmax(1), int8(images).argmax(1))
    assert set(qat.export_paths) == {"torch_export", "onnx"}  # each run in its runtime before it counts

    with torch.no_grad():  # BatchNorm in the graph normalizes with the batch's statistics in training mode only
        model.train()
        in_training = model(images[:4])
        model.eval()
        assert not torch.allclose(in_training, model(images[:4]))

    tester_qat = QuantizationAwareTraining()
    fresh = _LayersAsChildren()
    tested = quiet_trainer(tmp_path / "test", [tester_qat], 1).test(
        fresh, datamodule=digits, ckpt_path=tmp_path / "last.ckpt", weights_only=True
    )
    assert isinstance(fresh.forward.__self__, ExportedPart)
    expected = (fake_quant.argmax(1) == digits.test_set.tensors[1]).float().mean()
    assert tested[0]["test/acc"] == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("backend", ["x86", "x86_inductor"])
def test_freezing_batch_norm_before_its_statistics_settle_warns(tmp_path: Path, recwarn, backend: str):
    """Freezing BatchNorm at the very start (statistics of an untrained network) warns; after two epochs of
    training the statistics describe the network and freezing is silent (issue 11: resnet18 collapsed to chance
    when frozen after 20 steps). On the torch.export engine BatchNorm is an op of the exported graph, watched there."""
    options = {"backend": backend, "export_format": "none", "convert_on_fit_end": False}
    unsettled = r"freeze_bn_epoch=0 freezes BatchNorm statistics that do not describe the network"
    with pytest.warns(UserWarning, match=unsettled) as early:
        schedule = {"start_epoch": 0, "freeze_bn_epoch": 0, "calibration_batches": 2}
        _, model, _, _ = _fit_qat(tmp_path / "early", max_epochs=1, **schedule, **options)
    named = [str(w.message) for w in early if "freezes BatchNorm statistics" in str(w.message)]
    assert len(named) == 1 and re.search(r"in [123] of 3 fused Conv-BN layers", named[0])  # the CNN's three, each measured
    if backend == "x86_inductor":  # the graphs run their own BatchNorm op again once the batch was watched
        graph = model.net.graph
        assert all(node.target is torch.ops.aten.batch_norm.default for node in graph.graph.nodes if "batch_norm" in node.name)
    _fit_qat(tmp_path / "late", max_epochs=3, start_epoch=1, freeze_bn_epoch=2, **options)
    assert not [w for w in recwarn if "freezes BatchNorm statistics" in str(w.message)]
