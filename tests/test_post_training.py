"""Post-training quantization (static, calibrated) and dynamic quantization on real digits."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_compress import DynamicQuantization, PostTrainingQuantization
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.fx_quantization import QuantizationConfig
from lightning_compress.report import serialized_size, top1_accuracy

from conftest import quiet_trainer, run_train


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("trained")
    L.seed_everything(0)
    model = ImageClassifier()
    trainer = quiet_trainer(folder, [], 4)
    trainer.fit(model, datamodule=DigitsDataModule())
    trainer.save_checkpoint(folder / "trained.ckpt", weights_only=True)
    return folder / "trained.ckpt"


def _range(observer: str, range_method: str, values: torch.Tensor, percentile: float = 99.9) -> float:
    config = QuantizationConfig(observer=observer, range_method=range_method, percentile=percentile)
    instance = config.activation_observer()(dtype=torch.quint8, quant_min=0, quant_max=255)
    instance(values)
    scale, zero_point = instance.calculate_qparams()
    return float(scale) * (255 - int(zero_point))  # the largest representable value


def test_observers_and_range_methods_on_a_known_tensor():
    torch.manual_seed(0)
    values = torch.cat([torch.randn(200_000).abs(), torch.tensor([100.0])])  # half-normal plus one outlier
    full = _range("minmax", "max", values)
    assert full == pytest.approx(100.0, rel=1e-3)  # max keeps the outlier
    assert _range("moving_average_minmax", "max", values) == pytest.approx(100.0, rel=1e-3)
    assert _range("histogram", "max", values) == pytest.approx(100.0, rel=1e-3)
    assert _range("histogram", "percentile", values, 99.9) == pytest.approx(3.29, abs=0.1)  # half-normal 99.9%
    assert _range("histogram", "percentile", values, 99.0) == pytest.approx(2.58, abs=0.1)
    entropy = _range("histogram", "entropy", values)
    assert 3.0 < entropy < 0.5 * full  # KL drops the outlier but keeps the bulk of the distribution
    assert _range("histogram", "mse", values) <= full


def _range_ends(values: torch.Tensor) -> tuple[float, float]:
    """The smallest and largest values the entropy range represents after observing ``values``."""
    instance = QuantizationConfig(observer="histogram", range_method="entropy").activation_observer()(
        dtype=torch.quint8, quant_min=0, quant_max=255
    )
    instance(values)
    scale, zero_point = instance.calculate_qparams()
    return float(scale) * (0 - int(zero_point)), float(scale) * (255 - int(zero_point))


def test_entropy_range_of_signed_values_is_searched_on_their_magnitudes():
    torch.manual_seed(0)
    low, high = _range_ends(torch.cat([torch.randn(200_000), torch.tensor([-100.0, 100.0])]))
    assert -50 < low < -3 and 3 < high < 50  # both outliers dropped, the bulk of the normal kept, on both sides
    assert low == pytest.approx(-high, rel=0.05)  # one symmetric threshold, as TensorRT's calibrator chooses
    # digits pixels: background at -1, strokes at +1, grey edges between: folding must not clip either end
    pixels = torch.cat([torch.full((70_000,), -1.0), torch.full((20_000,), 1.0), torch.rand(10_000) * 2 - 1])
    low, high = _range_ends(pixels)
    assert low == pytest.approx(-1.0, abs=0.02) and high == pytest.approx(1.0, abs=0.02)


def test_entropy_range_clips_a_sparse_outlier_tail_at_the_end_of_the_bulk():
    """A known answer: a normal bulk (99.9% of it within 3.29, all of it within ~4.7) and 20 outliers spread
    over 5 to 30 in magnitude. The threshold must keep the bulk and drop the tail, on both sides for signed
    values; ``max`` would keep all 30 and the old upper-end-only search kept the negative tail."""
    torch.manual_seed(0)
    bulk = torch.randn(200_000)
    tail = (torch.rand(20) * 25 + 5) * torch.where(torch.rand(20) < 0.5, -1.0, 1.0)
    low, high = _range_ends(torch.cat([bulk.abs(), tail.abs()]))
    assert low == 0.0 and 3.29 < high < 7.5
    low, high = _range_ends(torch.cat([bulk, tail]))
    assert -7.5 < low < -3.29 and 3.29 < high < 7.5


def test_entropy_range_of_a_relu_output_is_not_shrunk_by_its_spike_of_zeros():
    """After a ReLU, half the values or more are exactly zero. Zero lies on the grid at any range, so the
    threshold must be the one the positive half alone gets: counted as it is, the spike shrank it with its
    size (to 3.0, 2.0 and 1.0 for these three, clipping a third of the bulk at the last)."""
    torch.manual_seed(0)
    positive = torch.cat([torch.randn(200_000).abs(), torch.tensor([8.0])])
    _, alone = _range_ends(positive)
    assert 3.29 < alone < 7.5
    for zeros in (50_000, 200_000, 400_000):
        low, high = _range_ends(torch.cat([torch.zeros(zeros), positive]))
        assert low == 0.0 and high == pytest.approx(alone, rel=0.15)
    low, high = _range_ends(-torch.cat([torch.zeros(200_000), positive]))  # all negative: the lower end is searched
    assert high == 0.0 and low == pytest.approx(-alone, rel=0.15)


def test_entropy_range_of_signed_values_is_not_shrunk_by_a_spike_of_zeros():
    """A ReLU6 shares its input's observer in torch.ao, which sees the signed pre-activation and the clamped
    output together: a spike of exact zeros in the middle of a signed distribution. The symmetric threshold
    must be the one the values without the spike get (with the spike counted, mobilenet_v2 lost 16 points)."""
    torch.manual_seed(0)
    signed = torch.cat([torch.randn(200_000), torch.tensor([-8.0, 8.0])])
    _, alone = _range_ends(signed)
    assert 3.29 < alone < 7.5
    for zeros in (70_000, 200_000):
        low, high = _range_ends(torch.cat([torch.zeros(zeros), signed]))
        assert high == pytest.approx(alone, rel=0.15) and low == pytest.approx(-alone, rel=0.15)


def test_entropy_range_of_discrete_values_keeps_the_whole_range():
    """The 17 grey levels of the digits images, normalised to [-1, 1] with the middle grey exactly zero: the
    whole range already puts each occupied bin on a level of its own, so nothing is clipped (the divergence,
    zero at any range for such a histogram, had clipped them to a tenth of their range)."""
    torch.manual_seed(0)
    greys = (torch.randint(0, 17, (100_000,)).float() - 8) / 8
    greys[:50_000] = torch.where(torch.rand(50_000) < 0.5, -1.0, 0.0)  # background and middle grey: spikes
    low, high = _range_ends(greys)
    assert low == pytest.approx(-1.0, abs=0.02) and high == pytest.approx(1.0, abs=0.02)


def test_ptq_from_a_checkpoint_without_training(tmp_path: Path, trained_checkpoint: Path):
    model = ImageClassifier(checkpoint=str(trained_checkpoint))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    ptq = PostTrainingQuantization(calibration_batches=8, export_format="none")
    trainer = quiet_trainer(tmp_path, [ptq], max_epochs=0)
    digits = DigitsDataModule()
    trainer.fit(model, datamodule=digits)
    assert trainer.global_step == 0 and ptq.calibrated_batches == 8
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())
    test = digits.test_dataloader()
    fp32, int8 = top1_accuracy(model, test), top1_accuracy(ptq.quantized_model, test)
    assert abs(fp32 - int8) <= 0.01  # per-channel weights and histogram ranges: within 1 point
    assert serialized_size(ptq.quantized_model) < 0.3 * serialized_size(model)


def test_dynamic_quantization_of_an_lstm(tmp_path: Path):
    L.seed_everything(0)
    model = ImageClassifier(architecture="lstm", architecture_options={"hidden_size": 128})
    dynamic = DynamicQuantization(backend="x86", export_format="torchscript")
    digits = DigitsDataModule()
    quiet_trainer(tmp_path, [dynamic], 2, limit_train_batches=10).fit(model, datamodule=digits)
    quantized = dynamic.quantized_model
    assert isinstance(quantized.net.lstm, torch.ao.nn.quantized.dynamic.LSTM)
    assert serialized_size(quantized) <= 0.3 * serialized_size(model)
    images = digits.test_set.tensors[0]
    with torch.no_grad():
        reference, output = model.eval()(images), quantized(images)
    assert (output - reference).abs().mean() <= 0.05 * reference.abs().mean()
    assert torch.jit.load(str(dynamic.export_path))(images[:4]).shape == (4, 10)


def test_dynamic_int8_under_inductor_keeps_an_lstm_float_and_names_it(tmp_path: Path, digits):
    """The torch.export engine has no int8 LSTM kernel: the network's Linear layer goes int8 and the LSTM stays
    float, listed, where torch.ao's engine quantizes both."""
    L.seed_everything(0)
    model = ImageClassifier(architecture="lstm", architecture_options={"hidden_size": 32})
    dynamic = DynamicQuantization(backend="x86_inductor", export_format="none")
    quiet_trainer(tmp_path, [dynamic], 1, limit_train_batches=5).fit(model, datamodule=digits)
    assert dynamic.float_layers == ["net.lstm"]
    int8, _ = dynamic.backend.layers_by_kind(dynamic.quantized_model.net)  # exported whole: names inside the network
    assert int8 == ["classifier"]
    images = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        reference, output = model.eval()(images), dynamic.quantized_model(images)
    assert (output - reference).abs().mean() <= 0.05 * reference.abs().mean()


