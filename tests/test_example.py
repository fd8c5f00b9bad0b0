"""Smoke runs of examples/train_resnet.py as a user runs it (a subprocess), on CPU with tiny sizes:
two gloo processes with fastres SyncBatchNorm on synthetic data, and one process on an ImageFolder."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "train_resnet.py")


def run_example(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    match = re.search(r"done: (\d+) steps, final loss (\S+), images/s (\S+)", out)
    assert match, out[-4000:]
    steps, loss, rate = int(match.group(1)), float(match.group(2)), float(match.group(3))
    assert math.isfinite(loss) and loss > 0 and rate > 0, match.group(0)
    return steps, out


def test_two_process_sync_bn_smoke():
    steps, out = run_example("--spawn", "2", "--sync-bn", "--steps", "3", "--batch-size", "2",
                             "--image-size", "32", "--num-classes", "10", "--log-every", "1",
                             "--channels-last")
    assert steps == 3
    assert "2 process(es) on cpu" in out and "sync_bn=True" in out
    assert "resnet18: fastres (backend" in out


def test_single_process_image_folder(tmp_path):
    from PIL import Image

    for c in range(2):
        (tmp_path / f"class{c}").mkdir()
        for i in range(4):
            Image.new("RGB", (40, 40), color=(60 * c + 10 * i, 100, 200)).save(
                tmp_path / f"class{c}" / f"{i}.png")
    steps, out = run_example("--data", str(tmp_path), "--steps", "2", "--batch-size", "4",
                             "--image-size", "32", "--workers", "0", "--bf16", "--log-every", "1")
    assert steps == 2 and "bf16=True" in out
