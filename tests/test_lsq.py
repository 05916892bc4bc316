"""Learned step size quantization (LSQ): ranges that start from the observers and then train with the weights."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.ao.quantization._learnable_fake_quantize import _LearnableFakeQuantize

from lightning_compress import QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.fx_quantization import LearnedRangeFakeQuantize
from lightning_compress.lowbit_quantization import LowBitLinearConfig
from lightning_compress.range_learning import RangeOptimizer, learned_ranges, schedule_pace

from conftest import quiet_trainer

SCHEDULE = {"start_epoch": 1, "freeze_bn_epoch": 2, "freeze_observer_epoch": 2, "learnable_ranges": True}


class RangeRecord(L.Callback):
    """The learned scales at each epoch's start (after QAT's switches), and whether a step gave them gradients."""

    def __init__(self) -> None:
        self.scales: dict[int, dict[str, torch.Tensor]] = {}
        self.had_gradients: dict[int, bool] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.scales[trainer.current_epoch] = {
            name: parameter.detach().clone() for name, parameter in pl_module.named_parameters() if name.endswith(".scale")
        }

    def on_after_backward(self, trainer, pl_module):
        grads = [p.grad for name, p in pl_module.named_parameters() if name.endswith(".scale")]
        has = any(grad is not None and bool(grad.abs().sum() > 0) for grad in grads)
        self.had_gradients[trainer.current_epoch] = self.had_gradients.get(trainer.current_epoch, False) or has


def _fit(tmp_path: Path, max_epochs: int = 4, extra=(), model_options: dict | None = None, backend: str = "x86", **kwargs):
    L.seed_everything(0)
    qat = QuantizationAwareTraining(export_format="none", backend=backend, **SCHEDULE)
    model = ImageClassifier(**(model_options or {}))
    trainer = quiet_trainer(tmp_path, [qat, *extra], max_epochs, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=64))
    return model, qat


def test_learned_ranges_start_from_the_observers_then_train_and_convert(tmp_path: Path, digits):
    record = RangeRecord()
    model, qat = _fit(tmp_path, extra=[record])
    learned = [module for module in model.modules() if isinstance(module, LearnedRangeFakeQuantize)]
    assert len(learned) == 9  # the input, 4 activations, 4 weight grids (one scale per output channel each)
    assert model.net.get_submodule("features.0").weight_fake_quant.scale.shape == (32,)
    # epoch 1 observes (no gradient reaches the ranges); from epoch 2 they learn and move
    assert record.had_gradients == {0: False, 1: False, 2: True, 3: True}
    at_freeze, after = record.scales[2], record.scales[3]
    assert all(not torch.equal(at_freeze[name], after[name]) for name in at_freeze)
    assert all(torch.equal(record.scales[1][name], record.scales[0][name]) for name in at_freeze)  # untouched before
    # the int8 model runs on the learned ranges and computes what fake-quant trained
    images = digits.test_set.tensors[0]
    with torch.no_grad():
        fake_quant, int8 = model.eval()(images), qat.quantized_model(images)
    assert (int8.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.98
    activation_scales = [float(module.scale) for module in learned if not module.is_per_channel]
    assert any(abs(float(qat.quantized_model.net.classifier.scale) - scale) < 1e-7 for scale in activation_scales)


def test_the_torch_export_engine_learns_ranges_on_the_exported_graph_and_converts_them(tmp_path: Path, digits):
    """``backend="x86_inductor"``: the exported graph's fake-quants observe, then (observers frozen) their scales
    learn, stepped by the callback's range optimizer; the compiled int8 model computes what fake-quant trained."""
    from lightning_compress.pt2e_quantization import LearnedRangeFakeQuantize as ExportedGraphRange

    record = RangeRecord()
    model, qat = _fit(tmp_path, extra=[record], backend="x86_inductor")
    learned = [module for module in model.modules() if isinstance(module, ExportedGraphRange)]
    assert len(learned) == 8  # the input and 3 activations between layers; 4 weight grids, one scale per channel
    assert sorted(module.scale.numel() for module in learned if module.is_per_channel) == [10, 32, 64, 128]
    ranges = learned_ranges(model.net, prefix="net")
    assert len(ranges) == 8 + 4  # the activations' asymmetric grids learn their zero-points too
    assert record.had_gradients == {0: False, 1: False, 2: True, 3: True}
    assert all(not torch.equal(record.scales[2][name], record.scales[3][name]) for name in record.scales[2])
    assert all(torch.equal(record.scales[1][name], record.scales[0][name]) for name in record.scales[0])
    images, labels = digits.test_set.tensors
    with torch.no_grad():
        fake_quant, int8 = model.eval()(images), qat.quantized_model(images)
    assert (int8.argmax(1) == fake_quant.argmax(1)).float().mean() >= 0.98
    assert (int8.argmax(1) == labels).float().mean() >= 0.9


