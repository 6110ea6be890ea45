"""The CPU kernels give bit-identical outputs, gradients and running stats at any thread count."""

import pytest
import torch

import normext

# Shapes that take each of the reducer's paths: long runs (several blocks a
# run), short runs (one group and several per task, outer indices over a unit),
# channels-last rows (several units, and several units per segment; units
# made equal and a multiple of 8 in number, the last one shorter), and an
# (N, C) input.
SHAPES = [
    ((3, 5, 70, 70), torch.contiguous_format),
    ((600, 3, 4, 4), torch.contiguous_format),
    ((300, 40, 3, 3), torch.contiguous_format),
    ((2, 80, 7, 7), torch.contiguous_format),
    ((300, 3, 16, 16), torch.contiguous_format),
    ((16, 24, 20, 20), torch.channels_last),
    ((64, 8, 20, 20), torch.channels_last),
    ((4, 600, 5, 5), torch.channels_last),
    ((8, 200, 7, 7), torch.channels_last),
    ((1000, 37), torch.contiguous_format),
]
THREADS = (1, 2, 3, 8)


def run(x, grad, threads):
    torch.set_num_threads(threads)
    channels = x.shape[1]
    layer = normext.BatchNorm2d(channels) if x.dim() == 4 else normext.BatchNorm1d(channels)
    layer = layer.to(x.dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, channels))
        layer.bias.copy_(torch.linspace(-1, 1, channels))
    inp = x.detach().clone().requires_grad_()
    out = layer(inp)
    out.backward(grad)
    return [out, inp.grad, layer.weight.grad, layer.bias.grad, layer.running_mean,
            layer.running_var]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape,memory_format", SHAPES)
def test_bit_identical_at_any_thread_count(shape, memory_format, dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 100).to(dtype)
    grad = torch.randn(shape, generator=gen).to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
        grad = grad.contiguous(memory_format=memory_format)
    threads = torch.get_num_threads()
    try:
        results = {n: run(x, grad, n) for n in THREADS}
    finally:
        torch.set_num_threads(threads)
    reference = results[THREADS[0]]
    for n in THREADS[1:]:
        for name, a, b in zip(("output", "grad_input", "grad_weight", "grad_bias",
                               "running_mean", "running_var"), reference, results[n]):
            assert torch.equal(a, b), f"{name} differs between 1 and {n} threads"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_bit_identical_at_any_thread_count(memory_format, dtype):
    """BatchNormAct2d with a residual: the fused backward's reduction, which
    writes the residual's gradient, at each thread count."""
    gen = torch.Generator().manual_seed(0)
    shape = (8, 200, 7, 7)
    x, residual, grad = ((torch.randn(shape, generator=gen) * 3 + 10).to(dtype).contiguous(
        memory_format=memory_format) for _ in range(3))
    layer = normext.BatchNormAct2d(200, activation="silu").to(dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, 200))

    def run(threads):
        torch.set_num_threads(threads)
        inputs = [t.detach().clone().requires_grad_() for t in (x, residual)]
        out = layer(*inputs)
        out.backward(grad)
        results = [out, inputs[0].grad, inputs[1].grad, layer.weight.grad, layer.bias.grad]
        layer.zero_grad(set_to_none=True)
        return results

    threads = torch.get_num_threads()
    try:
        results = {n: run(n) for n in THREADS}
    finally:
        torch.set_num_threads(threads)
    for n in THREADS[1:]:
        for name, a, b in zip(("output", "grad_input", "grad_residual", "grad_weight",
                               "grad_bias"), results[THREADS[0]], results[n]):
            assert torch.equal(a, b), f"{name} differs between 1 and {n} threads"
