"""Mutation testing: deliberate, realistic bugs injected into a copy of the tree; the suite must catch
each one.

    python -m tools.mutants                      # every mutant; writes docs/mutation_report.md
    python -m tools.mutants --list               # the mutants, without running them
    python -m tools.mutants --only ID[,ID...]    # some of them (no report unless --report)
    python -m tools.mutants --mutants-file PATH  # also the mutants of PATH (JSON or .py), e.g. kept
                                                 # outside the project by someone independent

A mutant is ``{id, category, file, old, new, tests[, env][, timeout][, why]}``: ``old`` must occur
exactly once in ``file`` (else the mutant is stale and the run fails loudly, before running
anything); ``tests`` is the pytest selection (arguments, as on a command line) that should catch it;
``env`` extra environment variables for that run. A ``--mutants-file`` is a JSON list of such dicts,
or a Python file defining ``MUTANTS``.

For each mutant the runner copies the tree (git's tracked and untracked-but-not-ignored files, plus
the built ``fastres/_C*.so``) into a temporary folder, applies the edit, and runs
``python -m pytest -x <tests>`` there with this interpreter (the copy's ``fastres`` is imported:
the working directory comes first on sys.path), one mutant at a time, each with a timeout. The same
selection is first run once on an unmutated copy (the baseline): a mutant counts as caught only
when its selection passes without it and fails with it. Statuses: caught, SURVIVED, timeout,
baseline-fails (the selection fails without the mutant: fix that first), no-tests (the selection
ran no test: e.g. all skipped).

Snippets are short on purpose, so a rewrite of a kernel makes a mutant stale (loud) rather than
silently different; refresh them with ``--list`` and ``tests/test_mutants.py``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPORT = os.path.join(ROOT, "docs", "mutation_report.md")
DEFAULT_TIMEOUT_S = 600

REQUIRED_CATEGORIES = (
    "statistics merge", "forward activation", "gradient dx", "gradient dweight", "gradient dbias",
    "gradient dresidual", "gradient relu mask", "low-precision rounding", "masking and bounds",
    "running statistics", "normconv prologue", "normconv epilogue", "syncbn merge",
    "fp32 accumulation only", "cuda launch configuration", "cuda kernel",
)

BN = "fastres/triton/batch_norm_act.py"
CONV = "fastres/triton/conv.py"
CU = "csrc/cuda/batch_norm_act.cu"
T_BN = "tests/test_batch_norm_act.py"
T_CONV = "tests/test_norm_conv.py"

BN_OPS = "fastres/ops/batch_norm_act.py"
T_MOD = "tests/test_modules.py"

MUTANTS = [
    # ---- statistics merge
    dict(id="stats-chan-merge-no-delta", category="statistics merge", file=BN,
         old="m2 = m2_a + m2_b + delta * delta * (n_a * (n_b / n))",
         new="m2 = m2_a + m2_b",
         tests=f"{T_BN} -k test_multi_chunk_and_multi_program_merge",
         why="Chan merge without the between-partials term"),
    dict(id="stats-finalize-no-delta", category="statistics merge", file=BN,
         old="m2 = tl.sum(m2_g, axis=1) + tl.sum(n_g[None, :] * d * d, axis=1)",
         new="m2 = tl.sum(m2_g, axis=1)",
         tests=f"{T_BN} -k test_multi_chunk_and_multi_program_merge",
         why="the finalize merges the G partials without the between-partials term"),
    dict(id="stats-finalize-last-count", category="statistics merge", file=BN,
         old="n_g = tl.where(gs < G, tl.minimum(rows_per_prog, M - gs * rows_per_prog), 0).to(ACC)",
         new="n_g = tl.where(gs < G, rows_per_prog, 0).to(ACC)",
         tests=f"{T_BN} -k test_multi_chunk_and_multi_program_merge",
         why="the last (short) row split weighted as a full one in the finalize"),
    # ---- forward activation
    dict(id="fwd-relu-max-drops-nan", category="forward activation", file=BN,
         old="y = tl.where(y < 0.0, 0.0, y)  # keeps NaN",
         new="y = tl.maximum(y, 0.0)  # max(y, 0): NaN -> 0",
         tests=f"{T_BN} -k 'test_nan_inf_propagate_like_eager or test_relu_keeps_nan_in_eval'",
         why="relu as max(y, 0), which turns NaN into 0"),
    dict(id="fwd-residual-after-relu", category="forward activation", file=BN,
         old="""    y = _pre_activation(x, res, mean, scale, shift, HAS_RESIDUAL)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)""",
         new="""    y = _pre_activation(x, res, mean, scale, shift, False)
    if RELU:
        y = tl.where(y < 0.0, 0.0, y)
    if HAS_RESIDUAL:
        y = y + res""",
         tests=f"{T_BN} -k 'test_fp32_families and basic and nchw and relu and res and not nores and eval'",
         why="the residual added after the ReLU instead of before"),
    # ---- gradients
    dict(id="grad-dx-no-xhat-term", category="gradient dx", file=BN,
         old="dx = dx + k[None, :] * (x - mean[None, :]) + c[None, :]",
         new="dx = dx + c[None, :]",
         tests=f"{T_BN} -k 'test_fp32_families and basic and nchw and nores and relu and train'",
         why="dx without the x̂·Σdy'x̂/M term"),
    dict(id="grad-dweight-uncentred", category="gradient dweight", file=BN,
         old="sum_dy_xc += tl.where(mask, dy * (x - mean[None, :]), 0.0)",
         new="sum_dy_xc += tl.where(mask, dy * x, 0.0)",
         tests=f"{T_BN} -k 'test_fp32_families and basic and nchw and nores and relu and train'",
         why="Σdy'·x instead of Σdy'·(x − mean)"),
    dict(id="grad-dbias-mean-not-sum", category="gradient dbias", file=BN,
         old="tl.store(DBIAS + cols, _round_to(sum_dy, DBIAS.dtype.element_ty), mask=cmask)",
         new="tl.store(DBIAS + cols, _round_to(sum_dy / M, DBIAS.dtype.element_ty), mask=cmask)",
         tests=f"{T_BN} -k 'test_fp32_families and basic and nchw and nores and relu and train'",
         why="dbias as the mean of dy' instead of its sum"),
    dict(id="grad-dbias-op-layer-unmasked", category="gradient dbias", file=BN_OPS,
         old="sum_dy = g.sum(dim=(0, 2, 3))",
         new="sum_dy = dy.sum(dim=(0, 2, 3))",
         tests=f"{T_BN} -k test_torch_backend_matches_triton",
         why="the torch backend's Σdy' taken over dy, not the ReLU-masked dy'"),
    dict(id="grad-dres-stores-dx", category="gradient dresidual", file=BN,
         old="tl.store(DRES + offs, _round_to(dy, DRES.dtype.element_ty), mask=mask)",
         new="tl.store(DRES + offs, _round_to(dx, DRES.dtype.element_ty), mask=mask)",
         tests=f"{T_BN} -k 'test_affine_off and eval'",
         why="dresidual written from dx instead of dy' (the dx pass's store: eval, no parameters)"),
    dict(id="grad-dres-reduce-stores-unmasked", category="gradient dresidual", file=BN,
         old="""        if STORE_DY:  # dy' is dy or 0: exact in dy's dtype
            tl.store(DY_OUT + offs, _round_to(dy, DY_OUT.dtype.element_ty), mask=mask)
        dy = tl.where(mask, dy, 0.0)""",
         new="""        dy_raw = tl.load(DY + offs, mask=mask, other=0.0).to(ACC)
        if STORE_DY:
            tl.store(DY_OUT + offs, _round_to(dy_raw, DY_OUT.dtype.element_ty), mask=mask)
        dy = tl.where(mask, dy, 0.0)""",
         tests=f"{T_BN} -k 'test_fp32_families and basic and nchw and relu and res and not nores and train'",
         why="the reduce pass writes dresidual = dy before the ReLU mask"),
    dict(id="grad-relu-mask-ignores-residual", category="gradient relu mask", file=BN,
         old="""            y = _pre_activation(x, res, mean, scale, shift, HAS_RESIDUAL)
            y = _round_to(y, X_DTYPE).to(y.dtype)""",
         new="""            y = _pre_activation(x, res, mean, scale, shift, False)
            y = _round_to(y, X_DTYPE).to(y.dtype)""",
         tests=f"{T_BN} -k 'test_fp32_families and basic and nchw and relu and res and not nores and train'",
         why="the backward recomputes the ReLU mask without the residual"),
    dict(id="grad-relu-mask-passes-zero", category="gradient relu mask", file=BN,
         old="dy = tl.where(y <= 0.0, 0.0, dy)",
         new="dy = tl.where(y < 0.0, 0.0, dy)",
         tests=f"{T_BN} -k 'test_mask_from_output_same_results_saves_the_output and triton and fp32 and train'",
         why="the gradient passes where the output is exactly 0 (threshold_backward blocks it)"),
    dict(id="grad-relu-mask-from-output-flag-dropped", category="gradient relu mask", file=BN,
         old="MASK_FROM_OUTPUT=bool(mask_from_output and relu and residual is not None),",
         new="MASK_FROM_OUTPUT=False,",
         tests=f"{T_BN} -k 'test_mask_from_output_same_results_saves_the_output and triton and fp32 and train'",
         why="the reduce launch forgets mask_from_output: the saved output y is taken for the residual"),
    # ---- low-precision rounding
    dict(id="round-bf16-truncates", category="low-precision rounding", file=BN,
         old="bits = bits + 0x7FFF + ((bits >> 16) & 1)",
         new="bits = bits",
         tests=f"{T_BN} -k 'test_bf16_output_rounds_to_nearest_even'",
         why="fp32 -> bf16 by truncation instead of round-to-nearest-even"),
    # ---- masking and bounds
    dict(id="mask-stats-tail-counted", category="masking and bounds", file=BN,
         old="""        mean = tl.where(mask, mean_new, mean)
        m2 = tl.where(mask, m2_new, m2)""",
         new="""        mean = mean_new
        m2 = m2_new""",
         tests=f"{T_BN} -k 'test_multi_chunk_and_multi_program_merge and cpu'",
         why="the statistics pass drops its tile mask (rows past the end are merged as zeros)"),
    dict(id="mask-partials-past-G", category="masking and bounds", file=BN,
         old="mask = cmask[:, None] & (gs < G)[None, :]",
         new="mask = cmask[:, None] & (gs < BLOCK_G)[None, :]",
         tests=f"{T_BN} -k 'test_fp32_families and basic and nchw and nores and relu and train'",
         why="the finalize loads BLOCK_G partials per channel, past the G written (the next channel's)"),
    # ---- running statistics
    dict(id="running-var-biased", category="running statistics", file=BN,
         old="unbiased = var * (total / (total - 1.0))",
         new="unbiased = var",
         tests=f"{T_BN} -k 'test_momentum and 0.1'",
         why="the running variance updated with the biased batch variance"),
    dict(id="running-cumulative-off-by-one", category="running statistics", file=BN,
         old="factor = 1.0 / tl.load(NUM_BATCHES).to(ACC)",
         new="factor = 1.0 / (tl.load(NUM_BATCHES).to(ACC) + 1.0)",
         tests=f"{T_MOD} -k 'test_batch_norm_act2d_options and momentum_none and True'",
         why="momentum=None: the factor 1/(n+1) although the module already incremented n"),
    dict(id="running-var-biased-normconv", category="running statistics", file="fastres/functional.py",
         old="unbiased = var.to(acc) * (count / (count - 1))",
         new="unbiased = var.to(acc)",
         tests=f"{T_CONV} -k test_running_stats_match_batch_norm",
         why="normconv/SyncBN running variance updated with the biased batch variance"),
    # ---- normconv
    dict(id="normconv-prologue-padding-transformed", category="normconv prologue", file=CONV,
         old="a = tl.where(a_mask, z, 0.0).to(X.dtype.element_ty)",
         new="a = z.to(X.dtype.element_ty)",
         tests=f"{T_CONV} -k 'test_prologue_padding_is_zero_after_the_transform'",
         why="padding transformed by the prologue (relu(shift) instead of 0)"),
    dict(id="normconv-epilogue-stats-unmasked", category="normconv epilogue", file=CONV,
         old="d = tl.where(out_mask, yf - mean[None, :], 0.0)",
         new="d = yf - mean[None, :]",
         tests=f"{T_CONV} -k 'test_running_stats_match_batch_norm or test_backward_chain'",
         why="the epilogue's M2 counts the rows past the end of the last tile"),
    dict(id="normconv-tile-merge-no-delta", category="normconv epilogue", file=CONV,
         old="m2_b = tl.sum(b, axis=0) + tl.sum(n * d * d, axis=0)",
         new="m2_b = tl.sum(b, axis=0)",
         tests=f"{T_CONV} -k 'test_running_stats_match_batch_norm or test_backward_chain'",
         why="the per-tile statistics merged without the between-tiles term"),
    dict(id="normconv-tma-dgrad-dy-row-offset", category="normconv tensor descriptors", file=CONV,
         old="a = DY_DESC.load([pid_m * BLOCK_M, k0])",
         new="a = DY_DESC.load([pid_m * BLOCK_M + 1, k0])",
         tests=f"{T_CONV} -k 'test_plain_gemm_descriptors_bitwise_equal_pointers and dgrad'",
         why="the 1×1 dgrad's dy tile read one row off through its descriptor"),
    dict(id="normconv-tma-dgrad-w-block-shape", category="normconv tensor descriptors", file=CONV,
         old='"W_DESC": ("BLOCK_K", "BLOCK_N")}',
         new='"W_DESC": ("BLOCK_N", "BLOCK_K")}',
         tests=f"{T_CONV} -k 'test_plain_gemm_descriptors_bitwise_equal_pointers and dgrad'",
         why="the 1×1 dgrad's weight descriptor with the forward's (transposed) block shape"),
    dict(id="normconv-tma-wgrad-split-unaligned", category="normconv tensor descriptors", file=CONV,
         old="per_split = tl.cdiv(tl.cdiv(total, BLOCK_K), SPLIT) * BLOCK_K",
         new="per_split = tl.cdiv(total, SPLIT)",
         tests=f"{T_CONV} -k 'test_plain_gemm_descriptors_bitwise_equal_pointers and wgrad'",
         why="wgrad's split-K ranges not whole tiles: a descriptor tile crosses into the next "
             "split (the pointer path masks it, TMA does not)"),
    # ---- SyncBN
    dict(id="syncbn-merge-no-delta", category="syncbn merge", file="fastres/ops/sync_batch_norm_act.py",
         old="global_m2 = m2s.sum(0) + (counts * (means - global_mean).square()).sum(0)",
         new="global_m2 = m2s.sum(0)",
         tests="tests/test_sync_batch_norm.py -k 'test_gloo_matches_single_process and not offset'",
         why="the cross-rank merge forgets the between-ranks term"),
    # ---- only on the fp32-accumulation path (what a GPU runs)
    dict(id="fp32-naive-variance", category="fp32 accumulation only", file=BN,
         old="    m2 = tl.sum(m2, axis=0) + tl.sum(n_i * d * d, axis=0)\n",
         new="""    m2 = tl.sum(m2, axis=0) + tl.sum(n_i * d * d, axis=0)
    if ACC == tl.float32:  # mutant: Σx² − (Σx)²/n on the fp32-accumulation path only
        sx = tl.zeros([BLOCK_C], dtype=ACC)
        sxx = tl.zeros([BLOCK_C], dtype=ACC)
        for start in tl.range(row_begin, row_end, BLOCK_R):
            rows = start + tl.arange(0, BLOCK_R)
            mask = (rows < row_end)[:, None] & cmask[None, :]
            xs = tl.load(X + _tile_offsets(rows, cols, C, HW, IS_NHWC), mask=mask, other=0.0)
            sx += tl.sum(xs.to(ACC), axis=0)
            sxx += tl.sum(xs.to(ACC) * xs.to(ACC), axis=0)
        m2 = sxx - sx * sx / n_rows.to(ACC)
