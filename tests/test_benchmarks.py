"""The benchmark suite on CPU: case derivation, byte model, results schema, report writers, the
runner's CPU mode and time budget, and ``benchmarks/gpu_check.sh --dry-run``."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `pytest tests` (not `python -m pytest`) does not put the repo on sys.path
    sys.path.insert(0, ROOT)

from benchmarks import cases as C  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from benchmarks import report  # noqa: E402
from benchmarks import run  # noqa: E402


def torchvision_layers(arch, image_size=224):
    """(BN output (C,H,W) + residual/act flags, conv specs) of torchvision's ResNet, on meta tensors."""
    tv = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = getattr(tv.models, arch)(weights=None)
    last_bn = "bn3" if arch in ("resnet50", "resnet101") else "bn2"
    bns, convs = [], []

    def bn_hook(name):
        def hook(mod, inp, out):
            residual = name.endswith(last_bn) and name.startswith("layer")
            act = None if name.endswith("downsample.1") else "relu"
            bns.append(C.BNSpec(out.shape[1], out.shape[2], out.shape[3], residual, act))
        return hook

    def conv_hook(mod, inp, out):
        x = inp[0]
        convs.append(C.ConvSpec(mod.in_channels, mod.out_channels, mod.kernel_size[0],
                                mod.stride[0], mod.padding[0], x.shape[2], x.shape[3]))

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.register_forward_hook(bn_hook(name))
        elif isinstance(mod, torch.nn.Conv2d):
            mod.register_forward_hook(conv_hook)
    model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return bns, convs


@pytest.mark.parametrize("arch,image_size", [("resnet50", 224), ("resnet18", 224), ("resnet50", 64)])
def test_architecture_walk_matches_torchvision(arch, image_size):
    bns, convs = torchvision_layers(arch, image_size)
    ours = C.resnet_layers(arch, image_size)
    assert ours.bns == bns
    assert ours.convs == convs


def test_resnet50_op_cases_are_the_distinct_bn_shapes():
    cases = C.op_cases(256)
    specs = [c.spec for c in cases]
    assert len(set(specs)) == len(specs) == 16
    assert (256, 64, 112, 112) in [c.shape for c in cases]
    with_residual = {(s.channels, s.height) for s in specs if s.residual}
    assert with_residual == {(256, 56), (512, 28), (1024, 14), (2048, 7)}
    assert all(s.activation == "relu" for s in specs if s.residual)
    assert {c.shape for c in C.quick_suite().ops} == {(64,) + c.shape[1:] for c in cases}


def test_op_byte_model():
    no_res = C.OpCase(4, C.BNSpec(8, 5, 5, False, "relu"))
    res = C.OpCase(4, C.BNSpec(8, 5, 5, True, "relu"))
    n = 4 * 8 * 5 * 5
    # forward: read x (+ residual), write y; backward: read dy, x (+ residual), write dx (+ dres)
    assert H.op_bytes(no_res, torch.bfloat16) == {"fwd": 2 * n * 2, "bwd": 3 * n * 2}
    assert H.op_bytes(res, torch.float32) == {"fwd": 3 * n * 4, "bwd": 5 * n * 4}


