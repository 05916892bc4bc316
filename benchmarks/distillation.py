"""Distillation benchmark: does the teacher help a small student, and what does it cost per step?

    python benchmarks/distillation.py   # writes benchmarks/results/distillation.json and distillation.md

On digits, in one run:
1. A teacher (the default CNN) is trained once. A small student (widths 8, 16) is trained alone, distilled
   from the teacher, and distilled with a hint between the second convolutions, over several seeds: same
   epochs, optimizer, learning rate and data (jittered training batches, ``data.augment``) in every arm.
   Why jittered: on the very images it was trained on, the teacher's soft targets are nearly one-hot and
   teach little beyond the label (earlier runs of this benchmark without jitter: distillation 8.8 points
   *worse* after 10 epochs, under-trained; about +1 point after 60). On jittered views it has more to say.
2. Training step time of the student alone, one teacher forward, and a distillation step; and the bytes
   autograd keeps for backward in each (the teacher must add none: it runs without gradients).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from common import fit

from lightning_compress import DistillationModule
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier, build_network
from lightning_compress.report import top1_accuracy

RESULTS = Path(__file__).parent / "results"
STUDENT = {"widths": [8, 16]}
DISTILLATION = {"temperature": 4.0, "alpha": 0.9}
HINTS = {"features.4": "features.4"}  # second conv of student (16 channels) and teacher (64), both 4x4 maps


def _student() -> torch.nn.Module:
    return build_network("cnn", num_classes=10, in_channels=1, **STUDENT)


def _teacher(teacher_path: Path) -> torch.nn.Module:
    return build_network("cnn", num_classes=10, in_channels=1, checkpoint=str(teacher_path))


def _students(teacher_path: Path, lr: float) -> dict[str, Callable[[], L.LightningModule]]:
    def distilled(**options) -> DistillationModule:
        return DistillationModule(student=_student(), teacher=_teacher(teacher_path), lr=lr, **options)

    return {
        "alone": lambda: ImageClassifier("cnn", architecture_options=STUDENT, lr=lr),
        "distilled": lambda: distilled(**DISTILLATION),
        "distilled + hint": lambda: distilled(**DISTILLATION, hints=HINTS),
    }


def _gain(arm: list[float], alone: list[float]) -> dict:
    """Gain over the student alone, in points and in standard deviations: of one run (the larger of the two
    arms': the issue's goal) and of the difference of the two means (Welch's standard error)."""
    gain = statistics.mean(arm) - statistics.mean(alone)
    spread = max(statistics.stdev(arm), statistics.stdev(alone))
    standard_error = math.sqrt(statistics.variance(arm) / len(arm) + statistics.variance(alone) / len(alone))
    return {
        "gain_points": 100 * gain,
        "gain_in_run_stds": gain / spread if spread else float("inf"),
        "gain_in_standard_errors": gain / standard_error if standard_error else float("inf"),
        "wins": sum(a > b for a, b in zip(arm, alone, strict=True)),
        "ties": sum(a == b for a, b in zip(arm, alone, strict=True)),
    }


def accuracy(teacher_path: Path, seeds: list[int], epochs: int, lr: float, augment: bool) -> dict:
    test = DigitsDataModule().test_dataloader()
    runs: dict[str, list[float]] = {}
    for seed in seeds:
        for name, build in _students(teacher_path, lr).items():
            L.seed_everything(seed)
            module = build()
            fit(module, epochs, seed=seed, datamodule=DigitsDataModule(batch_size=64, augment=augment))
            runs.setdefault(name, []).append(top1_accuracy(module, test))
        print({"seed": seed, **{name: values[-1] for name, values in runs.items()}}, flush=True)
    return {
        "seeds": seeds,
        "epochs": epochs,
        "lr": lr,
        "augment": augment,
        "arms": {
            name: {
                "runs": values,
                "mean": statistics.mean(values),
                "std": statistics.stdev(values),
                **(_gain(values, runs["alone"]) if name != "alone" else {}),
            }
            for name, values in runs.items()
        },
    }


def _saved_bytes(step) -> int:
    """Bytes of the tensors autograd saves for backward while ``step`` runs its forward."""
    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    return saved


def step_cost(teacher_path: Path, steps: int) -> dict:
    digits = DigitsDataModule(batch_size=64)
    digits.setup()
    images, labels = digits.train_set.tensors[0][:64], digits.train_set.tensors[1][:64]
    module = DistillationModule(student=_student(), teacher=_teacher(teacher_path))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)

    def student_step():
        loss = F.cross_entropy(module(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def teacher_forward():
        module._teacher_logits(images)

    def distillation_step():
        loss = module.training_step((images, labels), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer here to log to
    work = {"student_step": student_step, "teacher_forward": teacher_forward, "distillation_step": distillation_step}
    timings: dict[str, list[float]] = {name: [] for name in work}
    for index in range(steps + 5):  # interleaved, so that load on a shared machine hits all three alike
        for name, run in work.items():
            start = time.perf_counter()
            run()
            if index >= 5:
                timings[name].append((time.perf_counter() - start) * 1000)
    median = {name: statistics.median(values) for name, values in timings.items()}
    saved = {
        "student_step": _saved_bytes(lambda: F.cross_entropy(module(images), labels)),
        "distillation_step": _saved_bytes(lambda: module.training_step((images, labels), 0)),
    }
    budget = 1.2 * (median["student_step"] + median["teacher_forward"])
    return {
        "batch": 64,
        "threads": torch.get_num_threads(),
        **{f"{k}_ms": round(v, 3) for k, v in median.items()},
        "budget_ms": round(budget, 3),
        "within_budget": median["distillation_step"] <= budget,
        "saved_for_backward_bytes": saved,
    }


def markdown(results: dict) -> str:
    a, s = results["accuracy"], results["step"]
    rows = []
    for name, arm in a["arms"].items():
        gain = (
            f"{arm['gain_points']:+.2f} | {arm['gain_in_run_stds']:.1f} | {arm['gain_in_standard_errors']:.1f} | "
            f"{arm['wins']}/{len(arm['runs'])} ({arm['ties']} ties)"
            if "gain_points" in arm
            else "| | |"
        )
        runs = " ".join(f"{100 * value:.1f}" for value in arm["runs"])
        rows.append(f"| {name} | {100 * arm['mean']:.2f}% | {100 * arm['std']:.2f} | {gain} | {runs} |")
    return (
        "\n".join(
            [
                f"Distillation benchmark (torch {results['torch']}): teacher = default CNN "
                f"({100 * results['teacher_accuracy']:.2f}% test), student = CNN widths {STUDENT['widths']}, "
                f"{a['epochs']} epochs at lr {a['lr']}, training batches jittered: {a['augment']}, "
                f"T={DISTILLATION['temperature']}, alpha={DISTILLATION['alpha']}, hint {HINTS}, seeds {a['seeds']}.",
                "",
                "| student | test acc mean | std | gain (points) | gain / larger run std | gain / std error "
                "| seeds won | runs (%) |",
                "|---|---|---|---|---|---|---|---|",
                *rows,
                "",
                "Goal: gain > 2 run standard deviations. The standard error is that of the difference of the two "
                "means (Welch); one test image is 0.37 points.",
                "",
                f"Step time (batch {s['batch']}, {s['threads']} threads, median, interleaved): "
                f"student alone {s['student_step_ms']} ms, "
                f"teacher forward {s['teacher_forward_ms']} ms, distillation step {s['distillation_step_ms']} ms "
                f"(budget 1.2 x (student + teacher forward) = {s['budget_ms']} ms: "
                f"{'met' if s['within_budget'] else 'missed'}). "
                f"Bytes saved for backward: student alone {s['saved_for_backward_bytes']['student_step']:,}, "
                f"distillation {s['saved_for_backward_bytes']['distillation_step']:,}.",
            ]
        )
        + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--no-augment", dest="augment", action="store_false", help="train on the images as they are")
    parser.add_argument("--teacher-epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    teacher_path = args.output / "scratch" / "teacher.pt"
    teacher_path.parent.mkdir(exist_ok=True)
    teacher = ImageClassifier("cnn")
    fit(teacher, args.teacher_epochs, seed=0)
    torch.save(teacher.net.state_dict(), teacher_path)
    results = {
        "torch": torch.__version__,
        "teacher_accuracy": top1_accuracy(teacher, DigitsDataModule().test_dataloader()),
        "accuracy": accuracy(teacher_path, args.seeds, args.epochs, args.lr, args.augment),
        "step": step_cost(teacher_path, args.steps),
    }
    (args.output / "distillation.json").write_text(json.dumps(results, indent=2))
    (args.output / "distillation.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
