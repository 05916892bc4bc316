"""Peak memory per process under FSDP2 against DDP, with compression callbacks in the fit: the point of sharding.

    python benchmarks/fsdp2_memory.py        # writes results/fsdp2_memory.json and fsdp2_memory.md

A model whose parameters dominate memory (an MLP of ``BLOCKS`` Linear ``WIDTH`` x ``WIDTH`` layers on the digits'
64 pixels, Adam) is trained on 2 CPU processes (gloo) with ``MagnitudePruning`` (unstructured, from the first epoch)
and ``QuantizationAwareTraining`` (from the second), once with ``strategy="ddp"`` and once with
``ModelParallelStrategy`` and ``fully_shard`` on each block and the whole module (the model is built whole in
``__init__``, as QAT needs its layers in ``setup``, and sharded in ``configure_model``). Each process records its
peak resident memory (``ru_maxrss``) above what it held before the model was built: at the end of training, and
after the fit (the callbacks' whole copies: the dense baseline, the float and int8 models). What the model's size
costs is that less the same run's with ``SMALL_WIDTH`` layers (libraries, process group and data weigh alike in
both). Each run starts fresh processes (Lightning re-runs this script for rank 1). Every run is made twice: with
glibc's malloc as it comes, and with its mmap threshold fixed (``ALLOCATORS``), which decides whether the memory FSDP2
frees goes back to the system.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from common import MACHINE
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard

from lightning_compress import MagnitudePruning, QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule

RESULTS = Path(__file__).parent / "results"
BLOCKS, WIDTH, SMALL_WIDTH = 8, 2048, 128


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class WideMLP(L.LightningModule):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.width = width
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, width),
            nn.ReLU(),
            *(layer for _ in range(BLOCKS) for layer in (nn.Linear(width, width), nn.ReLU())),
            nn.Linear(width, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-4)


class ShardedWideMLP(WideMLP):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net.modules():
            if isinstance(layer, nn.Linear) and layer.in_features == self.width == layer.out_features:
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class TrainingPeak(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak = _peak_mib()


def run_one(strategy: str, width: int, compress: bool, output: Path) -> None:
    """One 2-process fit (this process is rank 0 or, re-run by Lightning, rank 1); each rank writes its peaks."""
    torch.set_num_threads(1)
    before = _peak_mib()
    L.seed_everything(0)
    model = ShardedWideMLP(width) if strategy == "fsdp2" else WideMLP(width)
    training = TrainingPeak()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if strategy == "fsdp2" else "ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_train_batches=8,
        limit_val_batches=0,
        callbacks=[
            *(
                [
                    MagnitudePruning(final_sparsity=0.5, start_epoch=0, end_epoch=1, export_format="none", plot=False),
                    QuantizationAwareTraining(start_epoch=1, backend="x86", export_format="none"),
                ]
                if compress
                else []
            ),
            training,
        ],
    )
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    peaks = {"training": training.peak - before, "fit": _peak_mib() - before}
    (output / f"{strategy}_{width}_{compress}_rank{trainer.global_rank}.json").write_text(json.dumps(peaks))


def _table(peaks: dict, ratio: dict) -> list[str]:
    lines = ["| strategy | training peak MiB (rank 0, rank 1) | whole fit peak MiB (rank 0, rank 1) |", "|---|---|---|"]
    for strategy, ranks in peaks.items():
        training, fit = (", ".join(f"{rank[kind]:.0f}" for rank in ranks) for kind in ("training", "fit"))
        lines.append(f"| {strategy} | {training} | {fit} |")
    return [
        *lines,
        "",
        f"FSDP2 / DDP, the larger rank of each: with the callbacks, training {ratio['training']:.2f}x, whole fit "
        f"{ratio['fit']:.2f}x (the whole-fit peak adds what the callbacks build whole on every rank at fit end: the "
        f"dense baseline, the pruned float and the int8 models, and the gathered copy the int8 model is converted "
        f"from); without them, training {ratio['training (no callbacks)']:.2f}x.",
    ]


def markdown(results: dict) -> str:
    parameters_mib = results["parameters"] * 4 / 2**20
    lines = [
        f"Peak resident memory per process that the model's size costs (the run's peak less the same run's with "
        f"{SMALL_WIDTH}-wide layers), 2 CPU processes (gloo), torch {results['torch']}, "
        f"{results['machine']}: an MLP of {BLOCKS} Linear {WIDTH} x {WIDTH} layers ({results['parameters'] / 1e6:.1f}M "
        f"parameters, {parameters_mib:.0f} MiB in fp32), Adam, with MagnitudePruning and QuantizationAwareTraining.",
    ]
    for allocator, measured in results["allocators"].items():
        lines += ["", f"**{allocator}**", "", *_table(measured["peaks"], measured["ratio"])]
    return "\n".join(lines) + "\n"


def _measure(scratch: Path, allocator_env: dict[str, str]) -> dict:
    """Every fit in fresh processes under one allocator setting: the peaks, and what the model's size costs."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **allocator_env}
    measured = {}
    for compress in (True, False):
        for strategy in ("ddp", "fsdp2"):
            for width in (WIDTH, SMALL_WIDTH):
                command = [
                    *(sys.executable, __file__, "--strategy", strategy, "--width", str(width)),
                    *("--compress", str(int(compress)), "--scratch", str(scratch)),
                ]
                subprocess.run(command, check=True, env=env, cwd=Path(__file__).parent)
                measured[strategy, width, compress] = [
                    json.loads((scratch / f"{strategy}_{width}_{compress}_rank{rank}.json").read_text()) for rank in (0, 1)
                ]
                print(allocator_env, strategy, width, compress, measured[strategy, width, compress], flush=True)
    # what the model's size costs: the wide model's peaks less the same run's with a narrow one (the libraries,
    # the process group and the data cost the same in both)
    peaks = {
        f"{strategy}{'' if compress else ' (no callbacks)'}": [
            {kind: wide[kind] - narrow[kind] for kind in ("training", "fit")}
            for wide, narrow in zip(measured[strategy, WIDTH, compress], measured[strategy, SMALL_WIDTH, compress], strict=True)
        ]
        for compress in (True, False)
        for strategy in ("ddp", "fsdp2")
    }
    return {
        "environment": allocator_env,
        "peaks": peaks,
        "measured": {
            f"{strategy} width {width}{'' if compress else ' (no callbacks)'}": ranks
            for (strategy, width, compress), ranks in measured.items()
        },
        "ratio": {
            f"{kind}{suffix}": max(rank[kind] for rank in peaks[f"fsdp2{suffix}"])
            / max(rank[kind] for rank in peaks[f"ddp{suffix}"])
            for kind in ("training", "fit")
            for suffix in ("", " (no callbacks)")
        },
    }


# glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB): once FSDP2 has freed one
# all-gathered layer, the next ones come from the heap, whose freed pages the process keeps. A fixed threshold
# (setting it turns the raising off) keeps such blocks mmapped, returned to the system when freed.
ALLOCATORS = {
    "glibc malloc, a fixed mmap threshold (MALLOC_MMAP_THRESHOLD_=131072)": {"MALLOC_MMAP_THRESHOLD_": "131072"},
    "glibc malloc as it comes (its mmap threshold rises with the blocks freed)": {},
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2"], help=argparse.SUPPRESS)  # one fit, as a child
    parser.add_argument("--width", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--compress", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.strategy:
        return run_one(args.strategy, args.width, bool(args.compress), args.scratch)
    args.output.mkdir(parents=True, exist_ok=True)
    scratch = args.output / "fsdp2_memory_runs"
    scratch.mkdir(exist_ok=True)
    allocators = {name: _measure(scratch, environment) for name, environment in ALLOCATORS.items()}
    for path in scratch.iterdir():
        path.unlink()
    scratch.rmdir()
    results = {
        "torch": torch.__version__,
        "machine": MACHINE,
        "parameters": sum(p.numel() for p in WideMLP().parameters()),
        "allocators": allocators,
    }
    (args.output / "fsdp2_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.output / "fsdp2_memory.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
