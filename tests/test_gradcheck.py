"""Gradients of every differentiable fastres custom op, checked against finite differences.

- torch backend, fp64: ``torch.autograd.gradcheck`` on fastres::batch_norm_act (through its
  autograd.Function; output y; train and eval, with/without ReLU, residual, affine, and with
  mask_from_output), fastres::batch_norm_stats, fastres::norm_conv_fwd
  (y and its batch statistics, with/without the BN-ReLU prologue), fastres::conv_bias_act, and the
  SyncBN autograd function across two gloo ranks (gradcheck's comparison of central differences
  and VJPs, rebuilt so that both ranks issue the same collectives even on a mismatch, where
  gradcheck would stop on one rank and leave the other waiting: tests/sync_checks.py).
- Triton backend: the kernels refuse fp64 (BN: TypeError; normconv: fp64 runs the torch
  reference), so gradcheck cannot reach them. Instead the full Jacobian of the fp32 Triton op
  (one vector-Jacobian product per output element) is held to the tolerance rule against the fp64
  Jacobian, with eager's fp32 Jacobian as the baseline — every entry, in the default and the
  GPU-faithful mode. The fp64 Jacobian is eager's, which the gradcheck above ties to the op's math.
- ``torch.library.opcheck`` on the ops SyncBN is built from, in the argument patterns it uses
  (statistics given, the global mean_dy / mean_dy_xhat), and on the normconv ops, on the Triton
  backend (the existing opchecks run normconv on "auto", which is the torch reference on CPU).

Not differentiable, so not gradchecked: the backward ops (batch_norm_act_backward_reduce / _dx,
norm_conv_dgrad / _wgrad); double backward through batch_norm_act is not supported (eager's is).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck as _gradcheck

import fastres
from fastres.functional import batch_norm_act, conv_bias_act, norm_conv
from fastres.ops.batch_norm_act import BatchNormActFunction
from fastres.precision import gpu_faithful
import sync_checks
from helpers import assert_rule, eager_batch_norm_act

ops = torch.ops.fastres
D = torch.float64
# The Triton checks run the kernels on CPU tensors: only under the interpreter (no GPU).
triton_cpu = pytest.mark.skipif(not fastres.backend.triton_interpreting(),
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
# fp64 central differences (eps 1e-6) are good to ~1e-9 here; gradcheck's default rtol of 1e-3
# would let a gradient off by 1e-4 relative pass.
TOL = dict(atol=1e-7, rtol=1e-6)


def gradcheck(fn, inputs, **kw):
    return _gradcheck(fn, inputs, **TOL, **kw)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _leaf(t, grad=True):
    return t.detach().clone().requires_grad_(grad)


# --------------------------------------------------------------------------------------------------
# fp64 gradcheck, torch backend.


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("relu,residual,affine,mask_from_output",
                         [(True, True, True, False), (True, True, True, True),
                          (False, False, True, False), (True, False, False, False)],
                         ids=["res_relu", "res_relu_mask_from_output", "plain", "noaffine_relu"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_batch_norm_act(training, relu, residual, affine, mask_from_output,
                                  channels_last):
    g = _gen(0)
    x = torch.randn(3, 2, 2, 2, generator=g, dtype=D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    r = torch.randn(x.shape, generator=g, dtype=D).contiguous(memory_format=torch.preserve_format) \
        if residual else None
    w, b = torch.randn(2, generator=g, dtype=D), torch.randn(2, generator=g, dtype=D)
    rm, rv = torch.randn(2, generator=g, dtype=D), torch.rand(2, generator=g, dtype=D) + 0.5
    inputs = [_leaf(x)] + ([_leaf(w), _leaf(b)] if affine else [])
    inputs += [_leaf(r)] if residual else []

    def f(*args):
        args = list(args)
        xx = args.pop(0)
        ww, bb = (args.pop(0), args.pop(0)) if affine else (None, None)
        rr = args.pop(0) if residual else None
        # y only: the op's mean/invstd outputs carry no gradient (the functional API never exposes
        # them; batch_norm_stats is the differentiable statistics op). fastres::batch_norm_act
        # mutates its running statistics, so its autograd is BatchNormActFunction.
        return BatchNormActFunction.apply(xx, ww, bb, rr, None if training else rm.clone(),
                                          None if training else rv.clone(), None, 0.1, training,
                                          1e-5, relu, mask_from_output)[0]

    with fastres.use_backend("torch"):
        assert gradcheck(f, inputs)


def test_gradcheck_batch_norm_stats():
    x = torch.randn(3, 2, 2, 2, generator=_gen(1), dtype=D)
    with fastres.use_backend("torch"):
        assert gradcheck(ops.batch_norm_stats, (_leaf(x),))
        x_cl = x.contiguous(memory_format=torch.channels_last)
        assert gradcheck(ops.batch_norm_stats, (_leaf(x_cl),))


def _conv_case(seed, dtype=D, prologue=True, n=2):
    g = _gen(seed)
    x = torch.randn(n, 3, 4, 4, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(2, 3, 3, 3, generator=g) * 0.5).to(dtype)
    scale = (torch.rand(3, generator=g) + 0.5).to(dtype) if prologue else None
    shift = torch.randn(3, generator=g).to(dtype) if prologue else None
    return x, w, scale, shift


@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu_prologue", "plain"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_norm_conv_fwd(prologue, stride):
    x, w, scale, shift = _conv_case(2, prologue=prologue, n=1)
    inputs = [_leaf(x), _leaf(w)] + ([_leaf(scale), _leaf(shift)] if prologue else [])

    def f(xx, ww, *st):
        s, t = st if prologue else (None, None)
        return ops.norm_conv_fwd(xx, ww, s, t, [stride, stride], [1, 1], [1, 1], 1, True)

    with fastres.use_backend("torch"):
        assert gradcheck(f, inputs)  # y, mean and var: all three are differentiable


def test_gradcheck_conv_bias_act():
    x, w, _, _ = _conv_case(3, prologue=False, n=1)
    g = _gen(4)
    b = torch.randn(2, generator=g, dtype=D)
    r = torch.randn(1, 2, 4, 4, generator=g, dtype=D).contiguous(memory_format=torch.channels_last)

    def f(xx, ww, bb, rr):
        return ops.conv_bias_act(xx, ww, bb, rr, [1, 1], [1, 1], [1, 1], 1, True)

    with fastres.use_backend("torch"):
        assert gradcheck(f, [_leaf(x), _leaf(w), _leaf(b), _leaf(r)])


@triton_cpu
def test_triton_backend_refuses_fp64():
    """Why the Triton path is checked through its fp32 Jacobian below."""
    x = torch.randn(2, 2, 2, 2, dtype=D)
    with fastres.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        batch_norm_act(x, None, None, training=True)


@pytest.fixture(scope="module")
def sync_results():
    return sync_checks.results()


def test_sync_batch_norm_gradcheck(sync_results):
    """Across two gloo ranks, fp64, torch backend: one rank checks its output's Jacobian against
    its own inputs while the other holds its inputs and output gradient fixed."""
    for rank, result in enumerate(sync_results):
        for checking_rank in (0, 1):
            assert result[("gradcheck", checking_rank)] == "ok", (rank, checking_rank)


# --------------------------------------------------------------------------------------------------
# The Triton backend: its fp32 Jacobian against the fp64 one, by the tolerance rule.


def jacobian(f, inputs) -> torch.Tensor:
    """[outputs, inputs] Jacobian of f (outputs flattened and concatenated) from one
    vector-Jacobian product per output element, i.e. through the op's own backward."""
    out = f(*inputs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    flat = torch.cat([o.reshape(-1) for o in outs])
    rows = []
    for i in range(flat.numel()):
        seed = torch.zeros_like(flat)
        seed[i] = 1
        grads_out, offset = [], 0
        for o in outs:
            grads_out.append(seed[offset:offset + o.numel()].view_as(o))
            offset += o.numel()
        grads = torch.autograd.grad(outs, inputs, grads_out, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(t) if gr is None else gr).reshape(-1).double()
                               for gr, t in zip(grads, inputs)]))
    return torch.stack(rows)


def rule_on_jacobians(fused_fn, eager_fn, tensors, what):
    """fused_fn on fp32 leaves (Triton), eager_fn on fp32 and on fp64 leaves."""
    fused = jacobian(fused_fn, [_leaf(t.float()) for t in tensors])
    eager = jacobian(eager_fn, [_leaf(t.float()) for t in tensors])
    ref = jacobian(eager_fn, [_leaf(t.double()) for t in tensors])
    assert_rule(fused.float(), eager.float(), ref, name=what)


MODES = ["default", "gpu_faithful"]


def _mode(name):
    return gpu_faithful() if name == "gpu_faithful" else gpu_faithful(False)


@triton_cpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_triton_batch_norm_act_jacobian(mode, training):
    g = _gen(5)
    x = torch.randn(3, 2, 2, 2, generator=g).contiguous(memory_format=torch.channels_last)
    r = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(2, generator=g), torch.randn(2, generator=g)
    rm, rv = torch.randn(2, generator=g), torch.rand(2, generator=g) + 0.5

    def stats(t):
        return (None, None) if training else (rm.to(t.dtype), rv.to(t.dtype))

    def fused(xx, ww, bb, rr):
        with fastres.use_backend("triton"), _mode(mode):
            return batch_norm_act(xx, *stats(xx), ww, bb, training, 0.1, 1e-5, rr, "relu")

    def eager(xx, ww, bb, rr):
        return eager_batch_norm_act(xx, *stats(xx), ww, bb, training, 0.1, 1e-5, rr, "relu")

    with fastres.use_backend("triton"), _mode(mode):
        rule_on_jacobians(fused, eager, (x, w, b, r), f"batch_norm_act {mode}")


