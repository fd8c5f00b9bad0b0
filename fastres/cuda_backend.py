"""The "cuda" backend: fastres's hand-written CUDA kernels (csrc/cuda/batch_norm_act.cu), registered by
the extension ``fastres._C`` as ``torch.ops.fastres.bn_*_cuda``.

Two contracts of fastres/ops/batch_norm_act.py, with the signatures and semantics of its
``TorchBackend``: the four kernel-level functions (batch_stats, apply, backward_reduce, backward_dx;
SyncBN runs its all-gather between them) and the whole-op three (forward_train, forward_eval,
backward), each a single call into the extension. Both layouts run natively: channels_last (NHWC)
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
    """(dx = a·dy' + k·(x − mean) + c, dresidual = dy' or None); k = c = None in eval (the kernel
    treats an all-zero k as an exact zero term)."""
    if k is None:
        k = c = torch.zeros_like(a)
    dx, dres = _ops.bn_backward_dx_cuda(dy, x, mean, scale, shift, residual, relu, a, k, c,
                                        need_dres)
    return dx, (dres if need_dres else None)


# --------------------------------------------------------------------------------------------------
# The whole-op contract (fastres/ops/batch_norm_act.py's TorchBackend has the same three functions):
# each is one call into the extension, which launches 3 kernels in the training forward, 1 in eval
# and at most 3 in backward, and issues no other device work.


def forward_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                  residual: Optional[Tensor], running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], num_batches_tracked: Optional[Tensor],
                  momentum: Optional[float], eps: float, relu: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) with batch statistics; fp32 [C] mean and invstd. running_mean/var are
    updated in place with f = momentum, or, for momentum=None, f = 1/num_batches_tracked read on the
    device (no host sync)."""
    if isinstance(momentum, Tensor):
        raise TypeError("fastres cuda backend: momentum must be a Python float or None "
                        "(momentum=None reads num_batches_tracked on the device), got a tensor")
    cumulative = momentum is None
    if cumulative and running_mean is not None and num_batches_tracked is None:
        raise ValueError("fastres cuda backend: momentum=None needs num_batches_tracked")
    return _ops.bn_forward_train_cuda(x, weight, bias, residual, running_mean, running_var,
                                      num_batches_tracked if cumulative else None,
                                      0.0 if cumulative else float(momentum), cumulative,
                                      float(eps), bool(relu))


def forward_eval(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                 residual: Optional[Tensor], running_mean: Tensor, running_var: Tensor, eps: float,
                 relu: bool) -> tuple[Tensor, Tensor]:
    """(y, invstd) with the running statistics, in one launch (fp32 [C] invstd)."""
    return _ops.bn_forward_eval_cuda(x, weight, bias, residual, running_mean, running_var,
                                     float(eps), bool(relu))


def backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             residual: Optional[Tensor], mean: Tensor, invstd: Tensor, relu: bool, training: bool,
             need_dx: bool, need_dres: bool, need_dweight: bool, need_dbias: bool
             ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dresidual, dweight, dbias), None where not needed; dweight/dbias in the parameters'
    dtype. mean/invstd: what the forward used (batch statistics in training, the running mean and
    the forward_eval invstd in eval)."""
    need_dweight = bool(need_dweight) and weight is not None
    need_dbias = bool(need_dbias) and bias is not None
    dx, dres, dweight, dbias = _ops.bn_backward_cuda(
        dy, x, weight, bias, residual, mean, invstd, bool(relu), bool(training), bool(need_dx),
        bool(need_dres), need_dweight, need_dbias)
    return (dx if need_dx else None, dres if need_dres else None,
            dweight if need_dweight else None, dbias if need_dbias else None)
