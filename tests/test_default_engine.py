"""The default int8 engine is torch.export's (torchao pt2e): the callbacks and recipes quantize without torch.ao's
FX graph mode, which is chosen by name only, with a deprecation warning, and refused in one line where it is gone.

"Gone" is simulated as torch.ao's removal would look to this package: ``lightning_compress.fx_quantization`` (the
only module that imports torch.ao's FX flow) cannot be imported, in a fresh process where it never was.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lightning_compress import DynamicQuantization, PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.pt2e_quantization import InductorQuantizationConfig

from conftest import ROOT

UPSTREAM_DEPRECATIONS = ("torch.ao.quantization is deprecated", "quantized tensor creation functions")


def test_the_callbacks_quantize_with_the_torch_export_engine_unless_told_otherwise():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the default names no deprecated engine
        callbacks = [QuantizationAwareTraining(), PostTrainingQuantization(), DynamicQuantization()]
    assert all(isinstance(callback.backend.config, InductorQuantizationConfig) for callback in callbacks)
    assert [callback.export_formats for callback in callbacks] == [("torch_export",)] * 3


@pytest.mark.parametrize("make", [QuantizationAwareTraining, PostTrainingQuantization, DynamicQuantization])
def test_the_fx_engine_by_name_warns_once_at_the_users_line_that_it_is_deprecated(make):
    with pytest.warns(FutureWarning) as caught:
        make(backend="x86")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "backend='x86' is torch.ao's FX graph mode, which PyTorch deprecates and will remove" in message
    assert "the default, backend='x86_inductor'" in message
    assert caught[0].filename == __file__  # the line that asked for it, not one inside the package


def test_the_fx_engine_where_torch_ao_is_gone_is_one_line_naming_the_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(sys.modules, "lightning_compress.fx_quantization", None)  # import fails: ImportError
    for make in (QuantizationAwareTraining, PostTrainingQuantization, DynamicQuantization):
        with pytest.raises(ValueError, match=r"^backend='x86' is torch.ao's FX graph mode, which this torch no longer has \("):
            make(backend="x86")
    with pytest.raises(ValueError, match=r"use the default, backend='x86_inductor'\.$"):
        QuantizationAwareTraining(backend="fbgemm")


# Run in a process whose sitecustomize makes the FX engine unimportable: every default path, on real digits.
DEFAULT_PATHS = """
import json, sys
import torch
from lightning_compress import DynamicQuantization, PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.report import top1_accuracy
import lightning as L

out = sys.argv[1]
digits = DigitsDataModule(batch_size=64)
digits.setup()
results = {}

def fit(callback, epochs):
    L.seed_everything(0)
    model = ImageClassifier()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback],
                        default_root_dir=out)
    trainer.fit(model, datamodule=digits)
    return model

qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=2,
                                export_format=["torch_export", "onnx", "openvino"], export_dir=out)
trained = {"qat": fit(qat, 3)}  # the fake-quant model, which the int8 one should match
ptq = PostTrainingQuantization(calibration_batches=4, export_dir=out + "/ptq")
trained["ptq"] = fit(ptq, 1)
dynamic = DynamicQuantization(export_dir=out + "/dynamic")
trained["dynamic"] = fit(dynamic, 1)
for name, callback in (("qat", qat), ("ptq", ptq), ("dynamic", dynamic)):
    results[name] = {
        "trained_accuracy": top1_accuracy(trained[name].eval(), digits.test_dataloader()),
        "accuracy": top1_accuracy(callback.quantized_model, digits.test_dataloader()),
        "exports": sorted(callback.export_paths),
        "engine": type(callback.backend.config).__name__,
    }
results["fx_imported"] = "lightning_compress.fx_quantization" in sys.modules and sys.modules[
    "lightning_compress.fx_quantization"] is not None
print(json.dumps(results))
"""


def _without_fx(tmp_path: Path) -> dict[str, str]:
    """The environment of a process in which ``lightning_compress.fx_quantization`` cannot be imported, with
    every warning shown (as ``PYTHONWARNINGS=always`` shows a user)."""
    shim = tmp_path / "without_fx"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text('import sys\nsys.modules["lightning_compress.fx_quantization"] = None\n')
    path = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHONWARNINGS": "always", "HYDRA_FULL_ERROR": "1"}


@pytest.mark.slow  # about 2 minutes: three fits in one process, then three recipes each in its own
def test_the_default_paths_and_recipes_run_with_the_fx_engine_gone(tmp_path: Path):
    env = _without_fx(tmp_path)
    run = subprocess.run(
        [sys.executable, "-c", DEFAULT_PATHS, str(tmp_path / "callbacks")],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    assert not results.pop("fx_imported")
    assert results["qat"]["exports"] == ["onnx", "openvino", "torch_export"]  # each ran in its runtime and agreed
    assert results["ptq"]["exports"] == results["dynamic"]["exports"] == ["torch_export"]
    for name, result in results.items():
        assert result["engine"] == "InductorQuantizationConfig", name
        assert result["trained_accuracy"] >= 0.8 and result["accuracy"] >= result["trained_accuracy"] - 0.02, (name, result)
    assert not [line for line in run.stderr.splitlines() if any(text in line for text in UPSTREAM_DEPRECATIONS)]

    for recipe, files in (("qat", ["model_int8.pt2"]), ("ptq", ["model_int8.pt2"]), ("dynamic", ["model_dynamic_int8.pt2"])):
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), f"+compress={recipe}", "trainer.max_epochs=2"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert result.returncode == 0, (recipe, result.stderr[-3000:])
        written = {path.name for path in (tmp_path / "outputs" / recipe).rglob("*.pt2")}
        assert set(files) <= written, (recipe, written)
        printed = result.stdout + result.stderr
        assert recipe != "qat" or "x86_inductor backend" in printed  # QAT's parts table names the engine
        assert not [line for line in printed.splitlines() if any(text in line for text in UPSTREAM_DEPRECATIONS)], recipe
