"""``MaxPool2d`` that keeps no indices for backward.

Eager ``nn.MaxPool2d`` saves its input and the int64 argmax of every output element: in a ResNet
stem (64 channels, 112² → 56²) the indices are 8 bytes per output element — as many bytes as the
bf16 input they index. This module saves only the input and recomputes the argmax in backward with
the same ATen kernel the forward used (deterministic: the same indices, so the same gradient as
eager, bit for bit), then runs ATen's own max-pool backward. The cost is one more max-pool forward
in backward; the state_dict is nn.MaxPool2d's (none).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MaxPool2d", "max_pool2d_recompute"]


class _MaxPool2dRecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        out, _ = torch.ops.aten.max_pool2d_with_indices(x, *ctx.args)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        _, indices = torch.ops.aten.max_pool2d_with_indices(x, *ctx.args)
        dx = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.args, indices)
        return dx, None, None, None, None, None


def _pair(v):
    return [v, v] if isinstance(v, int) else [int(i) for i in v]


def max_pool2d_recompute(x: Tensor, kernel_size, stride=None, padding=0, dilation=1,
                         ceil_mode: bool = False) -> Tensor:
    """``F.max_pool2d`` whose backward recomputes the argmax instead of saving it."""
    stride = kernel_size if (stride is None or (not isinstance(stride, int) and len(stride) == 0)) \
        else stride
    args = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), bool(ceil_mode))
    if not (torch.is_grad_enabled() and x.requires_grad):
        return torch.nn.functional.max_pool2d(x, *args)
    return _MaxPool2dRecompute.apply(x, *args)


class MaxPool2d(nn.MaxPool2d):
    """nn.MaxPool2d (same arguments) saving no indices for backward (see the module docstring).
    ``return_indices=True`` is not supported (the indices are what it avoids keeping)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.return_indices:
            raise ValueError("fastres.nn.MaxPool2d does not return indices; use nn.MaxPool2d")

    @classmethod
    def from_max_pool(cls, pool: nn.MaxPool2d) -> "MaxPool2d":
        return cls(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                   return_indices=False, ceil_mode=pool.ceil_mode)

    def forward(self, input: Tensor) -> Tensor:
        return max_pool2d_recompute(input, self.kernel_size, self.stride, self.padding,
                                    self.dilation, self.ceil_mode)
