// Elementwise passes: normalize (1 read + 1 write; also the input gradient
// under running statistics) and the input gradient under batch statistics
// (2 reads + 1 write), with per-channel coefficients computed once (math.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/math.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// y = normalize(x) over one run of a channel (contiguous layout).
template <typename scalar_t, typename acc_t>
void normalize_run(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t length,
                   acc_t mean, acc_t scale, acc_t bias) {
#pragma omp simd
  for (int64_t i = 0; i < length; ++i) {
    cpu::store(y, i, normalize(static_cast<acc_t>(x[i]), mean, scale, bias));
  }
}

// Rows channels-last rows, C apart.
template <int Rows, typename scalar_t, typename acc_t>
void normalize_rows(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t channels,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                    const acc_t* __restrict__ bias) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    for (int k = 0; k < Rows; ++k) {
      const int64_t i = k * channels + c;
      cpu::store(y, i, normalize(static_cast<acc_t>(x[i]), mean[c], scale[c], bias[c]));
    }
  }
}

template <typename scalar_t, typename acc_t>
void grad_input_run(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                    scalar_t* __restrict__ dx, int64_t length, acc_t mean,
                    const GradInputCoefficients<acc_t> k) {
#pragma omp simd
  for (int64_t i = 0; i < length; ++i) {
    cpu::store(dx, i, grad_input(static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]), mean, k));
  }
}

template <int Rows, typename scalar_t, typename acc_t>
void grad_input_rows(const scalar_t* __restrict__ dy, const scalar_t* __restrict__ x,
                     scalar_t* __restrict__ dx, int64_t channels, const acc_t* __restrict__ mean,
                     const acc_t* __restrict__ dy_scale, const acc_t* __restrict__ xmu_scale,
                     const acc_t* __restrict__ shift) {
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const GradInputCoefficients<acc_t> k{dy_scale[c], xmu_scale[c], shift[c]};
    for (int row = 0; row < Rows; ++row) {
      const int64_t i = row * channels + c;
      cpu::store(dx, i,
                 grad_input(static_cast<acc_t>(dy[i]), static_cast<acc_t>(x[i]), mean[c], k));
    }
  }
}

#if defined(NORMEXT_VECTORS16)
// float16 and bfloat16: whole vectors in registers (cpu::load_vector), math.h's
// formulas on them, and a partial vector for a tail. A run's coefficients are
// splatted once; rows load a vector of channels' coefficients once for all
// Rows rows. More specialized than the loops above, so chosen for these types.
// The coefficients are float (the 16-bit types' accumulate type, asserted).
static_assert(std::is_same_v<at::opmath_type<c10::Half>, float> &&
              std::is_same_v<at::opmath_type<c10::BFloat16>, float>);
using Vec = cpu::FloatVector;
constexpr int kLanes = cpu::kVectorLanes;
template <typename T>
using if_vector_element = std::enable_if_t<cpu::kVectorElement<T>, int>;

template <typename T, if_vector_element<T> = 0>
void normalize_run(const T* x, T* y, int64_t length, float mean, float scale, float bias) {
  const Vec m = cpu::splat(mean), s = cpu::splat(scale), b = cpu::splat(bias);
  int64_t i = 0;
  for (; i + kLanes <= length; i += kLanes) {
    cpu::store_vector(y + i, normalize(cpu::load_vector(x + i), m, s, b));
  }
  if (const int64_t n = length - i) {
    cpu::store_vector(y + i, normalize(cpu::load_vector(x + i, n), m, s, b), n);
  }
}

template <int Rows, typename T, if_vector_element<T> = 0>
void normalize_rows(const T* x, T* y, int64_t channels, const float* mean, const float* scale,
                    const float* bias) {
  for (int64_t c = 0; c < channels; c += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, channels - c);
    const bool whole = n == kLanes;
    const Vec m = cpu::load_floats(mean + c, n), s = cpu::load_floats(scale + c, n),
              b = cpu::load_floats(bias + c, n);
    for (int k = 0; k < Rows; ++k) {
      const int64_t i = k * channels + c;
      if (whole) {
        cpu::store_vector(y + i, normalize(cpu::load_vector(x + i), m, s, b));
      } else {
        cpu::store_vector(y + i, normalize(cpu::load_vector(x + i, n), m, s, b), n);
      }
    }
  }
}

template <typename T, if_vector_element<T> = 0>
void grad_input_run(const T* dy, const T* x, T* dx, int64_t length, float mean,
                    const GradInputCoefficients<float> k) {
  const Vec m = cpu::splat(mean);
  const GradInputCoefficients<Vec> kv{cpu::splat(k.dy_scale), cpu::splat(k.xmu_scale),
                                      cpu::splat(k.shift)};
  int64_t i = 0;
  for (; i + kLanes <= length; i += kLanes) {
    cpu::store_vector(dx + i,
                      grad_input(cpu::load_vector(dy + i), cpu::load_vector(x + i), m, kv));
  }
  if (const int64_t n = length - i) {
    cpu::store_vector(
        dx + i, grad_input(cpu::load_vector(dy + i, n), cpu::load_vector(x + i, n), m, kv), n);
  }
}

