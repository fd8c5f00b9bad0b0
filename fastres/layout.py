"""Tensor-layout helpers shared by the kernels (``fastres/triton``, the CUDA backend) and the ops
(``fastres/ops``). They live below both so that kernels never import ops.

The kernels address a 4-D activation densely in NCHW or NHWC (channels_last) order; the real and the
fake (meta) implementations use these helpers so that both give the same strides.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastres.precision import acc_dtype


def memory_format(x: Tensor) -> torch.memory_format:
    """The dense layout the kernels use for ``x``: NCHW unless ``x`` is (closer to) channels_last."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    # Non-dense input: keep whichever order it is closer to.
    return torch.channels_last if x.stride(1) < x.stride(3) else torch.contiguous_format


def dense(t: Tensor, fmt: torch.memory_format) -> Tensor:
    return t.contiguous(memory_format=fmt)


def is_nhwc(x: Tensor) -> bool:
    return memory_format(x) == torch.channels_last


def empty_output(x: Tensor) -> Tensor:
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=memory_format(x))


def per_channel(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    return x.new_empty((x.shape[1],), dtype=dtype or acc_dtype(x))


def channel_count(x: Tensor) -> int:
    """Elements per channel: N·H·W."""
    return x.numel() // x.shape[1] if x.shape[1] else 0
