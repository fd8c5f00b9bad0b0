"""Normalized convolution (fastres.functional.norm_conv): Triton implicit-GEMM conv with the
BN-apply + ReLU prologue and the batch-statistics epilogue, forward and backward, against eager
F.conv2d + F.batch_norm + relu with the tolerance rule

    err(fused vs fp64 reference) <= 2 · err(eager in the same dtype vs fp64 reference) + floor.

CPU tests run the Triton kernels under TRITON_INTERPRET=1 at small shapes (fp32 and fp16: a bf16
tl.dot is wrong under the interpreter); the `gpu` tests repeat them at bigger shapes, bf16 included.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fastres
import helpers
from fastres.functional import bn_fold, bn_fold_train, conv_bias_act, norm_conv

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"

# name: (C, K, kernel, stride, padding, dilation, H, W)
GEOMETRIES = {
    "3x3_s1": (5, 6, 3, 1, 1, 1, 6, 6),
    "3x3_s2_odd": (5, 6, 3, 2, 1, 1, 7, 7),
    "1x1_s1_wide": (20, 40, 1, 1, 0, 1, 5, 5),
    "1x1_s2": (20, 9, 1, 2, 0, 1, 5, 5),
    "7x7_s2_stem": (3, 8, 7, 2, 3, 1, 9, 9),
    "3x3_dil2": (5, 6, 3, 1, 2, 2, 6, 6),
}


@pytest.fixture(autouse=True)
def triton_backend():
    with fastres.use_backend("triton"):
        yield


def assert_rule(name, fused, eager, ref, dtype, **kwargs):
    """The project's tolerance rule (tests/helpers.py); ``eager`` may be a list (eager's precision
    class in several summation orders, GPU-faithful mode)."""
    helpers.assert_rule(fused, eager, ref, name, **kwargs)


def eager_class(fn, *args, **kwargs):
    """[fn(...) in eager's precision class, per summation order of helpers.eager_orders]: eager
    itself in the default CPU mode, its fp32-accumulating composition in GPU-faithful mode."""
    runs = []
    for k in helpers.eager_orders():
        with helpers.eager_precision_class(), helpers.fp32_order(k):
            runs.append(fn(*args, **kwargs))
    return runs


def make(geometry, dtype, n=2, seed=0, device=DEV):
    C, K, R, stride, padding, dilation, H, W = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, C, H, W, generator=g)
    w = torch.randn(K, C, R, R, generator=g) / (C * R * R) ** 0.5
    gamma = torch.rand(C, generator=g) + 0.5
    beta = torch.randn(C, generator=g) * 0.5  # relu(beta) != 0 for some channels: padding rule
    to = dict(device=device)
    return (x.to(dtype=dtype, **to).contiguous(memory_format=torch.channels_last),
            w.to(dtype=dtype, **to), gamma.to(**to), beta.to(**to), (stride, padding, dilation))


def eager_bn_act_conv(x, w, gamma, beta, conv_args, prologue, eps=1e-5):
    """conv(relu(BN_train(x))) (or conv(x)) and its output's batch statistics, in eager torch."""
    a = F.relu(F.batch_norm(x, None, None, gamma, beta, True, 0.1, eps)) if prologue else x
    y = F.conv2d(a, w, None, *conv_args)
    var, mean = helpers.eager_var_mean(y)
    return y, mean, var


def fused_bn_act_conv(x, w, gamma, beta, conv_args, prologue, eps=1e-5):
    scale = shift = None
    if prologue:
        var_a, mean_a = helpers.eager_var_mean(x.float())
        scale, shift = bn_fold(mean_a, var_a, gamma, beta, eps)
    return norm_conv(x, w, *conv_args, scale=scale, shift=shift, collect_stats=True)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


# --------------------------------------------------------------------------------------------------
# Forward: the conv, the prologue and the statistics epilogue.


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("prologue", [False, True], ids=["plain", "prologue"])
def test_forward(geometry, dtype, prologue, precision_mode):
    x, w, gamma, beta, conv_args = make(geometry, dtype)
    ref = eager_bn_act_conv(x.double(), w.double(), gamma.double(), beta.double(), conv_args,
                            prologue)
    eager = eager_class(eager_bn_act_conv, x, w, gamma, beta, conv_args, prologue)
    y, mean, var = fused_bn_act_conv(x, w, gamma, beta, conv_args, prologue)
    assert y.dtype == dtype and y.shape == ref[0].shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_rule("y", y, [e[0] for e in eager], ref[0], dtype)
    # The epilogue's statistics are those of the stored (rounded) output y, accumulated as BN's
    # are (fastres/triton/conv.py, compute_dtype): in double on CPU, in fp32 in GPU-faithful
    # mode. They are held channel by channel to the BN kernels' baseline — eager's var_mean of
    # that same y in its precision class, against fp64 — on the stored y itself: the statistics
    # of eager's own output would carry a second, independent realisation of the conv's
    # accumulation-order rounding, which no per-channel comparison can ask a kernel to match.
    stats = eager_class(helpers.eager_var_mean, y)
    var_y, mean_y = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    assert_rule("mean", mean, [s[1] for s in stats], mean_y, dtype)
    assert_rule("var", var, [s[0] for s in stats], var_y, dtype)
    # ... and as a whole against the fp64 statistics of the fp64 output.
    assert_rule("mean_vs_ref", mean, [e[1] for e in eager], ref[1], dtype, per_channel=False)
    assert_rule("var_vs_ref", var, [e[2] for e in eager], ref[2], dtype, per_channel=False)


def test_prologue_padding_is_zero_after_the_transform():
    # relu(0·scale + shift) = 1 everywhere inside the image; the zero padding of the activated
    # tensor must stay 0, so border outputs see fewer ones than interior outputs.
    x = torch.zeros(1, 3, 5, 5, device=DEV)
    w = torch.ones(4, 3, 3, 3, device=DEV)
    scale, shift = torch.ones(3, device=DEV), torch.ones(3, device=DEV)
    y, _, _ = norm_conv(x, w, 1, 1, scale=scale, shift=shift)
    expected = F.conv2d(torch.ones_like(x), w, None, 1, 1)
    wrong = F.conv2d(F.pad(x, (1, 1, 1, 1)) + 1, w)  # relu(shift) in the padding
    assert not torch.equal(expected, wrong)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert y[0, 0, 0, 0].item() == 12.0 and y[0, 0, 2, 2].item() == 27.0


def test_fp32_input_without_prologue_matches_conv2d_exactly_enough():
    x, w, _, _, conv_args = make("3x3_s2_odd", torch.float32)
    y, mean, var = norm_conv(x, w, *conv_args)
    assert mean is None and var is None
    assert_rule("y", y, F.conv2d(x, w, None, *conv_args),
                F.conv2d(x.double(), w.double(), None, *conv_args), torch.float32)


# --------------------------------------------------------------------------------------------------
# Backward: every gradient of conv_a → BN_a → ReLU → conv_b, through the batch statistics too.


def chain(x, w1, w2, gamma, beta, geometry_b, use_fused, eps=1e-5):
    """y2 = conv_b(relu(BN_train(conv_a(x)))) and a loss that also uses conv_b's statistics."""
    _, _, _, stride, padding, dilation, _, _ = GEOMETRIES[geometry_b]
    if use_fused:
        y1, m1, v1 = norm_conv(x, w1, 1, 1, collect_stats=True)
        scale, shift = bn_fold(m1, v1, gamma, beta, eps)
        y2, m2, v2 = norm_conv(y1, w2, stride, padding, dilation, scale=scale, shift=shift,
                               collect_stats=True)
    else:
        y1 = F.conv2d(x, w1, None, 1, 1)
        a = F.relu(F.batch_norm(y1, None, None, gamma, beta, True, 0.1, eps))
        y2 = F.conv2d(a, w2, None, stride, padding, dilation)
        v2, m2 = helpers.eager_var_mean(y2)
    return y2, m2, v2


def chain_grads(x, w1, w2, gamma, beta, geometry_b, use_fused, seed=1):
    x, w1, w2, gamma, beta = leaves(x, w1, w2, gamma, beta)
    y2, m2, v2 = chain(x, w1, w2, gamma, beta, geometry_b, use_fused)
    acc = m2.dtype
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y2.shape, generator=g).to(device=y2.device, dtype=acc)
    dm = torch.randn(m2.shape, generator=g).to(device=y2.device, dtype=acc)
    loss = (y2.to(acc) * dy).sum() + (m2 * dm).sum() + 3 * v2.sum()
    loss.backward()
    return {"y2": y2, "dx": x.grad, "dw_a": w1.grad, "dw_b": w2.grad, "dgamma": gamma.grad,
            "dbeta": beta.grad}


