"""benchmarks/profile_resnet50.py runs (a CPU smoke run: tiny images, one
step) and reports every model's operator time by group; gpu_check runs it on
a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_reports_every_model_by_operator_group():
    pytest.importorskip("torchvision")
    path = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, path)))
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "profile_resnet50.py"), "--device", "cpu",
         "--batch", "2", "--size", "32", "--steps", "1", "--layouts", "nchw"],
        capture_output=True, text=True, env=env, timeout=300, check=True)
    rows = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
            for line in result.stdout.splitlines() if line.startswith(("| torch", "| normext"))}
    assert set(rows) == {"torch", "normext.convert", "normext.fuse"}
    for name, (wall, conv, norm, relu, add, other, bound) in rows.items():
        assert float(wall) > 0 and float(conv) > 0 and float(norm) > 0, name
        assert float(bound.rstrip("x")) >= 1, name
    assert float(rows["torch"][3]) > 0
    assert float(rows["normext.fuse"][3]) == 0  # the ReLU runs inside the fused layers


def test_operator_groups():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from profile_resnet50 import cpu_group
    finally:
        sys.path.pop(0)
    activation = [[2, 64, 8, 8], [2, 64, 8, 8], []]
    assert cpu_group("aten::native_batch_norm", activation, 2) == "batch norm"
    assert cpu_group("normext::batch_norm_act_forward", activation, 2) == "batch norm"
    assert cpu_group("aten::convolution_backward", activation, 2) == "convolution"
    assert cpu_group("aten::threshold_backward", activation, 2) == "relu"
    assert cpu_group("aten::add_", activation, 2) == "residual add"
    assert cpu_group("aten::add_", [[64, 64, 3, 3], [64, 64, 3, 3], []], 2) == "other"  # SGD
    assert cpu_group("aten::max_pool2d_with_indices", activation, 2) == "other"
