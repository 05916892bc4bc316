"""Run by test_fsdp2.py: the callbacks under Lightning's ModelParallelStrategy with FSDP2 (``fully_shard`` in the
user's ``configure_model``) on 2 CPU processes (gloo); each rank dumps what it ended with, gathered whole.

Lightning's launcher starts rank 1 by re-running this script, so it must be a script, not a test.
"""

import os
import sys
import warnings
import weakref
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from lightning_compress import (
    DistillationModule,
    DynamicQuantization,
    MagnitudePruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier, SmallCNN
from lightning_compress.app.text import ByteTransformer, PythonSourceDataModule
from lightning_compress.lowbit_quantization import LowBitLinearConfig
from lightning_compress.report import CompressionReport, models_to_report
from lightning_compress.sharding import full_tensor, is_sharded

warnings.filterwarnings("ignore")


class ShardedClassifier(ImageClassifier):
    """The app's digits classifier, its network sharded as a user shards it for ModelParallelStrategy."""

    def configure_model(self) -> None:
        if not isinstance(self.net, FSDPModule):  # called again by a later trainer.test: shard once
            fully_shard(self.net, mesh=self.device_mesh["data_parallel"])


# Lightning's distributed checkpoints (a folder, each rank writing its shards) unless the test sets it to "full"
# (one file with the whole state dict, ``save_distributed_checkpoint=False``)
CHECKPOINTS = os.environ.get("FSDP2_CHECKPOINTS", "distributed")


def _sharded_trainer(max_epochs: int, callbacks: list, folder: Path | None = None, **kwargs) -> L.Trainer:
    """A quiet Trainer on 2 CPU processes under ModelParallelStrategy, data-parallel only (FSDP2)."""
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=CHECKPOINTS != "full"
    )
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=None if folder is None else str(folder),
        **kwargs,
    )


def _fit(model: L.LightningModule, max_epochs: int, callbacks: list, folder: Path, **kwargs) -> L.Trainer:
    trainer = _sharded_trainer(max_epochs, callbacks, folder, **kwargs)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return trainer


def _fit_from(
    model: L.LightningModule,
    max_epochs: int,
    callbacks: list,
    output: Path,
    start: str | None,
    datamodule: L.LightningDataModule | None = None,
    **kwargs,
) -> L.Trainer:
    """A sharded fit (on the digits unless ``datamodule`` says otherwise): uninterrupted (``start`` None), writing a
    checkpoint each epoch into ``output/checkpoints``; else resumed from the checkpoint named ``start`` there."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    if start is None:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=output / "checkpoints", save_top_k=-1, filename="{epoch}")]
    trainer = _sharded_trainer(max_epochs, callbacks, output, enable_checkpointing=start is None, **kwargs)
    resume_from = None if start is None else str(output / "checkpoints" / start)
    trainer.fit(model, datamodule=datamodule or DigitsDataModule(batch_size=32), ckpt_path=resume_from)
    return trainer


def _test_images() -> tuple[torch.Tensor, torch.Tensor]:
    digits = DigitsDataModule()
    digits.setup()
    return digits.test_set.tensors


class WeightsBeforePruning(L.Callback):
    """The network's weights, gathered whole, as the first training batch starts (before pruning's hook runs); and
    how many of the parameters built whole in ``__init__`` are still alive when training ends (sharding replaced them)."""

    def __init__(self, model: L.LightningModule) -> None:
        self.built = [weakref.ref(parameter) for parameter in model.parameters()]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.weights = {name: full_tensor(tensor.detach()).clone() for name, tensor in pl_module.state_dict().items()}

    def on_train_end(self, trainer, pl_module) -> None:
        self.alive = sum(reference() is not None for reference in self.built)


def pruning_and_qat(output: Path) -> None:
    """Unstructured pruning, then QAT of the pruned network, sharded; int8 exported once."""
    L.seed_everything(0)
    model = ShardedClassifier()
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=0, end_epoch=2, update_every=3, export_format="none", plot=False)
    qat = QuantizationAwareTraining(
        start_epoch=2, freeze_bn_epoch=3, backend="x86", export_format="torchscript", export_dir=str(output)
    )
    before = WeightsBeforePruning(model)
    trainer = _fit(model, 4, [before, pruning, qat], output, enable_checkpointing=False)
    dense = pruning.dense_model.state_dict()
    images, labels = _test_images()
    with torch.no_grad():
        predictions = qat.quantized_model(images)
    weights = {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()}
    observers = {name: tensor for name, tensor in weights.items() if name.rsplit(".", 1)[-1] in ("min_val", "max_val")}
    torch.save(
        {
            "masks": {name: mask.cpu() for name, mask in pruning.masks.items()},
            "weights": weights,
            "observers": observers,
            "sparsity": pruning.measured_sparsity(model)[0],
            "dense_sharded": is_sharded(pruning.dense_model) or is_sharded(qat.quantized_model),
            # the report's dense baseline is the network as pruning began (each rank held its slices until fit end)
            "whole_parameters_alive": before.alive,
            "dense_as_before": set(dense) == set(before.weights)
            and all(torch.equal(dense[name], before.weights[name]) for name in dense),
            "predictions": predictions,
            "labels": labels,
        },
        output / f"prune_qat_rank{trainer.global_rank}.pt",
    )


def post_training(output: Path) -> None:
    """A sharded fit, then post-training static and dynamic int8 of the gathered weights; checkpointed each epoch,
    then a fresh sharded run resumed from the epoch-0 distributed checkpoint. Each run's int8 predictions, per rank."""
    ends = {}
    for run, start in (("uninterrupted", None), ("resumed", "epoch=0.ckpt")):
        L.seed_everything(0)
        model = ShardedClassifier()
        ptq = PostTrainingQuantization(calibration_batches=4, export_format="none")
        dynamic = DynamicQuantization(export_format="none")
        trainer = _fit_from(model, 2, [ptq, dynamic], output, start)
        images, labels = _test_images()
        with torch.no_grad():
            ends[run] = {
                "static": ptq.quantized_model(images),
                "dynamic": dynamic.quantized_model(images),
                "labels": labels,
                "weights": {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()},
            }
    torch.save(ends, output / f"ptq_rank{trainer.global_rank}.pt")


