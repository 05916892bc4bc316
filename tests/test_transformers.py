"""Hugging Face transformers models (built from configs, nothing downloaded) in a user's own LightningModule, the
way people fine-tune them: dict batches, ``self.model(**batch).loss``. The compressed models export to every
format from the call training made (named inputs ``input_ids``, ``attention_mask``; the ``logits`` output), and each
file is run in its own runtime here, as a user would, and compared with the torch model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import onnxruntime
import openvino
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import Linear as LinearInt8
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinearInt8
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import DynamicQuantization, MagnitudePruning, PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.app.text import PythonSourceDataModule
from lightning_compress.report import top1_accuracy

from conftest import quiet_trainer, run_train
from user_transformers import BertDigits, DigitSequences, DigitTokens, KeywordOnlyNet, LlamaBytes, ViTDigits

ALL_FORMATS = ["torchscript", "onnx", "openvino"]


@pytest.fixture(scope="module")
def tokens() -> DigitTokens:
    return DigitTokens(batch_size=32, train_size=640)


def _fit(tmp_path: Path, module: L.LightningModule, callback: L.Callback, datamodule, epochs: int = 2, **kwargs) -> L.Trainer:
    trainer = quiet_trainer(tmp_path, [callback], epochs, limit_val_batches=0, **kwargs)
    trainer.fit(module, datamodule=datamodule)
    return trainer


def _test_batch(count: int = 16) -> dict[str, torch.Tensor]:
    dataset = DigitSequences(torch.arange(1500, 1500 + count))
    return next(iter(DataLoader(dataset, batch_size=count)))


def _run_files(paths: dict[str, Path], inputs: dict[str, torch.Tensor], output: str = "logits") -> dict[str, np.ndarray]:
    """Each exported file run in its own runtime on named inputs, as a user would run it: its first output, which
    ONNX and OpenVINO name ``output``."""
    outputs = {}
    with torch.no_grad():
        if "torchscript" in paths:
            outputs["torchscript"] = torch.jit.load(str(paths["torchscript"]))(*inputs.values()).numpy()
        if "torch_export" in paths:
            outputs["torch_export"] = torch.export.load(str(paths["torch_export"])).module()(*inputs.values()).numpy()
    if "onnx" in paths:
        session = onnxruntime.InferenceSession(str(paths["onnx"]), providers=["CPUExecutionProvider"])
        assert [node.name for node in session.get_inputs()] == list(inputs)
        assert session.get_outputs()[0].name == output
        outputs["onnx"] = session.run(None, {name: tensor.numpy() for name, tensor in inputs.items()})[0]
    if "openvino" in paths:
        compiled = openvino.Core().compile_model(str(paths["openvino"]), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        assert [port.get_any_name() for port in compiled.inputs] == list(inputs)
        assert compiled.outputs[0].get_any_name() == output
        outputs["openvino"] = compiled({name: tensor.numpy() for name, tensor in inputs.items()})[compiled.outputs[0]]
    return outputs


def _relative_error(actual: np.ndarray, expected: torch.Tensor) -> float:
    return float(np.abs(actual - expected.numpy()).mean() / expected.abs().mean())


@pytest.mark.slow  # 15 s, on the FX engine (no longer the default; the torch.export engine's test is below)
def test_qat_of_bert_exports_every_format_with_named_inputs(tmp_path: Path, tokens: DigitTokens):
    L.seed_everything(0)
    model = BertDigits()
    qat = QuantizationAwareTraining(start_epoch=1, backend="x86", export_format=ALL_FORMATS, export_dir=str(tmp_path))
    _fit(tmp_path, model, qat, tokens)
    assert set(qat.export_paths) == set(ALL_FORMATS)
    assert any(isinstance(layer, LinearInt8) for layer in qat.quantized_model.modules())
    batch = _test_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        int8 = qat.quantized_model.model(**inputs).logits
        fake_quant = model.eval().model(**inputs).logits
    for name, output in _run_files(qat.export_paths, inputs).items():
        # the TorchScript file holds the int8 model; ONNX and OpenVINO run the fake-quant model in their int8 kernels
        expected = int8 if name == "torchscript" else fake_quant
        assert _relative_error(output, expected) <= 0.05, name
        assert (output.argmax(-1) == expected.argmax(-1).numpy()).mean() >= 0.9, name
    # dynamic batch and sequence: one shorter sequence, alone
    short = {name: tensor[:1, :40] for name, tensor in inputs.items()}
    with torch.no_grad():
        expected = model.model(**short).logits
    for name, output in _run_files({name: qat.export_paths[name] for name in ("onnx", "openvino")}, short).items():
        assert output.shape == (1, 10) and _relative_error(output, expected) <= 0.05, name


def test_ptq_of_bert_calibrates_the_model_training_step_calls(tmp_path: Path, tokens: DigitTokens):
    # the FX trace of transformers' embeddings made a placeholder of `inputs_embeds=None`, and the calibration
    # step then failed with "'NoneType' object has no attribute 'detach'"
    L.seed_everything(0)
    model = BertDigits()
    ptq = PostTrainingQuantization(
        calibration_batches=4, backend="x86", export_format=["torchscript", "onnx"], export_dir=str(tmp_path)
    )
    _fit(tmp_path, model, ptq, tokens, epochs=3)
    assert ptq.calibrated_batches == 4 and set(ptq.export_paths) == {"torchscript", "onnx"}
    assert any(isinstance(layer, LinearInt8) for layer in ptq.quantized_model.modules())
    batch = _test_batch(64)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        float_logits, int8_logits = model.eval().model(**inputs).logits, ptq.quantized_model.model(**inputs).logits
    assert (float_logits.argmax(-1) == int8_logits.argmax(-1)).float().mean() >= 0.9


def test_dynamic_quantization_of_vit_exports_torchscript(tmp_path: Path, tokens: DigitTokens):
    L.seed_everything(0)
    model = ViTDigits()
    dynamic = DynamicQuantization(backend="x86", export_dir=str(tmp_path))
    _fit(tmp_path, model, dynamic, tokens, epochs=1)
    assert any(isinstance(layer, DynamicLinearInt8) for layer in dynamic.quantized_model.modules())
    pixels = _test_batch()["pixel_values"]
    with torch.no_grad():
        expected = dynamic.quantized_model.model(pixel_values=pixels).logits
    [output] = _run_files({"torchscript": dynamic.export_paths["torchscript"]}, {"pixel_values": pixels}).values()
    assert _relative_error(output, expected) <= 1e-3


@pytest.mark.slow  # 21 s: Inductor compiles the encoder and the classifier
def test_dynamic_int8_without_torch_ao_quantizes_every_linear_of_bert_under_inductor(tmp_path: Path, tokens: DigitTokens):
    """``backend="x86_inductor"``: BERT's encoder exported whole from the call training made, its Linear layers in
    int8 (oneDNN under Inductor), no torch.ao layer anywhere; the classifier's own forward computes the loss from
    labels=, so its children are quantized. The .pt2 file, run by torch alone, computes what the model does."""
    from lightning_compress.quantization_backend import backend_for, quantization_config

    L.seed_everything(0)
    model = BertDigits()
    dynamic = DynamicQuantization(backend="x86_inductor", export_dir=str(tmp_path))
    _fit(tmp_path, model, dynamic, tokens, epochs=2)
    quantized = dynamic.quantized_model
    assert not [name for name, layer in quantized.named_modules() if type(layer).__module__.startswith("torch.ao")]
    int8, floating = backend_for(quantization_config("x86_inductor")).layers_by_kind(quantized)
    assert len(int8) == 2 * 6 + 1 + 1 and floating == []  # 6 Linear per block, the pooler, the classifier
    assert dynamic.float_layers == [] and set(dynamic.export_paths) == {"torch_export"}
    batch = _test_batch(64)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        float_logits, int8_logits = model.eval().model(**inputs).logits, quantized.model(**inputs).logits
    assert _relative_error(int8_logits.numpy(), float_logits) <= 0.05
    assert (float_logits.argmax(-1) == int8_logits.argmax(-1)).float().mean() >= 0.9
    [output] = _run_files(dynamic.export_paths, inputs).values()
    assert _relative_error(output, int8_logits) <= 1e-3


@pytest.mark.slow  # 40 s: Inductor compiles the model once per sequence length
def test_dynamic_int8_without_torch_ao_takes_a_llama_whole_and_any_sequence_length(
    tmp_path: Path, source_bytes: PythonSourceDataModule
):
    """A decoder whose step calls ``self.model(input_ids=...)``: the whole ``LlamaForCausalLM`` is exported once (its
    key-value cache switched off, as every whole-sequence call of it is), its output head kept float by ``skip``
    inside the one graph rather than by splitting the model; the int8 model and its .pt2 file take sequences of
    any length and compute what the float model does."""
    from lightning_compress.pt2e_quantization import CompiledProgram
    from lightning_compress.quantization_backend import backend_for, quantization_config

    L.seed_everything(0)
    module = LlamaBytes()
    dynamic = DynamicQuantization(backend="x86_inductor", skip=["model.lm_head"], export_dir=str(tmp_path))
    _fit(tmp_path, module, dynamic, source_bytes, limit_train_batches=4)
    quantized = dynamic.quantized_model
    assert isinstance(quantized.model, CompiledProgram)  # one graph: not split child by child
    int8, floating = backend_for(quantization_config("x86_inductor")).layers_by_kind(quantized)
    assert len(int8) == 2 * 7 and floating == ["lm_head"]  # q, k, v, o and the MLP's three per block; named in the graph
    assert set(dynamic.export_paths) == {"torch_export"}
    tokens = next(iter(source_bytes.test_dataloader()))[0][:2]
    for length in (32, 20):
        with torch.no_grad():
            expected = module.eval().model(input_ids=tokens[:, :length]).logits
            int8_logits = quantized.model(input_ids=tokens[:, :length]).logits
        assert int8_logits.shape == (2, length, 256)
        assert _relative_error(int8_logits.numpy(), expected) <= 0.05
        [output] = _run_files(dynamic.export_paths, {"input_ids": tokens[:, :length]}).values()
        assert _relative_error(output, int8_logits) <= 1e-3


@pytest.mark.slow  # 40 s: Inductor compiles the int8 Llama for four lengths and once more for every length
def test_an_int8_language_model_compiles_a_few_lengths_then_one_graph_for_every_length(source_bytes: PythonSourceDataModule):
    """Dynamo compiles a function at most ``recompile_limit`` (8) times and then runs it eagerly: an int8 graph's
    reference ops, 130x slower than compiled on a small Llama. The program compiles its first
    ``STATIC_SEQUENCE_LENGTHS`` lengths as they are, then the sequence as a symbol: twelve lengths stay under the
    limit, the last ones compile nothing, and each computes what the converted graph does."""
    from torch._dynamo.utils import counters

    from lightning_compress.pt2e_quantization import CompiledProgram, InductorQuantizationConfig
    from lightning_compress.quantization_backend import backend_for

    torch.manual_seed(0)
    model = LlamaBytes().model.eval()
    tokens = next(iter(source_bytes.test_dataloader()))[0][:2]
    int8 = backend_for(InductorQuantizationConfig()).quantize_dynamic(model, call=((), {"input_ids": tokens[:, :16]}))
    assert isinstance(int8, CompiledProgram)
    before = counters["stats"]["unique_graphs"]
    graphs = []
    for length in range(10, 22):
        with torch.no_grad():
            output = int8(input_ids=tokens[:, :length]).logits
            reference = int8.program(input_ids=tokens[:, :length], **int8.added_arguments).logits  # its cache off
        assert _relative_error(output.numpy(), reference) <= 1e-3
        graphs.append(counters["stats"]["unique_graphs"] - before)
    assert graphs[-1] < torch._dynamo.config.recompile_limit  # compiled to the end, never run eagerly
    assert graphs[-1] == graphs[-6]  # the last six lengths compiled nothing


@pytest.mark.slow  # 30 s: Inductor compiles the int8 model once per sequence length
def test_pt2e_qat_trains_a_llama_as_one_graph_with_its_cache_off(tmp_path: Path, source_bytes: PythonSourceDataModule):
    """The torch.export engine prepares a whole ``LlamaForCausalLM`` as one graph (its forward returned a key-value
    cache, which split it into single layers before); the int8 model takes any sequence length and computes what
    the trained model does."""
    L.seed_everything(0)
    module = LlamaBytes()
    qat = QuantizationAwareTraining(backend="x86_inductor", start_epoch=0, skip=["model.lm_head"], export_format="none")
    _fit(tmp_path, module, qat, source_bytes, epochs=1, limit_train_batches=4)
    assert [(part.name, part.quantized, part.int8_layers, part.float_layers) for part in qat.parts] == [
        ("model", True, 2 * 7, ["lm_head"])
    ]
    tokens = next(iter(source_bytes.test_dataloader()))[0][:2]
    for length in (32, 20):
        with torch.no_grad():
            expected = module.eval().model(input_ids=tokens[:, :length]).logits
            int8_logits = qat.quantized_model.model(input_ids=tokens[:, :length]).logits
        assert int8_logits.shape == (2, length, 256) and _relative_error(int8_logits.numpy(), expected) <= 0.05


@pytest.mark.slow  # 10 s
def test_the_float_model_of_a_qat_llama_keeps_its_tied_embedding_and_the_callback_holds_no_second_copy(
    tmp_path: Path, source_bytes: PythonSourceDataModule
):
    """QAT keeps each part's float structure for the whole fit, to rebuild the float model from the trained weights:
    on the meta device (no second model in memory), with non-persistent buffers (the rotary frequencies) real. The
    float model built from it holds the trained weights, its output layer still the embedding (tied), and computes
    what the trained model does with fake-quant off."""
    L.seed_everything(0)
    module = LlamaBytes(tie_word_embeddings=True)
    qat = QuantizationAwareTraining(start_epoch=0, skip=["model.lm_head"], export_format="none", convert_on_fit_end=False)
    _fit(tmp_path, module, qat, source_bytes, epochs=1, limit_train_batches=4)
    template = qat._float_templates["model"]
    assert all(tensor.is_meta for tensor in template.state_dict().values())
    assert not template.model.rotary_emb.inv_freq.is_meta

    float_model = qat.float_model(module).model
    assert float_model.lm_head.weight is float_model.model.embed_tokens.weight
    assert sum(parameter.numel() for parameter in float_model.parameters()) == sum(
        parameter.numel() for parameter in LlamaBytes(tie_word_embeddings=True).model.parameters()
    )
    trained = module.get_parameter(qat.parameter_name("model.model.embed_tokens.weight"))  # inside the exported graph
    assert torch.equal(float_model.model.embed_tokens.weight, trained.detach())
    tokens = next(iter(source_bytes.test_dataloader()))[0][:2]
    qat.backend.set_fake_quant(module, enabled=False)
    qat.backend.set_observers(module, enabled=False)
    with torch.no_grad():
        expected = module.eval().model(input_ids=tokens).logits
        assert torch.allclose(float_model.eval()(input_ids=tokens).logits, expected, atol=1e-5)


def test_a_keyword_only_forward_exports_every_format(tmp_path: Path, tokens: DigitTokens):
    L.seed_everything(0)
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, export_format=[*ALL_FORMATS, "torch_export"], export_dir=str(tmp_path)
    )
    module = KeywordOnlyNet()
    _fit(tmp_path, module, pruning, tokens)
    assert set(pruning.export_paths) == {*ALL_FORMATS, "torch_export"}
    inputs = {"pixels": _test_batch()["pixel_values"], "scale": torch.full((16, 1, 1, 1), 0.5)}
    with torch.no_grad():
        expected = pruning.pruned_model(**inputs)
    for name, output in _run_files(pruning.export_paths, inputs, output="output").items():
        assert _relative_error(output, expected) <= 1e-4, name


@pytest.fixture(scope="module")
def source_bytes() -> PythonSourceDataModule:
    datamodule = PythonSourceDataModule(block_size=32, batch_size=16, train_bytes=20_000, eval_bytes=4_000)
    datamodule.setup()
    return datamodule


@pytest.mark.slow  # 20-25 s: every format written and run at two sequence lengths; the fast suite neared 10 minutes
def test_a_pruned_llama_exports_through_its_exported_program(tmp_path: Path, source_bytes: PythonSourceDataModule):
    """Llama's masks use ``aten::diff``, which the TorchScript-based ONNX exporter and OpenVINO's TorchScript
    frontend cannot convert: both are written from the ``torch.export`` program instead."""
    L.seed_everything(0)
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, export_format=[*ALL_FORMATS, "torch_export"], export_dir=str(tmp_path)
    )
    module = LlamaBytes()
    _fit(tmp_path, module, pruning, source_bytes, limit_train_batches=4)
    assert set(pruning.export_paths) == {*ALL_FORMATS, "torch_export"}
    tokens = next(iter(source_bytes.test_dataloader()))[0][:2]
    for length in (32, 20):  # the sequence dimension is free in every file
        with torch.no_grad():
            expected = pruning.pruned_model.model(input_ids=tokens[:, :length]).logits
        outputs = _run_files(pruning.export_paths, {"input_ids": tokens[:, :length]})
        assert set(outputs) == {*ALL_FORMATS, "torch_export"}
        for name, output in outputs.items():
            assert output.shape == (2, length, 256) and _relative_error(output, expected) <= 1e-4, (name, length)


def test_accuracy_of_a_dict_batch_model_is_measured_as_training_calls_it(tmp_path: Path, tokens: DigitTokens):
    from lightning_compress.network_call import test_calls

    L.seed_everything(0)
    model = BertDigits()
    pruning = MagnitudePruning(final_sparsity=0.3, start_epoch=0, end_epoch=1, export_format="none")
    trainer = _fit(tmp_path, model, pruning, tokens)
    calls = test_calls(trainer, model, tokens.test_dataloader())
    assert calls[0].input_names == ("input_ids", "attention_mask") and calls[0].targets is not None
    correct = total = 0
    with torch.no_grad():
        for batch in tokens.test_dataloader():
            logits = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
            total += len(batch["labels"])
    assert top1_accuracy(model, calls) == pytest.approx(correct / total)


@pytest.mark.slow
def test_the_app_trains_compresses_and_reports_a_users_transformers_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))
    result = run_train(
        "model._target_=user_transformers.BertDigits",
        "data._target_=user_transformers.DigitTokens",
        "+compress=ptq",
        "compress.callbacks.post_training_quantization.export_format=[torch_export,onnx,openvino]",
        "trainer.max_epochs=2",
        "report.latency_runs=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "int8", "int8 onnxruntime", "int8 openvino"}
    for name, row in rows.items():
        assert row["accuracy"] is not None and abs(row["accuracy"] - rows["fp32"]["accuracy"]) <= 0.05, name


@pytest.mark.slow  # 25-30 s: QAT, Inductor's compile and three runtimes; the fast suite neared 10 minutes
def test_pt2e_qat_quantizes_bert_as_one_graph_and_ships_it_to_every_runtime(tmp_path: Path, tokens: DigitTokens):
    """The torch.export engine traces transformers' BERT whole: int8 flows through every Linear of the encoder,
    and the fake-quant graph QAT trained is what ONNX Runtime and OpenVINO run in int8. With transformers' default
    dropout: exported in training, attention's dropout_p is switched off for evaluation like any dropout."""
    from lightning_compress.runtimes import OpenVinoModel

    L.seed_everything(0)
    model = BertDigits(dropout=0.1)
    formats = ["torch_export", "onnx", "openvino"]
    qat = QuantizationAwareTraining(start_epoch=1, backend="x86_inductor", export_format=formats, export_dir=str(tmp_path))
    _fit(tmp_path, model, qat, tokens)
    parts = {part.name: part for part in qat.parts}
    # the classifier's forward computes the loss from labels=: its children are quantized, the encoder as one graph
    assert not parts["model"].quantized and "labels=" in parts["model"].reason
    assert parts["model.bert"].int8_layers == 2 * 6 + 1  # query, key, value, output, two MLP layers per block; pooler
    assert set(qat.export_paths) == set(formats)
    assert len(OpenVinoModel(qat.export_paths["openvino"], (0, 0)).int8_layers()) >= 14  # with the classifier
    batch = _test_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        fake_quant = model.eval().model(**inputs).logits
    for name, output in _run_files(qat.export_paths, inputs).items():
        assert _relative_error(output, fake_quant) <= 0.05, name
        assert (output.argmax(-1) == fake_quant.argmax(-1).numpy()).mean() >= 0.9, name


