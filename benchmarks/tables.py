"""The choice tables, generated from a benchmark run: nobody edits them by hand.

    python -m benchmarks.tables RESULTS.json [--out DIR | --install]
    python -m benchmarks.tables --unmeasured --install      # the empty tables (no GPU measured yet)

writes

* ``auto_table.json`` — ``fastres.backend.AUTO_TABLE``: the BN-act backend ("triton", "cuda", "torch")
  per op and shape class, from the op-level records (fused BN(+add)(+ReLU) training forward ``fwd``
  and backward ``bwd`` of each ``fastres-<backend>``);
* ``normconv_table.json`` — ``fastres.nn.normconv.NORMCONV_TABLE``: "normconv" per conv shape and dtype,
  from the block-level records (``fastres-normconv`` against ``fastres-triton``, the fused-BN
  fallback, on the same BasicBlock / Bottleneck),

each with the measuring run's device, date and commit (and the results file's sha256) in its header,
and every decision with its evidence under ``decisions``. ``--install`` writes them into
``fastres/tables/`` (where fastres loads them from; refused for CPU results), otherwise next to
RESULTS.json or into ``--out``.

Noise. Each record carries its repeat timings (``times_ms``, see benchmarks.harness). B is chosen over
A only when B's upper quantile is below A's lower quantile (``--lo-q``/``--hi-q``, default the
quartiles: the two interquartile ranges do not overlap), both with at least ``--min-reps`` timings;
otherwise the difference is within the run's own noise and the default stays. This is the spread
*within* one timed call; a drift between the calls (clocks, another process) is not in it, which is
why the rule asks for separated quartiles rather than medians that differ. A shape/dtype where the
candidate does not win in *every* measured variant (dtype, residual, activation; training and eval)
keeps the default.

Shape classes (AUTO_TABLE). A rule is exact in C and covers a range of NHW (elements per channel):
each measured NHW of that C owns the range up to the geometric midpoints to its measured neighbours
(the smallest from 0, the largest without bound); adjacent ranges with the same choice are merged
and only choices other than the default are written. The fused forward's winner is written for
every forward op name ("stats", "apply", "forward_train"), the backward's for every backward op
("backward_reduce", "backward_dx", "backward"): the suite times the fused op, not its parts.

normconv (NORMCONV_TABLE). A block's path is normconv only when all its convs choose it, so a conv
shape (in, out, kernel, stride, dtype) is written as "normconv" only when every measured block
containing it is faster with normconv in training (``fwd+bwd``) beyond noise and not slower beyond
noise in ``eval``. Missing shapes take the fallback.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
from collections import defaultdict
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_TABLES = os.path.join(ROOT, "fastres", "tables")
GENERATED_BY = "python -m benchmarks.tables"
AUTO_DEFAULT = "triton"  # fastres.backend.AUTO_DEFAULT (not imported: no torch needed here)
BACKEND_IMPLS = {"fastres-triton": "triton", "fastres-cuda": "cuda", "fastres-torch": "torch"}
MODE_OPS = {"fwd": ("stats", "apply", "forward_train"),
            "bwd": ("backward_reduce", "backward_dx", "backward")}
NORMCONV, FALLBACK = "normconv", "torch-conv+fused-bn"
NORMCONV_IMPL, FALLBACK_IMPL = "fastres-normconv", "fastres-triton"
EXPANSION = {"BasicBlock": 1, "Bottleneck": 4}

OP_CASE = re.compile(r"^bn(\+add)?(\+relu)? (\d+)x(\d+)x(\d+)x(\d+)$")
BLOCK_CASE = re.compile(r"^(BasicBlock|Bottleneck) (\d+)->(\d+) s(\d+)( ds)? @(\d+)x(\d+)x(\d+)$")


# --------------------------------------------------------------------------------------------------
# Noise


class Noise:
    """B beats A when quantile(B, hi_q) < quantile(A, lo_q), each with >= min_reps timings."""

    def __init__(self, lo_q: float = 0.25, hi_q: float = 0.75, min_reps: int = 5):
        if not 0 <= lo_q <= hi_q <= 1:
            raise ValueError(f"need 0 <= lo_q <= hi_q <= 1, got {lo_q}, {hi_q}")
        self.lo_q, self.hi_q, self.min_reps = lo_q, hi_q, min_reps

    def describe(self) -> str:
        return (f"B is chosen over A only when B's {self.hi_q:.0%} quantile of its repeat timings is "
                f"below A's {self.lo_q:.0%} quantile (separated spreads), each from >= "
                f"{self.min_reps} timed runs (times_ms of benchmarks.harness); otherwise the "
                "difference is within the run's noise and the default stays")

    def usable(self, times) -> bool:
        return bool(times) and len(times) >= self.min_reps

    def beats(self, b, a) -> bool:
        return (self.usable(b) and self.usable(a)
                and quantile(b, self.hi_q) < quantile(a, self.lo_q))

    def spread(self, times):
        if not times:
            return None
        return [round(quantile(times, self.lo_q), 6), round(quantile(times, self.hi_q), 6)]


def quantile(xs, q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    i = math.floor(pos)
    j = min(i + 1, len(s) - 1)
    return s[i] + (s[j] - s[i]) * (pos - i)


def median(xs) -> float:
    return quantile(xs, 0.5)


def _times(record):
    return record.get("times_ms") or None


# --------------------------------------------------------------------------------------------------
# Parsing the case names (benchmarks.cases.OpCase.name / BlockCase.name)


def parse_op_case(name: str):
    """(residual, relu, (N, C, H, W)) of an op case name, or None."""
    m = OP_CASE.match(name)
    if not m:
        return None
    return bool(m.group(1)), bool(m.group(2)), tuple(int(m.group(i)) for i in range(3, 7))


def parse_block_case(name: str):
    """(kind, inplanes, out_channels, stride, downsample, (N, H, W)) of a block case name, or None."""
    m = BLOCK_CASE.match(name)
    if not m:
        return None
    kind, inplanes, out, stride, ds, n, h, w = m.groups()
    return kind, int(inplanes), int(out), int(stride), bool(ds), (int(n), int(h), int(w))


def block_convs(kind: str, inplanes: int, out_channels: int, stride: int):
    """The (in, out, kernel, stride) of the convs on a block's normconv chain (not the shortcut)."""
    planes = out_channels // EXPANSION[kind]
    if kind == "Bottleneck":
        return [(inplanes, planes, 1, 1), (planes, planes, 3, stride), (planes, out_channels, 1, 1)]
    return [(inplanes, planes, 3, stride), (planes, planes, 3, 1)]


