"""Run by test_distributed.py: QAT and pruning (with either int8 engine; or channel pruning that shrinks the network
mid-run, then QAT of the smaller network) under 2-process CPU DDP; each rank dumps its state.

Lightning's DDP launcher starts rank 1 by re-running this script, so it must be a script, not a test.
"""

import sys
import warnings
from pathlib import Path

import lightning as L
import torch

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier

warnings.filterwarnings("ignore")


def _fit(model: ImageClassifier, devices: int, max_epochs: int, callbacks: list) -> L.Trainer:
    """Fit on digits with DDP over ``devices`` CPU processes (one: no DDP), quietly, without checkpoints."""
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    return trainer


def main(output: Path, devices: int, mode: str = "qat") -> None:
    if mode == "shrink":
        return shrink(output, devices)
    if mode == "lsq":
        return learned_ranges(output, devices)
    backend, export_format, prefix = ("x86_inductor", "torch_export", "pt2e_") if mode == "pt2e" else ("x86", "torchscript", "")
    L.seed_everything(0)
    model = ImageClassifier()
    pruning = MagnitudePruning(final_sparsity=0.6, start_epoch=0, end_epoch=2, update_every=3, export_format="none", plot=False)
    qat = QuantizationAwareTraining(
        start_epoch=2, freeze_bn_epoch=3, backend=backend, export_format=export_format, export_dir=str(output)
    )
    trainer = _fit(model, devices, 4, [pruning, qat])
    observers = {
        name: tensor.clone()
        for name, tensor in model.net.state_dict().items()
        if name.rsplit(".", 1)[-1] in ("min_val", "max_val", "scale", "zero_point")
    }  # FX's observers and torchao's (pt2e) hold the same buffers
    digits = DigitsDataModule()
    digits.setup()
    with torch.no_grad():
        predictions = qat.quantized_model(digits.test_set.tensors[0])
    torch.save(
        {
            "masks": pruning.masks,
            "observers": observers,
            "weights": model.net.state_dict(),
            "predictions": predictions,
            "labels": digits.test_set.tensors[1],
        },
        output / f"{prefix}{'ddp' if devices > 1 else 'single'}_rank{trainer.global_rank}.pt",
    )


def shrink(output: Path, devices: int) -> None:
    L.seed_everything(0)
    model = ImageClassifier()
    pruning = MagnitudePruning(
        mode="channels", final_sparsity=0.5, start_epoch=0, end_epoch=2, shrink_epoch=2, export_format="none", plot=False
    )
    qat = QuantizationAwareTraining(start_epoch=3, freeze_bn_epoch=4, export_format="none")
    trainer = _fit(model, devices, 5, [qat, pruning])
    digits = DigitsDataModule()
    digits.setup()
    with torch.no_grad():
        predictions = qat.quantized_model(digits.test_set.tensors[0])
    accuracy = float((predictions.argmax(1) == digits.test_set.tensors[1]).float().mean())
    torch.save(
        {
            "weights": qat.float_model(model).net.state_dict(),
            "shrunk": pruning.shrunk,
            "prepared": qat.prepared_names,
            "predictions": predictions,
            "accuracy": accuracy,
        },
        output / f"shrink_{'ddp' if devices > 1 else 'single'}_rank{trainer.global_rank}.pt",
    )


def learned_ranges(output: Path, devices: int) -> None:
    """QAT with learned ranges (LSQ): the ranges begin to learn mid-fit, and must then be synchronized."""
    L.seed_everything(0)
    model = ImageClassifier()
    qat = QuantizationAwareTraining(
        start_epoch=1, freeze_bn_epoch=2, freeze_observer_epoch=2, learnable_ranges=True, export_format="none"
    )
    trainer = _fit(model, devices, 4, [qat])
    digits = DigitsDataModule()
    digits.setup()
    with torch.no_grad():
        predictions = qat.quantized_model(digits.test_set.tensors[0])
    torch.save(
        {
            "scales": {name: p.detach().clone() for name, p in model.named_parameters() if name.endswith(".scale")},
            "predictions": predictions,
            "accuracy": float((predictions.argmax(1) == digits.test_set.tensors[1]).float().mean()),
        },
        output / f"lsq_{'ddp' if devices > 1 else 'single'}_rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
