"""Timing, the byte model, and the builders that turn a case + implementation into timed callables.

Implementations:
    "eager"          torch.nn / torch.nn.functional, same dtype and channels_last layout.
    "compile"        torch.compile of the eager model (``mode`` chosen by the runner), no CUDA graphs.
    "fastres-auto" / "fastres-triton" / "fastres-cuda" / "fastres-torch"
                     the fastres modules (``fastres.convert`` of the eager model, or fastres.ConvBNAct2d /
                     fastres.functional.batch_norm_act) with that fastres backend selected. At block
                     level with the normconv path off (the fused-BN fallback); at model level as
                     shipped (normconv where fastres/tables/normconv_table.json chooses it).
                     "fastres-auto" is what a user gets by default: on CPU tensors eager's own ATen
                     ops (the CPU suite's fastres figure), on CUDA the AUTO_TABLE's choice.
    "fastres-normconv"
                     the Triton backend with the normconv path forced on for every eligible block
                     (blocks and models only: ops and ConvBNAct2d have no normconv path).
    "fastres-recompute"
                     models only: ``fastres.convert(model, recompute_block_outputs=True)`` with the
                     Triton backend, normconv as shipped — the time cost of rebuilding BN-act outputs
                     in backward instead of keeping them (fastres.nn.recompute).

Every record keeps the repeat timings it was measured from (``times_ms``: the sorted per-run times, or
TIMES_KEPT evenly spaced order statistics of them), so ``benchmarks.tables`` can tell a difference from
the run's own noise.

Byte model (op level). GB/s is computed from the *minimum* traffic of the fused op: one read of each
input tensor and one write of each output tensor, per-channel vectors ignored:

    forward   read x (+ read residual) + write y
    backward  read dy, x (+ residual) + write dx (+ write dresidual)

A training forward really reads x twice (the statistics pass, then the normalisation pass), and the
backward reads dy and x twice (reduction, then dx); those second reads are *not* counted, so reaching
~85 % of the copy bandwidth with this definition is a demanding target. The copy bandwidth is measured
in the same run as 2 * bytes / time of ``dst.copy_(src)`` on a large tensor.
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import platform
import statistics
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.cases import BlockCase, ConvCase, ModelCase, OpCase

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_IMPLS = ("eager", "compile", "fastres-triton", "fastres-cuda", "fastres-normconv",
             "fastres-recompute")
# On CPU, "auto" is the fastres a user runs (eager's own ATen ops); the pure-PyTorch reference
# ("fastres-torch", fp64, ~10x slower) runs only when asked for (--backends torch).
CPU_IMPLS = ("eager", "fastres-auto")
ALL_IMPLS = ("eager", "compile", "fastres-auto", "fastres-triton", "fastres-cuda", "fastres-torch",
             "fastres-normconv", "fastres-recompute")
MODES = ("fwd", "bwd", "fwd+bwd", "train_step", "eval")
RECORD_FIELDS = ("level", "case", "impl", "dtype", "mode", "ms", "gbps", "pct_copy_bw",
                 "images_per_s", "peak_mem_bytes", "times_ms")
TIMES_KEPT = 64  # repeat timings kept per record (order statistics when there were more)


class Skip(Exception):
    """This implementation / case cannot run here; the message says why."""


# --------------------------------------------------------------------------------------------------
# Environment


def git_commit() -> Optional[str]:
    if os.environ.get("FASTRES_COMMIT"):
        return os.environ["FASTRES_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return None


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        device_name = f"{name} (sm {cap})"
    else:
        device_name = f"cpu: {cpu_model()}, {os.cpu_count()} cores"
    return {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def make_record(level, case, impl, dtype, mode, ms, gbps=None, pct_copy_bw=None, images_per_s=None,
                peak_mem_bytes=None, times_ms=None) -> dict:
    assert mode in MODES, mode
    return {"level": level, "case": case, "impl": impl, "dtype": dtype, "mode": mode,
            "ms": float(ms), "gbps": gbps, "pct_copy_bw": pct_copy_bw,
            "images_per_s": images_per_s, "peak_mem_bytes": peak_mem_bytes,
            "times_ms": None if times_ms is None else kept_times(times_ms)}


def kept_times(times, kept: int = TIMES_KEPT) -> list:
    """The sorted repeat timings (ms, 4 significant figures), thinned to ``kept`` evenly spaced order
    statistics when there are more: the quantiles survive, the file stays small."""
    xs = sorted(float(t) for t in times)
    if len(xs) > kept:
        xs = [xs[round(i * (len(xs) - 1) / (kept - 1))] for i in range(kept)]
    return [float(f"{t:.4g}") for t in xs]


# --------------------------------------------------------------------------------------------------
# Timing


class Timer:
    """Wall time of ``fn()`` in ms, after warm-up: ``timer(fn)`` is the median, ``timer.measure(fn)``
    every timed run.

    CUDA: ``triton.testing.do_bench(return_mode="all")`` (it also flushes L2 before each run), with
    ``rep`` raised so that at least ``min_reps`` runs are timed; CUDA events when triton is missing.
    CPU: ``time.perf_counter`` around each call.
    """

    def __init__(self, device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
                 min_reps: int = 10, cpu_budget_s: float = 0.25, cpu_max_reps: int = 30,
                 cpu_min_reps: int = 3):
        self.device = device
        self.warmup_ms, self.rep_ms, self.min_reps = warmup_ms, rep_ms, min_reps
        self.cpu_budget_s, self.cpu_max_reps = cpu_budget_s, cpu_max_reps
        self.cpu_min_reps = cpu_min_reps

    def __call__(self, fn: Callable, grad_to_none=None) -> float:
        return statistics.median(self.measure(fn, grad_to_none))

    def measure(self, fn: Callable, grad_to_none=None) -> list:
        """The time of every timed run, in ms."""
        if self.device.type == "cuda":
            return self._cuda(fn, grad_to_none)
        return self._cpu(fn, grad_to_none)

    def _cuda(self, fn, grad_to_none):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = max(start.elapsed_time(end) / 3, 1e-3)
        warmup = max(self.warmup_ms, 2 * estimate)
        rep = max(self.rep_ms, self.min_reps * estimate * 1.05)
        try:
            from triton.testing import do_bench
        except Exception:
            do_bench = None
        if do_bench is not None:
            times = do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="all")
            return [float(t) for t in (times if isinstance(times, (list, tuple)) else [times])]
        n_warmup, n_rep = max(1, int(warmup / estimate)), max(self.min_reps, int(rep / estimate))
        for _ in range(n_warmup):
            fn()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(n_rep)]
        for s, e in events:
            _clear_grads(grad_to_none)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return [s.elapsed_time(e) for s, e in events]

    def _cpu(self, fn, grad_to_none):
        return self.measure_interleaved({None: (fn, grad_to_none, contextlib.nullcontext)})[None]

    def measure_interleaved(self, calls: dict) -> dict:
        """{name: every timed run in ms} for ``calls`` = {name: (fn, grad_to_none, context)}, where
        ``context()`` is entered around each call (e.g. the implementation's backend) but not timed.

        CPU: the implementations take turns, one call each per round, the order rotating every
        round, so a load change on a shared machine hits all of them alike; each call's wall time
        by ``time.perf_counter`` with the garbage collector paused. At least ``cpu_min_reps``
        rounds, then rounds until ``cpu_max_reps`` or ``cpu_budget_s`` per implementation is spent.
        CUDA: each implementation in turn by ``measure`` (do_bench flushes L2 and times many runs).
        """
        if self.device.type == "cuda":
            out = {}
            for name, (fn, grad_to_none, context) in calls.items():
                with context():
                    out[name] = self._cuda(fn, grad_to_none)
            return out
        names = list(calls)
        for name in names:  # warm-up
            fn, _, context = calls[name]
            with context():
                fn()
        times = {name: [] for name in names}
        t_end = time.perf_counter() + self.cpu_budget_s * len(names)
        gc.collect()
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            rounds = 0
            while rounds < self.cpu_min_reps or (rounds < self.cpu_max_reps
                                                  and time.perf_counter() < t_end):
                shift = rounds % len(names)
                for name in names[shift:] + names[:shift]:
                    fn, grad_to_none, context = calls[name]
                    with context():
                        _clear_grads(grad_to_none)
                        t0 = time.perf_counter()
                        fn()
                        times[name].append((time.perf_counter() - t0) * 1e3)
                rounds += 1
        finally:
            if gc_was_enabled:
                gc.enable()
        return times


def steady_cpu_allocator() -> bool:
    """Keep freed CPU memory in the process (glibc ``mallopt``: no trimming of the heap top, and
    no mmap below 32 MiB), so that a tensor freed and allocated again every call (gradients set
    to None, outputs) reuses warm pages instead of page-faulting fresh ones. Without it, which
    implementation's buffers sit at the heap top depends on build order: an eager-vs-eager check
    of one conv block measured 0.67x between two identical eager models. The same for every
    implementation. Returns whether it applied (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)) and \
            bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):
        return False


