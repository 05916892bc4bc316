"""Byte-level language modelling on the standard library's sources: the data, a small transformer, and
token-level distillation into a smaller one."""

from __future__ import annotations

import math
from itertools import pairwise
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_compress import DistillationModule
from lightning_compress.app.text import ByteTransformer, PythonSourceDataModule, standard_library_sources

from conftest import quiet_trainer

SMALL = {"block_size": 64, "batch_size": 32, "train_bytes": 100_000, "eval_bytes": 20_000}


def _unigram_perplexity(train: torch.Tensor, test: torch.Tensor) -> float:
    """The perplexity of the byte frequencies of the training text on the test text: what a model that
    ignores context reaches (add-one smoothed)."""
    counts = torch.bincount(train.flatten(), minlength=256).double() + 1
    log_probabilities = (counts / counts.sum()).log()
    return math.exp(-float(log_probabilities[test.flatten()].mean()))


def test_the_split_is_by_file_seeded_and_labels_are_the_next_byte():
    data = PythonSourceDataModule(**SMALL)
    data.setup()
    splits = {name: set(files) for name, files in data.files.items()}
    assert splits["train"] and splits["val"] and splits["test"]
    assert (
        not (splits["train"] & splits["val"]) and not (splits["train"] & splits["test"]) and not (splits["val"] & splits["test"])
    )
    assert sum(len(files) for files in splits.values()) == len(standard_library_sources())
    tokens, labels = data.train_set.tensors
    assert tokens.shape[1] == 64 and tokens.dtype == torch.long and int(tokens.max()) < 256
    assert torch.equal(tokens[1:, 0], labels[:-1, -1]) and torch.equal(tokens[0, 1:], labels[0, :-1])  # shifted by one
    assert tokens.numel() <= 100_000 and data.val_set.tensors[0].numel() <= 20_000
    again, other = PythonSourceDataModule(**SMALL), PythonSourceDataModule(**SMALL, split_seed=1)
    again.setup()
    other.setup()
    assert again.files == data.files and other.files["test"] != data.files["test"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": 1}, r"data.block_size=1 is invalid: it must be an integer >= 2"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"data.val_fraction \+ data.test_fraction = 1.0 leaves no training files"),
        ({"train_bytes": 10}, r"data.train_bytes=10 is invalid: it must be an integer >= 129, or None"),
    ],
)
def test_bad_settings_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        PythonSourceDataModule(**options)


def _trained(tmp_path: Path, layers: int, epochs: int = 1) -> tuple[ByteTransformer, PythonSourceDataModule]:
    L.seed_everything(0)
    data = PythonSourceDataModule(**SMALL)
    # the rate anneals to zero over the fit's steps: a peak of 6e-3 averages what a constant 3e-3 gave
    model = ByteTransformer(block_size=64, width=64, layers=layers, heads=4, lr=6e-3)
    quiet_trainer(tmp_path, [], epochs).fit(model, datamodule=data)
    return model, data


def test_the_transformer_learns_more_than_byte_frequencies(tmp_path: Path):
    model, data = _trained(tmp_path, layers=2)
    (metrics,) = quiet_trainer(tmp_path).test(model, datamodule=data)
    unigram = _unigram_perplexity(data.train_set.tensors[0], data.test_set.tensors[1])
    assert metrics["test/perplexity"] == pytest.approx(math.exp(metrics["test/loss"]), rel=1e-5)
    assert metrics["test/perplexity"] < 0.7 * unigram  # context helps: it predicts from what came before


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_the_learning_rate_falls_every_step_down_to_near_zero(tmp_path: Path):
    L.seed_everything(0)
    model = ByteTransformer(block_size=16, width=32, layers=1, heads=2, lr=1e-3)
    data = PythonSourceDataModule(block_size=16, batch_size=8, train_bytes=2_000, eval_bytes=500)
    rates = _LearningRates()
    quiet_trainer(tmp_path, [rates], 2, limit_train_batches=5, limit_val_batches=1).fit(model, datamodule=data)
    assert len(rates.rates) == 10 and rates.rates[0] == pytest.approx(1e-3)
    assert all(later < earlier for earlier, later in pairwise(rates.rates))  # within an epoch too
    assert rates.rates[-1] < 0.05 * rates.rates[0]  # the last step, not half the peak as a per-epoch cosine left it
    unbounded = quiet_trainer(tmp_path, [], -1, max_steps=-1)
    model.trainer = unbounded
    assert isinstance(model.configure_optimizers(), torch.optim.AdamW)  # no end to anneal to: the peak rate


