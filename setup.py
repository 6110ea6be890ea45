"""Builds normext._C: the C++ CPU kernels always, the CUDA kernels when possible.

Environment:
  NORMEXT_CPU_ONLY=1      skip CUDA even where a toolkit and a CUDA torch exist.
  FORCE_CUDA=1            build the CUDA sources; a missing toolkit is an error.
  CUDA_HOME / CUDA_PATH   the CUDA toolkit root (found from nvcc otherwise).
  TORCH_CUDA_ARCH_LIST    CUDA arches; without a visible GPU the default is
                          DEFAULT_CUDA_ARCHES below.
  NORMEXT_CPU_ARCH        -march for the CPU code: "native" (the default on x86-64:
                          the build machine's own vector units, AVX-512 included),
                          "x86-64-v3" (AVX2/FMA/F16C, for a build that must run on
                          other machines), or "none" for the compiler's default.
  MAX_JOBS                parallel compile jobs (ninja).
"""

import glob
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Turing (the oldest arch CUDA 13 supports) through Hopper as machine code,
# plus PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCHES = "7.5;8.0;8.6;9.0+PTX"


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def find_cuda_home():
    """The toolkit root: CUDA_HOME/CUDA_PATH, else where nvcc really lives.

    nvcc on PATH may be a wrapper script in another folder, so ask nvcc itself
    (its --dryrun output names the toolkit root as TOP) before trusting the path.
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(name)
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        try:
            out = subprocess.run(
                [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                capture_output=True, text=True, timeout=60,
            )
            for line in (out.stdout + out.stderr).splitlines():
                match = re.match(r"^#\$ TOP=(.*)$", line.strip())
                if match:
                    candidates.append(match.group(1).strip())
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.realpath(home)
    return None


def cuda_sources():
    """The CUDA kernels and their host-side registration."""
    return sorted(glob.glob(os.path.join("csrc", "*", "cuda", "*.cu"))
                  + glob.glob(os.path.join("csrc", "*", "cuda", "*.cpp")))


def want_cuda(torch, cuda_home):
    if env_flag("NORMEXT_CPU_ONLY"):
        return False
    if env_flag("FORCE_CUDA"):
        if cuda_home is None:
            sys.exit("normext: FORCE_CUDA=1 but no CUDA toolkit was found "
                     "(set CUDA_HOME to the folder holding bin/nvcc)")
        if torch.version.cuda is None:
            sys.exit("normext: FORCE_CUDA=1 but the installed torch is a CPU-only build")
        return True
    return cuda_home is not None and torch.version.cuda is not None


def cpu_arch_flags():
    """pip builds normext from source on the machine that runs it, so by
    default the CPU kernels are compiled for that machine's vector units."""
    default = "native" if platform.machine() in ("x86_64", "AMD64") else "none"
    arch = os.environ.get("NORMEXT_CPU_ARCH", default)
    return [] if arch == "none" else [f"-march={arch}"]


def extension_include_dirs():
    """CUDA headers that some toolkits lack (cuBLAS, cuSPARSE, ...), taken
    from the nvidia-* wheels that a CUDA torch installs."""
    dirs = []
    try:
        import nvidia
    except ImportError:
        return dirs
    for base in getattr(nvidia, "__path__", []):
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def make_extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import
    import torch
    from torch.utils import cpp_extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "*", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "*", "cpu", "*.cpp")))
    torch_version = torch.__version__.split("+")[0]
    define = [f'-DNORMEXT_TORCH_VERSION="{torch_version}"']
    cxx = ["-O3", "-fopenmp"] + cpu_arch_flags() + define
    extra = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        # The shared libstdc++ runtime that torch uses, named by its soname:
        # a compiler with only libstdc++.a beside it (the lent H100's image
        # sets CXX to one) otherwise links a static copy, whose iostreams are
        # not initialized in a shared library, so formatting a C++ error's
        # message crashed the process (gcc 13) or dropped its numbers (gcc 12).
        extra_link_args=["-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux")
                                        else []),
    )

    use_cuda = want_cuda(torch, cuda_home) and bool(cuda_sources())
    if not use_cuda:
        if want_cuda(torch, cuda_home):
            print("normext: no CUDA sources yet; building the CPU kernels only")
        return cpp_extension.CppExtension(
            "normext._C", sources, extra_compile_args={"cxx": cxx}, **extra
        )

    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHES
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    define += ["-DNORMEXT_WITH_CUDA", f'-DNORMEXT_CUDA_ARCHES="{arches}"']
    extra["include_dirs"] += extension_include_dirs()
    return cpp_extension.CUDAExtension(
        "normext._C",
        sources + cuda_sources(),
        extra_compile_args={
            "cxx": cxx + ["-DNORMEXT_WITH_CUDA", f'-DNORMEXT_CUDA_ARCHES="{arches}"'],
            "nvcc": ["-O3", "--expt-relaxed-constexpr"] + define,
        },
        **extra,
    )


def build_ext_class():
    from torch.utils import cpp_extension

    return cpp_extension.BuildExtension.with_options(use_ninja=True)


setup(
    packages=find_packages(include=["normext", "normext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": build_ext_class()},
)
