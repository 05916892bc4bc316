"""One test per private Lightning/torch internal that ``lightning_compress.compat`` reaches for: a new release
that moves one fails here, by name."""

from __future__ import annotations

import contextlib
import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import compat
from lightning_compress.app.models import ImageClassifier

from conftest import quiet_trainer


def test_cpu_has_vnni_answers_a_bool():
    assert isinstance(compat.cpu_has_vnni(), bool)
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        assert not compat.cpu_has_vnni()


@pytest.mark.parametrize("source", ["dataloaders", "datamodule"])
def test_training_dataloader_is_reachable_in_setup(tmp_path: Path, digits, source: str):
    seen = []

    class Probe(L.Callback):
        def setup(self, trainer, pl_module, stage):
            seen.append(next(iter(compat.training_dataloader(trainer)))[0].shape)

    trainer = quiet_trainer(tmp_path, [Probe()], 1, limit_train_batches=1, limit_val_batches=0)
    model = ImageClassifier(architecture="cnn")
    if source == "datamodule":
        trainer.fit(model, datamodule=digits)
    else:
        images, labels = digits.train_set.tensors
        trainer.fit(model, train_dataloaders=DataLoader(TensorDataset(images[:32], labels[:32]), batch_size=16))
    assert seen and seen[0][1:] == (1, 8, 8)


@pytest.mark.parametrize("per_channel", [True, False])
def test_quantized_tensor_like_keeps_the_quantization_parameters(per_channel: bool):
    weights = torch.randn(4, 3)
    if per_channel:
        quantized = torch.quantize_per_channel(weights, torch.rand(4) + 0.01, torch.zeros(4, dtype=torch.long), 0, torch.qint8)
    else:
        quantized = torch.quantize_per_tensor(weights, 0.02, 0, torch.qint8)
    values = quantized.int_repr().clamp(-5, 5)
    rebuilt = compat.quantized_tensor_like(quantized, values)
    assert torch.equal(rebuilt.int_repr(), values)
    assert rebuilt.qscheme() == quantized.qscheme()
    if per_channel:
        assert torch.equal(rebuilt.q_per_channel_scales(), quantized.q_per_channel_scales())
    else:
        assert rebuilt.q_scale() == quantized.q_scale()


def test_inductor_freezing_is_on_inside_and_restored_after():
    import torch._inductor.config as inductor_config

    before = inductor_config.freezing
    with compat.inductor_freezing():
        assert inductor_config.freezing is True
    assert inductor_config.freezing == before


