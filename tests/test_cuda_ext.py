"""The C++/CUDA extension fastres._C and the "cuda" backend.

Without a GPU (CI): the extension is built and imports whenever a CUDA toolkit is present, its seven ops
are registered with the expected schemas, CPU tensors get a clear error, a missing or broken extension
never breaks ``import fastres``, and set_backend("cuda") says why it is unavailable. The kernels and
their host code also run on CPU through the emulator in csrc/emulator/ (built once per source hash):
against eager's composition and TorchBackend in the GPU's precision class by helpers.assert_rule, with
launch counts and finalize geometry read from the emulator's launch log.
With a GPU (``gpu`` marker): the cuda backend against eager and against triton by the tolerance rule on
the foundation shape families, kernel-level checks against TorchBackend, bitwise determinism.
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import itertools
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import (FP32_ORDERS, assert_rule, channel_rows, fp32_order, fp32_sum, make_case,
                     run_three)

import fastres
from fastres import _toolkit, backend
from fastres.precision import gpu_faithful

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("bn_stats_cuda", "bn_apply_cuda", "bn_backward_reduce_cuda", "bn_backward_dx_cuda",
       "bn_forward_train_cuda", "bn_forward_eval_cuda", "bn_backward_cuda")
SCHEMAS = {
    "bn_stats_cuda": "fastres::bn_stats_cuda(Tensor x) -> (Tensor, Tensor)",
    "bn_apply_cuda": "fastres::bn_apply_cuda(Tensor x, Tensor mean, Tensor scale, Tensor shift, "
                     "Tensor? residual, bool relu) -> Tensor",
    "bn_backward_reduce_cuda": "fastres::bn_backward_reduce_cuda(Tensor dy, Tensor x, Tensor mean, "
                               "Tensor scale, Tensor shift, Tensor? residual, bool relu) "
                               "-> (Tensor, Tensor)",
    "bn_backward_dx_cuda": "fastres::bn_backward_dx_cuda(Tensor dy, Tensor x, Tensor mean, "
                           "Tensor scale, Tensor shift, Tensor? residual, bool relu, Tensor a, "
                           "Tensor k, Tensor c, bool need_dres) -> (Tensor, Tensor)",
    "bn_forward_train_cuda": "fastres::bn_forward_train_cuda(Tensor x, Tensor? weight, Tensor? bias, "
                             "Tensor? residual, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
                             "Tensor? num_batches_tracked, float momentum, bool cumulative, "
                             "float eps, bool relu) -> (Tensor, Tensor, Tensor)",
    "bn_forward_eval_cuda": "fastres::bn_forward_eval_cuda(Tensor x, Tensor? weight, Tensor? bias, "
                            "Tensor? residual, Tensor running_mean, Tensor running_var, float eps, "
                            "bool relu) -> (Tensor, Tensor)",
    "bn_backward_cuda": "fastres::bn_backward_cuda(Tensor dy, Tensor x, Tensor? weight, "
                        "Tensor? bias, Tensor? residual, Tensor mean, Tensor invstd, bool relu, "
                        "bool training, bool need_dx, bool need_dres, bool need_dweight, "
                        "bool need_dbias) -> (Tensor, Tensor, Tensor, Tensor)",
}


def _expect_built() -> str | None:
    """Why fastres._C may legitimately be absent (None: setup.py must have built it)."""
    if os.environ.get("FASTRES_BUILD_CUDA") == "0":
        return "FASTRES_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is CPU-only"
    if _toolkit.find_cuda_home() is None:
        return "no CUDA toolkit (CUDA_HOME / nvcc) on this machine"
    return None


@pytest.fixture(scope="module")
def ext():
    module = backend.load_extension()
    if module is None:
        why_absent = _expect_built()
        if why_absent is None:
            pytest.fail("a CUDA toolkit is present, so setup.py builds fastres._C, but it did not "
                        f"load: {backend.extension_status()[1]}")
        pytest.skip(f"fastres._C is not built: {why_absent}")
    return module


# --------------------------------------------------------------------------------------------------
# CPU-only checks (CI).


def test_extension_imports(ext):
    assert ext.__name__ == "fastres._C"
    assert importlib.import_module("fastres._C") is ext
    assert os.path.dirname(ext.__file__) == os.path.dirname(fastres.__file__)


@pytest.mark.parametrize("op", OPS)
def test_ops_registered_with_schema(ext, op):
    packet = getattr(torch.ops.fastres, op)
    assert str(packet.default._schema) == SCHEMAS[op]
    # The Python custom ops share the namespace and keep working next to them.
    for py_op in ("batch_norm_stats", "batch_norm_act", "batch_norm_act_backward_reduce",
                  "batch_norm_act_backward_dx"):
        assert hasattr(torch.ops.fastres, py_op)


def _cpu_args(op):
    x = torch.randn(2, 8, 3, 3)
    c = torch.zeros(8)
    return {
        "bn_stats_cuda": (x,),
        "bn_apply_cuda": (x, c, c, c, None, True),
        "bn_backward_reduce_cuda": (x, x, c, c, c, None, True),
        "bn_backward_dx_cuda": (x, x, c, c, c, None, True, c, c, c, False),
        "bn_forward_train_cuda": (x, None, None, None, None, None, None, 0.1, False, 1e-5, True),
        "bn_forward_eval_cuda": (x, None, None, None, c, c + 1, 1e-5, True),
        "bn_backward_cuda": (x, x, None, None, None, c, c, True, True, True, False, False, False),
    }[op]


@pytest.mark.parametrize("op", OPS)
def test_cpu_tensors_get_a_clear_error(ext, op):
    with pytest.raises(RuntimeError, match=r"fastres\._C kernels need CUDA tensors, got a CPU "
                                           r"tensor.*use the 'torch' or 'triton' backend"):
        getattr(torch.ops.fastres, op)(*_cpu_args(op))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_set_backend_cuda_without_gpu_says_why():
    before = fastres.get_backend()
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*"
                                           "(no CUDA device is visible|not built|did not load)"):
        fastres.set_backend("cuda")
    assert fastres.get_backend() == before


def test_info_says_whether_C_loaded():
    from fastres.info import info

    text = info()
    line = next(ln for ln in text.splitlines() if ln.startswith("fastres._C:"))
    if backend.load_extension() is None:
        assert "not loaded:" in line and len(line) > len("fastres._C: not loaded: ")
    else:
        assert "loaded from" in line and all(op in line for op in OPS)  # every registered op
    assert "auto table measured on: " + backend.AUTO_TABLE_DEVICE in text


class _BrokenExtension:
    """A meta-path finder that makes ``import fastres._C`` fail like a broken build."""

    def find_spec(self, name, path=None, target=None):
        if name == "fastres._C":
            raise ImportError("fastres/_C.so: undefined symbol: _ZN3c105ErrorC2E (simulated)")
        return None


def test_broken_extension_is_logged_once_and_reported(monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "fastres._C", raising=False)
    monkeypatch.setattr(sys, "meta_path", [_BrokenExtension()] + sys.meta_path)
    backend._load_extension.cache_clear()
    backend._cuda_ext_status.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="fastres"):
            assert backend.load_extension() is None
            assert backend.load_extension() is None
            ok, why = backend.backend_status()["cuda"]
        assert not ok and "undefined symbol" in why
        assert len([r for r in caplog.records if "fastres._C" in r.getMessage()]) == 1
        with pytest.raises(RuntimeError, match="undefined symbol"):
            fastres.set_backend("cuda")
        with pytest.raises(RuntimeError, match="undefined symbol"):
            backend.load_extension(required=True)
    finally:
        backend._load_extension.cache_clear()
        backend._cuda_ext_status.cache_clear()


def _run_python(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_import_fastres_survives_missing_and_broken_extension():
    out = _run_python(
        "import sys\n"
        "class Broken:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastres._C':\n"
        "            raise OSError('libcudart.so.13: cannot open shared object file (simulated)')\n"
        "sys.meta_path.insert(0, Broken())\n"
        "import torch, fastres\n"
        "from fastres.backend import backend_status\n"
        "print(backend_status()['cuda'][1])\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "y = fastres.functional.batch_norm_act(x, None, None, training=True)\n"
        "print('ok', tuple(y.shape))\n")
    assert "libcudart.so.13" in out and "ok (2, 3, 4, 4)" in out


def test_extension_loaded_before_fastres_does_not_conflict(ext):
    # torch.ops.load_library runs the TORCH_LIBRARY block before the Python custom ops (a FRAGMENT of
    # the same namespace) are defined; `import fastres._C` afterwards is the same shared object.
    so = glob.glob(os.path.join(os.path.dirname(fastres.__file__), "_C*.so"))
    assert so, "fastres._C loaded but no fastres/_C*.so found"
    out = _run_python(
        "import torch\n"
        f"torch.ops.load_library({so[0]!r})\n"
        "import fastres, fastres._C\n"
        "from fastres.backend import load_extension\n"
        "assert load_extension() is not None\n"
        "print(torch.ops.fastres.bn_stats_cuda.default._schema)\n"
        "print(torch.ops.fastres.batch_norm_act.default._schema.name)\n"
        "x = torch.randn(2, 3, 4, 4)\n"
        "fastres.functional.batch_norm_act(x, None, None, training=True)\n"
        "print('ok')\n")
    assert SCHEMAS["bn_stats_cuda"] in out and "fastres::batch_norm_act" in out and "ok" in out


def test_auto_table_is_unmeasured_and_defaults_to_triton(monkeypatch):
    assert backend.AUTO_TABLE_DEVICE == "unmeasured" and backend.AUTO_TABLE == {}
    for op in ("stats", "apply", "backward_reduce", "backward_dx"):
        assert backend.auto_choice(op, (256, 64, 56, 56)) == "triton"
    # The rule format, as the benchmark will fill it in.
    monkeypatch.setitem(backend.AUTO_TABLE, "apply", [({"C": (1024, None)}, "cuda"),
                                                     ({"NHW": (0, 4096)}, "torch")])
    assert backend.auto_choice("apply", (256, 2048, 7, 7)) == "cuda"
    assert backend.auto_choice("apply", (1, 64, 8, 8)) == "torch"
    assert backend.auto_choice("apply", (256, 64, 56, 56)) == "triton"
    assert backend.auto_choice("apply", None) == "triton"
    monkeypatch.setitem(backend.AUTO_TABLE, "stats", "cuda")
    assert backend.auto_choice("stats", (2, 3, 4, 4)) == "cuda"


# --------------------------------------------------------------------------------------------------
# GPU checks.

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The foundation shape families: C not a multiple of 8 (scalar path), C a multiple of 8 (16-byte
# vectors), N·H·W odd, H·W = 1, batch 1, and shapes large enough for several blocks and splits.
SHAPES = (
    (2, 5, 3, 3),
    (2, 16, 4, 4),
    (3, 8, 3, 5),
    (4, 24, 1, 1),
    (1, 32, 7, 7),
    (2, 12, 6, 6),
    (16, 256, 14, 14),
    (8, 72, 9, 9),
)


def _triton_available():
    return backend.backend_status()["triton"][0]


NAMES = ("output", "grad_input", "grad_weight", "grad_bias", "grad_residual")


def _check_case(shape, dtype, channels_last, residual, relu, training, mean=0.0, nonfinite=False):
    """cuda vs eager by the tolerance rule (tests/helpers.py), and vs triton when it runs here."""
    x, kw = make_case(shape, dtype, device="cuda", channels_last=channels_last, residual=residual,
                      mean=mean, seed=sum(shape))
    if nonfinite:
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
        x[-1, shape[1] - 1, -1, -1] = float("inf")
    args = dict(training=training, activation="relu" if relu else None, **kw)
    with fastres.use_backend("cuda"):
        res = run_three(x, **args)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i, t in enumerate(res["fused"]):
        if t.dim() == 4:  # output, grad_input, grad_residual
            assert t.is_contiguous(memory_format=fmt), f"item {i} lost the input's layout"
    n_stats = 2  # running_mean, running_var come last
    for i, (f, e, r) in enumerate(zip(res["fused"], res["eager"], res["ref"])):
        if nonfinite and i >= len(res["fused"]) - n_stats:
            # Welford's merge order decides NaN or Inf for a channel holding Inf: both non-finite.
            assert torch.equal(torch.isfinite(f), torch.isfinite(e)), f"{shape} stats item {i}"
            continue
        assert_rule(f, e, r, name=f"cuda {shape} {dtype} item {i}")
    if _triton_available():
        with fastres.use_backend("triton"):
            tri = run_three(x, **args)
        for i, (t, e, r) in enumerate(zip(tri["fused"], res["eager"], res["ref"])):
            if nonfinite and i >= len(res["fused"]) - n_stats:
                continue
            # The triton backend held to the same rule as the cuda one (tests/helpers.py).
            assert_rule(t, e, r, name=f"triton {shape} {dtype} item {i}")


# The foundation's GPU tests (tests/test_batch_norm_act.py) once more, with the cuda backend.
from test_batch_norm_act import test_gpu_cuda_graph_capture  # noqa: E402,F401
from test_batch_norm_act import test_gpu_equivalence  # noqa: E402,F401
from test_batch_norm_act import test_gpu_int64_offsets  # noqa: E402,F401
from test_batch_norm_act import test_gpu_large_mean_and_determinism  # noqa: E402,F401


@pytest.fixture(name="backend")
def cuda_backend_for_foundation_tests(ext):
    """The backend the imported foundation tests run with."""
    with fastres.use_backend("cuda"):
        yield "cuda"


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_cuda_matches_eager_and_triton(ext, shape, dtype, channels_last):
    for residual, relu, training in itertools.product((False, True), (False, True), (True, False)):
        _check_case(shape, dtype, channels_last, residual, relu, training)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_large_mean_and_nonfinite(ext, dtype, channels_last):
    for shape in ((4, 16, 5, 5), (2, 5, 3, 3)):
        for residual, relu, training in ((False, True, True), (True, True, True),
                                         (True, True, False), (False, False, True)):
            _check_case(shape, dtype, channels_last, residual, relu, training, mean=1e3)
            _check_case(shape, dtype, channels_last, residual, relu, training, nonfinite=True)


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_is_bitwise_deterministic(ext, dtype, channels_last):
    x, kw = make_case((32, 256, 14, 14), dtype, device="cuda", channels_last=channels_last,
                      residual=True, seed=3)
    with fastres.use_backend("cuda"):
        first, second = run_three(x, **kw)["fused"], run_three(x, **kw)["fused"]
    for i, (u, v) in enumerate(zip(first, second)):
        assert torch.equal(u, v), f"item {i} differs between two runs"


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_kernels_match_torch_backend(ext, dtype, layout):
    """The four ops on CUDA against TorchBackend by the tolerance rule at kernel level (the checks of
    the emulated tests below), including misaligned views (scalar path) and special values."""
    for shape in EMU_SHAPES + ((8, 256, 14, 14), (4, 2048, 7, 7), (2, 64, 56, 56)):
        _emu_check(torch.ops.fastres, *_emu_inputs(shape, dtype, layout, device="cuda"), dtype)
    for shape in ((2, 16, 4, 4), (2, 5, 3, 3)):
        for kw in (dict(misalign=True), dict(special="large_mean"), dict(special="nonfinite")):
            _emu_check(torch.ops.fastres, *_emu_inputs(shape, dtype, layout, device="cuda", **kw),
                       dtype, nonfinite=kw.get("special") == "nonfinite")


@pytest.mark.gpu
def test_relu_mask_uses_the_rounded_output(ext):
    # scale 1e-8: x = 1 gives a positive pre-activation that rounds to 0 in fp16 (< 2^-25), masked as
    # threshold_backward on the fp16 output masks it; x = 2^14 gives 1.6e-4, passed; NaN passes.
    from fastres import cuda_backend

    x = torch.tensor([1.0, -1.0, 2.0 ** 14, float("nan")], device="cuda").view(1, 1, 2, 2).half()
    x = x.repeat(1, 8, 1, 1).contiguous(memory_format=torch.channels_last)
    ones, zeros = torch.ones(8, device="cuda"), torch.zeros(8, device="cuda")
    dy = torch.ones_like(x)
    dx, dres = cuda_backend.backward_dx(dy, x, zeros, ones * 1e-8, zeros, None, True, ones, zeros,
                                        zeros, True)
    assert dx[0, 0].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.equal(dres, dx)
    y = cuda_backend.apply(x, zeros, ones * 1e-8, zeros, None, True)
    assert y[0, 0, 0, 0].item() == 0.0 and y[0, 0, 1, 0].item() > 0
    assert torch.isnan(y[0, :, 1, 1]).all()
    s1, _ = cuda_backend.backward_reduce(dy, x, zeros, ones * 1e-8, zeros, None, True)
    assert s1.tolist() == [2.0] * 8


def _check_eval_dx_with_nonfinite_x(ops, device):
    """Eval mode passes k = c = 0: dx = a * dy' must stay finite where x is NaN or Inf, as eager's
    eval backward (scale * dy') does; 0 * Inf must not leak in."""
    for fmt in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 8, 3, 3)
        x[0, 0, 0, 0], x[1, 3, 1, 1], x[0, 5, 2, 2] = float("nan"), float("inf"), float("-inf")
        x = x.to(device).contiguous(memory_format=fmt)
        dy = torch.randn(2, 8, 3, 3).to(device).contiguous(memory_format=fmt)
        zeros, half = torch.zeros(8, device=device), torch.full((8,), 0.5, device=device)
        for relu in (False, True):
            dx, _ = ops.bn_backward_dx_cuda(dy, x, zeros, half, zeros, None, relu, half, zeros,
                                            zeros, False)
            passed = ~(x * 0.5 <= 0) if relu else torch.ones_like(x, dtype=torch.bool)
            expect = 0.5 * torch.where(passed, dy, torch.zeros_like(dy))
            assert torch.isfinite(dx).all(), f"relu={relu}: dx not finite"
            torch.testing.assert_close(dx, expect)


