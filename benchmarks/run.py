"""fastres benchmarks: fastres vs eager PyTorch vs torch.compile, at op, block and model level.

    python -m benchmarks.run [--quick] [--out DIR] [--backends eager,compile,fastres-triton,...]

On a GPU: every implementation side by side in one process, bf16 and fp16 autocast, channels_last,
training mode unless stated. Writes DIR/results.json, DIR/results.md and DIR/speedups.png (default
DIR: benchmarks/results/). Without a GPU, ``--cpu-if-no-gpu`` runs the op and block cases on CPU at
small sizes (fastres's default `auto` backend vs eager) into benchmarks/results/cpu/ and says so.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
import traceback

import torch

from benchmarks import cases as C
from benchmarks import harness as H
from benchmarks import report

HERE = os.path.dirname(os.path.abspath(__file__))
GPU_RESULTS = os.path.join(HERE, "results")
CPU_RESULTS = os.path.join(HERE, "results", "cpu")
IMPL_ALIASES = {"triton": "fastres-triton", "cuda": "fastres-cuda", "torch": "fastres-torch",
                "normconv": "fastres-normconv"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="batch 64, a subset of blocks, bf16 for blocks and models, compile in default "
                        "mode (the gpu_check.sh run)")
    p.add_argument("--out", metavar="DIR", help="output folder (default benchmarks/results/, or "
                   "benchmarks/results/cpu/ on CPU)")
    p.add_argument("--backends", "--impls", dest="impls", nargs="+", metavar="IMPL",
                   help=f"implementations to run (comma or space separated): {', '.join(H.ALL_IMPLS)}; "
                        "'triton', 'cuda', 'torch' mean fastres-*. Default: all that are available")
    p.add_argument("--levels", default="op,block,model", help="comma-separated subset of op,block,model")
    p.add_argument("--dtypes", help="comma-separated dtypes for every level (default: bfloat16,float16 "
                   "on GPU, float32 on CPU)")
    p.add_argument("--match", metavar="TEXT", help="only cases whose name contains TEXT")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--cpu-if-no-gpu", action="store_true",
                   help="without a CUDA device, run the small CPU suite instead of failing")
    p.add_argument("--tiny", action="store_true", help="a few tiny cases: a smoke test of every path")
    p.add_argument("--compile-mode", help="torch.compile mode (default: default mode with --quick, "
                   "max-autotune-no-cudagraphs otherwise)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="start no new case after this many seconds (the rest is listed as skipped)")
    p.add_argument("--no-cudnn-benchmark", action="store_true",
                   help="leave torch.backends.cudnn.benchmark off (default: on, for every impl)")
    p.add_argument("--no-plot", action="store_true", help="do not write speedups.png")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p.parse_args(argv)


def pick_device(args) -> torch.device | None:
    if args.device:
        return torch.device(args.device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if args.cpu_if_no_gpu:
        return torch.device("cpu")
    return None


def pick_suite(args, device) -> tuple[C.Suite, tuple]:
    if args.tiny:
        suite, order = C.tiny_suite(), C.FULL_ORDER
    elif args.quick:
        suite, order = C.quick_suite(), C.QUICK_ORDER
    elif device.type == "cpu":
        suite, order = C.cpu_suite(), C.FULL_ORDER
    else:
        suite, order = C.full_suite(), C.FULL_ORDER
    if args.dtypes:
        dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
        for d in dtypes:
            if d not in H.DTYPES:
                raise SystemExit(f"unknown dtype {d!r}; choose from {', '.join(H.DTYPES)}")
        suite.dtypes = {level: dtypes for level in ("op", "block", "model")}
        order = C.FULL_ORDER
    elif args.tiny and device.type == "cuda":
        suite.dtypes = {level: ("bfloat16",) for level in ("op", "block", "model")}
    levels = [x.strip() for x in args.levels.split(",") if x.strip()]
    for level in levels:
        if level not in ("op", "block", "model"):
            raise SystemExit(f"unknown level {level!r}; choose from op, block, model")
    suite.dtypes = {k: v for k, v in suite.dtypes.items() if k in levels}
    if args.match:
        suite.ops = [c for c in suite.ops if args.match in c.name]
        suite.blocks = [c for c in suite.blocks if args.match in c.name]
        suite.models = [c for c in suite.models if args.match in c.name]
    return suite, order


def pick_impls(args, device) -> tuple[list, list]:
    """(implementations to run, [why each other one does not run])."""
    if args.impls:
        wanted = [IMPL_ALIASES.get(x.strip(), x.strip()) for arg in args.impls
                  for x in arg.split(",") if x.strip()]
    else:
        wanted = list(H.GPU_IMPLS if device.type == "cuda" else H.CPU_IMPLS)
    impls, skipped = [], []
    for impl in wanted:
        why = H.impl_unavailable(impl, device)
        if why:
            skipped.append(f"{impl}: {why}")
        elif impl not in impls:
            impls.append(impl)
    if "eager" not in impls:
        impls.insert(0, "eager")  # the baseline every speedup is against
    return impls, skipped


class Progress:
    """A progress line per case: tqdm when present and writing to a terminal, else plain print."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()
        self.bar = None
        if sys.stdout.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, leave=False, dynamic_ncols=True)
            except Exception:
                self.bar = None

    def line(self, text: str):
        self.done += 1
        msg = f"[{self.done:3d}/{self.total} {time.perf_counter() - self.t0:6.1f}s] {text}"
        if self.bar is not None:
            self.bar.write(msg)
            self.bar.update(1)
        else:
            print(msg, flush=True)

    def log(self, text: str):
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _fmt(ms, ref_ms, extra=""):
    s = f"{ms:.3f} ms"
    if ref_ms:
        s += f" ({ref_ms / ms:.2f}x)"
    return s + extra


