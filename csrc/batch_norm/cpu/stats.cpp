// Per-channel batch statistics and the running-stat update. The statistics
// read the input once (common/cpu/reduce.h): sums of deviations from a
// per-channel shift (the median of a small sample of the channel, math.h:
// median_shift), turned into moments in double (math.h: shifted_moments).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstring>
#include <type_traits>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/math.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// What one channel's shift (a sorted sample) costs, in element sums: enough
// that a small input's shifts are still taken on two threads.
constexpr int64_t kShiftCost = 512;

#if defined(CPU_CAPABILITY_AVX512)
// median_shift of channels [begin, end) of data whose accumulate type is
// float, 16 channels at a time (the network on vectors of lanes); returns the
// first channel not done. Every sample is a float, so comparing them as
// floats orders them as median_shift's doubles do: the shifts are the same.
// AVX-512 only: for the default build's SSE, GCC made the 16-lane network
// scalar code, and AVX2's is unmeasured.
template <typename scalar_t>
int64_t lane_shifts(const scalar_t* x, const int64_t* offsets, int size, int64_t stride,
                    int64_t begin, int64_t end, float* shift_acc, double* shift) {
  constexpr int kLanes = 16;
  using Lanes = float __attribute__((vector_size(kLanes * sizeof(float))));
  const int64_t n = (end - begin) / kLanes * kLanes;
  // The samples gathered first, sample k of every channel in a row: a vector
  // load of lanes just stored one by one would wait for the stores.
  std::vector<float> samples(kShiftSample * n, HUGE_VALF);
  for (int k = 0; k < size; ++k) {
    const scalar_t* row = x + offsets[k] + begin * stride;
    float* out = samples.data() + k * n;
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(row[i * stride]);
  }
  for (int64_t i = 0; i < n; i += kLanes) {
    Lanes s[kShiftSample];
    for (int k = 0; k < kShiftSample; ++k) {
      std::memcpy(&s[k], samples.data() + k * n + i, sizeof(Lanes));
    }
    sort_samples(s);
    const Lanes middle = s[(size - 1) / 2], zero = {};
    const Lanes finite = middle - middle == zero ? middle : zero;
    for (int j = 0; j < kLanes; ++j) {
      shift_acc[begin + i + j] = finite[j];
      shift[begin + i + j] = static_cast<double>(finite[j]);
    }
  }
  return begin + n;
}
#endif

// Biased per-channel mean and variance of `input` in the accumulate type.
template <typename scalar_t, typename acc_t>
void channel_moments(const ChannelView& v, acc_t* mean, acc_t* var) {
  const auto* x = cpu::loop_data<scalar_t>(v.data);
  const int64_t C = v.channels;
  // The shift as a double that acc_t holds exactly: the deviations and the mean use one value.
  std::vector<double> shift(C);
  std::vector<acc_t> shift_acc(C);
  // sample_shift's samples: sample k of channel c is element offsets[k] + c * stride.
  const int size = shift_sample_size(v.count());
  int64_t offsets[kShiftSample] = {};
  for (int k = 0; k < size; ++k) {
    offsets[k] = channel_element(k * v.count() / size, 0, C, v.inner, v.channels_last);
  }
  const int64_t stride = v.channels_last ? 1 : v.inner;
  at::parallel_for(0, C, cpu::grain_for(kShiftCost), [&](int64_t begin, int64_t end) {
    int64_t c = begin;
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float>) {
      if (size > 0) {
        c = lane_shifts(x, offsets, size, stride, begin, end, shift_acc.data(), shift.data());
      }
    }
#endif
    for (; c < end; ++c) {
      shift_acc[c] = median_shift<acc_t>(size, [&](int k) {
        return static_cast<double>(x[offsets[k] + c * stride]);
      });
      shift[c] = static_cast<double>(shift_acc[c]);
    }
  });
  const std::vector<double> sums = cpu::reduce_groups(
      cpu::groups_of(v), cpu::ShiftedSums<cpu::loop_t<scalar_t>, acc_t>{x, shift_acc.data()});
  const double count = static_cast<double>(v.count());
  // (The per-channel loops with divisions are vectorized, here and in
  // finalize_channels: scalar, they were a large share of the statistics of
  // small maps. invstd's stays scalar: std::sqrt may set errno.)
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    double m, m2;
    shifted_moments(shift[c], sums[c], sums[C + c], count, m, m2);
    mean[c] = static_cast<acc_t>(m);
    var[c] = static_cast<acc_t>(m2 / count);
  }
}

// invstd from the biased variances of `count` elements per channel, and the
// running-stat update when the running stats are defined.
template <typename acc_t>
void finalize_channels(const acc_t* mean, const acc_t* var, int64_t C, double count,
                       const at::Tensor& running_mean, const at::Tensor& running_var,
                       double momentum, double eps, acc_t* invstd) {
  for (int64_t c = 0; c < C; ++c) invstd[c] = inverse_std(var[c], acc_t(eps));
  if (!running_mean.defined()) return;
  // Running stats may be half/bfloat16 or strided.
  std::vector<acc_t> rm = cpu::channel_values<acc_t>(running_mean, C, 0);
  std::vector<acc_t> rv = cpu::channel_values<acc_t>(running_var, C, 0);
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) {
    rm[c] = running_update(rm[c], mean[c], acc_t(momentum));
    rv[c] = running_update(rv[c], unbiased_from_biased(var[c], acc_t(count)), acc_t(momentum));
  }
  cpu::store_channel_values<acc_t>(rm, running_mean);
  cpu::store_channel_values<acc_t>(rv, running_var);
}

}  // namespace

void CpuKernels::moments(const ChannelView& input, at::Tensor& mean, at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    acc_t* var_data = var.mutable_data_ptr<acc_t>();
    channel_moments<scalar_t>(input, mean_data, var_data);
  });
}

void CpuKernels::finalize(const at::Tensor& mean, const at::Tensor& var, double count,
                          const at::Tensor& running_mean, const at::Tensor& running_var,
                          double momentum, double eps, at::Tensor& invstd) {
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm", [&] {
    finalize_channels(mean.const_data_ptr<scalar_t>(), var.const_data_ptr<scalar_t>(),
                      mean.numel(), count, running_mean, running_var, momentum, eps,
                      invstd.mutable_data_ptr<scalar_t>());
  });
}

void CpuKernels::batch_stats(const ChannelView& input, const at::Tensor& running_mean,
                             const at::Tensor& running_var, double momentum, double eps,
                             at::Tensor& mean, at::Tensor& invstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* mean_data = mean.mutable_data_ptr<acc_t>();
    std::vector<acc_t> var(input.channels);
    channel_moments<scalar_t>(input, mean_data, var.data());
    finalize_channels(mean_data, var.data(), input.channels, static_cast<double>(input.count()),
                      running_mean, running_var, momentum, eps, invstd.mutable_data_ptr<acc_t>());
  });
}

void CpuKernels::running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                               double eps, at::Tensor& mean, at::Tensor& invstd) {
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "batch_norm", [&] {
    using acc_t = scalar_t;
    const int64_t C = mean.numel();
    const std::vector<acc_t> rm = cpu::channel_values<acc_t>(running_mean, C, 0);
    const std::vector<acc_t> rv = cpu::channel_values<acc_t>(running_var, C, 0);
    std::copy(rm.begin(), rm.end(), mean.mutable_data_ptr<acc_t>());
    acc_t* out = invstd.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) out[c] = inverse_std(rv[c], acc_t(eps));
  });
}

}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY
