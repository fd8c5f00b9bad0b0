"""Fused BatchNorm (+ residual add) (+ ReLU): custom-op schemas, fake and autograd, backend dispatch,
and the pure-PyTorch reference backend.

Math (per channel c, over the N·H·W elements of that channel):

    forward   y   = act((x − mean)·scale + shift [+ residual]),  scale = weight·invstd, shift = bias
    backward  dy' = dy · [not (y ≤ 0)]                 (ReLU mask, recomputed from x: PyTorch's rule)
              Σdy', Σdy'·x̂                             (one reduction pass)
              dx  = scale·(dy' − Σdy'/M − x̂·Σdy'x̂/M)  (training; eval: dx = scale·dy')
              dresidual = dy',  dweight = Σdy'·x̂,  dbias = Σdy'

Custom ops (namespace ``fastres``), each with a fake implementation:

    batch_norm_stats(x) -> (mean, m2)                                   per-channel fp32 Welford state
    batch_norm_act(x, weight?, bias?, residual?, running_mean?, running_var?, training, eps, relu)
        -> (y, mean, var)                                                autograd registered
    batch_norm_act_backward_reduce(dy, x, mean, invstd, weight?, bias?, residual?, relu)
        -> (sum_dy, sum_dy_xhat)
    batch_norm_act_backward_dx(dy, x, mean, invstd, weight?, bias?, residual?, mean_dy?, mean_dy_xhat?,
        relu, need_dresidual) -> (dx, dresidual)

Saved for backward: the BN input x (and the residual when there is a ReLU, to recompute its mask;
or, with ``mask_from_output``, the output instead) and per-channel fp32 mean and variance — never the normalised or activated tensor. That is
sizeof(dtype) bytes per element of x — 2 for bf16/fp16, 4 for fp32 — or twice that with residual +
ReLU (the residual is usually kept alive by the previous block anyway), plus 8 bytes per channel.
Eager BN + add + ReLU saves the input, the BN output and the ReLU output: 3·sizeof(dtype).

Every backend implements four kernel-level functions on validated tensors (``x`` is 4-D and dense in
NCHW or NHWC order, ``dy`` and ``residual`` in the same order; per-channel tensors are fp32 [C]):

    batch_stats(x) -> (mean, m2)                                  fp32, or compute_dtype(x)
    apply(x, mean, scale, shift, residual, relu) -> y             y = act((x − mean)·scale + shift + r)
    backward_reduce(dy, x, mean, scale, shift, residual, relu) -> (Σdy', Σdy'·(x − mean))
    backward_dx(dy, x, mean, scale, shift, residual, relu, a, k, c, need_dres) -> (dx, dres | None)
                                  dx = a·dy' + k·(x − mean) + c; k = c = None (eval): dx = a·dy'
Elementwise math and the backward sums run in ``compute_dtype(x)``; per-channel coefficients a, k, c
come in that dtype, mean/scale/shift in fp32 (the values the forward used, so the recomputed ReLU
mask is the forward's).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastres.backend import resolve
from fastres.layout import channel_count, dense, empty_output, is_nhwc, memory_format, per_channel
from fastres.precision import acc_dtype, compute_dtype

__all__ = ["batch_norm_stats", "batch_norm_act_op", "batch_norm_act_backward_reduce",
           "batch_norm_act_backward_dx", "TorchBackend",
           # layout / precision helpers, re-exported for existing callers
           "channel_count", "dense", "empty_output", "is_nhwc", "memory_format", "per_channel",
           "acc_dtype", "compute_dtype"]


def _fold(invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Per-channel fp32 (scale, shift) with y = (x − mean)·scale + shift."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = torch.zeros_like(invstd) if bias is None else bias.to(invstd.dtype)
    return scale.contiguous(), shift.contiguous()


# --------------------------------------------------------------------------------------------------
# The pure-PyTorch reference backend (also the CPU fallback). Computes in fp32.


class TorchBackend:
    name = "torch"

    @staticmethod
    def _c(v: Tensor) -> Tensor:
        return v.view(1, -1, 1, 1)

    @staticmethod
    def batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.to(compute_dtype(x))
        # The mean on its own (not var_mean's) so that an inf input gives an inf mean, as eager.
        mean = xf.mean(dim=(0, 2, 3))
        m2 = torch.var(xf, dim=(0, 2, 3), correction=0) * channel_count(x)
        return mean, m2

    @classmethod
    def _pre_activation(cls, x, mean, scale, shift, residual) -> Tensor:
        cd = compute_dtype(x)
        y = (x.to(cd) - cls._c(mean.to(cd))) * cls._c(scale.to(cd)) + cls._c(shift.to(cd))
        if residual is not None:
            y = y + residual.to(cd)
        return y

    @classmethod
    def _masked_grad(cls, dy, x, mean, scale, shift, residual, relu) -> Tensor:
        dy = dy.to(compute_dtype(x))
        if relu:
            # PyTorch's threshold_backward passes the gradient unless the (rounded) output is <= 0.
            y = cls._pre_activation(x, mean, scale, shift, residual).to(x.dtype)
            dy = torch.where(y <= 0, torch.zeros_like(dy), dy)
        return dy

    @classmethod
    def apply(cls, x, mean, scale, shift, residual, relu) -> Tensor:
        y = cls._pre_activation(x, mean, scale, shift, residual)
        if relu:
            y = torch.relu(y)
        out = empty_output(x)
        out.copy_(y)
        return out

    @classmethod
    def backward_reduce(cls, dy, x, mean, scale, shift, residual, relu) -> tuple[Tensor, Tensor]:
        g = cls._masked_grad(dy, x, mean, scale, shift, residual, relu)
        sum_dy = g.sum(dim=(0, 2, 3))
        sum_dy_xc = (g * (x.to(g.dtype) - cls._c(mean.to(g.dtype)))).sum(dim=(0, 2, 3))
        return sum_dy, sum_dy_xc

    @classmethod
    def backward_dx(cls, dy, x, mean, scale, shift, residual, relu, a, k, c, need_dres):
        g = cls._masked_grad(dy, x, mean, scale, shift, residual, relu)
        dx = cls._c(a.to(g.dtype)) * g
        if k is not None:
            dx = dx + cls._c(k) * (x.to(g.dtype) - cls._c(mean.to(g.dtype))) + cls._c(c)
        out = empty_output(x)
        out.copy_(dx)
        dres = None
        if need_dres:
            dres = empty_output(x)
            dres.copy_(g)
        return out, dres


def _backend_for(x: Tensor, op: str):
    name = resolve(x.device, op, tuple(x.shape))
    if name != "torch" and x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fastres backend {name!r} supports float32, float16 and bfloat16, got "
                        f"{x.dtype}; use backend 'torch' for it")
    if name == "torch":
        return TorchBackend
    if name == "triton":
        from fastres.triton import batch_norm_act as triton_backend

        return triton_backend
    if name == "cuda":
        from fastres import cuda_backend

        return cuda_backend
    raise RuntimeError(f"unknown backend {name!r}")


def _prepare(x: Tensor, *others: Optional[Tensor]) -> tuple[Tensor, ...]:
    fmt = memory_format(x)
    return (dense(x, fmt),) + tuple(None if t is None else dense(t, fmt) for t in others)


# --------------------------------------------------------------------------------------------------
# Custom ops.


@torch.library.custom_op("fastres::batch_norm_stats", mutates_args=())
def batch_norm_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel fp32 batch mean and M2 = Σ(x − mean)² (count = N·H·W), merged stably (Chan)."""
    (x,) = _prepare(x)
    if channel_count(x) == 0:
        nan = torch.full((x.shape[1],), float("nan"), dtype=acc_dtype(x), device=x.device)
        return nan, nan.clone()
    mean, m2 = _backend_for(x, "stats").batch_stats(x)
    return mean.to(acc_dtype(x)), m2.to(acc_dtype(x))


