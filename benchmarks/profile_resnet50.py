"""Where a ResNet-50 training step's time goes, torch.nn vs normext.

    python benchmarks/profile_resnet50.py --layouts nchw --steps 3
    python benchmarks/profile_resnet50.py --device cpu --layouts nchw --steps 3

On a GPU, for each layout: the step's wall time (synchronized), the GPU time
(sum of kernel, copy and fill durations) and the host time the profiler saw in
operators, then the GPU kernels whose time per step differs most between the
two models. A wall time well above the GPU time means a host-bound step.

On the CPU: each model's operator time per step by what the operators do
(self time, so nested calls count once; medians of `--steps` profiled steps,
the models interleaved), and the bound on a step's speedup that a norm layer
can give: the step time over the step time without the batch norm, ReLU and
residual-add time (what normext's layers replace); convolutions take the rest.
Same models and step as bench_resnet50.py (needs torchvision).
"""

import argparse
import statistics
import sys
import time

import _common as common
from bench_resnet50 import make_models, train_step

import torch
from torch.profiler import ProfilerActivity, profile


def step_profile(step, steps, device):
    """(wall ms, GPU ms, operator host ms, {kernel: GPU ms}) per step."""
    def run():
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    step()
    run()
    start = time.perf_counter()
    run()
    wall = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run()
    kernels, host = {}, 0.0
    for event in prof.key_averages():
        if getattr(event, "is_user_annotation", False):
            continue  # a range on the GPU timeline (the optimizer's step), not an activity
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] = event.device_time_total / steps / 1e3
        elif event.key.startswith(("aten::", "normext::")):
            host += event.self_cpu_time_total / steps / 1e3
    return wall * 1e3, sum(kernels.values()), host, kernels


# Operators (profiler keys) of the ReLU and its backward.
RELU_OPS = ("aten::relu", "aten::relu_", "aten::threshold_backward", "aten::clamp_min",
            "aten::clamp_min_")
CPU_GROUPS = ("convolution", "batch norm", "relu", "residual add", "other")


def cpu_group(key, shapes, batch):
    """What an operator of a CPU step (outside the optimizer) does: a batch
    norm (torch's ops, normext's ops and autograd nodes), a convolution, the
    ReLU, an add of two activations (the residual, and in the backward the
    gradients of a block's two branches, which the engine adds), or anything else."""
    if key.startswith("normext::") or "batch_norm" in key or "BatchNorm" in key:
        return "batch norm"
    if "conv" in key or "Convolution" in key:
        return "convolution"
    if key in RELU_OPS or "ReluBackward" in key:
        return "relu"
    if "AddBackward" in key or (key in ("aten::add", "aten::add_") and shapes
                                and len(shapes[0]) == 4 and shapes[0][0] == batch):
        return "residual add"
    return "other"


def _in_optimizer(event):
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("Optimizer."):
        parent = parent.cpu_parent
    return parent is not None


def cpu_step_groups(step, batch):
    """(wall ms, {group: self ms}) of one profiled CPU step; the optimizer's
    operators (inside its Optimizer.step range) are "other"."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    groups = dict.fromkeys(CPU_GROUPS, 0.0)
    for event in prof.events():
        group = "other" if _in_optimizer(event) else cpu_group(event.name, event.input_shapes,
                                                               batch)
        groups[group] += event.self_cpu_time_total / 1e3
    return wall * 1e3, groups


def print_cpu_groups(steps_by_model, title):
    print(f"\n### {title}\n")
    print("| model | wall ms/step | " + " | ".join(f"{g} ms" for g in CPU_GROUPS)
          + " | step bound without batch norm, relu, add |")
    print("|---|---:|" + "---:|" * len(CPU_GROUPS) + "---:|")
    for name, samples in steps_by_model.items():
        wall = statistics.median(w for w, _ in samples)
        group_ms = {g: statistics.median(groups[g] for _, groups in samples) for g in CPU_GROUPS}
        replaced = group_ms["batch norm"] + group_ms["relu"] + group_ms["residual add"]
        print(f"| {name} | {wall:.1f} | "
              + " | ".join(f"{group_ms[g]:.1f}" for g in CPU_GROUPS)
              + f" | {wall / max(wall - replaced, 1e-9):.2f}x |")
    sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda, or cpu (operator time by group)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    try:
        import torchvision
    except ImportError:
        sys.exit("profile_resnet50 needs torchvision")
    device = common.parse_device(args.device)
    torch.backends.cudnn.benchmark = True
    dtype = common.DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(0)
    for layout in common.split_list(args.layouts):
        memory_format = common.LAYOUTS[layout]
        images = torch.randn(args.batch, 3, args.size, args.size, generator=gen).to(
            device=device, dtype=dtype).contiguous(memory_format=memory_format)
        labels = torch.randint(1000, (args.batch,), generator=gen).to(device)
        models, _ = make_models(torchvision, argparse.Namespace(activation="relu", compile=False),
                                device, dtype, memory_format)
        if device.type == "cpu":
            optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
                          for name, m in models.items()}
            step_of = {name: (lambda m=m, o=optimizers[name]: train_step(m, o, images, labels))
                       for name, m in models.items()}
            for step in step_of.values():  # warm-up
                step()
            samples = {name: [] for name in models}
            for _ in range(args.steps):
                for name, step in step_of.items():
                    samples[name].append(cpu_step_groups(step, args.batch))
            print_cpu_groups(samples, f"{args.dtype} {layout}, batch {args.batch}, "
                                      f"{args.size}x{args.size}, cpu")
            continue
        results = {}
        for name, model in models.items():
            optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            results[name] = step_profile(
                lambda m=model, o=optimizer: train_step(m, o, images, labels), args.steps, device)
        print(f"\n### {args.dtype} {layout}, batch {args.batch}, {args.size}x{args.size}\n")
        print("| model | wall ms/step | GPU ms/step | operator host ms/step | GPU activities |")
        print("|---|---:|---:|---:|---:|")
        for name, (wall, gpu, host, kernels) in results.items():
            print(f"| {name} | {wall:.2f} | {gpu:.2f} | {host:.2f} | {len(kernels)} |")
        torch_kernels, normext_kernels = results["torch"][3], results["normext.fuse"][3]
        names = set(torch_kernels) | set(normext_kernels)
        diffs = sorted(names, key=lambda k: -abs(normext_kernels.get(k, 0)
                                                 - torch_kernels.get(k, 0)))
        print("\n| kernel | torch ms/step | normext.fuse ms/step |\n|---|---:|---:|")
        for key in diffs[:args.top]:
            label = key if len(key) <= 100 else key[:97] + "..."
            print(f"| `{label}` | {torch_kernels.get(key, 0):.3f} | "
                  f"{normext_kernels.get(key, 0):.3f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
