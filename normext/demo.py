"""Trains a small CNN on synthetic data twice, with torch.nn's BatchNorm and
with normext.convert(model), and prints the losses side by side with the time
of each step:  python -m normext.demo [--steps N] [--batch B] [--channels-last]"""

import argparse
import copy
import time

import torch
import torch.nn as nn

import normext


def small_cnn(num_classes: int = 10) -> nn.Module:
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(3, 32, 1), *block(32, 64, 2), *block(64, 128, 2), *block(128, 128, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 64), nn.BatchNorm1d(64),
        nn.ReLU(inplace=True), nn.Linear(64, num_classes),
    )


def train_step(model, optimizer, images, labels):
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    return loss.item(), time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    reference = small_cnn()
    converted = normext.convert(copy.deepcopy(reference))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    reference.to(memory_format=memory_format)
    converted.to(memory_format=memory_format)
    opt_reference = torch.optim.SGD(reference.parameters(), lr=0.01, momentum=0.9)
    opt_converted = torch.optim.SGD(converted.parameters(), lr=0.01, momentum=0.9)

    generator = torch.Generator().manual_seed(1)
    print(f"normext {normext.__version__} on torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}x3x{args.size}x{args.size}, "
          f"{'channels_last' if args.channels_last else 'NCHW'}")
    print(f"{'step':>4}  {'torch.nn loss':>13}  {'normext loss':>12}  {'torch.nn ms':>11}  "
          f"{'normext ms':>10}")
    totals = [0.0, 0.0]
    for step in range(args.steps):
        images = torch.randn(args.batch, 3, args.size, args.size, generator=generator)
        images = images.contiguous(memory_format=memory_format)
        labels = torch.randint(0, 10, (args.batch,), generator=generator)
        loss_t, time_t = train_step(reference, opt_reference, images, labels)
        loss_n, time_n = train_step(converted, opt_converted, images, labels)
        if step > 0:  # the first step includes one-time setup
            totals[0] += time_t
            totals[1] += time_n
        print(f"{step:>4}  {loss_t:>13.6f}  {loss_n:>12.6f}  {time_t * 1e3:>11.1f}  "
              f"{time_n * 1e3:>10.1f}")
    if args.steps > 1:
        print(f"mean step time after the first: torch.nn {totals[0] / (args.steps - 1) * 1e3:.1f} ms, "
              f"normext {totals[1] / (args.steps - 1) * 1e3:.1f} ms "
              "(whole training step: convolutions dominate)")


if __name__ == "__main__":
    main()
