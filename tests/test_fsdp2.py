"""The callbacks under FSDP2 (Lightning's ModelParallelStrategy, ``fully_shard`` in ``configure_model``) on 2 CPU
processes (gloo): each rank ends with the same masks, ranges and int8 model, checked on the gathered weights; and
the strategies the callbacks cannot run under are refused in one line before training."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_compress import QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.sharding import check_strategy, full_tensor

from conftest import forget_process_group

SCRIPT = Path(__file__).with_name("fsdp2_fit.py")


def _run(output: Path, mode: str, checkpoints: str = "distributed") -> list[dict]:
    """Run ``mode`` of fsdp2_fit.py on 2 processes; what each rank dumped. ``checkpoints="full"``: the Trainer writes
    one file with the whole state dict (``save_distributed_checkpoint=False``) instead of a folder of shards."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "FSDP2_CHECKPOINTS": checkpoints}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(output), mode], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(output / f"{mode}_rank{rank}.pt", weights_only=True) for rank in (0, 1)]


def _accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predictions.argmax(1) == labels).float().mean())


@pytest.mark.slow
def test_pruning_then_qat_under_fsdp2_end_alike_on_both_ranks(tmp_path: Path):
    rank0, rank1 = _run(tmp_path, "prune_qat")
    assert rank0["masks"] and set(rank0["masks"]) == set(rank1["masks"])
    assert all(torch.equal(rank0["masks"][name], rank1["masks"][name]) for name in rank0["masks"])
    for name, mask in rank0["masks"].items():  # the gathered weights are zero where the masks say
        weight = rank0["weights"][name.removeprefix("net.")]
        assert torch.count_nonzero(weight[~mask.bool()]) == 0, name
    assert 0.55 <= rank0["sparsity"] == rank1["sparsity"]
    assert rank0["observers"] and all(torch.equal(rank0["observers"][k], rank1["observers"][k]) for k in rank0["observers"])
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    assert not rank0["dense_sharded"]  # the report's dense copy and the int8 model are plain networks
    assert rank0["dense_as_before"] and rank1["dense_as_before"]
    # nothing keeps the whole float parameters alive once configure_model has sharded them (torch.ao's prepare left
    # them in reference cycles until Python's next full collection)
    assert rank0["whole_parameters_alive"] == rank1["whole_parameters_alive"] == 0
    assert torch.equal(rank0["predictions"], rank1["predictions"])
    assert _accuracy(rank0["predictions"], rank0["labels"]) >= 0.9
    assert (tmp_path / "model_int8.pt").is_file()  # exported once


@pytest.mark.slow
def test_post_training_static_and_dynamic_int8_of_a_sharded_fit_agree_on_both_ranks_and_after_a_resume(tmp_path: Path):
    """Static and dynamic int8 of the gathered weights are the same on both ranks, and a fit resumed from its epoch-0
    distributed checkpoint ends with the same int8 models: both callbacks have every rank take rank 0's BatchNorm
    statistics after each step (without that, the checkpoint held one rank's statistics and the resumed fit's int8
    models differed)."""
    rank0, rank1 = _run(tmp_path, "ptq")
    for name, tensor in rank0["uninterrupted"]["weights"].items():
        assert torch.equal(tensor, rank1["uninterrupted"]["weights"][name]), name
        assert torch.equal(tensor, rank0["resumed"]["weights"][name]), name
    for kind in ("static", "dynamic"):
        for run in ("uninterrupted", "resumed"):
            assert torch.equal(rank0[run][kind], rank1[run][kind]), (run, kind)
        assert torch.equal(rank0["uninterrupted"][kind], rank0["resumed"][kind]), kind
        assert _accuracy(rank0["uninterrupted"][kind], rank0["uninterrupted"]["labels"]) >= 0.85, kind


@pytest.mark.slow
def test_low_bit_qat_of_a_language_model_sharded_block_by_block_converts_alike_on_both_ranks(tmp_path: Path):
    rank0, rank1 = _run(tmp_path, "lowbit")
    assert not rank0["sharded"] and torch.equal(rank0["logits"], rank1["logits"])
    assert rank0["losses"] == rank1["losses"]
    # int8 activations and int4 weights cost little against the float copy of the same trained weights
    assert rank0["losses"]["low-bit"] <= 1.05 * rank0["losses"]["float"]