def test_dynamic_int8_under_inductor_keeps_float_a_linear_whose_inputs_never_cross_zero(tmp_path: Path, digits):
    """Inductor's fused dynamic int8 Linear computes wrong on inputs wholly above zero (a sigmoid's, here) where
    its reference graph is right: that layer stays float, named; the other goes int8, and the model computes what
    the float one does."""
    L.seed_everything(0)
    model = ImageClassifier(architecture=nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10)))
    dynamic = DynamicQuantization(backend="x86_inductor", export_format="none")
    quiet_trainer(tmp_path, [dynamic], 1, limit_train_batches=5).fit(model, datamodule=digits)
    assert dynamic.float_layers == ["net.3"]
    assert dynamic.backend.layers_by_kind(dynamic.quantized_model.net) == (["1"], ["3"])
    images = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        reference, output = model.eval()(images), dynamic.quantized_model(images)
    assert (output - reference).abs().max() <= 0.02 * reference.abs().max()


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: PostTrainingQuantization(percentile=0.0), r"percentile=0.0 is invalid: it must lie in \(0, 100\]"),
        (lambda: PostTrainingQuantization(percentile=100.5), r"percentile=100.5 is invalid"),
        (
            lambda: PostTrainingQuantization(observer="minmax", range_method="entropy"),
            r"range_method='entropy' needs observer='histogram', not 'minmax'",
        ),
        (lambda: PostTrainingQuantization(calibration_batches=0), r"calibration_batches=0 is invalid"),
        (lambda: PostTrainingQuantization(range_method="kl"), r"range_method='kl' is unknown"),
    ],
)
def test_bad_settings_fail_at_construction(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


def test_dynamic_quantization_of_a_model_without_linear_or_lstm_fails_before_work(tmp_path: Path):
    class ConvOnly(ImageClassifier):
        def __init__(self):
            super().__init__(architecture=nn.Sequential(nn.Conv2d(1, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))

    trainer = quiet_trainer(tmp_path, [DynamicQuantization()], 1)
    with pytest.raises(ValueError, match="DynamicQuantization: the model has no Linear, LSTM or GRU layer"):
        trainer.fit(ConvOnly(), datamodule=DigitsDataModule())
    assert trainer.global_step == 0


def test_ptq_recipe_quantizes_a_checkpoint_in_one_command(tmp_path: Path, trained_checkpoint: Path):
    result = run_train(
        "+compress=ptq", f"model.checkpoint={trained_checkpoint}", "report.latency_runs=5", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "int8"} and rows["fp32"]["accuracy"] >= 0.95
    assert abs(rows["int8"]["accuracy_delta_points"]) <= 1.0 and rows["int8"]["size_ratio"] < 0.3
    assert "train/loss" not in (next(tmp_path.glob("csv/*/metrics.csv")).read_text().splitlines()[0])
    assert (tmp_path / "checkpoints" / "model_int8.pt2").is_file()


class _Fragile(nn.Module):
    """The trained CNN with one extra layer, ``fragile``, that computes exactly what the original did in float
    but falls apart under per-tensor int8 weights: next to its identity rows sit rows a thousand times
    larger whose outputs a large negative bias keeps at zero after the ReLU."""

    def __init__(self, trained: nn.Module) -> None:
        super().__init__()
        self.features, self.pool = trained.features, trained.pool
        width = trained.classifier.in_features
        self.fragile = nn.Linear(width, 2 * width)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(2 * width, trained.classifier.out_features)
        with torch.no_grad():
            self.fragile.weight.copy_(torch.cat([torch.eye(width), 1000 * torch.ones(width, width)]))
            self.fragile.bias.copy_(torch.cat([torch.zeros(width), torch.full((width,), -1e9)]))
            self.classifier.weight.zero_()
            self.classifier.weight[:, :width] = trained.classifier.weight
            self.classifier.bias.copy_(trained.classifier.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.relu(self.fragile(torch.flatten(self.pool(self.features(images)), 1))))


def test_sensitivity_names_the_fragile_layer_and_keeps_it_float(tmp_path: Path, trained_checkpoint: Path):
    trained = ImageClassifier(checkpoint=str(trained_checkpoint))
    model = ImageClassifier(architecture=_Fragile(trained.net))
    digits = DigitsDataModule()
    assert top1_accuracy(model, digits.test_dataloader()) == top1_accuracy(trained, digits.test_dataloader())
    ptq = PostTrainingQuantization(
        calibration_batches=4,
        backend="x86",
        per_channel_weights=False,
        observer="minmax",
        range_method="max",
        accuracy_budget=1.0,
        export_format="none",
        export_dir=str(tmp_path),
    )
    quiet_trainer(tmp_path, [ptq], max_epochs=0).fit(model, datamodule=digits)
    ranking = ptq.sensitivity["net"]["ranking"]
    assert ranking[0].layer == "fragile" and ranking[0].drop_points > 20
    assert all(result.drop_points < 2 for result in ranking[1:])
    assert ptq.float_layers == {"net": ["fragile"]}
    fragile = ptq.quantized_model.net.fragile  # kept float (fused with its ReLU), the rest int8
    assert any(type(module) is nn.Linear for module in fragile.modules())
    assert any(isinstance(module, torch.ao.nn.quantized.Linear) for module in ptq.quantized_model.net.modules())
    assert top1_accuracy(ptq.quantized_model, digits.test_dataloader()) >= top1_accuracy(model, digits.test_dataloader()) - 0.02
    assert ptq.sensitivity_plot.is_file()


def test_sensitivity_keeps_float_layers_when_one_layer_is_studied(digits):
    """``quantize(only=..., keep_float=...)`` honours both; Conv1d counts as a quantizable layer, as in QAT."""
    from torch.ao.nn.quantized import Conv1d as Conv1dInt8
    from torch.ao.nn.quantized import Linear as LinearInt8

    from lightning_compress import sensitivity
    from lightning_compress.fx_quantization import QuantizationConfig

    network = nn.Sequential(nn.Conv1d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    assert sensitivity.quantizable_layers(network) == ["0", "2", "4"]
    images = digits.train_set.tensors[0][:64].reshape(64, 8, 8)
    calibration = [((images,), {})]
    only_last = sensitivity.quantize(network, QuantizationConfig(), calibration, only="4", keep_float=("2",))
    assert isinstance(only_last.get_submodule("4"), LinearInt8)
    assert not isinstance(only_last.get_submodule("2"), LinearInt8)
    assert not isinstance(only_last.get_submodule("0"), Conv1dInt8)
    both = sensitivity.quantize(network, QuantizationConfig(), calibration, keep_float=("4",))
    assert isinstance(both.get_submodule("0"), Conv1dInt8) and not isinstance(both.get_submodule("4"), LinearInt8)


def test_dynamic_quantization_leaves_frozen_children_alone(tmp_path: Path, digits):
    """Only the module's trained networks are quantized: a frozen child (a teacher, say) stays as it is."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinearInt8

    class WithFrozenHelper(ImageClassifier):
        def __init__(self):
            super().__init__(architecture="cnn")
            self.helper = nn.Linear(10, 10).requires_grad_(False)

    dynamic = DynamicQuantization(backend="x86", export_format="none")
    model = WithFrozenHelper()
    quiet_trainer(tmp_path, [dynamic], 1, limit_train_batches=2, limit_val_batches=0).fit(model, datamodule=digits)
    assert isinstance(dynamic.quantized_model.net.classifier, DynamicLinearInt8)
    assert type(dynamic.quantized_model.helper) is nn.Linear


def test_skip_keeps_layers_float_by_name_or_type_in_ptq_and_dynamic_quantization(tmp_path: Path, digits):
    """The same skip as QAT's and pruning's: submodule names and layer types."""
    L.seed_everything(0)
    model = ImageClassifier()
    quiet_trainer(tmp_path, [], 1, limit_train_batches=5).fit(model, datamodule=digits)
    by_name = PostTrainingQuantization(calibration_batches=2, backend="x86", skip=["net.classifier"], export_format="none")
    by_type = PostTrainingQuantization(calibration_batches=2, backend="x86", skip=["torch.nn.Conv2d"], export_format="none")
    for ptq in (by_name, by_type):
        quiet_trainer(tmp_path, [ptq], 0).fit(model, datamodule=digits)
    assert type(by_name.quantized_model.net.classifier) is nn.Linear
    int8_layers = {type(layer).__module__ for layer in by_type.quantized_model.net.modules()}
    assert "torch.ao.nn.quantized.modules.linear" in int8_layers
    assert not any(type(layer) is nn.Conv2d for layer in by_name.quantized_model.net.modules())
    assert any(type(layer) is nn.Conv2d for layer in by_type.quantized_model.net.modules())

    lstm = ImageClassifier(architecture="lstm", architecture_options={"hidden_size": 32})
    dynamic = DynamicQuantization(backend="x86", export_format="none", skip=["net.classifier"])
    quiet_trainer(tmp_path, [dynamic], 1, limit_train_batches=2).fit(lstm, datamodule=digits)
    assert isinstance(dynamic.quantized_model.net.lstm, torch.ao.nn.quantized.dynamic.LSTM)
    assert type(dynamic.quantized_model.net.classifier) is nn.Linear
    only_head = DynamicQuantization(backend="x86", export_format="none", modules=["net.classifier"])
    quiet_trainer(tmp_path, [only_head], 1, limit_train_batches=2).fit(lstm, datamodule=digits)
    assert type(only_head.quantized_model.net.lstm) is nn.LSTM
    assert isinstance(only_head.quantized_model.net.classifier, torch.ao.nn.quantized.dynamic.Linear)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"backend": "x86_ao"},
            r"backend='x86_ao' is unknown: allowed values are \['x86_inductor', 'x86', 'fbgemm', 'qnnpack'\]",
        ),
        (
            {"backend": "x86_inductor", "export_format": "torchscript"},
            r"export_format='torchscript': only 'torchscript' \(backend='x86'\)",
        ),
        (
            {"backend": "x86", "export_format": "torch_export"},
            r"export_format='torch_export': only 'torchscript' \(backend='x86'\), 'torch_export'",
        ),
    ],
)
def test_dynamic_quantization_refuses_a_backend_or_format_it_cannot_use_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        DynamicQuantization(**options)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: PostTrainingQuantization(skip=["net.head"]), r"skip='net.head' names no submodule"),
        (lambda: DynamicQuantization(modules=["net.head"]), r"modules='net.head' names no submodule"),
        (lambda: DynamicQuantization(skip=["torch.nn.Nope"]), r"skip='torch.nn.Nope' names no importable module type"),
    ],
)
def test_names_that_match_nothing_fail_before_training(tmp_path: Path, digits, factory, message):
    with pytest.raises(ValueError, match=message):
        quiet_trainer(tmp_path, [factory()], 1).fit(ImageClassifier(architecture="lstm"), datamodule=digits)