# --------------------------------------------------------------------------------------------------
# AUTO_TABLE


def shape_classes(points):
    """{nhw: (lo, hi)}: each measured NHW owns the range up to the geometric midpoints to its
    neighbours (lo of the smallest is 0, hi of the largest None)."""
    pts = sorted(set(points))
    out = {}
    for i, p in enumerate(pts):
        lo = 0 if i == 0 else math.floor(math.sqrt(pts[i - 1] * p)) + 1
        hi = None if i == len(pts) - 1 else math.floor(math.sqrt(p * pts[i + 1]))
        out[p] = (lo, hi)
    return out


def auto_table(results: dict, noise: Noise):
    """(table, decisions) for fastres.backend.AUTO_TABLE."""
    # (mode, C, NHW) -> {(case, dtype): {backend: times}}
    points = defaultdict(lambda: defaultdict(dict))
    for r in results["records"]:
        parsed = parse_op_case(r["case"]) if r["level"] == "op" else None
        if parsed is None or r["impl"] not in BACKEND_IMPLS or r["mode"] not in MODE_OPS:
            continue
        n, c, h, w = parsed[2]
        points[(r["mode"], c, n * h * w)][(r["case"], r["dtype"])][BACKEND_IMPLS[r["impl"]]] = _times(r)
    decisions = []
    choice = {}
    for (mode, c, nhw), variants in sorted(points.items()):
        candidates = sorted({b for v in variants.values() for b in v} - {AUTO_DEFAULT})
        winners = [b for b in candidates
                   if all(noise.beats(v.get(b), v.get(AUTO_DEFAULT)) for v in variants.values())]
        if winners:  # the fastest winner (geometric mean of its median ratio to the default)
            def ratio(b):
                return sum(math.log(median(v[b]) / median(v[AUTO_DEFAULT])) for v in variants.values())
            pick = min(winners, key=ratio)
            why = f"{pick} faster than {AUTO_DEFAULT} beyond noise in every variant"
        else:
            pick = AUTO_DEFAULT
            if not candidates:
                why = f"only {AUTO_DEFAULT} measured"
            elif any(AUTO_DEFAULT not in v or not noise.usable(v[AUTO_DEFAULT])
                     for v in variants.values()):
                why = f"{AUTO_DEFAULT} not measured (with repeat timings) in every variant: default kept"
            else:
                why = "no candidate faster beyond noise in every variant: default kept"
        choice[(mode, c, nhw)] = pick
        decisions.append({
            "op": mode, "C": c, "NHW": nhw, "choice": pick, "why": why,
            "variants": [{"case": case, "dtype": dtype,
                          "median_ms": {b: round(median(t), 6) for b, t in v.items() if t},
                          "spread_ms": {b: noise.spread(t) for b, t in v.items() if t}}
                         for (case, dtype), v in sorted(variants.items())]})
    table = {}
    for mode, ops in MODE_OPS.items():
        rules = []
        for c in sorted({c for (m, c, _) in choice if m == mode}):
            ranges = shape_classes([nhw for (m, cc, nhw) in choice if m == mode and cc == c])
            merged = []  # [lo, hi, backend], adjacent equal choices merged
            for nhw, (lo, hi) in sorted(ranges.items()):
                pick = choice[(mode, c, nhw)]
                if merged and merged[-1][2] == pick:
                    merged[-1][1] = hi
                else:
                    merged.append([lo, hi, pick])
            rules += [[{"C": [c, c], "NHW": [lo, hi]}, pick] for lo, hi, pick in merged
                      if pick != AUTO_DEFAULT]
        if rules:
            for op in ops:
                table[op] = rules
    return table, decisions


