import json
import time

import pytest
import torch
from torch import nn

from lightning_compress.report import CompressionReport, count_parameters, latency_ms, serialized_size, top1_accuracy


def test_count_parameters_counts_zeros_exactly():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0].zero_()
        layer.bias.zero_()
    assert count_parameters(layer) == (15, 8)


def test_count_parameters_sees_quantized_packed_weights():
    layer = nn.Linear(256, 128)
    with torch.no_grad():
        layer.weight[:32].zero_()
    quantized = torch.ao.quantization.quantize_dynamic(nn.Sequential(layer), {nn.Linear}, dtype=torch.qint8)
    assert sum(p.numel() for p in quantized.parameters()) == 0  # what a naive count would report
    total, nonzero = count_parameters(quantized)
    assert total == 256 * 128 + 128
    # zeros are counted on the dequantized values: the pruned rows, plus weights that rounded to zero
    weight, bias = quantized[0]._weight_bias()
    assert nonzero == int(torch.count_nonzero(weight.dequantize())) + int(torch.count_nonzero(bias))
    assert 0.9 * 96 * 256 <= nonzero <= 96 * 256 + 128
    assert serialized_size(quantized) < 0.3 * serialized_size(nn.Sequential(layer))


def test_report_ratios_against_fp32(digits, tmp_path):
    big, small = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        small[1].weight[:, 32:].zero_()
    loader = digits.test_dataloader()
    example = next(iter(loader))[0][:1]
    report = CompressionReport.from_models({"fp32": big, "pruned": small}, loader, example, runs=5, warmup=1)
    fp32, pruned = report.rows()
    assert fp32["speedup"] == 1.0 and fp32["size_ratio"] == 1.0
    assert pruned["nonzero_ratio"] == pytest.approx((320 + 10) / 650)
    assert pruned["accuracy"] == top1_accuracy(small, loader)
    assert pruned["accuracy_delta_points"] == pytest.approx(100 * (pruned["accuracy"] - fp32["accuracy"]))
    assert report.settings["threads"] == 1 and report.settings["input_shape"] == [1, 1, 8, 8]
    report.save(tmp_path / "report.json")
    assert json.loads((tmp_path / "report.json").read_text())["rows"][1]["name"] == "pruned"


def test_measuring_restores_threads_mode_and_determinism(digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).train()
    threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    try:
        CompressionReport.from_models({"fp32": model}, digits.test_dataloader(), torch.randn(1, 1, 8, 8), runs=2)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert model.training and torch.get_num_threads() == threads


