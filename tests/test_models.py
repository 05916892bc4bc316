from pathlib import Path

import pytest
import torch

from lightning_compress.app.models import ARCHITECTURES, ImageClassifier, SmallCNN, build_network


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
@pytest.mark.parametrize(("in_channels", "size"), [(1, 8), (3, 32)])
def test_architectures_fit_small_inputs(architecture: str, in_channels: int, size: int):
    options = {"image_size": size} if architecture == "lstm" else {}  # the LSTM reads rows of a known width
    net = build_network(architecture, num_classes=7, in_channels=in_channels, **options).eval()
    assert net(torch.randn(2, in_channels, size, size)).shape == (2, 7)


def test_large_input_resnet_keeps_imagenet_stem():
    net = build_network("resnet18", num_classes=10, in_channels=3, small_input=False).eval()
    assert net.conv1.stride == (2, 2)
    assert net(torch.randn(1, 3, 224, 224)).shape == (1, 10)


def test_architecture_by_import_path():
    net = build_network("lightning_compress.app.models.SmallCNN", num_classes=4, in_channels=1, widths=(8,))
    assert isinstance(net, SmallCNN) and net.classifier.out_features == 4


def test_unknown_architecture_lists_the_allowed_ones():
    with pytest.raises(ValueError, match=r"model.architecture='vgg' is unknown: allowed are \['cnn'"):
        build_network("vgg", num_classes=10, in_channels=1)


def test_checkpoint_round_trip_from_lightning_and_state_dict(tmp_path: Path):
    trained = ImageClassifier(architecture="cnn")
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "lightning.ckpt")
    torch.save(trained.net.state_dict(), tmp_path / "net.pt")
    for path in ("lightning.ckpt", "net.pt"):
        loaded = ImageClassifier(architecture="cnn", checkpoint=str(tmp_path / path))
        for key, value in trained.net.state_dict().items():
            assert torch.equal(loaded.net.state_dict()[key], value), key


def test_checkpoint_shape_mismatch_names_the_key(tmp_path: Path):
    torch.save(ImageClassifier(architecture="cnn", num_classes=5).net.state_dict(), tmp_path / "five.pt")
    with pytest.raises(ValueError, match=r"key 'classifier.weight' has shape \(5, 128\), the model expects \(10, 128\)"):
        ImageClassifier(architecture="cnn", num_classes=10, checkpoint=str(tmp_path / "five.pt"))


def test_checkpoint_missing_file_and_missing_key(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="model.checkpoint='nope.pt' does not exist"):
        ImageClassifier(checkpoint="nope.pt")
    state = ImageClassifier().net.state_dict()
    del state["features.1.running_var"]
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="key 'features.1.running_var' is missing"):
        ImageClassifier(checkpoint=str(tmp_path / "partial.pt"))
