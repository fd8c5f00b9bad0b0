"""Fused BatchNorm (+ residual add) (+ ReLU): custom-op schemas, fake and autograd, backend dispatch,
and the pure-PyTorch reference backend.

Math (per channel c, over the M = N·H·W elements of that channel):

    forward   y   = act((x − mean)·scale + shift [+ residual]),  scale = weight·invstd, shift = bias
    backward  dy' = dy · [not (y ≤ 0)]                 (ReLU mask, recomputed from x: PyTorch's rule)
              Σdy', Σdy'·x̂                             (one reduction pass)
              dx  = scale·(dy' − Σdy'/M − x̂·Σdy'x̂/M)  (training; eval: dx = scale·dy')
              dresidual = dy',  dweight = Σdy'·x̂,  dbias = Σdy'

Custom ops (namespace ``fastres``), each with a fake implementation:

    batch_norm_act(x, weight?, bias?, residual?, running_mean(a!)?, running_var(b!)?,
                   num_batches_tracked?, momentum: float?, training, eps, relu) -> (y, mean, invstd)
        Training: the batch's fp32 mean and invstd = 1/sqrt(var + eps); the running statistics are
        updated IN PLACE with factor f = momentum, or 1/num_batches_tracked read on the device when
        momentum is None: rm = (1−f)·rm + f·mean, rv = (1−f)·rv + f·var·M/(M−1).
        Eval: mean is an empty tensor (the running mean is the mean), invstd of the running var.
    batch_norm_act_backward(dy, x, weight?, bias?, residual?, mean, invstd, relu, training,
                            need_dx, need_dres, need_dweight, need_dbias, mask_from_output=False)
        -> (dx, dresidual, dweight, dbias)      (an empty tensor for each one not needed)
        mask_from_output: ``residual`` holds the forward's output y; the mask is taken from it.
    and, for SyncBN (which all-gathers between the statistics and their use), the kernel-level
    batch_norm_stats(x) -> (mean, m2), batch_norm_act_backward_reduce and batch_norm_act_backward_dx.

``batch_norm_act`` mutates its running statistics, so its autograd is an autograd.Function around it
(``BatchNormActFunction``; torch.compile traces it). Saved for backward: the BN input x (and the
residual only with a ReLU, to recompute its mask) and per-channel fp32 mean and invstd (in eval the
running mean itself) — never the normalised or activated tensor: sizeof(dtype) bytes per element of
x, or twice that with residual + ReLU (the residual is usually kept alive by the previous block
anyway), plus 8 bytes per channel. Eager BN + add + ReLU saves the input, the BN output and the ReLU
output: 3·sizeof(dtype). Without a ReLU the residual's gradient is dy itself, handed back uncopied.
``mask_from_output`` (BatchNormAct2d's attribute; set on a downsample block's last BN): the output
y is saved in the residual's place and the backward kernels load it instead of the residual and
take the ReLU mask from it (threshold_backward's rule) — same bytes, same launches, one tensor
less kept alive where nothing else keeps the residual and the output is kept anyway (the next
conv's input). Backends declare it with ``supports_mask_from_output``; for one that does not (the
CUDA extension) the residual is saved as without the flag (``backend_masks_from_output``).

The backend contract (TorchBackend below, fastres/triton/batch_norm_act.py, fastres/cuda_backend.py),
on validated tensors (``x`` 4-D and dense in NCHW or NHWC order; dy and residual in the same order):

    forward_train(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                  momentum, eps, relu) -> (y, mean, invstd)    fp32 [C]; running stats in place
    forward_eval(x, weight, bias, residual, running_mean, running_var, eps, relu) -> (y, invstd)
    backward(dy, x, weight, bias, residual, mean, invstd, relu, training, need_dx, need_dres,
             need_dweight, need_dbias[, mask_from_output]) -> (dx, dres, dweight, dbias)
             None where not needed; mask_from_output only where supports_mask_from_output;
             dweight/dbias in weight's/bias's dtype. In eval, mean is the running mean (fp32 or
             x's dtype; converted to fp32 for backends other than Triton).
    batch_stats(x) -> (mean, m2)                                  fp32, or compute_dtype(x)
    apply(x, mean, scale, shift, residual, relu) -> y             y = act((x − mean)·scale + shift + r)
    backward_reduce(dy, x, mean, scale, shift, residual, relu) -> (Σdy', Σdy'·(x − mean))
    backward_dx(dy, x, mean, scale, shift, residual, relu, a, k, c, need_dres) -> (dx, dres | None)
                                  dx = a·dy' + k·(x − mean) + c; k = c = None (eval): dx = a·dy'
Elementwise math and the backward sums run in ``compute_dtype(x)``.

Full-tensor passes and bytes per element of each Triton kernel: see the byte model in
fastres/triton/batch_norm_act.py (training step: 3 launches forward, ≤ 3 backward, 7 passes for
the backward of BN + residual + ReLU with every gradient; eval forward: 1 launch).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastres.backend import auto_choice, get_backend, resolve
from fastres.layout import channel_count, dense, empty_output, is_nhwc, memory_format, per_channel
from fastres.precision import acc_dtype, compute_dtype

__all__ = ["batch_norm_stats", "batch_norm_act_op", "batch_norm_act_backward",
           "BatchNormActFunction", "batch_norm_act_grads", "saved_for_mask",
           "backend_masks_from_output", "batch_norm_act_backward_reduce", "batch_norm_act_backward_dx",
           "TorchBackend",
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
    supports_mask_from_output = True  # backward(..., mask_from_output=True): residual holds y

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
    def _masked_grad(cls, dy, x, mean, scale, shift, residual, relu,
                     mask_from_output=False) -> Tensor:
        dy = dy.to(compute_dtype(x))
        if relu:
            # PyTorch's threshold_backward passes the gradient unless the (rounded) output is <= 0.
            # mask_from_output: ``residual`` holds that output y itself.
            y = residual if mask_from_output else \
                cls._pre_activation(x, mean, scale, shift, residual).to(x.dtype)
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
    def backward_reduce(cls, dy, x, mean, scale, shift, residual, relu,
                        mask_from_output=False) -> tuple[Tensor, Tensor]:
        g = cls._masked_grad(dy, x, mean, scale, shift, residual, relu, mask_from_output)
        sum_dy = g.sum(dim=(0, 2, 3))
        sum_dy_xc = (g * (x.to(g.dtype) - cls._c(mean.to(g.dtype)))).sum(dim=(0, 2, 3))
        return sum_dy, sum_dy_xc

    @classmethod
    def backward_dx(cls, dy, x, mean, scale, shift, residual, relu, a, k, c, need_dres,
                    mask_from_output=False):
        g = cls._masked_grad(dy, x, mean, scale, shift, residual, relu, mask_from_output)
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

    # The backend contract's three entry points, composed from the four above.

    @classmethod
    def forward_train(cls, x, weight, bias, residual, running_mean, running_var,
                      num_batches_tracked, momentum, eps, relu):
        cd, acc = compute_dtype(x), acc_dtype(x)
        mean, m2 = cls.batch_stats(x)
        count = channel_count(x)
        var = m2.to(cd) / count
        invstd = (1.0 / torch.sqrt(var + eps)).to(acc)
        if running_mean is not None:
            factor = (1.0 / num_batches_tracked.to(cd)) if momentum is None else momentum
            with torch.no_grad():
                running_mean.copy_((1.0 - factor) * running_mean.to(cd) + factor * mean.to(cd))
                running_var.copy_((1.0 - factor) * running_var.to(cd)
                                  + factor * var * (count / (count - 1)))
        mean = mean.to(acc)
        y = cls.apply(x, mean, *_fold(invstd, weight, bias), residual, relu)
        return y, mean, invstd

    @classmethod
    def forward_eval(cls, x, weight, bias, residual, running_mean, running_var, eps, relu):
        cd, acc = compute_dtype(x), acc_dtype(x)
        invstd = (1.0 / torch.sqrt(running_var.to(cd) + eps)).to(acc)
        y = cls.apply(x, running_mean.to(acc), *_fold(invstd, weight, bias), residual, relu)
        return y, invstd

    @classmethod
    def backward(cls, dy, x, weight, bias, residual, mean, invstd, relu, training, need_dx,
                 need_dres, need_dweight, need_dbias, mask_from_output=False):
        cd, acc = compute_dtype(x), acc_dtype(x)
        mean, invstd = mean.to(acc), invstd.to(acc)
        scale, shift = _fold(invstd, weight, bias)
        need_dres = need_dres and residual is not None
        dx = dres = dweight = dbias = k = c = None
        if (training and need_dx) or need_dweight or need_dbias:
            sum_dy, sum_dy_xc = cls.backward_reduce(dy, x, mean, scale, shift, residual, relu,
                                                    mask_from_output)
            sum_dy_xhat = sum_dy_xc.to(cd) * invstd.to(cd)
            if need_dweight and weight is not None:
                dweight = sum_dy_xhat.to(weight.dtype)
            if need_dbias and bias is not None:
                dbias = sum_dy.to(bias.dtype)
        a = scale.to(cd)
        if training and need_dx:
            count = channel_count(x)
            k = -a * invstd.to(cd) * (sum_dy_xhat / count)
            c = -a * (sum_dy.to(cd) / count)
        if need_dx or need_dres:
            dx, dres = cls.backward_dx(dy, x, mean, scale, shift, residual, relu, a, k, c,
                                       need_dres, mask_from_output)
        return (dx if need_dx else None), dres, dweight, dbias


def _backend_for(x: Tensor, op: str):
    name = resolve(x.device, op, tuple(x.shape))
    if name == "aten":  # "auto" on CPU, reached below functional (e.g. by SyncBN): the reference
        name = "torch"
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


def _no_tensor(x: Tensor) -> Tensor:
    """What an op returns in place of a tensor it was not asked for."""
    return x.new_empty((0,))


@torch.library.custom_op("fastres::batch_norm_act", mutates_args=("running_mean", "running_var"))
def batch_norm_act_op(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    momentum: Optional[float],
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """y = act(BN(x) [+ residual]); returns (y, mean, invstd), fp32 per channel. Training: the
    batch's statistics, and the running ones updated in place (momentum, or momentum=None:
    1/num_batches_tracked, read on the device). Eval: mean is empty (the running mean is used)."""
    x, residual = _prepare(x, residual)
    acc = acc_dtype(x)
    if not training:
        y, invstd = batch_norm_act_given_stats(x, weight, bias, residual, running_mean,
                                               running_var, eps, relu)
        return y, x.new_empty((0,), dtype=acc), invstd
    if x.numel() == 0:  # eager leaves the running statistics alone
        nan = torch.full((x.shape[1],), float("nan"), dtype=acc, device=x.device)
        return empty_output(x), nan, nan.clone()
    return _backend_for(x, "batch_norm_act").forward_train(
        x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum, eps,
        relu)


def batch_norm_act_given_stats(x, weight, bias, residual, mean, var, eps, relu):
    """(y = act((x − mean)·invstd·weight + bias [+ residual]), invstd = 1/sqrt(var + eps)): the
    backend's forward_eval, one launch — eval's running statistics, or batch statistics computed
    elsewhere (fastres::bn_act_with_stats). A plain function: call it inside a custom op."""
    x, residual = _prepare(x, residual)
    if x.numel() == 0:
        return empty_output(x), torch.rsqrt(var.to(acc_dtype(x)) + eps)
    return _backend_for(x, "batch_norm_act").forward_eval(x, weight, bias, residual, mean, var,
                                                          eps, relu)


@batch_norm_act_op.register_fake
def _(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, momentum,
      training, eps, relu):
    mean = per_channel(x) if training else x.new_empty((0,), dtype=acc_dtype(x))
    return empty_output(x), mean, per_channel(x)


def _backward_flags(weight, bias, residual, need_dres, need_dweight, need_dbias):
    return (bool(need_dres and residual is not None), bool(need_dweight and weight is not None),
            bool(need_dbias and bias is not None))


@torch.library.custom_op("fastres::batch_norm_act_backward", mutates_args=())
def batch_norm_act_backward(
    dy: Tensor,
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    residual: Optional[Tensor],
    mean: Tensor,
    invstd: Tensor,
    relu: bool,
    training: bool,
    need_dx: bool,
    need_dres: bool,
    need_dweight: bool,
    need_dbias: bool,
    mask_from_output: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dresidual = dy', dweight, dbias) of fastres::batch_norm_act; an empty tensor for each
    one not needed. mean: the batch mean (training) or the running mean (eval).
    mask_from_output (with relu): ``residual`` holds the forward's output y, not the residual, and
    the ReLU mask is taken from it (threshold_backward's rule: dy passes unless y <= 0; NaN y
    passes) — inside the kernels, in place of the residual's load."""
    x, dy, residual = _prepare(x, dy, residual)
    mask_from_output = bool(mask_from_output and relu and residual is not None)
    need_dres, need_dweight, need_dbias = _backward_flags(weight, bias, residual, need_dres,
                                                          need_dweight, need_dbias)
    if x.numel() == 0:
        return (empty_output(x) if need_dx else _no_tensor(x),
                empty_output(x) if need_dres else _no_tensor(x),
                torch.zeros_like(weight) if need_dweight else _no_tensor(x),
                torch.zeros_like(bias) if need_dbias else _no_tensor(x))
    backend = _backend_for(x, "batch_norm_act_backward")
    if backend.name != "triton" and mean.dtype != acc_dtype(x):
        mean = mean.to(acc_dtype(x))  # eval with running statistics in x's dtype
    if not mask_from_output:
        dx, dres, dweight, dbias = backend.backward(
            dy, x, weight, bias, residual, mean, invstd, relu, training, need_dx, need_dres,
            need_dweight, need_dbias)
    elif getattr(backend, "supports_mask_from_output", False):
        dx, dres, dweight, dbias = backend.backward(
            dy, x, weight, bias, residual, mean, invstd, relu, training, need_dx, need_dres,
            need_dweight, need_dbias, mask_from_output=True)
    else:
        # A backend without the mask-from-output kernels (the CUDA extension), reached only when the
        # backend changed between forward and backward (BatchNormActFunction saves the residual for
        # it): mask with ATen, then the backward without a ReLU. Correct, one pass more.
        dy = torch.ops.aten.threshold_backward(dy, residual, 0)
        dx, _, dweight, dbias = backend.backward(
            dy, x, weight, bias, None, mean, invstd, False, training, need_dx, False,
            need_dweight, need_dbias)
        dres = dy if need_dres else None
    return tuple(_no_tensor(x) if t is None else t for t in (dx, dres, dweight, dbias))