def _attention_input_quantizers(path: Path) -> list[list[object]]:
    """For each ScaledDotProductAttention of an OpenVINO model, the FakeQuantize op (or None) that feeds its query,
    key and value, found through the reshapes between them."""
    found = []
    for op in openvino.Core().read_model(str(path)).get_ops():
        if op.get_type_name() != "ScaledDotProductAttention":
            continue
        feeds = []
        for index in range(3):
            producer = op.input_value(index).get_node()
            while producer.get_type_name() in ("Transpose", "Reshape"):
                producer = producer.input_value(0).get_node()
            feeds.append(producer if producer.get_type_name() == "FakeQuantize" else None)
        found.append(feeds)
    return found


def test_pt2e_quantizes_the_query_and_key_of_attention_on_the_grid_openvino_runs_in_int8(tmp_path: Path, tokens: DigitTokens):
    """Where NNCF's transformer preset quantizes attention: its query and key, each right after its projection, on
    a grid centred on zero (OpenVINO's CPU plugin computes the score product in int8 only on such a grid; off
    centre, in bf16); the value stays float. QAT trains on that placement, and OpenVINO's int8 model computes what
    the fake-quant model does."""
    L.seed_everything(0)
    model = BertDigits()
    qat = QuantizationAwareTraining(start_epoch=0, export_format="openvino", export_dir=str(tmp_path))
    _fit(tmp_path, model, qat, tokens, epochs=1, limit_train_batches=4)
    attentions = _attention_input_quantizers(qat.export_paths["openvino"])
    assert len(attentions) == 2  # one per layer
    for query, key, value in attentions:
        assert value is None
        for quantize in (query, key):
            assert quantize is not None and quantize.get_levels() == 256
            assert quantize.input_value(0).get_node().get_type_name() == "Add"  # the projection's bias: fused there
            low, high = (float(quantize.input_value(index).get_node().get_data().ravel()[0]) for index in (1, 2))
            assert low == pytest.approx(-high * 128 / 127, rel=1e-5)  # -128 and 127 steps: zero on the grid's 128
    batch = _test_batch()
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        fake_quant = model.eval().model(**inputs).logits
    [output] = _run_files({"openvino": qat.export_paths["openvino"]}, inputs).values()
    assert _relative_error(output, fake_quant) <= 0.05