def _eager_norm_conv(x, w, scale, shift, stride):
    a = torch.relu(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    y = F.conv2d(a, w, None, stride, 1)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    return y, mean, var


@triton_cpu
@pytest.mark.parametrize("mode", MODES)
def test_triton_norm_conv_jacobian(mode):
    x, w, scale, shift = _conv_case(6, dtype=torch.float32, n=1)  # 1 image: 12 VJPs

    def fused(xx, ww, s, t):
        with fastres.use_backend("triton"), _mode(mode):
            return norm_conv(xx, ww, 2, 1, scale=s, shift=t, collect_stats=True)

    with fastres.use_backend("triton"), _mode(mode):
        rule_on_jacobians(fused, lambda *a: _eager_norm_conv(*a, 2), (x, w, scale, shift),
                          f"norm_conv {mode}")


@triton_cpu
@pytest.mark.parametrize("mode", MODES)
def test_triton_conv_bias_act_jacobian(mode):
    x, w, _, _ = _conv_case(7, dtype=torch.float32, prologue=False, n=1)
    g = _gen(8)
    b = torch.randn(2, generator=g)
    r = torch.randn(1, 2, 2, 2, generator=g).contiguous(memory_format=torch.channels_last)

    def fused(xx, ww, bb, rr):
        with fastres.use_backend("triton"), _mode(mode):
            return conv_bias_act(xx, ww, bb, 2, 1, residual=rr)

    def eager(xx, ww, bb, rr):
        return torch.relu(F.conv2d(xx, ww, bb, 2, 1) + rr)

    with fastres.use_backend("triton"), _mode(mode):
        rule_on_jacobians(fused, eager, (x, w, b, r), f"conv_bias_act {mode}")


# --------------------------------------------------------------------------------------------------
# opcheck: the ops SyncBN is built from, in its argument patterns; normconv on the Triton backend.


def _sync_pattern_samples():
    g = _gen(9)
    x = torch.randn(2, 3, 2, 2, generator=g).contiguous(memory_format=torch.channels_last)
    r = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=g).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(3, generator=g), torch.randn(3, generator=g)
    mean, var = torch.randn(3, generator=g), torch.rand(3, generator=g) + 0.5
    invstd = torch.rsqrt(var + 1e-5)
    # SyncBN: local stats -> gathered (mean, var) normalise with training=False and grads to
    # x, weight, bias, residual; backward: local sums, then dx from the global means.
    return [
        (ops.batch_norm_stats.default, (_leaf(x),)),
        # (inside SyncBatchNormActFunction.forward: plain tensors, the op's autograd is not used)
        (ops.batch_norm_act.default, (x, w, b, r, mean, var, None, None, False, 1e-5, True)),
        (ops.batch_norm_act_backward_reduce.default, (dy, x, mean, invstd, w, b, r, True)),
        (ops.batch_norm_act_backward_dx.default, (dy, x, mean, invstd, w, b, r, mean * 0.01,
                                                  invstd * 0.01, True, True)),
        (ops.batch_norm_act_backward_dx.default, (dy, x, mean, invstd, None, None, None,
                                                  mean * 0.01, invstd * 0.01, False, False)),
    ]


# tests/test_batch_norm_act.py opchecks the Triton backend on samples 0, 2 and 3's patterns already.
@pytest.mark.parametrize("backend,index", [("torch", i) for i in range(5)] +
                         [pytest.param("triton", i, marks=triton_cpu) for i in (1, 4)])
def test_opcheck_sync_batch_norm_ops(backend, index):
    op, args = _sync_pattern_samples()[index]
    with fastres.use_backend(backend):
        torch.library.opcheck(op, args)


@triton_cpu
def test_opcheck_norm_conv_ops_triton():
    x, w, scale, shift = _conv_case(10, dtype=torch.float32)
    conv = ([2, 2], [1, 1], [1, 1], 1)
    g = _gen(11)
    dy = torch.randn(2, 2, 2, 2, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randn_like(dy)
    stats = (y, y.mean((0, 2, 3)), torch.randn(2, generator=g), torch.randn(2, generator=g))
    with fastres.use_backend("triton"):
        torch.library.opcheck(ops.norm_conv_fwd, (_leaf(x), _leaf(w), _leaf(scale), _leaf(shift),
                                                  *conv, True))
        torch.library.opcheck(ops.norm_conv_dgrad, (dy, w, x, scale, shift, *conv, *stats))
        torch.library.opcheck(ops.norm_conv_wgrad, (dy, x, w, scale, shift, *conv, *stats))
        torch.library.opcheck(ops.conv_bias_act, (_leaf(x), _leaf(w), _leaf(torch.randn(2)),
                                                  _leaf(dy), *conv, True))
