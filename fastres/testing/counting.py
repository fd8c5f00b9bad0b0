"""Counted, not claimed: kernel launches, ATen compute ops and the bytes each Triton kernel moves.

Used by the tests (launch and traffic targets) and by the benchmark harness (actual traffic next to the
ideal byte model). Everything here runs on CPU; nothing needs a GPU.

    with count_kernels() as counts:          # every Triton launch + every ATen op, by kind
        step()
    counts.triton_launches, counts.aten_compute, counts.launches   # ints
    counts.kernels["_apply_kernel"].loaded                         # bytes (interpreter only)
    print(counts.table())

Launches. A Triton launch is a call of the kernel's ``run`` (``JITFunction.run`` on a GPU, the
interpreter's ``InterpretedFunction.run`` under ``TRITON_INTERPRET=1``), counted per kernel name;
an autotuner's benchmarking runs are launches too (a first step really issues them). ATen ops are
seen through a ``TorchDispatchMode`` and classified:

    allocation   empty / empty_like / empty_strided / new_empty / new_empty_strided / zeros-free
                 factories that only allocate (no kernel on a GPU)
    view         ops that alias their input (view, as_strided, slice, t, ...), detach, alias
    bookkeeping  in-place update of a 0-d integer tensor — the module's ``num_batches_tracked += 1``,
                 which eager BatchNorm issues too
    compute      everything else (casts, copies, fills, arithmetic): each is a kernel launch on a GPU

Custom ops (any namespace but aten / prim) are containers: the ops their implementation runs are
counted, the custom op itself is not.

Traffic. Under the interpreter, every memory operation of a Triton kernel goes through the
interpreter builder's ``create_masked_load`` / ``create_masked_store`` (unmasked ``tl.load`` and
tensor-descriptor loads route there too) and atomics through ``create_atomic_rmw`` / ``_cas``. Each is
counted as (active lanes) × (element size): the bytes the program asks the memory system for —
a value loaded by every program (a per-channel vector) counts once per program, as on a GPU before
caches. ``unique_loaded`` / ``unique_stored`` count each distinct byte address once per launch
(the DRAM-traffic floor if caches were perfect within a launch).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KernelStats", "Counts", "count_kernels", "count_module_step", "capture_launches", "LaunchRecord",
           "classify_aten"]

_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                "empty_permuted"}
_NON_COMPUTE_VIEWS = {"detach", "detach_", "alias", "lift_fresh", "_unsafe_view", "set_",
                      "resize_"}


def classify_aten(func, args) -> str:
    """'allocation', 'view', 'bookkeeping', 'container' (a custom op) or 'compute'."""
    namespace = getattr(func, "namespace", "aten")
    if namespace not in ("aten", "prim", "prims"):
        return "container"
    name = func._schema.name.split("::")[-1]
    if name in _ALLOCATIONS:
        return "allocation"
    if name in _NON_COMPUTE_VIEWS or getattr(func, "is_view", False):
        return "view"
    schema = func._schema
    inplace = name.endswith("_") or any(a.alias_info is not None and a.alias_info.is_write
                                        for a in schema.arguments[:1])
    if (inplace and args and isinstance(args[0], torch.Tensor) and args[0].dim() == 0
            and not args[0].is_floating_point() and not args[0].is_complex()):
        return "bookkeeping"
    return "compute"


@dataclasses.dataclass
class KernelStats:
    """One Triton kernel's launches and (under the interpreter) memory traffic, summed over launches."""
    name: str
    launches: int = 0
    programs: int = 0
    loaded: int = 0          # bytes of active lanes of every load
    stored: int = 0          # bytes of active lanes of every store
    atomic: int = 0          # bytes of active lanes of atomics (read-modify-write counted once)
    unique_loaded: int = 0   # distinct byte addresses loaded, per launch, summed
    unique_stored: int = 0

    @property
    def moved(self) -> int:
        return self.loaded + self.stored + self.atomic


@dataclasses.dataclass
class LaunchRecord:
    """One launch as the launcher made it: the kernel object and every argument it passed (positional
    args bound to names, constexprs and launch options such as num_warps / num_stages)."""
    kernel: object           # the JITFunction / InterpretedFunction
    name: str
    args: dict
    options: dict
    grid: object


class Counts:
    """What one ``count_kernels`` block issued."""

    def __init__(self):
        self.kernels: dict[str, KernelStats] = {}
        self.aten: dict[str, Counter] = {k: Counter() for k in
                                         ("compute", "allocation", "view", "bookkeeping")}
        self.order: list[str] = []  # every launch in issue order: triton names and "aten.<op>"

    # -- totals ---------------------------------------------------------------------------------
    @property
    def triton_launches(self) -> int:
        return sum(k.launches for k in self.kernels.values())

    @property
    def aten_compute(self) -> int:
        return sum(self.aten["compute"].values())

    @property
    def launches(self) -> int:
        """Kernel launches a GPU would see: Triton launches plus ATen compute ops."""
        return self.triton_launches + self.aten_compute

    @property
    def loaded(self) -> int:
        return sum(k.loaded for k in self.kernels.values())

    @property
    def stored(self) -> int:
        return sum(k.stored for k in self.kernels.values())

    @property
    def moved(self) -> int:
        return sum(k.moved for k in self.kernels.values())

    def kernel(self, name: str) -> KernelStats:
        return self.kernels.setdefault(name, KernelStats(name))

    def table(self, per_element: Optional[int] = None) -> str:
        """A readable summary; with ``per_element`` (elements of the activation), bytes are also shown
        per element."""
        lines = [f"launches {self.launches} = {self.triton_launches} Triton + "
                 f"{self.aten_compute} ATen compute"]
        for k in self.kernels.values():
            line = (f"  {k.name:40s} x{k.launches:<3d} programs {k.programs:<6d} "
                    f"load {k.loaded:>10d} B  store {k.stored:>10d} B")
            if per_element:
                line += f"  ({k.loaded / per_element:.2f} + {k.stored / per_element:.2f} B/elt)"
            lines.append(line)
        for op, n in sorted(self.aten["compute"].items()):
            lines.append(f"  aten.{op:35s} x{n}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Hooks.

_active: list[str] = []


@contextlib.contextmanager
def _exclusive(what: str) -> Iterator[None]:
    """The hooks patch classes: two counters at once would count each launch twice."""
    if _active:
        raise RuntimeError(f"{what} inside {_active[-1]}: the counters do not nest")
    _active.append(what)
    try:
        yield
    finally:
        _active.pop()


def _kernel_name(fn) -> str:
    inner = getattr(fn, "fn", fn)
    return getattr(inner, "__name__", type(fn).__name__)


def _launch_classes():
    """The launcher classes whose ``run`` is one launch: the interpreter's under TRITON_INTERPRET=1,
    JITFunction otherwise (both patched when both exist; an Autotuner ends in one of them)."""
    classes = []
    from triton.runtime.jit import JITFunction
    classes.append(JITFunction)
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # pragma: no cover - every supported triton has it
        pass
    return classes


def _grid_size(grid, args: dict) -> int:
    if callable(grid):
        grid = grid(args)
    n = 1
    for g in tuple(grid):
        n *= int(g)
    return n


@contextlib.contextmanager
def _patched_runs(on_launch: Callable, execute: bool = True) -> Iterator[None]:
    """Patch every launcher class's ``run``: ``on_launch(fn, args, kwargs, grid)`` is called before
    each launch; with ``execute=False`` the launch itself is skipped (capture only)."""
    saved = []
    for cls in _launch_classes():
        original = cls.__dict__["run"]

        def run(self, *args, grid, warmup, _original=original, **kwargs):
            if not warmup:
                token = on_launch(self, args, kwargs, grid)
            else:
                token = None
            try:
                if execute or warmup:
                    return _original(self, *args, grid=grid, warmup=warmup, **kwargs)
                return None
            finally:
                if token is not None and callable(token):
                    token()

        saved.append((cls, original))
        cls.run = run
    try:
        yield
    finally:
        for cls, original in saved:
            cls.run = original


def _np_itemsize(handle) -> int:
    """Element size in bytes of the pointee of an interpreter pointer handle."""
    ty = handle.get_element_ty()
    bits = getattr(ty, "primitive_bitwidth", None)
    if bits is None:  # pointer to pointer, or an unknown type: 8 bytes
        return 8
    return max(1, bits // 8)


@contextlib.contextmanager
def _patched_memory_ops(current: list) -> Iterator[None]:
    """Count the interpreter's memory operations into ``current[-1]`` (a KernelStats + address sets)."""
    try:
        from triton.runtime.interpreter import InterpreterBuilder
    except ImportError:  # pragma: no cover
        yield
        return
    orig_load = InterpreterBuilder.create_masked_load
    orig_store = InterpreterBuilder.create_masked_store
    orig_rmw = InterpreterBuilder.create_atomic_rmw
    orig_cas = InterpreterBuilder.create_atomic_cas

    def addresses(ptrs, mask, size):
        p = np.asarray(ptrs.data).ravel()
        m = np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape).ravel()
        active = p[m]
        if size == 1:
            return active.astype(np.uint64)
        return (active.astype(np.uint64)[:, None] + np.arange(size, dtype=np.uint64)).ravel()

    def record(ptrs, mask, field):
        if not current:
            return
        stats, unique = current[-1]
        size = _np_itemsize(ptrs)
        m = np.broadcast_to(np.asarray(mask.data), np.asarray(ptrs.data).shape)
        setattr(stats, field, getattr(stats, field) + int(np.count_nonzero(m)) * size)
        if unique is not None and field in unique:
            unique[field].append(addresses(ptrs, mask, size))

    def load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile):
        record(ptrs, mask, "loaded")
        return orig_load(self, ptrs, mask, other, cache_modifier, eviction_policy, is_volatile)

    def store(self, ptrs, value, mask, cache_modifier, eviction_policy):
        record(ptrs, mask, "stored")
        return orig_store(self, ptrs, value, mask, cache_modifier, eviction_policy)

    def rmw(self, rmwOp, ptr, val, mask, sem, scope):
        record(ptr, mask, "atomic")
        return orig_rmw(self, rmwOp, ptr, val, mask, sem, scope)

    def cas(self, ptr, cmp, val, sem, scope):
        class _All:
            data = np.ones_like(np.asarray(ptr.data), dtype=bool)
        record(ptr, _All, "atomic")
        return orig_cas(self, ptr, cmp, val, sem, scope)

    InterpreterBuilder.create_masked_load = load
    InterpreterBuilder.create_masked_store = store
    InterpreterBuilder.create_atomic_rmw = rmw
    InterpreterBuilder.create_atomic_cas = cas
    try:
        yield
    finally:
        InterpreterBuilder.create_masked_load = orig_load
        InterpreterBuilder.create_masked_store = orig_store
        InterpreterBuilder.create_atomic_rmw = orig_rmw
        InterpreterBuilder.create_atomic_cas = orig_cas


