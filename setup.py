"""Builds normext._C: the C++ CPU kernels always, the CUDA kernels where a GPU
is visible (or FORCE_CUDA=1), a CUDA toolkit is found and torch is a CUDA build.

Environment:
  NORMEXT_CPU_ONLY=1      skip CUDA even where it would be built.
  FORCE_CUDA=1            build the CUDA sources without a visible GPU; a missing
                          toolkit or a CPU-only torch is an error.
  CUDA_HOME / CUDA_PATH   the CUDA toolkit root (found from nvcc otherwise).
  TORCH_CUDA_ARCH_LIST    CUDA arches; without a visible GPU the default is
                          DEFAULT_CUDA_ARCHES below.
  NORMEXT_CPU_ARCH        unset: the CPU kernels are compiled once per x86-64
                          instruction set torch dispatches on (baseline, AVX2,
                          AVX-512) and the one torch uses runs, so the build
                          runs on any x86-64 machine; a build in the source
                          tree (pip install -e ., build_ext --inplace) compiles
                          the baseline and this machine's best only. "all":
                          every variant there too. "native": one variant for
                          the build machine's own vector units (-march=native).
  NORMEXT_CXXFLAGS        flags added to each C++ compile command (not nvcc's)
                          after normext's -O3, so that an -O level there wins
                          (CI's sanitizer build compiles at -O2).
  MAX_JOBS                parallel compile jobs (ninja).
"""

import concurrent.futures
import glob
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Turing (the oldest arch CUDA 13 supports) through Hopper as machine code,
# plus PTX that newer GPUs compile at load time.
DEFAULT_CUDA_ARCHES = "7.5;8.0;8.6;9.0+PTX"
# Objects persist here across builds, `pip install -e .` included (setuptools
# would use a fresh temporary folder), so ninja recompiles only what changed.
BUILD_TEMP = os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-"
                                         f"{sys.implementation.cache_tag}")
# ATen's compile flags for its per-capability kernels (cmake/Codegen.cmake).
CPU_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


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


def cuda_plan(torch, cuda_home):
    """(build the CUDA kernels?, why), torchvision's rule: where a GPU is
    visible or FORCE_CUDA=1, and a toolkit and a CUDA torch exist."""
    if env_flag("NORMEXT_CPU_ONLY"):
        return False, "NORMEXT_CPU_ONLY=1"
    if env_flag("FORCE_CUDA"):
        if cuda_home is None:
            sys.exit("normext: FORCE_CUDA=1 but no CUDA toolkit was found "
                     "(set CUDA_HOME to the folder holding bin/nvcc)")
        if torch.version.cuda is None:
            sys.exit("normext: FORCE_CUDA=1 but the installed torch is a CPU-only build")
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if not torch.cuda.is_available():
        return False, "no visible GPU; set FORCE_CUDA=1 to compile the CUDA kernels"
    if cuda_home is None:
        return False, "no CUDA toolkit found; set CUDA_HOME to the folder holding bin/nvcc"
    return True, "GPU visible"


def cpu_variants(in_source_tree):
    """(name, compile flags) of each variant the CPU kernels are compiled as,
    baseline first (see BuildExtension.build_extension)."""
    import torch

    arch = os.environ.get("NORMEXT_CPU_ARCH", "")
    # torch's choice here: "AVX512", "AVX2", "DEFAULT" or "NO AVX" on x86-64
    # (ATEN_CPU_CAPABILITY overrides it).
    aten = torch.backends.cpu.get_cpu_capability()
    if arch == "native":
        # at::vec's implementation follows CPU_CAPABILITY_*: the one torch runs here.
        aten_macros = ([f"-DCPU_CAPABILITY={aten}", f"-DCPU_CAPABILITY_{aten}"]
                       if aten in ("AVX2", "AVX512") else [])
        return [("NATIVE", ["-march=native", "-DNORMEXT_CPU_CAPABILITY=NATIVE",
                            "-DNORMEXT_CPU_FLOAT64_ACTIVATIONS"] + aten_macros)]
    if arch not in ("", "all"):
        sys.exit(f"normext: NORMEXT_CPU_ARCH={arch!r}: only 'all', 'native' (or unset) is supported")
    names = ["DEFAULT"]
    if platform.machine() in ("x86_64", "AMD64"):
        names += ["AVX2", "AVX512"]
        if in_source_tree and arch != "all":
            # A build in the source tree runs on this machine: the variant torch
            # runs here, and the baseline, which runs on any other; a third
            # variant would add a third of the first install's compile time.
            names = ["DEFAULT"] + [name for name in names[1:] if name == aten]
    # NORMEXT_CPU_CAPABILITY names the kernels' namespace; CPU_CAPABILITY*
    # select ATen's matching at::vec implementation, as in ATen's own kernels.
    # float64 through an activation is compiled for the baseline alone
    # (common/activation.h: kActivationsFor).
    return [(name, [f"-DNORMEXT_CPU_CAPABILITY={name}", f"-DCPU_CAPABILITY={name}",
                    f"-DCPU_CAPABILITY_{name}"] + CPU_CAPABILITY_FLAGS[name]
             + (["-DNORMEXT_CPU_FLOAT64_ACTIVATIONS"] if name == "DEFAULT" else []))
            for name in names]