""",
         tests=f"{T_BN} -k 'test_large_mean_input and fp32'",
         why="a naive variance that only the fp32-accumulation (GPU) path takes"),
    # ---- only in the CUDA launch configuration
    dict(id="cuda-launch-block-not-pow2", category="cuda launch configuration", file=BN,
         old="block_r = max(4096 // block_c, 32)",
         new="block_r = max(4000 // block_c, 32)",
         tests=f"{T_BN} -k 'test_geometry'",
         why="a tile size that is not a power of two (no GPU compile), only on the CUDA branch"),
    # ---- the CUDA kernels (run on the CPU emulator)
    dict(id="cu-relu-drops-nan", category="cuda kernel", file=CU,
         old="if (relu && y < 0.f) y = 0.f;",
         new="if (relu && !(y > 0.f)) y = 0.f;",
         tests="tests/test_cuda_ext.py -k 'test_emulated_kernels_special_inputs and nhwc and float32'",
         why="the CUDA apply's relu turns NaN into 0"),
    dict(id="cu-chan-merge-no-delta", category="cuda kernel", file=CU,
         old="m2 = m2 + m2_b + delta * delta * n * w_b;",
         new="m2 = m2 + m2_b;",
         tests="tests/test_cuda_ext.py -k 'test_emulated_kernels_match_torch_backend and nhwc and float32'",
         why="the CUDA Welford merge without the between-partials term"),
]


class StaleMutant(RuntimeError):
    """A mutant's ``old`` snippet does not occur exactly once in its file."""


