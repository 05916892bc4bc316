"""``DistillationModule``: a student learns from a frozen teacher's softened outputs (Hinton et al. 2015).

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

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.inputs import example_input
from lightning_compress.models import ImageClassifier, build_network, load_network_weights
from lightning_compress.validation import check_number


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; returns (total, kd, ce).

    The ``T^2`` keeps the soft-target gradients on the scale of the hard-target ones as ``T`` changes. Computed
    in float32 whatever precision the logits come in (bf16 under mixed precision): bf16's 8-bit mantissa
    would round away the small differences between softened distributions that the loss is made of.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    kd = (
        F.kl_div(
            F.log_softmax(student_logits / temperature, dim=1),
            F.log_softmax(teacher_logits / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


class DistillationModule(ImageClassifier):
    """Train ``student`` against a frozen ``teacher``; what ``trainer.fit`` receives.

    .. code-block:: python

        from lightning_compress import DistillationModule

        module = DistillationModule(student="cnn", teacher=my_trained_resnet, temperature=4.0, alpha=0.9)
        Trainer(max_epochs=10).fit(module, datamodule=datamodule)
        module.student  # the trained student; checkpoints hold only its weights

    ``forward`` is the student's, so compression callbacks (QAT, pruning) act on the student alone and the
    exported model is the student.

    Args:
        student: an architecture name (see ``lightning_compress.models.ARCHITECTURES``) or an ``nn.Module``
            (a ``LightningModule`` works too: its ``forward`` is used).
        teacher: same choices as ``student``; with a name, give ``teacher_checkpoint`` to load its weights.
        num_classes: outputs of both networks (when built from names).
        in_channels: input channels of both networks (when built from names).
        temperature: softening temperature ``T`` (> 0).
        alpha: weight of the distillation term, in [0, 1]; ``1 - alpha`` weighs the label cross-entropy.
        lr: peak learning rate of the student.
        weight_decay: AdamW weight decay.
        student_options: extra arguments of the student architecture (e.g. ``widths``).
        teacher_options: extra arguments of the teacher architecture.
        teacher_checkpoint: teacher weights, a Lightning checkpoint or a ``state_dict`` file, loaded with
            ``weights_only=True``; missing keys or shape mismatches are errors naming the key.
        checkpoint: start the student from these weights.
        save_teacher: also store the teacher's weights in checkpoints (``teacher_state_dict``).
        hints: student layer name -> teacher layer name, e.g. ``{"features.4": "features.4"}``: the student
            layer's output, through a learned adapter, is pulled towards the teacher layer's (mean squared
            error). Layers must produce (N, C) or (N, C, H, W) outputs of the same spatial size. Under QAT,
            hint convolutions or linear layers: QAT fuses the BatchNorm and ReLU after them away.
        hint_weight: weight of the summed hint losses in the total loss (>= 0).
    """

    training_aids = ("hint_adapters",)  # trained alongside the student, never compressed or deployed

    def __init__(
        self,
        student: str | nn.Module = "cnn",
        teacher: str | nn.Module = "resnet18",
        num_classes: int = 10,
        in_channels: int = 1,
        temperature: float = 4.0,
        alpha: float = 0.9,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        student_options: dict | None = None,
        teacher_options: dict | None = None,
        teacher_checkpoint: str | None = None,
        checkpoint: str | None = None,
        save_teacher: bool = False,
        hints: Mapping[str, str] | None = None,
        hint_weight: float = 1.0,
    ) -> None:
        check_number("temperature", temperature, low=0.0, low_open=True)
        check_number("alpha", alpha, 0.0, 1.0)
        check_number("hint_weight", hint_weight)
        if not hint_weight >= 0:
            raise ValueError(f"hint_weight={hint_weight!r} is invalid: it must be 0 or more.")
        super().__init__(student, num_classes, in_channels, lr, weight_decay, checkpoint, student_options)
        self.save_hyperparameters(
            ignore=[name for name, value in (("student", student), ("teacher", teacher)) if isinstance(value, nn.Module)]
        )
        if isinstance(teacher, nn.Module):
            teacher_net = teacher
        else:
            teacher_net = build_network(teacher, num_classes, in_channels, **(teacher_options or {}))
        if teacher_checkpoint is not None:
            load_network_weights(teacher_net, teacher_checkpoint, setting="teacher_checkpoint")
        teacher_net.requires_grad_(False).eval()
        object.__setattr__(self, "_teacher", teacher_net)  # deliberately unregistered: see the module docstring
        self.temperature = temperature
        self.alpha = alpha
        self.save_teacher = save_teacher
        self.hints = dict(hints or {})
        self.hint_weight = hint_weight
        _check_layers(self.hints, self.net, teacher_net)
        # one adapter per hint, keyed by its position: built in setup, once the layers' widths are seen
        self.hint_adapters = nn.ModuleDict()
        # Teacher accuracy is a property of the teacher and the split: computed once, then reused.
        self.teacher_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.teacher_val_accuracy: float | None = None

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

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        with self._hint_features() as (student_features, teacher_features):
            logits = self(images)
            teacher_logits = self._teacher_logits(images)
        loss, kd, ce = distillation_loss(logits, teacher_logits, labels, self.temperature, self.alpha)
        losses = {"train/kd_loss": kd, "train/ce_loss": ce}
        if self.hints:
            losses["train/hint_loss"] = hint = self.hint_loss(student_features, teacher_features)
            loss = loss + self.hint_weight * hint
        self.train_accuracy(logits, labels)
        self.log_dict({"train/loss": loss, **losses}, prog_bar=True)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        if self.teacher_val_accuracy is None and not self.trainer.sanity_checking:
            images, labels = batch
            self.teacher_accuracy.update(self._teacher_logits(images), labels)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        if self.teacher_val_accuracy is None:
            self.teacher_val_accuracy = float(self.teacher_accuracy.compute())
            self.teacher_accuracy.reset()
        self.log("val/teacher_acc", self.teacher_val_accuracy)

    def test_step(self, batch, batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        images, labels = batch
        self.teacher_accuracy.update(self._teacher_logits(images), labels)

    def on_test_epoch_end(self) -> None:
        teacher_accuracy = float(self.teacher_accuracy.compute())
        self.teacher_accuracy.reset()
        self.log_dict(
            {
                "test/teacher_acc": teacher_accuracy,
                "test/teacher_minus_student": teacher_accuracy - float(self.test_accuracy.compute()),
            }
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        # load_from_checkpoint builds the module without running setup: make the saved adapters exist.
        for key, weight in checkpoint["state_dict"].items():
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