@pytest.mark.slow
def test_low_bit_qat_of_a_wholly_sharded_language_model_resumes_from_its_distributed_checkpoint_exactly(tmp_path: Path):
    """Low-bit QAT (8da4w) of a language model sharded block by block and as a whole: a run resumed from the epoch-1
    distributed checkpoint (QAT on since epoch 1) ends with the uninterrupted run's weights and low-bit logits."""
    ranks = _run(tmp_path, "lowbit_resume")
    assert (tmp_path / "checkpoints" / "epoch=1.ckpt").is_dir()
    for ends in ranks:
        uninterrupted, resumed = ends["uninterrupted"], ends["resumed"]
        assert resumed["global_step"] == uninterrupted["global_step"]
        assert set(resumed["weights"]) == set(uninterrupted["weights"])
        for name, weight in uninterrupted["weights"].items():
            assert torch.equal(weight, resumed["weights"][name]), name
        assert torch.equal(uninterrupted["logits"], resumed["logits"])
    assert torch.equal(ranks[0]["uninterrupted"]["logits"], ranks[1]["uninterrupted"]["logits"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["resume", pytest.param("resume_pt2e", id="torch_export_engine")])
def test_a_sharded_run_resumed_from_its_distributed_checkpoint_ends_as_the_uninterrupted_one(tmp_path: Path, mode: str):
    ranks = _run(tmp_path, mode)
    assert (tmp_path / "checkpoints" / "epoch=1.ckpt").is_dir()  # each rank wrote its shards
    for ends in ranks:
        uninterrupted, resumed = ends["uninterrupted"], ends["resumed"]
        assert uninterrupted["masks"] and set(uninterrupted["masks"]) == set(resumed["masks"])
        assert all(torch.equal(uninterrupted["masks"][name], resumed["masks"][name]) for name in uninterrupted["masks"])
        assert set(uninterrupted["weights"]) == set(resumed["weights"])
        assert all(torch.equal(uninterrupted["weights"][k], resumed["weights"][k]) for k in uninterrupted["weights"])
        assert torch.equal(uninterrupted["predictions"], resumed["predictions"])
        # the dense baseline, kept in slices and written whole into the checkpoint, comes back as it was
        assert set(uninterrupted["dense"]) == set(resumed["dense"])
        assert all(torch.equal(uninterrupted["dense"][k], resumed["dense"][k]) for k in uninterrupted["dense"])
    assert torch.equal(ranks[0]["resumed"]["predictions"], ranks[1]["resumed"]["predictions"])
    dense, pruned = ranks[0]["uninterrupted"]["dense"], ranks[0]["uninterrupted"]["weights"]
    assert any(not torch.equal(dense[f"net.{name}"], pruned[name]) for name in pruned if f"net.{name}" in dense)


@pytest.mark.slow
def test_channel_pruning_under_fsdp2_removes_alike_on_both_ranks_and_resumes_exactly(tmp_path: Path):
    """Masks computed on whole weights (gathered) zero the same channels on both ranks; at fit end a whole copy
    loses them and computes what the masked network does; a run resumed from the epoch-1 distributed checkpoint
    ends with the same masks, weights and smaller network."""
    ranks = _run(tmp_path, "channels")
    for ends in ranks:
        uninterrupted, resumed = ends["uninterrupted"], ends["resumed"]
        assert uninterrupted["removed"] and not uninterrupted["sharded"]
        shrunk, dense = uninterrupted["parameters"]
        assert shrunk < 0.6 * dense
        assert torch.allclose(uninterrupted["shrunken"], uninterrupted["masked"], atol=1e-4)
        assert uninterrupted["masks"] and set(uninterrupted["masks"]) == set(resumed["masks"])
        for name, mask in uninterrupted["masks"].items():
            assert torch.equal(mask, resumed["masks"][name]), name
            assert torch.count_nonzero(uninterrupted["weights"][name.removeprefix("net.")][~mask.bool()]) == 0, name
        assert all(torch.equal(uninterrupted["weights"][k], resumed["weights"][k]) for k in uninterrupted["weights"])
        assert torch.equal(uninterrupted["shrunken"], resumed["shrunken"])
    assert torch.equal(ranks[0]["uninterrupted"]["shrunken"], ranks[1]["uninterrupted"]["shrunken"])
    assert _accuracy(ranks[0]["uninterrupted"]["shrunken"], ranks[0]["uninterrupted"]["labels"]) >= 0.8
    assert [path.name for path in tmp_path.glob("model_pruned*")] == ["model_pruned.pt"]  # exported once
    assert (tmp_path / "pruning.png").is_file()


@pytest.mark.slow
def test_channels_removed_mid_fit_under_fsdp2_train_on_sharded_and_resume_exactly(tmp_path: Path):
    """The channels leave the live network at shrink_epoch: the smaller network is sharded again by the user's
    configure_model and trains on (both ranks alike, about half the weights); runs resumed from a distributed
    checkpoint written before the shrink and from one written after it end with the same weights."""
    ranks = _run(tmp_path, "shrink")
    dense = sum(parameter.numel() for parameter in ImageClassifier().net.parameters())
    for ends in ranks:
        uninterrupted = ends["uninterrupted"]
        assert uninterrupted["shrunk"] and uninterrupted["sharded"]
        assert sum(tensor.numel() for tensor in uninterrupted["weights"].values()) < 0.6 * dense
        for run in ("resumed_before", "resumed_after"):
            resumed = ends[run]
            assert resumed["shrunk"] and resumed["sharded"] and resumed["global_step"] == uninterrupted["global_step"]
            for name, weight in uninterrupted["weights"].items():
                assert torch.equal(weight, resumed["weights"][name]), (run, name)
            assert torch.equal(uninterrupted["shrunken"], resumed["shrunken"]), run
    assert all(torch.equal(ranks[0]["uninterrupted"]["weights"][k], v) for k, v in ranks[1]["uninterrupted"]["weights"].items())
    assert _accuracy(ranks[0]["uninterrupted"]["shrunken"], ranks[0]["uninterrupted"]["labels"]) >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "checkpoints"),
    [
        pytest.param("shrink_qat", "distributed", id="default_engine"),
        pytest.param("shrink_qat_fx", "distributed", id="fx_engine"),
        pytest.param("shrink_qat", "full", id="default_engine-full_checkpoints"),
    ],
)
def test_channels_removed_at_qat_start_under_fsdp2_then_qat_of_the_sharded_smaller_network_resumes_exactly(
    tmp_path: Path, mode: str, checkpoints: str
):
    """Channel pruning beside QAT under FSDP2: the channels leave the live network at QAT's start, QAT prepares the
    smaller network gathered whole, and the user's configure_model shards it again (QAT listed first: the shrink
    still comes first). Both ranks end with the same smaller int8 model; runs resumed from the distributed checkpoint
    written before the shrink and from the one written after QAT prepared end as the uninterrupted run, observers'
    buffers included: a full checkpoint (one file) gave the torch.export engine's observers float32's eps for their
    own 2**-12 (torch's observers read the key-by-key dicts Lightning loads such a file with as an old version's)."""
    ranks = _run(tmp_path, mode, checkpoints)
    assert (tmp_path / "checkpoints" / "epoch=2.ckpt").is_file() == (checkpoints == "full")
    dense = sum(parameter.numel() for parameter in ImageClassifier().net.parameters())
    for ends in ranks:
        uninterrupted = ends["uninterrupted"]
        assert uninterrupted["shrunk"] and uninterrupted["sharded"] and uninterrupted["prepared"] == ["net"]
        assert uninterrupted["parameters"] < 0.6 * dense
        for run in ("resumed_before", "resumed_after"):
            resumed = ends[run]
            assert resumed["sharded"] and resumed["global_step"] == uninterrupted["global_step"], run
            assert set(resumed["weights"]) == set(uninterrupted["weights"]), run
            for name, weight in uninterrupted["weights"].items():
                assert torch.equal(weight, resumed["weights"][name]), (run, name)
            assert torch.equal(uninterrupted["predictions"], resumed["predictions"]), run
    for name, weight in ranks[0]["uninterrupted"]["weights"].items():
        assert torch.equal(weight, ranks[1]["uninterrupted"]["weights"][name]), name
    assert torch.equal(ranks[0]["uninterrupted"]["predictions"], ranks[1]["uninterrupted"]["predictions"])
    assert _accuracy(ranks[0]["uninterrupted"]["predictions"], ranks[0]["uninterrupted"]["labels"]) >= 0.9


