"""fastres: fused GPU kernels for ResNet training, as drop-in PyTorch modules."""
from fastres.backend import get_backend, set_backend, use_backend, backend_status
from fastres import ops  # noqa: F401  (registers the custom ops)
from fastres import functional
from fastres import nn
from fastres.nn import BatchNormAct2d, ConvBNAct2d, BasicBlock, Bottleneck
from fastres import models
from fastres.convert import convert, ConversionReport
from fastres.fold import fold_bn

__version__ = "0.1.0"

__all__ = ["functional", "set_backend", "get_backend", "use_backend", "backend_status",
           "nn", "BatchNormAct2d", "ConvBNAct2d", "BasicBlock", "Bottleneck", "models", "convert",
           "ConversionReport", "fold_bn"]
