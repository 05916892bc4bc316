"""Headline benchmark: half of resnet18's channels removed, then int8, in one training run; do the factors multiply?

    python benchmarks/headline.py              # writes benchmarks/results/headline.json and headline.md (about 1 hour)
    python benchmarks/headline.py --seeds 0    # one seed

torchvision's resnet18 (standard stem) trained on digits at 32x32, for each seed:

- **fp32 teacher**: trained from scratch for ``TEACHER_EPOCHS``.
- **channels only**: a student starting from the teacher's weights, distilled from the teacher while
  ``MagnitudePruning(mode="channels", final_sparsity=0.5)`` ramps and then removes half of every channel group
  mid-run (``shrink_epoch``), fine-tuned on; no QAT.
- **int8 only**: the teacher's weights fine-tuned with ``QuantizationAwareTraining``, converted to int8.
- **channels then int8 (one run)**: what ``+compress=distill_channels_qat`` does: the channels-only run with QAT
  of the shrunken network after the shrink, in the same ``fit``, converted to int8.
- **yardstick**: Torch-Pruning's ``MagnitudePruner`` at the same ratio on the trained teacher, then torch.ao's
  hand-written FX post-training int8 (``prepare_fx``/``convert_fx``, x86 defaults): the best a user could do by
  hand with those two tools. Not fine-tuned, so its accuracy is shown but is not a fair comparison; its speed is.

Accuracy is on the 270-image test split (one image is 0.37 points), mean over seeds. Latency: batch 1, one thread,
at 64x64 and 224x224, of the first seed's models, all timed in turns in this process (``report.latency_ms``), beside
the one-run model exported to ONNX Runtime and OpenVINO (the deployment runtimes). Speedups are against the fp32
teacher; "product" is channels-only speedup x int8-only speedup, measured in the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
from pathlib import Path

import torch
from common import fit
from pruning import torch_pruning_magnitude
from qat import hand_written_fx
from torch import nn

from lightning_compress import DistillationModule, MagnitudePruning, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.export import INT8_TOLERANCE, write_exports
from lightning_compress.network_call import NetworkCall
from lightning_compress.report import count_parameters, latency_ms, top1_accuracy
from lightning_compress.runtimes import OnnxRuntimeModel, OpenVinoModel

RESULTS = Path(__file__).parent / "results"
IMAGE_SIZE = 32
TEACHER_EPOCHS = 8
STUDENT_EPOCHS = 8  # pruning ramp 0-3, channels removed at 3, QAT from 5, BN frozen at 6, observers at 7
INT8_EPOCHS = 4
PRUNING = {"mode": "channels", "final_sparsity": 0.5, "start_epoch": 0, "end_epoch": 3, "shrink_epoch": 3, "plot": False}
QAT = {"start_epoch": 5, "freeze_bn_epoch": 6, "freeze_observer_epoch": 7}
LATENCY_SIZES = (64, 224)
ARMS = ("fp32 teacher", "channels only", "int8 only", "channels then int8 (one run)", "yardstick: Torch-Pruning + FX int8")


def _resnet18() -> ImageClassifier:
    return ImageClassifier(architecture="resnet18", architecture_options={"small_input": False})


def _trainable_copy(network: nn.Module) -> nn.Module:
    """A copy of the teacher's network to train on (DistillationModule freezes the teacher it is given)."""
    copied = copy.deepcopy(network).train()
    for parameter in copied.parameters():
        parameter.requires_grad_(True)
    return copied


def train_arms(seed: int) -> tuple[dict[str, float], dict[str, nn.Module], torch.Tensor]:
    """Train every arm for ``seed``; returns each arm's test accuracy, each arm's network (for timing) and some
    training images (for the exports' example input and the yardstick's calibration)."""
    digits = DigitsDataModule(batch_size=64, image_size=IMAGE_SIZE)
    teacher = _resnet18()
    fit(teacher, TEACHER_EPOCHS, [], seed, digits)
    digits.setup()
    test = digits.test_dataloader()
    training_images = digits.train_set.tensors[0][:64]

    channels = MagnitudePruning(export_format="none", **PRUNING)
    channels_student = DistillationModule(student=_trainable_copy(teacher.net), teacher=teacher.net)
    fit(channels_student, STUDENT_EPOCHS, [channels], seed, digits)

    int8_qat = QuantizationAwareTraining(
        start_epoch=0, calibration_batches=8, freeze_bn_epoch=2, freeze_observer_epoch=3, backend="x86", export_format="none"
    )
    fit(ImageClassifier(architecture=_trainable_copy(teacher.net)), INT8_EPOCHS, [int8_qat], seed, digits)

    one_run_pruning = MagnitudePruning(export_format="none", **PRUNING)
    one_run_qat = QuantizationAwareTraining(backend="x86", export_format="none", **QAT)
    one_run = DistillationModule(student=_trainable_copy(teacher.net), teacher=teacher.net)
    fit(one_run, STUDENT_EPOCHS, [one_run_pruning, one_run_qat], seed, digits)

    yardstick = hand_written_fx(torch_pruning_magnitude(_trainable_copy(teacher.net), training_images[:1]), training_images)
    networks = {
        "fp32 teacher": teacher.net.eval(),
        "channels only": channels.pruned_model.net.eval(),
        "int8 only": int8_qat.quantized_model.net.eval(),
        "channels then int8 (one run)": one_run_qat.quantized_model.net.eval(),
        "yardstick: Torch-Pruning + FX int8": yardstick,
    }
    accuracies = {name: top1_accuracy(network, test) for name, network in networks.items()}
    networks["_fake_quant_for_export"] = one_run_qat.fake_quant_for_export(one_run).net.eval()
    print(seed, {name: round(100 * value, 2) for name, value in accuracies.items()}, flush=True)
    return accuracies, networks, training_images


