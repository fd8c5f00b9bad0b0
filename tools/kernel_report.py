"""Ahead-of-time compile report of every Triton kernel fastres's launchers request — no GPU needed.

    python tools/kernel_report.py [--arch 90,80] [--dtype bf16,fp32] [--only bn,conv] [--quick]
                                  [--layout nhwc,nchw] [--select REGEX] [--compile-only REGEX]

``--only bn --quick`` (one ResNet-50 shape, with a residual, both layouts) is the BN-act subset
that compiles in about a minute.

How the specialisation is obtained (not duplicated by hand):

1. Capture. A subprocess with ``TRITON_INTERPRET=1`` and GPU-faithful mode (``fastres.precision``:
   the CUDA launch branch, fp32 accumulation, 132 SMs) runs the public ops — a ``BatchNormAct2d``
   training step (forward, backward) and eval step in channels_last (NHWC) and contiguous (NCHW), and the ``fastres::norm_conv_*`` /
   ``conv_bias_act`` ops under ``pinned_config`` for every entry of ``cuda_conv_configs(kind)`` — at
   ResNet-50 shapes (batch 256) on uninitialised CPU tensors, with
   ``fastres.testing.counting.capture_launches``: every launch is recorded with the arguments the
   launcher passed (constexprs, num_warps, num_stages) and not executed. Triton's own binder then
   turns each launch into its compile-time specialisation exactly as ``JITFunction.run`` would on
   the GPU: signature dtypes, constexprs, and the ``tt.divisibility=16`` attributes of pointers
   (CPU allocations are 64-byte aligned, as the CUDA caching allocator's 512) and of integers.
2. Compile. This process (no interpreter) compiles each distinct specialisation with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` through Triton's bundled
   ptxas, and reads the results:

   regs     registers per thread (``cuobjdump --dump-resource-usage``)
   spill    bytes of local-memory stores (``STL`` in the SASS: register spills) / STACK frame bytes
   smem     shared memory per CTA (compiler metadata), "!" past the arch's limit
            (227 KB sm_90, 163 KB sm_80)
   mma      wgmma (Hopper warpgroup MMA), mma.sync (Ampere-style), or none — from the PTX
   async    cp.async copies (global → shared pipelining) in the PTX: count
   tma      cp.async.bulk.tensor (TMA) in the PTX: count. The 1×1 stride-1 conv variants (plain
            GEMMs) load through tensor descriptors where Triton has them (``USE_TMA`` in the
            variant, tma > 0); every other variant loads through pointers (tma 0)
   ld / st  widths in bits of the global loads / stores in the PTX (ld.global.v4.b32 = 128)
   autotune (conv MMA kernels) what the autotuner's own pruner (``conv.prune_configs`` /
            ``conv.prune_reason``, asked at capture with the launch's arguments and the arch's
            shared-memory limit) does with the pinned config: kept; pruned: shared memory /
            spills (never benchmarked for this variant and dtype on this arch); pruned: larger
            than the problem (kept at larger channel counts). The report compiles every config of
            ``cuda_conv_configs`` anyway, so that the pruner's model can be checked against the
            compiler's figures (tests/test_kernel_report.py)

Two GPU-only choices cannot be made under the interpreter and are applied at capture:
``conv.input_precision`` answers as on a CUDA device (tf32 for fp32 when cuDNN allows TF32), and
``conv.use_tensor_descriptors`` as on the target arch: GPU-faithful mode models an H100, so sm_90
gets the descriptor (TMA) variants of the 1×1 stride-1 convs; for sm_80 the scenarios that used
descriptors are captured again with them off (the pointer path an A100 takes).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import importlib
import os
import pickle
import re
import subprocess
import sys
import tempfile
from typing import Iterable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
ARCHS = (90, 80)
DTYPES = ("bf16", "fp32")
LAYOUTS = ("nhwc", "nchw")  # of the BN-act scenarios

# ResNet-50 at batch 256: the BN shapes (N, C, H, W) and the conv shapes
# (N, C, H, W, K, R, stride, padding).
BN_SHAPES = [(256, 64, 112, 112), (256, 64, 56, 56), (256, 256, 56, 56), (256, 128, 28, 28),
             (256, 512, 28, 28), (256, 256, 14, 14), (256, 1024, 14, 14), (256, 512, 7, 7),
             (256, 2048, 7, 7)]
CONV_3X3 = (256, 64, 56, 56, 64, 3, 1, 1)
CONV_3X3_S2 = (256, 128, 56, 56, 128, 3, 2, 1)
CONV_1X1 = (256, 64, 56, 56, 256, 1, 1, 0)
CONV_STEM = (256, 3, 224, 224, 64, 7, 2, 3)


# ------------------------------------------------------------------------------------------------
# 1. Capture (runs in a subprocess under the interpreter).


@dataclasses.dataclass(frozen=True)
class Spec:
    """One compile: a kernel and its specialisation for one arch."""
    module: str
    name: str
    arch: int
    signature: tuple           # ((arg name, type string), ...)
    constexprs: tuple          # ((arg index path, value), ...)
    attrs: tuple               # ((arg index path, attributes), ...)
    options: tuple             # ((option, value), ...) from backend.parse_options
    dtype: str                 # the activation dtype of the scenario
    scenario: str
    autotune: str = ""         # conv MMA kernels: "kept", or "pruned: <why>" (_autotune_status)

    def key(self):
        return (self.module, self.name, self.arch, self.signature, self.constexprs, self.attrs,
                self.options)


def _scenarios(dtype_name: str, only: set, quick: bool, select: Optional[str] = None,
               layouts: Iterable[str] = LAYOUTS):
    """(label, callable) pairs; each callable runs public ops at ResNet-50 shapes. ``select``: a
    regular expression the label must match (re.search); ``layouts``: the BN-act memory formats."""
    for label, run in _all_scenarios(dtype_name, only, quick, tuple(layouts)):
        if select is None or re.search(select, label):
            yield label, run


def _all_scenarios(dtype_name: str, only: set, quick: bool, layouts=LAYOUTS):
    import torch

    import fastres
    from fastres.triton import conv

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    cl = torch.channels_last

    def bn_step(shape, residual, layout, mask_from_output=False):
        def run():
            module = fastres.BatchNormAct2d(shape[1])
            module.mask_from_output = mask_from_output  # backward's mask from the saved output
            memory_format = cl if layout == "nhwc" else torch.contiguous_format
            x = torch.empty(shape, dtype=dtype, memory_format=memory_format).requires_grad_()
            res = torch.empty_like(x).requires_grad_() if residual else None
            y = module(x, res) if residual else module(x)
            y.backward(torch.empty_like(y))
            module.eval()
            with torch.no_grad():
                module(x, res) if residual else module(x)
        return run

    if "bn" in only:
        shapes = BN_SHAPES[1:2] if quick else BN_SHAPES
        for layout in layouts:
            for shape in shapes:
                for residual in ((True,) if quick else (False, True)):
                    yield (f"bn {layout} {shape} residual={residual}",
                           bn_step(shape, residual, layout))
                if not quick:
                    yield (f"bn {layout} {shape} residual=outmask",
                           bn_step(shape, True, layout, True))

    def conv_case(kind, shape, prologue, stats=True, dy_prologue=True, eval_epilogue=False):
        n, c, h, w, k, r, s, p = shape

        def run():
            ops = torch.ops.fastres
            x = torch.empty((n, c, h, w), dtype=dtype, memory_format=cl)  # no copy
            wt = torch.empty((k, c, r, r), dtype=dtype, memory_format=cl)
            scale = torch.empty(c) if prologue else None
            shift = torch.empty(c) if prologue else None
            args = ([s, s], [p, p], [1, 1], 1)
            if kind == "fwd" and eval_epilogue:
                ho = (h + 2 * p - r) // s + 1
                res = torch.empty((n, k, ho, (w + 2 * p - r) // s + 1), dtype=dtype,
                                  memory_format=cl)
                ops.conv_bias_act(x, wt, torch.empty(k), res, *args[:3], 1, True)
            elif kind == "fwd":
                ops.norm_conv_fwd(x, wt, scale, shift, *args, stats)
            else:
                ho, wo = (h + 2 * p - r) // s + 1, (w + 2 * p - r) // s + 1
                dy = torch.empty((n, k, ho, wo), dtype=dtype, memory_format=cl)
                extra = (torch.empty_like(dy), torch.empty(k), torch.empty(k), torch.empty(k)) \
                    if dy_prologue else (None, None, None, None)
                op = ops.norm_conv_dgrad if kind == "dgrad" else ops.norm_conv_wgrad
                if kind == "dgrad":
                    op(dy, wt, x, scale, shift, *args, *extra)
                else:
                    op(dy, x, wt, scale, shift, *args, *extra)
        return run

    if "conv" in only:
        variants = {
            "fwd": [("3x3 prologue+stats", CONV_3X3, dict(prologue=True)),
                    ("1x1 plain prologue+stats", CONV_1X1, dict(prologue=True)),
                    ("3x3/2 prologue+stats", CONV_3X3_S2, dict(prologue=True)),
                    ("7x7 stem stats", CONV_STEM, dict(prologue=False)),
                    ("3x3 eval bias+res+relu", CONV_3X3, dict(prologue=False,
                                                             eval_epilogue=True))],
            "dgrad": [("3x3 prologue+dy", CONV_3X3, dict(prologue=True)),
                      ("1x1 plain prologue+dy", CONV_1X1, dict(prologue=True)),
                      ("1x1 plain dy", CONV_1X1, dict(prologue=False)),
                      ("3x3/2 prologue+dy", CONV_3X3_S2, dict(prologue=True)),
                      ("3x3 plain", CONV_3X3, dict(prologue=False, dy_prologue=False))],
            "wgrad": [("3x3 prologue+dy", CONV_3X3, dict(prologue=True)),
                      ("1x1 plain prologue+dy", CONV_1X1, dict(prologue=True)),
                      ("1x1 plain", CONV_1X1, dict(prologue=False, dy_prologue=False))],
        }
        for kind, cases in variants.items():
            configs = conv.cuda_conv_configs(kind)
            if quick or dtype_name == "fp32":  # fp32: the configs' shared memory, one variant
                cases = cases[:1]
            for config in configs:
                for label, shape, kw in cases:
                    def run(kind=kind, config=config, shape=shape, kw=kw):
                        with conv.pinned_config(kind, config):
                            conv_case(kind, shape, **kw)()
                    yield f"conv {kind} {label} {_config_str(config)}", run


def _config_str(config) -> str:
    blocks = "x".join(str(v) for k, v in config.kwargs.items() if k.startswith("BLOCK"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def _specialise(record, arch: int, dtype: str, scenario: str) -> Spec:
    """Triton's own binder on the launch's arguments, as JITFunction.run does on the GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    raw = getattr(record.kernel, "fn", record.kernel)
    while hasattr(raw, "fn"):
        raw = raw.fn
    jit = JITFunction(raw)  # only for params/signature: nothing is compiled here
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = dict(record.args)
    names = [p.name for p in jit.params]
    positional = [kwargs.pop(n) for n in names if n in kwargs and
                  not jit.params[names.index(n)].is_constexpr]
    kwargs.update(record.options)
    bound, specialization, options = binder(*positional, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization,
                                                           options)
    opts = tuple(sorted((k, v) for k, v in options.__dict__.items()
                        if isinstance(v, (int, float, str, bool, type(None)))))
    return Spec(raw.__module__, raw.__qualname__, arch, tuple(signature.items()),
                tuple(sorted(constexprs.items(), key=lambda kv: kv[0])),
                tuple(sorted((k, tuple(tuple(a) for a in v)) for k, v in attrs.items())), opts,
                dtype, scenario)