# --------------------------------------------------------------------------------------------------
# Loading and checking


def load_mutants_file(path: str, source: str | None = None) -> list:
    """The mutants of a JSON list or a Python file defining MUTANTS, each tagged with its source."""
    if path.endswith(".py"):
        namespace = {"__file__": path, "__name__": "external_mutants"}
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
        mutants = namespace["MUTANTS"]
    else:
        with open(path) as f:
            mutants = json.load(f)
    return [dict(m, source=source or os.path.basename(path)) for m in mutants]


def check_mutant(m: dict, root: str = ROOT) -> None:
    """Raise StaleMutant / ValueError if ``m`` cannot be applied to the tree at ``root``."""
    for key in ("id", "category", "file", "old", "new", "tests"):
        if not isinstance(m.get(key), str) or not m[key]:
            raise ValueError(f"mutant {m.get('id', m)!r}: {key!r} must be a non-empty string")
    if m["old"] == m["new"]:
        raise ValueError(f"mutant {m['id']}: new equals old")
    path = os.path.join(root, m["file"])
    if not os.path.isfile(path):
        raise StaleMutant(f"mutant {m['id']}: {m['file']} does not exist")
    with open(path) as f:
        n = f.read().count(m["old"])
    if n != 1:
        raise StaleMutant(f"mutant {m['id']}: its old snippet occurs {n} times in {m['file']} "
                          f"(must be exactly once; refresh the mutant):\n{m['old']}")


