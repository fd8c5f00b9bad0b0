"""benchmarks.tables: the choice tables written from a (synthetic) results.json — clear wins chosen,
differences within the run's noise not, metadata written, and the files fastres loads round-trip."""
from __future__ import annotations

import json
import os
import random
import sys

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import cases as C  # noqa: E402
from benchmarks import harness as H  # noqa: E402
from benchmarks import tables as T  # noqa: E402
from fastres import backend  # noqa: E402
from fastres import tables as shipped  # noqa: E402
from fastres.nn import normconv  # noqa: E402

_rng = random.Random(0)


def times(ms, spread=0.01, n=30):
    """n repeat timings around ``ms`` with a relative spread (uniform, seeded)."""
    return [ms * (1 + spread * (2 * _rng.random() - 1)) for _ in range(n)]


def rec(level, case, impl, dtype, mode, ts):
    return H.make_record(level, case, impl, dtype, mode, sorted(ts)[len(ts) // 2], times_ms=ts)


def op_records(case, mode, triton_ms, cuda_ms, dtypes=("bfloat16", "float16"), spread=0.01):
    out = []
    for dtype in dtypes:
        out.append(rec("op", case, "eager", dtype, mode, times(2.0)))
        out.append(rec("op", case, "fastres-triton", dtype, mode, times(triton_ms, spread)))
        if cuda_ms is not None:
            out.append(rec("op", case, "fastres-cuda", dtype, mode, times(cuda_ms, spread)))
    return out


def block_records(case, train, evaluate, dtype="bfloat16"):
    """train / evaluate: (fallback ms, normconv ms)."""
    out = []
    for mode, (fb, nc) in (("fwd+bwd", train), ("eval", evaluate)):
        out.append(rec("block", case, "fastres-triton", dtype, mode, times(fb)))
        out.append(rec("block", case, "fastres-normconv", dtype, mode, times(nc)))
    return out


@pytest.fixture(scope="module")
def results():
    records = []
    # C=64: forward a clear cuda win at both NHW points (one merged rule); backward a 1 % difference
    # inside a 5 % spread (noise: no rule).
    records += op_records("bn+relu 64x64x112x112", "fwd", 1.0, 0.7)
    records += op_records("bn+relu 64x64x56x56", "fwd", 1.0, 0.6)
    records += op_records("bn+relu 64x64x56x56", "bwd", 1.0, 0.99, spread=0.05)
    # C=256, NHW 64*56*56: cuda wins with the residual but not in the downsample BN (same C, NHW): the
    # variants disagree, so no rule.
    records += op_records("bn+add+relu 64x256x56x56", "fwd", 1.0, 0.5)
    records += op_records("bn 64x256x56x56", "fwd", 1.0, 1.2)
    # C=2048: cuda wins at the small NHW, triton at the large one: a bounded rule.
    records += op_records("bn+add+relu 64x2048x7x7", "fwd", 0.1, 0.05)
    records += op_records("bn+add+relu 256x2048x7x7", "fwd", 0.3, 0.5)
    # C=512: a clear cuda win but without repeat timings (an old results file): no choice.
    for impl, ms in (("fastres-triton", 1.0), ("fastres-cuda", 0.5)):
        records.append(H.make_record("op", "bn+relu 64x512x28x28", impl, "bfloat16", "fwd", ms))
    # blocks: Bottleneck 256->256 wins (eval a tie); BasicBlock 64->64 within noise, which vetoes
    # the conv (64, 64, 3, 1) it shares with the bottleneck; Bottleneck 512->512 wins training but
    # loses eval; Bottleneck 1024->1024 wins.
    records += block_records("Bottleneck 256->256 s1 @64x56x56", (10.0, 8.0), (3.0, 3.0))
    records += block_records("BasicBlock 64->64 s1 @64x56x56", (5.0, 4.99), (2.0, 2.0))
    records += block_records("Bottleneck 512->512 s1 @64x28x28", (6.0, 5.0), (2.0, 2.5))
    records += block_records("Bottleneck 1024->1024 s1 @64x14x14", (4.0, 3.0), (1.5, 1.4))
    return {"device": "NVIDIA H200 (sm 9.0)", "torch": "2.11", "triton": "3.6", "cuda": "12.8",
            "commit": "0123abcd", "date": "2026-01-02T03:04:05+00:00", "records": records}


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("tables")
    path = out / "results.json"
    path.write_text(json.dumps(results))
    assert T.main([str(path)]) == 0  # writes next to results.json
    return out


def test_noise_rule():
    noise = T.Noise()
    a, b = [1.0, 1.1, 1.2, 1.3, 1.4], [0.5, 0.6, 0.7, 0.8, 0.9]
    assert noise.beats(b, a) and not noise.beats(a, b)
    assert not noise.beats([0.9, 1.0, 1.1, 1.2, 1.3], a)  # overlapping quartiles
    assert not noise.beats(b[:4], a)  # too few repeat timings
    assert not noise.beats(None, a) and not noise.beats(b, None)
    assert T.quantile([1, 2, 3, 4, 5], 0.25) == 2 and T.quantile([1, 2], 0.5) == 1.5


def test_auto_table_chooses_clear_wins_only(written, monkeypatch):
    device, table = shipped.load_auto_table(str(written / "auto_table.json"))
    assert device == "NVIDIA H200 (sm 9.0)"
    monkeypatch.setattr(backend, "AUTO_TABLE", table)
    for op in ("stats", "apply", "forward_train"):  # every forward op gets the fused forward's winner
        assert backend.auto_choice(op, (64, 64, 112, 112)) == "cuda"
        assert backend.auto_choice(op, (64, 64, 56, 56)) == "cuda"
        assert backend.auto_choice(op, (256, 64, 56, 56)) == "cuda"  # same shape class (C exact)
        assert backend.auto_choice(op, (64, 256, 56, 56)) == "triton"  # variants disagree
        assert backend.auto_choice(op, (64, 2048, 7, 7)) == "cuda"
        assert backend.auto_choice(op, (256, 2048, 7, 7)) == "triton"  # triton faster there
        assert backend.auto_choice(op, (64, 512, 28, 28)) == "triton"  # no repeat timings
        assert backend.auto_choice(op, (64, 128, 28, 28)) == "triton"  # not measured
    for op in ("backward_reduce", "backward_dx", "backward"):
        assert op not in table  # 1 % inside a 5 % spread: within noise
        assert backend.auto_choice(op, (64, 64, 56, 56)) == "triton"
    # C=64: the two cuda points merge into one rule; C=2048: bounded at the geometric midpoint
    assert table["apply"] == [({"C": (64, 64), "NHW": (0, None)}, "cuda"),
                              ({"C": (2048, 2048), "NHW": (0, 6272)}, "cuda")]  # √(3136·12544)


def test_normconv_table_needs_every_block_to_win(written, monkeypatch):
    device, table = shipped.load_normconv_table(str(written / "normconv_table.json"))
    assert device == "NVIDIA H200 (sm 9.0)"
    assert set(table) == {(256, 64, 1, 1, "bfloat16"), (64, 256, 1, 1, "bfloat16"),
                          (1024, 256, 1, 1, "bfloat16"), (256, 256, 3, 1, "bfloat16"),
                          (256, 1024, 1, 1, "bfloat16")}
    assert set(table.values()) == {T.NORMCONV} == {normconv.NORMCONV}
    monkeypatch.setattr(normconv, "NORMCONV_TABLE", table)
    assert normconv.get_normconv() == "auto"
    assert normconv.conv_choice(nn.Conv2d(1024, 256, 1, bias=False), torch.bfloat16) == "normconv"
    assert normconv.conv_choice(nn.Conv2d(1024, 256, 1, bias=False), torch.float16) == T.FALLBACK
    assert normconv.conv_choice(nn.Conv2d(64, 64, 3, padding=1), torch.bfloat16) == T.FALLBACK
    assert normconv.conv_choice(nn.Conv2d(512, 128, 1), torch.bfloat16) == T.FALLBACK  # eval loss


def test_metadata_and_evidence(written, results):
    for name in ("auto_table.json", "normconv_table.json"):
        data = json.loads((written / name).read_text())
        assert data["generated_by"] == "python -m benchmarks.tables"
        assert (data["device"], data["date"], data["commit"]) == (
            results["device"], results["date"], results["commit"])
        assert data["source"]["file"] == "results.json" and len(data["source"]["sha256"]) == 64
        assert "quantile" in data["noise"] and data["versions"]["triton"] == "3.6"
        assert data["decisions"]
    auto = json.loads((written / "auto_table.json").read_text())
    noisy = [d for d in auto["decisions"] if d["op"] == "bwd"]
    assert len(noisy) == 1 and noisy[0]["choice"] == "triton" and "noise" in noisy[0]["why"]


def test_shipped_tables_load_and_are_generated():
    for load, path in ((shipped.load_auto_table, shipped.AUTO_TABLE_FILE),
                       (shipped.load_normconv_table, shipped.NORMCONV_TABLE_FILE)):
        device, _ = load(path)
        data = json.loads(open(path).read())
        assert data["generated_by"] == T.GENERATED_BY and data["device"] == device
    assert backend.AUTO_TABLE_DEVICE == shipped.load_auto_table()[0]
    assert normconv.NORMCONV_TABLE_DEVICE == shipped.load_normconv_table()[0]
    if backend.AUTO_TABLE_DEVICE == "unmeasured":  # what --unmeasured writes
        empty = T.build_tables(None)
        for name, content in empty.items():
            assert json.loads(open(os.path.join(shipped.HERE, name)).read()) == content


def test_install_refuses_cpu_results(tmp_path, capsys):
    res = {"device": "cpu: x86_64, 2 cores", "torch": "t", "triton": None, "cuda": None,
           "commit": None, "date": "2026-01-01T00:00:00+00:00", "records": []}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    assert T.main([str(path), "--install"]) == 2
    assert "not a GPU" in capsys.readouterr().err


def test_case_names_parse_back():
    suite = C.full_suite()
    for case in suite.ops:
        residual, relu, shape = T.parse_op_case(case.name)
        assert (residual, relu, shape) == (case.spec.residual, case.spec.activation == "relu",
                                           case.shape)
    for case in suite.blocks:
        if isinstance(case, C.BlockCase):
            s = case.spec
            kind, inplanes, out, stride, ds, _ = T.parse_block_case(case.name)
            assert (inplanes, out, stride, ds) == (s.inplanes, s.out_channels, s.stride, s.downsample)
            assert kind == ("BasicBlock" if s.kind == "basic" else "Bottleneck")
        else:
            assert T.parse_block_case(case.name) is None
