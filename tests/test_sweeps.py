"""Sweeps: the W&B sweep file composes with the Hydra config, the Optuna sweeper runs, summaries mark the front."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import lightning_compress.app.train  # noqa: F401 - registers ${epoch_at:...}, which places the recipes' epochs
from lightning_compress.app.sweep_summary import SweepPoint, collect, pareto_front, write

from conftest import ROOT, run_train

SWEEP_FILE = ROOT / "sweeps" / "prune_wandb.yaml"


def _sample_values(spec: dict) -> list:
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def _fixed_overrides(sweep: dict) -> list[str]:
    return [arg for arg in sweep["command"] if "=" in arg and not arg.startswith("${")]


def test_every_wandb_sweep_parameter_composes_and_builds():
    sweep = yaml.safe_load(SWEEP_FILE.read_text())
    assert sweep["program"] == "train.py" and "${args_no_hyphens}" in sweep["command"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for key, spec in sweep["parameters"].items():
            for value in _sample_values(spec):
                cfg = compose("config", overrides=[*_fixed_overrides(sweep), f"{key}={value}"], return_hydra_config=False)
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert node == value, key
                for callback in cfg.compress.callbacks.values():  # the values are valid settings too
                    instantiate(callback, _convert_="all")


def test_a_typo_in_a_sweep_parameter_fails_to_compose():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        with pytest.raises(Exception, match="final_sparsty"):
            compose("config", overrides=["+compress=prune", "compress.callbacks.pruning.final_sparsty=0.5"])


def test_pareto_front_keeps_only_undominated_points(tmp_path: Path):
    points = [
        SweepPoint("0", "", 0.99, 100, 1000, 1.0),
        SweepPoint("1", "", 0.98, 100, 500, 0.5),
        SweepPoint("2", "", 0.97, 100, 800, 0.4),
        SweepPoint("3", "", 0.96, 100, 400, 0.6),
    ]
    assert pareto_front(points, "nonzero_parameters") == {"0", "1", "3"}
    assert pareto_front(points, "latency_ms") == {"0", "1", "2"}
    png, table = write(points, tmp_path)
    assert png.stat().st_size > 10_000 and table.read_text().count("| yes") == 3 + 3


@pytest.mark.slow
def test_optuna_sweep_runs_and_the_summary_reads_it(tmp_path: Path):
    result = run_train(
        "-m",
        "+compress=prune",
        "+sweep=optuna_prune",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=6",
        "report.latency_runs=3",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert 0.0 < best["best_value"] <= 1.0 and "compress.callbacks.pruning.final_sparsity" in best["best_params"]
    points = collect(tmp_path, "fp32")
    assert len(points) == 2 and all("final_sparsity" in point.overrides for point in points)
    write(points, tmp_path)
    assert (tmp_path / "sweep_summary.png").is_file()