@pytest.mark.gpu
def test_eval_dx_stays_finite_with_nonfinite_input(ext):
    _check_eval_dx_with_nonfinite_x(torch.ops.fastres, "cuda")


@pytest.mark.gpu
def test_bad_input_gets_a_clear_error(ext):
    x = torch.randn(2, 8, 4, 4, device="cuda")
    c = torch.zeros(8, device="cuda")
    ops = torch.ops.fastres
    with pytest.raises(RuntimeError, match="must be 4-D"):
        ops.bn_stats_cuda(x[0])
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        ops.bn_stats_cuda(x.double())
    with pytest.raises(RuntimeError, match="dense NCHW"):
        ops.bn_stats_cuda(x[:, ::2])
    with pytest.raises(RuntimeError, match=r"must be a contiguous \[C\]"):
        ops.bn_apply_cuda(x, c[:4], c, c, None, True)
    with pytest.raises(RuntimeError, match="must be float32"):
        ops.bn_apply_cuda(x, c.half(), c, c, None, True)
    with pytest.raises(RuntimeError, match="dy must be dense in x's memory order"):
        ops.bn_backward_reduce_cuda(x.contiguous(memory_format=torch.channels_last), x, c, c, c,
                                    None, True)
    with pytest.raises(RuntimeError, match="residual has shape"):
        ops.bn_apply_cuda(x, c, c, c, x[:1], True)
    with pytest.raises(RuntimeError, match="need CUDA tensors|is on cpu"):
        ops.bn_apply_cuda(x, c.cpu(), c, c, None, True)


