"""QAT and pruning under Lightning's DDP with 2 CPU processes (gloo), against a single-process run."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("ddp_fit.py")


def _run(output: Path, devices: int, *mode: str) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(output), str(devices), *mode], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["qat", "pt2e"])
def test_two_process_ddp_gives_identical_state_on_every_rank(tmp_path: Path, mode: str):
    """Pruning and QAT (FX, or the torch.export engine), 2 processes against one: the same masks, ranges, weights
    and int8 predictions on every rank, and the accuracy of one process."""
    _run(tmp_path, 2, mode)
    _run(tmp_path, 1, mode)
    prefix = "pt2e_" if mode == "pt2e" else ""
    rank0, rank1, single = (
        torch.load(tmp_path / f"{prefix}{name}", weights_only=True)
        for name in ("ddp_rank0.pt", "ddp_rank1.pt", "single_rank0.pt")
    )
    assert rank0["masks"] and set(rank0["masks"]) == set(rank1["masks"])
    assert all(torch.equal(rank0["masks"][name].cpu(), rank1["masks"][name].cpu()) for name in rank0["masks"])
    assert rank0["observers"] and all(torch.equal(rank0["observers"][k], rank1["observers"][k]) for k in rank0["observers"])
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    assert torch.equal(rank0["predictions"], rank1["predictions"])
    assert (tmp_path / ("model_int8.pt2" if mode == "pt2e" else "model_int8.pt")).is_file()  # exported once, by rank 0
    accuracies = [float((run["predictions"].argmax(1) == run["labels"]).float().mean()) for run in (rank0, single)]
    assert min(accuracies) >= 0.95 and abs(accuracies[0] - accuracies[1]) <= 0.02


@pytest.mark.slow
def test_two_processes_shrink_alike_mid_run_then_train_int8_alike(tmp_path: Path):
    _run(tmp_path, 2, "shrink")
    rank0, rank1 = (torch.load(tmp_path / f"shrink_ddp_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0["shrunk"] and rank1["shrunk"] and rank0["prepared"] == rank1["prepared"] == ["net"]
    assert rank0["weights"]["features.0.weight"].shape[0] == 16  # half of the first block's 32 channels
    assert set(rank0["weights"]) == set(rank1["weights"])
    # identical after three more epochs of training, two of them with fake-quant: the smaller, then the prepared
    # network's parameters are synchronized, and both ranks convert the same int8 model
    assert all(torch.equal(rank0["weights"][key], rank1["weights"][key]) for key in rank0["weights"])
    assert torch.equal(rank0["predictions"], rank1["predictions"])
    assert rank0["accuracy"] >= 0.9


@pytest.mark.slow
def test_two_processes_learn_the_same_ranges(tmp_path: Path):
    """LSQ's ranges begin to learn mid-fit: DDP must reduce their gradients from then on, or the ranks drift."""
    _run(tmp_path, 2, "lsq")
    rank0, rank1 = (torch.load(tmp_path / f"lsq_ddp_rank{rank}.pt", weights_only=True) for rank in (0, 1))
    assert rank0["scales"] and all(torch.equal(rank0["scales"][name], rank1["scales"][name]) for name in rank0["scales"])
    assert torch.equal(rank0["predictions"], rank1["predictions"]) and rank0["accuracy"] >= 0.9


@pytest.mark.slow
def test_train_py_on_ddp_cpu_writes_one_report(tmp_path: Path):
    from conftest import run_train

    result = run_train(
        "trainer=ddp_cpu",
        "+compress=prune",
        "trainer.max_epochs=2",
        "compress.callbacks.pruning.end_epoch=2",
        "report.latency_runs=3",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "report.json").is_file() and (tmp_path / "checkpoints" / "model_pruned.pt").is_file()
