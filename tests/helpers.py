"""Shared test helpers: the tolerance rule and an eager/fp64/fused runner for batch_norm_act."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fastres
from fastres.functional import batch_norm_act

FLOOR_EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
             torch.float64: 2.0 ** -52}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    finite = torch.isfinite(ref)
    if not finite.any():
        return 0.0
    return (a[finite] - ref[finite]).abs().max().item()


def assert_rule(fused, eager, ref, name="", floor_ulps=8):
    """err(fused, fp64) <= 2·err(eager, fp64) + floor, with floor a few ulps of the dtype at the
    reference's scale. NaN/Inf must sit exactly where eager has them."""
    assert fused.shape == eager.shape == ref.shape, f"{name}: shape {fused.shape} vs {eager.shape}"
    assert fused.dtype == eager.dtype, f"{name}: dtype {fused.dtype} vs eager {eager.dtype}"
    f_nan, e_nan = torch.isnan(fused), torch.isnan(eager)
    assert torch.equal(f_nan, e_nan), f"{name}: NaN positions differ from eager"
    f_inf, e_inf = torch.isinf(fused), torch.isinf(eager)
    assert torch.equal(f_inf, e_inf), f"{name}: Inf positions differ from eager"
    if f_inf.any():
        assert torch.equal(fused[f_inf], eager[e_inf]), f"{name}: Inf signs differ from eager"
    finite = torch.isfinite(eager) & torch.isfinite(ref)
    if not finite.any():
        return
    fused, eager, ref = fused[finite], eager[finite], ref[finite]
    scale = ref.double().abs().max().item()
    floor = floor_ulps * FLOOR_EPS[eager.dtype] * max(scale, 1e-3)
    e_f, e_e = max_err(fused, ref), max_err(eager, ref)
    assert e_f <= 2 * e_e + floor, (
        f"{name}: fused error {e_f:.3g} > 2 × eager error {e_e:.3g} + floor {floor:.3g}")


def eager_batch_norm_act(x, rm, rv, w, b, training, momentum, eps, residual, activation):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if residual is not None:
        y = y + residual
    if activation == "relu":
        y = torch.relu(y)
    return y


def run_three(x, *, residual=None, weight=None, bias=None, running_mean=None, running_var=None,
              training=True, momentum=0.1, eps=1e-5, activation="relu", grad_out=None,
              param_dtype=torch.float32):
    """Run fp64 eager (reference), eager in x's dtype, and fastres; return {name: [tensors]} of
    (output, grads of input/weight/bias/residual that exist, running_mean, running_var)."""
    results = {}
    for name in ("ref", "eager", "fused"):
        d = torch.float64 if name == "ref" else x.dtype
        pd = torch.float64 if name == "ref" else param_dtype
        xx = x.detach().to(d).requires_grad_()
        rr = None if residual is None else residual.detach().to(d).requires_grad_()
        ww = None if weight is None else weight.detach().to(pd).requires_grad_()
        bb = None if bias is None else bias.detach().to(pd).requires_grad_()
        rm = None if running_mean is None else running_mean.detach().to(pd).clone()
        rv = None if running_var is None else running_var.detach().to(pd).clone()
        fn = batch_norm_act if name == "fused" else eager_batch_norm_act
        y = fn(xx, rm, rv, ww, bb, training, momentum, eps, rr, activation)
        g = torch.ones_like(y) if grad_out is None else grad_out.to(d)
        inputs = [t for t in (xx, ww, bb, rr) if t is not None]
        grads = torch.autograd.grad(y, inputs, g)
        results[name] = [y, *grads] + [t for t in (rm, rv) if t is not None]
    return results


def assert_three(results, what=""):
    names = ["output", "grad_input", "grad_weight", "grad_bias", "grad_residual",
             "running_mean", "running_var"]
    for i, (f, e, r) in enumerate(zip(results["fused"], results["eager"], results["ref"])):
        assert_rule(f, e, r, name=f"{what} item {i}")


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
