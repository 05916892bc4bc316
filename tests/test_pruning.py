"""MagnitudePruning on real digits: schedule, exact sparsity, resume, channel removal, pruning with QAT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.ao.nn.intrinsic.quantized import ConvReLU2d as ConvReLU2dInt8
from torch.ao.nn.quantized import Linear as LinearInt8

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.report import count_parameters, top1_accuracy
from lightning_compress.schedules import SparsitySchedule

from conftest import quiet_trainer, run_train


def _fit(tmp_path: Path, pruning: MagnitudePruning, max_epochs: int = 4, architecture: str = "cnn", extra=(), **kwargs):
    L.seed_everything(0)
    model = ImageClassifier(architecture=architecture)
    digits = DigitsDataModule(batch_size=64)
    trainer = quiet_trainer(tmp_path, [pruning, *extra], max_epochs, **kwargs)
    trainer.fit(model, datamodule=digits)
    return trainer, model, digits


def test_cubic_schedule_follows_zhu_and_gupta():
    schedule = SparsitySchedule("cubic", 0.0, 0.8, start_step=10, end_step=110, update_every=20)
    assert schedule.target(0) == 0.0 and schedule.target(10) == 0.0
    assert schedule.target(60) == pytest.approx(0.8 + (0.0 - 0.8) * (1 - 0.5) ** 3)  # 0.7 at half way
    assert schedule.target(110) == schedule.target(500) == 0.8
    targets = [schedule.target(step) for step in range(10, 111)]
    assert targets == sorted(targets)
    assert [step for step in range(200) if schedule.is_update_step(step)] == [10, 30, 50, 70, 90, 110]
    linear = SparsitySchedule("linear", 0.2, 0.6, 0, 100, 1)
    assert linear.target(25) == pytest.approx(0.3)
    assert SparsitySchedule("constant", 0.0, 0.5, 5, 10, 1).target(5) == 0.5


def test_targets_reached_at_the_right_steps_with_exact_sparsity(tmp_path: Path):
    pruning = MagnitudePruning(final_sparsity=0.8, start_epoch=1, end_epoch=3, update_every=5, export_format="none", plot=False)
    trainer, model, digits = _fit(tmp_path, pruning, max_epochs=4)
    steps_per_epoch = trainer.num_training_batches
    schedule = pruning.schedule
    assert schedule.start_step == steps_per_epoch and schedule.end_step == 3 * steps_per_epoch
    expected_steps = [step for step in range(trainer.global_step) if schedule.is_update_step(step)]
    assert [entry["step"] for entry in pruning.history] == expected_steps
    total = sum(mask.numel() for mask in pruning.masks.values())
    for entry in pruning.history:  # global ranking zeroes exactly round(target * total) weights
        assert entry["target"] == pytest.approx(schedule.target(entry["step"]))
        assert entry["measured"] == pytest.approx(round(entry["target"] * total) / total, abs=1e-9)
    measured, per_layer = pruning.measured_sparsity(model)
    assert measured == pytest.approx(0.8, abs=1 / total)
    assert set(per_layer) == {"net.features.0", "net.features.4", "net.features.8", "net.classifier"}
    # permanent: plain weights, no hooks, no _orig/_mask keys
    assert not any(key.endswith(("_orig", "_mask")) for key in model.state_dict())
    assert all(not module._forward_pre_hooks for module in model.modules())
    assert top1_accuracy(model, digits.test_dataloader()) >= 0.9


def test_pruned_weights_stay_zero_after_every_optimizer_step(tmp_path: Path):
    violations = []

    class Probe(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            parameters = dict(pl_module.named_parameters())
            for name, mask in pruning.masks.items():
                if bool((parameters[name][~mask] != 0).any()):
                    violations.append((trainer.global_step, name))

    class MomentumClassifier(ImageClassifier):  # heavy momentum: would revive weights if masks were not reapplied
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.99)

    pruning = MagnitudePruning(final_sparsity=0.7, start_epoch=0, end_epoch=1, update_every=3, export_format="none", plot=False)
    L.seed_everything(0)
    quiet_trainer(tmp_path, [pruning, Probe()], 2).fit(MomentumClassifier(), datamodule=DigitsDataModule())
    assert pruning.masks and not violations


def test_resume_mid_schedule_continues_exactly(tmp_path: Path):
    options = {"final_sparsity": 0.8, "start_epoch": 1, "end_epoch": 3, "update_every": 7, "export_format": "none", "plot": False}
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    full = MagnitudePruning(**options)
    _, uninterrupted, digits = _fit(tmp_path / "full", full, 4, extra=[every_epoch], enable_checkpointing=True)

    L.seed_everything(0)
    resumed = MagnitudePruning(**options)
    model = ImageClassifier()
    quiet_trainer(tmp_path / "resumed", [resumed], 4).fit(
        model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=tmp_path / "full" / "epoch=1.ckpt"
    )
    assert resumed.history == full.history
    assert all(torch.equal(resumed.masks[name], full.masks[name]) for name in full.masks)
    # the report's dense row survives the resume: the model as it was when pruning began, not a fresh copy
    dense, resumed_dense = full.report_models()["dense"].state_dict(), resumed.report_models()["dense"].state_dict()
    assert all(torch.equal(resumed_dense[name], value) for name, value in dense.items())
    for (name, expected), actual in zip(uninterrupted.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.allclose(actual, expected, atol=1e-6), name


@pytest.mark.parametrize("architecture", ["cnn", "resnet18"])
def test_channel_pruning_removes_channels_and_keeps_outputs(tmp_path: Path, architecture: str):
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", update_every=None)
    trainer, model, digits = _fit(
        tmp_path, pruning, max_epochs=2, architecture=architecture, limit_train_batches=6 if architecture == "resnet18" else None
    )
    small = pruning.pruned_model
    dense_parameters, _ = count_parameters(model)
    small_parameters, small_nonzero = count_parameters(small)
    assert small_parameters < 0.4 * dense_parameters  # about a quarter of the conv weights remain
    images = digits.test_set.tensors[0][:64]
    with torch.no_grad():
        assert torch.allclose(small(images), model.eval()(images), atol=1e-4)
    if architecture == "resnet18":  # the residual stages lost the same channels on both sides of each add
        assert small.net.layer1[0].conv2.out_channels == small.net.conv1.out_channels == 32
        assert small.net.fc.in_features == small.net.layer4[1].conv2.out_channels == 256
    loaded = torch.jit.load(str(pruning.export_path))  # runs without this package
    assert torch.allclose(loaded(images), small(images), atol=1e-5)


def test_logging_and_plot(tmp_path: Path):
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=2, update_every=10, export_format="none")
    trainer, _, _ = _fit(tmp_path, pruning, max_epochs=2, logger=CSVLogger(tmp_path))
    lines = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    for column in ("pruning/target_sparsity", "pruning/sparsity", "pruning/sparsity/net.classifier"):
        assert column in header
    logged = [
        float(row.split(",")[header.index("pruning/sparsity")])
        for row in lines[1:]
        if row.split(",")[header.index("pruning/sparsity")]
    ]
    assert logged == [entry["measured"] for entry in pruning.history]
    assert pruning.plot_path.is_file() and pruning.plot_path.stat().st_size > 10_000


def test_pruning_with_qat_keeps_zeros_in_the_int8_model(tmp_path: Path):
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=0, end_epoch=2, update_every=5, export_format="none", plot=False)
    qat = QuantizationAwareTraining(start_epoch=2, backend="x86", export_format="none")
    trainer, model, digits = _fit(tmp_path, pruning, max_epochs=3, extra=[qat])
    int8 = qat.quantized_model
    quantized_layers = [m for m in int8.net.modules() if isinstance(m, ConvReLU2dInt8 | LinearInt8)]
    assert len(quantized_layers) == 4
    int8_zeros = sum(int((m._weight_bias()[0].dequantize() == 0).sum()) for m in quantized_layers)
    weights = sum(m._weight_bias()[0].numel() for m in quantized_layers)
    assert int8_zeros / weights >= 0.6  # every pruned weight is still zero in int8 (rounding adds a few)
    masked = [name for name, mask in pruning.masks.items()]
    assert masked and all(name.startswith("net.") for name in masked)
    assert top1_accuracy(int8, digits.test_dataloader()) >= 0.9


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"final_sparsity": 1.0}, r"final_sparsity=1.0 is invalid: it must lie in \[0, 1\)"),
        ({"final_sparsity": -0.1}, r"final_sparsity=-0.1 is invalid"),
        ({"initial_sparsity": 0.5, "final_sparsity": 0.3}, r"initial_sparsity=0.5 is above final_sparsity=0.3"),
        ({"start_epoch": 3, "end_epoch": 3}, r"end_epoch=3 is invalid: it must be an integer after start_epoch=3"),
        ({"mode": "blocks"}, r"mode='blocks' is unknown: allowed values are \['unstructured', 'channels'\]"),
        ({"schedule": "exp"}, r"schedule='exp' is unknown"),
        ({"update_every": 0}, r"update_every=0 is invalid"),
        ({"layer_types": ["torch.nn.Nope"]}, r"layer_types='torch.nn.Nope' names no importable module type"),
        ({"final_sparsity": "0.5"}, r"final_sparsity='0.5' is invalid: it must be a number in \[0, 1\), not str"),
        ({"initial_sparsity": None}, r"initial_sparsity=None is invalid: it must be a number in \[0, 1\)"),
        ({"start_epoch": True}, r"start_epoch=True is invalid: it must be an integer >= 0, not bool"),
        ({"end_epoch": 5.0}, r"end_epoch=5.0 is invalid: it must be an integer, not float"),
        ({"update_every": "10"}, r"update_every='10' is invalid: it must be a positive integer, or None \(per epoch\), not str"),
        ({"channel_norm": True}, r"channel_norm=True is invalid: it must be an integer from 1 to 2, not bool"),
    ],
)
def test_bad_settings_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"names": [r"^decoder\."]}, r"MagnitudePruning selects no layer: .*names=\['\^decoder\\\\.'\]"),
        ({"layer_types": ["torch.nn.LSTM"]}, r"MagnitudePruning selects no layer"),
        ({"mode": "channels", "names": [r"classifier"]}, r"mode='channels' cannot shrink 'net.classifier'"),
        ({"mode": "channels", "modules": ["net.classifier"]}, r"mode='channels' cannot shrink 'net.classifier'"),
        ({"modules": ["net.decoder"]}, r"modules='net.decoder' names no submodule; submodules are e.g."),
        ({"skip": ["net.decoder"]}, r"skip='net.decoder' names no submodule"),
    ],
)
def test_bad_settings_fail_before_training(tmp_path: Path, options, message):
    settings = {"end_epoch": 2, "export_format": "none", "plot": False, **options}
    model = ImageClassifier()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainer = quiet_trainer(tmp_path, [MagnitudePruning(**settings)], 2)
    with pytest.raises(ValueError, match=message):
        trainer.fit(model, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


@pytest.mark.parametrize("recipe", ["prune", "prune_channels"])
def test_recipes_end_to_end(tmp_path: Path, recipe: str):
    result = run_train(  # at the recipes' shortest length: the ramp in epoch 0, fine-tuning in epoch 1
        f"+compress={recipe}",
        "trainer.max_epochs=2",
        "report.latency_runs=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert rows["fp32"]["accuracy"] >= 0.9
    if recipe == "prune":
        assert rows["fp32"]["nonzero_parameters"] <= 0.21 * rows["dense"]["nonzero_parameters"]
    else:
        assert rows["channels removed"]["parameters"] < 0.4 * rows["dense"]["parameters"]
        assert rows["channels removed"]["accuracy"] == pytest.approx(rows["fp32"]["accuracy"])
    assert (tmp_path / "checkpoints" / "model_pruned.pt").is_file()
    assert (tmp_path / "checkpoints" / "pruning.png").is_file()
    script = "import sys, torch; torch.jit.load(sys.argv[1]); assert 'lightning_compress' not in sys.modules"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "checkpoints" / "model_pruned.pt")], check=True)


def test_a_ramp_longer_than_the_fit_warns_and_goes_on_in_a_longer_resumed_fit(tmp_path: Path):
    options = {"final_sparsity": 0.8, "start_epoch": 0, "end_epoch": 4, "update_every": 5, "export_format": "none", "plot": False}
    short = MagnitudePruning(**options)
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    with pytest.warns(UserWarning, match=r"end_epoch=4 is beyond max_epochs \(2\): this fit ends part-way up the ramp"):
        trainer, model, _ = _fit(tmp_path, short, max_epochs=2, extra=[every_epoch], enable_checkpointing=True)
    steps_per_epoch = trainer.num_training_batches
    assert short.schedule.end_step == 4 * steps_per_epoch  # the ramp keeps its slope, it is not squeezed into 2 epochs
    measured, _ = short.measured_sparsity(model)
    assert 0.5 < measured < 0.8 and measured == pytest.approx(short.schedule.target(short.history[-1]["step"]), abs=0.01)

    longer = MagnitudePruning(**options)  # "train 2 epochs now, extend to 5 later from the checkpoint"
    L.seed_everything(0)
    resumed = ImageClassifier()
    trainer = quiet_trainer(tmp_path / "longer", [longer], 5)
    trainer.fit(resumed, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "epoch=1.ckpt")
    assert longer.history[: len(short.history)] == short.history
    assert longer.measured_sparsity(resumed)[0] == pytest.approx(0.8, abs=0.001)


def test_a_schedule_that_starts_after_the_fit_warns_and_trains(tmp_path: Path):
    pruning = MagnitudePruning(start_epoch=3, end_epoch=5, export_format="none", plot=False)
    with pytest.warns(UserWarning, match=r"start_epoch=3 is at or beyond max_epochs \(2\): no pruning happens in this fit"):
        trainer, model, _ = _fit(tmp_path, pruning, max_epochs=2, limit_train_batches=3)
    assert trainer.global_step == 6 and not pruning.masks and pruning.measured_sparsity(model)[0] < 0.01


def _checkpointed_fit(tmp_path: Path, callbacks: list, **kwargs) -> Path:
    every_epoch = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    L.seed_everything(0)
    trainer = quiet_trainer(tmp_path, [*callbacks, every_epoch], 2, limit_train_batches=4, **kwargs)
    trainer.fit(ImageClassifier(), datamodule=DigitsDataModule())
    return tmp_path / "epoch=1.ckpt"


def test_two_pruning_callbacks_keep_their_own_checkpoint_state(tmp_path: Path):
    def pair() -> list[MagnitudePruning]:
        options = {"start_epoch": 0, "end_epoch": 1, "update_every": 2, "export_format": "none", "plot": False}
        return [
            MagnitudePruning(final_sparsity=0.5, modules=["net.features"], **options),
            MagnitudePruning(final_sparsity=0.3, modules=["net.classifier"], scope="layer", **options),
        ]

    first = pair()
    path = _checkpointed_fit(tmp_path, first)
    states = torch.load(path, weights_only=True)["callbacks"]
    assert len([key for key in states if key.startswith("MagnitudePruning")]) == 2
    assert set(states[first[0].state_key]["masks"]) == {"net.features.0.weight", "net.features.4.weight", "net.features.8.weight"}
    assert set(states[first[1].state_key]["masks"]) == {"net.classifier.weight"}

    resumed = pair()
    L.seed_everything(0)
    quiet_trainer(tmp_path / "resumed", resumed, 2).fit(ImageClassifier(), datamodule=DigitsDataModule(), ckpt_path=path)
    for before, after in zip(first, resumed, strict=True):
        assert set(after.masks) == set(before.masks)
        assert all(torch.equal(after.masks[name].cpu(), before.masks[name].cpu()) for name in before.masks)


def test_resuming_with_other_settings_warns_naming_them(tmp_path: Path):
    options = {"start_epoch": 0, "end_epoch": 1, "update_every": 2, "export_format": "none", "plot": False}
    path = _checkpointed_fit(tmp_path, [MagnitudePruning(final_sparsity=0.5, **options)])
    changed = MagnitudePruning(final_sparsity=0.6, schedule="linear", **options)
    with pytest.warns(UserWarning, match=r"other settings: final_sparsity=0.5 \(now 0.6\), schedule='cubic' \(now 'linear'\)"):
        quiet_trainer(tmp_path / "resumed", [changed], 2).fit(ImageClassifier(), datamodule=DigitsDataModule(), ckpt_path=path)


def test_a_checkpoint_saved_under_the_old_class_name_key_still_loads(tmp_path: Path):
    options = {"final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 1, "update_every": 2, "export_format": "none", "plot": False}
    original = MagnitudePruning(**options)
    path = _checkpointed_fit(tmp_path, [original])
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["callbacks"]["MagnitudePruning"] = checkpoint["callbacks"].pop(original.state_key)
    for key in ("dense_state_dict", "initial_sparsity", "start_epoch", "end_epoch", "schedule"):  # not saved then
        del checkpoint["callbacks"]["MagnitudePruning"][key]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    resumed = MagnitudePruning(**options)
    quiet_trainer(tmp_path / "resumed", [resumed], 2).fit(
        ImageClassifier(), datamodule=DigitsDataModule(), ckpt_path=tmp_path / "old.ckpt"
    )
    assert resumed.history == original.history
    assert all(torch.equal(resumed.masks[name].cpu(), original.masks[name].cpu()) for name in original.masks)


def test_a_failed_export_warns_in_one_line_and_the_fit_ends_normally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lightning_compress.export import recording_export_failures

    def untraceable(*args, **kwargs):
        raise RuntimeError("Tracer cannot infer type of output\nsecond line of detail")

    monkeypatch.setattr(torch.jit, "trace", untraceable)
    pruning = MagnitudePruning(start_epoch=0, end_epoch=1, export_dir=str(tmp_path / "exports"))
    with recording_export_failures() as failures, pytest.warns(UserWarning) as warned:
        _fit(tmp_path, pruning, max_epochs=1, limit_train_batches=3)
    message = next(str(w.message) for w in warned if "Export of" in str(w.message))
    assert message == (
        "Export of model_pruned.pt (TorchScript) failed, the run goes on: RuntimeError: Tracer cannot infer type of output"
    )
    assert [(failure.path.name, failure.export_format) for failure in failures] == [("model_pruned.pt", "TorchScript")]
    assert pruning.export_path is None and pruning.pruned_model is not None
    assert pruning.plot_path.is_file()  # what comes after the export still happens


def test_modules_and_skip_mean_what_they_mean_in_qat(tmp_path: Path):
    """Submodule names (a subtree each) and layer types, the vocabulary of every compression callback."""
    options = {"final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 1, "export_format": "none", "plot": False}
    by_name = MagnitudePruning(modules=["net.features"], skip=["net.features.4"], **options)
    by_type = MagnitudePruning(skip=["torch.nn.Linear"], **options)
    for pruning in (by_name, by_type):
        quiet_trainer(tmp_path, [pruning], 1, limit_train_batches=2).fit(ImageClassifier(), datamodule=DigitsDataModule())
    assert set(by_name.masks) == {"net.features.0.weight", "net.features.8.weight"}
    assert set(by_type.masks) == {"net.features.0.weight", "net.features.4.weight", "net.features.8.weight"}


def test_the_old_regular_expressions_still_work_with_a_deprecation_warning(tmp_path: Path):
    options = {"final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 1, "export_format": "none", "plot": False}
    with pytest.warns(DeprecationWarning, match=r"names=\.\.\.\) is deprecated: give modules="):
        old_names = MagnitudePruning(names=[r"features\.[04]$"], **options)
    old_skip = MagnitudePruning(skip=[r"classifier"], **options)
    with pytest.warns(DeprecationWarning, match=r"skip='classifier'\): skip names submodules now"):
        for pruning in (old_names, old_skip):
            quiet_trainer(tmp_path, [pruning], 1, limit_train_batches=2).fit(ImageClassifier(), datamodule=DigitsDataModule())
    assert set(old_names.masks) == {"net.features.0.weight", "net.features.4.weight"}
    assert set(old_skip.masks) == {"net.features.0.weight", "net.features.4.weight", "net.features.8.weight"}


SHRINK = {"mode": "channels", "final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 2, "update_every": None, "plot": False}


class EpochLosses(L.Callback):
    """The mean training loss of each epoch, and what the optimizer holds at the end of each."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.optimizer_matches_module: list[bool] = []
        self._sum = self._count = 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sum, self._count = self._sum + float(outputs["loss"]), self._count + 1

    def on_train_epoch_end(self, trainer, pl_module):
        self.losses.append(self._sum / self._count)
        self._sum = self._count = 0.0
        optimizer = trainer.optimizers[0]
        optimized = [p for group in optimizer.param_groups for p in group["params"]]
        self.optimizer_matches_module.append(
            {id(p) for p in optimized} == {id(p) for p in pl_module.parameters()}
            and all(state["exp_avg"].shape == p.shape for p, state in optimizer.state.items())
        )


