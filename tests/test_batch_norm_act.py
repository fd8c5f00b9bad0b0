"""fastres.functional.batch_norm_act against eager F.batch_norm (+ residual) (+ ReLU), by the tolerance
rule (tests/helpers.py), for the output, every gradient and the running statistics. On CPU the
Triton kernels run under TRITON_INTERPRET=1 (tests/conftest.py); the tests taking ``precision_mode``
run twice, the second time in GPU-faithful mode (fp32 accumulation, the CUDA launch configuration at
132 SMs) against eager's fp32-accumulating composition."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastres
import fastres.triton.batch_norm_act as tbn
from fastres.functional import batch_norm_act
from helpers import (assert_rule, assert_three, channel_rows, fp32_sum, make_case,
                     run_three)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
SHAPES = {
    "basic": (4, 5, 3, 3),
    "C_over_block": (2, 130, 3, 2),  # two channel blocks, the second partial
    "NHW_odd": (3, 7, 3, 5),
    "HW1": (6, 9, 1, 1),
    "batch1": (1, 6, 3, 4),
}
GPU_SHAPES = {"resnet_like": (8, 64, 14, 14), "C_odd": (4, 131, 9, 7), "HW1": (32, 72, 1, 1)}


@pytest.fixture(params=["triton"])
def backend(request):
    with fastres.use_backend(request.param):
        yield request.param


@pytest.fixture
def small_tiles(monkeypatch):
    """Force several chunks per program and several programs per channel block; the reductions
    step over 2 rows at a time, pipelined (the interpreter runs tl.range's num_stages as a loop)."""
    def config(M, C, nhwc, device):
        return dict(BLOCK_R=4, BLOCK_C=4, target_programs=6, num_warps=1, REDUCE_BLOCK_R=2,
                    reduce_num_warps=1, reduce_num_stages=3)
    monkeypatch.setattr(tbn, "launch_config", config)


def _check(shape, dtype, device="cpu", what="", **kw):
    case = {k: kw.pop(k) for k in ("channels_last", "residual", "affine", "stats", "mean", "std",
                                   "seed") if k in kw}
    x, tensors = make_case(shape, dtype, device=device, **case)
    assert_three(run_three(x, **tensors, **kw), what)


# --------------------------------------------------------------------------------------------------
# Equivalence across the shape families, layouts and switches.


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
@pytest.mark.parametrize("activation", ["relu", None], ids=["relu", "noact"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fp32_families(backend, precision_mode, shape_name, channels_last, residual, activation, training):
    _check(SHAPES[shape_name], torch.float32, channels_last=channels_last, residual=residual,
           activation=activation, training=training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape_name", ["basic", "C_over_block", "NHW_odd"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_half_dtypes(backend, precision_mode, dtype, shape_name, channels_last, training):
    _check(SHAPES[shape_name], dtype, channels_last=channels_last, residual=True,
           activation="relu", training=training)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_params_in_activation_dtype(backend, precision_mode, dtype):
    x, kw = make_case((3, 6, 4, 3), dtype, channels_last=True, residual=True)
    assert_three(run_three(x, **kw, param_dtype=dtype))


@pytest.mark.parametrize("momentum", [0.0, 0.1, 0.5, 1.0])
def test_momentum(backend, precision_mode, momentum):
    _check((3, 5, 2, 3), torch.float32, momentum=momentum)


def test_momentum_none_is_rejected_like_eager(backend):
    x, kw = make_case((2, 3, 2, 2), torch.float32)
    with pytest.raises(TypeError, match="momentum"):
        batch_norm_act(x, kw["running_mean"], kw["running_var"], training=True, momentum=None)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_affine_off(backend, precision_mode, training):
    _check((3, 5, 2, 3), torch.float32, affine=False, residual=True, training=training)


def test_running_stats_off(backend, precision_mode):
    _check((3, 5, 2, 3), torch.float32, stats=False, residual=True, training=True)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_large_mean_input(backend, precision_mode, channels_last, dtype):
    """Mean 1e3, std 1: Σx² − (Σx)² would lose every digit; a shifted Chan merge must not."""
    _check((4, 6, 5, 5), dtype, channels_last=channels_last, mean=1e3, std=1.0, residual=True)


class NaiveVariancePartials:
    """A deliberate bug, injected at run time: the partial-statistics kernel's M2 replaced by
    Σx² − (Σx)²/n, computed in the kernel's accumulation dtype (fp32 with fp32 accumulation in
    GPU-faithful mode, fp64 otherwise). Wraps the kernel object the launcher looks up."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            launch(*args, **kwargs)
            a = dict(zip(self.kernel.arg_names, args), **kwargs)
            x, part_m2 = a["X"], a["PART_M2"]
            M, C, per = int(a["M"]), int(a["C"]), int(a["rows_per_prog"])
            G = -(-M // per)
            assert part_m2.shape in ((G, C), (C, G)) and G != C, "update the bug's injection"
            rows = channel_rows(x).to(part_m2.dtype)
            for g in range(G):
                chunk = rows[g * per:(g + 1) * per]
                total = fp32_sum if chunk.dtype == torch.float32 else (lambda t: t.sum(0))
                s1, s2 = total(chunk), total(chunk * chunk)
                m2 = s2 - s1 * s1 / chunk.shape[0]
                (part_m2[g] if part_m2.shape == (G, C) else part_m2[:, g]).copy_(m2)
            self.calls += 1

        return run


def test_large_mean_catches_a_naive_variance(backend, precision_mode, monkeypatch):
    """The large-mean test must be able to fail: with Σx² − (Σx)² injected into the statistics it
    fails in GPU-faithful mode (fp32 accumulation loses every digit of var = 1 under mean 1e3).
    In the default CPU mode fp64 accumulation hides the bug — which is why the mode exists."""
    bug = NaiveVariancePartials(tbn._stats_partial_kernel)
    monkeypatch.setattr(tbn, "_stats_partial_kernel", bug)
    x, kw = make_case((4, 6, 5, 5), torch.float32, mean=1e3, std=1.0, residual=True)
    res = run_three(x, **kw)
    assert bug.calls > 0, "the injected kernel did not run: update the injection"
    if precision_mode == "cpu":
        assert_three(res, "naive variance, fp64 accumulation")
    else:
        with pytest.raises(AssertionError, match="fused error"):
            assert_three(res, "naive variance, fp32 accumulation")


def test_multi_chunk_and_multi_program_merge(backend, precision_mode, small_tiles):
    # (3, 5, 3, 3): 45 rows in splits of 16, 16, 13, so the last 2-row step of a program is
    # partial (its masked row must not enter the Welford state).
    for shape in ((2, 6, 5, 3), (3, 5, 3, 3)):
        for channels_last in (False, True):
            _check(shape, torch.float32, channels_last=channels_last, residual=True,
                   mean=50.0, what=f"small tiles, {shape}, channels_last={channels_last}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_nan_inf_propagate_like_eager(backend, precision_mode, small_tiles, channels_last):
    x, kw = make_case((3, 6, 4, 3), torch.float32, channels_last=channels_last, residual=True)
    x = x.clone()
    x[0, 1, 0, 0] = float("nan")
    x[2, 3, 1, 2] = float("inf")
    x[1, 4, 3, 0] = float("-inf")
    kw["residual"][1, 0, 2, 1] = float("nan")  # relu(NaN) must stay NaN, not become 0
    res = run_three(x, **kw)
    assert torch.isnan(res["fused"][0]).any()
    assert_three(res, "nan/inf")


def test_relu_keeps_nan_in_eval(backend):
    x, kw = make_case((2, 3, 2, 2), torch.float32)
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    y = batch_norm_act(x, kw["running_mean"], kw["running_var"], training=False)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.isfinite(y[0, 0, 1:]).all()


def test_non_contiguous_input(backend, precision_mode):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 12, 6, 9, generator=g)
    x = base[:, ::2, 1:5, ::2]  # strided in every dimension
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    res = torch.randn(4, 6, 5, 4, generator=g).permute(0, 1, 3, 2)  # transposed residual
    _, kw = make_case(x.shape, torch.float32)
    kw["residual"] = res
    assert_three(run_three(x, **kw), "non-contiguous")


def test_zero_size_batch(backend):
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    y = batch_norm_act(x, rm, rv, torch.ones(4), torch.zeros(4), training=True)
    assert y.shape == x.shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # eager leaves them untouched
    y.sum().backward()
    assert x.grad.shape == x.shape


# --------------------------------------------------------------------------------------------------
# Determinism, saved tensors, backends.


def test_deterministic_bitwise(backend, small_tiles):
    x, kw = make_case((2, 6, 5, 3), torch.float32, channels_last=True, residual=True)
    runs = [run_three(x, **kw)["fused"] for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("residual", [False, True], ids=["nores", "res"])
def test_saves_only_the_bn_input(backend, residual):
    """Autograd keeps the BN input (plus the residual, for the ReLU mask) and per-channel stats —
    not the normalised or activated tensors."""
    x, kw = make_case((3, 4, 5, 5), torch.bfloat16, channels_last=True, residual=residual)
    x.requires_grad_()
    r = kw["residual"]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch_norm_act(x, kw["running_mean"], kw["running_var"], kw["weight"].requires_grad_(),
                       kw["bias"], training=True, residual=r)
    big = [t for t in saved if t.numel() == x.numel()]
    assert any(t.data_ptr() == x.data_ptr() for t in big)
    assert len(big) == (2 if residual else 1)
    assert sum(t.numel() * t.element_size() for t in big) == len(big) * x.numel() * 2


def test_torch_backend_matches_triton():
    x, kw = make_case((3, 7, 4, 5), torch.float32, channels_last=True, residual=True)
    with fastres.use_backend("torch"):
        a = run_three(x, **kw)["fused"]
    with fastres.use_backend("triton"):
        b = run_three(x, **kw)["fused"]
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)


def test_set_backend_errors():
    with pytest.raises(ValueError, match="unknown fastres backend"):
        fastres.set_backend("tpu")
    if not fastres.backend_status()["cuda"][0]:
        with pytest.raises(RuntimeError, match="unavailable"):
            fastres.set_backend("cuda")
    assert fastres.get_backend() in ("auto", "triton", "torch", "cuda")


def test_auto_backend_runs_on_cpu():
    with fastres.use_backend("auto"):
        _check((2, 3, 2, 2), torch.float32)


def test_float64_only_on_torch_backend(backend):
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64"):
        batch_norm_act(x, None, None, training=True)
    with fastres.use_backend("torch"):
        _check((2, 3, 2, 2), torch.float64, param_dtype=torch.float64)


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "fastres.info"], capture_output=True, text=True,
                         check=True).stdout
    for word in ("torch", "triton", "cuda", "backend"):
        assert word in out


# --------------------------------------------------------------------------------------------------
# Bad input: clear exceptions.


def _good():
    return dict(input=torch.randn(2, 3, 4, 4), running_mean=torch.zeros(3),
                running_var=torch.ones(3), weight=torch.ones(3), bias=torch.zeros(3),
                training=True)


BAD_INPUTS = [
    (dict(input=torch.randn(2, 3, 4)), ValueError, "4-D"),
    (dict(input=torch.randn(2, 3, 4, 4, 1)), ValueError, "4-D"),
    (dict(weight=torch.ones(4)), ValueError, "weight must have shape"),
    (dict(bias=torch.ones(2)), ValueError, "bias must have shape"),
    (dict(running_mean=torch.zeros(5)), ValueError, "running_mean must have shape"),
    (dict(running_var=torch.ones(3, 1)), ValueError, "running_var must have shape"),
    (dict(residual=torch.randn(2, 3, 4, 5)), ValueError, "residual shape"),
    (dict(residual=torch.randn(2, 3, 4, 4, dtype=torch.float64)), TypeError, "residual dtype"),
    (dict(input=torch.randint(0, 5, (2, 3, 4, 4))), TypeError, "float32"),
    (dict(input=torch.randn(2, 3, 4, 4).to(torch.complex64)), TypeError, "float32"),
    (dict(weight=torch.ones(3, dtype=torch.float64)), TypeError, "weight must be float32"),
    (dict(input=torch.randn(1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
    (dict(training=False, running_mean=None, running_var=None), ValueError, "evaluation mode"),
    (dict(running_var=None), ValueError, "both"),
    (dict(activation="gelu"), ValueError, "activation"),
    (dict(weight=[1.0, 1.0, 1.0]), TypeError, "weight must be a Tensor"),
]


@pytest.mark.parametrize("change, exc, match", BAD_INPUTS)
def test_bad_input(backend, change, exc, match):
    kw = _good()
    kw.update(change)
    with pytest.raises(exc, match=match):
        batch_norm_act(**kw)


@pytest.mark.parametrize("change, exc, match", BAD_INPUTS + [
    (dict(weight=torch.ones(3, 1)), ValueError, "weight must have shape"),
    (dict(bias=torch.ones(1, 3)), ValueError, "bias must have shape"),
    (dict(running_mean=torch.zeros(3, dtype=torch.float16)), TypeError,
     "running_mean must be float32"),
    (dict(residual=torch.randn(1, 3, 1, 1)), ValueError, "residual shape"),  # would broadcast
    (dict(running_mean=None), ValueError, "both"),
])
def test_bad_input_auto_on_cpu(change, exc, match):
    """"auto" on CPU runs eager's ops and checks only what they would accept before them (ATen
    checks the rest, before the running statistics change): the same exception as the other
    backends, and the running statistics untouched."""
    kw = _good()
    kw.update(change)
    stats = [t.clone() for t in (kw["running_mean"], kw["running_var"]) if t is not None]
    with fastres.use_backend("auto"), pytest.raises(exc, match=match):
        batch_norm_act(**kw)
    assert all(torch.equal(a, b) for a, b in
               zip(stats, [t for t in (kw["running_mean"], kw["running_var"]) if t is not None]))


@pytest.mark.gpu
def test_device_mismatch():
    kw = _good()
    kw["input"] = kw["input"].cuda()
    with pytest.raises(ValueError, match="is on"):
        batch_norm_act(**kw)
    kw = _good()
    kw["residual"] = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(ValueError, match="residual is on"):
        batch_norm_act(**kw)


# --------------------------------------------------------------------------------------------------
# opcheck and torch.compile.


def _opcheck_samples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, 2, generator=g).to(memory_format=torch.channels_last)
    r = torch.randn(2, 3, 3, 2, generator=g).to(memory_format=torch.channels_last)
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    rm, rv = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    mean, invstd = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    dy = torch.randn(2, 3, 3, 2, generator=g)
    ops = torch.ops.fastres
    nbt = torch.tensor(3)
    return [
        (ops.batch_norm_stats.default, (x.clone().requires_grad_(),)),
        # A mutating op (its autograd is BatchNormActFunction): opcheck with plain tensors.
        (ops.batch_norm_act.default, (x, w, b, r, rm, rv, None, 0.1, True, 1e-5, True)),
        (ops.batch_norm_act.default, (x, w, b, None, rm, rv, nbt, None, True, 1e-5, True)),
        (ops.batch_norm_act.default, (x.contiguous(), None, None, None, rm, rv, None, None, False,
                                      1e-3, False)),
        (ops.batch_norm_act_backward.default, (dy, x, w, b, r, mean, invstd, True, True, True,
                                               True, True, True)),
        (ops.batch_norm_act_backward.default, (dy, x, w, None, None, mean, invstd, False, False,
                                               True, False, True, False)),
        # mask_from_output: the residual slot holds the output y
        (ops.batch_norm_act_backward.default, (dy, x, w, b, torch.relu(r), mean, invstd, True,
                                               True, True, True, True, True, True)),
        (ops.batch_norm_act_backward_reduce.default, (dy, x, mean, invstd, w, b, r, True)),
        (ops.batch_norm_act_backward_dx.default, (dy, x, mean, invstd, w, b, r, mean * 0.1,
                                                  invstd * 0.1, True, True)),
    ]


@pytest.mark.parametrize("index", range(9))
def test_opcheck(backend, index):
    op, args = _opcheck_samples()[index]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph(backend, training):
    torch._dynamo.reset()
    x, kw = make_case((3, 5, 4, 4), torch.float32, channels_last=True, residual=True)

    def step(x, r, w, b, rm, rv):
        return batch_norm_act(x, rm, rv, w, b, training, 0.1, 1e-5, r, "relu")

    outs = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        xx = x.clone().requires_grad_()
        rr = kw["residual"].clone().requires_grad_()
        ww, bb = kw["weight"].clone().requires_grad_(), kw["bias"].clone().requires_grad_()
        rm, rv = kw["running_mean"].clone(), kw["running_var"].clone()
        y = fn(xx, rr, ww, bb, rm, rv)
        grads = torch.autograd.grad(y, (xx, rr, ww, bb), kw["grad_out"])
        outs.append([y, *grads, rm, rv])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# GPU: the same checks on CUDA tensors (skipped without a GPU).


@pytest.mark.gpu
@pytest.mark.parametrize("shape_name", list(GPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gpu_equivalence(backend, shape_name, dtype, channels_last, training):
    _check(GPU_SHAPES[shape_name], dtype, device="cuda", channels_last=channels_last,
           residual=True, training=training)
    _check(GPU_SHAPES[shape_name], dtype, device="cuda", channels_last=channels_last,
           residual=False, activation=None, training=training)


@pytest.mark.gpu
def test_gpu_large_mean_and_determinism(backend):
    _check((16, 64, 28, 28), torch.float32, device="cuda", channels_last=True, mean=1e3)
    x, kw = make_case((16, 64, 28, 28), torch.bfloat16, device="cuda", channels_last=True,
                      residual=True)
    a, b = run_three(x, **kw)["fused"], run_three(x, **kw)["fused"]
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.gpu
def test_gpu_int64_offsets(backend):
    """More than 2^31 elements: offsets must be 64-bit."""
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    x = torch.randn(2**31 // (64 * 64) + 64, 8, 64, 8, device="cuda", dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last)
    assert x.numel() > 2**31
    y = batch_norm_act(x, None, None, training=True, activation=None)
    mean = x.float().mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    var = x.float().var(dim=(0, 2, 3), correction=0).view(1, -1, 1, 1)
    tail = x[-4:].float()  # elements past offset 2^31
    expect = (tail - mean) * torch.rsqrt(var + 1e-5)
    torch.testing.assert_close(y[-4:].float(), expect, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(backend):
    """No host sync in forward/backward: the whole step captures in a CUDA graph."""
    x, kw = make_case((8, 32, 8, 8), torch.bfloat16, device="cuda", channels_last=True,
                      residual=True)
    x.requires_grad_()
    w = kw["weight"].requires_grad_()

    def step():
        y = batch_norm_act(x, kw["running_mean"], kw["running_var"], w, kw["bias"], True,
                           residual=kw["residual"])
        y.backward(kw["grad_out"].to(y.dtype))
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = step()
    g.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(y.float()).all()


def test_bf16_output_rounds_to_nearest_even(backend):
    """The kernels round fp32 → bf16 to nearest even (the interpreter's own cast truncates)."""
    x, kw = make_case((4, 64, 3, 3), torch.bfloat16, channels_last=True)
    C = x.shape[1]
    mean, scale, shift = torch.zeros(C), torch.full((C,), 1.37), torch.full((C,), 0.01)
    y = tbn.apply(x, mean, scale, shift, None, False)
    expect = (x.float() * 1.37 + 0.01).to(torch.bfloat16)
    assert torch.equal(y, expect)


# --------------------------------------------------------------------------------------------------
# mask_from_output: the saved output y, loaded in the residual's place, gives backward's ReLU mask.


def _saved_storages(fn):
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, set(saved)


@pytest.mark.parametrize("backend_name", ["torch", "triton", "triton-faithful"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("res_grad", [True, False], ids=["dres", "no-dres"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_mask_from_output_same_results_saves_the_output(backend_name, dtype, res_grad, training):
    """Bit-identical results with and without the flag, the output saved in the residual's
    place. Channel 0 has weight = bias = 0, so its pre-activation is the residual itself: exact
    zeros (masked: threshold_backward's y <= 0), negatives and a NaN (passes). Without d(residual)
    the dx kernel takes the mask from y itself (with it the reduce kernel does)."""
    from fastres.precision import gpu_faithful

    torch.manual_seed(0)
    C = 5
    x = torch.randn(3, C, 4, 4).to(dtype=dtype, memory_format=torch.channels_last)
    res = torch.randn_like(x)
    res[:, 0, :2] = 0.0
    res[0, 0, 3, 0] = float("nan")
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    w[0] = b[0] = 0.0
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    dy = torch.randn_like(x)
    faithful = backend_name.endswith("faithful")
    results = []
    for flag in (False, True):
        xs, rs = x.clone().requires_grad_(), res.clone().requires_grad_(res_grad)
        ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
        with fastres.use_backend(backend_name.split("-")[0]), \
                (gpu_faithful() if faithful else torch.autograd.graph.saved_tensors_hooks(
                    lambda t: t, lambda t: t)):
            y, saved = _saved_storages(lambda: batch_norm_act(
                xs, rm.clone(), rv.clone(), ws, bs, training, 0.1, 1e-5, residual=rs,
                activation="relu", mask_from_output=flag))
            y.backward(dy)
        assert (y.untyped_storage().data_ptr() in saved) == flag
        assert (rs.untyped_storage().data_ptr() in saved) == (not flag)
        results.append([y, xs.grad, ws.grad, bs.grad] + ([rs.grad] if res_grad else []))
    assert results[0][0][:, 0].eq(0).any() and results[0][0].isnan().any()
    for a, b_ in zip(*results):
        assert torch.equal(a.nan_to_num(7.0), b_.nan_to_num(7.0))


def test_mask_from_output_on_a_backend_without_it(monkeypatch):
    """A backend without ``supports_mask_from_output`` (the CUDA extension): forward saves the
    residual as without the flag; the backward op, handed y anyway, masks with ATen and runs the
    backend without a ReLU — the same gradients."""
    import types

    import fastres.ops.batch_norm_act as bn_ops

    plain = types.SimpleNamespace(
        name="plain", backward=lambda *a: bn_ops.TorchBackend.backward(*a))  # no mask_from_output
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 4)
    res, dy = torch.randn_like(x), torch.randn_like(x)
    res[:, 0, 0] = 0.0
    w, b = torch.rand(3) + 0.5, torch.zeros(3)
    w[0] = 0.0
    with fastres.use_backend("torch"):
        y, mean, invstd = bn_ops.batch_norm_act_op(x, w, b, res, None, None, None, 0.1, True,
                                                    1e-5, True)
        expect = bn_ops.batch_norm_act_backward(dy, x, w, b, res, mean, invstd, True, True, True,
                                                True, True, True)
        monkeypatch.setattr(bn_ops, "_backend_for", lambda x, op: plain)
        got = bn_ops.batch_norm_act_backward(dy, x, w, b, y, mean, invstd, True, True, True, True,
                                             True, True, True)
    for e, g in zip(expect, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    assert expect[1][:, 0, 0].eq(0).all()  # the masked zeros are there to be checked
    # Forward-time choice: "cuda" (named, or picked by auto's table on a CUDA tensor) saves the
    # residual; every other backend the output.
    cuda_x = torch.empty(2, 3, 4, 4, device="meta")
    monkeypatch.setattr(bn_ops, "get_backend", lambda: "cuda")
    assert not bn_ops.backend_masks_from_output(x)
    monkeypatch.setattr(bn_ops, "get_backend", lambda: "auto")
    assert bn_ops.backend_masks_from_output(x) and bn_ops.backend_masks_from_output(cuda_x)
    monkeypatch.setattr(bn_ops, "get_backend", lambda: "triton")
    assert bn_ops.backend_masks_from_output(x)


# --------------------------------------------------------------------------------------------------
# Launch and ATen-op counts of a BatchNormAct2d step on the CUDA code path (GPU-faithful mode),
# counted by fastres.testing.counting (tests/test_counting.py asserts the targets with the
# bytes moved; this one adds momentum=None, no residual, and names the kernels).


@pytest.mark.parametrize("residual,mask_from_output", [(True, False), (True, True), (False, False)],
                         ids=["res", "res-mask-from-output", "nores"])
def test_module_step_launch_counts(residual, mask_from_output):
    """Training: 3 launches forward (stats partials, finalize + running update, apply) and 3
    backward (reduce, finalize, dx); eval forward: 1. No ATen compute op besides the module's own
    num_batches_tracked += 1 (momentum=None: the kernel reads the count)."""
    from fastres import BatchNormAct2d
    from fastres.precision import gpu_faithful
    from fastres.testing.counting import count_kernels

    with gpu_faithful(), fastres.use_backend("triton"):
        bn = BatchNormAct2d(6, momentum=None)
        bn.mask_from_output = mask_from_output
        x = torch.randn(2, 6, 3, 4).to(memory_format=torch.channels_last).requires_grad_()
        r = torch.randn_like(x).requires_grad_() if residual else None
        grad = torch.randn_like(x)
        with count_kernels() as fwd:
            y = bn(x, r)
        inputs = [x, bn.weight, bn.bias] + ([r] if residual else [])
        with count_kernels() as bwd:
            torch.autograd.grad(y, inputs, grad)
        bn.eval()
        with torch.no_grad(), count_kernels() as ev:
            bn(x, r)
    assert fwd.order == ["_stats_partial_kernel", "_stats_finalize_kernel", "_apply_kernel"]
    assert bwd.order == ["_backward_reduce_partial_kernel", "_backward_finalize_kernel",
                         "_backward_dx_kernel"]
    assert ev.order == ["_apply_kernel"]
    for c in (fwd, bwd, ev):
        assert c.aten_compute == 0, c.table()
    assert fwd.aten["bookkeeping"] == {"add_.Tensor": 1}, fwd.aten  # num_batches_tracked += 1


def test_geometry_parallel_finalize_and_readme_table():
    """At every ResNet-50 BN shape (batch 256, CUDA geometry): ≤ 64 partials per channel, a finalize
    spread over many programs, and benchmarks/README.md shows the table this code computes."""
    import pathlib

    from fastres.precision import gpu_faithful

    with gpu_faithful():
        for nhwc in (True, False):
            for C, hw in tbn.RESNET50_BN_SHAPES:
                side = int(round(hw ** 0.5))
                p = tbn.plan((256, C, side, side), nhwc, torch.device("cpu"))
                assert p.G <= tbn.MAX_PARTIALS and p.block_g <= tbn.MAX_PARTIALS
                assert p.finalize_grid[0] >= 32, (C, hw, nhwc, p)
                assert p.reduce_grid[0] * p.reduce_grid[1] >= 2 * 132 - 64, (C, hw, nhwc, p)
    readme = (pathlib.Path(__file__).parent.parent / "benchmarks" / "README.md").read_text()
    for nhwc in (True, False):
        assert tbn.geometry_table(256, nhwc) in readme



def test_geometry_tiles_are_powers_of_two():
    """Every tile of the CUDA launch geometry is a power of two (tl.arange needs it on a GPU; the
    interpreter would accept any size), over ResNet-50's shapes, odd C and tiny inputs."""
    from fastres.precision import gpu_faithful

    def pow2(v):
        return v >= 1 and v & (v - 1) == 0

    shapes = [(256, C, int(round(hw ** 0.5)), int(round(hw ** 0.5)))
              for C, hw in tbn.RESNET50_BN_SHAPES] + [(4, 5, 3, 3), (2, 131, 9, 7), (32, 72, 1, 1),
                                                     (1, 3, 1, 1), (3, 1000, 2, 2)]
    with gpu_faithful():
        for nhwc in (True, False):
            for shape in shapes:
                p = tbn.plan(shape, nhwc, torch.device("cpu"))
                tiles = [p.cfg["BLOCK_R"], p.cfg["BLOCK_C"], p.cfg.get("REDUCE_BLOCK_R", 1),
                         p.block_g, p.finalize_block_c]
                assert all(pow2(t) for t in tiles), (shape, nhwc, p)
                assert p.G <= tbn.MAX_PARTIALS and p.G * p.rows_per_prog >= p.M, (shape, p)

@pytest.mark.parametrize("momentum", [0.1, None])
def test_auto_on_cpu_is_eager_bitwise(momentum):
    """"auto" on CPU tensors runs eager's own ops: output, every gradient and the running statistics
    bit-identical to nn.BatchNorm2d + add + ReLU."""
    from torch import nn

    from fastres import BatchNormAct2d

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 5, 5, generator=g).to(memory_format=torch.channels_last)
    r, dy = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    eager, fused = nn.BatchNorm2d(4, momentum=momentum), BatchNormAct2d(4, momentum=momentum)
    results = []
    with fastres.use_backend("auto"):
        for fn in (lambda a, b: torch.relu(eager(a) + b), fused):
            outs = []
            for _ in range(2):
                xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
                y = fn(xx, rr)
                m = eager if fn is not fused else fused
                outs += [y, *torch.autograd.grad(y, (xx, rr, m.weight, m.bias), dy)]
            results.append(outs + [m.running_mean, m.running_var])
    for a, b in zip(*results):
        assert torch.equal(a, b)
