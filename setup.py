"""fastres build: the pure-Python package, plus the optional C++/CUDA extension ``fastres._C``.

The extension is built when torch has CUDA and a CUDA toolkit is found (CUDA_HOME, else the toolkit
that the ``nvcc`` on PATH belongs to, resolving wrapper scripts). FASTRES_BUILD_CUDA=0/1 forces either
way. TORCH_CUDA_ARCH_LIST is respected (default "8.0;9.0"); MAX_JOBS is honoured by torch's builder.
Install with ``pip install --no-build-isolation .`` (this file imports torch).
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"fastres setup: {msg}", file=sys.stderr)


def _load_toolkit_helpers():
    # fastres/_toolkit.py is standard-library only; load it by path (fastres itself needs torch).
    spec = importlib.util.spec_from_file_location("_fastres_toolkit", os.path.join(ROOT, "fastres", "_toolkit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_toolkit = _load_toolkit_helpers()
find_cuda_home = _toolkit.find_cuda_home


def cuda_extension():
    """(ext_modules, cmdclass) for fastres._C, or ([], {}) with the reason said once."""
    force = os.environ.get("FASTRES_BUILD_CUDA")
    if force == "0":
        _say("FASTRES_BUILD_CUDA=0: building the pure-Python package only")
        _toolkit.record_build_status("not built: FASTRES_BUILD_CUDA=0 at install time")
        return [], {}
    try:
        import torch
    except ImportError:
        _say("torch is not importable (install with --no-build-isolation): no CUDA extension")
        _toolkit.record_build_status("not built: torch was not importable at install time "
                                     "(install with --no-build-isolation)")
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
        _toolkit.record_build_status(f"not built: {why_not}")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME at import time: set it before importing.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    _toolkit.record_build_status(None)
    _say(f"building fastres._C with the toolkit at {cuda_home} for arch {os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = cpp_extension.CUDAExtension(
        name="fastres._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        # No --use_fast_math: the kernels are memory-bound, and exact division, denormals and rounding
        # keep them within the tolerance rule against eager. --threads compiles the architectures in
        # parallel (the build must stay under 5 minutes on 2 cores).
        extra_compile_args={"cxx": ["-O3", "-g0"],
                            "nvcc": ["-O3", "-lineinfo",
                                     f"--threads={os.environ.get('NVCC_THREADS', '2')}"]},
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extension()

setup(
    name="fastres",
    version="0.1.0",
    description="Fused GPU kernels (Triton and CUDA) for ResNet training, as drop-in PyTorch modules",
    packages=find_packages(include=["fastres", "fastres.*"]),
    # _C_build.txt: why fastres._C was not built, when it was not; tables/*.json: the choice tables
    package_data={"fastres": ["_C_build.txt", "tables/*.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark", "torchvision"],
                    "plot": ["matplotlib", "tabulate"], "bench": ["tabulate", "matplotlib", "tqdm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
