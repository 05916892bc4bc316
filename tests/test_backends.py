"""The quantization backend seam: torch.ao FX and torchao pt2e behind one interface, chosen by config type.

Each backend prepares, trains, converts and exports the default CNN (and resnet18, slow) on digits; the
exported program, loaded in a process that never imports this package, predicts what the converted model
does. The pt2e backend's checkpoints restore for ``trainer.test(ckpt_path=...)`` and ``load_from_checkpoint``.
"""

from __future__ import annotations

import ast
import importlib.util
import itertools
import re
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_compress import PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.fx_quantization import FxBackend, QuantizationConfig
from lightning_compress.pt2e_quantization import CompiledProgram, ExportedPart, InductorBackend, InductorQuantizationConfig
from lightning_compress.quantization_backend import backend_for, config_from_state
from lightning_compress.report import count_parameters, top1_accuracy

from conftest import ROOT, quiet_trainer

# Loads an export with torch alone (plus the import torchao documents for pt2e programs), in a process that
# never imports this package, and prints its predictions.
LOADER = """
import sys, torch
path, images = sys.argv[1], torch.load(sys.argv[2])
if path.endswith(".pt2"):
    import torchao.quantization.pt2e  # defines the quantize ops of pt2e programs
    model = torch.export.load(path).module()
else:
    model = torch.jit.load(path)
print(" ".join(map(str, model(images).argmax(1).tolist())))
assert "lightning_compress" not in sys.modules
"""


def _predictions_of_export(path: Path, images: torch.Tensor, tmp_path: Path) -> list[int]:
    torch.save(images, tmp_path / "images.pt")
    result = subprocess.run(
        [sys.executable, "-c", LOADER, str(path), str(tmp_path / "images.pt")], capture_output=True, text=True, check=True
    )
    return [int(label) for label in result.stdout.split()]


def _fit(
    tmp_path: Path,
    digits,
    architecture: str = "cnn",
    epochs: int = 3,
    callbacks: list = (),
    batches: int | None = None,
    **qat_options,
):
    L.seed_everything(0)
    model = ImageClassifier(architecture=architecture, in_channels=digits.num_channels)
    qat = QuantizationAwareTraining(start_epoch=1, export_dir=str(tmp_path), **qat_options)
    trainer = quiet_trainer(tmp_path, [qat, *callbacks], epochs, limit_val_batches=0, limit_train_batches=batches)
    trainer.fit(model, datamodule=digits)
    return trainer, model, qat


def test_backends_are_chosen_by_config_type():
    assert isinstance(backend_for(QuantizationConfig()), FxBackend)
    assert isinstance(backend_for(InductorQuantizationConfig()), InductorBackend)
    with pytest.raises(TypeError, match="no quantization backend handles str"):
        backend_for("x86")