@pytest.mark.slow
def test_a_fresh_module_tests_from_a_qat_distributed_checkpoint(tmp_path: Path):
    """``trainer.test(fresh_module, ckpt_path=folder)`` under FSDP2: the fake-quant structure is rebuilt before the
    distributed checkpoint loads into it (its per-channel ranges shaped as saved), and configure_model shards it
    again; the tested network computes what the trained one did, on both ranks."""
    ranks = _run(tmp_path, "test_ckpt")
    for ends in ranks:
        assert torch.equal(ends["tested"], ends["trained"])
        assert ends["metrics"][0]["test/acc"] >= 0.8
    assert torch.equal(ranks[0]["trained"], ranks[1]["trained"])

    # The same checkpoint (written by 2 processes, after QAT began observing) resumes a fit on one process: it starts
    # from the weights, ranges and statistics the 2-process run ended with, and goes on to an int8 model.
    from fsdp2_fit import ShardedClassifier, _test_images

    images, labels = _test_images()

    class StartingPoint(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {name: full_tensor(tensor.detach()).clone() for name, tensor in pl_module.net.state_dict().items()}

    start = StartingPoint()
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, export_format="none")
    trainer = _one_process_sharded_trainer(tmp_path, [qat, start], max_epochs=3)
    trainer.fit(
        ShardedClassifier(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "checkpoints" / "epoch=1.ckpt")
    )
    assert trainer.current_epoch == 3
    saved = ranks[0]["state"]
    assert set(start.state) == set(saved) and any(name.endswith("scale") for name in saved)
    # all but the switches, which QAT turned off at fit end after the checkpoint was written
    differ = [name for name in saved if not name.endswith("_enabled") and not torch.equal(start.state[name], saved[name])]
    assert not differ, [(name, start.state[name].flatten()[:4], saved[name].flatten()[:4]) for name in differ][:4]
    with torch.no_grad():
        assert _accuracy(qat.quantized_model(images), labels) >= 0.8


