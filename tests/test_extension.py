"""The compiled extension: C++ error messages reach Python whole, the ELF
carries no static libstdc++, build_info, and the public API."""

import re
import shutil
import subprocess
import sys

import pytest
import torch

import normext
from conftest import DEVICE_PARAMS


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_cpp_error_messages_carry_their_numbers(device):
    """The kernels' C++ error messages reach Python whole. (Linked with a
    static libstdc++, the extension's iostreams are not initialized: the
    numbers went missing with gcc 12, and formatting crashed with gcc 13.)"""
    with pytest.raises(RuntimeError, match="at least 2 dims, got 1 dims"):
        torch.ops.normext.batch_norm_moments(torch.ones(3, device=device))
    x = torch.ones(2, 3, 4, device=device)
    with pytest.raises(RuntimeError, match="weight should contain 3 elements not 7"):
        torch.ops.normext.batch_norm_elemt(x, torch.ones(7, device=device), None,
                                           torch.zeros(3, device=device),
                                           torch.ones(3, device=device))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF symbols")
def test_extension_carries_no_libstdcxx_code():
    """The extension uses the shared libstdc++ (setup.py names it): a static
    copy inside it, even a partial one, is what broke the messages above."""
    if shutil.which("nm") is None:
        pytest.skip("needs nm (binutils)")
    import normext._C
    symbols = subprocess.run(["nm", "-D", "--defined-only", normext._C.__file__],
                             capture_output=True, text=True, check=True).stdout
    assert not re.search(r"\b(__cxa_throw|_ZNSt8ios_base4Init\w*)\b", symbols)


def test_build_info():
    info = normext.build_info()
    assert set(info) == {"backends", "cpu_bfloat16_instruction", "cpu_capability",
                         "cpu_capabilities", "cuda_arches", "openmp", "torch_version"}
    assert isinstance(info["cpu_bfloat16_instruction"], bool)
    assert info["cpu_capability"] in info["cpu_capabilities"]
    assert isinstance(info["backends"], list)
    assert "cpu" in info["backends"]
    assert set(info["backends"]) <= {"cpu", "cuda"}
    assert isinstance(info["cuda_arches"], str)
    assert isinstance(info["openmp"], bool)
    assert info["torch_version"] == torch.__version__.split("+")[0]
    if "cuda" in info["backends"]:
        assert info["cuda_arches"]
        assert torch.version.cuda is not None
    else:
        assert info["cuda_arches"] == ""
    assert normext.build_info() is not info  # a fresh dict each call
    assert normext.__version__


PUBLIC_API = {
    "BatchNorm1d": torch.nn.BatchNorm1d, "BatchNorm2d": torch.nn.BatchNorm2d,
    "BatchNorm3d": torch.nn.BatchNorm3d, "LazyBatchNorm1d": torch.nn.LazyBatchNorm1d,
    "LazyBatchNorm2d": torch.nn.LazyBatchNorm2d, "LazyBatchNorm3d": torch.nn.LazyBatchNorm3d,
    # a _BatchNorm like torch's SyncBatchNorm, not a subclass of it: its
    # forward (and convert_sync_batchnorm) are normext's own
    "SyncBatchNorm": torch.nn.modules.batchnorm._BatchNorm,
    "LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm, "GroupNorm": torch.nn.GroupNorm,
    "InstanceNorm1d": torch.nn.InstanceNorm1d, "InstanceNorm2d": torch.nn.InstanceNorm2d,
    "InstanceNorm3d": torch.nn.InstanceNorm3d,
    "LazyInstanceNorm1d": torch.nn.LazyInstanceNorm1d,
    "LazyInstanceNorm2d": torch.nn.LazyInstanceNorm2d,
    "LazyInstanceNorm3d": torch.nn.LazyInstanceNorm3d,
    # the fused layers: their norm's torch class, with more in forward
    "AddLayerNorm": torch.nn.LayerNorm, "AddRMSNorm": torch.nn.RMSNorm,
    "GroupNormAct": torch.nn.GroupNorm,
}


def test_public_api():
    """`from normext import *` gives the documented names (README.md): each
    layer a subclass of torch's namesake (SyncBatchNorm: of _BatchNorm), so
    that isinstance checks work as with torch's; no private name leaks."""
    namespace = {}
    exec("from normext import *", namespace)
    names = set(namespace) - {"__builtins__"}
    assert names >= set(PUBLIC_API) | {"build_info", "convert", "functional", "ops",
                                       "release_cpu_cache"}
    assert not any(name.startswith("_") for name in names)
    for name, torch_class in PUBLIC_API.items():
        assert issubclass(namespace[name], torch_class), name
        assert namespace[name].__name__ == name, name
    assert namespace["functional"].batch_norm.__module__ == "normext.functional"
    assert namespace["ops"].batch_norm_forward.__module__ == "normext.ops"
