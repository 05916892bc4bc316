"""LightningDataModules for image classification.

``DigitsDataModule`` is the offline default: scikit-learn ships 1,797 real 8x8 handwritten digits, so
training, tests and benchmarks run with no download. The torchvision datasets and ``ImageFolderDataModule``
are for users with a network or with their own images. Every module exposes ``num_classes`` and
``num_channels`` right after construction so a model can be built for it, and checks that its data is
reachable before any training starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, random_split
from torchvision import datasets, transforms
from torchvision.datasets.folder import find_classes

from lightning_compress import compat
from lightning_compress.app.augmentation import RandomAffine
from lightning_compress.validation import check_integer, check_number, is_integer


def _check_positive(name: str, value: int) -> None:
    check_integer(f"data.{name}", value, minimum=1)


def _check_fraction(name: str, value: float) -> None:
    check_number(f"data.{name}", value, 0.0, 1.0, low_open=True, high_open=True)


def _check_channels(value: int) -> None:
    if not is_integer(value) or value not in (1, 3):
        raise ValueError(f"data.channels={value!r} is invalid: allowed values are 1 and 3.")


class EpochSeededSampler(Sampler[int]):
    """Shuffles with a generator seeded by ``seed + epoch``: the order of epoch k does not depend on what
    ran before, so a run resumed from a checkpoint sees the same batches as an uninterrupted one.
    Lightning calls ``set_epoch`` before every training epoch."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


def _augmentation(augment: bool | Mapping | RandomAffine | None) -> RandomAffine | None:
    """``data.augment``: ``true`` for the default jitter, a mapping of ``RandomAffine`` settings, or one."""
    if augment is None or augment is False:
        return None
    if augment is True:
        return RandomAffine()
    if isinstance(augment, RandomAffine):
        return augment
    if isinstance(augment, Mapping):
        allowed = set(inspect.signature(RandomAffine).parameters)  # RandomAffine's own settings, not a copy
        unknown = sorted(set(augment) - allowed)
        if unknown:
            raise ValueError(f"data.augment has unknown settings {unknown}: allowed are {sorted(allowed)}.")
        return RandomAffine(**augment)
    raise ValueError(
        f"data.augment={augment!r} is invalid: use true, false, or settings such as {{shift: 0.125, degrees: 10, scale: 0.1}}."
    )


