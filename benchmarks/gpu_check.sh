#!/usr/bin/env bash
# The one script to run on a lent GPU machine (CUDA, torch, triton, ninja, pytest preinstalled; no
# internet): builds fastres._C in place for this GPU's arch with all cores, runs the `gpu` tests,
# runs `benchmarks.run --quick`, writes the choice tables from its results (`benchmarks.tables
# --install`: fastres/tables/*.json, ready to commit, and a copy in OUTDIR), keeps every log in OUTDIR
# and prints a short summary table last.
#
#   benchmarks/gpu_check.sh [--dry-run] OUTDIR
#
# OUTDIR gets at most 9 files: build.log tests.log bench.log results.json results.md speedups.png
# auto_table.json normconv_table.json summary.txt. Each stage has a time budget (whole run < 8 min on an H100); a stage that fails or
# times out is logged and the next one still runs (a failed build leaves the triton backend).
# --dry-run: no GPU needed; prints the commands, checks imports, the CLIs and the test collection,
# and runs a tiny CPU benchmark through the same runner and report writers.
# Budgets (seconds) can be changed with GPU_CHECK_TOTAL_S, GPU_CHECK_BUILD_S, GPU_CHECK_TESTS_S;
# the interpreter with PYTHON (default: python, else python3).
set -uo pipefail

DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
if [[ $# -ne 1 || "$1" == -* ]]; then
    echo "usage: $0 [--dry-run] OUTDIR" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
NPROC=$(nproc 2>/dev/null || echo 8)
TOTAL_S=${GPU_CHECK_TOTAL_S:-450}
BUILD_S=${GPU_CHECK_BUILD_S:-150}
TESTS_S=${GPU_CHECK_TESTS_S:-100}
SUMMARY="$OUT/summary.txt"
STATUS=()   # one line per stage, for the summary
FAILED=0

say() { echo "gpu_check: $*"; }
stage() { STATUS+=("$(printf '%-8s %s' "$1" "$2")"); say "$1: $2"; }

# Seconds left for the benchmark: what the total budget leaves after build and tests, less a margin
# for the summary, within [60, 400].
bench_budget() {
    local left=$((TOTAL_S - SECONDS - 20))
    ((left > 400)) && left=400
    ((left < 60)) && left=60
    echo "$left"
}

rm -f "$OUT"/{build.log,tests.log,bench.log,results.json,results.md,speedups.png,summary.txt}
rm -f "$OUT"/{auto_table.json,normconv_table.json}
[[ -n "$PY" ]] || { say "no python on PATH (set PYTHON)"; exit 2; }

if ((DRY)); then
    say "DRY RUN in $ROOT -> $OUT (python: $PY, $NPROC cores)"
    echo "would run:"
    echo "  TORCH_CUDA_ARCH_LIST=<this GPU's capability> MAX_JOBS=$NPROC timeout ${BUILD_S}s $PY setup.py build_ext --inplace > build.log"
    echo "  timeout ${TESTS_S}s $PY -m pytest tests -m gpu -q > tests.log"
    echo "  timeout <what is left of ${TOTAL_S}s> $PY -m benchmarks.run --quick --out OUTDIR --time-budget <that - 60s> > bench.log"
    echo "  $PY -m benchmarks.tables OUTDIR/results.json --install >> bench.log; cp fastres/tables/*.json OUTDIR"
    echo "  $PY -m benchmarks.report OUTDIR/results.json >> summary.txt"
    ok=1
    check() {  # check NAME COMMAND...: run it, log its output, record ok / FAILED
        local name=$1; shift
        if "$@" >>"$OUT/build.log" 2>&1; then stage "$name" "ok"; else stage "$name" "FAILED (rc $?; see build.log)"; ok=0; fi
    }
    check timeout command -v timeout
    check python "$PY" -c "import sys; assert sys.version_info >= (3, 10), sys.version; print(sys.version)"
    # one interpreter for the imports, fastres.info and the CLIs (startup is most of the cost)
    check python-clis "$PY" - <<'EOF_PY'
import sys
assert sys.version_info >= (3, 10), sys.version
import torch, fastres, fastres.info
from benchmarks import cases, harness, report, run
print(fastres.info.info())
for main in (run.main, report.main):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code in (0, None), f"--help exited with {e.code}"
assert run.main(["--quick", "--device", "cpu", "--list"]) == 0
EOF_PY
    check setup.py "$PY" setup.py --version
    collect() {  # pytest exits 5 when it collects no test: fine here
        env TRITON_INTERPRET=1 "$PY" -m pytest tests -m gpu -q --collect-only -p no:cacheprovider
        local rc=$?; ((rc == 0 || rc == 5))
    }
    check collect collect
    if env -u TRITON_INTERPRET "$PY" -m benchmarks.run --tiny --device cpu --out "$OUT" >"$OUT/bench.log" 2>&1 \
        && [[ -s "$OUT/results.json" ]]; then
        stage bench "tiny CPU run ok (bench.log)"
    else
        stage bench "tiny CPU run FAILED (see bench.log)"; ok=0
    fi
    # the tables from the CPU figures go to OUTDIR only (--install refuses CPU results)
    if "$PY" -m benchmarks.tables "$OUT/results.json" --out "$OUT" >>"$OUT/bench.log" 2>&1; then
        stage tables "written from the CPU run into OUTDIR (not installed)"
    else
        stage tables "FAILED (see bench.log)"; ok=0
    fi
    {
        echo "gpu_check DRY RUN ($(date -u +%FT%TZ), ${SECONDS}s) — CPU figures, not GPU performance"
        printf '%s\n' "${STATUS[@]}"
        echo
        "$PY" -m benchmarks.report "$OUT/results.json" 2>&1
    } >"$SUMMARY"
    echo
    cat "$SUMMARY"
    ((ok)) && exit 0 || exit 1
fi

# ---------------------------------------------------------------------------------------------- GPU
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    say "no CUDA device is visible to $PY; use --dry-run on a machine without a GPU"
    exit 2
fi
say "in $ROOT -> $OUT (python: $PY, $NPROC cores; budget ${TOTAL_S}s)"

# 1. build fastres._C in place, for this GPU's arch only, with all cores
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
{
    "$PY" -m fastres.info
    echo "TORCH_CUDA_ARCH_LIST=$ARCH MAX_JOBS=$NPROC $PY setup.py build_ext --inplace"
} >"$OUT/build.log" 2>&1
t0=$SECONDS
TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$NPROC" timeout -k 10 "$BUILD_S" \
    "$PY" setup.py build_ext --inplace >>"$OUT/build.log" 2>&1
rc=$?
ext=$("$PY" -c "import fastres; ok, why = fastres.backend_status()['cuda']; print(('loaded' if ok else 'unavailable: ' + why)[:160])" 2>&1 | tail -n 1)
if ((rc == 124 || rc == 137)); then
    stage build "TIMED OUT after ${BUILD_S}s; cuda extension $ext; continuing with triton"
elif ((rc != 0)); then
    stage build "FAILED (rc $rc, $((SECONDS - t0))s, see build.log); cuda extension $ext; continuing with triton"
else
    stage build "ok in $((SECONDS - t0))s for sm $ARCH; cuda extension $ext"
fi

# 2. the gpu tests: the GPU session of `make test` (tests/conftest.py; the CPU session, Triton under
# its interpreter with CUDA hidden, is `make test`'s other half and does not fit this budget)
t0=$SECONDS
timeout -k 10 "$TESTS_S" "$PY" -m pytest tests -m gpu -q -p no:cacheprovider >"$OUT/tests.log" 2>&1
rc=$?
last=$(grep -E '[0-9]+ (passed|failed|error|skipped|deselected)' "$OUT/tests.log" | tail -n 1)
if ((rc == 124 || rc == 137)); then
    stage tests "TIMED OUT after ${TESTS_S}s (see tests.log)"; FAILED=1
elif ((rc == 0)); then
    stage tests "ok in $((SECONDS - t0))s: $last"
elif ((rc == 5)); then
    stage tests "no gpu tests collected: $last"
else
    stage tests "FAILED (rc $rc) in $((SECONDS - t0))s: $last"; FAILED=1
fi

# 3. the benchmark (SIGTERM on time-out: the runner still writes the reports of finished cases)
BENCH_S=$(bench_budget)
START_BY=$((BENCH_S - 60))  # no new case after this: the last one (a model compile) may take ~60 s
((START_BY < BENCH_S / 2)) && START_BY=$((BENCH_S / 2))
t0=$SECONDS
timeout -k 20 "$BENCH_S" "$PY" -m benchmarks.run --quick --out "$OUT" \
    --time-budget "$START_BY" >"$OUT/bench.log" 2>&1
rc=$?
if [[ ! -s "$OUT/results.json" ]]; then
    stage bench "FAILED (rc $rc, no results.json; see bench.log)"; FAILED=1
elif ((rc == 0)); then
    stage bench "ok in $((SECONDS - t0))s (budget ${BENCH_S}s)"
else
    stage bench "rc $rc after $((SECONDS - t0))s (budget ${BENCH_S}s): partial results, see bench.log"
fi
notes=$(grep -cE ': (skipped|FAILED) — ' "$OUT/bench.log" 2>/dev/null)
((notes > 0)) && stage notes "$notes implementation/case notes in bench.log and results.md"

# 4. the choice tables from this run: into fastres/tables/ (ready to commit) and a copy in OUTDIR
if [[ -s "$OUT/results.json" ]]; then
    if "$PY" -m benchmarks.tables "$OUT/results.json" --install >>"$OUT/bench.log" 2>&1; then
        cp fastres/tables/auto_table.json fastres/tables/normconv_table.json "$OUT/"
        rules=$(grep -E 'AUTO_TABLE rules over' "$OUT/bench.log" | tail -n 1)
        stage tables "fastres/tables/*.json written (also in OUTDIR): $rules"
    else
        stage tables "FAILED (see bench.log)"; FAILED=1
    fi
fi

# 5. summary, printed last
{
    echo "gpu_check $(date -u +%FT%TZ), ${SECONDS}s in all"
    printf '%s\n' "${STATUS[@]}"
    echo
    if [[ -s "$OUT/results.json" ]]; then "$PY" -m benchmarks.report "$OUT/results.json" 2>&1; fi
} >"$SUMMARY"
echo
cat "$SUMMARY"
exit "$FAILED"