def make_chain(geometry_b, dtype, device=DEV, n=2, seed=0):
    C, K, R = GEOMETRIES[geometry_b][:3]
    H, W = GEOMETRIES[geometry_b][6:]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, H, W, generator=g)
    w1 = torch.randn(C, 3, 3, 3, generator=g) / 27 ** 0.5
    w2 = torch.randn(K, C, R, R, generator=g) / (C * R * R) ** 0.5
    gamma = torch.rand(C, generator=g) + 0.5
    beta = torch.randn(C, generator=g) * 0.5
    return ([t.to(device=device, dtype=dtype) for t in (x, w1, w2)]
            + [gamma.to(device), beta.to(device)])


def tie_free_chain(geometry, dtype, tries=20):
    """make_chain's data for the first seed whose BN_a pre-activation has no ReLU tie
    (helpers.relu_ties). Ties cannot be taken out of the comparison here: the fused ReLU sits
    inside conv_b's prologue, with no tensor whose gradient could be zeroed, and a flipped mask
    reaches every gradient through conv_b's batch statistics. So the test draws its data until it
    has none (by eager's error at each element: helpers.relu_ties(local=True)) — chosen by the
    test, not by hand."""
    def pre_activation(x, w1, gamma, beta):
        y1 = F.conv2d(x, w1, None, 1, 1)
        return F.batch_norm(y1, None, None, gamma, beta, True, 0.1, 1e-5)

    for seed in range(tries):
        x, w1, w2, gamma, beta = make_chain(geometry, dtype, seed=seed)
        with helpers.eager_precision_class():
            z_eager = pre_activation(x, w1, gamma, beta)
        z_ref = pre_activation(x.double(), w1.double(), gamma.double(), beta.double())
        if not helpers.relu_ties(z_eager, z_ref, local=True).any():
            return x, w1, w2, gamma, beta
    raise AssertionError(f"no tie-free data in {tries} seeds")


# The chain's dgamma / dbeta are held to the rule as whole vectors, not channel by channel. Both the
# fused chain and eager store y1, act(y1), y2 and the gradient at y2 in the input dtype, each
# rounded after a conv whose fp32 accumulation order differs between them; each channel of
# dgamma = Σ da'·x̂ sums those roundings, so eager's and the fused chain's per-channel errors are
# two independent draws of the same noise (measured, fp16 3x3_s2_odd: eager's channel errors span
# 1.1e-6 … 1.8e-3, the fused chain's 2e-4 … 1e-3; for two draws of one Gaussian noise
# P(|a| > 2|b|) ≈ 0.30 per channel). A per-channel precision defect of the dgrad sums is caught
# where the inputs are shared: test_dgrad_prologue_sums_per_channel.
_CHAIN_WHOLE_VECTORS = ("dgamma", "dbeta")


