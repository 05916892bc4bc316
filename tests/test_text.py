"""Byte-level language modelling on the standard library's sources: the data, a small transformer, and
token-level distillation into a smaller one."""

from __future__ import annotations

import math
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
    model = ByteTransformer(block_size=64, width=64, layers=layers, heads=4, lr=3e-3)
    quiet_trainer(tmp_path, [], epochs).fit(model, datamodule=data)
    return model, data


def test_the_transformer_learns_more_than_byte_frequencies(tmp_path: Path):
    model, data = _trained(tmp_path, layers=2)
    (metrics,) = quiet_trainer(tmp_path).test(model, datamodule=data)
    unigram = _unigram_perplexity(data.train_set.tensors[0], data.test_set.tensors[1])
    assert metrics["test/perplexity"] == pytest.approx(math.exp(metrics["test/loss"]), rel=1e-5)
    assert metrics["test/perplexity"] < 0.7 * unigram  # context helps: it predicts from what came before


@pytest.mark.slow
def test_token_level_distillation_into_a_smaller_language_model(tmp_path: Path):
    teacher, data = _trained(tmp_path / "teacher", layers=2, epochs=2)
    before = {name: value.clone() for name, value in teacher.state_dict().items()}
    L.seed_everything(1)
    student = ByteTransformer(block_size=64, width=32, layers=1, heads=2, lr=3e-3)  # its own configure_optimizers
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
