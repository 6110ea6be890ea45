"""Two builds of normext's kernels timed against each other in one process.

On a shared machine an op's time moves by up to 2x between processes, so two
builds timed in separate runs say little about a 10% change. This tool builds
each revision with its ops registered under a namespace of its own
(torch.ops.NAME instead of torch.ops.normext), loads both libraries into one
process and times the same op under both names in many short pairs, in ABBA
order (the second of a pair runs in the cache state the first leaves). It
reports the median of the per-pair ratios and their interquartile range.

    python benchmarks/ab_builds.py build base=HEAD new      # new: the working tree
    python benchmarks/ab_builds.py compare base new --ops backward --layouts channels_last
    python benchmarks/ab_builds.py compare base new --ops act_train,act_fwdbwd --activation elu

The name `normext` in `compare` is the package itself as imported (no build needed).

Two builds of one revision (`build aa1=HEAD aa2=HEAD`, then `compare aa1 aa2`)
show the noise floor: differences inside their spread are not measured.
Builds go to build/ab/NAME, CPU only unless `build --cuda` (then as setup.py
decides: CUDA too where a toolkit and a CUDA torch exist), with every CPU
variant (NORMEXT_CPU_ARCH=all unless set), for A/Bs under ATEN_CPU_CAPABILITY;
`normext`, an in-place build, has the baseline and this machine's best
only unless built with NORMEXT_CPU_ARCH=all. They need git and a compiler. `compare --device cuda` times CUDA builds on the GPU.
"""

import argparse
import io
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile

import _common as common
import torch
from bench_batchnorm import RESNET50_SHAPES, parse_shapes

AB_DIR = common.REPO_ROOT / "build" / "ab"
MOMENTUM, EPS = 0.1, 1e-5


# ------------------------------------------------------------------ build


def _source_tar(revision: str | None) -> bytes:
    """The tree at `revision` (git archive; a path to a .tar file: that
    archive, for a copy of the repository without that commit), or the
    working tree's tracked and unignored files when None."""
    root = str(common.REPO_ROOT)
    if revision and revision.endswith(".tar"):
        with open(revision, "rb") as archive:
            return archive.read()
    if revision:
        return subprocess.run(["git", "archive", revision], cwd=root, check=True,
                              capture_output=True).stdout
    names = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                           check=True, capture_output=True).stdout.decode().split("\0")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in filter(None, names):
            if os.path.exists(os.path.join(root, name)):
                tar.add(os.path.join(root, name), arcname=name)
    return buffer.getvalue()


def _rename_namespace(source_dir: str, name: str) -> None:
    """Registers the ops of the copy in `source_dir` under torch.ops.<name>."""
    pattern = re.compile(r'(TORCH_LIBRARY(?:_IMPL|_FRAGMENT)?\()normext,|"normext::')
    for folder, _, files in os.walk(os.path.join(source_dir, "csrc")):
        for file in files:
            path = os.path.join(folder, file)
            with open(path) as handle:
                text = handle.read()
            renamed = pattern.sub(
                lambda m: f"{m.group(1)}{name}," if m.group(1) else f'"{name}::', text)
            if renamed != text:
                with open(path, "w") as handle:
                    handle.write(renamed)


def build(spec: str, cuda: bool = False) -> None:
    name, _, revision = spec.partition("=")
    if not name.isidentifier() or name == "normext":
        sys.exit(f"error: build name {name!r} must be an identifier other than normext")
    dest = AB_DIR / name
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(_source_tar(revision or None))) as tar:
        tar.extractall(dest, filter="data")
    _rename_namespace(str(dest), name)
    log = dest / "build.log"
    print(f"building {name} ({revision or 'working tree'}) in {dest} ...", file=sys.stderr)
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=dest,
                              stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, "NORMEXT_CPU_ONLY": "0" if cuda else "1",
                                   # every variant, for ATEN_CPU_CAPABILITY A/Bs
                                   "NORMEXT_CPU_ARCH": os.environ.get("NORMEXT_CPU_ARCH", "all")})
    if done.returncode != 0:
        sys.exit(f"error: building {name} failed; see {log}")


# ---------------------------------------------------------------- compare


def load(name: str):
    if name == "normext":  # the package itself (its in-place build or installed copy)
        import normext  # noqa: F401  (registers torch.ops.normext)
        return torch.ops.normext
    libraries = sorted((AB_DIR / name / "normext").glob("_C.*"))
    if not libraries:
        sys.exit(f"error: no build {name!r} under {AB_DIR}; run `ab_builds.py build {name}=REV`")
    torch.ops.load_library(str(libraries[0]))
    return getattr(torch.ops, name)


