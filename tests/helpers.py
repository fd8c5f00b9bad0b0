"""Shared test helpers: THE tolerance rule, the fp32-accumulating ("CUDA precision class") eager
baseline of GPU-faithful mode, ReLU-tie handling, and an eager/fp64/fused runner for batch_norm_act.

The tolerance rule (``assert_rule``), the only copy in the suite:

    err(fused vs fp64 reference) <= 2 · err(eager's precision class vs fp64 reference) + floor,
    floor = 1 ulp (in the result's dtype) of the tensor's largest |reference|.

"Eager's precision class" is eager itself in the default CPU mode (ATen's CPU kernels accumulate in
double, and so do fastres's kernels on CPU tensors), and in GPU-faithful mode (``precision_mode``
fixture, tests/conftest.py) the fp32-accumulating composition of ``Fp32ClassBatchNorm``: what eager
computes on a CUDA device, where the fused kernels compute in fp32 too.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

import fastres
import fastres.precision
from fastres.functional import batch_norm_act

# Machine epsilon (the ulp of 1.0) per dtype.
FLOOR_EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
             torch.float64: 2.0 ** -52}


def gpu_faithful() -> bool:
    """Whether the kernels currently take the CUDA device's choices on CPU tensors."""
    return fastres.precision.gpu_faithful_enabled()


