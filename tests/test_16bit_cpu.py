"""16-bit floats on the CPU: the vector conversions (F16C, AVX512_BF16's or
at::vec's for bfloat16) and the bit arithmetic (baseline builds, tails), bit
for bit against torch's conversions, and every float16 op against float32
arithmetic on the same values."""

import os
import subprocess
import sys

import pytest
import torch

from normext import ops


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_16bit_conversions_are_exact(layout, dtype):
    """The CPU elementwise passes convert float16 with F16C vectors and
    bfloat16 with at::vec's vector conversions (partial vectors for tails)
    where the build has them, else with cpu::Float16's bit arithmetic and
    cpu::store (CI's portable build): every 16-bit value must widen exactly,
    and narrowing must round to nearest even like torch, subnormals, overflow
    to infinity and NaN included. With mean 0, invstd 1 and bias -0.0,
    normalize computes x * weight exactly in float32."""
    every_value = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    # 4 x 16387 elements: runs and pieces end in tails shorter than a vector.
    x = torch.cat([every_value, every_value[:12]]).reshape(1, 4, 1, 16387)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    finite_or_inf = ~torch.isnan(x)
    mean, invstd, bias = torch.zeros(4), torch.ones(4), torch.full((4,), -0.0)
    for exponent in [-24, -14, -1, 0, 1, 15]:
        weight = torch.tensor([2.0 ** exponent, 1.2345, -3.0, 2.0 ** -exponent])
        y = ops.batch_norm_elemt(x, weight, bias, mean, invstd)
        expected = (x.float() * weight.view(1, 4, 1, 1)).to(dtype)
        assert torch.equal(y.view(torch.int16)[finite_or_inf],
                           expected.view(torch.int16)[finite_or_inf]), exponent
        assert torch.isnan(y[~finite_or_inf]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["rows", "runs", "runs_whole_tails"])
def test_cpu_16bit_widening_is_exact(layout, dtype):
    """The statistics read float16 and bfloat16 16 elements at a
    time through vectors (cpu::widen) where the build has them, and one by one
    otherwise and for short tails: a channel whose samples are all one finite
    value has exactly that mean and variance 0, for every finite 16-bit value.
    Rows: channels-last (3, C), whole vectors across channels; runs:
    (2, C, 19), a vector and a tail of 3 along each run; runs_whole_tails:
    (2, C, 23), whose tails of 7 take a whole vector (reduce.h:
    kWholeTails), reading into the next channel's run."""
    every_value = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = every_value[torch.isfinite(every_value)]
    if layout == "rows":
        x = finite.repeat(3, 1)
    else:
        length = 23 if layout == "runs_whole_tails" else 19
        x = finite.view(1, -1, 1).expand(2, -1, length).contiguous()
    mean, var = ops.batch_norm_moments(x)
    assert torch.equal(mean, finite.float())
    assert torch.equal(var, torch.zeros_like(var))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hw", [(5, 5), (10, 10)])
def test_cpu_whole_tails_drop_the_next_runs_lanes(dtype, hw):
    """A run's tail summed through a whole vector (reduce.h: kWholeTails)
    reads the next channel's elements and drops their lanes: NaN and
    infinities there (in x, dy, the residual) leave channel 0's statistics
    and backward sums (plain and fused) finite and equal to float64's on the
    same values. Runs of 25 (a vector and a tail of 9) and of 100 (six
    vectors and a tail of 4, summed into double lanes per run)."""
    torch.manual_seed(0)
    shape = (3, 4) + hw
    x = (5 + torch.randn(shape)).to(dtype)
    dy, residual = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    x[:, 1], dy[:, 1], residual[:, 1] = float("nan"), float("inf"), float("-inf")
    w, b = (torch.rand(4) + 0.5).to(dtype), torch.randn(4).to(dtype)
    mean, var = ops.batch_norm_moments(x)
    xd = x.double()
    finite = [0, 2, 3]
    torch.testing.assert_close(mean[finite].double(), xd.mean((0, 2, 3))[finite],
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var[finite].double(),
                               xd.var((0, 2, 3), unbiased=False)[finite], rtol=1e-5, atol=1e-6)
    assert torch.isnan(mean[1]) and torch.isnan(var[1])
    invstd = torch.rsqrt(var + 1e-5)
    m = mean.double().view(1, -1, 1, 1)
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w)
    torch.testing.assert_close(sum_dy[0].double(), dy.double().sum((0, 2, 3))[0], rtol=1e-5,
                               atol=1e-4)
    torch.testing.assert_close(sum_dy_xmu[0].double(),
                               (dy.double() * (xd - m)).sum((0, 2, 3))[0], rtol=1e-5, atol=1e-4)
    # The fused sums: ReLU after the residual add.
    act_dy, act_dy_xmu = ops.batch_norm_act_backward_reduce(
        dy, x, residual, None, w, b, mean, invstd, "relu", 0.01, 1.0, False)[:2]
    z = (xd - m) * (invstd.double() * w.double()).view(1, -1, 1, 1) \
        + b.double().view(1, -1, 1, 1) + residual.double()
    dz = dy.double() * (z > 0)
    torch.testing.assert_close(act_dy[0].double(), dz.sum((0, 2, 3))[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(act_dy_xmu[0].double(), (dz * (xd - m)).sum((0, 2, 3))[0],
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_float16_ops_match_float32(layout):
    """Every CPU op on float16 against torch's float32 arithmetic on the same
    values, with 35 channels (two full vectors and a partial one of 16 lanes)
    and a non-zero mean, weight and bias."""
    torch.manual_seed(0)
    x = (3 + torch.randn(6, 35, 7, 9)).half()
    dy = torch.randn(x.shape).half()
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    w, b = torch.rand(35) + 0.5, torch.randn(35)
    mean, var = ops.batch_norm_moments(x)
    xf = x.float()
    torch.testing.assert_close(mean, xf.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var, xf.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)
    invstd = torch.rsqrt(var + 1e-5)
    per_channel = lambda t: t.view(1, -1, 1, 1)  # noqa: E731
    y = ops.batch_norm_elemt(x, w, b, mean, invstd)
    y_ref = (xf - per_channel(mean)) * per_channel(invstd * w) + per_channel(b)
    torch.testing.assert_close(y.float(), y_ref, rtol=1e-3, atol=2e-3)  # float16 rounding
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(dy, x, mean, invstd, w)
    dyf = dy.float()
    torch.testing.assert_close(sum_dy, dyf.sum((0, 2, 3)), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sum_dy_xmu, (dyf * (xf - per_channel(mean))).sum((0, 2, 3)),
                               rtol=1e-5, atol=1e-4)
    count = x.numel() / 35
    dx = ops.batch_norm_backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xmu, count)
    dx_ref = (dyf - per_channel(sum_dy / count)
              - (xf - per_channel(mean)) * per_channel(sum_dy_xmu / count * invstd ** 2)) \
        * per_channel(invstd * w)
    torch.testing.assert_close(dx.float(), dx_ref, rtol=1e-3, atol=2e-3)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=memory_format)
    assert dx.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("length", [1, 7, 8, 15, 16, 17, 33])
def test_cpu_float16_group_norm_output_is_rounded_float32(layout, length):
    """GroupNorm's float16 output pass (whole vectors and a partial one where
    the build converts vectors): the float32 formula on the op's statistics,
    rounded once to float16 (within its rounding: one ulp, as float32's fused
    multiply-add may differ in the last float32 bit), for runs and channel
    rows of every length around the vector widths; float16 values near its
    maximum included."""
    torch.manual_seed(length)
    channels, spatial = (2 * length, 3) if layout == "channels_last" else (4, length)
    x = torch.randn(2, channels, spatial, dtype=torch.float32) * 3 + 1
    x[0, 0, 0] = 65000.0
    x = x.half()
    if layout == "channels_last":
        x = x.unsqueeze(-1).contiguous(memory_format=torch.channels_last)
    w, b = torch.rand(channels) + 0.5, torch.randn(channels)
    y, mean, rstd = torch.ops.normext.group_norm_forward(x, 2, w.half(), b.half(), 1e-5)
    scale = (rstd.view(2, 2, 1) * w.half().float().view(1, 2, -1)).view(2, channels, 1)
    expected = ((x.float().reshape(2, 2, -1) - mean.view(2, 2, 1)).reshape(2, channels, -1)
                * scale + b.half().float().view(1, channels, 1))
    ulps = (y.float().reshape(2, channels, -1) - expected).abs() / \
        torch.finfo(torch.float16).eps / expected.abs().clamp_min(2 ** -14)
    assert ulps.max() <= 1.0, ulps.max()
    assert y.dtype == torch.float16


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("length", [1, 7, 8, 15, 16, 17, 33])
def test_cpu_float16_group_norm_input_gradient_is_rounded_float32(layout, length):
    """GroupNorm's float16 input-gradient pass (whole vectors and a partial
    one where the build converts vectors) against the same op on the values
    upcast to float32, with the same statistics: float16's rounding apart."""
    torch.manual_seed(length)
    channels, spatial = (2 * length, 3) if layout == "channels_last" else (4, length)
    x, dy = (torch.randn(2, channels, spatial, 1) * 3 + 1 for _ in range(2))
    if layout == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    x, dy = x.half(), dy.half()
    w, b = (torch.rand(channels) + 0.5).half(), torch.randn(channels).half()
    _, mean, rstd = torch.ops.normext.group_norm_forward(x, 2, w, b, 1e-5)
    grads16 = torch.ops.normext.group_norm_backward(dy, x, 2, mean, rstd, w, b, [True] * 3)
    grads32 = torch.ops.normext.group_norm_backward(dy.float(), x.float(), 2, mean, rstd,
                                                    w.float(), b.float(), [True] * 3)
    dx16, dx32 = grads16[0].float(), grads32[0]
    assert grads16[0].dtype == torch.float16
    torch.testing.assert_close(dx16, dx32, rtol=2 ** -10, atol=2 ** -10 * dx32.abs().max())


# Every op that narrows to bfloat16 through vectors, on every bfloat16 value
# (subnormals, infinities and NaN included) scaled into and out of float's
# subnormal range; saved to the file named by argv[1].
_BFLOAT16_OUTPUTS = """
import sys, torch, normext
from normext import ops
every = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
x = torch.cat([every, every[:12]]).reshape(4, 16387)
dy = x.flip(1) * 0.5
w = torch.linspace(-3, 3, 16387).to(torch.bfloat16)
b = torch.linspace(-1e-38, 1e-38, 16387).to(torch.bfloat16)
out = {"instruction": normext.build_info()["cpu_bfloat16_instruction"]}
y, mean, rstd = ops.layer_norm_forward(x, [16387], w, b, 1e-5, False)
out["ln"] = (y, ops.add_layer_norm_forward(x, dy, [16387], w, b, 1e-5, False),
             ops.layer_norm_backward(dy, x, [16387], mean, rstd, w, False, [True, True, True]))
for name, fmt in (("runs", torch.contiguous_format), ("rows", torch.channels_last)):
    xg, dyg = (t.reshape(4, 16, 2, 512).contiguous(memory_format=fmt) for t in (x[:, :16384], dy[:, :16384]))
    wg, bg = w[:16] * 1e-30, b[:16]
    yg, gmean, grstd = ops.group_norm_forward(xg, 4, wg, bg, 1e-5)
    out["gn_" + name] = (yg, ops.group_norm_backward(dyg, xg, 4, gmean, grstd, wg, bg, [True, True, True]))
    out["bn_" + name] = (ops.batch_norm_elemt(xg, wg, bg, torch.zeros(16), torch.ones(16)),
                         ops.batch_norm_elemt(xg, w[:16] * 1e30, bg, torch.zeros(16), torch.ones(16)))
    out["bn_act_" + name] = [
        ops.batch_norm_act_forward(xg, w[:16] * scale, bg, torch.zeros(16).bfloat16(),
                                   torch.ones(16).bfloat16(), False,
                                   0.1, 0.0, act, 0.01, 1.0, residual)[0]
        for act, scale, residual in (("relu", 1e30, None), ("leaky_relu", 1e-30, dyg),
                                     ("relu6", 1.0, dyg), ("elu", 1.0, None))]
    # The fused input gradient under running statistics (dz and dx stored
    # together), from the input with or without a residual, from the input
    # and the output, and from the output alone.
    zeros, ones = torch.zeros(16), torch.ones(16)
    grads = []
    for act, scale, residual, with_output, from_output in (
            ("relu", 1e30, dyg, False, False), ("relu6", 1.0, None, True, False),
            ("leaky_relu", 1.0, None, False, True), ("elu", 1e-30, None, False, False),
            ("silu", 1e-30, dyg, False, False)):
        wa = w[:16] * scale
        ya = ops.batch_norm_act_forward(xg, wa, bg, zeros.bfloat16(), ones.bfloat16(), False,
                                        0.1, 0.0, act, 0.01, 1.0, residual)[0]
        grads.append(ops.batch_norm_act_backward(
            dyg, ya if from_output else xg, residual, ya if with_output else None, wa, bg,
            zeros, ones, False, act, 0.01, 1.0, from_output, False)[:2])
    out["bn_act_backward_" + name] = grads
# Channels-last rows of 51 channels (whole vectors in pairs, one, a partial
# one) in training: the plain forward and input gradient and ReLU's forward
# and input gradient, a third of the channels' results subnormal, one channel NaN.
xc = torch.linspace(-4, 4, 8 * 51 * 40).to(torch.bfloat16).reshape(8, 8, 5, 51).permute(0, 3, 1, 2)
xc[1, 7, 2, 3] = float("nan")
dyc = xc.flip(0).nan_to_num()
wc = torch.where(torch.arange(51) % 3 == 0, 1e-38, 1.0).to(torch.bfloat16)
bc = torch.zeros(51, dtype=torch.bfloat16)
yc, cmean, cinvstd = ops.batch_norm_forward(xc, wc, bc, None, None, True, 0.1, 1e-5)
out["bn_train_rows"] = (yc, ops.batch_norm_backward(dyc, xc, wc, cmean, cinvstd, True),
                        ops.batch_norm_act_forward(xc, wc, bc, None, None, True, 0.1, 1e-5,
                                                   "relu", 0.01, 1.0, None)[0])
yr = out["bn_train_rows"][2]
out["bn_act_train_rows"] = ops.batch_norm_act_backward(dyc, xc, None, yr, wc, bc, cmean, cinvstd,
                                                       True, "relu", 0.01, 1.0, False)
torch.save(out, sys.argv[1])
"""


def _flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flatten(item)]
    return []


