"""The C++/CUDA extension fastres._C and the "cuda" backend.

Without a GPU (CI): the extension is built and imports whenever a CUDA toolkit is present, its four ops
are registered with the expected schemas, CPU tensors get a clear error, a missing or broken extension
never breaks ``import fastres``, and set_backend("cuda") says why it is unavailable.
With a GPU (``gpu`` marker): the cuda backend against eager and against triton by the tolerance rule on
the foundation shape families, kernel-level checks against TorchBackend, bitwise determinism.
"""
from __future__ import annotations

import glob
import importlib
import itertools
import logging
import os
import subprocess
import sys

import pytest
import torch

import fastres
from fastres import _toolkit, backend
from helpers import assert_rule, make_case, run_three

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("bn_stats_cuda", "bn_apply_cuda", "bn_backward_reduce_cuda", "bn_backward_dx_cuda")
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
        assert "loaded from" in line and all(op in line for op in OPS)
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


def _floor(dtype, ref):
    # One unit in the last place of the output's magnitude: the rounding of the result itself.
    scale = max(1.0, ref[torch.isfinite(ref)].abs().max().item()) if torch.isfinite(ref).any() else 1.0
    return torch.finfo(dtype).eps * scale


def _err(a, ref):
    a, ref = a.double(), ref.double()
    finite = torch.isfinite(ref) & torch.isfinite(a)
    return (a[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0


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
                       dtype)


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
# (ucontext fibers for CUDA threads, one OS thread). Opt-in (FASTRES_EMULATE_CUDA=1): it compiles
# the extension once more as plain C++ (about a minute). Checked against TorchBackend by the tolerance rule at kernel
# level: err(kernel vs fp64 TorchBackend) <= 2 * err(fp32 TorchBackend vs fp64) + floor.

emulated = pytest.mark.skipif(os.environ.get("FASTRES_EMULATE_CUDA") != "1",
                              reason="set FASTRES_EMULATE_CUDA=1 to run the CUDA kernels on the CPU "
                                     "emulator (builds csrc/emulator/, about a minute)")


@pytest.fixture(scope="module")
def emu():
    from torch.utils import cpp_extension

    cpp_extension.load(name="fastres_cuda_emulator",
                       sources=[os.path.join(ROOT, "csrc", "emulator", "emulator.cpp")],
                       extra_cflags=["-O1", "-g0"], extra_include_paths=[os.path.join(ROOT, "csrc")],
                       is_python_module=False)
    return torch.ops.fastres_emu


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


def _rule(name, got, fp32, ref, floor, exact_nan=True):
    assert got.shape == ref.shape and got.dtype == fp32.dtype, name
    if exact_nan:
        assert torch.equal(torch.isnan(got), torch.isnan(fp32)), f"{name}: NaN positions differ"
    assert torch.equal(torch.isfinite(got), torch.isfinite(fp32)), f"{name}: Inf/NaN positions differ"
    e_got, e_fp32 = _err(got, ref), _err(fp32, ref)
    assert e_got <= 2 * e_fp32 + floor, f"{name}: err {e_got:.3e} > 2 * {e_fp32:.3e} + {floor:.1e}"


def _finite_abs(t):
    t = t.double().abs()
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _sum_floor(terms):
    """eps32 * max_c sum|terms|: the rounding floor of an fp32 reduction. CPU torch reduces more
    accurately than eager CUDA (pairwise, vectorised); this floor stands in for that difference."""
    return torch.finfo(torch.float32).eps * _finite_abs(terms).sum(dim=(0, 2, 3)).max().item()


def _emu_check(emu, x, res, dy, mean, scale, shift, a, k, c, dtype):
    """emu: the namespace of the four ops (torch.ops.fastres_emu, or torch.ops.fastres on a GPU)."""
    from fastres.ops.batch_norm_act import TorchBackend as TB

    d = lambda t: None if t is None else t.double()  # noqa: E731
    eps32 = torch.finfo(torch.float32).eps
    m, m2 = emu.bn_stats_cuda(x)
    m_ref, m2_ref = TB.batch_stats(d(x))
    m_32, m2_32 = TB.batch_stats(x)
    x_max = _finite_abs(x).max().item()
    # A channel holding +Inf: Welford's merge gives NaN (as eager CUDA's Welford does), a sum Inf.
    _rule("mean", m, m_32, m_ref, 2 * eps32 * x_max, exact_nan=False)
    # fp32 Welford rounds x - mean at the ulp of |x|: the floor of a stable fp32 variance.
    _rule("m2", m2, m2_32, m2_ref, 2 * x_max * _sum_floor(d(x) - m_ref.view(1, -1, 1, 1)))
    xc = d(x) - d(mean).view(1, -1, 1, 1)
    for r, relu in ((None, False), (None, True), (res, True), (res, False)):
        y = emu.bn_apply_cuda(x, mean, scale, shift, r, relu)
        y_32 = TB.apply(x, mean, scale, shift, r, relu)
        y_ref = TB.apply(d(x), d(mean), d(scale), d(shift), d(r), relu)
        assert y.stride() == y_32.stride(), "apply: output layout differs from x's"
        _rule("y", y, y_32, y_ref, _floor(dtype, y_ref))
        s1, s2 = emu.bn_backward_reduce_cuda(dy, x, mean, scale, shift, r, relu)
        t1, t2 = TB.backward_reduce(dy, x, mean, scale, shift, r, relu)
        u1, u2 = TB.backward_reduce(d(dy), d(x), d(mean), d(scale), d(shift), d(r), relu)
        _rule("sum_dy", s1, t1, u1, _sum_floor(dy))
        _rule("sum_dy_xc", s2, t2, u2, _sum_floor(d(dy) * xc))
        for need_dres in (False, True):
            dx, dres = emu.bn_backward_dx_cuda(dy, x, mean, scale, shift, r, relu, a, k, c,
                                               need_dres)
            dx_32, dres_32 = TB.backward_dx(dy, x, mean, scale, shift, r, relu, a, k, c, need_dres)
            dx_ref, _ = TB.backward_dx(d(dy), d(x), d(mean), d(scale), d(shift), d(r), relu, d(a),
                                       d(k), d(c), False)
            assert dx.stride() == dx_32.stride(), "dx: output layout differs from x's"
            _rule("dx", dx, dx_32, dx_ref, _floor(dtype, dx_ref))
            if need_dres:
                assert dres.stride() == dx_32.stride() and torch.equal(dres, dres_32), "dresidual"
            else:
                assert dres.numel() == 0


@emulated
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kernels_match_torch_backend(emu, dtype, layout):
    for shape in EMU_SHAPES:
        _emu_check(emu, *_emu_inputs(shape, dtype, layout), dtype)


@emulated
@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kernels_special_inputs(emu, dtype, layout):
    for shape in ((2, 16, 4, 4), (2, 5, 3, 3)):
        _emu_check(emu, *_emu_inputs(shape, dtype, layout, misalign=True), dtype)
        _emu_check(emu, *_emu_inputs(shape, dtype, layout, special="large_mean"), dtype)
        _emu_check(emu, *_emu_inputs(shape, dtype, layout, special="nonfinite"), dtype)


@emulated
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_more_splits_than_finalize_lanes(emu, dtype, monkeypatch):
    # 5 "SMs": 40 blocks per wave, 34 (bf16) or 40 (fp32) row splits, over the 32 lanes per channel of
    # the finalize kernels, so their strided loop and tree merge both run.
    monkeypatch.setenv("FASTRES_EMULATE_SMS", "5")
    _emu_check(emu, *_emu_inputs((4, 64, 33, 33), dtype, "nhwc"), dtype)


@emulated
def test_emulated_eval_dx_stays_finite_with_nonfinite_input(emu):
    _check_eval_dx_with_nonfinite_x(emu, "cpu")


@emulated
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