def test_a_users_callback_that_reports_models_gets_its_rows(digits, tmp_path):
    import lightning as L

    from lightning_compress import MagnitudePruning, QuantizationAwareTraining
    from lightning_compress.app.models import ImageClassifier
    from lightning_compress.report import ReportsModels, models_to_report

    class HalfWidth(L.Callback):  # no base class needed: the method is the contract
        def report_models(self) -> dict[str, nn.Module]:
            return {"half width": nn.Sequential(nn.Flatten(), nn.Linear(64, 10))}

    assert isinstance(HalfWidth(), ReportsModels) and not isinstance(L.Callback(), ReportsModels)
    assert isinstance(QuantizationAwareTraining(), ReportsModels) and isinstance(MagnitudePruning(), ReportsModels)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=0,
        callbacks=[HalfWidth()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    model = ImageClassifier(architecture="cnn")
    trainer.fit(model, datamodule=digits)
    models = models_to_report(trainer, model)
    assert list(models) == ["fp32", "half width"] and models["fp32"] is model


def test_latency_at_the_deployment_resolution_for_the_models_that_run_there(digits):
    from lightning_compress.app.models import SmallCNN

    torch.manual_seed(0)
    wide, narrow = SmallCNN(widths=(32, 64)).eval(), SmallCNN(widths=(8, 16)).eval()
    fixed_size = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()  # 8x8 inputs only
    example = digits.test_dataloader().dataset.tensors[0][:1]
    deployment = torch.nn.functional.interpolate(example, size=(64, 64), mode="bilinear")
    report = CompressionReport.from_models(
        {"fp32": wide, "narrow": narrow, "fixed": fixed_size},
        digits.test_dataloader(),
        example,
        runs=5,
        warmup=1,
        deployment_input=deployment,
    )
    rows = {row["name"]: row for row in report.rows()}
    assert report.settings["deployment_input_shape"] == [1, 1, 64, 64]
    assert rows["fixed"]["deployment_latency_ms"] is None and "deployment_speedup" not in rows["fixed"]
    assert rows["narrow"]["deployment_latency_ms"] > 0 and rows["fp32"]["deployment_speedup"] == 1.0
    # 64x more pixels: each network's time grows, and the narrow one's share of the work shows
    assert rows["fp32"]["deployment_latency_ms"] > rows["fp32"]["latency_ms"]
    assert rows["narrow"]["deployment_speedup"] == pytest.approx(
        rows["fp32"]["deployment_latency_ms"] / rows["narrow"]["deployment_latency_ms"]
    )
    assert [column.header for column in report.table().columns][-2:] == ["ms @64", "speedup @64"]


def test_the_report_measures_language_models_per_token_with_perplexity():
    """Logits (batch, tokens, vocabulary) against labels (batch, tokens): accuracy and perplexity per token."""
    from lightning_compress.report import evaluate

    class Bigram(nn.Module):  # predicts the next byte from the current one, with fixed log-probabilities
        def __init__(self, table: torch.Tensor) -> None:
            super().__init__()
            self.table = nn.Parameter(table)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.table[tokens]

    torch.manual_seed(0)
    table = torch.randn(5, 5)
    tokens, labels = torch.randint(0, 5, (3, 7)), torch.randint(0, 5, (3, 7))
    accuracy, perplexity = evaluate(Bigram(table), [(tokens, labels)])
    logits = table[tokens]
    assert accuracy == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).exp()
    assert perplexity == pytest.approx(float(expected), rel=1e-6)
    # one label per sample: accuracy over samples, no perplexity
    assert evaluate(nn.Identity(), [(torch.eye(4), torch.tensor([0, 1, 2, 0]))]) == (0.75, None)


class _Slow(nn.Module):
    """The fp32 network, and then some: a compressed model that loses to its original."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        for _ in range(50):
            self.network(images)
        return self.network(images)


def test_a_model_slower_than_fp32_is_named_under_the_table(digits):
    from rich.console import Console

    fp32 = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    loader = digits.test_dataloader()
    report = CompressionReport.from_models({"fp32": fp32, "int8": _Slow(fp32)}, loader, next(iter(loader))[0][:1], runs=5)
    assert list(report.slower_than_fp32()) == ["int8"]
    console = Console(record=True, width=200)
    report.print(console)
    assert "Slower than fp32 at batch 1 on one thread: int8 (0." in console.export_text()


def test_latency_with_several_calls_per_turn_times_a_model_running_on_its_own():
    """A model that is slow only when it follows another (cold caches, here a 30 ms sleep) is timed at that cost
    with one call per turn, and at its own pace when each turn is several calls in a row."""
    last_caller: list[str] = []

    class ColdAfterOthers(nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if last_caller and last_caller[-1] != self.name:
                time.sleep(0.03)
            last_caller.append(self.name)
            return x

    models = {"a": ColdAfterOthers("a"), "b": ColdAfterOthers("b")}
    one_call = latency_ms(models, torch.zeros(1), runs=6, warmup=1)
    in_a_row = latency_ms(models, torch.zeros(1), runs=6, warmup=1, calls_per_turn=3)
    assert all(value >= 25 for value in one_call.values()), one_call
    assert all(value < 10 for value in in_a_row.values()), in_a_row
    with pytest.raises(ValueError, match="calls_per_turn=0"):
        latency_ms(models, torch.zeros(1), calls_per_turn=0)
