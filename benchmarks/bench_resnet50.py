"""One training step of torchvision's ResNet-50: torch.nn vs normext.convert and normext.fuse.

    python benchmarks/bench_resnet50.py                          # batch 16, 224x224
    python benchmarks/bench_resnet50.py --device cpu --threads 8 --steps 2
    python benchmarks/bench_resnet50.py --size 64 --batch 2 --steps 1 --repeats 2   # smoke run
    python benchmarks/bench_resnet50.py --activation leaky_relu  # + fuse(memory_efficient=True)
    python benchmarks/bench_resnet50.py --compile                # + torch.compile(torch model)
    python benchmarks/bench_resnet50.py --activation leaky_relu --size 112 --budget-mb 2000
                                    # + the largest batch whose step fits in 2000 MB

A step is forward, cross-entropy, backward and an SGD step (momentum 0.9).
The torch model and its twins (normext.convert and normext.fuse of a
copy.deepcopy) start from the same weights and run interleaved in the same
process, in NCHW and in channels_last. --activation leaky_relu replaces every
ReLU with LeakyReLU(0.01) in all of them and adds normext.fuse(...,
memory_efficient=True), whose layers keep their outputs instead of their
inputs. On CUDA, "normext.convert merged" is normext.convert with the
reductions' partials merged in their first kernel (normext._C.
set_cuda_merge_in_last_block, switched on around its steps only: a kernel
fewer per reduction; off by default until run on a GPU).
Needs torchvision (optional: without it this says so and exits 0).
Progress goes to stderr, a Markdown report to stdout. See README.md.
"""

import argparse
import copy
import sys

import _common as common
from _common import log, normext

import torch
import torch.nn.functional as F