@pytest.mark.parametrize("architecture", ["cnn", pytest.param("resnet18", marks=pytest.mark.slow)])
def test_shrink_mid_run_goes_on_training_the_smaller_network(tmp_path: Path, architecture: str):
    pruning = MagnitudePruning(shrink_epoch=2, export_format="torchscript", **SHRINK)
    record = EpochLosses()
    limit = {"limit_train_batches": 8} if architecture == "resnet18" else {}
    trainer, model, digits = _fit(tmp_path, pruning, 5, architecture=architecture, extra=[record], **limit)
    assert pruning.shrunk and not pruning.masks
    dense_parameters, _ = count_parameters(pruning.report_models()["dense"])
    parameters, nonzero = count_parameters(model)
    assert parameters < 0.4 * dense_parameters and nonzero > 0.95 * parameters  # smaller, not masked
    # the optimizer holds the new parameters only, Adam's moments cut to their shapes, and the cosine schedule
    # kept its position across the rebuild (5 epochs: lr at the end of epoch 4 is 0 only if it never restarted)
    assert all(record.optimizer_matches_module)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 5
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert record.losses[4] < record.losses[2]  # training goes on after the shrink
    if architecture == "cnn":
        assert model.net.features[0].out_channels == 16 and top1_accuracy(model, digits.test_dataloader()) >= 0.9
    else:
        assert model.net.layer1[0].conv2.out_channels == model.net.conv1.out_channels == 32
    images = digits.test_set.tensors[0][:32]
    with torch.no_grad():  # the shipped model is the live one, and the export computes what it does
        assert torch.equal(pruning.pruned_model(images), model.eval().cpu()(images))
        assert torch.allclose(torch.jit.load(str(pruning.export_path))(images), model(images), atol=1e-5)


