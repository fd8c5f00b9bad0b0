"""Triton kernels for fused BatchNorm (+ residual) (+ ReLU), forward and backward.

A 4-D activation is addressed as a matrix of M = N·H·W rows by C channel columns:
  channels_last (IS_NHWC): element (r, c) at r·C + c;
  contiguous NCHW:         element (r, c) at (n·C + c)·HW + s, with r = n·HW + s.
Offsets are int64. Every load and store is masked.

Reductions are two-stage and deterministic: a grid of (row-split g, channel block) programs writes
per-program partials to a [G, C] buffer, and a finalize kernel merges them in fixed order g = 0..G-1.
Batch statistics use a Chan merge of (count, mean, M2) — never Σx² − (Σx)² — computed relative to a
per-channel shift (the channel's first element), so input with a large common offset keeps its
precision.

Arithmetic and accumulation run in ACC (``compute_dtype``): fp32 on CUDA, as ATen's CUDA kernels do;
fp64 for CPU tensors under the interpreter, as ATen's CPU kernels do (acc_type<float, CPU> is
double) — so fastres is held to the same precision class as the eager op it is compared with.
The op rounds the statistics it returns to fp32.

The backend functions at the bottom implement the contract in ``fastres/ops/batch_norm_act.py``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastres.layout import empty_output, is_nhwc
from fastres.precision import compute_dtype, cuda_class, sm_count


@triton.jit
def _tile_offsets(rows, cols, C, HW, IS_NHWC: tl.constexpr):
    """int64 element offsets of the (rows × cols) tile."""
    if IS_NHWC:
        offs = rows[:, None] * C + cols[None, :]
    else:
        n = rows // HW
        s = rows - n * HW
        offs = (n[:, None] * C + cols[None, :]) * HW + s[:, None]
    return offs


@triton.jit
def _channel_shift(X, cols, cmask, HW, IS_NHWC: tl.constexpr, ACC: tl.constexpr):
    """The channel's first element (row 0), or 0 where that is not finite."""
    if IS_NHWC:
        k = tl.load(X + cols, mask=cmask, other=0.0).to(ACC)
    else:
        k = tl.load(X + cols * HW, mask=cmask, other=0.0).to(ACC)
    return tl.where(tl.abs(k) < float("inf"), k, 0.0)


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    n = n_a + n_b
    delta = mean_b - mean_a
    # A non-finite partial mean propagates as a sum would (inf + finite = inf, inf − inf = NaN),
    # which is what eager's mean gives; the weighted form would turn inf into NaN.
    finite = (tl.abs(mean_a) < float("inf")) & (tl.abs(mean_b) < float("inf"))
    mean = tl.where(finite, mean_a + delta * (n_b / n), mean_a + mean_b)
    m2 = m2_a + m2_b + delta * delta * (n_a * (n_b / n))
    return n, mean, m2


@triton.jit
def _round_to(y, DTYPE: tl.constexpr):
    """→ DTYPE with round-to-nearest-even. The Triton interpreter truncates fp32 → bf16, so bf16 is
    rounded on the bits here (identical to the hardware cast on a GPU; NaN kept)."""
    y = y.to(tl.float32)
    if DTYPE == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
        y = tl.where(y != y, y, rounded)
    return y.to(DTYPE)


# ------------------------------------------------------------------------------------------------
# Batch statistics.


