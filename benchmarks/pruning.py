"""Pruning benchmark: MagnitudePruning against Lightning's ModelPruning, and channel removal speed.

    python benchmarks/pruning.py        # writes benchmarks/results/pruning.json and pruning.md
    python benchmarks/pruning.py --sections architectures   # only part 3: pruning_architectures.json/.md

Everything is measured in this one run, same model (default CNN), data (digits), epochs and seeds:

1. Unstructured pruning to 50%, 80%, 90% and 95%: accuracy by 5-fold over all 1,797 digits (``kfold.py``,
   3 seeds), requested vs measured sparsity (zeros counted over the pruned weights), and fit time against
   dense training. ModelPruning gets the same cubic targets, one per epoch (the finest it supports), global
   L1 ranking over the same Conv/Linear weights.
2. Channel pruning (30%, 50% and 70% of channels, physically removed): accuracy on digits at 32x32, k-fold
   as above, size, and batch-1 single-thread latency at 32x32 and 224x224, against the dense model
   (interleaved timing).
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
from kfold import fold_accuracies, kfold_accuracy, paired_difference, predicted_classes
from lightning.pytorch.callbacks import ModelPruning
from torch import nn

from lightning_compress import MagnitudePruning
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.report import count_parameters, latency_ms, serialized_size
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


SPARSITIES = (0.5, 0.8, 0.9, 0.95)
CHANNEL_SHARES = (0.3, 0.5, 0.7)


def _magnitude_pruning(sparsity: float, mode: str = "unstructured") -> MagnitudePruning:
    return MagnitudePruning(
        final_sparsity=sparsity,
        start_epoch=START,
        end_epoch=END,
        mode=mode,
        update_every=10,
        export_format="none",
        plot=False,
    )


def unstructured(folds: int, seeds: list[int]) -> dict:
    """Dense, MagnitudePruning and ModelPruning at each sparsity, k-fold: every arm of a fold trains from the
    same seed on the same training images; measured sparsity and fit time are means over the folds."""
    settings: dict[str, dict] = {"dense": {"method": "dense", "requested": 0.0}}
    measured: dict[str, list[float]] = {}
    seconds: dict[str, list[float]] = {}

    def train_and_predict(datamodule: DigitsDataModule, seed: int) -> dict[str, torch.Tensor]:
        images = datamodule.test_set.tensors[0]
        L.seed_everything(seed)
        dense = ImageClassifier()
        seconds.setdefault("dense", []).append(fit(dense, EPOCHS, [], seed, datamodule))
        measured.setdefault("dense", []).append(_measured_sparsity(dense))
        predictions = {"dense": predicted_classes(dense, images)}
        for sparsity in SPARSITIES:
            for method in ("MagnitudePruning", "ModelPruning"):
                arm = f"{method} {sparsity:.0%}"
                settings[arm] = {"method": method, "requested": sparsity}
                L.seed_everything(seed)
                model = ImageClassifier()
                callback = _magnitude_pruning(sparsity) if method == "MagnitudePruning" else _lightning_pruning(model, sparsity)
                seconds.setdefault(arm, []).append(fit(model, EPOCHS, [callback], seed, datamodule))
                measured.setdefault(arm, []).append(_measured_sparsity(model))
                predictions[arm] = predicted_classes(model, images)
        print(seed, datamodule.fold, fold_accuracies(predictions, datamodule.test_set.tensors[1]), flush=True)
        return predictions

    result = kfold_accuracy(train_and_predict, folds=folds, seeds=seeds, batch_size=64)
    for arm, summary in result["arms"].items():
        summary.update(
            settings[arm],
            measured=statistics.mean(measured[arm]),
            fit_seconds=statistics.mean(seconds[arm]),
            time_overhead=statistics.mean(seconds[arm]) / statistics.mean(seconds["dense"]) - 1.0,
        )
    return result


def channels(folds: int, seeds: list[int], runs: int) -> dict:
    """Accuracy at 32x32 of the dense CNN and of 30%, 50% and 70% channel removal, k-fold; size and latency
    (batch 1, one thread, 32x32 and 224x224, models timed in turns) of the models of the first seed's first fold."""
    timed: dict[str, nn.Module] = {}

    def train_and_predict(datamodule: DigitsDataModule, seed: int) -> dict[str, torch.Tensor]:
        images = datamodule.test_set.tensors[0]
        L.seed_everything(seed)
        dense = ImageClassifier()
        fit(dense, EPOCHS, [], seed, datamodule)
        networks = {"dense": dense.net}
        for share in CHANNEL_SHARES:
            L.seed_everything(seed)
            model = ImageClassifier()
            pruning = _magnitude_pruning(share, mode="channels")
            fit(model, EPOCHS, [pruning], seed, datamodule)
            networks[f"{share:.0%} channels"] = pruning.pruned_model.net
        if not timed:
            timed.update({name: network.eval() for name, network in networks.items()})
        predictions = {name: predicted_classes(network, images) for name, network in networks.items()}
        print(seed, datamodule.fold, fold_accuracies(predictions, datamodule.test_set.tensors[1]), flush=True)
        return predictions

    result = kfold_accuracy(train_and_predict, folds=folds, seeds=seeds, batch_size=64, image_size=32)
    result["latency"] = []
    for size in (32, 224):
        timings = latency_ms(timed, torch.randn(1, 1, size, size), runs=runs, warmup=5)
        for name, network in timed.items():
            result["latency"].append(
                {
                    "model": name,
                    "input": f"{size}x{size}",
                    "parameters": count_parameters(network)[0],
                    "size_bytes": serialized_size(network),
                    "latency_ms": round(timings[name], 3),
                    "speedup": round(timings["dense"] / timings[name], 2),
                }
            )
            print(result["latency"][-1], flush=True)
    return result


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


