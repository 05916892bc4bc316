"""Deploying a whole Llama-family language model at a real width: what each way of shipping it costs in speed,
bytes and perplexity.

    pip install 'lightning-compress[executorch]'
    python benchmarks/llama_deploy.py       # writes results/llama_deploy.json and llama_deploy.md (about 10 minutes)

A transformers ``LlamaForCausalLM`` built from its config (``WIDTH`` wide, ``LAYERS`` layers, grouped-query
attention: ``HEADS`` query heads share ``KV_HEADS`` key-value heads; bytes as tokens) sits in a user's LightningModule
whose ``training_step`` calls ``self.model(input_ids=...)``. It is trained briefly (``STEPS`` steps) on the Python
standard library's sources, so that perplexity means something, then shipped each way a user can with this
package, each in a ``Trainer(max_epochs=0)`` as one quantizes a trained model:

- ``PostTrainingQuantization(config=LowBitLinearConfig(scheme))``: ``8da4w`` (int8 dynamic activations, int4 weights
  in groups) in torch and, through ``export_format="executorch"``, in ExecuTorch (XNNPACK); at groups of 32 (the
  default) and 128 (coarser scales: fewer to apply); ``int4_weight_only`` in torch's CPU int4 kernel;
- ``DynamicQuantization``: torch.ao's fbgemm dynamic int8 Linear (``backend="x86"``) and the torch.ao-free one
  (``backend="x86_inductor"``: oneDNN under Inductor);
- fp32 and bf16 in torch; fp32 through ExecuTorch.

Timed, batch 1, one thread, models in turns (``report.latency_ms``): a ``PREFILL``-token prompt and a 1-token
forward (what generating one token costs with no key-value cache: the sequence is the new token alone), the latter
twice: one forward per turn (each model starts from the caches the previous one left) and ``IN_A_ROW`` forwards per
turn, the first untimed (a model generating tokens one after another, its weights in the CPU's caches where they
fit: a 4-bit model's do, an fp32 one's do not).
Perplexity: ``exp`` of the mean cross-entropy per byte on held-out files, each model called as training called it
(the ExecuTorch programs by their runtime). Bytes: the file a user ships (``.pte``) or the saved state_dict.
The output head and the embeddings stay float in every scheme.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import math
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from common import quiet_trainer
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress import DynamicQuantization, PostTrainingQuantization
from lightning_compress.app.text import PythonSourceDataModule
from lightning_compress.export import write_exports
from lightning_compress.lowbit_quantization import LowBitLinearConfig
from lightning_compress.network_call import test_calls
from lightning_compress.report import compile_ms, evaluate, latency_ms, serialized_size
from lightning_compress.runtimes import ExecuTorchModel

RESULTS = Path(__file__).parent / "results"
WIDTH, LAYERS, HEADS, KV_HEADS, INTERMEDIATE = 1024, 2, 16, 4, 2816
PREFILL, BATCH, STEPS = 128, 4, 300
IN_A_ROW = 8  # tokens a model generates per turn in the "in a row" column
SKIP = ["model.lm_head"]  # the output head stays float, as the schemes' recipes leave it


class LlamaBytes(L.LightningModule):
    """A user's module around a transformers Llama over bytes: the step calls the inner model itself."""

    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=WIDTH,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=2 * PREFILL,
        )
        self.model = LlamaForCausalLM(config)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        tokens, targets = batch
        return F.cross_entropy(self.model(input_ids=tokens).logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=STEPS, pct_start=0.1)
        return [optimizer], [{"scheduler": schedule, "interval": "step"}]


def _shipped(module: LlamaBytes, callback: L.Callback, data: PythonSourceDataModule) -> L.Callback:
    """``callback`` after a zero-epoch fit of ``module``: it quantizes (and exports) at fit end."""
    quiet_trainer(0, [callback]).fit(module, datamodule=data)
    return callback


def _file_bytes(paths: dict[str, Path]) -> int:
    return sum(path.stat().st_size for path in paths.values())


