"""Recipes whose epochs follow the run's length, and callbacks that warn, not fail, when a step falls after the fit."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

import lightning_compress.app.train  # noqa: F401 - registers ${epoch_at:...}, which places the recipes' epochs
from lightning_compress import QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier

from conftest import ROOT, quiet_trainer, run_train

RECIPES = sorted(path.stem for path in (ROOT / "conf" / "compress").glob("*.yaml"))
# The schedules as the recipes were written for their default lengths; fractions must give them back.
DEFAULTS = {
    "qat": {"quantization": (3, 6, 7)},
    "prune": {"pruning": (1, 6)},
    "prune_channels": {"pruning": (1, 6)},
    "distill_prune_qat": {"pruning": (1, 5), "quantization": (6, 8, 9)},
    "distill_channels_qat": {"pruning": (0, 4, 4), "quantization": (6, 8, 9)},  # pruning: start, end, shrink
    "qat_llm": {"quantization": (2,)},
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _schedule(cfg) -> dict[str, tuple[int, ...]]:
    keys = ("start_epoch", "end_epoch", "shrink_epoch", "freeze_bn_epoch", "freeze_observer_epoch")
    callbacks = OmegaConf.to_container(cfg.compress.callbacks, resolve=True) if "callbacks" in cfg.compress else {}
    return {name: tuple(settings[key] for key in keys if settings.get(key) is not None) for name, settings in callbacks.items()}


def test_every_recipe_states_its_minimum_length():
    for recipe in RECIPES:
        minimum = _compose(f"+compress={recipe}").compress.min_epochs
        header = (ROOT / "conf" / "compress" / f"{recipe}.yaml").read_text()
        assert isinstance(minimum, int) and (minimum == 0 or f"min_epochs={minimum}" in header), recipe


@pytest.mark.parametrize("recipe", RECIPES)
def test_schedules_scale_with_max_epochs_from_the_stated_minimum(recipe: str):
    cfg = _compose(f"+compress={recipe}")
    default_epochs, minimum = cfg.trainer.max_epochs, cfg.compress.min_epochs
    assert _schedule(cfg) == DEFAULTS.get(recipe, {name: () for name in _schedule(cfg)})
    for epochs in sorted({minimum, minimum + 1, default_epochs, 2 * default_epochs, 50}):
        cfg = _compose(f"+compress={recipe}", f"trainer.max_epochs={epochs}")
        schedule = _schedule(cfg)
        if "pruning" in schedule:
            start, end, *shrink = schedule["pruning"]
            assert 0 <= start < end <= epochs and all(end <= epoch < epochs for epoch in shrink), (epochs, schedule)
        if "quantization" in schedule:
            start, *freezes = schedule["quantization"]  # qat_llm's low-bit scheme has no ranges to freeze
            assert 0 <= start < epochs and all(start <= epoch < epochs for epoch in freezes), (epochs, schedule)
            if freezes:  # fake-quant on for at least one epoch with observers recording
                freeze_bn, freeze_observer = freezes
                assert freeze_bn <= freeze_observer and start < freeze_observer, (epochs, schedule)
            if "pruning" in schedule:
                assert max(schedule["pruning"][1:]) <= start  # QAT once the ramp is over and the channels removed
        if "teacher" in cfg:
            assert 1 <= cfg.teacher.max_epochs <= max(epochs, 1)
        for settings in (
            cfg.compress.callbacks if "callbacks" in cfg.compress else {}
        ).values():  # the resolved values are valid settings
            instantiate(settings, _convert_="all")
    if DEFAULTS.get(recipe):  # proportions kept: twice the epochs, every step twice as late
        doubled = _schedule(_compose(f"+compress={recipe}", f"trainer.max_epochs={2 * default_epochs}"))
        assert doubled == {name: tuple(2 * epoch for epoch in epochs) for name, epochs in DEFAULTS[recipe].items()}


@pytest.mark.parametrize("recipe", [recipe for recipe in RECIPES if recipe in DEFAULTS or recipe == "distill"])
def test_below_the_minimum_the_recipe_says_so(recipe: str):
    minimum = _compose(f"+compress={recipe}").compress.min_epochs
    cfg = _compose(f"+compress={recipe}", f"trainer.max_epochs={minimum - 1}")
    with pytest.raises(
        Exception, match=rf"trainer.max_epochs={minimum - 1} is too short for the {recipe} recipe: .* at least {minimum}"
    ):
        for key in ("compress", "teacher"):
            if key in cfg:
                OmegaConf.to_container(cfg[key], resolve=True)


def test_explicit_epochs_still_win():
    cfg = _compose("+compress=qat", "trainer.max_epochs=4", "compress.callbacks.quantization.freeze_observer_epoch=2")
    assert _schedule(cfg) == {"quantization": (1, 3, 2)}
    cfg = _compose(
        "+compress=qat",
        "trainer.max_epochs=1",
        *(f"compress.callbacks.quantization.{k}=0" for k in ("start_epoch", "freeze_bn_epoch", "freeze_observer_epoch")),
    )
    assert _schedule(cfg) == {"quantization": (0, 0, 0)}  # no fraction left, so no minimum applies


def test_qat_recipe_at_its_minimum_length_trains_and_converts(tmp_path: Path):
    result = run_train(
        "+compress=qat", "trainer.max_epochs=2", "data.train_fraction=0.5", "report.latency_runs=3", f"hydra.run.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 0: fake-quant on" in result.stdout + result.stderr and "epoch 1: fake-quant on, observers frozen" in (
        result.stdout + result.stderr
    )
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert list(rows) == ["fp32", "fake-quant", "int8"] and rows["int8"]["accuracy"] >= 0.6
    assert (tmp_path / "checkpoints" / "model_int8.pt2").is_file()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "overrides", "rows"),
    [
        ("distill", ["trainer.max_epochs=1"], ["fp32", "teacher"]),
        ("distill_prune_qat", ["trainer.max_epochs=3"], ["fp32", "teacher", "dense", "fake-quant", "int8"]),
        ("ptq", ["trainer.max_epochs=0"], ["fp32", "int8"]),
        ("dynamic", ["model=lstm", "trainer.max_epochs=0"], ["fp32", "int8 dynamic"]),
    ],
)
def test_the_other_recipes_run_at_their_minimum_length(tmp_path: Path, recipe: str, overrides: list[str], rows: list[str]):
    result = run_train(f"+compress={recipe}", *overrides, "report.latency_runs=3", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["name"] for row in json.loads((tmp_path / "report.json").read_text())["rows"]] == rows


def test_qat_steps_after_the_fit_warn_and_the_fit_trains(tmp_path: Path):
    """``train 2 epochs now, extend to 4 later from the checkpoint`` must not be refused."""
    L.seed_everything(0)
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=3, export_format="none")
    trainer = quiet_trainer(tmp_path, [qat], 2, limit_train_batches=4, limit_val_batches=2)
    with pytest.warns(UserWarning, match=r"max_epochs=2 ends this fit before freeze_bn_epoch=2, freeze_observer_epoch=3"):
        trainer.fit(ImageClassifier(), datamodule=DigitsDataModule())
    assert trainer.global_step == 8 and qat.quantized_model is not None


def test_qat_with_zero_epochs_warns_and_does_not_crash(tmp_path: Path):
    qat = QuantizationAwareTraining(start_epoch=0, export_format="none")
    with pytest.warns(UserWarning, match=r"max_epochs=0 ends this fit before start_epoch=0"):
        quiet_trainer(tmp_path, [qat], 0).fit(ImageClassifier(), datamodule=DigitsDataModule())
    assert qat.quantized_model is None  # no epoch trained with fake-quant: nothing to convert


def test_the_low_bit_recipe_ships_to_executorch_where_it_is_installed(monkeypatch: pytest.MonkeyPatch):
    """``qat_llm`` writes the ExecuTorch program (where its 8da4w model runs fast) when ExecuTorch is installed, and
    only the torch.export program when it is not, rather than failing for a runtime the user did not ask for."""
    import importlib.util

    cfg = _compose("+compress=qat_llm")
    assert cfg.compress.callbacks.quantization.export_format == ["torch_export", "executorch"]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "executorch" else find_spec(name, *args))
    assert _compose("+compress=qat_llm").compress.callbacks.quantization.export_format == ["torch_export"]