@pytest.mark.slow
def test_pruning_and_qat_with_the_torch_export_engine_under_fsdp2_end_alike_on_both_ranks(tmp_path: Path):
    """The exported graph QAT prepares is what the user's configure_model shards: masks on its sharded weights,
    observers and int8 model identical on both ranks, the .pt2 written once."""
    rank0, rank1 = _run(tmp_path, "pt2e")
    assert rank0["sharded"]
    assert all(torch.equal(rank0["weights"][name], rank1["weights"][name]) for name in rank0["weights"])
    assert any(name.endswith("scale") for name in rank0["weights"])  # the fake-quants' ranges are among them
    assert rank0["masks"] and all(torch.equal(rank0["masks"][name], rank1["masks"][name]) for name in rank0["masks"])
    for name, mask in rank0["masks"].items():  # masks keep float names; the graph holds the weights under graph.
        weight = rank0["weights"]["graph." + name.removeprefix("net.")]
        assert torch.count_nonzero(weight[~mask.bool()]) == 0, name
    assert 0.55 <= rank0["sparsity"] == rank1["sparsity"]
    assert torch.equal(rank0["predictions"], rank1["predictions"])
    assert _accuracy(rank0["predictions"], rank0["labels"]) >= 0.9
    assert [path.name for path in tmp_path.glob("*.pt2")] == ["model_int8.pt2"]


