"""The normalized-convolution path for ResNet blocks, and the per-shape choice table.

Training (all BNs in training mode), for a Bottleneck::

    y1, stats1 = conv1(x)                                  stats from conv1's epilogue
    y2, stats2 = conv2(relu(BN1(y1)))                      BN1-apply + ReLU in conv2's prologue
    y3, stats3 = conv3(relu(BN2(y2)))                      BN2-apply + ReLU in conv3's prologue
    out        = relu(BN3(y3; stats3) + identity)          one apply pass (no statistics pass)

(BasicBlock: the same with conv1 → conv2.) Only the raw conv outputs y1, y2, y3 and per-channel
statistics are kept for backward; gradients flow exactly as in eager (see fastres/ops/norm_conv.py).
Running statistics and ``num_batches_tracked`` are updated as ``nn.BatchNorm2d`` does.

Eval: each conv runs with its BN folded in (weight·scale, bias = shift) and the bias, the residual
add and the ReLU in the conv's epilogue (``fastres.functional.conv_bias_act``) — for inference or
frozen BN parameters; trainable BN parameters in eval mode with grad enabled keep the fallback.

Works on fastres's blocks and on torchvision's (same attribute names: conv1, bn1, ..., downsample).

Choice (``NORMCONV_TABLE``, the one place): per conv shape, "normconv" or "torch-conv+fused-bn". It
is filled by the benchmark suite on a GPU; until then it is empty and ``NORMCONV_TABLE_DEVICE`` is
"unmeasured", so every shape takes the fallback unless forced with ``FASTRES_NORMCONV=1`` (or
``set_normconv("on")``); ``FASTRES_NORMCONV=0`` / ``"off"`` disables the path everywhere.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor, nn

from fastres import functional as F
from fastres import tables as _tables
from fastres.backend import get_backend, triton_interpreting
from fastres.nn.batch_norm_act import BatchNormAct2d, exponential_average_factor
from fastres.ops.norm_conv import bn_act_with_stats

__all__ = ["NORMCONV_TABLE", "NORMCONV_TABLE_DEVICE", "set_normconv", "get_normconv",
           "conv_choice", "block_uses_normconv", "bottleneck_forward", "basic_block_forward"]

NORMCONV = "normconv"
FALLBACK = "torch-conv+fused-bn"

# (in_channels, out_channels, kernel, stride, dtype name) -> NORMCONV | FALLBACK. Generated data,
# fastres/tables/normconv_table.json, written by `python -m benchmarks.tables` from a benchmark run on
# NORMCONV_TABLE_DEVICE (never edited by hand); nothing measured yet. Missing shapes take FALLBACK.
NORMCONV_TABLE_DEVICE, NORMCONV_TABLE = _tables.load_normconv_table()

_MODES = ("auto", "on", "off")


def _mode_from_env() -> str:
    value = os.environ.get("FASTRES_NORMCONV", "auto").strip().lower()
    return {"1": "on", "true": "on", "on": "on", "0": "off", "false": "off", "off": "off",
            "": "auto", "auto": "auto"}.get(value, "invalid")


_mode = _mode_from_env()
if _mode == "invalid":
    raise ValueError(f"FASTRES_NORMCONV={os.environ.get('FASTRES_NORMCONV')!r}: use 1, 0 or auto")


def set_normconv(mode: str) -> None:
    """"on": every eligible block uses the normconv path; "off": none does; "auto": the table."""
    global _mode
    mode = str(mode).strip().lower()
    if mode not in _MODES:
        raise ValueError(f"normconv mode must be one of {_MODES}, got {mode!r}")
    _mode = mode


def get_normconv() -> str:
    return _mode


def conv_choice(conv: nn.Conv2d, dtype: torch.dtype) -> str:
    if _mode == "on":
        return NORMCONV
    if _mode == "off":
        return FALLBACK
    key = (conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0],
           str(dtype).replace("torch.", ""))
    return NORMCONV_TABLE.get(key, FALLBACK)


# --------------------------------------------------------------------------------------------------
# Eligibility.


def _plain_conv(conv) -> bool:
    return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.bias is None
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def _plain_bn(bn) -> bool:
    # Exactly nn.BatchNorm2d or fastres's BatchNormAct2d: a subclass (a synchronised BN, say) may
    # compute its statistics differently, so it keeps its own forward — as does a BatchNormAct2d
    # synchronised over a process group (the conv epilogue's statistics are this rank's).
    return type(bn) in (nn.BatchNorm2d, BatchNormAct2d) \
        and getattr(bn, "process_group", None) is None


def _convs_and_bns(block):
    names = ("1", "2", "3") if hasattr(block, "conv3") else ("1", "2")
    return ([getattr(block, "conv" + n, None) for n in names],
            [getattr(block, "bn" + n, None) for n in names])


def _triton_backend_selected(x: Tensor) -> bool:
    """The backend runs the Triton conv kernels for x (plain Python: traceable by dynamo)."""
    backend = get_backend()
    if backend == "torch":
        return False
    if x.is_cuda:
        return True  # "auto", "triton" and "cuda" (which has no conv of its own) all use Triton
    return backend == "triton" and triton_interpreting()


def block_uses_normconv(block: nn.Module, x: Tensor) -> bool:
    """Whether ``block`` (BasicBlock / Bottleneck) runs the normconv path for input ``x``."""
    if _mode == "off" or (_mode == "auto" and not NORMCONV_TABLE):
        return False
    if not isinstance(x, Tensor) or x.dim() != 4:
        return False
    convs, bns = _convs_and_bns(block)
    if not all(_plain_conv(c) for c in convs) or not all(_plain_bn(b) for b in bns):
        return False
    if not all(isinstance(b, nn.BatchNorm2d) and b.num_features == c.out_channels
               for b, c in zip(bns, convs)):
        return False
    autocast = _autocast_dtype(x)
    dtype = autocast or x.dtype
    allowed = (dtype, torch.float32) if autocast is not None else (dtype,)
    if dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.dtype not in allowed:
        return False
    if any(c.weight.dtype not in allowed or c.weight.device != x.device for c in convs):
        return False
    if any(b.training != block.training for b in bns):
        return False
    if any(getattr(b, "activation", "relu") not in ("relu", None) for b in bns):
        return False
    if not block.training:
        if any(b.running_mean is None for b in bns):
            return False
        # Eval folds BN into the conv weights; gradients to BN's weight and bias through the
        # rounded folded weight would be less accurate than eager's, so trainable BN parameters
        # (with grad enabled) keep the fallback. Inference and frozen BN take the fused path.
        if torch.is_grad_enabled() and any(p.requires_grad for b in bns for p in b.parameters()):
            return False
    if not _triton_backend_selected(x):
        return False
    return all(conv_choice(c, x.dtype) == NORMCONV for c in convs)


# --------------------------------------------------------------------------------------------------
# The paths.


def _bn_train_fold(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, y: Tensor):
    count = y.numel() // y.shape[1]
    track = bn.track_running_stats
    return F.bn_fold_train(mean, var, count, bn.running_mean if track else None,
                           bn.running_var if track else None, bn.weight, bn.bias,
                           exponential_average_factor(bn),
                           bn.eps)


def _conv_args(conv: nn.Conv2d):
    return conv.stride, conv.padding, conv.dilation


def _tail_with_stats(bn: nn.BatchNorm2d, y: Tensor, mean: Tensor, var: Tensor,
                     identity: Tensor) -> Tensor:
    """Training: relu(BN(y) + identity) with y's batch statistics from its conv's epilogue — one
    apply pass, no statistics pass. The backward is BN's own (the statistics' gradient is part of
    dy for the conv, one rounding as in eager), so the conv's backward needs no dy_stats."""
    count = y.numel() // y.shape[1]
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{tuple(y.shape)}")
    momentum = exponential_average_factor(bn)
    if bn.track_running_stats and bn.running_mean is not None:
        F.update_running_stats(bn.running_mean, bn.running_var, mean.detach(), var.detach(), count,
                               momentum)
    # mask_from_output (a downsample block, see free_downsample_residual): keep the output, not
    # the downsample's output, for backward's ReLU mask.
    return bn_act_with_stats(y, mean, var, bn.weight, bn.bias, identity.to(y.dtype), bn.eps, True,
                             bool(getattr(bn, "mask_from_output", False)))[0]


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d):
    """Eval: (conv weight · scale, shift) with BN(conv(x)) = conv(x; weight·scale) + shift."""
    scale, shift = F.bn_fold(bn.running_mean.float(), bn.running_var.float(), bn.weight, bn.bias,
                             bn.eps)
    weight = conv.weight * scale.to(conv.weight.dtype).view(-1, 1, 1, 1)
    return weight, shift


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run x's convs in, or None outside autocast."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def _chain(block: nn.Module, x: Tensor) -> Tensor:
    convs, bns = _convs_and_bns(block)
    identity = x if block.downsample is None else block.downsample(x)  # under autocast, as eager
    dtype = _autocast_dtype(x)
    if dtype is None:
        return _chain_in_dtype(block, convs, bns, x, identity, x.dtype)
    # Autocast runs each conv in its dtype (fp32 weights cast per call, differentiably) and BN in
    # its input's dtype: do the same explicitly, with autocast off inside the fused ops.
    with torch.autocast(x.device.type, enabled=False):
        return _chain_in_dtype(block, convs, bns, x.to(dtype), identity, dtype)