def check_all(mutants, root: str = ROOT) -> None:
    ids = [m["id"] for m in mutants]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate mutant ids: {dupes}")
    errors = []
    for m in mutants:
        try:
            check_mutant(m, root)
        except (StaleMutant, ValueError) as e:
            errors.append(str(e))
    if errors:
        raise StaleMutant("\n".join(errors))


# --------------------------------------------------------------------------------------------------
# Running


def tree_files(root: str = ROOT) -> list:
    """Tracked and untracked-but-not-ignored files, plus the built extension."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, text=True, check=True).stdout
    files = [f for f in out.split("\0") if f and os.path.isfile(os.path.join(root, f))]
    files += [os.path.join("fastres", f) for f in os.listdir(os.path.join(root, "fastres"))
              if f.startswith("_C") and f.endswith(".so")]
    return sorted(set(files))


def copy_tree(dest: str, root: str = ROOT) -> None:
    for f in tree_files(root):
        target = os.path.join(dest, f)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(root, f), target)


def apply_mutant(m: dict, tree: str) -> None:
    check_mutant(m, tree)
    path = os.path.join(tree, m["file"])
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace(m["old"], m["new"], 1))


_COUNTS = re.compile(r"(\d+) (passed|failed|error|errors|skipped|deselected)")


def run_selection(tree: str, m: dict, timeout: float) -> dict:
    """Run the mutant's pytest selection in ``tree``: {rc, passed, failed, seconds, tail}."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1",
               TORCH_EXTENSIONS_DIR=os.path.join(tree, ".torch_extensions"))
    env.update(m.get("env") or {})
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider"] + shlex.split(m["tests"])
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = None, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) \
            else (e.stdout or "")
    counts = {}
    for n, what in _COUNTS.findall(out.strip().splitlines()[-1] if out.strip() else ""):
        counts[what.rstrip("s") if what == "errors" else what] = int(n)
    return {"rc": rc, "passed": counts.get("passed", 0),
            "failed": counts.get("failed", 0) + counts.get("error", 0),
            "seconds": round(time.perf_counter() - t0, 1), "tail": "\n".join(out.splitlines()[-15:])}