template <int Rows, typename T, if_vector_element<T> = 0>
void grad_input_rows(const T* dy, const T* x, T* dx, int64_t channels, const float* mean,
                     const float* dy_scale, const float* xmu_scale, const float* shift) {
  for (int64_t c = 0; c < channels; c += kLanes) {
    const int64_t n = std::min<int64_t>(kLanes, channels - c);
    const bool whole = n == kLanes;
    const Vec m = cpu::load_floats(mean + c, n);
    const GradInputCoefficients<Vec> kv{cpu::load_floats(dy_scale + c, n),
                                        cpu::load_floats(xmu_scale + c, n),
                                        cpu::load_floats(shift + c, n)};
    for (int row = 0; row < Rows; ++row) {
      const int64_t i = row * channels + c;
      if (whole) {
        cpu::store_vector(dx + i, grad_input(cpu::load_vector(dy + i),
                                             cpu::load_vector(x + i), m, kv));
      } else {
        cpu::store_vector(dx + i, grad_input(cpu::load_vector(dy + i, n),
                                             cpu::load_vector(x + i, n), m, kv), n);
      }
    }
  }
}
#endif

}  // namespace

void CpuKernels::normalize(const ChannelView& input, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& weight,
                           const at::Tensor& bias, at::Tensor& output) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = input.channels;
    const std::vector<acc_t> m = cpu::channel_values<acc_t>(mean, C, 0);
    std::vector<acc_t> scale = cpu::channel_values<acc_t>(weight, C, 1);
    const std::vector<acc_t> istd = cpu::channel_values<acc_t>(invstd, C, 0);
    const std::vector<acc_t> b = cpu::channel_values<acc_t>(bias, C, 0);
    for (int64_t c = 0; c < C; ++c) scale[c] *= istd[c];
    const auto* x = cpu::loop_data<scalar_t>(input.data);
    auto* y = cpu::mutable_loop_data<scalar_t>(output);
    if (input.channels_last) {
      const bool grouped = cpu::group_rows<acc_t>(C, 3);
      cpu::for_each_row_range(input, [&](int64_t begin, int64_t end) {
        cpu::for_each_row_group(begin, end, grouped, [&](int64_t r, auto rows) {
          normalize_rows<rows()>(x + r * C, y + r * C, C, m.data(), scale.data(), b.data());
        });
      });
    } else {
      cpu::for_each_row_segment(input, [&](int64_t c, int64_t begin, int64_t end) {
        normalize_run(x + begin, y + begin, end - begin, m[c], scale[c], b[c]);
      });
    }
  });
}

void CpuKernels::backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                                const at::Tensor& mean, const at::Tensor& invstd,
                                const at::Tensor& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, double count,
                                at::Tensor& grad_input) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = input.channels;
    const std::vector<acc_t> m = cpu::channel_values<acc_t>(mean, C, 0);
    const std::vector<acc_t> istd = cpu::channel_values<acc_t>(invstd, C, 0);
    const std::vector<acc_t> w = cpu::channel_values<acc_t>(weight, C, 1);
    const std::vector<acc_t> sdy = cpu::channel_values<acc_t>(sum_dy, C, 0);
    const std::vector<acc_t> sdyx = cpu::channel_values<acc_t>(sum_dy_xmu, C, 0);
    // Struct-of-arrays so the channels-last loop vectorizes across C.
    std::vector<acc_t> dy_scale(C), xmu_scale(C), shift(C);
    const acc_t inv_count = static_cast<acc_t>(1.0 / count);
    for (int64_t c = 0; c < C; ++c) {
      const auto k = grad_input_coefficients(sdy[c], sdyx[c], istd[c], w[c], inv_count);
      dy_scale[c] = k.dy_scale;
      xmu_scale[c] = k.xmu_scale;
      shift[c] = k.shift;
    }
    const auto* dy = cpu::loop_data<scalar_t>(grad_out.data);
    const auto* x = cpu::loop_data<scalar_t>(input.data);
    auto* dx = cpu::mutable_loop_data<scalar_t>(grad_input);
    if (input.channels_last) {
      const bool grouped = cpu::group_rows<acc_t>(C, 4);
      cpu::for_each_row_range(input, [&](int64_t begin, int64_t end) {
        cpu::for_each_row_group(begin, end, grouped, [&](int64_t r, auto rows) {
          grad_input_rows<rows()>(dy + r * C, x + r * C, dx + r * C, C, m.data(),
                                  dy_scale.data(), xmu_scale.data(), shift.data());
        });
      });
    } else {
      cpu::for_each_row_segment(input, [&](int64_t c, int64_t begin, int64_t end) {
        grad_input_run(dy + begin, x + begin, dx + begin, end - begin, m[c],
                       GradInputCoefficients<acc_t>{dy_scale[c], xmu_scale[c], shift[c]});
      });
    }
  });
}

}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY
