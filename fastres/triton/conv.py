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
                          merged in one launch (``merge_partials``: chunks of 64 tiles reduced as a
                          tree, chunks Chan-merged in fixed order) — deterministic. Accumulated in
                          ACC = ``compute_dtype``: fp32 on CUDA (and GPU-faithful CPU runs), fp64
                          on CPU, as ATen's BN on that device; returned as fp32.
    conv_dgrad  dx[n,h,w,c] = Σ_{r,s,k} dy[n,p,q,k] · w[k,r,s,c] over taps with h = p·σ−π+r·δ;
                sub-pixel decomposition: one grid slice per phase (h mod σ, w mod σ), each looping
                over only the taps that hit that phase (no MMA on masked taps; a 3×3 stride-2
                layer issues 2.25 taps per pixel on average instead of 9);
                PROLOGUE (the BN-act backward of the layer that produced x): the ReLU mask
                recomputed from the saved raw x (pass unless round(x·scale+shift) ≤ 0: PyTorch's
                threshold rule), da' = da·mask, the stored gradient is scale·da' (the gradient wrt
                x through the affine map), and per-channel tile partial sums Σda', Σda'·x
                (two-stage, fixed order; in ACC, from the unrounded fp32 da).
    conv_wgrad  dw[k,r,s,c] = Σ_{n,p,q} dy[n,p,q,k] · act(x)[n,h,w,c]; the PROLOGUE recomputes
                act(x) = relu(x·scale + shift) from the saved raw x. Split-K partials are summed in
                fixed order (no atomics).
    dgrad and wgrad also fold the gradient that reaches y through its own batch statistics into
    dy while loading it (``dy_stats``): dy_eff = dy + dmean/M + (2·dvar/M)·(y − mean).

1×1 stride-1 layers (plain GEMMs, two thirds of ResNet-50's convs) load their operand tiles
through tensor descriptors (TMA) on sm_90+ when Triton has them and the rows are 16-byte aligned
(``use_tensor_descriptors``: one decision per launch, ``USE_TMA`` per kernel), else through
pointers: fwd x [M, C] and w [K, C]; dgrad dy [M, K], w [K, C] and the saved y of ``dy_stats``;
wgrad dy [M, K], x [M, C] and y. The prologues (BN-apply + ReLU of x, ``dy_stats``) run in
registers after the load, the same arithmetic on the same values as the pointer path: the two
paths' results are bit-identical (tests/test_norm_conv.py, under the interpreter).

groups = 1 only; the op layer falls back to eager conv otherwise.

Autotuning (CUDA): each kernel's configurations are pruned before benchmarking
(``prune_configs``: the device's shared memory for the operand dtype, and tiles no larger than
the problem); sizes that need no specialisation (N, H, W, P, Q, padding, dilation) are
``do_not_specialize``. ``recording_autotune`` / ``autotune_summary`` count what a training step
costs the autotuner without a GPU.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os

import torch
import triton
import triton.language as tl

from fastres.precision import compute_dtype, cuda_class


_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Shared memory a CTA may use on the target GPU: 227 KiB on H100/H200 (sm_90), 163 KiB on A100.
# CPU runs in GPU-faithful mode take the H100's.
H100_SHARED_MEMORY = 232448


@functools.lru_cache(maxsize=None)
def _cuda_shared_memory(index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(index)
    return int(props["max_shared_mem"])


def device_shared_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_shared_memory(device.index if device.index is not None
                                   else torch.cuda.current_device())
    return H100_SHARED_MEMORY


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def device_arch(device: torch.device) -> int:
    """The SM version the kernels compile for (90: H100/H200, 80: A100); GPU-faithful CPU runs
    model an H100."""
    if device.type == "cuda":
        return _cuda_arch(device.index if device.index is not None
                          else torch.cuda.current_device())
    return 90


def shared_memory_bytes(kind: str, config, elem_bytes: int, dy_stats: bool = True) -> int:
    """Shared memory of one ``kind`` kernel with ``config``: the pipeliner keeps num_stages copies
    of every tile the main loop loads — A and B, and the saved output y when the statistics'
    gradient is folded into dy (dgrad / wgrad ``dy_stats``).

    Checked against an ahead-of-time compile for sm_90 with the launcher's specialisation
    (pointers and C, K divisible by 16; triton 3.8), fp32 / TF32, in bytes (model → compiled):
    dgrad 128×128×64 s3 with dy_stats 294912 → 296448, without 196608 → 196608; wgrad 128×64×64
    s4 with dy_stats 327680 → 294912, without 196608 → 196608; wgrad 128×128×64 s3 with dy_stats
    294912 → 262144; fwd 128×128×64 s3 with prologue and statistics 196608 → 230400. Against the
    227 KiB limit the model keeps and drops exactly the configs the compiler does. On sm_80
    (mma.sync, cp.async) the compiler needs less than the model for some configs (fp32 dgrad
    128×128×32 s4 with dy_stats: model 196608, compiled 164992), so against the A100's 163 KiB the
    model prunes a few configs that would fit: conservative, never the other way."""
    m, n, k = (config.kwargs[key] for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    tiles = m * k + k * n
    if kind != "fwd" and dy_stats:
        tiles += m * k
    return config.num_stages * tiles * elem_bytes


# Configurations as (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Compiled ahead of time for
# sm_90 with the launcher's specialisation (tools/kernel_report.py, docs/kernel_report.txt), every
# one lowers to wgmma (cp.async pipelining, or TMA for the 1×1 stride-1 plain GEMMs). fp32 tiles
# are bounded by shared memory (``shared_memory_bytes``; the autotuner prunes what does not fit:
# dgrad 128×128×64 with the statistics' gradient, wgrad 128×128×64 and 128×64×64 in fp32), and
# a few by registers (``_SPILLING_CONFIGS``: dgrad / wgrad with both prologues, and on sm_80 fwd
# with statistics; pruned too).
_CUDA_SHAPES = {
    # wgrad: M = output channels, N = input channels (per tap), K = pixels (long reduction).
    "wgrad": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4)],
    "fwd": [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
            (64, 64, 64, 4, 3)],
}
_CUDA_SHAPES["dgrad"] = _CUDA_SHAPES["fwd"]


def cuda_conv_configs(kind: str, dtype: torch.dtype = None) -> list:
    """The autotune configurations a CUDA device chooses from, for one kernel kind ("fwd", "dgrad",
    "wgrad"): a small list that covers Hopper (H100/H200) and Ampere (A100) — big tiles with 3-4
    stages for the wide layers, narrower ones for the 64-channel layers. With ``dtype``, only those
    that fit an H100's shared memory for that dtype in every variant (fp32 drops dgrad 128×128×64
    and wgrad 128×128×64 / 128×64×64). Unmeasured: no session has had a GPU yet, so the list is a
    starting point, not a tuned result."""
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w,
                             num_stages=s, pre_hook=_descriptor_blocks(kind))
               for m, n, k, w, s in _CUDA_SHAPES[kind]]
    if dtype is not None:
        size = torch.empty((), dtype=dtype).element_size()
        configs = [c for c in configs
                   if shared_memory_bytes(kind, c, size) <= H100_SHARED_MEMORY]
    return configs


