"""Backward of an eval-mode BatchNorm whose weight and bias are frozen (no
gradient wanted), on the CPU: torch, normext through autograd (the input
gradient alone: one normalize pass over dy), and normext's fused backward op
with parameter gradients (which also reduces dy and x for them). Medians of
15 interleaved rounds, in ms.

    python benchmarks/bench_frozen_eval_backward.py
"""

import statistics
import timeit

import torch
from _common import normext

SHAPES = [((32, 256, 28, 28), torch.contiguous_format), ((32, 256, 28, 28), torch.channels_last),
          ((32, 64, 56, 56), torch.contiguous_format)]


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    for shape, layout in SHAPES:
        x = torch.randn(shape).contiguous(memory_format=layout).requires_grad_()
        grad = torch.randn(shape).contiguous(memory_format=layout)
        channels = shape[1]
        weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
        running_mean, running_var = torch.randn(channels), torch.rand(channels) + 0.5
        outputs = {name: fn(x, running_mean, running_var, weight, bias, False)
                   for name, fn in (("torch", torch.nn.functional.batch_norm),
                                    ("normext", normext.functional.batch_norm))}
        _, mean, invstd = normext.ops.batch_norm_forward(
            x.detach(), weight, bias, running_mean, running_var, False, 0.1, 1e-5)
        calls = {
            "torch": lambda: torch.autograd.grad(outputs["torch"], x, grad, retain_graph=True),
            "normext": lambda: torch.autograd.grad(outputs["normext"], x, grad,
                                                   retain_graph=True),
            "normext fused op": lambda: normext.ops.batch_norm_backward(
                grad, x.detach(), weight, mean, invstd, False),
        }
        times = {name: [] for name in calls}
        for _ in range(15):
            for name, call in calls.items():
                times[name].append(timeit.timeit(call, number=3) / 3 * 1e3)
        layout_name = "channels_last" if layout == torch.channels_last else "nchw"
        medians = ", ".join(f"{name} {statistics.median(t):.3f}" for name, t in times.items())
        print(f"{'x'.join(map(str, shape))} {layout_name}: {medians}")


if __name__ == "__main__":
    main()
