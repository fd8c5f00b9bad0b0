"""Triton kernels for fused BatchNorm (+ residual) (+ ReLU), forward and backward.

A 4-D activation is addressed as a matrix of M = N·H·W rows by C channel columns:
  channels_last (IS_NHWC): element (r, c) at r·C + c;
  contiguous NCHW:         element (r, c) at (n·C + c)·HW + s, with r = n·HW + s.
Offsets are int64. Every load and store is masked.

Reductions are two-stage and deterministic: a grid of (row split g, channel block) programs writes
per-program partials to a channel-major [C, G] buffer (G ≤ MAX_PARTIALS), and a finalize kernel, a
program per few channels, loads a [BLOCK_C, BLOCK_G] tile of them at once and reduces it in a fixed
tree order. No program loops over partials. Batch statistics merge (count, mean, M2) partials with
Chan's formula, never Σx² − (Σx)²; each row block is two-pass (its mean, then Σ(x − mean)²), so
input with a large common offset keeps its precision with no shift. (A shift by the channel's first
element x₀ would cost precision: for zero-mean data Σ(x − x₀) grows to n·|x₀|, and its fp32
rounding swamps the mean.)

The per-channel math lives in the finalize kernels: the forward one writes mean and invstd and updates
the running statistics in place (momentum, or 1/num_batches_tracked read from the device, and the
unbiased variance); the backward one writes dweight, dbias and the dx coefficients. A training step
is three launches forward (stats partials, finalize, apply) and at most three backward (reduce
partials, finalize, dx); eval forward is one (the apply kernel computes invstd from running_var).

Arithmetic and accumulation run in ACC (``compute_dtype``): fp32 on CUDA, as ATen's CUDA kernels do;
fp64 for CPU tensors under the interpreter, as ATen's CPU kernels do (acc_type<float, CPU> is
double) — so fastres is held to the same precision class as the eager op it is compared with.
GPU-faithful mode (``fastres.precision``) takes the CUDA choices on CPU: fp32 and the CUDA geometry.

Byte model (s = bytes per element of x's dtype; per-channel vectors and [C, G] partials are
negligible: ≤ 64·C words against M·C elements). Forward, training:
  stats partial   reads x                                      1 s
  finalize        reads 2·G·C partials, writes mean, invstd, running stats        ~0
  apply           reads x [, residual], writes y               2 s (3 s with residual)
Forward, eval: apply only, 2 s (3 s). Backward, training:
  reduce partial  reads dy, x [, residual when ReLU]           2 s (3 s)
                  + writes dresidual = dy' when residual, ReLU and d(residual) is needed  (+1 s)
  finalize        reads 2·G·C partials, writes dweight, dbias, k, c                       ~0
  dx              reads dy, x [, residual when ReLU], writes dx [, dresidual]
                  — or, when the reduce pass wrote dresidual = dy', reads dy' and x only.
Full-tensor passes of a BN + residual + ReLU backward with every gradient: reduce 4 (dy, x, residual
read; dy' written) + dx 3 (dy', x read; dx written) = 7, against eager's 8 (threshold_backward 3,
BN backward reduce 2 + elementwise 3). Without residual: 2 + 3 = 5. Without ReLU the residual's
gradient is dy itself and is handed back without a copy (the op layer does that).
With mask_from_output (a downsample block's last BN) the saved output y is read in the residual's
place and gives the mask directly (threshold_backward's rule): the same bytes and launches.
Why not a 1-bit ReLU mask saved by the forward (≈ 6.1 passes: the reduce reads dy, x, mask; dx reads
dy, x, mask and writes dx and dresidual): it saves 7 − 6.125 = 0.875 passes (bf16) on the 16 of
ResNet-50's 53 BN layers that have a residual, costs the forward a bit-packed store and every
backend a shared bit layout for both memory orders, and makes the mask an extra saved tensor and
custom-op output. dresidual has to be written once in both designs; the 7-pass design writes it
one kernel earlier and lets the dx pass read it in place of dy and the residual.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastres.layout import empty_output, is_nhwc
from fastres.precision import compute_dtype, cuda_class, gpu_faithful, sm_count

# No finalize program merges more partials than this: it loads them as one tile.
MAX_PARTIALS = 64


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


@triton.jit
def _inv_std(var, eps, ACC: tl.constexpr):
    """1 / sqrt(var + eps), correctly rounded (ATen's CUDA kernels: 1 / sqrt, not rsqrt.approx);
    rounded to fp32, the precision the statistics are kept in, so every kernel sees the same value."""
    if ACC == tl.float32:
        inv = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    else:
        inv = 1.0 / tl.sqrt(var + eps)
    return inv.to(tl.float32).to(ACC)


@triton.jit
def _partial_tile(PART, cols, cmask, G, BLOCK_G: tl.constexpr):
    """The [BLOCK_C, BLOCK_G] tile of a channel-major [C, G] partial buffer (0 outside)."""
    gs = tl.arange(0, BLOCK_G)
    mask = cmask[:, None] & (gs < G)[None, :]
    return tl.load(PART + cols[:, None] * G + gs[None, :], mask=mask, other=0.0), mask


# ------------------------------------------------------------------------------------------------
# Batch statistics: partials, then the finalize that also does the per-channel math.


@triton.jit
def _stats_partial_kernel(
    X, PART_MEAN, PART_M2,
    M, C, HW, rows_per_prog, G,
    IS_NHWC: tl.constexpr, ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """Each element of the [BLOCK_R, BLOCK_C] tile keeps its own (mean, M2) over the program's
    chunks (Welford: one element merged per chunk, no cross-thread reduction in the loop, loads
    pipelined NUM_STAGES deep); the BLOCK_R tile rows of a channel merge once after the loop."""
    pid_g = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row_begin = pid_g.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, M)
    mean = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for start in tl.range(row_begin, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        x = tl.load(X + _tile_offsets(rows, cols, C, HW, IS_NHWC), mask=mask, other=0.0)
        # Only the last chunk is partial: an element valid now was valid in every earlier chunk.
        n_a = ((start - row_begin) // BLOCK_R).to(ACC)
        _, mean_new, m2_new = _chan_merge(n_a, mean, m2, 1.0, x.to(ACC), 0.0)
        mean = tl.where(mask, mean_new, mean)
        m2 = tl.where(mask, m2_new, m2)
    # Tile row i saw n_i elements of each channel; merge the rows (Chan's formula for many sets,
    # as the finalize does).
    n_rows = row_end - row_begin
    n_i = (tl.maximum(n_rows - tl.arange(0, BLOCK_R), 0) + BLOCK_R - 1) // BLOCK_R
    n_i = n_i.to(ACC)[:, None]
    mean_tile = mean
    mean = tl.sum(n_i * mean_tile, axis=0) / n_rows.to(ACC)
    d = tl.where((n_i > 0) & cmask[None, :], mean_tile - mean[None, :], 0.0)
    m2 = tl.sum(m2, axis=0) + tl.sum(n_i * d * d, axis=0)
    part = cols * G + pid_g  # channel-major: the finalize reads a channel's partials contiguously
    tl.store(PART_MEAN + part, mean, mask=cmask)
    tl.store(PART_M2 + part, m2, mask=cmask)


@triton.jit
def _stats_finalize_kernel(
    PART_MEAN, PART_M2, MEAN, OUT2, RUNNING_MEAN, RUNNING_VAR, NUM_BATCHES,
    M, C, rows_per_prog, G, momentum, eps,
    ACC: tl.constexpr, WRITE_M2: tl.constexpr, HAS_RUNNING: tl.constexpr,
    CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Merges the G partials of BLOCK_C channels in one step (Chan's formula for many sets:
    mean = Σ n_g·mean_g / M, M2 = Σ M2_g + Σ n_g·(mean_g − mean)²), then writes mean and invstd
    (WRITE_M2: mean and M2, for SyncBN's gather) and updates the running statistics."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean_g, mask = _partial_tile(PART_MEAN, cols, cmask, G, BLOCK_G)
    m2_g, _ = _partial_tile(PART_M2, cols, cmask, G, BLOCK_G)
    gs = tl.arange(0, BLOCK_G)
    n_g = tl.where(gs < G, tl.minimum(rows_per_prog, M - gs * rows_per_prog), 0).to(ACC)
    total = M.to(ACC)
    # n_g·mean_g keeps a non-finite partial mean non-finite (inf, or NaN for inf − inf), as eager.
    mean = tl.sum(n_g[None, :] * mean_g, axis=1) / total
    d = tl.where(mask, mean_g - mean[:, None], 0.0)
    m2 = tl.sum(m2_g, axis=1) + tl.sum(n_g[None, :] * d * d, axis=1)
    var = m2 / total
    tl.store(MEAN + cols, mean, mask=cmask)
    if WRITE_M2:
        tl.store(OUT2 + cols, m2, mask=cmask)
    else:
        tl.store(OUT2 + cols, _inv_std(var, eps, ACC), mask=cmask)
    if HAS_RUNNING:
        if CUMULATIVE:  # momentum=None: the cumulative average, 1/num_batches_tracked (on device)
            factor = 1.0 / tl.load(NUM_BATCHES).to(ACC)
        else:
            factor = momentum
        running_mean = tl.load(RUNNING_MEAN + cols, mask=cmask, other=0.0).to(ACC)
        running_var = tl.load(RUNNING_VAR + cols, mask=cmask, other=0.0).to(ACC)
        unbiased = var * (total / (total - 1.0))
        running_mean = (1.0 - factor) * running_mean + factor * mean
        running_var = (1.0 - factor) * running_var + factor * unbiased
        tl.store(RUNNING_MEAN + cols, _round_to(running_mean, RUNNING_MEAN.dtype.element_ty),
                 mask=cmask)
        tl.store(RUNNING_VAR + cols, _round_to(running_var, RUNNING_VAR.dtype.element_ty),
                 mask=cmask)


# ------------------------------------------------------------------------------------------------
# Forward apply: y = act((x − mean)·invstd·weight + bias [+ residual]).


@triton.jit
def _load_affine(MEAN, INVSTD, W, B, cols, cmask, eps,
                 HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_VAR: tl.constexpr,
                 ACC: tl.constexpr):
    """The per-channel (mean, scale, shift, invstd) of y = (x − mean)·scale + shift, in ACC;
    FROM_VAR: INVSTD holds the variance (eval: the running variance) and invstd is computed."""
    mean = tl.load(MEAN + cols, mask=cmask, other=0.0).to(ACC)
    if FROM_VAR:
        invstd = _inv_std(tl.load(INVSTD + cols, mask=cmask, other=1.0).to(ACC), eps, ACC)
    else:
        invstd = tl.load(INVSTD + cols, mask=cmask, other=0.0).to(ACC)
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
    shift = tl.zeros_like(mean)
    if HAS_BIAS:
        shift = tl.load(B + cols, mask=cmask, other=0.0).to(ACC)
    return mean, scale, shift, invstd


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
    X, RES, Y, MEAN, INVSTD, W, B, INVSTD_OUT,
    M, C, HW, eps,
    IS_NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_RUNNING_VAR: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """FROM_RUNNING_VAR (eval): INVSTD holds the running variance; invstd is computed from it and
    written to INVSTD_OUT by the first row block — the whole eval forward in one launch."""
    pid_r = tl.program_id(0)
    rows = pid_r.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = _tile_offsets(rows, cols, C, HW, IS_NHWC)
    mean, scale, shift, invstd = _load_affine(MEAN, INVSTD, W, B, cols, cmask, eps, HAS_WEIGHT,
                                              HAS_BIAS, FROM_RUNNING_VAR, ACC)
    if FROM_RUNNING_VAR:
        tl.store(INVSTD_OUT + cols, invstd, mask=cmask & (pid_r == 0))
    x, res = _load_x_res(X, RES, offs, mask, HAS_RESIDUAL, ACC)
    y = _pre_activation(x, res, mean, scale, shift, HAS_RESIDUAL)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)  # keeps NaN, as torch.relu does (max(NaN, 0) would not)
    tl.store(Y + offs, _round_to(y, Y.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Backward.


@triton.jit
def _masked_grad(dy, x, res, mean, scale, shift, X_DTYPE: tl.constexpr,
                 HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr, MASK_FROM_OUTPUT: tl.constexpr):
    """dy' = dy through the ReLU, recomputing the output from x; PyTorch's threshold_backward rule
    (zero where the output, rounded to the activation dtype, is <= 0; NaN outputs pass).
    MASK_FROM_OUTPUT: ``res`` is the saved output y itself (loaded in place of the residual)."""
    if RELU:
        if MASK_FROM_OUTPUT:
            y = res
        else:
            y = _pre_activation(x, res, mean, scale, shift, HAS_RESIDUAL)
            y = _round_to(y, X_DTYPE).to(y.dtype)
        dy = tl.where(y <= 0.0, 0.0, dy)
    return dy


@triton.jit
def _backward_reduce_partial_kernel(
    DY, X, RES, DY_OUT, MEAN, INVSTD, W, B, PART_DY, PART_DY_XC,
    M, C, HW, rows_per_prog, G,
    IS_NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_DY: tl.constexpr,
    MASK_FROM_OUTPUT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Partial Σdy', Σdy'·(x − mean); STORE_DY also writes dy' (the residual's gradient), which
    the dx pass then reads instead of dy, x's ReLU recompute and the residual. HAS_RESIDUAL: the
    residual is read (only with RELU: it matters for the mask alone). MASK_FROM_OUTPUT: RES holds
    the forward's output y, read in the residual's place, and the mask is taken from it. The sums
    accumulate elementwise in [BLOCK_R, BLOCK_C] tiles (loads pipelined NUM_STAGES deep) and
    reduce over the tile rows once after the loop."""
    pid_g = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, scale, shift, _ = _load_affine(MEAN, INVSTD, W, B, cols, cmask, 0.0, HAS_WEIGHT,
                                         HAS_BIAS, False, ACC)
    row_begin = pid_g.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, M)
    sum_dy = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    sum_dy_xc = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for start in tl.range(row_begin, row_end, BLOCK_R, num_stages=NUM_STAGES):
        rows = start + tl.arange(0, BLOCK_R)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        offs = _tile_offsets(rows, cols, C, HW, IS_NHWC)
        x, res = _load_x_res(X, RES, offs, mask, HAS_RESIDUAL, ACC)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        dy = _masked_grad(dy, x, res, mean, scale, shift, X.dtype.element_ty, HAS_RESIDUAL, RELU,
                          MASK_FROM_OUTPUT)
        if STORE_DY:  # dy' is dy or 0: exact in dy's dtype
            tl.store(DY_OUT + offs, _round_to(dy, DY_OUT.dtype.element_ty), mask=mask)
        dy = tl.where(mask, dy, 0.0)
        sum_dy += dy
        sum_dy_xc += tl.where(mask, dy * (x - mean[None, :]), 0.0)
    part = cols * G + pid_g
    tl.store(PART_DY + part, tl.sum(sum_dy, axis=0), mask=cmask)
    tl.store(PART_DY_XC + part, tl.sum(sum_dy_xc, axis=0), mask=cmask)