# --------------------------------------------------------------------------------------------------
# The CUDA kernels and their host code on CPU, through the test-only emulator in csrc/emulator/
# (ucontext fibers for CUDA threads, one OS thread). Part of the ordinary suite: the emulator is
# compiled once (about 15 s at -O1 on one core) into a cache directory keyed by the hash of csrc/ and
# the toolchain, so later sessions reuse it; skipped, saying why, without a C++ compiler or ninja.
# Checked by the tolerance rule of tests/helpers.py against the GPU's precision class: the
# TorchBackend / torch composition in fp32 (GPU-faithful mode), with fp64 as the reference.

EMULATOR_FLAGS = ["-O1", "-g0"]  # -O1: a third of -O2's compile time; the kernels are tiny here


def _emulator_unavailable() -> str | None:
    if sys.platform != "linux":
        return f"the CUDA emulator needs Linux (ucontext fibers), this is {sys.platform}"
    from torch.utils import cpp_extension

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} is not on PATH) to build the CUDA emulator"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (torch.utils.cpp_extension needs it to build the emulator)"
    return None


def _emulator_key() -> str:
    """Hash of every source the emulator compiles, the flags, torch and the compiler."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path) and path.endswith((".h", ".cpp", ".cu", ".cuh")):
            h.update(os.path.relpath(path, ROOT).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    h.update(" ".join(EMULATOR_FLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(os.environ.get("CXX", "c++").encode())
    return h.hexdigest()[:16]


def build_emulator():
    """Compiles csrc/emulator/emulator.cpp (once per source hash) and loads it: torch.ops.fastres_emu."""
    from torch.utils import cpp_extension

    key = _emulator_key()
    cache = os.environ.get("FASTRES_EMULATOR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fastres", "emulator")
    build_dir = os.path.join(cache, key)
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(name=f"fastres_cuda_emulator_{key}",
                       sources=[os.path.join(ROOT, "csrc", "emulator", "emulator.cpp")],
                       extra_cflags=EMULATOR_FLAGS, extra_include_paths=[os.path.join(ROOT, "csrc")],
                       build_directory=build_dir, is_python_module=False)
    return torch.ops.fastres_emu


@pytest.fixture(scope="session")
def emu():
    why = _emulator_unavailable()
    if why is not None:
        pytest.skip(why)
    return build_emulator()


EMU_SHAPES = ((2, 5, 3, 3), (2, 16, 4, 4), (3, 8, 3, 5), (4, 24, 1, 1), (1, 32, 7, 7),
              (2, 12, 6, 6), (4, 64, 9, 9), (2, 16, 8, 8), (3, 1, 5, 5))


def _emu_inputs(shape, dtype, layout, misalign=False, special=None, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format

    def make(scale=1.0, offset=0.0):
        t = (torch.randn(shape, generator=g) * scale + offset).to(device)
        if misalign:  # a data pointer off the 16-byte grid: the scalar path must take it
            flat = torch.empty(t.numel() + 1, dtype=dtype, device=device)
            v = flat[1:].view(tuple(t.permute(0, 2, 3, 1).shape) if layout == "nhwc" else shape)
            v = v.permute(0, 3, 1, 2) if layout == "nhwc" else v
            v.copy_(t)
            assert v.is_contiguous(memory_format=fmt) and v.data_ptr() % 16 != 0
            return v
        return t.to(dtype).contiguous(memory_format=fmt)

    x = make(2.0, 1e3 if special == "large_mean" else 0.5)
    if special == "nonfinite":
        x[0, 0, 0, 0] = float("nan")
        if shape[1] > 1:
            x[-1, 1, -1, -1] = float("inf")
    c = shape[1]
    per_channel = [torch.randn(c, generator=g).to(device) for _ in range(5)]
    mean = x.float().mean(dim=(0, 2, 3)).nan_to_num(0.0, 0.0, 0.0) + per_channel[0] * 0.1
    scale = torch.rand(c, generator=g).to(device) + 0.5
    return x, make(), make(), mean.contiguous(), scale, *per_channel[1:]


def welford_fp32(x, seed=None):
    """Per-channel (mean, M2) by Welford's update in fp32 over x's elements in (N, H, W) order:
    eager CUDA's statistics algorithm (batch_norm_collect_statistics keeps a Welford state in fp32 per
    thread), hence the GPU precision class of the batch statistics. torch.var on CPU float tensors
    accumulates in double and would hold the kernels to a precision eager's GPU kernels don't have
    (an fp32 Welford mean rounds at the ulp of a large mean)."""
    v = x.float().permute(1, 0, 2, 3).reshape(x.shape[1], -1)
    if seed is not None:  # another legitimate element order (a GPU's order follows its geometry)
        v = v[:, torch.randperm(v.shape[1], generator=torch.Generator().manual_seed(seed))]
    mean = torch.zeros(v.shape[0])
    m2 = torch.zeros(v.shape[0])
    for i in range(v.shape[1]):
        delta = v[:, i] - mean
        mean = mean + delta / (i + 1)
        m2 = m2 + delta * (v[:, i] - mean)
    if v.shape[1] == 0:
        mean, m2 = mean * float("nan"), m2 * float("nan")
    return mean, m2


def _emu_check(emu, x, res, dy, mean, scale, shift, a, k, c, dtype, nonfinite=False):
    """The four kernel-level ops of namespace `emu` (torch.ops.fastres_emu, or torch.ops.fastres on a
    GPU) against TorchBackend by helpers.assert_rule: the baseline is TorchBackend in the GPU's
    precision class (fp32 arithmetic: GPU-faithful mode), the reference TorchBackend in fp64."""
    from fastres.ops.batch_norm_act import TorchBackend as TB

    d = lambda t: None if t is None else t.double()  # noqa: E731

    def fp32_class(fn, *args):
        with gpu_faithful():
            return fn(*args)

    m, m2 = emu.bn_stats_cuda(x)
    m_32, m2_32 = (t.to(x.device) for t in welford_fp32(x.cpu()))
    # Eager's GPU precision class of a per-channel reduction: the largest error over legitimate fp32
    # orders (Welford as eager CUDA, in FP32_ORDERS element orders, and fp32 sums in FP32_ORDERS orders; see helpers.eager_orders:
    # one order's error in one channel is rounding luck).
    rows = channel_rows(x)
    mean_class, m2_class = [m_32], [m2_32]
    for seed in range(1, FP32_ORDERS):
        m_k, m2_k = welford_fp32(x.cpu(), seed)
        mean_class.append(m_k.to(x.device))
        m2_class.append(m2_k.to(x.device))
    for order in range(FP32_ORDERS):
        with fp32_order(order):
            mean_k = fp32_sum(rows) / max(rows.shape[0], 1)
            mean_class.append(mean_k)
            m2_class.append(fp32_sum((rows - mean_k) ** 2))
    m_ref, m2_ref = TB.batch_stats(d(x))
    if nonfinite:
        # A channel holding +Inf: Welford's merge gives NaN (as eager CUDA's Welford does), a sum Inf.
        assert torch.equal(torch.isfinite(m), torch.isfinite(m_32)), "mean: non-finite channels"
        assert torch.equal(torch.isfinite(m2), torch.isfinite(m2_32)), "m2: non-finite channels"
    else:
        assert_rule(m, mean_class, m_ref, name="mean")
        assert_rule(m2, m2_class, m2_ref, name="m2")
    for r, relu in ((None, False), (None, True), (res, True), (res, False)):
        y = emu.bn_apply_cuda(x, mean, scale, shift, r, relu)
        y_32 = fp32_class(TB.apply, x, mean, scale, shift, r, relu)
        y_ref = TB.apply(d(x), d(mean), d(scale), d(shift), d(r), relu)
        assert y.stride() == y_32.stride(), "apply: output layout differs from x's"
        assert_rule(y, y_32, y_ref, name=f"y relu={relu} residual={r is not None}")
        s1, s2 = emu.bn_backward_reduce_cuda(dy, x, mean, scale, shift, r, relu)
        t1, t2 = fp32_class(TB.backward_reduce, dy, x, mean, scale, shift, r, relu)
        g = fp32_class(TB._masked_grad, dy, x, mean, scale, shift, r, relu).float()
        g_rows, gx_rows = channel_rows(g), channel_rows(g * (x.float() - TB._c(mean.float())))
        t1, t2 = [t1], [t2]
        for order in range(FP32_ORDERS):
            with fp32_order(order):
                t1.append(fp32_sum(g_rows))
                t2.append(fp32_sum(gx_rows))
        u1, u2 = TB.backward_reduce(d(dy), d(x), d(mean), d(scale), d(shift), d(r), relu)
        assert_rule(s1, t1, u1, name="sum_dy")
        assert_rule(s2, t2, u2, name="sum_dy_xc")
        for need_dres in (False, True):
            dx, dres = emu.bn_backward_dx_cuda(dy, x, mean, scale, shift, r, relu, a, k, c,
                                               need_dres)
            dx_32, dres_32 = fp32_class(TB.backward_dx, dy, x, mean, scale, shift, r, relu, a, k, c,
                                        need_dres)
            dx_ref, _ = TB.backward_dx(d(dy), d(x), d(mean), d(scale), d(shift), d(r), relu, d(a),
                                       d(k), d(c), False)
            assert dx.stride() == dx_32.stride(), "dx: output layout differs from x's"
            assert_rule(dx, dx_32, dx_ref, name="dx")
            if need_dres:
                assert dres.stride() == dx_32.stride() and torch.equal(dres, dres_32), "dresidual"
            else:
                assert dres.numel() == 0


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kernels_match_torch_backend(emu, dtype, layout):
    for shape in EMU_SHAPES:
        _emu_check(emu, *_emu_inputs(shape, dtype, layout), dtype)


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kernels_special_inputs(emu, dtype, layout):
    for shape in ((2, 16, 4, 4), (2, 5, 3, 3)):
        _emu_check(emu, *_emu_inputs(shape, dtype, layout, misalign=True), dtype)
        _emu_check(emu, *_emu_inputs(shape, dtype, layout, special="large_mean"), dtype)
        _emu_check(emu, *_emu_inputs(shape, dtype, layout, special="nonfinite"), dtype,
                   nonfinite=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_more_splits_than_finalize_lanes(emu, dtype, monkeypatch):
    # 5 "SMs": 40 blocks per wave, 34 (bf16) or 40 (fp32) row splits, over the 32 lanes per channel of
    # the finalize kernels, so their strided loop and tree merge both run.
    monkeypatch.setenv("FASTRES_EMULATE_SMS", "5")
    _emu_check(emu, *_emu_inputs((4, 64, 33, 33), dtype, "nhwc"), dtype)


def test_emulated_eval_dx_stays_finite_with_nonfinite_input(emu):
    _check_eval_dx_with_nonfinite_x(emu, "cpu")


def test_emulated_kernels_are_deterministic_and_handle_empty(emu):
    x, res, dy, mean, scale, shift, a, k, c = _emu_inputs((8, 64, 9, 9), torch.bfloat16, "nhwc")
    for _ in range(2):
        first = [*emu.bn_stats_cuda(x), *emu.bn_backward_reduce_cuda(dy, x, mean, scale, shift, res,
                                                                    True)]
        second = [*emu.bn_stats_cuda(x), *emu.bn_backward_reduce_cuda(dy, x, mean, scale, shift,
                                                                     res, True)]
        assert all(torch.equal(p, q) for p, q in zip(first, second))
    empty = torch.empty(0, 4, 3, 3)
    m, m2 = emu.bn_stats_cuda(empty)
    assert torch.isnan(m).all() and torch.isnan(m2).all()
    s1, s2 = emu.bn_backward_reduce_cuda(empty, empty, *[torch.zeros(4)] * 3, None, True)
    assert torch.equal(s1, torch.zeros(4)) and torch.equal(s2, torch.zeros(4))
    assert emu.bn_apply_cuda(empty, *[torch.zeros(4)] * 3, None, True).shape == empty.shape


# --------------------------------------------------------------------------------------------------
# The whole-op contract (bn_forward_train_cuda, bn_forward_eval_cuda, bn_backward_cuda), emulated,
# against eager's composition in the GPU's precision class (fp32 arithmetic, eager's rounding points,
# fp32 Welford statistics) and in fp64, by helpers.assert_rule.

_DIMS = (0, 2, 3)


def bn_composition(x, weight, bias, residual, running_mean, running_var, factor, eps, relu,
                   training, dy, cd):
    """Eager BN (+ add) (+ ReLU) and its backward as explicit torch ops computing in `cd`: fp32 is
    eager CUDA's precision class (fp32 Welford statistics, the BN output rounded to x's dtype before
    the add, as eager's separate ops round); fp64 is the reference (no rounding)."""
    ref = cd == torch.float64
    low = cd if ref else x.dtype
    c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
    xf = x.to(cd)
    count = x.numel() // x.shape[1]
    if training:
        if ref:
            mean = xf.mean(_DIMS)
            m2 = ((xf - c(mean)) ** 2).sum(_DIMS)
        else:
            mean, m2 = welford_fp32(x)
        invstd = 1 / torch.sqrt(m2 / count + eps)
    else:
        mean = running_mean.to(cd)
        invstd = 1 / torch.sqrt(running_var.to(cd) + eps)
    w = torch.ones_like(invstd) if weight is None else weight.to(cd)
    b = torch.zeros_like(invstd) if bias is None else bias.to(cd)
    xc = xf - c(mean)
    y = (xc * c(invstd * w) + c(b)).to(low)
    if residual is not None:
        y = y + residual.to(low)
    if relu:
        y = torch.relu(y)
    g = dy.to(cd)
    if relu:
        g = torch.where(y <= 0, torch.zeros_like(g), g)
    sum_dy, sum_dy_xhat = g.sum(_DIMS), (g * xc).sum(_DIMS) * invstd
    a = w * invstd
    if training:
        dx = c(a) * (g - c(sum_dy / count) - xc * c(invstd * sum_dy_xhat / count))
    else:
        dx = c(a) * g
    out = dict(y=y, invstd=invstd, dx=dx.to(low), dres=g.to(low))
    if training:
        out["mean"] = mean
    if weight is not None:
        out["dweight"] = sum_dy_xhat.to(cd if ref else weight.dtype)
    if bias is not None:
        out["dbias"] = sum_dy.to(cd if ref else bias.dtype)
    if training and running_mean is not None:
        rdt = cd if ref else running_mean.dtype
        out["running_mean"] = ((1 - factor) * running_mean.to(cd) + factor * mean).to(rdt)
        out["running_var"] = ((1 - factor) * running_var.to(cd)
                              + factor * m2 / (count - 1)).to(rdt)
    return out


