"""The measured choice tables, as generated data: ``auto_table.json`` (the BN-act backend per op and
shape class, read by ``fastres.backend``) and ``normconv_table.json`` (normconv vs the fallback per conv
shape and dtype, read by ``fastres.nn.normconv``).

Both files are written by ``python -m benchmarks.tables RESULTS.json`` from a benchmark run, with the
device, date and commit of that run in their header; nobody edits them by hand. Until a GPU has
measured fastres they are empty and their device is "unmeasured".

This module imports nothing from fastres (``fastres.backend`` imports it).
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
AUTO_TABLE_FILE = os.path.join(HERE, "auto_table.json")
NORMCONV_TABLE_FILE = os.path.join(HERE, "normconv_table.json")
HEADER_KEYS = ("generated_by", "device", "date", "commit", "source", "noise")


def _read(path: str, kind: str) -> dict:
    with open(path) as f:
        data = json.load(f)
    if data.get("kind") != kind or not all(k in data for k in HEADER_KEYS + ("table",)):
        raise ValueError(f"{path} is not a fastres {kind} (regenerate it with "
                         "`python -m benchmarks.tables RESULTS.json --install`)")
    return data


def load_auto_table(path: str = AUTO_TABLE_FILE) -> tuple[str, dict]:
    """(device, {op: backend | [(rule, backend), ...]}) with rule = {"C"|"NHW": (lo, hi)}."""
    data = _read(path, "auto_table")
    table = {}
    for op, entry in data["table"].items():
        if isinstance(entry, str):
            table[op] = entry
        else:
            table[op] = [({k: (lo, hi) for k, (lo, hi) in rule.items()}, backend)
                         for rule, backend in entry]
    return data["device"], table


def load_normconv_table(path: str = NORMCONV_TABLE_FILE) -> tuple[str, dict]:
    """(device, {(in_channels, out_channels, kernel, stride, dtype name): choice})."""
    data = _read(path, "normconv_table")
    table = {(e["in_channels"], e["out_channels"], e["kernel"], e["stride"], e["dtype"]): e["choice"]
             for e in data["table"]}
    return data["device"], table
