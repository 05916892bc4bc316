"""Bad checkpoint files get one line naming the setting, the path and which problem it is."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_compress.app.models import ImageClassifier, SmallCNN, build_network, read_checkpoint
from lightning_compress.app.train import BeforeTraining, check_resume_checkpoint


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("epoch=3 val_acc=0.99\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind in ("truncated", "truncated_legacy"):
        torch.save(SmallCNN().state_dict(), path, _use_new_zipfile_serialization=kind == "truncated")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "zip":  # an intact archive, but not one torch.save wrote
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("weights.txt", "1 2 3")
    elif kind == "folder":
        path.mkdir()
    return path


PROBLEMS = {
    "text": r"is not a PyTorch file",
    "zip": r"is not a PyTorch file",
    "empty": r"is an empty file, not a checkpoint",
    "truncated": r"is truncated or corrupted",
    "truncated_legacy": r"is truncated or corrupted",
    "folder": r"is a folder, not a checkpoint file",
}


@pytest.mark.parametrize("kind", list(PROBLEMS))
def test_each_problem_of_a_file_is_named(tmp_path: Path, kind: str):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(ValueError, match=rf"^model.checkpoint='{path}' {PROBLEMS[kind]}") as error:
        ImageClassifier(checkpoint=str(path))
    assert "\n" not in str(error.value)


def test_functions_name_their_own_argument(tmp_path: Path):
    # DistillationModule takes modules and reads no files since the library/app split; the app's network
    # builder, which the distillation recipes load their teacher with, names its own argument instead.
    with pytest.raises(ValueError, match=r"^checkpoint='.*empty.ckpt' is an empty file"):
        build_network("cnn", 10, 1, checkpoint=str(_bad_file(tmp_path, "empty")))
    with pytest.raises(FileNotFoundError, match=r"^checkpoint='nowhere.ckpt' does not exist"):
        read_checkpoint("nowhere.ckpt")


def test_weights_of_another_model_name_the_first_key_that_differs(tmp_path: Path):
    torch.save(SmallCNN(widths=(8, 16, 32)).state_dict(), tmp_path / "small.pt")
    with pytest.raises(ValueError, match=r"is a checkpoint of another model: key 'features.0.weight' has shape \(8, 1, 3, 3\)"):
        ImageClassifier(checkpoint=str(tmp_path / "small.pt"))
    torch.save([torch.zeros(3)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"holds a list that is neither a state_dict nor a Lightning checkpoint"):
        ImageClassifier(checkpoint=str(tmp_path / "list.pt"))


def _lightning_checkpoint(model: ImageClassifier, path: Path) -> Path:
    torch.save(
        {"state_dict": model.state_dict(), "pytorch-lightning_version": "2.6.0", "hyper_parameters": dict(model.hparams)}, path
    )
    return path


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: _bad_file(tmp, "truncated"), r"ckpt_path='.*' is truncated or corrupted"),
        (lambda tmp: _bad_file(tmp, "text"), r"ckpt_path='.*' is not a PyTorch file"),
        (
            lambda tmp: (torch.save(SmallCNN().state_dict(), tmp / "weights.pt"), tmp / "weights.pt")[1],
            r"ckpt_path='.*weights.pt' is not a Lightning checkpoint .* give it as model.checkpoint",
        ),
        (
            lambda tmp: _lightning_checkpoint(ImageClassifier("resnet18"), tmp / "resnet.ckpt"),
            r"ckpt_path='.*resnet.ckpt' is a checkpoint of another model: architecture='resnet18' there, 'cnn' here",
        ),
        (
            lambda tmp: _lightning_checkpoint(ImageClassifier(num_classes=3), tmp / "three.ckpt"),
            r"ckpt_path='.*three.ckpt' is a checkpoint of another model: num_classes=3 there, 10 here",
        ),
    ],
)
def test_a_resume_checkpoint_is_checked_before_fit(tmp_path: Path, make, message):
    cfg = OmegaConf.create({"ckpt_path": str(make(tmp_path)), "callbacks": {}})
    with pytest.raises(BeforeTraining, match=message):
        check_resume_checkpoint(cfg, ImageClassifier())


def test_a_good_resume_checkpoint_passes(tmp_path: Path):
    model = ImageClassifier()
    cfg = OmegaConf.create({"ckpt_path": str(_lightning_checkpoint(model, tmp_path / "good.ckpt")), "callbacks": {}})
    check_resume_checkpoint(cfg, ImageClassifier())
