"""Functional interface: argument checking, then the custom ops in ``fastres.ops``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.overrides import has_torch_function_variadic

from fastres.backend import runs_eager_ops
from fastres.ops.batch_norm_act import BatchNormActFunction, channel_count
from fastres.ops.norm_conv import conv_bias_act as conv_bias_act_op, norm_conv_fwd

__all__ = ["batch_norm_act", "sync_batch_norm_act", "ACTIVATIONS", "check_batch_norm_act_args",
           "update_running_stats", "norm_conv", "bn_fold", "bn_fold_train", "conv_bias_act"]

ACTIVATIONS = ("relu", None)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_activation(activation) -> bool:
    if activation == "relu":  # the common spellings first: this runs on every call
        return True
    if activation is None:
        return False
    if isinstance(activation, str):
        activation = activation.lower()
        if activation in ("none", "identity"):
            activation = None
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
    return activation == "relu"


def check_batch_norm_act_args(input, running_mean, running_var, weight, bias, training, residual,
                              world_size=1):
    """Raise a clear exception for anything the fused op cannot treat exactly as eager would.
    world_size: ranks whose batches are normalised together (SyncBN; one value per rank is fine).
    Runs on every call, also on CPU where the op is eager's own: the input's attributes are read
    once (each read is a C++ call that costs about as much as the comparison)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(input).__name__}")
    shape = input.shape
    if len(shape) != 4:
        raise ValueError(f"batch_norm_act expects 4-D input (N, C, H, W), got {len(shape)}-D input "
                         f"of shape {tuple(shape)}")
    dtype, device = input.dtype, input.device
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"batch_norm_act supports float32, float16 and bfloat16 input (float64 with "
                        f"the torch backend), got {dtype}")
    C = shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
        if t.dim() != 1 or t.numel() != C:
            raise ValueError(f"{name} must have shape ({C},) to match the input's {C} channels, "
                             f"got shape {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but input is on {device}")
        t_dtype = t.dtype
        if t_dtype is not torch.float32 and t_dtype is not dtype:
            raise TypeError(f"{name} must be float32 or the input's dtype ({dtype}), "
                            f"got {t_dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var must be given in evaluation mode "
                         "(training=False)")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a Tensor or None, got {type(residual).__name__}")
        if residual.shape != shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match input shape "
                             f"{tuple(shape)}")
        if residual.dtype is not dtype:
            raise TypeError(f"residual dtype {residual.dtype} does not match input dtype "
                            f"{dtype}")
        if residual.device != device:
            raise ValueError(f"residual is on {residual.device} but input is on {device}")
    if training and world_size < 2 and shape[0] * shape[2] * shape[3] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input "
                         f"size {shape}")


def _check_eps(eps, training: bool) -> float:
    """F.batch_norm's rule: eps > 0 when the batch statistics are used (a constant channel would
    divide by zero), eps >= 0 otherwise (the running variance is trusted). Same ValueError."""
    eps = float(eps)
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    return eps


def _check_momentum(momentum):
    """A float as for F.batch_norm, or a 0-d tensor on the input's device (what BatchNormAct2d
    passes for momentum=None: 1/num_batches_tracked without reading the count on the host)."""
    if type(momentum) is float:  # the common case first: this runs on every call
        return momentum
    if isinstance(momentum, Tensor) and momentum.dim() == 0 and momentum.is_floating_point():
        return momentum
    if not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError(f"momentum must be a float (as for F.batch_norm) or a 0-d float tensor, got "
                        f"{momentum!r}; BatchNormAct2d handles momentum=None (cumulative average)")
    return float(momentum)


def update_running_stats(running_mean, running_var, mean, var, count, momentum):
    """In-place exponential update exactly as F.batch_norm does (unbiased variance)."""
    # One rounding into the buffers, computed in the precision eager uses on that device.
    acc = torch.float64 if running_mean.device.type == "cpu" else torch.float32
    with torch.no_grad():
        unbiased = var.to(acc) * (count / (count - 1))
        running_mean.copy_(running_mean.to(acc) * (1.0 - momentum) + mean.to(acc) * momentum)
        running_var.copy_(running_var.to(acc) * (1.0 - momentum) + unbiased * momentum)