@pytest.mark.slow
def test_distillation_with_student_and_teacher_sharded_trains_one_student_on_both_ranks(tmp_path: Path):
    """A user's DistillationModule subclass shards student and teacher in configure_model: the student learns from
    the frozen teacher, which ends as it started, and both ranks hold the same student, BatchNorm statistics
    included (FSDP2 leaves buffers to each rank; the module takes rank 0's after each step)."""
    rank0, rank1 = _run(tmp_path, "distill")
    assert all(torch.equal(rank0["student"][name], rank1["student"][name]) for name in rank0["student"])
    assert any(name.endswith("running_mean") for name in rank0["student"])
    assert all(torch.equal(rank0["teacher"][name], rank0["trained_teacher"][name]) for name in rank0["trained_teacher"])
    assert torch.equal(rank0["predictions"], rank1["predictions"])
    assert _accuracy(rank0["predictions"], rank0["labels"]) >= 0.8
    assert _accuracy(rank0["teacher_predictions"], rank0["labels"]) >= 0.95
    # the report: the sharded module and teacher gathered whole on every rank, measured on rank 0 alone (sharded,
    # rank 0 would wait forever for rank 1's slices)
    assert rank0["reported_sharded"] == rank1["reported_sharded"] == [] and rank1["report"] is None
    assert set(rank0["report"]) == {"fp32", "teacher"}
    assert rank0["report"]["fp32"] == pytest.approx(_accuracy(rank0["predictions"], rank0["labels"]))
    assert rank0["report"]["teacher"] == pytest.approx(_accuracy(rank0["teacher_predictions"], rank0["labels"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "checkpoints"),
    [
        pytest.param("lsq", "distributed", id="fx_engine"),
        pytest.param("lsq_pt2e", "distributed", id="torch_export_engine"),
        pytest.param("lsq", "full", id="fx_engine-full_checkpoints"),
    ],
)
def test_learned_ranges_under_fsdp2_start_from_the_observers_learn_alike_on_both_ranks_and_resume_exactly(
    tmp_path: Path, mode: str, checkpoints: str
):
    """LSQ's range parameters are sharded like the weights: the ranges the observers set (written by each call into
    FSDP2's gathered copy, which it frees) reach the slices the ranks hold, so the ranges start learning from them;
    each rank steps its slices, and both ranks end with the same ranges and int8 model. Runs resumed from a
    distributed checkpoint written while the observers were on, and from one written while the ranges learned, end
    as the uninterrupted run did."""
    rank0, rank1 = _run(tmp_path, mode, checkpoints)
    assert (tmp_path / "checkpoints" / "epoch=1.ckpt").is_file() == (checkpoints == "full")
    uninterrupted = rank0["uninterrupted"]
    assert uninterrupted["sharded"] and uninterrupted["ranges"]
    assert {name.rsplit(".", 1)[-1] for name in uninterrupted["ranges"]} == {"scale", "zero_point"}
    for run in ("uninterrupted", "resumed_observing"):
        observed, observers = rank0[run]["observed"], rank0[run]["observers"]
        assert set(observers) <= set(observed) and observers
        for name, scale in observers.items():  # where the ranges start learning: the frozen observers' ranges
            assert torch.equal(observed[name].flatten(), scale.to(observed[name].dtype)), (run, name)
    moved = [
        name
        for name, scale in uninterrupted["ranges"].items()
        if name.endswith("scale") and not torch.equal(scale, uninterrupted["observed"][name])
    ]
    assert len(moved) == len(rank0["uninterrupted"]["observers"])  # every scale learned
    for name, value in uninterrupted["ranges"].items():
        assert torch.equal(value, rank1["uninterrupted"]["ranges"][name]), name
    assert torch.equal(uninterrupted["predictions"], rank1["uninterrupted"]["predictions"])
    for ends in (rank0, rank1):
        for run in ("resumed_observing", "resumed_learning"):
            resumed = ends[run]
            assert set(resumed["weights"]) == set(ends["uninterrupted"]["weights"])
            for name, weight in ends["uninterrupted"]["weights"].items():
                assert torch.equal(weight, resumed["weights"][name]), (run, name)
            assert torch.equal(ends["uninterrupted"]["predictions"], resumed["predictions"]), run
    assert _accuracy(uninterrupted["predictions"], uninterrupted["labels"]) >= 0.9


def test_strategies_the_callbacks_cannot_run_under_are_named_with_the_supported_ones():
    with pytest.raises(
        ValueError,
        match=r"^MagnitudePruning cannot run under strategy FSDPStrategy: supported are .*"
        r"ModelParallelStrategy with fully_shard \(FSDP2\).*call torch.distributed.fsdp.fully_shard in "
        r"configure_model",
    ):
        check_strategy(SimpleNamespace(strategy=FSDPStrategy(), world_size=2), "MagnitudePruning")
    deepspeed_like = type("DeepSpeedStrategy", (DDPStrategy,), {})()  # Lightning's is a DDPStrategy subclass
    with pytest.raises(ValueError, match=r"^QuantizationAwareTraining cannot run under strategy DeepSpeedStrategy"):
        check_strategy(SimpleNamespace(strategy=deepspeed_like, world_size=2), "QuantizationAwareTraining")
    for supported in (DDPStrategy(), ModelParallelStrategy()):
        check_strategy(SimpleNamespace(strategy=supported, world_size=2), "MagnitudePruning")


def _one_process_sharded_trainer(tmp_path: Path, callbacks: list = (), max_epochs: int = 1) -> L.Trainer:
    """A quiet Trainer (one epoch unless told) under ModelParallelStrategy on one process: enough to reach the
    refusals made before training, or to resume a 2-process run on one."""
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        strategy=ModelParallelStrategy(),
        callbacks=list(callbacks),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
    )