@pytest.mark.parametrize("dtype, geometry", [
    (torch.float16, "3x3_s1"), (torch.float16, "3x3_s2_odd"), (torch.float16, "1x1_s2"),
    (torch.float16, "3x3_dil2"), (torch.float32, "3x3_s2_odd"), (torch.float32, "1x1_s2"),
])
def test_backward_chain(geometry, dtype, precision_mode):
    x, w1, w2, gamma, beta = tie_free_chain(geometry, dtype)
    ref = chain_grads(x.double(), w1.double(), w2.double(), gamma.double(), beta.double(),
                      geometry, use_fused=False)
    eager = eager_class(chain_grads, x, w1, w2, gamma, beta, geometry, use_fused=False)
    fused = chain_grads(x, w1, w2, gamma, beta, geometry, use_fused=True)
    for name in ref:
        assert fused[name] is not None, name
        assert fused[name].dtype == eager[0][name].dtype, name
        assert_rule(name, fused[name], [e[name] for e in eager], ref[name], dtype,
                    per_channel=False if name in _CHAIN_WHOLE_VECTORS else None)


@pytest.mark.parametrize("geometry", ["3x3_s2_odd", "1x1_s2"])
def test_dgrad_prologue_sums_per_channel(geometry, precision_mode):
    """The dgrad prologue's per-channel sums (Σda', Σda'·x: the BN's dbias / dweight before the
    fold) channel by channel, on shared fp16 inputs: eager stores da = conv2d_input(dy, w) in fp16
    before BN's backward sums it; the fused kernel sums the unrounded fp32 accumulator (more
    accurate; a rounded da, eager's own precision, also passes). Fails for partial sums kept in
    fp16 (checked: 4 of 4 cases) or a wrong channel. x has a large mean (|mean| = 8·std), as
    an uncentred Σda'·x would lose precision there."""
    from fastres.ops.norm_conv import norm_conv_dgrad

    C, K, R, stride, padding, dilation, H, W = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(7)
    y1 = (torch.randn(2, C, H, W, generator=g) + 8.0).to(DEV, torch.float16)
    w = (torch.randn(K, C, R, R, generator=g) / (C * R * R) ** 0.5).to(DEV, torch.float16)
    scale = (torch.rand(C, generator=g) + 0.5).to(DEV)
    shift = -8.0 * scale + torch.randn(C, generator=g).to(DEV) * 0.5
    P = F.conv2d(y1, w, None, stride, padding, dilation).shape
    dy = torch.randn(P, generator=g).to(DEV, torch.float16)
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    conv_args = ([stride] * 2, [padding] * 2, [dilation] * 2, 1)
    _, s, sx = norm_conv_dgrad(cl(dy), cl(w), cl(y1), scale, shift, *conv_args)
    z = (y1.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).half()
    keep = torch.relu(z) > 0

    def sums(da, acc):  # per channel, in eager's precision class (fp32: helpers.fp32_order)
        da = torch.where(keep, da.to(acc), torch.zeros((), dtype=acc))
        total = (lambda t: t.sum((0, 2, 3))) if acc == torch.float64 else \
            (lambda t: helpers.fp32_sum(helpers.channel_rows(t)))
        return total(da), total(da * y1.to(acc))

    da_ref = torch.nn.grad.conv2d_input(y1.shape, w.double(), dy.double(), stride, padding,
                                        dilation)
    ref = sums(da_ref, torch.float64)
    da_eager = torch.nn.grad.conv2d_input(y1.shape, w, dy, stride, padding, dilation)
    eager = []
    for k in helpers.eager_orders():
        with helpers.fp32_order(k):
            eager.append(sums(da_eager, torch.float64 if not helpers.gpu_faithful()
                              else torch.float32))
    assert keep.any() and (~keep).any()
    assert_rule("sum_da", s, [e[0].float() for e in eager], ref[0], torch.float32)
    assert_rule("sum_da_x", sx, [e[1].float() for e in eager], ref[1], torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_relu_mask_at_exact_zero(dtype):
    # Many pre-activations are exactly 0: PyTorch's threshold_backward blocks the gradient there
    # (it passes only where relu's output is > 0), and so must the dgrad epilogue.
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-1, 3, (2, 4, 5, 5), generator=g).to(DEV, dtype)
    w = torch.randn(6, 4, 3, 3, generator=g).to(DEV, dtype)
    scale = torch.tensor([1.0, 2.0, 0.5, 1.0], device=DEV)
    shift = torch.tensor([-1.0, -2.0, 0.0, -0.5], device=DEV)
    dy = torch.randn(2, 6, 5, 5, generator=g).to(DEV, dtype)

    def run(x, w, scale, shift, fused):
        x, w, scale, shift = leaves(x, w, scale, shift)
        if fused:
            y = norm_conv(x, w, 1, 1, scale=scale, shift=shift)[0]
        else:
            a = torch.relu(x.to(scale.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
            y = F.conv2d(a.to(x.dtype), w, None, 1, 1)
        y.backward(dy.to(y.dtype))
        return y, x.grad, w.grad, scale.grad, shift.grad

    ref = run(x.double(), w.double(), scale.double(), shift.double(), False)
    eager = run(x, w, scale, shift, False)
    fused = run(x, w, scale, shift, True)
    assert (ref[1] == 0).any() and (x * scale.view(1, -1, 1, 1).to(dtype) == -shift.view(
        1, -1, 1, 1).to(dtype)).any()
    for name, f, e, r in zip(("y", "dx", "dw", "dscale", "dshift"), fused, eager, ref):
        assert_rule(name, f, e, r, dtype)


def test_backward_stem_7x7():
    # conv_b is the 7×7 stride-2 stem geometry; small so the 49-tap wgrad stays cheap.
    C, K = 3, 8
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, C, 7, 7, generator=g), torch.randn(K, C, 7, 7, generator=g) / 12
    dy = torch.randn(1, K, 4, 4, generator=g)

    def run(x, w, fused):
        x, w = leaves(x, w)
        y = norm_conv(x, w, 2, 3)[0] if fused else F.conv2d(x, w, None, 2, 3)
        (y * dy.to(y.dtype)).sum().backward()
        return y, x.grad, w.grad

    ref = run(x.double(), w.double(), False)
    eager = run(x, w, False)
    fused = run(x, w, True)
    for name, f, e, r in zip(("y", "dx", "dw"), fused, eager, ref):
        assert_rule(name, f, e, r, torch.float32)


# --------------------------------------------------------------------------------------------------
# Running statistics, determinism, fallbacks, bad input, custom-op checks.


def test_running_stats_match_batch_norm(precision_mode):
    x, w, gamma, beta, conv_args = make("3x3_s2_odd", torch.float16)
    y, mean, var = norm_conv(x, w, *conv_args, collect_stats=True)
    rm, rv = torch.randn(6, device=DEV), torch.rand(6, device=DEV) + 0.5
    rm_r, rv_r = rm.double(), rv.double()
    bn_fold_train(mean, var, y.numel() // y.shape[1], rm, rv, None, None, momentum=0.3)

    def eager_running(rm, rv):
        y_e = F.conv2d(x, w, None, *conv_args)
        F.batch_norm(y_e.float(), rm, rv, None, None, True, 0.3, 1e-5)
        return rm, rv

    eager = eager_class(lambda: eager_running(rm_r.float(), rv_r.float()))
    y_r = F.conv2d(x.double(), w.double(), None, *conv_args)
    F.batch_norm(y_r, rm_r, rv_r, None, None, True, 0.3, 1e-5)
    assert_rule("running_mean", rm, [e[0] for e in eager], rm_r, torch.float32)
    assert_rule("running_var", rv, [e[1] for e in eager], rv_r, torch.float32)


def test_deterministic():
    x, w1, w2, gamma, beta = make_chain("1x1_s2", torch.float16)
    first = chain_grads(x, w1, w2, gamma, beta, "1x1_s2", use_fused=True)
    second = chain_grads(x, w1, w2, gamma, beta, "1x1_s2", use_fused=True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_triton_matches_torch_backend():
    x, w, gamma, beta, conv_args = make("3x3_s1", torch.float16)
    fused = fused_bn_act_conv(x, w, gamma, beta, conv_args, True)
    with fastres.use_backend("torch"):
        reference = fused_bn_act_conv(x, w, gamma, beta, conv_args, True)
    torch.testing.assert_close(fused[0], reference[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(fused[1], reference[1], rtol=1e-4, atol=1e-5)


def test_groups_fall_back_to_eager_conv():
    x = torch.randn(2, 4, 5, 5, device=DEV)
    w = torch.randn(6, 2, 3, 3, device=DEV)
    scale, shift = torch.rand(4, device=DEV) + 0.5, torch.randn(4, device=DEV)
    x_, w_ = leaves(x, w)
    y, mean, var = norm_conv(x_, w_, 1, 1, groups=2, scale=scale, shift=shift, collect_stats=True)
    x_e, w_e = leaves(x, w)
    a = torch.relu(x_e * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    y_e = F.conv2d(a, w_e, None, 1, 1, 1, 2)
    torch.testing.assert_close(y, y_e)
    torch.testing.assert_close(mean, y_e.mean((0, 2, 3)))
    y.sum().backward()
    y_e.sum().backward()
    torch.testing.assert_close(x_.grad, x_e.grad)
    torch.testing.assert_close(w_.grad, w_e.grad)


def test_nan_propagates_to_output_and_stats():
    x, w, gamma, beta, conv_args = make("3x3_s1", torch.float32)
    x[0, 1, 2, 3] = float("nan")
    y, mean, var = norm_conv(x, w, *conv_args, collect_stats=True)
    y_e = F.conv2d(x, w, None, *conv_args)
    assert torch.equal(y.isnan(), y_e.isnan())
    assert mean.isnan().all() and var.isnan().all()


@pytest.mark.parametrize("bad, match", [
    (dict(weight=torch.randn(6, 4, 3, 3)), "channels"),
    (dict(weight=torch.randn(6, 5, 3, 3, dtype=torch.float16)), "dtype"),
    (dict(input=torch.randn(2, 5, 6)), "4-D"),
    (dict(scale=torch.ones(5)), "both"),
    (dict(scale=torch.ones(4), shift=torch.ones(4)), "per-channel"),
    (dict(stride=0), "stride"),
    (dict(input=torch.randn(2, 5, 1, 1), padding=0), "smaller"),
    (dict(input=torch.randint(0, 3, (2, 5, 6, 6))), "float32"),
])
def test_bad_input_raises_clear_errors(bad, match):
    args = dict(input=torch.randn(2, 5, 6, 6), weight=torch.randn(6, 5, 3, 3), stride=1,
                padding=1)
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        norm_conv(**args)


def test_non_contiguous_input():
    x, w, _, _, conv_args = make("3x3_s1", torch.float32)
    x_nc = x.contiguous().transpose(2, 3)  # neither NCHW- nor NHWC-contiguous after slicing
    x_nc = x_nc[:, :, ::1, :]
    y = norm_conv(x_nc, w, *conv_args)[0]
    torch.testing.assert_close(y, F.conv2d(x_nc, w, None, *conv_args), rtol=1e-5, atol=1e-5)


def test_opcheck():
    from fastres.ops import norm_conv as ops

    x = torch.randn(2, 3, 4, 4, device=DEV).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3, device=DEV)
    scale, shift = torch.rand(3, device=DEV) + 0.5, torch.randn(3, device=DEV)
    dy = torch.randn(2, 5, 2, 2, device=DEV).contiguous(memory_format=torch.channels_last)
    conv = ([2, 2], [1, 1], [1, 1], 1)
    x_g, w_g = x.clone().requires_grad_(), w.clone().requires_grad_()
    s_g, t_g = scale.clone().requires_grad_(), shift.clone().requires_grad_()
    torch.library.opcheck(ops.norm_conv_fwd, (x_g, w_g, s_g, t_g, *conv, True))
    # With the statistics' gradient folded into dy (y: the conv's output, its mean, dmean, dvar).
    y = torch.randn_like(dy)
    stats = (y, y.mean((0, 2, 3)), torch.randn(5, device=DEV), torch.randn(5, device=DEV))
    torch.library.opcheck(ops.norm_conv_dgrad, (dy, w, x, scale, shift, *conv, *stats))
    torch.library.opcheck(ops.norm_conv_wgrad, (dy, x, w, scale, shift, *conv, *stats),
                          test_utils=("test_schema", "test_faketensor"))
    b_g, r_g = torch.randn(5, device=DEV).requires_grad_(), dy.clone().requires_grad_()
    torch.library.opcheck(ops.conv_bias_act, (x_g, w_g, b_g, r_g, *conv, True))


def test_torch_compile():
    x, w, gamma, beta, conv_args = make("3x3_s1", torch.float32)

    def f(x, w, gamma, beta):
        y1, m1, v1 = norm_conv(x, w.new_ones(5, 5, 1, 1), collect_stats=True)
        scale, shift = bn_fold(m1, v1, gamma, beta)
        return norm_conv(y1, w, *conv_args, scale=scale, shift=shift)[0]

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, gamma, beta), f(x, w, gamma, beta))


# --------------------------------------------------------------------------------------------------
# Eval: conv + bias + residual + ReLU in the epilogue.


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("geometry, with_residual", [("3x3_s2_odd", True), ("1x1_s1_wide", False)])
def test_conv_bias_act(dtype, geometry, with_residual):
    x, w, _, _, conv_args = make(geometry, dtype)
    g = torch.Generator().manual_seed(7)
    K = w.shape[0]
    bias = torch.randn(K, generator=g).to(DEV)
    out_shape = F.conv2d(x, w, None, *conv_args).shape
    residual = torch.randn(out_shape, generator=g).to(DEV, dtype) if with_residual else None
    dy = torch.randn(out_shape, generator=g).to(DEV, dtype)

    def run(x, w, bias, residual, fused):
        x, w, bias = leaves(x, w, bias)
        inputs = [x, w, bias]
        if residual is not None:
            residual = leaves(residual)[0]
            inputs.append(residual)
        if fused:
            y = conv_bias_act(x, w, bias, *conv_args, residual=residual)
        else:  # eager: conv with the bias, then + residual, then relu
            y = F.conv2d(x, w, bias.to(x.dtype), *conv_args)
            y = torch.relu(y if residual is None else y + residual)
        y.backward(dy.to(y.dtype))
        return [y] + [t.grad for t in inputs]

    ref = run(x.double(), w.double(), bias.double(),
              None if residual is None else residual.double(), False)
    eager = run(x, w, bias, residual, False)
    fused = run(x, w, bias, residual, True)
    for name, f, e, r in zip(("y", "dx", "dw", "dbias", "dresidual"), fused, eager, ref):
        if name == "dbias":
            e = e.float()  # eager's bias grad is in x's dtype; the fused one in bias's (fp32)
        # dbias sums dy over a conv's output grid: conv then a per-channel reduction, a composition
        # (helpers.assert_rule_composition): whole vector.
        assert_rule(name, f, e, r, dtype, per_channel=False)


# --------------------------------------------------------------------------------------------------
# GPU: bigger shapes, bf16 included.

GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("shape", [
    (8, 64, 64, 3, 1, 1, 1, 28),   # N, C, K, R, stride, pad, dil, H
    (8, 256, 64, 1, 1, 0, 1, 28),
    (8, 128, 128, 3, 2, 1, 1, 29),
    (8, 512, 1024, 1, 2, 0, 1, 14),
    (8, 3, 64, 7, 2, 3, 1, 56),
])
def test_gpu_forward_backward(dtype, shape):
    N, C, K, R, stride, pad, dil, H = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, H, generator=g)
    w = torch.randn(K, C, R, R, generator=g) / (C * R * R) ** 0.5
    gamma, beta = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g) * 0.5
    dy = torch.randn(conv_shape := (N, K, (H + 2 * pad - dil * (R - 1) - 1) // stride + 1,
                                    (H + 2 * pad - dil * (R - 1) - 1) // stride + 1), generator=g)
    conv_args = (stride, pad, dil)

    def run(dtype, fused):
        pdt = torch.float64 if dtype == torch.float64 else torch.float32
        xs, ws, gs, bs = leaves(x.to("cuda", dtype).contiguous(memory_format=torch.channels_last),
                                w.to("cuda", dtype).contiguous(memory_format=torch.channels_last),
                                gamma.to("cuda", pdt), beta.to("cuda", pdt))
        run_chain = fused_bn_act_conv if fused else eager_bn_act_conv
        y, mean, var = run_chain(xs, ws, gs, bs, conv_args, True)
        ((y.to(mean.dtype) * dy.to("cuda", mean.dtype)).sum() + mean.sum() + var.sum()).backward()
        return {"y": y, "mean": mean, "var": var, "dx": xs.grad, "dw": ws.grad,
                "dgamma": gs.grad, "dbeta": bs.grad}

    ref = run(torch.float64, False)
    eager = run(dtype, False)
    fused = run(dtype, True)
    assert conv_shape == tuple(fused["y"].shape)
    for name in ref:
        assert_rule(name, fused[name], eager[name], ref[name], dtype)


@pytest.mark.gpu
def test_gpu_deterministic_bf16():
    x, w1, w2, gamma, beta = make_chain("3x3_s2_odd", torch.bfloat16, device="cuda", n=16)
    first = chain_grads(x, w1, w2, gamma, beta, "3x3_s2_odd", use_fused=True)
    second = chain_grads(x, w1, w2, gamma, beta, "3x3_s2_odd", use_fused=True)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --------------------------------------------------------------------------------------------------
# Issue 14: sub-pixel dgrad (MMA work counted), one-launch partial merge, tensor descriptors,
# autotune pruning, and every CUDA configuration in GPU-faithful mode.

from fastres.precision import gpu_faithful  # noqa: E402
from fastres.triton import conv as tconv  # noqa: E402


@pytest.fixture
def dot_counter(monkeypatch):
    """Counts the MMAs (tl.dot calls) the interpreter executes, per program id."""
    from triton.runtime import interpreter

    calls = []
    builder = interpreter.interpreter_builder
    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, *args, **kwargs):
        calls.append(builder.grid_idx)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)
    return calls


def useful_dgrad_blocks(N, H, W, C, K, R, stride, pad, dil, bm, bn, bk):
    """MMA tile-blocks dgrad needs: per phase (h mod σ, w mod σ), its row tiles × column tiles ×
    the taps that hit that phase (r with h + π − r·δ divisible by σ) × channel blocks of K."""
    import math
    total = 0
    for a in range(stride):
        for b in range(stride):
            taps_h = sum((a + pad - r * dil) % stride == 0 for r in range(R))
            taps_w = sum((b + pad - s * dil) % stride == 0 for s in range(R))
            rows = N * len(range(a, H, stride)) * len(range(b, W, stride))
            if rows:
                total += (math.ceil(rows / bm) * math.ceil(C / bn) * taps_h * taps_w
                          * math.ceil(K / bk))
    return total


@pytest.mark.parametrize("geometry", ["3x3_s1", "3x3_s2_odd", "1x1_s2", "3x3_dil2"])
def test_dgrad_issues_only_useful_mma(geometry, dot_counter):
    C, K, R, stride, pad, dil, H, W = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, C, H, W, generator=g)
    w = torch.randn(K, C, R, R, generator=g)
    dy = torch.randn(F.conv2d(x, w, None, stride, pad, dil).shape, generator=g)
    cfg = tconv.conv_configs("dgrad")[0].kwargs
    nhwc = lambda t: t.permute(0, 2, 3, 1).contiguous()  # noqa: E731
    dx = tconv.conv_dgrad(nhwc(dy), nhwc(w), (H, W), (stride,) * 2, (pad,) * 2, (dil,) * 2)[0]
    issued = len(dot_counter)
    useful = useful_dgrad_blocks(2, H, W, C, K, R, stride, pad, dil, cfg["BLOCK_M"],
                                 cfg["BLOCK_N"], cfg["BLOCK_K"])
    dense_loop = math.ceil(2 * H * W / cfg["BLOCK_M"]) * math.ceil(C / cfg["BLOCK_N"]) * R * R \
        * math.ceil(K / cfg["BLOCK_K"])  # what a loop over every tap would issue
    print(f"{geometry}: issued {issued}, useful {useful}, ratio {issued / useful:.2f} "
          f"(all-taps loop: {dense_loop})")
    assert issued == useful
    ref = torch.nn.grad.conv2d_input(x.shape, w.double(), dy.double(), stride, pad, dil)
    eager = torch.nn.grad.conv2d_input(x.shape, w, dy, stride, pad, dil)
    assert_rule("dx", dx.permute(0, 3, 1, 2), eager, ref, torch.float32)


