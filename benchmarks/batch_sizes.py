"""Batch sizes: the torch.export engine's compiled int8 models at changing batch sizes, compiled with the batch
symbolic (the default) against compiled for each batch size.

    python benchmarks/batch_sizes.py      # writes benchmarks/results/batch_sizes.json and batch_sizes.md, ~4 minutes

For each model, two int8 programs are built from the same observed graph: the default (``CompiledProgram``: one
graph for every batch size above 1) and one told to compile per batch size (``symbolic_batch = False``, what it did
before). Each is called at the batch sizes of ``BATCHES`` in that order, the first call at each size timed (what a
server pays when a request of a new size arrives) and the graphs Dynamo compiled counted; then both run in turns at
``TIMED_BATCHES`` (median of one-thread forwards, ``report.latency_ms``), and their outputs are compared there.
Models: resnet18 at 64x64 (RGB), the digits CNN on 8x8 grayscale images (which compiles per batch size either way:
see ``CompiledProgram``), a transformers BERT (2 x 256, 64 tokens; static int8) and a Llama's decoder (2 x 512,
64 tokens; dynamic int8), all with random weights: latency does not depend on their values.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from common import MACHINE
from torch._dynamo.utils import counters

from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import SmallCNN, torchvision_classifier
from lightning_compress.pt2e_quantization import CompiledProgram, InductorQuantizationConfig
from lightning_compress.quantization_backend import backend_for
from lightning_compress.report import latency_ms

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 4, 8, 3, 16, 32, 2)
TIMED_BATCHES = (4, 8)


def _images(size: int, channels: int, count: int = 32) -> torch.Tensor:
    digits = DigitsDataModule(image_size=size, channels=channels)
    digits.setup()
    return digits.train_set.tensors[0][:count]


def _static_int8(network: torch.nn.Module, call: Callable[[int], tuple[tuple, dict]]) -> CompiledProgram:
    """``network`` prepared by the pt2e backend from a call at batch 8, observed at batch 32, converted."""
    backend = backend_for(InductorQuantizationConfig())
    backend.activate()
    args, kwargs = call(8)
    prepared = backend.prepare_qat(copy.deepcopy(network).train(), args, kwargs, [], []).eval()
    backend.set_fake_quant(prepared, enabled=False)
    args, kwargs = call(32)
    with torch.no_grad():
        prepared(*args, **kwargs)
    return backend.convert(prepared)


def _dynamic_int8(network: torch.nn.Module, call: Callable[[int], tuple[tuple, dict]]) -> CompiledProgram:
    """``network``'s Linear layers in dynamic int8 (``DynamicQuantization(backend="x86_inductor")``'s mechanism)."""
    return backend_for(InductorQuantizationConfig()).quantize_dynamic(copy.deepcopy(network).eval(), call=call(8))


def _models() -> dict[str, tuple[Callable[[], CompiledProgram], Callable[[int], tuple[tuple, dict]]]]:
    """Name -> (a builder of its int8 program, the call at a batch size)."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    rgb, grayscale = _images(64, 3), _images(8, 1)
    tokens = torch.randint(0, 1000, (32, 64))
    resnet18 = torchvision_classifier("resnet18", 10, 3, small_input=False).eval()
    cnn = SmallCNN(num_classes=10, in_channels=1).eval()
    bert = BertModel(
        BertConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024)
    ).eval()
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=2,
            num_attention_heads=8,
            num_key_value_heads=4,
            use_cache=False,
        )
    ).eval()

    def images(batch_of: torch.Tensor) -> Callable[[int], tuple[tuple, dict]]:
        return lambda batch: ((batch_of[:batch],), {})

    def ids(batch: int) -> tuple[tuple, dict]:
        return (), {"input_ids": tokens[:batch], "attention_mask": torch.ones_like(tokens[:batch])}

    def decoder_ids(batch: int) -> tuple[tuple, dict]:
        return (), {"input_ids": tokens[:batch]}

    return {
        "resnet18 64x64 (int8)": (lambda: _static_int8(resnet18, images(rgb)), images(rgb)),
        "digits CNN 8x8 grayscale (int8)": (lambda: _static_int8(cnn, images(grayscale)), images(grayscale)),
        "BERT 2 x 256, 64 tokens (int8)": (lambda: _static_int8(bert, ids), ids),
        "Llama decoder 2 x 512, 64 tokens (dynamic int8)": (lambda: _dynamic_int8(llama, decoder_ids), decoder_ids),
    }


