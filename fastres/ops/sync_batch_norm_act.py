"""Synchronised fused BatchNorm (+ residual add) (+ ReLU) over a torch.distributed process group.

Training-mode statistics are those of the batch concatenated over every rank of the group. The
per-rank work reuses the ``fastres::`` custom ops of :mod:`fastres.ops.batch_norm_act`; this file
adds exactly two collectives per layer and the math that merges their results:

    forward   local (count, mean, M2)          fastres::batch_norm_stats
              ONE all_gather of [count, mean, M2] per rank  (fp64 on the wire: counts stay exact)
              Chan merge in rank order:  mean = Σ nᵢ·meanᵢ / M,  M2 = Σ M2ᵢ + Σ nᵢ·(meanᵢ − mean)²
              y = act(BN(x; mean, var = M2/M) [+ residual])   fastres::batch_norm_act (training=False)
    backward  local (Σdy', Σdy'·x̂)                fastres::batch_norm_act_backward_reduce
              ONE all_reduce(sum) of the stacked [Σdy', Σdy'·x̂] (2C floats)
              dx, dresidual with mean_dy = Σdy'/M, mean_dy_xhat = Σdy'x̂/M
                                                   fastres::batch_norm_act_backward_dx
              dweight, dbias: the LOCAL sums, as nn.SyncBatchNorm (DDP averages parameter grads)

Every rank gathers the same numbers and merges them in the same order, so the statistics (and the
running statistics updated from them) are bitwise identical on every rank and deterministic. The
global count M is a device tensor, so uneven per-rank batch sizes (even empty ones) need no host
synchronisation: the path is CUDA-graph capturable. The collectives come from
``torch.distributed._functional_collectives``, which torch.compile traces without a graph break.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from fastres.ops.batch_norm_act import (
    acc_dtype,
    batch_norm_act_backward_dx,
    batch_norm_act_backward_reduce,
    batch_norm_act_op,
    batch_norm_stats,
    channel_count,
    dense,
    memory_format,
)

# The gathered per-rank state travels and is merged in fp64: counts are exact far beyond 2**24
# elements per channel, and the merge adds no rounding of its own. It is 2C+1 numbers per rank.
MERGE_DTYPE = torch.float64


def group_name(process_group) -> str:
    """The registered name of a process group (functional collectives address groups by name)."""
    if process_group is None:
        process_group = dist.group.WORLD
    return process_group.group_name


def gather_batch_stats(x: Tensor, group: str, world_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Global per-channel (mean, biased var, count M) of ``x`` concatenated over the group's ranks.

    mean and var are in the accumulation dtype of ``x`` (fp32 for fp32/fp16/bf16); count is a 0-d
    MERGE_DTYPE device tensor. One all_gather; the merge runs identically on every rank."""
    C = x.shape[1]
    mean, m2 = batch_norm_stats(x)
    count = torch.full((1,), channel_count(x), dtype=MERGE_DTYPE, device=x.device)
    local = torch.cat([count, mean.to(MERGE_DTYPE), m2.to(MERGE_DTYPE)])
    gathered = funcol.all_gather_single(local, 0, group).view(world_size, 2 * C + 1)
    counts, means, m2s = gathered[:, :1], gathered[:, 1:C + 1], gathered[:, C + 1:]
    # An empty rank reports NaN statistics (0/0); it must weigh nothing rather than poison the merge.
    # Masking on the count, not on isnan, keeps NaNs coming from the data.
    present = counts > 0
    means = torch.where(present, means, torch.zeros_like(means))
    m2s = torch.where(present, m2s, torch.zeros_like(m2s))
    total = counts.sum(0)
    global_mean = (counts * means).sum(0) / total
    global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)
    acc = acc_dtype(x)
    return global_mean.to(acc), (global_m2 / total).to(acc), total.squeeze(0)


class SyncBatchNormActFunction(torch.autograd.Function):
    """(y, mean, var, count) = sync BN-act of x; gradients flow to x, weight, bias and residual."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps: float, relu: bool, group: str,
                world_size: int):
        fmt = memory_format(x)
        x = dense(x, fmt)
        residual = None if residual is None else dense(residual, fmt)
        mean, var, count = gather_batch_stats(x, group, world_size)
        # training=False: normalise with the GIVEN (here: global batch) statistics.
        y, _, _ = batch_norm_act_op(x, weight, bias, residual, mean, var, None, None, False,
                                    eps, relu)
        ctx.save_for_backward(x, weight, bias, residual, mean, var, count)
        ctx.eps, ctx.relu, ctx.group = eps, relu, group
        ctx.has_residual = residual is not None
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight, bias, residual, mean, var, count = ctx.saved_tensors
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        invstd = torch.rsqrt(var + ctx.eps)
        dy = dense(dy, memory_format(x))
        sum_dy, sum_dy_xhat = batch_norm_act_backward_reduce(
            dy, x, mean, invstd, weight, bias, residual, ctx.relu)
        # Every rank must take part in the collective, whatever it needs locally.
        global_sums = funcol.all_reduce(torch.stack([sum_dy, sum_dy_xhat]), "sum", ctx.group)
        mean_dy, mean_dy_xhat = (global_sums / count.to(global_sums.dtype)).unbind(0)
        dx = dres = None
        if need_dx or need_dres:
            want_dres = bool(need_dres and ctx.has_residual)
            dx, dres = batch_norm_act_backward_dx(
                dy, x, mean, invstd, weight, bias, residual, mean_dy, mean_dy_xhat, ctx.relu,
                want_dres)
            dx = dx if need_dx else None
            dres = dres if want_dres else None
        dw = sum_dy_xhat.to(weight.dtype) if (need_dw and weight is not None) else None
        db = sum_dy.to(bias.dtype) if (need_db and bias is not None) else None
        return dx, dw, db, dres, None, None, None, None


def sync_batch_norm_act(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                        residual: Optional[Tensor], eps: float, relu: bool, process_group=None,
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, var, count): training-mode BN-act with statistics over ``process_group`` (default:
    the world). mean/var are the fp32 global batch statistics (biased var), count the global
    per-channel element count as a 0-d fp64 device tensor."""
    if process_group is None:
        process_group = dist.group.WORLD
    world_size = dist.get_world_size(process_group)
    return SyncBatchNormActFunction.apply(x, weight, bias, residual, float(eps), bool(relu),
                                          group_name(process_group), world_size)
