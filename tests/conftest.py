import os
import tempfile

# A fresh inductor cache per test session: a cache left by an earlier checkout can hold graphs traced
# with another version of fastres's fake kernels.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastres-inductor-"))

# Two sessions make up the suite (`make test` runs both on a machine with a GPU):
#  - the CPU session: no CUDA device visible (a machine without a GPU, or CUDA_VISIBLE_DEVICES= on one
#    with a GPU). The Triton kernels run on CPU tensors under the interpreter: TRITON_INTERPRET=1 is
#    set here, before triton is imported anywhere. The `gpu` tests are skipped.
#  - the GPU session: a CUDA device visible and TRITON_INTERPRET unset. Only the `gpu` tests run
#    (`-m gpu`); any other test is skipped with the command that runs it (Triton compiles for the
#    device and cannot take CPU tensors without the interpreter, which would also take CUDA ones).
_HAS_CUDA = False
if not os.environ.get("FASTRES_TEST_NO_INTERPRET"):
    try:
        import torch

        _HAS_CUDA = torch.cuda.is_available()
    except Exception:
        _HAS_CUDA = False
    if not _HAS_CUDA:
        os.environ.setdefault("TRITON_INTERPRET", "1")
GPU_SESSION = _HAS_CUDA and os.environ.get("TRITON_INTERPRET", "0") != "1"

import pytest
import torch

import fastres.precision


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
    # `slow` tests (the full ahead-of-time compile sweep: tens of minutes on 2 cores) run only when
    # asked for with FASTRES_RUN_SLOW=1; `make test` stays within its budget.
    if os.environ.get("FASTRES_RUN_SLOW") != "1":
        skip_slow = pytest.mark.skip(reason="slow: set FASTRES_RUN_SLOW=1 to run it")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip_slow)
    if GPU_SESSION:
        skip = pytest.mark.skip(reason=(
            "CPU-interpreter test: with a GPU visible it runs in the CPU session — `make test`, or "
            "CUDA_VISIBLE_DEVICES= python -m pytest tests -m 'not gpu'"))
        for item in items:
            if "gpu" not in item.keywords:
                item.add_marker(skip)
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Some tests (and the demo / benchmark runners they call in-process) pin torch to one thread;
    later tests must not inherit that (torch 2.14's single-threaded CPU channels_last conv backward
    has crashed here)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=["cpu", "gpu_faithful"])
def precision_mode(request):
    """Runs the test twice: in the default CPU mode (kernels on CPU tensors compute as ATen's CPU
    kernels do, in double) and in GPU-faithful mode (fastres.precision.gpu_faithful: fp32
    accumulation and buffers, the CUDA launch configuration at 132 SMs). tests/helpers.py picks the
    matching baseline for the tolerance rule (eager, or its fp32-accumulating composition)."""
    with fastres.precision.gpu_faithful(request.param == "gpu_faithful"):
        yield request.param


@pytest.fixture(scope="session")
def resnet50_counts():
    """{(dtype, variant): fastres.memory report} of torchvision's ResNet-50 at batch 2, 64x64, fp32
    and bf16, for every variant of the memory benchmark (benchmarks.memory.VARIANTS: eager, the
    convert default, normconv, recompute, recompute+normconv) — the very code that writes
    benchmarks/results/memory, at a size a test can afford."""
    from benchmarks.memory import VARIANTS, variant_reports

    counts = {}
    for dtype in (torch.float32, torch.bfloat16):
        reports = variant_reports("resnet50", 2, 64, dtype)
        counts.update({(dtype, v): reports[v] for v in VARIANTS})
    return counts
