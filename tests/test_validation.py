"""Every numeric argument of every public class is checked at construction: a string (as a YAML file or a
command line can produce) or a bool where a number belongs is one ValueError naming the argument and what
is allowed, never a TypeError from a comparison deep inside."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_compress import (
    DistillationModule,
    DynamicQuantization,
    MagnitudePruning,
    PostTrainingQuantization,
    QuantizationAwareTraining,
)
from lightning_compress.app.augmentation import RandomAffine
from lightning_compress.app.data import DigitsDataModule, ImageFolderDataModule, TorchvisionDataModule
from lightning_compress.app.models import ImageClassifier, SmallCNN

CASES = [
    (QuantizationAwareTraining, {"start_epoch": "3"}, r"start_epoch='3' is invalid: it must be an integer >= 0, not str\."),
    (QuantizationAwareTraining, {"freeze_bn_epoch": True}, r"freeze_bn_epoch=True is invalid: it must be an integer"),
    (QuantizationAwareTraining, {"calibration_batches": 1.5}, r"calibration_batches=1.5 is invalid: it must be an integer >= 0"),
    (QuantizationAwareTraining, {"weight_bits": "8"}, r"weight_bits='8' is invalid: it must be an integer from 2 to 8, not str"),
    (QuantizationAwareTraining, {"activation_bits": True}, r"activation_bits=True is invalid: .* not bool"),
    (PostTrainingQuantization, {"percentile": "99"}, r"percentile='99' is invalid: it must be a number in \(0, 100\], not str"),
    (PostTrainingQuantization, {"calibration_batches": True}, r"calibration_batches=True is invalid: .* not bool"),
    (PostTrainingQuantization, {"accuracy_budget": "1"}, r"accuracy_budget='1' is invalid: it must be a number >= 0, or None"),
    (MagnitudePruning, {"final_sparsity": "0.5"}, r"final_sparsity='0.5' is invalid: it must be a number in \[0, 1\), not str"),
    (MagnitudePruning, {"update_every": 2.5}, r"update_every=2.5 is invalid: it must be a positive integer, or None"),
    (DistillationModule, {"temperature": "4"}, r"temperature='4' is invalid: it must be a number > 0, not str"),
    (DistillationModule, {"alpha": None}, r"alpha=None is invalid: it must be a number in \[0, 1\]"),
    (DistillationModule, {"hint_weight": "1"}, r"hint_weight='1' is invalid: it must be a finite number, not str"),
    (DistillationModule, {"lr": "3e-3"}, r"^lr='3e-3' is invalid: it must be a finite number, not str"),
    (ImageClassifier, {"weight_decay": True}, r"model.weight_decay=True is invalid: it must be a finite number, not bool"),
    (ImageClassifier, {"num_classes": "10"}, r"model.num_classes='10' is invalid: it must be a positive integer, not str"),
    (DigitsDataModule, {"batch_size": "64"}, r"data.batch_size='64' is invalid: it must be a positive integer, not str"),
    (DigitsDataModule, {"val_fraction": "0.1"}, r"data.val_fraction='0.1' is invalid: it must be a number in \(0, 1\), not str"),
    (DigitsDataModule, {"train_fraction": True}, r"data.train_fraction=True is invalid: .* not bool"),
    (DigitsDataModule, {"num_workers": 0.5}, r"data.num_workers=0.5 is invalid: it must be an integer >= 0, not float"),
    (DigitsDataModule, {"channels": True}, r"data.channels=True is invalid: allowed values are 1 and 3"),
    (DigitsDataModule, {"split_seed": "0"}, r"data.split_seed='0' is invalid: it must be an integer >= 0, not str"),
    (TorchvisionDataModule, {"val_fraction": "0.1"}, r"data.val_fraction='0.1' is invalid"),
    (TorchvisionDataModule, {"image_size": 32.0}, r"data.image_size=32.0 is invalid: it must be a positive integer, not float"),
    (RandomAffine, {"degrees": "10"}, r"data.augment.degrees='10' is invalid: it must be a number in \[0, 180\), not str"),
    (RandomAffine, {"shift": True}, r"data.augment.shift=True is invalid: .* not bool"),
]


@pytest.mark.parametrize(("cls", "options", "message"), CASES, ids=[f"{c.__name__}-{next(iter(o))}" for c, o, _ in CASES])
def test_a_wrong_type_is_one_clear_error_naming_the_argument(cls, options, message):
    settings = {"student": SmallCNN(), "teacher": SmallCNN(), **options} if cls is DistillationModule else options
    with pytest.raises(ValueError, match=message) as error:
        cls(**settings)
    assert "\n" not in str(error.value)


def test_image_folder_checks_its_numbers_before_its_folders(tmp_path: Path):
    with pytest.raises(ValueError, match=r"data.image_size='32' is invalid: it must be a positive integer, not str"):
        ImageFolderDataModule(root=str(tmp_path), image_size="32")


def test_classes_without_numeric_arguments_still_check_their_choices():
    with pytest.raises(ValueError, match=r"export_format='tflite': 'tflite' is unknown"):
        DynamicQuantization(export_format="tflite")
