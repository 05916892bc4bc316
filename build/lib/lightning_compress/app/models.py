"""Networks and the LightningModule that trains them as image classifiers.

``SmallCNN`` is the default: conv-bn-relu blocks and a linear head, the shapes that QAT fuses and channel
pruning shrinks. torchvision classifiers are built with ``num_classes`` and ``in_channels`` and, for small
inputs (digits, CIFAR), with a 3x3 stride-1 stem and no early down-sampling, as is usual for 32x32 data.
"""

from __future__ import annotations

import importlib
import zipfile
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_compress.pruning import restore_pruned_channels
from lightning_compress.quantization import restore_quantization  # the app builds on the library
from lightning_compress.validation import check_integer, check_number


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, max-pooling between blocks, global average pooling and a linear head.

    Args:
        num_classes: outputs of the head.
        in_channels: channels of the input images.
        widths: output channels of each block.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for index, width in enumerate(widths):
            if index > 0:
                blocks.append(nn.MaxPool2d(2))
            blocks += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(images)), 1))


class RowLSTM(nn.Module):
    """Reads an image row by row as a sequence (digits: 8 steps of 8 pixels) with an LSTM, then classifies
    the last hidden state: the kind of model dynamic quantization is made for.

    Args:
        num_classes: outputs of the head.
        in_channels: channels of the input images (each row's pixels of every channel form one step).
        hidden_size: LSTM width.
        image_size: side of the (square) input images.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, hidden_size: int = 128, image_size: int = 8):
        super().__init__()
        self.lstm = nn.LSTM(in_channels * image_size, hidden_size, batch_first=True)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rows = images.permute(0, 2, 1, 3).flatten(2)  # (batch, height, channels * width)
        output, _ = self.lstm(rows)
        return self.classifier(output[:, -1])


def _small_input_stem(conv: nn.Conv2d, in_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, conv.out_channels, 3, stride=stride, padding=1, bias=conv.bias is not None)


def torchvision_classifier(name: str, num_classes: int = 10, in_channels: int = 3, small_input: bool = True) -> nn.Module:
    """A torchvision classifier with random weights (no weight download happens here).

    Args:
        name: ``resnet18``, ``mobilenet_v2`` or ``mobilenet_v3_small``.
        num_classes: outputs of the head.
        in_channels: channels of the input images.
        small_input: adapt the stem to inputs of 8 to 64 pixels instead of 224.
    """
    if name not in TORCHVISION_ARCHITECTURES:
        raise ValueError(f"model.architecture={name!r} is unknown: allowed are {sorted(ARCHITECTURES)}.")
    net = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if name == "resnet18":
        if small_input:
            net.conv1 = _small_input_stem(net.conv1, in_channels)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    else:  # mobilenets: features[0] is Conv-BN-activation
        stem = net.features[0][0]
        if small_input or in_channels != 3:
            net.features[0][0] = _small_input_stem(stem, in_channels, stride=1 if small_input else 2)
    return net


TORCHVISION_ARCHITECTURES = ("resnet18", "mobilenet_v2", "mobilenet_v3_small")

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "cnn": SmallCNN,
    "lstm": RowLSTM,
    **{name: partial(torchvision_classifier, name) for name in TORCHVISION_ARCHITECTURES},
}


def build_network(architecture: str, num_classes: int, in_channels: int, checkpoint: str | None = None, **options) -> nn.Module:
    """Build a registered architecture by name, or any ``package.module.Class`` taking the same arguments;
    with ``checkpoint``, load its trained weights (a Lightning checkpoint of an ``ImageClassifier`` or a
    ``state_dict`` file), as the distillation recipes do for their student and teacher."""
    if architecture in ARCHITECTURES:
        factory = ARCHITECTURES[architecture]
    elif "." in architecture:
        module_name, _, class_name = architecture.rpartition(".")
        try:
            factory = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"model.architecture={architecture!r} cannot be imported: {error}.") from error
    else:
        raise ValueError(
            f"model.architecture={architecture!r} is unknown: allowed are {sorted(ARCHITECTURES)} "
            "or an import path such as 'my_package.models.MyNet'."
        )
    net = factory(num_classes=num_classes, in_channels=in_channels, **options)
    if checkpoint is not None:
        load_network_weights(net, checkpoint, setting="checkpoint")
    return net


LIGHTNING_CHECKPOINT_KEYS = ("state_dict", "pytorch-lightning_version")


def read_checkpoint(checkpoint: str | Path, setting: str = "checkpoint") -> object:
    """``torch.load(weights_only=True)`` of a file, failing in one line that names ``setting``, the path and
    what is wrong: missing, a folder, empty, not a PyTorch file, truncated or corrupted, or holding objects
    that weights-only loading refuses (code, rather than tensors and plain containers)."""
    path = Path(checkpoint)
    where = f"{setting}={str(checkpoint)!r}"
    if not path.exists():
        raise FileNotFoundError(f"{where} does not exist.")
    if not path.is_file():
        raise ValueError(f"{where} is a folder, not a checkpoint file.")
    if path.stat().st_size == 0:
        raise ValueError(f"{where} is an empty file, not a checkpoint.")
    with path.open("rb") as file:
        head = file.read(4)
    # torch.save writes a zip archive (or, in its legacy format, a pickle, which starts with the PROTO opcode)
    written_by_torch = head == b"PK\x03\x04" or head[:1] == b"\x80"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch reports a bad file with many exception types
        reason = error
    intact_zip = head == b"PK\x03\x04" and zipfile.is_zipfile(path)
    if not written_by_torch or (intact_zip and "Weights only load failed" not in str(reason)):
        raise ValueError(f"{where} is not a PyTorch file (torch.save writes a zip archive or a pickle).") from reason
    if "Weights only load failed" in str(reason):
        raise ValueError(
            f"{where} holds Python objects that loading with weights_only=True refuses to run; save the "
            "state_dict (tensors) instead."
        ) from reason
    detail = str(reason).strip().splitlines()[0][:100] if str(reason).strip() else type(reason).__name__
    raise ValueError(f"{where} is truncated or corrupted: torch.load fails ({detail}).") from reason


def load_network_weights(net: nn.Module, checkpoint: str | Path, prefix: str = "net.", setting: str = "model.checkpoint") -> None:
    """Load trained weights into ``net`` from a Lightning checkpoint or a plain ``state_dict`` file.

    Loading uses ``weights_only=True``, so a file can carry tensors but no code. A Lightning checkpoint's
    keys lose ``prefix`` (the attribute that holds the network). Any difference in keys or shapes is an
    error naming the first offending key, because a partially loaded model trains silently from garbage;
    ``setting`` is the configuration key (or argument) the errors name.
    """
    state = read_checkpoint(checkpoint, setting)
    where = f"{setting}={str(checkpoint)!r}"
    if isinstance(state, dict) and "state_dict" in state:
        state = {key[len(prefix) :]: value for key, value in state["state_dict"].items() if key.startswith(prefix)}
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{where} holds a {type(state).__name__} that is neither a state_dict nor a Lightning checkpoint.")
    other_model = f"{where} is a checkpoint of another model"
    expected = net.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise ValueError(f"{other_model}: key {key!r} is missing.")
        if state[key].shape != value.shape:
            raise ValueError(
                f"{other_model}: key {key!r} has shape {tuple(state[key].shape)}, the model expects {tuple(value.shape)}."
            )
    unexpected = [key for key in state if key not in expected]
    if unexpected:
        raise ValueError(f"{other_model}: unexpected key {unexpected[0]!r}.")
    net.load_state_dict(state)


class ImageClassifier(L.LightningModule):
    """Trains a network with cross-entropy and AdamW under a cosine learning-rate schedule.

    Args:
        architecture: a name from ``ARCHITECTURES`` or an import path of an ``nn.Module`` class that takes
            ``num_classes`` and ``in_channels``; or a ready ``nn.Module`` (then not saved in hparams, so
            ``load_from_checkpoint`` needs it passed again).
        num_classes: outputs of the network (``train.py`` takes it from the datamodule).
        in_channels: channels of the input images (``train.py`` takes it from the datamodule).
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        checkpoint: start from trained weights (a Lightning checkpoint or a ``state_dict`` file).
        architecture_options: extra keyword arguments of the architecture (``widths`` of the CNN, say).
    """

    task = "image classification"  # the data it trains on: train.py refuses another pairing in one line

    def __init__(
        self,
        architecture: str | nn.Module = "cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        checkpoint: str | None = None,
        architecture_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_integer("model.num_classes", num_classes, minimum=1)
        check_integer("model.in_channels", in_channels, minimum=1)
        check_number("model.lr", lr)
        if lr <= 0:
            raise ValueError(f"model.lr={lr!r} is invalid: it must be positive.")
        check_number("model.weight_decay", weight_decay)
        if weight_decay < 0:
            raise ValueError(f"model.weight_decay={weight_decay!r} is invalid: it must be 0 or more.")
        self.save_hyperparameters(ignore=["architecture"] if isinstance(architecture, nn.Module) else [])
        if isinstance(architecture, nn.Module):
            self.net = architecture
        else:
            self.net = build_network(architecture, num_classes, in_channels, **(architecture_options or {}))
        if checkpoint is not None:
            load_network_weights(self.net, checkpoint)
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A QAT checkpoint holds fake-quant modules: rebuild them so that load_from_checkpoint fits.
        restore_pruned_channels(self, checkpoint)  # a checkpoint written after shrink_epoch holds smaller layers
        restore_quantization(self, checkpoint)

    def _step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, accuracy: MulticlassAccuracy):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        accuracy(logits, labels)
        self.log(f"{stage}/loss", loss, prog_bar=stage != "test")
        self.log(f"{stage}/acc", accuracy, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", self.train_accuracy)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val", self.val_accuracy)

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test", self.test_accuracy)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        epochs = max(self.trainer.max_epochs or 1, 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