@batch_norm_act_backward.register_fake
def _(dy, x, weight, bias, residual, mean, invstd, relu, training, need_dx, need_dres,
      need_dweight, need_dbias, mask_from_output=False):
    need_dres, need_dweight, need_dbias = _backward_flags(weight, bias, residual, need_dres,
                                                          need_dweight, need_dbias)
    return (empty_output(x) if need_dx else _no_tensor(x),
            empty_output(x) if need_dres else _no_tensor(x),
            torch.empty_like(weight) if need_dweight else _no_tensor(x),
            torch.empty_like(bias) if need_dbias else _no_tensor(x))


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
# Autograd for fastres::batch_norm_act (a mutating op: an autograd.Function, not register_autograd).


def backend_masks_from_output(x: Tensor) -> bool:
    """Whether the backend that will run x's BN-act backward takes the ReLU mask from the saved
    output (``mask_from_output``). The CUDA extension does not: for it the residual is saved
    instead (``mask_from_output`` is ignored: same results, the residual kept alive). Plain
    lookups, traceable without a graph break; "auto" is judged by its table before availability
    (an unavailable "cuda" choice runs Triton, which could — saving the residual is still right)."""
    name = get_backend()
    if name == "auto":
        name = auto_choice("batch_norm_act_backward", tuple(x.shape)) \
            if x.device.type == "cuda" else "torch"
    return name != "cuda"