def ulp(value: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s grid at |value| (at the smallest normal for smaller values)."""
    v = abs(float(value))
    if not math.isfinite(v):
        return 0.0
    v = max(v, torch.finfo(dtype).tiny)
    _, e = math.frexp(v)  # v = m·2^e with 0.5 <= m < 1
    return math.ldexp(FLOOR_EPS[dtype], e - 1)


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    return (a[finite] - ref[finite]).abs().max().item()


def _abs_err(a: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|a − ref| in fp64, 0 where ref is not finite (positions checked separately)."""
    a, ref = a.double(), ref.double()
    finite = torch.isfinite(ref)
    return torch.where(finite, (a - ref).abs(), torch.zeros_like(ref)).nan_to_num(nan=math.inf)


def assert_rule(fused, eager, ref, name="", *, per_channel=None, floor_ulps=1.0):
    """err(fused, fp64 ref) <= 2·err(eager, fp64 ref) + floor; NaN and ±Inf exactly where eager has
    them. ``eager`` is eager's precision class (see the module docstring), in fused's dtype.

    Per-channel vectors (1-D: batch and running statistics, dweight, dbias) are held to the rule
    channel by channel — err and eager's err are taken per element — so one wrong channel fails
    even when another channel's larger eager error would have hidden it. Other tensors (outputs,
    input gradients, conv weight gradients) are held to it as a whole (max over elements).
    ``per_channel`` overrides the 1-D default.

    The floor is 1 ulp of the tensor's largest |reference| in the result's dtype, and that is
    enough: every result is stored in that dtype, so a kernel that computes the exact value and
    rounds it once is within 1/2 ulp of each element, hence within 1/2 ulp of the largest. Eager's
    error is normally at least that same rounding, so the 2× term covers it; the floor is there for
    the one case where it is not — eager exactly right by luck (a representable reference: zeros,
    small integers, a ReLU's clamp) while the fused kernel's value sits on the other side of a
    rounding boundary (fp32 → bf16 after a different but equally exact fp32 computation), which
    costs at most one ulp. Anything beyond that must be matched by an error eager makes itself.
    ``eager`` may be a list: eager's precision class computed in several summation orders
    (``eager_orders``); its error is then the largest over them, element by element, and the first
    one gives the dtype and the NaN/Inf positions.

    ``floor_ulps`` (<= 1) exists for the tests of the rule itself; no test may raise it above 1."""
    assert floor_ulps <= 1.0, "the floor is at most 1 ulp: never loosen the rule"
    eagers = list(eager) if isinstance(eager, (list, tuple)) else [eager]
    eager = eagers[0]
    assert fused.shape == eager.shape == ref.shape, (
        f"{name}: shape {tuple(fused.shape)} vs eager {tuple(eager.shape)} vs ref {tuple(ref.shape)}")
    assert fused.dtype == eager.dtype, f"{name}: dtype {fused.dtype} vs eager {eager.dtype}"
    f_nan, e_nan = torch.isnan(fused), torch.isnan(eager)
    assert torch.equal(f_nan, e_nan), (
        f"{name}: NaN positions differ from eager ({int((f_nan != e_nan).sum())} elements)")
    f_inf, e_inf = torch.isinf(fused), torch.isinf(eager)
    assert torch.equal(f_inf, e_inf), (
        f"{name}: Inf positions differ from eager ({int((f_inf != e_inf).sum())} elements)")
    if f_inf.any():
        assert torch.equal(fused[f_inf], eager[e_inf]), f"{name}: Inf signs differ from eager"
    finite = torch.isfinite(eager) & torch.isfinite(ref)
    if not finite.any():
        return
    scale = ref.double()[finite].abs().max().item()
    floor = floor_ulps * ulp(scale, eager.dtype)
    e_f = torch.where(finite, _abs_err(fused, ref), torch.zeros((), dtype=torch.float64))
    e_e = torch.stack([_abs_err(e, ref) for e in eagers]).amax(0)
    e_e = torch.where(finite, e_e, torch.zeros((), dtype=torch.float64))
    if per_channel is None:
        per_channel = fused.dim() == 1
    if per_channel:
        bad = e_f > 2 * e_e + floor
        if bad.any():
            c = int(bad.nonzero()[0, 0]) if fused.dim() == 1 else bad.nonzero()[0].tolist()
            raise AssertionError(
                f"{name}: channel {c}: fused error {e_f[bad][0]:.3g} > 2 × eager error "
                f"{e_e[bad][0]:.3g} + floor {floor:.3g} ({int(bad.sum())} of {bad.numel()} "
                f"channels fail; fused {fused.flatten()[bad.flatten()][:4].tolist()} vs ref "
                f"{ref.flatten()[bad.flatten()][:4].tolist()})")
        return
    ef, ee = e_f.max().item(), e_e.max().item()
    assert ef <= 2 * ee + floor, (
        f"{name}: fused error {ef:.3g} > 2 × eager error {ee:.3g} + floor {floor:.3g}")


# --------------------------------------------------------------------------------------------------
# The fp32-accumulating baseline (GPU-faithful mode).
#
# torch's CPU kernels do not accumulate fp32 in fp32: F.batch_norm, var_mean, mean and friends use
# double accumulators (acc_type<float, CPU>), so eager on CPU is more accurate than eager on a GPU
# and would demand more of fp32 kernels than the GPU's eager gives. The baseline below is built only
# from ELEMENTWISE fp32 tensor ops (each one rounds its result to fp32, as a GPU instruction does):
# ``fp32_sum`` adds the rows as a CUDA reduction does — 32 lanes, each adding its strided rows one
# after another (a thread's Welford loop in ATen's CUDA batch-norm kernels), then a pairwise tree
# across the lanes (the warp shuffle) — so no intermediate sum is ever held wider than fp32.

FP32_LANES = 32
# How many summation orders the fp32 baseline is computed in (see ``eager_orders``).
FP32_ORDERS = 8
# fp32_order(DOUBLE_ACC): ATen's CPU order instead, the sum accumulated in double, rounded once.
DOUBLE_ACC = -1
_order: list[int] = [0]



def assert_rule_composition(fused, eager, ref, name="", **kwargs):
    """The rule for results of a COMPOSITION of several ops where no ensemble of eager executions
    is built (a compiled graph, a normconv block, a deep model, SyncBN across ranks): per-channel
    vectors are held to it as whole vectors (the largest error over channels), with the same
    factor 2 and 1-ulp floor.

    Why not channel by channel there: the per-channel rule is exact for ONE op given the SAME
    inputs as eager (test_batch_norm_act.py, the normconv op tests, the emulated CUDA tests hold
    every channel, and module_helpers.check_layers holds every BN layer of the model tests on the
    very inputs it had in the model). In a composition, each side's channel error is a sum of its
    own upstream roundings (different conv / reduction orders in every layer before), an
    independent draw of the same noise; a single eager run per channel then underestimates
    eager's class for a sizeable fraction of channels (measured: ≈30 % per channel for two draws
    of the same Gaussian noise). Modules and blocks (module_helpers.compare_models) are held
    channel by channel against an ensemble of eager executions, every step from the same state.
    Here the whole vector must still be within 2× eager's largest error + 1 ulp."""
    kwargs.setdefault("per_channel", False)
    assert_rule(fused, eager, ref, name, **kwargs)

@contextlib.contextmanager
def fp32_order(k: int):
    """Within the block ``fp32_sum`` adds the rows in order ``k``: 0 as a CUDA reduction does (32
    lanes, then a tree), 1 one after another in row order, k > 1 one after another in a fixed
    pseudo-random permutation of the rows (seed k); DOUBLE_ACC in double, rounded once to fp32
    (ATen's CPU kernels)."""
    _order.append(k)
    try:
        yield
    finally:
        _order.pop()


def fp32_sum(rows: torch.Tensor) -> torch.Tensor:
    """Σ over dim 0 of an fp32 [M, ...] tensor with every partial sum rounded to fp32, in the order
    ``fp32_order`` selects (by default the CUDA shape: 32 lanes each add their strided rows one
    after another, then a pairwise tree adds the lanes).

    The one-after-another orders (k >= 1) are the least accurate fp32 order there is (error
    growing with M, not log M) and are kept on purpose: the interpreter's tl.sum over a tile's
    rows adds them one after another too. Their Python loop is not what makes the GPU-faithful
    tests slow (profiled: ~2 % of test_batch_norm_act.py's GPU-faithful time; the Triton
    interpreter running the CUDA launch geometry is ~95 %)."""
    assert rows.dtype == torch.float32
    M = rows.shape[0]
    if M == 0:
        return rows.new_zeros(rows.shape[1:])
    k = _order[-1]
    if k == DOUBLE_ACC:
        return rows.double().sum(0).float()
    if k > 1:
        rows = rows[torch.randperm(M, generator=torch.Generator().manual_seed(k))]
    lanes = min(FP32_LANES, 1 << (M - 1).bit_length()) if k == 0 else 1
    pad = (-M) % lanes
    if pad:
        rows = torch.cat([rows, rows.new_zeros((pad, *rows.shape[1:]))])
    steps = rows.reshape(-1, lanes, *rows.shape[1:])
    acc = steps[0].clone()
    for s in range(1, steps.shape[0]):
        acc = acc + steps[s]
    while acc.shape[0] > 1:
        acc = acc[0::2] + acc[1::2]
    return acc[0]


def eager_orders() -> range:
    """The summation orders eager's precision class is evaluated in: one (eager itself) in the
    default CPU mode; FP32_ORDERS in GPU-faithful mode, where ``assert_rule`` takes eager's error
    per element as the largest over them. Why: the error of ONE fp32 reduction order in ONE
    channel is rounding luck (0.1 ulp in one order, several in another; a GPU's eager picks its
    order by launch geometry, and the interpreter's tl.sum over rows adds them one after
    another), so a per-channel comparison with a single order fails a correct kernel for a
    sizeable fraction of channels (measured: 1 in 10 cases of the equivalence families). The largest error over a
    few legitimate orders is what "eager's precision class" means channel by channel. A real bug
    (a wrong or dropped channel, a lost element, Σx² − (Σx)²) is orders of magnitude beyond it."""
    return range(FP32_ORDERS if gpu_faithful() else 1)


def channel_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, C, *spatial] → fp32 [N·spatial, C]."""
    return t.float().movedim(1, -1).reshape(-1, t.shape[1])


def fp32_channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Per-channel fp32-accumulated sum of an [N, C, ...] tensor (see ``fp32_sum``)."""
    return fp32_sum(channel_rows(t))