@batch_norm_stats.register_fake
def _(x):
    return per_channel(x), per_channel(x)


def _stats_setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[0])


def _stats_backward(ctx, dmean, dm2):
    """d mean/dx = 1/M, d M2/dx = 2(x − mean): lets the statistics be differentiated on their own
    (e.g. by a caller that merges them across processes before normalising)."""
    x, mean = ctx.saved_tensors
    c = (1, -1, 1, 1)
    dx = dmean.view(c) / max(channel_count(x), 1) + 2 * dm2.view(c) * (x.to(mean.dtype) - mean.view(c))
    return dx.to(x.dtype)


batch_norm_stats.register_autograd(_stats_backward, setup_context=_stats_setup_context)


@torch.library.custom_op("fastres::batch_norm_act", mutates_args=())
def batch_norm_act_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    eps: float,
    relu: bool,
    mask_from_output: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(BN(x) [+ residual]); returns (y, mean, var) — the fp32 per-channel statistics used:
    the batch's (biased variance) in training, the running ones otherwise.

    mask_from_output (only with residual and relu): autograd saves y instead of the residual and
    takes the ReLU mask from it (eager's threshold_backward rule; the same mask, since y is the
    rounded pre-activation where it is > 0). For a residual nothing else keeps alive (a downsample's
    output) whose block output is kept anyway (the next conv's input): one tensor less saved, one
    elementwise pass more in backward."""
    x, residual = _prepare(x, residual)
    if training:
        if channel_count(x) == 0:
            mean, m2 = batch_norm_stats(x)
            return empty_output(x), mean, m2
        backend = _backend_for(x, "stats")
        mean, m2 = backend.batch_stats(x)
        # Rounded to fp32 once, from the backend's accumulation precision.
        var = (m2.to(compute_dtype(x)) / channel_count(x)).to(acc_dtype(x))
        mean = mean.to(acc_dtype(x))
    else:
        mean = running_mean.to(acc_dtype(x), copy=True)
        var = running_var.to(acc_dtype(x), copy=True)
    invstd = torch.rsqrt(var + eps)
    scale, shift = _fold(invstd, weight, bias)
    if x.numel() == 0:
        return empty_output(x), mean, var
    y = _backend_for(x, "apply").apply(x, mean, scale, shift, residual, relu)
    return y, mean, var


@batch_norm_act_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, training, eps, relu,
      mask_from_output=False):
    return empty_output(x), per_channel(x), per_channel(x)


@torch.library.custom_op("fastres::batch_norm_act_backward_reduce", mutates_args=())
def batch_norm_act_backward_reduce(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    relu: bool,
) -> tuple[Tensor, Tensor]:
    """Per-channel (Σdy', Σdy'·x̂) with dy' the gradient through the ReLU mask. Accumulated in
    compute_dtype(x) (fp32 on CUDA, fp64 on CPU, as ATen's batch-norm backward), returned as fp64
    so that rounding them does not add a per-channel (systematic) error to dx."""
    x, dy, residual = _prepare(x, dy, residual)
    mean, invstd = mean.to(acc_dtype(x)).contiguous(), invstd.to(acc_dtype(x)).contiguous()
    if x.numel() == 0:
        zero = torch.zeros_like(mean, dtype=torch.float64)
        return zero, zero.clone()
    scale, shift = _fold(invstd, weight, bias)
    sum_dy, sum_dy_xc = _backend_for(x, "backward_reduce").backward_reduce(
        dy, x, mean, scale, shift, residual, relu)
    return sum_dy.double(), sum_dy_xc.double() * invstd.double()


@batch_norm_act_backward_reduce.register_fake
def _(dy, x, mean, invstd, weight, bias, residual, relu):
    return per_channel(x, torch.float64), per_channel(x, torch.float64)


@torch.library.custom_op("fastres::batch_norm_act_backward_dx", mutates_args=())
def batch_norm_act_backward_dx(
    dy: Tensor,
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    mean_dy: Optional[Tensor],
    mean_dy_xhat: Optional[Tensor],
    relu: bool,
    need_dresidual: bool,
) -> tuple[Tensor, Tensor]:
    """(dx, dresidual). With batch statistics pass mean_dy = Σdy'/M and mean_dy_xhat = Σdy'x̂/M (M the
    element count per channel, over all ranks for SyncBN); without them (eval) dx = scale·dy'.
    dresidual is an empty tensor unless need_dresidual."""
    x, dy, residual = _prepare(x, dy, residual)
    mean, invstd = mean.to(acc_dtype(x)).contiguous(), invstd.to(acc_dtype(x)).contiguous()
    scale, shift = _fold(invstd, weight, bias)
    cd = compute_dtype(x)
    a = (invstd.to(cd) if weight is None else weight.to(cd) * invstd.to(cd)).contiguous()
    k = c = None
    if mean_dy is not None:
        k = (-a * invstd.to(cd) * mean_dy_xhat.to(cd)).contiguous()
        c = (-a * mean_dy.to(cd)).contiguous()
    if x.numel() == 0:
        dres = empty_output(x) if need_dresidual else x.new_empty((0,))
        return empty_output(x), dres
    dx, dres = _backend_for(x, "backward_dx").backward_dx(
        dy, x, mean, scale, shift, residual, relu, a, k, c, need_dresidual)
    return dx, (dres if need_dresidual else x.new_empty((0,)))


@batch_norm_act_backward_dx.register_fake
def _(dy, x, mean, invstd, weight, bias, residual, mean_dy, mean_dy_xhat, relu, need_dresidual):
    return empty_output(x), (empty_output(x) if need_dresidual else x.new_empty((0,)))


# --------------------------------------------------------------------------------------------------
# Autograd for fastres::batch_norm_act.


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, running_mean, running_var, training, eps, relu = inputs[:9]
    mask_from_output = len(inputs) > 9 and inputs[9]
    y, mean, var = output
    fmt = memory_format(x)
    # The residual is only needed to recompute the ReLU mask (or the output gives the mask).
    ctx.mask_from_output = bool(mask_from_output and residual is not None and relu)
    saved_residual = dense(residual, fmt) if (residual is not None and relu
                                              and not ctx.mask_from_output) else None
    saved_output = y if ctx.mask_from_output else None
    ctx.save_for_backward(dense(x, fmt), weight, bias, saved_residual, mean, var, saved_output)
    ctx.training, ctx.eps, ctx.relu = training, eps, relu
    ctx.has_residual = residual is not None


def _backward(ctx, dy, _dmean, _dvar):
    x, weight, bias, residual, mean, var, y = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
    invstd = torch.rsqrt(var + ctx.eps)
    dy = dense(dy, memory_format(x))
    relu = ctx.relu
    if ctx.mask_from_output:
        # dy' = dy where y > 0 (NaN passes), then the BN backward without the ReLU; dres = dy'.
        dy = torch.ops.aten.threshold_backward(dy, dense(y, memory_format(x)), 0)
        relu = False
    sum_dy = sum_dy_xhat = None
    if ctx.training or need_dw or need_db:
        sum_dy, sum_dy_xhat = batch_norm_act_backward_reduce(
            dy, x, mean, invstd, weight, bias, residual, relu)
    dx = dres = None
    if need_dx or need_dres:
        mean_dy = mean_dy_xhat = None
        if ctx.training:
            m = max(channel_count(x), 1)
            mean_dy, mean_dy_xhat = sum_dy / m, sum_dy_xhat / m
        write_dres = bool(need_dres and ctx.has_residual and not ctx.mask_from_output)
        dx, dres = batch_norm_act_backward_dx(
            dy, x, mean, invstd, weight, bias, residual, mean_dy, mean_dy_xhat, relu, write_dres)
        if ctx.mask_from_output:
            dres = dy  # the masked gradient is the residual's
        if not need_dx:
            dx = None
        if not (need_dres and ctx.has_residual):
            dres = None
    dw = sum_dy_xhat.to(weight.dtype) if (need_dw and weight is not None) else None
    db = sum_dy.to(bias.dtype) if (need_db and bias is not None) else None
    return dx, dw, db, dres, None, None, None, None, None, None


batch_norm_act_op.register_autograd(_backward, setup_context=_setup_context)
