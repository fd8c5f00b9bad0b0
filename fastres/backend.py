"""Backend selection: which implementation runs fastres's kernels.

"torch"  — pure-PyTorch implementation of the same math (the reference, and the CPU fallback).
"triton" — Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
"cuda"   — the hand-written C++/CUDA extension ``fastres._C``.
"auto"   — the fastest available for the tensor's device (see ``AUTO_TABLE``).

The choice is read at run time inside each custom op, so it also applies to compiled graphs.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("fastres")

BACKENDS = ("auto", "triton", "cuda", "torch")
_backend = os.environ.get("FASTRES_BACKEND", "auto").strip().lower() or "auto"
if _backend not in BACKENDS:
    raise ValueError(f"FASTRES_BACKEND={_backend!r} is not one of {BACKENDS}")


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_status() -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"triton is not importable ({e})"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if triton_interpreting():
        return True, f"triton {triton.__version__} under TRITON_INTERPRET=1 (CPU tensors)"
    return False, "no CUDA device, and TRITON_INTERPRET=1 is not set"


@functools.lru_cache(maxsize=None)
def _cuda_ext_status() -> tuple[bool, str]:
    try:
        importlib.import_module("fastres._C")
    except Exception as e:
        return False, f"fastres._C did not load ({type(e).__name__}: {e})"
    if not torch.cuda.is_available():
        return False, "fastres._C loaded, but no CUDA device is visible"
    return True, "fastres._C loaded"


def backend_status() -> dict[str, tuple[bool, str]]:
    """{backend: (available, why)} for every concrete backend."""
    return {
        "torch": (True, "always available"),
        "triton": _triton_status(),
        "cuda": _cuda_ext_status(),
    }


def set_backend(name: str) -> None:
    """Select the backend for all fastres ops: "auto", "triton", "cuda" or "torch".

    Raises ValueError for an unknown name and RuntimeError (saying why) for one that is unavailable.
    """
    global _backend
    name = str(name).strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown fastres backend {name!r}; choose one of {BACKENDS}")
    if name != "auto":
        ok, why = backend_status()[name]
        if not ok:
            raise RuntimeError(f"fastres backend {name!r} is unavailable: {why}")
    _backend = name


def get_backend() -> str:
    return _backend


class use_backend:
    """Context manager: ``with fastres.use_backend("torch"): ...``."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.prev = get_backend()
        set_backend(self.name)
        return self

    def __exit__(self, *exc):
        global _backend
        _backend = self.prev


# "auto" on CUDA: which backend runs each op, per shape. Measured by the benchmark suite; until a GPU
# measurement exists (none yet: no session has had a GPU) every op goes to Triton.
AUTO_TABLE_DEVICE = "unmeasured"
AUTO_TABLE: dict[str, str] = {}


def resolve(device: torch.device, op: str = "", shape=None) -> str:
    """The concrete backend that runs ``op`` on ``device`` now."""
    name = _backend
    if name == "auto":
        if device.type == "cuda":
            choice = AUTO_TABLE.get(op, "triton")
            if choice == "cuda" and not backend_status()["cuda"][0]:
                choice = "triton"
            return choice
        if device.type == "cpu" and triton_interpreting() and _triton_status()[0]:
            return "torch"
        return "torch"
    if name in ("triton", "cuda"):
        ok, why = backend_status()[name]
        if not ok:
            raise RuntimeError(f"fastres backend {name!r} is unavailable: {why}")
        if name == "cuda" and device.type != "cuda":
            raise RuntimeError(
                f"fastres backend 'cuda' needs CUDA tensors, got a tensor on {device}; "
                "use backend 'torch' or 'auto' for CPU tensors")
        if name == "triton" and device.type != "cuda" and not triton_interpreting():
            raise RuntimeError(
                f"fastres backend 'triton' needs CUDA tensors (got {device}) or TRITON_INTERPRET=1")
    return name