def run_unit(case, dtype_name, impls, device, timer, compile_mode, copy_gbps, log, paired=None):
    """All implementations of one case at one dtype: [records], [skip notes], progress text.

    CUDA: one implementation after the other (built, timed, released). CPU: every implementation
    is built first, then their runs are interleaved (``Timer.measure_interleaved``), so that the
    load of a shared machine weighs on eager and fastres alike; ``paired`` (a list) then gets a
    ``report.paired_row`` per non-eager implementation and mode (round-by-round speedups)."""
    dtype = H.DTYPES[dtype_name]
    records, notes = [], []
    parts = {}

    def record(impl, mode, bench, times):
        ms = statistics.median(times)
        gbps = pct = ips = peak = None
        if bench.bytes is not None:
            gbps = bench.bytes / (ms * 1e-3) / 1e9
            pct = 100.0 * gbps / copy_gbps if copy_gbps else None
        if bench.images is not None:
            ips = bench.images / (ms * 1e-3)
        if case.level != "op":
            peak = H.peak_memory(device, bench.fn, bench.grad_to_none)
        records.append(H.make_record(case.level, case.name, impl, dtype_name, mode, ms,
                                     gbps, pct, ips, peak, times))
        parts.setdefault(mode, []).append((impl, ms, pct))

    def failed(impl, e):
        if isinstance(e, H.Skip):
            notes.append(f"{case.level} {case.name} {dtype_name} {impl}: skipped — {e}")
            return
        notes.append(f"{case.level} {case.name} {dtype_name} {impl}: FAILED — "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        log(traceback.format_exc())

    applicable = [impl for impl in impls if H.impl_applies(impl, case)]
    if device.type == "cpu":
        built = {}
        for impl in applicable:
            try:
                with H.impl_context(impl, case):
                    built[impl] = H.build(case, impl, dtype, device, compile_mode)
            except Exception as e:  # keep going: one failure must not lose the other figures
                failed(impl, e)
        modes = list(dict.fromkeys(m for benches in built.values() for m in benches))
        for mode in modes:
            calls = {impl: (benches[mode].fn, benches[mode].grad_to_none,
                            lambda impl=impl: H.impl_context(impl, case))
                     for impl, benches in built.items() if mode in benches}
            try:
                times = timer.measure_interleaved(calls)
            except Exception as e:
                failed(f"{'/'.join(calls)} {mode}", e)
                continue
            for impl in calls:
                record(impl, mode, built[impl][mode], times[impl])
                if paired is not None and impl != "eager" and "eager" in times:
                    paired.append(report.paired_row(case.level, case.name, dtype_name, mode, impl,
                                                    times["eager"], times[impl]))
        built = None
        if "compile" in applicable:
            import torch._dynamo

            torch._dynamo.reset()
        H.release()
    for impl in (applicable if device.type != "cpu" else ()):
        t0 = time.perf_counter()
        try:
            with H.impl_context(impl, case):
                benches = H.build(case, impl, dtype, device, compile_mode)
                for mode, bench in benches.items():
                    record(impl, mode, bench, timer.measure(bench.fn, bench.grad_to_none))
            if impl == "compile":
                log(f"    compile: {case.name} {dtype_name} compiled and timed in "
                    f"{time.perf_counter() - t0:.1f}s")
        except Exception as e:  # keep going: one failure must not lose the other figures
            failed(impl, e)
        finally:
            benches = None
            if impl == "compile":
                import torch._dynamo

                torch._dynamo.reset()
            H.release()
    text = []
    for mode, entries in parts.items():
        ref = next((ms for impl, ms, _ in entries if impl == "eager"), None)
        cells = [f"{impl} " + _fmt(ms, None if impl == "eager" else ref,
                                   f" {pct:.0f}%bw" if pct is not None else "")
                 for impl, ms, pct in entries]
        text.append(f"{mode}: " + ", ".join(cells))
    return records, notes, f"{case.level} {case.name} {dtype_name} | " + (" | ".join(text) or "-")


def committed_results_note() -> str:
    path = os.path.join(GPU_RESULTS, "results.json")
    try:
        with open(path) as f:
            r = json.load(f)
        return f"committed GPU results: benchmarks/results/ (measured on {r['device']}, {r['date']})"
    except Exception:
        return "committed GPU results: benchmarks/results/ (none measured yet)"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args)
    if device is None:
        print("benchmarks.run: no CUDA device is visible. Run on a GPU, or pass --cpu-if-no-gpu "
              "(small CPU figures) or --device cpu.", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.run: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    suite, order = pick_suite(args, device)
    units = suite.units(order)
    if args.list:
        for case, dtype in units:
            print(f"{case.level:6s} {dtype:9s} {case.name}")
        return 0
    impls, skipped = pick_impls(args, device)
    out = args.out or (GPU_RESULTS if device.type == "cuda" and not args.tiny else CPU_RESULTS)
    os.makedirs(out, exist_ok=True)
    compile_mode = args.compile_mode or (None if args.quick or args.tiny
                                         else "max-autotune-no-cudagraphs")
    if compile_mode in ("default", "none", ""):
        compile_mode = None
    note = ""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
        note = (f"torch.compile mode: {compile_mode or 'default'}; cudnn.benchmark "
                f"{'on' if torch.backends.cudnn.benchmark else 'off'} for every implementation; "
                f"no CUDA graphs; {'--quick' if args.quick else 'full suite'}.")
    if device.type == "cpu":
        threads = int(os.environ.get("FASTRES_BENCH_THREADS", "1"))
        plural = "s" if threads > 1 else ""
        note = (f"CPU figures — not GPU performance ({threads} thread{plural}); "
                + committed_results_note())
        print(note, flush=True)
    info = H.env_info(device)
    print(f"device: {info['device']}; torch {info['torch']}; triton {info['triton']}; "
          f"commit {info['commit']}", flush=True)
    print(f"implementations: {', '.join(impls)}; compile mode: {compile_mode or 'default'}; "
          f"{len(units)} cases; output: {out}", flush=True)
    for s in skipped:
        print(f"  not run: {s}", flush=True)

    # SIGTERM (e.g. `timeout`) -> KeyboardInterrupt, so the reports below are still written.
    stop = []

    def _on_term(signum, frame):
        stop.append(signum)  # also stops the loop if a library swallows the exception below
        raise KeyboardInterrupt(f"signal {signum}")

    previous_handler = signal.signal(signal.SIGTERM, _on_term)
    if device.type == "cpu":
        # One thread: on a shared CPU, OpenMP threads spinning against other work make timings
        # swing by 1000x; single-threaded figures are stable (and are CPU figures anyway).
        torch.set_num_threads(int(os.environ.get("FASTRES_BENCH_THREADS", "1")))
        if not H.steady_cpu_allocator():
            print("note: glibc mallopt unavailable; CPU timings include page faults of freed "
                  "memory", flush=True)
    if args.tiny:
        timer = H.Timer(device, warmup_ms=5, rep_ms=20, min_reps=3, cpu_budget_s=0.02, cpu_max_reps=3)
    elif args.quick:
        timer = H.Timer(device, warmup_ms=25, rep_ms=100, min_reps=10)
    elif device.type == "cpu":  # interleaved rounds: 10 to 200, about 1.5 s per implementation
        timer = H.Timer(device, cpu_budget_s=1.5, cpu_max_reps=200, cpu_min_reps=10)
    else:
        timer = H.Timer(device, warmup_ms=50, rep_ms=300, min_reps=30)
    results = dict(info, records=[])
    paired = []  # CPU: round-by-round speedups vs eager (report.write_vs_eager)
    json_path, md_path = os.path.join(out, "results.json"), os.path.join(out, "results.md")
    t_start = time.perf_counter()
    progress = Progress(len(units))
    interrupted = None
    try:
        copy_ms, copy_gbps, copy_bytes = H.copy_bandwidth(device, timer)
        results["records"].append(H.make_record(
            "op", f"device copy {copy_bytes >> 20} MiB", "torch.copy_", "uint8", "fwd", copy_ms,
            copy_gbps, 100.0))
        print(f"device-to-device copy bandwidth: {copy_gbps:.0f} GB/s", flush=True)
        for i, (case, dtype) in enumerate(units):
            if stop:
                raise KeyboardInterrupt(f"signal {stop[0]}")
            if args.time_budget is not None and time.perf_counter() - t_start > args.time_budget:
                left = units[i:]
                skipped.append(f"{len(left)} cases not started: time budget of {args.time_budget:.0f}s "
                               f"spent (first: {left[0][0].level} {left[0][0].name} {left[0][1]})")
                progress.log(f"time budget spent: {len(left)} cases not run")
                break
            records, notes, text = run_unit(case, dtype, impls, device, timer, compile_mode,
                                            copy_gbps, progress.log, paired)
            results["records"].extend(records)
            skipped.extend(notes)
            progress.line(text)
            for n in notes:
                progress.log(f"    {n}")
            report.write_json(results, json_path)
    except KeyboardInterrupt as e:
        interrupted = str(e) or "KeyboardInterrupt"
        skipped.append(f"run interrupted ({interrupted}); the figures above are complete cases only")
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous_handler)
    report.write_json(results, json_path)
    report.write_markdown(results, md_path, skipped, note)
    print(f"wrote {json_path} and {md_path}", flush=True)
    if paired and not args.tiny:  # (--tiny is gpu_check.sh's smoke test: its OUTDIR file list)
        print("wrote {} and {}".format(*report.write_vs_eager(info, paired, out, note)), flush=True)
    if not args.no_plot:
        why = report.write_plot(results, os.path.join(out, "speedups.png"))
        print(why or f"wrote {os.path.join(out, 'speedups.png')}", flush=True)
    print("", flush=True)
    print(report.summary(results), flush=True)
    if skipped:
        print(f"\n{len(skipped)} notes (implementations or cases not measured):", flush=True)
        for s in skipped[:40]:
            print(f"  - {s}", flush=True)
        if len(skipped) > 40:
            print(f"  ... and {len(skipped) - 40} more in {md_path}", flush=True)
    if paired:
        print("\nspeedup vs eager, paired per round (median over cases' medians; min [q1, q3]):",
              flush=True)
        for g in report.vs_eager_groups(paired):
            print(f"  {g['level']:5s} {g['impl']:14s} {g['mode']:8s} {g['cases']:3d} cases  "
                  f"geomean {g['geomean']:.3f}x  min {g['min']:.3f}x [{g['min_iqr'][0]:.3f}, "
                  f"{g['min_iqr'][1]:.3f}] ({g['min_case']})  below {report.VS_EAGER_THRESHOLD}: "
                  f"{g['below_by_median']} by median, {g['below_by_q3']} by q3", flush=True)
    if device.type == "cpu":
        print("\n" + note, flush=True)
    print(f"total {time.perf_counter() - t_start:.0f}s", flush=True)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
