"""Normalized convolution: conv2d whose input may be the BN-apply + ReLU of a raw conv output
(prologue) and whose output's batch statistics come with it (epilogue). Custom-op schemas, fake and
autograd, backend dispatch, and the pure-PyTorch reference backend.

Math (one op, ``fastres::norm_conv_fwd``):

    a    = relu(x·scale[c] + shift[c])  if scale/shift are given (rounded to x's dtype), else x
    y    = conv2d(a, weight, stride, padding, dilation, groups)      zero padding of a, not of x
    mean = mean(y) over (N, P, Q),  var = biased variance: fp32, of the stored y   (collect_stats)

For a chain conv_a → BN_a → ReLU → conv_b, x is conv_a's raw output y_a and
(scale, shift) = (w_a·invstd_a, b_a − mean_a·w_a·invstd_a) come from ``bn_fold`` — ordinary
differentiable torch math on the per-channel statistics — so autograd composes exactly:

    backward of norm_conv_fwd, given (dy, dmean, dvar):
        g      = dy + dmean/M + dvar·2(y − mean)/M          (the statistics' gradient, M = N·P·Q)
        da     = conv2d_input(g, weight)                      dgrad
        da'    = da · [not round(x·scale+shift) ≤ 0]          ReLU mask recomputed from raw x
        dx     = scale·da',  dscale = Σda'·x,  dshift = Σda'  (dgrad epilogue, per channel)
        dweight = conv2d_weight(act(x), g)                    wgrad; act(x) recomputed on load

and the dmean/dvar of conv_a's statistics (which flow back from scale/shift through bn_fold) are
folded into conv_a's own backward as above. Only raw conv outputs (x, y) and per-channel fp32
vectors are saved for backward.

Custom ops (namespace ``fastres``), each with a fake implementation:

    norm_conv_fwd(x, weight, scale?, shift?, stride, padding, dilation, groups, collect_stats)
        -> (y, mean, var)                                                       autograd registered
    norm_conv_dgrad(dy, weight, x, scale?, shift?, stride, padding, dilation, groups,
                    y?, y_mean?, dmean?, dvar?)
        -> (dx, sum_da, sum_da_x)        sums are empty without the prologue
    norm_conv_wgrad(dy, x, weight, scale?, shift?, stride, padding, dilation, groups,
                    y?, y_mean?, dmean?, dvar?) -> dweight
        (y, y_mean, dmean, dvar: the statistics' gradient, folded into dy while loading it)
    bn_act_with_stats(x, mean, var, weight?, bias?, residual?, eps, relu, mask_from_output=False)
        -> (y, invstd)
        training-mode act(BN(x) + residual) with x's batch statistics given (from the conv
        epilogue that produced x): one apply launch; the backward is fastres::batch_norm_act_backward
        in training mode (the statistics' gradient is part of dx), none is returned to mean / var
                                                                                autograd registered
    conv_bias_act(x, weight, bias?, residual?, stride, padding, dilation, groups, relu) -> y
        y = act(conv2d(x, weight) + bias + residual): eval mode's conv with the folded BN, the add
        and the ReLU in the conv's epilogue (one rounding)                      autograd registered

Backends: "torch" (this file, F.conv2d; any groups and dtype) and "triton" (fastres/triton/conv.py:
NHWC implicit GEMM, groups = 1, fp16 / bf16 / fp32). Everything else — other groups, fp64, the
"cuda" backend, which has no conv — runs the torch reference. Outputs are channels_last.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastres.backend import resolve
from fastres.layout import dense, empty_output, memory_format

CL = torch.channels_last
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_cl(shape, like: Tensor, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=CL)


def _cl_strides(shape) -> tuple[int, ...]:
    N, C, H, W = shape
    return (H * W * C, 1, W * C, C)  # what torch.empty(memory_format=channels_last) gives


def _to_cl(t: Tensor) -> Tensor:
    """``t`` itself when it already has the exact strides of torch.empty(memory_format=
    channels_last) (the kernels' NHWC outputs do), else a copy that has them — so real and fake
    outputs agree even for size-1 dimensions."""
    if t.stride() == _cl_strides(t.shape):
        return t
    out = _empty_cl(t.shape, t)
    out.copy_(t)
    return out


def conv_output_shape(x_shape, w_shape, stride, padding, dilation) -> list[int]:
    N, _, H, W = x_shape
    K, _, R, S = w_shape
    P = (H + 2 * padding[0] - dilation[0] * (R - 1) - 1) // stride[0] + 1
    Q = (W + 2 * padding[1] - dilation[1] * (S - 1) - 1) // stride[1] + 1
    return [N, K, P, Q]


def _vec(v: Optional[Tensor], dtype) -> Optional[Tensor]:
    return None if v is None else v.to(dtype).contiguous()


# --------------------------------------------------------------------------------------------------
# The pure-PyTorch reference backend (also the fallback). Tensors are logical NCHW.


class TorchBackend:
    name = "torch"

    @staticmethod
    def activate(x, scale, shift):
        """relu(x·scale + shift) computed in fp32 and rounded to x's dtype, as eager BN + ReLU."""
        if scale is None:
            return x
        z = x.to(scale.dtype) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return torch.relu(z).to(x.dtype)

    @classmethod
    def fwd(cls, x, w, scale, shift, stride, padding, dilation, groups, collect_stats):
        y = F.conv2d(cls.activate(x, scale, shift), w, None, stride, padding, dilation, groups)
        if not collect_stats:
            return y, None, None
        var, mean = torch.var_mean(y.to(_acc_dtype(y)), dim=(0, 2, 3), correction=0)
        return y, mean, var

    @staticmethod
    def effective_dy(dy, dy_stats):
        """dy + alpha + beta·(y − mean) per output channel (fp32 math, rounded to dy's dtype)."""
        if dy_stats is None:
            return dy
        y, mean, alpha, beta = dy_stats
        c = lambda v: v.view(1, -1, 1, 1)  # noqa: E731
        g = dy.to(mean.dtype) + c(alpha) + c(beta) * (y.to(mean.dtype) - c(mean))
        return g.to(dy.dtype)

    @classmethod
    def dgrad(cls, dy, w, x, scale, shift, stride, padding, dilation, groups, dy_stats=None):
        dy = cls.effective_dy(dy, dy_stats)
        da = torch.nn.grad.conv2d_input(x.shape, w, dy, stride, padding, dilation, groups)
        if scale is None:
            return da, None, None
        acc = scale.dtype
        z = (x.to(acc) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).to(x.dtype)
        da_kept = torch.where(torch.relu(z) <= 0, 0.0, da.to(acc))  # threshold_backward's rule
        dx = (da_kept * scale.view(1, -1, 1, 1)).to(x.dtype)
        return dx, da_kept.sum((0, 2, 3)), (da_kept * x.to(acc)).sum((0, 2, 3))

    @classmethod
    def wgrad(cls, dy, x, w, scale, shift, stride, padding, dilation, groups, dy_stats=None):
        dy = cls.effective_dy(dy, dy_stats)
        return torch.nn.grad.conv2d_weight(cls.activate(x, scale, shift), w.shape, dy, stride,
                                           padding, dilation, groups)


class TritonBackend:
    """Adapter from logical NCHW channels_last tensors to fastres.triton.conv's NHWC kernels."""
    name = "triton"

    @staticmethod
    def _nhwc(t: Tensor) -> Tensor:
        return t.permute(0, 2, 3, 1)  # dense: every tensor here is channels_last

    @classmethod
    def fwd(cls, x, w, scale, shift, stride, padding, dilation, groups, collect_stats):
        from fastres.triton import conv

        y, mean, var = conv.conv_fwd(cls._nhwc(x), cls._nhwc(w), scale, shift, stride, padding,
                                     dilation, collect_stats)
        return y.permute(0, 3, 1, 2), mean, var

    @classmethod
    def _stats(cls, dy_stats):
        if dy_stats is None:
            return None
        y, mean, alpha, beta = dy_stats
        return cls._nhwc(y), mean, alpha, beta

    @classmethod
    def dgrad(cls, dy, w, x, scale, shift, stride, padding, dilation, groups, dy_stats=None):
        from fastres.triton import conv

        dx, s, sx = conv.conv_dgrad(cls._nhwc(dy), cls._nhwc(w), x.shape[2:], stride, padding,
                                    dilation, cls._nhwc(x), scale, shift, cls._stats(dy_stats))
        return dx.permute(0, 3, 1, 2), s, sx

    @classmethod
    def wgrad(cls, dy, x, w, scale, shift, stride, padding, dilation, groups, dy_stats=None):
        from fastres.triton import conv

        dw = conv.conv_wgrad(cls._nhwc(dy), cls._nhwc(x), w.shape[2:], stride, padding, dilation,
                             scale, shift, dy_stats=cls._stats(dy_stats))
        return dw.permute(0, 3, 1, 2)


def _backend_for(x: Tensor, groups: int, op: str):
    name = resolve(x.device, "norm_conv_" + op, tuple(x.shape))
    if name in ("triton", "cuda") and groups == 1 and x.dtype in TRITON_DTYPES:
        return TritonBackend
    return TorchBackend


def _dy_stats(dy: Tensor, y, y_mean, dmean, dvar):
    """(y, mean, alpha, beta) with dy_eff = dy + alpha + beta·(y − mean), or None: the gradient
    reaching y through its batch statistics (∂mean/∂y = 1/M, ∂var/∂y = 2(y − mean)/M)."""
    if y is None or (dmean is None and dvar is None) or y.shape[1] == 0:
        return None
    acc = _acc_dtype(dy)
    m = y.shape[0] * y.shape[2] * y.shape[3]
    zeros = torch.zeros(y.shape[1], dtype=acc, device=y.device)
    alpha = zeros if dmean is None else dmean.to(acc) / m
    beta = zeros if dvar is None else dvar.to(acc) * 2 / m
    return (y.contiguous(memory_format=CL), y_mean.to(acc).contiguous(), alpha.contiguous(),
            beta.contiguous())


def _prepare(x: Tensor, weight: Tensor, scale, shift):
    acc = _acc_dtype(x)
    return x.contiguous(memory_format=CL), weight.contiguous(memory_format=CL), \
        _vec(scale, acc), _vec(shift, acc)


# --------------------------------------------------------------------------------------------------
# Custom ops.


@torch.library.custom_op("fastres::norm_conv_fwd", mutates_args=())
def norm_conv_fwd(
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    collect_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, var): y = conv2d(relu(x·scale + shift) or x, weight) in channels_last; mean and
    biased var of y per output channel (fp32) when collect_stats, else empty tensors."""
    x, weight, scale, shift = _prepare(x, weight, scale, shift)
    out_shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    collect = collect_stats and out_shape[0] * out_shape[2] * out_shape[3] > 0
    if x.numel() == 0 or weight.numel() == 0:
        y = F.conv2d(TorchBackend.activate(x, scale, shift), weight, None, stride, padding,
                     dilation, groups)
        mean = var = None
        if collect:
            var, mean = torch.var_mean(y.to(_acc_dtype(y)), dim=(0, 2, 3), correction=0)
    else:
        backend = _backend_for(x, groups, "fwd")
        y, mean, var = backend.fwd(x, weight, scale, shift, stride, padding, dilation, groups,
                                   collect)
    if collect_stats and not collect:  # no output pixels: NaN statistics, as torch.var_mean gives
        mean = torch.full((out_shape[1],), float("nan"), dtype=_acc_dtype(x), device=x.device)
        var = mean.clone()
    if mean is None:
        mean, var = x.new_empty((0,), dtype=_acc_dtype(x)), x.new_empty((0,), dtype=_acc_dtype(x))
    return _to_cl(y), mean, var


@norm_conv_fwd.register_fake
def _(x, weight, scale, shift, stride, padding, dilation, groups, collect_stats):
    out_shape = conv_output_shape(x.shape, weight.shape, stride, padding, dilation)
    n = out_shape[1] if collect_stats else 0
    return (_empty_cl(out_shape, x), x.new_empty((n,), dtype=_acc_dtype(x)),
            x.new_empty((n,), dtype=_acc_dtype(x)))


@torch.library.custom_op("fastres::norm_conv_dgrad", mutates_args=())
def norm_conv_dgrad(
    dy: Tensor,
    weight: Tensor,
    x: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    y: Optional[Tensor] = None,
    y_mean: Optional[Tensor] = None,
    dmean: Optional[Tensor] = None,
    dvar: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, Σda', Σda'·x). Without scale/shift: dx = conv2d_input(dy, weight) and empty sums. With
    them, dx is the gradient wrt raw x of relu(x·scale + shift) and the fp32 sums are per channel.
    With y (this conv's output), its batch mean y_mean and the gradients dmean / dvar of its batch
    statistics, dy is first replaced by dy + dmean/M + 2·dvar·(y − mean)/M (in the operand load)."""
    x, weight, scale, shift = _prepare(x, weight, scale, shift)
    dy = dy.contiguous(memory_format=CL)
    dy_stats = _dy_stats(dy, y, y_mean, dmean, dvar)
    if x.numel() == 0 or dy.numel() == 0 or weight.numel() == 0:
        dx, s, sx = TorchBackend.dgrad(dy, weight, x, scale, shift, stride, padding, dilation,
                                       groups, dy_stats)
    else:
        dx, s, sx = _backend_for(x, groups, "dgrad").dgrad(dy, weight, x, scale, shift, stride,
                                                           padding, dilation, groups, dy_stats)
    if s is None:
        s, sx = x.new_empty((0,), dtype=_acc_dtype(x)), x.new_empty((0,), dtype=_acc_dtype(x))
    return _to_cl(dx), s, sx


@norm_conv_dgrad.register_fake
def _(dy, weight, x, scale, shift, stride, padding, dilation, groups, y=None, y_mean=None,
      dmean=None, dvar=None):
    n = x.shape[1] if scale is not None else 0
    return (_empty_cl(x.shape, x), x.new_empty((n,), dtype=_acc_dtype(x)),
            x.new_empty((n,), dtype=_acc_dtype(x)))


@torch.library.custom_op("fastres::norm_conv_wgrad", mutates_args=())
def norm_conv_wgrad(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    scale: Optional[Tensor],
    shift: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    y: Optional[Tensor] = None,
    y_mean: Optional[Tensor] = None,
    dmean: Optional[Tensor] = None,
    dvar: Optional[Tensor] = None,
) -> Tensor:
    """dweight = conv2d_weight(relu(x·scale + shift) or x, dy), in weight's dtype, channels_last;
    y, y_mean, dmean, dvar as for norm_conv_dgrad."""
    x, weight, scale, shift = _prepare(x, weight, scale, shift)
    dy = dy.contiguous(memory_format=CL)
    dy_stats = _dy_stats(dy, y, y_mean, dmean, dvar)
    if x.numel() == 0 or dy.numel() == 0 or weight.numel() == 0:
        dw = TorchBackend.wgrad(dy, x, weight, scale, shift, stride, padding, dilation, groups,
                                dy_stats)
    else:
        dw = _backend_for(x, groups, "wgrad").wgrad(dy, x, weight, scale, shift, stride, padding,
                                                    dilation, groups, dy_stats)
    return _to_cl(dw.to(weight.dtype))


@norm_conv_wgrad.register_fake
def _(dy, x, weight, scale, shift, stride, padding, dilation, groups, y=None, y_mean=None,
      dmean=None, dvar=None):
    return _empty_cl(weight.shape, weight)


# --------------------------------------------------------------------------------------------------
# Autograd for fastres::norm_conv_fwd.


def _setup_context(ctx, inputs, output):
    x, weight, scale, shift, stride, padding, dilation, groups, collect_stats = inputs
    y, mean, _ = output
    ctx.save_for_backward(x, weight, scale, shift, y if collect_stats else None,
                          mean if collect_stats else None)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)