def _versus_dense(result: dict, arm: str) -> str:
    if arm == "dense":
        return "-"
    gain = paired_difference(result, arm, "dense")
    return f"{gain['mean']:+.2f} ± {gain['standard_error']:.2f}"


def markdown(results: dict) -> str:
    sparse, shrunk = results["unstructured"], results["channels"]
    lines = [
        f"Pruning benchmark (torch {results['torch']}, CPU {results.get('cpu', '?')}); default CNN on digits, {EPOCHS} "
        f"epochs, pruning from epoch {START} to {END}. Accuracy {sparse['folds']}-fold: each of the {sparse['images']} "
        f"images is predicted once per seed by a model that never saw it, seeds {sparse['seeds']} (each reshuffles the "
        "folds); mean over seeds, their spread, and the paired difference to dense (mean ± standard error over seeds).",
        "",
        "| method | requested sparsity | measured | accuracy | seed std (pts) | vs dense (pts) | fit time vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, summary in sorted(sparse["arms"].items(), key=lambda item: (item[1]["requested"], item[1]["method"])):
        lines.append(
            f"| {summary['method']} | {summary['requested']:.0%} | {summary['measured']:.4f} | {100 * summary['mean']:.2f}% "
            f"| {100 * summary['std']:.2f} | {_versus_dense(sparse, arm)} | {summary['time_overhead']:+.1%} |"
        )
    latency = {(row["model"], row["input"]): row for row in shrunk["latency"]}
    lines += [
        "",
        f"Channels physically removed (MagnitudePruning mode=channels), 32x32 inputs, {shrunk['folds']}-fold over "
        f"{shrunk['images']} images, seeds {shrunk['seeds']}; parameters, size and latency (batch 1, one thread, models "
        "timed in turns) of the first fold's models.",
        "",
        "| model | accuracy | seed std (pts) | vs dense (pts) | params | size KiB | 32x32 ms | speedup | 224x224 ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, summary in shrunk["arms"].items():
        small, large = latency[(arm, "32x32")], latency[(arm, "224x224")]
        lines.append(
            f"| {arm} | {100 * summary['mean']:.2f}% | {100 * summary['std']:.2f} | {_versus_dense(shrunk, arm)} "
            f"| {small['parameters']:,} | {small['size_bytes'] / 1024:.1f} | {small['latency_ms']} | {small['speedup']}x "
            f"| {large['latency_ms']} | {large['speedup']}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=5)
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
        results = json.loads(path.read_text()) if path.is_file() else {}
        results.update(torch=torch.__version__, cpu=torch.backends.cpu.get_cpu_capability())
        if "unstructured" in args.sections:
            results["unstructured"] = unstructured(args.folds, args.seeds)
        if "channels" in args.sections:
            results["channels"] = channels(args.folds, args.seeds, args.runs)
        (args.output / "pruning.json").write_text(json.dumps(results, indent=2))
        (args.output / "pruning.md").write_text(markdown(results))
        print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
