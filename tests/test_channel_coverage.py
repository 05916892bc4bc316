"""Channel pruning on the architectures people use: each run completes, the network with its channels
removed computes what the masked one did, and it is as small as Torch-Pruning makes it at the same ratio.

Torch-Pruning's own pruner is run beside ours in each test (same network, same 50% per group, the final
classifier left alone, as its documentation asks), so the comparison is with what it does today, not with a
number written down once."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import MagnitudePruning, channel_groups

from conftest import quiet_trainer

# name -> (what it has, constructor arguments); the fast ones run by default, the rest with -m slow
ARCHITECTURES = {
    "resnet18": ("residual adds", {}),
    "mobilenet_v3_small": ("squeeze-excitation", {}),
    "mobilenet_v2": ("depthwise convolutions", {}),
    "efficientnet_b0": ("squeeze-excitation, stochastic depth", {}),
    "densenet121": ("concatenation", {}),
    "regnet_x_400mf": ("grouped convolutions", {}),
    "convnext_tiny": ("LayerNorm over channels, permutes", {}),
    "vit_b_16": ("attention", {"image_size": 32}),
}
FAST = {"resnet18", "mobilenet_v3_small"}


class Classifier(L.LightningModule):
    def __init__(self, architecture: str) -> None:
        super().__init__()
        self.net = getattr(torchvision.models, architecture)(num_classes=10, **ARCHITECTURES[architecture][1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _images(count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, 32, 32, generator=generator), torch.randint(0, 10, (count,), generator=generator)


def _parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _torch_pruning_fraction(network: nn.Module, images: torch.Tensor) -> float:
    import torch_pruning

    network = copy.deepcopy(network).eval()
    dense = _parameters(network)
    classifier = [module for module in network.modules() if isinstance(module, nn.Linear)][-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = torch_pruning.pruner.MagnitudePruner(
            network,
            images[:2],
            importance=torch_pruning.importance.MagnitudeImportance(p=2),
            pruning_ratio=0.5,
            ignored_layers=[classifier],
        )
        pruner.step()
    return _parameters(network) / dense


@pytest.mark.parametrize(
    "architecture", [pytest.param(name, marks=() if name in FAST else pytest.mark.slow) for name in ARCHITECTURES]
)
def test_channel_pruning_covers_the_architecture(tmp_path: Path, architecture: str):
    L.seed_everything(0)
    module = Classifier(architecture)
    images, labels = _images()
    pruning = MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none")
    trainer = quiet_trainer(tmp_path, [pruning], 2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=8))

    shrunken, masked = pruning.pruned_model.net, module.net.eval()
    fraction = _parameters(shrunken) / _parameters(masked)
    assert fraction < 0.95, "no channel was removed"
    with torch.no_grad():
        assert torch.allclose(shrunken(images), masked(images), rtol=1e-3, atol=1e-4)
    if architecture == "vit_b_16":  # Torch-Pruning fails on it with default settings: only the MLP widths shrink
        shrunk = [name for name, layer in shrunken.named_modules() if isinstance(layer, nn.Linear) and layer.out_features == 1536]
        assert len(shrunk) == 12  # every block's hidden width, 3072 -> 1536
        return
    assert fraction <= _torch_pruning_fraction(Classifier(architecture).net, images) + 0.05


def test_layer_norm_over_channels_is_masked_as_it_will_be_removed():
    """Zeroing a channel's LayerNorm scale and shift still counts it in the mean and variance: masked
    LayerNorms normalize over their kept channels only, so removing the channels changes nothing."""
    network = torchvision.models.convnext_tiny(num_classes=10).eval()
    images, _ = _images(2)
    groups = [group for group in channel_groups.find_channel_groups(network, images) if group.prunable]
    trunk = next(group for group in groups if group.root == "features.0.0")  # the stem: the first stage's width
    assert "features.0.1" in trunk.norm_dims  # torchvision's LayerNorm2d: channels first
    assert any(name.endswith(".block.2") for name in trunk.norm_dims)  # nn.LayerNorm after a permute: channels last
    keep = torch.arange(trunk.size) % 3 != 0
    masks = channel_groups.channel_masks(network, trunk, keep)
    masked, shrunken = copy.deepcopy(network), copy.deepcopy(network)
    with torch.no_grad():
        parameters = dict(masked.named_parameters())
        for name, mask in masks.items():
            parameters[name].mul_(mask)
        unnormalized = masked(images)
        channel_groups.mask_layer_norms(masked, [trunk])
        channel_groups.update_layer_norm_masks(masked, masks)
        channel_groups.remove_channels(shrunken, [trunk], [keep], images)
        assert shrunken.features[0][0].out_channels == int(keep.sum())
        assert torch.allclose(masked(images), shrunken(images), rtol=1e-3, atol=1e-4)
        assert not torch.allclose(unnormalized, shrunken(images), rtol=1e-3, atol=1e-4)  # the masking is needed


def test_a_group_that_cannot_be_removed_is_named_with_why():
    """The classifier's channels are the network's output: its group is left alone, saying so."""
    network = torchvision.models.resnet18(num_classes=10)
    images, _ = _images(2)
    groups = {group.root: group for group in channel_groups.find_channel_groups(network, images)}
    assert groups["fc"].blocked_by == "its channels reach the network's output"
    assert all(group.prunable for root, group in groups.items() if root != "fc")


@pytest.mark.slow
def test_the_app_prunes_the_channels_of_a_squeeze_excitation_network(tmp_path: Path):
    """`model=mobilenet_v3_small +compress=prune_channels` once died after training with a shape error in
    torchvision's SqueezeExcitation; now it ends with a smaller network that computes what the masked one did."""
    import json

    from conftest import run_train

    result = run_train(
        "model=mobilenet_v3_small",
        "data.image_size=32",
        "+compress=prune_channels",
        "trainer.max_epochs=2",
        "report.latency_runs=5",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads((tmp_path / "report.json").read_text())["rows"]}
    assert rows["channels removed"]["parameters"] < 0.3 * rows["dense"]["parameters"]
    assert rows["channels removed"]["accuracy"] == pytest.approx(rows["fp32"]["accuracy"])
    assert (tmp_path / "checkpoints" / "model_pruned.pt").is_file()