def conv_configs(kind: str) -> list:
    """The configurations the autotuner of one kernel kind is built with: the CUDA list, or under the
    interpreter exactly one small configuration (the interpreter cannot autotune, and every program
    instance costs ~0.5 ms). GPU-faithful tests run each CUDA configuration through
    ``pinned_config``."""
    if _interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 16}, num_warps=4,
                              num_stages=1, pre_hook=_descriptor_blocks(kind))]
    return cuda_conv_configs(kind)


# Configurations that ptxas compiles with register spills (STL in the SASS, counted by
# tools/kernel_report.py with the launcher's specialisation at ResNet-50 shapes, triton 3.8; up to
# 255 registers per thread and 8–92 B of local-memory stores per thread). Mostly dgrad / wgrad with
# BOTH prologues — x's BN-apply + ReLU and the statistics' gradient folded into dy (dy, the saved
# output y and their per-channel coefficients live beside the accumulator) — and, on sm_80
# (mma.sync), fwd with the statistics epilogue. Keyed by (kind, the variant's switches that are
# on, operand dtype, SM version); the autotuner drops them for that variant only
# (``prune_reason``), the other configurations of the list cover those layers. fp16 was compiled
# for dgrad only (the report's default dtypes are bf16 and fp32).
_SWITCHES = ("HAS_PROLOGUE", "HAS_STATS", "HAS_DY_PROLOGUE")
_BOTH_PROLOGUES = frozenset({"HAS_PROLOGUE", "HAS_DY_PROLOGUE"})
_PROLOGUE_STATS = frozenset({"HAS_PROLOGUE", "HAS_STATS"})
_SPILLING_CONFIGS = {
    ("dgrad", _BOTH_PROLOGUES, torch.bfloat16, 90): {(64, 128, 32, 4, 4)},       # 28–32 B
    ("dgrad", _BOTH_PROLOGUES, torch.float16, 90): {(64, 128, 32, 4, 4),         # 32–40 B
                                                    (128, 128, 32, 8, 4)},       # 28 B
    ("dgrad", _BOTH_PROLOGUES, torch.float32, 90): {(64, 128, 32, 4, 4),         # 92 B
                                                    (64, 64, 64, 4, 3)},         # 28 B
    ("dgrad", _BOTH_PROLOGUES, torch.float32, 80): {(128, 64, 32, 4, 4)},        # 20 B
    ("wgrad", _BOTH_PROLOGUES, torch.bfloat16, 90): {(128, 64, 64, 4, 4)},       # 12 B
    ("wgrad", _BOTH_PROLOGUES, torch.bfloat16, 80): {(128, 64, 64, 4, 4)},       # 28 B
    ("fwd", _PROLOGUE_STATS, torch.bfloat16, 80): {(128, 128, 32, 8, 4),         # 8 B
                                                   (128, 64, 32, 4, 4)},         # 8 B
    ("fwd", _PROLOGUE_STATS, torch.float32, 80): {(128, 64, 32, 4, 4)},          # 16 B
    ("fwd", frozenset({"HAS_STATS"}), torch.bfloat16, 80): {(128, 128, 64, 8, 3)},  # stem: 32 B
}


def _config_shape(config) -> tuple:
    kw = config.kwargs
    return (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], config.num_warps, config.num_stages)


