"""Compression for PyTorch Lightning: QAT and pruning as callbacks, distillation as a module, measured by one report."""

from importlib.metadata import PackageNotFoundError, version

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
try:  # the installed distribution's version: one number, in pyproject.toml
    __version__ = version("lightning-compress")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
