"""`train.py` end to end, as a user runs it: real digits, real models, real output folders."""

import json
from pathlib import Path

import pytest

from conftest import run_train
from wandb_records import run_summary


def test_five_epochs_reach_95_percent_and_report(tmp_path: Path):
    result = run_train("trainer.max_epochs=5", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Compression report" in result.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    fp32 = report["rows"][0]
    assert fp32["name"] == "fp32" and fp32["accuracy"] >= 0.95
    assert fp32["parameters"] == fp32["nonzero_parameters"] > 0 and fp32["latency_ms"] > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert list((tmp_path / "csv").rglob("metrics.csv"))


def test_wandb_offline_run_holds_config_and_metrics(tmp_path: Path):
    result = run_train("logger=[csv,wandb]", "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    run = run_summary(run_file)
    assert run["config"]["trainer"]["max_epochs"] == 1
    assert run["config"]["data"]["_target_"] == "lightning_compress.app.data.DigitsDataModule"
    assert run["group"] == "baseline" and "trainer.max_epochs=1" in run["name"]
    assert 0.0 < run["metrics"]["test/acc"] <= 1.0
    assert run["metrics"]["report/fp32/parameters"] > 0


def test_multirun_gives_one_wandb_run_per_job(tmp_path: Path):
    result = run_train(
        "-m", "seed=1,2", "logger=wandb", "trainer.max_epochs=1", f"hydra.sweep.dir={tmp_path}", "report.latency_runs=3"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(tmp_path.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2
    summaries = [run_summary(path) for path in runs]
    assert [summary["config"]["seed"] for summary in summaries] == [1, 2]
    assert all("test/acc" in summary["metrics"] for summary in summaries)
    assert summaries[0]["group"] == summaries[1]["group"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=svhn"], "Could not find 'data/svhn'"),
        (["trainer.max_epochs=-3"], "`max_epochs` must be a non-negative integer or -1. You passed in -3."),
        (["data.batch_size=0"], "data.batch_size=0 is invalid: it must be a positive integer."),
        (["data=image_folder", "data.root=/no/such/folder"], "data.root='/no/such/folder' must hold the folders"),
        (["data=mnist", "data.root=/no/such/folder"], "data.download=False"),
        (["model.architecture=vgg"], "model.architecture='vgg' is unknown"),
        (["+compress=qat", "trainer.max_epochs=1"], "trainer.max_epochs=1 is too short for the qat recipe"),
        (["report.latency_input_size=0"], "report.latency_input_size=0 is invalid: it must be a positive integer"),
        # a language model on images, and a language-model recipe on images, are one line naming what clashes
        (["model=byte_transformer"], "model=byte_transformer (language modelling), data=digits (image classification)"),
        (["+compress=qat_llm", "data=digits"], "data=digits (image classification), +compress=qat_llm (language modelling)"),
        # a nested object's argument, and an app module built for another group, are named by their config keys
        (
            ["+compress=distill", "teacher=cnn", "model.student.checkpoint=/no/such.ckpt"],
            "model.student.checkpoint='/no/such.ckpt' does not exist",
        ),
        (
            ["+compress=distill", "teacher=cnn", "teacher.checkpoint=/no/such.ckpt"],
            "teacher.checkpoint='/no/such.ckpt' does not exist",
        ),
        (["+compress=prune", "compress.callbacks.pruning.final_sparsity=abc"], "compress.callbacks.pruning.final_sparsity='abc'"),
        # found in the callback's setup, inside fit, after the loggers wrote their first files
        (
            ["+compress=prune", "trainer.max_epochs=2", "compress.callbacks.pruning.layer_types=[torch.nn.LSTM]"],
            "MagnitudePruning selects no",
        ),
    ],
)
def test_bad_input_fails_before_training_and_leaves_nothing(tmp_path: Path, overrides, message):
    run_dir = tmp_path / "run"
    result = run_train(*overrides, f"hydra.run.dir={run_dir}")
    assert result.returncode == (1 if overrides == ["data=svhn"] else 2)  # Hydra itself rejects an unknown option
    assert message in result.stderr and "Traceback" not in result.stderr
    assert "Epoch" not in result.stdout
    assert not run_dir.exists()


def test_a_truncated_resume_checkpoint_is_one_line(tmp_path: Path):
    import torch

    checkpoint = tmp_path / "epoch03.ckpt"
    torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.0"}, checkpoint)
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    result = run_train(f"ckpt_path={checkpoint}", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [result.stderr.strip().splitlines()[-1]]
    assert errors[0].startswith(f"error: ckpt_path='{checkpoint}' is truncated or corrupted: torch.load fails")
    assert not (tmp_path / "run").exists()


def test_a_failed_export_leaves_checkpoints_and_report_and_exits_non_zero(tmp_path: Path):
    (tmp_path / "checkpoints" / "model_pruned.pt").mkdir(parents=True)  # torch.jit.save cannot write over a folder
    result = run_train("+compress=prune", "trainer.max_epochs=2", "report.latency_runs=3", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: the TorchScript export") and "model_pruned.pt failed (RuntimeError" in last_line
    assert "Is a directory" in last_line and sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "checkpoints" / "pruning.png").is_file()
    assert [row["name"] for row in json.loads((tmp_path / "report.json").read_text())["rows"]] == ["fp32", "dense"]


@pytest.mark.parametrize(
    ("backend", "export"), [("x86_inductor", "model_int8.pt2"), pytest.param("x86", "model_int8.pt", marks=pytest.mark.slow)]
)
def test_qat_recipe_reports_fp32_fake_quant_and_int8(tmp_path: Path, backend: str, export: str):
    result = run_train(
        "+compress=qat",
        f"compress.callbacks.quantization.backend={backend}",
        "report.latency_runs=10",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert list(rows) == ["fp32", "fake-quant", "int8"]
    assert rows["int8"]["size_ratio"] <= 0.3
    assert rows["int8"]["accuracy"] >= 0.95 and abs(rows["int8"]["accuracy_delta_points"]) <= 1.0
    assert [path.name for path in (tmp_path / "checkpoints").glob("model_int8*")] == [export]  # the backend's own format
    assert rows["fp32"]["compile_ms"] is None
    if backend == "x86_inductor":  # Inductor compiled the int8 program on its first call: seconds, not milliseconds
        assert rows["int8"]["compile_ms"] > 10 * rows["int8"]["latency_ms"]
    else:  # FX's int8 model runs eagerly
        assert rows["int8"]["compile_ms"] is None


def test_bad_input_never_deletes_an_earlier_run_in_the_same_folder(tmp_path: Path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"an earlier run")
    result = run_train("data.batch_size=0", "ckpt_path=last", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0 and "data.batch_size=0" in result.stderr
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == b"an earlier run"


def test_checkpoints_of_configured_runs_load_with_weights_only(tmp_path: Path):
    import torch

    result = run_train("trainer.max_epochs=1", "report.latency_runs=3", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["architecture_options"] == {"widths": [32, 64, 128]}


@pytest.mark.slow
def test_under_ddp_an_error_found_in_setup_is_printed_once(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_train(
        "trainer=ddp_cpu",
        "+compress=prune",
        "trainer.max_epochs=2",
        "compress.callbacks.pruning.layer_types=[torch.nn.LSTM]",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "MagnitudePruning selects no layer" in errors[0]
    assert not run_dir.exists()


class TakesAnything:
    """A user's model whose constructor takes ``**kwargs``: it gets the data's sizes too."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


def test_the_data_sizes_reach_every_object_that_takes_them():
    import sys

    from omegaconf import OmegaConf

    from conftest import ROOT

    sys.path.insert(0, str(ROOT))
    try:
        from lightning_compress.app.train import _fill_sizes
    finally:
        sys.path.remove(str(ROOT))
    model = OmegaConf.create(
        {
            "_target_": "lightning_compress.DistillationModule",  # takes neither: the student does
            "student": {"_target_": "lightning_compress.app.models.build_network", "architecture": "cnn"},
            "helper": {"_target_": "test_train.TakesAnything"},
            "fixed": {"_target_": "lightning_compress.app.models.SmallCNN", "num_classes": 4},  # set: kept
        }
    )
    _fill_sizes(model, {"num_classes": 10, "in_channels": 3})
    assert "num_classes" not in model and "in_channels" not in model
    assert model.student.num_classes == 10 and model.student.in_channels == 3
    assert model.helper.num_classes == 10 and model.fixed.num_classes == 4 and model.fixed.in_channels == 3