class ShardedLanguageModel(ByteTransformer):
    """The app's byte-level language model, sharded as the FSDP2 guides shard a transformer: each block, then the
    whole module."""

    def configure_model(self) -> None:
        if isinstance(self, FSDPModule):
            return
        mesh = self.device_mesh["data_parallel"]
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self, mesh=mesh)


def low_bit(output: Path) -> None:
    """Low-bit QAT (8da4w) of a language model sharded block by block and whole."""
    L.seed_everything(0)
    data = PythonSourceDataModule(block_size=32, batch_size=16, train_bytes=40_000, eval_bytes=4_000)
    model = ShardedLanguageModel(block_size=32, width=64, layers=2, heads=2)
    qat = QuantizationAwareTraining(start_epoch=1, config=LowBitLinearConfig(scheme="8da4w"), export_format="none")
    trainer = _sharded_trainer(2, [qat], enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    data.setup("test")
    tokens, labels = next(iter(data.test_dataloader()))
    losses, logits = {}, {}
    with torch.no_grad():
        for name, network in (("float", qat.float_model(model)), ("low-bit", qat.quantized_model)):
            logits[name] = network(tokens)
            losses[name] = float(torch.nn.functional.cross_entropy(logits[name].flatten(0, 1), labels.flatten()))
    ends = {"losses": losses, "logits": logits["low-bit"], "sharded": is_sharded(qat.quantized_model)}
    torch.save(ends, output / f"lowbit_rank{trainer.global_rank}.pt")


def low_bit_resumed(output: Path) -> None:
    """Low-bit QAT (8da4w) of the language model sharded block by block and whole, checkpointed each epoch; then a
    fresh sharded run resumed from the epoch-1 distributed checkpoint (low-bit QAT on since epoch 1). Each run's
    gathered weights and low-bit logits, per rank."""
    ends = {}
    for run, start in (("uninterrupted", None), ("resumed", "epoch=1.ckpt")):
        L.seed_everything(0)
        data = PythonSourceDataModule(block_size=32, batch_size=16, train_bytes=20_000, eval_bytes=4_000)
        model = ShardedLanguageModel(block_size=32, width=64, layers=2, heads=2)
        qat = QuantizationAwareTraining(start_epoch=1, config=LowBitLinearConfig(scheme="8da4w"), export_format="none")
        trainer = _fit_from(model, 3, [qat], output, start, datamodule=data, limit_val_batches=0)
        data.setup("test")
        tokens, _ = next(iter(data.test_dataloader()))
        with torch.no_grad():
            logits = qat.quantized_model(tokens)
        ends[run] = {
            "weights": {name: full_tensor(tensor.detach()).clone() for name, tensor in model.state_dict().items()},
            "logits": logits,
            "global_step": trainer.global_step,
        }
    torch.save(ends, output / f"lowbit_resume_rank{trainer.global_rank}.pt")


def resume(output: Path, backend: str = "x86", mode: str = "resume") -> None:
    """Pruning and QAT (with ``backend``'s engine) sharded, checkpointed each epoch (Lightning's distributed
    checkpoints: each rank writes its shards); then a fresh sharded run resumed mid-ramp from the epoch-1 checkpoint.
    Both runs' ends are dumped."""

    ends = {}
    for run, start in (("uninterrupted", None), ("resumed", "epoch=1.ckpt")):
        L.seed_everything(0)
        model = ShardedClassifier()
        pruning = MagnitudePruning(
            final_sparsity=0.6, start_epoch=0, end_epoch=2, update_every=3, export_format="none", plot=False
        )
        qat = QuantizationAwareTraining(start_epoch=2, freeze_bn_epoch=3, export_format="none", backend=backend)
        trainer = _fit_from(model, 4, [pruning, qat], output, start)
        images, _ = _test_images()
        with torch.no_grad():
            predictions = qat.quantized_model(images)
        ends[run] = {
            "masks": {name: mask.cpu() for name, mask in pruning.masks.items()},
            "weights": {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()},
            "dense": pruning.dense_model.state_dict(),
            "predictions": predictions,
        }
    torch.save(ends, output / f"{mode}_rank{trainer.global_rank}.pt")


def channels(output: Path) -> None:
    """Channel pruning sharded: masks on the sharded weights during training, the channels removed from a whole
    copy at fit end (exported once); checkpointed each epoch, then a fresh sharded run resumed mid-ramp from the
    epoch-1 distributed checkpoint. Both runs' ends are dumped."""

    ends = {}
    for run, start in (("uninterrupted", None), ("resumed", "epoch=1.ckpt")):
        L.seed_everything(0)
        model = ShardedClassifier()
        pruning = MagnitudePruning(
            mode="channels", final_sparsity=0.5, start_epoch=0, end_epoch=2, update_every=3, export_dir=str(output)
        )  # plot=True, the default: every rank measures, rank 0 draws
        trainer = _fit_from(model, 3, [pruning], output, start)
        images, labels = _test_images()
        gathered = ImageClassifier()  # a plain network, given the trained weights below
        weights = {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()}
        gathered.net.load_state_dict(weights)
        with torch.no_grad():
            shrunken, masked = pruning.pruned_model.net(images), gathered.net.eval()(images)
        ends[run] = {
            "masks": {name: mask.cpu() for name, mask in pruning.masks.items()},
            "weights": weights,
            "shrunken": shrunken,
            "masked": masked,
            "labels": labels,
            "parameters": (
                sum(p.numel() for p in pruning.pruned_model.parameters()),
                sum(p.numel() for p in gathered.parameters()),
            ),
            "removed": pruning.channels_removed,
            "sharded": is_sharded(pruning.pruned_model),
        }
    torch.save(ends, output / f"channels_rank{trainer.global_rank}.pt")


def shrink(output: Path) -> None:
    """Channel pruning sharded, the channels removed from the live network at the start of epoch 2: the smaller
    network sharded again by configure_model, training on with its optimizer state cut; checkpointed each epoch, then
    resumed from before the shrink (epoch 1) and from after it (epoch 2). Each run's end is dumped."""

    ends = {}
    for run, start in (("uninterrupted", None), ("resumed_before", "epoch=1.ckpt"), ("resumed_after", "epoch=2.ckpt")):
        L.seed_everything(0)
        model = ShardedClassifier()
        pruning = MagnitudePruning(
            mode="channels",
            final_sparsity=0.5,
            start_epoch=0,
            end_epoch=2,
            shrink_epoch=2,
            update_every=3,
            export_format="none",
            plot=False,
        )
        trainer = _fit_from(model, 4, [pruning], output, start)
        images, labels = _test_images()
        with torch.no_grad():
            shrunken = pruning.pruned_model.net(images)
        ends[run] = {
            "weights": {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()},
            "shrunken": shrunken,
            "labels": labels,
            "sharded": is_sharded(model.net),
            "shrunk": pruning.shrunk,
            "global_step": trainer.global_step,
        }
    torch.save(ends, output / f"shrink_rank{trainer.global_rank}.pt")


def shrink_then_qat(output: Path, backend: str | None, mode: str) -> None:
    """Channel pruning beside QAT (``backend``'s engine; the default with None), sharded: the channels leave the live
    network at QAT's start_epoch (2), QAT prepares the smaller network, and configure_model shards it again;
    checkpointed each epoch, then resumed from before the shrink (epoch 1) and from after QAT prepared (epoch 2).
    Each run's gathered weights and int8 predictions, per rank."""

    ends = {}
    for run, start in (("uninterrupted", None), ("resumed_before", "epoch=1.ckpt"), ("resumed_after", "epoch=2.ckpt")):
        L.seed_everything(0)
        model = ShardedClassifier()
        pruning = MagnitudePruning(
            mode="channels", final_sparsity=0.5, start_epoch=0, end_epoch=2, update_every=3, export_format="none", plot=False
        )
        qat = QuantizationAwareTraining(
            start_epoch=2, freeze_bn_epoch=3, export_format="none", **({} if backend is None else {"backend": backend})
        )
        # QAT first: it has the shrink happen before it prepares, whatever the order
        trainer = _fit_from(model, 4, [qat, pruning], output, start)
        images, labels = _test_images()
        with torch.no_grad():
            predictions = qat.quantized_model(images)
        ends[run] = {
            "weights": {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()},
            "parameters": sum(tensor.numel() for tensor in qat.float_model(model).parameters()),
            "predictions": predictions,
            "labels": labels,
            "sharded": is_sharded(model.net),
            "shrunk": pruning.shrunk,
            "prepared": qat.prepared_names,
            "global_step": trainer.global_step,
        }
    torch.save(ends, output / f"{mode}_rank{trainer.global_rank}.pt")


def test_from_checkpoint(output: Path) -> None:
    """QAT sharded and checkpointed (a distributed checkpoint); then a fresh module tested from that checkpoint, as
    ``trainer.test(ckpt_path=...)`` is used after training. The int8 predictions of both, per rank."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0)
    model = ShardedClassifier()
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, export_format="none")
    checkpoints = ModelCheckpoint(dirpath=output / "checkpoints", save_top_k=-1, filename="{epoch}")
    trainer = _sharded_trainer(2, [qat, checkpoints], output)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    images, _ = _test_images()
    state = {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()}
    model.eval()
    with torch.no_grad():
        trained = model.net(images)
    fresh, fresh_qat = ShardedClassifier(), QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, export_format="none")
    tester = _sharded_trainer(2, [fresh_qat], output)
    metrics = tester.test(
        fresh, datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(output / "checkpoints" / "epoch=1.ckpt")
    )
    fresh.eval()
    with torch.no_grad():
        tested = fresh.net(images)
    torch.save(
        {"trained": trained, "tested": tested, "metrics": metrics, "state": state},
        output / f"test_ckpt_rank{trainer.global_rank}.pt",
    )


def resume_from_one(output: Path) -> None:
    """A fit resumed on 2 processes from the distributed checkpoint one process wrote (``output/one.ckpt``): the
    state each rank starts from, and the int8 model it ends with."""
    L.seed_everything(0)

    class StartingPoint(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = {name: full_tensor(tensor.detach()).clone() for name, tensor in pl_module.net.state_dict().items()}

    start = StartingPoint()
    qat = QuantizationAwareTraining(start_epoch=1, freeze_bn_epoch=2, export_format="none")
    trainer = _sharded_trainer(3, [qat, start], output, enable_checkpointing=False)
    trainer.fit(ShardedClassifier(), datamodule=DigitsDataModule(batch_size=32), ckpt_path=str(output / "one.ckpt"))
    images, labels = _test_images()
    with torch.no_grad():
        predictions = qat.quantized_model(images)
    torch.save(
        {"start": start.state, "predictions": predictions, "labels": labels, "epoch": trainer.current_epoch},
        output / f"resume_from_one_rank{trainer.global_rank}.pt",
    )


class ShardedDistillation(DistillationModule):
    """Distillation as a user shards it: the student, which trains, sharded; the frozen teacher sharded too, so that
    neither is held whole on a rank."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for network in (self.student, self.teacher):
            if not isinstance(network, FSDPModule):
                fully_shard(network, mesh=mesh)


class ShardedStudent(DistillationModule):
    """Distillation with only the student sharded: the frozen teacher is held whole on each rank (it takes no
    gradients, so nothing needs reducing)."""

    def configure_model(self) -> None:
        if not isinstance(self.student, FSDPModule):
            fully_shard(self.student, mesh=self.device_mesh["data_parallel"])


def distillation(output: Path) -> None:
    """A small student distilled from a trained teacher, both sharded; the student's gathered weights and test
    predictions, and the teacher's, per rank."""
    teacher = _trained_teacher()
    trained_teacher = {name: tensor.detach().clone() for name, tensor in teacher.state_dict().items()}
    L.seed_everything(0)
    module = ShardedDistillation(student=SmallCNN(widths=(8, 16, 32)), teacher=teacher.eval(), temperature=4.0, alpha=0.9)
    trainer = _fit(module, 3, [], output, enable_checkpointing=False)
    module.eval()  # the student predicts with the BatchNorm statistics every rank took from rank 0
    images, labels = _test_images()
    student = {name: full_tensor(tensor.detach()).clone() for name, tensor in module.student.state_dict().items()}
    teacher_weights = {name: full_tensor(tensor.detach()).clone() for name, tensor in module.teacher.state_dict().items()}
    with torch.no_grad():
        predictions, teacher_predictions = module.student(images), module.teacher(images)
    # the report's models (the trained module and the teacher, both sharded) gathered on every rank (collective),
    # measured on rank 0 alone, as a user's script would
    reported = models_to_report(trainer, module)
    report = None
    if trainer.is_global_zero:
        measured = CompressionReport.from_models(reported, [(images, labels)], images[:1], runs=2, warmup=1)
        report = {row.name: row.accuracy for row in measured.measurements}
    torch.save(
        {
            "report": report,
            "reported_sharded": [name for name, network in reported.items() if is_sharded(network)],
            "student": student,
            "teacher": teacher_weights,
            "predictions": predictions,
            "teacher_predictions": teacher_predictions,
            "labels": labels,
            "trained_teacher": trained_teacher,
        },
        output / f"distill_rank{trainer.global_rank}.pt",
    )


def distillation_with_hints(output: Path) -> None:
    """Distillation with a hint (the student's last convolution pulled, through a learned adapter, towards the
    teacher's), the student sharded by configure_model and the teacher whole, checkpointed each epoch; then a fresh
    sharded run
    resumed from the epoch-1 distributed checkpoint. Each run's gathered student and adapter, and whether the adapter
    was sharded, per rank."""

    teacher = _trained_teacher()
    teacher_state = {name: tensor.detach().clone() for name, tensor in teacher.state_dict().items()}
    ends = {}
    for run, start in (("uninterrupted", None), ("resumed", "epoch=1.ckpt")):
        L.seed_everything(0)
        module = ShardedStudent(
            student=SmallCNN(widths=(8, 16, 32)),
            teacher=teacher.eval(),
            temperature=4.0,
            alpha=0.9,
            hints={"features.8": "features.8"},
        )
        adapter_before = None

        class AdapterAtStart(L.Callback):
            def on_train_start(self, trainer, pl_module) -> None:
                nonlocal adapter_before
                adapter_before = {k: full_tensor(v.detach()).clone() for k, v in pl_module.hint_adapters.state_dict().items()}

        trainer = _fit_from(module, 3, [AdapterAtStart()], output, start)
        module.eval()
        images, labels = _test_images()
        with torch.no_grad():
            predictions = module.student(images)
        ends[run] = {
            "student": {name: full_tensor(tensor.detach()).clone() for name, tensor in module.student.state_dict().items()},
            "adapter": {name: full_tensor(tensor.detach()).clone() for name, tensor in module.hint_adapters.state_dict().items()},
            "adapter_at_start": adapter_before,
            "adapter_sharded": all(isinstance(p, DTensor) for p in module.hint_adapters.parameters()),
            "teacher_whole": not any(isinstance(p, DTensor) for p in module.teacher.parameters()),
            "teacher_unchanged": all(
                torch.equal(module.teacher.state_dict()[name], tensor) for name, tensor in teacher_state.items()
            ),
            "hint_loss": float(trainer.callback_metrics["train/hint_loss"]),
            "predictions": predictions,
            "labels": labels,
        }
    torch.save(ends, output / f"distill_hints_rank{trainer.global_rank}.pt")


def _trained_teacher() -> torch.nn.Module:
    """The app's digits classifier trained for 3 epochs on one process, alike on each rank (same seed, same batches)."""
    L.seed_everything(0)
    teacher = ImageClassifier()
    L.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    ).fit(teacher, datamodule=DigitsDataModule(batch_size=32))
    return teacher.net


