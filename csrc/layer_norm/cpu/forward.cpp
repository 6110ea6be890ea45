// Forward: per row, statistics from a first pass, or from sums of deviations
// from a shift after it (common/cpu/run_shift.h, common/math.h:
// shifted_moments; RMSNorm sums squares) and the affine pass over the row
// while it is in cache: 1R+1W from memory. With a residual the row is first
// summed into `sum`, which the statistics and the affine then read from
// cache: 2R+2W in all.
#include "layer_norm/cpu/kernels.h"

namespace normext::layer_norm::NORMEXT_CPU_CAPABILITY {
namespace {

template <typename scalar_t>
void forward_rows(const Rows& v, const at::Tensor& residual, const at::Tensor& weight,
                  const at::Tensor& bias, double eps, bool rms, at::Tensor& output,
                  at::Tensor& sum, at::Tensor& mean_out, at::Tensor& rstd_out) {
  using T = cpu::loop_t<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = v.features;
  const T* input = cpu::loop_data<scalar_t>(v.data);
  const T* res = cpu::loop_data_or_null<scalar_t>(residual);
  T* s = res ? cpu::mutable_loop_data<scalar_t>(sum) : nullptr;
  const T* x = res ? s : input;  // the rows normalized
  T* y = cpu::mutable_loop_data<scalar_t>(output);
  const std::vector<acc_t> w = cpu::channel_values<acc_t>(weight, D, 1);
  const std::vector<acc_t> b = cpu::channel_values<acc_t>(bias, D, 0);
  const bool affine = weight.defined() || bias.defined();
  acc_t* mean = mean_out.mutable_data_ptr<acc_t>();
  acc_t* rstd = rstd_out.mutable_data_ptr<acc_t>();
  const acc_t zero = 0;
  cpu::for_each_row(v, [&](int64_t r) {
    const T* row = x + r * D;
    if (s) {
      const T* __restrict__ in_row = input + r * D;
      const T* __restrict__ res_row = res + r * D;
      T* __restrict__ sum_row = s + r * D;
#if defined(NORMEXT_VECTORS16)
      if constexpr (cpu::kNarrowsAsVector<T>) {
        cpu::plain_add(in_row, res_row, sum_row, D);
      } else
#endif
      {
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) {
          cpu::store(sum_row, d, static_cast<acc_t>(in_row[d]) + static_cast<acc_t>(res_row[d]));
        }
      }
    }
    double m = 0, m2;  // rms: m2 is the sum of squares
    if (rms) {
      double sums[cpu::kTerms];
      cpu::reduce_run(cpu::ShiftedSums<T, acc_t>{row, &zero}, 0, D, sums);
      m2 = sums[1];
    } else {
      cpu::run_moments<acc_t>(row, D, m, m2);
    }
    const acc_t row_mean = static_cast<acc_t>(m);
    const acc_t row_rstd = cpu::inverse_std(static_cast<acc_t>(m2 / D), static_cast<acc_t>(eps));
    mean[r] = row_mean;
    rstd[r] = row_rstd;
    T* out = y + r * D;
#if defined(NORMEXT_VECTORS16)
    if constexpr (cpu::kNarrowsAsVector<T>) {
      cpu::plain_normalize_features(row, out, D, row_mean, row_rstd, w.data(), b.data());
      return;
    }
#endif
    if (affine) {
      const acc_t* __restrict__ wp = w.data();
      const acc_t* __restrict__ bp = b.data();
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        cpu::store(out, d, cpu::normalize(static_cast<acc_t>(row[d]), row_mean, row_rstd * wp[d], bp[d]));
      }
    } else {
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) {
        cpu::store(out, d, cpu::normalize(static_cast<acc_t>(row[d]), row_mean, row_rstd, acc_t(0)));
      }
    }
  });
}

}  // namespace

void CpuKernels::forward(const Rows& input, const at::Tensor& residual, const at::Tensor& weight,
                         const at::Tensor& bias, double eps, bool rms, at::Tensor& output,
                         at::Tensor& sum, at::Tensor& mean, at::Tensor& rstd) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "layer_norm", [&] {
    forward_rows<scalar_t>(input, residual, weight, bias, eps, rms, output, sum, mean, rstd);
  });
}

}  // namespace normext::layer_norm::NORMEXT_CPU_CAPABILITY
