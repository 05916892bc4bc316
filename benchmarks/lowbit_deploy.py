"""Low-bit deployment at real widths: where each ``LowBitLinearConfig`` scheme runs fast, and where it does not.

    pip install 'lightning-compress[executorch]'
    python benchmarks/lowbit_deploy.py       # writes results/lowbit_deploy.json and lowbit_deploy.md

A transformer MLP at a language model's width (``WIDTH`` -> ``4 * WIDTH`` -> ``WIDTH``, GELU) in a LightningModule
is quantized by ``PostTrainingQuantization(config=LowBitLinearConfig(scheme))`` in a ``Trainer(max_epochs=0)``, as a
user quantizes a trained model, and exported with the callback's own ``export_format``. Timed, batch 1, one thread,
models in turns: a single token (what generating one costs) and ``CONTEXT`` tokens (a prompt). Rows: fp32 in torch;
each scheme's torch model (``int4_weight_only`` in torch's CPU int4 kernel, the others dequantizing at each call);
``8da4w`` and ``int8_dynamic`` in ExecuTorch (XNNPACK); fp32 in ExecuTorch; torch.ao's dynamic int8 Linear
(``DynamicQuantization``). Speed does not depend on the weights' values: they are random, nothing is trained.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import tempfile
from pathlib import Path

import lightning as L
import torch
from common import quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_compress import DynamicQuantization, PostTrainingQuantization
from lightning_compress.export import write_exports
from lightning_compress.lowbit_quantization import LowBitLinearConfig
from lightning_compress.network_call import NetworkCall
from lightning_compress.report import latency_ms
from lightning_compress.runtimes import ExecuTorchModel

RESULTS = Path(__file__).parent / "results"
WIDTH, CONTEXT = 2048, 64
EXECUTORCH_SCHEMES = ("8da4w", "int8_dynamic")


class MLP(L.LightningModule):
    """One transformer MLP; ``training_step`` regresses it onto its input (nothing trains: zero epochs)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp(hidden)

    def training_step(self, batch, batch_idx):
        (hidden,) = batch
        return nn.functional.mse_loss(self(hidden), hidden)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _quantized(module: MLP, callback: L.Callback, data: DataLoader) -> L.Callback:
    """``callback`` after a zero-epoch fit of ``module``: it quantizes (and exports) at fit end."""
    quiet_trainer(0, [callback]).fit(module, train_dataloaders=data)
    return callback


def run(width: int, runs: int, folder: Path) -> dict:
    torch.manual_seed(0)
    module = MLP(width).eval()
    data = DataLoader(TensorDataset(torch.randn(8, CONTEXT, width)), batch_size=4)
    models: dict[str, nn.Module] = {"fp32 (torch)": module}
    for scheme in ("8da4w", "int4_weight_only", "int8_dynamic"):
        formats = ["executorch"] if scheme in EXECUTORCH_SCHEMES else "none"
        ptq = PostTrainingQuantization(
            config=LowBitLinearConfig(scheme=scheme),
            calibration_batches=1,
            export_format=formats,
            export_dir=str(folder / scheme),
        )
        _quantized(module, ptq, data)
        models[f"{scheme} (torch)"] = ptq.quantized_model
        if "executorch" in ptq.export_paths:
            models[f"{scheme} (ExecuTorch)"] = ExecuTorchModel(ptq.export_paths["executorch"], (0, 0))
    call = NetworkCall.of(module, "", (next(iter(data))[0],), {})
    float_export = write_exports(module, call, folder, "fp32", ["executorch"])
    models["fp32 (ExecuTorch)"] = ExecuTorchModel(float_export["executorch"], (0, 0))
    torch_ao_dynamic = DynamicQuantization(backend="x86", export_format="none")
    models["torch.ao dynamic int8 (torch)"] = _quantized(module, torch_ao_dynamic, data).quantized_model
    timings = {}
    for tokens in (1, CONTEXT):
        measured = latency_ms(models, torch.randn(1, tokens, width), runs=runs, warmup=5)
        timings[tokens] = {name: round(value, 3) for name, value in measured.items()}
        print(width, tokens, timings[tokens], flush=True)
    return {"width": width, "latency_ms": timings}


def markdown(results: dict) -> str:
    lines = [
        f"Low-bit deployment (torch {results['torch']}, torchao {results['torchao']}, ExecuTorch {results['executorch']}; "
        f"CPU {results['cpu']}): one MLP {results['width']} -> {4 * results['width']} -> {results['width']}, batch 1, one "
        "thread, models timed in turns; speedup over fp32 in torch.",
        "",
        f"| model | 1 token ms | speedup | {CONTEXT} tokens ms | speedup |",
        "|---|---|---|---|---|",
    ]
    single, context = results["latency_ms"]["1"], results["latency_ms"][str(CONTEXT)]
    for name in single:
        lines.append(
            f"| {name} | {single[name]:.3f} | {single['fp32 (torch)'] / single[name]:.2f}x | {context[name]:.3f} | "
            f"{context['fp32 (torch)'] / context[name]:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=WIDTH)
    parser.add_argument("--runs", type=int, default=30, help="timed forwards per latency figure")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as temporary:
        measured = run(args.width, args.runs, Path(temporary))
    results = {
        **{name: importlib.metadata.version(name) for name in ("torch", "torchao", "executorch")},
        "cpu": torch.backends.cpu.get_cpu_capability(),
        **json.loads(json.dumps(measured)),  # the token counts as strings, as the file holds them
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "lowbit_deploy.json").write_text(json.dumps(results, indent=2))
    (args.output / "lowbit_deploy.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