def capture(archs: Iterable[int], dtypes: Iterable[str], only: set, quick: bool,
            select: Optional[str] = None, layouts: Iterable[str] = LAYOUTS) -> list[Spec]:
    """Run in a TRITON_INTERPRET=1 process: every distinct specialisation the launchers request."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "capture runs under the interpreter"
    import torch

    import fastres
    from fastres.precision import gpu_faithful
    from fastres.testing.counting import capture_launches

    with contextlib.suppress(ImportError, AttributeError):
        from fastres.triton import conv

        def cuda_input_precision(dtype):  # what a CUDA device would pass (see module docstring)
            return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"
        conv.input_precision = cuda_input_precision

    # GPU-faithful mode models an H100: the plain-GEMM launches pass tensor descriptors (TMA). An
    # arch without TMA gets what its launcher passes there: the pointer path (a scenario that used
    # descriptors runs again with them off).
    tma_archs = [a for a in archs if a >= TMA_MIN_ARCH]
    pointer_archs = [a for a in archs if a < TMA_MIN_ARCH]

    def uses_descriptors(records):
        desc = getattr(sys.modules.get("fastres.triton.conv"), "TensorDescriptor", None)
        return desc is not None and any(isinstance(v, desc) for r in records
                                        for v in r.args.values())

    specs: dict = {}
    with fastres.use_backend("triton"), gpu_faithful():
        for dtype in dtypes:
            for label, run in _scenarios(dtype, only, quick, select, layouts):
                with capture_launches() as records:
                    run()
                groups = [(records, tma_archs + pointer_archs)]
                if pointer_archs and uses_descriptors(records):
                    with _descriptors_off(), capture_launches() as pointer_records:
                        run()
                    groups = [(records, tma_archs), (pointer_records, pointer_archs)]
                for group_records, group_archs in groups:
                    for record in group_records:
                        for arch in group_archs:
                            spec = _specialise(record, arch, dtype, label)
                            spec = dataclasses.replace(spec,
                                                       autotune=_autotune_status(record, arch))
                            seen = specs.get(spec.key())
                            if seen is None or _status_rank(spec) < _status_rank(seen):
                                specs[spec.key()] = spec  # kept by any scenario: kept
    return list(specs.values())


CONV_KINDS = {"_conv_fwd_kernel": "fwd", "_conv_dgrad_kernel": "dgrad",
              "_conv_wgrad_kernel": "wgrad"}
PRUNED_SIZE = "pruned: larger than the problem"


def _status_rank(spec) -> int:
    return {"kept": 0, PRUNED_SIZE: 1}.get(spec.autotune, 2)


def _autotune_status(record, arch: int) -> str:
    """What the conv autotuner does with the launch's (pinned) config on ``arch``, asked of
    ``conv.prune_configs`` / ``conv.prune_reason`` themselves with the launch's arguments, the
    whole ``cuda_conv_configs`` list and the arch's shared-memory limit: "kept", "pruned: shared
    memory" / "pruned: spills" (never benchmarked for this variant and dtype), or "pruned: larger
    than the problem" (kept at larger channel counts). "" for the other kernels."""
    from fastres.triton import conv
    kind = CONV_KINDS.get(record.name)
    if kind is None:
        return ""
    args = {**record.args, **record.options}
    configs = conv.cuda_conv_configs(kind)
    shape = (args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"], args["num_warps"],
             args["num_stages"])
    config = next(c for c in configs if conv._config_shape(c) == shape)
    reason = conv.prune_reason(kind, config, args, SMEM_LIMIT[arch], arch)
    if reason is not None:
        return f"pruned: {reason}"
    kept = conv.prune_configs(kind, configs, args, SMEM_LIMIT[arch], arch)
    return "kept" if any(conv._config_shape(c) == shape for c in kept) else PRUNED_SIZE


