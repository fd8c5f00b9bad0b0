"""Where the CUDA toolkit is: shared by setup.py (to decide whether to build ``fastres._C``), by
``python -m fastres.info`` and by the tests (a toolkit present but ``_C`` missing is a failure).

Standard library only: setup.py loads this file by path, before fastres (or torch) is importable.
"""
from __future__ import annotations

import os
import re
import shutil
from typing import Optional

# Written by setup.py when it does not build fastres._C: one line saying why.
BUILD_STATUS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C_build.txt")


def toolkit_of(nvcc: str) -> Optional[str]:
    """The toolkit folder an nvcc belongs to; follows symlinks and ``exec /path/bin/nvcc`` wrapper
    scripts (the ``nvcc`` on PATH of the development machine is such a script)."""
    for _ in range(8):
        nvcc = os.path.realpath(nvcc)
        try:
            with open(nvcc, "rb") as f:
                head = f.read(4096)
        except OSError:
            return None
        if head.startswith(b"#!"):  # a wrapper script: find the nvcc it runs
            m = re.search(rb"(/\S*/bin/nvcc)\b", head)
            if not m:
                return None
            nvcc = m.group(1).decode()
            continue
        return os.path.dirname(os.path.dirname(nvcc))
    return None


def find_cuda_home() -> Optional[str]:
    """CUDA_HOME (or CUDA_PATH), else the toolkit of the ``nvcc`` on PATH, else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return toolkit_of(os.path.join(home, "bin", "nvcc")) or home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return toolkit_of(nvcc)
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return toolkit_of("/usr/local/cuda/bin/nvcc")
    return None


def build_status() -> Optional[str]:
    """Why setup.py did not build fastres._C (None when it did, or when it never ran here)."""
    try:
        with open(BUILD_STATUS_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def record_build_status(reason: Optional[str]) -> None:
    """setup.py: record why the extension is not built (``None``: it is being built)."""
    try:
        if reason is None:
            if os.path.exists(BUILD_STATUS_FILE):
                os.remove(BUILD_STATUS_FILE)
        else:
            with open(BUILD_STATUS_FILE, "w") as f:
                f.write(reason + "\n")
    except OSError:  # a read-only source tree: the message printed by setup.py still says why
        pass
