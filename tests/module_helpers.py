"""Helpers for the module / model tests: run a fused model, its eager twin and an fp64 copy of the twin
through the same optimizer steps, and hold the fused one to the tolerance rule against the fp64 copy."""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import os

import torch

import fastres

try:
    from helpers import assert_rule  # the foundation's tolerance-rule assert (tests/helpers.py)
except ImportError:  # pragma: no cover - until tests/helpers.py lands
    _EPS = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7,
            torch.float64: 2.0 ** -52}

    def assert_rule(fused, eager, ref, name="", floor_ulps=8):
        assert fused.shape == eager.shape == ref.shape, f"{name}: shapes differ"
        assert fused.dtype == eager.dtype, f"{name}: dtype {fused.dtype} vs {eager.dtype}"
        assert torch.equal(torch.isnan(fused), torch.isnan(eager)), f"{name}: NaNs differ"
        finite = torch.isfinite(eager) & torch.isfinite(ref)
        f, e, r = fused[finite].double(), eager[finite].double(), ref[finite].double()
        if r.numel() == 0:
            return
        floor = floor_ulps * _EPS[eager.dtype] * max(r.abs().max().item(), 1e-3)
        e_f, e_e = (f - r).abs().max().item(), (e - r).abs().max().item()
        assert e_f <= 2 * e_e + floor, f"{name}: fused error {e_f:.3g} > 2 × {e_e:.3g} + {floor:.3g}"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_backend_available() -> bool:
    return (importlib.util.find_spec("fastres.triton.batch_norm_act") is not None
            and fastres.backend_status()["triton"][0])


# The module tests run the Triton kernels (under the interpreter on CPU) once that backend exists.
TEST_BACKEND = "triton" if triton_backend_available() else "torch"

# The Triton interpreter converts fp32 to bf16 by truncation (round toward zero; a GPU rounds to
# nearest even), which doubles the kernels' bf16 rounding error relative to eager's.
BF16_TRUNCATES = TEST_BACKEND == "triton" and interpreting() and not torch.cuda.is_available()


def run_steps(model, inputs, grad_outputs, *, steps=3, train=True, dtype=None, residuals=None,
              autocast=False, lr=0.05):
    """Run ``steps`` optimizer steps (SGD with momentum). Returns {name: tensor}: per step the output
    and the gradients of the input, the residual and every parameter; at the end every parameter and
    buffer. ``dtype`` casts model and inputs (the fp64 reference uses torch.float64)."""
    model.train(train)
    params = dict(model.named_parameters())
    opt = torch.optim.SGD(params.values(), lr=lr, momentum=0.9) if params else None
    out = {}
    for step in range(steps):
        x = inputs[step].detach()
        x = (x.to(dtype) if dtype is not None else x.clone()).requires_grad_()
        args = [x]
        if residuals is not None:
            r = residuals[step].detach()
            args.append((r.to(dtype) if dtype is not None else r.clone()).requires_grad_())
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            y = model(*args)
        g = grad_outputs[step].to(y.dtype)
        targets = args + list(params.values())
        grads = torch.autograd.grad(y, targets, g, allow_unused=True)
        out[f"step{step}.output"] = y.detach()
        names = ["input", "residual"][:len(args)] + list(params)
        for name, grad in zip(names, grads):
            if grad is not None:
                out[f"step{step}.grad.{name}"] = grad
        for p, grad in zip(params.values(), grads[len(args):]):
            p.grad = grad
        if opt is not None and train:
            opt.step()
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        out[f"final.{name}"] = t.detach().clone()
    return out


def compare_models(fused, eager, inputs, grad_outputs, *, steps=3, train=True, dtype=None,
                   residuals=None, autocast=False, lr=0.05, what=""):
    """fused and eager (same parameters, same state_dict keys) against an fp64 copy of eager."""
    reference = copy.deepcopy(eager).double()
    fused, eager = fused, eager
    if dtype is not None:
        fused, eager = fused.to(dtype), eager.to(dtype)
    kw = dict(steps=steps, train=train, residuals=residuals, lr=lr)
    r = run_steps(reference, inputs, grad_outputs, dtype=torch.float64, **kw)
    e = run_steps(eager, inputs, grad_outputs, dtype=dtype, autocast=autocast, **kw)
    f = run_steps(fused, inputs, grad_outputs, dtype=dtype, autocast=autocast, **kw)
    assert f.keys() == e.keys() == r.keys(), (
        f"{what}: compared tensors differ: {sorted(set(f) ^ set(e))}")
    for key in f:
        if f[key].dtype in (torch.int64, torch.int32):
            assert torch.equal(f[key], e[key]), f"{what} {key}: {f[key]} vs eager {e[key]}"
        else:
            assert_rule(f[key], e[key], r[key], name=f"{what} {key}")
    return f, e, r


def make_inputs(shape, steps=3, seed=0, channels_last=False, offset=0.0):
    """``steps`` random tensors; ``offset`` adds per-channel means drawn from [-offset, offset]
    (BN inputs: the running mean is then not ~0, so the tolerance floor, which scales with the
    reference's magnitude, does not demand more than fp32 can give for a mean of O(1) values)."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g) for _ in range(steps)]
    if offset:
        shift = (torch.rand(shape[1], generator=g) * 2 - 1) * offset
        xs = [x + shift.view(1, -1, 1, 1) for x in xs]
    if channels_last:
        xs = [x.to(memory_format=torch.channels_last) for x in xs]
    return xs


def randomize_bn(model, seed=0):
    """Non-trivial BN affine parameters and running statistics (so eval mode tests something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model
