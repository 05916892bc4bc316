"""QAT benchmark: int8 against fp32 latency, size and accuracy, and the cost of fake-quant in training.

    python benchmarks/qat.py            # writes benchmarks/results/qat.json and qat.md

All ratios are measured in this one run on this machine (batch 1, one thread, same inputs): shared
machines are noisy, so compare ratios, not absolute milliseconds across runs.

1. Latency and size, int8 (this package's FX backend) against fp32 eager and fp32 with BN folded, for the
   default CNN, resnet18 and mobilenet_v2 at 64x64 and 224x224 (ImageNet stems; random weights, since
   latency does not depend on their values; observers calibrated on digits images).
2. Accuracy on digits: an fp32 CNN, post-training quantization of that same model (calibrate, convert),
   and QAT fine-tuning of it with ``QuantizationAwareTraining``.
3. Training step time with fake-quant relative to fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from common import fit
from torch.fx.experimental.optimization import fuse as fold_batch_norm

from lightning_compress import QuantizationAwareTraining
from lightning_compress import fx_quantization as backend
from lightning_compress.data import DigitsDataModule
from lightning_compress.fx_quantization import QuantizationConfig
from lightning_compress.models import ImageClassifier, SmallCNN, torchvision_classifier
from lightning_compress.report import latency_ms, serialized_size, top1_accuracy

RESULTS = Path(__file__).parent / "results"


def _digits_images(size: int, count: int) -> torch.Tensor:
    datamodule = DigitsDataModule(image_size=size, channels=3)
    datamodule.setup()
    return datamodule.train_set.tensors[0][:count]


def _int8(model: torch.nn.Module, calibration: torch.Tensor, config: QuantizationConfig) -> torch.nn.Module:
    """Post-training quantization through the same mechanism the callback uses: observe, then convert."""
    backend.use_backend(config)
    prepared = backend.prepare(copy.deepcopy(model).eval(), backend.qconfig_mapping(config)).eval()
    backend.set_fake_quant(prepared, enabled=False)
    with torch.no_grad():
        for batch in calibration.split(8):
            prepared(batch)
    return backend.convert(prepared)


def _reference_int8(model: torch.nn.Module, calibration: torch.Tensor) -> torch.nn.Module:
    """The hand-written torch.ao FX flow (prepare_fx with the x86 defaults, calibrate, convert_fx), as a
    yardstick for what this package's backend adds or loses."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[:1],))
    with torch.no_grad():
        for batch in calibration.split(8):
            prepared(batch)
    return convert_fx(prepared)


def latency_and_size(runs: int) -> list[dict]:
    config = QuantizationConfig()
    rows = []
    builders = {
        "cnn": lambda: SmallCNN(num_classes=10, in_channels=3),
        "resnet18": lambda: torchvision_classifier("resnet18", 10, 3, small_input=False),
        "mobilenet_v2": lambda: torchvision_classifier("mobilenet_v2", 10, 3, small_input=False),
    }
    for size in (64, 224):
        calibration = _digits_images(size, 32)
        example = calibration[:1]
        for name, build in builders.items():
            torch.manual_seed(0)
            fp32 = build().eval()
            folded = fold_batch_norm(copy.deepcopy(fp32))
            int8 = _int8(fp32, calibration, config)
            reference = _reference_int8(fp32, calibration)
            timings = latency_ms(
                {"fp32": fp32, "fp32_bn_folded": folded, "int8": int8, "reference_int8": reference}, example, runs, warmup=10
            )
            row = {
                "model": name,
                "input": f"{size}x{size}",
                **{f"{label}_ms": round(value, 3) for label, value in timings.items()},
                "speedup_vs_fp32": round(timings["fp32"] / timings["int8"], 2),
                "speedup_vs_bn_folded": round(timings["fp32_bn_folded"] / timings["int8"], 2),
                "size_ratio": round(serialized_size(int8) / serialized_size(fp32), 3),
            }
            print(row, flush=True)
            rows.append(row)
    return rows


def accuracy_on_digits(root: Path, fp32_epochs: int, qat_epochs: int, seed: int) -> dict:
    digits = DigitsDataModule(batch_size=64)
    L.seed_everything(seed)
    model = ImageClassifier(architecture="cnn")
    fit(model, fp32_epochs, [], seed, digits)
    test = digits.test_dataloader()
    fp32_path = root / "fp32.pt"
    torch.save(model.net.state_dict(), fp32_path)
    fp32_accuracy = top1_accuracy(model, test)

    calibration = torch.cat([images for images, _ in digits.train_dataloader()])[:512]
    ptq_accuracy = top1_accuracy(_int8(model.net, calibration, QuantizationConfig()), test)

    L.seed_everything(seed)
    qat_model = ImageClassifier(architecture="cnn", lr=3e-4, checkpoint=str(fp32_path))
    qat = QuantizationAwareTraining(
        start_epoch=0,
        freeze_bn_epoch=qat_epochs - 2,
        freeze_observer_epoch=qat_epochs - 1,
        calibration_batches=8,
        export_format="none",
    )
    fit(qat_model, qat_epochs, [qat], seed, digits)
    qat_accuracy = top1_accuracy(qat.quantized_model, test)
    result = {
        "seed": seed,
        "test_images": len(digits.test_set),
        "fp32": fp32_accuracy,
        "ptq_int8": ptq_accuracy,
        "qat_int8": qat_accuracy,
        "qat_minus_fp32_points": round(100 * (qat_accuracy - fp32_accuracy), 2),
        "qat_minus_ptq_points": round(100 * (qat_accuracy - ptq_accuracy), 2),
    }
    print(result, flush=True)
    return result