def saved_for_mask(residual: Optional[Tensor], y: Tensor, relu: bool,
                   mask_from_output: bool) -> tuple[Optional[Tensor], bool]:
    """(the tensor to save for backward's ReLU mask, whether it is the output y): nothing without
    a ReLU; with one, the residual (with which x recomputes the pre-activation), or y itself with
    ``mask_from_output`` (a residual nothing else keeps alive, an output kept anyway)."""
    if not relu:
        return None, False
    if mask_from_output and residual is not None:
        return y, True
    return residual, False


def batch_norm_act_grads(dy: Optional[Tensor], x: Tensor, weight: Optional[Tensor],
                         bias: Optional[Tensor], saved: Optional[Tensor], mean: Tensor,
                         invstd: Tensor, *, relu: bool, training: bool, has_residual: bool,
                         mask_from_output: bool, need_dx: bool, need_dweight: bool,
                         need_dbias: bool, need_dres: bool):
    """(dx, dweight, dbias, dresidual), None where not needed, of act(BN(x) [+ residual]) given
    what forward saved (``saved``: from ``saved_for_mask``) — the backward of BatchNormActFunction
    and of fastres::bn_act_with_stats. One fastres::batch_norm_act_backward call; without a ReLU
    the residual's gradient is dy itself, handed back uncopied."""
    need_dweight = need_dweight and weight is not None
    need_dbias = need_dbias and bias is not None
    need_dres = need_dres and has_residual
    if dy is None:
        return None, None, None, None
    dy = dense(dy, memory_format(x))
    dx = dres = dw = db = None
    masked_dres = need_dres and relu
    if need_dx or masked_dres or need_dweight or need_dbias:
        dx, dres, dw, db = batch_norm_act_backward(
            dy, x, weight, bias, saved, mean, invstd, relu, training, need_dx, masked_dres,
            need_dweight, need_dbias, mask_from_output)
    if need_dres and not relu:
        dres = dy
    return (dx if need_dx else None, dw if need_dweight else None, db if need_dbias else None,
            dres if need_dres else None)