def _clear_grads(tensors):
    for t in tensors or ():
        t.grad = None


def peak_memory(device: torch.device, fn: Callable, grad_to_none=None) -> Optional[int]:
    """torch.cuda.max_memory_allocated over two steady-state calls (None on CPU)."""
    if device.type != "cuda":
        return None
    _clear_grads(grad_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: Optional[int] = None):
    """(ms, GB/s) of a device-to-device ``copy_``: 2 * bytes (read + write) / time."""
    if nbytes is None:
        nbytes = (512 << 20) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    del src, dst
    return ms, 2 * nbytes / (ms * 1e-3) / 1e9, nbytes


def l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or (50 << 20))


def pool_size(device: torch.device, bytes_per_set: int, max_sets: int = 16) -> int:
    """How many input sets to rotate through so that consecutive runs don't hit in L2: 1 when one set
    is already larger than 4x L2 (always on CPU), else enough to cover 4x L2."""
    l2 = l2_bytes(device)
    if l2 == 0 or bytes_per_set >= 4 * l2:
        return 1
    return max(1, min(max_sets, math.ceil(4 * l2 / max(bytes_per_set, 1))))


def rotate(items):
    it = itertools.cycle(items)
    return lambda: next(it)


# --------------------------------------------------------------------------------------------------
# Implementations


