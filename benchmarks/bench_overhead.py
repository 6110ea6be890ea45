"""Per-call cost of a small BatchNorm2d: torch.nn vs normext, where the time
is host-side overhead (Python, dispatch, allocation, kernel launches) rather
than memory traffic.

    python benchmarks/bench_overhead.py                  # CPU (or CUDA when present)
    python benchmarks/bench_overhead.py --device cuda --shape 32,64,8,8

For each mode and dtype: the median time of one call (interleaved rounds,
side by side in one process), the operator calls one call makes (profiler
events named aten::* or normext::*, nested ones included, so both columns
count the same way), and on CUDA the GPU kernels, copies and fills it runs.
Counts are of the whole module call: the training modes include the
num_batches_tracked update (torch's add_; normext increments a CPU counter
in its entry, no operator call, and calls add_ elsewhere: one kernel on a GPU).
The module's parameters and buffers have the input's dtype (model.half()).
On CUDA a third column set ("merged") is normext with its reductions' partials
merged in the first kernel's last block (normext._C.set_cuda_merge_in_last_block:
per reduction a kernel fewer and a memset more; off by default until run on a GPU).
"""

import argparse

import _common as common
from _common import log, normext

import torch
from torch.profiler import ProfilerActivity, profile

MODES = ("train", "eval", "train_fwdbwd", "eval_fwdbwd")


def _call(module, x, grad, mode):
    if mode.endswith("fwdbwd"):
        def step():  # gradients set, not accumulated: no add_ kernels in the count
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(grad)
        return step

    def forward():
        with torch.no_grad():
            module(x)
    return forward


def _counts(fn, device) -> tuple[int, int | None]:
    """(operator calls, GPU activities) of one call of fn, after a warm-up;
    None for the GPU's when the profiler recorded none (no CUPTI)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with common._quiet_stderr(), profile(activities=activities) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    # scope 1 (RecordScope::BACKWARD_FUNCTION) marks an autograd node, such as
    # normext::BatchNormBackward: not an operator call.
    ops = sum(e.name.startswith(("aten::", "normext::")) and e.scope != 1 for e in events)
    gpu = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in events)
    return ops, (gpu or None) if device.type == "cuda" else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default=common.default_device())
    parser.add_argument("--dtypes", default="float32,float16",
                        help="comma list (default: float32,float16)")
    parser.add_argument("--shape", default="2,16,4,4", help="N,C,H,W (default 2,16,4,4)")
    parser.add_argument("--layout", choices=("nchw", "channels_last"), default="nchw")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
    parser.add_argument("--min-time", type=float, default=0.1,
                        help="seconds per measurement of each implementation in a round")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N)")
    parser.add_argument("--markdown-out", metavar="FILE")
    args = parser.parse_args()
    common.apply_threads(args.threads)
    device = common.parse_device(args.device)
    shape = tuple(int(v) for v in args.shape.split(","))
    memory_format = (torch.channels_last if args.layout == "channels_last"
                     else torch.contiguous_format)

    rows = []
    for dtype_name in common.parse_dtypes(args.dtypes):
        dtype = getattr(torch, dtype_name)
        x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)
        x.requires_grad_()
        grad = torch.randn_like(x)
        for mode in MODES:
            fns, counts = {}, {}
            for name, cls in (("torch", torch.nn.BatchNorm2d), ("normext", normext.BatchNorm2d)):
                module = cls(shape[1]).to(device, dtype).train(mode.startswith("train"))
                fns[name] = _call(module, x, grad, mode)
                counts[name] = _counts(fns[name], device)
                if device.type == "cuda" and name == "normext":
                    fns["merged"] = common.merged_reductions(_call(module, x, grad, mode))
                    counts["merged"] = _counts(fns["merged"], device)
            log(f"{mode} {dtype_name}")
            timings = common.interleaved_timings(fns, device, args.repeats, args.min_time)
            t_us, n_us = (timings[name].median * 1e6 for name in ("torch", "normext"))
            row = [mode, dtype_name, f"{t_us:.1f}", f"{n_us:.1f}", f"{t_us / n_us:.2f}",
                   counts["torch"][0], counts["normext"][0]]
            if device.type == "cuda":
                row += [counts[name][1] or "n/a" for name in ("torch", "normext")]
                m_us = timings["merged"].median * 1e6
                row += [f"{m_us:.1f}", f"{t_us / m_us:.2f}", counts["merged"][1] or "n/a"]
            rows.append(row)

    headers = ["mode", "dtype", "torch us", "normext us", "speedup", "torch ops", "normext ops"]
    if device.type == "cuda":
        headers += ["torch GPU kernels", "normext GPU kernels", "merged us", "merged speedup",
                    "merged GPU kernels"]
    table = common.markdown_table(headers, rows, "llrrrrr" + "rrrrr" * (device.type == "cuda"))
    note = (f"BatchNorm2d({shape[1]}) on a {args.layout} input of shape {args.shape}; "
            "median of one call over "
            f"{args.repeats} interleaved rounds of >= {args.min_time} s each; speedup = torch us / "
            "normext us. ops: operator calls per call of the module (profiler events aten::* and "
            "normext::*, nested included; in training torch's include its num_batches_tracked "
            "add_, which normext does on the host for a CPU counter). fwdbwd: forward and backward to the input, weight and bias, whose "
            "gradients are set to None before each step.")
    if device.type == "cuda":
        note += (" GPU kernels: kernels, copies and fills per call (n/a: none recorded)."
                 " merged: normext with each reduction's partials merged in its first kernel"
                 " (one kernel fewer per reduction; a memset zeroes its counters).")
    report = common.Report("Per-call overhead: a small BatchNorm2d, torch.nn vs normext",
                           common.metadata(device, "bench_overhead"), common.command_line(),
                           [note, table])
    common.publish(report.render(), args.markdown_out)


if __name__ == "__main__":
    main()
