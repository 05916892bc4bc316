"""A user's own modules, written the way people fine-tune Hugging Face transformers with Lightning: models built
from their configs (nothing downloaded), dict batches, ``self.model(**batch).loss``. Nothing here is part of
lightning-compress: the tests and ``train.py`` (``model._target_=user_transformers.BertDigits``) take them as a
user's code.

Data: scikit-learn's handwritten digits, as token sequences (a class token, then the 64 grey levels 0..16) for
BERT, as images for ViT.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    ViTConfig,
    ViTForImageClassification,
)

CLASS_TOKEN = 17


class DigitSequences(Dataset):
    """The digits as dicts: ``input_ids`` (a class token, then the pixels' grey levels), ``attention_mask``,
    ``pixel_values`` (the 8x8 image scaled to 0..1) and ``labels``."""

    def __init__(self, indices: torch.Tensor) -> None:
        digits = load_digits()
        pixels = torch.tensor(digits.data, dtype=torch.long)[indices]
        self.input_ids = torch.cat([torch.full((len(pixels), 1), CLASS_TOKEN), pixels], 1)
        self.pixel_values = pixels.float().view(-1, 1, 8, 8) / 16
        self.labels = torch.tensor(digits.target)[indices]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids[index],
            "attention_mask": torch.ones_like(self.input_ids[index]),
            "pixel_values": self.pixel_values[index],
            "labels": self.labels[index],
        }


class DigitTokens(L.LightningDataModule):
    """Train, validation and test splits of ``DigitSequences`` (fixed by a seed), dict batches."""

    num_classes = 10

    def __init__(self, batch_size: int = 32, train_size: int = 1200) -> None:
        super().__init__()
        order = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
        self.splits = {"train": order[:train_size], "val": order[train_size:1500], "test": order[1500:]}
        self.batch_size = batch_size

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(DigitSequences(self.splits[split]), batch_size=self.batch_size, shuffle=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


class _Classifier(L.LightningModule):
    """``training_step`` calls the transformers model itself, with the batch as keywords."""

    inputs: tuple[str, ...] = ()

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.lr = lr

    def _batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: batch[name] for name in (*self.inputs, "labels")}

    def training_step(self, batch, batch_idx):
        loss = self.model(**self._batch(batch)).loss
        self.log("train/loss", loss)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        output = self.model(**self._batch(batch))
        self.log(f"{stage}/loss", output.loss)
        self.log(f"{stage}/acc", (output.logits.argmax(-1) == batch["labels"]).float().mean())

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class BertDigits(_Classifier):
    """A BERT encoder classifying the digits' token sequences."""

    inputs = ("input_ids", "attention_mask")

    def __init__(self, hidden_size: int = 32, layers: int = 2, heads: int = 4, lr: float = 2e-3, dropout: float = 0.0) -> None:
        super().__init__(lr)
        config = BertConfig(
            vocab_size=CLASS_TOKEN + 1,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden_size,
            max_position_embeddings=80,
            num_labels=10,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
        )
        self.model = BertForSequenceClassification(config)


class ViTDigits(_Classifier):
    """A ViT classifying the 8x8 digit images in 2x2 patches."""

    inputs = ("pixel_values",)

    def __init__(self, hidden_size: int = 32, layers: int = 2, heads: int = 4, lr: float = 2e-3) -> None:
        super().__init__(lr)
        config = ViTConfig(
            image_size=8,
            patch_size=2,
            num_channels=1,
            hidden_size=hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=4 * hidden_size,
            num_labels=10,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.model = ViTForImageClassification(config)


class KeywordOnlyNet(L.LightningModule):
    """A network whose forward takes keywords only, called with them: ``forward(*, pixels, scale)``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))

    def forward(self, *, pixels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.net(pixels * scale)

    def training_step(self, batch, batch_idx):
        scale = torch.ones(len(batch["labels"]), 1, 1, 1)
        return F.cross_entropy(self(pixels=batch["pixel_values"], scale=scale), batch["labels"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class LlamaBytes(L.LightningModule):
    """A Llama language model (grouped-query attention: 4 query heads share 2 key-value heads) over bytes."""

    def __init__(self, hidden_size: int = 32, layers: int = 2, lr: float = 3e-3, tie_word_embeddings: bool = False) -> None:
        super().__init__()
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=tie_word_embeddings,
        )
        self.model = LlamaForCausalLM(config)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return F.cross_entropy(self.model(input_ids=tokens).logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)
