"""The counters of fastres.testing.counting: exact on toy kernels with known traffic, and the
BatchNormAct2d step counts against issue 13's targets.

The targets are in BN_STEP_TARGETS / BN_PASS_TARGETS below, met with and without
``mask_from_output`` (the saved output gives backward's ReLU mask in the residual's place)."""
import pytest
import torch
import triton
import triton.language as tl

import fastres
from fastres.precision import gpu_faithful
from fastres.testing.counting import classify_aten, count_kernels, count_module_step


@triton.jit
def _copy_kernel(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(Y + offs, tl.load(X + offs, mask=mask), mask=mask)


@triton.jit
def _scale_kernel(X, S, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    s = tl.load(S)  # unmasked scalar: one element per program
    x = tl.load(X + offs, mask=offs < n)
    tl.store(X + offs, x * s, mask=offs < n)


def _copy(x, block=64):
    y = torch.empty_like(x)
    _copy_kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    return y


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_copy_kernel_traffic_is_exact(dtype):
    n = 1000  # 16 programs of 64 lanes, the last one 40 lanes active
    x = torch.arange(n).to(dtype)
    with count_kernels(unique=True) as c:
        y = _copy(x)
    assert torch.equal(y, x)
    k = c.kernels["_copy_kernel"]
    elt = x.element_size()
    assert (k.launches, k.programs) == (1, 16)
    assert k.loaded == n * elt and k.stored == n * elt
    assert k.moved == 2 * n * elt
    assert k.unique_loaded == n * elt and k.unique_stored == n * elt
    # The interpreter's host copies of the arguments are not ops of the program.
    assert c.aten_compute == 0 and c.launches == 1


def test_launches_counted_per_kernel_and_scalar_loads_per_program():
    n, block = 200, 64  # 4 programs
    x = torch.randn(n)
    s = torch.tensor([2.0])

    def launcher():
        y = _copy(x, block)
        for _ in range(2):
            _scale_kernel[(triton.cdiv(n, block),)](y, s, n, BLOCK=block)
        return y

    with count_kernels(unique=True) as c:
        y = launcher()
    torch.testing.assert_close(y, 4 * x)
    assert c.triton_launches == 3
    assert c.kernels["_copy_kernel"].launches == 1
    scale = c.kernels["_scale_kernel"]
    assert (scale.launches, scale.programs) == (2, 8)
    assert scale.loaded == 2 * (n * 4 + 4 * 4)  # x, plus s once per program
    assert scale.stored == 2 * n * 4
    assert scale.unique_loaded == 2 * (n * 4 + 4)  # s is one address
    assert c.order == ["_copy_kernel", "_scale_kernel", "_scale_kernel"]


def test_aten_ops_are_classified():
    counter = torch.zeros((), dtype=torch.int64)
    x = torch.randn(4, 3)
    with count_kernels() as c:
        y = torch.empty_like(x)   # allocation
        v = x.view(12)            # view
        y.copy_(x)                # compute
        z = (v * 2).detach()      # compute + view
        counter.add_(1)           # bookkeeping (num_batches_tracked += 1)
        torch.zeros(3)            # compute: a fill kernel
    assert c.aten["compute"] == {"copy_": 1, "mul.Tensor": 1, "zeros": 1}
    assert c.aten["bookkeeping"] == {"add_.Tensor": 1}
    assert c.aten["allocation"]["empty_like"] == 1
    assert c.aten["view"]["view"] == 1 and c.aten["view"]["detach"] == 1
    assert c.launches == 3
    assert classify_aten(torch.ops.aten.add_.Tensor, (x, x)) == "compute"  # float in-place


@torch.library.custom_op("fastres_test::twice_plus_one", mutates_args=())
def _twice_plus_one(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


def test_custom_ops_count_what_they_run():
    x = torch.randn(3)
    with count_kernels() as c:
        _twice_plus_one(x)
    assert c.aten["compute"] == {"mul.Tensor": 1, "add.Tensor": 1}


def test_counters_do_not_nest():
    with count_kernels():
        with pytest.raises(RuntimeError, match="do not nest"):
            with count_kernels():
                pass


# --------------------------------------------------------------------------------------------------
# BatchNormAct2d: launches per step and full-tensor passes (issue 13), on the CUDA-class code path.

BN_STEP_TARGETS = {"fwd": 3, "bwd": 3, "eval": 1}  # launches, ATen compute included
# Full-tensor passes (bytes moved / (numel · element size)) with residual + ReLU. Forward: read x for
# the statistics, read x and the residual, write y = 4. Backward target: 7 (the reduce pass writes
# dresidual = dy', the dx pass reads it instead of dy, x and the residual).
BN_PASS_TARGETS = {"fwd": 4.0, "bwd": 7.0}
# Slack for the per-channel vectors and partials at the small test shape.
PASS_SLACK = 0.15


def _bn_step(dtype=torch.float32, mask_from_output=False):
    torch.manual_seed(0)
    module = fastres.BatchNormAct2d(16)
    module.mask_from_output = mask_from_output
    x = torch.randn(2, 16, 16, 16, dtype=dtype).to(memory_format=torch.channels_last)
    res = torch.randn_like(x)
    x.requires_grad_()
    res.requires_grad_()
    with fastres.use_backend("triton"), gpu_faithful():
        counts = count_module_step(module, x, res, grad=torch.randn_like(x))
    return counts, x


@pytest.fixture(scope="module", params=[False, True], ids=["mask-recomputed", "mask-from-output"])
def bn_step(request):
    return _bn_step(mask_from_output=request.param)


@pytest.mark.parametrize("mode", list(BN_STEP_TARGETS))
def test_bn_act_step_launches(bn_step, mode):
    counts, _ = bn_step
    c = counts[mode]
    assert c.aten_compute == 0, c.table()
    assert c.launches <= BN_STEP_TARGETS[mode], c.table()
    # Beside the kernels only the module's num_batches_tracked += 1, as eager does.
    assert c.aten["bookkeeping"] == ({"add_.Tensor": 1} if mode == "fwd" else {}), c.aten


def test_bn_act_step_triton_launches(bn_step):
    counts, _ = bn_step
    assert counts["fwd"].triton_launches <= 3
    assert counts["bwd"].triton_launches <= 3
    assert counts["eval"].triton_launches == 1


@pytest.mark.parametrize("mode", ["fwd", "bwd"])
def test_bn_act_step_passes(bn_step, mode):
    counts, x = bn_step
    passes = counts[mode].moved / (x.numel() * x.element_size())
    assert passes <= BN_PASS_TARGETS[mode] + PASS_SLACK, counts[mode].table(x.numel())
    # And at least the reads and writes the op cannot avoid (x or dy, residual, output(s)).
    assert passes >= {"fwd": 3.0, "bwd": 5.0}[mode] - 1e-9
