"""Exports for the runtimes people deploy with, each loaded back by its own runtime on real digits and
compared with what the model computed in torch: ONNX with QuantizeLinear/DequantizeLinear pairs (ONNX
Runtime, TensorRT) and OpenVINO IR, in which OpenVINO runs the layers in int8."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import lightning as L
import onnx
import pytest
import torch

from lightning_compress import DynamicQuantization, MagnitudePruning, PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.app.models import ImageClassifier
from lightning_compress.report import models_to_report
from lightning_compress.runtimes import OnnxRuntimeModel, OpenVinoModel

from conftest import quiet_trainer, run_train

RUNTIMES = ["onnx", "openvino"]


def _fit(tmp_path: Path, digits, callback: L.Callback, epochs: int = 3) -> tuple[L.Trainer, ImageClassifier]:
    L.seed_everything(0)
    model = ImageClassifier()
    trainer = quiet_trainer(tmp_path, [callback], epochs, limit_val_batches=0)
    trainer.fit(model, datamodule=digits)
    return trainer, model


def _quantized_inputs(graph: onnx.GraphProto) -> tuple[int, int]:
    """(layers, layers whose weight and data both come out of a DequantizeLinear) among Conv and Gemm nodes."""
    producers = {output: node.op_type for node in graph.node for output in node.output}
    layers = [node for node in graph.node if node.op_type in ("Conv", "Gemm", "MatMul")]
    quantized = [node for node in layers if all(producers.get(name) == "DequantizeLinear" for name in node.input[:2])]
    return len(layers), len(quantized)


def test_qat_exports_run_in_int8_in_onnxruntime_and_openvino(tmp_path: Path, digits):
    qat = QuantizationAwareTraining(start_epoch=1, backend="x86", export_format=RUNTIMES, export_dir=str(tmp_path))
    trainer, model = _fit(tmp_path, digits, qat)
    assert set(qat.export_paths) == set(RUNTIMES)
    assert qat.export_paths["openvino"].with_suffix(".bin").is_file()

    layers, quantized = _quantized_inputs(onnx.load(str(qat.export_paths["onnx"])).graph)
    assert layers == quantized == 4  # three convolutions and the classifier, each reading int8 weights and data

    models = models_to_report(trainer, model)
    onnxruntime, openvino = models["int8 onnxruntime"], models["int8 openvino"]
    assert isinstance(onnxruntime, OnnxRuntimeModel) and isinstance(openvino, OpenVinoModel)
    assert len(openvino.int8_layers()) == 4  # what OpenVINO's CPU plugin chose to run, read back

    images = digits.test_set.tensors[0]
    output_step = float(qat.quantized_model.net.classifier.scale)
    with torch.no_grad():
        fake_quant = model.eval()(images)
    for runtime in (onnxruntime, openvino):
        output = runtime(images)
        assert (output.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.99
        assert (output - fake_quant).abs().mean() <= output_step  # BatchNorm folding moves a few values one step
        assert (output - fake_quant).abs().max() <= 8 * output_step


def test_ptq_exports_hold_the_calibrated_ranges(tmp_path: Path, digits):
    ptq = PostTrainingQuantization(
        calibration_batches=4, backend="x86", export_format=["torchscript", *RUNTIMES], export_dir=str(tmp_path)
    )
    trainer, _ = _fit(tmp_path, digits, ptq, epochs=1)
    assert set(ptq.export_paths) == {"torchscript", *RUNTIMES}
    layers, quantized = _quantized_inputs(onnx.load(str(ptq.export_paths["onnx"])).graph)
    assert layers == quantized == 4
    images = digits.test_set.tensors[0]
    with torch.no_grad():
        int8 = ptq.quantized_model(images)
    for name, runtime in models_to_report(trainer, ptq.quantized_model).items():
        if name.startswith("int8 "):  # the torch.ao int8 model and the runtimes compute on the same grid
            output = runtime(images)
            assert (output.argmax(1) == int8.argmax(1)).float().mean() >= 0.99, name


def test_a_pruned_float_model_exports_as_plain_onnx_and_openvino(tmp_path: Path, digits):
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format=RUNTIMES, export_dir=str(tmp_path)
    )
    trainer, model = _fit(tmp_path, digits, pruning, epochs=2)
    graph = onnx.load(str(pruning.export_paths["onnx"])).graph
    assert not any(node.op_type == "QuantizeLinear" for node in graph.node)
    images = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        expected = pruning.pruned_model(images)
    models = models_to_report(trainer, model)
    for name in ("channels removed onnxruntime", "channels removed openvino"):
        assert torch.allclose(models[name](images), expected, atol=1e-4), name


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: QuantizationAwareTraining(export_format="tflite"),
            r"'tflite' is unknown; allowed are \['torchscript', 'torch_export', 'onnx', 'openvino', 'executorch'\]",
        ),
        (
            lambda: QuantizationAwareTraining(weight_bits=4, backend="x86", export_format=["torchscript", "onnx"]),
            r"export_format='onnx' runs models in int8: weight_bits=4",
        ),
        (
            lambda: DynamicQuantization(export_format="openvino"),
            r"DynamicQuantization: export_format='openvino': only 'torchscript'",
        ),
        (lambda: MagnitudePruning(export_format=["onnx", "bogus"]), r"'bogus' is unknown"),
        (
            lambda: QuantizationAwareTraining(export_format="executorch"),
            r"export_format='executorch' is not written by backend='x86_inductor': it writes \['torch_export', 'onnx', "
            r"'openvino'\]",
        ),
    ],
)
def test_bad_export_formats_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("package", ["openvino", "executorch"])
def test_a_format_whose_package_is_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch, package: str):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == package else find_spec(name, *args))
    with pytest.raises(
        ValueError,
        match=rf"export_format='{package}' needs the '{package}' package: pip install 'lightning-compress\[{package}\]'",
    ):
        MagnitudePruning(export_format=["onnx", package])


@pytest.mark.slow
def test_the_app_writes_both_runtime_exports_and_reports_them(tmp_path: Path):
    result = run_train(
        "+compress=qat",
        "trainer.max_epochs=2",
        "compress.callbacks.quantization.export_format=[torch_export,onnx,openvino]",
        "report.latency_runs=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("model_int8.pt2", "model_int8.onnx", "model_int8_openvino.xml", "model_int8_openvino.bin"):
        assert (tmp_path / "checkpoints" / name).is_file(), name
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    for name in ("int8 onnxruntime", "int8 openvino"):
        assert rows[name]["accuracy"] == pytest.approx(rows["fake-quant"]["accuracy"], abs=0.02), name
        assert rows[name]["size_bytes"] > 0 and rows[name]["latency_ms"] > 0


@pytest.mark.slow
def test_qat_resnet18_exports_agree_with_fake_quant(tmp_path: Path):
    from lightning_compress.app.data import DigitsDataModule

    digits = DigitsDataModule(batch_size=64, image_size=32)
    digits.setup()
    qat = QuantizationAwareTraining(start_epoch=1, backend="x86", export_format=RUNTIMES, export_dir=str(tmp_path))
    L.seed_everything(0)
    model = ImageClassifier(architecture="resnet18")
    trainer = quiet_trainer(tmp_path, [qat], 3, limit_val_batches=0, limit_train_batches=8)
    trainer.fit(model, datamodule=digits)
    models = models_to_report(trainer, model)
    assert len(models["int8 openvino"].int8_layers()) == 21  # 20 convolutions and the classifier
    images = digits.test_set.tensors[0]
    with torch.no_grad():
        fake_quant = model.eval()(images)
    for name in ("int8 onnxruntime", "int8 openvino"):
        assert (models[name](images).argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.99, name


class _BatchSizeBranch(ImageClassifier):
    """A forward whose Python branches on the batch size: a trace at the training batch holds one branch only."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images) * (2.0 if images.shape[0] > 1 else 3.0)


class _TwoNetworks(L.LightningModule):
    """A training_step that calls two networks one after another, and no forward."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 10)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.head(self.encoder(images)), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_an_export_that_computes_something_else_is_not_kept(tmp_path: Path, digits):
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, export_format=["torchscript", "onnx"], export_dir=str(tmp_path)
    )
    with pytest.warns(UserWarning, match=r"model_pruned\.pt \(TorchScript\) failed.*on one sample, output output is"):
        quiet_trainer(tmp_path, [pruning], 1, limit_val_batches=0).fit(_BatchSizeBranch(), datamodule=digits)
    assert pruning.export_paths == {} and not list(tmp_path.glob("model_pruned*"))


def test_a_step_that_calls_two_networks_has_no_export_and_says_why(tmp_path: Path, digits):
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, export_dir=str(tmp_path))
    with pytest.warns(UserWarning, match=r"training_step calls encoder, head one after another, not one network"):
        quiet_trainer(tmp_path, [pruning], 1, limit_val_batches=0).fit(_TwoNetworks(), datamodule=digits)
    assert pruning.export_paths == {} and pruning.pruned_model is not None
