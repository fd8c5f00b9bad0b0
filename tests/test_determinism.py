"""Determinism that a CPU run can check: every Triton launch run in shuffled program orders
(tests/interpreter_order.py) must give bitwise the results of the interpreter's grid order.

Under the interpreter programs run one by one in grid order, so running a test twice proves
nothing; a GPU runs them in any order. fastres's reductions are two-stage with fixed-order merges
(no atomics, no program reading another's output), so they must be invariant under any program
order — checked here through the public ops, for each reduction path: BN statistics and the BN
backward reduction (batch_norm_act, forward + backward), the conv's per-tile output statistics,
its dgrad per-channel partial sums (norm_conv with the BN-ReLU prologue and collect_stats, forward +
backward) and its split-K wgrad (GPU-faithful mode only: the default mode does not split), in the
default and the GPU-faithful mode. The run-twice tests on CUDA tensors stay in the op test files
(``gpu``-marked).

The last tests show the check can fail: a float atomic_add reduction and a kernel that reads
another program's output are each caught.
"""
from __future__ import annotations

import pytest
import torch

import fastres
from fastres.functional import batch_norm_act, bn_fold, norm_conv
from fastres.precision import gpu_faithful
from fastres.triton.conv import cuda_conv_configs, pinned_config
from interpreter_order import shuffled_program_order

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="the shuffled program order patches the Triton interpreter")

SEEDS = (1, 2)
MODES = ["default", "gpu_faithful"]


def _mode(name):
    return gpu_faithful() if name == "gpu_faithful" else gpu_faithful(False)


def assert_order_independent(run, seeds=SEEDS):
    """run() -> list of tensors; equal bitwise in grid order and in each shuffled order. Returns
    the launches of the last shuffled run (kernel, grid, whether its order moved)."""
    expected = [t.clone() for t in run()]
    launches = []
    for seed in seeds:
        with shuffled_program_order(seed) as order:
            got = run()
        launches = order.launches
        assert order.shuffled_launches > 0, "no launch had more than one program: nothing shuffled"
        for i, (a, b) in enumerate(zip(expected, got)):
            same = torch.equal(a, b) or (a.isnan().equal(b.isnan()) and
                                         torch.equal(a.nan_to_num(), b.nan_to_num()))
            assert same, (f"result {i} differs bitwise under shuffled program order (seed {seed}): "
                          f"max |diff| {(a.double() - b.double()).abs().max().item():.3g}")
    return launches


def _multi_program(launches, name_part):
    """The named kernel(s) ran with more than one program in some launch."""
    return any(name_part in name and grid[0] * grid[1] * grid[2] > 1
               for name, grid, _ in launches)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_batch_norm_act_forward_backward(mode, channels_last):
    # 4 channels x 4096 values: several row-split partials per channel in both modes.
    g = torch.Generator().manual_seed(0)
    shape = (4, 4, 32, 32)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(shape, generator=g) * 3 + 5).contiguous(memory_format=fmt)
    r = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    w, b = torch.randn(4, generator=g), torch.randn(4, generator=g)

    def run():
        xx, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = torch.zeros(4), torch.ones(4)
        with fastres.use_backend("triton"), _mode(mode):
            y = batch_norm_act(xx, rm, rv, ww, bb, True, 0.1, 1e-5, rr, "relu")
            grads = torch.autograd.grad(y, (xx, ww, bb, rr), dy)
        return [y, *grads, rm, rv]

    launches = assert_order_independent(run)
    # At least the partial statistics, apply, backward partial sums and dx ran several programs.
    assert sum(grid[0] * grid[1] * grid[2] > 1 for _, grid, _ in launches) >= 4, launches


