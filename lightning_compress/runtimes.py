"""Exported models run by the runtimes they were exported for, as modules the report measures like the rest.

A user ships the ``.onnx`` or the OpenVINO IR, not the torch model; the report's rows for them (``int8
onnxruntime``, ``int8 openvino``) are measured through those runtimes: accuracy on the same test split,
the size of the files, and batch-1 latency on one thread, taking turns with the torch models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_compress import compat
from lightning_compress.network_call import call_tensors


class RuntimeModel(nn.Module):
    """An exported model behind ``forward``: called as the torch network was (the same arguments, see
    ``network_call``), it feeds the call's tensors to the file's inputs in order and returns its one output as a
    tensor, or its outputs as a dict by name (``logits``...).

    ``parameter_counts`` (total, non-zero) are those of the torch model it was exported from, which the
    report cannot count inside a runtime; ``files`` are what a user ships.
    """

    def __init__(self, files: list[Path], parameter_counts: tuple[int, int]) -> None:
        super().__init__()
        self.files = [Path(file) for file in files]
        self.parameter_counts = parameter_counts
        self.output_names: list[str] = []

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | dict[str, torch.Tensor]:
        tensors = call_tensors(args, kwargs)
        outputs = [
            torch.from_numpy(np.asarray(output)) for output in self.run([tensor.detach().cpu().numpy() for tensor in tensors])
        ]
        return outputs[0] if len(outputs) == 1 else dict(zip(self.output_names, outputs, strict=True))

    def run(self, inputs: list[np.ndarray]) -> list[Any]:
        raise NotImplementedError


class OnnxRuntimeModel(RuntimeModel):
    """An ``.onnx`` file in ONNX Runtime's CPU provider, one intra-op thread (as the report times torch)."""

    def __init__(self, path: Path, parameter_counts: tuple[int, int]) -> None:
        import onnxruntime

        super().__init__([path], parameter_counts)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # a file that fails to run raises, and the export check says why in one line
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]
        self.output_names = [node.name for node in self.session.get_outputs()]

    def run(self, inputs: list[np.ndarray]) -> list[Any]:
        return self.session.run(None, dict(zip(self.input_names, inputs, strict=True)))


class OpenVinoModel(RuntimeModel):
    """An OpenVINO IR (``.xml`` and its ``.bin``) compiled for the CPU, one inference thread, float layers in
    fp32.

    On a CPU with bf16 instructions the plugin runs float layers in bf16 by default; there (an AMD EPYC with
    AVX-512 BF16, OpenVINO 2026.4) it found no implementation for the int8 convolutions of a QAT export and
    refused to compile it. fp32 also keeps the float layers computing what the model they came from computes,
    on every CPU kind; the int8 layers stay int8 either way.
    """

    def __init__(self, path: Path, parameter_counts: tuple[int, int]) -> None:
        import openvino

        super().__init__([path, Path(path).with_suffix(".bin")], parameter_counts)
        settings = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = openvino.Core().compile_model(str(path), "CPU", settings)
        self.output_names = [port.get_any_name() for port in self.compiled.outputs]

    def run(self, inputs: list[np.ndarray]) -> list[Any]:
        results = self.compiled(inputs)
        return [results[port] for port in self.compiled.outputs]

    def int8_layers(self) -> list[str]:
        """Convolutions and matrix products the compiled model runs in 8-bit integers (read from its
        runtime model: what the CPU plugin actually chose, not what the file asks for)."""
        chosen = []
        for operation in self.compiled.get_runtime_model().get_ops():
            info = operation.get_rt_info()
            if info["layerType"].astype(str) in ("Convolution", "FullyConnected", "MatMul") and info["runtimePrecision"].astype(
                str
            ) in ("u8", "i8"):
                chosen.append(operation.get_friendly_name())
        return chosen


class ExecuTorchModel(RuntimeModel):
    """A ``.pte`` program run by ExecuTorch's runtime (``executorch.runtime``), its XNNPACK kernels on one thread
    (a process-wide setting, as the report times every model). Its outputs carry no names: ``output_0``..."""

    def __init__(self, path: Path, parameter_counts: tuple[int, int]) -> None:
        from executorch.runtime import Runtime

        super().__init__([path], parameter_counts)
        compat.executorch_threads(1)
        self.method = Runtime.get().load_program(str(path)).load_method("forward")
        self.output_names = [f"output_{index}" for index in range(self.method.metadata.num_outputs())]

    def run(self, inputs: list[np.ndarray]) -> list[Any]:
        return [output.numpy() for output in self.method.execute([torch.from_numpy(array) for array in inputs])]


RUNTIMES = {
    "onnx": ("onnxruntime", OnnxRuntimeModel),
    "openvino": ("openvino", OpenVinoModel),
    "executorch": ("executorch", ExecuTorchModel),
}
"""Export format -> (the report's name for its runtime, the module that runs it)."""


def runtime_models(name: str, export_paths: dict[str, Path], parameter_counts: tuple[int, int]) -> dict[str, RuntimeModel]:
    """The report's rows for the runtime exports among ``export_paths``: ``"<name> onnxruntime"`` and so on."""
    models = {}
    for export_format, path in export_paths.items():
        if export_format in RUNTIMES:
            runtime, runner = RUNTIMES[export_format]
            models[f"{name} {runtime}"] = runner(path, parameter_counts)
    return models
