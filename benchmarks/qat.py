"""QAT benchmark: the FX and pt2e backends side by side, int8 against fp32 latency, size and accuracy.

    python benchmarks/qat.py            # writes benchmarks/results/qat.json and qat.md

All ratios are measured in this one run on this machine (batch 1, one thread, same inputs, models timed in
turns): shared machines are noisy, so compare ratios, not absolute milliseconds across runs.

1. Latency and size of the default CNN, resnet18 and mobilenet_v2 at 64x64 and 224x224 (ImageNet stems;
   random weights, since latency does not depend on their values): fp32 eager, fp32 under ``torch.compile``,
   int8 from this package's FX backend (eager) and pt2e backend (compiled by Inductor), each prepared for QAT
   and observed on digits images, beside the hand-written torch.ao FX flow and the hand-written torchao pt2e
   + Inductor flow; with the compile time of each compiled model.
2. Accuracy on digits, k-fold (every image a test image once per seed, ``benchmarks/kfold.py``), in three
   regimes: the default CNN, a capacity-starved CNN and mobilenet_v2: fp32, post-training int8 of the same
   weights, and QAT fine-tuning of them with observer ranges and with learned ranges (LSQ), at 8 bits, and at
   4 and 3 bits on the default and the starved CNN (4 on mobilenet_v2, ``REGIME_BITS``), on the FX engine; PTQ
   and 8-bit QAT (observers and LSQ) on the torch.export engine too, the default, whose grids are 8-bit only.
   ``--regimes`` picks the regimes measured; the others keep their rows from the last run (``--skip-accuracy``:
   all of them; ``--engines``: one engine's arms, see ``_with_earlier_engines``).
3. Training step time with fake-quant relative to fp32.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import json
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from common import MACHINE, fit, with_earlier_rows
from kfold import fold_accuracies, kfold_accuracy, paired_difference, predicted_classes
from torch.fx.experimental.optimization import fuse as fold_batch_norm

from lightning_compress import PostTrainingQuantization, QuantizationAwareTraining, compat
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier, SmallCNN, torchvision_classifier
from lightning_compress.quantization_backend import backend_for, quantization_config
from lightning_compress.report import latency_ms, serialized_size

RESULTS = Path(__file__).parent / "results"
BACKENDS = ("x86", "x86_inductor")
ENGINES = {"x86": "", "x86_inductor": "_pt2e"}  # backend -> the suffix of its accuracy arms


def _digits_images(size: int, count: int) -> torch.Tensor:
    datamodule = DigitsDataModule(image_size=size, channels=3)
    datamodule.setup()
    return datamodule.train_set.tensors[0][:count]


def _int8(model: torch.nn.Module, calibration: torch.Tensor, backend_name: str) -> torch.nn.Module:
    """int8 through the mechanism the QAT callback uses: prepare for QAT, observe with fake-quant off, convert."""
    backend = backend_for(quantization_config(backend_name))
    backend.activate()
    prepared = backend.prepare_qat(copy.deepcopy(model).train(), (calibration[:8],), {}, [], []).eval()
    backend.set_fake_quant(prepared, enabled=False)
    with torch.no_grad():
        for batch in calibration.split(8):
            prepared(batch)
    return backend.convert(prepared)


def hand_written_fx(model: torch.nn.Module, calibration: torch.Tensor) -> torch.nn.Module:
    """The hand-written torch.ao FX flow (prepare_fx with the x86 defaults, calibrate, convert_fx)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (calibration[:1],))
    with torch.no_grad():
        for batch in calibration.split(8):
            prepared(batch)
    return convert_fx(prepared)


def _hand_written_pt2e(model: torch.nn.Module, calibration: torch.Tensor) -> torch.nn.Module:
    """torchao's documented pt2e flow: strict export, X86InductorQuantizer defaults, calibrate, convert, and
    ``torch.compile`` with Inductor's freezing on."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86_inductor
    from torchao.quantization.pt2e import allow_exported_model_train_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(copy.deepcopy(model).eval(), (calibration[:1],), strict=True).module()
    quantizer = x86_inductor.X86InductorQuantizer().set_global(x86_inductor.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for image in calibration.split(1):  # exported for batch 1, as it is timed
            prepared(image)
    converted = allow_exported_model_train_eval(convert_pt2e(prepared))  # the report calls .eval() on what it times
    return _Frozen(torch.compile(converted))


class _Frozen(torch.nn.Module):
    """Runs a ``torch.compile``d module with Inductor's freezing on (compiled on its first call, in warmup)."""

    def __init__(self, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), compat.inductor_freezing():
            return self.compiled(images)


