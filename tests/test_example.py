"""Smoke runs of examples/train_resnet.py on CPU with tiny sizes: two gloo processes (spawned by the
script) with fastres SyncBatchNorm on synthetic data, and one process on an ImageFolder in bf16.
The script's main() runs in this process (its children start from here), saving a torch import."""
from __future__ import annotations

import math
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
import train_resnet  # noqa: E402


def run_example(capfd, *args):
    train_resnet.main(["--device", "cpu", *args])
    out, err = capfd.readouterr()
    out = out + err
    match = re.search(r"done: (\d+) steps, final loss (\S+), images/s (\S+)", out)
    assert match, out[-4000:]
    steps, loss, rate = int(match.group(1)), float(match.group(2)), float(match.group(3))
    assert math.isfinite(loss) and loss > 0 and rate > 0, match.group(0)
    return steps, out


def test_two_process_sync_bn_smoke(capfd, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    steps, out = run_example(capfd, "--spawn", "2", "--sync-bn", "--steps", "2", "--batch-size",
                             "2", "--image-size", "16", "--num-classes", "10", "--log-every", "1",
                             "--channels-last")
    assert steps == 2
    assert "resnet18: fastres (backend" in out
    assert "2 process(es) on cpu" in out and "sync_bn=True" in out


def test_single_process_image_folder(capfd, tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(4):
            Image.new("RGB", (40, 40), color=(60 * c + 10 * i, 100, 200)).save(
                tmp_path / f"class{c}" / f"{i}.png")
    steps, out = run_example(capfd, "--data", str(tmp_path), "--steps", "2", "--batch-size", "4",
                             "--image-size", "16", "--workers", "0", "--bf16", "--log-every", "1")
    assert steps == 2 and "bf16=True" in out and "1 process(es)" in out


def test_rejects_bad_arguments(capfd):
    with pytest.raises(SystemExit):
        train_resnet.main(["--device", "cpu", "--steps", "0"])
