from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_compress.data import DigitsDataModule, ImageFolderDataModule, TorchvisionDataModule


def _labels(dataset) -> torch.Tensor:
    return dataset.tensors[1]


def test_digits_split_is_stratified_disjoint_and_fixed_by_seed(digits: DigitsDataModule):
    sizes = [len(digits.train_set), len(digits.val_set), len(digits.test_set)]
    assert sum(sizes) == 1797
    assert abs(sizes[2] - 0.15 * 1797) <= 2 and abs(sizes[1] - 0.15 * 1797) <= 2
    # stratified: every class keeps about a tenth of the test set
    counts = torch.bincount(_labels(digits.test_set), minlength=10)
    assert counts.min() >= 25 and counts.max() <= 30
    # disjoint: no test image also appears in training
    train = {tuple(image.flatten().tolist()) for image in digits.train_set.tensors[0]}
    overlap = sum(tuple(image.flatten().tolist()) in train for image in digits.test_set.tensors[0])
    assert overlap <= 5  # a handful of digits are pixel-identical in the original data set
    again = DigitsDataModule()
    again.setup()
    assert torch.equal(_labels(again.test_set), _labels(digits.test_set))
    other = DigitsDataModule(split_seed=1)
    other.setup()
    assert not torch.equal(_labels(other.test_set), _labels(digits.test_set))


def test_digits_resize_and_channel_repeat():
    datamodule = DigitsDataModule(image_size=32, channels=3, batch_size=16)
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and labels.shape == (16,)
    assert torch.equal(images[:, 0], images[:, 2])
    assert -1.0 <= images.min() and images.max() <= 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "data.batch_size=0"),
        ({"channels": 2}, "data.channels=2"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "data.val_fraction + data.test_fraction"),
        ({"image_size": -8}, "data.image_size=-8"),
    ],
)
def test_digits_rejects_impossible_values(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        DigitsDataModule(**kwargs)


def _write_image_folder(root: Path, classes=("cat", "dog"), per_class=3) -> None:
    for split in ("train", "val", "test"):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for sample in range(per_class):
                colour = (255 * index, 40 * sample, 128)
                Image.new("RGB", (20, 12), colour).save(folder / f"{sample}.png")


def test_image_folder_reads_users_images(tmp_path: Path):
    _write_image_folder(tmp_path)
    datamodule = ImageFolderDataModule(str(tmp_path), batch_size=4, image_size=16, channels=3)
    assert datamodule.num_classes == 2 and datamodule.classes == ["cat", "dog"]
    datamodule.setup()
    images, labels = next(iter(datamodule.test_dataloader()))
    assert images.shape == (4, 3, 16, 16)
    assert sorted(set(datamodule.train_set.targets)) == [0, 1]


def test_image_folder_missing_split_names_root(tmp_path: Path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"data.root=.*missing: \['val', 'test'\]"):
        ImageFolderDataModule(str(tmp_path))


def test_torchvision_dataset_absent_offline_names_root_and_download(tmp_path: Path):
    datamodule = TorchvisionDataModule("mnist", root=str(tmp_path), download=False)
    assert (datamodule.num_classes, datamodule.num_channels, datamodule.image_size) == (10, 1, 28)
    with pytest.raises(FileNotFoundError, match=r"data.root=.*data.download=False"):
        datamodule.prepare_data()


def test_torchvision_unknown_dataset():
    with pytest.raises(ValueError, match=r"data.dataset='svhn' is unknown: allowed values are"):
        TorchvisionDataModule("svhn")


def test_train_fraction_keeps_a_stratified_subset_and_the_same_test_split(digits: DigitsDataModule):
    small = DigitsDataModule(train_fraction=0.1)
    small.setup()
    assert len(small.train_set) == pytest.approx(0.1 * len(digits.train_set), abs=1)
    assert set(_labels(small.train_set).tolist()) == set(range(10))
    assert torch.equal(_labels(small.test_set), _labels(digits.test_set))
    with pytest.raises(ValueError, match=r"data.train_fraction=0 is invalid"):
        DigitsDataModule(train_fraction=0)
