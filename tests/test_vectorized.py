"""The fused activations' hot loops are vector code in every CPU variant built.

The benchmarks on the development machine run its AVX-512 kernels, and a
variant's speed is not tested, so this reads the other variants' machine
code: without -fno-trapping-math (setup.py) GCC kept a branch per element in
the fused batch norm's and GroupNorm + SiLU's loops wherever AVX-512's masks
were missing, and the AVX2 and baseline builds ran them several times slower
(benchmarks/RESULTS.md).
"""

import platform
import re
import shutil
import subprocess
import sys

import pytest

import normext

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.machine() != "x86_64"
    or not (shutil.which("nm") and shutil.which("objdump")),
    reason="reads x86-64 machine code with binutils (nm, objdump)")

# Packed float arithmetic (SSE's and AVX's *ps forms); the scalar code's
# zeroing (xorps) and selects are left out.
PACKED_ARITHMETIC = re.compile(r"\sv?(?:add|sub|mul|div|max|min|f(?:n?m(?:add|sub))\d{3})ps\s")
# At the least in a loop GCC vectorized (such loops hold dozens; the scalar
# builds had none).
MIN_PACKED = 8
NAMESPACES = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512", "native": "NATIVE"}


@pytest.fixture(scope="module")
def symbols():
    """(demangled name, address, size) of the library's defined functions."""
    listing = subprocess.run(["nm", "-C", "-S", "--defined-only", normext._C.__file__],
                             capture_output=True, text=True, check=True).stdout
    found = []
    for line in listing.splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4 and parts[2] in "tTwW":
            found.append((parts[3], int(parts[0], 16), int(parts[1], 16)))
    return found


def packed_arithmetic(address, size):
    code = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--start-address={address}",
         f"--stop-address={address + size}", normext._C.__file__],
        capture_output=True, text=True, check=True).stdout
    return len(PACKED_ARITHMETIC.findall(code))


def loops(v, act):
    """Name fragments of functions holding the loops to check in variant
    namespace v: the fused batch-norm backward's reductions (with a residual
    they write dz too) and GroupNorm's float16 forward, whose float tiles run
    the float32 loop (which functions GCC inlines into which varies; the
    largest count among the matches is the loop's)."""
    group_norm = f"normext::group_norm::{v}::(anonymous namespace)::"
    return {
        "batch-norm backward reduction":
            [f"GradSums<false, 0, false, normext::{v}::{act}Fn<float>, false, float, float>"],
        "batch-norm backward reduction with a residual, writing dz":
            [f"GradSums<false, 0, true, normext::{v}::{act}Fn<float>, true, float, float>"],
        "GroupNorm forward":
            [f"{group_norm}forward_groups<c10::Half, normext::{v}::{act}Fn<float> >",
             f"{group_norm}normalize_run<normext::{v}::{act}Fn<float>, float, float>"],
    }


@pytest.mark.parametrize("capability", normext.build_info()["cpu_capabilities"])
@pytest.mark.parametrize("act", ["Relu", "Silu"])
def test_fused_loops_are_vector_code(symbols, capability, act):
    v = NAMESPACES[capability]
    for loop, names in loops(v, act).items():
        matches = [(a, s) for n, a, s in symbols if any(name in n for name in names)]
        assert matches, f"no function named like {names!r}: update this test's names"
        best = max(packed_arithmetic(a, s) for a, s in matches)
        assert best >= MIN_PACKED, (
            f"{capability}: the {loop} loop with {act.lower()} has {best} packed float "
            "instructions: GCC left it scalar (see setup.py's -fno-trapping-math)")
