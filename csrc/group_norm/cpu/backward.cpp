// Backward: dz = dy * act'(z), z the activation's input recomputed from x;
// per (sample, channel), sum(dz) and sum(dz * (x - mean)) in one read of dy
// and x; each group's sums of g = dz * weight and g * (x - mean) from those;
// then the input gradient (common/math.h: grad_input_coefficients, with the
// group as the set reduced). Contiguous data: the group's run is written
// while it is in cache (2 reads + 1 write), dz computed once per element.
// Channels-last, per sample: the sums through the shared reducer, then a
// pass over its rows while they are in cache; through an activation, the
// sample's dz first (kept in a buffer where it fits, so dz is computed once).
// The parameter gradients add the (sample, channel) sums in double in sample
// order: the same at any thread count.
#include <type_traits>

#include "group_norm/cpu/kernels.h"

namespace normext::group_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// The largest channels-last sample whose dz (acc_t) a backward through an
// activation keeps, to compute the derivative once, not in both passes; past
// it the buffer's memory traffic costs more than the second derivative
// (an A/B on this project's CPU: benchmarks/history, session 18).
constexpr int64_t kSampleDzBytes = int64_t(4) << 20;

// The terms of a (sample, channel)'s backward sums: dz and dz * (x - mean),
// dz = dy * act'(z) from dy of type TDy (with the identity, dz itself).
template <typename TDy, typename T, typename acc_t_, class Act>
struct ChannelGradSums {
  using acc_t = acc_t_;
  static constexpr int64_t kElementBytes = sizeof(T);
  static constexpr bool kPrefetch = false;
  // float16 and bfloat16 widen as whole vectors (vec16.h).
  static constexpr bool kLaneTerms = cpu::kWidensAsVector<TDy> && cpu::kWidensAsVector<T>;
  // Its sums go through reduce_run (a dz buffer of one group) and channels-last
  // rows, which take no whole tails.
  static constexpr bool kWholeTails = false;

  Act act;
  const TDy* dy;
  const T* x;
  // Per reducer group (a sample's channel): the group's mean, the affine's
  // scale (rstd * weight) and bias, which give the activation's input z.
  const acc_t* mean;
  const acc_t* scale;
  const acc_t* bias;

  void element_terms(int64_t g, acc_t dy_value, acc_t x_value, acc_t& dz, acc_t& dz_xmu) const {
    const acc_t xmu = x_value - mean[g];
    dz = dy_value * act.grad(xmu * scale[g] + bias[g]);
    dz_xmu = dz * xmu;
  }
  void terms(int64_t g, int64_t offset, acc_t& dz, acc_t& dz_xmu) const {
    element_terms(g, static_cast<acc_t>(dy[offset]), static_cast<acc_t>(x[offset]), dz, dz_xmu);
  }
  template <int kGroupStep>
  void lane_terms(int64_t g, int64_t offset, acc_t (&dz)[cpu::kLanes],
                  acc_t (&dz_xmu)[cpu::kLanes]) const {
    acc_t dy_values[cpu::kLanes], x_values[cpu::kLanes];
    cpu::widen(dy + offset, dy_values);
    cpu::widen(x + offset, x_values);
#pragma omp simd
    for (int k = 0; k < cpu::kLanes; ++k) {
      element_terms(g + k * kGroupStep, dy_values[k], x_values[k], dz[k], dz_xmu[k]);
    }
  }
  bool group_rows(int64_t) const { return true; }
};

// The loops through the activation take it by value, outside any lambda
// (forward.cpp: GCC vectorizes them only so).

// dz = dy * act'((x - mean) * scale + bias) over a contiguous channel run.
// float16 through float tiles here and below (loops.h: for_each_tile).
template <class Act, typename T, typename acc_t>
void pre_activation_grad_run(const Act act, const T* __restrict__ dy, const T* __restrict__ x,
                             acc_t* __restrict__ dz, int64_t length, acc_t mean, acc_t scale,
                             acc_t bias) {
#if defined(NORMEXT_VECTOR_SILU)
  if constexpr (std::is_same_v<Act, cpu::SiluFn<float>>) {
    cpu::silu_affine_grad(dy, x, dz, length, mean, scale, bias);
  } else
#endif
  if constexpr (std::is_same_v<T, cpu::Float16>) {
    cpu::for_each_tile_pair(dy, x, length, [&](const float* dys, const float* xs, int64_t i,
                                               int64_t n) {
      pre_activation_grad_run(act, dys, xs, dz + i, n, mean, scale, bias);
    });
  } else {
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      dz[i] = static_cast<acc_t>(dy[i]) *
              act.grad((static_cast<acc_t>(x[i]) - mean) * scale + bias);
    }
  }
}