@pytest.mark.slow  # 9 s, three fits; the fast suite neared 9 minutes
def test_a_qat_checkpoint_from_before_attention_was_quantized_resumes_only_as_it_was_trained(tmp_path: Path, tokens: DigitTokens):
    """A checkpoint of version 1 of the torch.export engine's config (no ``attention_query_key``) trained attention
    in float: it reads as ``attention_query_key=False``, and a resumed fit that would quantize attention (the
    default now) is refused before training, in one line that gives the config to resume with; given it, the fit
    resumes."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_compress.pt2e_quantization import InductorQuantizationConfig

    float_attention = InductorQuantizationConfig(attention_query_key=False)
    L.seed_everything(0)
    saving = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    qat = QuantizationAwareTraining(start_epoch=0, config=float_attention, convert_on_fit_end=False, export_format="none")
    trainer = quiet_trainer(tmp_path, [qat, saving], 1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(BertDigits(), datamodule=tokens)
    checkpoint = torch.load(saving.last_model_path, weights_only=False)
    [state] = [state for key, state in checkpoint["callbacks"].items() if key.startswith("QuantizationAwareTraining")]
    del state["config"]["attention_query_key"]
    state["config_version"] = 1
    old = tmp_path / "version1.ckpt"
    torch.save(checkpoint, old)

    resumed = QuantizationAwareTraining(start_epoch=0, convert_on_fit_end=False, export_format="none")
    trainer = quiet_trainer(tmp_path, [resumed], 2, limit_train_batches=2, limit_val_batches=0)
    refusal = r"trained with attention_query_key=False, .*config=lightning_compress\.pt2e_quantization\.Induct"
    with pytest.raises(ValueError, match=refusal):
        trainer.fit(BertDigits(), datamodule=tokens, ckpt_path=str(old))
    assert trainer.global_step == 0

    resumed = QuantizationAwareTraining(start_epoch=0, config=float_attention, convert_on_fit_end=False, export_format="none")
    trainer = quiet_trainer(tmp_path, [resumed], 2, limit_train_batches=2, limit_val_batches=0)
    module = BertDigits()
    trainer.fit(module, datamodule=tokens, ckpt_path=str(old))
    assert trainer.global_step == 4 and resumed.prepared_names == ["model.bert", "model.classifier"]


def test_channel_pruning_of_bert_removes_whole_heads_and_mlp_channels(tmp_path: Path, tokens: DigitTokens):
    """Removing channels from inside query/key/value regroups every head, so heads go whole: each attention is a
    group whose channels are heads (query, key and value rows, the output projection's columns). The model that
    ships, smaller, computes what the masked one did; BERT's config derives a head's size from hidden_size /
    num_attention_heads, so it cannot state fewer heads of the same size, and the run says so."""
    from lightning_compress import channel_groups

    L.seed_everything(0)
    module = BertDigits()
    batch = _test_batch(4)
    inputs = {name: batch[name] for name in module.inputs}
    groups = {group.root: group for group in channel_groups.find_channel_groups(module.model.eval(), **inputs)}
    for layer in range(2):
        attention = groups[f"bert.encoder.layer.{layer}.attention.self"]
        assert attention.prunable and attention.size == 4  # heads
        assert attention.producers == [f"bert.encoder.layer.{layer}.attention.self.{name}" for name in ("query", "key", "value")]
        assert groups[f"bert.encoder.layer.{layer}.intermediate.dense"].prunable
        assert not any(root.startswith(f"bert.encoder.layer.{layer}.attention.self.") for root in groups)  # no channel-wise group

    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none")
    with pytest.warns(UserWarning, match="config cannot describe it"):
        _fit(tmp_path, module, pruning, tokens)
    assert pruning.channels_removed
    pruned = pruning.pruned_model.model.bert.encoder.layer[0]
    assert pruned.intermediate.dense.out_features == 64  # half of 4 x 32
    assert pruned.attention.self.query.out_features == pruned.attention.self.value.out_features == 16  # 2 heads of 8
    assert pruned.attention.output.dense.in_features == 16
    assert pruned.attention.self.num_attention_heads == 2 and pruned.attention.self.all_head_size == 16
    masks = pruning.masks  # the heads that went are those the masks zeroed: whole rows of 8
    zero_rows = (masks["model.bert.encoder.layer.0.attention.self.query.weight"].sum(1) == 0).nonzero().flatten()
    assert len(zero_rows) == 16 and set((zero_rows // 8).tolist()) <= {0, 1, 2, 3} and len(set((zero_rows // 8).tolist())) == 2
    with torch.no_grad():
        masked, shrunken = module.model.eval()(**inputs).logits, pruning.pruned_model.model.eval()(**inputs).logits
    assert torch.allclose(masked, shrunken, atol=1e-4)
    assert "channels removed" in pruning.report_models()


def test_a_bert_pruned_in_its_mlps_only_reloads_with_from_pretrained(tmp_path: Path, tokens: DigitTokens):
    """With its heads and residual width skipped, only BERT's MLPs shrink; its config's ``intermediate_size``
    follows, so ``save_pretrained``/``from_pretrained`` rebuild the pruned model, and no warning is given."""
    import warnings

    from transformers import BertForSequenceClassification

    L.seed_everything(0)
    module = BertDigits()
    blocks = ("attention.self.query", "attention.output.dense", "output.dense")
    skip = [f"model.bert.encoder.layer.{layer}.{name}" for layer in range(2) for name in blocks]
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none", skip=[*skip, "model.bert.pooler"]
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*config cannot describe")
        _fit(tmp_path, module, pruning, tokens, limit_train_batches=3)
    pruned = pruning.pruned_model.model
    assert pruned.config.intermediate_size == pruned.bert.encoder.layer[1].intermediate.dense.out_features == 64
    assert pruned.bert.encoder.layer[0].attention.self.query.out_features == 32  # heads kept
    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = BertForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    inputs = {name: tensor for name, tensor in _test_batch(4).items() if name in module.inputs}
    with torch.no_grad():
        assert torch.allclose(reloaded(**inputs).logits, pruned.eval()(**inputs).logits)


@pytest.mark.slow  # 11 s; the fast suite nears 9 minutes
def test_a_vit_with_heads_removed_states_its_head_size_and_reloads_with_from_pretrained(tmp_path: Path, tokens: DigitTokens):
    """ViT's config derives the head size from ``hidden_size / num_attention_heads`` but its attention reads a
    ``head_dim`` when the config has one: after half the heads go, the pruned model's config states both, so
    ``save_pretrained``/``from_pretrained`` rebuild it (computing the same logits), and no warning is given."""
    import warnings

    from transformers import ViTForImageClassification

    L.seed_everything(0)
    module = ViTDigits()
    residual = [f"model.vit.layers.{layer}.{name}" for layer in range(2) for name in ("attention.o_proj", "mlp.fc2")]
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none", skip=residual
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*config cannot describe")
        _fit(tmp_path, module, pruning, tokens, limit_train_batches=3)
    pruned = pruning.pruned_model.model
    attention = pruned.vit.layers[0].attention
    assert (attention.q_proj.out_features, attention.o_proj.in_features) == (16, 16)
    assert pruned.vit.layers[1].mlp.fc1.out_features == 64
    config = pruned.config
    assert (config.num_attention_heads, config.head_dim, config.intermediate_size, config.hidden_size) == (2, 8, 64, 32)
    assert module.model.config.num_attention_heads == 4 and not hasattr(module.model.config, "head_dim")

    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = ViTForImageClassification.from_pretrained(tmp_path / "pruned").eval()
    pixels = _test_batch(4)["pixel_values"]
    with torch.no_grad():
        expected = pruned.eval()(pixel_values=pixels).logits
        assert torch.allclose(reloaded(pixel_values=pixels).logits, expected)
        assert torch.allclose(module.model.eval()(pixel_values=pixels).logits, expected, atol=1e-4)


def test_heads_of_a_llama_go_with_their_key_value_head_and_its_config_reloads_the_pruned_model(
    tmp_path: Path, source_bytes: PythonSourceDataModule
):
    """Grouped-query attention (4 query heads reading 2 key-value heads): a key-value head goes with the query heads
    that read it, so the ratio stays 2; Llama's config states head_dim apart from the head counts, so the pruned
    model's config is updated and ``save_pretrained``/``from_pretrained`` rebuild it, computing the same logits."""
    from transformers import LlamaForCausalLM

    L.seed_everything(0)
    module = LlamaBytes()
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none")
    _fit(tmp_path, module, pruning, source_bytes, limit_train_batches=4)
    assert pruning.channels_removed
    pruned = pruning.pruned_model.model
    attention = pruned.model.layers[0].self_attn
    assert (attention.q_proj.out_features, attention.k_proj.out_features, attention.o_proj.in_features) == (16, 8, 16)
    assert pruned.model.layers[0].mlp.up_proj.out_features == 32
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size) == (2, 1, 8, 32)
    assert module.model.config.num_attention_heads == 4  # the trained module keeps its own

    pruned.save_pretrained(tmp_path / "pruned")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    tokens = next(iter(source_bytes.test_dataloader()))[0][:2]
    with torch.no_grad():
        masked = module.model.eval()(input_ids=tokens).logits
        expected = pruned.eval()(input_ids=tokens).logits
        assert torch.allclose(reloaded(input_ids=tokens).logits, expected)
    assert torch.allclose(masked, expected, atol=1e-4)


