"""``python -m fastres.info``: versions, device, and which backends are available and why not."""
from __future__ import annotations

import platform

import torch

import fastres
from fastres.backend import backend_status, get_backend


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
    for name, (ok, why) in backend_status().items():
        lines.append(f"  {name:7s} {'available' if ok else 'unavailable'}: {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(info())