# --------------------------------------------------------------------------------------------------
# NORMCONV_TABLE


def normconv_table(results: dict, noise: Noise):
    """(table, decisions) for fastres.nn.normconv.NORMCONV_TABLE."""
    # (case, dtype) -> {mode: {impl: times}}
    blocks = defaultdict(lambda: defaultdict(dict))
    for r in results["records"]:
        if r["level"] != "block" or r["impl"] not in (NORMCONV_IMPL, FALLBACK_IMPL):
            continue
        if parse_block_case(r["case"]) is None:
            continue
        blocks[(r["case"], r["dtype"])][r["mode"]][r["impl"]] = _times(r)
    decisions = []
    verdict = defaultdict(list)  # (in, out, k, s, dtype) -> [block wins?]
    for (case, dtype), modes in sorted(blocks.items()):
        kind, inplanes, out, stride, _, _ = parse_block_case(case)
        train = modes.get("fwd+bwd", {})
        ev = modes.get("eval", {})
        train_win = noise.beats(train.get(NORMCONV_IMPL), train.get(FALLBACK_IMPL))
        eval_loss = noise.beats(ev.get(FALLBACK_IMPL), ev.get(NORMCONV_IMPL))
        wins = train_win and not eval_loss
        if wins:
            why = "normconv faster in fwd+bwd beyond noise, not slower in eval beyond noise"
        elif eval_loss:
            why = "normconv slower in eval beyond noise"
        elif not (noise.usable(train.get(NORMCONV_IMPL)) and noise.usable(train.get(FALLBACK_IMPL))):
            why = "fwd+bwd of normconv and fallback not both measured with repeat timings"
        else:
            why = "normconv not faster in fwd+bwd beyond noise"
        convs = block_convs(kind, inplanes, out, stride)
        for conv in convs:
            verdict[conv + (dtype,)].append(wins)
        decisions.append({
            "case": case, "dtype": dtype, "block_wins": wins, "why": why,
            "convs": [list(c) for c in convs],
            "median_ms": {m: {i: round(median(t), 6) for i, t in v.items() if t}
                          for m, v in sorted(modes.items())},
            "spread_ms": {m: {i: noise.spread(t) for i, t in v.items() if t}
                          for m, v in sorted(modes.items())}})
    table = [{"in_channels": k[0], "out_channels": k[1], "kernel": k[2], "stride": k[3],
              "dtype": k[4], "choice": NORMCONV}
             for k, wins in sorted(verdict.items()) if all(wins)]
    return table, decisions


# --------------------------------------------------------------------------------------------------
# Files