import math  # noqa: E402


def test_merge_partials_one_launch_matches_chan():
    g = torch.Generator().manual_seed(0)
    T, C, block = 150, 5, 32  # three chunks of 64 partials, a short last tile
    total = (T - 1) * block + 7
    data = torch.randn(total, C, generator=g, dtype=torch.float64) * 3 + 100
    tiles = list(data.split(block))
    tm = torch.stack([t.mean(0) for t in tiles]).float()
    tq = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles]).float()
    mean, var = tconv.merge_tile_stats(tm, tq, block, total)
    torch.testing.assert_close(mean.double(), data.mean(0), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), data.var(0, correction=0), rtol=1e-5, atol=1e-5)
    again = tconv.merge_tile_stats(tm, tq, block, total)
    assert torch.equal(mean, again[0]) and torch.equal(var, again[1])
    s, sx = tconv.merge_partials(tm, tq)
    torch.testing.assert_close(s, tm.sum(0), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sx, tq.sum(0), rtol=1e-5, atol=1e-3)


def test_prune_configs():
    x16 = torch.empty(1, dtype=torch.float16)
    x32 = torch.empty(1, dtype=torch.float32)
    limit = tconv.H100_SHARED_MEMORY
    args = lambda t, **kw: dict(dict(X=t, DY=t, C=64, K=64, HAS_DY_PROLOGUE=True), **kw)  # noqa
    for kind in ("fwd", "dgrad", "wgrad"):
        configs = tconv.cuda_conv_configs(kind)
        fp32 = tconv.prune_configs(kind, configs, args(x32, C=1024, K=1024), limit)
        assert all(tconv.shared_memory_bytes(kind, c, 4) <= limit for c in fp32)
        assert len(tconv.prune_configs(kind, configs, args(x16, C=1024, K=1024), limit)) \
            == len(configs)
        small = tconv.prune_configs(kind, configs, args(x16), limit)  # 64 channels
        assert small and all(c.kwargs["BLOCK_N"] <= 64 for c in small)
    # The fp32 configs an sm_90 compile puts over 227 KiB are gone from the fp32 list.
    tiles = lambda kind: {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"])  # noqa
                          for c in tconv.cuda_conv_configs(kind, torch.float32)}
    assert (128, 128, 64) not in tiles("dgrad") and (128, 128, 64) in tiles("fwd")
    assert not {(128, 128, 64), (128, 64, 64)} & tiles("wgrad")
    assert len(tconv.cuda_conv_configs("wgrad", torch.bfloat16)) == 4