def test_ranges_take_relative_steps_whatever_their_size():
    """Adam on the logarithm: a scale of 0.002 (8-bit weights) and one of 0.5 (3-bit activations) move by the
    same share of themselves per step; a zero-point moves in grid steps. The model's Adam would move both by
    about its learning rate in absolute terms: 50% of the small one per step at 1e-3, 0.2% of the large one."""
    small, large = torch.nn.Parameter(torch.tensor([0.002])), torch.nn.Parameter(torch.tensor([0.5]))
    zero_point = torch.nn.Parameter(torch.tensor([3.0]))
    ranges = {"a.scale": small, "b.scale": large, "b.zero_point": zero_point}
    optimizer = RangeOptimizer(learning_rate=0.01)
    for _ in range(5):  # a constant gradient of each log-scale: Adam's normalized step is exactly the learning rate
        small.grad, large.grad = -0.08 / small.detach(), 0.15 / large.detach()
        zero_point.grad = torch.tensor([-2.0])
        optimizer.step(ranges, pace=0.5)  # halfway down the model's schedule
    assert small.item() == pytest.approx(0.002 * math.exp(5 * 0.005), rel=1e-5)
    assert large.item() == pytest.approx(0.5 * math.exp(-5 * 0.005), rel=1e-5)
    assert zero_point.item() == pytest.approx(3.0 + 5 * 0.005, rel=1e-5)
    assert small.grad is None and large.grad is None  # consumed: no other optimizer clears them
    large.grad = torch.tensor([float("inf")])  # an overflowing step is dropped, as the model's optimizer drops it
    optimizer.step(ranges)
    assert large.item() == pytest.approx(0.5 * math.exp(-5 * 0.005), rel=1e-5)


def test_ranges_follow_the_models_schedule_down_never_above_their_own_rate():
    weights = torch.nn.Parameter(torch.zeros(2))
    cosine_optimizer = torch.optim.AdamW([weights], lr=3e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(cosine_optimizer, T_max=4)
    one_cycle_optimizer = torch.optim.AdamW([weights], lr=3e-3)
    one_cycle = torch.optim.lr_scheduler.OneCycleLR(one_cycle_optimizer, max_lr=3e-3, total_steps=10)
    assert schedule_pace([cosine_optimizer], (0, 0)) == 1.0
    for _ in range(2):
        cosine_optimizer.step(), cosine.step()
    assert schedule_pace([cosine_optimizer], (0, 0)) == pytest.approx(0.5)  # halfway down the cosine
    for _ in range(3):  # one-cycle warms up from a 25th of its peak: the ranges stay at their own rate
        one_cycle_optimizer.step(), one_cycle.step()
    assert one_cycle_optimizer.param_groups[0]["lr"] > 10 * one_cycle_optimizer.param_groups[0]["initial_lr"]
    assert schedule_pace([one_cycle_optimizer], (0, 0)) == 1.0
    assert schedule_pace([torch.optim.SGD([weights], lr=0.1)], (0, 0)) == 1.0  # no scheduler, no schedule
    assert schedule_pace([cosine_optimizer], None) == 1.0


def test_learned_ranges_move_at_their_own_pace_whatever_the_models_learning_rate(tmp_path: Path, digits):
    """A model trained at a vanishing learning rate: its optimizer holds none of the ranges, which still learn."""
    record = RangeRecord()
    model, qat = _fit(tmp_path, extra=[record], model_options={"lr": 1e-9})
    groups = [group for optimizer in model.trainer.optimizers for group in optimizer.param_groups]
    held = {id(parameter) for group in groups for parameter in group["params"]}
    ranges = learned_ranges(model.net, prefix="net")
    assert ranges and not any(id(parameter) in held for parameter in ranges.values())
    assert held  # the weights are still the model's optimizer's
    moved = [
        (record.scales[3][name] / record.scales[2][name]).log().abs().mean().item() for name in record.scales[2] if name in ranges
    ]
    # 20 steps of up to 1% each, cosine-paced (ranges with hardly any gradient move less). In the model's AdamW at
    # 1e-9, steps of about 1e-9 would move even the smallest scale here by about 20 * 1e-9 / smallest: 5e-5 of it.
    smallest = min(scale.min().item() for name, scale in record.scales[2].items() if name in ranges)
    assert len(moved) == 9 and all(value > 0 for value in moved), moved
    assert sorted(moved)[4] > 100 * 20 * 1e-9 / smallest, moved


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["x86", "x86_inductor"])
def test_learned_ranges_resume_like_the_uninterrupted_run(tmp_path: Path, digits, backend: str):
    every_epoch = ModelCheckpoint(dirpath=tmp_path / "full", filename="{epoch}", save_top_k=-1)
    _, full = _fit(tmp_path / "full", extra=[every_epoch], enable_checkpointing=True, backend=backend)
    L.seed_everything(0)
    resumed = QuantizationAwareTraining(export_format="none", backend=backend, **SCHEDULE)
    trainer = quiet_trainer(tmp_path / "resumed", [resumed], 4)
    trainer.fit(ImageClassifier(), datamodule=DigitsDataModule(batch_size=64), ckpt_path=tmp_path / "full" / "epoch=2.ckpt")
    images = digits.test_set.tensors[0]
    with torch.no_grad():
        expected, actual = full.quantized_model(images), resumed.quantized_model(images)
    assert torch.allclose(actual, expected, atol=1e-5) and torch.equal(actual.argmax(1), expected.argmax(1))