WHOLE_OP_CASES = {
    # name: (shape, training, residual, relu, affine, running-stats dtype, momentum)
    "train_res_relu": ((2, 16, 4, 4), True, True, True, True, torch.float32, 0.1),
    "train_relu_noaffine_nostats": ((2, 5, 3, 3), True, False, True, False, None, 0.1),
    "train_res_cumulative_half_stats": ((3, 8, 3, 5), True, True, False, True, "half", None),
    "eval_res_relu": ((2, 16, 4, 4), False, True, True, True, torch.float32, 0.1),
    "eval_relu_noaffine_half_stats": ((4, 24, 1, 1), False, False, True, False, "half", 0.1),
}


def _whole_op_inputs(case, dtype, layout, seed=0):
    shape, training, residual, relu, affine, stats_dtype, momentum = WHOLE_OP_CASES[case]
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    C = shape[1]
    make = lambda: (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).contiguous(  # noqa: E731
        memory_format=fmt)
    # fp16/bf16 parameters for the half-statistics case: the kernels read any of the three.
    pdt = dtype if stats_dtype == "half" else torch.float32
    sdt = (torch.float16 if dtype == torch.float32 else dtype) if stats_dtype == "half" else stats_dtype
    return dict(
        x=make(), residual=make() if residual else None, dy=make(),
        weight=(torch.randn(C, generator=g) + 1).to(pdt) if affine else None,
        bias=torch.randn(C, generator=g).to(pdt) if affine else None,
        running_mean=torch.randn(C, generator=g).to(sdt) if sdt is not None else None,
        running_var=(torch.rand(C, generator=g) + 0.5).to(sdt) if sdt is not None else None,
        num_batches_tracked=torch.tensor(3, dtype=torch.long),
        momentum=momentum, training=training, relu=relu)