def prune_reason(kind: str, config, named_args: dict, limit: int = None,
                 arch: int = None):
    """Why the autotuner never benchmarks ``config`` for this launch, whatever the problem size:
    "shared memory" (``shared_memory_bytes`` over ``limit``, default the device's, for the operand
    dtype, with or without the saved-output tile of ``dy_stats``) or "spills" (in
    ``_SPILLING_CONFIGS`` for this variant's switches, dtype and ``arch``, default the device's);
    None when it may be benchmarked."""
    act = named_args["X"] if kind == "fwd" else named_args["DY"]
    dy_stats = bool(named_args.get("HAS_DY_PROLOGUE", False))
    limit = device_shared_memory(act.device) if limit is None else limit
    if shared_memory_bytes(kind, config, act.element_size(), dy_stats) > limit:
        return "shared memory"
    switches = frozenset(name for name in _SWITCHES if named_args.get(name, False))
    arch = device_arch(act.device) if arch is None else arch
    if _config_shape(config) in _SPILLING_CONFIGS.get((kind, switches, act.dtype, arch), ()):
        return "spills"
    return None


def prune_configs(kind: str, configs, named_args: dict, limit: int = None,
                  arch: int = None) -> list:
    """The configurations worth benchmarking for one launch: those ``prune_reason`` does not drop
    (the device's shared memory; register spills of a known variant), then, of those, the ones
    whose tile does not exceed the problem — BLOCK_N ≤ next_pow2(columns) and, for fwd / dgrad,
    BLOCK_K ≤ next_pow2(reduced channels), for wgrad BLOCK_M ≤ next_pow2(K) — or, if none is that
    small, the smallest."""
    fits = [c for c in configs if prune_reason(kind, c, named_args, limit, arch) is None]
    if not fits:
        raise RuntimeError(f"conv {kind}: every configuration is pruned for this device (shared "
                           f"memory limit {limit or 'of the device'}, register spills)")
    C, K = named_args["C"], named_args["K"]
    cols, reduced, rows = {"fwd": (K, C, None), "dgrad": (C, K, None), "wgrad": (C, None, K)}[kind]
    p2 = lambda v: max(16, triton.next_power_of_2(v))  # noqa: E731

    def small_enough(c):
        kw = c.kwargs
        return (kw["BLOCK_N"] <= p2(cols) and (reduced is None or kw["BLOCK_K"] <= p2(reduced))
                and (rows is None or kw["BLOCK_M"] <= p2(rows)))

    kept = [c for c in fits if small_enough(c)]
    if not kept:
        area = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"]  # noqa
        smallest = min(area(c) for c in fits)
        kept = [c for c in fits if area(c) == smallest]
    return kept


def _early_prune(kind: str):
    def prune(configs, named_args, **kwargs):
        return prune_configs(kind, configs, {**named_args, **kwargs})
    return prune


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


# Arguments whose value needs no specialisation: Triton would otherwise compile one variant per
# (divisible by 16, equal to 1, other) class of each, e.g. per batch size and image size.
_NO_SPECIALIZE = ["N", "H", "W_in", "P", "Q", "pad_h", "pad_w", "dil_h", "dil_w"]


# --------------------------------------------------------------------------------------------------
# Tensor descriptors (TMA on Hopper) for the plain GEMMs: 1×1, stride 1, no padding. Every operand
# is then a dense row-major 2-D matrix ([pixels, channels] activations, [K, C] weights); a
# descriptor load of a tile past its edge reads 0, as the pointer path's masked load does.


try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton without host-side tensor descriptors: the pointer path only
    TensorDescriptor = None


# Each kernel's descriptors and their block shapes (as config keys): the tile the main loop loads.
# wgrad reads dy and x as [pixels, channels] tiles of the reduction: dy's tile is transposed in
# registers (the GEMM's rows are dy's channels).
DESCRIPTOR_BLOCKS = {
    "fwd": {"X_DESC": ("BLOCK_M", "BLOCK_K"), "W_DESC": ("BLOCK_N", "BLOCK_K")},
    "dgrad": {"DY_DESC": ("BLOCK_M", "BLOCK_K"), "Y_DESC": ("BLOCK_M", "BLOCK_K"),
              "W_DESC": ("BLOCK_K", "BLOCK_N")},
    "wgrad": {"DY_DESC": ("BLOCK_K", "BLOCK_M"), "Y_DESC": ("BLOCK_K", "BLOCK_M"),
              "X_DESC": ("BLOCK_K", "BLOCK_N")},
}


def _descriptor_blocks(kind: str):
    """Config pre-hook of one kernel kind: its descriptors' block shapes are the config's tiles."""
    blocks = DESCRIPTOR_BLOCKS[kind]

    def set_blocks(nargs):
        for name, keys in blocks.items():
            desc = nargs.get(name)
            if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
                desc.block_shape = [nargs[key] for key in keys]
    return set_blocks