def _backward(ctx, dy, dmean, dvar):
    x, weight, scale, shift, y, mean = ctx.saved_tensors
    need_dx, need_dw, need_dscale, need_dshift = ctx.needs_input_grad[:4]
    g = dy.contiguous(memory_format=CL)
    # The gradient through the batch statistics is folded into dy inside dgrad / wgrad.
    stats = (y, mean, dmean, dvar) if (y is not None and (dmean is not None or dvar is not None)) \
        else (None, None, None, None)
    dx = dw = dscale = dshift = None
    if need_dx or need_dscale or need_dshift:
        dx, s, sx = norm_conv_dgrad(g, weight, x, scale, shift, *ctx.conv_args, *stats)
        if scale is not None:
            dscale = sx.to(scale.dtype) if need_dscale else None
            dshift = s.to(shift.dtype) if need_dshift else None
        if not need_dx:
            dx = None
    if need_dw:
        dw = norm_conv_wgrad(g, x, weight, scale, shift, *ctx.conv_args, *stats)
    return dx, dw, dscale, dshift, None, None, None, None, None


norm_conv_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Inference: conv with the folded BN's bias, + residual, ReLU, all in the conv's epilogue.


def _conv_bias_act_torch(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    y = F.conv2d(x, weight, None, stride, padding, dilation, groups).to(_acc_dtype(x))
    if bias is not None:
        y = y + bias.to(y.dtype).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(y.dtype)
    return (torch.relu(y) if relu else y).to(x.dtype)


@torch.library.custom_op("fastres::conv_bias_act", mutates_args=())
def conv_bias_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    relu: bool,
) -> Tensor:
    """act(conv2d(x, weight) + bias [+ residual]) in channels_last; bias fp32 or x's dtype."""
    x, weight, bias, _ = _prepare(x, weight, bias, None)
    if residual is not None:
        residual = residual.contiguous(memory_format=CL)
    backend = _backend_for(x, groups, "fwd")
    if backend is TritonBackend and x.numel() and weight.numel():
        from fastres.triton import conv

        nhwc = TritonBackend._nhwc
        y = conv.conv_fwd(nhwc(x), nhwc(weight), None, None, stride, padding, dilation, False,
                          bias=bias, residual=None if residual is None else nhwc(residual),
                          relu=relu)[0].permute(0, 3, 1, 2)
    else:
        y = _conv_bias_act_torch(x, weight, bias, residual, stride, padding, dilation, groups,
                                 relu)
    return _to_cl(y)