def fp32_var_mean(t: torch.Tensor):
    """(biased var, mean) per channel, two-pass, accumulated in fp32 (see ``fp32_sum``)."""
    M = t.numel() // t.shape[1]
    rows = channel_rows(t)
    mean = fp32_sum(rows) / M
    d = rows - mean
    return fp32_sum(d * d) / M, mean


def _bshape(t, x):
    return t.view(1, -1, *([1] * (x.dim() - 2)))


class Fp32ClassBatchNorm(torch.autograd.Function):
    """F.batch_norm as ATen's CUDA kernels compute it (fp32 accumulation, output in x's dtype,
    dweight/dbias in the weight's), built from fp32 elementwise ops and ``fp32_sum``. The running
    statistics are updated in place (unbiased variance), as eager."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        xf = x.float()
        M = x.numel() // x.shape[1]
        if training:
            var, mean = fp32_var_mean(x)
            if running_mean is not None:
                f = float(momentum)
                with torch.no_grad():
                    rm = (1 - f) * running_mean.float() + f * mean
                    rv = (1 - f) * running_var.float() + f * (var * (M / max(M - 1, 1)))
                    running_mean.copy_(rm)
                    running_var.copy_(rv)
        else:
            mean, var = running_mean.float(), running_var.float()
        invstd = torch.rsqrt(var + eps)
        xc = xf - _bshape(mean, x)
        w = None if weight is None else weight.float()
        z = xc * _bshape(invstd, x)
        if w is not None:
            z = z * _bshape(w, x)
        if bias is not None:
            z = z + _bshape(bias.float(), x)
        ctx.save_for_backward(xc, invstd, w)
        ctx.training, ctx.M = training, M
        ctx.w_dtype = None if weight is None else weight.dtype
        ctx.b_dtype = None if bias is None else bias.dtype
        return z.to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        xc, invstd, w = ctx.saved_tensors
        gf = g.float()
        sum_dy = fp32_channel_sum(gf)
        dot = fp32_channel_sum(gf * xc)
        scale = invstd if w is None else invstd * w
        if ctx.training:
            proj = _bshape(dot / ctx.M * invstd * invstd, g)
            dx = (gf - _bshape(sum_dy / ctx.M, g) - xc * proj) * _bshape(scale, g)
        else:
            dx = gf * _bshape(scale, g)
        dw = None if ctx.w_dtype is None else (dot * invstd).to(ctx.w_dtype)
        db = None if ctx.b_dtype is None else sum_dy.to(ctx.b_dtype)
        return dx.to(g.dtype), dw, db, None, None, None, None, None


_eager_batch_norm = F.batch_norm


def fp32_class_batch_norm(input, running_mean, running_var, weight=None, bias=None,
                          training=False, momentum=0.1, eps=1e-5):
    """Drop-in for F.batch_norm computing in eager's CUDA precision class (fp32 accumulation).
    Bad input raises what eager raises (the checks run through eager first on a tiny slice)."""
    if training:
        F._verify_batch_size(input.size())
    if (training and eps <= 0.0) or eps < 0.0 or input.dtype == torch.float64:
        return _eager_batch_norm(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps)
    return Fp32ClassBatchNorm.apply(input, weight, bias, running_mean, running_var, training,
                                    momentum, eps)


@contextlib.contextmanager
def eager_precision_class(composed: bool = False):
    """Within the block, eager torch code computes in eager's precision class of the current mode:
    unchanged in the default CPU mode; in GPU-faithful mode F.batch_norm (hence nn.BatchNorm2d) is
    replaced by ``fp32_class_batch_norm``. The rest of a ResNet's eager ops are already fp32 class
    on CPU (convolutions and matmuls accumulate in fp32; elementwise ops round per op).
    ``composed``: F.batch_norm is replaced by ``fp32_class_batch_norm`` in the default CPU mode
    too — then, under ``fp32_order(DOUBLE_ACC)``, it is eager's CPU class in other elementwise
    steps (double accumulation as ATen's CPU kernels, each elementwise op rounded to fp32)."""
    if not (gpu_faithful() or composed):
        yield
        return
    saved = F.batch_norm
    F.batch_norm = fp32_class_batch_norm
    try:
        yield
    finally:
        F.batch_norm = saved


def eager_var_mean(y: torch.Tensor):
    """Per-channel (biased var, mean) of an [N, C, H, W] tensor in eager's precision class: torch's
    var_mean (fp32 result, double accumulation on CPU) by default, fp32 accumulation in GPU-faithful
    mode; fp64 input stays fp64."""
    if y.dtype == torch.float64 or not gpu_faithful():
        acc = torch.float64 if y.dtype == torch.float64 else torch.float32
        return torch.var_mean(y.to(acc), dim=(0, 2, 3), correction=0)
    return fp32_var_mean(y)


# --------------------------------------------------------------------------------------------------
# ReLU ties.


def relu_ties(z_eager: torch.Tensor, z_ref: torch.Tensor, local: bool = False) -> torch.Tensor:
    """Where a ReLU's mask may legitimately differ between fp64 and a lower-precision result: the
    elements whose fp64 pre-activation z_ref is nonzero but no farther from 0 than the rule lets a
    fused result err (2 · eager's own forward error of z + 1 ulp of max|z_ref|). Each of eager,
    fused and the reference may pass or block the gradient there, and which one does is rounding
    luck, not a bug. Exact zeros are not ties (every implementation blocks the gradient there).
    ``local``: eager's error at each element instead of its largest (2·|z_eager − z_ref| + 1 ulp of
    |z_ref| there) — for choosing tie-free data where ties cannot be excluded."""
    finite = torch.isfinite(z_ref) & torch.isfinite(z_eager)
    if not finite.any():
        return torch.zeros_like(z_ref, dtype=torch.bool)
    if local:
        zr = z_ref.double()
        spacing = torch.tensor([ulp(v, z_eager.dtype) for v in zr[finite].abs().tolist()],
                               dtype=torch.float64)
        bound = torch.zeros_like(zr)
        bound[finite] = 2 * (z_eager.double() - zr)[finite].abs() + spacing
        return finite & (zr != 0) & (zr.abs() <= bound)
    err = max_err(z_eager[finite], z_ref[finite])
    bound = 2 * err + ulp(z_ref[finite].double().abs().max().item(), z_eager.dtype)
    zr = z_ref.double()
    return finite & (zr != 0) & (zr.abs() <= bound)


# --------------------------------------------------------------------------------------------------
# batch_norm_act: fp64 reference, eager's precision class, fused.


def eager_batch_norm_act(x, rm, rv, w, b, training, momentum, eps, residual, activation):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if activation == "relu":
        y = torch.relu(y)
    return y


def run_three(x, *, residual=None, weight=None, bias=None, running_mean=None, running_var=None,
              training=True, momentum=0.1, eps=1e-5, activation="relu", grad_out=None,
              param_dtype=torch.float32, fused_fn=None):
    """Run fp64 eager (reference), eager's precision class in x's dtype (eager itself, or in
    GPU-faithful mode its fp32-accumulating composition, in every order of ``eager_orders``) and
    fastres (or ``fused_fn``); return {"ref", "eager", "fused": [tensors], "eager_orders": [[tensors]
    per order]} of (output, grads of input/weight/bias/residual that exist, running_mean,
    running_var).

    Every run sees the same input values: the reference gets the low-precision inputs (x, grad_out,
    parameters and running statistics rounded as the others get them) converted exactly to fp64,
    so the errors measured are the computation's, not the inputs' rounding.

    ReLU ties (``relu_ties``) are taken out of the gradient comparison by zeroing grad_out there for
    all three runs: then whichever way a mask falls at those elements, no gradient depends on it.
    Everything else — exact zeros included — is compared."""
    def inputs_for(d, pd):
        def act(t):  # activation-like tensors: x's dtype, then exactly to d
            return None if t is None else t.detach().to(x.dtype).to(d).requires_grad_()

        def par(t, grad=True):  # parameters and running statistics: param_dtype, then to pd
            if t is None:
                return None
            t = t.detach().to(param_dtype).to(pd).clone()
            return t.requires_grad_() if grad else t

        return (act(x), act(residual), par(weight), par(bias), par(running_mean, False),
                par(running_var, False))

    precisions = {"ref": (torch.float64, torch.float64), "eager": (x.dtype, param_dtype),
                  "fused": (x.dtype, param_dtype)}
    g = torch.ones(x.shape, dtype=torch.float64) if grad_out is None else grad_out.detach()
    g = g.to(x.device, x.dtype).double()  # the gradient the low-precision runs get, exactly
    if activation == "relu":
        z = {}
        for name in ("ref", "eager"):
            xx, rr, ww, bb, rm, rv = inputs_for(*precisions[name])
            with torch.no_grad(), eager_precision_class():
                z[name] = eager_batch_norm_act(xx, rm, rv, ww, bb, training, momentum, eps, rr,
                                               None)
        g = g.masked_fill(relu_ties(z["eager"], z["ref"]), 0.0)

    def run(name):
        xx, rr, ww, bb, rm, rv = inputs_for(*precisions[name])
        fn = (fused_fn or batch_norm_act) if name == "fused" else eager_batch_norm_act
        y = fn(xx, rm, rv, ww, bb, training, momentum, eps, rr, activation)
        inputs = [t for t in (xx, ww, bb, rr) if t is not None]
        grads = torch.autograd.grad(y, inputs, g.to(y.dtype))
        return [y, *grads] + [t for t in (rm, rv) if t is not None]

    results = {"ref": run("ref"), "fused": run("fused"), "eager_orders": []}
    for k in eager_orders():
        with eager_precision_class(), fp32_order(k):
            results["eager_orders"].append(run("eager"))
    results["eager"] = results["eager_orders"][0]
    return results


def assert_three(results, what=""):
    eagers = results.get("eager_orders") or [results["eager"]]
    for i, (f, r) in enumerate(zip(results["fused"], results["ref"])):
        assert_rule(f, [e[i] for e in eagers], r, name=f"{what} item {i}")


def make_case(shape, dtype, *, channels_last=False, residual=False, affine=True, stats=True,
              mean=0.0, std=1.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (torch.randn(shape, generator=g) * std + mean).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    kw = dict(
        residual=(torch.randn(shape, generator=g).to(dtype) if residual else None),
        weight=(torch.randn(C, generator=g) if affine else None),
        bias=(torch.randn(C, generator=g) if affine else None),
        running_mean=(torch.randn(C, generator=g) if stats else None),
        running_var=(torch.rand(C, generator=g) + 0.5 if stats else None),
        grad_out=torch.randn(shape, generator=g),
    )
    if kw["residual"] is not None and channels_last:
        kw["residual"] = kw["residual"].to(memory_format=torch.channels_last)
    x = x.to(device)
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return x, kw