TMA_MIN_ARCH = 90  # tensor descriptors lower to TMA from Hopper on; conv.use_tensor_descriptors


@contextlib.contextmanager
def _descriptors_off():
    from fastres.triton import conv
    saved = conv.use_tensor_descriptors
    conv.use_tensor_descriptors = lambda *operands: False
    try:
        yield
    finally:
        conv.use_tensor_descriptors = saved


def capture_in_subprocess(archs, dtypes, only, quick, select=None, layouts=LAYOUTS) -> list[Spec]:
    with tempfile.NamedTemporaryFile(suffix=".pkl") as out:
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, os.path.abspath(__file__), "--capture-to", out.name,
               "--arch", ",".join(map(str, archs)), "--dtype", ",".join(dtypes),
               "--only", ",".join(sorted(only)), "--layout", ",".join(layouts)] \
            + (["--quick"] if quick else []) \
            + (["--select", select] if select else [])
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        with open(out.name, "rb") as f:
            return [Spec(**fields) for fields in pickle.load(f)]


# ------------------------------------------------------------------------------------------------
# 2. Compile and read the results (no interpreter).


@dataclasses.dataclass
class Row:
    kernel: str
    variant: str
    config: str
    dtype: str
    arch: int
    regs: int
    spill: int          # bytes stored to local memory per thread (STL in SASS)
    stack: int
    smem: int
    mma: str
    async_copies: int
    tma: int
    ld_bits: tuple
    st_bits: tuple
    scenario: str
    autotune: str = ""  # conv MMA kernels: "kept" or "pruned: <why>" (the autotuner's pruner)

    @property
    def over_smem(self) -> bool:
        return self.smem > SMEM_LIMIT.get(self.arch, 1 << 30)



