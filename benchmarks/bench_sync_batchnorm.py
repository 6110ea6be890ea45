"""What synchronizing costs: normext.SyncBatchNorm vs normext.BatchNorm2d on
each rank's slice of a batch, forward + backward, per layer.

    python benchmarks/bench_sync_batchnorm.py                       # 2 gloo ranks on the CPU
    python benchmarks/bench_sync_batchnorm.py --ranks 2 --device cuda   # NCCL, one GPU per rank

Each rank runs both layers on its own slice (--batch images), interleaved, in
rounds that start on a barrier; a round's time is the slowest rank's. The
synchronized layer adds one all_gather in the forward and one all_reduce in
the backward (normext/sync_batchnorm.py); the same two collectives are timed
alone to show how much of the difference is the transport's latency. Progress goes to stderr, a Markdown
report to stdout (rank 0).
"""

import argparse
import datetime
import os
import socket
import statistics
import time

import _common as common
from _common import log, normext

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DEFAULT_SHAPES = "64/56,256/28,1024/14,2048/7"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(layer, x, grad):
    x.grad = None
    layer(x).backward(grad)


def _rank_main(rank, args, port, results):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    on_cuda = args.device == "cuda"
    if on_cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if on_cuda else "gloo", rank=rank, world_size=args.ranks,
                            timeout=datetime.timedelta(seconds=120))
    device = torch.device(f"cuda:{rank}" if on_cuda else "cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if on_cuda else (lambda: None)
    rows = []
    for channels, height, width in args.shapes:
        torch.manual_seed(rank)
        x = torch.randn(args.batch, channels, height, width, device=device).contiguous(
            memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        x.requires_grad_()
        grad = torch.randn_like(x)
        layers = {"local": normext.BatchNorm2d(channels).to(device),
                  "sync": normext.SyncBatchNorm(channels).to(device)}
        # the layer's two collectives alone, on tensors of their sizes
        gathered = [torch.zeros(2 * channels + 2, device=device) for _ in range(args.ranks)]
        stats, sums = torch.zeros(2 * channels + 2, device=device), torch.zeros(
            2 * channels, device=device)

        def collectives():
            dist.all_gather(gathered, stats)
            dist.all_reduce(sums)

        times = {name: [] for name in layers}
        times["collectives"] = []
        steps = dict(layers, collectives=None)
        for round_index in range(args.repeats + 1):  # the first round warms up
            for name, layer in steps.items():
                dist.barrier()
                sync()
                start = time.perf_counter()
                for _ in range(args.iters):
                    if layer is None:
                        collectives()
                    else:
                        _step(layer, x, grad)
                sync()
                elapsed = torch.tensor([(time.perf_counter() - start) / args.iters])
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the slowest rank's time
                if round_index > 0:
                    times[name].append(elapsed.item())
        local, synced, comm = (statistics.median(times[n]) * 1e3
                               for n in ("local", "sync", "collectives"))
        rows.append((channels, height, width, local, synced, comm))
        if rank == 0:
            log(f"{channels}x{height}x{width}: local {local:.3f} ms, sync {synced:.3f} ms, "
                f"collectives alone {comm:.3f} ms")
    if rank == 0:
        results.extend(rows)
    dist.destroy_process_group()


def _parse_shapes(text):
    shapes = []
    for item in common.split_list(text):
        channels, _, spatial = item.partition("/")
        height, _, width = spatial.partition("x")
        shapes.append((int(channels), int(height), int(width or height)))
    return shapes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo; cuda: NCCL, one GPU per rank (default cpu)")
    parser.add_argument("--shapes", default=DEFAULT_SHAPES,
                        help=f"comma list of C/H or C/HxW (default {DEFAULT_SHAPES})")
    parser.add_argument("--batch", type=int, default=16, help="images per rank (default 16)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    parser.add_argument("--iters", type=int, default=10, help="steps per timing (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per rank (default 1)")
    parser.add_argument("--markdown-out", metavar="FILE", help="also append the report to FILE")
    args = parser.parse_args(argv)
    args.shapes = _parse_shapes(args.shapes)
    if args.device == "cuda" and torch.cuda.device_count() < args.ranks:
        parser.error(f"--device cuda needs {args.ranks} GPUs, found {torch.cuda.device_count()}")

    results = mp.Manager().list()
    mp.start_processes(_rank_main, args=(args, _free_port(), results), nprocs=args.ranks,
                       join=True, start_method="spawn")

    info = common.metadata(torch.device(args.device), "bench_sync_batchnorm")
    info["torch_threads"] = args.threads
    report = common.Report("SyncBatchNorm: the cost of synchronizing", info,
                           common.command_line())
    layout = "channels_last" if args.channels_last else "NCHW"
    report.sections.append(
        f"{args.ranks} ranks ({'NCCL' if args.device == 'cuda' else 'gloo'}, "
        f"{args.threads} thread(s) each), {args.batch} images per rank, float32, {layout}; "
        "forward + backward of one layer. Median over "
        f"{args.repeats} interleaved rounds of {args.iters} steps, each round's time the "
        "slowest rank's. local = normext.BatchNorm2d on the rank's slice (no communication); "
        "collectives = the layer's all_gather and all_reduce alone, on tensors of their sizes, "
        "measured in the same rounds.")
    headers = ["shape per rank (N,C,H,W)", "local ms", "sync ms", "sync - local ms",
               "collectives ms", "sync / local"]
    lines = [[f"{args.batch},{c},{h},{w}", f"{local:.4g}", f"{synced:.4g}",
              f"{synced - local:.3g}", f"{comm:.3g}", f"{synced / local:.2f}"]
             for c, h, w, local, synced, comm in results]
    report.sections.append(common.markdown_table(headers, lines, align="lrrrrr"))
    common.publish(report.render(), args.markdown_out)


if __name__ == "__main__":
    main()
