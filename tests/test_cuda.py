"""Tests that need a CUDA GPU (and normext built with its CUDA kernels); all
skip elsewhere. The generic per-device tests in the other files run on CUDA
too; these cover what only a GPU has: streams, graphs, determinism of the
CUDA kernels, vectorization edge cases and 64-bit indexing."""

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import normext
from conftest import assert_close, memory_formats_of, requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

DEVICE = "cuda"

TORCH_CLASSES = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
                 5: torch.nn.BatchNorm3d}
NORMEXT_CLASSES = {2: normext.BatchNorm1d, 3: normext.BatchNorm1d, 4: normext.BatchNorm2d,
                   5: normext.BatchNorm3d}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last,
                  "channels_last_3d": torch.channels_last_3d}


def _pair(shape, dtype, param_dtype, device=DEVICE):
    C = shape[1]
    theirs = TORCH_CLASSES[len(shape)](C, device=device, dtype=param_dtype)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
        theirs.running_mean.uniform_(-0.5, 0.5)
        theirs.running_var.uniform_(0.5, 1.5)
    ours = NORMEXT_CLASSES[len(shape)](C, device=device, dtype=param_dtype)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def _step(module, x, grad_out):
    """One forward/backward; returns (output, input grad, weight grad, bias grad)."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_()  # same storage, strides and offset
    out = module(x)
    out.backward(grad_out)
    return out.detach(), x.grad, module.weight.grad, module.bias.grad


CASES = [
    # (shape, memory format, input dtype, parameter dtype)
    ((16, 5), "contiguous", torch.float32, torch.float32),
    ((8, 6, 33), "contiguous", torch.float32, torch.float32),
    ((4, 8, 9, 11), "contiguous", torch.float32, torch.float32),
    ((4, 8, 9, 11), "channels_last", torch.float32, torch.float32),
    ((4, 8, 9, 11), "channels_last", torch.float16, torch.float32),
    ((4, 8, 9, 11), "contiguous", torch.bfloat16, torch.float32),
    ((4, 8, 9, 11), "channels_last", torch.bfloat16, torch.bfloat16),
    ((4, 8, 9, 11), "contiguous", torch.float16, torch.float16),
    ((4, 8, 9, 11), "contiguous", torch.float64, torch.float64),
    ((2, 4, 3, 5, 7), "channels_last_3d", torch.float32, torch.float32),
    ((2, 4, 3, 5, 7), "contiguous", torch.float16, torch.float32),
    ((64, 32, 7, 7), "channels_last", torch.float16, torch.float32),
    ((3, 256, 2, 2), "channels_last", torch.float32, torch.float32),
    ((2, 3, 128, 130), "contiguous", torch.float32, torch.float32),
    # the kernels' paths: 16-byte packs within rows (inner % 8 == 0), packs
    # across row ends (7x7), few channels over many blocks per channel (and
    # channels-last lanes shaped to C: 2 channels, 3 packs of 8), (N, C) rows
    ((8, 16, 8, 8), "contiguous", torch.float16, torch.float16),
    ((4, 64, 7, 7), "contiguous", torch.bfloat16, torch.float32),
    ((16, 2, 64, 64), "contiguous", torch.float32, torch.float32),
    ((16, 2, 64, 64), "channels_last", torch.float16, torch.float32),
    ((8, 24, 6, 6), "channels_last", torch.float16, torch.float16),
    ((4096, 8), "contiguous", torch.float16, torch.float32),
]


def _case_id(case):
    shape, fmt, dtype, param_dtype = case
    name = f"{'x'.join(map(str, shape))}-{fmt}-{str(dtype)[6:]}"
    return name if dtype == param_dtype else name + "-params_float32"


def _make_input(shape, fmt, dtype, device=DEVICE, scale=2.0, shift=0.5):
    x = torch.randn(shape, device=device, dtype=torch.float64) * scale + shift
    return x.to(dtype).contiguous(memory_format=MEMORY_FORMATS[fmt])


@pytest.fixture(params=[False, True], ids=["two_kernels", "merged"])
def merge_mode(request):
    """Both modes of the CUDA reductions: stage 2 in a kernel of its own, or
    merged in the stage-1 kernel's last block (normext._C.set_cuda_merge_in_last_block:
    off by default until these tests have passed with it on a GPU)."""
    previous = normext._C.set_cuda_merge_in_last_block(request.param)
    yield request.param
    normext._C.set_cuda_merge_in_last_block(previous)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_matches_torch_on_same_gpu_and_float64_cpu(case, training, merge_mode):
    shape, fmt, dtype, param_dtype = case
    ours, theirs = _pair(shape, dtype, param_dtype)
    reference = copy.deepcopy(theirs).to("cpu", torch.float64)
    for m in (ours, theirs, reference):
        m.train(training)
    x = _make_input(shape, fmt, dtype)
    grad_out = torch.randn(shape, device=DEVICE).to(dtype).contiguous(
        memory_format=MEMORY_FORMATS[fmt])
    mine = _step(ours, x, grad_out)
    gpu_torch = _step(theirs, x, grad_out)
    cpu64 = _step(reference, x.cpu().double(), grad_out.cpu().double())
    assert mine[0].dtype == gpu_torch[0].dtype == dtype
    assert memory_formats_of(mine[0]) == memory_formats_of(gpu_torch[0])
    grad_dtypes = [dtype, dtype, param_dtype, param_dtype]
    # torch's CUDA kernels round x_hat to a half or bfloat16 input's dtype
    # before adding dy * x_hat up, so its weight grad carries about
    # sqrt(N*H*W) roundings of that dtype: it is compared with the input
    # dtype's tolerances; the float64 comparison is the tight one.
    reduced = dtype in (torch.float16, torch.bfloat16)
    torch_dtypes = [dtype, dtype] + [dtype if reduced else param_dtype] * 2
    for name, a, b, c, tol_dtype, torch_dtype in zip(
            ["output", "input grad", "weight grad", "bias grad"], mine, gpu_torch, cpu64,
            grad_dtypes, torch_dtypes):
        assert a.device.type == DEVICE
        # against float64: the dtype's rounding only; against torch on the
        # same GPU: both roundings
        assert_close(a, c, tol_dtype, msg=f"{name} vs float64 CPU")
        assert_close(a, b, torch_dtype, factor=2.0, msg=f"{name} vs torch on the GPU")
    for name in ("running_mean", "running_var"):
        assert_close(getattr(ours, name), getattr(reference, name), param_dtype, msg=name)
        assert_close(getattr(ours, name), getattr(theirs, name), param_dtype, factor=2.0,
                     msg=name)
    assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_large_mean_statistics_float32(fmt):
    """1e4 + randn: the mean is 1e4 times the spread (see test_ops.py)."""
    x = _make_input((16, 4, 32, 32), fmt, torch.float32, scale=1.0, shift=1e4)
    x64 = x.double()
    mean, var = normext.ops.batch_norm_moments(x)
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-5, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-5,
                               atol=0)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_precision_near_max(fmt, dtype):
    """6e4 - rand * 100: squares overflow float16; everything stays finite."""
    x = (6e4 - torch.rand(8, 4, 8, 8, device=DEVICE) * 100).to(dtype).contiguous(
        memory_format=MEMORY_FORMATS[fmt])
    x64 = x.double()
    mean, var = normext.ops.batch_norm_moments(x)
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-4,
                               atol=1e-3)
    out, _, _ = normext.ops.batch_norm_forward(x, None, None, None, None, True, 0.1, 1e-5)
    assert torch.isfinite(out).all()
    ref = (x64 - x64.mean((0, 2, 3), keepdim=True)) * torch.rsqrt(
        x64.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    assert_close(out, ref, dtype)


@pytest.mark.parametrize("case", CASES[:8] + CASES[14:18], ids=_case_id)
def test_repeated_runs_are_bit_identical(case, merge_mode):
    shape, fmt, dtype, param_dtype = case
    ours, _ = _pair(shape, dtype, param_dtype)
    initial = copy.deepcopy(ours.state_dict())
    x = _make_input(shape, fmt, dtype)
    grad_out = torch.randn_like(x)
    results = []
    for _ in range(3):
        ours.load_state_dict(initial)
        step = _step(ours, x, grad_out)
        results.append(step + (ours.running_mean.clone(), ours.running_var.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_non_default_stream(merge_mode):
    """The kernels run on the current stream: work queued on a side stream
    sees inputs produced on that stream and is ordered with it."""
    shape = (32, 16, 24, 24)
    ours, theirs = _pair(shape, torch.float32, torch.float32)
    side = torch.cuda.Stream()
    default = torch.cuda.current_stream()
    side.wait_stream(default)
    with torch.cuda.stream(side):
        # produced on the side stream, used right away on it
        x = (torch.randn(shape, device=DEVICE) * 3 + 1).contiguous(
            memory_format=torch.channels_last)
        x.requires_grad_()
        out = ours(x)
        out.backward(torch.ones_like(out))
        stats = ours.running_mean.clone(), ours.running_var.clone()
    default.wait_stream(side)
    for t in (x, out, *stats):
        t.record_stream(default)
    x_ref = x.detach().clone().requires_grad_()
    expected = theirs(x_ref)
    expected.backward(torch.ones_like(expected))
    assert_close(out, expected)
    assert_close(x.grad, x_ref.grad)
    assert_close(stats[0], theirs.running_mean)
    assert_close(stats[1], theirs.running_var)


def test_cuda_graph_capture_and_replay_training_step(merge_mode):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), normext.BatchNorm2d(8),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4),
        normext.BatchNorm1d(4)).to(DEVICE)
    eager = copy.deepcopy(model)
    static_x = torch.randn(5, 3, 6, 6, device=DEVICE)

    def train_step(m, x):
        out = m(x)
        loss = out.square().mean() + out[:, 0].sum()
        loss.backward()
        return loss

    # warm up on a side stream, as torch.cuda.graphs requires
    warmup_inputs = [torch.randn(5, 3, 6, 6, device=DEVICE) for _ in range(3)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for x in warmup_inputs:
            model.zero_grad(set_to_none=True)
            static_x.copy_(x)
            train_step(model, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for x in warmup_inputs:
        eager.zero_grad(set_to_none=True)
        train_step(eager, x)

    model.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step(model, static_x)

    for replay in range(3):
        x = torch.randn(5, 3, 6, 6, device=DEVICE)
        static_x.copy_(x)
        graph.replay()
        eager.zero_grad(set_to_none=True)
        loss = train_step(eager, x)
        torch.cuda.synchronize()
        assert_close(static_loss, loss, msg=f"replay {replay}: loss")
        for (name, p), q in zip(model.named_parameters(), eager.parameters()):
            assert_close(p.grad, q.grad, msg=f"replay {replay}: grad of {name}")
        for (name, b), c in zip(model.named_buffers(), eager.buffers()):
            assert_close(b, c, msg=f"replay {replay}: {name}")


@pytest.mark.parametrize("channels", [1, 3, 5, 7, 12, 13, 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_channels_last_odd_channel_counts(channels, dtype):
    """Vectorized channels-last kernels with C not a multiple of 4 or 8, and
    a misaligned base pointer (a view starting one element in)."""
    shape = (6, channels, 5, 7)
    param_dtype = torch.float32
    for offset in (0, 1):
        ours, theirs = _pair(shape, dtype, param_dtype)
        reference = copy.deepcopy(theirs).to("cpu", torch.float64)
        storage = torch.randn(6 * channels * 5 * 7 + offset, device=DEVICE).to(dtype)
        x = storage[offset:].view(6, 5, 7, channels).permute(0, 3, 1, 2)
        assert x.is_contiguous(memory_format=torch.channels_last)
        grad_out = torch.randn_like(x)
        mine = _step(ours, x, grad_out)
        cpu64 = _step(reference, x.cpu().double(), grad_out.cpu().double())
        assert mine[0].is_contiguous(memory_format=torch.channels_last)
        if offset == 0:  # torch 2.11's channels-last kernels fault on the misaligned view
            gpu_torch = _step(theirs, x, grad_out)
            assert memory_formats_of(mine[0]) == memory_formats_of(gpu_torch[0])
        for name, a, c, tol_dtype in zip(["output", "input grad", "weight grad", "bias grad"],
                                         mine, cpu64, [dtype, dtype, param_dtype, param_dtype]):
            assert_close(a, c, tol_dtype, msg=f"offset {offset}: {name}")
        assert_close(ours.running_mean, reference.running_mean)
        assert_close(ours.running_var, reference.running_var)


@pytest.mark.parametrize("which", ["weight", "running_stats", "input"])
def test_error_cpu_and_cuda_tensors_mixed(which):
    tensors = dict(input=torch.randn(4, 3, 5, device=DEVICE),
                   running_mean=torch.zeros(3, device=DEVICE),
                   running_var=torch.ones(3, device=DEVICE), weight=torch.ones(3, device=DEVICE),
                   bias=torch.zeros(3, device=DEVICE))
    if which == "running_stats":
        tensors["running_mean"] = tensors["running_mean"].cpu()
        tensors["running_var"] = tensors["running_var"].cpu()
    else:
        tensors[which] = tensors[which].cpu()
    args = (tensors["input"], tensors["running_mean"], tensors["running_var"],
            tensors["weight"], tensors["bias"], True)
    with pytest.raises(RuntimeError):
        F.batch_norm(*args)
    with pytest.raises(RuntimeError):
        normext.functional.batch_norm(*args)


def test_other_gpu_index_is_respected():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = torch.randn(4, 3, 5, 5, device="cuda:1")
    m = normext.BatchNorm2d(3).to("cuda:1")
    out = m(x)
    assert out.device == x.device
    assert_close(out, torch.nn.functional.batch_norm(x, None, None, training=True))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_more_than_2_31_elements_float16(fmt):
    """64-bit indexing: 2**31 + 32768 half elements (4 GiB), forward and
    backward, checked per channel in float64 chunks and at the far end."""
    N, C, H, W = 65537, 2, 128, 128
    assert N * C * H * W > 2**31
    x = torch.empty((N, C, H, W), device=DEVICE, dtype=torch.float16,
                    memory_format=MEMORY_FORMATS[fmt])
    x.normal_()
    x[:, 1].mul_(2).add_(3)
    x[-1].fill_(1.5)  # the last image: far past 2**31 elements
    # float64 per-channel moments in chunks
    sums = torch.zeros(C, dtype=torch.float64, device=DEVICE)
    squares = torch.zeros(C, dtype=torch.float64, device=DEVICE)
    for chunk in x.split(4096):
        c64 = chunk.double()
        sums += c64.sum((0, 2, 3))
        squares += c64.square().sum((0, 2, 3))
        del c64
    count = N * H * W
    ref_mean = sums / count
    ref_var = squares / count - ref_mean.square()
    mean, var = normext.ops.batch_norm_moments(x)
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-4, atol=1e-5)

    rm, rv = torch.zeros(C, device=DEVICE), torch.ones(C, device=DEVICE)
    w, b = torch.tensor([1.5, 0.5], device=DEVICE), torch.tensor([0.25, -1.0], device=DEVICE)
    out, save_mean, save_invstd = normext.ops.batch_norm_forward(x, w, b, rm, rv, True, 0.1,
                                                                 1e-5)
    assert out.shape == x.shape and out.dtype == torch.float16
    assert memory_formats_of(out) == memory_formats_of(x)
    invstd64 = torch.rsqrt(ref_var + 1e-5)
    for index in (0, N // 2, N - 1):
        expected = ((x[index].double() - ref_mean.view(C, 1, 1)) * invstd64.view(C, 1, 1)
                    * w.double().view(C, 1, 1) + b.double().view(C, 1, 1))
        assert_close(out[index], expected, torch.float16, msg=f"output image {index}")
    assert_close(rm, 0.1 * ref_mean, torch.float32)

    grad_out = torch.empty_like(x).fill_(1.0)
    grad_out[-1].fill_(-2.0)
    dx, dw, db = normext.ops.batch_norm_backward(grad_out, x, w, save_mean, save_invstd, True)
    del grad_out
    assert dx.shape == x.shape and torch.isfinite(dw).all() and torch.isfinite(db).all()
    # sum(dy) = count - 3 * H * W (the last image has dy = -2 instead of 1)
    torch.testing.assert_close(db.double(), torch.full((C,), count - 3.0 * H * W,
                                                       dtype=torch.float64, device=DEVICE),
                               rtol=1e-5, atol=0)
    # far end of the input gradient: dx = (dy - mean_dy - xhat * proj) * invstd * w
    dy_mean = (count - 3.0 * H * W) / count
    xhat_last = (1.5 - ref_mean) * invstd64
    dy_xhat_mean = dw.double() / count
    expected_last = ((-2.0 - dy_mean - xhat_last * dy_xhat_mean) * invstd64 * w.double())
    assert_close(dx[-1].double().amax((1, 2)), expected_last, torch.float16)
    assert_close(dx[-1].double().amin((1, 2)), expected_last, torch.float16)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_batch_norm_act_layer_on_cuda(activation, memory_efficient):
    """BatchNormAct2d on CUDA (composed until the fused CUDA kernels have run
    on a GPU: functional.FUSED_DEVICES): values, gradients and running stats
    of torch's layers. The fused kernels themselves are compared with torch
    by tests/test_batch_norm_act.py and test_opcheck.py on CUDA."""
    memory_efficient = memory_efficient and activation == "leaky_relu"
    layer = normext.BatchNormAct2d(8, activation=activation,
                                   memory_efficient=memory_efficient).to(DEVICE)
    ref = torch.nn.BatchNorm2d(8).to(DEVICE)
    act = {"relu": torch.nn.functional.relu, "silu": torch.nn.functional.silu,
           "leaky_relu": torch.nn.functional.leaky_relu}[activation]
    x = torch.randn(4, 8, 6, 6, device=DEVICE, requires_grad=True)
    r = torch.randn(4, 8, 6, 6, device=DEVICE, requires_grad=True)
    out = layer(x, r)
    expected = act(ref(x) + r)
    assert_close(out, expected)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, r, layer.weight, layer.bias), g),
                    torch.autograd.grad(expected, (x, r, ref.weight, ref.bias), g)):
        assert_close(a, b)
    assert_close(layer.running_var, ref.running_var)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_kernels_bit_identical_runs_and_graph_capture(dtype):
    """The fused CUDA op: the same bits from run to run, and a training
    forward + backward captured in a CUDA graph replays to the eager result."""
    torch.manual_seed(0)
    x = torch.randn(8, 32, 14, 14, device=DEVICE).to(dtype).contiguous(
        memory_format=torch.channels_last)
    r = torch.randn_like(x)
    w = torch.rand(32, device=DEVICE) + 0.5
    b = torch.randn(32, device=DEVICE)
    g = torch.randn_like(x)

    def step(memory_efficient=False):
        xs, rs, ws, bs = (t.detach().requires_grad_() for t in (x, r, w, b))
        out = torch.ops.normext.batch_norm_act(xs, ws, bs, None, None, True, 0.1, 1e-5, "elu",
                                               0.01, 1.0, rs, memory_efficient)
        return (out, *torch.autograd.grad(out, (xs, rs, ws, bs), g))

    for memory_efficient in (False, True):
        first = step(memory_efficient)
        for a, b_ in zip(first, step(memory_efficient)):
            assert torch.equal(a, b_)
    # memory_efficient reads the weights back to the host (whether it can
    # invert them), which graph capture does not allow: captured without it.
    first = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b_ in zip(first, captured):
        assert torch.equal(a, b_)


def _with_merge(enabled, fn):
    previous = normext._C.set_cuda_merge_in_last_block(enabled)
    try:
        return fn()
    finally:
        normext._C.set_cuda_merge_in_last_block(previous)


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
@pytest.mark.parametrize("memory_efficient", [False, True])
def test_merge_in_last_block_fused_op(fmt, memory_efficient):
    """The fused op (elu with a residual), merged: the same bits run to run,
    the two-kernel mode's values (whose splits may differ)."""
    torch.manual_seed(0)
    x = _make_input((4, 24, 64, 64), fmt, torch.float32)  # several splits per channel
    r = torch.randn_like(x)
    w = torch.rand(24, device=DEVICE) + 0.5
    b = torch.randn(24, device=DEVICE)
    g = torch.randn_like(x)

    def step():
        xs, rs, ws, bs = (t.detach().requires_grad_() for t in (x, r, w, b))
        out = torch.ops.normext.batch_norm_act(xs, ws, bs, None, None, True, 0.1, 1e-5, "elu",
                                               0.01, 1.0, rs, memory_efficient)
        return (out, *torch.autograd.grad(out, (xs, rs, ws, bs), g))

    merged = _with_merge(True, step)
    for a, b_ in zip(merged, _with_merge(True, step)):
        assert torch.equal(a, b_)
    for a, b_ in zip(merged, _with_merge(False, step)):
        assert_close(a, b_)