def run(steps: int, runs: int, folder: Path) -> dict:
    L.seed_everything(0)
    data = PythonSourceDataModule(
        block_size=PREFILL, batch_size=BATCH, train_bytes=steps * BATCH * PREFILL, eval_bytes=64 * PREFILL
    )
    module = LlamaBytes()
    trainer = quiet_trainer(1, [], max_steps=steps)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_seconds = time.perf_counter() - start
    module.eval()
    calls = test_calls(trainer, module, data.test_dataloader())  # each test batch as training_step calls the network

    models: dict[str, nn.Module] = {"fp32 (torch)": module}
    sizes = {"fp32 (torch)": serialized_size(module)}
    bf16 = copy.deepcopy(module).to(torch.bfloat16)
    models["bf16 (torch)"], sizes["bf16 (torch)"] = bf16, serialized_size(bf16)
    for scheme, group_size, formats in (
        ("8da4w", 32, ["executorch"]),
        ("8da4w", 128, ["executorch"]),
        ("int4_weight_only", 32, "none"),
    ):
        name = f"{scheme} g{group_size}"
        ptq = PostTrainingQuantization(
            config=LowBitLinearConfig(scheme=scheme, group_size=group_size),
            calibration_batches=1,
            skip=SKIP,
            export_format=formats,
            export_dir=str(folder / name.replace(" ", "_")),
        )
        _shipped(copy.deepcopy(module), ptq, data)
        models[f"{name} (torch)"], sizes[f"{name} (torch)"] = ptq.quantized_model, serialized_size(ptq.quantized_model)
        if "executorch" in ptq.export_paths:
            models[f"{name} (ExecuTorch)"] = ExecuTorchModel(ptq.export_paths["executorch"], (0, 0))
            sizes[f"{name} (ExecuTorch)"] = _file_bytes({"pte": ptq.export_paths["executorch"]})
    for backend, label in (("x86", "torch.ao dynamic int8"), ("x86_inductor", "dynamic int8, Inductor")):
        dynamic = _shipped(copy.deepcopy(module), DynamicQuantization(backend=backend, export_format="none", skip=SKIP), data)
        models[f"{label} (torch)"] = dynamic.quantized_model
        sizes[f"{label} (torch)"] = serialized_size(dynamic.quantized_model)

    float_export = write_exports(module, calls[0], folder, "fp32", ["executorch"])
    models["fp32 (ExecuTorch)"] = ExecuTorchModel(float_export["executorch"], (0, 0))
    sizes["fp32 (ExecuTorch)"] = _file_bytes(float_export)

    perplexity = {name: evaluate(model, calls)[1] for name, model in models.items()}
    print({name: round(value, 4) for name, value in perplexity.items()}, flush=True)
    prompt = calls[0].sample(1)
    (tokens,) = prompt.tensors()
    token = prompt.with_tensors([tokens[:, :1]])
    timings = {}
    for label, call, in_a_row in (
        ("1 token", token, 1),
        (f"1 token, {IN_A_ROW} in a row", token, IN_A_ROW),
        (f"{PREFILL} tokens", prompt, 1),
    ):
        measured = latency_ms(models, call, runs=runs, warmup=3, calls_per_turn=in_a_row)
        timings[label] = {name: round(value, 3) for name, value in measured.items()}
        print(label, timings[label], flush=True)
    compile_seconds = {name: compile_ms(model) for name, model in models.items()}
    return {
        "model": {"width": WIDTH, "layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "intermediate": INTERMEDIATE},
        "training": {"steps": steps, "batch": BATCH, "block": PREFILL, "seconds": round(train_seconds, 1)},
        "perplexity": perplexity,
        "bytes": sizes,
        "latency_ms": timings,
        "compile_ms": {name: value for name, value in compile_seconds.items() if value is not None},
    }


def markdown(results: dict) -> str:
    shape = results["model"]
    lines = [
        f"Llama deployment (torch {results['torch']}, torchao {results['torchao']}, ExecuTorch {results['executorch']}, "
        f"transformers {results['transformers']}; CPU {results['cpu']}): `LlamaForCausalLM` {shape['width']} wide, "
        f"{shape['layers']} layers, {shape['heads']} query / {shape['kv_heads']} key-value heads, MLP "
        f"{shape['intermediate']}, bytes as tokens, trained {results['training']['steps']} steps; batch 1, one thread, "
        "models timed in turns; speedup over fp32 in torch; perplexity on held-out files.",
        "",
        f"| model | 1 token ms | speedup | 1 token, {IN_A_ROW} in a row ms | speedup | {PREFILL} tokens ms | speedup | MB | "
        "perplexity | vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    columns = [results["latency_ms"][label] for label in ("1 token", f"1 token, {IN_A_ROW} in a row", f"{PREFILL} tokens")]
    fp32_perplexity = results["perplexity"]["fp32 (torch)"]
    for name in columns[0]:
        perplexity = results["perplexity"][name]
        timed = " | ".join(f"{column[name]:.2f} | {column['fp32 (torch)'] / column[name]:.2f}x" for column in columns)
        lines.append(
            f"| {name} | {timed} | {results['bytes'][name] / 1e6:.1f} | {perplexity:.3f} | "
            f"{100 * (perplexity / fp32_perplexity - 1):+.2f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="training steps before shipping")
    parser.add_argument("--runs", type=int, default=20, help="timed forwards per latency figure")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        measured = run(args.steps, args.runs, Path(temporary))
    results = {
        **{name: importlib.metadata.version(name) for name in ("torch", "torchao", "executorch", "transformers")},
        "cpu": torch.backends.cpu.get_cpu_capability(),
        **measured,
    }
    assert all(math.isfinite(value) for value in results["perplexity"].values()), results["perplexity"]
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "llama_deploy.json").write_text(json.dumps(results, indent=2))
    (args.output / "llama_deploy.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
