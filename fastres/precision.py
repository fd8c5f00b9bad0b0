"""Which arithmetic the kernels do, and the GPU-faithful CPU mode.

ATen computes float math in double on CPU (``acc_type<float, CPU>``) and in float on CUDA. fastres's
kernels follow the eager op on the same device, so by default CPU tensors (the Triton interpreter,
the CUDA emulator) compute in fp64 — and then no CPU test would exercise the fp32 code a GPU runs.

GPU-faithful mode makes CPU runs take exactly the choices a CUDA device makes:

- fp32 accumulation and fp32 partial buffers (``compute_dtype`` is fp32 for fp32/fp16/bf16 input);
- the CUDA launch configuration (tile sizes, row splits, finalize grid) with ``EMULATED_SM_COUNT``
  streaming multiprocessors (an H100 SXM has 132);
- the CUDA list of autotune configurations for the conv kernels.

Switch it on with ``FASTRES_GPU_FAITHFUL=1`` or ``with gpu_faithful():``. It is read at run time, at
each launch, so a test can flip it per case.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
from torch import Tensor

EMULATED_SM_COUNT = 132

_override: list[bool] = []


def gpu_faithful_enabled() -> bool:
    """True when CPU runs must take the CUDA device's choices (see the module docstring)."""
    if _override:
        return _override[-1]
    return os.environ.get("FASTRES_GPU_FAITHFUL", "0") == "1"


@contextlib.contextmanager
def gpu_faithful(enabled: bool = True):
    """Within the block, CPU tensors run the kernels with the CUDA device's choices."""
    _override.append(bool(enabled))
    try:
        yield
    finally:
        _override.pop()


def cuda_class(device: torch.device) -> bool:
    """Whether launches on ``device`` take the CUDA branch (a CUDA device, or GPU-faithful mode)."""
    return device.type == "cuda" or gpu_faithful_enabled()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; EMULATED_SM_COUNT for CPU tensors in GPU-faithful
    mode."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return EMULATED_SM_COUNT


def acc_dtype(x: Tensor) -> torch.dtype:
    """Statistics and per-channel math run in fp32 (fp64 for fp64 input, torch backend only)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def compute_dtype(x: Tensor) -> torch.dtype:
    """Precision of the elementwise math and the backward sums inside the kernels. As ATen: its CPU
    kernels compute float in double (acc_type<float, CPU>), its CUDA kernels in float. Batch
    statistics stay fp32 (shifted Chan merge) on both. GPU-faithful mode: fp32 on CPU too."""
    if x.dtype == torch.float64:
        return torch.float64
    return torch.float32 if cuda_class(x.device) else torch.float64