def _tiny_conv_case(geometry, dtype):
    x, w, gamma, beta, conv_args = make(geometry, dtype, n=1)
    return x, w, gamma, beta, conv_args


@pytest.mark.parametrize("kind", ["fwd", "dgrad", "wgrad"])
def test_every_cuda_config_gpu_faithful(kind):
    """Each CUDA configuration, pinned, in GPU-faithful mode (fp32 accumulation, the CUDA branch):
    the stride-2 3×3 layer with prologue, statistics and the statistics' gradient (sub-pixel dgrad)
    and the 1×1 plain GEMM (tensor descriptors where Triton has them), fp16."""
    dtype = torch.float16
    for config in tconv.cuda_conv_configs(kind, dtype):
        for geometry in ["3x3_s2_odd", "1x1_s1_16"]:
            with gpu_faithful(), tconv.pinned_config(kind, config):
                x, w, gamma, beta, conv_args = _tiny_conv_case(geometry, dtype)
                if kind == "fwd":
                    ref = eager_bn_act_conv(x.double(), w.double(), gamma.double(),
                                            beta.double(), conv_args, True)
                    eager = eager_bn_act_conv(x, w, gamma, beta, conv_args, True)
                    fused = fused_bn_act_conv(x, w, gamma, beta, conv_args, True)
                    for name, f, e, r in zip(("y", "mean", "var"), fused, eager, ref):
                        # conv, then per-channel statistics: a composition (whole vectors)
                        assert_rule(f"{config} {name}", f, e, r, dtype, per_channel=False)
                    continue
                xs, ws, gs, bs = leaves(x, w, gamma, beta)
                # Only the pinned kind is under test; the others run their own config.
                y, mean, var = fused_bn_act_conv(xs, ws, gs, bs, conv_args, True)
                gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
                ((y.float() * gy).sum() + mean.sum() + 3 * var.sum()).backward()
                xr, wr, gr, br = leaves(x.double(), w.double(), gamma.double(), beta.double())
                yr, mr, vr = eager_bn_act_conv(xr, wr, gr, br, conv_args, True)
                ((yr * gy.double()).sum() + mr.sum() + 3 * vr.sum()).backward()
                xe, we, ge, be = leaves(x, w, gamma, beta)
                ye, me, ve = eager_bn_act_conv(xe, we, ge, be, conv_args, True)
                ((ye.float() * gy).sum() + me.sum() + 3 * ve.sum()).backward()
                for name, f, e, r in (("dx", xs.grad, xe.grad, xr.grad),
                                      ("dw", ws.grad, we.grad, wr.grad),
                                      ("dgamma", gs.grad, ge.grad, gr.grad)):
                    # dgamma sums through the conv chain: a composition (whole vectors)
                    assert_rule(f"{config} {name}", f, e, r, dtype, per_channel=False)