@pytest.mark.parametrize("mode", MODES)
def test_norm_conv_forward_backward(mode):
    # 3x3 conv over 2·8·8 = 128 output pixels: several fwd tiles (per-tile output statistics,
    # merged in fixed order) and several dgrad tiles (per-tile sums for dscale / dshift).
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 4, 3, 3, generator=g)
    mean, var = torch.randn(4, generator=g), torch.rand(4, generator=g) + 0.5
    gamma, beta = torch.randn(4, generator=g), torch.randn(4, generator=g)
    dy = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    dmean, dvar = torch.randn(4, generator=g), torch.randn(4, generator=g)

    def run():
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        gg, bb = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
        with fastres.use_backend("triton"), _mode(mode):
            scale, shift = bn_fold(mean, var, gg, bb)
            y, m, v = norm_conv(xx, ww, 1, 1, scale=scale, shift=shift, collect_stats=True)
            grads = torch.autograd.grad((y, m, v), (xx, ww, gg, bb), (dy, dmean, dvar))
        return [y, m, v, *grads]

    launches = assert_order_independent(run, seeds=SEEDS[:1])
    assert _multi_program(launches, "fwd") and _multi_program(launches, "dgrad"), launches


def test_norm_conv_split_wgrad():
    """GPU-faithful mode splits a long pixel reduction (N·P·Q >= 8192) over several wgrad
    programs whose fp32 partials are summed in fixed order; called through the op itself (a
    forward of that size would cost the interpreter minutes)."""
    g = torch.Generator().manual_seed(4)
    cl = torch.channels_last
    x = torch.randn(2, 4, 64, 64, generator=g).contiguous(memory_format=cl)
    dy = torch.randn(2, 4, 64, 64, generator=g).contiguous(memory_format=cl)
    y = torch.randn(2, 4, 64, 64, generator=g).contiguous(memory_format=cl)
    w = torch.randn(4, 4, 1, 1, generator=g)
    scale, shift = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    stats = (y, y.mean((0, 2, 3)), torch.randn(4, generator=g), torch.randn(4, generator=g))
    config = min(cuda_conv_configs("wgrad"),
                 key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])

    def run():
        # A CUDA configuration (BLOCK_K = 64), as a GPU-faithful run takes: 4x fewer loop steps
        # for the interpreter than its own BLOCK_K = 16.
        with fastres.use_backend("triton"), gpu_faithful(), pinned_config("wgrad", config):
            return [torch.ops.fastres.norm_conv_wgrad(dy, x, w, scale, shift, [1, 1], [0, 0],
                                                      [1, 1], 1, *stats)]

    launches = assert_order_independent(run, seeds=SEEDS[:1])
    assert any("wgrad" in name and grid[2] > 1 for name, grid, _ in launches), launches


# --------------------------------------------------------------------------------------------------
# The check can fail.


def _order_dependent_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def atomic_sum_kernel(X, OUT, BLOCK: tl.constexpr):
        # One float atomic per program: the rounding of the total depends on the program order.
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.atomic_add(OUT, tl.sum(tl.load(X + offs), axis=0))

    @triton.jit
    def chained_sum_kernel(X, PART, BLOCK: tl.constexpr):
        # Each program adds the previous program's running total: right only in grid order.
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        prev = tl.load(PART + pid - 1, mask=pid > 0, other=0.0)
        tl.store(PART + pid, prev + tl.sum(tl.load(X + offs), axis=0))

    return atomic_sum_kernel, chained_sum_kernel


def test_shuffled_order_catches_float_atomics():
    atomic_sum_kernel, _ = _order_dependent_kernels()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64 * 16, generator=g) * torch.logspace(-4, 4, 64 * 16)

    def run():
        out = torch.zeros(1)
        atomic_sum_kernel[(64,)](x, out, BLOCK=16)
        return [out]

    with pytest.raises(AssertionError, match="differs bitwise"):
        assert_order_independent(run)


def test_shuffled_order_catches_a_read_of_another_programs_output():
    _, chained_sum_kernel = _order_dependent_kernels()
    x = torch.randn(8 * 16, generator=torch.Generator().manual_seed(3))

    def run():
        part = torch.full((8,), float("nan"))
        chained_sum_kernel[(8,)](x, part, BLOCK=16)
        return [part]

    torch.testing.assert_close(run()[0][-1], x.sum(), rtol=1e-5, atol=1e-5)  # grid order: right
    with pytest.raises(AssertionError, match="differs bitwise"):
        assert_order_independent(run)