def _cpu_batch_norm_act(input, running_mean, running_var, weight, bias, training, momentum, eps,
                        residual, relu: bool, num_batches_tracked) -> Tensor:
    """batch_norm_act for "auto" on CPU tensors: eager's own ops, as torchvision's blocks run them
    — ``F.batch_norm`` [``out += residual``] [``relu_``], bit-identical to eager and the same ATen
    ops — checked as the other backends are, but at less cost: at small sizes eager's whole op
    takes a few tens of microseconds, and every attribute read in Python is ~0.1 µs of it.

    ATen checks the per-channel vectors itself (count, device, dtype) and raises before it touches
    the running statistics; only what eager's ops would accept and fastres rejects is checked
    here first (input rank and dtype, a lone running_mean or running_var, 2-D weight or bias,
    the residual, one value per channel), then F.batch_norm's own checks (eps), after which
    ``torch.batch_norm`` is called directly, as F.batch_norm does (tensor subclasses still go
    through F.batch_norm's __torch_function__). When anything raises, ``check_batch_norm_act_args``
    runs to raise fastres's own exception naming the problem; should it find none, the original
    exception propagates. While compiling (tracing costs nothing per call) the full check runs
    first and F.batch_norm itself is traced (the cudnn flag's getter is not traceable)."""
    if torch.compiler.is_compiling():
        check_batch_norm_act_args(input, running_mean, running_var, weight, bias, training,
                                  residual)
        eps = _check_eps(eps, training)
        if momentum is None and num_batches_tracked is not None:
            momentum = 1.0 / float(num_batches_tracked)
        y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                           training, float(_check_momentum(momentum)), eps)
        if residual is not None:
            y += residual
        return torch.relu_(y) if relu else y
    try:
        shape = input.shape
        if (len(shape) != 4 or not input.is_floating_point()
                or (running_mean is None) != (running_var is None)
                or (weight is not None and weight.dim() != 1)
                or (bias is not None and bias.dim() != 1)
                or (training and shape[0] * shape[2] * shape[3] == 1)
                or (residual is not None and (residual.shape != shape
                                              or residual.dtype != input.dtype
                                              or not residual.is_cpu))):
            raise ValueError("batch_norm_act: invalid arguments")  # named by the full check
        if type(eps) is not float or eps <= 0.0:
            eps = _check_eps(eps, training)  # F.batch_norm's rule (eps = 0 is fine in eval)
        if momentum is None and num_batches_tracked is not None:
            momentum = 1.0 / float(num_batches_tracked)  # the count is on the CPU: eager reads it
        elif type(momentum) is not float:
            momentum = float(_check_momentum(momentum))
        if has_torch_function_variadic(input, running_mean, running_var, weight, bias):
            y = torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                               training, momentum, eps)
        else:  # (the cudnn flag as F.batch_norm passes it, read without torch.backends' property)
            y = torch.batch_norm(input, weight, bias, running_mean, running_var, training,
                                 momentum, eps, torch._C._get_cudnn_enabled())
        # In place on batch_norm's fresh output, as torchvision's blocks do: BN's backward does
        # not read its output, and no new tensor is allocated (fresh large allocations cost page
        # faults on every CPU call).
        if residual is not None:
            y += residual
        return torch.relu_(y) if relu else y
    except Exception:
        check_batch_norm_act_args(input, running_mean, running_var, weight, bias, training,
                                  residual)
        raise


def batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = "relu",
    *,
    num_batches_tracked: Optional[Tensor] = None,
    mask_from_output: bool = False,
) -> Tensor:
    """``act(F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    + residual)`` in fused kernels, with the same in-place running-statistics update.

    mask_from_output (with residual and ReLU): keep the output, not the residual, for backward's
    ReLU mask — less memory where the residual is kept by nothing else (a downsample's output) and
    the output is kept anyway (the next conv's input). Same results.

    input: 4-D (N, C, H, W), channels_last or NCHW (any strides are accepted; non-dense input is
    copied once). fp32 / fp16 / bf16. weight, bias, running stats: fp32 or the input's dtype.
    activation: "relu" or None. Gradients flow to input, weight, bias and residual.
    momentum=None with ``num_batches_tracked`` (the module's 0-d count, already incremented):
    the cumulative average, factor 1/num_batches_tracked read on the device (no host sync).
    On CPU tensors the "auto" backend runs eager's own ops (bit-identical to eager).
    """
    relu = _check_activation(activation)
    if runs_eager_ops(input):
        return _cpu_batch_norm_act(input, running_mean, running_var, weight, bias, training,
                                   momentum, eps, residual, relu, num_batches_tracked)
    check_batch_norm_act_args(input, running_mean, running_var, weight, bias, training, residual)
    eps = _check_eps(eps, training)
    cumulative = momentum is None and num_batches_tracked is not None
    if not cumulative:
        momentum = _check_momentum(momentum)
    if isinstance(momentum, Tensor):  # a device factor f: the kernels read 1/n, so pass n = 1/f
        num_batches_tracked, momentum = torch.reciprocal(momentum), None
    # The op updates the running statistics in place (an empty batch leaves them, as eager).
    y, _, _ = BatchNormActFunction.apply(input, weight, bias, residual, running_mean, running_var,
                                         num_batches_tracked, momentum, bool(training), float(eps),
                                         relu, bool(mask_from_output))
    return y