GEOMETRIES["1x1_s1_16"] = (16, 24, 1, 1, 0, 1, 4, 4)


@pytest.mark.parametrize("faithful", [False, True], ids=["pointers", "descriptors"])
def test_plain_gemm_forward_paths(faithful, monkeypatch):
    """1×1 stride-1 forward: tensor descriptors (TMA) in GPU-faithful mode where Triton has them,
    pointers otherwise; both exact under the rule."""
    seen = []
    original = tconv.use_tensor_descriptors
    monkeypatch.setattr(tconv, "use_tensor_descriptors",
                        lambda *ts: seen.append(original(*ts)) or seen[-1])
    with gpu_faithful(faithful):
        x, w, gamma, beta, conv_args = make("1x1_s1_16", torch.float32)
        ref = eager_bn_act_conv(x.double(), w.double(), gamma.double(), beta.double(), conv_args,
                                True)
        eager = eager_bn_act_conv(x, w, gamma, beta, conv_args, True)
        fused = fused_bn_act_conv(x, w, gamma, beta, conv_args, True)
    has_descriptors = tconv.TensorDescriptor is not None
    assert seen == [faithful and has_descriptors]
    for name, f, e, r in zip(("y", "mean", "var"), fused, eager, ref):
        # conv, then per-channel statistics: a composition (whole vectors)
        assert_rule(name, f, e, r, torch.float32, per_channel=False)


