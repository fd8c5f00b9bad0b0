"""Writers for the benchmark results: ``results.json``, ``results.md``, ``speedups.png`` and a short
text summary.

``python -m benchmarks.report DIR/results.json [--summary FILE] [--md] [--plot]`` re-renders them from
a saved ``results.json``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import defaultdict

SCHEMA_TOP = ("device", "torch", "triton", "cuda", "commit", "date", "records")
SCHEMA_RECORD = ("level", "case", "impl", "dtype", "mode", "ms", "gbps", "pct_copy_bw",
                 "images_per_s", "peak_mem_bytes", "times_ms")
LEVELS = ("op", "block", "model")
IMPL_ORDER = ("eager", "compile", "fastres-auto", "fastres-triton", "fastres-cuda",
              "fastres-normconv", "fastres-recompute", "fastres-torch")


def validate(results: dict) -> None:
    """Raise ValueError if ``results`` does not follow the results.json schema."""
    if not isinstance(results, dict) or tuple(results) != SCHEMA_TOP:
        raise ValueError(f"results.json keys must be {SCHEMA_TOP}, got "
                         f"{tuple(results) if isinstance(results, dict) else type(results)}")
    for i, r in enumerate(results["records"]):
        if tuple(r) != SCHEMA_RECORD:
            raise ValueError(f"record {i} keys must be {SCHEMA_RECORD}, got {tuple(r)}")
        if r["level"] not in LEVELS:
            raise ValueError(f"record {i}: level {r['level']!r} is not one of {LEVELS}")
        if r["mode"] not in ("fwd", "bwd", "fwd+bwd", "train_step", "eval"):
            raise ValueError(f"record {i}: bad mode {r['mode']!r}")
        if not (isinstance(r["ms"], (int, float)) and r["ms"] > 0 and math.isfinite(r["ms"])):
            raise ValueError(f"record {i}: ms must be a positive number, got {r['ms']!r}")
        for key in ("gbps", "pct_copy_bw", "images_per_s", "peak_mem_bytes"):
            if r[key] is not None and not isinstance(r[key], (int, float)):
                raise ValueError(f"record {i}: {key} must be a number or null, got {r[key]!r}")
        times = r["times_ms"]
        if times is not None and not (isinstance(times, list) and times and all(
                isinstance(t, (int, float)) and t > 0 and math.isfinite(t) for t in times)):
            raise ValueError(f"record {i}: times_ms must be null or a list of positive numbers "
                             f"(the repeat timings), got {times!r}")


def write_json(results: dict, path: str) -> None:
    validate(results)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)  # atomic: a run killed mid-write leaves the previous complete file


def speedups(records) -> dict:
    """{id(record): (vs_eager, vs_compile)} — reference ms / this ms for the same level, case, dtype
    and mode; None where the reference was not measured."""
    ref = {}
    for r in records:
        if r["impl"] in ("eager", "compile"):
            ref[(r["impl"], r["level"], r["case"], r["dtype"], r["mode"])] = r["ms"]
    out = {}
    for r in records:
        key = (r["level"], r["case"], r["dtype"], r["mode"])
        e, c = ref.get(("eager",) + key), ref.get(("compile",) + key)
        out[id(r)] = (e / r["ms"] if e else None, c / r["ms"] if c else None)
    return out


def _num(v, fmt):
    return "" if v is None else format(v, fmt)


def _sig(v):
    """A number with about three significant figures (GB/s spans 0.01 on CPU to 4000 on GPU)."""
    if v is None:
        return ""
    return format(v, ".0f" if abs(v) >= 100 else ".1f" if abs(v) >= 10 else ".2f")


def _mem(v):
    if v is None:
        return ""
    return f"{v / 2**30:.2f} GiB" if v >= 2**30 else f"{v / 2**20:.0f} MiB"


def _x(v):
    return "" if v is None else f"{v:.2f}x"


def _sort_key(r):
    return (LEVELS.index(r["level"]), r["case"], r["dtype"], r["mode"],
            IMPL_ORDER.index(r["impl"]) if r["impl"] in IMPL_ORDER else len(IMPL_ORDER))


def table(headers, rows) -> str:
    """A GitHub markdown table (no dependency on tabulate)."""
    numeric = [all(_is_number(row[i]) for row in rows if row[i] != "") for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _is_number(s):
    s = str(s).rstrip("x%").replace(" GiB", "").replace(" MiB", "")
    try:
        float(s)
        return True
    except ValueError:
        return False


HEADERS = ("case", "impl", "dtype", "mode", "ms", "GB/s", "% copy bw", "images/s", "peak mem",
           "speedup vs eager", "speedup vs compile")


def rows_of(records):
    sp = speedups(records)
    rows = []
    for r in sorted(records, key=_sort_key):
        e, c = sp[id(r)]
        rows.append((r["case"], r["impl"], r["dtype"], r["mode"], _num(r["ms"], ".3f"),
                     _sig(r["gbps"]), _sig(r["pct_copy_bw"]),
                     _num(r["images_per_s"], ".0f"), _mem(r["peak_mem_bytes"]), _x(e), _x(c)))
    return rows


def markdown(results: dict, skipped=(), note: str = "") -> str:
    recs = results["records"]
    out = [f"# fastres benchmark results", "",
           f"- device: {results['device']}",
           f"- torch {results['torch']}, triton {results['triton']}, CUDA {results['cuda']}",
           f"- commit {results['commit']}, {results['date']}"]
    if note:
        out += ["", note]
    out += ["", "Times are medians after warm-up; GB/s counts the minimum traffic of the fused op "
            "(see benchmarks/README.md); speedups are the reference's ms / this ms.", ""]
    titles = {"model": "Model level", "op": "Op level (BN + add + ReLU)",
              "block": "Block level"}
    for level in ("model", "op", "block"):
        level_recs = [r for r in recs if r["level"] == level]
        if level_recs:
            out += [f"## {titles[level]}", "", table(HEADERS, rows_of(level_recs)), ""]
    if skipped:
        out += ["## Not measured", ""] + [f"- {s}" for s in skipped] + [""]
    return "\n".join(out)


def headline(results: dict) -> str:
    """The model-level table, for the project README."""
    recs = [r for r in results["records"] if r["level"] == "model"]
    return (f"{results['device']}, torch {results['torch']}, triton {results['triton']}, "
            f"commit {results['commit']}, {results['date']}\n\n" + table(HEADERS, rows_of(recs)))


def write_markdown(results: dict, path: str, skipped=(), note: str = "") -> None:
    with open(path, "w") as f:
        f.write(markdown(results, skipped, note))


def write_plot(results: dict, path: str) -> str | None:
    """Horizontal bars of the speedup vs eager of every non-eager implementation, one panel per
    level. Returns why no plot was written, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib is not importable ({e}): no plot"
    recs = [r for r in results["records"] if r["impl"] in IMPL_ORDER]
    sp = speedups(recs)
    panels = []
    for level in ("model", "op", "block"):
        labels, series = [], defaultdict(dict)
        for r in sorted((r for r in recs if r["level"] == level), key=_sort_key):
            label = f"{r['case']} {r['dtype']} {r['mode']}"
            vs_eager = sp[id(r)][0]
            if r["impl"] == "eager" or vs_eager is None:
                continue
            if label not in labels:
                labels.append(label)
            series[r["impl"]][label] = vs_eager
        if labels:
            panels.append((level, labels, series))
    if not panels:
        return "no speedup to plot (only one implementation measured)"
    heights = [max(2.0, 0.22 * len(labels) * max(1, len(series)) ** 0.5 + 1) for _, labels, series in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, sum(heights)),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    for ax, (level, labels, series) in zip(axes[:, 0], panels):
        impls = [i for i in IMPL_ORDER if i in series]
        bar = 0.8 / len(impls)
        for j, impl in enumerate(impls):
            ys = [i + (j - (len(impls) - 1) / 2) * bar for i in range(len(labels))]
            xs = [series[impl].get(label, 0.0) for label in labels]
            ax.barh(ys, xs, height=bar, label=impl)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels, fontsize=6 if len(labels) > 20 else 8)
        ax.invert_yaxis()
        ax.set_xlabel("speedup vs eager (higher is better)")
        cpu = " (CPU figures — not GPU performance)" if str(results["device"]).startswith("cpu") else ""
        ax.set_title(f"{level} level — {results['device']}{cpu}", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _geomean(xs):
    xs = [x for x in xs if x]
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else None


def summary(results: dict) -> str:
    """A short plain-text table: every model-level row, then per-level geometric-mean speedups."""
    recs = results["records"]
    sp = speedups(recs)
    lines = [f"device: {results['device']}  torch {results['torch']}  triton {results['triton']}  "
             f"commit {results['commit']}"]
    copy = [r for r in recs if r["impl"] == "torch.copy_"]
    if copy:
        lines.append(f"device copy bandwidth: {_sig(copy[0]['gbps'])} GB/s")
    model = sorted((r for r in recs if r["level"] == "model"), key=_sort_key)
    if model:
        lines.append("")
        lines.append(f"{'model':26s} {'impl':16s} {'dtype':9s} {'mode':10s} {'ms':>9s} "
                     f"{'images/s':>9s} {'peak mem':>10s} {'vs eager':>8s} {'vs comp.':>8s}")
        for r in model:
            e, c = sp[id(r)]
            lines.append(f"{r['case']:26s} {r['impl']:16s} {r['dtype']:9s} {r['mode']:10s} "
                         f"{r['ms']:9.2f} {_num(r['images_per_s'], '.0f'):>9s} "
                         f"{_mem(r['peak_mem_bytes']):>10s} {_x(e):>8s} {_x(c):>8s}")
    groups = defaultdict(list)
    for r in recs:
        if r["level"] in ("op", "block") and r["impl"] in IMPL_ORDER:
            groups[(r["level"], r["impl"], r["dtype"], r["mode"])].append(r)
    if groups:
        lines.append("")
        lines.append(f"{'level':6s} {'impl':16s} {'dtype':9s} {'mode':8s} {'cases':>5s} "
                     f"{'geomean vs eager':>16s} {'vs compile':>10s} {'mean % copy bw':>14s}")
        for key in sorted(groups, key=lambda k: (LEVELS.index(k[0]), k[2], k[3],
                                                 IMPL_ORDER.index(k[1]))):
            rs = groups[key]
            pct = [r["pct_copy_bw"] for r in rs if r["pct_copy_bw"] is not None]
            lines.append(f"{key[0]:6s} {key[1]:16s} {key[2]:9s} {key[3]:8s} {len(rs):5d} "
                         f"{_x(_geomean(sp[id(r)][0] for r in rs)):>16s} "
                         f"{_x(_geomean(sp[id(r)][1] for r in rs)):>10s} "
                         f"{_sig(sum(pct) / len(pct) if pct else None):>14s}")
    if not recs:
        lines.append("no records")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Paired ratios (CPU): each round of ``Timer.measure_interleaved`` times every implementation once,
# back to back, so eager_i / impl_i is a speedup with the machine's load of that moment divided
# out. Their median and quartiles are the figure and its spread.

VS_EAGER_THRESHOLD = 0.95  # issue 13: fastres "auto" on CPU at >= 0.95x eager, op and block level


def quartiles(xs) -> tuple:
    """(q1, median, q3) by linear interpolation (statistics.quantiles' "inclusive" method)."""
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    import statistics

    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def paired_row(level, case, dtype, mode, impl, eager_times, impl_times) -> dict:
    """One row of vs_eager.json from the round-ordered timings of one interleaved measurement."""
    ratios = [e / t for e, t in zip(eager_times, impl_times)]
    q1, med, q3 = quartiles(ratios)
    return {"level": level, "case": case, "dtype": dtype, "mode": mode, "impl": impl,
            "rounds": len(ratios), "speedup_median": round(med, 4), "speedup_q1": round(q1, 4),
            "speedup_q3": round(q3, 4), "eager_ms_median": round(quartiles(eager_times)[1], 5),
            "impl_ms_median": round(quartiles(impl_times)[1], 5)}


def vs_eager_groups(rows) -> list:
    """Per (level, impl, dtype, mode): cases, geometric mean and minimum of the median paired
    speedups, and how many cases sit below the threshold by their median and by their whole
    interquartile range (q3 < threshold: slower beyond the run's own noise)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["level"], r["impl"], r["dtype"], r["mode"])].append(r)
    out = []
    for (level, impl, dtype, mode), rs in sorted(groups.items(), key=lambda kv: (
            LEVELS.index(kv[0][0]), kv[0][1], kv[0][2], kv[0][3])):
        meds = [r["speedup_median"] for r in rs]
        worst = min(rs, key=lambda r: r["speedup_median"])
        out.append({"level": level, "impl": impl, "dtype": dtype, "mode": mode, "cases": len(rs),
                    "geomean": round(_geomean(meds), 4), "min": worst["speedup_median"],
                    "min_case": worst["case"],
                    "min_iqr": [worst["speedup_q1"], worst["speedup_q3"]],
                    "below_by_median": sum(m < VS_EAGER_THRESHOLD for m in meds),
                    "below_by_q3": sum(r["speedup_q3"] < VS_EAGER_THRESHOLD for r in rs)})
    return out


def vs_eager_markdown(info: dict, rows, note: str = "") -> str:
    lines = [f"# Speedup vs eager, paired per round ({info['device']})", "",
             f"torch {info['torch']}, commit {info['commit']}, {info['date']}. " + note, "",
             "Each round times eager and fastres once each, back to back (order alternating); "
             "the speedup is eager's time / fastres's in the same round. Median [q1, q3] over the "
             f"rounds. Threshold {VS_EAGER_THRESHOLD}x.", "", "## Per level and mode", ""]
    groups = vs_eager_groups(rows)
    lines.append(table(("level", "impl", "dtype", "mode", "cases", "geomean", "min (case)",
                        "min's [q1, q3]", f"cases < {VS_EAGER_THRESHOLD} (median)",
                        f"cases < {VS_EAGER_THRESHOLD} (q3)"),
                       [(g["level"], g["impl"], g["dtype"], g["mode"], g["cases"],
                         f"{g['geomean']:.3f}x", f"{g['min']:.3f}x ({g['min_case']})",
                         f"[{g['min_iqr'][0]:.3f}, {g['min_iqr'][1]:.3f}]", g["below_by_median"],
                         g["below_by_q3"]) for g in groups]))
    lines += ["", "## Per case", ""]
    lines.append(table(("level", "case", "mode", "impl", "rounds", "eager ms", "impl ms",
                        "speedup median", "[q1, q3]"),
                       [(r["level"], r["case"], r["mode"], r["impl"], r["rounds"],
                         f"{r['eager_ms_median']:.4f}", f"{r['impl_ms_median']:.4f}",
                         f"{r['speedup_median']:.3f}x",
                         f"[{r['speedup_q1']:.3f}, {r['speedup_q3']:.3f}]") for r in rows]))
    return "\n".join(lines) + "\n"


def write_vs_eager(info: dict, rows, out_dir: str, note: str = "") -> tuple:
    """DIR/vs_eager.json ({device, torch, commit, date, threshold, groups, rows}) and
    DIR/vs_eager.md."""
    doc = {k: info[k] for k in ("device", "torch", "commit", "date")}
    doc.update(threshold=VS_EAGER_THRESHOLD, groups=vs_eager_groups(rows), rows=list(rows))
    json_path = os.path.join(out_dir, "vs_eager.json")
    md_path = os.path.join(out_dir, "vs_eager.md")
    with open(json_path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    with open(md_path, "w") as f:
        f.write(vs_eager_markdown(info, rows, note))
    return json_path, md_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("results", help="a results.json")
    p.add_argument("--summary", metavar="FILE", help="also write the summary to FILE")
    p.add_argument("--md", action="store_true", help="rewrite results.md next to results.json")
    p.add_argument("--plot", action="store_true", help="rewrite speedups.png next to results.json")
    p.add_argument("--headline", action="store_true",
                   help="print only the model-level markdown table (for the README)")
    args = p.parse_args(argv)
    try:
        with open(args.results) as f:
            results = json.load(f)
        validate(results)
    except (OSError, ValueError) as e:
        print(f"benchmarks.report: cannot read {args.results}: {e}", file=sys.stderr)
        return 1
    if args.headline:
        print(headline(results))
        return 0
    text = summary(results)
    print(text)
    if args.summary:
        with open(args.summary, "a") as f:
            f.write(text + "\n")
    folder = os.path.dirname(os.path.abspath(args.results))
    if args.md:
        write_markdown(results, os.path.join(folder, "results.md"))
    if args.plot:
        why = write_plot(results, os.path.join(folder, "speedups.png"))
        if why:
            print(why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
