// Backward reduction: sum(dy) and sum(dy * (x - mean)) per channel in one read
// of x and dy.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cpu/kernels.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// The terms of the backward sums: dy and dy * (x - mean) per channel.
template <typename T, typename acc_t_>
struct GradSums {
  using acc_t = acc_t_;
  static constexpr int64_t kElementBytes = sizeof(T);
  static constexpr bool kPrefetch = false;
  static constexpr bool kLaneTerms = cpu::kWidensAsVector<T>;

  const T* dy;
  const T* x;
  const acc_t* mean;  // per channel

  void terms(int64_t c, int64_t offset, acc_t& g, acc_t& g_xmu) const {
    g = static_cast<acc_t>(dy[offset]);
    g_xmu = g * (static_cast<acc_t>(x[offset]) - mean[c]);
  }
  template <int kGroupStep>
  void lane_terms(int64_t c, int64_t offset, acc_t (&g)[cpu::kLanes],
                  acc_t (&g_xmu)[cpu::kLanes]) const {
    acc_t xs[cpu::kLanes];
    cpu::widen(dy + offset, g);
    cpu::widen(x + offset, xs);
#pragma omp simd
    for (int k = 0; k < cpu::kLanes; ++k) g_xmu[k] = g[k] * (xs[k] - mean[c + k * kGroupStep]);
  }
  // Channels-last rows in groups where the per-channel arrays spill from L1,
  // and for short rows, whose per-row loop overhead dominates.
  bool group_rows(int64_t channels) const {
    return cpu::group_rows<acc_t>(channels, 3) || channels * kElementBytes <= 256;
  }
};

}  // namespace

void CpuKernels::backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                                 const at::Tensor& mean, const at::Tensor& invstd,
                                 at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                                 at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t C = input.channels;
    const std::vector<acc_t> m = cpu::channel_values<acc_t>(mean, C, 0);
    acc_t* s = sum_dy.mutable_data_ptr<acc_t>();
    acc_t* sx = sum_dy_xmu.mutable_data_ptr<acc_t>();
    const std::vector<double> sums = cpu::reduce_groups(
        cpu::groups_of(input), GradSums<cpu::loop_t<scalar_t>, acc_t>{
                               cpu::loop_data<scalar_t>(grad_out.data),
                               cpu::loop_data<scalar_t>(input.data), m.data()});
    for (int64_t c = 0; c < C; ++c) {
      s[c] = static_cast<acc_t>(sums[c]);
      sx[c] = static_cast<acc_t>(sums[C + c]);
    }
    std::vector<acc_t> grad_w = cpu::channel_values<acc_t>(invstd, C, 0);
    for (int64_t c = 0; c < C; ++c) grad_w[c] *= sx[c];
    cpu::store_channel_values<acc_t>(grad_w, grad_weight);
    cpu::store_channel_values<acc_t>({s, static_cast<size_t>(C)}, grad_bias);
  });
}

}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY
