"""pytest-benchmark entry points for the same cases as ``python -m benchmarks.run --quick``:

    pytest benchmarks/ --benchmark-only [-k resnet50] [--benchmark-json out.json]

Cases and builders come from benchmarks.cases / benchmarks.harness, so both report the same thing.
Skipped without a CUDA device (the CPU figures come from ``make bench``). ``make test`` runs
``pytest tests`` and does not collect this file.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks import cases as C  # noqa: E402
from benchmarks import harness as H  # noqa: E402

# FASTRES_BENCH_DEVICE=cpu runs the entry points on CPU (a smoke test of this file, not a benchmark).
DEVICE = torch.device(os.environ.get("FASTRES_BENCH_DEVICE", "cuda"))
pytestmark = pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device")

SUITE = C.quick_suite()
IMPLS = H.GPU_IMPLS


def _params(cases, dtypes):
    return [pytest.param(case, dtype, id=f"{case.name.replace(' ', '_')}-{dtype}")
            for dtype in dtypes for case in cases]


def _run(benchmark, case, impl, dtype, mode):
    device = DEVICE
    why = H.impl_unavailable(impl, device)
    if why:
        pytest.skip(why)
    try:
        with H.impl_context(impl):
            bench = H.build(case, impl, H.DTYPES[dtype], device)[mode]
            grads = bench.grad_to_none

            def call():
                H._clear_grads(grads)
                bench.fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()

            for _ in range(3):  # warm-up (and compilation)
                call()
            benchmark.extra_info.update(level=case.level, case=case.name, impl=impl, dtype=dtype,
                                        mode=mode, bytes=bench.bytes, images=bench.images)
            benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=2)
    except H.Skip as e:
        pytest.skip(str(e))
    finally:
        if impl == "compile":
            import torch._dynamo

            torch._dynamo.reset()
        H.release()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd", "bwd"])
@pytest.mark.parametrize("case,dtype", _params(SUITE.ops, SUITE.dtypes["op"]))
def test_op(benchmark, case, dtype, mode, impl):
    _run(benchmark, case, impl, dtype, mode)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["fwd+bwd", "eval"])
@pytest.mark.parametrize("case,dtype", _params(SUITE.blocks, SUITE.dtypes["block"]))
def test_block(benchmark, case, dtype, mode, impl):
    _run(benchmark, case, impl, dtype, mode)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", ["train_step", "eval"])
@pytest.mark.parametrize("case,dtype", _params(SUITE.models, SUITE.dtypes["model"]))
def test_model(benchmark, case, dtype, mode, impl):
    _run(benchmark, case, impl, dtype, mode)