def test_the_shrink_keeps_what_the_masked_network_computed_and_its_optimizer_state(tmp_path: Path):
    seen = {}

    class Probe(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # runs after the pruning callback's
            if trainer.current_epoch == 3:
                images = trainer.datamodule.val_set.tensors[0][:16]
                was_training = pl_module.training
                with torch.no_grad():
                    seen[trainer.current_epoch] = pl_module.eval()(images)
                pl_module.train(was_training)
                optimizer = trainer.optimizers[0]
                first = pl_module.net.features[0].weight
                seen[f"moment {trainer.current_epoch}"] = optimizer.state[first]["exp_avg"].clone()

    class Keep(L.Callback):  # before the shrink, the masked network at the end of epoch 2
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 2:  # final_sparsity reached with its first batch
                images = trainer.datamodule.val_set.tensors[0][:16]
                with torch.no_grad():
                    seen["masked"] = pl_module.eval()(images)
                pl_module.train()
                kept = pl_module.net.features[0].weight.flatten(1).abs().sum(1) != 0
                seen["kept moments"] = trainer.optimizers[0].state[pl_module.net.features[0].weight]["exp_avg"][kept].clone()

    pruning = MagnitudePruning(shrink_epoch=3, export_format="none", **SHRINK)
    _fit(tmp_path, pruning, 4, extra=[Probe(), Keep()])
    assert torch.allclose(seen[3], seen["masked"], atol=1e-5)  # removal changed nothing the network computes
    assert torch.equal(seen["moment 3"], seen["kept moments"])  # the kept channels' moments, in order


def test_resume_across_the_shrink_equals_the_uninterrupted_run(tmp_path: Path):
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    full = MagnitudePruning(shrink_epoch=2, export_format="none", **SHRINK)
    _, uninterrupted, _ = _fit(tmp_path / "full", full, 4, extra=[every_epoch], enable_checkpointing=True)
    for epoch in (1, 2):  # a checkpoint from before the shrink, and one holding the smaller network
        L.seed_everything(0)
        resumed = MagnitudePruning(shrink_epoch=2, export_format="none", **SHRINK)
        model = ImageClassifier()
        trainer = quiet_trainer(tmp_path / f"resumed{epoch}", [resumed], 4)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=tmp_path / "full" / f"epoch={epoch}.ckpt")
        assert resumed.shrunk and resumed.measured_sparsity(model) == full.measured_sparsity(uninterrupted)
        for (name, expected), actual in zip(uninterrupted.state_dict().items(), model.state_dict().values(), strict=True):
            assert actual.shape == expected.shape and torch.allclose(actual, expected, atol=1e-6), (epoch, name)
    # without the callback: load_from_checkpoint and trainer.test rebuild the smaller structure first
    loaded = ImageClassifier.load_from_checkpoint(tmp_path / "full" / "epoch=3.ckpt", weights_only=True)
    assert loaded.net.features[0].out_channels == 16
    fresh = ImageClassifier()
    tester = quiet_trainer(tmp_path / "test", [MagnitudePruning(shrink_epoch=2, export_format="none", **SHRINK)])
    (metrics,) = tester.test(fresh, datamodule=DigitsDataModule(), ckpt_path=tmp_path / "full" / "epoch=3.ckpt")
    assert fresh.net.features[0].out_channels == 16 and metrics["test/acc"] >= 0.9


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"shrink_epoch": 1, "end_epoch": 2, "mode": "channels"},
            r"shrink_epoch=1 is before end_epoch=2: channels can be removed only once",
        ),
        ({"shrink_epoch": 3}, r"shrink_epoch=3 removes channels: it needs mode='channels', not mode='unstructured'"),
        ({"shrink_epoch": -1, "mode": "channels"}, r"shrink_epoch=-1 is invalid: it must be an integer >= 0, or None"),
    ],
)
def test_shrink_settings_that_cannot_work_fail_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        MagnitudePruning(**options)


