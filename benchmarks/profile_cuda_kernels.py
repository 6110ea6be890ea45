"""GPU time of each kernel in a BatchNorm2d training step, torch.nn vs normext.

    python benchmarks/profile_cuda_kernels.py --shapes 64/56,2048/7

For each shape, dtype and layout: one forward + backward of the module
(parameters in the input's dtype), run --steps times under torch.profiler;
prints every GPU kernel, copy and fill with its mean time per step, so that a
slow step can be traced to the kernel that makes it slow.
"""

import argparse

import _common as common
from _common import normext

import torch
from bench_batchnorm import parse_shapes
from torch.profiler import ProfilerActivity, profile


def kernel_times(module, x, grad, steps):
    """(name, mean µs per step) of each GPU activity in a training step."""
    def step():
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    times = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] = times.get(event.name, 0.0) + event.device_time_total / steps
    return sorted(times.items(), key=lambda item: -item[1])


def short(name, width=90):
    name = name.replace("normext::batch_norm::", "").replace("(anonymous namespace)::", "")
    return name if len(name) <= width else name[:width - 3] + "..."


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="64/56,256/28,2048/7")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    device = common.parse_device("cuda")
    print("| shape | dtype | layout | impl | kernel | µs/step |")
    print("|---|---|---|---|---|---:|")
    for shape in parse_shapes(args.shapes, args.batch):
        for dtype_name in common.split_list(args.dtypes):
            dtype = common.DTYPES[common.DTYPE_ALIASES.get(dtype_name, dtype_name)]
            for layout in common.split_list(args.layouts):
                x = torch.randn(shape, device=device).to(dtype).contiguous(
                    memory_format=common.LAYOUTS[layout]).requires_grad_()
                grad = torch.randn_like(x)
                for impl, cls in (("torch", torch.nn.BatchNorm2d),
                                  ("normext", normext.BatchNorm2d)):
                    module = cls(shape[1]).to(device, dtype)
                    times = kernel_times(module, x, grad, args.steps)
                    label = f"| {'x'.join(map(str, shape))} | {dtype_name} | {layout} | {impl}"
                    for name, micros in times:
                        print(f"{label} | `{short(name)}` | {micros:.1f} |")
                    print(f"{label} | **total** | {sum(t for _, t in times):.1f} |", flush=True)


if __name__ == "__main__":
    main()