def impl_unavailable(impl: str, device: torch.device) -> Optional[str]:
    """Why ``impl`` cannot run on ``device`` (None when it can)."""
    if impl not in ALL_IMPLS:
        return f"unknown implementation {impl!r} (choose from {', '.join(ALL_IMPLS)})"
    if impl == "compile":
        return None if hasattr(torch, "compile") else "torch.compile is missing"
    if impl.startswith("fastres-"):
        backend = impl_backend(impl)
        try:
            import fastres
        except Exception as e:
            return f"fastres does not import ({type(e).__name__}: {e})"
        if backend == "auto":
            return None
        ok, why = fastres.backend_status().get(backend, (False, "unknown backend"))
        if not ok:
            return f"fastres backend {backend!r} unavailable: {why}"
        if backend == "cuda" and device.type != "cuda":
            return "fastres backend 'cuda' needs a CUDA device"
        if backend == "triton" and device.type != "cuda":
            return "fastres-triton on CPU runs in the Triton interpreter (not a benchmark)"
    return None


def impl_backend(impl: str) -> str:
    """The fastres backend a "fastres-*" implementation selects."""
    name = impl.split("-", 1)[1]
    return "triton" if name in ("normconv", "recompute") else name


def impl_applies(impl: str, case) -> bool:
    """fastres-normconv only where a normconv path exists (residual blocks, whole models);
    fastres-recompute only for whole models (a block's output is rebuilt for the next block)."""
    if impl == "fastres-recompute":
        return isinstance(case, ModelCase)
    return impl != "fastres-normconv" or isinstance(case, (BlockCase, ModelCase))


@contextlib.contextmanager
def impl_context(impl: str, case=None):
    """The fastres backend of ``impl`` selected and, for blocks and fastres-normconv, the normconv
    path forced off / on (models keep the shipped table unless fastres-normconv)."""
    if not impl.startswith("fastres-"):
        yield
        return
    import fastres
    from fastres.nn import normconv

    mode = normconv.get_normconv()
    if impl == "fastres-normconv":
        normconv.set_normconv("on")
    elif isinstance(case, BlockCase):
        normconv.set_normconv("off")
    try:
        with fastres.use_backend(impl_backend(impl)):
            yield
    finally:
        normconv.set_normconv(mode)