def _keys_below_python(args, kwargs):
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, (list, tuple)):
            tensors += [t for t in a if isinstance(t, torch.Tensor)]
    if not tensors:
        return None
    keys = torch._C._dispatch_keys(tensors[0])
    for t in tensors[1:]:
        keys = keys | torch._C._dispatch_keys(t)
    return keys & torch._C._dispatch_keyset_full_after(torch._C.DispatchKey.Python)


class _AtenCounter(TorchDispatchMode):
    def __init__(self, counts: Counts, in_launch: list):
        super().__init__()
        self.counts = counts
        self._in_launch = in_launch

    @property
    def in_launch(self) -> bool:
        return bool(self._in_launch)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_launch:
            # The interpreter's own host copies of a launch's arguments: not the program's ops.
            return func(*args, **kwargs)
        kind = classify_aten(func, args)
        if kind == "container":
            # Count what the custom op's implementation runs: call its kernel below the Python key
            # with this mode active again (the mode is off inside __torch_dispatch__).
            keys = _keys_below_python(args, kwargs)
            if keys is not None:
                with self:
                    return func.redispatch(keys, *args, **kwargs)
            return func(*args, **kwargs)
        op = func._schema.name.split("::")[-1] + (f".{func._overloadname}"
                                                   if func._overloadname != "default" else "")
        self.counts.aten[kind][op] += 1
        if kind == "compute":
            self.counts.order.append("aten." + op)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_kernels(aten: bool = True, traffic: bool = True, unique: bool = False) -> Iterator[Counts]:
    """Count every Triton launch (per kernel) and, with ``aten``, every ATen op (by kind) issued inside
    the block; with ``traffic`` (interpreter only), the bytes each kernel loads and stores; with
    ``unique``, also the distinct addresses (slower: keeps every address of a launch)."""
    counts = Counts()
    current: list = []

    def on_launch(fn, args, kwargs, grid):
        name = _kernel_name(fn)
        stats = counts.kernel(name)
        stats.launches += 1
        counts.order.append(name)
        try:
            bound = dict(zip(getattr(fn, "arg_names", ()), args), **kwargs)
            stats.programs += _grid_size(grid, bound)
        except Exception:  # a grid lambda that needs the autotuner's meta: count launches only
            pass
        sets = {"loaded": [], "stored": []} if unique else None
        current.append((stats, sets))

        def done():
            current.pop()
            if sets is not None:
                for field, chunks in sets.items():
                    if chunks:
                        n = np.unique(np.concatenate(chunks)).size
                        setattr(stats, "unique_" + field, getattr(stats, "unique_" + field) + n)
        return done

    with _exclusive("count_kernels"), contextlib.ExitStack() as stack:
        stack.enter_context(_patched_runs(on_launch))
        if traffic:
            stack.enter_context(_patched_memory_ops(current))
        if aten:
            stack.enter_context(_AtenCounter(counts, current))
        yield counts