def _header(kind: str, results, source, noise: Noise) -> dict:
    if results is None:
        return {"kind": kind, "generated_by": GENERATED_BY, "device": "unmeasured", "date": None,
                "commit": None, "source": None,
                "noise": "no GPU has measured fastres yet: the table is empty"}
    return {"kind": kind, "generated_by": GENERATED_BY, "device": results["device"],
            "date": results["date"], "commit": results["commit"], "source": source,
            "noise": noise.describe(),
            "versions": {k: results.get(k) for k in ("torch", "triton", "cuda")},
            "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def build_tables(results, source=None, noise: Noise | None = None) -> dict:
    """{file name: content} of both tables; ``results`` None gives the unmeasured (empty) tables."""
    noise = noise or Noise()
    if results is None:
        auto, auto_dec, nc, nc_dec = {}, [], [], []
    else:
        auto, auto_dec = auto_table(results, noise)
        nc, nc_dec = normconv_table(results, noise)
    return {"auto_table.json": dict(_header("auto_table", results, source, noise), table=auto,
                                    decisions=auto_dec),
            "normconv_table.json": dict(_header("normconv_table", results, source, noise), table=nc,
                                        decisions=nc_dec)}


def write_tables(tables: dict, out_dir: str) -> list:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, content in tables.items():
        path = os.path.join(out_dir, name)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(content, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def describe(tables: dict) -> str:
    auto, nc = tables["auto_table.json"], tables["normconv_table.json"]
    lines = [f"measured on {auto['device']} at commit {auto['commit']} ({auto['date']})"]
    lines.append("AUTO_TABLE (BN-act backend; default " + AUTO_DEFAULT + "):")
    for d in auto["decisions"]:
        meds = "; ".join(f"{v['dtype']} " + ", ".join(f"{b} {ms:.4g}" for b, ms in v["median_ms"].items())
                         for v in d["variants"])
        lines.append(f"  {d['op']:3s} C={d['C']:<5d} NHW={d['NHW']:<8d} -> {d['choice']:6s} "
                     f"({d['why']}; median ms: {meds})")
    if not auto["decisions"]:
        lines.append("  (no op-level fastres records)")
    lines.append("NORMCONV_TABLE (per block; a conv shape is normconv when all its blocks win):")
    for d in nc["decisions"]:
        lines.append(f"  {d['case']} {d['dtype']}: {'normconv' if d['block_wins'] else 'fallback'} "
                     f"({d['why']})")
    if not nc["decisions"]:
        lines.append("  (no block-level fastres-normconv / fastres-triton records)")
    lines.append(f"{sum(len(v) for v in auto['table'].values())} AUTO_TABLE rules over "
                 f"{len(auto['table'])} ops, {len(nc['table'])} NORMCONV_TABLE entries")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=GENERATED_BY, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", help="a benchmarks.run results.json")
    p.add_argument("--out", metavar="DIR", help="where to write the tables (default: next to RESULTS)")
    p.add_argument("--install", action="store_true",
                   help=f"write them into {os.path.relpath(PACKAGE_TABLES, ROOT)}/ (GPU results only)")
    p.add_argument("--unmeasured", action="store_true", help="write the empty, unmeasured tables")
    p.add_argument("--lo-q", type=float, default=0.25, help="lower quantile of the noise rule")
    p.add_argument("--hi-q", type=float, default=0.75, help="upper quantile of the noise rule")
    p.add_argument("--min-reps", type=int, default=5, help="fewest repeat timings to decide on")
    args = p.parse_args(argv)
    if bool(args.results) == args.unmeasured:
        p.error("give RESULTS.json or --unmeasured (one of them)")
    if args.install and args.out:
        p.error("--install and --out are exclusive")
    noise = Noise(args.lo_q, args.hi_q, args.min_reps)
    results = source = None
    if args.results:
        from benchmarks import report

        with open(args.results, "rb") as f:
            raw = f.read()
        results = json.loads(raw)
        report.validate(results)
        source = {"file": os.path.basename(args.results), "sha256": hashlib.sha256(raw).hexdigest()}
        if args.install and results["device"].startswith("cpu"):
            print(f"benchmarks.tables: results measured on {results['device']!r}, not a GPU: not "
                  "installing them as fastres's tables (use --out)", file=sys.stderr)
            return 2
    out = PACKAGE_TABLES if args.install else (
        args.out or (os.path.dirname(os.path.abspath(args.results)) if args.results else None))
    if out is None:
        p.error("--unmeasured needs --out or --install")
    tables = build_tables(results, source, noise)
    paths = write_tables(tables, out)
    print(describe(tables))
    print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