def compile_fn(fn, mode: Optional[str]):
    import torch._dynamo

    torch._dynamo.reset()  # each case compiles afresh: no recompile limit, no automatic dynamic shapes
    for knob in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    return torch.compile(fn, mode=mode, dynamic=False)


def has_fastres_module(model: nn.Module) -> bool:
    return any(type(m).__module__.split(".")[0] == "fastres" for m in model.modules())


def to_fastres(eager: nn.Module, case, recompute_block_outputs: bool = False) -> nn.Module:
    """The fastres version of ``eager`` with the same weights; raises Skip when the API is missing.
    recompute_block_outputs: ``convert``'s opt-in (fastres-recompute)."""
    try:
        import fastres
    except Exception as e:
        raise Skip(f"fastres does not import ({e})")
    if type(eager).__module__.split(".")[0] == "fastres":
        twin = fused_twin(eager, case)
        if recompute_block_outputs:
            fastres.convert(twin, inplace=True, recompute_block_outputs=True)
        return twin
    if isinstance(case, ConvCase) and hasattr(fastres, "ConvBNAct2d"):
        s = case.spec
        try:
            m = fastres.ConvBNAct2d(s.in_channels, s.out_channels, s.kernel, stride=s.stride,
                                    padding=s.padding)
            m.load_state_dict(eager.state_dict())
            return m.to(device=next(eager.parameters()).device, memory_format=torch.channels_last)
        except TypeError:
            pass  # a different signature: try convert below
    convert = getattr(fastres, "convert", None)
    if convert is None:
        raise Skip("fastres.convert is not available in this fastres")
    try:  # a converted copy sharing nothing with ``eager``
        model = convert(eager, recompute_block_outputs=True) if recompute_block_outputs \
            else convert(eager)
    except TypeError:
        raise Skip("fastres.convert has no recompute_block_outputs in this fastres")
    if not isinstance(model, nn.Module):
        raise Skip(f"fastres.convert returned {type(model).__name__}, not a module")
    if not has_fastres_module(model):
        raise Skip(f"fastres.convert replaced no module of {type(eager).__name__}")
    return model


def fused_twin(eager: nn.Module, case) -> nn.Module:
    """The fused fastres model / block for an eager one built from fastres classes with plain
    ``nn.BatchNorm2d`` (the fallback when torchvision is missing), with the same weights."""
    import fastres

    if isinstance(case, ModelCase):
        fused = getattr(fastres.models, case.arch)()
    else:
        s = case.spec
        cls = fastres.BasicBlock if s.kind == "basic" else fastres.Bottleneck
        down = None
        if s.downsample:
            down = nn.Sequential(nn.Conv2d(s.inplanes, s.out_channels, 1, s.stride, bias=False),
                                 fastres.BatchNormAct2d(s.out_channels, activation=None))
        fused = cls(s.inplanes, s.planes, s.stride, down)
    fused.load_state_dict(eager.state_dict())
    return fused.to(device=next(eager.parameters()).device, memory_format=torch.channels_last)


def unfused_fastres(name: str, *args, **kwargs) -> nn.Module:
    """fastres.models.<name> / fastres.<name> with plain nn.BatchNorm2d + nn.ReLU: the eager
    baseline when torchvision is not installed (same architecture and state_dict keys)."""
    try:
        import fastres
        import fastres.models
    except Exception as e:
        raise Skip(f"torchvision is not installed and fastres.models is not available ({e})")
    where = fastres.models if name.startswith("resnet") else fastres
    if not hasattr(where, name):
        raise Skip(f"torchvision is not installed and fastres has no {name}")
    return getattr(where, name)(*args, norm_layer=nn.BatchNorm2d, **kwargs)


def autocast(device: torch.device, dtype: torch.dtype):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def release():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------
# Builders: each returns {mode: Bench}


@dataclass
class Bench:
    fn: Callable
    grad_to_none: Optional[list] = None
    bytes: Optional[int] = None  # op level: minimum traffic (see the module docstring)
    images: Optional[int] = None  # model level: images per call


def op_bytes(case: OpCase, dtype: torch.dtype) -> dict:
    n = math.prod(case.shape) * torch.empty((), dtype=dtype).element_size()
    r = int(case.spec.residual)
    return {"fwd": n * (2 + r), "bwd": n * (3 + 2 * r)}