// dx = dz * dy_scale + (x - mean) * xmu_scale + shift over a contiguous run.
template <typename TDz, typename T, typename acc_t>
void grad_input_run(const TDz* __restrict__ dz, const T* __restrict__ x, T* __restrict__ dx,
                    int64_t length, acc_t mean, const cpu::GradInputCoefficients<acc_t> k) {
#if defined(NORMEXT_VECTORS16)
  if constexpr (cpu::kNarrowsAsVector<T>) {
    cpu::plain_grad_input_run(dz, x, dx, length, mean, k);
  } else
#endif
  if constexpr (std::is_same_v<T, cpu::Float16>) {
    float dz_tile[cpu::kStageElements];
    cpu::for_each_tile(x, dx, length, [&](const float* xs, float* dxs, int64_t i, int64_t n) {
      if constexpr (std::is_same_v<TDz, float>) {
        grad_input_run(dz + i, xs, dxs, n, mean, k);
      } else {
        cpu::widen_n(dz + i, dz_tile, n);
        grad_input_run(static_cast<const float*>(dz_tile), xs, dxs, n, mean, k);
      }
    });
  } else {
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      cpu::store(dx, i, cpu::grad_input(static_cast<acc_t>(dz[i]), static_cast<acc_t>(x[i]),
                                        mean, k));
    }
  }
}

// dz = dy * act'((x - mean) * scale + bias) over a channels-last row.
template <class Act, typename T, typename acc_t>
void pre_activation_grad_row(const Act act, const T* __restrict__ dy, const T* __restrict__ x,
                             acc_t* __restrict__ dz, int64_t channels,
                             const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                             const acc_t* __restrict__ bias) {
#if defined(NORMEXT_VECTOR_SILU)
  if constexpr (std::is_same_v<Act, cpu::SiluFn<float>>) {
    cpu::silu_affine_grad(dy, x, dz, channels, mean, scale, bias);
  } else
#endif
  if constexpr (std::is_same_v<T, cpu::Float16>) {
    cpu::for_each_tile_pair(dy, x, channels, [&](const float* dys, const float* xs, int64_t c0,
                                                 int64_t n) {
      pre_activation_grad_row(act, dys, xs, dz + c0, n, mean + c0, scale + c0, bias + c0);
    });
  } else {
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      dz[c] = static_cast<acc_t>(dy[c]) *
              act.grad((static_cast<acc_t>(x[c]) - mean[c]) * scale[c] + bias[c]);
    }
  }
}

// The input gradient over a channels-last row from dy of type TDy (dz
// through act, as above; dz itself with the identity) and the per-channel
// coefficients dx = dz * dy_scale + (x - mean) * xmu_scale + shift.
template <class Act, typename TDy, typename T, typename acc_t>
void grad_input_row(const Act act, const TDy* __restrict__ dy, const T* __restrict__ x,
                    T* __restrict__ dx, int64_t channels, const acc_t* __restrict__ mean,
                    const acc_t* __restrict__ scale, const acc_t* __restrict__ bias,
                    const acc_t* __restrict__ dy_scale, const acc_t* __restrict__ xmu_scale,
                    const acc_t* __restrict__ shift) {
#if defined(NORMEXT_VECTORS16)
  if constexpr (std::is_same_v<T, cpu::Float16> && Act::kKind == Activation::kIdentity) {
    cpu::plain_grad_input_rows<1>(dy, x, dx, channels, mean, dy_scale, xmu_scale, shift);
  } else
#endif
  if constexpr (std::is_same_v<T, cpu::Float16>) {
    float dy_tile[cpu::kStageElements];
    cpu::for_each_tile(x, dx, channels, [&](const float* xs, float* dxs, int64_t c0, int64_t n) {
      const float* dys = dy_tile;
      if constexpr (std::is_same_v<TDy, float>) {
        dys = dy + c0;
      } else {
        cpu::widen_n(dy + c0, dy_tile, n);
      }
      grad_input_row(act, dys, xs, dxs, n, mean + c0, scale + c0, bias + c0, dy_scale + c0,
                     xmu_scale + c0, shift + c0);
    });
  } else {
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      const acc_t xmu = static_cast<acc_t>(x[c]) - mean[c];
      const acc_t dz = static_cast<acc_t>(dy[c]) * act.grad(xmu * scale[c] + bias[c]);
      cpu::store(dx, c,
                 cpu::grad_input_centred(dz, xmu, {dy_scale[c], xmu_scale[c], shift[c]}));
    }
  }
}

template <typename scalar_t, class Act>
void backward_groups(const ChannelView& grad_out, const ChannelView& v, int64_t groups,
                     const at::Tensor& mean_in, const at::Tensor& rstd_in,
                     const at::Tensor& weight, const at::Tensor& bias, const Act act,
                     at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  using T = cpu::loop_t<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  const cpu::GroupShape s = cpu::shape_of(v, groups);
  const int64_t N = s.N, C = s.C, L = s.L, G = s.G, Cg = s.channels_per_group(), D = s.count();
  const T* x = cpu::loop_data<scalar_t>(v.data);
  const T* dy = cpu::loop_data<scalar_t>(grad_out.data);
  T* dx = grad_input.defined() ? cpu::mutable_loop_data<scalar_t>(grad_input) : nullptr;
  const acc_t* rstd = rstd_in.const_data_ptr<acc_t>();
  const std::vector<acc_t> w = cpu::channel_values<acc_t>(weight, C, 1);
  const std::vector<acc_t> b = cpu::channel_values<acc_t>(bias, C, 0);
  // Per (sample, channel): the group's mean, and the affine's scale and bias.
  const std::vector<acc_t> mean_c = cpu::per_channel(s, mean_in.const_data_ptr<acc_t>());
  std::vector<acc_t> scale_c, bias_c;
  cpu::channel_affine(s, rstd, w, b, scale_c, bias_c);
  // Per (sample, channel): sum(dz), sum(dz * (x - mean)).
  std::vector<double> sum_dz(N * C), sum_dz_xmu(N * C);
  // The input gradient's coefficients of a (sample, group), from its channels' sums.
  const auto coefficients = [&](int64_t r) {
    double sum_g = 0, sum_g_xmu = 0;
    const acc_t* w_group = w.data() + r % G * Cg;
    for (int64_t j = 0; j < Cg; ++j) {
      sum_g += w_group[j] * sum_dz[r * Cg + j];
      sum_g_xmu += w_group[j] * sum_dz_xmu[r * Cg + j];
    }
    return cpu::grad_input_coefficients(static_cast<acc_t>(sum_g), static_cast<acc_t>(sum_g_xmu),
                                        rstd[r], acc_t(1),
                                        static_cast<acc_t>(1.0 / static_cast<double>(D)));
  };
  if (s.runs) {
    // A group's run in cache: its dz computed once (an activation's
    // derivative costs more than the memory traffic; the identity's dz is
    // dy), then its channels' sums and the input gradient from dz.
    constexpr bool kIdentity = Act::kKind == Activation::kIdentity;
    at::parallel_for(0, N * G, cpu::grain_for(2 * D), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> dz_buffer(kIdentity ? 0 : D);
      for (int64_t r = begin; r < end; ++r) {
        const T* x_run = x + r * D;
        const int64_t nc0 = r * Cg;  // the run's first (sample, channel)
        const auto from_dz = [&](const auto* dz) {
          using TDz = std::remove_cv_t<std::remove_pointer_t<decltype(dz)>>;
          const ChannelGradSums<TDz, T, acc_t, cpu::IdentityFn<acc_t>> sums_op{
              {}, dz, x_run, mean_c.data() + nc0, scale_c.data() + nc0, bias_c.data() + nc0};
          for (int64_t j = 0; j < Cg; ++j) {
            double sums[cpu::kTerms];
            cpu::reduce_run(sums_op, j, L, sums);
            sum_dz[nc0 + j] = sums[0];
            sum_dz_xmu[nc0 + j] = sums[1];
          }
          if (!dx) return;
          const auto k = coefficients(r);
          for (int64_t j = 0; j < Cg; ++j) {
            grad_input_run(dz + j * L, x_run + j * L, dx + r * D + j * L, L, mean_c[nc0 + j],
                           {w[r % G * Cg + j] * k.dy_scale, k.xmu_scale, k.shift});
          }
        };
        if constexpr (kIdentity) {
          from_dz(dy + r * D);
        } else {
          for (int64_t j = 0; j < Cg; ++j) {
            pre_activation_grad_run(act, dy + r * D + j * L, x_run + j * L,
                                    dz_buffer.data() + j * L, L, mean_c[nc0 + j],
                                    scale_c[nc0 + j], bias_c[nc0 + j]);
          }
          from_dz(dz_buffer.data());
        }
      }
    });
  } else {
    // Every branch below takes a sample at a time: its sums, then its rows'
    // dx while they are in cache.
    const auto sample_sums = [&](int64_t n, const auto& op) {
      const std::vector<double> sums = cpu::reduce_groups(cpu::GroupedShape{L, C, 1}, op);
      std::copy_n(sums.begin(), C, sum_dz.begin() + n * C);
      std::copy_n(sums.begin() + C, C, sum_dz_xmu.begin() + n * C);
    };
    // Sample n's dx from its rows of dy through row_act (dz with the identity).
    const auto sample_grad_input = [&](int64_t n, const auto row_act, const auto* dy_rows) {
      const int64_t nc = n * C;
      std::vector<acc_t> dy_scale(C), xmu_scale(C), shift(C);
      for (int64_t r = n * G; r < (n + 1) * G; ++r) {
        const auto k = coefficients(r);
        for (int64_t c = r % G * Cg; c < (r % G + 1) * Cg; ++c) {
          dy_scale[c] = w[c] * k.dy_scale;
          xmu_scale[c] = k.xmu_scale;
          shift[c] = k.shift;
        }
      }
      at::parallel_for(0, L, cpu::grain_for(C), [&](int64_t begin, int64_t end) {
        for (int64_t l = begin; l < end; ++l) {
          const int64_t row = (n * L + l) * C;
          grad_input_row(row_act, dy_rows + l * C, x + row, dx + row, C, mean_c.data() + nc,
                         scale_c.data() + nc, bias_c.data() + nc, dy_scale.data(),
                         xmu_scale.data(), shift.data());
        }
      });
    };
    if (Act::kKind != Activation::kIdentity &&
        L * C * static_cast<int64_t>(sizeof(acc_t)) <= kSampleDzBytes) {
      // Through an activation, a sample's dz fits in cache: computed once,
      // as in the runs above, then the sample's sums and its rows' dx from it.
      cpu::for_each_sample(N, [&](int64_t n) {
        const int64_t nc = n * C;
        std::vector<acc_t> dz(L * C);
        at::parallel_for(0, L, cpu::grain_for(C), [&](int64_t begin, int64_t end) {
          for (int64_t l = begin; l < end; ++l) {
            const int64_t row = (n * L + l) * C;
            pre_activation_grad_row(act, dy + row, x + row, dz.data() + l * C, C,
                                    mean_c.data() + nc, scale_c.data() + nc, bias_c.data() + nc);
          }
        });
        sample_sums(n, ChannelGradSums<acc_t, T, acc_t, cpu::IdentityFn<acc_t>>{
                           {}, dz.data(), x + nc * L, mean_c.data() + nc, scale_c.data() + nc,
                           bias_c.data() + nc});
        if (dx) {
          sample_grad_input(n, cpu::IdentityFn<acc_t>{}, static_cast<const acc_t*>(dz.data()));
        }
      });
    } else {
      cpu::for_each_sample(N, [&](int64_t n) {
        const int64_t nc = n * C;
        sample_sums(n, ChannelGradSums<T, T, acc_t, Act>{act, dy + nc * L, x + nc * L,
                                                          mean_c.data() + nc,
                                                          scale_c.data() + nc, bias_c.data() + nc});
        if (dx) sample_grad_input(n, act, dy + nc * L);
      });
    }
  }
  if (!grad_weight.defined() && !grad_bias.defined()) return;
  std::vector<acc_t> grad_w(C), grad_b(C);
  for (int64_t c = 0; c < C; ++c) {
    double total_w = 0, total_b = 0;
    const int64_t group = c / Cg;
    for (int64_t n = 0; n < N; ++n) {
      total_w += sum_dz_xmu[n * C + c] * static_cast<double>(rstd[n * G + group]);
      total_b += sum_dz[n * C + c];
    }
    grad_w[c] = static_cast<acc_t>(total_w);
    grad_b[c] = static_cast<acc_t>(total_b);
  }
  if (grad_weight.defined()) cpu::store_channel_values<acc_t>(grad_w, grad_weight);
  if (grad_bias.defined()) cpu::store_channel_values<acc_t>(grad_b, grad_bias);
}

}  // namespace

void CpuKernels::backward(const ChannelView& grad_out, const ChannelView& input, int64_t groups,
                          const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                          const at::Tensor& bias, const ActivationSpec& activation,
                          at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "group_norm_backward", [&] {
    cpu::with_activation<at::opmath_type<scalar_t>>(activation, [&](auto act) {
      backward_groups<scalar_t>(grad_out, input, groups, mean, rstd, weight, bias, act,
                                grad_input, grad_weight, grad_bias);
    });
  });
}

}  // namespace normext::group_norm::NORMEXT_CPU_CAPABILITY
