"""Distillation benchmark: does the teacher help a small student, and what does it cost per step?

    python benchmarks/distillation.py   # writes benchmarks/results/distillation.json and distillation.md

On digits, in one run:
1. A teacher (the default CNN) is trained once. A small student (widths 8, 16) is trained alone and
   distilled from the teacher, same epochs, optimizer and learning rate, over several seeds.
2. Training step time of the student alone, one teacher forward, and a distillation step; and the bytes
   autograd keeps for backward in each (the teacher must add none: it runs without gradients).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from common import fit

from lightning_compress import DistillationModule
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier
from lightning_compress.report import top1_accuracy

RESULTS = Path(__file__).parent / "results"
STUDENT = {"widths": [8, 16]}


def accuracy(teacher_path: Path, seeds: list[int], epochs: int) -> dict:
    test = DigitsDataModule().test_dataloader()
    alone, distilled = [], []
    for seed in seeds:
        L.seed_everything(seed)
        student = ImageClassifier("cnn", architecture_options=STUDENT)
        fit(student, epochs, seed=seed)
        alone.append(top1_accuracy(student, test))
        L.seed_everything(seed)
        module = DistillationModule(
            student="cnn",
            student_options=STUDENT,
            teacher="cnn",
            teacher_checkpoint=str(teacher_path),
            temperature=4.0,
            alpha=0.9,
        )
        fit(module, epochs, seed=seed)
        distilled.append(top1_accuracy(module, test))
        print({"seed": seed, "alone": alone[-1], "distilled": distilled[-1]}, flush=True)
    gain = statistics.mean(distilled) - statistics.mean(alone)
    spread = max(statistics.stdev(alone), statistics.stdev(distilled))
    return {
        "seeds": seeds,
        "epochs": epochs,
        "alone": alone,
        "distilled": distilled,
        "alone_mean": statistics.mean(alone),
        "alone_std": statistics.stdev(alone),
        "distilled_mean": statistics.mean(distilled),
        "distilled_std": statistics.stdev(distilled),
        "gain_points": 100 * gain,
        "gain_in_stds": gain / spread if spread else float("inf"),
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
    module = DistillationModule(student="cnn", student_options=STUDENT, teacher="cnn", teacher_checkpoint=str(teacher_path))
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
    return (
        "\n".join(
            [
                f"Distillation benchmark (torch {results['torch']}): teacher = default CNN "
                f"({100 * results['teacher_accuracy']:.2f}% test), student = CNN widths {STUDENT['widths']}, "
                f"{a['epochs']} epochs, seeds {a['seeds']}.",
                "",
                "| student | test acc mean | std |",
                "|---|---|---|",
                f"| alone | {100 * a['alone_mean']:.2f}% | {100 * a['alone_std']:.2f} |",
                f"| distilled (T=4, alpha=0.9) | {100 * a['distilled_mean']:.2f}% | {100 * a['distilled_std']:.2f} |",
                "",
                f"Gain: {a['gain_points']:+.2f} points = {a['gain_in_stds']:.1f} standard deviations.",
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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=10)
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
        "accuracy": accuracy(teacher_path, args.seeds, args.epochs),
        "step": step_cost(teacher_path, args.steps),
    }
    (args.output / "distillation.json").write_text(json.dumps(results, indent=2))
    (args.output / "distillation.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