@pytest.mark.slow
def test_token_level_distillation_into_a_smaller_language_model(tmp_path: Path):
    teacher, data = _trained(tmp_path / "teacher", layers=2, epochs=2)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    L.seed_everything(1)
    # its own configure_optimizers: the rate anneals to zero over the one epoch, so the peak is twice _trained's old 3e-3
    student = ByteTransformer(block_size=64, width=32, layers=1, heads=2, lr=6e-3)
    module = DistillationModule(student=student, teacher=teacher, class_dim=-1, temperature=2.0, alpha=0.5)
    trainer = quiet_trainer(tmp_path / "student", [], 1)
    trainer.fit(module, datamodule=data)
    assert trainer.callback_metrics["train/kd_loss"] > 0
    (metrics,) = trainer.test(module, datamodule=data)
    assert isinstance(trainer.optimizers[0], torch.optim.AdamW) and trainer.lr_scheduler_configs  # the student's own
    assert all(torch.equal(before[name], value) for name, value in teacher.state_dict().items())
    # per-byte accuracy of the student and the teacher on the same test bytes; the student learned the task
    unigram = _unigram_perplexity(data.train_set.tensors[0], data.test_set.tensors[1])
    assert math.exp(metrics["test/loss"]) < unigram
    assert 0 < metrics["test/acc"] <= metrics["test/teacher_acc"]


LM_RUN = [
    "model=byte_transformer",
    "data=python_source",
    "model.layers=2",
    "model.width=64",
    "data.block_size=64",
    "data.train_bytes=100000",
    "data.eval_bytes=20000",
    "report.latency_runs=3",
]


@pytest.mark.slow
def test_train_py_trains_a_language_model_compresses_it_and_reports_perplexity(tmp_path: Path):
    import json

    from conftest import run_train

    result = run_train(*LM_RUN, "trainer.max_epochs=1", "+compress=dynamic", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert set(rows) == {"fp32", "int8 dynamic"}
    assert rows["int8 dynamic"]["size_ratio"] < 0.5  # the Linear weights in int8
    for row in rows.values():
        assert 1 < row["perplexity"] < 256  # better than guessing among 256 bytes
    assert abs(rows["int8 dynamic"]["perplexity"] - rows["fp32"]["perplexity"]) < 0.05 * rows["fp32"]["perplexity"]


@pytest.mark.slow
def test_unstructured_pruning_of_every_linear_layer_of_a_transformer(tmp_path: Path):
    from lightning_compress import MagnitudePruning

    L.seed_everything(0)
    data = PythonSourceDataModule(**SMALL)
    model = ByteTransformer(block_size=64, width=64, layers=2, heads=4, lr=3e-3)
    pruning = MagnitudePruning(
        final_sparsity=0.5, start_epoch=0, end_epoch=1, layer_types=["torch.nn.Linear"], export_format="none", plot=False
    )
    quiet_trainer(tmp_path, [pruning], 2).fit(model, datamodule=data)
    linear = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    assert set(pruning.masks) == linear and len(linear) == 2 * 4 + 1  # qkv, out, two MLP layers per block; the head
    assert pruning.measured_sparsity(model)[0] == pytest.approx(0.5, abs=0.001)
    (metrics,) = quiet_trainer(tmp_path).test(model, datamodule=data)
    assert metrics["test/perplexity"] < _unigram_perplexity(data.train_set.tensors[0], data.test_set.tensors[1])
