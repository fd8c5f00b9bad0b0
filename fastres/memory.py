"""How many bytes a model's training forward keeps for backward, counted without a GPU.

``saved_activation_bytes(model, (256, 3, 224, 224), torch.bfloat16)`` runs one training forward of a
copy of ``model`` on fake tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices,
no memory, no kernels) on a fake ``"cuda"`` device, and records every tensor autograd saves for
backward (``torch.autograd.graph.saved_tensors_hooks``). Distinct storages are counted once, whatever
the number of views or of ops that save them; parameters and buffers are not counted.

Why this measures what a GPU would keep:

* The tensors are fake CUDA tensors, so dispatch takes the CUDA branches: eager ``nn.BatchNorm2d``
  runs ``aten._batch_norm_with_update`` as on a GPU (cuDNN or native CUDA kernels there), whose
  autograd saves the BN input, the weight and running statistics (not counted: they are the module's
  own tensors), the fp32 per-channel mean and inverse std, and cuDNN's reserve space (sized 0 bytes
  by the fake kernel, as cuDNN's plain batch norm reserves none). CPU ATen saves the same tensors
  (the input and per-channel vectors), so the count does not depend on this choice for BN.
* fastres's custom ops run their registered fake implementations (``register_fake``), and their
  autograd ``setup_context`` saves exactly what it saves on a GPU; the Triton / CUDA kernels never
  run. ``fastres.convert``'s choices that depend on the device (normconv needs a CUDA input) are
  taken as on a GPU.
* Autocast (bf16 / fp16) runs as on a GPU: convs take the casted input and weight and save both.

Each saved storage is attributed to the module (a "unit": a direct child of the model, looking
through ``nn.Sequential`` / ``ModuleList`` / ``ModuleDict`` containers, so ``layer1.0`` for a ResNet
block) whose forward *produced* it, not the one that saved it first, so that eager and fused models
attribute a block's output to the same block. Storages computed only from parameters (autocast's or
a conv's weight casts) are reported apart as ``parameter_copy_bytes``: they do not grow with the
batch. ``activation_bytes`` is everything else.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["SavedBytesReport", "saved_activation_bytes", "fake_model"]

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
INPUT = "<input>"


@dataclasses.dataclass
class SavedBytesReport:
    """Bytes saved for backward by one training forward (distinct storages, parameters excluded)."""

    activation_bytes: int              # everything saved except parameter copies
    parameter_copy_bytes: int          # saved storages computed from parameters only (weight casts)
    by_unit: dict                      # unit name -> activation bytes produced there, in run order
    saved_tensors: int                 # distinct storages saved (both kinds)
    input_shape: tuple
    dtype: str
    autocast: bool
    device: str

    @property
    def total_bytes(self) -> int:
        return self.activation_bytes + self.parameter_copy_bytes

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["total_bytes"] = self.total_bytes
        return d


def _storage_key(t: Tensor) -> int:
    return t.untyped_storage()._cdata


def _unit_names(model: nn.Module) -> dict:
    """id(module) -> unit name: the model's children, looking through containers."""
    names = {}

    def walk(module, prefix):
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if isinstance(child, _CONTAINERS):
                walk(child, qualified + ".")
            else:
                names.setdefault(id(child), qualified)

    walk(model, "")
    return names


