"""``python -m fastres.info``: versions, device, and which backends are available and why not."""
from __future__ import annotations

import platform

import torch

import fastres
from fastres.backend import (AUTO_TABLE_DEVICE, backend_status, extension_status, get_backend,
                             load_extension)


def info() -> str:
    lines = [
        f"fastres {fastres.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as e:  # pragma: no cover
        lines.append(f"triton: not importable ({e})")
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()} (capability "
                     f"{'.'.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        lines.append("device: no CUDA device visible (CPU only)")
    lines.append(f"selected backend: {get_backend()}")
    lines.append(_extension_line())
    lines.append(f"auto table measured on: {AUTO_TABLE_DEVICE}")
    for name, (ok, why) in backend_status().items():
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}: {why}")
    return "\n".join(lines)


def _extension_line() -> str:
    """Whether the C++/CUDA extension fastres._C loaded, and why not."""
    module = load_extension()
    if module is None:
        return f"fastres._C: not loaded: {extension_status()[1]}"
    # Every op the extension registered (its TORCH_LIBRARY block), not a list kept by hand.
    ops = sorted({s.name.split("::", 1)[1] for s in torch._C._jit_get_all_schemas()
                  if s.name.startswith("fastres::") and s.name.endswith("_cuda")})
    return f"fastres._C: loaded from {module.__file__} (ops: {', '.join(ops)})"


if __name__ == "__main__":
    print(info())
