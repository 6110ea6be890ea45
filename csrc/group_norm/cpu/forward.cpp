// Forward: per (sample, group), statistics from sums of deviations from a
// shift (contiguous: from the first pass where that is exact enough, else
// its mean as the shift, or sample_shift's for runs over 256 KiB,
// common/cpu/run_shift.h; channels-last: the median of a sample of the
// group, common/math.h) and the affine per channel, through
// the activation (common/activation.h). Contiguous data: the group's run is
// written while it is in cache (1 read + 1 write).
// Channels-last: per sample, statistics through the shared reducer, then the
// affine over its rows, while they are in cache where the sample fits (2
// reads, the second from cache there, + 1 write).
#include "group_norm/cpu/kernels.h"

namespace normext::group_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// The output loops take the activation by value, outside any lambda: GCC
// vectorizes an omp simd loop over a parameterized functor (leaky_relu's
// slope) only as a function parameter, not through a closure's reference.

// y = act((x - mean) * scale + bias) over a contiguous channel run. 16-bit
// data without an activation through whole vectors (normalize16.h) where
// they convert as vectors (vec16.h: kNarrowsAsVector); float16 through an
// activation through float tiles (loops.h: for_each_tile): its scalar
// conversion does not vectorize; bfloat16's does.
template <class Act, typename T, typename acc_t>
void normalize_run(const Act act, const T* __restrict__ x, T* __restrict__ y, int64_t length,
                   acc_t mean, acc_t scale, acc_t bias) {
#if defined(NORMEXT_VECTORS16)
  if constexpr (cpu::kNarrowsAsVector<T> && Act::kKind == Activation::kIdentity) {
    return cpu::plain_normalize_run(x, y, length, mean, scale, bias);
  } else
#endif
#if defined(NORMEXT_VECTOR_SILU)
  if constexpr (std::is_same_v<Act, cpu::SiluFn<float>>) {
    // 16-bit data through float tiles: faster than converting in its loop (A/B)
    if constexpr (std::is_same_v<T, float>) {
      return cpu::silu_affine(x, y, length, mean, scale, bias);
    } else {
      return cpu::for_each_tile(x, y, length, [&](const float* xs, float* ys, int64_t,
                                                  int64_t n) {
        cpu::silu_affine(xs, ys, n, mean, scale, bias);
      });
    }
  } else
#endif
  if constexpr (std::is_same_v<T, cpu::Float16>) {
    return cpu::for_each_tile(x, y, length, [&](const float* xs, float* ys, int64_t, int64_t n) {
      normalize_run(act, xs, ys, n, mean, scale, bias);
    });
  } else {
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      cpu::store(y, i, act(cpu::normalize(static_cast<acc_t>(x[i]), mean, scale, bias)));
    }
  }
}

// The same over a channels-last row, with per-channel values. bfloat16 rows
// take the scalar loop: vectors a row at a time were no faster (A/B, history).
template <class Act, typename T, typename acc_t>
void normalize_row(const Act act, const T* __restrict__ x, T* __restrict__ y, int64_t channels,
                   const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                   const acc_t* __restrict__ bias) {
#if defined(NORMEXT_VECTORS16)
  if constexpr (std::is_same_v<T, cpu::Float16> && Act::kKind == Activation::kIdentity) {
    return cpu::plain_normalize_rows<1>(x, y, channels, mean, scale, bias);
  } else
#endif
#if defined(NORMEXT_VECTOR_SILU)
  if constexpr (std::is_same_v<Act, cpu::SiluFn<float>>) {
    if constexpr (std::is_same_v<T, float>) {
      return cpu::silu_affine(x, y, channels, mean, scale, bias);
    } else {
      return cpu::for_each_tile(x, y, channels, [&](const float* xs, float* ys, int64_t c0,
                                                    int64_t n) {
        cpu::silu_affine(xs, ys, n, mean + c0, scale + c0, bias + c0);
      });
    }
  } else
#endif
  if constexpr (std::is_same_v<T, cpu::Float16>) {
    return cpu::for_each_tile(x, y, channels, [&](const float* xs, float* ys, int64_t c0,
                                                  int64_t n) {
      normalize_row(act, xs, ys, n, mean + c0, scale + c0, bias + c0);
    });
  } else {
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      cpu::store(y, c,
                 act(cpu::normalize(static_cast<acc_t>(x[c]), mean[c], scale[c], bias[c])));
    }
  }
}

// The largest channels-last sample normalized right after its statistics,
// its rows then read from cache; past it the output's writes push them out
// first (A/B on this project's CPU, 2 MiB of L2 per core: 1 MiB samples
// gained, 2 MiB ones lost; benchmarks/history, session 19).
constexpr int64_t kCachedSampleBytes = int64_t(1) << 20;