def _run_whole_op(emu, k):
    """The three ops on inputs k (running statistics cloned): {name: tensor}."""
    rm = None if k["running_mean"] is None else k["running_mean"].clone()
    rv = None if k["running_var"] is None else k["running_var"].clone()
    cumulative = k["momentum"] is None
    out = {}
    if k["training"]:
        y, mean, invstd = emu.bn_forward_train_cuda(
            k["x"], k["weight"], k["bias"], k["residual"], rm, rv,
            k["num_batches_tracked"] if cumulative else None, 0.0 if cumulative else k["momentum"],
            cumulative, 1e-5, k["relu"])
        out.update(y=y, mean=mean, invstd=invstd)
        if rm is not None:
            out.update(running_mean=rm, running_var=rv)
    else:
        y, invstd = emu.bn_forward_eval_cuda(k["x"], k["weight"], k["bias"], k["residual"], rm, rv,
                                             1e-5, k["relu"])
        out.update(y=y, invstd=invstd)
        mean = rm
    dx, dres, dweight, dbias = emu.bn_backward_cuda(
        k["dy"], k["x"], k["weight"], k["bias"], k["residual"], mean, invstd, k["relu"],
        k["training"], True, True, k["weight"] is not None, k["bias"] is not None)
    out.update(dx=dx, dres=dres)
    if k["weight"] is not None:
        out.update(dweight=dweight, dbias=dbias)
    return out


