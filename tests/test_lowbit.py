"""Low-bit Linear QAT through torchao (8da4w, int4 weight-only, int8 dynamic) on a byte-level transformer LM."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torchao.quantization.qat.linear import FakeQuantizedLinear
from torchao.utils import TorchAOBaseTensor

from lightning_compress import PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.app.text import ByteTransformer, PythonSourceDataModule
from lightning_compress.lowbit_quantization import SCHEMES, LowBitLinearConfig, int4_cpu_kernel, stored_bytes
from lightning_compress.report import evaluate

from conftest import quiet_trainer

DATA = {"block_size": 32, "batch_size": 32, "train_bytes": 40_000, "eval_bytes": 8_000}
# from random weights over 40 steps, annealed to zero per step: the benchmark's from-scratch peak rate
MODEL = {"block_size": 32, "width": 64, "layers": 2, "heads": 2, "lr": 3e-3}


def _fit(
    tmp_path: Path, callbacks: list, max_epochs: int = 2, **kwargs
) -> tuple[L.Trainer, ByteTransformer, PythonSourceDataModule]:
    L.seed_everything(0)
    model, data = ByteTransformer(**MODEL), PythonSourceDataModule(**DATA)
    trainer = quiet_trainer(tmp_path, callbacks, max_epochs, **kwargs)
    trainer.fit(model, datamodule=data)
    data.setup()
    return trainer, model, data


def _weight_bytes(model: nn.Module, names: list[str]) -> int:
    """Bytes the weights of these layers hold: a low-bit tensor's integers, scales and zero-points."""
    return sum(stored_bytes(model.get_submodule(name).weight.detach()) for name in names)


def _low_bit_layers(model: nn.Module) -> list[str]:
    return [name for name, layer in model.named_modules() if isinstance(getattr(layer, "weight", None), TorchAOBaseTensor)]


@pytest.mark.parametrize("scheme", [SCHEMES[0], *(pytest.param(scheme, marks=pytest.mark.slow) for scheme in SCHEMES[1:])])
def test_each_scheme_trains_converts_and_keeps_the_fake_quant_perplexity(tmp_path: Path, scheme: str):
    qat = QuantizationAwareTraining(start_epoch=1, config=LowBitLinearConfig(scheme=scheme), skip=["head"])
    _, model, data = _fit(tmp_path, [qat], limit_train_batches=20)
    parts = {part.name: part for part in qat.parts}
    # int4 weight-only runs in torch's CPU int4 kernel where the build has it; the other schemes have no x86 kernel
    kernel = "CPU int4 kernel" if scheme == "int4_weight_only" and int4_cpu_kernel() else "no x86 kernel"
    assert parts["blocks"].quantized and parts["blocks"].int8_layers == 8 and kernel in parts["blocks"].reason
    assert not parts["head"].quantized  # skipped: the output head is a common exception
    assert all(isinstance(layer, FakeQuantizedLinear) for layer in model.blocks.modules() if isinstance(layer, nn.Linear))
    converted = qat.quantized_model
    low_bit = _low_bit_layers(converted)
    assert len(low_bit) == 8 and all(name.startswith("blocks.") for name in low_bit)
    # the converted model runs on the same inputs and computes what fake-quant trained
    test = data.test_dataloader()
    (_, fake_quant_perplexity), (_, perplexity) = evaluate(model, test), evaluate(converted, test)
    (_, float_perplexity) = evaluate(qat.float_model(model), test)
    assert math.isfinite(perplexity) and perplexity == pytest.approx(fake_quant_perplexity, rel=1e-3)
    assert perplexity < 40 and abs(perplexity - float_perplexity) < 0.1 * float_perplexity  # learned, and close to float
    linear_names = [name for name, layer in qat.float_model(model).named_modules() if isinstance(layer, nn.Linear)][:-1]
    ratio = _weight_bytes(converted, linear_names) / _weight_bytes(qat.float_model(model), linear_names)
    assert ratio <= 0.3  # int4 values stored in int8 bytes (or int8 weights), a scale per group or channel