@conv_bias_act.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups, relu):
    return _empty_cl(conv_output_shape(x.shape, weight.shape, stride, padding, dilation), x)


def _cba_setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, relu = inputs
    ctx.save_for_backward(x, weight, output if relu else None)
    ctx.conv_args = (list(stride), list(padding), list(dilation), groups)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _cba_backward(ctx, dy):
    x, weight, y = ctx.saved_tensors
    need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
    g = dy.contiguous(memory_format=CL)
    if y is not None:  # threshold_backward on the output: pass unless y <= 0
        g = torch.where(y <= 0, torch.zeros_like(g), g)
    dx = norm_conv_dgrad(g, weight, x, None, None, *ctx.conv_args)[0] if need_dx else None
    dw = norm_conv_wgrad(g, x, weight, None, None, *ctx.conv_args) if need_dw else None
    db = g.sum((0, 2, 3), dtype=torch.float32).to(ctx.bias_dtype) \
        if (need_db and ctx.bias_dtype is not None) else None
    return dx, dw, db, (g if need_dres else None), None, None, None, None, None


conv_bias_act.register_autograd(_cba_backward, setup_context=_cba_setup_context)


# --------------------------------------------------------------------------------------------------
# Training-mode BN + residual + ReLU from statistics computed elsewhere (a conv's epilogue).