def _cuda_activities_of(fn):
    """The names of the GPU activities (kernels, memsets, copies) fn runs (torch.profiler)."""
    fn()  # warm-up: occupancy queries, allocator
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.parametrize("fmt", ["contiguous", "channels_last"])
def test_kernels_per_training_step(merge_mode, fmt):
    """Issue 21's count: a training forward + backward of BatchNorm2d in at
    most 4 normext kernels merged (statistics, normalize, backward reduction,
    input gradient) and 2 memsets (the merges' counters), 6 kernels with stage
    2 apart, besides torch's add to num_batches_tracked; no copies."""
    layer = normext.BatchNorm2d(32).to(DEVICE)
    x = _make_input((8, 32, 14, 14), fmt, torch.float32).requires_grad_()
    g = torch.randn_like(x)

    def step():
        torch.autograd.grad(layer(x), (x, layer.weight, layer.bias), g)

    names = _cuda_activities_of(step)
    ours = [n for n in names if "normext" in n]
    memsets = [n for n in names if "memset" in n.lower()]
    assert len(ours) <= (4 if merge_mode else 6), names
    assert len(memsets) == (2 if merge_mode else 0), names
    assert len(names) - len(ours) - len(memsets) <= 1, names  # num_batches_tracked's add


def test_graph_replays_give_the_eager_bits(merge_mode):
    """A captured training step replays to the eager step's bits (merged: the
    counters are zeroed by a memset the graph replays)."""
    layer = normext.BatchNorm2d(16).to(DEVICE)
    x = _make_input((32, 16, 12, 12), "channels_last", torch.float32)
    g = torch.randn_like(x)
    static_x = x.clone().requires_grad_()

    def step():
        out = layer(static_x)
        return (out, *torch.autograd.grad(out, (static_x, layer.weight, layer.bias), g))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for replay in range(2):
        with torch.no_grad():
            static_x.copy_(x * (replay + 1))
        graph.replay()
        torch.cuda.synchronize()
        expected = step()
        for a, b in zip(captured, expected):
            assert torch.equal(a, b), f"replay {replay}"