def eager_bn_act(activation):
    """BN (+ residual) (+ ReLU) as torchvision's ResNet does it: in-place add and in-place ReLU."""

    def bn_act(x, running_mean, running_var, weight, bias, residual):
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
        if residual is not None:
            y += residual
        if activation == "relu":
            y = torch.relu_(y)
        return y

    return bn_act


def fastres_bn_act(activation):
    from fastres.functional import batch_norm_act

    def bn_act(x, running_mean, running_var, weight, bias, residual):
        return batch_norm_act(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5,
                              residual=residual, activation=activation)

    return bn_act


def build_op(case: OpCase, impl: str, dtype: torch.dtype, device: torch.device,
             compile_mode: Optional[str] = None) -> dict:
    spec = case.spec
    if impl.startswith("fastres-"):
        try:
            fn = fastres_bn_act(spec.activation)
        except ImportError as e:
            raise Skip(f"fastres.functional.batch_norm_act is missing ({e})")
    else:
        fn = eager_bn_act(spec.activation)
        if impl == "compile":
            fn = compile_fn(fn, compile_mode)
    C = spec.channels
    torch.manual_seed(0)
    weight = (1 + 0.1 * torch.randn(C, device=device)).requires_grad_()
    bias = (0.1 * torch.randn(C, device=device)).requires_grad_()
    running_mean, running_var = torch.zeros(C, device=device), torch.ones(C, device=device)
    nbytes = op_bytes(case, dtype)
    elem = math.prod(case.shape) * torch.empty((), dtype=dtype).element_size()
    k = pool_size(device, elem * (4 + 2 * spec.residual))  # x, y, dy, dx (+ residual, dresidual)

    def tensor():
        return torch.randn(case.shape, device=device, dtype=dtype).contiguous(
            memory_format=torch.channels_last)

    sets = []
    for _ in range(k):
        x = tensor().requires_grad_()
        res = tensor().requires_grad_() if spec.residual else None
        sets.append((x, res))

    def args(x, res):
        return (x, running_mean, running_var, weight, bias, res)

    next_fwd = rotate(sets)

    def fwd():
        fn(*args(*next_fwd()))

    # backward: one retained graph per set; time autograd.grad of each in turn
    graphs = []
    for x, res in sets:
        y = fn(*args(x, res))
        inputs = [x, weight, bias] + ([res] if res is not None else [])
        graphs.append((y, inputs, torch.randn_like(y)))
    next_bwd = rotate(graphs)

    def bwd():
        y, inputs, dy = next_bwd()
        torch.autograd.grad(y, inputs, dy, retain_graph=True)

    benches = {"fwd": Bench(fwd, bytes=nbytes["fwd"]), "bwd": Bench(bwd, bytes=nbytes["bwd"])}
    if device.type == "cpu":  # a training step of the op, as a module runs it (CPU suite only)
        next_step = rotate(list(zip(sets, (dy for _, _, dy in graphs))))

        def fwd_bwd():
            (x, res), dy = next_step()
            y = fn(*args(x, res))
            inputs = [x, weight, bias] + ([res] if res is not None else [])
            torch.autograd.grad(y, inputs, dy)

        benches["fwd+bwd"] = Bench(fwd_bwd, bytes=nbytes["fwd"] + nbytes["bwd"])
    return benches