def training_step_time(steps: int) -> dict:
    digits = DigitsDataModule(batch_size=64)
    digits.setup()
    images, labels = digits.train_set.tensors[0][:64], digits.train_set.tensors[1][:64]

    def step_ms(net: torch.nn.Module) -> float:
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        timings = []
        for index in range(steps + 5):
            start = time.perf_counter()
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if index >= 5:
                timings.append((time.perf_counter() - start) * 1000)
        return statistics.median(timings)

    torch.manual_seed(0)
    fp32 = SmallCNN().train()
    fake_quant = backend.prepare(copy.deepcopy(fp32), backend.qconfig_mapping(QuantizationConfig())).train()
    fp32_ms, fake_quant_ms = step_ms(fp32), step_ms(fake_quant)
    result = {
        "batch": 64,
        "threads": torch.get_num_threads(),
        "fp32_step_ms": round(fp32_ms, 3),
        "fake_quant_step_ms": round(fake_quant_ms, 3),
        "ratio": round(fake_quant_ms / fp32_ms, 2),
    }
    print(result, flush=True)
    return result


def markdown(results: dict) -> str:
    lines = [
        f"QAT benchmark ({results['machine']}, torch {results['torch']}, engine {results['engine']}); "
        "latency: batch 1, 1 thread, median, models interleaved.",
        "",
        "| model | input | fp32 ms | fp32 BN-folded ms | int8 ms | hand-written FX int8 ms | speedup vs fp32 | vs BN-folded "
        "| size int8/fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["latency"]:
        lines.append(
            f"| {row['model']} | {row['input']} | {row['fp32_ms']} | {row['fp32_bn_folded_ms']} | {row['int8_ms']} "
            f"| {row['reference_int8_ms']} "
            f"| {row['speedup_vs_fp32']}x | {row['speedup_vs_bn_folded']}x | {row['size_ratio']} |"
        )
    lines += [
        "",
        "| seed | fp32 acc | PTQ int8 acc | QAT int8 acc | QAT - fp32 (pts) | QAT - PTQ (pts) |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["accuracy"]:
        lines.append(
            f"| {row['seed']} | {100 * row['fp32']:.2f}% | {100 * row['ptq_int8']:.2f}% | {100 * row['qat_int8']:.2f}% "
            f"| {row['qat_minus_fp32_points']:+.2f} | {row['qat_minus_ptq_points']:+.2f} |"
        )
    mean = {
        key: statistics.mean(row[key] for row in results["accuracy"])
        for key in ("fp32", "ptq_int8", "qat_int8", "qat_minus_fp32_points", "qat_minus_ptq_points")
    }
    lines.append(
        f"| mean | {100 * mean['fp32']:.2f}% | {100 * mean['ptq_int8']:.2f}% | {100 * mean['qat_int8']:.2f}% "
        f"| {mean['qat_minus_fp32_points']:+.2f} | {mean['qat_minus_ptq_points']:+.2f} |"
    )
    step = results["training_step"]
    lines += [
        "",
        f"Training step (default CNN, batch {step['batch']}, {step['threads']} threads): fp32 "
        f"{step['fp32_step_ms']} ms, fake-quant {step['fake_quant_step_ms']} ms ({step['ratio']}x).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed forwards per latency figure")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fp32-epochs", type=int, default=10)
    parser.add_argument("--qat-epochs", type=int, default=6)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    scratch = args.output / "scratch"
    scratch.mkdir(exist_ok=True)
    results = {
        "machine": f"{torch.get_num_threads()} threads available, {torch.backends.cpu.get_cpu_capability()}",
        "torch": torch.__version__,
        "engine": QuantizationConfig().backend,
        "latency": latency_and_size(args.runs),
        "accuracy": [accuracy_on_digits(scratch, args.fp32_epochs, args.qat_epochs, seed) for seed in args.seeds],
        "training_step": training_step_time(steps=30),
    }
    (args.output / "qat.json").write_text(json.dumps(results, indent=2))
    (args.output / "qat.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
