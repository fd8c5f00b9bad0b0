"""Normalized convolution: implicit-GEMM conv2d in Triton for NHWC activations and KRSC weights,
with BatchNorm statistics in the forward epilogue and BN-apply + ReLU in the operand prologue.

Layouts (all dense): activations ``[N, H, W, C]`` (a channels_last tensor's memory), weights
``[K, R, S, C]`` (a channels_last ``[K, C, R, S]`` weight's memory). fp16 / bf16 operands with
fp32 accumulation; fp32 operands use TF32 when ``torch.backends.cudnn.allow_tf32`` (as eager's
cuDNN conv does).

Kernels (one launcher each):

    conv_fwd    y[n,p,q,k] = Σ_{r,s,c} act(x)[n, p·σ−π+r·δ, q·σ−π+s·δ, c] · w[k,r,s,c]
                PROLOGUE: act(x) = relu(x·scale[c] + shift[c]) while loading; padding and
                          out-of-range positions are 0 AFTER the transform (the zero padding of
                          act(x)).
                EPILOGUE: + bias[k] [+ residual] [relu] (eval: conv with the folded BN).
                STATS:    per-output-channel (mean, M2) of each M-tile of the stored (rounded) y,
                          merged by ``merge_tile_stats`` in fixed order (Chan) — deterministic.
    conv_dgrad  dx[n,h,w,c] = Σ_{r,s,k} dy[n,p,q,k] · w[k,r,s,c] over taps with h = p·σ−π+r·δ;
                PROLOGUE (the BN-act backward of the layer that produced x): the ReLU mask
                recomputed from the saved raw x (pass unless round(x·scale+shift) ≤ 0: PyTorch's
                threshold rule), da' = da·mask, the stored gradient is scale·da' (the gradient wrt
                x through the affine map), and per-channel tile partial sums Σda', Σda'·x
                (two-stage, fixed order).
    conv_wgrad  dw[k,r,s,c] = Σ_{n,p,q} dy[n,p,q,k] · act(x)[n,h,w,c]; the PROLOGUE recomputes
                act(x) = relu(x·scale + shift) from the saved raw x. Split-K partials are summed in
                fixed order (no atomics).
    dgrad and wgrad also fold the gradient that reaches y through its own batch statistics into
    dy while loading it (``dy_stats``): dy_eff = dy + dmean/M + (2·dvar/M)·(y − mean).

groups = 1 only; the op layer falls back to eager conv otherwise.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from fastres.precision import cuda_class


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_conv_configs(kind: str) -> list:
    """The autotune configurations a CUDA device chooses from, for one kernel kind ("fwd", "dgrad",
    "wgrad"): a small list that covers Hopper (H100/H200) and Ampere (A100) — big tiles with 3-4
    stages for the wide layers, narrower ones for the 64-channel layers. Unmeasured: no session has
    had a GPU yet, so the list is a starting point, not a tuned result."""
    if kind == "wgrad":
        # M = output channels, N = input channels (per tap), K = pixels (long reduction).
        # (64×128×64 with 4 warps spilled ~2 KB per thread on sm_90: tools/conv_compile_report.py)
        shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4),
                  (64, 64, 64, 4, 4)]
    else:
        shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4),
                  (64, 128, 32, 4, 4), (64, 64, 64, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes]


def conv_configs(kind: str) -> list:
    """The configurations the autotuner of one kernel kind is built with: the CUDA list, or under the
    interpreter exactly one small configuration (the interpreter cannot autotune, and every program
    instance costs ~0.5 ms). GPU-faithful tests run each CUDA configuration through
    ``pinned_config``."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4,
                              num_stages=1)]
    return cuda_conv_configs(kind)


def _autotuned(kind: str):
    return {"fwd": _conv_fwd_kernel, "dgrad": _conv_dgrad_kernel, "wgrad": _conv_wgrad_kernel}[kind]


@contextlib.contextmanager
def pinned_config(kind: str, config):
    """Within the block, the ``kind`` kernel runs exactly ``config`` (no benchmarking): how the
    interpreter runs each CUDA configuration once."""
    kernel = _autotuned(kind)
    saved_configs, saved_cache = kernel.configs, dict(kernel.cache)
    kernel.configs = [config]
    kernel.cache.clear()
    try:
        yield
    finally:
        kernel.configs = saved_configs
        kernel.cache.clear()
        kernel.cache.update(saved_cache)


def _min_block_m(kind: str) -> int:
    return min(c.kwargs["BLOCK_M"] for c in _autotuned(kind).configs)