def outcome(baseline: dict | None, mutated: dict) -> str:
    if baseline is not None:
        if baseline["rc"] is None:
            return "baseline-timeout"
        if baseline["rc"] != 0:
            return "baseline-fails"
        if baseline["passed"] == 0:
            return "no-tests"
    if mutated["rc"] is None:
        return "timeout"
    if mutated["rc"] == 0:
        return "SURVIVED" if mutated["passed"] > 0 else "no-tests"
    if mutated["rc"] in (1, 2, 3):  # tests failed, interrupted (-x) or internal error (e.g. import)
        return "caught"
    return "no-tests" if mutated["rc"] == 5 else "error"


def _same(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("id", "file", "old", "new", "tests", "env"))


def load_state(path: str | None) -> list:
    """The results recorded in a --resume file (JSON lines), [] when there is none."""
    if not path or not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_mutants(mutants, baseline: bool = True, timeout: float | None = None, log=print,
                state: str | None = None) -> list:
    """Run each mutant in sequence; returns one result dict per mutant. With ``state`` (a JSON-lines
    file) each result is recorded as it finishes and a mutant already recorded unchanged is not run
    again (a long run can be resumed after a time-out)."""
    check_all(mutants)
    recorded = load_state(state)
    results = []
    baselines = {}
    with tempfile.TemporaryDirectory(prefix="fastres-mutants-") as tmp:
        base_tree = os.path.join(tmp, "baseline")
        if baseline:
            copy_tree(base_tree)
        for i, m in enumerate(mutants):
            done = [r for r in recorded if _same(r["mutant"], m)]
            if done:
                results.append(done[-1])
                log(f"[{i + 1}/{len(mutants)}] {m['id']}: {done[-1]['status']} (recorded in {state})")
                continue
            limit = m.get("timeout") or timeout or DEFAULT_TIMEOUT_S
            key = (m["tests"], json.dumps(m.get("env") or {}, sort_keys=True))
            if baseline and key not in baselines:
                log(f"[{i + 1}/{len(mutants)}] baseline: {m['tests']}", flush=True)
                baselines[key] = run_selection(base_tree, m, limit)
            tree = os.path.join(tmp, f"mutant{i}")
            copy_tree(tree)
            apply_mutant(m, tree)
            mutated = run_selection(tree, m, limit)
            shutil.rmtree(tree, ignore_errors=True)
            status = outcome(baselines.get(key), mutated)
            results.append({"mutant": m, "status": status, "run": mutated,
                            "baseline": baselines.get(key)})
            if state:
                with open(state, "a") as f:
                    f.write(json.dumps(results[-1]) + "\n")
            log(f"[{i + 1}/{len(mutants)}] {m['id']}: {status} ({mutated['seconds']}s, "
                f"{mutated['failed']} failed / {mutated['passed']} passed)", flush=True)
            if status not in ("caught", "SURVIVED"):
                log("    " + (baselines.get(key) or mutated)["tail"].replace("\n", "\n    "))
    return results