def sync_batch_norm_act(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: Optional[Tensor] = None,
    activation: Optional[str] = "relu",
    process_group=None,
) -> Tensor:
    """Training-mode :func:`batch_norm_act` whose statistics are those of the batch concatenated over
    every rank of ``process_group`` (default: the world group), as ``nn.SyncBatchNorm``: one
    all_gather of the per-rank (count, mean, M2) in the forward, one all_reduce of (Σdy', Σdy'·x̂)
    in the backward, no host synchronisation; per-rank batch sizes may differ (and be empty). The
    running statistics get the same update on every rank (unbiased with the global count). One
    value per channel over the whole group raises ValueError on every rank; checking it reads the
    global count on the host, but only on a rank holding 0 or 1 values per channel (outside CUDA
    graph capture and compilation).

    Every rank of the group must call it, in the same order. Falls back to the local
    :func:`batch_norm_act` when torch.distributed is not initialised (and no group is given) or the
    group has a single rank. For evaluation use :func:`batch_norm_act` with ``training=False``.
    """
    from fastres.ops import sync_batch_norm_act as sync_ops

    relu = _check_activation(activation)
    momentum = _check_momentum(momentum)
    distributed = torch.distributed.is_available() and (
        process_group is not None or torch.distributed.is_initialized())
    world_size = torch.distributed.get_world_size(process_group) if distributed else 1
    if world_size < 2:
        return batch_norm_act(input, running_mean, running_var, weight, bias, True, momentum, eps,
                              residual, activation)
    check_batch_norm_act_args(input, running_mean, running_var, weight, bias, True, residual,
                              world_size=world_size)
    eps = _check_eps(eps, True)
    y, mean, var, count = sync_ops.sync_batch_norm_act(input, weight, bias, residual, eps,
                                                      relu, process_group)
    _check_global_count(input, count, world_size)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return y


def _check_global_count(input: Tensor, count: Tensor, world_size: int) -> None:
    """Raise, before the running statistics are touched, when the whole group holds one value per
    channel (the unbiased running variance would be 0/0).

    nn.SyncBatchNorm checks only the local size, and only for a single rank; with more ranks it
    writes NaN into running_var. The global count is a device tensor, so reading it is a host
    sync: it is read only on a rank whose own count is 0 or 1 — a rank holding 2 or more values
    knows the global count is >= 2 from its shape alone, so the ordinary path never syncs. When the
    global count is 1 every rank holds 0 or 1 values, so every rank reads it and raises alike.
    Skipped, like eager's own count read, while capturing a CUDA graph or tracing for compile."""
    if channel_count(input) > 1:
        return
    capturing = input.is_cuda and torch.cuda.is_current_stream_capturing()
    if capturing or torch.compiler.is_compiling():
        return
    if int(count.item()) == 1:
        raise ValueError("Expected more than 1 value per channel when training, got input size "
                         f"{tuple(input.shape)} and 1 value per channel over all {world_size} "
                         "ranks of the process group")


# --------------------------------------------------------------------------------------------------
# Normalized convolution.


def _pair(v, name) -> list[int]:
    if isinstance(v, int):
        return [v, v]
    v = [int(i) for i in v]
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return v


def bn_fold(mean: Tensor, var: Tensor, weight: Optional[Tensor] = None,
            bias: Optional[Tensor] = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Per-channel fp32 (scale, shift) with BN(x) = x·scale + shift, as differentiable torch math
    (gradients flow to mean, var, weight and bias)."""
    eps = _check_eps(eps, False)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return scale, shift


def bn_fold_train(mean: Tensor, var: Tensor, count: int, running_mean: Optional[Tensor],
                  running_var: Optional[Tensor], weight: Optional[Tensor] = None,
                  bias: Optional[Tensor] = None, momentum: Optional[float] = 0.1,
                  eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Training-mode BN from batch statistics (mean, biased var over ``count`` elements, e.g. from
    ``norm_conv(..., collect_stats=True)``): updates the running statistics in place exactly as
    F.batch_norm does (unbiased variance; momentum None keeps them) and returns ``bn_fold(...)``."""
    if count == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count}")
    _check_eps(eps, True)
    if running_mean is not None and count > 1:
        update_running_stats(running_mean, running_var, mean.detach(), var.detach(), count,
                             0.0 if momentum is None else _check_momentum(momentum))
    return bn_fold(mean, var, weight, bias, eps)