def input_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _interpreting():
        return "tf32"
    return "ieee"


# --------------------------------------------------------------------------------------------------
# Forward.


@triton.autotune(configs=conv_configs("fwd"),
                 key=["C", "K", "R", "S", "stride_h", "HAS_PROLOGUE", "HAS_STATS", "PLAIN_GEMM",
                      "HAS_BIAS", "HAS_RESIDUAL", "RELU"])
@triton.jit
def _conv_fwd_kernel(
    X, W, Y, SCALE, SHIFT, TILE_MEAN, TILE_M2, BIAS, RESIDUAL,
    N, H, W_in, C, P, Q, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, HAS_STATS: tl.constexpr, PLAIN_GEMM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * P * Q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < K
    img = (offs_m // (P * Q)).to(tl.int64)
    pq = offs_m % (P * Q)
    p = pq // Q
    q = pq % Q
    w_rows = offs_n.to(tl.int64) * (R * S * C)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # One flat loop over (tap, channel block) so the pipeliner overlaps loads across taps too
    # (a 64-channel 3×3 layer has a single channel block per tap).
    num_c_blocks = tl.cdiv(C, BLOCK_K)
    for t in range(0, R * S * num_c_blocks):
        rs = t // num_c_blocks
        c = (t - rs * num_c_blocks) * BLOCK_K + offs_c
        r = rs // S
        s = rs - r * S
        if PLAIN_GEMM:  # 1×1, stride 1, no padding: the pixel index is the row index.
            pix_ok = m_ok
            x_rows = offs_m.to(tl.int64) * C
        else:
            h = p * stride_h - pad_h + r * dil_h
            w = q * stride_w - pad_w + s * dil_w
            pix_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W_in)
            x_rows = ((img * H + h) * W_in + w) * C
        c_ok = c < C
        a_mask = pix_ok[:, None] & c_ok[None, :]
        a = tl.load(X + x_rows[:, None] + c[None, :], mask=a_mask, other=0.0)
        if HAS_PROLOGUE:
            scale = tl.load(SCALE + c, mask=c_ok, other=0.0)
            shift = tl.load(SHIFT + c, mask=c_ok, other=0.0)
            z = a.to(tl.float32) * scale[None, :] + shift[None, :]
            z = tl.where(z < 0.0, 0.0, z)  # relu that keeps NaN, as torch.relu does
            # Padding is zero in act(x), so mask after the transform (relu(shift) ≠ 0).
            a = tl.where(a_mask, z, 0.0).to(X.dtype.element_ty)
        b = tl.load(W + w_rows[None, :] + (rs * C + c)[:, None],
                    mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * K + offs_n[None, :]
    # Inference epilogue (conv with a folded BN): + bias [+ residual] [then relu].
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(RESIDUAL + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)
    y = acc.to(Y.dtype.element_ty)
    tl.store(Y + out_offs, y, mask=out_mask)
    if HAS_STATS:
        # Statistics of the stored (rounded) output, as eager BN sees it.
        yf = tl.where(out_mask, y.to(tl.float32), 0.0)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        mean = tl.sum(yf, axis=0) / count
        d = tl.where(out_mask, yf - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        tl.store(TILE_MEAN + pid_m * K + offs_n, mean, mask=n_ok)
        tl.store(TILE_M2 + pid_m * K + offs_n, m2, mask=n_ok)


def merge_tile_stats(tile_mean, tile_m2, block_m: int, total: int):
    """Chan's parallel merge of per-tile (mean, M2) rows [T, K] (tile i holds min(block_m, total −
    i·block_m) rows) into per-channel (mean, biased var). Fixed order, no host sync."""
    T = tile_mean.shape[0]
    counts = (total - torch.arange(T, device=tile_mean.device) * block_m).clamp(max=block_m)
    counts = counts.to(torch.float32)[:, None]
    mean = (tile_mean * counts).sum(0) / total
    m2 = tile_m2.sum(0) + (counts * (tile_mean - mean) ** 2).sum(0)
    return mean, m2 / total


def conv_fwd(x, w, scale, shift, stride, padding, dilation, collect_stats, bias=None,
             residual=None, relu=False):
    """x: [N, H, W, C] dense, w: [K, R, S, C] dense, scale/shift: fp32 [C] or None; optional
    epilogue: fp32 bias [K], residual [N, P, Q, K] dense, relu.
    Returns (y [N, P, Q, K], mean [K] | None, var [K] | None)."""
    N, H, W_in, C = x.shape
    K, R, S, _ = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    P = (H + 2 * ph - dh * (R - 1) - 1) // sh + 1
    Q = (W_in + 2 * pw - dw * (S - 1) - 1) // sw + 1
    y = torch.empty((N, P, Q, K), dtype=x.dtype, device=x.device)
    M = N * P * Q
    has_prologue = scale is not None
    tiles = triton.cdiv(M, _min_block_m("fwd")) if collect_stats else 1
    tile_mean = torch.empty((tiles, K), dtype=torch.float32, device=x.device)
    tile_m2 = torch.empty_like(tile_mean)
    plain = R == 1 and S == 1 and (sh, sw, ph, pw) == (1, 1, 0, 0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(K, meta["BLOCK_N"]))
    _conv_fwd_kernel[grid](
        x, w, y, scale if has_prologue else x, shift if has_prologue else x, tile_mean, tile_m2,
        x if bias is None else bias, x if residual is None else residual,
        N, H, W_in, C, P, Q, K, sh, sw, ph, pw, dh, dw,
        R=R, S=S, HAS_PROLOGUE=has_prologue, HAS_STATS=collect_stats, PLAIN_GEMM=plain,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
        INPUT_PRECISION=input_precision(x.dtype))
    if not collect_stats:
        return y, None, None
    # The tile height the autotuner picked decides how many partial rows were written.
    block_m = _conv_fwd_kernel.best_config.kwargs["BLOCK_M"]
    used = triton.cdiv(M, block_m)
    mean, var = merge_tile_stats(tile_mean[:used], tile_m2[:used], block_m, M)
    return y, mean, var


# --------------------------------------------------------------------------------------------------
# Backward prologue shared by dgrad and wgrad: the gradient reaching y through its own batch
# statistics (mean, var) is folded into dy while loading it:
#     dy_eff = dy + dmean/M + (2·dvar/M)·(y − mean) = dy + alpha[k] + beta[k]·(y − mean[k])


@triton.jit
def _dy_with_stats_grad(dy, y_ptrs, mask, Y_MEAN, DY_ALPHA, DY_BETA, k, k_ok,
                        CHANNEL_AXIS: tl.constexpr):
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(Y_MEAN + k, mask=k_ok, other=0.0)
    alpha = tl.load(DY_ALPHA + k, mask=k_ok, other=0.0)
    beta = tl.load(DY_BETA + k, mask=k_ok, other=0.0)
    if CHANNEL_AXIS == 1:
        g = dy.to(tl.float32) + alpha[None, :] + beta[None, :] * (y - mean[None, :])
    else:
        g = dy.to(tl.float32) + alpha[:, None] + beta[:, None] * (y - mean[:, None])
    return tl.where(mask, g, 0.0).to(dy.dtype)


# --------------------------------------------------------------------------------------------------
# Data gradient.


@triton.autotune(configs=conv_configs("dgrad"),
                 key=["C", "K", "R", "S", "stride_h", "HAS_PROLOGUE", "PLAIN_GEMM",
                      "HAS_DY_PROLOGUE"])
@triton.jit
def _conv_dgrad_kernel(
    DY, W, DX, X, SCALE, SHIFT, TILE_SUM, TILE_SUM_X, Y, Y_MEAN, DY_ALPHA, DY_BETA,
    N, H, W_in, C, P, Q, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, PLAIN_GEMM: tl.constexpr, HAS_DY_PROLOGUE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # GEMM view: rows = input pixels (N·H·W), columns = input channels C, reduction over (r, s, k).
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    M = N * H * W_in
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C
    img = (offs_m // (H * W_in)).to(tl.int64)
    hw = offs_m % (H * W_in)
    h = hw // W_in
    w = hw % W_in
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    for t in range(0, R * S * num_k_blocks):  # flat over (tap, channel block), as in the forward
        rs = t // num_k_blocks
        k = (t - rs * num_k_blocks) * BLOCK_K + offs_k
        r = rs // S
        s = rs - r * S
        if PLAIN_GEMM:
            pix_ok = m_ok
            dy_rows = offs_m.to(tl.int64) * K
        else:
            # Output pixel (p, q) that reads (h, w) through tap (r, s); strided convs skip the
            # taps that land between output pixels (the zero-insertion of conv_transpose).
            hp = h + pad_h - r * dil_h
            wq = w + pad_w - s * dil_w
            p = hp // stride_h
            q = wq // stride_w
            pix_ok = (m_ok & (hp >= 0) & (wq >= 0) & (hp % stride_h == 0)
                      & (wq % stride_w == 0) & (p < P) & (q < Q))
            dy_rows = ((img * P + p) * Q + q) * K
        k_ok = k < K
        dy_mask = pix_ok[:, None] & k_ok[None, :]
        a = tl.load(DY + dy_rows[:, None] + k[None, :], mask=dy_mask, other=0.0)
        if HAS_DY_PROLOGUE:
            a = _dy_with_stats_grad(a, Y + dy_rows[:, None] + k[None, :], dy_mask,
                                    Y_MEAN, DY_ALPHA, DY_BETA, k, k_ok, 1)
        b = tl.load(W + k.to(tl.int64)[:, None] * (R * S * C) + rs * C + offs_n[None, :],
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_offs = offs_m.to(tl.int64)[:, None] * C + offs_n[None, :]
    da = acc.to(DX.dtype.element_ty)
    if HAS_PROLOGUE:
        # Backward of act(x) = relu(x·scale + shift), given da = ∂L/∂act(x) (rounded as eager's).
        x = tl.load(X + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + offs_n, mask=n_ok, other=0.0)
        shift = tl.load(SHIFT + offs_n, mask=n_ok, other=0.0)
        z = (x * scale[None, :] + shift[None, :]).to(DX.dtype.element_ty).to(tl.float32)
        # threshold_backward: the gradient passes unless relu's output is <= 0 (NaN passes).
        keep = (z > 0.0) | (z != z)
        da_kept = tl.where(keep & out_mask, da.to(tl.float32), 0.0)
        tl.store(DX + out_offs, (da_kept * scale[None, :]).to(DX.dtype.element_ty), mask=out_mask)
        tl.store(TILE_SUM + pid_m * C + offs_n, tl.sum(da_kept, axis=0), mask=n_ok)
        tl.store(TILE_SUM_X + pid_m * C + offs_n, tl.sum(da_kept * x, axis=0), mask=n_ok)
    else:
        tl.store(DX + out_offs, da, mask=out_mask)


def conv_dgrad(dy, w, input_hw, stride, padding, dilation, x=None, scale=None, shift=None,
               dy_stats=None):
    """dy: [N, P, Q, K] dense, w: [K, R, S, C] dense. Returns dx [N, H, W, C]; with the prologue
    (x [N, H, W, C] and fp32 scale/shift [C]) dx is the gradient wrt x of relu(x·scale + shift)
    and the per-channel fp32 sums (Σda', Σda'·x) come back too (else None, None).
    dy_stats = (y [N, P, Q, K], mean, alpha, beta) folds the statistics' gradient into dy."""
    N, P, Q, K = dy.shape
    _, R, S, C = w.shape
    H, W_in = input_hw
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    dx = torch.empty((N, H, W_in, C), dtype=dy.dtype, device=dy.device)
    M = N * H * W_in
    has_prologue = scale is not None
    tiles = triton.cdiv(M, _min_block_m("dgrad")) if has_prologue else 1
    tile_sum = torch.empty((tiles, C), dtype=torch.float32, device=dy.device)
    tile_sum_x = torch.empty_like(tile_sum)
    plain = R == 1 and S == 1 and (sh, sw, ph, pw) == (1, 1, 0, 0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(C, meta["BLOCK_N"]))
    y, y_mean, alpha, beta = dy_stats if dy_stats is not None else (dy, dy, dy, dy)
    _conv_dgrad_kernel[grid](
        dy, w, dx, x if has_prologue else dy, scale if has_prologue else dy,
        shift if has_prologue else dy, tile_sum, tile_sum_x, y, y_mean, alpha, beta,
        N, H, W_in, C, P, Q, K, sh, sw, ph, pw, dh, dw,
        R=R, S=S, HAS_PROLOGUE=has_prologue, PLAIN_GEMM=plain,
        HAS_DY_PROLOGUE=dy_stats is not None,
        INPUT_PRECISION=input_precision(dy.dtype))
    if not has_prologue:
        return dx, None, None
    used = triton.cdiv(M, _conv_dgrad_kernel.best_config.kwargs["BLOCK_M"])
    return dx, tile_sum[:used].sum(0), tile_sum_x[:used].sum(0)


# --------------------------------------------------------------------------------------------------
# Weight gradient.


@triton.autotune(configs=conv_configs("wgrad"),
                 key=["C", "K", "R", "S", "stride_h", "HAS_PROLOGUE", "SPLIT", "HAS_DY_PROLOGUE"])
@triton.jit
def _conv_wgrad_kernel(
    DY, X, DW_PART, SCALE, SHIFT, Y, Y_MEAN, DY_ALPHA, DY_BETA,
    N, H, W_in, C, P, Q, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, SPLIT,
    R: tl.constexpr, S: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, HAS_DY_PROLOGUE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # GEMM view per tap (r, s): rows = output channels K, columns = input channels C,
    # reduction over output pixels N·P·Q, split SPLIT ways (partials summed in fixed order).
    pid_m = tl.program_id(0)
    pid_ncrs = tl.program_id(1)
    pid_split = tl.program_id(2)
    num_c_blocks = tl.cdiv(C, BLOCK_N)
    rs = pid_ncrs // num_c_blocks
    r = rs // S
    s = rs % S
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid_ncrs % num_c_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < K
    n_ok = offs_n < C
    if HAS_PROLOGUE:
        scale = tl.load(SCALE + offs_n, mask=n_ok, other=0.0)
        shift = tl.load(SHIFT + offs_n, mask=n_ok, other=0.0)
    total = N * P * Q
    per_split = tl.cdiv(tl.cdiv(total, BLOCK_K), SPLIT) * BLOCK_K
    start = pid_split * per_split
    end = tl.minimum(start + per_split, total)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for pix0 in range(start, end, BLOCK_K):
        pix = pix0 + offs_k
        pix_in = pix < end
        img = (pix // (P * Q)).to(tl.int64)
        pq = pix % (P * Q)
        h = (pq // Q) * stride_h - pad_h + r * dil_h
        w = (pq % Q) * stride_w - pad_w + s * dil_w
        x_ok = pix_in & (h >= 0) & (h < H) & (w >= 0) & (w < W_in)
        dy_offs = pix.to(tl.int64)[None, :] * K + offs_m[:, None]
        dy_mask = pix_in[None, :] & m_ok[:, None]
        dy_t = tl.load(DY + dy_offs, mask=dy_mask, other=0.0)
        if HAS_DY_PROLOGUE:
            dy_t = _dy_with_stats_grad(dy_t, Y + dy_offs, dy_mask, Y_MEAN, DY_ALPHA, DY_BETA,
                                       offs_m, m_ok, 0)
        x_mask = x_ok[:, None] & n_ok[None, :]
        a = tl.load(X + ((img * H + h) * W_in + w)[:, None] * C + offs_n[None, :], mask=x_mask,
                    other=0.0)
        if HAS_PROLOGUE:
            z = a.to(tl.float32) * scale[None, :] + shift[None, :]
            z = tl.where(z < 0.0, 0.0, z)
            a = tl.where(x_mask, z, 0.0).to(X.dtype.element_ty)
        acc = tl.dot(dy_t, a, acc, input_precision=INPUT_PRECISION)
    out = DW_PART + pid_split * (K * R * S * C) + offs_m.to(tl.int64)[:, None] * (R * S * C) \
        + rs * C + offs_n[None, :]
    tl.store(out, acc, mask=m_ok[:, None] & n_ok[None, :])


def conv_wgrad(dy, x, kernel_rs, stride, padding, dilation, scale=None, shift=None, split=None,
               dy_stats=None):
    """dy: [N, P, Q, K] dense, x: [N, H, W, C] dense (raw; act(x) recomputed when scale/shift are
    given). Returns fp32 dw [K, R, S, C] (the caller rounds to the weight's dtype)."""
    N, P, Q, K = dy.shape
    _, H, W_in, C = x.shape
    R, S = kernel_rs
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    total = N * P * Q
    if split is None:
        # Enough programs to fill the GPU when K·C·R·S is small and N·P·Q long; one under the
        # interpreter (each program instance costs real time there).
        # The fp32 partials stay under ~64 MiB.
        split = 1 if not cuda_class(dy.device) else max(1, min(32, total // 4096,
                                                     (1 << 24) // max(K * R * S * C, 1)))
    part = torch.empty((split, K, R, S, C), dtype=torch.float32, device=dy.device)
    has_prologue = scale is not None
    grid = lambda meta: (triton.cdiv(K, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(C, meta["BLOCK_N"]) * R * S, split)
    y, y_mean, alpha, beta = dy_stats if dy_stats is not None else (dy, dy, dy, dy)
    _conv_wgrad_kernel[grid](
        dy, x, part, scale if has_prologue else x, shift if has_prologue else x,
        y, y_mean, alpha, beta,
        N, H, W_in, C, P, Q, K, sh, sw, ph, pw, dh, dw, split,
        R=R, S=S, HAS_PROLOGUE=has_prologue, HAS_DY_PROLOGUE=dy_stats is not None,
        INPUT_PRECISION=input_precision(dy.dtype))
    return part[0] if split == 1 else part.sum(0)
