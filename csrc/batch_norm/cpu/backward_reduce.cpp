// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel in one read
// of x and dy; through a fusion, of dz and the centred input (math.h:
// pre_activation_grad), reading the residual too where there is one, and
// writing dz where it is the residual's gradient (then the input gradient's
// pass reads dz and x alone: 5R+2W for the backward instead of 6R+2W).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/math.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// The terms of the backward sums: dy and dy * (x - mean) per channel (kPlain),
// or dz and dz * (x - mean) through a fusion, from where kFrom says
// (fusion.h: GradFrom); kWritesDz: each element's dz stored in dz_out too
// (each element's terms are then taken once: no whole-vector tails).
template <bool kPlain, int kFrom, bool kResidual, class Act, bool kWritesDz, typename T,
          typename acc_t_>
struct GradSums {
  using acc_t = acc_t_;
  static constexpr int64_t kElementBytes = sizeof(T);
  static constexpr bool kPrefetch = false;
  static constexpr bool kLaneTerms = cpu::kWidensAsVector<T>;
  static constexpr bool kWholeTails = !kWritesDz;

  Act act;
  const T* dy;
  const T* saved;   // x, or y kFromOutput
  const T* output;  // y beside x (kFromInputAndOutput)
  const T* residual;
  const acc_t* mean;  // per channel, like the three below
  const acc_t* scale;
  const acc_t* bias;
  const acc_t* inv_scale;
  T* dz_out;

  // r: the residual's element, or (kFromInputAndOutput) the output's.
  void element_terms(int64_t c, acc_t g, acc_t s, acc_t r, acc_t& dz, acc_t& dz_xmu) const {
    acc_t xmu;
    if constexpr (kPlain) {
      dz = g;
      xmu = s - mean[c];
    } else if constexpr (kFrom == kFromOutput) {
      pre_activation_grad_of_output(act, g, s, r, inv_scale[c], bias[c], dz, xmu);
    } else if constexpr (kFrom == kFromInputAndOutput) {
      pre_activation_grad_with_output(act, g, s, r, mean[c], dz, xmu);
    } else {
      pre_activation_grad(act, g, s, r, mean[c], scale[c], bias[c], dz, xmu);
    }
    dz_xmu = dz * xmu;
  }
  void terms(int64_t c, int64_t offset, acc_t& dz, acc_t& dz_xmu) const {
    const acc_t r = kFrom == kFromInputAndOutput ? static_cast<acc_t>(output[offset])
                    : kResidual                         ? static_cast<acc_t>(residual[offset])
                                                        : acc_t(0);
    element_terms(c, static_cast<acc_t>(dy[offset]), static_cast<acc_t>(saved[offset]), r, dz,
                  dz_xmu);
    if constexpr (kWritesDz) cpu::store(dz_out, offset, dz);
  }
  template <int kGroupStep>
  void lane_terms(int64_t c, int64_t offset, acc_t (&dz)[cpu::kLanes],
                  acc_t (&dz_xmu)[cpu::kLanes]) const {
    acc_t g[cpu::kLanes], s[cpu::kLanes], r[cpu::kLanes] = {};
    cpu::widen(dy + offset, g);
    cpu::widen(saved + offset, s);
    if constexpr (kFrom == kFromInputAndOutput) {
      cpu::widen(output + offset, r);
    } else if constexpr (kResidual) {
      cpu::widen(residual + offset, r);
    }
#pragma omp simd
    for (int k = 0; k < cpu::kLanes; ++k) {
      element_terms(c + k * kGroupStep, g[k], s[k], r[k], dz[k], dz_xmu[k]);
    }
    if constexpr (kWritesDz) cpu::narrow_n(dz, dz_out + offset, cpu::kLanes);
  }
  // Channels-last rows in groups at every width, as the statistics take
  // them: the per-row accumulator loads and stores bound the loop otherwise
  // (benchmarks/history, session 30). Writing dz, only where the accumulators
  // outgrow L1: grouped rows that also write were slower (RESULTS.md, session 33).
  bool group_rows(int64_t groups) const {
    return !kWritesDz || cpu::group_rows<acc_t>(groups, cpu::kTerms);
  }
};

}  // namespace

void CpuKernels::backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                                 at::Tensor& grad_weight, at::Tensor& grad_bias,
                                 const FusedGrad& fused) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using T = cpu::loop_t<scalar_t>;
    const int64_t C = input.channels;
    const std::vector<acc_t> m = cpu::channel_values<acc_t>(mean, C, 0);
    const std::vector<acc_t> istd = cpu::channel_values<acc_t>(invstd, C, 0);
    std::vector<acc_t> scale, b, inv_scale;
    if (!fused.fusion.plain() || fused.from_output) {
      scale = cpu::channel_values<acc_t>(fused.weight, C, 1);
      for (int64_t c = 0; c < C; ++c) scale[c] *= istd[c];
      b = cpu::channel_values<acc_t>(fused.bias, C, 0);
      inv_scale = cpu::reciprocals(scale);
    }
    const T* dy = cpu::loop_data<scalar_t>(grad_out.data);
    const T* x = cpu::loop_data<scalar_t>(input.data);
    const T* r = cpu::loop_data_or_null<scalar_t>(fused.fusion.residual);
    const T* y = cpu::loop_data_or_null<scalar_t>(fused.output);
    at::Tensor grad_residual = fused.grad_residual;  // (a handle: writes go to the caller's)
    T* dz = grad_residual.defined() ? cpu::mutable_loop_data<scalar_t>(grad_residual) : nullptr;
    std::vector<double> sums;
    with_grad_source<acc_t>(fused, [&](auto act, auto plain, auto from, auto residual) {
      const auto reduce = [&](auto writes_dz) {
        sums = cpu::reduce_groups(
            cpu::groups_of(input),
            GradSums<plain(), from(), residual(), decltype(act), writes_dz(), T, acc_t>{
                act, dy, x, y, r, m.data(), scale.data(), b.data(), inv_scale.data(), dz});
      };
      // (From the output alone the input gradient's pass needs the output anyway.)
      constexpr bool kWritesDz =
          from() == kFromInputAndOutput || (from() == kFromInput && residual());
      if constexpr (kWritesDz) {
        if (dz) return reduce(std::true_type{});
      }
      // (ops.h reads dz from grad_residual whenever it is defined, but from the output.)
      TORCH_INTERNAL_ASSERT(!dz || fused.from_output, "batch_norm_backward: dz not written");
      reduce(std::false_type{});
    });
    acc_t* s = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* sx = sum_dy_xmu.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) {
      s[c] = static_cast<acc_t>(sums[c]);
      sx[c] = static_cast<acc_t>(sums[C + c]);
    }
    std::vector<acc_t> grad_w = istd;
    for (int64_t c = 0; c < C; ++c) grad_w[c] *= sx[c];
    cpu::store_channel_values<acc_t>(grad_w, grad_weight);
    cpu::store_channel_values<acc_t>({s, static_cast<size_t>(C)}, grad_bias);
  });
}

}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY
