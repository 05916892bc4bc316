"""``DistillationModule``: a student learns from a frozen teacher's softened outputs (Hinton et al. 2015).

The module wraps networks it is given: it builds nothing from names and loads no files, so a user brings
their own student (an ``nn.Module``, or their own ``LightningModule``, whose ``configure_optimizers`` it
reuses) and any ``nn.Module`` teacher. The bundled app builds both from its configuration.

The teacher is deliberately *not* a registered submodule. That one choice settles the usual traps: it is
not in ``parameters()`` (so not in the optimizer, not wrapped by DDP, never visited by compression
callbacks), not in ``state_dict()`` (so student checkpoints carry no teacher weights), and ``train()``
never reaches it (so its BatchNorm statistics cannot drift when Lightning switches modes around
validation). It follows the student across devices through ``_apply``.

Hint (feature) distillation (Romero et al. 2015, FitNets) adds a second signal: named student layers learn,
through a small learned adapter (a 1x1 convolution or a linear map to the teacher's width), to reproduce
the outputs of named teacher layers. The adapters exist only to train; compression callbacks skip them
(``training_aids``) and they are never part of the exported student.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torchmetrics import MeanMetric

from lightning_compress import sharding
from lightning_compress.inputs import example_input
from lightning_compress.pruning import restore_pruned_channels
from lightning_compress.quantization import restore_quantization
from lightning_compress.report import ReportsModels
from lightning_compress.validation import check_integer, check_number


def _positions(
    logits: torch.Tensor, labels: torch.Tensor, class_dim: int, ignore_index: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits as (positions, classes) and labels as (positions,), padding positions dropped.

    An image classifier has one position per sample; a language model one per token."""
    flat = logits.movedim(class_dim, -1).reshape(-1, logits.shape[class_dim])
    labels = labels.reshape(-1)
    if flat.shape[0] != labels.shape[0]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(logits.shape)} with classes "
            f"on class_dim={class_dim}: every other dimension of the logits must be a label's."
        )
    if ignore_index is None:
        return flat, labels
    kept = labels != ignore_index
    return flat[kept], labels[kept]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
    class_dim: int = 1,
    ignore_index: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; returns (total, kd, ce).

    Both terms are means over positions: samples of an image classifier, tokens of a language model
    (``class_dim=-1`` for (batch, tokens, vocabulary) logits), where positions whose label is ``ignore_index``
    (padding) count in neither. The ``T^2`` keeps the soft-target gradients on the scale of the hard-target
    ones as ``T`` changes. Computed in float32 whatever precision the logits come in (bf16 under mixed
    precision): bf16's 8-bit mantissa would round away the small differences between softened
    distributions that the loss is made of.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher and student outputs differ: teacher {tuple(teacher_logits.shape)}, student "
            f"{tuple(student_logits.shape)}; both must produce the same logits shape."
        )
    mask_labels = labels
    student, labels = _positions(student_logits.float(), mask_labels, class_dim, ignore_index)
    teacher, _ = _positions(teacher_logits.float(), mask_labels, class_dim, ignore_index)
    kd = (
        F.kl_div(
            F.log_softmax(student / temperature, dim=-1),
            F.log_softmax(teacher / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    ce = F.cross_entropy(student, labels)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


class DistillationModule(L.LightningModule, ReportsModels):
    """Train ``student`` against a frozen ``teacher``; what ``trainer.fit`` receives.

    .. code-block:: python

        from lightning_compress import DistillationModule

        module = DistillationModule(student=MyStudent(), teacher=my_trained_resnet, temperature=4.0, alpha=0.9)
        Trainer(max_epochs=10).fit(module, datamodule=datamodule)
        module.student  # the trained student; checkpoints hold only its weights

    ``forward`` is the student's, so compression callbacks (QAT, pruning) act on the student alone and the
    exported model is the student. Batches are ``(inputs, labels)``; both networks map ``inputs`` to logits
    of the same shape. Logged: ``train/loss``, ``train/kd_loss``, ``train/ce_loss`` (``train/hint_loss``),
    ``{train,val,test}/acc`` of the student, ``val/teacher_acc``, ``test/teacher_acc`` and
    ``test/teacher_minus_student``.

    ``load_from_checkpoint`` needs the two networks again (they are modules, not hyperparameters):
    ``DistillationModule.load_from_checkpoint(path, student=MyStudent(), teacher=teacher)``.

    Args:
        student: the network to train, an ``nn.Module``. A ``LightningModule`` works too: its ``forward`` is
            used, and its own ``configure_optimizers`` sets the optimizer (run over the live student's
            parameters, which compression callbacks may have rebuilt; hint adapters join as a parameter group).
        teacher: the trained network to learn from, an ``nn.Module``; frozen and kept in eval mode.
        temperature: softening temperature ``T`` (> 0). The defaults (``T=4``, ``alpha=0.9``) are the classic
            settings for image classifiers; on digits a small CNN student gained more at ``T=2`` (closing 57% of
            its gap to the teacher against 50% at ``T=4``, 120 epochs), and the gain grows with the length of
            training: give the student a long schedule (``benchmarks/distillation.py``). For a language model take
            ``T=1``, ``alpha=0.5``: a high temperature flattens a 256-way byte distribution toward uniform, and
            made a distilled byte-level student worse than the same student alone (``benchmarks/llm.py``).
        alpha: weight of the distillation term, in [0, 1]; ``1 - alpha`` weighs the label cross-entropy.
        class_dim: the dimension of the logits that holds the classes: 1 for (batch, classes) or
            (batch, classes, ...) outputs, -1 for a language model's (batch, tokens, vocabulary).
        ignore_index: a label value that marks padding positions, left out of both losses and the accuracy;
            ``None`` when every position counts.
        lr: peak learning rate of AdamW under a cosine schedule, when the student is a plain ``nn.Module``.
        weight_decay: AdamW weight decay, likewise.
        save_teacher: also store the teacher's weights in checkpoints (``teacher_state_dict``).
        hints: student layer name -> teacher layer name, e.g. ``{"features.4": "features.4"}``: the student
            layer's output, through a learned adapter, is pulled towards the teacher layer's (mean squared
            error). Layers must produce (N, C) or (N, C, H, W) outputs of the same spatial size. Under QAT,
            hint convolutions or linear layers: QAT fuses the BatchNorm and ReLU after them away.
        hint_weight: weight of the summed hint losses in the total loss (>= 0).

    Raises:
        TypeError: ``student`` or ``teacher`` is not an ``nn.Module``.
        ValueError: a setting out of range, or ``hints`` naming layers that do not exist; teacher and student
            logits of different shapes are found at ``fit`` start, before the first step.
    """

    training_aids = ("hint_adapters",)  # trained alongside the student, never compressed or deployed

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.9,
        class_dim: int = 1,
        ignore_index: int | None = None,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        save_teacher: bool = False,
        hints: Mapping[str, str] | None = None,
        hint_weight: float = 1.0,
    ) -> None:
        super().__init__()
        for setting, value in (("student", student), ("teacher", teacher)):
            if not isinstance(value, nn.Module):
                raise TypeError(
                    f"{setting}={value!r} is invalid: it must be an nn.Module (build it first; the app's "
                    "lightning_compress.app.models.build_network makes one from an architecture name)."
                )
        check_number("temperature", temperature, low=0.0, low_open=True)
        check_number("alpha", alpha, 0.0, 1.0)
        check_integer("class_dim", class_dim, minimum=None)
        check_integer("ignore_index", ignore_index, none="every position counts")
        for setting, value in (("lr", lr), ("hint_weight", hint_weight), ("weight_decay", weight_decay)):
            check_number(setting, value)
        if lr <= 0:
            raise ValueError(f"lr={lr!r} is invalid: it must be positive.")
        for setting, value in (("weight_decay", weight_decay), ("hint_weight", hint_weight)):
            if value < 0:
                raise ValueError(f"{setting}={value!r} is invalid: it must be 0 or more.")
        self.save_hyperparameters(ignore=["student", "teacher"])
        self.net = student
        teacher.requires_grad_(False).eval()
        object.__setattr__(self, "_teacher", teacher)  # deliberately unregistered: see the module docstring
        # the user's LightningModule, whose configure_optimizers we reuse even after QAT has replaced self.net
        object.__setattr__(self, "_student_module", student if isinstance(student, L.LightningModule) else None)
        self.temperature = temperature
        self.alpha = alpha
        self.class_dim = class_dim
        self.ignore_index = ignore_index
        self.save_teacher = save_teacher
        self.hints = dict(hints or {})
        self.hint_weight = hint_weight
        _check_layers(self.hints, self.net, teacher)
        # one adapter per hint, keyed by its position: built in setup, once the layers' widths are seen
        self.hint_adapters = nn.ModuleDict()
        # the share of correct positions (samples or tokens): no number of classes needed
        self.train_accuracy, self.val_accuracy, self.test_accuracy = MeanMetric(), MeanMetric(), MeanMetric()
        # Teacher accuracy is a property of the teacher and the split: computed once, then reused.
        self.teacher_accuracy = MeanMetric()
        self.teacher_val_accuracy: float | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.net(*args, **kwargs)

    @property
    def student(self) -> nn.Module:
        return self.net

    @property
    def teacher(self) -> nn.Module:
        return self._teacher

    def _apply(self, fn: Callable, recurse: bool = True) -> DistillationModule:
        super()._apply(fn, recurse)
        self._teacher._apply(fn)
        return self

    def train(self, mode: bool = True) -> DistillationModule:
        super().train(mode)
        self._teacher.eval()  # never in train mode, whatever Lightning switches around validation
        return self

    def setup(self, stage: str) -> None:
        # Runs after compression callbacks' setup (QAT may have rebuilt the student) and before a resumed
        # checkpoint's weights load, so the adapters exist by then.
        if stage == "fit":
            self._check_shapes_and_build_adapters(example_input(self.trainer, self))

    def _check_shapes_and_build_adapters(self, images: torch.Tensor) -> None:
        _check_layers(self.hints, self.net, self._teacher, after_setup=True)
        was_training = self.training
        self.eval()
        with torch.no_grad(), self._hint_features() as (student_features, teacher_features):
            student_shape, teacher_shape = tuple(self(images).shape), tuple(self._teacher(images).shape)
        self.train(was_training)
        if student_shape != teacher_shape:
            raise ValueError(
                f"teacher and student outputs differ: teacher {teacher_shape}, student {student_shape}; "
                "both must produce the same logits shape."
            )
        if not -len(student_shape) <= self.class_dim < len(student_shape):
            raise ValueError(
                f"class_dim={self.class_dim} is invalid for logits of shape {student_shape}: it must name one of "
                f"their {len(student_shape)} dimensions."
            )
        for index, (student_layer, teacher_layer) in enumerate(self.hints.items()):
            student_shape, teacher_shape = student_features[index].shape, teacher_features[index].shape
            if student_features[index].dim() not in (2, 4) or student_shape[2:] != teacher_shape[2:]:
                raise ValueError(
                    f"hints: student layer {student_layer!r} {tuple(student_shape)} cannot be matched to teacher "
                    f"layer {teacher_layer!r} {tuple(teacher_shape)}: both must be (N, C) or (N, C, H, W) with the "
                    "same H and W."
                )
            if str(index) not in self.hint_adapters:
                self.hint_adapters[str(index)] = _adapter(student_shape[1], teacher_shape[1], spatial=len(student_shape) == 4)

    @contextmanager
    def _hint_features(self) -> Iterator[tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]]:
        """Record the outputs of the hinted layers while the block runs; no hooks outlive it."""
        student_features: dict[int, torch.Tensor] = {}
        teacher_features: dict[int, torch.Tensor] = {}
        handles = []
        for index, (student_layer, teacher_layer) in enumerate(self.hints.items()):
            sides = ((self.net, student_layer, student_features), (self._teacher, teacher_layer, teacher_features))
            for network, layer, features in sides:

                def record(module, args, output, index=index, features=features):
                    features[index] = output

                handles.append(network.get_submodule(layer).register_forward_hook(record))
        try:
            yield student_features, teacher_features
        finally:
            for handle in handles:
                handle.remove()

    def hint_loss(self, student_features: dict[int, torch.Tensor], teacher_features: dict[int, torch.Tensor]) -> torch.Tensor:
        """Sum over hints of the mean squared error between the adapted student output and the teacher's."""
        losses = [  # in float32, as the distillation loss
            F.mse_loss(self.hint_adapters[str(index)](features).float(), teacher_features[index].float())
            for index, features in student_features.items()
        ]
        return torch.stack(losses).sum()

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._teacher(images)

    def _accuracy_update(self, metric: MeanMetric, logits: torch.Tensor, labels: torch.Tensor, flat: bool = False) -> None:
        """Add the share of correct positions; ``flat``: already (positions, classes), padding dropped."""
        if not flat:
            logits, labels = _positions(logits.detach(), labels, self.class_dim, self.ignore_index)
        if labels.numel():
            metric.update((logits.argmax(dim=-1) == labels).float())

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        inputs, labels = batch
        with self._hint_features() as (student_features, teacher_features):
            logits = self(inputs)
            teacher_logits = self._teacher_logits(inputs)
        loss, kd, ce = distillation_loss(
            logits, teacher_logits, labels, self.temperature, self.alpha, self.class_dim, self.ignore_index
        )
        losses = {"train/kd_loss": kd, "train/ce_loss": ce}
        if self.hints:
            losses["train/hint_loss"] = hint = self.hint_loss(student_features, teacher_features)
            loss = loss + self.hint_weight * hint
        self._accuracy_update(self.train_accuracy, logits, labels)
        self.log_dict({"train/loss": loss, **losses}, prog_bar=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def on_fit_start(self) -> None:
        if sharding.under_fsdp2(self.trainer) and any(not isinstance(p, DTensor) for p in self.hint_adapters.parameters()):
            raise ValueError(
                "DistillationModule(hints=...) under FSDP2: the hint adapters are not sharded, so the ranks would train "
                "different ones; leave configure_optimizers to DistillationModule (super().configure_optimizers() "
                "shards them), or shard each of self.hint_adapters.values() in configure_model."
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Under FSDP2 each rank keeps its own BatchNorm statistics: every rank takes rank 0's, as DDP does, so the
        # ranks hold one student (and a checkpoint, which holds one rank's buffers, resumes that student).
        sharding.synchronize_buffers(self.trainer, self.student)

    def _evaluate(self, batch, stage: str, accuracy: MeanMetric) -> torch.Tensor:
        """The student's label loss and accuracy, as a plain classifier of the same student would log them."""
        inputs, labels = batch
        logits = self(inputs)
        flat_logits, flat_labels = _positions(logits.float(), labels, self.class_dim, self.ignore_index)
        self._accuracy_update(accuracy, flat_logits, flat_labels, flat=True)
        self.log(f"{stage}/loss", F.cross_entropy(flat_logits, flat_labels), prog_bar=stage != "test")
        self.log(f"{stage}/acc", accuracy, prog_bar=True, on_step=False, on_epoch=True)
        return inputs

    def validation_step(self, batch, batch_idx: int) -> None:
        inputs = self._evaluate(batch, "val", self.val_accuracy)
        if self.teacher_val_accuracy is None and not self.trainer.sanity_checking:
            self._accuracy_update(self.teacher_accuracy, self._teacher_logits(inputs), batch[1])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        if self.teacher_val_accuracy is None:
            self.teacher_val_accuracy = float(self.teacher_accuracy.compute())
            self.teacher_accuracy.reset()
        self.log("val/teacher_acc", self.teacher_val_accuracy)

    def test_step(self, batch, batch_idx: int) -> None:
        inputs = self._evaluate(batch, "test", self.test_accuracy)
        self._accuracy_update(self.teacher_accuracy, self._teacher_logits(inputs), batch[1])

    def on_test_epoch_end(self) -> None:
        teacher_accuracy = float(self.teacher_accuracy.compute())
        self.teacher_accuracy.reset()
        self.log_dict(
            {
                "test/teacher_acc": teacher_accuracy,
                "test/teacher_minus_student": teacher_accuracy - float(self.test_accuracy.compute()),
            }
        )

    def configure_optimizers(self) -> Any:
        """The user's ``LightningModule`` student's own optimizer configuration, else AdamW with a cosine
        schedule over ``max_epochs``; the hint adapters train with the student either way.

        Under FSDP2 the adapters, built in ``setup`` and left whole by a ``configure_model`` that shards the
        student and teacher, are sharded here first, each on its own: unsharded, nothing would average their
        gradients over the ranks (FSDP2 reduces only what it shards), and the ranks would train different ones."""
        if sharding.under_fsdp2(self.trainer):
            for adapter in self.hint_adapters.values():
                sharding.shard_if_whole(adapter, self.device_mesh["data_parallel"])
        if self._student_module is None:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
            epochs = max(self.trainer.max_epochs or 1, 1)
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)}
        self._student_module.trainer = self.trainer
        configuration = type(self._student_module).configure_optimizers(_LiveStudent(self._student_module, self.net))
        if len(self.hint_adapters):
            optimizers = _optimizers_in(configuration)
            if len(optimizers) != 1:
                raise ValueError(
                    f"hints: the student's configure_optimizers returns {len(optimizers)} optimizers; the hint "
                    "adapters need exactly one to join."
                )
            optimizers[0].add_param_group({"params": list(self.hint_adapters.parameters())})
        return configuration

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A QAT checkpoint holds fake-quant modules: rebuild them so that load_from_checkpoint fits.
        restore_pruned_channels(self, checkpoint)  # a checkpoint written after shrink_epoch holds smaller layers
        restore_quantization(self, checkpoint)
        # load_from_checkpoint builds the module without running setup: make the saved adapters exist. (A distributed
        # checkpoint's weights are not in it: they load into the module, whose setup built the adapters.)
        for key, weight in checkpoint.get("state_dict", {}).items():
            prefix, _, rest = key.partition(".")
            index, _, name = rest.partition(".")
            if prefix == "hint_adapters" and name == "weight" and index not in self.hint_adapters:
                self.hint_adapters[index] = _adapter(weight.shape[1], weight.shape[0], spatial=weight.dim() == 4)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.save_teacher:
            checkpoint["teacher_state_dict"] = self._teacher.state_dict()

    def report_models(self) -> dict[str, nn.Module]:
        """The teacher gets a row of its own in the compression report."""
        return {"teacher": self._teacher}


def _adapter(student_width: int, teacher_width: int, spatial: bool) -> nn.Module:
    """Maps a student layer's channels to the teacher's: the smallest learned map that can."""
    return nn.Conv2d(student_width, teacher_width, 1) if spatial else nn.Linear(student_width, teacher_width)


def _check_layers(hints: dict[str, str], student: nn.Module, teacher: nn.Module, after_setup: bool = False) -> None:
    for setting, network, layers in (("student", student, hints.keys()), ("teacher", teacher, hints.values())):
        names = {name for name, _ in network.named_modules() if name}
        missing = [layer for layer in layers if layer not in names]
        if missing:
            advice = (
                " (after QAT's setup: it fuses BatchNorm and ReLU into the layer before them, so hint that layer)"
                if after_setup and setting == "student"
                else ""
            )
            examples = sorted(names)[:8]
            raise ValueError(
                f"hints: {setting} layers {missing} do not exist in the {setting}{advice}; its layers include {examples}."
            )


class _LiveStudent:
    """The user's student ``LightningModule`` as its ``configure_optimizers`` should see it: its own settings
    (``self.hparams``, ``self.trainer``, ...), but the parameters of the network being trained, which QAT may
    have rebuilt into a new module since the student was given."""

    def __init__(self, student: L.LightningModule, live: nn.Module) -> None:
        object.__setattr__(self, "_student", student)
        object.__setattr__(self, "_live", live)

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        return self._live.parameters(recurse)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        return self._live.named_parameters(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._student, name)


def _optimizers_in(configuration: Any) -> list[torch.optim.Optimizer]:
    """The optimizers in any of the shapes ``configure_optimizers`` may return."""
    if isinstance(configuration, torch.optim.Optimizer):
        return [configuration]
    if isinstance(configuration, Mapping):
        return _optimizers_in(configuration.get("optimizer"))
    if isinstance(configuration, list | tuple):
        return [optimizer for entry in configuration for optimizer in _optimizers_in(entry)]
    return []
