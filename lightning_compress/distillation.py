"""``DistillationModule``: a student learns from a frozen teacher's softened outputs (Hinton et al. 2015).

The teacher is deliberately *not* a registered submodule. That one choice settles the usual traps: it is
not in ``parameters()`` (so not in the optimizer, not wrapped by DDP, never visited by compression
callbacks), not in ``state_dict()`` (so student checkpoints carry no teacher weights), and ``train()``
never reaches it (so its BatchNorm statistics cannot drift when Lightning switches modes around
validation). It follows the student across devices through ``_apply``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.inputs import example_input
from lightning_compress.models import ImageClassifier, build_network, load_network_weights


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    alpha: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)``; returns (total, kd, ce).

    The ``T^2`` keeps the soft-target gradients on the scale of the hard-target ones as ``T`` changes.
    """
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
    """

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
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid: it must be > 0.")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is invalid: it must lie in [0, 1].")
        super().__init__(student, num_classes, in_channels, lr, weight_decay, checkpoint, student_options)
        self.save_hyperparameters(
            ignore=[name for name, value in (("student", student), ("teacher", teacher)) if isinstance(value, nn.Module)]
        )
        if isinstance(teacher, nn.Module):
            teacher_net = teacher
        else:
            teacher_net = build_network(teacher, num_classes, in_channels, **(teacher_options or {}))
        if teacher_checkpoint is not None:
            load_network_weights(teacher_net, teacher_checkpoint, setting="teacher.checkpoint")
        teacher_net.requires_grad_(False).eval()
        object.__setattr__(self, "_teacher", teacher_net)  # deliberately unregistered: see the module docstring
        self.temperature = temperature
        self.alpha = alpha
        self.save_teacher = save_teacher
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
        if stage == "fit":
            self._check_output_shapes(example_input(self.trainer, self))

    def _check_output_shapes(self, images: torch.Tensor) -> None:
        was_training = self.training
        self.eval()
        with torch.no_grad():
            student_shape, teacher_shape = tuple(self(images).shape), tuple(self._teacher(images).shape)
        self.train(was_training)
        if student_shape != teacher_shape:
            raise ValueError(
                f"teacher and student outputs differ: teacher {teacher_shape}, student {student_shape}; "
                "both must produce the same logits shape."
            )

    def _teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._teacher(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss, kd, ce = distillation_loss(logits, self._teacher_logits(images), labels, self.temperature, self.alpha)
        self.train_accuracy(logits, labels)
        self.log_dict({"train/loss": loss, "train/kd_loss": kd, "train/ce_loss": ce}, prog_bar=True)
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

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.save_teacher:
            checkpoint["teacher_state_dict"] = self._teacher.state_dict()

    def report_models(self) -> dict[str, nn.Module]:
        """The teacher gets a row of its own in the compression report."""
        return {"teacher": self._teacher}