def _plain_gemm_case(dtype, n=2, hw=5, C=56, K=40, seed=3):
    """A 1×1 stride-1 layer's operands, NHWC, with both prologues' inputs: M = 50 pixels, C = 56
    and K = 40 channels — two tiles of the interpreter's 32×32×16 config along every output
    dimension, and no dimension a multiple of its tile (each GEMM's last tiles, reduction
    included, are read past the matrix end)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=g) * s)  # noqa: E731
    return dict(x=r(n, hw, hw, C).to(dtype), w=(r(K, 1, 1, C) / C ** 0.5).to(dtype),
                dy=r(n, hw, hw, K).to(dtype), y=r(n, hw, hw, K).to(dtype),
                scale=r(C).abs() + 0.5, shift=r(C, s=0.5), y_mean=r(K, s=0.1), alpha=r(K, s=0.1),
                beta=r(K, s=0.1))


def _run_plain_gemm(kind, t, prologues, split=None):
    plain = ((1, 1), (0, 0), (1, 1))
    x, scale, shift = (t["x"], t["scale"], t["shift"]) if prologues else (None, None, None)
    dy_stats = (t["y"], t["y_mean"], t["alpha"], t["beta"]) if prologues else None
    if kind == "fwd":
        return tconv.conv_fwd(t["x"], t["w"], scale, shift, *plain, True)
    if kind == "dgrad":
        return tconv.conv_dgrad(t["dy"], t["w"], t["x"].shape[1:3], *plain, x, scale, shift,
                                dy_stats=dy_stats)
    return (tconv.conv_wgrad(t["dy"], t["x"], (1, 1), *plain, scale, shift, split=split,
                             dy_stats=dy_stats),)


@pytest.mark.skipif(tconv.TensorDescriptor is None, reason="this Triton has no tensor descriptors")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("prologues", [True, False], ids=["prologues", "bare"])
@pytest.mark.parametrize("kind,split", [("fwd", None), ("dgrad", None), ("wgrad", None),
                                        ("wgrad", 3)], ids=["fwd", "dgrad", "wgrad", "wgrad-split3"])
def test_plain_gemm_descriptors_bitwise_equal_pointers(kind, split, prologues, dtype, monkeypatch,
                                                       dot_counter):
    """1×1 stride-1 fwd / dgrad / wgrad in GPU-faithful mode, with both prologues (BN-apply + ReLU
    of x, the statistics' gradient folded into dy) and without: the descriptor (TMA) path and the
    pointer path return bit-identical results — same tiles, zero fill past the edges, the
    transforms in registers after the load. wgrad split 3 ways: a split's tiles end at its
    boundary (no mask hides a tile that crosses it when there is no prologue; one split is
    empty). Every MMA's operand tiles (and the saved y of dy_stats) come through descriptors."""
    from triton.runtime import interpreter

    t = _plain_gemm_case(dtype)
    seen, loads = [], []
    original = tconv.use_tensor_descriptors
    monkeypatch.setattr(tconv, "use_tensor_descriptors",
                        lambda *ts: seen.append(original(*ts)) or seen[-1])
    load = interpreter.InterpreterBuilder.create_descriptor_load
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_descriptor_load",
                        lambda self, *a, **k: loads.append(1) or load(self, *a, **k))
    with gpu_faithful():
        descriptors = _run_plain_gemm(kind, t, prologues, split)
    assert seen == [True]
    tiles_per_dot = 2 + (prologues and kind != "fwd")  # a, b [and y]
    assert dot_counter and len(loads) == tiles_per_dot * len(dot_counter)
    monkeypatch.setattr(tconv, "use_tensor_descriptors", lambda *ts: False)
    del loads[:], dot_counter[:]
    with gpu_faithful():
        pointers = _run_plain_gemm(kind, t, prologues, split)
    assert dot_counter and not loads
    for a, b in zip(descriptors, pointers):
        if a is None:  # dgrad without the prologue: no partial sums
            assert b is None
            continue
        assert a.dtype == b.dtype and torch.equal(a, b), (a - b).abs().max()
    if kind == "dgrad" and prologues:  # and the pointer path is right: dx against eager's conv
        dx = descriptors[0].permute(0, 3, 1, 2).double()
        dy_eff = t["dy"].double() + (t["alpha"] + t["beta"] * (t["y"].double() - t["y_mean"]))
        da = F.conv2d(dy_eff.to(dtype).double().permute(0, 3, 1, 2),
                      t["w"].double().permute(3, 0, 1, 2))
        z = (t["x"].double() * t["scale"] + t["shift"]).to(dtype).permute(0, 3, 1, 2)
        expected = torch.where(z > 0, da, 0.0) * t["scale"].double()[None, :, None, None]
        torch.testing.assert_close(dx, expected, rtol=2e-3, atol=2e-3)


def test_use_tensor_descriptors_needs_aligned_rows():
    """TMA needs 16-byte aligned bases and row strides: anything else takes the pointer path."""
    aligned = torch.empty(2, 4, 4, 8, dtype=torch.float16)  # 16-byte rows
    odd_rows = torch.empty(2, 4, 4, 3)  # 12-byte rows
    odd_base = torch.empty(2 * 4 * 4 * 8 + 4, dtype=torch.float16)[4:].view(2, 4, 4, 8)  # +8 B
    with gpu_faithful():
        assert tconv.use_tensor_descriptors(aligned, aligned) == (tconv.TensorDescriptor
                                                                  is not None)
        assert not tconv.use_tensor_descriptors(aligned, odd_rows)
        assert not tconv.use_tensor_descriptors(odd_base, aligned)
    with gpu_faithful(False):  # the CPU's own path (no CUDA class): no TMA
        assert not tconv.use_tensor_descriptors(aligned, aligned)