def use_tensor_descriptors(*operands: torch.Tensor) -> bool:
    """A plain-GEMM launch loads its operands (dense tensors whose last dimension is the matrix
    row) through tensor descriptors when Triton has them and the device has TMA (sm_90+;
    GPU-faithful CPU runs model an H100), and every operand's base and row stride are 16-byte
    aligned (TMA's requirement; a 64-channel fp16 row is 128 B, a 3-channel one is not)."""
    if TensorDescriptor is None or not hasattr(tl, "make_tensor_descriptor"):
        return False
    first = operands[0]
    if first.is_cuda:
        if torch.cuda.get_device_capability(first.device)[0] < 9:
            return False
    elif not (cuda_class(first.device) and _interpreting()):
        return False
    return all((t.shape[-1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in operands)


def _matrix_descriptor(t: torch.Tensor):
    """A descriptor of dense ``t`` viewed as [rows, t.shape[-1]]; the block shape is set per config
    by the kernel's pre-hook (``_descriptor_blocks``)."""
    return TensorDescriptor.from_tensor(t.view(-1, t.shape[-1]), [16, 16])


# --------------------------------------------------------------------------------------------------
# Forward.


@triton.autotune(configs=conv_configs("fwd"),
                 key=["C", "K", "R", "S", "stride_h", "HAS_PROLOGUE", "HAS_STATS", "PLAIN_GEMM",
                      "USE_TMA", "HAS_BIAS", "HAS_RESIDUAL", "RELU"],
                 prune_configs_by={"early_config_prune": _early_prune("fwd")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _conv_fwd_kernel(
    X, W, Y, SCALE, SHIFT, TILE_MEAN, TILE_M2, BIAS, RESIDUAL, X_DESC, W_DESC,
    N, H, W_in, C, P, Q, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, HAS_STATS: tl.constexpr, PLAIN_GEMM: tl.constexpr,
    USE_TMA: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
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
        c0 = (t - rs * num_c_blocks) * BLOCK_K
        c = c0 + offs_c
        r = rs // S
        s = rs - r * S
        c_ok = c < C
        if PLAIN_GEMM:  # 1×1, stride 1, no padding: the pixel index is the row index.
            pix_ok = m_ok
            x_rows = offs_m.to(tl.int64) * C
        else:
            h = p * stride_h - pad_h + r * dil_h
            w = q * stride_w - pad_w + s * dil_w
            pix_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W_in)
            x_rows = ((img * H + h) * W_in + w) * C
        a_mask = pix_ok[:, None] & c_ok[None, :]
        if USE_TMA:  # plain GEMM: x is [M, C] and w is [K, C]; out-of-range elements read 0
            a = X_DESC.load([pid_m * BLOCK_M, c0])
            b = tl.trans(W_DESC.load([pid_n * BLOCK_N, c0]))
        else:
            a = tl.load(X + x_rows[:, None] + c[None, :], mask=a_mask, other=0.0)
            b = tl.load(W + w_rows[None, :] + (rs * C + c)[:, None],
                        mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_PROLOGUE:
            scale = tl.load(SCALE + c, mask=c_ok, other=0.0)
            shift = tl.load(SHIFT + c, mask=c_ok, other=0.0)
            z = a.to(tl.float32) * scale[None, :] + shift[None, :]
            z = tl.where(z < 0.0, 0.0, z)  # relu that keeps NaN, as torch.relu does
            # Padding is zero in act(x), so mask after the transform (relu(shift) ≠ 0).
            a = tl.where(a_mask, z, 0.0).to(X.dtype.element_ty)
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
        # Statistics of the stored (rounded) output, as eager BN sees it, accumulated in ACC.
        yf = tl.where(out_mask, y.to(ACC), 0.0)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
        mean = tl.sum(yf, axis=0) / count
        d = tl.where(out_mask, yf - mean[None, :], 0.0)
        m2 = tl.sum(d * d, axis=0)
        tl.store(TILE_MEAN + pid_m * K + offs_n, mean, mask=n_ok)
        tl.store(TILE_M2 + pid_m * K + offs_n, m2, mask=n_ok)


# --------------------------------------------------------------------------------------------------
# Merge of per-tile partials (the conv epilogues' statistics and sums): one launch, one program per
# BLOCK_C channels. Each chunk of MERGE_CHUNK partials is reduced at once (tl.sum: a tree in a fixed
# order), the chunks in sequence: the dependent chain is T/MERGE_CHUNK merges, not T.

MERGE_CHUNK = 64


@triton.jit
def _chan_combine(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan's merge of (count, mean, M2); an empty side (count 0) leaves the other unchanged, and a
    non-finite mean propagates as a sum would (inf + finite = inf), as eager's mean does."""
    n = n_a + n_b
    frac = tl.where(n > 0.0, n_b / tl.where(n > 0.0, n, 1.0), 0.0)
    delta = mean_b - mean_a
    finite = (tl.abs(mean_a) < float("inf")) & (tl.abs(mean_b) < float("inf"))
    mean = tl.where(finite, mean_a + delta * frac, mean_a + mean_b)  # an empty side's mean is 0
    m2 = m2_a + m2_b + tl.where(n_a * n_b > 0.0, delta * delta * (n_a * frac), 0.0)
    return n, mean, m2


@triton.jit(do_not_specialize=["T", "total", "rows_per_tile"])
def _merge_partials_kernel(
    PART_A, PART_B, OUT_A, OUT_B, T, C, total, rows_per_tile,
    CHAN: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # CHAN: PART_A / PART_B are per-tile (mean, M2) of tiles of rows_per_tile rows (the last one
    # shorter; total rows in all) → OUT_A = mean, OUT_B = biased variance. Else plain sums.
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = cols < C
    n_acc = tl.zeros((BLOCK_C,), dtype=ACC)
    a_acc = tl.zeros((BLOCK_C,), dtype=ACC)
    b_acc = tl.zeros((BLOCK_C,), dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        tiles = t0 + tl.arange(0, BLOCK_T)
        t_ok = tiles < T
        mask = t_ok[:, None] & c_ok[None, :]
        offs = tiles.to(tl.int64)[:, None] * C + cols[None, :]
        a = tl.load(PART_A + offs, mask=mask, other=0.0).to(ACC)
        b = tl.load(PART_B + offs, mask=mask, other=0.0).to(ACC)
        if CHAN:
            rows = tl.minimum(total - tiles * rows_per_tile, rows_per_tile).to(ACC)
            n = tl.where(mask, rows[:, None], 0.0)
            # The chunk at once (tl.sum: a tree in fixed order): its count, mean and
            # M2 = ΣM2ᵢ + Σnᵢ(meanᵢ − mean)², then Chan-merged into the running result.
            n_b = tl.sum(n, axis=0)
            mean_b = tl.sum(n * a, axis=0) / tl.where(n_b > 0.0, n_b, 1.0)
            d = tl.where(mask, a - mean_b[None, :], 0.0)
            m2_b = tl.sum(b, axis=0) + tl.sum(n * d * d, axis=0)
            n_acc, a_acc, b_acc = _chan_combine(n_acc, a_acc, b_acc, n_b, mean_b, m2_b)
        else:
            a_acc += tl.sum(a, axis=0)
            b_acc += tl.sum(b, axis=0)
    if CHAN:
        b_acc = b_acc / total
    tl.store(OUT_A + cols, a_acc, mask=c_ok)
    tl.store(OUT_B + cols, b_acc, mask=c_ok)


def merge_partials(part_a, part_b, rows_per_tile: int = 0, total: int = 0, chan: bool = False):
    """One launch over per-tile partials [T, C] (fp32, or fp64 where the kernels accumulate in
    double): with ``chan``, per-tile (mean, M2) of tiles of ``rows_per_tile`` rows (``total`` in
    all) → per-channel (mean, biased var); else the per-channel sums of both. Accumulates in the
    partials' dtype, returns fp32. Fixed order, no host sync."""
    T, C = part_a.shape
    out_a = torch.empty(C, dtype=torch.float32, device=part_a.device)
    out_b = torch.empty_like(out_a)
    block_c = min(triton.next_power_of_2(max(C, 1)), 64)
    _merge_partials_kernel[(triton.cdiv(C, block_c),)](
        part_a, part_b, out_a, out_b, T, C, total, rows_per_tile,
        CHAN=chan, ACC=_TL_ACC[part_a.dtype], BLOCK_T=MERGE_CHUNK, BLOCK_C=block_c, num_warps=4)
    return out_a, out_b


def merge_tile_stats(tile_mean, tile_m2, block_m: int, total: int):
    """Chan's merge of per-tile (mean, M2) rows [T, K] (tile i holds min(block_m, total −
    i·block_m) rows) into per-channel (mean, biased var)."""
    return merge_partials(tile_mean, tile_m2, block_m, total, chan=True)


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
    # Statistics accumulate as ATen's on the same device: fp64 on CPU, fp32 on CUDA and in
    # GPU-faithful mode (compute_dtype); the merged mean / var are fp32 either way.
    acc = compute_dtype(x)
    tile_mean = torch.empty((tiles, K), dtype=acc, device=x.device)
    tile_m2 = torch.empty_like(tile_mean)
    plain = R == 1 and S == 1 and (sh, sw, ph, pw) == (1, 1, 0, 0)
    x_desc = w_desc = None
    if plain and use_tensor_descriptors(x, w):
        x_desc, w_desc = _matrix_descriptor(x), _matrix_descriptor(w)  # [M, C], [K, C]
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(K, meta["BLOCK_N"]))
    _conv_fwd_kernel[grid](
        x, w, y, scale if has_prologue else x, shift if has_prologue else x, tile_mean, tile_m2,
        x if bias is None else bias, x if residual is None else residual, x_desc, w_desc,
        N, H, W_in, C, P, Q, K, sh, sw, ph, pw, dh, dw,
        R=R, S=S, HAS_PROLOGUE=has_prologue, HAS_STATS=collect_stats, PLAIN_GEMM=plain,
        USE_TMA=x_desc is not None, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, RELU=relu, INPUT_PRECISION=input_precision(x.dtype),
        ACC=_TL_ACC[acc])
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
def _dy_with_stats_grad(dy, y, mask, Y_MEAN, DY_ALPHA, DY_BETA, k, k_ok,
                        CHANNEL_AXIS: tl.constexpr):
    """dy_eff of a dy tile given the saved y tile (both loaded by the caller, through pointers or
    a descriptor: 0 outside the tensor); ``mask`` zeroes what lies outside the problem."""
    y = y.to(tl.float32)
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


@triton.jit
def _first_tap(base, dil, stride, R: tl.constexpr):
    """The first tap r in [0, R) with (base − r·dil) divisible by stride, or R if none."""
    first = R
    for r in tl.static_range(R - 1, -1, -1):
        first = tl.where((base - r * dil) % stride == 0, r, first)
    return first


@triton.autotune(configs=conv_configs("dgrad"),
                 key=["C", "K", "R", "S", "stride_h", "stride_w", "HAS_PROLOGUE", "PLAIN_GEMM",
                      "USE_TMA", "HAS_DY_PROLOGUE"],
                 prune_configs_by={"early_config_prune": _early_prune("dgrad")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["tap_step_h", "tap_step_w"])
def _conv_dgrad_kernel(
    DY, W, DX, X, SCALE, SHIFT, TILE_SUM, TILE_SUM_X, Y, Y_MEAN, DY_ALPHA, DY_BETA,
    DY_DESC, W_DESC, Y_DESC,
    N, H, W_in, C, P, Q, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, tap_step_h, tap_step_w,
    R: tl.constexpr, S: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, PLAIN_GEMM: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_DY_PROLOGUE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # GEMM view: rows = input pixels, columns = input channels C, reduction over (r, s, k).
    # Sub-pixel decomposition: program_id(2) is the phase (h mod σh, w mod σw); the pixels of one
    # phase are hit by the same taps — r with (h + π − r·δ) divisible by σ: r0, r0 + step, ... —
    # so the loop runs over those taps only and issues no MMA on taps that miss every pixel.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = tl.program_id(2)
    phase_h = phase // stride_w
    phase_w = phase - phase_h * stride_w
    rows_h = tl.maximum(H - phase_h + stride_h - 1, 0) // stride_h  # pixel rows of this phase
    cols_w = tl.maximum(W_in - phase_w + stride_w - 1, 0) // stride_w
    M = N * rows_h * cols_w
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C
    per_img = tl.maximum(rows_h * cols_w, 1)
    img = (offs_m // per_img).to(tl.int64)
    hw = offs_m % per_img
    h = phase_h + (hw // tl.maximum(cols_w, 1)) * stride_h
    w = phase_w + (hw % tl.maximum(cols_w, 1)) * stride_w
    r0 = _first_tap(phase_h + pad_h, dil_h, stride_h, R)
    s0 = _first_tap(phase_w + pad_w, dil_w, stride_w, S)
    taps_h = (R - r0 + tap_step_h - 1) // tap_step_h
    taps_w = (S - s0 + tap_step_w - 1) // tap_step_w
    # A program past its phase's pixels issues nothing.
    taps = tl.where(pid_m * BLOCK_M < M, taps_h * taps_w, 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k_blocks = tl.cdiv(K, BLOCK_K)
    for t in range(0, taps * num_k_blocks):  # flat over (tap, channel block), as in the forward
        tap = t // num_k_blocks
        k0 = (t - tap * num_k_blocks) * BLOCK_K
        k = k0 + offs_k
        tap_h = tap // taps_w
        r = r0 + tap_h * tap_step_h
        s = s0 + (tap - tap_h * taps_w) * tap_step_w
        if PLAIN_GEMM:
            pix_ok = m_ok
            dy_rows = offs_m.to(tl.int64) * K
        else:
            # The output pixel (p, q) that reads (h, w) through tap (r, s): exact divisions here.
            hp = h + pad_h - r * dil_h
            wq = w + pad_w - s * dil_w
            p = hp // stride_h
            q = wq // stride_w
            pix_ok = m_ok & (hp >= 0) & (wq >= 0) & (p < P) & (q < Q)
            dy_rows = ((img * P + p) * Q + q) * K
        k_ok = k < K
        dy_mask = pix_ok[:, None] & k_ok[None, :]
        if USE_TMA:  # plain GEMM: dy and y are [M, K], w is [K, C]; out-of-range elements read 0
            a = DY_DESC.load([pid_m * BLOCK_M, k0])
            b = W_DESC.load([k0, pid_n * BLOCK_N])
        else:
            a = tl.load(DY + dy_rows[:, None] + k[None, :], mask=dy_mask, other=0.0)
            b = tl.load(W + k.to(tl.int64)[:, None] * (R * S * C) + (r * S + s) * C
                        + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_DY_PROLOGUE:
            if USE_TMA:
                y = Y_DESC.load([pid_m * BLOCK_M, k0])
            else:
                y = tl.load(Y + dy_rows[:, None] + k[None, :], mask=dy_mask, other=0.0)
            a = _dy_with_stats_grad(a, y, dy_mask, Y_MEAN, DY_ALPHA, DY_BETA, k, k_ok, 1)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    out_mask = m_ok[:, None] & n_ok[None, :]
    out_rows = (img * H + h) * W_in + w
    out_offs = out_rows[:, None] * C + offs_n[None, :]
    if HAS_PROLOGUE:
        # Backward of act(x) = relu(x·scale + shift), given da = ∂L/∂act(x) in the fp32
        # accumulator. Unlike eager, which stores da in x's dtype before BN's backward reads it,
        # da is never rounded here: dx = scale·da' is rounded once, and the per-channel sums take
        # the exact accumulator values (rounding da to fp16 first costs ~1e-3 relative per
        # channel, noise that would then dominate the BN's dweight / dbias).
        x = tl.load(X + out_offs, mask=out_mask, other=0.0).to(tl.float32)
        scale = tl.load(SCALE + offs_n, mask=n_ok, other=0.0)
        shift = tl.load(SHIFT + offs_n, mask=n_ok, other=0.0)
        z = (x * scale[None, :] + shift[None, :]).to(DX.dtype.element_ty).to(tl.float32)
        # threshold_backward: the gradient passes unless relu's output is <= 0 (NaN passes).
        keep = (z > 0.0) | (z != z)
        da_kept = tl.where(keep & out_mask, acc, 0.0)
        tl.store(DX + out_offs, (da_kept * scale[None, :]).to(DX.dtype.element_ty), mask=out_mask)
        # Per-channel partial sums Σda', Σda'·x in ACC (fp64 on CPU as ATen's BN backward, fp32 on
        # CUDA), from the unrounded da and the raw x.
        tile = phase * tl.num_programs(0) + pid_m
        da_acc = da_kept.to(ACC)
        tl.store(TILE_SUM + tile * C + offs_n, tl.sum(da_acc, axis=0), mask=n_ok)
        tl.store(TILE_SUM_X + tile * C + offs_n, tl.sum(da_acc * x.to(ACC), axis=0), mask=n_ok)
    else:
        tl.store(DX + out_offs, acc.to(DX.dtype.element_ty), mask=out_mask)


def dgrad_phases(input_hw, stride):
    """(phases, pixels of the largest phase per image) of the sub-pixel decomposition."""
    (H, W_in), (sh, sw) = input_hw, stride
    return sh * sw, triton.cdiv(H, sh) * triton.cdiv(W_in, sw)


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
    phases, per_img = dgrad_phases(input_hw, stride)
    M = N * per_img  # rows of the largest phase
    has_prologue = scale is not None
    tiles = phases * triton.cdiv(M, _min_block_m("dgrad")) if has_prologue else 1
    acc = compute_dtype(dy)  # the partial sums' precision (see conv_fwd)
    tile_sum = torch.empty((tiles, C), dtype=acc, device=dy.device)
    tile_sum_x = torch.empty_like(tile_sum)
    plain = R == 1 and S == 1 and (sh, sw, ph, pw) == (1, 1, 0, 0)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),  # noqa: E731
                         triton.cdiv(C, meta["BLOCK_N"]), phases)
    y, y_mean, alpha, beta = dy_stats if dy_stats is not None else (dy, dy, dy, dy)
    dy_desc = w_desc = y_desc = None
    if plain and use_tensor_descriptors(dy, w, y):
        dy_desc, w_desc = _matrix_descriptor(dy), _matrix_descriptor(w)  # [M, K], [K, C]
        y_desc = _matrix_descriptor(y) if dy_stats is not None else None
    _conv_dgrad_kernel[grid](
        dy, w, dx, x if has_prologue else dy, scale if has_prologue else dy,
        shift if has_prologue else dy, tile_sum, tile_sum_x, y, y_mean, alpha, beta,
        dy_desc, w_desc, y_desc,
        N, H, W_in, C, P, Q, K, sh, sw, ph, pw, dh, dw,
        sh // math.gcd(sh, dh), sw // math.gcd(sw, dw),
        R=R, S=S, HAS_PROLOGUE=has_prologue, PLAIN_GEMM=plain, USE_TMA=dy_desc is not None,
        HAS_DY_PROLOGUE=dy_stats is not None,
        INPUT_PRECISION=input_precision(dy.dtype), ACC=_TL_ACC[acc])
    if not has_prologue:
        return dx, None, None
    used = phases * triton.cdiv(M, _conv_dgrad_kernel.best_config.kwargs["BLOCK_M"])
    sum_da, sum_da_x = merge_partials(tile_sum[:used], tile_sum_x[:used])
    return dx, sum_da, sum_da_x


# --------------------------------------------------------------------------------------------------
# Weight gradient.


@triton.autotune(configs=conv_configs("wgrad"),
                 key=["C", "K", "R", "S", "stride_h", "HAS_PROLOGUE", "SPLIT", "USE_TMA",
                      "HAS_DY_PROLOGUE"],
                 prune_configs_by={"early_config_prune": _early_prune("wgrad")})
@triton.jit(do_not_specialize=_NO_SPECIALIZE + ["SPLIT"])
def _conv_wgrad_kernel(
    DY, X, DW_PART, SCALE, SHIFT, Y, Y_MEAN, DY_ALPHA, DY_BETA, DY_DESC, X_DESC, Y_DESC,
    N, H, W_in, C, P, Q, K,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, SPLIT,
    R: tl.constexpr, S: tl.constexpr,
    HAS_PROLOGUE: tl.constexpr, USE_TMA: tl.constexpr, HAS_DY_PROLOGUE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
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
    n0 = (pid_ncrs % num_c_blocks) * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < K
    n_ok = offs_n < C
    if HAS_PROLOGUE:
        scale = tl.load(SCALE + offs_n, mask=n_ok, other=0.0)
        shift = tl.load(SHIFT + offs_n, mask=n_ok, other=0.0)
    total = N * P * Q
    # A split's range is a whole number of BLOCK_K tiles, so a tile crosses no split boundary, only
    # the matrix's end (where a descriptor load reads 0, as the masked pointer load does).
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
        x_mask = x_ok[:, None] & n_ok[None, :]
        if USE_TMA:  # plain GEMM: dy and y are [pixels, K], x is [pixels, C]; outside reads 0
            dy_t = tl.trans(DY_DESC.load([pix0, pid_m * BLOCK_M]))
            a = X_DESC.load([pix0, n0])
        else:
            dy_t = tl.load(DY + dy_offs, mask=dy_mask, other=0.0)
            a = tl.load(X + ((img * H + h) * W_in + w)[:, None] * C + offs_n[None, :],
                        mask=x_mask, other=0.0)
        if HAS_DY_PROLOGUE:
            if USE_TMA:
                y_t = tl.trans(Y_DESC.load([pix0, pid_m * BLOCK_M]))
            else:
                y_t = tl.load(Y + dy_offs, mask=dy_mask, other=0.0)
            dy_t = _dy_with_stats_grad(dy_t, y_t, dy_mask, Y_MEAN, DY_ALPHA, DY_BETA,
                                       offs_m, m_ok, 0)
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
    plain = R == 1 and S == 1 and (sh, sw, ph, pw) == (1, 1, 0, 0)
    dy_desc = x_desc = y_desc = None
    if plain and use_tensor_descriptors(dy, x, y):
        dy_desc, x_desc = _matrix_descriptor(dy), _matrix_descriptor(x)  # [pixels, K], [pixels, C]
        y_desc = _matrix_descriptor(y) if dy_stats is not None else None
    _conv_wgrad_kernel[grid](
        dy, x, part, scale if has_prologue else x, shift if has_prologue else x,
        y, y_mean, alpha, beta, dy_desc, x_desc, y_desc,
        N, H, W_in, C, P, Q, K, sh, sw, ph, pw, dh, dw, split,
        R=R, S=S, HAS_PROLOGUE=has_prologue, USE_TMA=dy_desc is not None,
        HAS_DY_PROLOGUE=dy_stats is not None,
        INPUT_PRECISION=input_precision(dy.dtype))
    return part[0] if split == 1 else part.sum(0)


# --------------------------------------------------------------------------------------------------
# Autotuning cost, counted without a GPU.

_INT_ARGS_SPECIALISED = {
    kind: [name for name in _autotuned(kind).arg_names
           if name in ("C", "K", "stride_h", "stride_w", "tap_step_h", "tap_step_w")]
    for kind in ("fwd", "dgrad", "wgrad")}


@contextlib.contextmanager
def recording_autotune(device_limit: int = H100_SHARED_MEMORY):
    """Within the block, the conv kernels (and the partial merges) do not run; each launch records what a CUDA device's
    autotuner would do: its autotune key, the configurations that survive pruning (from
    ``cuda_conv_configs``, shared memory ``device_limit``) and the compiled variant each would
    need (constexprs, dtypes and the divisibility / equal-to-1 specialisation of the integer
    arguments Triton specialises). Yields a list of records; ``autotune_summary`` counts them."""
    records = []
    saved = {}
    for kind in ("fwd", "dgrad", "wgrad"):
        kernel = _autotuned(kind)
        saved[kind] = kernel.__dict__.get("run")

        def run(*args, _kind=kind, _kernel=kernel, grid=None, warmup=False, **kwargs):
            named = dict(zip(_kernel.arg_names, args))
            all_args = {**named, **kwargs}
            key = [all_args[k] for k in _kernel.keys if k in all_args]
            key += [str(a.dtype) for a in all_args.values() if hasattr(a, "dtype")]
            configs = cuda_conv_configs(_kind)
            fits = [c for c in configs if prune_reason(_kind, c, all_args, device_limit) is None]
            pruned = prune_configs(_kind, configs, all_args, device_limit)
            spec = tuple((name, "1" if all_args[name] == 1 else
                          "D" if all_args[name] % 16 == 0 else "")
                         for name in _INT_ARGS_SPECIALISED[_kind])
            constexprs = tuple(sorted((k, str(v)) for k, v in kwargs.items()))
            dtypes = tuple(str(a.dtype) for a in all_args.values() if hasattr(a, "dtype"))
            records.append(dict(kind=_kind, key=(_kind,) + tuple(key), fits=len(fits),
                                configs=pruned, all_configs=configs,
                                variant=(_kind, constexprs, dtypes, spec)))
            _kernel.best_config = pruned[0]
            for name in ("Y", "TILE_MEAN", "TILE_M2", "DX", "TILE_SUM", "TILE_SUM_X", "DW_PART"):
                if name in all_args:  # defined outputs, so that the step goes on without NaNs
                    all_args[name].zero_()
        kernel.run = run
    global merge_partials
    merge = merge_partials
    merge_partials = lambda part_a, part_b, *args, **kwargs: (  # noqa: E731
        torch.zeros(part_a.shape[1], device=part_a.device),
        torch.ones(part_a.shape[1], device=part_a.device))
    try:
        yield records
    finally:
        merge_partials = merge
        for kind, run in saved.items():
            kernel = _autotuned(kind)
            if run is None:
                del kernel.run
            else:
                kernel.run = run


def _config_id(config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


def autotune_summary(records) -> dict:
    """Counts for the launches recorded by ``recording_autotune``: distinct autotune keys, configs
    benchmarked (Σ over keys of the surviving configs; a key with one survivor is not benchmarked)
    and compiled variants (distinct (variant, config) pairs), with pruning and — for comparison —
    without it (every config of the list, every key)."""
    keys, keys_unpruned = {}, {}
    for rec in records:
        keys.setdefault(rec["key"], rec)
    benchmarked = sum(len(r["configs"]) for r in keys.values() if len(r["configs"]) > 1)
    benchmarked_unpruned = sum(len(r["all_configs"]) for r in keys.values())
    variants = {(r["variant"], _config_id(c)) for r in keys.values() for c in r["configs"]}
    variants_unpruned = {(r["variant"], _config_id(c)) for r in keys.values()
                         for c in r["all_configs"]}
    return dict(launches=len(records), autotune_keys=len(keys),
                benchmark_runs=benchmarked, benchmark_runs_unpruned=benchmarked_unpruned,
                compiled_variants=len(variants), compiled_variants_unpruned=len(variants_unpruned))
