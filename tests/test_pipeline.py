"""The whole pipeline from the command line: distill + prune + QAT in one run, killed and resumed, swept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_compress.app.data import DigitsDataModule

from conftest import ROOT, run_train
from wandb_records import run_summary

# A short version of the recipe: teacher 3 epochs, student 6 (prune 1-3, QAT from 4, freezes at 5).
SHORT = [
    "+compress=distill_prune_qat",
    "teacher=cnn",
    "teacher.max_epochs=3",
    "trainer.max_epochs=6",
    "compress.callbacks.pruning.end_epoch=3",
    "compress.callbacks.quantization.start_epoch=4",
    "compress.callbacks.quantization.freeze_bn_epoch=5",
    "compress.callbacks.quantization.freeze_observer_epoch=5",
    "callbacks.model_checkpoint.save_top_k=-1",
    "report.latency_runs=5",
]


# The channels-then-int8 recipe, short: teacher 1 epoch; student 4 (ramp in epoch 0, channels removed at 1, QAT
# from 2, freezes at 3).
CHANNELS_THEN_INT8 = [
    "+compress=distill_channels_qat",
    "teacher.max_epochs=1",
    "trainer.max_epochs=4",
    "callbacks.model_checkpoint.save_top_k=-1",
    "report.latency_runs=5",
]


def _int8_predictions(run_dir: Path) -> torch.Tensor:
    import torchao.quantization.pt2e  # noqa: F401 - defines the quantize ops the program holds

    model = torch.export.load(str(run_dir / "checkpoints" / "model_int8.pt2")).module()
    digits = DigitsDataModule()
    digits.setup()
    with torch.no_grad():
        return model(digits.test_set.tensors[0])


@pytest.mark.slow
def test_chained_recipe_reports_teacher_dense_pruned_and_int8(tmp_path: Path):
    result = run_train(*SHORT, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert list(rows) == ["fp32", "teacher", "dense", "fake-quant", "int8"]
    assert rows["fp32"]["nonzero_parameters"] <= 0.31 * rows["fp32"]["parameters"] + 1000  # 70% of weights pruned
    # a student this small (6k weights) pays for int8 scales and zero-points: its size only halves
    assert rows["int8"]["size_ratio"] < 0.6 and rows["int8"]["accuracy"] >= 0.85
    assert rows["teacher"]["parameters"] > rows["fp32"]["parameters"]


def _loads(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a checkpoint still being written
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "killed_after", "weights_kept"),
    [
        (SHORT, "epoch04", 1.0),  # mid-QAT; unstructured pruning keeps every weight, zeroed
        (CHANNELS_THEN_INT8, "epoch02", 0.3),  # after the shrink and QAT's start; half the channels: a quarter of the weights
    ],
    ids=["distill_prune_qat", "distill_channels_qat"],
)
def test_sigkill_and_resume_ends_like_an_uninterrupted_run(
    tmp_path: Path, recipe: list[str], killed_after: str, weights_kept: float
):
    uninterrupted = tmp_path / "uninterrupted"
    assert run_train(*recipe, f"hydra.run.dir={uninterrupted}").returncode == 0

    interrupted = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *recipe, f"hydra.run.dir={interrupted}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoints = interrupted / "checkpoints"
    deadline = time.monotonic() + 300
    while not list(checkpoints.glob(f"{killed_after}-*.ckpt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    # Freeze the run at once, so that a fast machine cannot race on to the end of training, and let it go on
    # in short steps only until the checkpoint it is writing is complete.
    os.kill(process.pid, signal.SIGSTOP)
    while not _loads(next(checkpoints.glob(f"{killed_after}-*.ckpt"))) and time.monotonic() < deadline:
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.02)
        os.kill(process.pid, signal.SIGSTOP)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    (resume_from,) = checkpoints.glob(f"{killed_after}-*.ckpt")
    assert not (checkpoints / "model_int8.pt2").exists()

    result = run_train(*recipe, f"hydra.run.dir={interrupted}", f"ckpt_path={resume_from}")
    assert result.returncode == 0, result.stderr[-3000:]
    expected, actual = _int8_predictions(uninterrupted), _int8_predictions(interrupted)
    assert torch.equal(actual.argmax(1), expected.argmax(1))
    assert torch.allclose(actual, expected, atol=1e-4)
    final = [json.loads((run / "report.json").read_text())["rows"] for run in (uninterrupted, interrupted)]
    assert final[0][0]["accuracy"] == final[1][0]["accuracy"]
    # the same rows, the dense one (the student when pruning began, from the pruning callback's state) included
    assert (
        [row["name"] for row in final[1]]
        == [row["name"] for row in final[0]]
        == ["fp32", "teacher", "dense", "fake-quant", "int8"]
    )
    dense = [next(row for row in rows if row["name"] == "dense") for rows in final]
    assert dense[0]["accuracy"] == dense[1]["accuracy"] and dense[0]["nonzero_parameters"] == dense[1]["nonzero_parameters"]
    assert final[1][0]["parameters"] <= weights_kept * dense[1]["parameters"]


@pytest.mark.slow
def test_multirun_sparsity_sweep_gives_separate_grouped_wandb_runs(tmp_path: Path):
    result = run_train(
        "-m",
        "+compress=prune",
        "compress.callbacks.pruning.final_sparsity=0.5,0.8,0.9",
        "logger=wandb",
        "trainer.max_epochs=3",
        "compress.callbacks.pruning.end_epoch=2",
        "report.latency_runs=3",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [run_summary(path) for path in sorted(tmp_path.glob("*/wandb/offline-run-*/run-*.wandb"))]
    assert len(runs) == 3
    assert [run["config"]["compress"]["callbacks"]["pruning"]["final_sparsity"] for run in runs] == [0.5, 0.8, 0.9]
    assert {run["group"] for run in runs} == {"prune"}
    for run, sparsity in zip(runs, (0.5, 0.8, 0.9), strict=True):
        assert run["metrics"]["pruning/sparsity"] == pytest.approx(sparsity, abs=0.001)
        assert "report/fp32/accuracy" in run["metrics"]
