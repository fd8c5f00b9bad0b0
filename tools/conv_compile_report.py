"""Compile fastres's conv kernels ahead of time for a GPU architecture — no GPU needed — and print,
per kernel variant and autotune configuration, the compiler's resource report: registers, spill
stack bytes (cuobjdump), dynamic shared memory and whether the loads were software-pipelined.

    python tools/conv_compile_report.py [--arch 90] [--dtype bf16] [--kernels fwd,dgrad,wgrad]

Run it without TRITON_INTERPRET (it unsets it). Registers near 255 are the norm for Triton's Hopper
matmuls; a non-zero STACK means spills.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastres.triton import conv  # noqa: E402

# kernel -> (pointer argument types, [variant constexprs]); "act" is the activation dtype.
KERNELS = {
    "fwd": (conv._conv_fwd_kernel,
            dict(X="act", W="act", Y="act", SCALE="fp32", SHIFT="fp32", TILE_MEAN="fp32",
                 TILE_M2="fp32", BIAS="fp32", RESIDUAL="act"),
            [dict(R=3, PLAIN_GEMM=False, HAS_PROLOGUE=True, HAS_STATS=True),
             dict(R=1, PLAIN_GEMM=True, HAS_PROLOGUE=True, HAS_STATS=True),
             dict(R=7, PLAIN_GEMM=False, HAS_PROLOGUE=False, HAS_STATS=True),
             dict(R=3, PLAIN_GEMM=False, HAS_PROLOGUE=False, HAS_STATS=False)],
            dict(HAS_BIAS=False, HAS_RESIDUAL=False, RELU=False)),
    "dgrad": (conv._conv_dgrad_kernel,
              dict(DY="act", W="act", DX="act", X="act", SCALE="fp32", SHIFT="fp32",
                   TILE_SUM="fp32", TILE_SUM_X="fp32", Y="act", Y_MEAN="fp32", DY_ALPHA="fp32",
                   DY_BETA="fp32"),
              [dict(R=3, PLAIN_GEMM=False, HAS_PROLOGUE=True, HAS_DY_PROLOGUE=True),
               dict(R=1, PLAIN_GEMM=True, HAS_PROLOGUE=True, HAS_DY_PROLOGUE=True),
               dict(R=3, PLAIN_GEMM=False, HAS_PROLOGUE=False, HAS_DY_PROLOGUE=False)],
              {}),
    "wgrad": (conv._conv_wgrad_kernel,
              dict(DY="act", X="act", DW_PART="fp32", SCALE="fp32", SHIFT="fp32", Y="act",
                   Y_MEAN="fp32", DY_ALPHA="fp32", DY_BETA="fp32"),
              [dict(R=3, HAS_PROLOGUE=True, HAS_DY_PROLOGUE=True),
               dict(R=1, HAS_PROLOGUE=False, HAS_DY_PROLOGUE=False)],
              {}),
}


def resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    fields = dict(item.split(":", 1) for item in out.split() if ":" in item and item[0].isupper())
    return f"REG {fields.get('REG', '?'):>3}  STACK {fields.get('STACK', '?'):>4}"


def compile_variant(kernel, ptr_types, consts, config, dtype, arch):
    fn = kernel.fn  # the JITFunction under the Autotuner
    consts = dict(consts, **config.kwargs)
    consts["S"] = consts["R"]
    consts["INPUT_PRECISION"] = "tf32" if dtype == "fp32" else "ieee"
    signature = {}
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in ptr_types:
            signature[name] = "*" + (dtype if ptr_types[name] == "act" else ptr_types[name])
        else:
            signature[name] = "i32"
    src = ASTSource(fn=fn, signature=signature,
                    constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps,
                                   "num_stages": config.num_stages})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="SM version: 90 (H100/H200), 80 (A100)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--kernels", default="fwd,dgrad,wgrad")
    args = parser.parse_args(argv)
    for name in args.kernels.split(","):
        kernel, ptr_types, variants, fixed = KERNELS[name]
        for variant in variants:
            for config in conv.conv_configs(name):
                compiled = compile_variant(kernel, ptr_types, dict(fixed, **variant), config,
                                           args.dtype, args.arch)
                ttgir = compiled.asm["ttgir"]
                pipelined = ttgir.count("async_copy_global_to_local")
                tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                print(f"{name:5s} {str(variant):75s} {tile:10s} w{config.num_warps} "
                      f"s{config.num_stages}  {resource_usage(compiled.asm['cubin'])}  "
                      f"smem {compiled.metadata.shared:>6}  async-copies {pipelined}",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