def _compile_seconds(model: torch.nn.Module, example: torch.Tensor) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        model(example)
    return time.perf_counter() - start


def latency_and_size(runs: int) -> list[dict]:
    """Latency and size rows, compiled and timed on one thread; the thread count is put back after, for the
    accuracy fits that follow (they trained on one thread after it before)."""
    threads = torch.get_num_threads()
    try:
        return _latency_and_size(runs)
    finally:
        torch.set_num_threads(threads)


def _latency_and_size(runs: int) -> list[dict]:
    rows = []
    builders = {
        "cnn": lambda: SmallCNN(num_classes=10, in_channels=3),
        "resnet18": lambda: torchvision_classifier("resnet18", 10, 3, small_input=False),
        "mobilenet_v2": lambda: torchvision_classifier("mobilenet_v2", 10, 3, small_input=False),
    }
    for size in (64, 224):
        calibration = _digits_images(size, 32)
        example = calibration[:1]
        for name, build in builders.items():
            torch.manual_seed(0)
            fp32 = build().eval()
            torch.set_num_threads(1)  # compile on the thread count the timing uses
            models = {
                "fp32": fp32,
                "fp32_bn_folded": fold_batch_norm(copy.deepcopy(fp32)),
                "fp32_compiled": _Frozen(torch.compile(copy.deepcopy(fp32))),
                "fx_int8": _int8(fp32, calibration, "x86"),
                "hand_written_fx_int8": hand_written_fx(fp32, calibration),
                "pt2e_int8": _int8(fp32, calibration, "x86_inductor"),
                "hand_written_pt2e_int8": _hand_written_pt2e(fp32, calibration),
            }
            compile_s = {
                label: round(_compile_seconds(models[label], example), 1)
                for label in ("fp32_compiled", "pt2e_int8", "hand_written_pt2e_int8")
            }
            timings = latency_ms(models, example, runs, warmup=10)
            row = {
                "model": name,
                "input": f"{size}x{size}",
                **{f"{label}_ms": round(value, 3) for label, value in timings.items()},
                **{f"{label}_compile_s": value for label, value in compile_s.items()},
                "fx_speedup": round(timings["fp32"] / timings["fx_int8"], 2),
                "pt2e_speedup": round(timings["fp32"] / timings["pt2e_int8"], 2),
                "hand_written_pt2e_speedup": round(timings["fp32"] / timings["hand_written_pt2e_int8"], 2),
                "pt2e_vs_fx": round(timings["fx_int8"] / timings["pt2e_int8"], 2),
                "fx_size_ratio": round(serialized_size(models["fx_int8"]) / serialized_size(fp32), 3),
                "pt2e_size_ratio": round(serialized_size(models["pt2e_int8"]) / serialized_size(fp32), 3),
            }
            print(row, flush=True)
            rows.append(row)
    return rows


# Where methods differ: the default CNN is near 100% on digits; a capacity-starved CNN and mobilenet_v2
# (depthwise convolutions are known to be quantization-sensitive) leave room, and so do 4- and 3-bit grids.
REGIMES = {
    "default CNN": {"architecture": "cnn"},
    "starved CNN (widths 4, 8, 16)": {"architecture": "cnn", "architecture_options": {"widths": [4, 8, 16]}},
    "mobilenet_v2": {"architecture": "mobilenet_v2"},
}
# Bit widths of each regime's QAT arms, observers against LSQ; mobilenet_v2 takes no 3-bit arm: at 4 bits it
# already loses 12 points (more CPU for a row that would say only "broken").
REGIME_BITS = {"default CNN": (8, 4, 3), "starved CNN (widths 4, 8, 16)": (8, 4, 3), "mobilenet_v2": (8, 4)}


def _qat(
    regime: dict, fp32_path: Path, epochs: int, bits: int, learnable_ranges: bool, backend: str
) -> tuple[ImageClassifier, QuantizationAwareTraining]:
    """The model and callback of a QAT fine-tune from the fp32 weights on ``backend``: observers freeze for the last
    epoch, or, with LSQ, after the first, so that the ranges learn for the rest of the run."""
    model = ImageClassifier(**regime, lr=3e-4, checkpoint=str(fp32_path))
    qat = QuantizationAwareTraining(
        start_epoch=0,
        backend=backend,
        freeze_bn_epoch=epochs - 2,
        freeze_observer_epoch=1 if learnable_ranges else epochs - 1,
        weight_bits=bits,
        activation_bits=bits,
        learnable_ranges=learnable_ranges,
        calibration_batches=8,
        export_format="none",
    )
    return model, qat


