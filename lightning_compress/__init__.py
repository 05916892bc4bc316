"""Compression for PyTorch Lightning: QAT and pruning as callbacks, distillation as a module, measured by one report."""

from lightning_compress.distillation import DistillationModule
from lightning_compress.post_training import DynamicQuantization, PostTrainingQuantization
from lightning_compress.pruning import MagnitudePruning
from lightning_compress.quantization import QuantizationAwareTraining

__all__ = [
    "DistillationModule",
    "DynamicQuantization",
    "MagnitudePruning",
    "PostTrainingQuantization",
    "QuantizationAwareTraining",
]
__version__ = "0.1.0"
