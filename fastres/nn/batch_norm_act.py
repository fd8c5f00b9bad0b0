"""BatchNormAct2d, ConvBNAct2d and ResidualAct: modules over
``fastres.functional.batch_norm_act``."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastres import functional as F

__all__ = ["BatchNormAct2d", "ConvBNAct2d", "ResidualAct", "normalize_activation",
           "exponential_average_factor"]


def normalize_activation(activation) -> Optional[str]:
    """"relu" or None; raises ValueError naming anything else."""
    if isinstance(activation, str):
        activation = activation.strip().lower()
        if activation in ("none", "identity", ""):
            activation = None
    if activation not in F.ACTIVATIONS:
        raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
    return activation


def check_process_group(process_group):
    """None, "world" or a torch.distributed ProcessGroup; raises TypeError naming anything else."""
    if process_group is None or (isinstance(process_group, str) and process_group == "world"):
        return process_group
    if torch.distributed.is_available() and isinstance(process_group,
                                                       torch.distributed.ProcessGroup):
        return process_group
    raise TypeError(f"process_group must be None, 'world' or a torch.distributed ProcessGroup, "
                    f"got {process_group!r}")


def exponential_average_factor(bn: nn.BatchNorm2d):
    """The running-statistics momentum for this call, exactly as ``_BatchNorm.forward``: counts the
    batch in ``num_batches_tracked`` and gives 1/num_batches_tracked for momentum=None — as a device
    tensor, so the count is never read on the host (the step stays CUDA-graph capturable)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / bn.num_batches_tracked.double()
    return factor


class BatchNormAct2d(nn.BatchNorm2d):
    """``act(BatchNorm2d(x) + residual)`` in fused kernels.

    A drop-in ``nn.BatchNorm2d``: same parameters, buffers, state_dict keys,
    ``num_batches_tracked``, ``momentum=None`` (cumulative average), ``affine``,
    ``track_running_stats`` and train/eval behaviour. In eval mode the running statistics are
    folded into a per-channel scale and shift.

    ``forward(x, residual=None)``: ``residual`` (same shape as ``x``) is added after the
    normalisation and before the activation, as in a ResNet block's output.

    ``process_group``: None (default) normalises each process's batch alone. A
    ``torch.distributed`` process group, or ``"world"`` for the default group, makes training-mode
    statistics those of the batch over all its ranks, as ``nn.SyncBatchNorm`` (see
    ``fastres.functional.sync_batch_norm_act``: two small collectives per layer, no host sync); it
    falls back to local statistics while torch.distributed is not initialised ("world") or the group
    has one rank.

    ``mask_from_output`` (attribute, default False): with a residual and the ReLU, backward takes
    the ReLU mask from the saved output instead of keeping the residual (same results). fastres's
    blocks and ``fastres.convert`` set it on a block's last BN when the residual is a downsample's
    output, which nothing else keeps for backward, while the block output is kept by the next conv.
    """

    mask_from_output: bool = False

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True,
                 activation: Optional[str] = "relu", device=None, dtype=None, *,
                 bias: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype, bias=bias)
        self.activation = normalize_activation(activation)
        self.process_group = check_process_group(process_group)

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, activation: Optional[str] = "relu"):
        """A BatchNormAct2d that shares ``bn``'s parameter and buffer tensors (no copies)."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  activation=activation, device="meta",
                  bias=not bn.affine or bn.bias is not None)
        new._parameters = dict(bn._parameters)
        new._buffers = dict(bn._buffers)
        new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
        new.train(bn.training)
        return new

    def extra_repr(self) -> str:
        sync = "" if self.process_group is None else (
            ", process_group='world'" if isinstance(self.process_group, str)
            else ", process_group=<group>")
        return super().extra_repr() + f", activation={self.activation!r}" + sync

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__} expects a Tensor, got {type(input).__name__}")
        if input.dim() != 4:
            raise ValueError(f"{type(self).__name__} expects 4-D input (N, C, H, W), got "
                             f"{input.dim()}-D input of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"{type(self).__name__}({self.num_features}) got input with "
                             f"{input.shape[1]} channels (shape {tuple(input.shape)})")

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        if residual is not None and isinstance(residual, Tensor) and residual.dtype != input.dtype \
                and residual.is_floating_point() and input.is_floating_point():
            # Eager ``out += identity`` keeps out's dtype (mixed under autocast): do the same.
            residual = residual.to(input.dtype)
        # As _BatchNorm.forward: count the batch, and momentum=None's factor is
        # 1/num_batches_tracked — which the kernels read on the device (no host sync).
        momentum, count = (0.0 if self.momentum is None else self.momentum), None
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                momentum, count = None, self.num_batches_tracked
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        # Running stats are updated in training only when tracked, and used whenever not training.
        use_running = not self.training or self.track_running_stats
        return self._batch_norm_act(
            input, residual,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            bn_training, momentum, count)

    def _batch_norm_act(self, input, residual, running_mean, running_var, training, momentum,
                        num_batches_tracked=None):
        if training and self.training and self.process_group is not None:
            group = None if isinstance(self.process_group, str) else self.process_group
            if momentum is None:  # SyncBN updates the running stats with torch ops
                momentum = 1.0 / num_batches_tracked.double()
            return F.sync_batch_norm_act(input, running_mean, running_var, self.weight, self.bias,
                                         momentum, self.eps, residual=residual,
                                         activation=self.activation, process_group=group)
        return F.batch_norm_act(input, running_mean, running_var, self.weight, self.bias,
                                training, momentum, self.eps, residual=residual,
                                activation=self.activation,
                                num_batches_tracked=num_batches_tracked,
                                mask_from_output=self.mask_from_output)


class ResidualAct(nn.Module):
    """``act(x + residual)``: what is left of a BatchNormAct2d once its BN is folded into a conv."""

    def __init__(self, activation: Optional[str] = "relu") -> None:
        super().__init__()
        self.activation = normalize_activation(activation)

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if residual is not None:
            input = input + residual.to(input.dtype)
        return torch.relu(input) if self.activation == "relu" else input


class ConvBNAct2d(nn.Sequential):
    """conv (no bias) → BN → act, with ``torchvision.ops.Conv2dNormActivation``'s state_dict keys
    (``0.weight``, ``1.weight``, ``1.bias``, ``1.running_mean``, ...), so either loads the other's
    weights. ``padding=None`` picks torchvision's ``(kernel_size - 1) // 2 * dilation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, activation: Optional[str] = "relu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1, device=None,
                 dtype=None) -> None:
        if padding is None:
            ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
            dl = (dilation, dilation) if isinstance(dilation, int) else dilation
            padding = tuple((k - 1) // 2 * d for k, d in zip(ks, dl))
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                      dilation=dilation, groups=groups, bias=False, device=device, dtype=dtype),
            BatchNormAct2d(out_channels, eps=eps, momentum=momentum, activation=activation,
                           device=device, dtype=dtype),
        )
        self.out_channels = out_channels