@triton.jit
def _backward_finalize_kernel(
    PART_DY, PART_DY_XC, INVSTD, W, DWEIGHT, DBIAS, COEF_K, COEF_C, SUM_DY, SUM_DY_XC,
    M, C, G,
    HAS_WEIGHT: tl.constexpr, NEED_DWEIGHT: tl.constexpr, NEED_DBIAS: tl.constexpr,
    NEED_COEF: tl.constexpr, WRITE_SUMS: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
):
    """Sums the G partials of BLOCK_C channels as one tile, then the per-channel math:
    dweight = Σdy'·x̂, dbias = Σdy' (in their parameters' dtypes) and the dx coefficients
    k = −a·invstd·Σdy'x̂/M, c = −a·Σdy'/M with a = weight·invstd (dx = a·dy' + k·(x − mean) + c).
    WRITE_SUMS (SyncBN): the raw (Σdy', Σdy'·(x − mean)) instead."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    part_dy, _ = _partial_tile(PART_DY, cols, cmask, G, BLOCK_G)
    part_dy_xc, _ = _partial_tile(PART_DY_XC, cols, cmask, G, BLOCK_G)
    sum_dy = tl.sum(part_dy, axis=1)
    sum_dy_xc = tl.sum(part_dy_xc, axis=1)
    if WRITE_SUMS:
        tl.store(SUM_DY + cols, sum_dy, mask=cmask)
        tl.store(SUM_DY_XC + cols, sum_dy_xc, mask=cmask)
    else:
        invstd = tl.load(INVSTD + cols, mask=cmask, other=0.0).to(ACC)
        sum_dy_xhat = sum_dy_xc * invstd
        if NEED_DWEIGHT:
            tl.store(DWEIGHT + cols, _round_to(sum_dy_xhat, DWEIGHT.dtype.element_ty), mask=cmask)
        if NEED_DBIAS:
            tl.store(DBIAS + cols, _round_to(sum_dy, DBIAS.dtype.element_ty), mask=cmask)
        if NEED_COEF:
            a = invstd
            if HAS_WEIGHT:
                a = a * tl.load(W + cols, mask=cmask, other=0.0).to(ACC)
            total = M.to(ACC)
            tl.store(COEF_K + cols, -a * invstd * (sum_dy_xhat / total), mask=cmask)
            tl.store(COEF_C + cols, -a * (sum_dy / total), mask=cmask)


@triton.jit
def _backward_dx_kernel(
    DY, X, RES, DX, DRES, MEAN, INVSTD, W, B, COEF_K, COEF_C,
    M, C, HW,
    IS_NHWC: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, DY_IS_MASKED: tl.constexpr,
    HAS_BATCH_STATS: tl.constexpr, NEED_X: tl.constexpr, STORE_DX: tl.constexpr,
    STORE_DRES: tl.constexpr, MASK_FROM_OUTPUT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = a·dy' [+ k·(x − mean) + c] with a = weight·invstd; STORE_DRES also writes dy'.
    DY_IS_MASKED: DY already holds dy' (written by the reduce pass): no ReLU mask. NEED_X: x is
    read (batch-statistics term or ReLU recompute); HAS_RESIDUAL: RES is read for the ReLU mask —
    the residual (recompute from x), or with MASK_FROM_OUTPUT the forward's output y itself."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    offs = _tile_offsets(rows, cols, C, HW, IS_NHWC)
    mean, scale, shift, _ = _load_affine(MEAN, INVSTD, W, B, cols, cmask, 0.0, HAS_WEIGHT,
                                         HAS_BIAS, False, ACC)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
    x = dy
    if NEED_X:
        x = tl.load(X + offs, mask=mask, other=0.0).to(ACC)
    res = x
    if HAS_RESIDUAL:
        res = tl.load(RES + offs, mask=mask, other=0.0).to(ACC)
    if RELU and not DY_IS_MASKED:
        dy = _masked_grad(dy, x, res, mean, scale, shift, X.dtype.element_ty, HAS_RESIDUAL, RELU,
                          MASK_FROM_OUTPUT)
    if STORE_DX:
        dx = scale[None, :] * dy  # scale = a = weight·invstd
        if HAS_BATCH_STATS:  # training; in eval the term is absent (0·inf would make NaN)
            k = tl.load(COEF_K + cols, mask=cmask, other=0.0).to(ACC)
            c = tl.load(COEF_C + cols, mask=cmask, other=0.0).to(ACC)
            dx = dx + k[None, :] * (x - mean[None, :]) + c[None, :]
        tl.store(DX + offs, _round_to(dx, DX.dtype.element_ty), mask=mask)
    if STORE_DRES:
        tl.store(DRES + offs, _round_to(dy, DRES.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Launch geometry.


def launch_config(M: int, C: int, nhwc: bool, device: torch.device) -> dict:
    """Tile sizes of the full-tensor kernels and the reduction's target program count. Tests
    monkeypatch this to force several chunks and partials on tiny inputs."""
    if not cuda_class(device):
        # The interpreter costs per program instance, not per element: few, large programs.
        block_c = min(triton.next_power_of_2(max(C, 1)), 128)
        return dict(BLOCK_R=max(4096 // block_c, 16), BLOCK_C=block_c, target_programs=2,
                    num_warps=1)
    target = 4 * sm_count(device)
    if nhwc:
        # The widest channel block (≤ 64, ≥ 16: 32-byte sectors in bf16) whose ≤ MAX_PARTIALS row
        # splits still give ≥ 2 reduction programs per SM: narrow C gets narrower blocks.
        block_c = min(triton.next_power_of_2(C), 64)
        while block_c > 16 and triton.cdiv(C, block_c) * MAX_PARTIALS < target // 2:
            block_c //= 2
        block_r = max(4096 // block_c, 32)
    else:
        block_c = min(triton.next_power_of_2(C), 4)
        block_r = 1024
    # The reduction kernels loop over their rows in smaller steps than the elementwise tile, with
    # the loads pipelined (cp.async through shared memory on sm_80+): 4 (NHWC) or 2 (NCHW)
    # elements per thread and step keep them within 64 registers per thread (4+ CTAs of 8 warps
    # per SM), counted by tools/kernel_report.py for bf16 and fp32 on sm_90 and sm_80. NCHW takes
    # 2: when H·W is not a multiple of 16 its rows are addressed one by one (an int64 division
    # per element), and 4 elements with 3 stages took up to 107 registers on sm_80. There, in
    # bf16, the 2-byte accesses stay unpipelined (cp.async copies at least 4 bytes and Triton only
    # proves alignment for multiples of 16): ResNet-50's 14×14 and 7×7 layers in NCHW.
    reduce_elems, stages = (1024, 4) if nhwc else (512, 3)
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, target_programs=target,
                num_warps=8 if block_r * block_c >= 4096 else 4,
                REDUCE_BLOCK_R=reduce_elems // block_c, reduce_num_warps=8,
                reduce_num_stages=stages)


def _row_splits(M: int, C: int, cfg: dict) -> tuple[int, int]:
    """(rows_per_prog, G ≤ MAX_PARTIALS): each reduction program takes whole BLOCK_R chunks."""
    block_r, n_cblocks = cfg["BLOCK_R"], triton.cdiv(C, cfg["BLOCK_C"])
    g = max(1, min(triton.cdiv(M, block_r), cfg["target_programs"] // n_cblocks, MAX_PARTIALS))
    rows_per_prog = triton.cdiv(triton.cdiv(M, g), block_r) * block_r
    return rows_per_prog, triton.cdiv(M, rows_per_prog)


def finalize_block(C: int, G: int, device: torch.device) -> int:
    """Channels per finalize program. CUDA: few enough that the finalize spreads over about one
    program per SM (each loads a [channels, G] tile at once); interpreter: one program."""
    if not cuda_class(device):
        return triton.next_power_of_2(max(C, 1))
    per_program = triton.next_power_of_2(triton.cdiv(max(C, 1), sm_count(device)))
    return max(2, min(per_program, 4096 // triton.next_power_of_2(G)))


@dataclass(frozen=True)
class Plan:
    M: int
    C: int
    HW: int
    nhwc: bool
    cfg: dict
    rows_per_prog: int
    G: int
    block_g: int
    finalize_block_c: int

    @property
    def reduce_grid(self) -> tuple[int, int]:
        return (self.G, triton.cdiv(self.C, self.cfg["BLOCK_C"]))

    @property
    def elementwise_grid(self) -> tuple[int, int]:
        return (triton.cdiv(self.M, self.cfg["BLOCK_R"]), triton.cdiv(self.C, self.cfg["BLOCK_C"]))

    @property
    def finalize_grid(self) -> tuple[int]:
        return (triton.cdiv(self.C, self.finalize_block_c),)


def plan(shape, nhwc: bool, device: torch.device) -> Plan:
    """Every launch's geometry for an (N, C, H, W) activation: the launchers use exactly this."""
    N, C, H, W = shape
    M = N * H * W
    cfg = launch_config(M, C, nhwc, device)
    rows_per_prog, G = _row_splits(M, C, cfg)
    return Plan(M, C, H * W, nhwc, cfg, rows_per_prog, G, max(triton.next_power_of_2(G), 2),
                finalize_block(C, G, device))