NUM_CLASSES = 1000
# (rtol) on the first step's loss, per dtype: a guard against a broken swap,
# not a precision test.
LOSS_RTOL = {"float64": 1e-6, "float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}
# Batch statistics over a handful of values (batch 2 at 32x32: two per channel
# in layer4) amplify rounding differences through the network: no check there.
MIN_VALUES_TO_CHECK = 8


MERGED = "normext.convert merged"


def train_step(model, optimizer, images, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss


def make_models(torchvision, args, device, dtype, layout):
    """The torch.nn model and its normext twins, with identical weights."""
    torch.manual_seed(0)
    reference = torchvision.models.resnet50(num_classes=NUM_CLASSES)
    if args.activation == "leaky_relu":
        for module in list(reference.modules()):
            for name, child in module.named_children():
                if isinstance(child, torch.nn.ReLU):
                    module.add_module(name, torch.nn.LeakyReLU(0.01, inplace=True))
    reference = reference.to(device=device, dtype=dtype, memory_format=layout).train()
    converted = normext.convert(copy.deepcopy(reference))
    swapped = sum(type(m).__module__.startswith("normext") for m in converted.modules())
    if swapped == 0:
        sys.exit("error: normext.convert swapped no BatchNorm layer of resnet50")
    models = {"torch": reference, "normext.convert": converted,
              "normext.fuse": normext.fuse(copy.deepcopy(reference))}
    if device.type == "cuda":
        models[MERGED] = normext.convert(copy.deepcopy(reference))
    if args.activation == "leaky_relu":
        models["normext.fuse memory-efficient"] = normext.fuse(copy.deepcopy(reference),
                                                               memory_efficient=True)
    if args.compile:
        models["torch.compile"] = torch.compile(copy.deepcopy(reference))
    return models, swapped


def measure(torchvision, args, dtype_name: str, layout_name: str, memory_ok: bool) -> dict:
    device, dtype = args.device, common.DTYPES[dtype_name]
    layout = common.LAYOUTS[layout_name]
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=gen)
    images = images.to(device=device, dtype=dtype).contiguous(memory_format=layout)
    labels = torch.randint(NUM_CLASSES, (args.batch,), generator=gen).to(device)

    models, swapped = make_models(torchvision, args, device, dtype, layout)
    steps, optimizers, losses = {}, {}, {}
    for name, model in models.items():
        optimizers[name] = optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        steps[name] = (lambda m=model, o=optimizer: train_step(m, o, images, labels))
        if name == MERGED:
            steps[name] = common.merged_reductions(steps[name])
        losses[name] = steps[name]().item()  # first step: same weights, same loss
    if args.check:
        rtol = LOSS_RTOL[dtype_name]
        for name, loss in losses.items():
            if abs(loss - losses["torch"]) > rtol * abs(losses["torch"]):
                sys.exit(f"error: first-step loss of {name} {loss:.6g} differs from torch's "
                         f"{losses['torch']:.6g} (rtol {rtol}) for {dtype_name} {layout_name}; "
                         "pass --no-check to time anyway.")

    timings = common.interleaved_timings(steps, device, args.repeats, warmup=args.warmup,
                                         iters=args.steps)
    t_torch = timings["torch"].median
    row = {
        "dtype": dtype_name, "layout": layout_name,
        "input": [args.batch, 3, args.size, args.size], "bn_layers": swapped,
        "ms": {name: timing.median * 1e3 for name, timing in timings.items()},
        "speedup": {name: t_torch / timing.median for name, timing in timings.items()},
        "first_loss": losses,
        "timings": {name: timing.as_dict() for name, timing in timings.items()},
    }
    if memory_ok:
        for name, step in steps.items():
            # Free the last step's gradients first, so the peak counts this
            # step's gradients and activations on top of weights and optimizer state.
            optimizers[name].zero_grad(set_to_none=True)
            row.setdefault("peak_bytes", {})[name] = common.peak_memory_bytes(step, device)
        if args.budget_mb:
            row["largest_batch"] = {
                name: largest_batch(models[name], optimizers[name], args, dtype, layout)
                for name in models if name != "torch.compile"}  # (a compile per batch)
            log("largest batch within the budget: " + ", ".join(
                f"{name} {batch}" for name, batch in row["largest_batch"].items()))
    return row


def largest_batch(model, optimizer, args, dtype, layout) -> int:
    """The largest batch (up to --max-batch) whose training step's peak
    allocations (beyond the weights and optimizer state) fit in --budget-mb:
    doubling, then bisection, each candidate measured by one step."""
    gen = torch.Generator().manual_seed(1)

    def fits(batch):
        images = torch.randn(batch, 3, args.size, args.size, generator=gen).to(
            device=args.device, dtype=dtype).contiguous(memory_format=layout)
        labels = torch.randint(NUM_CLASSES, (batch,), generator=gen).to(args.device)
        optimizer.zero_grad(set_to_none=True)
        peak = common.peak_memory_bytes(lambda: train_step(model, optimizer, images, labels),
                                        args.device)
        log(f"  batch {batch}: peak {common.fmt_mb(peak)} MB")
        return peak <= args.budget_mb * 1e6

    fitting, over = 0, 1
    while over <= args.max_batch and fits(over):
        fitting, over = over, over * 2
    over = min(over, args.max_batch + 1)
    while over - fitting > 1:
        middle = (fitting + over) // 2
        fitting, over = (middle, over) if fits(middle) else (fitting, middle)
    return fitting


def results_table(rows: list[dict]) -> str:
    headers = ["dtype", "layout", "input (N,C,H,W)", "model", "ms/step", "speedup over torch",
               "img/s", "peak MB", "peak / torch's"]
    lines = []
    for row in rows:
        peaks = row.get("peak_bytes", {})
        for name, ms in row["ms"].items():
            peak, torch_peak = peaks.get(name), peaks.get("torch")
            lines.append([row["dtype"], row["layout"], ",".join(map(str, row["input"])), name,
                          f"{ms:.4g}", f"{row['speedup'][name]:.3f}",
                          f"{row['input'][0] / ms * 1e3:.4g}", common.fmt_mb(peak),
                          f"{peak / torch_peak:.2f}" if peak and torch_peak else "n/a"])
    return common.markdown_table(headers, lines, align="llll" + "r" * 5)


def budget_table(rows: list[dict], args) -> str:
    header = ["dtype", "layout", "model", f"largest batch in {args.budget_mb:g} MB",
              "/ torch's"]
    body = []
    for row in rows:
        for name, batch in row["largest_batch"].items():
            body.append([row["dtype"], row["layout"], name, str(batch),
                         f"{batch / row['largest_batch']['torch']:.2f}"])
    return (f"Largest batch at {args.size}x{args.size} whose training step's peak memory "
            f"(measured as above) fits in {args.budget_mb:g} MB; batches up to "
            f"{args.max_batch} tried.\n\n" + common.markdown_table(header, body))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=common.default_device(),
                        help="default: cuda if available, else cpu")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--size", type=int, default=224, help="image height and width "
                                                              "(default 224)")
    parser.add_argument("--dtypes", default="float32",
                        help="comma list; the model is .to(dtype) (default float32)")
    parser.add_argument("--layouts", default="nchw,channels_last",
                        help="comma list of nchw, channels_last (default: both)")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per model per round (default 3)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps per model before timing (default 2)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    parser.add_argument("--activation", choices=("relu", "leaky_relu"), default="relu",
                        help="leaky_relu: every ReLU becomes LeakyReLU(0.01), and "
                             "normext.fuse(memory_efficient=True) is timed too")
    parser.add_argument("--compile", action="store_true",
                        help="also time torch.compile of the torch model (compiles first)")
    parser.add_argument("--budget-mb", type=float,
                        help="also find each model's largest batch whose step's peak memory "
                             "fits in this many MB (one measured step per candidate)")
    parser.add_argument("--max-batch", type=int, default=256,
                        help="the largest batch --budget-mb tries (default 256)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the check that both models give the same first-step loss")
    parser.add_argument("--json", metavar="FILE", help="write every row and the metadata")
    parser.add_argument("--markdown-out", metavar="FILE",
                        help="also append the Markdown report to FILE "
                             "(e.g. benchmarks/history/2026-12.md)")
    args = parser.parse_args(argv)
    args.device = common.parse_device(args.device)
    args.dtypes = common.parse_dtypes(args.dtypes)
    args.layouts = common.parse_choices(args.layouts, common.LAYOUTS, "--layouts")
    if min(args.batch, args.size, args.steps, args.repeats) < 1 or args.warmup < 0:
        parser.error("--batch, --size, --steps and --repeats must be positive, --warmup >= 0")
    if args.size < 32:
        parser.error("--size must be at least 32 (ResNet-50 downsamples 32x)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        import torchvision
    except ImportError:
        print("bench_resnet50 needs torchvision, which is not installed; skipping.\n"
              "Install the build matching your torch (e.g. `pip install torchvision`) to run it.",
              file=sys.stderr)
        sys.exit(0)
    common.apply_threads(args.threads)
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    info = common.metadata(args.device, "bench_resnet50")
    info["torchvision"] = torchvision.__version__
    memory_ok, memory_note = common.peak_memory_method(
        args.device, "one training step (gradients released before it)")
    values_per_channel = args.batch * (args.size // 32) ** 2  # in the last BatchNorm layers
    args.check = not args.no_check and values_per_channel >= MIN_VALUES_TO_CHECK
    if not args.no_check and not args.check:
        log(f"note: loss check skipped: the last BatchNorm layers normalize {values_per_channel} "
            "values per channel, too few for a well-conditioned comparison")

    configs = [(dtype, layout) for dtype in args.dtypes for layout in args.layouts]
    log(f"ResNet-50 training step, batch {args.batch}, {args.size}x{args.size}, on "
        f"{info.get('gpu') or info['cpu']} ({torch.get_num_threads()} threads): "
        f"{args.repeats} rounds of {args.steps} step(s)")
    rows = []
    for dtype, layout in configs:
        row = measure(torchvision, args, dtype, layout, memory_ok)
        rows.append(row)
        log(f"[{len(rows)}/{len(configs)}] {dtype} {layout}: " + ", ".join(
            f"{name} {ms:.4g} ms" for name, ms in row["ms"].items()))

    report = common.Report("ResNet-50 training step: torch.nn vs normext.convert and normext.fuse",
                           info,
                           common.command_line())
    report.sections.append(
        f"torchvision {torchvision.__version__} resnet50 ({rows[0]['bn_layers']} BatchNorm2d "
        f"layers), activations {args.activation}, {args.device.type}, batch {args.batch}, "
        f"{args.size}x{args.size}; a step "
        "is forward + cross-entropy + backward + SGD(momentum 0.9). Median over "
        f"{args.repeats} interleaved rounds of {args.steps} step(s) per model, after "
        f"{args.warmup + 1} warm-up steps. speedup = torch ms / the model's ms (> 1: faster "
        "than torch).")
    report.sections.append(results_table(rows) + "\n\n" + memory_note)
    if args.budget_mb and memory_ok:
        report.sections.append(budget_table(rows, args))
    common.publish(report.render(), args.markdown_out, args.json, {
        "metadata": info, "settings": {
            "device": args.device.type, "batch": args.batch, "size": args.size,
            "dtypes": args.dtypes, "layouts": args.layouts, "steps": args.steps,
            "repeats": args.repeats, "warmup": args.warmup, "check": args.check,
            "activation": args.activation, "compile": args.compile},
        "rows": rows})


if __name__ == "__main__":
    main()