FIRST_CALL_IN_CAPTURE = """
import copy, sys, torch, normext
normext._C.set_cuda_merge_in_last_block(sys.argv[1] == "merged")
torch.manual_seed(0)
captured_layer = normext.BatchNorm2d(24).cuda()
eager_layer = copy.deepcopy(captured_layer)
x = (torch.randn(6, 24, 9, 9, device="cuda") * 2 + 0.5).contiguous(
    memory_format=torch.channels_last)
g = torch.randn_like(x)
static_x = x.clone().requires_grad_()

def step(layer, inp):
    out = layer(inp)
    return (out, *torch.autograd.grad(out, (inp, layer.weight, layer.bias), g))

graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    captured = step(captured_layer, static_x)
graph.replay()
torch.cuda.synchronize()
expected = step(eager_layer, x.clone().requires_grad_())
for a, b in zip(captured, expected):
    assert torch.equal(a, b)
assert torch.equal(captured_layer.running_mean, eager_layer.running_mean)
assert torch.equal(captured_layer.running_var, eager_layer.running_var)
print("ok")
"""


@pytest.mark.parametrize("mode", ["two_kernels", "merged"])
def test_first_call_inside_graph_capture(mode):
    """Issue 21: a layer whose first call is inside CUDA graph capture (no
    eager call before it in a fresh process, so the occupancy queries and
    the kernels' loading happen during capture) captures, and replays to
    the eager step."""
    done = subprocess.run([sys.executable, "-c", FIRST_CALL_IN_CAPTURE, mode],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


LAYER_NORM_CASES = [
    # (input shape, normalized_shape, dtype)
    ((7, 1), (1,), torch.float32),
    ((33, 768), (768,), torch.float32),
    ((5, 4097), (4097,), torch.float32),
    ((3, 2, 40), (2, 40), torch.float64),
    ((16, 300), (300,), torch.float16),
    ((130, 1024), (1024,), torch.bfloat16),
]


@pytest.fixture
def cuda_layer_norm(monkeypatch):
    """normext.functional's layer and RMS norms on the CUDA kernels
    (csrc/layer_norm/cuda), which the functions leave to torch there until
    these tests have passed on a GPU (functional.LAYER_NORM_DEVICES)."""
    import normext.functional as NF
    monkeypatch.setattr(NF, "LAYER_NORM_DEVICES", ("cpu", "cuda"))
    return NF


def _layer_norm_grads(fn, inputs, grads):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, grads[:len(outputs)])
    return [out.detach() for out in outputs], [t.grad if t is not None else None for t in leaves]