@triton.jit
def _stats_partial_kernel(
    X, PART_MEAN, PART_M2,
    M, C, HW, rows_per_prog,
    IS_NHWC: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_g = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    shift = _channel_shift(X, cols, cmask, HW, IS_NHWC, ACC)
    row_begin = pid_g.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, M)
    n_a = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for start in range(row_begin, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(X + _tile_offsets(rows, cols, C, HW, IS_NHWC), mask=mask, other=0.0)
        x = tl.where(mask, x.to(ACC) - shift[None, :], 0.0)
        n_b = tl.sum(rmask.to(ACC), axis=0)
        mean_b = tl.sum(x, axis=0) / n_b
        d = tl.where(mask, x - mean_b[None, :], 0.0)
        m2_b = tl.sum(d * d, axis=0)
        n_a, mean, m2 = _chan_merge(n_a, mean, m2, n_b, mean_b, m2_b)
    part = pid_g.to(tl.int64) * C + cols
    tl.store(PART_MEAN + part, mean, mask=cmask)  # relative to the channel shift
    tl.store(PART_M2 + part, m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(
    X, PART_MEAN, PART_M2, MEAN, M2,
    M, C, HW, rows_per_prog, G,
    IS_NHWC: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    n_a = tl.zeros([BLOCK_C], dtype=ACC)
    mean = tl.zeros([BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_C], dtype=ACC)
    for g in range(0, G):
        part = g * C + cols
        mean_b = tl.load(PART_MEAN + part, mask=cmask, other=0.0)
        m2_b = tl.load(PART_M2 + part, mask=cmask, other=0.0)
        count = tl.minimum(rows_per_prog, M - g * rows_per_prog).to(ACC)
        n_b = tl.zeros([BLOCK_C], dtype=ACC) + count
        n_a, mean, m2 = _chan_merge(n_a, mean, m2, n_b, mean_b, m2_b)
    shift = _channel_shift(X, cols, cmask, HW, IS_NHWC, ACC)
    tl.store(MEAN + cols, mean + shift, mask=cmask)
    tl.store(M2 + cols, m2, mask=cmask)


# ------------------------------------------------------------------------------------------------
# Forward apply: y = act((x − mean)·scale + shift [+ residual]).


@triton.jit
def _load_affine(MEAN, SCALE, SHIFT, cols, cmask, ACC: tl.constexpr):
    """The per-channel (mean, scale, shift) of y = (x − mean)·scale + shift, in ACC."""
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0).to(ACC)
    scale = tl.load(SCALE + cols, mask=cmask, other=0.0).to(ACC)
    shift = tl.load(SHIFT + cols, mask=cmask, other=0.0).to(ACC)
    return mean, scale, shift


@triton.jit
def _load_x_res(X, RES, offs, mask, HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """The input tile and the residual tile (the input again when there is none), in ACC."""
    x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    res = x
    if HAS_RESIDUAL:
        res = tl.load(RES + offs, mask=mask, other=0.0).to(ACC)
    return x, res


@triton.jit
def _pre_activation(x, res, mean, scale, shift, HAS_RESIDUAL: tl.constexpr):
    y = (x - mean[None, :]) * scale[None, :] + shift[None, :]
    if HAS_RESIDUAL:
        y = y + res
    return y


@triton.jit
def _apply_kernel(
    X, RES, Y, MEAN, SCALE, SHIFT,
    M, C, HW,
    IS_NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = _tile_offsets(rows, cols, C, HW, IS_NHWC)
    mean, scale, shift = _load_affine(MEAN, SCALE, SHIFT, cols, cmask, ACC)
    x, res = _load_x_res(X, RES, offs, mask, HAS_RESIDUAL, ACC)
    y = _pre_activation(x, res, mean, scale, shift, HAS_RESIDUAL)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does (max(NaN, 0) would not)
    tl.store(Y + offs, _round_to(y, Y.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _masked_grad(dy, x, res, mean, scale, shift, X_DTYPE: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr):
    """dy' = dy through the ReLU, recomputing the output from x; PyTorch's threshold_backward rule
    (zero where the output, rounded to the activation dtype, is <= 0; NaN outputs pass)."""
    if RELU:
        y = _pre_activation(x, res, mean, scale, shift, HAS_RESIDUAL)
        y = _round_to(y, X_DTYPE).to(y.dtype)
        dy = tl.where(y <= 0.0, 0.0, dy)
    return dy


@triton.jit
def _backward_reduce_partial_kernel(
    DY, X, RES, MEAN, SCALE, SHIFT, PART_DY, PART_DY_XC,
    M, C, HW, rows_per_prog,
    IS_NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_g = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, scale, shift = _load_affine(MEAN, SCALE, SHIFT, cols, cmask, ACC)
    row_begin = pid_g.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, M)
    sum_dy = tl.zeros([BLOCK_C], dtype=ACC)
    sum_dy_xc = tl.zeros([BLOCK_C], dtype=ACC)
    for start in range(row_begin, row_end, BLOCK_R):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        offs = _tile_offsets(rows, cols, C, HW, IS_NHWC)
        x, res = _load_x_res(X, RES, offs, mask, HAS_RESIDUAL, ACC)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        dy = _masked_grad(dy, x, res, mean, scale, shift, X.dtype.element_ty, HAS_RESIDUAL, RELU)
        dy = tl.where(mask, dy, 0.0)
        sum_dy += tl.sum(dy, axis=0)
        sum_dy_xc += tl.sum(tl.where(mask, dy * (x - mean[None, :]), 0.0), axis=0)
    part = pid_g.to(tl.int64) * C + cols
    tl.store(PART_DY + part, sum_dy, mask=cmask)
    tl.store(PART_DY_XC + part, sum_dy_xc, mask=cmask)


@triton.jit
def _sum_partials_kernel(PART_A, PART_B, OUT_A, OUT_B, C, G, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    acc_a = tl.zeros([BLOCK_C], dtype=PART_A.dtype.element_ty)
    acc_b = tl.zeros([BLOCK_C], dtype=PART_B.dtype.element_ty)
    for g in range(0, G):
        part = g * C + cols
        acc_a += tl.load(PART_A + part, mask=cmask, other=0.0)
        acc_b += tl.load(PART_B + part, mask=cmask, other=0.0)
    tl.store(OUT_A + cols, acc_a, mask=cmask)
    tl.store(OUT_B + cols, acc_b, mask=cmask)


@triton.jit
def _backward_dx_kernel(
    DY, X, RES, DX, DRES, MEAN, SCALE, SHIFT, COEF_A, COEF_K, COEF_C,
    M, C, HW,
    IS_NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    HAS_BATCH_STATS: tl.constexpr, HAS_DRES: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = _tile_offsets(rows, cols, C, HW, IS_NHWC)
    mean, scale, shift = _load_affine(MEAN, SCALE, SHIFT, cols, cmask, ACC)
    a = tl.load(COEF_A + cols, mask=cmask, other=0.0).to(ACC)
    x, res = _load_x_res(X, RES, offs, mask, HAS_RESIDUAL, ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    dy = _masked_grad(dy, x, res, mean, scale, shift, X.dtype.element_ty, HAS_RESIDUAL, RELU)
    dx = a[None, :] * dy
    if HAS_BATCH_STATS:  # training; in eval the term is absent (0·inf would make NaN)
        k = tl.load(COEF_K + cols, mask=cmask, other=0.0).to(ACC)
        c = tl.load(COEF_C + cols, mask=cmask, other=0.0).to(ACC)
        dx = dx + k[None, :] * (x - mean[None, :]) + c[None, :]
    tl.store(DX + offs, _round_to(dx, DX.dtype.element_ty), mask=mask)
    if HAS_DRES:
        tl.store(DRES + offs, _round_to(dy, DRES.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launch configuration and launchers (one per kernel).


def launch_config(M: int, C: int, nhwc: bool, device: torch.device) -> dict:
    """Tile sizes and the number of row splits G of the two-stage reductions. Tests monkeypatch this
    to force several chunks and partials on tiny inputs."""
    if not cuda_class(device):
        # The interpreter costs per program instance, not per element: few, large programs.
        block_c = min(triton.next_power_of_2(max(C, 1)), 128)
        return dict(BLOCK_R=max(4096 // block_c, 16), BLOCK_C=block_c, target_programs=2,
                    num_warps=1)
    if nhwc:
        block_c = min(triton.next_power_of_2(C), 64)
        block_r = max(4096 // block_c, 32)
    else:
        block_c = min(triton.next_power_of_2(C), 4)
        block_r = 1024
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, target_programs=4 * sm_count(device),
                num_warps=8 if block_r * block_c >= 4096 else 4)


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def _geometry(x: torch.Tensor):
    N, C, H, W = x.shape
    return N * H * W, C, H * W


def _row_splits(M: int, C: int, cfg: dict) -> tuple[int, int]:
    """(rows_per_prog, G): each reduction program takes a whole number of BLOCK_R chunks."""
    block_r, n_cblocks = cfg["BLOCK_R"], triton.cdiv(C, cfg["BLOCK_C"])
    g = max(1, min(triton.cdiv(M, block_r), cfg["target_programs"] // n_cblocks))
    rows_per_prog = triton.cdiv(triton.cdiv(M, g), block_r) * block_r
    return rows_per_prog, triton.cdiv(M, rows_per_prog)


def _finalize_block(C: int) -> int:
    return min(triton.next_power_of_2(max(C, 1)), 256)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    M, C, HW = _geometry(x)
    nhwc = is_nhwc(x)
    cfg = launch_config(M, C, nhwc, x.device)
    rows_per_prog, G = _row_splits(M, C, cfg)
    part_mean = torch.empty((G, C), dtype=compute_dtype(x), device=x.device)
    part_m2 = torch.empty_like(part_mean)
    _stats_partial_kernel[(G, triton.cdiv(C, cfg["BLOCK_C"]))](
        x, part_mean, part_m2, M, C, HW, rows_per_prog,
        IS_NHWC=nhwc, ACC=_TL_DTYPE[compute_dtype(x)], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    mean = torch.empty(C, dtype=part_mean.dtype, device=x.device)
    m2 = torch.empty_like(mean)
    block = _finalize_block(C)
    _stats_finalize_kernel[(triton.cdiv(C, block),)](
        x, part_mean, part_m2, mean, m2, M, C, HW, rows_per_prog, G,
        IS_NHWC=nhwc, ACC=_TL_DTYPE[compute_dtype(x)], BLOCK_C=block)
    return mean, m2


def apply(x, mean, scale, shift, residual, relu):
    M, C, HW = _geometry(x)
    nhwc = is_nhwc(x)
    cfg = launch_config(M, C, nhwc, x.device)
    y = empty_output(x)
    grid = (triton.cdiv(M, cfg["BLOCK_R"]), triton.cdiv(C, cfg["BLOCK_C"]))
    _apply_kernel[grid](
        x, x if residual is None else residual, y, mean, scale, shift, M, C, HW,
        IS_NHWC=nhwc, HAS_RESIDUAL=residual is not None, RELU=relu,
        ACC=_TL_DTYPE[compute_dtype(x)], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return y


def backward_reduce(dy, x, mean, scale, shift, residual, relu):
    M, C, HW = _geometry(x)
    nhwc = is_nhwc(x)
    cfg = launch_config(M, C, nhwc, x.device)
    rows_per_prog, G = _row_splits(M, C, cfg)
    part_dy = torch.empty((G, C), dtype=compute_dtype(x), device=x.device)
    part_dy_xc = torch.empty_like(part_dy)
    _backward_reduce_partial_kernel[(G, triton.cdiv(C, cfg["BLOCK_C"]))](
        dy, x, x if residual is None else residual, mean, scale, shift, part_dy, part_dy_xc,
        M, C, HW, rows_per_prog,
        IS_NHWC=nhwc, HAS_RESIDUAL=residual is not None, RELU=relu,
        ACC=_TL_DTYPE[compute_dtype(x)], BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    sum_dy = torch.empty(C, dtype=part_dy.dtype, device=x.device)
    sum_dy_xc = torch.empty_like(sum_dy)
    block = _finalize_block(C)
    _sum_partials_kernel[(triton.cdiv(C, block),)](
        part_dy, part_dy_xc, sum_dy, sum_dy_xc, C, G, BLOCK_C=block)
    return sum_dy, sum_dy_xc


def backward_dx(dy, x, mean, scale, shift, residual, relu, a, k, c, need_dres):
    M, C, HW = _geometry(x)
    nhwc = is_nhwc(x)
    cfg = launch_config(M, C, nhwc, x.device)
    dx = empty_output(x)
    dres = empty_output(x) if need_dres else None
    grid = (triton.cdiv(M, cfg["BLOCK_R"]), triton.cdiv(C, cfg["BLOCK_C"]))
    _backward_dx_kernel[grid](
        dy, x, x if residual is None else residual, dx, dx if dres is None else dres,
        mean, scale, shift, a, a if k is None else k, a if c is None else c, M, C, HW,
        IS_NHWC=nhwc, HAS_RESIDUAL=residual is not None, RELU=relu,
        HAS_BATCH_STATS=k is not None, HAS_DRES=need_dres, ACC=_TL_DTYPE[compute_dtype(x)],
        BLOCK_R=cfg["BLOCK_R"], BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])
    return dx, dres
