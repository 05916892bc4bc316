"""Compression for PyTorch Lightning: QAT as a callback, distillation as a module, measured by one report."""

from lightning_compress.distillation import DistillationModule
from lightning_compress.quantization import QuantizationAwareTraining

__all__ = ["DistillationModule", "QuantizationAwareTraining"]
__version__ = "0.1.0"
