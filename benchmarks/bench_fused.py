"""Fused BatchNorm + activation (+ residual add) vs torch's separate layers, per shape.

    python benchmarks/bench_fused.py                    # ResNet-50's shapes, float32 + bfloat16
    python benchmarks/bench_fused.py --quick            # a smoke run
    python benchmarks/bench_fused.py --device cpu --dtypes float32 --layouts channels_last

Each row is one training forward + backward (to the input, the residual, the
weight and the bias) of a layer as ResNet-50 has them: BatchNorm2d then ReLU,
or (the expanding 1x1 convolutions' layers, "+add") BatchNorm2d, the residual
add, then ReLU. torch runs nn.BatchNorm2d, `+` and nn.ReLU(inplace=True) (as
torchvision does); normext runs one normext.BatchNormAct2d, plain and with
memory_efficient=True (LeakyReLU(0.01) on both sides for that column, since
ReLU is not invertible). Implementations run interleaved in one process next to
a copy of the input (the memory-bandwidth floor). Progress goes to stderr, a
Markdown report to stdout.

Memory traffic per row in multiples of bytes(x) (R read, W written):
  torch    forward: statistics 1R, normalize 1R+1W, add 2R+1W, relu 1R+1W;
           backward: relu 2R+1W, batch-norm reduction 2R, input gradient 2R+1W
           -> 9R+4W plain, 11R+5W with the add
  normext  forward: statistics 1R, normalize + add + activation 1R+1W (+1R add);
           backward: reduction 2R (+1R: the output, read for the activation's
           derivative), input gradient 2R+1W; with the add the residual's
           gradient dz is written too: on the CPU by the reduction (+1W), whose
           dz the input gradient then reads in place of dy and the output; on
           CUDA by the input gradient's pass (+1R+1W)
           -> 6R+2W plain, 8R+3W with the add (CUDA 9R+3W)
"""

import argparse
import copy
import sys

import _common as common
from _common import log, normext

import torch

# (channels, spatial, residual): ResNet-50's BatchNorm + ReLU layers
RESNET50_LAYERS = ((64, 112, False), (64, 56, False), (256, 56, True), (128, 28, False),
                   (512, 28, True), (256, 14, False), (1024, 14, True), (512, 7, False),
                   (2048, 7, True))
QUICK_LAYERS = ((64, 28, False), (256, 14, True))
# (torch, normext) tensor passes, fwd + bwd, by device and whether the add is fused
TRAFFIC = {"cpu": {False: (13, 8), True: (16, 11)}, "cuda": {False: (13, 8), True: (16, 12)}}


class Torch(torch.nn.Module):
    def __init__(self, channels, activation):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(channels)
        self.act = activation

    def forward(self, x, residual=None):
        y = self.bn(x)
        if residual is not None:
            y = y + residual
        return self.act(y)


def _step(module, x, residual, grad):
    def step():
        x.grad = None
        if residual is not None:
            residual.grad = None
        module.zero_grad(set_to_none=True)
        module(x, residual).backward(grad)
    return step


def _check(label, torch_layer, fused_layer, x, residual, grad) -> None:
    """One training step of both layers (same initial weights) and of torch's
    layer in float64: normext's output and input gradient must agree with
    torch's, or be at least as close to the float64 ones (for 16-bit data
    torch's own can be further off: it takes relu's mask from the rounded
    output), a guard against timing a wrong kernel."""
    def step(layer, dtype):
        xs = x.detach().to(dtype).requires_grad_()
        r = None if residual is None else residual.detach().to(dtype)
        out = layer(xs, r)
        out.backward(grad.to(dtype))
        return out.detach().double(), xs.grad.double()
    reference = copy.deepcopy(torch_layer).double()
    expected = step(reference, torch.float64)
    torch_results, normext_results = (step(layer, x.dtype) for layer in (torch_layer, fused_layer))
    tol = 1e-3 if x.dtype == torch.float32 else 5e-2
    for name, a, b, e in zip(("output", "input gradient"), torch_results, normext_results,
                             expected):
        if torch.allclose(b, a, rtol=tol, atol=tol * max(1.0, a.abs().max().item())):
            continue
        if (b - e).abs().max() > (a - e).abs().max():
            sys.exit(f"error: {label}: normext's {name} differs from torch's, and more "
                     "from the float64 result than torch's does")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=common.default_device())
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="two small layers")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--min-time", type=float, default=0.2,
                        help="seconds per measurement of each implementation in a round")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--markdown-out", metavar="FILE")
    args = parser.parse_args()
    common.apply_threads(args.threads)
    device = common.parse_device(args.device)
    if device.type not in normext.functional.FUSED_DEVICES:
        # The layers compose where their fused kernels have not yet passed the
        # tests on that device (functional.FUSED_DEVICES); time the kernels.
        normext.functional.FUSED_DEVICES += (device.type,)
        log(f"timing normext's fused {device.type} kernels, which the layers do not run yet")
    layers = QUICK_LAYERS if args.quick else RESNET50_LAYERS

    rows, speedups = [], []
    for dtype_name in common.parse_dtypes(args.dtypes):
        dtype = getattr(torch, dtype_name)
        for layout in common.split_list(args.layouts):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            for channels, size, with_add in layers:
                shape = (args.batch, channels, size, size)
                gen = torch.Generator().manual_seed(0)

                def tensor():
                    return torch.randn(shape, generator=gen).to(device, dtype).contiguous(
                        memory_format=fmt)
                x = tensor().requires_grad_()
                residual = tensor().requires_grad_() if with_add else None
                grad = tensor()
                relu = torch.nn.ReLU(inplace=True)
                leaky = torch.nn.LeakyReLU(0.01, inplace=True)
                torch_layer = Torch(channels, relu).to(device, dtype)
                fused_layer = normext.BatchNormAct2d(channels).to(device, dtype)
                label = f"{dtype_name} {layout} {'x'.join(map(str, shape))}" + \
                    (" +add" if with_add else "")
                _check(label, torch_layer, fused_layer, x, residual, grad)
                fns = {
                    "torch": _step(torch_layer, x, residual, grad),
                    "normext": _step(fused_layer, x, residual, grad),
                    "torch leaky": _step(Torch(channels, leaky).to(device, dtype), x, residual,
                                         grad),
                    "normext memory-efficient": _step(normext.BatchNormAct2d(
                        channels, activation="leaky_relu", memory_efficient=True).to(
                            device, dtype), x, residual, grad),
                }
                copy_out = torch.empty_like(x)
                fns["copy"] = lambda: copy_out.copy_(x)
                log(label)
                t = {name: timing.median * 1e3 for name, timing in common.interleaved_timings(
                    fns, device, args.repeats, args.min_time).items()}
                speedup = t["torch"] / t["normext"]
                speedups.append(speedup)
                bytes_x = x.numel() * x.element_size()
                copy_gbps = 2 * bytes_x / (t["copy"] * 1e-3) / 1e9
                floor_ms = TRAFFIC[device.type][with_add][1] * bytes_x / (copy_gbps * 1e9) * 1e3
                rows.append([label, f"{t['torch']:.3g}", f"{t['normext']:.3g}", f"{speedup:.2f}",
                             f"{t['torch leaky'] / t['normext memory-efficient']:.2f}",
                             f"{t['normext memory-efficient'] / t['normext']:.2f}",
                             f"{copy_gbps:.3g}", f"{t['normext'] / floor_ms:.2f}"])
    table = common.markdown_table(
        ["layer (N, C, H, W)", "torch ms", "normext ms", "speedup", "memory-efficient speedup",
         "memory-efficient / normext", "copy GB/s", "normext / floor"],
        rows, "lrrrrrrr")
    note = (f"Training forward + backward of BatchNorm2d + ReLU (+add: the residual add before "
            f"it), median of {args.repeats} interleaved rounds of >= {args.min_time} s; "
            "speedup = torch ms / normext ms. memory-efficient speedup: torch with "
            "LeakyReLU(0.01) over normext memory_efficient=True with the same activation. "
            "copy GB/s: `out.copy_(x)` (read + write) in the same run; floor: normext's "
            f"tensor passes ({TRAFFIC[device.type][False][1]} plain, "
            f"{TRAFFIC[device.type][True][1]} with the add) at that bandwidth. "
            f"Geometric mean speedup: {common.geomean(speedups):.2f}, lowest "
            f"{min(speedups):.2f}.")
    report = common.Report("Fused BatchNorm + activation (+ add): torch.nn vs normext",
                           common.metadata(device, "bench_fused"), common.command_line(),
                           [note, table])
    common.publish(report.render(), args.markdown_out)


if __name__ == "__main__":
    main()