def test_distillation_hints_whose_adapters_stay_whole_under_fsdp2_stop_before_training(tmp_path: Path):
    """DistillationModule's configure_optimizers shards the hint adapters (built in setup); a subclass whose own
    configure_optimizers skips it would leave them whole, each rank training its own: one line before training."""
    from torch.distributed.fsdp import fully_shard

    from lightning_compress import DistillationModule
    from lightning_compress.app.models import SmallCNN

    class AdaptersLeftWhole(DistillationModule):
        def configure_model(self):
            for network in (self.student, self.teacher):
                fully_shard(network, mesh=self.device_mesh["data_parallel"])

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters())

    module = AdaptersLeftWhole(student=SmallCNN(), teacher=SmallCNN().eval(), hints={"features.4": "features.4"})
    trainer = _one_process_sharded_trainer(tmp_path)
    with pytest.raises(ValueError, match=r"^DistillationModule\(hints=\.\.\.\) under FSDP2: the hint adapters are not sharded"):
        trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert all(parameter.grad is None for parameter in module.student.parameters())


def test_a_whole_copy_of_a_sharded_distillation_module_keeps_its_student_one_network_and_gathers_its_teacher(tmp_path: Path):
    """``full_copy`` (the report's rows, QAT's conversion) of a DistillationModule whose configure_model shards a
    LightningModule student and the teacher: the teacher, held as a plain attribute, comes out whole, and the
    student, held both as the child ``net`` and as the LightningModule whose configure_optimizers is reused, stays one
    network in the copy."""
    from torch.distributed.fsdp import fully_shard

    from lightning_compress import DistillationModule
    from lightning_compress.sharding import full_copy, is_sharded

    class Sharded(DistillationModule):
        def configure_model(self):
            for network in (self.student, self.teacher):
                fully_shard(network, mesh=self.device_mesh["data_parallel"])

    module = Sharded(student=ImageClassifier(), teacher=ImageClassifier().net.eval())
    trainer = _one_process_sharded_trainer(tmp_path)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=32))
    assert is_sharded(module.student) and is_sharded(module.teacher)
    copy = full_copy(module)
    assert not is_sharded(copy.student) and not is_sharded(copy.teacher) and copy.teacher is not module.teacher
    assert copy._student_module is copy.net
    images = torch.randn(4, 1, 8, 8)
    module.eval()
    with torch.no_grad():
        assert torch.equal(copy.eval()(images), module(images))
        assert torch.equal(copy.teacher(images), module.teacher(images))


