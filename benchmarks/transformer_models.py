"""Transformers benchmark: Hugging Face BERT and ViT, built from their configs, trained in a user's own
LightningModule (dict batches, ``self.model(**batch).loss``), compressed by the callbacks and shipped to the
runtimes people deploy with, against the post-training tools a user would otherwise pick.

    pip install nncf                                   # the yardstick only; not a dependency of the package
    python benchmarks/transformer_models.py            # writes results/transformers.json and transformers.md
    python benchmarks/transformer_models.py --models bert --seeds 0

(Not ``transformers.py``: a script of that name would shadow the package it measures.)

Models and data (offline, real):
- **BERT**, ``BERT_LAYERS`` layers x ``BERT_WIDTH``, on snippets of the Python standard library's sources: which of
  ``PACKAGES`` a ``SEQUENCE - 1``-byte window comes from (a class token, then the bytes), split by file.
- **ViT**, ``VIT_LAYERS`` layers x ``VIT_WIDTH``, on scikit-learn's digits at 32x32 in 4x4 patches.

For each seed: the model is trained from random weights for ``PRETRAIN_EPOCHS`` (no pretrained weights offline),
then fine-tuned ``FINETUNE_EPOCHS`` more in fp32 (**fp32**) and, from the same weights, the same epochs with
``QuantizationAwareTraining(backend="x86_inductor")`` (**QAT**: the torch.export engine, transformers' encoder as one
graph; its int8 model in torch under Inductor, and its ONNX and OpenVINO exports, the fake-quant graph it trained).
The fine-tuned fp32 model is then quantized after training by ``DynamicQuantization`` (torch.ao's dynamic int8
Linear), by ONNX Runtime's ``quantize_dynamic`` and by NNCF's ``quantize`` (transformer preset, calibrated on
``CALIBRATION_SAMPLES`` training samples) in OpenVINO. Accuracy is on the test split, every model fed each test batch
as training fed the network; latency is batch 1, one thread, the first seed's models timed in turns (the compression
report's own measurement).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sysconfig
import tempfile
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

from lightning_compress import DynamicQuantization, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.export import write_exports
from lightning_compress.network_call import NetworkCall, observe_network_call, test_calls
from lightning_compress.report import CompressionReport, count_parameters, evaluate
from lightning_compress.runtimes import OnnxRuntimeModel, OpenVinoModel

RESULTS = Path(__file__).parent / "results"
PACKAGES = ("asyncio", "email", "idlelib", "multiprocessing", "tkinter", "unittest", "xml", "distutils")
SEQUENCE = 128
TRAIN_PER_CLASS, TEST_PER_CLASS = 400, 100
BERT_LAYERS, BERT_WIDTH, VIT_LAYERS, VIT_WIDTH = 6, 512, 6, 384
PRETRAIN_EPOCHS = {"bert": 2, "vit": 12}
FINETUNE_EPOCHS = {"bert": 1, "vit": 3}
FROM_SCRATCH_LR, FINETUNE_LR = 3e-4, 5e-5
CALIBRATION_SAMPLES = 300
CLASS_TOKEN = 256


class SourceSnippets(L.LightningDataModule):
    """Windows of ``SEQUENCE - 1`` bytes of the standard library's sources, labelled with the package they come from;
    train and test files apart (a fixed, seeded split by file), ``TRAIN_PER_CLASS`` and ``TEST_PER_CLASS`` windows per
    package spread over its files. Dict batches: ``input_ids`` (a class token, then the bytes), ``attention_mask``,
    ``labels``."""

    num_classes = len(PACKAGES)

    def __init__(self, batch_size: int = 32) -> None:
        super().__init__()
        self.batch_size = batch_size
        root = Path(sysconfig.get_paths()["stdlib"])
        generator = torch.Generator().manual_seed(0)
        self.splits: dict[str, list[tuple[torch.Tensor, int]]] = {"train": [], "test": []}
        for label, package in enumerate(PACKAGES):
            files = sorted(path for path in (root / package).rglob("*.py") if path.stat().st_size > SEQUENCE)
            files = [files[index] for index in torch.randperm(len(files), generator=generator)]
            cut = max(1, len(files) // 5)
            for split, chosen, count in (("test", files[:cut], TEST_PER_CLASS), ("train", files[cut:], TRAIN_PER_CLASS)):
                windows = [window for path in chosen for window in _windows(path.read_bytes(), SEQUENCE - 1)]
                picked = torch.randperm(len(windows), generator=generator)[:count]
                self.splits[split] += [(windows[index], label) for index in picked]

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(_Snippets(self.splits[split]), batch_size=self.batch_size, shuffle=split == "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


def _windows(text: bytes, length: int) -> list[torch.Tensor]:
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    return [data[start : start + length] for start in range(0, len(data) - length + 1, length)]


class _Snippets(Dataset):
    def __init__(self, samples: list[tuple[torch.Tensor, int]]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window, label = self.samples[index]
        input_ids = torch.cat([torch.tensor([CLASS_TOKEN]), window])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.tensor(label)}


class Classifier(L.LightningModule):
    """How a user fine-tunes a transformers classifier: the model's own loss on dict batches (a tuple batch of images
    goes in as ``pixel_values``); AdamW, a linear warm-up over the first tenth of the steps, then a cosine to zero."""

    def __init__(self, model: nn.Module, lr: float) -> None:
        super().__init__()
        self.model = model
        self.lr = lr

    def training_step(self, batch, batch_idx):
        if not isinstance(batch, dict):
            images, labels = batch
            batch = {"pixel_values": images, "labels": labels}
        return self.model(**batch).loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.01)
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.SequentialLR(
            optimizer,
            [
                torch.optim.lr_scheduler.LinearLR(optimizer, 0.01, 1.0, warmup),
                torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps - warmup)),
            ],
            [warmup],
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def network(kind: str) -> nn.Module:
    if kind == "bert":
        config = BertConfig(
            vocab_size=CLASS_TOKEN + 1,
            hidden_size=BERT_WIDTH,
            num_hidden_layers=BERT_LAYERS,
            num_attention_heads=BERT_WIDTH // 64,
            intermediate_size=4 * BERT_WIDTH,
            max_position_embeddings=SEQUENCE,
            num_labels=len(PACKAGES),
        )
        return BertForSequenceClassification(config)
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        num_channels=1,
        hidden_size=VIT_WIDTH,
        num_hidden_layers=VIT_LAYERS,
        num_attention_heads=VIT_WIDTH // 64,
        intermediate_size=4 * VIT_WIDTH,
        num_labels=10,
    )
    return ViTForImageClassification(config)


def data(kind: str) -> L.LightningDataModule:
    return SourceSnippets() if kind == "bert" else DigitsDataModule(batch_size=32, image_size=32)


def _trainer(epochs: int, callbacks: list = ()) -> L.Trainer:
    return L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )


def _fit(kind: str, state: dict | None, epochs: int, lr: float, seed: int, datamodule, callbacks: list = ()) -> tuple:
    L.seed_everything(seed)  # the initial weights too
    module = Classifier(network(kind), lr)
    if state is not None:
        module.load_state_dict(state)
    trainer = _trainer(epochs, callbacks)
    trainer.fit(module, datamodule=datamodule)
    return module.eval(), trainer


def _post_training_rows(fp32: Classifier, trainer: L.Trainer, datamodule, folder: Path) -> dict[str, nn.Module]:
    """The fine-tuned fp32 model in ONNX Runtime and OpenVINO, and quantized after training by ONNX Runtime's
    ``quantize_dynamic`` and by NNCF in OpenVINO."""
    import nncf
    import openvino
    from onnxruntime.quantization import QuantType, quantize_dynamic

    call = observe_network_call(trainer, fp32)
    assert isinstance(call, NetworkCall), call
    exports = write_exports(fp32, call, folder, "fp32", ["onnx", "openvino"])
    counts = count_parameters(fp32)
    quantize_dynamic(str(exports["onnx"]), str(folder / "ort_dynamic.onnx"), weight_type=QuantType.QInt8)
    feeds = [  # one training sample each, fed by input name
        {name: tensor[index : index + 1].numpy() for name, tensor in zip(batch.input_names, batch.tensors(), strict=True)}
        for batch in test_calls(trainer, fp32, datamodule.train_dataloader())
        for index in range(batch.batch_size)
    ][:CALIBRATION_SAMPLES]
    quantized = nncf.quantize(
        openvino.Core().read_model(str(exports["openvino"])),
        nncf.Dataset(feeds),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(feeds),
    )
    openvino.save_model(quantized, str(folder / "nncf_int8.xml"), compress_to_fp16=False)
    return {
        "fp32 ONNX Runtime": OnnxRuntimeModel(exports["onnx"], counts),
        "fp32 OpenVINO": OpenVinoModel(exports["openvino"], counts),
        "ONNX Runtime dynamic int8": OnnxRuntimeModel(folder / "ort_dynamic.onnx", counts),
        "NNCF int8 in OpenVINO": OpenVinoModel(folder / "nncf_int8.xml", counts),
    }


def run_seed(kind: str, seed: int, folder: Path) -> tuple[dict[str, nn.Module], list[NetworkCall]]:
    """Every model of one seed, and the test split as calls of the network."""
    datamodule = data(kind)
    pretrained, _ = _fit(kind, None, PRETRAIN_EPOCHS[kind], FROM_SCRATCH_LR, seed, datamodule)
    start = {name: tensor.detach().clone() for name, tensor in pretrained.state_dict().items()}
    fp32, trainer = _fit(kind, start, FINETUNE_EPOCHS[kind], FINETUNE_LR, seed, datamodule)
    qat = QuantizationAwareTraining(
        start_epoch=0, calibration_batches=8, backend="x86_inductor", export_format=["onnx", "openvino"], export_dir=str(folder)
    )
    _fit(kind, start, FINETUNE_EPOCHS[kind], FINETUNE_LR, seed, datamodule, [qat])
    dynamic = DynamicQuantization(export_format="none")
    _fit(kind, fp32.state_dict(), 0, FINETUNE_LR, seed, datamodule, [dynamic])
    models = {
        "fp32": fp32,
        "QAT int8 (torch, Inductor)": qat.quantized_model,
        **{f"QAT int8 {name.removeprefix('int8 ')}": model for name, model in qat.report_models().items() if " " in name},
        "dynamic int8 (ours, torch.ao)": dynamic.quantized_model,
        **_post_training_rows(fp32, trainer, datamodule, folder),
    }
    models = {
        name.replace("onnxruntime", "(ONNX Runtime)").replace("openvino", "(OpenVINO)"): model for name, model in models.items()
    }
    return models, test_calls(trainer, fp32, datamodule.test_dataloader())


def run(kind: str, seeds: list[int], runs: int) -> dict:
    accuracy: dict[str, list[float]] = {}
    report = None
    for seed in seeds:
        with tempfile.TemporaryDirectory() as temporary:
            models, calls = run_seed(kind, seed, Path(temporary))
            if report is None:  # the first seed's models, every figure of the report, timed in turns
                report = CompressionReport.from_models(models, calls, calls[0].sample(1), runs=runs, warmup=5)
                measured = {row.name: row.accuracy for row in report.measurements}
            else:
                measured = {name: evaluate(model, calls)[0] for name, model in models.items()}
        for name, value in measured.items():
            accuracy.setdefault(name, []).append(value)
        print(kind, seed, {name: round(100 * value, 2) for name, value in measured.items()}, flush=True)
    return {
        "model": kind,
        "accuracy": {
            name: {
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "per_seed": values,
            }
            for name, values in accuracy.items()
        },
        "report": report.rows(),
        "settings": report.settings,
    }


def markdown(results: dict) -> str:
    lines = [
        f"Transformers benchmark (torch {results['torch']}, transformers {results['transformers']}, OpenVINO "
        f"{results['openvino']}, ONNX Runtime {results['onnxruntime']}, NNCF {results['nncf']}; CPU {results['cpu']}); "
        f"seeds {results['seeds']}. Accuracy on the test split (mean, std over seeds); batch-1 single-thread latency of "
        "the first seed's models, timed in turns; size of what ships.",
    ]
    for row in results["models"]:
        shape = (
            f"BERT {BERT_LAYERS} x {BERT_WIDTH}, sequence {SEQUENCE}"
            if row["model"] == "bert"
            else (f"ViT {VIT_LAYERS} x {VIT_WIDTH}, 32x32 digits in 4x4 patches")
        )
        lines += [
            "",
            f"**{shape}**",
            "",
            "| model | test acc | std | Δ vs fp32 (pts) | size MiB | latency ms | speedup |",
            "|---|---|---|---|---|---|---|",
        ]
        fp32 = row["accuracy"]["fp32"]["mean"]
        for measured in row["report"]:
            values = row["accuracy"][measured["name"]]
            lines.append(
                f"| {measured['name']} | {100 * values['mean']:.2f}% | {100 * values['std']:.2f} | "
                f"{100 * (values['mean'] - fp32):+.2f} | {measured['size_bytes'] / 2**20:.1f} | {measured['latency_ms']:.2f} | "
                f"{measured['speedup']:.2f}x |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=["bert", "vit"], default=["bert", "vit"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=int, default=30, help="timed forwards per latency figure")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny models and one epoch each: checks the script end to end")
    args = parser.parse_args(argv)
    if args.quick:
        global BERT_LAYERS, BERT_WIDTH, VIT_LAYERS, VIT_WIDTH, TRAIN_PER_CLASS, TEST_PER_CLASS, CALIBRATION_SAMPLES
        BERT_LAYERS, BERT_WIDTH, VIT_LAYERS, VIT_WIDTH = 1, 64, 1, 64
        TRAIN_PER_CLASS, TEST_PER_CLASS, CALIBRATION_SAMPLES = 32, 16, 16
        PRETRAIN_EPOCHS.update(bert=1, vit=1)
        FINETUNE_EPOCHS.update(bert=1, vit=1)
    results = {
        **{name: importlib.metadata.version(name) for name in ("torch", "transformers", "openvino", "onnxruntime", "nncf")},
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "seeds": args.seeds,
        "models": [run(kind, args.seeds, args.runs) for kind in args.models],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "transformers.json").write_text(json.dumps(results, indent=2, default=float))
    (args.output / "transformers.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