def check_conv_args(input, weight, stride, padding, dilation, groups):
    """Validate a groups/stride/padding/dilation conv2d call; returns them normalised."""
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError("conv: input and weight must be Tensors")
    if input.dim() != 4 or weight.dim() != 4:
        raise ValueError(f"conv expects 4-D input (N, C, H, W) and 4-D weight (K, C/groups, "
                         f"R, S), got shapes {tuple(input.shape)} and {tuple(weight.shape)}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"conv supports float32, float16 and bfloat16 input (float64 with "
                        f"the torch backend), got {input.dtype}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match input dtype {input.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight is on {weight.device} but input is on {input.device}")
    groups = int(groups)
    C = input.shape[1]
    if groups < 1 or C % groups or weight.shape[0] % groups or weight.shape[1] * groups != C:
        raise ValueError(f"conv: input has {C} channels but weight {tuple(weight.shape)} with "
                         f"groups={groups} expects {weight.shape[1] * groups}")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), \
        _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"conv: stride and dilation must be >= 1 and padding >= 0, got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    for k, (size, pad, dil) in enumerate(zip(input.shape[2:], padding, dilation)):
        if size + 2 * pad < dil * (weight.shape[2 + k] - 1) + 1:
            raise ValueError(f"conv: input spatial size {tuple(input.shape[2:])} (padded by "
                             f"{padding}) is smaller than the dilated kernel")
    return stride, padding, dilation, groups


def norm_conv(
    input: Tensor,
    weight: Tensor,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    scale: Optional[Tensor] = None,
    shift: Optional[Tensor] = None,
    collect_stats: bool = False,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``out = F.conv2d(relu(input·scale + shift) if scale is given else input, weight, None,
    stride, padding, dilation, groups)`` with the BN-apply + ReLU fused into the conv's operand
    load (zero padding applies to the activated tensor) and, when ``collect_stats``, the batch
    statistics of ``out`` from the conv's epilogue.

    Returns ``(out, mean, var)``: ``out`` channels_last in input's dtype; ``mean`` and the biased
    ``var`` fp32 per output channel (None unless collect_stats). All are differentiable: gradients
    flow to input, weight, scale and shift, also through mean and var (so
    ``norm_conv(y_a, w, scale=s, shift=t)`` with ``(s, t) = bn_fold(mean_a, var_a, ...)`` gives
    exactly the gradients of conv(relu(F.batch_norm(y_a, training=True))) ).
    scale and shift are per input channel (fp32 or input's dtype), both or neither.
    """
    stride, padding, dilation, groups = check_conv_args(input, weight, stride, padding, dilation,
                                                        groups)
    C = input.shape[1]
    if (scale is None) != (shift is None):
        raise ValueError("norm_conv: scale and shift must both be given or both be None")
    for name, t in (("scale", scale), ("shift", shift)):
        if t is None:
            continue
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != C:
            raise ValueError(f"norm_conv: {name} must be a 1-D tensor of {C} per-channel values, "
                             f"got {t.shape if isinstance(t, Tensor) else type(t).__name__}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    out, mean, var = norm_conv_fwd(input, weight, scale, shift, stride, padding, dilation, groups,
                                   bool(collect_stats))
    if not collect_stats:
        return out, None, None
    return out, mean, var


def conv_bias_act(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                  padding=0, dilation=1, groups: int = 1, residual: Optional[Tensor] = None,
                  activation: Optional[str] = "relu") -> Tensor:
    """``act(F.conv2d(input, weight, bias, stride, padding, dilation, groups) + residual)`` with the
    bias, the add and the activation in the conv's epilogue — eval mode's conv with a folded BN.
    Output channels_last; differentiable wrt input, weight, bias and residual."""
    relu = _check_activation(activation)
    stride, padding, dilation, groups = check_conv_args(input, weight, stride, padding, dilation,
                                                        groups)
    K = weight.shape[0]
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (K,)):
        raise ValueError(f"conv_bias_act: bias must have shape ({K},), got "
                         f"{bias.shape if isinstance(bias, Tensor) else type(bias).__name__}")
    if residual is not None:
        from fastres.ops.norm_conv import conv_output_shape

        expected = tuple(conv_output_shape(input.shape, weight.shape, stride, padding, dilation))
        if not isinstance(residual, Tensor) or tuple(residual.shape) != expected:
            raise ValueError(f"conv_bias_act: residual must have the output's shape {expected}, "
                             f"got {getattr(residual, 'shape', type(residual).__name__)}")
        if residual.dtype != input.dtype:
            raise TypeError(f"residual dtype {residual.dtype} does not match input dtype "
                            f"{input.dtype}")
    return conv_bias_act_op(input, weight, bias, residual, stride, padding, dilation, groups, relu)
