"""Post-training, dynamic and low-bit quantization against fp32 and QAT, on digits.

    python benchmarks/ptq.py            # writes benchmarks/results/ptq.json and ptq.md

For the default CNN, resnet18 and mobilenet_v2 (small-input stems) trained on digits: fp32; static PTQ with
min-max per-tensor ranges, with per-channel weights and each histogram range method (max, percentile
99.99, entropy, mse); QAT int8; and QAT with 4-bit weights and activations (fake-quant: no int8 kernel
runs a 4-bit grid, so no latency is given for it). Accuracy is k-fold (``kfold.py``): every image is a test
image once per seed, each method calibrated or fine-tuned from the same fp32 weights of the fold, so the
differences are paired. Size and latency are measured on the models of the first fold of the first seed.
Then dynamic quantization of an LSTM over digit rows and of a Linear-heavy MLP (fixed test split): size
ratio, batch-1 latency ratio and mean absolute output difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import MACHINE, fit, with_earlier_rows
from kfold import fold_accuracies, kfold_accuracy, paired_difference, predicted_classes
from torch import nn

from lightning_compress import DynamicQuantization, PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.report import latency_ms, serialized_size, top1_accuracy

RESULTS = Path(__file__).parent / "results"

PTQ_METHODS = {  # arm: (the row's name, PostTrainingQuantization options)
    "ptq_minmax_per_tensor": (
        "PTQ min-max, per-tensor",
        {"per_channel_weights": False, "observer": "minmax", "range_method": "max"},
    ),
    "ptq_max": ("PTQ histogram max, per-channel", {"observer": "histogram", "range_method": "max"}),
    "ptq_percentile": ("PTQ histogram percentile 99.99, per-channel", {"observer": "histogram", "range_method": "percentile"}),
    "ptq_entropy": ("PTQ histogram entropy, per-channel", {"observer": "histogram", "range_method": "entropy"}),
    "ptq_mse": ("PTQ histogram mse, per-channel", {"observer": "histogram", "range_method": "mse"}),
}
QAT_BITS = (8, 4)
ARCHITECTURES = ("cnn", "resnet18", "mobilenet_v2")
ARM_NAMES = {
    "fp32": "fp32",
    **{arm: name for arm, (name, _) in PTQ_METHODS.items()},
    "qat_8bit": "QAT 8-bit",
    "qat_4bit": "QAT 4-bit (fake-quant)",
}


def architecture_arms(architecture: str, epochs: int, qat_epochs: int, scratch: Path):
    """``train_and_predict`` for ``kfold_accuracy``: every method of one architecture from the fold's fp32
    weights; and the dict it fills, on its first call, with each arm's serialized size and batch-1 latency."""
    measured: dict[str, dict] = {}

    def train_and_predict(datamodule: DigitsDataModule, seed: int) -> dict[str, torch.Tensor]:
        model = ImageClassifier(architecture)
        fit(model, epochs, [], seed, datamodule)
        checkpoint = scratch / f"{architecture}.pt"
        torch.save(model.net.state_dict(), checkpoint)
        models = {"fp32": model}
        for arm, (_, options) in PTQ_METHODS.items():
            ptq = PostTrainingQuantization(calibration_batches=8, backend="x86", export_format="none", **options)
            fit(ImageClassifier(architecture, checkpoint=str(checkpoint)), 0, [ptq], seed, datamodule)
            models[arm] = ptq.quantized_model
        for bits in QAT_BITS:
            qat = QuantizationAwareTraining(
                start_epoch=0,
                backend="x86",  # the FX engine: its grids go below 8 bits
                freeze_bn_epoch=max(qat_epochs - 1, 0),
                weight_bits=bits,
                activation_bits=bits,
                calibration_batches=8,
                export_format="none",
            )
            trained = ImageClassifier(architecture, lr=3e-4, checkpoint=str(checkpoint))
            fit(trained, qat_epochs, [qat], seed, datamodule)
            models[f"qat_{bits}bit"] = qat.quantized_model if bits == 8 else trained
        images, labels = datamodule.test_set.tensors
        predictions = {arm: predicted_classes(net, images) for arm, net in models.items()}
        print(architecture, seed, datamodule.fold, fold_accuracies(predictions, labels), flush=True)
        if not measured:
            # no int8 kernel runs the 4-bit grid: that arm is fake-quantized fp32 and gets no latency
            timed = {arm: net for arm, net in models.items() if arm != "qat_4bit"}
            timings = latency_ms(timed, images[:1], runs=50, warmup=10)
            for arm, net in models.items():
                measured[arm] = {
                    "size_ratio": round(serialized_size(net) / serialized_size(model), 3),
                    "latency_ms": round(timings[arm], 3) if arm in timings else None,
                }
        return predictions

    return train_and_predict, measured


