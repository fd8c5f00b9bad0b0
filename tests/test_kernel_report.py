"""tools/kernel_report.py on a representative subset: every kernel compiles ahead of time for the GPU
with its launcher's own specialisation, within the shared-memory limit, without spills, with wgmma
on sm_90 for the conv MMA kernels, 128-bit accesses in the NHWC elementwise kernels.

The fast tests compile (sm_90), in ONE run of the tool (one capture, one compile process: each
costs ~10 s of imports, a compile ~1 s): the BN-act kernels of one bf16 NHWC BatchNormAct2d step
with a residual (ResNet-50's 64×56×56 at batch 256) and its reduction kernels also in fp32 and
NCHW; the conv configurations with the largest shared-memory footprint in fp32 (TF32, 3×3 with
both prologues); and the 1×1 stride-1 conv variants (plain GEMMs: fwd, dgrad, wgrad, with and
without prologues) in bf16 at one config, which load through tensor descriptors (TMA), and the
1×1 dgrad with both prologues at 64×128×32 w4 s4 (bf16), which the autotuner's pruner drops for
spills. The slow test (about 6 min on 2 cores) compiles every conv configuration for sm_90 and
sm_80 in fp32 and bf16. Each conv row carries the pruner's verdict (``conv.prune_configs`` /
``conv.prune_reason`` asked with the launch's arguments): what the launchers can request must fit,
spill nothing and use wgmma on sm_90; what is pruned must be over the limit (sm_90) or spill.
Kernel names below are those of the current kernels; a rewrite updates them here.
"""
import importlib.util
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "kernel_report.py")

