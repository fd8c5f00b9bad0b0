"""Backend selection: which implementation runs fastres's kernels.

"torch"  — pure-PyTorch implementation of the same math (the reference, and the CPU fallback).
"triton" — Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1).
"cuda"   — the hand-written C++/CUDA extension ``fastres._C``.
"auto"   — the fastest available for the tensor's device (see ``AUTO_TABLE``); on CPU the fused
           BN-act is eager's own ATen composition ("aten", bit-identical to eager).

The choice is read at run time inside each custom op, so it also applies to compiled graphs.
"""
from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

from fastres import tables as _tables

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
def _load_extension():
    """(module or None, why): imports fastres._C once, and logs once when it is missing or broken."""
    from fastres import _toolkit

    try:
        module = importlib.import_module("fastres._C")
    except ModuleNotFoundError as e:
        if e.name != "fastres._C":
            why = f"fastres._C did not load ({type(e).__name__}: {e})"
            log.warning("fastres: %s; the triton and torch backends still work", why)
            return None, why
        why = _toolkit.build_status()
        if why is None:
            home = _toolkit.find_cuda_home()
            why = "not built" + (
                f" (a CUDA toolkit is at {home}: reinstall with `pip install --no-build-isolation -e .`)"
                if home else " (no CUDA toolkit was found)")
        why = f"fastres._C is {why}" if why.startswith("not built") else why
        log.info("fastres: %s; the triton and torch backends still work", why)
        return None, why
    except Exception as e:  # a broken build (undefined symbol, ABI mismatch, ...): never fail import
        why = f"fastres._C did not load ({type(e).__name__}: {e})"
        log.warning("fastres: %s; the triton and torch backends still work", why)
        return None, why
    return module, f"fastres._C loaded ({os.path.basename(module.__file__ or '_C')})"


def load_extension(required: bool = False):
    """The ``fastres._C`` module (its import registers torch.ops.fastres.bn_*_cuda), or None.
    With ``required``, raise a RuntimeError saying why it is unavailable instead of returning None."""
    module, why = _load_extension()
    if module is None and required:
        raise RuntimeError(f"fastres backend 'cuda' is unavailable: {why}")
    return module


def extension_status() -> tuple[bool, str]:
    """(loaded, why) for the C++/CUDA extension fastres._C, whatever the device."""
    module, why = _load_extension()
    return module is not None, why


@functools.lru_cache(maxsize=None)
def _cuda_ext_status() -> tuple[bool, str]:
    module, why = _load_extension()
    if module is None:
        return False, why
    if not torch.cuda.is_available():
        return False, f"{why}, but no CUDA device is visible"
    return True, why


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


# "auto" on CUDA: which backend runs each op ("stats", "apply", "backward_reduce", "backward_dx") for
# a given (N, C, H, W). An op maps to a backend name, or to a list of (rule, backend) pairs where the
# first matching rule wins; a rule bounds "C" (channels) and/or "NHW" (elements per channel) with
# inclusive (lo, hi) pairs, hi None for no bound. No entry or no match: AUTO_DEFAULT. The table is
# generated data, fastres/tables/auto_table.json, written by `python -m benchmarks.tables` from a
# benchmark run on AUTO_TABLE_DEVICE (never edited by hand). No GPU has measured anything yet, so it
# is empty and every op stays on Triton.
AUTO_DEFAULT = "triton"
AUTO_TABLE_DEVICE, AUTO_TABLE = _tables.load_auto_table()


def auto_choice(op: str, shape=None) -> str:
    """The backend AUTO_TABLE picks for ``op`` on an (N, C, H, W) ``shape`` (before availability)."""
    entry = AUTO_TABLE.get(op, AUTO_DEFAULT)
    if isinstance(entry, str):
        return entry
    if shape is None or len(shape) != 4:
        return AUTO_DEFAULT
    n, c, h, w = shape
    dims = {"C": c, "NHW": n * h * w}
    for rule, backend in entry:
        if all(lo <= dims[k] and (hi is None or dims[k] <= hi) for k, (lo, hi) in rule.items()):
            return backend
    return AUTO_DEFAULT


def runs_eager_ops(x) -> bool:
    """Whether the fused BN-act on ``x`` (a tensor) runs as eager's own ATen ops ("auto" on CPU
    tensors: bit-identical to eager and as fast). Cheap (``is_cpu``, not ``device.type``, which
    costs a microsecond) and traceable (torch.compile reads it without a graph break)."""
    return _backend == "auto" and isinstance(x, torch.Tensor) and x.is_cpu


def resolve(device: torch.device, op: str = "", shape=None) -> str:
    """The concrete backend that runs ``op`` on ``device`` now."""
    name = _backend
    if name == "auto":
        if device.type == "cuda":
            choice = auto_choice(op, shape)
            if choice == "cuda" and not backend_status()["cuda"][0]:
                choice = "triton"
            return choice
        if op == "batch_norm_act" and device.type == "cpu":
            # The fused BN-act on CPU: eager's own ATen ops (F.batch_norm [+ residual] [relu]),
            # bit-identical to eager and as fast; the callers compose them themselves.
            return "aten"
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