def _bn_ops():
    from fastres.ops import batch_norm_act as bn_ops

    return bn_ops


@torch.library.custom_op("fastres::bn_act_with_stats", mutates_args=())
def bn_act_with_stats(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    eps: float,
    relu: bool,
    mask_from_output: bool = False,
) -> tuple[Tensor, Tensor]:
    """Training-mode act(BN(x) [+ residual]) whose batch statistics — x's own mean and biased
    variance, fp32 per channel — were computed elsewhere (by the epilogue of the conv that produced
    x), so the forward is the BN-act backend's one apply launch (its eval entry point, with
    invstd = 1/sqrt(var + eps) computed in it). Returns (y, invstd); invstd is not differentiable.
    The backward is fastres::batch_norm_act_backward in training mode (reduce, finalize, dx: the
    gradient through the statistics is part of dx, one rounding, as eager), so none is returned to
    ``mean`` and ``var``: they must be x's batch statistics. mask_from_output (residual + ReLU):
    backward takes the ReLU mask from the saved y instead of keeping the residual (see
    fastres::batch_norm_act)."""
    # Not fastres::batch_norm_act: that op declares its running statistics mutated.
    return _bn_ops().batch_norm_act_given_stats(x, weight, bias, residual, mean, var, eps, relu)


@bn_act_with_stats.register_fake
def _(x, mean, var, weight, bias, residual, eps, relu, mask_from_output=False):
    return empty_output(x), torch.empty_like(mean)