class _ClassificationDataModule(L.LightningDataModule):
    """Shared loaders and training-batch augmentation; subclasses fill ``train_set``, ``val_set`` and
    ``test_set`` in ``setup``."""

    num_classes: int
    num_channels: int
    task = "image classification"  # what train.py pairs with a model's task

    def __init__(self, batch_size: int, num_workers: int, augment: bool | Mapping | RandomAffine | None = False) -> None:
        super().__init__()
        _check_positive("batch_size", batch_size)
        check_integer("data.num_workers", num_workers, minimum=0)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augmentation = _augmentation(augment)
        self.shuffle_seed = 0
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if getattr(self, split) is None:  # used outside a Trainer, which would have called setup
            self.setup()
        dataset = getattr(self, split)
        sampler = None
        if shuffle:  # seeded from torch's seed (seed_everything) when the loader is built
            self.shuffle_seed = torch.initial_seed() % 2**31
            sampler = EpochSeededSampler(len(dataset), self.shuffle_seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train_set", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val_set", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test_set", shuffle=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Jitter training batches (never validation or test) on their device, when ``augment`` is set."""
        trainer = self.trainer
        if self.augmentation is None or trainer is None or not trainer.training:
            return batch
        images, labels = batch
        # Seeded by run, epoch and batch, so that a resumed run draws the same views (see augmentation.py).
        batch_index = compat.training_batch_index(trainer)
        seed = hash((self.shuffle_seed, trainer.current_epoch, batch_index)) % 2**63  # ints hash alike in every process
        return self.augmentation(images, torch.Generator().manual_seed(seed)), labels


class DigitsDataModule(_ClassificationDataModule):
    """scikit-learn's handwritten digits (1,797 8x8 grey images, 10 classes), split by a fixed seed.

    The split is stratified, so every class keeps its share in train, val and test, and it depends only on
    ``split_seed``: runs with different training seeds are evaluated on the same test images.

    Args:
        batch_size: samples per batch.
        image_size: side of the square images fed to the model; 8 keeps the original pixels, larger values
            resize bilinearly (torchvision models want at least 32).
        channels: 1 keeps grey images; 3 repeats the grey channel for models built for RGB.
        val_fraction: share of all images held out for validation.
        test_fraction: share of all images held out for the test.
        split_seed: seed of the train/val/test split.
        num_workers: DataLoader worker processes; the data is tiny and in memory, so 0 is fastest.
        train_fraction: keep only this stratified share of the training split (for low-data studies, such
            as distilling a student that sees less data than its teacher did); val and test are unchanged.
        augment: jitter training batches (shift, rotation, zoom; see ``lightning_compress.app.augmentation``):
            ``true`` for the defaults, or a mapping such as ``{shift: 0.125, degrees: 10, scale: 0.1}``.
        folds: k-fold evaluation: the images are dealt into ``folds`` stratified parts (shuffled by
            ``split_seed``) and part ``fold`` is the test set (``test_fraction`` is then unused); the k runs
            with ``fold=0..k-1`` predict every image exactly once, each with a model that never saw it.
            ``None``: one fixed test split. At least 2, at most the images of the smallest class (174).
        fold: which part is the test set, from 0 to ``folds - 1``.
    """

    num_classes = 10
    smallest_class = 174  # images in the rarest class: the most folds that each hold one of every class

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 8,
        channels: int = 1,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        num_workers: int = 0,
        train_fraction: float = 1.0,
        augment: bool | Mapping | RandomAffine | None = False,
        folds: int | None = None,
        fold: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, augment)
        check_integer("data.folds", folds, minimum=2, maximum=self.smallest_class, none="one fixed test split")
        check_integer("data.fold", fold, minimum=0, maximum=(folds or 1) - 1)
        _check_positive("image_size", image_size)
        _check_channels(channels)
        check_number("data.train_fraction", train_fraction, 0.0, 1.0, low_open=True)
        check_integer("data.split_seed", split_seed, minimum=0)
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("test_fraction", test_fraction)
        if folds is not None and val_fraction + 1 / folds >= 1.0:
            raise ValueError(
                f"data.val_fraction={val_fraction} with data.folds={folds} (a test share of 1/{folds}) leaves no "
                "training data: use more folds or a smaller val_fraction."
            )
        if folds is None and val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"data.val_fraction + data.test_fraction = {val_fraction + test_fraction} leaves no training "
                "data: their sum must be below 1."
            )
        self.image_size = image_size
        self.num_channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.train_fraction = train_fraction
        self.folds = folds
        self.fold = fold
        self.test_indices: torch.Tensor | None = None  # positions in load_digits() of the test images

    def _images(self, pixels: torch.Tensor) -> torch.Tensor:
        # load_digits pixels are integers 0..16; centre them so the first layer sees zero-mean input.
        images = (pixels.reshape(-1, 1, 8, 8).float() / 16.0 - 0.5) / 0.5
        if self.image_size != 8:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        return images.repeat(1, self.num_channels, 1, 1)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        pixels, labels = torch.from_numpy(digits.data), torch.from_numpy(digits.target).long()
        indices = torch.arange(len(labels)).numpy()
        if self.folds is None:
            rest, test = train_test_split(indices, test_size=self.test_fraction, stratify=labels, random_state=self.split_seed)
            test_share = self.test_fraction
        else:
            splits = StratifiedKFold(n_splits=self.folds, shuffle=True, random_state=self.split_seed).split(indices, labels)
            rest, test = list(splits)[self.fold]
            test_share = len(test) / len(indices)
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1.0 - test_share),
            stratify=labels[rest],
            random_state=self.split_seed,
        )
        if self.train_fraction < 1.0:
            train, _ = train_test_split(
                train, train_size=self.train_fraction, stratify=labels[train], random_state=self.split_seed
            )
        images = self._images(pixels)
        self.train_set = TensorDataset(images[train], labels[train])
        self.val_set = TensorDataset(images[val], labels[val])
        self.test_set = TensorDataset(images[test], labels[test])
        self.test_indices = torch.as_tensor(test)


_TORCHVISION_DATASETS = {
    "cifar10": (datasets.CIFAR10, 10, 3, 32),
    "mnist": (datasets.MNIST, 10, 1, 28),
    "fashion_mnist": (datasets.FashionMNIST, 10, 1, 28),
}


