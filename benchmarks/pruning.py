"""Pruning benchmark: MagnitudePruning against Lightning's ModelPruning, and channel removal speed.

    python benchmarks/pruning.py        # writes benchmarks/results/pruning.json and pruning.md
    python benchmarks/pruning.py --sections architectures   # only part 3: pruning_architectures.json/.md

Everything is measured in this one run, same model (default CNN), data (digits), epochs and seeds:

1. Unstructured pruning to 50%, 80% and 90%: test accuracy, requested vs measured sparsity (zeros counted
   over the pruned weights), and fit time against dense training. ModelPruning gets the same cubic
   targets, one per epoch (the finest it supports), global L1 ranking over the same Conv/Linear weights.
2. Channel pruning (30% and 50% of channels, physically removed): accuracy on digits at 32x32, size, and
   batch-1 single-thread latency at 32x32 and 224x224, against the dense model (interleaved timing).
3. Channel coverage (written to pruning_architectures.json/.md): eight torchvision architectures, 50% of the
   channels of every group, ours (MagnitudePruning, a short fit on random 224x224 images) against
   Torch-Pruning's MagnitudePruner (same ratio, final classifier left alone): parameter fraction, and
   batch-1 single-thread latency at 224x224 of both shrunken networks and the dense one, timed in turns.
   Training does not change the shapes, so random data serves.
"""

from __future__ import annotations

import argparse
import copy
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
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.report import count_parameters, latency_ms, serialized_size, top1_accuracy
from lightning_compress.schedules import SparsitySchedule

ARCHITECTURES = [
    "resnet18",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "efficientnet_b0",
    "densenet121",
    "regnet_x_400mf",
    "convnext_tiny",
    "vit_b_16",
]

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


class _Classifier(L.LightningModule):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.net = network

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return nn.functional.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def torch_pruning_magnitude(network: nn.Module, example: torch.Tensor) -> nn.Module | str:
    """Torch-Pruning's MagnitudePruner at 50%, the final classifier ignored; what it raises, if it fails."""
    import warnings

    import torch_pruning

    network = copy.deepcopy(network).eval()
    classifier = [module for module in network.modules() if isinstance(module, nn.Linear)][-1]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch_pruning.pruner.MagnitudePruner(
                network,
                example,
                importance=torch_pruning.importance.MagnitudeImportance(p=2),
                pruning_ratio=0.5,
                ignored_layers=[classifier],
            ).step()
            network(example)
    except Exception as error:  # noqa: BLE001 - reported in the table
        return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    return network


def architectures(runs: int) -> list[dict]:
    import torchvision
    from torch.utils.data import DataLoader, TensorDataset

    rows = []
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(4, 3, 224, 224, generator=generator), torch.randint(0, 10, (4,), generator=generator)
    for name in ARCHITECTURES:
        L.seed_everything(0)
        module = _Classifier(getattr(torchvision.models, name)(num_classes=10))
        dense = copy.deepcopy(module.net).eval()
        theirs = torch_pruning_magnitude(dense, images[:1])
        pruning = MagnitudePruning(
            final_sparsity=0.5, start_epoch=0, end_epoch=1, mode="channels", export_format="none", plot=False
        )
        fit(module, 2, [pruning], 0, train_dataloaders=DataLoader(TensorDataset(images, labels), batch_size=2))
        ours = pruning.pruned_model.net.eval()
        models = {"dense": dense, "ours": ours, **({"torch-pruning": theirs} if isinstance(theirs, nn.Module) else {})}
        with torch.no_grad():
            timings = latency_ms(models, images[:1], runs=runs, warmup=3)
        dense_parameters, _ = count_parameters(dense)
        theirs_parameters = count_parameters(theirs)[0] if isinstance(theirs, nn.Module) else None
        row = {
            "architecture": name,
            "ours_fraction": round(count_parameters(ours)[0] / dense_parameters, 3),
            "torch_pruning_fraction": None if theirs_parameters is None else round(theirs_parameters / dense_parameters, 3),
            "torch_pruning_error": None if isinstance(theirs, nn.Module) else theirs,
            "dense_ms": round(timings["dense"], 2),
            "ours_ms": round(timings["ours"], 2),
            "torch_pruning_ms": round(timings["torch-pruning"], 2) if "torch-pruning" in timings else None,
        }
        rows.append(row)
        print(row, flush=True)
    return rows


def architectures_markdown(results: dict) -> str:
    lines = [
        f"Channel coverage (torch {results['torch']}, CPU {results['cpu']}): 50% of the channels of every group, "
        "parameters of the shrunken network as a fraction of dense, batch-1 single-thread latency at 224x224 "
        "(models timed in turns).",
        "",
        "| architecture | ours | Torch-Pruning | dense ms | ours ms | Torch-Pruning ms | ours vs Torch-Pruning latency |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["architectures"]:
        theirs = row["torch_pruning_fraction"]
        theirs_text = f"{theirs:.3f}" if theirs is not None else f"fails ({row['torch_pruning_error']})"
        ratio = f"{row['ours_ms'] / row['torch_pruning_ms']:.2f}x" if row["torch_pruning_ms"] else "-"
        lines.append(
            f"| {row['architecture']} | {row['ours_fraction']:.3f} | {theirs_text} | {row['dense_ms']} | "
            f"{row['ours_ms']} | {row['torch_pruning_ms'] or '-'} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


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
    sections = ["unstructured", "channels", "architectures"]
    parser.add_argument("--sections", nargs="+", choices=sections, default=sections)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    if "architectures" in args.sections:
        cpu = torch.backends.cpu.get_cpu_capability()
        coverage = {"torch": torch.__version__, "cpu": cpu, "architectures": architectures(args.runs)}
        (args.output / "pruning_architectures.json").write_text(json.dumps(coverage, indent=2))
        (args.output / "pruning_architectures.md").write_text(architectures_markdown(coverage))
        print(architectures_markdown(coverage))
    if {"unstructured", "channels"} & set(args.sections):
        # a section not run keeps its latest results
        path = args.output / "pruning.json"
        results = json.loads(path.read_text()) if path.is_file() else {"unstructured": [], "channels": []}
        results.update(torch=torch.__version__, seeds=args.seeds)
        if "unstructured" in args.sections:
            results["unstructured"] = unstructured(args.seeds)
        if "channels" in args.sections:
            results["channels"] = channels(args.seeds[0], args.runs)
        (args.output / "pruning.json").write_text(json.dumps(results, indent=2))
        (args.output / "pruning.md").write_text(markdown(results))
        print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
