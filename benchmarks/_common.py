"""Shared helpers of the normext benchmarks: import path, interleaved timing,
peak memory, run metadata and Markdown output.

Only the benchmark scripts in this folder import it (they run as scripts, so
this folder is on sys.path)."""

import contextlib
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def _prefer_checkout() -> None:
    """Benchmark the normext of this checkout when it is built in place
    (`python setup.py build_ext --inplace`), else whatever is installed."""
    package = REPO_ROOT / "normext"
    if (package / "__init__.py").exists() and any(package.glob("_C.*")):
        sys.path.insert(0, str(REPO_ROOT))


_prefer_checkout()

import torch  # noqa: E402

try:
    import normext  # noqa: E402
except ImportError as error:
    sys.exit(f"error: cannot import normext ({error}).\n"
             f"Build it in place (`python setup.py build_ext --inplace` in {REPO_ROOT}) "
             "or install it (`pip install --no-build-isolation .`).")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                 "bf16": "bfloat16", "fp64": "float64", "double": "float64"}


def merged_reductions(fn: Callable[[], object]) -> Callable[[], object]:
    """fn with normext's CUDA reductions merged in their first kernel
    (normext._C.set_cuda_merge_in_last_block), switched on around each call only."""
    def merged():
        previous = normext._C.set_cuda_merge_in_last_block(True)
        try:
            return fn()
        finally:
            normext._C.set_cuda_merge_in_last_block(previous)
    return merged


# ---------------------------------------------------------------- arguments


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch.cuda.is_available() is False")
    if name == "cuda" and "cuda" not in normext.build_info()["backends"]:
        sys.exit(f"error: --device cuda but this normext was built without CUDA kernels "
                 f"(build_info: {normext.build_info()})")
    return torch.device(name)


def parse_dtypes(text: str) -> list[str]:
    names = []
    for item in split_list(text):
        name = DTYPE_ALIASES.get(item, item)
        if name not in DTYPES:
            sys.exit(f"error: unknown dtype {item!r}; choose from {', '.join(DTYPES)}")
        names.append(name)
    return names


def split_list(text: str) -> list[str]:
    return [item.strip().lower() for item in text.split(",") if item.strip()]


def parse_choices(text: str, allowed: Iterable[str], what: str) -> list[str]:
    values, allowed = split_list(text), list(allowed)
    unknown = [value for value in values if value not in allowed]
    if unknown or not values:
        sys.exit(f"error: bad {what} {unknown or text!r}; choose from {', '.join(allowed)}")
    return values


def apply_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            sys.exit("error: --threads must be at least 1")
        torch.set_num_threads(threads)


def log(message: str) -> None:
    """Progress goes to stderr so stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------- timing


@dataclass
class Timing:
    """Seconds per call: one sample per round, each the mean over `iters` calls."""

    samples: list[float]
    iters: int

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.samples),
                "max_s": max(self.samples), "iters_per_round": self.iters,
                "samples_s": self.samples}


class Timer:
    """Wall time of `iters` back-to-back calls: time.perf_counter on the CPU,
    CUDA events (after a synchronize) on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def run(self, fn: Callable[[], object], iters: int) -> float:
        """Total seconds of `iters` calls of fn, with the garbage collector off."""
        gc.disable()
        try:
            self.synchronize()
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                return start.elapsed_time(end) / 1e3
            start_s = time.perf_counter()
            for _ in range(iters):
                fn()
            return time.perf_counter() - start_s
        finally:
            gc.enable()

    def calibrate(self, fn: Callable[[], object], min_time: float, warmup: int) -> int:
        """Runs fn `warmup` times, then returns a number of calls that lasts at
        least min_time."""
        for _ in range(warmup):
            fn()
        self.synchronize()
        iters = 1
        while True:
            elapsed = self.run(fn, iters)
            if elapsed >= min_time:
                return iters
            if elapsed >= min_time / 4:  # close enough to extrapolate
                return math.ceil(iters * 1.1 * min_time / elapsed)
            iters *= 4 if elapsed < min_time / 16 else 2


def interleaved_timings(fns: dict[str, Callable[[], object]], device: torch.device,
                        rounds: int, min_time: float = 0.0, warmup: int = 3,
                        iters: int | None = None) -> dict[str, Timing]:
    """Times every fn once per round, rotating which goes first, so slow drifts
    of the machine (clocks, other load) hit all of them alike; each measurement
    is `iters` calls, or as many as last min_time. Returns the per-call timings
    of each, whose median is the figure to report."""
    timer = Timer(device)
    gc.collect()
    if iters is None:
        counts = {name: timer.calibrate(fn, min_time, warmup) for name, fn in fns.items()}
    else:
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        counts = dict.fromkeys(fns, iters)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(timer.run(fns[name], counts[name]) / counts[name])
    return {name: Timing(samples[name], counts[name]) for name in names}


# ------------------------------------------------------------- peak memory


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (the profiler's C++ side logs a few lines on
    every start and stop); Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak of the running sum of the CPU allocations and frees that fn makes
    through torch's allocator, from torch.profiler's memory events.

    The raw events are used: in prof.events() the allocations made inside an
    op are folded into that op's cpu_memory_usage and only the frees made
    outside ops stay as "[memory]" events, so their running sum says little.
    """
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    results = getattr(prof.profiler, "kineto_results", None)
    if results is None:
        return None
    cpu = torch.autograd.DeviceType.CPU
    events = [event for event in results.events()
              if event.name() == "[memory]" and event.device_type() == cpu]
    events.sort(key=lambda event: event.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Bytes fn allocates at its peak over what was allocated before it ran:
    torch.cuda.max_memory_allocated minus the baseline on a GPU, the profiler's
    allocation events on the CPU (see cpu_peak_method_ok). None if unknown."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    return _cpu_peak_bytes(fn)


def cpu_peak_method_ok() -> tuple[bool, str]:
    """Checks the CPU method on `x * 2`, whose peak is the bytes of its output
    (plus the few bytes of the wrapped scalar)."""
    x = torch.ones(256, 1024)  # 1 MiB
    expected = x.numel() * x.element_size()
    measured = _cpu_peak_bytes(lambda: x * 2)
    ok = measured is not None and expected <= measured <= expected + 4096
    return ok, f"CPU peak-memory self-check: x * 2 on {expected} B -> {measured} B"


def peak_memory_method(device: torch.device, what: str) -> tuple[bool, str]:
    """Whether peak_memory_bytes can be trusted on `device` (checked on the
    CPU), and a sentence for the report on how the peak of `what` is measured."""
    if device.type == "cuda":
        return True, (f"Peak MB: torch.cuda.max_memory_allocated during {what} minus what was "
                      "allocated before it.")
    ok, message = cpu_peak_method_ok()
    log(message + (" (ok)" if ok else " (wrong: peak memory not reported)"))
    if not ok:
        return False, ("Peak MB: n/a, the profiler's memory events failed a self-check "
                       f"({message}).")
    return True, (f"Peak MB: the most memory {what} holds at once beyond what existed before "
                  "it, from the CPU allocation events of torch.profiler (profile_memory=True); "
                  "allocations that bypass torch's allocator are not seen.")


def fmt_mb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e6:.4g}"


# ---------------------------------------------------------------- metadata


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str | None:
    """HEAD, or NORMEXT_GIT_COMMIT where set (gpu_check.sh sets it from
    GIT_COMMIT: a lent machine's copy of the tree can carry a stale .git)."""
    if os.environ.get("NORMEXT_GIT_COMMIT"):
        return os.environ["NORMEXT_GIT_COMMIT"]
    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (uncommitted changes)"
    return commit


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def metadata(device: torch.device, benchmark: str) -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "benchmark": benchmark,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "normext": normext.__version__,
        "normext_path": str(Path(normext.__file__).parent),
        "normext_build": normext.build_info(),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = f"{props.name} (sm_{props.major}{props.minor}, " \
                      f"{props.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def metadata_markdown(info: dict, command: str) -> str:
    machine = info.get("gpu") or info["cpu"]
    build = info["normext_build"]
    lines = [
        f"- machine: {machine}" + (f" (host CPU: {info['cpu']})" if "gpu" in info else ""),
        f"- cores: {info['cpu_cores']} ({info['cpu_cores_usable']} usable), "
        f"torch threads: {info['torch_threads']}",
        f"- torch {info['torch']}"
        + (f", CUDA {info['cuda']}, cuDNN {info['cudnn']}" if "gpu" in info else "")
        + f", Python {info['python']}, {info['platform']}",
        f"- normext {info['normext']} ({info['normext_path']}), build: "
        f"backends={','.join(build['backends'])}, openmp={build['openmp']}, "
        f"cuda_arches={build['cuda_arches'] or '-'}, CPU kernels: {build['cpu_capability']} "
        f"(of {','.join(build['cpu_capabilities'])})",
        f"- date: {info['date']}, git commit: {info['git_commit'] or 'unknown'}",
        f"- command: `{command}`",
    ]
    return "\n".join(lines)


def command_line() -> str:
    return " ".join(["python", os.path.relpath(sys.argv[0], REPO_ROOT)] + sys.argv[1:])


# ----------------------------------------------------------------- output


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]],
                   align: str | None = None) -> str:
    """A Markdown table, padded to line up in a terminal; align holds "l" or
    "r" per column (default: all left)."""
    rows = [[str(cell) for cell in row] for row in rows]
    align = align or "l" * len(headers)
    widths = [max([len(header)] + [len(row[i]) for row in rows])
              for i, header in enumerate(headers)]

    def line(cells):
        return "| " + " | ".join(cell.rjust(width) if side == "r" else cell.ljust(width)
                                 for cell, width, side in zip(cells, widths, align)) + " |"

    rule = "|" + "|".join("-" * (width + 1) + ":" if side == "r" else "-" * (width + 2)
                          for width, side in zip(widths, align)) + "|"
    return "\n".join([line(headers), rule] + [line(row) for row in rows])


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def write_json(path: str, payload: dict) -> None:
    with open(path, "w") as out:
        json.dump(payload, out, indent=2, default=str)
        out.write("\n")
    log(f"wrote {path}")


def append_markdown(path: str, text: str) -> None:
    """Appends a report to a Markdown file such as benchmarks/history/2026-12.md,
    starting it with a title if it is new."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a") as out:
        if new:
            out.write("# normext benchmark results\n\n"
                      "Appended by `--markdown-out`; see benchmarks/README.md.\n\n")
        out.write(text.rstrip("\n") + "\n\n")
    log(f"appended the report to {path}")


def publish(report: str, markdown_out: str | None, json_out: str | None = None,
            payload: dict | None = None) -> None:
    """Prints the Markdown report, appends it to markdown_out and writes
    payload to json_out, each when given."""
    print(report)
    if markdown_out:
        append_markdown(markdown_out, report)
    if json_out:
        write_json(json_out, payload)


@dataclass
class Report:
    """A titled Markdown report: metadata header, then sections."""

    title: str
    info: dict
    command: str
    sections: list[str] = field(default_factory=list)

    def render(self) -> str:
        parts = [f"## {self.title}", metadata_markdown(self.info, self.command)]
        return "\n\n".join(parts + self.sections) + "\n"
