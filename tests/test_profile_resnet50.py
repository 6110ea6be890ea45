"""benchmarks/profile_resnet50.py runs (a CPU smoke run: tiny images, one
step) and reports every model; gpu_check runs it on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_reports_every_model():
    pytest.importorskip("torchvision")
    path = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_resnet50.py"), "--device", "cpu",
         "--batch", "2", "--size", "32", "--steps", "1", "--layouts", "nchw"],
        capture_output=True, text=True, env=env, timeout=300, check=True)
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in result.stdout.splitlines() if line.startswith(("| torch", "| normext"))}
    assert set(rows) == {"torch", "normext.convert", "normext.fuse"}
    for wall_ms, gpu_ms, host_ms, activities in rows.values():
        assert float(wall_ms) > 0 and float(host_ms) > 0
        assert float(gpu_ms) == 0 and int(activities) == 0  # no GPU activity on the CPU