@pytest.mark.slow
def test_resume_mid_qat_equals_the_uninterrupted_run_and_the_export_runs_without_this_package(tmp_path: Path):
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    config = LowBitLinearConfig(scheme="8da4w", group_size=16)
    qat = QuantizationAwareTraining(start_epoch=1, config=config, export_dir=str(tmp_path / "full"))
    _, model, data = _fit(tmp_path / "full", [qat, every_epoch], 3, limit_train_batches=10, enable_checkpointing=True)
    tokens = data.test_set.tensors[0][:8]
    with torch.no_grad():
        expected = qat.quantized_model.eval()(tokens)
    # a new process's view: fresh model, callback and trainer, resumed from the checkpoint after QAT's first epoch
    L.seed_everything(0)
    resumed = QuantizationAwareTraining(start_epoch=1, config=config, export_format="none")
    trainer = quiet_trainer(tmp_path / "resumed", [resumed], 3, limit_train_batches=10)
    trainer.fit(ByteTransformer(**MODEL), datamodule=PythonSourceDataModule(**DATA), ckpt_path=tmp_path / "full" / "epoch=1.ckpt")
    with torch.no_grad():
        assert torch.allclose(resumed.quantized_model.eval()(tokens), expected, atol=1e-5)
    # load_from_checkpoint rebuilds the fake-quant Linear layers before the weights load
    loaded = ByteTransformer.load_from_checkpoint(tmp_path / "full" / "epoch=2.ckpt", weights_only=True)
    assert isinstance(loaded.blocks[0].mlp[0], FakeQuantizedLinear)
    # the torch.export program runs in a fresh process with torch alone
    torch.save(tokens, tmp_path / "tokens.pt")
    code = (
        "import sys, torch; program = torch.export.load(sys.argv[1]).module(); "
        "torch.save(program(torch.load(sys.argv[2])), sys.argv[3])"
    )
    paths = [str(qat.export_paths["torch_export"]), str(tmp_path / "tokens.pt"), str(tmp_path / "out.pt")]
    result = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "lightning_compress" not in code and torch.allclose(torch.load(tmp_path / "out.pt"), expected, atol=1e-5)


