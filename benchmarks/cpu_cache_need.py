"""How large normext's CPU output cache must be for a ResNet-50 training loop
to take every output from it after the first step.

    python benchmarks/cpu_cache_need.py                  # batch 32, float32, both layouts
    python benchmarks/cpu_cache_need.py --cap-mb 1536    # check a cap: no misses after step 1

A step is forward, cross-entropy, backward and an SGD step of torchvision's
resnet50 (untrained) after normext.convert. Without --cap-mb the cache may hold
all of RAM, so nothing is evicted and the bytes it holds after a step (every
output block is free then) are the need. Needs torchvision. Prints a Markdown
table: per layout and step, the seconds and the cache's counts.
"""

import argparse
import os
import sys
import time

import _common as common
from _common import log, normext

import torch
import torch.nn.functional as F


def train_step(model, optimizer, images, labels) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(images), labels).backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layouts", default="nchw,channels_last")
    parser.add_argument("--cap-mb", type=int, help="NORMEXT_CPU_CACHE_MB (default: all of RAM)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads(N)")
    args = parser.parse_args()
    try:
        import torchvision
    except ImportError:
        sys.exit("error: needs torchvision (pip install --no-deps torchvision matching torch)")
    common.apply_threads(args.threads)
    ram_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    # Read at the cache's first use, which is still to come.
    os.environ["NORMEXT_CPU_CACHE_MB"] = str(ram_mb if args.cap_mb is None else args.cap_mb)

    rows, need = [], 0  # nothing evicted: the most cached is what a cap must hold
    for layout in common.split_list(args.layouts):
        torch.manual_seed(0)
        model = normext.convert(torchvision.models.resnet50()).to(
            memory_format=common.LAYOUTS[layout]).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = torch.randn(args.batch, 3, 224, 224).contiguous(
            memory_format=common.LAYOUTS[layout])
        labels = torch.randint(0, 1000, (args.batch,))
        normext.release_cpu_cache()
        for step in range(1, args.steps + 1):
            before = normext.cpu_cache_info()
            start = time.perf_counter()
            train_step(model, optimizer, images, labels)
            seconds = time.perf_counter() - start
            info = normext.cpu_cache_info()
            counts = [info[key] - before[key] for key in ("hits", "misses", "evictions")]
            rows.append([layout, step, f"{seconds:.1f}", *counts, info["cached_bytes"] >> 20,
                         info["in_use_bytes"] >> 20])
            log(" ".join(map(str, rows[-1])))
            need = max(need, info["cached_bytes"])
        del model, optimizer, images
    print(f"normext CPU output cache, resnet50 batch {args.batch} float32, "
          f"{torch.get_num_threads()} threads, cap {info['limit_bytes'] >> 20} MiB\n")
    print(common.markdown_table(["layout", "step", "s", "hits", "misses", "evictions",
                                 "cached MiB", "in use MiB"], rows, align="lrrrrrrr"))
    if args.cap_mb is None:
        print(f"\nneed: {need >> 20} MiB cached after a step")


if __name__ == "__main__":
    main()
