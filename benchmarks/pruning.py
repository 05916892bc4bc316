"""Pruning benchmark: MagnitudePruning against Lightning's ModelPruning, and channel removal speed.

    python benchmarks/pruning.py        # writes benchmarks/results/pruning.json and pruning.md

Everything is measured in this one run, same model (default CNN), data (digits), epochs and seeds:

1. Unstructured pruning to 50%, 80% and 90%: test accuracy, requested vs measured sparsity (zeros counted
   over the pruned weights), and fit time against dense training. ModelPruning gets the same cubic
   targets, one per epoch (the finest it supports), global L1 ranking over the same Conv/Linear weights.
2. Channel pruning (30% and 50% of channels, physically removed): accuracy on digits at 32x32, size, and
   batch-1 single-thread latency at 32x32 and 224x224, against the dense model (interleaved timing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import lightning as L
import torch
from common import fit
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_compress import MagnitudePruning
from lightning_compress.data import DigitsDataModule
from lightning_compress.models import ImageClassifier
from lightning_compress.report import count_parameters, latency_ms, serialized_size, top1_accuracy
from lightning_compress.schedules import SparsitySchedule

RESULTS = Path(__file__).parent / "results"
EPOCHS, START, END = 10, 1, 7


def _measured_sparsity(model: ImageClassifier) -> float:
    weights = [m.weight for m in model.net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def _lightning_pruning(model: ImageClassifier, sparsity: float) -> ModelPruning:
    """ModelPruning with the same cubic targets, expressed as its per-epoch share of remaining weights."""
    schedule = SparsitySchedule("cubic", 0.0, sparsity, START, END, 1)

    def amount(epoch: int) -> float:
        if not START <= epoch <= END:
            return 0.0
        before = schedule.target(epoch - 1) if epoch > START else 0.0
        return 1.0 - (1.0 - schedule.target(epoch)) / (1.0 - before)

    layers = [(m, "weight") for m in model.net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    return ModelPruning("l1_unstructured", parameters_to_prune=layers, amount=amount, use_global_unstructured=True, verbose=0)


def unstructured(seeds: list[int]) -> list[dict]:
    digits = DigitsDataModule(batch_size=64)
    rows = []
    for seed in seeds:
        L.seed_everything(seed)
        dense = ImageClassifier()
        dense_seconds = fit(dense, EPOCHS, [], seed, digits)
        dense_accuracy = top1_accuracy(dense, digits.test_dataloader())
        rows.append(
            {
                "seed": seed,
                "method": "dense",
                "requested": 0.0,
                "measured": 0.0,
                "accuracy": dense_accuracy,
                "fit_seconds": dense_seconds,
            }
        )
        for sparsity in (0.5, 0.8, 0.9):
            for method in ("MagnitudePruning", "ModelPruning"):
                L.seed_everything(seed)
                model = ImageClassifier()
                if method == "MagnitudePruning":
                    callback = MagnitudePruning(
                        final_sparsity=sparsity,
                        start_epoch=START,
                        end_epoch=END,
                        update_every=10,
                        export_format="none",
                        plot=False,
                    )
                else:
                    callback = _lightning_pruning(model, sparsity)
                seconds = fit(model, EPOCHS, [callback], seed, digits)
                row = {
                    "seed": seed,
                    "method": method,
                    "requested": sparsity,
                    "measured": _measured_sparsity(model),
                    "accuracy": top1_accuracy(model, digits.test_dataloader()),
                    "fit_seconds": seconds,
                    "accuracy_vs_dense_points": 100 * (top1_accuracy(model, digits.test_dataloader()) - dense_accuracy),
                    "time_overhead": seconds / dense_seconds - 1.0,
                }
                print(row, flush=True)
                rows.append(row)
    return rows


def channels(seed: int, runs: int) -> list[dict]:
    digits = DigitsDataModule(batch_size=64, image_size=32)
    test = digits.test_dataloader()
    L.seed_everything(seed)
    dense = ImageClassifier()
    fit(dense, EPOCHS, [], seed, digits)
    models = {"dense": dense.net.eval()}
    accuracies = {"dense": top1_accuracy(dense, test)}
    for sparsity in (0.3, 0.5):
        L.seed_everything(seed)
        model = ImageClassifier()
        pruning = MagnitudePruning(
            final_sparsity=sparsity,
            start_epoch=START,
            end_epoch=END,
            mode="channels",
            update_every=10,
            export_format="none",
            plot=False,
        )
        fit(model, EPOCHS, [pruning], seed, digits)
        name = f"{int(sparsity * 100)}% channels"
        models[name] = pruning.pruned_model.net.eval()
        accuracies[name] = top1_accuracy(pruning.pruned_model, test)
    rows = []
    for size in (32, 224):
        example = torch.randn(1, 1, size, size)
        timings = latency_ms(models, example, runs=runs, warmup=5)
        for name, net in models.items():
            parameters, _ = count_parameters(net)
            rows.append(
                {
                    "model": name,
                    "input": f"{size}x{size}",
                    "accuracy_32x32": accuracies[name],
                    "parameters": parameters,
                    "size_bytes": serialized_size(net),
                    "latency_ms": round(timings[name], 3),
                    "speedup": round(timings["dense"] / timings[name], 2),
                }
            )
            print(rows[-1], flush=True)
    return rows


def markdown(results: dict) -> str:
    lines = [
        f"Pruning benchmark (torch {results['torch']}); default CNN on digits, {EPOCHS} epochs, pruning "
        f"from epoch {START} to {END}, seeds {results['seeds']}; mean (std) over seeds.",
        "",
        "| method | requested | measured | test acc | vs dense (pts) | fit time vs dense |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for row in results["unstructured"]:
        groups.setdefault((row["method"], row["requested"]), []).append(row)
    for (method, requested), rows in sorted(groups.items(), key=lambda item: (item[0][1], item[0][0])):
        accuracies = [100 * row["accuracy"] for row in rows]
        spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        delta = statistics.mean(row.get("accuracy_vs_dense_points", 0.0) for row in rows)
        overhead = statistics.mean(row.get("time_overhead", 0.0) for row in rows)
        lines.append(
            f"| {method} | {requested:.0%} | {statistics.mean(row['measured'] for row in rows):.4f} | "
            f"{statistics.mean(accuracies):.2f}% ({spread:.2f}) | {delta:+.2f} | {overhead:+.1%} |"
        )
    lines += [
        "",
        "| model | input | test acc (32x32) | params | size KiB | latency ms | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["channels"]:
        lines.append(
            f"| {row['model']} | {row['input']} | {100 * row['accuracy_32x32']:.2f}% | {row['parameters']:,} | "
            f"{row['size_bytes'] / 1024:.1f} | {row['latency_ms']} | {row['speedup']}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=int, default=50, help="timed forwards per latency figure")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    results = {
        "torch": torch.__version__,
        "seeds": args.seeds,
        "unstructured": unstructured(args.seeds),
        "channels": channels(args.seeds[0], args.runs),
    }
    (args.output / "pruning.json").write_text(json.dumps(results, indent=2))
    (args.output / "pruning.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