def regime_arms(regime_name: str, fp32_epochs: int, qat_epochs: int, scratch: Path, engines: tuple[str, ...] = BACKENDS):
    """``train_and_predict`` for ``kfold_accuracy``: fp32, PTQ int8 and QAT (observers and LSQ; 8 bits, and 4 and 3
    bits where the regime asks) of one regime, every arm fine-tuned from the same fp32 weights of the fold; on the
    FX engine, and at 8 bits (its only grid) on the torch.export engine (arms ending in ``_pt2e``); ``engines``
    picks the engines whose arms run."""
    regime = REGIMES[regime_name]
    fit_seconds: dict[str, list[float]] = {}

    def train_and_predict(datamodule: DigitsDataModule, seed: int) -> dict[str, torch.Tensor]:
        images = datamodule.test_set.tensors[0]
        L.seed_everything(seed)
        model = ImageClassifier(**regime)
        fit(model, fp32_epochs, [], seed, datamodule)
        fp32_path = scratch / "fp32.pt"
        torch.save(model.net.state_dict(), fp32_path)
        predictions = {"fp32": predicted_classes(model, images)}
        for backend in engines:
            suffix = ENGINES[backend]
            ptq = PostTrainingQuantization(calibration_batches=8, backend=backend, export_format="none")
            fit(copy.deepcopy(model), 0, [ptq], seed, datamodule)
            predictions[f"ptq_int8{suffix}"] = predicted_classes(ptq.quantized_model, images)
        arms = [(bits, "x86") for bits in REGIME_BITS[regime_name]] + [(8, "x86_inductor")]
        arms = [(bits, backend) for bits, backend in arms if backend in engines]
        for bits, backend in arms:
            for learnable_ranges in (False, True):
                arm = f"{'lsq' if learnable_ranges else 'qat'}_{bits}bit{ENGINES[backend]}"
                qat_model, qat = _qat(regime, fp32_path, qat_epochs, bits, learnable_ranges, backend)
                fit_seconds.setdefault(arm, []).append(fit(qat_model, qat_epochs, [qat], seed, datamodule))
                # no int8 kernel runs a narrower grid: the 4- and 3-bit arms are judged fake-quantized
                predictions[arm] = predicted_classes(qat.quantized_model if bits == 8 else qat_model, images)
        print(regime_name, seed, datamodule.fold, fold_accuracies(predictions, datamodule.test_set.tensors[1]), flush=True)
        return predictions

    return train_and_predict, fit_seconds


def accuracy_kfold(
    regimes: list[str],
    fp32_epochs: int,
    qat_epochs: int,
    folds: int,
    seeds: list[int],
    scratch: Path,
    engines: tuple[str, ...] = BACKENDS,
    earlier: Path | None = None,
) -> list[dict]:
    rows = []
    for regime_name in regimes:
        train_and_predict, fit_seconds = regime_arms(regime_name, fp32_epochs, qat_epochs, scratch, engines)
        result = kfold_accuracy(train_and_predict, folds=folds, seeds=seeds)
        result["regime"] = regime_name
        result["machine"] = MACHINE
        result["qat_fit_s"] = {arm: round(statistics.mean(values), 1) for arm, values in fit_seconds.items()}
        if set(engines) != set(BACKENDS):
            result = _with_earlier_engines(result, earlier)
        rows.append(result)
    return rows


def _with_earlier_engines(result: dict, earlier: Path | None) -> dict:
    """``result`` (one regime, some engines' arms) with the other engines' arms of the last run's row for the
    regime: valid pairs only where both runs trained the same fp32 models, which the fp32 arm's accuracy on every
    seed, equal to the last digit, vouches for (the folds and seeds must match too); otherwise it stops."""
    rows = json.loads(earlier.read_text())["accuracy"] if earlier is not None and earlier.exists() else []
    before = next((row for row in rows if row["regime"] == result["regime"]), None)
    same = ("folds", "seeds", "images")
    if before is None or any(before[key] != result[key] for key in same):
        raise SystemExit(f"--engines: no earlier row of {result['regime']!r} with these folds and seeds to pair with.")
    if before["arms"]["fp32"]["per_seed"] != result["arms"]["fp32"]["per_seed"]:
        raise SystemExit(
            f"--engines: the fp32 models of {result['regime']!r} differ from the earlier run's "
            f"({before['arms']['fp32']['per_seed']} against {result['arms']['fp32']['per_seed']}): run every engine."
        )
    merged = dict(before)
    arms = before["arms"] | result["arms"]
    order = ["fp32", "ptq_int8", "ptq_int8_pt2e", *(f"{k}_{b}bit" for b in (8, 4, 3) for k in ("qat", "lsq"))]
    merged["arms"] = {arm: arms[arm] for arm in [*order, *arms] if arm in arms}  # as a run of both engines orders them
    merged["qat_fit_s"] = before["qat_fit_s"] | result["qat_fit_s"]
    merged["machine"] = result["machine"]
    return merged