class TorchvisionDataModule(_ClassificationDataModule):
    """CIFAR-10, MNIST or Fashion-MNIST through torchvision; 10% of the training set becomes validation.

    Args:
        dataset: one of ``cifar10``, ``mnist``, ``fashion_mnist``.
        root: folder holding (or receiving) the dataset files.
        download: fetch the files into ``root`` when absent. Without a network, leave it off and put the
            files there yourself.
        batch_size: samples per batch.
        image_size: side of the square images fed to the model (the dataset's own size when ``None``).
        channels: 1 or 3; grey datasets are repeated to 3 channels, CIFAR-10 is averaged to 1.
        val_fraction: share of the training set held out for validation.
        split_seed: seed of the train/val split.
        num_workers: DataLoader worker processes.
        augment: jitter training batches (shift, rotation, zoom; see ``lightning_compress.app.augmentation``):
            ``true`` for the defaults, or a mapping such as ``{shift: 0.125, degrees: 10, scale: 0.1}``.
    """

    def __init__(
        self,
        dataset: str = "cifar10",
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        image_size: int | None = None,
        channels: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        num_workers: int = 2,
        augment: bool | Mapping | RandomAffine | None = False,
    ) -> None:
        super().__init__(batch_size, num_workers, augment)
        if dataset not in _TORCHVISION_DATASETS:
            raise ValueError(f"data.dataset={dataset!r} is unknown: allowed values are {sorted(_TORCHVISION_DATASETS)}.")
        self.dataset_class, self.num_classes, native_channels, native_size = _TORCHVISION_DATASETS[dataset]
        self.num_channels = native_channels if channels is None else channels
        _check_channels(self.num_channels)
        self.image_size = native_size if image_size is None else image_size
        _check_positive("image_size", self.image_size)
        _check_fraction("val_fraction", val_fraction)
        check_integer("data.split_seed", split_seed, minimum=0)
        self.dataset = dataset
        self.root = root
        self.download = download
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self._native_channels = native_channels

    def _transform(self) -> transforms.Compose:
        steps: list = [transforms.Resize(self.image_size), transforms.ToTensor()]
        if self.num_channels != self._native_channels:
            steps.append(
                transforms.Grayscale(self.num_channels)
                if self._native_channels == 3
                else transforms.Lambda(lambda image: image.repeat(3, 1, 1))
            )
        steps.append(transforms.Normalize([0.5] * self.num_channels, [0.5] * self.num_channels))
        return transforms.Compose(steps)

    def prepare_data(self) -> None:
        """Fail here, before training, with the two settings that fix a missing dataset."""
        for train in (True, False):
            try:
                self.dataset_class(self.root, train=train, download=self.download)
            except (RuntimeError, OSError) as error:
                advice = (
                    "the download failed (no network?): put the files there yourself, or retry with a network"
                    if self.download
                    else "set data.download=true on a machine with a network, or put the files there"
                )
                raise FileNotFoundError(
                    f"{self.dataset} not found under data.root={self.root!r} with data.download={self.download}: "
                    f"{advice} ({error})."
                ) from error

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        transform = self._transform()
        full_train = self.dataset_class(self.root, train=True, transform=transform)
        n_val = int(len(full_train) * self.val_fraction)
        generator = torch.Generator().manual_seed(self.split_seed)
        self.train_set, self.val_set = random_split(full_train, [len(full_train) - n_val, n_val], generator)
        self.test_set = self.dataset_class(self.root, train=False, transform=transform)


class ImageFolderDataModule(_ClassificationDataModule):
    """A user's own images: ``root/train``, ``root/val`` and ``root/test``, each with one folder per class.

    Args:
        root: the folder holding ``train``, ``val`` and ``test``.
        batch_size: samples per batch.
        image_size: side of the square images fed to the model (images are resized and centre-cropped).
        channels: 1 (grey) or 3 (RGB).
        num_workers: DataLoader worker processes.
        augment: jitter training batches (shift, rotation, zoom; see ``lightning_compress.app.augmentation``):
            ``true`` for the defaults, or a mapping such as ``{shift: 0.125, degrees: 10, scale: 0.1}``.
    """

    splits = ("train", "val", "test")

    def __init__(
        self,
        root: str,
        batch_size: int = 32,
        image_size: int = 32,
        channels: int = 3,
        num_workers: int = 0,
        augment: bool | Mapping | RandomAffine | None = False,
    ) -> None:
        super().__init__(batch_size, num_workers, augment)
        _check_positive("image_size", image_size)
        _check_channels(channels)
        missing = [split for split in self.splits if not (Path(root) / split).is_dir()]
        if missing:
            raise FileNotFoundError(f"data.root={root!r} must hold the folders {list(self.splits)}; missing: {missing}.")
        classes, _ = find_classes(str(Path(root) / "train"))
        for split in self.splits[1:]:
            split_classes, _ = find_classes(str(Path(root) / split))
            if split_classes != classes:
                raise ValueError(
                    f"data.root={root!r}: the class folders of {split!r} {split_classes} differ from those of 'train' {classes}."
                )
        self.root = root
        self.classes = classes
        self.num_classes = len(classes)
        self.num_channels = channels
        self.image_size = image_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        transform = transforms.Compose(
            [
                transforms.Resize(self.image_size),
                transforms.CenterCrop(self.image_size),
                transforms.Grayscale(self.num_channels),
                transforms.ToTensor(),
                transforms.Normalize([0.5] * self.num_channels, [0.5] * self.num_channels),
            ]
        )
        self.train_set, self.val_set, self.test_set = (
            datasets.ImageFolder(str(Path(self.root) / split), transform=transform) for split in self.splits
        )