@pytest.mark.parametrize("params", ["same", "float32", "none"])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer_norm", "rms_norm"])
@pytest.mark.parametrize("shape,normalized,dtype", LAYER_NORM_CASES)
def test_layer_norm_cuda_kernels_match_float64(cuda_layer_norm, shape, normalized, dtype, rms,
                                               residual, params):
    """The CUDA layer-norm kernels against torch in float64 from the same
    values: the output (and the sum, exactly torch's add), the input, residual
    and parameter gradients, with parameters in the input's dtype, in float32
    (torch's mixed-dtype case) or none; the same bits on a second run."""
    NF = cuda_layer_norm
    if params == "float32" and dtype.itemsize != 2:
        pytest.skip("float32 parameters with another input dtype: torch's mixed case is 16-bit")
    torch.manual_seed(len(shape) + shape[-1])
    param_dtype = torch.float32 if params == "float32" else dtype
    x = (torch.randn(shape, device=DEVICE) * 2 + 1).to(dtype)
    r = torch.randn(shape, device=DEVICE).to(dtype) if residual else None
    w = (torch.rand(normalized, device=DEVICE) + 0.5).to(param_dtype)
    b = None if rms else torch.randn(normalized, device=DEVICE).to(param_dtype)
    if params == "none":
        w = b = None
    grads = [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(2)]
    shape_list = list(normalized)
    rounded_sum = (x + r).cpu().double() if residual else None

    def ours(x, r, w, b):
        if r is None:
            return NF.rms_norm(x, shape_list, w, 1e-5) if rms else NF.layer_norm(
                x, shape_list, w, b, 1e-5)
        if rms:
            return NF.add_rms_norm(x, r, shape_list, w, 1e-5)
        return NF.add_layer_norm(x, r, shape_list, w, b, 1e-5)

    def reference(x, r, w, b):
        total = x
        if r is not None:  # the sum as the dtype rounds it, differentiable as x + r
            total = x + r
            total = total + (rounded_sum - total).detach()
        y = (F.rms_norm(total, shape_list, w, 1e-5) if rms
             else F.layer_norm(total, shape_list, w, b, 1e-5))
        return y if r is None else (y, total)

    inputs = (x, r, w, b)
    outs, grads_ours = _layer_norm_grads(ours, inputs, grads)
    ref_outs, ref_grads = _layer_norm_grads(
        reference, [t.cpu().double() if t is not None else None for t in inputs],
        [g.cpu().double() for g in grads])
    if residual:
        assert torch.equal(outs[1], x + r)
    for actual, expected in zip(outs, ref_outs, strict=True):
        assert actual.device == x.device and actual.dtype == dtype
        assert_close(actual.cpu().double(), expected, dtype)
    for actual, expected, leaf in zip(grads_ours, ref_grads, inputs, strict=True):
        if leaf is not None:
            assert actual.dtype == leaf.dtype
            assert_close(actual.cpu().double(), expected, dtype, factor=4)
    outs2, grads2 = _layer_norm_grads(ours, inputs, grads)
    for a, b_ in zip(outs + grads_ours, outs2 + grads2):
        assert (a is None and b_ is None) or torch.equal(a, b_)