template <typename scalar_t, class Act>
void forward_groups(const ChannelView& v, int64_t groups, const at::Tensor& weight,
                    const at::Tensor& bias, double eps, const Act act, at::Tensor& output,
                    at::Tensor& mean_out, at::Tensor& rstd_out) {
  using T = cpu::loop_t<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  const cpu::GroupShape s = cpu::shape_of(v, groups);
  const int64_t N = s.N, C = s.C, L = s.L, G = s.G, Cg = s.channels_per_group(), D = s.count();
  const T* x = cpu::loop_data<scalar_t>(v.data);
  T* y = cpu::mutable_loop_data<scalar_t>(output);
  const std::vector<acc_t> w = cpu::channel_values<acc_t>(weight, C, 1);
  const std::vector<acc_t> b = cpu::channel_values<acc_t>(bias, C, 0);
  acc_t* mean = mean_out.mutable_data_ptr<acc_t>();
  acc_t* rstd = rstd_out.mutable_data_ptr<acc_t>();
  // The shift as a value acc_t holds exactly, so the deviations and the mean use one value.
  std::vector<acc_t> shift(N * G);
  const auto set_statistics = [&](int64_t r, double m, double m2) {
    mean[r] = static_cast<acc_t>(m);
    rstd[r] = cpu::inverse_std(static_cast<acc_t>(m2 / D), static_cast<acc_t>(eps));
  };
  const auto set_moments = [&](int64_t r, double sum_d, double sum_d2) {
    double m, m2;
    cpu::shifted_moments(static_cast<double>(shift[r]), sum_d, sum_d2, static_cast<double>(D), m,
                         m2);
    set_statistics(r, m, m2);
  };
  if (s.runs) {
    at::parallel_for(0, N * G, cpu::grain_for(D), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* run = x + r * D;
        double m, m2;
        cpu::run_moments<acc_t>(run, D, m, m2);
        set_statistics(r, m, m2);
        for (int64_t j = 0; j < Cg; ++j) {
          const int64_t c = r % G * Cg + j;
          normalize_run(act, run + j * L, y + r * D + j * L, L, mean[r], rstd[r] * w[c], b[c]);
        }
      }
    });
    return;
  }
  // Channels-last: every channel of a group deviates from the group's shift,
  // so the channels' sums add up to the group's. A sample that fits in cache
  // is normalized right after its statistics, while its rows are there.
  const bool sample_in_cache = L * C * static_cast<int64_t>(sizeof(T)) <= kCachedSampleBytes;
  std::vector<acc_t> mean_c(N * C), scale_c(N * C);
  // Output rows [begin, end) of the (N * L, C) rows.
  const auto normalize_rows = [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t nc = row / L * C;
      normalize_row(act, x + row * C, y + row * C, C, mean_c.data() + nc, scale_c.data() + nc,
                    b.data());
    }
  };
  cpu::for_each_sample(N, [&](int64_t n) {
    const T* sample = x + n * L * C;
    for (int64_t g = 0; g < G; ++g) {
      shift[n * G + g] = cpu::sample_shift<acc_t>(D, [&](int64_t j) {
        return static_cast<double>(sample[j / Cg * C + g * Cg + j % Cg]);
      });
    }
    std::vector<acc_t> channel_shift(C);
    for (int64_t g = 0; g < G; ++g) {
      std::fill_n(channel_shift.begin() + g * Cg, Cg, shift[n * G + g]);
    }
    const std::vector<double> sums = cpu::reduce_groups(
        cpu::GroupedShape{L, C, 1}, cpu::ShiftedSums<T, acc_t>{sample, channel_shift.data()});
    for (int64_t g = 0; g < G; ++g) {
      double sum_d = 0, sum_d2 = 0;
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        sum_d += sums[c];
        sum_d2 += sums[C + c];
      }
      set_moments(n * G + g, sum_d, sum_d2);
    }
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t c = g * Cg; c < (g + 1) * Cg; ++c) {
        mean_c[n * C + c] = mean[n * G + g];
        scale_c[n * C + c] = rstd[n * G + g] * w[c];
      }
    }
    if (sample_in_cache) {
      at::parallel_for(n * L, (n + 1) * L, cpu::grain_for(C), normalize_rows);
    }
  });
  if (!sample_in_cache) at::parallel_for(0, N * L, cpu::grain_for(C), normalize_rows);
}

}  // namespace

void CpuKernels::forward(const ChannelView& input, int64_t groups, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, const ActivationSpec& activation,
                         at::Tensor& output, at::Tensor& mean, at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "group_norm", [&] {
    cpu::with_activation<at::opmath_type<scalar_t>>(activation, [&](auto act) {
      forward_groups<scalar_t>(input, groups, weight, bias, eps, act, output, mean, rstd);
    });
  });
}

}  // namespace normext::group_norm::NORMEXT_CPU_CAPABILITY
