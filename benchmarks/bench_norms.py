"""LayerNorm, RMSNorm, GroupNorm and InstanceNorm: torch.nn vs normext, per shape,
forward and forward + backward.

    python benchmarks/bench_norms.py                       # the issue's shapes, float32 + bfloat16
    python benchmarks/bench_norms.py --quick               # a smoke run
    python benchmarks/bench_norms.py --norms rms_norm --dtypes float32 --json-out norms.json

Each row is one layer: LayerNorm and RMSNorm on (tokens, hidden), GroupNorm(32)
and InstanceNorm2d (affine) on (N, C, H, W) in both memory formats; the forward
alone (no autograd), and a training forward + backward to the input, the weight
and the bias. torch runs the torch.nn class, normext the drop-in class; both run
interleaved in one process next to a copy of the input (`out.copy_(x)`: the
memory-bandwidth floor), and with normext's CPU output cache switched off
("cache off": the kernels alone).

Memory traffic per row in multiples of bytes(x) (R read, W written):
  normext  LayerNorm/RMSNorm, and GroupNorm/InstanceNorm contiguous: forward
           1R+1W (a row's or group's statistics and output in one visit);
           backward 2R+1W (dy and x once: the sums, the input gradient and
           the parameter gradients' partial sums).
           GroupNorm/InstanceNorm channels-last: forward 2R+1W, backward
           4R+1W (the statistics, then a pass over the rows).
  floor    forward: one copy (1R+1W); forward + backward: 2.5 copies (3R+2W).
"""

import argparse
import copy
import sys

import _common as common
from _common import log, normext

import torch
from normext._extension import cpu_cache_disabled

# (tokens, hidden)
ROW_SHAPES = ((8192, 768), (4096, 1024), (2048, 4096), (1024, 8192), (256, 32768))
QUICK_ROW_SHAPES = ((512, 768), (64, 8192))
# (N, C, H, W)
GROUP_SHAPES = ((8, 128, 64, 64), (8, 256, 32, 32), (8, 512, 16, 16))
INSTANCE_SHAPES = ((8, 64, 128, 128),)
QUICK_IMAGE_SHAPES = ((2, 64, 16, 16),)
LAYOUTS = {"": torch.contiguous_format, " channels_last": torch.channels_last}
# norm: (torch class, normext class, the layer for an input shape)
NORMS = {
    "layer_norm": (torch.nn.LayerNorm, normext.LayerNorm, lambda cls, shape: cls(shape[-1])),
    "rms_norm": (torch.nn.RMSNorm, normext.RMSNorm, lambda cls, shape: cls(shape[-1])),
    "group_norm": (torch.nn.GroupNorm, normext.GroupNorm, lambda cls, shape: cls(32, shape[1])),
    "instance_norm": (torch.nn.InstanceNorm2d, normext.InstanceNorm2d,
                      lambda cls, shape: cls(shape[1], affine=True)),
}


def _cases(norm: str, quick: bool):
    """(shape label, shape, memory format) of each row of a norm."""
    if norm in ("layer_norm", "rms_norm"):
        for tokens, hidden in QUICK_ROW_SHAPES if quick else ROW_SHAPES:
            yield f"{tokens}x{hidden}", (tokens, hidden), torch.contiguous_format
        return
    shapes = QUICK_IMAGE_SHAPES if quick else (
        GROUP_SHAPES if norm == "group_norm" else INSTANCE_SHAPES)
    for shape in shapes:
        for suffix, memory_format in LAYOUTS.items():
            yield "x".join(map(str, shape)) + suffix, shape, memory_format
FLOOR_COPIES = {"forward": 1.0, "forward+backward": 2.5}


def _forward(layer, x):
    def step():
        with torch.no_grad():
            layer(x)
    return step


def _train(layer, x, grad):
    def step():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)
    return step


def _without_cache(step):
    def run():
        with cpu_cache_disabled():
            step()
    return run