def static_methods(architecture: str, epochs: int, qat_epochs: int, folds: int, seeds: list[int], scratch: Path) -> dict:
    train_and_predict, measured = architecture_arms(architecture, epochs, qat_epochs, scratch)
    result = kfold_accuracy(train_and_predict, folds=folds, seeds=seeds)
    result["model"] = architecture
    result["machine"] = MACHINE
    result["size_and_latency"] = measured
    return result


class _LinearHeavy(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * in_channels, 1024),
            nn.ReLU(),
            nn.Linear(1024, 1024),
            nn.ReLU(),
            nn.Linear(1024, num_classes),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


def dynamic(epochs: int) -> list[dict]:
    digits = DigitsDataModule()
    digits.setup()
    images = digits.test_set.tensors[0]
    rows = []
    for name, model in (("LSTM over rows", ImageClassifier("lstm")), ("Linear-heavy MLP", ImageClassifier(_LinearHeavy()))):
        callback = DynamicQuantization(backend="x86", export_format="none")
        fit(model, epochs, [callback])
        quantized = callback.quantized_model
        timings = latency_ms({"fp32": model, "int8": quantized}, images[:1], runs=100, warmup=10)
        with torch.no_grad():
            difference = float((model.eval()(images) - quantized(images)).abs().mean())
        rows.append(
            {
                "model": name,
                "fp32_accuracy": top1_accuracy(model, digits.test_dataloader()),
                "int8_accuracy": top1_accuracy(quantized, digits.test_dataloader()),
                "size_ratio": round(serialized_size(quantized) / serialized_size(model), 3),
                "latency_ratio": round(timings["int8"] / timings["fp32"], 3),
                "mean_abs_output_difference": round(difference, 5),
            }
        )
        print(rows[-1], flush=True)
    return rows


def markdown(results: dict) -> str:
    first = results["static"][0]
    lines = [
        f"Quantization methods on digits ({results['machine']}, torch {results['torch']}). Accuracy {first['folds']}-fold: "
        f"every one of the {first['images']} images predicted once per seed by a model that never saw it, seeds "
        f"{first['seeds']}; differences in points, paired by seed, mean ± standard error. Size and latency (batch 1, "
        "1 thread, 8x8 input, models interleaved) from the first fold's models."
        + "".join(
            f" {row['model']} measured on {row['machine']}." for row in results["static"] if row["machine"] != results["machine"]
        ),
        "",
        "| model | method | accuracy | seed std (pts) | vs fp32 (pts) | vs PTQ mse (pts) | size ratio | latency ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results["static"]:
        for arm, summary in result["arms"].items():
            cells = [result["model"], ARM_NAMES[arm], f"{100 * summary['mean']:.2f}%", f"{100 * summary['std']:.2f}"]
            for baseline in ("fp32", "ptq_mse"):
                gain = paired_difference(result, arm, baseline)
                cells.append("-" if arm in (baseline, "fp32") else f"{gain['mean']:+.2f} ± {gain['standard_error']:.2f}")
            measured = result["size_and_latency"][arm]
            cells += [str(measured["size_ratio"]), "-" if measured["latency_ms"] is None else str(measured["latency_ms"])]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Dynamic quantization (fixed 270-image test split, one seed):",
        "",
        "| dynamic quantization | fp32 acc | int8 acc | size ratio | latency ratio | mean abs output diff |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["dynamic"]:
        lines.append(
            f"| {row['model']} | {100 * row['fp32_accuracy']:.2f}% | {100 * row['int8_accuracy']:.2f}% | "
            f"{row['size_ratio']} | {row['latency_ratio']} | {row['mean_abs_output_difference']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--qat-epochs", type=int, default=3)
    parser.add_argument(
        "--architectures",
        nargs="+",
        default=list(ARCHITECTURES),
        choices=list(ARCHITECTURES),
        help="architectures to measure; the others keep their rows from the last run's ptq.json",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scratch = args.output / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": MACHINE,
        "torch": torch.__version__,
        "static": with_earlier_rows(
            [static_methods(arch, args.epochs, args.qat_epochs, args.folds, args.seeds, scratch) for arch in args.architectures],
            args.output / "ptq.json",
            "static",
            "model",
            ARCHITECTURES,
        ),
        "dynamic": dynamic(args.epochs),
    }
    (args.output / "ptq.json").write_text(json.dumps(results, indent=2))
    (args.output / "ptq.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