def test_training_batch_index_counts_the_batches_of_each_epoch(tmp_path: Path, digits):
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((trainer.current_epoch, batch_idx, compat.training_batch_index(trainer)))

    trainer = quiet_trainer(tmp_path, [Probe()], 2, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(ImageClassifier(architecture="cnn"), datamodule=digits)
    # the counter is one ahead of batch_idx once the batch is fetched: it counts batches made ready
    assert [(epoch, index + 1) for epoch, index, _ in seen] == [(epoch, ready) for epoch, _, ready in seen]
    assert [ready for _, _, ready in seen] == [1, 2, 3, 1, 2, 3]


def test_detached_tracing_lets_a_module_without_trainer_be_traced():
    model = ImageClassifier(architecture="cnn").eval()
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        model.trainer  # noqa: B018 - what tracers probe
    with compat.detached_tracing():
        assert model.trainer is None
        traced = torch.jit.trace(model, torch.zeros(1, 1, 8, 8))
    assert torch.equal(traced(torch.ones(1, 1, 8, 8)), model(torch.ones(1, 1, 8, 8)))


def test_without_children_leaves_the_original_whole():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    trimmed = compat.without_children(model, ["1"])
    assert [name for name, _ in trimmed.named_children()] == ["0", "2"]
    assert [name for name, _ in model.named_children()] == ["0", "1", "2"]
    assert trimmed[0].weight is model[0].weight  # shares the parameters


def test_packed_weight_and_bias_unpacks_int8_layers_only():
    float_linear = torch.nn.Linear(4, 3)
    assert compat.packed_weight_and_bias(float_linear) is None
    int8_linear = torch.ao.nn.quantized.Linear(4, 3)
    int8_linear.set_weight_bias(
        torch.quantize_per_tensor(float_linear.weight.detach(), 0.01, 0, torch.qint8), float_linear.bias.detach()
    )
    weight, bias = compat.packed_weight_and_bias(int8_linear)
    assert weight.shape == (3, 4) and weight.dtype == torch.qint8 and torch.equal(bias, float_linear.bias.detach())
    lstm = torch.ao.nn.quantized.dynamic.LSTM(4, 5)
    assert isinstance(compat.packed_weight_and_bias(lstm), dict)


def test_run_before_weights_load_runs_before_the_state_dict_is_loaded(tmp_path: Path, digits):
    trainer = quiet_trainer(tmp_path, [], 1, limit_train_batches=2, limit_val_batches=0)
    model = ImageClassifier(architecture="cnn", architecture_options={"widths": [4]})
    trainer.fit(model, datamodule=digits)
    trainer.save_checkpoint(tmp_path / "wide.ckpt")
    events = []

    class Rebuild(L.Callback):
        """Gives the module the structure of the checkpoint, as QAT does, where only this hook can; ``order``
        says which structure is built on which (lower first), whatever the order of the callbacks."""

        def __init__(self, order: int) -> None:
            self.order = order

        def setup(self, trainer, pl_module, stage):
            def rebuild(checkpoint):
                events.append((f"rebuild {self.order}", tuple(pl_module.net.features[0].weight.shape)))
                pl_module.net = type(pl_module.net)(widths=[4])

            compat.run_before_weights_load(pl_module, rebuild, order=self.order, by=f"rebuild {self.order}")

    class Own(ImageClassifier):
        def on_load_checkpoint(self, checkpoint):
            events.append(("own hook", None))

    resumed = Own(architecture="cnn", architecture_options={"widths": [8]})  # another shape: loading would fail
    trainer = quiet_trainer(tmp_path, [Rebuild(1), Rebuild(0)], 2, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(resumed, datamodule=digits, ckpt_path=tmp_path / "wide.ckpt")
    assert events == [("rebuild 0", (8, 1, 3, 3)), ("rebuild 1", (4, 1, 3, 3)), ("own hook", None)]
    assert resumed.net.features[0].weight.shape == (4, 1, 3, 3) and trainer.global_step == 4  # loaded, then went on


def test_a_hook_registered_again_under_its_name_replaces_the_earlier_one():
    """Callbacks register their hooks at every fit's setup: a module fitted twice, or by a new callback in the place
    of an earlier fit's, runs each named hook once, the latest, in order; the module's own hook last."""
    events = []

    class Module(L.LightningModule):
        def on_load_checkpoint(self, checkpoint):
            events.append("own")

    module = Module()
    compat.run_before_weights_load(module, lambda checkpoint: events.append("first fit's parts"), order=1, by="QAT parts")
    compat.run_before_weights_load(module, lambda checkpoint: events.append("shrink"), order=0, by="pruning shrink")
    compat.run_before_weights_load(module, lambda checkpoint: events.append("second fit's parts"), order=1, by="QAT parts")
    module.on_load_checkpoint({})
    assert events == ["shrink", "second fit's parts", "own"]


def test_run_before_distributed_weights_load_rebuilds_and_shapes_buffers_before_the_strategy_loads(tmp_path: Path):
    """A distributed checkpoint (a folder: Lightning's meta.pt beside torch's shards) loads into the module inside the
    strategy's load_checkpoint: the wrapped one first runs the registered hooks on meta.pt between before() and
    after(), and gives each buffer the shape the checkpoint saved (a per-channel range shaped by what it saw)."""
    from types import SimpleNamespace

    import torch.distributed.checkpoint as dcp
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    module = ImageClassifier()
    module.net.register_buffer("scale", torch.ones(1))  # as a fake-quant's scale before it first observes
    saved = {f"state_dict.{name}": tensor.clone() for name, tensor in module.state_dict().items()}
    saved["state_dict.net.scale"] = torch.arange(4.0)
    folder = tmp_path / "epoch=1.ckpt"
    with warnings.catch_warnings():  # torch may warn that it saves without a process group
        warnings.simplefilter("ignore")
        dcp.save(saved, checkpoint_id=str(folder))
    torch.save({"callbacks": {"Restorer": {"built": True}}}, folder / _METADATA_FILENAME)

    events: list = []

    class Strategy:
        def load_checkpoint(self, path, weights_only=None):
            events.append(("load", tuple(module.net.scale.shape)))
            return {}

    trainer = SimpleNamespace(strategy=Strategy())
    compat.run_before_weights_load(
        module, lambda checkpoint: events.append(("hook", checkpoint["callbacks"])), order=0, by="Restorer"
    )
    compat.run_before_distributed_weights_load(
        trainer, module, lambda: events.append(("before",)), lambda: events.append(("after",))
    )
    trainer.strategy.load_checkpoint(str(folder))
    assert events == [("before",), ("hook", {"Restorer": {"built": True}}), ("after",), ("load", (4,))]
    trainer.strategy.load_checkpoint(str(tmp_path / "full.ckpt"))  # a file: loaded as before, no hook
    assert events[-1] == ("load", (4,)) and len(events) == 5


def test_rewrap_distributed_wraps_the_new_parameters(tmp_path: Path, digits):
    from torch.nn.parallel import DistributedDataParallel

    seen = {}

    class Replace(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                pl_module.net.classifier = torch.nn.Linear(pl_module.net.classifier.in_features, 10)
                compat.rewrap_distributed(trainer)
                trainer.strategy.setup_optimizers(trainer)
                wrapped = trainer.strategy.model
                seen["wrapped"] = isinstance(wrapped, DistributedDataParallel) and wrapped.module is pl_module
                seen["synchronized"] = {id(p) for p in wrapped.parameters()} >= {id(pl_module.net.classifier.weight)}

    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", devices=1, strategy="ddp", limit_train_batches=2, limit_val_batches=0,
        callbacks=[Replace()], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(ImageClassifier(architecture="cnn"), datamodule=digits)
    assert seen == {"wrapped": True, "synchronized": True}


def test_pattern_graphs_exported_without_dynamo_are_torchaos_own():
    """The conv + BatchNorm rewrite patterns, exported as ``quick_conv_batch_norm_rewrites`` exports them, are the
    graphs torchao's own (strict) export gives."""
    import itertools

    import torch.nn.functional as F
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e import utils as pt2e_utils

    example = (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), *(torch.randn(1) for _ in range(4)))
    for per_channel, bias, training in itertools.product([True, False], repeat=3):
        kwargs = qat_utils._get_quantized_conv_bn_example_inputs_kwargs(per_channel, bias, False, False)
        for make in (qat_utils._get_quantized_qat_conv_bn_pattern, qat_utils._get_folded_quantized_qat_conv_bn_pattern):
            pattern = make(per_channel, bias, False, F.conv2d, training)
            ours = compat.pattern_graph(pattern, example, kwargs)
            theirs = pt2e_utils._get_aten_graph_module_for_pattern(pattern, example, False, **kwargs)
            assert ours.code == theirs.code, (make.__name__, per_channel, bias, training)


@pytest.mark.slow
def test_quick_conv_batch_norm_rewrites_prepare_and_convert_as_torchao_does_alone():
    """A network with conv + BatchNorm (with and without conv bias; a Linear after) converts to the same program,
    computing the same, with the shortcut as without it (20 s: the reference exports every pattern)."""
    from torchao.quantization.pt2e import qat_utils
    from torchao.quantization.pt2e import utils as pt2e_utils
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    torch.manual_seed(0)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, bias=False),
        torch.nn.BatchNorm2d(4),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 3),
    )
    images = torch.randn(8, 1, 8, 8)
    programs = []
    for context in (contextlib.nullcontext, compat.quick_conv_batch_norm_rewrites):
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config(is_qat=True))
        exported = torch.export.export(copy.deepcopy(network).train(), (images,)).module()
        with context():
            prepared = prepare_qat_pt2e(exported, quantizer)
        prepared(images)  # observers see data
        with context():
            programs.append(convert_pt2e(prepared))
    assert programs[0].code == programs[1].code
    assert programs[1].code.count("aten.conv2d") == 2
    assert "batch_norm" not in programs[1].code  # folded into the convs
    assert torch.equal(programs[0](images), programs[1](images))
    assert qat_utils._get_aten_graph_module_for_pattern is pt2e_utils._get_aten_graph_module_for_pattern  # restored