def training_step_time(steps: int) -> dict:
    digits = DigitsDataModule(batch_size=64)
    digits.setup()
    images, labels = digits.train_set.tensors[0][:64], digits.train_set.tensors[1][:64]

    def step_ms(net: torch.nn.Module) -> float:
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        timings = []
        for index in range(steps + 5):
            start = time.perf_counter()
            loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if index >= 5:
                timings.append((time.perf_counter() - start) * 1000)
        return statistics.median(timings)

    torch.manual_seed(0)
    fp32 = SmallCNN().train()
    example = images[:8]
    fake_quant = {
        backend: backend_for(quantization_config(backend)).prepare_qat(copy.deepcopy(fp32), (example,), {}, [], []).train()
        for backend in BACKENDS
    }
    fp32_ms = step_ms(fp32)
    result = {"batch": 64, "threads": torch.get_num_threads(), "fp32_step_ms": round(fp32_ms, 3)}
    for backend, module in fake_quant.items():
        step = step_ms(module)
        result[f"{backend}_fake_quant_step_ms"] = round(step, 3)
        result[f"{backend}_ratio"] = round(step / fp32_ms, 2)
    print(result, flush=True)
    return result


ARM_NAMES = (
    {"fp32": "fp32", "ptq_int8": "PTQ int8", "ptq_int8_pt2e": "PTQ int8, pt2e"}
    | {
        f"{kind}_{bits}bit": f"QAT {bits}-bit"
        + (" LSQ" if kind == "lsq" else " observers")
        + ("" if bits == 8 else " (fake-quant)")
        for kind in ("qat", "lsq")
        for bits in (8, 4, 3)
    }
    | {f"{kind}_8bit_pt2e": "QAT 8-bit" + (" LSQ" if kind == "lsq" else " observers") + ", pt2e" for kind in ("qat", "lsq")}
)


