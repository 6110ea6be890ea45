// Elementwise passes: normalize (1 read + 1 write) and the input gradient
// (2 reads + 1 write), with per-channel coefficients computed once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/math.h"

namespace normext::batch_norm {
namespace {

// Runs body(c, begin, end) on contiguous (N, C, L) segments or
// body_cl(first row, end row) on channels-last rows.
template <typename Contiguous, typename ChannelsLast>
void for_each_layout(const ChannelView& v, const Contiguous& body, const ChannelsLast& body_cl) {
  if (v.channels_last) {
    cpu::for_each_row_range(v, body_cl);
  } else {
    cpu::for_each_row_segment(v, body);
  }
}

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
    const std::vector<acc_t> shift = cpu::channel_values<acc_t>(bias, C, 0);
    const std::vector<acc_t> istd = cpu::channel_values<acc_t>(invstd, C, 0);
    for (int64_t c = 0; c < C; ++c) scale[c] *= istd[c];

    const scalar_t* __restrict__ x = input.data.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ y = output.mutable_data_ptr<scalar_t>();
    for_each_layout(
        input,
        [&](int64_t c, int64_t begin, int64_t end) {
          const acc_t mc = m[c], sc = scale[c], bc = shift[c];
NORMEXT_SIMD
          for (int64_t i = begin; i < end; ++i) {
            cpu::store(y, i, batch_norm::normalize(static_cast<acc_t>(x[i]), mc, sc, bc));
          }
        },
        [&](int64_t row_begin, int64_t row_end) {
          const acc_t* __restrict__ mp = m.data();
          const acc_t* __restrict__ sp = scale.data();
          const acc_t* __restrict__ bp = shift.data();
          for (int64_t r = row_begin; r < row_end; ++r) {
            const scalar_t* __restrict__ xr = x + r * C;
            scalar_t* __restrict__ yr = y + r * C;
NORMEXT_SIMD
            for (int64_t c = 0; c < C; ++c) {
              cpu::store(yr, c, batch_norm::normalize(static_cast<acc_t>(xr[c]), mp[c], sp[c], bp[c]));
            }
          }
        });
  });
}

void CpuKernels::backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                                const at::Tensor& mean, const at::Tensor& invstd,
                                const at::Tensor& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, double count, bool batch_stats,
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
    std::vector<acc_t> mean_dy(C), projection(C), scale(C);
    for (int64_t c = 0; c < C; ++c) {
      const auto terms =
          grad_input_terms(sdy[c], sdyx[c], istd[c], w[c], acc_t(count), batch_stats);
      mean_dy[c] = terms.mean_dy;
      projection[c] = terms.projection;
      scale[c] = terms.scale;
    }

    const scalar_t* __restrict__ dy = grad_out.data.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ x = input.data.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ dx = grad_input.mutable_data_ptr<scalar_t>();
    for_each_layout(
        input,
        [&](int64_t c, int64_t begin, int64_t end) {
          const GradInputTerms<acc_t> terms{mean_dy[c], projection[c], scale[c]};
          const acc_t mc = m[c];
NORMEXT_SIMD
          for (int64_t i = begin; i < end; ++i) {
            cpu::store(dx, i, batch_norm::grad_input(static_cast<acc_t>(dy[i]),
                                                     static_cast<acc_t>(x[i]), mc, terms));
          }
        },
        [&](int64_t row_begin, int64_t row_end) {
          const acc_t* __restrict__ mp = m.data();
          const acc_t* __restrict__ mdy = mean_dy.data();
          const acc_t* __restrict__ proj = projection.data();
          const acc_t* __restrict__ sp = scale.data();
          for (int64_t r = row_begin; r < row_end; ++r) {
NORMEXT_SIMD
            for (int64_t c = 0; c < C; ++c) {
              const GradInputTerms<acc_t> terms{mdy[c], proj[c], sp[c]};
              cpu::store(dx, r * C + c,
                         batch_norm::grad_input(static_cast<acc_t>(dy[r * C + c]),
                                                static_cast<acc_t>(x[r * C + c]), mp[c], terms));
            }
          }
        });
  });
}

}  // namespace normext::batch_norm