def fake_model(model: nn.Module, fake_mode, device="cuda", dtype: Optional[torch.dtype] = None,
               memory_format=torch.channels_last) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are fake tensors on ``device`` (floating
    ones cast to ``dtype`` when given; 4-D ones in ``memory_format``). Shared tensors stay shared."""
    model = copy.deepcopy(model)
    memo = {}

    def fake(t: Tensor) -> Tensor:
        if id(t) not in memo:
            f = fake_mode.from_tensor(t.detach())
            with fake_mode:
                cast = dtype if (dtype is not None and f.is_floating_point()) else f.dtype
                f = f.to(device=device, dtype=cast)
                if f.dim() == 4 and memory_format is not None:
                    f = f.contiguous(memory_format=memory_format)
            if isinstance(t, nn.Parameter):
                f = nn.Parameter(f, requires_grad=t.requires_grad)
            memo[id(t)] = f
        return memo[id(t)]

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = fake(p)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = fake(b)
    return model


class _Provenance(TorchDispatchMode):
    """Records, for each storage an op creates, the unit running then and whether the op read only
    parameters (and their copies). Keeps every tensor alive (fake: costs nothing) so that storage
    keys are never reused during the count."""

    def __init__(self, unit_of, param_keys):
        super().__init__()
        self.unit_of = unit_of          # () -> current unit name
        self.param_derived = set(param_keys)
        self.producer = {}
        self.keep = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        from_params = bool(inputs) and all(_storage_key(t) in self.param_derived for t in inputs)
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                key = _storage_key(t)
                if key not in self.producer:
                    self.producer[key] = self.unit_of()
                    self.keep.append(t)
                    if from_params:
                        self.param_derived.add(key)
        return out


@contextlib.contextmanager
def _autocast(device_type: str, dtype: torch.dtype):
    """``torch.autocast(device_type, dtype)``, also where that device is absent (fake CUDA tensors
    on a machine without a GPU, where ``torch.autocast`` would warn and disable itself): the same
    state changes as ``torch.amp.autocast.__enter__`` / ``__exit__``."""
    prev_cache = torch.is_autocast_cache_enabled()
    prev = torch.is_autocast_enabled(device_type)
    prev_dtype = torch.get_autocast_dtype(device_type)
    torch.set_autocast_enabled(device_type, True)
    torch.set_autocast_dtype(device_type, dtype)
    torch.autocast_increment_nesting()
    torch.set_autocast_cache_enabled(True)
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(device_type, prev)
        torch.set_autocast_dtype(device_type, prev_dtype)
        torch.set_autocast_cache_enabled(prev_cache)


def saved_activation_bytes(model: nn.Module, input_shape: Sequence[int],
                           dtype: torch.dtype = torch.float32, *, autocast: Optional[bool] = None,
                           device: str = "cuda", memory_format=torch.channels_last,
                           train: bool = True, input_requires_grad: bool = False
                           ) -> SavedBytesReport:
    """Count the bytes ``model``'s forward saves for backward on an input of ``input_shape``.

    dtype: fp32 runs everything in fp32. bf16 / fp16 run under autocast with fp32 parameters (AMP
    training, ``autocast=None`` or True) or, with ``autocast=False``, with the model cast to dtype.
    The model is copied onto fake tensors (``model`` itself is not touched; build it on the CPU);
    fastres modules' switches (``fastres.nn.normconv.set_normconv``, the backend) apply as usual.
    input_requires_grad: the input needs a gradient (a block inside a net); images do not.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    if dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if autocast is None:
        autocast = dtype in (torch.bfloat16, torch.float16)
    if autocast and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast needs dtype bfloat16 or float16, got {dtype}")
    fake_mode = FakeTensorMode()
    fmodel = fake_model(model, fake_mode, device, None if autocast else dtype, memory_format)
    fmodel.train(train)
    param_keys = {_storage_key(t) for t in list(fmodel.parameters()) + list(fmodel.buffers())}
    units = _unit_names(fmodel)
    stack = []

    def current_unit():
        for module in stack:
            name = units.get(id(module))
            if name is not None:
                return name
        return INPUT if not stack else "<model>"

    def pre_hook(module, args):
        stack.append(module)

    def post_hook(module, args, output):
        if stack and stack[-1] is module:
            stack.pop()

    saved = {}

    def pack(t: Tensor):
        key = _storage_key(t)
        if key not in param_keys:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    provenance = _Provenance(current_unit, param_keys)
    handles = [nn.modules.module.register_module_forward_pre_hook(pre_hook),
               nn.modules.module.register_module_forward_hook(post_hook)]
    try:
        with fake_mode, provenance:
            x = torch.empty(tuple(input_shape), device=device,
                            dtype=torch.float32 if autocast else dtype)
            if x.dim() == 4 and memory_format is not None:
                x = x.contiguous(memory_format=memory_format)
            x.requires_grad_(input_requires_grad)
            amp = _autocast(torch.device(device).type, dtype) if autocast \
                else contextlib.nullcontext()
            with amp, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = fmodel(x)
            del out
    finally:
        for h in handles:
            h.remove()
    by_unit, activation, copies = {}, 0, 0
    for key, nbytes in saved.items():
        if key in provenance.param_derived:
            copies += nbytes
            continue
        activation += nbytes
        unit = provenance.producer.get(key, INPUT)
        by_unit[unit] = by_unit.get(unit, 0) + nbytes
    order = {name: i for i, name in enumerate([INPUT] + list(dict.fromkeys(units.values())))}
    by_unit = dict(sorted(by_unit.items(), key=lambda kv: order.get(kv[0], len(order))))
    return SavedBytesReport(activation, copies, by_unit, len(saved), tuple(input_shape),
                            str(dtype).replace("torch.", ""), bool(autocast), device)