@contextlib.contextmanager
def capture_launches(execute: bool = False) -> Iterator[list]:
    """Record every Triton launch made inside the block as a ``LaunchRecord`` (the arguments exactly as
    the launcher passed them, after an autotuner added its config's constexprs and options). With
    ``execute=False`` (default) the kernels do not run: outputs stay uninitialised, so only launchers
    whose host code does not read kernel results can be captured this way (fastres's never do: no
    host sync)."""
    records: list[LaunchRecord] = []

    def on_launch(fn, args, kwargs, grid):
        names = list(getattr(fn, "arg_names", ()))
        bound = dict(zip(names, args))
        options = {}
        for key, value in kwargs.items():
            if key in names:
                bound[key] = value
            else:
                options[key] = value
        records.append(LaunchRecord(fn, _kernel_name(fn), bound, options, grid))
        return None

    with _exclusive("capture_launches"), _patched_runs(on_launch, execute=execute):
        yield records


def count_module_step(module, *inputs, grad=None, eval_too: bool = True, **kwargs):
    """Counts of one training step of ``module`` on ``inputs``: ``{"fwd", "bwd"[, "eval"]}`` →
    ``Counts``. The backward gets ``grad`` (default: ones like the output); ``eval`` runs the
    module once more in eval mode under no_grad (the module is put back in training mode)."""
    module.train()
    with count_kernels(**kwargs) as fwd:
        out = module(*inputs)
    grad = torch.ones_like(out) if grad is None else grad
    with count_kernels(**kwargs) as bwd:
        out.backward(grad)
    result = {"fwd": fwd, "bwd": bwd}
    if eval_too:
        module.eval()
        try:
            with torch.no_grad(), count_kernels(**kwargs) as ev:
                module(*inputs)
        finally:
            module.train()
        result["eval"] = ev
    return result