def _check(label, theirs, ours, x, grad) -> None:
    """One training step of normext's layer against torch's layer in float64
    on the same values: output and every gradient must agree to the dtype's
    tolerance, a guard against timing a wrong kernel. (torch's own 16-bit
    parameter gradients are not the reference: they drift far from float64.)"""
    reference = copy.deepcopy(theirs).double()
    results = []
    for layer, dtype in ((reference, torch.float64), (ours, x.dtype)):
        xs = x.detach().to(dtype).requires_grad_()
        layer.zero_grad(set_to_none=True)
        out = layer(xs)
        out.backward(grad.to(dtype))
        results.append([out.detach().double(), xs.grad.double()]
                       + [p.grad.double() for p in layer.parameters()])
    tol = 1e-3 if x.dtype == torch.float32 else 5e-2
    for a, b in zip(results[1], results[0]):
        if not torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item())):
            sys.exit(f"error: {label}: normext's result differs from torch's in float64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", default=",".join(NORMS))
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quick", action="store_true", help="small shapes")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds per measurement of each implementation in a round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown-out", metavar="FILE")
    parser.add_argument("--json-out", metavar="FILE")
    args = parser.parse_args()
    common.apply_threads(args.threads)
    device = torch.device("cpu")
    norms = common.parse_choices(args.norms, NORMS, "norm")

    rows, records, speedups = [], [], {}
    for norm in norms:
        torch_cls, normext_cls, make_layer = NORMS[norm]
        for dtype_name in common.parse_dtypes(args.dtypes):
            dtype = getattr(torch, dtype_name)
            for shape_label, shape, memory_format in _cases(norm, args.quick):
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(shape, generator=gen).to(dtype).contiguous(
                    memory_format=memory_format).requires_grad_()
                grad = torch.randn(shape, generator=gen).to(dtype).contiguous(
                    memory_format=memory_format)
                theirs = make_layer(torch_cls, shape).to(dtype)
                ours = make_layer(normext_cls, shape).to(dtype)
                label = f"{norm} {dtype_name} {shape_label}"
                _check(label, theirs, ours, x, grad)
                copy_out = torch.empty_like(x)  # (x's memory format)
                for mode in FLOOR_COPIES:
                    log(f"{label} {mode}")
                    make = _forward if mode == "forward" else (
                        lambda layer, x: _train(layer, x, grad))
                    fns = {"torch": make(theirs, x), "normext": make(ours, x),
                           "cache off": _without_cache(make(ours, x)),
                           "copy": lambda: copy_out.copy_(x.detach())}
                    t = {name: timing.median * 1e3 for name, timing in common.interleaved_timings(
                        fns, device, args.repeats, args.min_time).items()}
                    speedup = t["torch"] / t["normext"]
                    speedups.setdefault((norm, mode), []).append(speedup)
                    floor = FLOOR_COPIES[mode] * t["copy"]
                    record = dict(norm=norm, dtype=dtype_name, shape=list(shape),
                                  channels_last=memory_format != torch.contiguous_format,
                                  mode=mode, torch_ms=t["torch"], normext_ms=t["normext"],
                                  normext_cache_off_ms=t["cache off"], copy_ms=t["copy"],
                                  speedup=speedup)
                    records.append(record)
                    rows.append([label, mode, f"{t['torch']:.3g}", f"{t['normext']:.3g}",
                                 f"{speedup:.2f}", f"{t['torch'] / t['cache off']:.2f}",
                                 f"{t['torch'] / floor:.2f}", f"{t['normext'] / floor:.2f}"])
    table = common.markdown_table(
        ["layer (shape)", "pass", "torch ms", "normext ms", "speedup",
         "speedup, cache off", "torch / floor", "normext / floor"], rows, "llrrrrrr")
    summary = "; ".join(f"{norm} {mode} geomean {common.geomean(values):.2f}x "
                        f"(lowest {min(values):.2f}x)"
                        for (norm, mode), values in speedups.items())
    note = (f"Median of {args.repeats} interleaved rounds of >= {args.min_time} s; speedup = "
            "torch ms / normext ms; cache off: normext with its CPU output cache switched off "
            "(the kernels alone). floor: a copy of the input (`out.copy_(x)`, same run) for "
            "the forward, 2.5 copies for forward + backward. " + summary + ".")
    report = common.Report("LayerNorm, RMSNorm, GroupNorm and InstanceNorm: torch.nn vs normext",
                           common.metadata(device, "bench_norms"), common.command_line(),
                           [note, table])
    common.publish(report.render(), args.markdown_out, args.json_out,
                   dict(rows=records) if args.json_out else None)


if __name__ == "__main__":
    main()