# --------------------------------------------------------------------------------------------------
# Reporting


def catch_rate(results) -> tuple[int, int]:
    counted = [r for r in results if r["status"] in ("caught", "SURVIVED", "timeout")]
    return sum(r["status"] == "caught" for r in counted), len(counted)


def table(results) -> str:
    lines = ["| mutant | category | file | status | seconds | selection |", "|---|---|---|---|---|---|"]
    for r in results:
        m = r["mutant"]
        src = f" ({m['source']})" if m.get("source") else ""
        lines.append(f"| {m['id']}{src} | {m['category']} | {m['file']} | {r['status']} | "
                     f"{r['run']['seconds']} | `{m['tests']}` |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def markdown(results) -> str:
    caught, counted = catch_rate(results)
    rate = f"{caught}/{counted} = {100 * caught / counted:.0f} %" if counted else "n/a"
    survivors = [r for r in results if r["status"] != "caught"]
    out = [
        "# Mutation report",
        "",
        f"Written by `python -m tools.mutants` on "
        f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}, commit {git_commit()}, "
        f"python {sys.version.split()[0]} (CPU: the Triton interpreter, the CUDA emulator).",
        "",
        f"**Catch rate: {rate}** (caught / (caught + survived + timed out); a mutant whose selection "
        "fails or runs no test without it is listed but not counted).",
        "",
        "Each mutant is a realistic bug injected into a copy of the tree; its pytest selection must "
        "pass without it and fail with it. The mutants are in `tools/mutants.py`.",
        "",
        table(results),
        "",
    ]
    if survivors:
        out += ["## Not caught", "", "A survivor is a missing test (or a selection to widen):", ""]
        for r in survivors:
            m = r["mutant"]
            out.append(f"- **{m['id']}** ({r['status']}): {m.get('why', '')}; "
                       f"`{m['file']}`: `{m['old'].strip().splitlines()[0]}` → "
                       f"`{m['new'].strip().splitlines()[0]}`")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.mutants", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--only", action="append", metavar="ID", help="run only these ids (comma-separated)")
    p.add_argument("--mutants-file", action="append", default=[], metavar="PATH",
                   help="also run the mutants of PATH (JSON list or .py with MUTANTS)")
    p.add_argument("--external-only", action="store_true", help="only the --mutants-file mutants")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated baseline runs")
    p.add_argument("--resume", metavar="STATE.jsonl", help="record each result in this file as it "
                   "finishes, and skip the mutants already recorded there unchanged")
    p.add_argument("--timeout", type=float, help=f"seconds per run (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--report", metavar="PATH", help="markdown report (default docs/mutation_report.md "
                   "for a full run, none with --only)")
    args = p.parse_args(argv)
    mutants = [] if args.external_only else [dict(m) for m in MUTANTS]
    for path in args.mutants_file:
        mutants += load_mutants_file(path)
    if args.only:
        wanted = {i.strip() for arg in args.only for i in arg.split(",") if i.strip()}
        unknown = wanted - {m["id"] for m in mutants}
        if unknown:
            p.error(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in mutants if m["id"] in wanted]
    try:
        check_all(mutants)
    except (StaleMutant, ValueError) as e:
        print(f"tools.mutants: {e}", file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m['id']:40s} {m['category']:28s} {m['file']}")
        return 0
    results = run_mutants(mutants, baseline=not args.no_baseline, timeout=args.timeout,
                          state=args.resume)
    print()
    print(table(results))
    caught, counted = catch_rate(results)
    print(f"\ncatch rate: {caught}/{counted}")
    report = args.report or (None if args.only else REPORT)
    if report:
        os.makedirs(os.path.dirname(os.path.abspath(report)), exist_ok=True)
        with open(report, "w") as f:
            f.write(markdown(results))
        print(f"wrote {report}")
    return 0 if caught == counted and all(r["status"] == "caught" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
