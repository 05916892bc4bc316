from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from lightning_compress.app.augmentation import RandomAffine
from lightning_compress.app.data import DigitsDataModule, ImageFolderDataModule, TorchvisionDataModule
from lightning_compress.app.models import ImageClassifier

from conftest import quiet_trainer


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


def _centroids(images: torch.Tensor) -> torch.Tensor:
    """(N, 2) centre of ink of each digit, in pixels (the background is -1)."""
    ink = (images[:, 0] + 1).clamp(min=0)
    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    total = ink.sum((1, 2))
    return torch.stack([(ink * rows).sum((1, 2)) / total, (ink * cols).sum((1, 2)) / total], 1)


def test_random_affine_moves_digits_by_at_most_the_shift_and_is_reproducible(digits: DigitsDataModule):
    images = digits.train_set.tensors[0][:64]
    identity = RandomAffine(shift=0.0, degrees=0.0, scale=0.0)
    assert torch.allclose(identity(images, torch.Generator().manual_seed(0)), images, atol=1e-5)

    one_pixel = RandomAffine(shift=0.125, degrees=0.0, scale=0.0)  # 1/8 of an 8-pixel side
    shifted = one_pixel(images, torch.Generator().manual_seed(0))
    moved = (_centroids(shifted) - _centroids(images)).abs()
    assert moved.max() <= 1.05 and moved.mean() > 0.2  # each digit moved, none by more than a pixel
    assert torch.equal(one_pixel(images, torch.Generator().manual_seed(0)), shifted)
    assert not torch.equal(one_pixel(images, torch.Generator().manual_seed(1)), shifted)


def test_augment_jitters_training_batches_only_and_resumes_exactly(tmp_path: Path):
    seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    class Recorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["train"].append(batch[0].clone())

        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            seen["val"].append(batch[0].clone())

    L.seed_everything(0)
    datamodule = DigitsDataModule(batch_size=64, augment=True)
    quiet_trainer(tmp_path, [Recorder()], 1, num_sanity_val_steps=0).fit(ImageClassifier(), datamodule=datamodule)
    originals = {tuple(image.flatten().tolist()) for image in datamodule.train_set.tensors[0]}
    jittered = [image for batch in seen["train"] for image in batch]
    assert sum(tuple(image.flatten().tolist()) in originals for image in jittered) < len(jittered) / 10
    assert torch.equal(torch.cat(seen["val"]), datamodule.val_set.tensors[0])  # validation is untouched

    # the views of epoch 2 are the same whether the run went on or resumed from the checkpoint after epoch 1
    weights = {}
    for name, resume in (("full", None), ("resumed", tmp_path / "full" / "epoch=0.ckpt")):
        L.seed_everything(0)
        model = ImageClassifier()
        every_epoch = ModelCheckpoint(dirpath=tmp_path / name, filename="{epoch}", save_top_k=-1)
        trainer = quiet_trainer(tmp_path / name, [every_epoch], 2)
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64, augment=True), ckpt_path=resume)
        weights[name] = model.state_dict()
    assert all(torch.equal(weights["resumed"][key], weights["full"][key]) for key in weights["full"])


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ({"shift": 0.1, "rotate": 5}, r"data.augment has unknown settings \['rotate'\]"),
        ({"degrees": 200}, r"data.augment.degrees=200 is invalid"),
        ("strong", "data.augment='strong' is invalid"),
    ],
)
def test_augment_rejects_bad_settings(augment, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(augment=augment)


@pytest.mark.parametrize("folds", [2, 5])
def test_k_folds_test_every_image_exactly_once_per_seed_stratified(folds: int):
    for seed in (0, 1):
        tested = []
        for fold in range(folds):
            data = DigitsDataModule(folds=folds, fold=fold, split_seed=seed)
            data.setup()
            tested += data.test_indices.tolist()
            everything = torch.cat([split.tensors[1] for split in (data.train_set, data.val_set, data.test_set)])
            # stratified: each fold holds 1/folds of every class, to the image
            counts = torch.bincount(data.test_set.tensors[1], minlength=10).float()
            assert (counts - torch.bincount(everything, minlength=10).float() / folds).abs().max() < 1.0
            assert len(data.train_set) + len(data.val_set) + len(data.test_set) == 1797
        assert sorted(tested) == list(range(1797))  # each image once
    first = DigitsDataModule(folds=5, fold=0, split_seed=0)
    other_seed = DigitsDataModule(folds=5, fold=0, split_seed=1)
    for data in (first, other_seed):
        data.setup()
    assert not torch.equal(first.test_indices, other_seed.test_indices)  # the seed reshuffles the folds


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"folds": 1}, r"data.folds=1 is invalid: it must be an integer from 2 to 174, or None"),
        ({"folds": 175}, r"data.folds=175 is invalid: it must be an integer from 2 to 174"),
        ({"folds": 5, "fold": 5}, r"data.fold=5 is invalid: it must be an integer from 0 to 4"),
        ({"folds": 2, "val_fraction": 0.5}, r"data.val_fraction=0.5 with data.folds=2 .* leaves no training data"),
    ],
)
def test_k_fold_settings_that_cannot_work_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_the_benchmarks_k_fold_helper_scores_every_image_with_a_model_that_never_saw_it():
    import sys

    from conftest import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from kfold import kfold_accuracy, paired_difference
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def nearest_class_mean(data: DigitsDataModule, seed: int) -> dict[str, torch.Tensor]:
        images, labels = (tensor.flatten(1) if tensor.dim() > 1 else tensor for tensor in data.train_set.tensors)
        means = torch.stack([images[labels == digit].mean(0) for digit in range(10)])
        test = data.test_set.tensors[0].flatten(1)
        return {"nearest mean": torch.cdist(test, means).argmin(1), "constant": torch.zeros(len(test), dtype=torch.long)}

    result = kfold_accuracy(nearest_class_mean, folds=3, seeds=[0, 1])
    assert result["images"] == 1797 and result["seeds"] == [0, 1]
    constant = result["arms"]["constant"]["per_seed"]
    assert constant == [pytest.approx(178 / 1797)] * 2  # 178 zeros among the digits: every image counted once
    assert 0.85 <= result["arms"]["nearest mean"]["mean"] <= 0.95
    gain = paired_difference(result, "nearest mean", "constant")
    expected = [100 * (a - b) for a, b in zip(result["arms"]["nearest mean"]["per_seed"], constant, strict=True)]
    assert gain["per_seed"] == pytest.approx(expected) and gain["mean"] == pytest.approx(sum(expected) / 2)
    assert gain["standard_error"] == pytest.approx(abs(expected[0] - expected[1]) / 2)  # stdev of two / sqrt(2)
