"""Post-training, dynamic and low-bit quantization against fp32 and QAT, on digits.

    python benchmarks/ptq.py            # writes benchmarks/results/ptq.json and ptq.md

In one run, for the default CNN, resnet18 and mobilenet_v2 (small-input stems) trained on digits: fp32; static PTQ with
min-max per-tensor ranges, with per-channel weights and each histogram range method (max, percentile
99.99, entropy, mse); QAT int8; and QAT with 4-bit weights and activations (fake-quant: no int8 kernel
runs a 4-bit grid, so no latency is given for it). Then dynamic quantization of an LSTM over digit rows
and of a Linear-heavy MLP: size ratio, batch-1 latency ratio and mean absolute output difference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from common import fit
from torch import nn

from lightning_compress import DynamicQuantization, PostTrainingQuantization, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.report import latency_ms, serialized_size, top1_accuracy

RESULTS = Path(__file__).parent / "results"


def static_methods(architecture: str, epochs: int, qat_epochs: int, scratch: Path) -> list[dict]:
    test = DigitsDataModule().test_dataloader()
    example = next(iter(test))[0][:1]
    model = ImageClassifier(architecture)
    fit(model, epochs, [])
    checkpoint = scratch / f"{architecture}.pt"
    torch.save(model.net.state_dict(), checkpoint)
    fp32_accuracy = top1_accuracy(model, test)
    rows = [
        {
            "model": architecture,
            "method": "fp32",
            "accuracy": fp32_accuracy,
            "size_bytes": serialized_size(model),
            "quantized": model,
        }
    ]
    variants = {
        "PTQ min-max, per-tensor": {"per_channel_weights": False, "observer": "minmax", "range_method": "max"},
        "PTQ histogram max, per-channel": {"observer": "histogram", "range_method": "max"},
        "PTQ histogram percentile 99.99, per-channel": {"observer": "histogram", "range_method": "percentile"},
        "PTQ histogram entropy, per-channel": {"observer": "histogram", "range_method": "entropy"},
        "PTQ histogram mse, per-channel": {"observer": "histogram", "range_method": "mse"},
    }
    for method, options in variants.items():
        ptq = PostTrainingQuantization(calibration_batches=8, export_format="none", **options)
        fit(ImageClassifier(architecture, checkpoint=str(checkpoint)), 0, [ptq])
        rows.append(
            {
                "model": architecture,
                "method": method,
                "accuracy": top1_accuracy(ptq.quantized_model, test),
                "size_bytes": serialized_size(ptq.quantized_model),
                "quantized": ptq.quantized_model,
            }
        )
    for bits in (8, 4):
        qat = QuantizationAwareTraining(
            start_epoch=0,
            freeze_bn_epoch=max(qat_epochs - 1, 0),
            weight_bits=bits,
            activation_bits=bits,
            calibration_batches=8,
            export_format="none",
        )
        trained = ImageClassifier(architecture, lr=3e-4, checkpoint=str(checkpoint))
        fit(trained, qat_epochs, [qat])
        result = qat.quantized_model if bits == 8 else trained
        rows.append(
            {
                "model": architecture,
                "method": f"QAT {bits}-bit" + (" (fake-quant)" if bits < 8 else ""),
                "accuracy": top1_accuracy(result, test),
                "size_bytes": serialized_size(result),
                "quantized": result if bits == 8 else None,
            }
        )
    timed = {row["method"]: row["quantized"] for row in rows if row["quantized"] is not None}
    timings = latency_ms(timed, example, runs=50, warmup=10)
    for row in rows:
        row.pop("quantized")
        row["latency_ms"] = round(timings[row["method"]], 3) if row["method"] in timings else None
        row["accuracy_vs_fp32_points"] = round(100 * (row["accuracy"] - fp32_accuracy), 2)
        row["size_ratio"] = round(row["size_bytes"] / rows[0]["size_bytes"], 3)
        print(row, flush=True)
    return rows


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
        callback = DynamicQuantization(export_format="none")
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
    lines = [
        f"Quantization methods on digits (torch {results['torch']}); latency batch 1, 1 thread, 8x8 input, models interleaved.",
        "",
        "| model | method | test acc | vs fp32 (pts) | size ratio | latency ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["static"]:
        latency = "-" if row["latency_ms"] is None else row["latency_ms"]
        lines.append(
            f"| {row['model']} | {row['method']} | {100 * row['accuracy']:.2f}% | {row['accuracy_vs_fp32_points']:+.2f} "
            f"| {row['size_ratio']} | {latency} |"
        )
    lines += [
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
    parser.add_argument("--architectures", nargs="+", default=["cnn", "resnet18", "mobilenet_v2"])
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    scratch = args.output / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    results = {
        "torch": torch.__version__,
        "static": [row for arch in args.architectures for row in static_methods(arch, args.epochs, args.qat_epochs, scratch)],
        "dynamic": dynamic(args.epochs),
    }
    (args.output / "ptq.json").write_text(json.dumps(results, indent=2))
    (args.output / "ptq.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
