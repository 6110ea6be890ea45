"""normext.functional.batch_norm vs torch.nn.functional.batch_norm, per shape.

    python benchmarks/bench_batchnorm.py                  # ResNet-50's BN shapes, all modes
    python benchmarks/bench_batchnorm.py --quick          # a smoke run
    python benchmarks/bench_batchnorm.py --device cpu --threads 8 --json bn.json
    python benchmarks/bench_batchnorm.py --chart speed.png   # also a bar chart (matplotlib)
    python benchmarks/bench_batchnorm.py --device cpu --cache both   # + the kernels alone

For each dtype, memory layout and shape both implementations run interleaved
in the same process, next to a copy of the same tensor (the memory-bandwidth
floor). On the CPU, --cache both also times normext with its output cache
switched off (outputs from torch's allocator: the kernels alone). Progress goes
to stderr, a Markdown report to stdout. See README.md.
"""

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass

import _common as common
from _common import log, normext
from normext._extension import cpu_cache_disabled

import torch
import torch.nn.functional as F

RESNET50_SHAPES = ("64/112,64/56,128/56,128/28,256/56,256/28,512/28,512/14,1024/14,1024/7,"
                   "2048/7")
QUICK_SHAPES = "64/28,256/14"
MODES = ("train", "eval", "fwdbwd")
MODE_TITLES = {
    "train": "train: forward in training mode (batch statistics, running stats updated)",
    "eval": "eval: forward in eval mode (running statistics)",
    "fwdbwd": "fwdbwd: training forward + backward to input, weight and bias",
}
# Ideal traffic in multiples of bytes(x): train reads x twice (statistics,
# then normalize) and writes the output once; eval reads once, writes once;
# the backward reads x and grad_out twice each and writes grad_input.
IDEAL_PASSES = {"train": 3, "eval": 2, "fwdbwd": 3 + 5}
# (rtol, atol) of the correctness guard, per input dtype.
TOLERANCES = {"float64": (1e-7, 1e-7), "float32": (1e-4, 1e-4), "float16": (1e-2, 1e-2),
              "bfloat16": (4e-2, 4e-2)}
MOMENTUM, EPS = 0.1, 1e-5
GB = 1e9


@dataclass(frozen=True)
class Case:
    dtype: str
    layout: str
    shape: tuple[int, int, int, int]

    def label(self) -> str:
        return f"{self.dtype} {self.layout} {'x'.join(map(str, self.shape))}"


class Tensors:
    """Input, fixed gradient and per-channel parameters of one case, all of the
    input's dtype (as after model.to(dtype)), deterministic for a given case."""

    def __init__(self, case: Case, device: torch.device):
        n, c, h, w = case.shape
        gen = torch.Generator().manual_seed(1_000_003 * c + 1009 * h + w)
        dtype, layout = common.DTYPES[case.dtype], common.LAYOUTS[case.layout]

        def make(*size, scale=1.0, shift=0.0, uniform=False):
            base = torch.rand(size, generator=gen) if uniform else torch.randn(size, generator=gen)
            return (base * scale + shift).to(device=device, dtype=dtype)

        self.x = make(n, c, h, w, scale=2.0, shift=0.5).contiguous(memory_format=layout)
        self.grad = make(n, c, h, w).contiguous(memory_format=layout)
        self.weight = make(c, uniform=True, scale=1.0, shift=0.5)
        self.bias = make(c, scale=0.1)
        self.running_mean = make(c, scale=0.1)
        self.running_var = make(c, uniform=True, scale=1.0, shift=0.5)
        self.copy_out = torch.empty_like(self.x)

    @property
    def nbytes(self) -> int:
        return self.x.numel() * self.x.element_size()

    def step(self, batch_norm: Callable, mode: str) -> Callable[[], None]:
        """One call of `mode` with `batch_norm`, on its own running stats."""
        x, grad = self.x, self.grad
        running_mean, running_var = self.running_mean.clone(), self.running_var.clone()
        if mode in ("train", "eval"):
            weight, bias, training = self.weight, self.bias, mode == "train"

            def forward():
                batch_norm(x, running_mean, running_var, weight, bias, training, MOMENTUM, EPS)

            return forward
        x = x.detach().requires_grad_()
        weight = self.weight.detach().requires_grad_()
        bias = self.bias.detach().requires_grad_()

        def forward_backward():
            out = batch_norm(x, running_mean, running_var, weight, bias, True, MOMENTUM, EPS)
            torch.autograd.grad(out, (x, weight, bias), grad)

        return forward_backward

    def copy(self) -> None:
        self.copy_out.copy_(self.x)


# ------------------------------------------------------------- correctness