def cpu_variant_macros(variants):
    """What the code compiled once (batch_norm/cpu/dispatch.cpp) is told of the variants."""
    names = [name for name, _ in variants]
    if names == ["NATIVE"]:
        return ["-DNORMEXT_CPU_NATIVE"]
    return [f"-DNORMEXT_WITH_CPU_{name}" for name in names if name != "DEFAULT"]


def cpu_kernel_sources():
    """Sources compiled once per CPU variant: those opening a namespace named
    NORMEXT_CPU_CAPABILITY (common/cpu/capability.h)."""
    opens_namespace = re.compile(r"^namespace\s+[\w:]*\bNORMEXT_CPU_CAPABILITY\s*\{", re.M)
    sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
    return [path for path in sources if opens_namespace.search(open(path).read())]


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

    kernel_sources = cpu_kernel_sources()
    once_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    once_sources += sorted(glob.glob(os.path.join("csrc", "*", "*.cpp")))
    once_sources += sorted(glob.glob(os.path.join("csrc", "*", "cpu", "*.cpp")))
    once_sources = [path for path in once_sources if path not in kernel_sources]
    sources = [write_unity_source(once_sources)]
    torch_version = torch.__version__.split("+")[0]
    define = [f'-DNORMEXT_TORCH_VERSION="{torch_version}"']
    # -g0: Python's CFLAGS ask for debug info, which doubles the time the
    # kernels' template instantiations take to compile. very-cheap: the hot
    # `omp simd` loops vectorize under any model; the default one also
    # vectorizes their scalar tails, which costs compile time, not speed
    # (benchmarks/RESULTS.md). -fno-trapping-math: without AVX-512's masks, GCC
    # otherwise leaves guarded-select loops scalar (docs/design.md, test_vectorized.py).
    cxx = (["-O3", "-fvect-cost-model=very-cheap", "-fno-trapping-math", "-g0", "-fopenmp"] + define
           + shlex.split(os.environ.get("NORMEXT_CXXFLAGS", "")))
    extra = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        # The kernel sources, compiled per variant outside `sources`, and every
        # header: setuptools relinks only when one of these is newer than the
        # library; ninja then recompiles just the objects whose inputs changed.
        depends=kernel_sources + once_sources + sorted(
            glob.glob(os.path.join("csrc", "**", "*.h"), recursive=True)
            + glob.glob(os.path.join("csrc", "**", "*.cuh"), recursive=True)
            + glob.glob(os.path.join("csrc", "**", "*.inc"), recursive=True)),
        # The shared libstdc++ runtime that torch uses, named by its soname:
        # a compiler with only libstdc++.a beside it (the lent H100's image
        # sets CXX to one) otherwise links a static copy, whose iostreams are
        # not initialized in a shared library, so formatting a C++ error's
        # message crashed the process (gcc 13) or dropped its numbers (gcc 12).
        extra_link_args=["-fopenmp"] + (["-l:libstdc++.so.6"] if sys.platform.startswith("linux")
                                        else []),
    )
    use_cuda, why = cuda_plan(torch, cuda_home)
    if not use_cuda:
        message = f"CPU kernels ({{cpu}}) only ({why})"
        ext = cpp_extension.CppExtension(
            "normext._C", sources, extra_compile_args={"cxx": cxx}, **extra
        )
    else:
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHES
        arches = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
        message = (f"CPU kernels ({{cpu}}) and CUDA kernels "
                   f"({why}, arches {arches or 'of the visible GPUs'})")
        define += ["-DNORMEXT_WITH_CUDA", f'-DNORMEXT_CUDA_ARCHES="{arches}"']
        extra["include_dirs"] += extension_include_dirs()
        ext = cpp_extension.CUDAExtension(
            "normext._C",
            sources + cuda_sources(),
            extra_compile_args={
                "cxx": cxx + ["-DNORMEXT_WITH_CUDA", f'-DNORMEXT_CUDA_ARCHES="{arches}"'],
                "nvcc": ["-O3", "--expt-relaxed-constexpr"] + define,
            },
            **extra,
        )
    ext.cpu_kernel_sources = kernel_sources
    ext.build_message = message
    return ext


def write_unity_source(once_sources):
    """One translation unit that includes every source compiled once, so that
    torch's headers, most of each one's compile time, are parsed once; its
    path, rewritten only when the list changes (ninja tracks the includes)."""
    path = os.path.join("build", "unity", "compiled_once.cpp")
    text = ("// Generated by setup.py (write_unity_source): the sources compiled once.\n"
            + "".join(f'#include "{os.path.relpath(source, "csrc").replace(os.sep, "/")}"\n'
                      for source in once_sources))
    if not os.path.exists(path) or open(path).read() != text:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as file:
            file.write(text)
    return path


def build_ext_class():
    from torch.utils import cpp_extension

    class BuildExtension(cpp_extension.BuildExtension):
        """cpp_extension's ninja build, plus the CPU kernel sources compiled once
        per variant with that variant's flags, in a build folder that persists."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, use_ninja=True, **kwargs)

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = BUILD_TEMP

        in_source_tree = False

        def run(self):
            # setuptools clears `inplace` while it builds; editable installs set editable_mode.
            self.in_source_tree = self.inplace or getattr(self, "editable_mode", False)
            super().run()

        def build_extension(self, ext):
            variants = cpu_variants(self.in_source_tree)
            print("normext: building " + ext.build_message.format(
                cpu=", ".join(name.lower() for name, _ in variants)))
            cxx = ext.extra_compile_args["cxx"]
            ext.extra_compile_args["cxx"] = cxx + cpu_variant_macros(variants)
            # One compile (one ninja run) per set of flags: the kernel sources
            # per variant, the baseline's the longest, then the C++ sources
            # compiled once, which the final run (CUDA, the link) finds up to
            # date. Side by side, so that no core idles while a run ends on its
            # slowest file (compile_side_by_side).
            runs = [(ext.cpu_kernel_sources, os.path.join(self.build_temp, f"cpu-{name.lower()}"),
                     cxx + flags) for name, flags in variants]
            runs.append(([path for path in ext.sources if path.endswith(".cpp")], self.build_temp,
                         ext.extra_compile_args["cxx"]))
            objects = self.compile_side_by_side(ext, runs)
            # Baseline first on the link line: of the copies of an inline
            # function from outside normext's namespaces (torch's headers) that
            # several variants compile, the linker keeps the first, which must
            # run on every machine.
            ext.extra_objects = [path for run in objects[:-1] for path in run]
            super().build_extension(ext)

        def compile_side_by_side(self, ext, runs):
            """The objects of each (sources, folder, flags) run, in that order:
            the runs queued to as many workers as there are jobs, each run's
            ninja with its share, so no more compilers run than jobs. One at a
            time without ninja (cpp_extension's fallback is not thread-safe)."""
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            jobs = int(os.environ.get("MAX_JOBS") or cores or 1)
            workers = max(1, min(jobs, len(runs))) if self.use_ninja else 1
            # As setuptools' build_extension passes them, so that the final run's
            # commands are these and ninja finds their objects up to date.
            macros = ext.define_macros + [(name,) for name in ext.undef_macros]
            max_jobs = os.environ.get("MAX_JOBS")
            os.environ["MAX_JOBS"] = str(max(1, jobs // workers))  # read by each ninja run
            pool = concurrent.futures.ThreadPoolExecutor(workers)
            try:
                futures = [pool.submit(
                    self.compiler.compile, sources, output_dir=folder, macros=macros,
                    include_dirs=ext.include_dirs, debug=self.debug,
                    extra_postargs={"cxx": flags, "nvcc": []}, depends=ext.depends)
                    for sources, folder, flags in runs]
                return [future.result() for future in futures]
            finally:
                # On a failed compile, the queued runs do not start (the error stays in view).
                pool.shutdown(cancel_futures=True)
                if max_jobs is None:
                    del os.environ["MAX_JOBS"]
                else:
                    os.environ["MAX_JOBS"] = max_jobs

    return BuildExtension


setup(
    packages=find_packages(include=["normext", "normext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": build_ext_class()},
)