def _nvidia_tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _resource_usage(cubin: bytes) -> tuple[dict, str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "-sass", f.name], capture_output=True,
                              text=True).stdout
    fields = dict(item.split(":", 1) for item in usage.split() if ":" in item and item[0].isupper())
    return fields, sass


_WIDTH = re.compile(r"\b(ld|st)\.global(?:\.[a-z_0-9]+)*?(?:\.v(\d))?\.([bfsu])(\d+)\b")
_STL = re.compile(r"\bSTL(?:\.(\d+))?\b")


def _access_widths(ptx: str) -> tuple[tuple, tuple]:
    widths = {"ld": collections.Counter(), "st": collections.Counter()}
    for line in ptx.splitlines():
        m = _WIDTH.search(line)
        if m:
            op, vec, _, bits = m.groups()
            widths[op][int(vec or 1) * int(bits)] += 1
    return tuple(sorted(widths["ld"], reverse=True)), tuple(sorted(widths["st"], reverse=True))


def _spill_bytes(sass: str) -> int:
    total = 0
    for m in _STL.finditer(sass):
        total += int(m.group(1) or 32) // 8
    return total


def _variant(spec: Spec, kernel) -> tuple[str, str]:
    """(variant: the declared constexprs, launch config) as short strings. Integer arguments Triton
    specialised (== 1) are left out of the variant."""
    names = kernel.arg_names
    declared = {p.name for p in kernel.params if p.is_constexpr}
    consts = {names[k[0]]: v for k, v in spec.constexprs if names[k[0]] in declared}
    blocks = "x".join(str(v) for k, v in consts.items() if k.startswith("BLOCK"))
    opts = dict(spec.options)
    config = f"{blocks} w{opts.get('num_warps')} s{opts.get('num_stages')}"
    flags = []
    for k, v in consts.items():
        if k.startswith("BLOCK") or k in ("ACC",):
            continue
        if v is True:
            flags.append(k)
        elif k == "INPUT_PRECISION":
            flags.append(str(v))
        elif v is False or v is None:
            continue
        else:
            flags.append(f"{k}={v}")
    return " ".join(flags), config