def _results(tensors: Tensors, batch_norm: Callable, mode: str) -> dict[str, torch.Tensor]:
    """Everything `mode` produces: output, updated running stats, gradients."""
    running_mean, running_var = tensors.running_mean.clone(), tensors.running_var.clone()
    x, weight, bias = tensors.x, tensors.weight, tensors.bias
    if mode == "fwdbwd":
        x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
    out = batch_norm(x, running_mean, running_var, weight, bias, mode != "eval", MOMENTUM, EPS)
    results = {"output": out.detach()}
    if mode != "eval":
        results.update(running_mean=running_mean, running_var=running_var)
    if mode == "fwdbwd":
        grads = torch.autograd.grad(out, (x, weight, bias), tensors.grad)
        results.update(zip(("grad_input", "grad_weight", "grad_bias"), grads))
    return results


def check_matches_torch(case: Case, mode: str, tensors: Tensors) -> None:
    """Exits with a message unless normext gives torch's results. Elementwise
    results use allclose; the per-channel sums grad_weight and grad_bias, whose
    rounding error grows with N*H*W, are compared relative to their largest
    entry."""
    rtol, atol = TOLERANCES[case.dtype]
    expected = _results(tensors, F.batch_norm, mode)
    actual = _results(tensors, normext.functional.batch_norm, mode)
    for name, want in expected.items():
        got = actual[name]
        problem = None
        if got.shape != want.shape or got.dtype != want.dtype:
            problem = f"{tuple(got.shape)} {got.dtype} instead of {tuple(want.shape)} {want.dtype}"
        else:
            got64, want64 = got.double(), want.double()
            error = (got64 - want64).abs().max().item()
            if name in ("grad_weight", "grad_bias"):
                bad = error > atol + rtol * want64.abs().max().item()
            else:
                bad = not torch.allclose(got64, want64, rtol=rtol, atol=atol)
            if bad:
                problem = f"max abs difference {error:.3g} exceeds rtol={rtol}, atol={atol}"
        if problem:
            sys.exit(f"error: normext's {name} differs from torch's for {mode} {case.label()} "
                     f"on {tensors.x.device}: {problem}.\nNot timing a wrong result; fix it or "
                     "pass --no-check to time anyway.")


# ---------------------------------------------------------------- measuring


def without_cache(step: Callable[[], None]) -> Callable[[], None]:
    """step with normext's CPU output cache switched off (what it holds stays
    cached for the steps that run with it)."""

    def run():
        with cpu_cache_disabled():
            step()

    return run


def measure(case: Case, mode: str, tensors: Tensors, args, memory_ok: bool) -> dict:
    normext_step = tensors.step(normext.functional.batch_norm, mode)
    steps = {"torch": tensors.step(F.batch_norm, mode),
             "normext": without_cache(normext_step) if args.cache == "off" else normext_step,
             "copy": tensors.copy}
    if args.cache == "both":
        steps["normext cache off"] = without_cache(tensors.step(normext.functional.batch_norm,
                                                                mode))
    timings = common.interleaved_timings(steps, args.device, args.repeats, args.min_time)
    t_torch, t_normext, t_copy = (timings[name].median for name in ("torch", "normext", "copy"))
    ideal = IDEAL_PASSES[mode] * tensors.nbytes
    copy_bw = 2 * tensors.nbytes / t_copy
    achieved = ideal / t_normext
    row = {
        "mode": mode, "dtype": case.dtype, "layout": case.layout, "shape": list(case.shape),
        "torch_ms": t_torch * 1e3, "normext_ms": t_normext * 1e3, "copy_ms": t_copy * 1e3,
        "speedup": t_torch / t_normext,
        "ideal_bytes": ideal,
        "normext_gbps": achieved / GB, "torch_gbps": ideal / t_torch / GB,
        "copy_gbps": copy_bw / GB,
        "fraction_of_copy_bw": achieved / copy_bw,
        "x_copy_floor": t_normext / (ideal / copy_bw),
        "timings": {name: timing.as_dict() for name, timing in timings.items()},
    }
    if args.cache == "both":
        t_off = timings["normext cache off"].median
        row.update(normext_cache_off_ms=t_off * 1e3, speedup_cache_off=t_torch / t_off)
    if mode == "fwdbwd" and memory_ok:
        row["peak_bytes_torch"] = common.peak_memory_bytes(steps["torch"], args.device)
        row["peak_bytes_normext"] = common.peak_memory_bytes(steps["normext"], args.device)
    return row


# ------------------------------------------------------------------ report


def _shape(row) -> str:
    return ",".join(map(str, row["shape"]))


