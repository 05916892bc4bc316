"""The compression callbacks on LightningModules nobody here wrote: whatever ``forward`` takes, or when
``training_step`` never calls it. The callbacks watch ``training_step`` on a real batch to learn how each
network is called, and check every compressed model on those calls."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.nn.quantized import Linear as LinearInt8
from torch.ao.nn.quantized.dynamic import Linear as DynamicLinearInt8
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import DynamicQuantization, MagnitudePruning, PostTrainingQuantization, QuantizationAwareTraining

from conftest import quiet_trainer


def _digit_tensors(digits) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = digits.train_set.tensors
    return images[:512], labels[:512]


class LossInForward(L.LightningModule):
    """A language-model-like module: ``forward(inputs, targets)`` computes its own loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(inputs), targets)

    def training_step(self, batch, batch_idx):
        loss = self(*batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class DictBatch(L.LightningModule):
    """``training_step`` unpacks a dict batch and calls ``self.net(**batch)``; ``forward`` is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _KeywordNet()

    def training_step(self, batch, batch_idx):
        labels = batch.pop("labels")
        return F.cross_entropy(self.net(**batch), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class _KeywordNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Linear(16 * 8 * 8, 10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).flatten(1))


class TinyTransformer(L.LightningModule):
    """A transformer encoder classifier over the 64 pixels of a digit as tokens: ``forward(tokens, mask)``."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.embedding = nn.Embedding(17, width)
        self.position = nn.Parameter(torch.zeros(64, width))
        layer = nn.TransformerEncoderLayer(width, nhead=2, dim_feedforward=64, batch_first=True, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.classifier = nn.Linear(width, 10)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(self.embedding(tokens) + self.position, src_key_padding_mask=~mask)
        return self.classifier((hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True))

    def training_step(self, batch, batch_idx):
        tokens, mask, labels = batch
        return F.cross_entropy(self(tokens, mask), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=3e-3)


class _DictDataset(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"images": self.images[index], "labels": self.labels[index]}


def _loader(kind: str, digits) -> DataLoader:
    images, labels = _digit_tensors(digits)
    if kind == "loss_in_forward":
        return DataLoader(TensorDataset(images, labels), batch_size=64)
    if kind == "dict_batch":
        return DataLoader(_DictDataset(images, labels), batch_size=64)
    # tokens: grey levels 0..16 of the pixels; the last 8 positions of every second image are padding
    tokens = (images.flatten(1) * 8 + 8).round().clamp(0, 16).long()
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[::2, -8:] = False
    return DataLoader(TensorDataset(tokens, mask, labels), batch_size=64)


MODULES = {"loss_in_forward": LossInForward, "dict_batch": DictBatch, "transformer": TinyTransformer}


def _first_batch(kind: str, digits):
    return next(iter(_loader(kind, digits)))


def _run_step(module: L.LightningModule, kind: str, digits) -> torch.Tensor:
    """What the module computes on a batch, through its own training_step's path."""
    batch = _first_batch(kind, digits)
    with torch.no_grad():
        if kind == "loss_in_forward":
            return module(*batch)
        if kind == "dict_batch":
            return module.net(images=batch["images"])
        return module(batch[0], batch[1])


def _fit(tmp_path: Path, kind: str, digits, callback: L.Callback, epochs: int = 2) -> L.LightningModule:
    L.seed_everything(0)
    module = MODULES[kind]()
    quiet_trainer(tmp_path, [callback], epochs, limit_val_batches=0).fit(module, train_dataloaders=_loader(kind, digits))
    return module


@pytest.mark.parametrize("kind", list(MODULES))
def test_qat_converts_whatever_the_forward_signature(tmp_path: Path, digits, kind: str):
    qat = QuantizationAwareTraining(start_epoch=1, backend="x86", export_format="torchscript", export_dir=str(tmp_path))
    module = _fit(tmp_path, kind, digits, qat)
    int8 = qat.quantized_model
    assert any(isinstance(layer, LinearInt8) for layer in int8.modules())
    module.eval()
    fake_quant, quantized = _run_step(module, kind, digits), _run_step(int8, kind, digits)
    assert quantized.shape == fake_quant.shape and torch.isfinite(quantized).all()
    assert (quantized - fake_quant).abs().mean() <= 0.1 * fake_quant.abs().mean() + 1e-3
    # the export traces the network training_step called (the module's forward, or the submodule a dict batch
    # goes to), with the arguments it gave it: whatever the forward takes, the exported int8 network runs on them
    exported = torch.jit.load(str(qat.export_path))
    batch = _first_batch(kind, digits)
    inputs = [batch["images"]] if kind == "dict_batch" else batch[:2]
    with torch.no_grad():
        assert torch.allclose(exported(*inputs), quantized, atol=1e-5)


@pytest.mark.parametrize("kind", list(MODULES))
def test_ptq_calibrates_by_replaying_training_steps(tmp_path: Path, digits, kind: str):
    ptq = PostTrainingQuantization(calibration_batches=4, backend="x86", export_format="none")
    module = _fit(tmp_path, kind, digits, ptq, epochs=1)
    assert ptq.calibrated_batches == 4
    float_output, int8_output = _run_step(module.eval(), kind, digits), _run_step(ptq.quantized_model, kind, digits)
    assert any(isinstance(layer, LinearInt8) for layer in ptq.quantized_model.modules())
    assert (int8_output - float_output).abs().mean() <= 0.1 * float_output.abs().mean() + 1e-3


@pytest.mark.parametrize("kind", list(MODULES))
def test_dynamic_quantization_returns_a_model_that_runs(tmp_path: Path, digits, kind: str):
    dynamic = DynamicQuantization(export_format="none", backend="x86")
    module = _fit(tmp_path, kind, digits, dynamic, epochs=1)
    int8 = dynamic.quantized_model
    assert any(isinstance(layer, DynamicLinearInt8) for layer in int8.modules())
    float_output, int8_output = _run_step(module.eval(), kind, digits), _run_step(int8, kind, digits)
    assert (int8_output - float_output).abs().mean() <= 0.1 * float_output.abs().mean() + 1e-3
    if kind == "transformer":
        # nn.TransformerEncoderLayer's inference fast path reads linear1.weight directly: those layers stay
        # float, named; the classifier, which nothing reads directly, is int8
        assert isinstance(int8.classifier, DynamicLinearInt8)
        assert "encoder.layers.0.linear1" in dynamic.float_layers


@pytest.mark.parametrize("kind", ["loss_in_forward", "transformer"])
def test_pruning_exports_whatever_the_forward_signature(tmp_path: Path, digits, kind: str):
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, plot=True, export_dir=str(tmp_path))
    _fit(tmp_path, kind, digits, pruning)
    assert pruning.export_path is not None and pruning.export_path.is_file()
    assert pruning.plot_path is not None and pruning.plot_path.is_file()
    exported = torch.jit.load(str(pruning.export_path))
    batch = _first_batch(kind, digits)
    with torch.no_grad():
        assert torch.allclose(exported(*batch[:2]), _run_step(pruning.pruned_model, kind, digits), atol=1e-5)


def test_a_training_step_that_fails_is_one_clear_error_before_training(tmp_path: Path, digits):
    class Broken(LossInForward):
        def training_step(self, batch, batch_idx):
            raise KeyError("labels")

    module = Broken()
    before = {key: value.clone() for key, value in module.state_dict().items()}
    trainer = quiet_trainer(tmp_path, [QuantizationAwareTraining()], 1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"Broken.training_step failed on a real training batch \(KeyError: 'labels'\)"):
        trainer.fit(module, train_dataloaders=_loader("loss_in_forward", digits))
    assert trainer.global_step == 0
    assert all(torch.equal(before[key], value) for key, value in module.state_dict().items())


def test_watching_a_training_step_leaves_no_trace(tmp_path: Path, digits):
    """The watched step moves no BatchNorm statistics, logs nothing and draws no random numbers."""
    from lightning_compress.inputs import watch_training_step

    module = DictBatch()
    module.train()
    before = {key: value.clone() for key, value in module.state_dict().items()}
    batch = _first_batch("dict_batch", digits)
    random_state = torch.random.get_rng_state()
    calls = watch_training_step(module, [batch], ["net"])
    assert set(calls["net"][0][1]) == {"images"}  # seen called with a keyword argument
    assert "" not in calls  # forward itself was never called
    assert module.training
    assert all(torch.equal(before[key], value) for key, value in module.state_dict().items())
    assert torch.equal(torch.random.get_rng_state(), random_state)


def test_the_run_check_runs_the_training_step_itself(digits):
    """A compressed model counts as running only if training_step runs: calling forward instead would hide a
    module that breaks in its step."""
    from lightning_compress.inputs import runs

    class ForwardWorksStepBreaks(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(64, 10)

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.net(images.flatten(1))

        def training_step(self, batch, batch_idx):
            raise RuntimeError("int8 layer rejected the step")

    batch = _first_batch("loss_in_forward", digits)
    assert runs(LossInForward(), [batch]) is None
    assert runs(ForwardWorksStepBreaks(), [batch]) == "int8 layer rejected the step"


def test_a_network_called_with_a_named_tuple_is_watched(digits):
    """Recorded arguments keep their containers: a network that takes a named tuple is seen called with one."""
    from collections import namedtuple

    from lightning_compress.inputs import watch_training_step

    Pair = namedtuple("Pair", ["images", "labels"])

    class TakesAPair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(64, 10)

        def forward(self, pair: Pair) -> torch.Tensor:
            return F.cross_entropy(self.linear(pair.images.flatten(1)), pair.labels)

    class PairStep(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TakesAPair()

        def training_step(self, batch, batch_idx):
            return self.net(Pair(*batch))

    batch = _first_batch("loss_in_forward", digits)
    (pair,), _ = watch_training_step(PairStep(), [batch], ["net"])["net"][0]
    assert isinstance(pair, Pair) and torch.equal(pair.images, batch[0])


def test_a_transformer_layer_that_cannot_be_traced_is_quantized_by_module_swap(tmp_path: Path, digits):
    """nn.TransformerEncoderLayer cannot be traced, and its Linear children quantized alone break it (in eval
    it reads their weights for a fused float kernel): its Linear layers are swapped for fake-quant ones and
    become dynamic int8; the attention's out_proj, read by its parent, stays float and the table says so.
    The embedding and the learned position (a parameter of the LightningModule itself) are handled too."""
    from torch.ao.nn.quantized import Embedding as EmbeddingInt8

    qat = QuantizationAwareTraining(start_epoch=1, backend="x86", export_format="none")
    module = _fit(tmp_path, "transformer", digits, qat)
    parts = {part.name: part for part in qat.parts}
    layer = parts["encoder.layers.0"]
    assert layer.quantized and layer.swapped_layers == ["encoder.layers.0.linear1", "encoder.layers.0.linear2"]
    assert "module swap" in layer.reason
    assert layer.int8_layers == 2 and layer.float_layers == ["self_attn.out_proj"]
    int8 = qat.quantized_model
    assert isinstance(int8.encoder.layers[0].linear1, DynamicLinearInt8)
    assert isinstance(int8.encoder.layers[0].linear2, DynamicLinearInt8)
    assert isinstance(int8.encoder.layers[0].self_attn.out_proj, nn.Linear)
    assert any(isinstance(layer, EmbeddingInt8) for layer in int8.embedding.modules())

    # in eval the swapped layers compute through their own forward (fake-quant on), not a fused float kernel
    module.eval()
    fake_quant = _run_step(module, "transformer", digits)
    float_output = _run_step(qat.float_model(module), "transformer", digits)
    assert not torch.equal(fake_quant, float_output)
    assert (_run_step(int8, "transformer", digits) - fake_quant).abs().mean() <= 0.1 * fake_quant.abs().mean()


def test_a_checkpoint_with_swapped_layers_restores(tmp_path: Path, digits):
    """The swapped structure is recorded in the callback's checkpoint state: a fresh module given it by
    restore_quantization loads the weights strictly and computes what the trained one did."""
    from lightning_compress.quantization import restore_quantization

    qat = QuantizationAwareTraining(start_epoch=1, backend="x86", export_format="none")
    L.seed_everything(0)
    trained = TinyTransformer()
    trainer = quiet_trainer(tmp_path, [qat], 2, limit_val_batches=0)
    trainer.fit(trained, train_dataloaders=_loader("transformer", digits))
    trainer.save_checkpoint(tmp_path / "qat.ckpt")
    checkpoint = torch.load(tmp_path / "qat.ckpt", weights_only=True)
    fresh = TinyTransformer()
    assert "encoder.layers.0" in restore_quantization(fresh, checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    trained.eval(), fresh.eval()
    assert torch.equal(_run_step(fresh, "transformer", digits), _run_step(trained, "transformer", digits))


@pytest.mark.parametrize("kind", list(MODULES))
def test_channel_pruning_shrinks_whatever_the_forward_signature(tmp_path: Path, digits, kind: str):
    """Channel groups are found on the calls training_step makes (keywords, a transformer's mask), and the
    shrunken model runs on them and computes what the masked one did. In the transformer only the
    feed-forward width can go: the residual width is attention's, split into heads."""
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none")
    module = _fit(tmp_path, kind, digits, pruning)
    shrunken = pruning.pruned_model
    assert sum(p.numel() for p in shrunken.parameters()) < sum(p.numel() for p in module.parameters())
    module.eval()
    assert torch.allclose(_run_step(shrunken, kind, digits), _run_step(module, kind, digits), rtol=1e-3, atol=1e-4)
    if kind == "transformer":
        layer = shrunken.encoder.layers[0]
        assert layer.linear1.out_features == layer.linear2.in_features == 32
        assert layer.self_attn.embed_dim == shrunken.classifier.in_features == 32  # width untouched