class _CustomAttention(nn.Module):
    """Attention of one's own: query, key and value layers, but no stated head size, so its heads are unknown."""

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.split = heads

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        def heads(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.unflatten(-1, (self.split, -1)).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(self.query(features)), heads(self.key(features)), heads(self.value(features))
        )
        return self.out(attended.transpose(1, 2).flatten(2))


class _CustomBlockNet(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.attention = _CustomAttention(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.head = nn.Linear(width, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(features)
        hidden = hidden + self.attention(hidden)
        return self.head(hidden + self.mlp(hidden)).mean(1)


def test_an_attention_whose_heads_are_unknown_is_named_and_its_mlp_channels_still_go(tmp_path: Path):
    from lightning_compress import channel_groups

    torch.manual_seed(0)
    network = _CustomBlockNet().eval()
    features = torch.randn(2, 5, 4)
    groups = {group.root: group for group in channel_groups.find_channel_groups(network, features)}
    assert groups["attention"].blocked_by == (
        "its heads cannot be removed: _CustomAttention states no head size (attention_head_size or head_dim)"
    )
    assert groups["attention"].producers == ["attention.query", "attention.key", "attention.value"]
    assert not any(root.startswith("attention.") for root in groups)
    assert groups["mlp.0"].prunable

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = _CustomBlockNet()

        def training_step(self, batch, batch_idx):
            features, labels = batch
            return F.cross_entropy(self.net(features), labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = TensorDataset(torch.randn(32, 5, 4), torch.randint(0, 3, (32,)))
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none")
    trainer = quiet_trainer(tmp_path, [pruning], 2, limit_val_batches=0)
    trainer.fit(Module(), train_dataloaders=DataLoader(data, batch_size=8))
    assert pruning.channels_removed
    assert pruning.pruned_model.net.mlp[0].out_features == 32
    assert pruning.pruned_model.net.attention.query.out_features == 16


def test_a_llama_shrunk_mid_run_reloads_from_its_checkpoint_with_heads_removed(
    tmp_path: Path, source_bytes: PythonSourceDataModule
):
    """``shrink_epoch`` removes heads from the live network; its checkpoint holds the smaller one, which
    ``restore_pruned_channels`` rebuilds in a fresh module (heads replayed from the record) so the weights load."""
    from lightning_compress.pruning import restore_pruned_channels

    L.seed_everything(0)
    module = LlamaBytes()
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, shrink_epoch=1, mode="channels", export_format="none"
    )
    trainer = _fit(tmp_path, module, pruning, source_bytes, limit_train_batches=4)
    assert module.model.model.layers[1].self_attn.k_proj.out_features == 8
    assert module.model.config.num_key_value_heads == 1
    trainer.save_checkpoint(tmp_path / "shrunk.ckpt")

    fresh = LlamaBytes()
    checkpoint = torch.load(tmp_path / "shrunk.ckpt", weights_only=False)
    assert restore_pruned_channels(fresh, checkpoint) == ["model"]
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.model.config.num_attention_heads == 2
    tokens = next(iter(source_bytes.test_dataloader()))[0][:2]
    with torch.no_grad():
        assert torch.equal(fresh.model.eval()(input_ids=tokens).logits, module.model.eval()(input_ids=tokens).logits)