def _plan(x: torch.Tensor) -> Plan:
    return plan(tuple(x.shape), is_nhwc(x), x.device)


# The distinct BatchNorm shapes of torchvision's ResNet-50 (C, H·W) at 224×224 input.
RESNET50_BN_SHAPES = [(64, 112 * 112), (64, 56 * 56), (256, 56 * 56), (128, 56 * 56),
                      (128, 28 * 28), (512, 28 * 28), (256, 28 * 28), (256, 14 * 14),
                      (1024, 14 * 14), (512, 14 * 14), (512, 7 * 7), (2048, 7 * 7)]


def geometry_table(batch: int = 256, nhwc: bool = True) -> str:
    """Markdown table of the launch geometry for ResNet-50's BN shapes, from ``plan`` in
    GPU-faithful mode (the CUDA branch with 132 SMs)."""
    layout = "NHWC" if nhwc else "NCHW"
    lines = [f"| C | H·W | layout | BLOCK_R×BLOCK_C | reduce grid (G × channel blocks) | rows per "
             f"program | partials G | finalize programs × channels | elementwise grid |",
             "|---:|---:|---|---|---|---:|---:|---|---|"]
    with gpu_faithful():
        for C, hw in RESNET50_BN_SHAPES:
            side = int(round(hw ** 0.5))
            p = plan((batch, C, side, side), nhwc, torch.device("cpu"))
            ew = p.elementwise_grid
            lines.append(
                f"| {C} | {hw} | {layout} | {p.cfg['BLOCK_R']}×{p.cfg['BLOCK_C']} | "
                f"{p.G} × {p.reduce_grid[1]} = {p.G * p.reduce_grid[1]} | {p.rows_per_prog} | "
                f"{p.G} | {p.finalize_grid[0]} × {p.finalize_block_c} | "
                f"{ew[0]} × {ew[1]} = {ew[0] * ew[1]} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Launchers (one per kernel).


_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


def _acc(x: torch.Tensor):
    return _TL_DTYPE[compute_dtype(x)]


def _reduce_options(p: Plan) -> dict:
    """Rows per loop step, warps and pipeline depth of the reduction kernels (defaults: the
    elementwise tile, unpipelined)."""
    cfg = p.cfg
    return dict(BLOCK_R=cfg.get("REDUCE_BLOCK_R", cfg["BLOCK_R"]),
                num_warps=cfg.get("reduce_num_warps", cfg["num_warps"]),
                NUM_STAGES=cfg.get("reduce_num_stages", 1))


def _launch_stats_partial(x, p: Plan):
    part_mean = torch.empty((p.C, p.G), dtype=compute_dtype(x), device=x.device)
    part_m2 = torch.empty_like(part_mean)
    _stats_partial_kernel[p.reduce_grid](
        x, part_mean, part_m2, p.M, p.C, p.HW, p.rows_per_prog, p.G,
        IS_NHWC=p.nhwc, ACC=_acc(x), BLOCK_C=p.cfg["BLOCK_C"], **_reduce_options(p))
    return part_mean, part_m2


def _launch_stats_finalize(x, p: Plan, part_mean, part_m2, mean, out2, running_mean, running_var,
                           num_batches_tracked, momentum, eps, write_m2):
    has_running = running_mean is not None
    cumulative = has_running and momentum is None
    _stats_finalize_kernel[p.finalize_grid](
        part_mean, part_m2, mean, out2,
        running_mean if has_running else mean, running_var if has_running else mean,
        num_batches_tracked if cumulative else mean,
        p.M, p.C, p.rows_per_prog, p.G, 0.0 if momentum is None else float(momentum),
        float(eps),
        ACC=_acc(x), WRITE_M2=write_m2, HAS_RUNNING=has_running,
        CUMULATIVE=cumulative, BLOCK_C=p.finalize_block_c, BLOCK_G=p.block_g)


def _launch_apply(x, p: Plan, residual, y, mean, invstd, weight, bias, running_var, invstd_out,
                  eps, relu):
    """Training: invstd given. Eval: running_var given, invstd written to invstd_out."""
    _apply_kernel[p.elementwise_grid](
        x, x if residual is None else residual, y, mean,
        running_var if running_var is not None else invstd,
        mean if weight is None else weight, mean if bias is None else bias,
        mean if invstd_out is None else invstd_out,
        p.M, p.C, p.HW, float(eps),
        IS_NHWC=p.nhwc, HAS_RESIDUAL=residual is not None, RELU=relu,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        FROM_RUNNING_VAR=running_var is not None, ACC=_acc(x),
        BLOCK_R=p.cfg["BLOCK_R"], BLOCK_C=p.cfg["BLOCK_C"], num_warps=p.cfg["num_warps"])


def _launch_backward_reduce(dy, x, p: Plan, residual, dy_out, mean, invstd, weight, bias, relu,
                            mask_from_output=False):
    """mask_from_output: ``residual`` is the forward's output y (the mask's source)."""
    part_dy = torch.empty((p.C, p.G), dtype=compute_dtype(x), device=x.device)
    part_dy_xc = torch.empty_like(part_dy)
    _backward_reduce_partial_kernel[p.reduce_grid](
        dy, x, x if residual is None else residual, dy if dy_out is None else dy_out,
        mean, invstd, mean if weight is None else weight, mean if bias is None else bias,
        part_dy, part_dy_xc, p.M, p.C, p.HW, p.rows_per_prog, p.G,
        # the residual only matters for the ReLU mask
        IS_NHWC=p.nhwc, HAS_RESIDUAL=residual is not None and relu, RELU=relu,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, STORE_DY=dy_out is not None,
        MASK_FROM_OUTPUT=bool(mask_from_output and relu and residual is not None),
        ACC=_acc(x), BLOCK_C=p.cfg["BLOCK_C"], **_reduce_options(p))
    return part_dy, part_dy_xc


def _launch_backward_finalize(x, p: Plan, part_dy, part_dy_xc, invstd, weight, dweight, dbias,
                              coef_k, coef_c, sum_dy=None, sum_dy_xc=None):
    any_ = part_dy
    _backward_finalize_kernel[p.finalize_grid](
        part_dy, part_dy_xc, any_ if invstd is None else invstd, any_ if weight is None else weight,
        any_ if dweight is None else dweight, any_ if dbias is None else dbias,
        any_ if coef_k is None else coef_k, any_ if coef_c is None else coef_c,
        any_ if sum_dy is None else sum_dy, any_ if sum_dy_xc is None else sum_dy_xc,
        p.M, p.C, p.G,
        HAS_WEIGHT=weight is not None, NEED_DWEIGHT=dweight is not None,
        NEED_DBIAS=dbias is not None, NEED_COEF=coef_k is not None,
        WRITE_SUMS=sum_dy is not None, ACC=_acc(x),
        BLOCK_C=p.finalize_block_c, BLOCK_G=p.block_g)


def _launch_backward_dx(dy, x, p: Plan, residual, dx, dres, mean, invstd, weight, bias, coef_k,
                        coef_c, relu, dy_is_masked, mask_from_output=False):
    """mask_from_output: ``residual`` is the forward's output y (the mask's source)."""
    any_ = dy
    masks = relu and not dy_is_masked  # this pass applies the ReLU mask itself
    mask_from_output = bool(mask_from_output and masks and residual is not None)
    _backward_dx_kernel[p.elementwise_grid](
        dy, x, x if residual is None else residual, any_ if dx is None else dx,
        any_ if dres is None else dres, mean, invstd, mean if weight is None else weight,
        mean if bias is None else bias, mean if coef_k is None else coef_k,
        mean if coef_c is None else coef_c, p.M, p.C, p.HW,
        IS_NHWC=p.nhwc, HAS_RESIDUAL=residual is not None and masks,
        RELU=relu, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        DY_IS_MASKED=dy_is_masked, HAS_BATCH_STATS=coef_k is not None,
        NEED_X=coef_k is not None or (masks and not mask_from_output), STORE_DX=dx is not None,
        STORE_DRES=dres is not None, MASK_FROM_OUTPUT=mask_from_output, ACC=_acc(x), BLOCK_R=p.cfg["BLOCK_R"], BLOCK_C=p.cfg["BLOCK_C"],
        num_warps=p.cfg["num_warps"])


# ------------------------------------------------------------------------------------------------
# The backend contract of fastres/ops/batch_norm_act.py (validated, dense NCHW or NHWC tensors).

name = "triton"


def forward_train(x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                  momentum, eps, relu):
    """(y, mean, invstd): 3 launches. running_mean/var are updated in place (when given) with
    factor momentum, or 1/num_batches_tracked read on the device when momentum is None."""
    p = _plan(x)
    part_mean, part_m2 = _launch_stats_partial(x, p)
    mean = torch.empty(p.C, dtype=torch.float32, device=x.device)
    invstd = torch.empty_like(mean)
    _launch_stats_finalize(x, p, part_mean, part_m2, mean, invstd, running_mean, running_var,
                           num_batches_tracked, momentum, eps, write_m2=False)
    y = empty_output(x)
    _launch_apply(x, p, residual, y, mean, invstd, weight, bias, None, None, eps, relu)
    return y, mean, invstd


def forward_eval(x, weight, bias, residual, running_mean, running_var, eps, relu):
    """(y, invstd): 1 launch; invstd = 1/sqrt(running_var + eps) in fp32."""
    p = _plan(x)
    y = empty_output(x)
    invstd = torch.empty(p.C, dtype=torch.float32, device=x.device)
    _launch_apply(x, p, residual, y, running_mean, None, weight, bias, running_var, invstd, eps,
                  relu)
    return y, invstd


supports_mask_from_output = True


def backward(dy, x, weight, bias, residual, mean, invstd, relu, training, need_dx, need_dres,
             need_dweight, need_dbias, mask_from_output=False):
    """(dx, dres, dweight, dbias), None where not needed; ≤ 3 launches. need_dres is only
    meaningful with a residual and ReLU (without ReLU the residual's gradient is dy itself).
    mask_from_output (with ReLU): ``residual`` is the forward's output y; the kernels load it in
    the residual's place and take the mask from it (same bytes, same launches)."""
    p = _plan(x)
    need_dres = bool(need_dres and residual is not None)
    need_dweight = bool(need_dweight and weight is not None)
    need_dbias = bool(need_dbias and bias is not None)
    reduce = (training and need_dx) or need_dweight or need_dbias
    dx = empty_output(x) if need_dx else None
    dres = empty_output(x) if need_dres else None
    dweight = torch.empty_like(weight) if need_dweight else None
    dbias = torch.empty_like(bias) if need_dbias else None
    coef_k = coef_c = None
    # With residual and ReLU the reduce pass writes dres = dy' and the dx pass reads it instead of
    # dy, x's ReLU recompute and the residual (7 passes instead of 8).
    dy_in_dres = reduce and need_dres and relu
    if reduce:
        part_dy, part_dy_xc = _launch_backward_reduce(
            dy, x, p, residual, dres if dy_in_dres else None, mean, invstd, weight, bias, relu,
            mask_from_output)
        if training and need_dx:
            coef_k = torch.empty(p.C, dtype=compute_dtype(x), device=x.device)
            coef_c = torch.empty_like(coef_k)
        _launch_backward_finalize(x, p, part_dy, part_dy_xc, invstd, weight, dweight, dbias,
                                  coef_k, coef_c)
    if need_dx or (need_dres and not dy_in_dres):
        _launch_backward_dx(dres if dy_in_dres else dy, x, p, residual, dx,
                            None if dy_in_dres else dres, mean, invstd, weight, bias, coef_k,
                            coef_c, relu, dy_is_masked=dy_in_dres,
                            mask_from_output=mask_from_output)
    return dx, dres, dweight, dbias


# ------------------------------------------------------------------------------------------------
# The kernel-level functions SyncBN composes with its collectives (see TorchBackend).


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, M2) per channel in compute_dtype(x): 2 launches."""
    p = _plan(x)
    part_mean, part_m2 = _launch_stats_partial(x, p)
    mean = torch.empty(p.C, dtype=part_mean.dtype, device=x.device)
    m2 = torch.empty_like(mean)
    _launch_stats_finalize(x, p, part_mean, part_m2, mean, m2, None, None, None, 0.0, 0.0,
                           write_m2=True)
    return mean, m2


def apply(x, mean, scale, shift, residual, relu):
    """y = act((x − mean)·scale + shift [+ residual])."""
    p = _plan(x)
    y = empty_output(x)
    _launch_apply(x, p, residual, y, mean, scale, None, shift, None, None, 0.0, relu)
    return y


def backward_reduce(dy, x, mean, scale, shift, residual, relu):
    """(Σdy', Σdy'·(x − mean)) in compute_dtype(x)."""
    p = _plan(x)
    part_dy, part_dy_xc = _launch_backward_reduce(dy, x, p, residual, None, mean, scale, None,
                                                  shift, relu)
    sum_dy = torch.empty(p.C, dtype=part_dy.dtype, device=x.device)
    sum_dy_xc = torch.empty_like(sum_dy)
    _launch_backward_finalize(x, p, part_dy, part_dy_xc, None, None, None, None, None, None,
                              sum_dy, sum_dy_xc)
    return sum_dy, sum_dy_xc


def backward_dx(dy, x, mean, scale, shift, residual, relu, a, k, c, need_dres):
    """(dx = a·dy' + k·(x − mean) + c, dres = dy' | None); k = c = None: dx = a·dy'. The kernel
    takes a = scale (a = weight·invstd, the forward's scale)."""
    p = _plan(x)
    dx = empty_output(x)
    dres = empty_output(x) if need_dres else None
    _launch_backward_dx(dy, x, p, residual, dx, dres, mean, scale, None, shift, k, c, relu,
                        dy_is_masked=False)
    return dx, dres


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--geometry", action="store_true",
                        help="print the launch geometry of ResNet-50's BN shapes (GPU-faithful)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--nchw", action="store_true", help="NCHW instead of channels_last")
    args = parser.parse_args(argv)
    if args.geometry:
        print(geometry_table(args.batch, nhwc=not args.nchw))


if __name__ == "__main__":
    main()