@pytest.mark.slow
def test_distillation_hints_under_fsdp2_train_one_sharded_adapter_and_resume_exactly(tmp_path: Path):
    """The hint adapters are sharded like the student (FSDP2 averages their gradients), the frozen teacher left whole
    by configure_model: both ranks end with the same student and adapter, the adapter trained, the teacher as it
    was; a run resumed from the epoch-1 distributed checkpoint ends as the uninterrupted one."""
    rank0, rank1 = _run(tmp_path, "distill_hints")
    for run in ("uninterrupted", "resumed"):
        assert rank0[run]["adapter_sharded"] and rank1[run]["adapter_sharded"]
        assert rank0[run]["teacher_whole"] and rank0[run]["teacher_unchanged"] and rank1[run]["teacher_unchanged"]
        for part in ("student", "adapter"):
            assert all(torch.equal(rank0[run][part][name], rank1[run][part][name]) for name in rank0[run][part]), (run, part)
    uninterrupted = rank0["uninterrupted"]
    assert any(
        not torch.equal(uninterrupted["adapter"][k], uninterrupted["adapter_at_start"][k]) for k in uninterrupted["adapter"]
    )
    for part in ("student", "adapter"):
        assert all(torch.equal(uninterrupted[part][k], rank0["resumed"][part][k]) for k in uninterrupted[part]), part
    assert torch.equal(uninterrupted["predictions"], rank0["resumed"]["predictions"])
    assert _accuracy(uninterrupted["predictions"], uninterrupted["labels"]) >= 0.8


@pytest.mark.slow
def test_a_one_process_qat_checkpoint_resumes_on_two(tmp_path: Path):
    """The other way round: one process trains QAT under ModelParallelStrategy and writes a distributed checkpoint;
    two processes resume from it, each starting from exactly that state, and end with the same int8 model."""
    from fsdp2_fit import ShardedClassifier

    L.seed_everything(0)
    model = ShardedClassifier()
    trainer = _one_process_sharded_trainer(
        tmp_path, [QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, export_format="none")], max_epochs=2
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    saved = {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()}
    forget_process_group()  # the two processes start their own
    ranks = _run(tmp_path, "resume_from_one")
    for ends in ranks:
        assert ends["epoch"] == 3
        assert set(ends["start"]) == set(saved) and any(name.endswith("scale") for name in saved)
        # all but the switches, which QAT set off at the end of the one-process fit and its schedule sets again
        differ = [name for name in saved if not name.endswith("_enabled") and not torch.equal(ends["start"][name], saved[name])]
        assert not differ, differ[:6]
    assert torch.equal(ranks[0]["predictions"], ranks[1]["predictions"])
    assert _accuracy(ranks[0]["predictions"], ranks[0]["labels"]) >= 0.8


class _WhollyShardedClassifier(ImageClassifier):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if not isinstance(self, FSDPModule):
            fully_shard(self, mesh=self.device_mesh["data_parallel"])


def test_testing_a_fresh_wholly_sharded_module_from_a_qat_checkpoint_names_the_sharding_to_change(tmp_path: Path):
    """A LightningModule that shards itself as a whole cannot have its networks swapped for QAT's rebuilt ones: one
    line says to shard the networks instead."""
    trainer = _one_process_sharded_trainer(tmp_path, [QuantizationAwareTraining(start_epoch=0, export_format="none")])
    trainer.fit(_WhollyShardedClassifier(), datamodule=DigitsDataModule(batch_size=32))
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    assert (tmp_path / "qat.ckpt").is_dir()  # a distributed checkpoint
    tester = _one_process_sharded_trainer(tmp_path, [QuantizationAwareTraining(start_epoch=0, export_format="none")])
    with pytest.raises(ValueError, match=r"shards the LightningModule itself.*fully_shard\(self\.net\)"):
        tester.test(_WhollyShardedClassifier(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(tmp_path / "qat.ckpt"))