def test_post_training_versions_of_the_schemes(tmp_path: Path):
    ptq = PostTrainingQuantization(calibration_batches=1, config=LowBitLinearConfig(scheme="int4_weight_only"), skip=["head"])
    _, model, data = _fit(tmp_path, [ptq], 1, limit_train_batches=20)
    low_bit = [
        name
        for name, layer in ptq.quantized_model.named_modules()
        if isinstance(getattr(layer, "weight", None), TorchAOBaseTensor)
    ]
    assert len(low_bit) == 8
    test = data.test_dataloader()
    (_, float_perplexity), (_, perplexity) = evaluate(model, test), evaluate(ptq.quantized_model, test)
    # int4 weights change what the model computes, a little: quantization noise moves the perplexity either way
    assert (
        math.isfinite(perplexity)
        and perplexity != float_perplexity
        and abs(perplexity - float_perplexity) < 0.2 * float_perplexity
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"freeze_observer_epoch": 2}, r"freeze_observer_epoch=2 has nothing to act on with LowBitLinearConfig"),
        ({"calibration_batches": 4}, r"calibration_batches=4 has nothing to act on with LowBitLinearConfig"),
        (
            {"backend": "x86"},
            r"backend='x86' is a setting of the backend= flows; with config=LowBitLinearConfig",
        ),
        ({"export_format": "onnx"}, r"export_format='onnx' is not written by backend='torchao_linear'"),
    ],
)
def test_settings_the_schemes_cannot_honour_fail_at_construction(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(config=LowBitLinearConfig(), **options)


def test_bad_scheme_and_group_size_fail_before_training(tmp_path: Path):
    with pytest.raises(ValueError, match=r"scheme='int3' is unknown: allowed values are \['8da4w', 'int4_weight_only'"):
        LowBitLinearConfig(scheme="int3")
    with pytest.raises(ValueError, match=r"config=.* is not a quantization config"):
        QuantizationAwareTraining(config={"scheme": "8da4w"})
    qat = QuantizationAwareTraining(config=LowBitLinearConfig(group_size=48))
    trainer = quiet_trainer(tmp_path, [qat], 1)
    with pytest.raises(
        ValueError, match=r"group_size=48 does not divide the input width 64 of 'blocks.0.attention.qkv': group sizes allowed"
    ):
        trainer.fit(ByteTransformer(**MODEL), datamodule=PythonSourceDataModule(**DATA))
    assert trainer.global_step == 0


_RUN_PTE = """
import sys, torch
from executorch.runtime import Runtime
tokens, expected = torch.load(sys.argv[2])
output = Runtime.get().load_program(sys.argv[1]).load_method("forward").execute([tokens])[0]
assert not any(name.startswith("lightning_compress") for name in sys.modules)
print(float((output - expected).abs().mean() / expected.abs().mean()))
"""


@pytest.mark.slow  # 40 s: an ExecuTorch lowering and a fresh process that loads the .pte
def test_an_8da4w_model_ships_to_executorch_and_runs_there_without_this_package(tmp_path: Path):
    qat = QuantizationAwareTraining(
        start_epoch=1,
        config=LowBitLinearConfig(scheme="8da4w"),
        skip=["head"],
        export_format=["executorch"],
        export_dir=str(tmp_path),
    )
    trainer, model, data = _fit(tmp_path, [qat], limit_train_batches=10)
    assert set(qat.export_paths) == {"executorch"} and qat.export_paths["executorch"].suffix == ".pte"
    tokens = next(iter(data.test_dataloader()))[0][:2]
    with torch.no_grad():
        expected = qat.quantized_model(tokens)
    torch.save((tokens, expected), tmp_path / "expected.pt")
    result = subprocess.run(
        [sys.executable, "-c", _RUN_PTE, str(qat.export_paths["executorch"]), str(tmp_path / "expected.pt")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) <= 0.05  # XNNPACK's int8 kernels round their own way
    # the report runs the .pte too, as a row of its own
    from lightning_compress.report import models_to_report

    assert "int8 executorch" in models_to_report(trainer, model)


@pytest.mark.slow
@pytest.mark.skipif(not int4_cpu_kernel(), reason="the model that fails to lower is the one in torch's CPU int4 kernel")
def test_a_model_executorch_cannot_lower_costs_one_warning_and_the_other_exports_are_written(tmp_path: Path):
    """``int4_weight_only`` in torch's int4 kernel does not lower to ExecuTorch: the .pte is not written (nothing
    half-written is left), one warning says why, and the .pt2 beside it is written and the run completes."""
    ptq = PostTrainingQuantization(
        calibration_batches=1,
        config=LowBitLinearConfig(scheme="int4_weight_only"),
        skip=["head"],
        export_format=["torch_export", "executorch"],
        export_dir=str(tmp_path / "exports"),
    )
    with pytest.warns(UserWarning) as caught:
        _fit(tmp_path, [ptq], max_epochs=0)
    failures = [str(warning.message) for warning in caught if "model_int8.pte" in str(warning.message)]
    assert len(failures) == 1 and "failed, the run goes on" in failures[0] and "\n" not in failures[0]
    assert set(ptq.export_paths) == {"torch_export"} and ptq.export_paths["torch_export"].is_file()
    assert [path.name for path in (tmp_path / "exports").iterdir()] == ["model_int8.pt2"]


@pytest.mark.parametrize("group_size", [32, 16])
def test_int4_weight_only_runs_in_the_cpu_int4_kernel_where_it_can(tmp_path: Path, group_size: int):
    from lightning_compress.lowbit_quantization import Int4KernelLinear

    ptq = PostTrainingQuantization(
        calibration_batches=1,
        config=LowBitLinearConfig(scheme="int4_weight_only", group_size=group_size),
        skip=["head"],
        export_format="none",
    )
    _, model, data = _fit(tmp_path, [ptq], max_epochs=0)
    layers = [layer for layer in ptq.quantized_model.blocks.modules() if isinstance(layer, nn.Linear)]
    packed = int4_cpu_kernel() and group_size == 32  # the kernel takes groups of 32, 64 or 128
    assert len(layers) == 8 and all(isinstance(layer, Int4KernelLinear) == packed for layer in layers)
    assert all(isinstance(layer.weight, TorchAOBaseTensor) for layer in layers)
    tokens = next(iter(data.test_dataloader()))[0]
    prepared = ptq.backend.prepare_ptq(model, (), {}, ["head"])
    with torch.no_grad():
        fake_quant, converted = prepared(tokens), ptq.quantized_model(tokens)
    # the trained grid exactly; bf16 scales and activations around the kernel move the logits by under 1%
    assert (converted - fake_quant).abs().mean() <= (0.01 if packed else 1e-5) * fake_quant.abs().mean()