def test_bfloat16_instruction_and_its_fallback_give_the_same_bits(tmp_path):
    """Where the CPU has AVX512_BF16, the AVX-512 kernels narrow to bfloat16
    with vcvtneps2bf16, and vectors holding NaN or subnormals (which it
    rounds otherwise than torch) through at::vec's bit arithmetic, as CPUs
    without it do and NORMEXT_AVX512_BF16=0 makes them: the two processes
    must give every op's outputs the same bits, NaN's included (at::vec's
    0xFFFF in both)."""
    results = []
    for setting in ("1", "0"):
        path = tmp_path / f"outputs_{setting}.pt"
        env = dict(os.environ, NORMEXT_AVX512_BF16=setting)
        subprocess.run([sys.executable, "-c", _BFLOAT16_OUTPUTS, str(path)], env=env,
                       check=True, timeout=120)
        results.append(torch.load(path))
    with_setting, without = results
    assert without["instruction"] is False
    if not with_setting["instruction"]:
        pytest.skip("the kernels run here do not take AVX512_BF16's instruction")
    for key in with_setting:
        if key == "instruction":
            continue
        for a, b in zip(_flatten(with_setting[key]), _flatten(without[key]), strict=True):
            bits = {2: torch.int16, 4: torch.int32}[a.element_size()]
            assert torch.equal(a.view(bits), b.view(bits)), key