class BatchNormActFunction(torch.autograd.Function):
    """(y, mean, invstd) = fastres::batch_norm_act(...); gradients flow to x, weight, bias and
    residual. Saves x, mean (eval: the running mean), invstd and, with a ReLU, the residual — or,
    with ``mask_from_output`` on a backend that supports it, the output y in its place."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                momentum, training, eps, relu, mask_from_output=False):
        x, residual = _prepare(x, residual)
        y, mean, invstd = batch_norm_act_op(x, weight, bias, residual, running_mean, running_var,
                                            num_batches_tracked, momentum, training, eps, relu)
        saved, from_output = saved_for_mask(
            residual, y, relu, mask_from_output and backend_masks_from_output(x))
        ctx.save_for_backward(x, weight, bias, saved, mean if training else running_mean, invstd)
        ctx.training, ctx.relu, ctx.has_residual = training, relu, residual is not None
        ctx.mask_from_output = from_output
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # no zero-filled grads for mean and invstd
        return y, mean, invstd

    @staticmethod
    def backward(ctx, dy, _dmean, _dinvstd):
        x, weight, bias, saved, mean, invstd = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        dx, dw, db, dres = batch_norm_act_grads(
            dy, x, weight, bias, saved, mean, invstd, relu=ctx.relu, training=ctx.training,
            has_residual=ctx.has_residual, mask_from_output=ctx.mask_from_output,
            need_dx=need_dx, need_dweight=need_dw, need_dbias=need_db, need_dres=need_dres)
        return (dx, dw, db, dres) + (None,) * 8
