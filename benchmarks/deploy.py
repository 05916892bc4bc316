"""Deployment benchmark: our QAT models exported to ONNX Runtime and OpenVINO, against NNCF's int8 in OpenVINO.

    pip install nncf            # the yardstick only; not a dependency of the package
    python benchmarks/deploy.py  # writes benchmarks/results/deploy.json and deploy.md

The default CNN (digits at 8x8) and resnet18 (digits at 32x32) are QAT-trained on digits, then each is run:
torch fp32 eager; our torch.ao int8 (what the TorchScript export holds); our ONNX export in ONNX Runtime;
our OpenVINO export; the fp32 model converted to OpenVINO; and NNCF's post-training int8 of that OpenVINO model
(calibrated on 300 training images), the tool a user would otherwise pick for int8 on x86 CPUs. Accuracy is
over the digits test split at the training resolution; batch-1 single-thread latency at 64x64 and 224x224
(the exports are re-made at each size), the models timed in turns in one process.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from common import fit
from torch import nn

from lightning_compress import QuantizationAwareTraining
from lightning_compress.app.data import DigitsDataModule
from lightning_compress.app.models import ImageClassifier
from lightning_compress.export import INT8_TOLERANCE, write_exports
from lightning_compress.network_call import NetworkCall
from lightning_compress.report import count_parameters, latency_ms
from lightning_compress.runtimes import OnnxRuntimeModel, OpenVinoModel

RESULTS = Path(__file__).parent / "results"
SETUPS = {"cnn": ("cnn", 8, 12), "resnet18": ("resnet18", 32, 8)}  # name -> (architecture, image size, epochs)


def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def _openvino_fp32(model: nn.Module, example: torch.Tensor, folder: Path) -> Path:
    import openvino

    path = folder / "fp32.xml"
    openvino.save_model(
        openvino.convert_model(copy.deepcopy(model).eval(), example_input=(example,)), str(path), compress_to_fp16=False
    )
    return path


def _nncf_int8(fp32_path: Path, calibration: torch.Tensor, folder: Path) -> Path:
    import nncf
    import openvino

    model = openvino.Core().read_model(str(fp32_path))
    dataset = nncf.Dataset([image[None].numpy() for image in calibration])
    quantized = nncf.quantize(model, dataset, subset_size=len(calibration))
    path = folder / "nncf_int8.xml"
    openvino.save_model(quantized, str(path), compress_to_fp16=False)
    return path


def run(name: str, runs: int) -> dict:
    architecture, image_size, epochs = SETUPS[name]
    digits = DigitsDataModule(batch_size=64, image_size=image_size)
    qat = QuantizationAwareTraining(
        start_epoch=epochs // 3,
        freeze_bn_epoch=epochs - 2,
        freeze_observer_epoch=epochs - 1,
        backend="x86",  # the results were measured on the FX engine
        export_format="none",
    )
    model = ImageClassifier(architecture=architecture)
    fit(model, epochs, [qat], 0, digits)
    digits.setup()
    images, labels = digits.test_set.tensors
    calibration = digits.train_set.tensors[0][:300]
    counts = count_parameters(qat.quantized_model)
    float_model = qat.float_model(model).net.eval()
    fake_quant = qat.fake_quant_for_export(model).net.eval()
    int8 = qat.quantized_model.net.eval()
    result = {"model": name, "image_size": image_size, "epochs": epochs, "accuracy": {}, "latency_ms": {}}
    with tempfile.TemporaryDirectory() as temporary:
        for size in (image_size, 64, 224):
            folder = Path(temporary) / str(size)
            folder.mkdir()
            example = torch.randn(1, images.shape[1], size, size)
            call = NetworkCall.of(fake_quant, "", (example,), {})
            exports = write_exports(fake_quant, call, folder, "qat_int8", ["onnx", "openvino"], INT8_TOLERANCE)
            fp32_openvino = _openvino_fp32(float_model, example, folder)
            resized_calibration = F.interpolate(calibration, size=size, mode="bilinear", align_corners=False)
            models = {
                "torch fp32": float_model,
                "torch.ao int8 (ours)": int8,
                "ONNX Runtime int8 (ours)": OnnxRuntimeModel(exports["onnx"], counts),
                "OpenVINO int8 (ours)": OpenVinoModel(exports["openvino"], counts),
                "OpenVINO fp32": OpenVinoModel(fp32_openvino, counts),
                "NNCF int8 in OpenVINO": OpenVinoModel(_nncf_int8(fp32_openvino, resized_calibration, folder), counts),
            }
            if size == image_size:
                result["accuracy"] = {label: _accuracy(runner, images, labels) for label, runner in models.items()}
                result["openvino_int8_layers"] = len(models["OpenVINO int8 (ours)"].int8_layers())
                continue
            timings = latency_ms(models, example, runs=runs, warmup=5)
            result["latency_ms"][size] = {label: round(value, 3) for label, value in timings.items()}
            print(name, size, result["latency_ms"][size], flush=True)
    print(name, result["accuracy"], flush=True)
    return result


def markdown(results: dict) -> str:
    lines = [
        f"Deployment benchmark (torch {results['torch']}, CPU {results['cpu']}): QAT-trained on digits, one seed; "
        "accuracy at the training resolution, batch-1 single-thread latency (speedup over torch fp32 eager).",
        "",
        "| model | runtime | test acc | latency 64x64 ms | speedup | latency 224x224 ms | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["models"]:
        base = {size: row["latency_ms"][size]["torch fp32"] for size in row["latency_ms"]}
        for label, accuracy in row["accuracy"].items():
            cells = []
            for size in row["latency_ms"]:
                value = row["latency_ms"][size][label]
                cells += [f"{value:.2f}", f"{base[size] / value:.2f}x"]
            lines.append(f"| {row['model']} | {label} | {100 * accuracy:.2f}% | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--runs", type=int, default=30, help="timed forwards per latency figure")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = {
        "torch": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
        "models": [run(name, args.runs) for name in args.models],
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "deploy.json").write_text(json.dumps(results, indent=2))
    (args.output / "deploy.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