def kfold_table(regimes: list[dict]) -> list[str]:
    """One row per regime and arm: accuracy over all images (mean of the seeds, and their spread), and the
    paired differences, seed by seed, against fp32, PTQ and (for LSQ) observer-based QAT at the same bits."""
    first = regimes[0]
    lines = [
        f"Accuracy on digits, {first['folds']}-fold: every one of the {first['images']} images is predicted once per seed by a "
        f"model that never saw it; seeds {first['seeds']} (each reshuffles the folds); differences in points, paired by "
        "seed, mean ± standard error over seeds. QAT fine-tunes the fold's fp32 weights with the FX engine (`x86`) and, "
        "rows marked pt2e, with the torch.export engine (`x86_inductor`, the default; 8 bits only), whose PTQ is the "
        "baseline of its rows; pt2e vs FX pairs each pt2e row with the same method on FX.",
        "",
        "| regime | method | accuracy | seed std (pts) | vs fp32 (pts) | vs PTQ int8 (pts) | LSQ vs observers (pts) "
        "| pt2e vs FX (pts) | fit s | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in regimes:
        for arm, summary in result["arms"].items():
            cells = [result["regime"], ARM_NAMES[arm], f"{100 * summary['mean']:.2f}%", f"{100 * summary['std']:.2f}"]
            engine = "_pt2e" if arm.endswith("_pt2e") else ""
            for baseline in ("fp32", f"ptq_int8{engine}"):
                gain = paired_difference(result, arm, baseline)
                compared = arm not in (baseline, "fp32")  # fp32 is the reference of both columns
                cells.append(f"{gain['mean']:+.2f} ± {gain['standard_error']:.2f}" if compared else "-")
            observers = arm.replace("lsq_", "qat_")
            if arm.startswith("lsq_"):
                gain = paired_difference(result, arm, observers)
                cells.append(f"{gain['mean']:+.2f} ± {gain['standard_error']:.2f}")
            else:
                cells.append("-")
            if engine and arm.removesuffix(engine) in result["arms"]:
                gain = paired_difference(result, arm, arm.removesuffix(engine))
                cells.append(f"{gain['mean']:+.2f} ± {gain['standard_error']:.2f}")
            else:
                cells.append("-")
            cells.append(str(result["qat_fit_s"].get(arm, "-")))
            cells.append(result["machine"].split(", ")[-1])
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict) -> str:
    earlier = "; from an earlier run of this benchmark: this run re-measured accuracy only"
    lines = [
        f"QAT benchmark ({results['machine']}, torch {results['torch']}, torchao {results['torchao']}); "
        f"latency ({results.get('latency_machine', results['machine'])}"
        + (earlier if results.get("latency_from_earlier_run") else "")
        + "): batch 1, 1 thread, median ms, models interleaved; speedups against fp32 eager.",
        "",
        "| model | input | fp32 | fp32 BN-folded | fp32 compiled | FX int8 | hand-written FX | pt2e int8 | hand-written pt2e "
        "| FX speedup | pt2e speedup | hand-written pt2e speedup | pt2e vs FX | pt2e compile s | size int8/fp32 FX, pt2e |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["latency"]:
        lines.append(
            f"| {row['model']} | {row['input']} | {row['fp32_ms']} | {row['fp32_bn_folded_ms']} | {row['fp32_compiled_ms']} "
            f"| {row['fx_int8_ms']} | {row['hand_written_fx_int8_ms']} | {row['pt2e_int8_ms']} "
            f"| {row['hand_written_pt2e_int8_ms']} "
            f"| {row['fx_speedup']}x | {row['pt2e_speedup']}x | {row['hand_written_pt2e_speedup']}x | {row['pt2e_vs_fx']}x "
            f"| {row['pt2e_int8_compile_s']} | {row['fx_size_ratio']}, {row['pt2e_size_ratio']} |"
        )
    lines += ["", *kfold_table(results["accuracy"])]
    step = results["training_step"]
    lines += [
        "",
        f"Training step (default CNN, batch {step['batch']}, {step['threads']} threads): fp32 {step['fp32_step_ms']} ms; "
        + "; ".join(f"{b} fake-quant {step[f'{b}_fake_quant_step_ms']} ms ({step[f'{b}_ratio']}x)" for b in BACKENDS)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def earlier_latency(path: Path) -> tuple[list[dict], str]:
    """The latency rows of an earlier run and the machine they were measured on, for a run that re-measures
    accuracy only (``--skip-latency``)."""
    if not path.exists():
        return [], MACHINE
    earlier = json.loads(path.read_text())
    return earlier["latency"], earlier.get("latency_machine", earlier["machine"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100, help="timed forwards per latency figure")
    parser.add_argument(
        "--skip-latency", action="store_true", help="keep the latency table of the last run's qat.json (marked as such)"
    )
    parser.add_argument(
        "--skip-accuracy", action="store_true", help="keep the accuracy rows of the last run's qat.json (no k-fold fits)"
    )
    parser.add_argument(
        "--regimes",
        nargs="+",
        default=list(REGIMES),
        choices=list(REGIMES),
        help="accuracy regimes to measure; the others keep their rows from the last run's qat.json",
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        default=list(BACKENDS),
        choices=list(BACKENDS),
        help="engines whose accuracy arms run; the other engine's arms of each regime are kept from the last run's "
        "qat.json where its fp32 models were the same",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fp32-epochs", type=int, default=10)
    parser.add_argument("--qat-epochs", type=int, default=6)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)
    scratch = args.output / "scratch"
    scratch.mkdir(exist_ok=True)
    if args.skip_latency:
        latency, latency_machine = earlier_latency(args.output / "qat.json")
    else:
        latency, latency_machine = latency_and_size(args.runs), MACHINE
    results = {
        "machine": MACHINE,
        "torch": torch.__version__,
        "torchao": importlib.metadata.version("torchao"),
        "latency": latency,
        "latency_machine": latency_machine,
        "latency_from_earlier_run": args.skip_latency,
        "accuracy": with_earlier_rows(
            []
            if args.skip_accuracy
            else accuracy_kfold(
                *(args.regimes, args.fp32_epochs, args.qat_epochs, args.folds, args.seeds, scratch),
                engines=tuple(args.engines),
                earlier=args.output / "qat.json",
            ),
            args.output / "qat.json",
            "accuracy",
            "regime",
            REGIMES,
        ),
        "training_step": training_step_time(steps=30),
    }
    (args.output / "qat.json").write_text(json.dumps(results, indent=2))
    (args.output / "qat.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