@pytest.mark.parametrize("wanted", ["input", "parameters"])
def test_layer_norm_cuda_backward_of_input_or_parameters_alone(cuda_layer_norm, wanted):
    """The backward asked for the input's gradient alone (frozen parameters)
    or the parameters' alone (an input that needs none): torch's values."""
    NF = cuda_layer_norm
    torch.manual_seed(0)
    x = torch.randn(70, 500, device=DEVICE)
    w, b = torch.rand(500, device=DEVICE) + 0.5, torch.randn(500, device=DEVICE)
    g = torch.randn_like(x)
    results = []
    for fn in (NF.layer_norm, F.layer_norm):
        xs = x.detach().requires_grad_(wanted == "input")
        ws, bs = (t.detach().requires_grad_(wanted == "parameters") for t in (w, b))
        leaves = [xs] if wanted == "input" else [ws, bs]
        results.append(torch.autograd.grad(fn(xs, [500], ws, bs, 1e-5), leaves, g))
    for a, e in zip(*results):
        assert_close(a, e)


def test_layer_norm_cuda_kernels_large_mean(cuda_layer_norm):
    """1e4 + randn in float32: the CUDA kernels' mean and variance passes
    (deviations from the mean) within 2x torch's error against float64."""
    NF = cuda_layer_norm
    torch.manual_seed(0)
    x = torch.randn(64, 1024, dtype=torch.float64) + 1e4
    expected = F.layer_norm(x, [1024])
    ours = NF.layer_norm(x.float().to(DEVICE), [1024]).cpu().double()
    theirs = F.layer_norm(x.float().to(DEVICE), [1024]).cpu().double()
    error, torch_error = ((t - expected).abs().max() for t in (ours, theirs))
    assert error <= 2 * torch_error + 1e-6


def test_layer_norm_cuda_module_and_graph_capture(cuda_layer_norm):
    """normext.LayerNorm on CUDA: torch's layer's values and gradients; a
    training step captured in a CUDA graph replays to the eager result."""
    torch.manual_seed(0)
    ours = normext.LayerNorm(256).to(DEVICE)
    theirs = torch.nn.LayerNorm(256).to(DEVICE)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(8, 16, 256, device=DEVICE)
    g = torch.randn_like(x)

    def step(layer):
        xs = x.detach().requires_grad_()
        out = layer(xs)
        return (out, *torch.autograd.grad(out, (xs, layer.weight, layer.bias), g))

    for a, b in zip(step(ours), step(theirs)):
        assert_close(a, b)
    eager = step(ours)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(ours)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step(ours)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(eager, captured):
        assert torch.equal(a, b)
