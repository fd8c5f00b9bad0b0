"""Opt-in: ResNet blocks that keep no BN-act outputs for backward (``fastres.convert(model,
recompute_block_outputs=True)``).

A converted block's BN-act outputs — the block output ``relu(BN3(y3) + identity)``, the downsample's
``BN(yd)``, and on the default path the inner ``relu(BN1(y1))`` / ``relu(BN2(y2))`` that the next
conv reads — are saved by autograd only because a later op (the next conv, the next block's tail)
needs them. Their inputs (raw conv outputs, per-channel statistics, parameters, the previous block's
output) are kept anyway. So while a block runs, a ``saved_tensors_hooks`` pair replaces each such
tensor, when an op saves it, by a *recipe*: the same op, its inputs (tensors packed through the
hooks that were active outside, so ``fastres.memory``'s counter and user hooks see them) and, for a
residual that is itself a block output, the previous block's recipe. The tensor is freed after the
forward; in backward, the first op that needs one rebuilds the chain over its stage — one forward
sweep of elementwise passes from the stage input, no conv — and each rebuilt tensor is kept until
every op that saved it has taken it back (then freed: a stage's outputs at most are alive at once).

Exact: a recipe re-runs the very op that produced the tensor on the very same inputs, and fastres's
kernels are deterministic (fixed-order reductions, no atomics), so the rebuilt tensor equals the
original bit for bit and gradients equal the non-recompute conversion's bit for bit:

* normconv tail: ``bn_act_with_stats(y3, mean, var, weight, bias, identity)`` with the conv
  epilogue's statistics (kept for backward anyway): one apply pass.
* default path (a ``BatchNormAct2d`` in training): ``F.batch_norm_act`` in training mode without
  running statistics — the batch statistics are recomputed (they are not exposed by the module), so
  this costs a statistics pass and an apply pass.

The stage input (the stem's max-pool output) and anything saved outside the converted blocks stay
as they are. Recorded tensors modified in place before an op saves them are saved as tensors;
modified after (while autograd holds them) backward raises as autograd does. Not supported (plain
saving instead): SyncBN, BN in eval mode, ``create_graph=True`` backward (raises).
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Optional

import torch
from torch import Tensor, nn

from fastres import functional as F
from fastres.nn.batch_norm_act import BatchNormAct2d
from fastres.ops.norm_conv import bn_act_with_stats

__all__ = ["block_forward", "record", "record_batch_norm_act", "downsample", "recording"]

_state = threading.local()


def recording() -> bool:
    """Whether a recompute block is running its forward on this thread (recipes are recorded)."""
    return getattr(_state, "depth", 0) > 0


def _registry() -> dict:
    reg = getattr(_state, "registry", None)
    if reg is None:
        reg = _state.registry = {}
    return reg


def _key(t: Tensor):
    try:
        return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(),
                t.dtype)
    except (RuntimeError, NotImplementedError):  # no storage (sparse, nested, functional)
        return None


class _Leaf:
    """A recipe input, packed by the outer hooks (or held detached when there are none)."""

    __slots__ = ("packed", "unpack_hook", "version")

    def __init__(self, t: Tensor, version: int, outer):
        if outer is None:
            self.packed, self.unpack_hook, self.version = t.detach(), None, version
        else:
            self.packed, self.unpack_hook, self.version = outer[0](t), outer[1], None

    def unpack(self) -> Tensor:
        if self.unpack_hook is not None:
            return self.unpack_hook(self.packed)
        if self.packed._version != self.version:
            raise RuntimeError("fastres recompute_block_outputs: a tensor needed to recompute a "
                               "block output for backward has been modified by an inplace "
                               "operation")
        return self.packed


class _Recipe:
    """How to rebuild one saved tensor: ``fn(*args)``, args being tensors (``_Leaf`` once sealed),
    other recipes, or plain values."""

    __slots__ = ("fn", "args", "versions", "sealed", "meta", "out_ref", "out_version", "value",
                 "pending", "__weakref__")

    def __init__(self, fn, args, out: Tensor):
        self.fn = fn
        self.args = args
        self.versions = tuple(a._version if isinstance(a, Tensor) else None for a in args)
        self.sealed = False
        self.meta = (tuple(out.shape), out.stride(), out.dtype, out.device)
        self.out_ref = weakref.ref(out)
        self.out_version = out._version
        self.value: Optional[Tensor] = None
        self.pending = 0  # saved references not yet unpacked

    def seal(self, outer) -> None:
        """First save of the output: pack the inputs through the outer hooks, drop raw tensors."""
        if self.sealed:
            return
        args = []
        for a, version in zip(self.args, self.versions):
            if isinstance(a, Tensor):
                if a._version != version:
                    raise RuntimeError("fastres recompute_block_outputs: an input of a recorded "
                                       "BN-act output was modified in place before it was saved")
                a = _Leaf(a, version, outer)
            elif isinstance(a, _Recipe):
                a.seal(outer)
            args.append(a)
        self.args, self.versions, self.sealed = tuple(args), None, True

    def materialize(self) -> Tensor:
        if self.value is not None:
            return self.value
        args = [a.materialize() if isinstance(a, _Recipe)
                else a.unpack() if isinstance(a, _Leaf) else a for a in self.args]
        shape, stride, dtype, device = self.meta
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            value = self.fn(*args)
        if tuple(value.shape) != shape or value.stride() != stride or value.dtype != dtype:
            raise RuntimeError(f"fastres recompute_block_outputs: recomputed tensor has shape "
                               f"{tuple(value.shape)} / strides {value.stride()} / {value.dtype}, "
                               f"the original {shape} / {stride} / {dtype}")
        if self.pending > 0:
            self.value = value  # other saved references will ask for it
        return value


class _Saved:
    """What autograd holds instead of a recorded tensor."""

    __slots__ = ("recipe", "version")

    def __init__(self, recipe: _Recipe, version: int):
        self.recipe, self.version = recipe, version


def _lookup(t: Tensor) -> Optional[_Recipe]:
    key = _key(t)
    entry = _registry().get(key) if key is not None else None
    if entry is None:
        return None
    ref, recipe = entry
    out = ref()
    if out is None or out._version != recipe.out_version or t._version != recipe.out_version:
        return None  # modified in place since it was computed: save the tensor itself
    return recipe


def record(out: Tensor, fn, *args) -> Tensor:
    """Register ``out == fn(*args)`` (deterministic, elementwise in cost) while a recompute block
    runs; tensor args that are recorded outputs themselves are referenced by their recipes."""
    if not recording() or not isinstance(out, Tensor):
        return out
    key = _key(out)
    if key is None:
        return out
    resolved = tuple((_lookup(a) or a) if isinstance(a, Tensor) else a for a in args)
    recipe = _Recipe(fn, resolved, out)
    registry = _registry()

    def forget(ref, key=key):
        entry = registry.get(key)
        if entry is not None and entry[0] is ref:
            del registry[key]

    registry[key] = (weakref.ref(out, forget), recipe)
    return out


# --------------------------------------------------------------------------------------------------
# The ops recorded.


def _batch_norm_act_again(eps, activation, x, weight, bias, residual):
    """BatchNormAct2d's training forward without running statistics: same statistics, same apply."""
    if residual is not None and residual.dtype != x.dtype:
        residual = residual.to(x.dtype)
    return F.batch_norm_act(x, None, None, weight, bias, True, 0.0, eps, residual=residual,
                            activation=activation)


def _recordable_bn(bn) -> bool:
    return (type(bn) is BatchNormAct2d and bn.training
            and getattr(bn, "process_group", None) is None)


def record_batch_norm_act(bn: nn.Module, out: Tensor, x: Tensor,
                          residual: Optional[Tensor] = None) -> Tensor:
    """``out = bn(x, residual)`` of a BatchNormAct2d in training (batch statistics)."""
    if recording() and _recordable_bn(bn):
        record(out, functools.partial(_batch_norm_act_again, bn.eps, bn.activation), x,
               bn.weight, bn.bias, residual)
    return out


def record_bn_act_with_stats(out: Tensor, x, mean, var, weight, bias, residual, eps: float,
                             relu: bool) -> Tensor:
    """``out = bn_act_with_stats(...)`` (the normconv tail): rebuilt by the same op."""
    return record(out, _bn_act_with_stats_again, x, mean, var, weight, bias, residual, eps, relu)


def _bn_act_with_stats_again(x, mean, var, weight, bias, residual, eps, relu):
    return bn_act_with_stats(x, mean, var, weight, bias, residual, eps, relu)[0]


def _contiguous_again(fmt, t):
    return t.contiguous(memory_format=fmt)


def contiguous(t: Tensor, fmt: torch.memory_format) -> Tensor:
    """``t.contiguous(memory_format=fmt)``; while recording, a copy of a recorded tensor is
    recorded as one (rebuilt from its source's recipe)."""
    out = t.contiguous(memory_format=fmt)
    if out is not t and recording():
        record(out, functools.partial(_contiguous_again, fmt), t)
    return out


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def downsample(ds: nn.Module, x: Tensor) -> Tensor:
    """``ds(x)``; a ``Sequential(conv, BatchNormAct2d)`` downsample's output is recorded."""
    if (recording() and type(ds) is nn.Sequential and len(ds) == 2 and not _has_hooks(ds)
            and _recordable_bn(ds[1]) and ds[1].activation is None):
        y = ds[0](x)
        return record_batch_norm_act(ds[1], ds[1](y), y)
    return ds(x)


# --------------------------------------------------------------------------------------------------
# The hooks.


def _outer_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


def _make_hooks(outer):
    def pack(t: Tensor):
        recipe = _lookup(t)
        if recipe is None:
            return (outer[0](t), True) if outer is not None else (t.detach(), False)
        recipe.seal(outer)
        recipe.pending += 1
        return _Saved(recipe, t._version)

    def unpack(packed):
        if not isinstance(packed, _Saved):
            value, by_outer = packed
            return outer[1](value) if by_outer else value
        if torch.is_grad_enabled():
            raise RuntimeError("fastres recompute_block_outputs does not support double backward "
                               "(create_graph=True): convert without it")
        recipe = packed.recipe
        out = recipe.out_ref()
        if out is not None and out._version != packed.version:
            raise RuntimeError("one of the variables needed for gradient computation has been "
                               "modified by an inplace operation (a block output recomputed by "
                               "fastres recompute_block_outputs)")
        try:
            return recipe.materialize()
        finally:
            recipe.pending -= 1
            if recipe.pending <= 0:
                recipe.value = None

    return pack, unpack


@contextlib.contextmanager
def _scope():
    pack, unpack = _make_hooks(_outer_hooks())
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _state.depth -= 1


def active_for(block: nn.Module) -> bool:
    return (block.training and torch.is_grad_enabled()
            and torch._C._autograd._saved_tensors_hooks_is_enabled())


def block_forward(block: nn.Module, x: Tensor, impl) -> Tensor:
    """``impl(block, x)`` with the recompute hooks when they apply (training, grad enabled)."""
    if not active_for(block):
        return impl(block, x)
    with _scope():
        return impl(block, x)
