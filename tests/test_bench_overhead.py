"""benchmarks/bench_overhead.py runs on the CPU and reports every mode (the
timing itself is not tested); gpu_check.sh runs it on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_reports_every_mode():
    path = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--device", "cpu",
         "--dtypes", "float32", "--repeats", "1", "--min-time", "0.001"],
        capture_output=True, text=True, env=env, timeout=300, check=True)
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()
            if line.startswith("| ") and "float32" in line]
    assert [row[0].strip() for row in rows] == ["train", "eval", "train_fwdbwd", "eval_fwdbwd"]
    for row in rows:
        torch_ops, normext_ops = int(row[5]), int(row[6])
        assert 0 < normext_ops < torch_ops, row