def _bas_setup_context(ctx, inputs, output):
    x, mean, var, weight, bias, residual, eps, relu = inputs[:8]
    mask_from_output = len(inputs) > 8 and inputs[8]
    bn = _bn_ops()
    y, invstd = output
    x, residual = bn._prepare(x, residual)
    saved, from_output = bn.saved_for_mask(
        residual, y, relu, mask_from_output and bn.backend_masks_from_output(x))
    ctx.save_for_backward(x, mean, invstd, weight, bias, saved)
    ctx.relu, ctx.has_residual, ctx.mask_from_output = relu, residual is not None, from_output
    ctx.mark_non_differentiable(invstd)
    ctx.set_materialize_grads(False)


def _bas_backward(ctx, dy, _dinvstd):
    """The BN-act op's training backward (fastres::batch_norm_act_backward): reduce, finalize, dx."""
    x, mean, invstd, weight, bias, saved = ctx.saved_tensors
    need_dx, _, _, need_dw, need_db, need_dres = ctx.needs_input_grad[:6]
    dx, dw, db, dres = _bn_ops().batch_norm_act_grads(
        dy, x, weight, bias, saved, mean, invstd, relu=ctx.relu, training=True,
        has_residual=ctx.has_residual, mask_from_output=ctx.mask_from_output, need_dx=need_dx,
        need_dweight=need_dw, need_dbias=need_db, need_dres=need_dres)
    return dx, None, None, dw, db, dres, None, None, None


bn_act_with_stats.register_autograd(_bas_backward, setup_context=_bas_setup_context)