def eager_block(case, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    if isinstance(case, ConvCase):
        s = case.spec
        m = nn.Sequential(nn.Conv2d(s.in_channels, s.out_channels, s.kernel, s.stride, s.padding,
                                    bias=False),
                          nn.BatchNorm2d(s.out_channels), nn.ReLU(inplace=True))
    else:
        s = case.spec
        down = None
        if s.downsample:
            down = nn.Sequential(nn.Conv2d(s.inplanes, s.out_channels, 1, s.stride, bias=False),
                                 nn.BatchNorm2d(s.out_channels))
        name = "BasicBlock" if s.kind == "basic" else "Bottleneck"
        try:
            from torchvision.models import resnet as tv_resnet
        except ImportError:
            m = unfused_fastres(name, s.inplanes, s.planes, s.stride, down)
        else:
            m = getattr(tv_resnet, name)(s.inplanes, s.planes, s.stride, down)
    return m.to(device=device, memory_format=torch.channels_last)


def block_input_shape(case):
    s = case.spec
    c = s.in_channels if isinstance(case, ConvCase) else s.inplanes
    return (case.batch, c, s.height, s.width)


def make_impl_model(eager: nn.Module, case, impl: str, compile_mode):
    if impl == "eager":
        return eager
    if impl == "compile":
        return compile_fn(eager, compile_mode)
    return to_fastres(eager, case, recompute_block_outputs=impl == "fastres-recompute")


def build_block(case, impl: str, dtype: torch.dtype, device: torch.device,
                compile_mode: Optional[str] = None) -> dict:
    """ConvBNAct2d / BasicBlock / Bottleneck: training forward+backward, and eval forward."""
    eager = eager_block(case, device)
    model = make_impl_model(eager, case, impl, compile_mode)
    params = [p for p in model.parameters() if p.requires_grad]
    shape = block_input_shape(case)
    elem = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    k = pool_size(device, elem * 4)
    xs = [torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
          .requires_grad_() for _ in range(k)]
    model.train()
    with autocast(device, dtype):
        out = model(xs[0])
    dys = [torch.randn_like(out) for _ in range(k)]
    del out
    next_train = rotate(list(zip(xs, dys)))

    def train():
        x, dy = next_train()
        with autocast(device, dtype):
            out = model(x)
        out.backward(dy)

    next_eval = rotate(xs)

    def evaluate():
        with torch.no_grad(), autocast(device, dtype):
            model(next_eval())

    return {"fwd+bwd": Bench(_in_mode(model, True, train), grad_to_none=params + xs),
            "eval": Bench(_in_mode(model, False, evaluate))}


def build_model(case: ModelCase, impl: str, dtype: torch.dtype, device: torch.device,
                compile_mode: Optional[str] = None) -> dict:
    """torchvision's ResNet (fastres.models with plain nn.BatchNorm2d when torchvision is missing):
    SGD training step (forward, cross-entropy, backward, step) and eval forward."""
    torch.manual_seed(0)
    try:
        import torchvision
    except ImportError:
        eager = unfused_fastres(case.arch)
    else:
        eager = getattr(torchvision.models, case.arch)(weights=None)
    eager = eager.to(device=device, memory_format=torch.channels_last)
    model = make_impl_model(eager, case, impl, compile_mode)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3,
                          momentum=0.9, foreach=device.type == "cuda")
    x = torch.randn(case.batch, 3, case.image_size, case.image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (case.batch,), device=device)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), labels)
        loss.backward()
        opt.step()

    def evaluate():
        with torch.no_grad(), autocast(device, dtype):
            model(x)

    return {"train_step": Bench(_in_mode(model, True, train_step), images=case.batch),
            "eval": Bench(_in_mode(model, False, evaluate), images=case.batch)}


def _in_mode(model: nn.Module, training: bool, fn: Callable) -> Callable:
    """``fn`` run with ``model`` in train / eval mode, whichever mode the previous call left."""

    def call():
        if model.training != training:
            model.train(training)
        return fn()

    return call


BUILDERS = {OpCase: build_op, ConvCase: build_block, BlockCase: build_block, ModelCase: build_model}


def build(case, impl, dtype, device, compile_mode=None) -> dict:
    return BUILDERS[type(case)](case, impl, dtype, device, compile_mode)


# --------------------------------------------------------------------------------------------------
# Actual traffic (op level): the bytes the fastres Triton kernels really load and store, counted on
# CPU by the instrumented interpreter (fastres.testing.counting) in GPU-faithful mode, next to the
# ideal minimum of ``op_bytes``.

TRAFFIC_HEIGHT = TRAFFIC_WIDTH = 8  # the small counting shape: batch 2, the case's C, 8×8 pixels
TRAFFIC_BATCH = 2