def compile_spec(spec: Spec) -> Row:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec.module), spec.name)
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # an Autotuner (or heuristics) wraps the JITFunction
    src = ASTSource(kernel, dict(spec.signature), dict(spec.constexprs),
                    {k: [list(a) for a in v] for k, v in spec.attrs})
    options = {k: v for k, v in spec.options}
    compiled = triton.compile(src, target=GPUTarget("cuda", spec.arch, 32), options=options)
    fields, sass = _resource_usage(compiled.asm["cubin"])
    ptx = compiled.asm["ptx"]
    mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if re.search(r"\bmma\.sync", ptx)
                                                   else "none")
    tma = len(re.findall(r"cp\.async\.bulk\.tensor", ptx))
    async_copies = len(re.findall(r"\bcp\.async\.c[ag]\b", ptx))
    ld, st = _access_widths(ptx)
    variant, config = _variant(spec, kernel)
    return Row(spec.name, variant, config, spec.dtype, spec.arch, int(fields.get("REG", -1)),
               _spill_bytes(sass), int(fields.get("STACK", -1)), compiled.metadata.shared, mma,
               async_copies, tma, ld, st, spec.scenario, spec.autotune)


def report(archs=ARCHS, dtypes=DTYPES, only=("bn", "conv"), quick=False, select=None,
           progress=None, layouts=LAYOUTS, compile_only: Optional[str] = None) -> list[Row]:
    """Capture (subprocess) and compile every specialisation; the rows in a stable order. Call it
    from a process whose Triton kernels are not interpreted (it unsets TRITON_INTERPRET; the
    kernels it compiles are imported here, so import fastres after that if at all). ``compile_only``:
    a regular expression that "kernel dtype scenario" must match (re.search) to be compiled, e.g.
    '_partial_kernel' or '_kernel bf16 bn nhwc'."""
    os.environ.pop("TRITON_INTERPRET", None)
    specs = capture_in_subprocess(archs, dtypes, set(only), quick, select, layouts)
    rows = []
    for spec in sorted(specs, key=lambda s: (s.module, s.name, s.dtype, s.scenario, -s.arch)):
        if compile_only and not re.search(compile_only, f"{spec.name} {spec.dtype} {spec.scenario}"):
            continue
        rows.append(compile_spec(spec))
        if progress:
            progress(rows[-1])
    return rows


def _case(scenario: str) -> str:
    """The scenario label without the family, the kind and the config: '3x3/2 prologue+dy'."""
    if scenario.startswith("conv "):
        return " ".join(scenario.split()[2:-3])
    return scenario.replace("bn ", "").replace(" ", "").replace("residual=", " res=")