def _ms(value: float) -> str:
    return f"{value:.4g}"


def mode_table(rows: list[dict], mode: str) -> str:
    headers = ["mode", "dtype", "layout", "shape (N,C,H,W)", "torch ms", "normext ms", "speedup",
               "ideal MB", "normext GB/s", "% copy BW", "x floor"]
    with_memory = mode == "fwdbwd"
    if with_memory:
        headers += ["peak MB torch", "peak MB normext"]
    cache_off = "normext_cache_off_ms" in rows[0]
    if cache_off:
        headers += ["normext ms, cache off", "speedup, cache off"]
    lines = []
    for row in rows:
        line = [row["mode"], row["dtype"], row["layout"], _shape(row), _ms(row["torch_ms"]),
                _ms(row["normext_ms"]), f"{row['speedup']:.2f}", common.fmt_mb(row["ideal_bytes"]),
                f"{row['normext_gbps']:.3g}", f"{100 * row['fraction_of_copy_bw']:.0f}%",
                f"{row['x_copy_floor']:.2f}"]
        if with_memory:
            line += [common.fmt_mb(row.get("peak_bytes_torch")),
                     common.fmt_mb(row.get("peak_bytes_normext"))]
        if cache_off:
            line += [_ms(row["normext_cache_off_ms"]), f"{row['speedup_cache_off']:.2f}"]
        lines.append(line)
    return common.markdown_table(headers, lines, align="llll" + "r" * (len(headers) - 4))


def summary_table(rows: list[dict], modes: list[str], dtypes: list[str]) -> str:
    cache_off = "speedup_cache_off" in rows[0]

    def cache_off_geomean(group):
        return [f"{common.geomean(r['speedup_cache_off'] for r in group):.3f}"] if cache_off else []

    lines = []
    for mode in modes:
        mode_rows = [row for row in rows if row["mode"] == mode]
        if not mode_rows:
            continue
        for dtype in dtypes:
            group = [row for row in mode_rows if row["dtype"] == dtype]
            if group:
                lines.append([mode, dtype, len(group),
                              f"{common.geomean(r['speedup'] for r in group):.3f}", "", "",
                              *cache_off_geomean(group)])
        slowest = min(mode_rows, key=lambda r: r["speedup"])
        lines.append([f"**{mode}**", "**all**", len(mode_rows),
                      f"**{common.geomean(r['speedup'] for r in mode_rows):.3f}**",
                      f"{slowest['speedup']:.3f}",
                      f"{slowest['dtype']} {slowest['layout']} {_shape(slowest)}",
                      *cache_off_geomean(mode_rows)])
    headers = ["mode", "dtype", "configs", "geomean speedup", "min speedup", "min at"]
    if cache_off:
        headers.append("geomean speedup, cache off")
    return common.markdown_table(headers, lines, align="llrrrlr"[:len(headers)])


def build_report(rows: list[dict], info: dict, args, memory_note: str | None) -> str:
    report = common.Report("BatchNorm2d: normext vs torch.nn.functional.batch_norm", info,
                           common.command_line())
    device_name = info.get("gpu") or info["cpu"]
    report.sections.append(
        f"{args.device.type} ({device_name}), batch {args.batch}, medians of {args.repeats} "
        f"interleaved rounds of >= {args.min_time * 1e3:g} ms each. speedup = torch ms / "
        "normext ms (> 1: normext faster); ideal MB = the bytes the mode must move at least; "
        "normext GB/s = ideal MB / normext ms; % copy BW = that over the bandwidth of "
        "`out.copy_(x)` on the same tensor; x floor = normext ms / (ideal MB / copy bandwidth)."
        + {"on": "", "off": " normext runs with its CPU output cache off (the kernels alone).",
           "both": " The cache-off columns time normext with its CPU output cache switched off "
                   "(outputs from torch's allocator: the kernels alone)."}[args.cache])
    for mode in args.modes:
        mode_rows = [row for row in rows if row["mode"] == mode]
        if mode_rows:
            section = f"### {MODE_TITLES[mode]}\n\n{mode_table(mode_rows, mode)}"
            if mode == "fwdbwd" and memory_note:
                section += f"\n\n{memory_note}"
            report.sections.append(section)
    report.sections.append("### Speedup summary (geometric mean of torch ms / normext ms)\n\n"
                           + summary_table(rows, args.modes, args.dtypes))
    return report.render()


def have_matplotlib(path: str) -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log(f"warning: no --chart {path}: matplotlib is not installed (pip install matplotlib, "
            "or the `bench` extra); the tables and --json are written as usual")
        return False
    return True


CHART_MODE_TITLES = {"train": "training forward", "eval": "eval forward",
                     "fwdbwd": "training forward + backward"}