_TRAFFIC_SCRIPT = r"""
import json, sys
import torch
import fastres
from fastres.precision import gpu_faithful
from fastres.testing.counting import count_kernels
out = {}
for channels, residual, activation, dtype_name in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    shape = (%(batch)d, channels, %(height)d, %(width)d)
    x = torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last).requires_grad_()
    res = torch.randn_like(x).requires_grad_() if residual else None
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    rm, rv = torch.zeros(channels), torch.ones(channels)
    with fastres.use_backend("triton"), gpu_faithful():
        with count_kernels(aten=False) as fwd:
            y = fastres.functional.batch_norm_act(x, rm, rv, weight, bias, True, 0.1, 1e-5,
                                                  residual=res, activation=activation)
        with count_kernels(aten=False) as bwd:
            y.backward(torch.randn_like(y))
    n = x.numel()
    key = f"{channels},{int(residual)},{activation},{dtype_name}"
    out[key] = {"fwd": fwd.moved / n, "bwd": bwd.moved / n,
                "kernels": {m: {k.name: [k.loaded / n, k.stored / n] for k in c.kernels.values()}
                            for m, c in (("fwd", fwd), ("bwd", bwd))}}
print(json.dumps(out))
""" % dict(batch=TRAFFIC_BATCH, height=TRAFFIC_HEIGHT, width=TRAFFIC_WIDTH)


def counted_traffic(cases, dtypes) -> dict:
    """{(BNSpec, dtype name): {"fwd": bytes/element, "bwd": bytes/element, "kernels": ...}} for the op
    cases, counted in one subprocess (TRITON_INTERPRET=1 must be set before triton is imported, so
    not in a benchmark process). Per-channel vectors and partials are included at the small
    counting shape, where they weigh more per element than at the case's own size."""
    keys = sorted({(c.spec.channels, bool(c.spec.residual), c.spec.activation, d)
                   for c in cases for d in dtypes}, key=str)
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _TRAFFIC_SCRIPT, json.dumps(keys)], cwd=root,
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"traffic counting failed:\n{proc.stderr[-3000:]}")
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    out = {}
    for c in cases:
        for d in dtypes:
            out[(c.spec, d)] = raw[f"{c.spec.channels},{int(bool(c.spec.residual))},"
                                   f"{c.spec.activation},{d}"]
    return out


def traffic_rows(cases, dtypes, times_ms: Optional[dict] = None) -> list[dict]:
    """Per op case, dtype and mode: ideal bytes (``op_bytes``), actual bytes (counted, scaled per
    element to the case's size), actual / ideal, and the effective GB/s on both where ``times_ms``
    has a GPU time for (case name, dtype name, mode) — else "unmeasured"."""
    counted = counted_traffic(cases, dtypes)
    rows = []
    for c in cases:
        for d in dtypes:
            ideal = op_bytes(c, DTYPES[d])
            per_elt = counted[(c.spec, d)]
            for mode in ("fwd", "bwd"):
                actual = int(round(per_elt[mode] * math.prod(c.shape)))
                ms = (times_ms or {}).get((c.name, d, mode))
                rows.append({"case": c.name, "dtype": d, "mode": mode, "ideal_bytes": ideal[mode],
                             "actual_bytes": actual, "ratio": actual / ideal[mode],
                             "gbps_ideal": ideal[mode] / (ms * 1e-3) / 1e9 if ms else "unmeasured",
                             "gbps_actual": actual / (ms * 1e-3) / 1e9 if ms else "unmeasured",
                             "kernels": per_elt["kernels"][mode]})
    return rows


def format_traffic(rows) -> str:
    lines = [f"{'case':28s} {'dtype':9s} {'mode':4s} {'ideal MB':>10s} {'actual MB':>10s} "
             f"{'actual/ideal':>12s} {'GB/s ideal':>11s} {'GB/s actual':>11s}"]
    for r in rows:
        gi, ga = (f"{r[k]:.0f}" if isinstance(r[k], float) else r[k]
                  for k in ("gbps_ideal", "gbps_actual"))
        lines.append(f"{r['case']:28s} {r['dtype']:9s} {r['mode']:4s} "
                     f"{r['ideal_bytes'] / 1e6:>10.1f} {r['actual_bytes'] / 1e6:>10.1f} "
                     f"{r['ratio']:>12.2f} {gi:>11s} {ga:>11s}")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    from benchmarks import cases as _cases

    parser = argparse.ArgumentParser(description="Actual (counted) vs ideal traffic of the BN-act op "
                                     "cases; GB/s only where a GPU time exists (none here).")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16,float32")
    args = parser.parse_args()
    print(format_traffic(traffic_rows(_cases.op_cases(args.batch), args.dtype.split(","))))
