"""LayerNorm, RMSNorm, GroupNorm and InstanceNorm: torch.nn vs normext, per shape,
forward and forward + backward.

    python benchmarks/bench_norms.py                       # the issue's shapes, float32 + bfloat16
    python benchmarks/bench_norms.py --quick               # a smoke run
    python benchmarks/bench_norms.py --norms rms_norm --dtypes float32 --json-out norms.json
    python benchmarks/bench_norms.py --device cuda         # the layer and RMS norms' CUDA kernels

Each row is one layer: LayerNorm and RMSNorm on (tokens, hidden), GroupNorm(32)
and InstanceNorm2d (affine) on (N, C, H, W) in both memory formats, and the
fused variants against torch's composition: add + LayerNorm / RMSNorm
(normext.AddLayerNorm: the sum and its norm, both outputs used) and
GroupNorm(32) + SiLU (normext.GroupNormAct); the forward alone (no autograd),
and a training forward + backward to the inputs, the weight and the bias.
torch runs the torch.nn classes, normext the drop-in classes; both run
interleaved in one process next to a copy of the input (`out.copy_(x)`: the
memory-bandwidth floor), and with normext's CPU output cache switched off
("cache off": the kernels alone). With --device cuda normext's layer and
RMS norms run their CUDA kernels, which normext.functional otherwise leaves
to torch on CUDA until they have passed the CUDA tests on a GPU
(functional.LAYER_NORM_DEVICES); the other norms are torch's there.

Memory traffic per row in multiples of bytes(x) (R read, W written):
  normext  LayerNorm/RMSNorm, and GroupNorm/InstanceNorm contiguous: forward
           1R+1W (a row's or group's statistics and output in one visit);
           backward 2R+1W (dy and x once: the sums, the input gradient and
           the parameter gradients' partial sums).
           GroupNorm/InstanceNorm channels-last: forward 2R+1W, backward
           4R+1W (the statistics, then a pass over the rows).
           add + norm: forward 2R+2W (x and the residual read, the sum and
           the output written); backward 3R+1W: the norm's, with the sum's
           own gradient (a tensor apart from the output's) read and added in
           the input gradient's pass. GroupNorm + SiLU: as GroupNorm.
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


class _AddNorm(torch.nn.Module):
    """torch's pre-norm residual step: (norm(x + residual), x + residual)."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x, residual):
        total = x + residual
        return self.norm(total), total


def _pair(torch_layer, normext_layer):
    """make(side, shape): torch's layer (side "torch") or normext's for a shape."""
    return lambda side, shape: (torch_layer if side == "torch" else normext_layer)(shape)


# norm: its layers (torch's, or the composition of torch's layers, and normext's)
NORMS = {
    "layer_norm": _pair(lambda s: torch.nn.LayerNorm(s[-1]), lambda s: normext.LayerNorm(s[-1])),
    "rms_norm": _pair(lambda s: torch.nn.RMSNorm(s[-1]), lambda s: normext.RMSNorm(s[-1])),
    "group_norm": _pair(lambda s: torch.nn.GroupNorm(32, s[1]),
                        lambda s: normext.GroupNorm(32, s[1])),
    "instance_norm": _pair(lambda s: torch.nn.InstanceNorm2d(s[1], affine=True),
                           lambda s: normext.InstanceNorm2d(s[1], affine=True)),
    "add_layer_norm": _pair(lambda s: _AddNorm(torch.nn.LayerNorm(s[-1])),
                            lambda s: normext.AddLayerNorm(s[-1])),
    "add_rms_norm": _pair(lambda s: _AddNorm(torch.nn.RMSNorm(s[-1])),
                          lambda s: normext.AddRMSNorm(s[-1])),
    "group_norm_silu": _pair(
        lambda s: torch.nn.Sequential(torch.nn.GroupNorm(32, s[1]), torch.nn.SiLU()),
        lambda s: normext.GroupNormAct(32, s[1], activation="silu")),
}
# the fused norms' rows, and how many inputs their layers take
_FUSED_ROWS = {"add_layer_norm": "layer_norm", "add_rms_norm": "rms_norm",
               "group_norm_silu": "group_norm"}
_INPUTS = {"add_layer_norm": 2, "add_rms_norm": 2}
# The norms with CUDA kernels.
CUDA_NORMS = ("layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm")


