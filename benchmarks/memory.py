"""Activation memory of a ResNet's training step, counted without a GPU (``fastres.memory``).

    python -m benchmarks.memory --model resnet50 --batch 256 [--dtype bf16|fp32 ...]
                                [--image-size 224] [--out DIR]

Counts the bytes autograd saves for backward in one training forward — eager (torchvision), the
``fastres.convert`` default path, normconv forced on (``set_normconv("on")``, as
``FASTRES_NORMCONV=1``), and ``fastres.convert(model, recompute_block_outputs=True)`` on the
default path ("recompute") and with normconv ("recompute+normconv") — on fake CUDA tensors (no
memory is allocated, so batch 256 at 224² costs a few seconds of CPU), with a per-block breakdown. Parameters and their dtype casts (autocast's bf16
weights, which do not grow with the batch) are excluded from the activation bytes and reported
apart. bf16 / fp16 mean autocast with fp32 parameters, channels_last (the benchmark suite's
set-up). Writes DIR/memory.json and DIR/memory.md when ``--out`` is given.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
VARIANTS = ("eager", "default", "normconv", "recompute", "recompute+normconv")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "memory")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["resnet50"],
                   help="torchvision model name(s) (default resnet50)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    p.add_argument("--out", metavar="DIR", help=f"write memory.json and memory.md there "
                                                f"(the committed results: {DEFAULT_OUT})")
    return p.parse_args(argv)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, text=True,
                              capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def measure(model_name: str, batch: int, image_size: int, dtype: torch.dtype) -> dict:
    """Saved bytes of every variant (VARIANTS) for one model and dtype, as a JSON-ready dict."""
    reports = variant_reports(model_name, batch, image_size, dtype)
    base = reports["eager"].activation_bytes
    return {
        "model": model_name, "batch": batch, "image_size": image_size,
        "dtype": str(dtype).replace("torch.", ""), "autocast": reports["eager"].autocast,
        "variants": {v: {**r.as_dict(), "ratio_vs_eager": r.activation_bytes / base}
                     for v, r in reports.items()},
    }


def variant_reports(model_name: str, batch: int, image_size: int, dtype: torch.dtype) -> dict:
    """{variant: fastres.memory report} for every variant (VARIANTS) of one torchvision model."""
    import torchvision

    import fastres
    from fastres.memory import saved_activation_bytes
    from fastres.nn import normconv

    torch.manual_seed(0)
    eager = getattr(torchvision.models, model_name)()
    converted = fastres.convert(eager)
    recomputing = fastres.convert(eager, recompute_block_outputs=True)
    shape = (batch, 3, image_size, image_size)
    reports = {}
    prev = normconv.get_normconv()
    try:
        for variant in VARIANTS:
            normconv.set_normconv("on" if variant.endswith("normconv") else "off")
            model = {"eager": eager, "default": converted, "normconv": converted}.get(
                variant, recomputing)
            reports[variant] = saved_activation_bytes(model, shape, dtype)
    finally:
        normconv.set_normconv(prev)
    return reports


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f}"


def markdown(results: list, meta: dict) -> str:
    lines = ["# Activation memory saved for backward (counted, not measured on a GPU)", "",
             f"Counted by `python -m benchmarks.memory` (fastres.memory: saved-tensor hooks on fake "
             f"CUDA tensors, distinct storages, parameters and their casts excluded) at commit "
             f"{meta['commit']}, torch {meta['torch']}, {meta['date']}.", "",
             "| model | dtype | batch | image | eager MiB | "
             + " | ".join(f"{n} MiB | {n} / eager" for n in VARIANTS[1:]) + " |",
             "|---|---|---|---|---|" + "---|---|" * (len(VARIANTS) - 1)]
    for r in results:
        v = r["variants"]
        cells = [f"{_mib(v[n]['activation_bytes'])} | {v[n]['ratio_vs_eager']:.3f}"
                 for n in VARIANTS[1:]]
        lines.append(
            f"| {r['model']} | {r['dtype']}{' (autocast)' if r['autocast'] else ''} | "
            f"{r['batch']} | {r['image_size']} | {_mib(v['eager']['activation_bytes'])} | "
            + " | ".join(cells) + " |")
    lines += ["", "recompute: `fastres.convert(model, recompute_block_outputs=True)` — no BN-act "
                  "output kept for backward, rebuilt there by re-running the same op "
                  "(fastres.nn.recompute; same gradients bit for bit; its time cost is unmeasured)."]
    for r in results:
        v = r["variants"]
        lines += ["", f"## {r['model']}, {r['dtype']}, batch {r['batch']}, {r['image_size']}²: "
                      "per block (MiB, by the block that produced the tensor)", "",
                  "| unit | " + " | ".join(VARIANTS) + " |", "|---" * len(VARIANTS) + "|---|"]
        units = list(dict.fromkeys([u for name in VARIANTS for u in v[name]["by_unit"]]))
        for u in units:
            cells = [_mib(v[name]["by_unit"].get(u, 0)) for name in VARIANTS]
            lines.append(f"| {u} | " + " | ".join(cells) + " |")
        copies = v["eager"]["parameter_copy_bytes"]
        if copies:
            lines += ["", f"Parameter casts saved by autocast (not counted above, same in all "
                          f"variants): {_mib(copies)} MiB."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    results = [measure(m, args.batch, args.image_size, DTYPES[d])
               for m in args.model for d in args.dtype]
    meta = {"commit": _commit(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
            "command": "python -m benchmarks.memory " + " ".join(argv if argv is not None
                                                                 else sys.argv[1:])}
    text = markdown(results, meta)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        with open(os.path.join(args.out, "memory.md"), "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