def test_a_module_that_cannot_run_shrunk_is_refused_before_training(tmp_path: Path):
    """A distillation hint adapter reads the student layer's channels: removing them would break the step."""
    from lightning_compress import DistillationModule
    from lightning_compress.app.models import SmallCNN

    module = DistillationModule(student=SmallCNN(widths=(8, 16)), teacher=SmallCNN(), hints={"features.4": "features.4"})
    pruning = MagnitudePruning(shrink_epoch=2, export_format="none", **SHRINK)
    trainer = quiet_trainer(tmp_path, [pruning], 3)
    with pytest.raises(ValueError, match=r"shrink_epoch=2: the module's training step fails once channels are removed"):
        trainer.fit(module, datamodule=DigitsDataModule())
    assert trainer.global_step == 0
    plain = DistillationModule(student=SmallCNN(widths=(8, 16)), teacher=SmallCNN())  # no hint: it shrinks and trains on
    pruning = MagnitudePruning(shrink_epoch=2, export_format="none", **SHRINK)
    quiet_trainer(tmp_path, [pruning], 3, limit_train_batches=4).fit(plain, datamodule=DigitsDataModule())
    assert pruning.shrunk and plain.student.features[0].out_channels == 4


def test_the_shrink_keeps_momentum_and_restarts_states_that_cannot_be_cut(tmp_path: Path):
    """SGD's momentum is shaped like its weight and is cut with it; Adafactor's factored row and column
    statistics are not, so those parameters' states start afresh instead of failing the next step."""
    for optimizer in ("sgd", "adafactor"):

        class Classifier(ImageClassifier):
            def configure_optimizers(self, optimizer=optimizer):
                if optimizer == "sgd":
                    return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
                return torch.optim.Adafactor(self.parameters(), lr=0.01)

        L.seed_everything(0)
        model, pruning = Classifier(), MagnitudePruning(shrink_epoch=2, export_format="none", **SHRINK)
        trainer = quiet_trainer(tmp_path / optimizer, [pruning], 3)
        trainer.fit(model, datamodule=DigitsDataModule())
        state = trainer.optimizers[0].state[model.net.features[4].weight]
        assert pruning.shrunk and model.net.features[4].weight.shape == (32, 16, 3, 3)
        if optimizer == "sgd":
            assert state["momentum_buffer"].shape == (32, 16, 3, 3)
        else:  # started afresh at the shrink, then a full epoch of steps on the smaller weight
            assert state["row_var"].shape[0] == 32 and int(state["step"]) == trainer.num_training_batches