def _chain_in_dtype(block, convs, bns, x: Tensor, identity: Tensor, dtype: torch.dtype) -> Tensor:
    if not block.training:
        out = x
        for i, (conv, bn) in enumerate(zip(convs, bns)):
            weight, bias = _folded(conv, bn)
            last = i == len(convs) - 1
            out = F.conv_bias_act(out, weight.to(dtype), bias, *_conv_args(conv), groups=1,
                                  residual=identity.to(dtype) if last else None,
                                  activation="relu")
        return out
    y = x
    scale = shift = None
    for conv, bn in zip(convs[:-1], bns[:-1]):
        y, mean, var = F.norm_conv(y, conv.weight.to(dtype), *_conv_args(conv), scale=scale,
                                   shift=shift, collect_stats=True)
        scale, shift = _bn_train_fold(bn, mean, var, y)
    y, mean, var = F.norm_conv(y, convs[-1].weight.to(dtype), *_conv_args(convs[-1]), scale=scale,
                               shift=shift, collect_stats=True)
    return _tail_with_stats(bns[-1], y, mean, var, identity)


def bottleneck_forward(block: nn.Module, x: Tensor) -> Tensor:
    """Bottleneck.forward through the normconv path (check ``block_uses_normconv`` first)."""
    return _chain(block, x)


def basic_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    """BasicBlock.forward through the normconv path (check ``block_uses_normconv`` first)."""
    return _chain(block, x)


def maybe_normconv(block: nn.Module, x: Tensor) -> Optional[Tensor]:
    """The block's output through the normconv path when it is selected, else None."""
    return _chain(block, x) if block_uses_normconv(block, x) else None
