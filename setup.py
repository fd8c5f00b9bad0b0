"""fastres build: the pure-Python package, plus the optional C++/CUDA extension ``fastres._C``.

The extension is built when torch has CUDA and a CUDA toolkit is found (CUDA_HOME, else the toolkit
that the ``nvcc`` on PATH belongs to, resolving wrapper scripts). FASTRES_BUILD_CUDA=0/1 forces either
way. TORCH_CUDA_ARCH_LIST is respected (default "8.0;9.0"); MAX_JOBS is honoured by torch's builder.
Install with ``pip install --no-build-isolation .`` (this file imports torch).
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"fastres setup: {msg}", file=sys.stderr)


def _toolkit_of(nvcc):
    """The toolkit folder an nvcc belongs to; follows symlinks and `exec /path/nvcc` wrapper scripts."""
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
        bindir = os.path.dirname(nvcc)
        return os.path.dirname(bindir)
    return None


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return _toolkit_of(os.path.join(home, "bin", "nvcc")) or home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return _toolkit_of(nvcc)
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return _toolkit_of("/usr/local/cuda/bin/nvcc")
    return None


def cuda_extension():
    """(ext_modules, cmdclass) for fastres._C, or ([], {}) with the reason said once."""
    force = os.environ.get("FASTRES_BUILD_CUDA")
    if force == "0":
        _say("FASTRES_BUILD_CUDA=0: building the pure-Python package only")
        return [], {}
    try:
        import torch
    except ImportError:
        _say("torch is not importable (install with --no-build-isolation): no CUDA extension")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    why_not = None
    cuda_home = find_cuda_home()
    if torch.version.cuda is None:
        why_not = f"torch {torch.__version__} is a CPU-only build"
    elif cuda_home is None:
        why_not = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    elif not sources:
        why_not = "csrc/ has no sources yet"
    if why_not:
        if force == "1":
            raise RuntimeError(f"FASTRES_BUILD_CUDA=1 but the extension cannot be built: {why_not}")
        _say(f"not building fastres._C: {why_not}; the triton and torch backends still work")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME at import time: set it before importing.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    _say(f"building fastres._C with the toolkit at {cuda_home} for arch {os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = cpp_extension.CUDAExtension(
        name="fastres._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"],
                            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]},
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="fastres",
    version="0.1.0",
    description="Fused GPU kernels (Triton and CUDA) for ResNet training, as drop-in PyTorch modules",
    packages=find_packages(include=["fastres", "fastres.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "torchvision"],
                    "plot": ["matplotlib", "tabulate"], "bench": ["tabulate", "matplotlib", "tqdm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