@pytest.mark.slow  # 30 s: Inductor compiles the int8 program
def test_pt2e_qat_trains_converts_and_exports_a_program_that_runs_without_this_package(tmp_path: Path, digits):
    trainer, model, qat = _fit(tmp_path, digits, freeze_bn_epoch=2, freeze_observer_epoch=2, backend="x86_inductor")
    assert qat.prepared_names == ["net"] and isinstance(model.net, ExportedPart)
    assert qat.parts[0].int8_layers == 4 and qat.parts[0].float_layers == []  # three convolutions and the classifier
    model.net.train()  # frozen BatchNorm normalizes with its running statistics in training too
    batch_norms = [node for node in model.net.graph.graph.nodes if node.target is torch.ops.aten.batch_norm.default]
    assert batch_norms and model.net.batch_norm_frozen and not any(node.args[5] for node in batch_norms)

    images = digits.test_set.tensors[0]
    with torch.no_grad():
        fake_quant, int8 = model.eval()(images), qat.quantized_model(images)
    assert (int8.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.99
    # the logits are float (the classifier's output is not quantized): within 1% of their range on average
    assert (int8 - fake_quant).abs().mean() <= 0.01 * (fake_quant.max() - fake_quant.min())
    assert top1_accuracy(qat.quantized_model, digits.test_dataloader()) >= 0.85

    # int8 weights, BatchNorm folded, no fp32 copy of a weight left behind
    total, _ = count_parameters(qat.quantized_model)
    batch_norm = sum(m.num_features for m in qat.float_model(model).modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert total == count_parameters(model)[0] - batch_norm  # gamma and beta folded into one bias per channel
    program_state = qat.quantized_model.net.program.state_dict().values()
    assert not [tensor for tensor in program_state if tensor.dtype == torch.float32 and tensor.dim() >= 2]

    path = qat.export_paths["torch_export"]
    assert path == tmp_path / "model_int8.pt2" and set(qat.export_paths) == {"torch_export"}
    with torch.no_grad():
        expected = qat.quantized_model.net.program(images[:64]).argmax(1).tolist()
    assert _predictions_of_export(path, images[:64], tmp_path) == expected


@pytest.mark.slow  # 22 s (AVX-512) to 39 s (AVX2): the fast suite keeps pt2e's QAT, export and bad-input tests
def test_pt2e_checkpoints_restore_for_test_and_load_from_checkpoint(tmp_path: Path, digits):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    _, model, qat = _fit(
        tmp_path, digits, callbacks=[checkpoint], freeze_observer_epoch=2, backend="x86_inductor", export_format="none"
    )
    state = torch.load(checkpoint.last_model_path, weights_only=True)["callbacks"]
    (saved,) = [value for key, value in state.items() if key.startswith("QuantizationAwareTraining")]
    assert (saved["config_type"], saved["config_version"]) == ("InductorQuantizationConfig", InductorQuantizationConfig.version)
    assert isinstance(config_from_state(saved), InductorQuantizationConfig)

    images = digits.test_set.tensors[0]
    with torch.no_grad():
        expected = model.eval()(images)
    restored = ImageClassifier.load_from_checkpoint(checkpoint.last_model_path)
    assert isinstance(restored.net, ExportedPart)
    with torch.no_grad():
        assert torch.equal(restored.eval()(images), expected)

    tester = QuantizationAwareTraining(start_epoch=1, backend="x86_inductor", export_format="none")
    fresh = ImageClassifier()
    (result,) = quiet_trainer(tmp_path, [tester]).test(
        fresh, datamodule=digits, ckpt_path=checkpoint.last_model_path, verbose=False
    )
    assert result["test/acc"] == pytest.approx(top1_accuracy(model, digits.test_dataloader()))

    saved["config_version"] = 99
    newest = InductorQuantizationConfig.version
    with pytest.raises(
        ValueError, match=f"InductorQuantizationConfig is version 99; this lightning-compress reads up to {newest}"
    ):
        config_from_state(saved)


@pytest.mark.slow  # compiles an int8 model: the fast suite keeps the QAT-and-export and bad-input tests
def test_pt2e_post_training_quantization_exports_a_program(tmp_path: Path, digits):
    L.seed_everything(0)
    model = ImageClassifier()
    quiet_trainer(tmp_path, [], 3, limit_val_batches=0).fit(model, datamodule=digits)
    ptq = PostTrainingQuantization(calibration_batches=8, backend="x86_inductor", export_dir=str(tmp_path))
    quiet_trainer(tmp_path, [ptq], 0).fit(model, datamodule=digits)
    float_accuracy = top1_accuracy(model, digits.test_dataloader())
    assert abs(top1_accuracy(ptq.quantized_model, digits.test_dataloader()) - float_accuracy) <= 0.02
    assert isinstance(ptq.quantized_model.net, CompiledProgram)
    images = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        expected = ptq.quantized_model.net.program(images).argmax(1).tolist()
    assert _predictions_of_export(ptq.export_paths["torch_export"], images, tmp_path) == expected


@pytest.mark.slow  # compiles mobilenet_v2 in int8
def test_pt2e_depthwise_convolutions_compute_in_int8_what_the_reference_graph_does(tmp_path: Path, digits):
    """FBGEMM's depthwise kernels saturate 16-bit sums even with VNNI (the FX backend gives them 7-bit weights);
    oneDNN's, which the pt2e backend runs under Inductor, must compute what the converted graph does with the
    grid the backend chose on this CPU: mobilenet_v2's depthwise convolutions have up to 960 channels, each with
    its weights on the full grid and activations from real images."""
    L.seed_everything(0)
    model = ImageClassifier(architecture="mobilenet_v2", in_channels=digits.num_channels)
    quiet_trainer(tmp_path, [], 1, limit_val_batches=0, limit_train_batches=10).fit(model, datamodule=digits)
    ptq = PostTrainingQuantization(calibration_batches=4, backend="x86_inductor", export_format="none")
    quiet_trainer(tmp_path, [ptq], 0).fit(model, datamodule=digits)
    convolutions = [node for node in ptq.quantized_model.net.program.graph.nodes if node.target is torch.ops.aten.conv2d.default]
    assert sum(1 for node in convolutions if len(node.args) > 6 and node.args[6] > 1) >= 17  # groups > 1: every block's
    images = digits.test_set.tensors[0][:128]
    with torch.no_grad():
        reference, int8 = ptq.quantized_model.net.program(images), ptq.quantized_model(images)
    assert (int8.argmax(1) == reference.argmax(1)).float().mean() >= 0.99
    assert (int8 - reference).abs().mean() <= 0.01 * (reference.max() - reference.min())


class _Branchy(torch.nn.Module):
    """Python control flow on a tensor's value: strict ``torch.export`` refuses it, its children export."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
        self.head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.stem(images)
        if features.mean() > 10.0:
            features = features / 2
        return self.head(features)


@pytest.mark.slow  # compiles an int8 model: the fast suite keeps the QAT-and-export and bad-input tests
def test_pt2e_part_that_fails_strict_export_is_named_and_split(tmp_path: Path, digits):
    L.seed_everything(0)
    model = ImageClassifier()
    model.net = _Branchy()
    qat = QuantizationAwareTraining(start_epoch=1, backend="x86_inductor", export_format="none")
    quiet_trainer(tmp_path, [qat], 2, limit_val_batches=0, limit_train_batches=5).fit(model, datamodule=digits)
    split = qat.parts[0]
    assert split.name == "net" and not split.quantized and split.reason.startswith("split into its children")
    assert qat.prepared_names == ["net.stem", "net.head"]
    assert sum(part.int8_layers for part in qat.parts if part.quantized) == 2


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"backend": "x86", "export_format": "torch_export"},
            r"export_format='torch_export' is not written by backend='x86'.*needs backend='x86_inductor'",
        ),
        (
            {"backend": "x86_inductor", "export_format": "torchscript"},
            r"export_format='torchscript' is not written by backend='x86_inductor'",
        ),
        ({"backend": "x86_inductor", "weight_bits": 4}, r"weight_bits=4 is not supported by backend='x86_inductor'"),
        (
            {"backend": "x86_inductor", "observer": "minmax"},
            r"observer='minmax' is not supported by backend='x86_inductor' \(allowed: \['moving_average_minmax', 'histogram'\]",
        ),
    ],
)
def test_settings_a_backend_cannot_honour_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**options)


def test_pt2e_observers_are_those_of_its_quantizer():
    with pytest.raises(
        ValueError, match=r"backend='x86_inductor' observes quantization-aware training with observer='moving_average_minmax'"
    ):
        QuantizationAwareTraining(backend="x86_inductor", observer="histogram")  # PTQ's, not QAT's
    with pytest.raises(ValueError, match=r"observes post-training quantization with observer='histogram', range_method='mse'"):
        PostTrainingQuantization(backend="x86_inductor", observer="moving_average_minmax", range_method="max")


def _int8_digits_cnn(digits, channels: int) -> tuple[CompiledProgram, torch.Tensor]:
    """The default CNN's int8 program from the pt2e backend (not compiled yet), observed on digits images given
    ``channels`` channels, and the test images so given."""
    torch.manual_seed(0)
    train, test = (images.expand(-1, channels, -1, -1) for images in (digits.train_set.tensors[0], digits.test_set.tensors[0]))
    backend = backend_for(InductorQuantizationConfig())
    backend.activate()
    prepared = backend.prepare_qat(ImageClassifier(in_channels=channels).net.train(), (train[:8],), {}, [], []).eval()
    backend.set_fake_quant(prepared, enabled=False)
    with torch.no_grad():
        for batch in train[:64].split(16):
            prepared(batch)
    return backend.convert(prepared), test


def _graphs_compiled_per_call(int8: CompiledProgram, images: torch.Tensor, batches: tuple[int, ...]) -> list[int]:
    """Run ``int8`` at each batch size, checking it against its converted graph; the count of graphs compiled so far
    after each call."""
    from torch._dynamo.utils import counters

    graphs = []
    for batch in batches:
        with torch.no_grad():
            output, reference = int8(images[:batch]), int8.program(images[:batch])
        assert torch.allclose(output, reference, atol=1e-3 * reference.abs().max().item())
        graphs.append(counters["stats"]["unique_graphs"])
    return graphs


def test_the_int8_program_compiles_once_for_every_batch_size_past_the_first(digits):
    """Batch 1 compiles on its own (Dynamo specializes it); the next batch size compiles one graph with the batch
    symbolic, which the sizes after it reuse (Inductor may split the range where a kernel depends on the size:
    on the digits CNN at 16 and up, which this test stays below). Each computes what the converted graph does.
    Grayscale images compile per batch size (see ``CompiledProgram``), without a warning: the user did nothing
    wrong."""
    int8, images = _int8_digits_cnn(digits, channels=3)
    graphs = _graphs_compiled_per_call(int8, images, (1, 3, 5, 7, 11, 2, 1))
    assert int8.symbolic_batch
    assert graphs[1] == graphs[0] + 1  # the second batch size compiled once more ...
    assert graphs[-1] == graphs[1]  # ... and no size after it did

    grayscale, images = _int8_digits_cnn(digits, channels=1)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        graphs = _graphs_compiled_per_call(grayscale, images, (1, 3, 5, 3))
    assert not grayscale.symbolic_batch and not [warning for warning in said if "batch size" in str(warning.message)]
    assert graphs[2] == graphs[1] + 1 and graphs[3] == graphs[2]  # one graph per batch size, each kept


def test_calls_that_a_compiled_graph_fits_run_it_without_the_settings_of_a_compile(digits, monkeypatch):
    """The settings a compile needs (Inductor's freezing, Dynamo's dimension and graph limits), entered on every
    call, took a small CNN's int8 forward a tenth of its time: a call that a graph compiled before fits runs it
    without them; a call that would compile (batch 1, then the first batch size above 1) still gets them."""
    from lightning_compress import compat

    entered = []
    freezing = compat.inductor_freezing
    monkeypatch.setattr(compat, "inductor_freezing", lambda: entered.append(True) or freezing())
    int8, images = _int8_digits_cnn(digits, channels=3)
    graphs = _graphs_compiled_per_call(int8, images, (1, 3, 1, 3, 5, 7))
    assert len(entered) == 2 and graphs[-1] == graphs[1]


@pytest.mark.slow
def test_a_program_compiled_per_batch_size_compiles_past_dynamos_eight_graphs(digits):
    """Dynamo compiles a function at most 8 times (``recompile_limit``) and then runs it eagerly: an int8 graph's
    reference ops, many times slower. A program compiled per batch size (grayscale images) compiles a graph for each
    of twelve sizes, and every size seen before takes its graph again."""
    grayscale, images = _int8_digits_cnn(digits, channels=1)
    sizes = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12)
    graphs = _graphs_compiled_per_call(grayscale, images, sizes + (3, 12))
    assert not grayscale.symbolic_batch
    assert [after - before for before, after in itertools.pairwise(graphs)] == [1] * (len(sizes) - 1) + [0, 0]


def test_the_int8_program_compiles_per_batch_size_where_a_symbolic_batch_fails(digits, monkeypatch):
    """Where Dynamo or Inductor cannot compile the graph for a symbolic batch, the program says so once and compiles
    for each batch size: the user's call still gets the int8 result. The failure is made real: a dimension that
    the graph fixes (the image's channels) marked as one that must stay symbolic."""
    from lightning_compress import pt2e_quantization

    def channels_symbolic(args, kwargs, sequence):
        for tensor in args:
            torch._dynamo.mark_dynamic(tensor, 1)

    monkeypatch.setattr(pt2e_quantization, "_mark_symbolic", channels_symbolic)
    int8, images = _int8_digits_cnn(digits, channels=3)
    with pytest.warns(UserWarning, match=r"failed \(Constraints violated .*\); it compiles for each batch size instead"):
        with torch.no_grad():
            output = int8(images[:4])
    assert not int8.symbolic_batch
    with torch.no_grad(), warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        assert torch.allclose(output, int8.program(images[:4]), atol=1e-3 * output.abs().max().item())
        assert torch.allclose(int8(images[:6]), int8.program(images[:6]), atol=1e-3 * output.abs().max().item())
    assert not [warning for warning in later if "batch size" in str(warning.message)]  # said once


def test_an_exported_part_trains_again_when_lightning_restores_modes_by_attribute():
    """After validation Lightning sets each module's ``training`` attribute back instead of calling ``.train()``: the
    exported graph must then use batch statistics again (it kept running ones, and QAT lost 6 points on digits)."""
    L.seed_everything(0)
    network = ImageClassifier().net
    images = torch.randn(8, 1, 8, 8)
    part = backend_for(InductorQuantizationConfig()).prepare_qat(network, (images,), {}, [], [])
    part.eval()
    for module in part.modules():  # what lightning.pytorch.utilities.model_helpers._ModuleMode.restore does
        module.training = True
    running = {name: buffer.clone() for name, buffer in part.named_buffers() if name.endswith("running_mean")}
    part(images)
    assert running and all(not torch.equal(buffer, running[name]) for name, buffer in part.named_buffers() if name in running)
    for module in part.modules():
        module.training = False
    frozen = {name: buffer.clone() for name, buffer in part.named_buffers() if name in running}
    part(images)
    assert all(torch.equal(buffer, frozen[name]) for name, buffer in part.named_buffers() if name in running)


def test_an_exported_part_counts_batches_only_while_its_batch_norm_trains():
    """Export keeps BatchNorm's ``num_batches_tracked += 1`` apart from the BatchNorm op: it counted evaluations too,
    so a run resumed from a checkpoint (fewer evaluations since) ended with other counters than the uninterrupted
    one. It counts as eager BatchNorm does: in training, not in evaluation nor once BatchNorm is frozen."""
    L.seed_everything(0)
    images = torch.randn(8, 1, 8, 8)
    backend = backend_for(InductorQuantizationConfig())
    part = backend.prepare_qat(ImageClassifier().net, (images,), {}, [], [])

    def counts() -> list[int]:
        return [int(buffer) for name, buffer in part.named_buffers() if name.endswith("num_batches_tracked")]

    start = counts()
    assert len(start) == 3
    part.eval()(images)
    assert counts() == start
    part.train()(images)
    assert counts() == [count + 1 for count in start]
    backend.freeze_batch_norm(part)
    part(images)
    assert counts() == [count + 1 for count in start]


@pytest.mark.slow  # 30 s each order: three epochs, then Inductor compiles the int8 program
@pytest.mark.parametrize("qat_first", [True, False], ids=["qat-listed-first", "pruning-listed-first"])
def test_pt2e_qat_and_magnitude_pruning_in_one_fit_keep_the_zeros_in_the_int8_model(tmp_path: Path, digits, qat_first):
    """The exported graph holds the network's weights under ``graph.``: pruning chooses its layers by kind in QAT's
    float model, masks the live weights through QAT's names (masks keep the float names, as checkpoints do), and the
    pruned zeros stay zero in the int8 model."""
    from lightning_compress import MagnitudePruning

    L.seed_everything(0)
    model = ImageClassifier()
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=0, end_epoch=2, update_every=5, export_format="none", plot=False)
    qat = QuantizationAwareTraining(start_epoch=1, backend="x86_inductor", export_format="none")
    callbacks = [qat, pruning] if qat_first else [pruning, qat]
    quiet_trainer(tmp_path, callbacks, 3, limit_val_batches=0).fit(model, datamodule=digits)
    layers = [name for name, layer in ImageClassifier().named_modules() if isinstance(layer, torch.nn.Conv2d | torch.nn.Linear)]
    assert sorted(pruning.masks) == sorted(f"{name}.weight" for name in layers)
    live = dict(model.named_parameters())
    for name, mask in pruning.masks.items():
        weight = live[qat.parameter_name(name)]
        assert qat.parameter_name(name).startswith("net.graph.") and torch.equal(weight == 0, ~mask), name
    assert pruning.history[-1]["measured"] >= 0.6
    int8_weights = [tensor for tensor in qat.quantized_model.net.state_dict().values() if tensor.dtype == torch.int8]
    zeros, total = sum(int((tensor == 0).sum()) for tensor in int8_weights), sum(tensor.numel() for tensor in int8_weights)
    assert len(int8_weights) == 4 and zeros / total >= 0.6
    float_weights = dict(pruning.pruned_model.named_parameters())
    assert not any(isinstance(module, ExportedPart) for module in pruning.pruned_model.modules())
    assert all(torch.equal(float_weights[name] == 0, ~mask) for name, mask in pruning.masks.items())
    assert top1_accuracy(qat.quantized_model, digits.test_dataloader()) >= 0.9


def test_a_backend_whose_package_is_missing_names_it(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ValueError, match=r"backend='x86_inductor' needs the 'torchao' package"):
        QuantizationAwareTraining(backend="x86_inductor")


def test_only_the_backend_modules_name_a_quantization_library():
    backend_modules = {
        "fx_quantization.py",
        "pt2e_quantization.py",
        "lowbit_quantization.py",
        "module_swap.py",
        "quantization_backend.py",
        "compat.py",  # the one module that touches private torch internals (the decomposed quantize ops)
    }
    naming = {
        path.name for path in (ROOT / "lightning_compress").glob("*.py") if re.search(r"torch\.ao|torchao", path.read_text())
    }
    assert naming <= backend_modules, naming - backend_modules


def test_no_backend_module_imports_another():
    """Each engine can go on its own (FX graph mode is deprecated upstream): what they share lives in
    ``quantization_config``, ``quantization_backend`` and ``module_swap``, never in one of them."""
    engines = {"fx_quantization", "pt2e_quantization", "lowbit_quantization"}
    for engine in engines:
        tree = ast.parse((ROOT / "lightning_compress" / f"{engine}.py").read_text())
        imported = {
            alias.name.rpartition(".")[2] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        imported |= {
            name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_compress")
            for name in [node.module.rpartition(".")[2], *(alias.name for alias in node.names)]
        }
        assert not imported & (engines - {engine}), (engine, imported & engines)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", "x86_inductor"])
def test_resnet18_exports_run_without_this_package(tmp_path: Path, backend: str):
    digits = DigitsDataModule(batch_size=64, image_size=32, channels=3)
    digits.setup()
    trainer, model, qat = _fit(tmp_path, digits, "resnet18", batches=8, backend=backend)
    assert qat.parts[0].int8_layers == 21  # 20 convolutions and the classifier
    images = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        fake_quant, int8 = model.eval()(images), qat.quantized_model(images)
    assert (int8.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.95
    exported = qat.export_paths["torch_export" if backend == "x86_inductor" else "torchscript"]
    eager = qat.quantized_model.net.program if backend == "x86_inductor" else qat.quantized_model
    with torch.no_grad():
        assert _predictions_of_export(exported, images, tmp_path) == eager(images).argmax(1).tolist()


class _Attention(torch.nn.Module):
    """One attention as transformers write it (projections, view and transpose into heads, the fused op); with
    ``key_is_value`` the key projection's heads are also the value."""

    def __init__(self, key_is_value: bool = False) -> None:
        super().__init__()
        self.query, self.key, self.value = (torch.nn.Linear(16, 16) for _ in range(3))
        self.key_is_value = key_is_value

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape

        def heads(layer: torch.nn.Linear) -> torch.Tensor:
            return layer(tokens).view(batch, length, 2, 8).transpose(1, 2)

        key = heads(self.key)
        value = key if self.key_is_value else heads(self.value)
        attended = torch.nn.functional.scaled_dot_product_attention(heads(self.query), key, value)
        return attended.transpose(1, 2).reshape(batch, length, 16)


def _attention_fake_quants(prepared: ExportedPart) -> list:
    """The fake-quant modules (or None) that the query, key and value of the graph's attention come through."""
    graph = prepared.graph
    [attention] = [node for node in graph.graph.nodes if node.target is torch.ops.aten.scaled_dot_product_attention.default]
    found = []
    for node in attention.args[:3]:
        while node.op == "call_function" and node.target in (torch.ops.aten.transpose.int, torch.ops.aten.view.default):
            node = node.args[0]
        found.append(graph.get_submodule(node.target) if node.op == "call_module" else None)
    return found


@pytest.mark.parametrize(
    ("key_is_value", "skip", "quantized"),
    [(False, [], (True, True, False)), (False, ["query"], (False, True, False)), (True, [], (True, False, False))],
    ids=["query-and-key", "query-skipped", "key-is-value"],
)
def test_pt2e_quantizes_attentions_query_and_key_centred_on_the_grid_it_converts_to(
    key_is_value: bool, skip: list[str], quantized: tuple[bool, bool, bool]
):
    """Query and key, each after its projection, on a grid centred on zero (zero-point 128), trained by a fake-quant
    whose scale is the one conversion computes (torchao's fused kernel trains max/127 where conversion takes
    max/127.5); never the value (a key that is also the value stays float: one observer would quantize both), and
    not behind a skipped projection."""
    torch.manual_seed(0)
    tokens = torch.randn(4, 5, 16)
    backend = InductorBackend(InductorQuantizationConfig())
    prepared = backend.prepare_qat(_Attention(key_is_value), (tokens,), {}, skip, [])
    backend.set_observers(prepared, True)
    backend.set_fake_quant(prepared, True)
    prepared(tokens)
    fake_quants = _attention_fake_quants(prepared)
    assert tuple(fake_quant is not None for fake_quant in fake_quants) == quantized
    for fake_quant in filter(None, fake_quants):
        scale, zero_point = fake_quant.calculate_qparams()
        assert type(fake_quant).__name__ == "FakeQuantize" and int(zero_point) == 128
        assert torch.equal(fake_quant.scale, scale) and int(fake_quant.zero_point) == 128
