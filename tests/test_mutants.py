"""tools/mutants.py: the mutant list is valid against the current tree (every ``old`` snippet occurs
exactly once; the required categories are covered), a stale mutant fails loudly, external mutant files
load, and one cheap mutant runs end to end and is caught. The whole set is run by hand
(``python -m tools.mutants``), not here: it takes many minutes."""
from __future__ import annotations

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tools import mutants as M  # noqa: E402


def test_every_mutant_applies_exactly_once_to_the_current_tree():
    M.check_all(M.MUTANTS)  # raises StaleMutant naming each stale one
    for m in M.MUTANTS:
        first = m["tests"].split()[0]
        assert os.path.isfile(os.path.join(ROOT, first)), (m["id"], first)


def test_categories_cover_the_required_set():
    assert set(M.REQUIRED_CATEGORIES) <= {m["category"] for m in M.MUTANTS}


def test_stale_or_bad_mutants_fail_loudly(tmp_path):
    stale = dict(M.MUTANTS[0], id="stale", old="this text is not in the file")
    with pytest.raises(M.StaleMutant, match="occurs 0 times"):
        M.check_mutant(stale)
    twice = dict(M.MUTANTS[0], id="twice", old="import")
    with pytest.raises(M.StaleMutant, match="exactly once"):
        M.check_mutant(twice)
    with pytest.raises(ValueError, match="duplicate"):
        M.check_all([M.MUTANTS[0], M.MUTANTS[0]])
    assert M.main(["--only", "stale", "--mutants-file", _write_json(tmp_path, [stale]),
                   "--list"]) == 2


def _write_json(tmp_path, mutants):
    path = tmp_path / "external.json"
    path.write_text(json.dumps(mutants))
    return str(path)


def test_external_mutants_file(tmp_path, capsys):
    ext = [dict(M.MUTANTS[0], id="external-one")]
    loaded = M.load_mutants_file(_write_json(tmp_path, ext))
    assert loaded[0]["id"] == "external-one" and loaded[0]["source"] == "external.json"
    py = tmp_path / "external.py"
    py.write_text(f"MUTANTS = {ext!r}\n")
    assert M.load_mutants_file(str(py))[0]["id"] == "external-one"
    assert M.main(["--mutants-file", str(py), "--external-only", "--list"]) == 0
    assert "external-one" in capsys.readouterr().out


def test_outcome_rules():
    ok, fail = {"rc": 0, "passed": 3}, {"rc": 1, "passed": 0}
    assert M.outcome(ok, fail) == "caught"
    assert M.outcome(ok, ok) == "SURVIVED"
    assert M.outcome(fail, fail) == "baseline-fails"
    assert M.outcome({"rc": 0, "passed": 0}, fail) == "no-tests"
    assert M.outcome(ok, {"rc": None, "passed": 0}) == "timeout"


def test_one_mutant_end_to_end():
    """The biased running variance, against its (fast) selection: passes unmutated, fails mutated."""
    m = next(m for m in M.MUTANTS if m["id"] == "running-var-biased")
    (result,) = M.run_mutants([m], log=lambda *a, **k: None, timeout=300)
    assert result["baseline"]["rc"] == 0 and result["baseline"]["passed"] > 0, result["baseline"]["tail"]
    assert result["status"] == "caught", result["run"]["tail"]
    report = M.markdown([result])
    assert "Catch rate: 1/1 = 100 %" in report and "running-var-biased" in report
