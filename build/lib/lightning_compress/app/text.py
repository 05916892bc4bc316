"""Real text that ships with every Python: byte-level language modelling on the standard library's own sources.

``PythonSourceDataModule`` reads the ``.py`` files of this interpreter's standard library (about 30 MB on
CPython 3.11; no download, no dataset files), splits them by file with a seed, and serves fixed-length blocks
of bytes with the next byte of each position as its label. ``ByteTransformer`` is a small decoder-only
transformer that learns them; its Linear layers are what low-bit weight quantization of language models acts on.
"""

from __future__ import annotations

import math
import random
import sysconfig
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric

from lightning_compress.app.data import EpochSeededSampler
from lightning_compress.pruning import restore_pruned_channels
from lightning_compress.quantization import restore_quantization
from lightning_compress.validation import check_integer, check_number

VOCABULARY = 256  # byte values


def standard_library_sources() -> list[Path]:
    """The standard library's ``.py`` files, sorted (installed packages in ``site-packages`` are not part of it)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(path for path in root.rglob("*.py") if "site-packages" not in path.parts and path.is_file())


class PythonSourceDataModule(L.LightningDataModule):
    """Blocks of bytes from the standard library's source files; labels are the next byte at each position.

    The split is by file (a file's text is in one split only), shuffled by ``split_seed``; the same Python
    installation gives the same split. Each split's files are joined in their shuffled order and cut into
    blocks of ``block_size`` bytes, up to ``train_bytes`` (train) or ``eval_bytes`` (validation, test).

    Args:
        block_size: bytes per sample (the context length).
        batch_size: samples per batch.
        val_fraction: share of the files held out for validation.
        test_fraction: share of the files held out for the test.
        split_seed: seed of the split by file.
        train_bytes: at most this many bytes of training text (``None``: all of the split's).
        eval_bytes: at most this many bytes of validation and of test text (``None``: all).
        num_workers: DataLoader worker processes; the data is in memory, so 0 is fastest.
    """

    num_classes = VOCABULARY  # what train.py hands to models that take it
    num_channels = 1

    task = "language modelling"  # train.py refuses a pairing with another task in one line

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 32,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 0,
        train_bytes: int | None = 2_000_000,
        eval_bytes: int | None = 200_000,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_integer("data.block_size", block_size, minimum=2)
        check_integer("data.batch_size", batch_size, minimum=1)
        check_number("data.val_fraction", val_fraction, 0.0, 1.0, low_open=True, high_open=True)
        check_number("data.test_fraction", test_fraction, 0.0, 1.0, low_open=True, high_open=True)
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training files: "
                "their sum must be below 1."
            )
        check_integer("data.split_seed", split_seed, minimum=0)
        for name, value in (("data.train_bytes", train_bytes), ("data.eval_bytes", eval_bytes)):
            check_integer(name, value, minimum=block_size + 1, none="all of the split's text")
        check_integer("data.num_workers", num_workers, minimum=0)
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.train_bytes = train_bytes
        self.eval_bytes = eval_bytes
        self.num_workers = num_workers
        self.files: dict[str, list[Path]] = {}
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    def prepare_data(self) -> None:
        if not standard_library_sources():
            raise FileNotFoundError(
                f"data: no .py files under {sysconfig.get_paths()['stdlib']!r}: this Python ships without its "
                "standard library's sources."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        files = standard_library_sources()
        random.Random(self.split_seed).shuffle(files)
        test_count = max(1, round(self.test_fraction * len(files)))
        val_count = max(1, round(self.val_fraction * len(files)))
        self.files = {
            "test": files[:test_count],
            "val": files[test_count : test_count + val_count],
            "train": files[test_count + val_count :],
        }
        self.train_set = self._blocks(self.files["train"], self.train_bytes)
        self.val_set = self._blocks(self.files["val"], self.eval_bytes)
        self.test_set = self._blocks(self.files["test"], self.eval_bytes)

    def _blocks(self, files: list[Path], limit: int | None) -> TensorDataset:
        text = bytearray()
        for path in files:
            if limit is not None and len(text) > limit:
                break
            text += path.read_bytes() + b"\n"
        data = torch.frombuffer(bytes(text[: limit if limit is not None else len(text)]), dtype=torch.uint8).long()
        count = (len(data) - 1) // self.block_size
        inputs = data[: count * self.block_size].view(count, self.block_size)
        labels = data[1 : count * self.block_size + 1].view(count, self.block_size)
        return TensorDataset(inputs, labels)

    def _loader(self, dataset: TensorDataset, shuffle: bool) -> DataLoader:
        # shuffled by epoch from torch's seed (seed_everything): a resumed run sees the batches an uninterrupted one does
        sampler = EpochSeededSampler(len(dataset), torch.initial_seed() % 2**31) if shuffle else None
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention that sees only earlier positions; its projections are plain Linear layers."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        batch, length, width = hidden.shape
        query, key, value = self.qkv(hidden).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value, is_causal=True)
        return self.out(attended.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """Pre-norm transformer block: attention, then a two-layer MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attention(self.attention_norm(hidden))
        return hidden + self.mlp(self.mlp_norm(hidden))


class ByteTransformer(L.LightningModule):
    """A small decoder-only transformer language model over bytes, randomly initialized.

    ``forward`` maps (batch, length) byte indices to (batch, length, 256) next-byte logits. Logged:
    ``{train,val,test}/loss`` (cross-entropy per byte, nats), ``{val,test}/perplexity`` and ``{val,test}/acc``
    (next-byte accuracy). AdamW with a cosine schedule over optimizer steps.

    Args:
        block_size: the longest context (positions with a learned embedding).
        width: model width.
        layers: decoder blocks.
        heads: attention heads (must divide ``width``).
        mlp_ratio: hidden width of each block's MLP, as a multiple of ``width``.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
    """

    task = "language modelling"  # train.py refuses a pairing with another task in one line

    def __init__(
        self,
        block_size: int = 128,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__()
        for name, value in (
            ("block_size", block_size),
            ("width", width),
            ("layers", layers),
            ("heads", heads),
            ("mlp_ratio", mlp_ratio),
        ):
            check_integer(f"model.{name}", value, minimum=1)
        if width % heads:
            raise ValueError(f"model.heads={heads} is invalid: it must divide model.width={width}.")
        check_number("model.lr", lr, low=0.0, low_open=True)
        check_number("model.weight_decay", weight_decay, low=0.0)
        self.save_hyperparameters()
        self.token_embedding = nn.Embedding(VOCABULARY, width)
        self.position_embedding = nn.Embedding(block_size, width)
        self.blocks = nn.Sequential(*(DecoderBlock(width, heads, mlp_ratio) for _ in range(layers)))
        self.final_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCABULARY)
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_accuracy, self.test_accuracy = MeanMetric(), MeanMetric()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        hidden = self.token_embedding(tokens) + self.position_embedding(positions)
        return self.head(self.final_norm(self.blocks(hidden)))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a compressed checkpoint holds another structure (fake-quant layers, fewer channels): rebuild it first
        restore_pruned_channels(self, checkpoint)
        restore_quantization(self, checkpoint)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        loss = F.cross_entropy(self(tokens).flatten(0, 1), labels.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str, loss_metric: MeanMetric, accuracy: MeanMetric) -> None:
        tokens, labels = batch
        logits = self(tokens)
        loss_metric.update(F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none"))
        accuracy.update((logits.argmax(-1) == labels).float())
        self.log(f"{stage}/loss", loss_metric, prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_loss, self.val_accuracy)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_loss, self.test_accuracy)

    def on_validation_epoch_end(self) -> None:
        self.log("val/perplexity", math.exp(float(self.val_loss.compute())))

    def on_test_epoch_end(self) -> None:
        self.log("test/perplexity", math.exp(float(self.test_loss.compute())))

    def configure_optimizers(self):
        """AdamW, its rate on a cosine over the fit's optimizer steps down to zero at the last one, as language
        models are trained. Stepped per epoch over a short fine-tune, the rate ended at half its peak and QAT's
        4-bit weights kept hopping between grid levels to the end: on the LM benchmark's seed 0, QAT won back 21%
        of PTQ's 8da4w perplexity increase with the per-epoch cosine and 50% with this one. A fit with no bound
        on its steps (``max_epochs=-1`` and no ``max_steps``) keeps the peak rate."""
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(steps):
            return optimizer
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(steps), 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