def _cases(norm: str, quick: bool):
    """(shape label, shape, memory format) of each row of a norm."""
    norm = _FUSED_ROWS.get(norm, norm)
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


def _outputs(result) -> list:
    return list(result) if isinstance(result, tuple) else [result]


def _forward(layer, inputs):
    def step():
        with torch.no_grad():
            layer(*inputs)
    return step


def _train(layer, inputs, grads):
    def step():
        for t in inputs:
            t.grad = None
        layer.zero_grad(set_to_none=True)
        outputs = _outputs(layer(*inputs))
        torch.autograd.backward(outputs, grads[:len(outputs)])
    return step


def _without_cache(step):
    def run():
        with cpu_cache_disabled():
            step()
    return run


def _check(label, theirs, ours, inputs, grads) -> None:
    """One training step of normext's layer against torch's layer in float64
    on the same values: outputs and every gradient must agree to the dtype's
    tolerance, a guard against timing a wrong kernel. (torch's own 16-bit
    parameter gradients are not the reference: they drift far from float64.)"""
    reference = copy.deepcopy(theirs).double()
    results = []
    for layer, dtype in ((reference, torch.float64), (ours, inputs[0].dtype)):
        xs = [t.detach().to(dtype).requires_grad_() for t in inputs]
        layer.zero_grad(set_to_none=True)
        outputs = _outputs(layer(*xs))
        torch.autograd.backward(outputs, [g.to(dtype) for g in grads[:len(outputs)]])
        results.append([out.detach().double() for out in outputs]
                       + [t.grad.double() for t in xs]
                       + [p.grad.double() for p in layer.parameters()])
    tol = 1e-3 if inputs[0].dtype == torch.float32 else 5e-2
    for a, b in zip(results[1], results[0], strict=True):
        if not torch.allclose(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item())):
            sys.exit(f"error: {label}: normext's result differs from torch's in float64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--norms", help=f"comma list of {', '.join(NORMS)} (default: all; "
                        f"on cuda: {', '.join(CUDA_NORMS)})")
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
    device = torch.device(args.device)
    if device.type == "cuda":
        normext.functional.LAYER_NORM_DEVICES = ("cpu", "cuda")
    default_norms = CUDA_NORMS if device.type == "cuda" else tuple(NORMS)
    norms = common.parse_choices(args.norms or ",".join(default_norms), NORMS, "norm")

    rows, records, speedups = [], [], {}
    for norm in norms:
        make_layer = NORMS[norm]
        for dtype_name in common.parse_dtypes(args.dtypes):
            dtype = getattr(torch, dtype_name)
            for shape_label, shape, memory_format in _cases(norm, args.quick):
                gen = torch.Generator().manual_seed(0)
                inputs = [torch.randn(shape, generator=gen).to(device, dtype).contiguous(
                    memory_format=memory_format).requires_grad_()
                    for _ in range(_INPUTS.get(norm, 1))]
                x = inputs[0]
                # One gradient per output (the add norms have two), each a tensor of its own.
                grads = [torch.randn(shape, generator=gen).to(device, dtype).contiguous(
                    memory_format=memory_format) for _ in range(2)]
                theirs = make_layer("torch", shape).to(device, dtype)
                ours = make_layer("normext", shape).to(device, dtype)
                label = f"{norm} {dtype_name} {shape_label}"
                _check(label, theirs, ours, inputs, grads)
                copy_out = torch.empty_like(x)  # (x's memory format)
                for mode in FLOOR_COPIES:
                    log(f"{label} {mode}")
                    make = _forward if mode == "forward" else (
                        lambda layer, inputs: _train(layer, inputs, grads))
                    fns = {"torch": make(theirs, inputs), "normext": make(ours, inputs),
                           "cache off": _without_cache(make(ours, inputs)),
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
    report = common.Report("LayerNorm, RMSNorm, GroupNorm, InstanceNorm and the fused norms: "
                           "torch.nn vs normext",
                           common.metadata(device, "bench_norms"), common.command_line(),
                           [note, table])
    common.publish(report.render(), args.markdown_out, args.json_out,
                   dict(rows=records) if args.json_out else None)


if __name__ == "__main__":
    main()