HEADER = (f"{'kernel':32s} {'case':26s} {'variant':58s} {'config':16s} {'dtype':5s} {'arch':5s} {'regs':>4s} "
          f"{'spill':>5s} {'stack':>5s} {'smem':>7s} {'mma':8s} {'async':>5s} {'tma':>3s} "
          f"{'ld bits':12s} {'st bits':12s} autotune")


def format_row(r: Row) -> str:
    smem = f"{r.smem}{'!' if r.over_smem else ''}"
    return (f"{r.kernel:32s} {_case(r.scenario)[:26]:26s} {r.variant[:58]:58s} {r.config:16s} {r.dtype:5s} sm_{r.arch:<2d} "
            f"{r.regs:>4d} {r.spill:>5d} {r.stack:>5d} {smem:>7s} {r.mma:8s} {r.async_copies:>5d} "
            f"{r.tma:>3d} {','.join(map(str, r.ld_bits)) or '-':12s} "
            f"{','.join(map(str, r.st_bits)) or '-':12s} {r.autotune or '-'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="90,80", help="SM versions: 90 (H100/H200), 80 (A100)")
    parser.add_argument("--dtype", default="bf16,fp32", help="activation dtypes: bf16,fp16,fp32")
    parser.add_argument("--only", default="bn,conv", help="kernel families: bn,conv")
    parser.add_argument("--quick", action="store_true", help="one shape / variant per family")
    parser.add_argument("--select", help="regular expression on the scenario labels")
    parser.add_argument("--layout", default=",".join(LAYOUTS),
                        help="memory formats of the BN-act scenarios: nhwc,nchw")
    parser.add_argument("--compile-only", help="regular expression on 'kernel dtype scenario' of "
                        "the specialisations to compile, e.g. '_partial_kernel'")
    parser.add_argument("--capture-to", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    dtypes = args.dtype.split(",")
    only = set(args.only.split(","))
    if args.capture_to:
        specs = capture(archs, dtypes, only, args.quick, args.select, args.layout.split(","))
        with open(args.capture_to, "wb") as f:
            pickle.dump([dataclasses.asdict(spec) for spec in specs], f)
        return 0
    import triton
    print(f"# tools/kernel_report.py --arch {args.arch} --dtype {args.dtype} --only {args.only}"
          f" --layout {args.layout}{' --quick' if args.quick else ''}  (triton {triton.__version__}; ahead-of-time, "
          f"no GPU; launcher specialisation captured in GPU-faithful mode at ResNet-50 shapes, "
          f"batch 256)")
    print("# spill: bytes of STL per thread in SASS; smem '!': over the limit "
          "(sm_90 227 KB, sm_80 163 KB); ld/st bits: widths of global accesses in the PTX")
    print("# autotune (conv MMA kernels): what fastres.triton.conv.prune_configs does with the config "
          "at this launch on this arch — kept, or pruned (shared memory / spills: never for this "
          "variant and dtype; larger than the problem: kept for larger channel counts)")
    print(HEADER, flush=True)
    rows = report(archs, dtypes, only, args.quick, args.select,
                  progress=lambda r: print(format_row(r), flush=True),
                  layouts=args.layout.split(","), compile_only=args.compile_only)
    requested = [r for r in rows if r.autotune in ("", "kept", PRUNED_SIZE)]
    over = [r for r in requested if r.over_smem]
    spills = [r for r in requested if r.spill]
    pruned = collections.Counter(r.autotune for r in rows if r.autotune not in ("", "kept"))
    print(f"# {len(rows)} compiles; conv configs the autotuner's pruner drops for the variant and "
          f"dtype: {sum(n for k, n in pruned.items() if k != PRUNED_SIZE)} "
          f"({', '.join(f'{k[8:]}: {n}' for k, n in sorted(pruned.items()) if k != PRUNED_SIZE) or '-'}), "
          f"only for the problem's size: {pruned[PRUNED_SIZE]}")
    print(f"# of the rest (what the launchers can request): over the shared-memory limit: "
          f"{len(over)}; spilling: {len(spills)}")
    conv_mma = [r for r in rows if r.mma != "none" and r.kernel.startswith("_conv_")]
    if conv_mma:
        tma = [r for r in conv_mma if r.tma]
        print(f"# conv MMA compiles loading through TMA (USE_TMA: 1x1 stride-1 plain GEMMs): "
              f"{len(tma)} of {len(conv_mma)}; the others load through pointers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
