"""What the build reports about itself: the CPU kernel variant torch's choice
selects, and the warning for a visible GPU without the CUDA kernels."""

import os
import subprocess
import sys
import warnings

import pytest
import torch

import normext
from normext import _extension

# torch.backends.cpu.get_cpu_capability()'s names for the variants normext compiles.
TORCH_NAMES = {"NO AVX": "default", "DEFAULT": "default", "AVX2": "avx2", "AVX512": "avx512"}
ORDER = ["default", "avx2", "avx512"]


def expected_capability(torch_choice, compiled):
    """The variant normext should run: torch's choice, or the best compiled below it
    (a build in the source tree has the baseline and the build machine's best)."""
    if compiled == ["native"]:
        return "native"
    wanted = ORDER.index(TORCH_NAMES.get(torch_choice, "default"))
    return max((name for name in compiled if ORDER.index(name) <= wanted), key=ORDER.index)


def test_cpu_capability_follows_torch():
    info = normext.build_info()
    assert info["cpu_capabilities"][0] in ("default", "native")
    assert info["cpu_capability"] == expected_capability(
        torch.backends.cpu.get_cpu_capability(), info["cpu_capabilities"])


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_aten_cpu_capability_selects_the_variant(capability):
    code = ("import normext, torch; print(torch.backends.cpu.get_cpu_capability()); "
            "print(normext.build_info()['cpu_capability'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
    torch_choice, selected = done.stdout.strip().splitlines()[-2:]
    assert selected == expected_capability(torch_choice, normext.build_info()["cpu_capabilities"])


def test_warns_when_a_gpu_is_visible_but_cuda_was_not_built(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension._C, "backends", ["cpu"])
    with pytest.warns(UserWarning, match="without its CUDA kernels"):
        _extension.warn_if_cuda_unbuilt()


def test_no_warning_when_cuda_was_built_or_no_gpu(monkeypatch):
    monkeypatch.setattr(_extension._C, "backends", ["cpu", "cuda"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _extension.warn_if_cuda_unbuilt()
        monkeypatch.setattr(_extension._C, "backends", ["cpu"])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        _extension.warn_if_cuda_unbuilt()