def time_networks(networks: dict[str, nn.Module], runs: int) -> dict[str, dict[str, float]]:
    """Batch-1 single-thread latency of every network at each size, timed in turns, with the one-run model
    also exported to ONNX Runtime and OpenVINO at that size."""
    deployable = networks.pop("_fake_quant_for_export")
    counts = count_parameters(networks["channels then int8 (one run)"])
    latencies = {}
    with tempfile.TemporaryDirectory() as temporary:
        for size in LATENCY_SIZES:
            example = torch.randn(1, 1, size, size)
            folder = Path(temporary) / str(size)
            folder.mkdir()
            call = NetworkCall.of(deployable, "", (example,), {})
            exports = write_exports(deployable, call, folder, "one_run_int8", ["onnx", "openvino"], INT8_TOLERANCE)
            timed = {
                **networks,
                "one run, ONNX Runtime int8": OnnxRuntimeModel(exports["onnx"], counts),
                "one run, OpenVINO int8": OpenVinoModel(exports["openvino"], counts),
            }
            timings = latency_ms(timed, example, runs=runs, warmup=5)
            latencies[str(size)] = {name: round(value, 3) for name, value in timings.items()}  # str: JSON keys
            print(size, latencies[str(size)], flush=True)
    return latencies


def summarize(accuracies: list[dict[str, float]], latencies: dict[str, dict[str, float]], parameters: dict) -> dict:
    teacher = "fp32 teacher"
    accuracy = {
        arm: {"mean": statistics.mean(run[arm] for run in accuracies), "per_seed": [run[arm] for run in accuracies]}
        for arm in ARMS
    }
    goals = {}
    for size, timings in latencies.items():
        speedup = {name: timings[teacher] / value for name, value in timings.items()}
        product = speedup["channels only"] * speedup["int8 only"]
        one_run = speedup["channels then int8 (one run)"]
        goals[size] = {
            "speedup": {name: round(value, 2) for name, value in speedup.items()},
            "product": round(product, 2),
            "one_run_over_product": round(one_run / product, 3),
            "one_run_over_yardstick": round(
                timings["yardstick: Torch-Pruning + FX int8"] / timings["channels then int8 (one run)"], 3
            ),
        }
    gap = 100 * (accuracy[teacher]["mean"] - accuracy["channels then int8 (one run)"]["mean"])
    return {
        "accuracy": accuracy,
        "latency_ms": latencies,
        "speed": goals,
        "teacher_minus_one_run_points": gap,
        "parameters": parameters,
    }


def markdown(results: dict) -> str:
    seeds = results["seeds"]
    lines = [
        f"Headline benchmark (torch {results['torch']}, CPU {results['cpu']}): torchvision resnet18 on digits at "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}, seeds {seeds}; accuracy on the 270-image test split (mean over seeds); batch-1, "
        "single-thread latency of the first seed's models, timed in turns; speedups against the fp32 teacher.",
        "",
        "| model | test acc (mean) | per seed | params | "
        + " | ".join(f"ms @{size} | speedup @{size}" for size in LATENCY_SIZES)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(LATENCY_SIZES),
    ]
    for name in results["latency_ms"][str(LATENCY_SIZES[0])]:
        accuracy = results["accuracy"].get(name)
        accuracy_cells = (
            [f"{100 * accuracy['mean']:.2f}%", " ".join(f"{100 * value:.1f}" for value in accuracy["per_seed"])]
            if accuracy
            else ["(the one-run model's)", ""]
        )
        timing_cells = []
        for size in map(str, LATENCY_SIZES):
            timing_cells += [f"{results['latency_ms'][size][name]:.2f}", f"{results['speed'][size]['speedup'][name]:.2f}x"]
        parameters = results["parameters"].get(name)
        lines.append(
            f"| {name} | {' | '.join(accuracy_cells)} | {'-' if parameters is None else f'{parameters:,}'} | "
            f"{' | '.join(timing_cells)} |"
        )
    lines += ["", "| goal | " + " | ".join(f"@{size}" for size in LATENCY_SIZES) + " |", "|---|" + "---|" * len(LATENCY_SIZES)]
    speed = [results["speed"][str(size)] for size in LATENCY_SIZES]
    lines.append(
        "| one run / (channels-only x int8-only), goal >= 0.9 | "
        + " | ".join(f"{row['one_run_over_product']:.3f} (product {row['product']:.2f}x)" for row in speed)
        + " |"
    )
    lines.append(
        "| one run vs yardstick speed, goal >= 1 | " + " | ".join(f"{row['one_run_over_yardstick']:.3f}" for row in speed) + " |"
    )
    lines += [
        "",
        f"Accuracy: the one-run int8 model is {results['teacher_minus_one_run_points']:.2f} points below the fp32 teacher "
        "(goal: at most 2). The yardstick is not fine-tuned after its pruning: its accuracy is not comparable.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=int, default=30, help="timed forwards per latency figure")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    accuracies, first_networks = [], None
    for seed in args.seeds:
        seed_accuracies, networks, _ = train_arms(seed)
        accuracies.append(seed_accuracies)
        first_networks = first_networks or networks
    parameters = {name: count_parameters(network)[0] for name, network in first_networks.items() if not name.startswith("_")}
    latencies = time_networks(first_networks, args.runs)
    results = {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "seeds": args.seeds,
        **summarize(accuracies, latencies, parameters),
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "headline.json").write_text(json.dumps(results, indent=2))
    (args.output / "headline.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