def test_pool_size_rotates_only_inputs_that_fit_in_l2():
    cpu = torch.device("cpu")
    assert H.pool_size(cpu, 1000) == 1  # no L2 model on CPU
    if torch.cuda.is_available():
        l2 = H.l2_bytes(torch.device("cuda"))
        assert H.pool_size(torch.device("cuda"), 8 * l2) == 1
        assert H.pool_size(torch.device("cuda"), l2 // 2) == 8


def test_eager_fallback_without_torchvision(monkeypatch):
    """Without torchvision the eager block is fastres's class with plain nn.BatchNorm2d + ReLU, and the
    fused one computes the same thing from the same weights."""
    fastres = pytest.importorskip("fastres")
    if not hasattr(fastres, "models") or not hasattr(fastres, "BatchNormAct2d"):
        pytest.skip("fastres.models is not on this branch yet")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError
    case = C.block_cases(2, 16, "resnet18")[1]  # BasicBlock 64->128 s2 with downsample
    assert case.spec.downsample
    cpu = torch.device("cpu")
    eager = H.eager_block(case, cpu)
    assert not any(isinstance(m, fastres.BatchNormAct2d) for m in eager.modules())
    fused = H.to_fastres(eager, case)
    assert sum(isinstance(m, fastres.BatchNormAct2d) for m in fused.modules()) == 3
    x = torch.randn(H.block_input_shape(case))
    with fastres.use_backend("torch"):
        torch.testing.assert_close(fused(x), eager(x))


def _results(records):
    return {"device": "test", "torch": "t", "triton": None, "cuda": None, "commit": None,
            "date": "2026-01-01T00:00:00+00:00", "records": records}


def _sample():
    r = H.make_record
    return _results([
        r("op", "bn+relu 2x8x4x4", "eager", "float32", "fwd", 2.0, 10.0, 50.0),
        r("op", "bn+relu 2x8x4x4", "compile", "float32", "fwd", 1.0, 20.0, 100.0),
        r("op", "bn+relu 2x8x4x4", "fastres-triton", "float32", "fwd", 0.5, 40.0, 200.0),
        r("model", "resnet18 2x3x32x32", "eager", "bfloat16", "train_step", 4.0, images_per_s=500.0,
          peak_mem_bytes=3 << 30),
        r("model", "resnet18 2x3x32x32", "fastres-cuda", "bfloat16", "train_step", 3.0,
          images_per_s=666.7, peak_mem_bytes=2 << 30),
    ])


def test_schema_validation():
    good = _sample()
    report.validate(good)
    bad = copy.deepcopy(good)
    bad["extra"] = 1
    with pytest.raises(ValueError, match="keys"):
        report.validate(bad)
    bad = copy.deepcopy(good)
    del bad["records"][0]["gbps"]
    with pytest.raises(ValueError, match="record 0 keys"):
        report.validate(bad)
    bad = copy.deepcopy(good)
    bad["records"][1]["mode"] = "train"
    with pytest.raises(ValueError, match="bad mode"):
        report.validate(bad)
    bad = copy.deepcopy(good)
    bad["records"][2]["ms"] = float("nan")
    with pytest.raises(ValueError, match="ms"):
        report.validate(bad)


def test_speedups_and_writers(tmp_path):
    res = _sample()
    sp = report.speedups(res["records"])
    fused = res["records"][2]
    assert sp[id(fused)] == (4.0, 2.0)
    assert sp[id(res["records"][4])] == (4.0 / 3.0, None)  # no compile row for the model
    report.write_json(res, str(tmp_path / "results.json"))
    assert json.loads((tmp_path / "results.json").read_text()) == res
    report.write_markdown(res, str(tmp_path / "results.md"), skipped=["x: skipped — because"])
    md = (tmp_path / "results.md").read_text()
    assert "| case | impl | dtype | mode | ms | GB/s | % copy bw | images/s | peak mem | speedup vs eager " \
           "| speedup vs compile |" in md
    assert "| bn+relu 2x8x4x4 | fastres-triton | float32 | fwd | 0.500 | 40.0 | 200 |  |  | 4.00x | 2.00x |" in md
    assert "3.00 GiB" in md and "x: skipped — because" in md
    assert "| resnet18 2x3x32x32 | fastres-cuda | bfloat16 | train_step |" in report.headline(res)
    text = report.summary(res)
    assert "resnet18 2x3x32x32" in text and "1.33x" in text
    pytest.importorskip("matplotlib")
    assert report.write_plot(res, str(tmp_path / "speedups.png")) is None
    assert (tmp_path / "speedups.png").read_bytes()[:4] == b"\x89PNG"


def test_runner_needs_a_gpu_or_the_cpu_flag(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert run.main(["--tiny"]) == 2
    assert "--cpu-if-no-gpu" in capsys.readouterr().err


def test_runner_lists_cases(capsys):
    assert run.main(["--quick", "--device", "cpu", "--list"]) == 0
    out = capsys.readouterr().out
    assert "bn+add+relu 64x2048x7x7" in out and "Bottleneck" in out


def test_runner_time_budget_skips_cases(tmp_path, capsys):
    rc = run.main(["--tiny", "--device", "cpu", "--out", str(tmp_path), "--time-budget", "0",
                   "--no-plot", "--backends", "eager,fastres-cuda"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    report.validate(res)
    assert [r["impl"] for r in res["records"]] == ["torch.copy_"]  # only the copy bandwidth
    md = (tmp_path / "results.md").read_text()
    assert "time budget" in md and "fastres-cuda" in md  # the unavailable backend says why
    assert "CPU figures — not GPU performance" in capsys.readouterr().out


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), "--dry-run",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc, out


def test_gpu_check_dry_run(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "setup.py build_ext --inplace" in proc.stdout and "pytest tests -m gpu" in proc.stdout
    assert "benchmarks.run --quick --out" in proc.stdout
    files = sorted(os.listdir(out))
    assert set(files) <= {"build.log", "tests.log", "bench.log", "results.json", "results.md",
                          "speedups.png", "auto_table.json", "normconv_table.json",
                          "summary.txt"}, files
    # the tables from the CPU figures: written into OUTDIR, with the run's device in their header
    assert "benchmarks.tables OUTDIR/results.json --install" in proc.stdout
    for name in ("auto_table.json", "normconv_table.json"):
        assert json.loads((out / name).read_text())["device"].startswith("cpu")
    # the summary table is printed last, and is what summary.txt holds
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    assert "FAILED" not in summary


def test_gpu_check_dry_run_results(dry_run):
    proc, out = dry_run
    res = json.loads((out / "results.json").read_text())
    report.validate(res)
    assert res["device"].startswith("cpu")
    recs = res["records"]
    # every timed case keeps its repeat timings (benchmarks.tables estimates the noise from them)
    assert all(r["times_ms"] and 0.999 * min(r["times_ms"]) <= r["ms"] <= 1.001 * max(r["times_ms"])
               for r in recs if r["impl"] != "torch.copy_")
    ops = [r for r in recs if r["level"] == "op" and r["impl"] == "eager"]
    assert {r["mode"] for r in ops} == {"fwd", "bwd", "fwd+bwd"}  # fwd+bwd: the CPU suite only
    assert all(r["gbps"] > 0 and r["pct_copy_bw"] > 0 and r["images_per_s"] is None for r in ops)
    fused = [r for r in recs if r["impl"] == "fastres-auto" and r["level"] == "op"]
    assert len(fused) == len(ops)  # the default backend vs eager, case for case
    blocks = [r for r in recs if r["level"] == "block"]
    assert {r["mode"] for r in blocks} == {"fwd+bwd", "eval"}
    assert all(r["gbps"] is None for r in blocks)
    models = [r for r in recs if r["level"] == "model" and r["impl"] == "eager"]
    assert {r["mode"] for r in models} == {"train_step", "eval"}
    assert all(r["images_per_s"] > 0 for r in models)
    assert "CPU figures" in (out / "results.md").read_text()


def test_gpu_check_usage():
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr


def test_a_failing_implementation_does_not_stop_the_case(monkeypatch):
    def broken(activation):
        raise RuntimeError("boom")

    monkeypatch.setattr(H, "fastres_bn_act", broken)
    case = C.OpCase(2, C.BNSpec(4, 3, 3, True, "relu"))
    cpu = torch.device("cpu")
    timer = H.Timer(cpu, cpu_budget_s=0.0, cpu_max_reps=3)
    logged = []
    records, notes, text = run.run_unit(case, "float32", ["eager", "fastres-torch"], cpu, timer,
                                        None, 1.0, logged.append)
    assert [(r["impl"], r["mode"]) for r in records] == [("eager", "fwd"), ("eager", "bwd"),
                                                         ("eager", "fwd+bwd")]
    assert notes == [f"op {case.name} float32 fastres-torch: FAILED — RuntimeError: boom"]
    assert any("RuntimeError: boom" in line for line in logged)  # the traceback is logged
    assert all(r["gbps"] > 0 and r["pct_copy_bw"] == pytest.approx(100 * r["gbps"]) for r in records)


def test_cpu_timer_interleaves_and_pairs(tmp_path):
    """CPU: implementations take turns within each round, the order rotating; the paired speedups
    (eager_i / impl_i of the same round) give vs_eager.json / .md."""
    calls, order = {}, []
    for name, ms in (("eager", 2e-3), ("fastres-auto", 1e-3)):
        def fn(name=name, ms=ms):
            order.append(name)
            t_end = time.perf_counter() + ms
            while time.perf_counter() < t_end:
                pass
        calls[name] = (fn, None, contextlib.nullcontext)
    timer = H.Timer(torch.device("cpu"), cpu_budget_s=0.0, cpu_max_reps=6, cpu_min_reps=6)
    times = timer.measure_interleaved(calls)
    assert order[:2] == ["eager", "fastres-auto"]  # the warm-up calls
    rounds = [order[i:i + 2] for i in range(2, len(order), 2)]
    assert len(rounds) == 6 and all(sorted(r) == ["eager", "fastres-auto"] for r in rounds)
    assert rounds[0] != rounds[1]  # the order alternates
    row = report.paired_row("op", "case", "float32", "fwd", "fastres-auto", times["eager"],
                            times["fastres-auto"])
    assert row["rounds"] == 6 and row["speedup_q1"] <= row["speedup_median"] <= row["speedup_q3"]
    assert 1.3 < row["speedup_median"] < 3  # 2 ms vs 1 ms
    slow = dict(row, case="slow", speedup_median=0.9, speedup_q1=0.85, speedup_q3=0.93)
    info = {"device": "cpu: test", "torch": torch.__version__, "commit": "abc", "date": "today"}
    json_path, md_path = report.write_vs_eager(info, [row, slow], str(tmp_path))
    doc = json.loads(open(json_path).read())
    (group,) = doc["groups"]
    assert group["cases"] == 2 and group["min"] == 0.9 and group["min_case"] == "slow"
    assert group["below_by_median"] == 1 and group["below_by_q3"] == 1
    assert "| op | fastres-auto | float32 | fwd | 2 |" in open(md_path).read()


def test_committed_cpu_reference_is_what_the_readme_shows():
    """benchmarks/README.md's "CPU: fastres auto vs eager" table is the committed run's
    (benchmarks/results/cpu_reference/vs_eager.json), and that run meets issue 13's threshold."""
    ref = os.path.join(ROOT, "benchmarks", "results", "cpu_reference")
    doc = json.loads(open(os.path.join(ref, "vs_eager.json")).read())
    readme = open(os.path.join(ROOT, "benchmarks", "README.md")).read()
    assert doc["device"].startswith("cpu") and doc["commit"][:7] in readme
    assert {(g["level"], g["mode"]) for g in doc["groups"]} == {
        ("op", "fwd"), ("op", "bwd"), ("op", "fwd+bwd"), ("block", "fwd+bwd"), ("block", "eval")}
    for g in doc["groups"]:
        row = (f"| {g['level']} | {g['mode']} | {g['cases']} | {g['geomean']:.3f}x | "
               f"{g['min']:.3f}x ({g['min_case']}) | "
               f"[{g['min_iqr'][0]:.3f}, {g['min_iqr'][1]:.3f}] "
               f"| {g['below_by_median']} | {g['below_by_q3']} |")
        assert row in readme, row
        assert g["impl"] == "fastres-auto" and g["below_by_median"] == 0 and g["below_by_q3"] == 0
    assert all(r["rounds"] >= 10 for r in doc["rows"])