class _Called(torch.nn.Module):
    """A program called as its model is, at one batch size (``latency_ms`` times a module's forward)."""

    def __init__(self, program: CompiledProgram, call: Callable[[int], tuple[tuple, dict]], batch: int) -> None:
        super().__init__()
        self.program = program
        self.args, self.kwargs = call(batch)

    def forward(self, _: torch.Tensor) -> torch.Tensor:
        output = self.program(*self.args, **self.kwargs)
        return output if isinstance(output, torch.Tensor) else output[0]


def _first_calls(program: CompiledProgram, call: Callable[[int], tuple[tuple, dict]]) -> list[dict]:
    rows = []
    for batch in BATCHES:
        graphs = counters["stats"]["unique_graphs"]
        args, kwargs = call(batch)
        start = time.perf_counter()
        with torch.no_grad():
            program(*args, **kwargs)
        rows.append(
            {
                "batch": batch,
                "first_call_s": round(time.perf_counter() - start, 2),
                "compiled": counters["stats"]["unique_graphs"] > graphs,
            }
        )
    return rows


def measure(runs: int) -> list[dict]:
    torch.set_num_threads(1)  # compiled and timed on one thread
    results = []
    for name, (build, call) in _models().items():
        programs = {"symbolic batch": build(), "per batch size": build()}
        programs["per batch size"].symbolic_batch = False
        first_calls = {label: _first_calls(program, call) for label, program in programs.items()}
        row = {
            "model": name,
            "symbolic_batch_kept": programs["symbolic batch"].symbolic_batch,
            "first_calls": first_calls,
            "compiles": {label: sum(entry["compiled"] for entry in rows) for label, rows in first_calls.items()},
            "compile_s": {label: round(sum(entry["first_call_s"] for entry in rows), 1) for label, rows in first_calls.items()},
            "latency_ms": {},
            "max_difference": {},
        }
        for batch in TIMED_BATCHES:
            called = {label: _Called(program, call, batch) for label, program in programs.items()}
            with torch.no_grad():
                outputs = [module(None) for module in called.values()]
            row["max_difference"][batch] = (outputs[0] - outputs[1]).abs().max().item()
            timings = latency_ms(called, torch.zeros(1), runs, warmup=3)
            row["latency_ms"][batch] = {label: round(value, 3) for label, value in timings.items()}
        print(row, flush=True)
        results.append(row)
    return results


def markdown(results: dict) -> str:
    lines = [
        f"Batch sizes ({results['machine']}, torch {results['torch']}, torchao {results['torchao']}): each program "
        f"called at batch sizes {', '.join(map(str, BATCHES))} in that order; latency at batch "
        f"{' and '.join(map(str, TIMED_BATCHES))}: one thread, median ms, the two programs in turns.",
        "",
        "| model | compiles, symbolic batch | compiles, per batch size | compile s, symbolic | compile s, per size "
        + "".join(f"| ms at {batch}, symbolic | ms at {batch}, per size " for batch in TIMED_BATCHES)
        + "| largest output difference |",
        "|---|---|---|---|---|" + "---|---|" * len(TIMED_BATCHES) + "---|",
    ]
    for row in results["models"]:
        latency = "".join(
            f"| {row['latency_ms'][batch]['symbolic batch']} | {row['latency_ms'][batch]['per batch size']} "
            for batch in TIMED_BATCHES
        )
        symbolic = row["compiles"]["symbolic batch"]
        kept = "" if row["symbolic_batch_kept"] else " (per size: grayscale)"
        difference = max(row["max_difference"].values())
        lines.append(
            f"| {row['model']} | {symbolic}{kept} | {row['compiles']['per batch size']} | {row['compile_s']['symbolic batch']} "
            f"| {row['compile_s']['per batch size']} {latency}| {difference:.2g} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timed forwards per latency figure")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    results = {
        "machine": MACHINE,
        "torch": torch.__version__,
        "torchao": importlib.metadata.version("torchao"),
        "models": measure(args.runs),
    }
    (args.output / "batch_sizes.json").write_text(json.dumps(results, indent=2))
    (args.output / "batch_sizes.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