def test_a_checkpoint_whose_model_optimizer_held_the_ranges_resumes_as_it_was_written(tmp_path: Path, monkeypatch):
    """Earlier versions left the ranges in the model's optimizer: its saved state holds them and must still load."""
    from lightning_compress import range_learning

    with monkeypatch.context() as earlier:  # the earlier version: ranges in the model's optimizer, no range state
        earlier.setattr(range_learning, "take_from_optimizers", lambda optimizers, ranges: None)
        earlier.setattr(range_learning.RangeOptimizer, "step", lambda self, ranges, pace=1.0: None)
        every_epoch = ModelCheckpoint(dirpath=tmp_path / "earlier", filename="{epoch}", save_top_k=-1)
        _fit(tmp_path / "earlier", max_epochs=3, extra=[every_epoch], enable_checkpointing=True)
    path = tmp_path / "earlier" / "epoch=2.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    for state in checkpoint["callbacks"].values():
        state.pop("range_optimizer", None)
    torch.save(checkpoint, path)

    L.seed_everything(0)
    resumed = QuantizationAwareTraining(export_format="none", backend="x86", **SCHEDULE)
    model = ImageClassifier()
    with pytest.warns(UserWarning, match="whose model optimizer stepped the learned ranges"):
        quiet_trainer(tmp_path / "resumed", [resumed], 4).fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=path)
    held = {id(parameter) for group in model.trainer.optimizers[0].param_groups for parameter in group["params"]}
    assert all(id(parameter) in held for parameter in learned_ranges(model.net).values())
    assert resumed.quantized_model is not None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"learnable_ranges": True}, r"learnable_ranges=True needs freeze_observer_epoch"),
        ({"range_learning_rate": 0.01}, r"range_learning_rate=0.01 has nothing to act on: it paces learned ranges"),
        (
            {"learnable_ranges": True, "freeze_observer_epoch": 2, "range_learning_rate": 0.0},
            r"range_learning_rate=0.0 is invalid: it must lie in \(0, 1\]",
        ),
        (
            {"learnable_ranges": True, "config": LowBitLinearConfig()},
            r"learnable_ranges=True is a setting of the backend= flows; with config=LowBitLinearConfig",
        ),
    ],
)
def test_learned_ranges_with_settings_they_cannot_honour_fail_at_construction(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        QuantizationAwareTraining(**options)


def test_learnable_fake_quantize_trains_its_scale_by_backpropagation():
    """The private torch.ao class under LearnedRangeFakeQuantize: its scale must be a parameter that gradients reach."""
    fake_quantize = _LearnableFakeQuantize(
        observer=torch.ao.quantization.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, use_grad_scaling=True
    )
    fake_quantize(torch.linspace(-1.0, 3.0, 100))  # the observer sets the initial range
    fake_quantize.toggle_observer_update(False).toggle_qparam_learning(True)
    assert isinstance(fake_quantize.scale, torch.nn.Parameter)
    fake_quantize(torch.linspace(-1.0, 3.0, 100) * 2).pow(2).sum().backward()
    assert fake_quantize.scale.grad is not None and fake_quantize.scale.grad.abs().item() > 0
