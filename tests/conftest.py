import os
import tempfile

# A fresh inductor cache per test session: a cache left by an earlier checkout can hold graphs traced
# with another version of fastres's fake kernels.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fastres-inductor-"))

# The Triton kernels run on CPU tensors through the interpreter when there is no GPU. This must be set
# before triton is imported anywhere.
if not os.environ.get("FASTRES_TEST_NO_INTERPRET"):
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except Exception:
        _has_cuda = False
    if not _has_cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running test")


def pytest_collection_modifyitems(config, items):
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