def _check_whole_op(emu, case, dtype, layout):
    k = _whole_op_inputs(case, dtype, layout)
    got = _run_whole_op(emu, k)
    factor = 1 / 3 if k["momentum"] is None else k["momentum"]
    args = [k[n] for n in ("x", "weight", "bias", "residual", "running_mean", "running_var")]
    rest = (factor, 1e-5, k["relu"], k["training"], k["dy"])
    eager = bn_composition(*args, *rest, torch.float32)
    ref = bn_composition(*args, *rest, torch.float64)
    assert sorted(got) == sorted(eager), f"{case}: outputs {sorted(got)} vs {sorted(eager)}"
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    for name in got:
        if got[name].dim() == 4:
            assert got[name].is_contiguous(memory_format=fmt), f"{case} {name}: lost x's layout"
        assert_rule(got[name], eager[name], ref[name], name=f"{case} {dtype} {layout} {name}")


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(WHOLE_OP_CASES))
def test_emulated_whole_op_matches_eager(emu, case, dtype, layout):
    _check_whole_op(emu, case, dtype, layout)


def _launches(emu):
    log = emu.emulated_launch_log()
    return [tuple(log[i:i + 4]) for i in range(0, len(log), 4)]


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_emulated_whole_op_launch_counts(emu, layout):
    """Training forward: exactly 3 launches (partial statistics, finalize, apply); eval: 1; backward:
    3 in training, 1 for an eval dx; and nothing but allocations besides."""
    k = _whole_op_inputs("train_res_relu", torch.bfloat16, layout)
    _launches(emu)
    rm, rv = k["running_mean"].clone(), k["running_var"].clone()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y, mean, invstd = emu.bn_forward_train_cuda(k["x"], k["weight"], k["bias"], k["residual"],
                                                    rm, rv, None, 0.1, False, 1e-5, True)
        assert len(_launches(emu)) == 3
        emu.bn_forward_eval_cuda(k["x"], k["weight"], k["bias"], k["residual"], rm, rv, 1e-5, True)
        assert len(_launches(emu)) == 1
        emu.bn_backward_cuda(k["dy"], k["x"], k["weight"], k["bias"], k["residual"], mean, invstd,
                             True, True, True, True, True, True)
        assert len(_launches(emu)) == 3
        emu.bn_backward_cuda(k["dy"], k["x"], k["weight"], k["bias"], k["residual"], rm, invstd,
                             True, False, True, True, False, False)
        assert len(_launches(emu)) == 1
    aten = {e.name for e in prof.events() if e.name.startswith("aten::")}
    assert aten <= {"aten::empty", "aten::empty_strided"}, f"ATen ops besides allocations: {aten}"


def test_emulated_finalize_merges_more_partials_than_lanes(emu, monkeypatch):
    """80 image splits (planar, one channel) over the finalize block's 64 lanes: its strided loop and
    tree merge both run, and no finalize thread merges more than 64 partials."""
    monkeypatch.setenv("FASTRES_EMULATE_SMS", "20")
    x = torch.randn(80, 1, 3, 3) * 3 + 2
    rm, rv = torch.zeros(1), torch.ones(1)
    _launches(emu)
    y, mean, invstd = emu.bn_forward_train_cuda(x, None, None, None, rm, rv, None, 0.1, False, 1e-5,
                                                False)
    stats, finalize, _ = _launches(emu)
    splits, lanes = stats[1], finalize[3]
    assert splits == 80 and lanes == 64 and -(-splits // lanes) <= 64
    m_32, m2_32 = welford_fp32(x)
    m_ref = x.double().mean(_DIMS)
    assert_rule(mean, m_32, m_ref, name="mean")
    inv_ref = 1 / torch.sqrt(x.double().var(_DIMS, correction=0) + 1e-5)
    assert_rule(invstd, 1 / torch.sqrt(m2_32 / x[:, 0].numel() + 1e-5), inv_ref, name="invstd")