def test_a_masked_model_kept_when_removal_fails_is_never_called_channels_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none")
    _fit(tmp_path, pruning, max_epochs=1, limit_train_batches=3)
    assert pruning.channels_removed and "channels removed" in pruning.report_models()

    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none")
    # the check at fit end finds the shrunken copy computing something else (as on a classifier it broke)
    monkeypatch.setattr(pruning, "_shrunken_differs", lambda module: "removing its channels fails (list index out of range)")
    with pytest.warns(UserWarning, match="the masked model is kept, channels not removed"):
        _, model, _ = _fit(tmp_path, pruning, max_epochs=1, limit_train_batches=3)
    assert not pruning.channels_removed
    assert count_parameters(pruning.pruned_model)[0] == count_parameters(model)[0]
    assert "channels removed" not in pruning.report_models()


@pytest.mark.parametrize("tie_chunk", [3, 1 << 20])
def test_ranking_drops_exactly_the_smallest_weights_and_of_equal_ones_the_first(monkeypatch: pytest.MonkeyPatch, tie_chunk: int):
    """The ranking behind every mask, without sorting: exactly ``pruned`` entries go, none larger than one kept;
    already-zero weights first, and of entries equal to the threshold those that come first (whatever the chunks
    the ties are counted in), as on every rank alike."""
    from lightning_compress import pruning

    monkeypatch.setattr(pruning, "_TIE_CHUNK", tie_chunk)
    ties = torch.tensor([0.0, 2.0, 0.0, 1.0, 1.0, 3.0, 0.0, 1.0, 1.0])
    expected_dropped = [[], [0], [0, 2], [0, 2, 6], [0, 2, 3, 6], [0, 2, 3, 4, 6], [0, 2, 3, 4, 6, 7]]
    for pruned, dropped in enumerate(expected_dropped):
        keep = pruning._keep_largest(ties, pruned)
        assert (~keep).nonzero().flatten().tolist() == dropped
    assert not pruning._keep_largest(ties, len(ties)).any()
    generator = torch.Generator().manual_seed(0)
    magnitudes = torch.randn(10_000, generator=generator).abs()
    magnitudes[::7] = 0.0
    for pruned in (1, 1_429, 5_000, 9_999):
        keep = pruning._keep_largest(magnitudes, pruned)
        assert int((~keep).sum()) == pruned and magnitudes[~keep].max() <= magnitudes[keep].min()
