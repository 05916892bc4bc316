"""Compression for PyTorch Lightning: quantization-aware training as a callback, measured by one report."""

from lightning_compress.quantization import QuantizationAwareTraining

__all__ = ["QuantizationAwareTraining"]
__version__ = "0.1.0"