def pt2e(output: Path) -> None:
    """Unstructured pruning and QAT with the torch.export engine in one fit, the exported graph sharded by the
    user's configure_model; int8 exported once."""
    L.seed_everything(0)
    model = ShardedClassifier()
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=0, end_epoch=2, update_every=3, export_format="none", plot=False)
    qat = QuantizationAwareTraining(
        backend="x86_inductor", start_epoch=1, freeze_bn_epoch=2, export_format="torch_export", export_dir=str(output)
    )
    trainer = _fit(model, 3, [pruning, qat], output, enable_checkpointing=False)
    images, labels = _test_images()
    with torch.no_grad():
        predictions = qat.quantized_model(images)
    weights = {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()}
    torch.save(
        {
            "weights": weights,
            "predictions": predictions,
            "labels": labels,
            "sharded": is_sharded(model.net),
            "masks": {name: mask.cpu() for name, mask in pruning.masks.items()},
            "sparsity": pruning.measured_sparsity(model)[0],
        },
        output / f"pt2e_rank{trainer.global_rank}.pt",
    )


def learned_ranges(output: Path, backend: str, mode: str) -> None:
    """QAT with learned ranges (LSQ) sharded, checkpointed each epoch: observers set the ranges in epoch 1 and the
    ranges learn from epoch 2 on; then fresh sharded runs resumed from the epoch-1 distributed checkpoint (observers
    on; they freeze after the resume) and from the epoch-2 one (the ranges already learning). Each run's gathered
    ranges, the ranges the observers left, and int8 predictions are dumped."""

    from lightning_compress.range_learning import learned_ranges as ranges_of

    class ObservedRanges(L.Callback):
        """At the start of epoch 2, before the ranges take their first step: the learned scales (gathered) and the
        scales the frozen observers hold."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.current_epoch == 2 and batch_idx == 0:
                self.ranges = {name: full_tensor(p.detach()).clone() for name, p in ranges_of(pl_module.net).items()}
                self.observers = {
                    f"{name}.scale": module.activation_post_process.calculate_qparams()[0].flatten()
                    for name, module in pl_module.net.named_modules()
                    if getattr(module, "learns_range", False)
                }

    ends = {}
    for run, start in (("uninterrupted", None), ("resumed_observing", "epoch=1.ckpt"), ("resumed_learning", "epoch=2.ckpt")):
        L.seed_everything(0)
        model = ShardedClassifier()
        qat = QuantizationAwareTraining(
            backend=backend,
            start_epoch=1,
            freeze_bn_epoch=2,
            freeze_observer_epoch=2,
            learnable_ranges=True,
            export_format="none",
        )
        observed = ObservedRanges()
        trainer = _fit_from(model, 4, [qat, observed], output, start)
        images, labels = _test_images()
        with torch.no_grad():
            predictions = qat.quantized_model(images)
        ends[run] = {
            "ranges": {name: full_tensor(p.detach()).clone() for name, p in ranges_of(model.net).items()},
            "observed": getattr(observed, "ranges", None),
            "observers": getattr(observed, "observers", None),
            "weights": {name: full_tensor(tensor.detach()).clone() for name, tensor in model.net.state_dict().items()},
            "predictions": predictions,
            "labels": labels,
            "sharded": is_sharded(model.net),
        }
    torch.save(ends, output / f"{mode}_rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    modes = {
        "prune_qat": pruning_and_qat,
        "ptq": post_training,
        "resume": resume,
        "resume_pt2e": lambda output: resume(output, "x86_inductor", "resume_pt2e"),
        "lowbit": low_bit,
        "lowbit_resume": low_bit_resumed,
        "distill": distillation,
        "pt2e": pt2e,
        "channels": channels,
        "shrink": shrink,
        "test_ckpt": test_from_checkpoint,
        "resume_from_one": resume_from_one,
        "distill_hints": distillation_with_hints,
        "shrink_qat": lambda output: shrink_then_qat(output, None, "shrink_qat"),
        "shrink_qat_fx": lambda output: shrink_then_qat(output, "x86", "shrink_qat_fx"),
        "lsq": lambda output: learned_ranges(output, "x86", "lsq"),
        "lsq_pt2e": lambda output: learned_ranges(output, "x86_inductor", "lsq_pt2e"),
    }
    modes[sys.argv[2]](Path(sys.argv[1]))