def chart(rows: list[dict], modes: list[str], path: str, info: dict, repeats: int) -> None:
    """Bar chart of the speedup over torch (torch ms / normext ms) of every
    row: one panel per mode, one group of bars per shape, one bar per dtype
    and layout, each labelled with its value; the geometric mean of each
    series in the panel's title. Bars start at 1x on a log scale, so that 2x faster
    and 2x slower are the same length. matplotlib is imported here only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullLocator

    modes = [mode for mode in modes if any(row["mode"] == mode for row in rows)]
    shapes = list(dict.fromkeys(_shape(row) for row in rows))
    series = list(dict.fromkeys((row["dtype"], row["layout"]) for row in rows))
    width = 0.8 / len(series)
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(7.0, 1.1 * len(shapes) * len(series)
                                                         + 2.0), 2.6 * len(modes) + 0.9),
                             squeeze=False, sharex=True)
    low = min(0.5, min(row["speedup"] for row in rows) / 1.3)
    high = max(2.0, max(row["speedup"] for row in rows) * 1.5)
    ticks = [2.0 ** k for k in range(-6, 8) if low <= 2.0 ** k <= high]
    for ax, mode in zip(axes[:, 0], modes):
        mode_rows = [row for row in rows if row["mode"] == mode]
        means = []
        for i, (dtype, layout) in enumerate(series):
            speedup = {_shape(r): r["speedup"] for r in mode_rows
                       if (r["dtype"], r["layout"]) == (dtype, layout)}
            if not speedup:
                continue
            xs = [j + (i - (len(series) - 1) / 2) * width for j, s in enumerate(shapes)
                  if s in speedup]
            values = [speedup[s] for s in shapes if s in speedup]
            means.append(f"{dtype} {layout} {common.geomean(values):.2f}x")
            # bars grow from the 1x line: up where normext is faster, down where slower
            bars = ax.bar(xs, [v - 1.0 for v in values], width * 0.95, bottom=1.0,
                          label=f"{dtype} {layout}", color=f"C{i}")
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
        ax.set_yscale("log")
        ax.set_ylim(low, high)
        ax.yaxis.set_major_locator(FixedLocator(ticks))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_yticks(ticks, [f"{t:g}x" for t in ticks])
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_ylabel("speedup over torch")
        ax.set_title(f"{CHART_MODE_TITLES[mode]} (geomean: {', '.join(means)})", fontsize=9,
                     loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(range(len(shapes)), [s.replace(",", "x") for s in shapes],
                           fontsize=8)
    axes[-1, 0].set_xlabel("shape N x C x H x W (> 1x: normext faster; dashed line: torch)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(series), fontsize=8,
               bbox_to_anchor=(0.5, 1.0 - 0.6 / fig.get_figheight()))
    machine = info.get("gpu") or info["cpu"]
    threads = info["torch_threads"]
    fig.suptitle(f"normext vs torch.nn.functional.batch_norm, {info['device']} ({machine}, "
                 f"{threads} thread{'s' if threads != 1 else ''})\ntorch {info['torch']}, "
                 f"normext {info['git_commit'] or '?'}, {info['date'][:10]}; medians of "
                 f"{repeats} rounds", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1.0 - 0.85 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    log(f"wrote {path}")


def chart_from_json(json_path: str, path: str) -> None:
    """Redraws --chart from the --json of an earlier run (no timing)."""
    import json

    with open(json_path) as saved:
        payload = json.load(saved)
    settings = payload["settings"]
    chart(payload["rows"], settings["modes"], path, payload["metadata"], settings["repeats"])


# -------------------------------------------------------------------- main


def parse_shapes(text: str, batch: int) -> list[tuple[int, int, int, int]]:
    """"C/H" (square) or "C/HxW" items, e.g. "64/112,256/28x14"."""
    shapes = []
    for item in common.split_list(text):
        try:
            channels, spatial = item.split("/")
            h, _, w = spatial.partition("x")
            shapes.append((batch, int(channels), int(h), int(w or h)))
        except ValueError:
            sys.exit(f"error: bad shape {item!r}; expected C/H or C/HxW, e.g. 64/112")
    return shapes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults: --min-time 0.1 s on the CPU, 0.02 s on CUDA; --quick means shapes "
               f"{QUICK_SHAPES}, --repeats 3, --min-time 0.02 unless given.")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=common.default_device(),
                        help="default: cuda if available, else cpu")
    parser.add_argument("--dtypes", help="comma list (default: float32,bfloat16 on the CPU, "
                                         "float32,float16,bfloat16 on CUDA)")
    parser.add_argument("--layouts", default="nchw,channels_last",
                        help="comma list of nchw, channels_last (default: both)")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma list of train, eval, fwdbwd (default: all)")
    parser.add_argument("--shapes", help="comma list of C/H or C/HxW "
                                         "(default: ResNet-50's BatchNorm2d shapes)")
    parser.add_argument("--batch", type=int, default=32, help="N (default 32)")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 7)")
    parser.add_argument("--min-time", type=float, help="seconds per measurement of each "
                                                       "implementation in a round")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--quick", action="store_true", help="2 small shapes, few repeats")
    parser.add_argument("--cache", choices=("on", "off", "both"), default="on",
                        help="normext's CPU output cache: on (default), off (the kernels "
                             "alone) or both, side by side; CPU only")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the check that normext matches torch before timing")
    parser.add_argument("--json", metavar="FILE", help="write every row and the metadata")
    parser.add_argument("--markdown-out", metavar="FILE",
                        help="also append the Markdown report to FILE "
                             "(e.g. benchmarks/history/2026-12.md)")
    parser.add_argument("--chart", "--plot", dest="chart", metavar="FILE.png",
                        help="bar chart of the speedups over torch, a panel per mode "
                             "(needs matplotlib: the `bench` extra)")
    parser.add_argument("--chart-from", metavar="FILE.json",
                        help="only draw --chart from an earlier run's --json, then exit")
    args = parser.parse_args(argv)

    args.device = common.parse_device(args.device)
    on_cuda = args.device.type == "cuda"
    args.dtypes = common.parse_dtypes(
        args.dtypes or ("float32,float16,bfloat16" if on_cuda else "float32,bfloat16"))
    args.layouts = common.parse_choices(args.layouts, common.LAYOUTS, "--layouts")
    args.modes = common.parse_choices(args.modes, MODES, "--modes")
    args.shapes = parse_shapes(args.shapes or (QUICK_SHAPES if args.quick else RESNET50_SHAPES),
                               args.batch)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    if args.min_time is None:
        args.min_time = 0.02 if args.quick or on_cuda else 0.1
    if args.batch < 1 or args.repeats < 1 or args.min_time <= 0:
        parser.error("--batch and --repeats must be positive, --min-time > 0")
    if on_cuda and args.cache != "on":
        parser.error("--cache off and both are for the CPU: CUDA outputs do not use the cache")
    if args.chart and not have_matplotlib(args.chart):
        args.chart = None
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.chart_from:
        if not args.chart:
            sys.exit("error: --chart-from needs --chart FILE.png")
        chart_from_json(args.chart_from, args.chart)
        return
    common.apply_threads(args.threads)
    torch.manual_seed(0)
    info = common.metadata(args.device, "bench_batchnorm")

    memory_ok, memory_note = True, None
    if "fwdbwd" in args.modes:
        memory_ok, memory_note = common.peak_memory_method(args.device, "one fwd+bwd")

    cases = [Case(dtype, layout, shape)
             for dtype in args.dtypes for layout in args.layouts for shape in args.shapes]
    total = len(cases) * len(args.modes)
    log(f"{total} configurations on {info.get('gpu') or info['cpu']} "
        f"({torch.get_num_threads()} threads), {args.repeats} rounds of >= {args.min_time} s")
    rows = []
    for case in cases:
        tensors = Tensors(case, args.device)
        for mode in args.modes:
            if not args.no_check:
                check_matches_torch(case, mode, tensors)
            row = measure(case, mode, tensors, args, memory_ok)
            rows.append(row)
            log(f"[{len(rows)}/{total}] {mode:6} {case.label():34} torch {_ms(row['torch_ms'])} ms"
                f"  normext {_ms(row['normext_ms'])} ms  speedup {row['speedup']:.2f}"
                f"  ({100 * row['fraction_of_copy_bw']:.0f}% of copy BW)"
                + (f"  cache off {_ms(row['normext_cache_off_ms'])} ms"
                   if args.cache == "both" else ""))
        del tensors

    common.publish(build_report(rows, info, args, memory_note), args.markdown_out, args.json, {
        "metadata": info, "settings": {
            "device": args.device.type, "dtypes": args.dtypes, "layouts": args.layouts,
            "modes": args.modes, "batch": args.batch, "repeats": args.repeats,
            "min_time_s": args.min_time, "momentum": MOMENTUM, "eps": EPS, "cache": args.cache,
            "ideal_passes": IDEAL_PASSES, "check": not args.no_check}, "rows": rows})
    if args.chart:
        chart(rows, args.modes, args.chart, info, args.repeats)


if __name__ == "__main__":
    main()