def op_calls(ops, x, grad, weight, bias, running_mean, running_var, activation="relu"):
    """Each op the tool times, as a call of the build's `ops`; the act_ ops
    are the fused batch norm + `activation` (act_residual_: with a residual),
    the gn_ ops a group norm of min(32, C) groups (gn_act_: + `activation`),
    the ln_ ops a layer norm over the channels of the input as rows
    (N*H*W, C)."""
    mean, invstd = ops.batch_norm_moments(x)
    count = x.numel() / x.size(1)
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(grad, x, mean, invstd, weight)

    def train():
        ops.batch_norm_forward(x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS)

    def forward_backward():
        _, save_mean, save_invstd = ops.batch_norm_forward(
            x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS)
        ops.batch_norm_backward(grad, x, weight, save_mean, save_invstd, True)

    def act_train():
        return ops.batch_norm_act_forward(x, weight, bias, running_mean, running_var, True,
                                          MOMENTUM, EPS, activation, 0.01, 1.0, None)

    def act_forward_backward():
        _, save_mean, save_invstd = act_train()
        ops.batch_norm_act_backward(grad, x, None, None, weight, bias, save_mean, save_invstd,
                                    True, activation, 0.01, 1.0, False, True)

    def act_residual_backward(y, save_mean, save_invstd):
        # As the autograd node runs it: the derivative from the output, but
        # from the input and the residual for silu.
        silu = activation == "silu"
        ops.batch_norm_act_backward(grad, x, grad if silu else None, None if silu else y, weight,
                                    bias, save_mean, save_invstd, True, activation, 0.01, 1.0,
                                    False, True)

    def act_residual_forward_backward():
        act_residual_backward(*ops.batch_norm_act_forward(
            x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS, activation, 0.01,
            1.0, grad))

    # What the fused backward with a residual reads: (output, mean, invstd).
    act_residual_saved = ops.batch_norm_act_forward(
        x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS, activation, 0.01, 1.0,
        grad)
    act_output = act_residual_saved[0]

    # The fused input gradient alone (the pass after the sums), as
    # act_fwdbwd runs it (and act_residual_fwdbwd did before 26c4362).
    def act_backward_elemt(residual):
        silu = activation == "silu"
        ops.batch_norm_act_backward_elemt(
            grad, x, grad if residual and silu else None,
            act_output if residual and not silu else None, weight, bias, mean, invstd, sum_dy,
            sum_dy_xmu, count, activation, 0.01, 1.0, False)

    # Through each build's autograd node, as a layer calls it: a graph is
    # recorded, run backward and freed every call.
    leaf_x, leaf_weight, leaf_bias = (t.detach().requires_grad_() for t in (x, weight, bias))

    def autograd_forward_backward(act=False):
        leaf_x.grad = leaf_weight.grad = leaf_bias.grad = None
        args = (leaf_x, leaf_weight, leaf_bias, running_mean, running_var, True, MOMENTUM, EPS)
        y = (ops.batch_norm_act(*args, activation, 0.01, 1.0, None, False) if act
             else ops.batch_norm(*args))
        y.backward(grad)

    channels = x.size(1)
    groups = math.gcd(channels, 32)
    gn_mask = [True, True, True]
    _, gn_mean, gn_rstd = ops.group_norm_forward(x, groups, weight, bias, EPS)

    def gn_forward_backward(activation="identity"):
        _, mean, rstd = ops.group_norm_forward(x, groups, weight, bias, EPS, activation)
        ops.group_norm_backward(grad, x, groups, mean, rstd, weight, bias, gn_mask, activation)

    rows, grad_rows = (t.movedim(1, -1).reshape(-1, channels).contiguous() for t in (x, grad))
    _, ln_mean, ln_rstd = ops.layer_norm_forward(rows, [channels], weight, bias, EPS, False)

    def ln_forward_backward():
        _, mean, rstd = ops.layer_norm_forward(rows, [channels], weight, bias, EPS, False)
        ops.layer_norm_backward(grad_rows, rows, [channels], mean, rstd, weight, False, gn_mask)

    # The group and layer norms through each build's autograd, as a layer calls them:
    # builds from 1bede04 on (before it their autograd was Python, registered
    # for the normext library, which a renamed build's ops do not get).
    leaf_rows = rows.detach().requires_grad_()

    def gn_autograd_forward_backward():
        leaf_x.grad = leaf_weight.grad = leaf_bias.grad = None
        ops.group_norm_forward(leaf_x, groups, leaf_weight, leaf_bias, EPS)[0].backward(grad)

    def ln_autograd_forward_backward():
        leaf_rows.grad = leaf_weight.grad = leaf_bias.grad = None
        ops.layer_norm_forward(leaf_rows, [channels], leaf_weight, leaf_bias, EPS,
                               False)[0].backward(grad_rows)

    # add + LayerNorm as a pre-norm block runs it: both outputs used, the sum's
    # gradient a dense tensor of its own.
    leaf_residual = torch.randn_like(rows).requires_grad_()
    grad_sum = torch.randn_like(rows)

    def add_ln_autograd_forward_backward():
        leaf_rows.grad = leaf_residual.grad = leaf_weight.grad = leaf_bias.grad = None
        y, total, _, _ = ops.add_layer_norm_forward(leaf_rows, leaf_residual, [channels],
                                                    leaf_weight, leaf_bias, EPS, False)
        torch.autograd.backward([y, total], [grad_rows, grad_sum])

    return {
        "train": train,
        "eval": lambda: ops.batch_norm_forward(x, weight, bias, running_mean, running_var,
                                               False, MOMENTUM, EPS),
        "backward": lambda: ops.batch_norm_backward(grad, x, weight, mean, invstd, True),
        "eval_backward": lambda: ops.batch_norm_backward(grad, x, weight, mean, invstd, False),
        "fwdbwd": forward_backward,
        "moments": lambda: ops.batch_norm_moments(x),
        "elemt": lambda: ops.batch_norm_elemt(x, weight, bias, mean, invstd),
        "backward_reduce": lambda: ops.batch_norm_backward_reduce(grad, x, mean, invstd, weight),
        "backward_elemt": lambda: ops.batch_norm_backward_elemt(grad, x, mean, invstd, weight,
                                                                sum_dy, sum_dy_xmu, count),
        "autograd_fwdbwd": autograd_forward_backward,
        "autograd_act_fwdbwd": lambda: autograd_forward_backward(act=True),
        "act_train": act_train,
        "act_residual_train": lambda: ops.batch_norm_act_forward(
            x, weight, bias, running_mean, running_var, True, MOMENTUM, EPS, activation, 0.01,
            1.0, grad),
        "act_fwdbwd": act_forward_backward,
        "act_residual_fwdbwd": act_residual_forward_backward,
        "act_residual_backward": lambda: act_residual_backward(*act_residual_saved),
        "act_backward_elemt": lambda: act_backward_elemt(False),
        "act_residual_backward_elemt": lambda: act_backward_elemt(True),
        "gn_act_fwdbwd": lambda: gn_forward_backward(activation),
        "gn_forward": lambda: ops.group_norm_forward(x, groups, weight, bias, EPS),
        "gn_act_forward": lambda: ops.group_norm_forward(x, groups, weight, bias, EPS, activation),
        "gn_backward": lambda: ops.group_norm_backward(grad, x, groups, gn_mean, gn_rstd,
                                                       weight, bias, gn_mask),
        "gn_act_backward": lambda: ops.group_norm_backward(grad, x, groups, gn_mean, gn_rstd,
                                                           weight, bias, gn_mask, activation),
        "gn_fwdbwd": gn_forward_backward,
        "gn_autograd_fwdbwd": gn_autograd_forward_backward,
        "ln_forward": lambda: ops.layer_norm_forward(rows, [channels], weight, bias, EPS, False),
        "ln_backward": lambda: ops.layer_norm_backward(grad_rows, rows, [channels], ln_mean,
                                                       ln_rstd, weight, False, gn_mask),
        "ln_fwdbwd": ln_forward_backward,
        "ln_autograd_fwdbwd": ln_autograd_forward_backward,
        "add_ln_autograd_fwdbwd": add_ln_autograd_forward_backward,
    }