# BN-act kernels: the NHWC elementwise passes (0 spills, 128-bit global accesses) and the
# reductions (register budget of issue 13: <= 64 per thread, so that 4+ CTAs fit per SM).
BN_ELEMENTWISE = {"_apply_kernel", "_backward_dx_kernel"}
BN_REDUCTIONS = {"_stats_partial_kernel", "_backward_reduce_partial_kernel"}
BN_REGISTER_BUDGET = 64
CONV_MMA_KERNELS = {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel"}
# The autotune column of a conv row: fastres.triton.conv's pruner asked with the launch's arguments.
REQUESTABLE = {"kept", "pruned: larger than the problem"}  # the second: kept at larger channels


def _have_toolchain() -> bool:
    try:
        import triton
    except ImportError:
        return False
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    return os.path.exists(cuobjdump) and importlib.util.find_spec("triton.backends.nvidia")


pytestmark = pytest.mark.skipif(not _have_toolchain(),
                                reason="needs Triton's NVIDIA backend (ptxas, cuobjdump)")


def _run_report(*args) -> list:
    """Rows of the tool run in its own process (it compiles without the interpreter, while this
    test process interprets)."""
    code = ("import pickle, sys; sys.path.insert(0, 'tools'); import kernel_report as k; "
            f"rows = k.report({', '.join(args)}); sys.stdout.buffer.write(pickle.dumps(rows))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         check=False)
    if out.returncode:
        raise AssertionError(out.stderr.decode()[-4000:])
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import pickle
    return pickle.loads(out.stdout)


# The scenarios of the fast tests (labels: tools/kernel_report.py _all_scenarios) and, of what they
# launch, the specialisations compiled ("kernel dtype scenario"):
QUICK_SCENARIOS = (r"^bn \S+ \(256, 64, 56, 56\) residual=True$"
                   r"|^conv \S+ 3x3 prologue\S* 128x128x64 "  # fp32: only the first case runs
                   r"|^conv \S+ 1x1 .* 64x64x64 "
                   r"|^conv dgrad 1x1 plain prologue\+dy 64x128x32 ")  # pruned: spills
QUICK_COMPILES = (r"_partial_kernel \S+ bn |_kernel bf16 bn nhwc"  # BN: bf16 NHWC step; reductions
                  r"|_kernel fp32 conv \S+ 3x3 "  # conv: the largest tiles, fp32
                  r"|_kernel bf16 conv \S+ 1x1 ")  # conv: the plain GEMMs, bf16


@pytest.fixture(scope="module")
def quick_rows():
    """The fast tests' compiles, one tool run shared by every test of the module."""
    return _run_report("archs=(90,)", "dtypes=('bf16', 'fp32')", "only=('bn', 'conv')",
                       f"select={QUICK_SCENARIOS!r}", f"compile_only={QUICK_COMPILES!r}")


@pytest.fixture(scope="module")
def bn_rows(quick_rows):
    # Every kernel of the bf16 NHWC step; the reductions also in fp32 and NCHW.
    return [r for r in quick_rows if r.scenario.startswith("bn ")]


@pytest.fixture(scope="module")
def conv_rows(quick_rows):
    # The largest tiles of each kind, fp32 (TF32: twice the bytes per element of bf16).
    return [r for r in quick_rows if r.scenario.startswith("conv ") and r.dtype == "fp32"]


@pytest.fixture(scope="module")
def plain_gemm_rows(quick_rows):
    # The 1×1 stride-1 variants (plain GEMMs), bf16, one config.
    return [r for r in quick_rows if r.scenario.startswith("conv ") and " 1x1 " in r.scenario
            and " 64x64x64 " in r.scenario]


@pytest.fixture(scope="module")
def spill_rows(quick_rows):
    # bf16 dgrad 1×1 with both prologues at 64×128×32 w4 s4: the config pruned for spills.
    return [r for r in quick_rows if r.scenario.startswith("conv dgrad 1x1 plain prologue+dy 64x128x32 ")]


def test_bn_kernels_compile_without_spills(bn_rows):
    names = {r.kernel for r in bn_rows}
    assert BN_ELEMENTWISE | BN_REDUCTIONS <= names, names
    for r in bn_rows:
        assert r.spill == 0, r
        assert not r.over_smem, r


def test_bn_elementwise_kernels_use_128_bit_accesses(bn_rows):
    for r in bn_rows:
        if r.kernel in BN_ELEMENTWISE and "IS_NHWC" in r.variant.split():
            assert r.ld_bits and max(r.ld_bits) == 128, r
            assert r.st_bits and max(r.st_bits) == 128, r


def test_bn_reductions_register_budget_and_pipelining(bn_rows):
    """<= 64 registers per thread, loads pipelined through shared memory (cp.async), both layouts
    and dtypes (the full ResNet-50 set, and sm_80: tools/kernel_report.py --only bn)."""
    reductions = [r for r in bn_rows if r.kernel in BN_REDUCTIONS]
    assert {("IS_NHWC" in r.variant.split(), r.dtype) for r in reductions} == {
        (nhwc, dtype) for nhwc in (True, False) for dtype in ("bf16", "fp32")}
    over = [(r.kernel, r.variant, r.dtype, r.regs) for r in reductions
            if r.regs > BN_REGISTER_BUDGET]
    assert not over
    unpipelined = [(r.kernel, r.variant, r.dtype) for r in reductions if not r.async_copies]
    assert not unpipelined


def _check_conv(rows):
    """Every conv MMA compile the launchers can request (the autotuner's pruner keeps it, here or
    at larger channel counts) fits the arch's shared memory, spills nothing and uses wgmma on
    sm_90; on sm_90 every config the pruner drops for shared memory is over the limit in the
    compile (the pruner's model agrees with the compiler's figure both ways; on sm_80 the model is
    conservative: conv.shared_memory_bytes); every config it drops for spills
    spills in at least one compile of the same kernel, config, dtype and arch here (no stale entry)."""
    problems = []
    spill_pruned = {}
    for r in rows:
        if r.kernel not in CONV_MMA_KERNELS:
            continue
        where = f"{r.kernel} {_case(r)} [{r.variant}] {r.config} {r.dtype} sm_{r.arch}"
        if r.autotune in REQUESTABLE:
            why = []
            if r.over_smem:
                why.append(f"smem {r.smem}")
            if r.spill:
                why.append(f"spill {r.spill} B")
            if r.arch == 90 and r.mma != "wgmma":
                why.append(f"mma {r.mma}")
            if why:
                problems.append(f"{where} ({r.autotune}): {', '.join(why)}")
        elif r.autotune == "pruned: shared memory":
            if r.arch == 90 and not r.over_smem:
                problems.append(f"{where}: pruned for shared memory, compiles to {r.smem} B")
        elif r.autotune == "pruned: spills":
            group = spill_pruned.setdefault((r.kernel, r.config, r.dtype, r.arch), [])
            group.append(r.spill)
        else:
            problems.append(f"{where}: autotune status {r.autotune!r}")
    for group, spills in spill_pruned.items():
        if not any(spills):
            problems.append(f"{group}: pruned for spills, no compile spills")
    return problems


def _case(r):
    return " ".join(r.scenario.split()[2:-3])


def test_conv_largest_configs_fit_and_use_wgmma(conv_rows, spill_rows):
    """fp32 (TF32) at the largest tiles: dgrad and wgrad 128×128×64 are pruned for shared memory
    and are over 227 KB in the compile; fwd's (pruned for the 64-channel problem's size only, kept
    for wider layers) fits, spills nothing, uses wgmma. bf16 dgrad
    with both prologues at 64×128×32 w4 s4 is pruned for spills and spills in the compile."""
    assert {r.kernel for r in conv_rows} == CONV_MMA_KERNELS
    statuses = {r.autotune for r in conv_rows + spill_rows if r.kernel in CONV_MMA_KERNELS}
    problems = _check_conv(conv_rows + spill_rows)
    assert not problems, "\n".join(problems)
    assert statuses & REQUESTABLE and {"pruned: shared memory", "pruned: spills"} <= statuses, \
        statuses


def test_conv_mma_kind_on_sm90(conv_rows):
    # The conv scenarios also launch _merge_partials_kernel (the epilogue statistics' merge): no MMA.
    for r in conv_rows:
        if r.kernel in CONV_MMA_KERNELS:
            assert r.mma == "wgmma", r


def _every_conv_config(select=None):
    rows = _run_report("archs=(90, 80)", "dtypes=('fp32', 'bf16')", "only=('conv',)",
                       f"select={select!r}")
    assert {r.kernel for r in rows} >= CONV_MMA_KERNELS
    problems = _check_conv(rows)
    assert not problems, "\n".join(problems)


@pytest.mark.slow
def test_every_conv_config_fits_without_spills():
    _every_conv_config()


def test_plain_gemm_variants_load_through_tma_on_sm90(plain_gemm_rows):
    """The 1×1 stride-1 fwd, dgrad and wgrad variants (with and without prologues) compile with the
    launcher's specialisation — the descriptors' block shapes set by the config's pre-hook — to
    TMA loads (cp.async.bulk.tensor) and wgmma, within shared memory, without spills; the kernel
    report names the path (USE_TMA)."""
    from fastres.triton import conv
    if conv.TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors: the pointer path only")
    mma = [r for r in plain_gemm_rows if r.kernel in CONV_MMA_KERNELS]
    cases = {(r.kernel, "HAS_PROLOGUE" in r.variant.split()) for r in mma}
    assert cases == {(k, p) for k in CONV_MMA_KERNELS for p in (True, False)} - {
        ("_conv_fwd_kernel", False)}, cases
    for r in mma:
        assert "USE_TMA" in r.variant.split() and r.tma > 0, r
    assert not _check_conv(mma), "\n".join(_check_conv(mma))


def test_only_plain_gemms_use_tma(conv_rows):
    """The other conv variants (3×3 here) load through pointers: no descriptor, no TMA."""
    for r in conv_rows:
        assert r.tma == 0 and "USE_TMA" not in r.variant.split(), r


def test_capture_gives_sm80_the_pointer_path(monkeypatch):
    """GPU-faithful capture models an H100; an A100 (sm_80) has no TMA, so its specialisations of
    the same 1×1 launches are the pointer path's (captured again with descriptors off)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import kernel_report

    from fastres.triton import conv
    if conv.TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors: the pointer path only")
    monkeypatch.setattr(conv, "input_precision", conv.input_precision)  # capture patches it
    specs = kernel_report.capture((90, 80), ("bf16",), {"conv"}, False,
                                  select=r"^conv (dgrad|wgrad) 1x1 plain 64x64x64 |"
                                         r"^conv dgrad 1x1 plain dy 64x64x64 ")
    use_tma = {}
    for spec in specs:
        if spec.name in ("_conv_dgrad_kernel", "_conv_wgrad_kernel"):
            names = getattr(conv, spec.name).arg_names
            consts = {names[path[0]]: value for path, value in spec.constexprs}
            use_tma.setdefault((spec.name, spec.arch), set()).add(consts["USE_TMA"])
    assert use_tma == {("_conv_dgrad_kernel", 90): {True}, ("_conv_dgrad_kernel", 80): {False},
                       ("_conv_wgrad_kernel", 90): {True}, ("_conv_wgrad_kernel", 80): {False}}
