"""The "cuda" backend: fastres's hand-written CUDA kernels (csrc/cuda/batch_norm_act.cu), registered by
the extension ``fastres._C`` as ``torch.ops.fastres.bn_*_cuda``.

The four functions below are the kernel-level backend contract of fastres/ops/batch_norm_act.py, with
the signatures and semantics of its ``TorchBackend``. Both layouts run natively: channels_last (NHWC)
and contiguous NCHW each have their own kernels (no layout conversion), and every output has x's
layout. The C++ side validates device, dtype, shape and layout and raises a clear error otherwise.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastres.backend import load_extension

load_extension(required=True)  # registers torch.ops.fastres.bn_*_cuda, or raises saying why not

_ops = torch.ops.fastres

name = "cuda"


def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel fp32 (mean, M2 = Σ(x − mean)²): Welford per thread, Chan merge, fixed order."""
    mean, m2 = _ops.bn_stats_cuda(x)
    return mean, m2


def apply(x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
          relu: bool) -> Tensor:
    """y = act((x − mean)·scale + shift [+ residual]) in x's dtype and layout."""
    return _ops.bn_apply_cuda(x, mean, scale, shift, residual, relu)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                    residual: Optional[Tensor], relu: bool) -> tuple[Tensor, Tensor]:
    """Per-channel fp32 (Σdy', Σdy'·(x − mean)), dy' = dy through the ReLU mask."""
    sum_dy, sum_dy_xc = _ops.bn_backward_reduce_cuda(dy, x, mean, scale, shift, residual, relu)
    return sum_dy, sum_dy_xc


def backward_dx(dy: Tensor, x: Tensor, mean: Tensor, scale: Tensor, shift: Tensor,
                residual: Optional[Tensor], relu: bool, a: Tensor, k: Tensor, c: Tensor,
                need_dres: bool) -> tuple[Tensor, Optional[Tensor]]:
    """(dx = a·dy' + k·(x − mean) + c, dresidual = dy' or None)."""
    dx, dres = _ops.bn_backward_dx_cuda(dy, x, mean, scale, shift, residual, relu, a, k, c,
                                        need_dres)
    return dx, (dres if need_dres else None)