OPS = ("train", "eval", "backward", "eval_backward", "fwdbwd", "autograd_fwdbwd",
       "autograd_act_fwdbwd", "moments", "elemt",
       "backward_reduce", "backward_elemt", "act_train", "act_residual_train", "act_fwdbwd", "act_residual_fwdbwd",
       "act_residual_backward", "act_backward_elemt", "act_residual_backward_elemt",
       "gn_forward", "gn_act_forward", "gn_backward", "gn_act_backward", "gn_fwdbwd",
       "gn_act_fwdbwd", "gn_autograd_fwdbwd", "ln_forward", "ln_backward", "ln_fwdbwd", "ln_autograd_fwdbwd",
       "add_ln_autograd_fwdbwd")


def compare(args) -> None:
    a_ops, b_ops = load(args.a), load(args.b)
    device = torch.device(args.device)
    print(f"| op | dtype | layout | shape | {args.a} ms | {args.b} ms | {args.a}/{args.b} "
          "median | IQR |")
    print("|---|---|---|---|---:|---:|---:|---|")
    log_ratios = []
    for dtype_name in common.split_list(args.dtypes):
        dtype = common.DTYPES[common.DTYPE_ALIASES.get(dtype_name, dtype_name)]
        for layout in common.split_list(args.layouts):
            for shape in parse_shapes(args.shapes, args.batch):
                gen = torch.Generator().manual_seed(0)

                def make(*size):
                    return torch.randn(size, generator=gen)

                channels = shape[1]
                x = (make(*shape) * 2 + 0.5).to(device, dtype).contiguous(
                    memory_format=common.LAYOUTS[layout])
                grad = make(*shape).to(device, dtype).contiguous(
                    memory_format=common.LAYOUTS[layout])
                params = [(make(channels).abs() + 0.5).to(device, dtype),
                          make(channels).to(device, dtype), make(channels).to(device, dtype),
                          (make(channels).abs() + 0.5).to(device, dtype)]
                calls = [op_calls(ops, x, grad, *params, activation=args.activation)
                         for ops in (a_ops, b_ops)]
                for op in common.split_list(args.ops):
                    # Two functions rotated every round: ABBA order.
                    timings = common.interleaved_timings(
                        {"a": calls[0][op], "b": calls[1][op]}, device,
                        args.pairs, args.min_time)
                    times_a, times_b = timings["a"].samples, timings["b"].samples
                    ratios = [t_a / t_b for t_a, t_b in zip(times_a, times_b)]
                    quartiles = statistics.quantiles(ratios, n=4)
                    ratio = statistics.median(ratios)
                    log_ratios.append(math.log(ratio))
                    print(f"| {op} | {dtype_name} | {layout} | {'x'.join(map(str, shape))} | "
                          f"{statistics.median(times_a) * 1e3:.3f} | "
                          f"{statistics.median(times_b) * 1e3:.3f} | {ratio:.3f} | "
                          f"{quartiles[0]:.2f}-{quartiles[2]:.2f} |", flush=True)
    if log_ratios:
        print(f"\ngeometric mean of the medians ({args.a}/{args.b}, > 1: {args.b} faster): "
              f"{math.exp(sum(log_ratios) / len(log_ratios)):.3f} over {len(log_ratios)} rows")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build NAME=REV (REV omitted: working tree)")
    build_parser.add_argument("specs", nargs="+", metavar="NAME[=REV]")
    build_parser.add_argument("--cuda", action="store_true",
                              help="build the CUDA kernels too (setup.py's rules)")
    compare_parser = commands.add_parser("compare", help="time build A against build B")
    compare_parser.add_argument("a")
    compare_parser.add_argument("b")
    compare_parser.add_argument("--ops", default="train,eval,backward",
                                help=f"comma list of {', '.join(OPS)}")
    compare_parser.add_argument("--activation", default="relu",
                                help="the act_ ops' activation (identity, relu, relu6, "
                                     "leaky_relu, elu, silu)")
    compare_parser.add_argument("--dtypes", default="float32")
    compare_parser.add_argument("--layouts", default="nchw,channels_last")
    compare_parser.add_argument("--shapes", default=RESNET50_SHAPES)
    compare_parser.add_argument("--batch", type=int, default=32)
    compare_parser.add_argument("--pairs", type=int, default=20)
    compare_parser.add_argument("--min-time", type=float, default=0.02,
                                help="seconds each measurement of a pair lasts at least")
    compare_parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    compare_parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args(argv)
    if args.command == "build":
        for spec in args.specs:
            build(spec, args.cuda)
        return
    unknown = set(common.split_list(args.ops)) - set(OPS)
    if unknown:
        sys.exit(f"error: unknown op(s) {', '.join(sorted(unknown))}; choose from {', '.join(OPS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    compare(args)


if __name__ == "__main__":
    main()
