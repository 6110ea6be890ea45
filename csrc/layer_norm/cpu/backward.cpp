// Backward: per row, sum(g) and sum(g * (x - mean)) with g = dy * weight in
// one read of dy and x, then one pass over the row in cache for its input
// gradient (common/math.h: grad_input_coefficients, with the row as the group)
// and its terms of the parameter gradients: 2R+1W from memory (3R+1W where
// grad_sum is added to the input gradient: add + LayerNorm's). The parameter
// gradients' sums over rows: per block of rows (at most kMaxBlocks, fixed by
// the shape), running sums of kParamRows rows in the accumulate type added in
// double; the blocks' sums added in block order: the same at any thread count.
#include "layer_norm/cpu/kernels.h"

#include <memory>
#include <type_traits>

namespace normext::layer_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// Rows whose parameter-gradient terms are added in the accumulate type before
// they are added in double.
constexpr int64_t kParamRows = 16;
// Blocks of rows whose parameter-gradient sums are kept apart (2 doubles per
// feature each): enough tasks for 64 threads, and their sums (read again to add
// them up) stay small beside the input.
constexpr int64_t kMaxBlocks = 64;
// A row pass's working set (dy, x, dx, grad_sum and the running sums) that stays in L1.
constexpr int64_t kL1Bytes = 24 * 1024;

// Whether T's rows go through whole vectors (vec16.h): float16, and bfloat16
// in vectors of 16 lanes. bfloat16 through 8-lane vectors (AVX2) was slower
// than the scalar loops, which GCC vectorizes: the vector loop spilled to the
// stack (A/B, benchmarks/history, session 35).
#if defined(NORMEXT_VECTORS16)
template <typename T>
constexpr bool kRowsAsVectors =
    cpu::kNarrowsAsVector<T> && (std::is_same_v<T, cpu::Float16> || cpu::kVectorLanes == 16);
#else
template <typename T>
constexpr bool kRowsAsVectors = false;
#endif

// The terms of a row's backward sums: g = dy * weight and g * (x - mean).
template <typename T, typename acc_t_>
struct RowGradSums {
  using acc_t = acc_t_;
  static constexpr int64_t kElementBytes = sizeof(T);
  static constexpr bool kPrefetch = false;
  static constexpr bool kLaneTerms = kRowsAsVectors<T>;
  static constexpr bool kWholeTails = false;  // its weights are read by the element's offset

  const T* dy;
  const T* x;
  const acc_t* weight;  // per feature
  const acc_t* mean;    // per row
  int64_t features;

  void element_terms(int64_t r, acc_t dy_value, acc_t x_value, acc_t w, acc_t& g,
                     acc_t& g_xmu) const {
    g = dy_value * w;
    g_xmu = g * (x_value - mean[r]);
  }
  void terms(int64_t r, int64_t offset, acc_t& g, acc_t& g_xmu) const {
    element_terms(r, static_cast<acc_t>(dy[offset]), static_cast<acc_t>(x[offset]),
                  weight[offset - r * features], g, g_xmu);
  }
  template <int kGroupStep>  // 0: a row's elements (group_rows is false)
  void lane_terms(int64_t r, int64_t offset, acc_t (&g)[cpu::kLanes],
                  acc_t (&g_xmu)[cpu::kLanes]) const {
    acc_t dy_values[cpu::kLanes], x_values[cpu::kLanes];
    cpu::widen(dy + offset, dy_values);
    cpu::widen(x + offset, x_values);
    const acc_t* w = weight + (offset - r * features);
#pragma omp simd
    for (int k = 0; k < cpu::kLanes; ++k) {
      element_terms(r, dy_values[k], x_values[k], w[k], g[k], g_xmu[k]);
    }
  }
  bool group_rows(int64_t) const { return false; }
};

#if defined(NORMEXT_VECTORS16)
// rows_pass below over 16-bit rows through whole vectors (vec16.h), the same
// terms in the same order in each lane.
template <int kRows, bool kInput, bool kParams, bool kAddSum, typename T>
C10_ALWAYS_INLINE void rows_pass_vectors(const T* dy_rows, const T* x_rows, const T* gs_rows,
                                         const float* w, const float (&row_mean)[kRows],
                                         const float (&row_rstd)[kRows],
                                         const cpu::GradInputCoefficients<float> (&k)[kRows],
                                         T* dx_rows, float* sum_dy_xhat, float* sum_dy,
                                         int64_t D) {
  using V = cpu::FloatVector;
  // (Always inlined: GCC outlined this loop once the kernel had more variants.)
  cpu::with_narrowing<T>([&](auto how) __attribute__((always_inline)) {
    cpu::GradInputCoefficients<V> kv[kRows];
    for (int i = 0; i < kRows; ++i) {
      kv[i] = {cpu::splat(k[i].dy_scale), cpu::splat(k[i].xmu_scale), cpu::splat(k[i].shift)};
    }
    for (int64_t d = 0; d < D; d += cpu::kVectorLanes) {
      const int64_t n = std::min<int64_t>(cpu::kVectorLanes, D - d);
      const bool whole = n == cpu::kVectorLanes;
      const auto load = [&](const T* p) {
        return whole ? cpu::load_vector(p) : cpu::load_vector(p, n);
      };
      V dy_xhat = kParams ? cpu::load_floats(sum_dy_xhat + d, n) : V{};
      V dy_sum = kParams ? cpu::load_floats(sum_dy + d, n) : V{};
      const V wv = cpu::load_floats(w + d, n);
      V dx[kRows];
      for (int i = 0; i < kRows; ++i) {
        const V g = load(dy_rows + i * D + d);
        const V xmu = load(x_rows + i * D + d) - row_mean[i];
        if constexpr (kInput) {
          dx[i] = cpu::grad_input_centred(g * wv, xmu, kv[i]);
          if constexpr (kAddSum) dx[i] += load(gs_rows + i * D + d);
        }
        dy_xhat += g * (xmu * row_rstd[i]);
        dy_sum += g;
      }
      if constexpr (kInput) {
        int i = 0;
        if (whole) {  // rows in pairs: one narrowing test for two (vec16.h)
          for (; i + 1 < kRows; i += 2) {
            cpu::store_vector_pair(dx_rows + i * D + d, dx[i], dx_rows + (i + 1) * D + d,
                                   dx[i + 1], how);
          }
        }
        for (; i < kRows; ++i) {
          if (whole) {
            cpu::store_vector(dx_rows + i * D + d, dx[i], how);
          } else {
            cpu::store_vector(dx_rows + i * D + d, dx[i], n, how);
          }
        }
      }
      if constexpr (kParams) {
        cpu::store_floats(sum_dy_xhat + d, dy_xhat, n);
        cpu::store_floats(sum_dy + d, dy_sum, n);
      }
    }
  });
}
#endif

// One pass over kRows consecutive rows in cache: their input gradient (kInput),
// plus grad_sum's rows before it is rounded (kAddSum), and their terms of the
// parameter gradients' running sums (kParams), added row by row; dy and x are
// read once for both.
template <int kRows, bool kInput, bool kParams, bool kAddSum, typename T, typename acc_t>
C10_ALWAYS_INLINE void rows_pass(const T* __restrict__ dy_rows, const T* __restrict__ x_rows,
                                 const T* __restrict__ gs_rows, const acc_t* __restrict__ w,
                                 const acc_t (&row_mean)[kRows],
                                 const acc_t (&row_rstd)[kRows],
                                 const cpu::GradInputCoefficients<acc_t> (&k)[kRows],
                                 T* __restrict__ dx_rows, acc_t* __restrict__ sum_dy_xhat,
                                 acc_t* __restrict__ sum_dy, int64_t D) {
#if defined(NORMEXT_VECTORS16)
  if constexpr (kRowsAsVectors<T>) {
    return rows_pass_vectors<kRows, kInput, kParams, kAddSum>(
        dy_rows, x_rows, gs_rows, w, row_mean, row_rstd, k, dx_rows, sum_dy_xhat, sum_dy, D);
  }
#endif
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    acc_t dy_xhat = kParams ? sum_dy_xhat[d] : acc_t(0), dy_sum = kParams ? sum_dy[d] : acc_t(0);
    for (int i = 0; i < kRows; ++i) {
      const acc_t g = static_cast<acc_t>(dy_rows[i * D + d]);
      const acc_t xmu = static_cast<acc_t>(x_rows[i * D + d]) - row_mean[i];
      if constexpr (kInput) {
        acc_t dx = cpu::grad_input_centred(g * w[d], xmu, k[i]);
        if constexpr (kAddSum) dx += static_cast<acc_t>(gs_rows[i * D + d]);
        cpu::store(dx_rows + i * D, d, dx);
      }
      dy_xhat += g * (xmu * row_rstd[i]);
      dy_sum += g;
    }
    if constexpr (kParams) {
      sum_dy_xhat[d] = dy_xhat;
      sum_dy[d] = dy_sum;
    }
  }
}

template <typename scalar_t>
void backward_rows(const Rows& grad_out, const Rows& v, const at::Tensor& mean_in,
                   const at::Tensor& rstd_in, const at::Tensor& weight, bool rms,
                   const at::Tensor& grad_sum, at::Tensor& grad_input, at::Tensor& grad_weight,
                   at::Tensor& grad_bias) {
  using T = cpu::loop_t<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = v.features, rows = v.rows;
  const T* x = cpu::loop_data<scalar_t>(v.data);
  const T* dy = cpu::loop_data<scalar_t>(grad_out.data);
  T* dx = grad_input.defined() ? cpu::mutable_loop_data<scalar_t>(grad_input) : nullptr;
  const T* gs = dx && grad_sum.defined() ? cpu::loop_data<scalar_t>(grad_sum) : nullptr;
  const acc_t* mean = mean_in.const_data_ptr<acc_t>();
  const acc_t* rstd = rstd_in.const_data_ptr<acc_t>();
  const std::vector<acc_t> w = cpu::channel_values<acc_t>(weight, D, 1);
  const RowGradSums<T, acc_t> sums_op{dy, x, w.data(), mean, D};
  const bool param_grads = grad_weight.defined() || grad_bias.defined();
  if (!dx && !param_grads) return;
  const int64_t rows_per_block =
      param_grads ? std::max(kParamRows, (rows + kMaxBlocks - 1) / kMaxBlocks) : 1;
  const int64_t run_rows = param_grads ? kParamRows : 1;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  // Rows too long for L1 go in pairs: a pass then loads and stores the
  // running sums once for two rows' terms.
  const int64_t row_tensors = gs ? 4 : 3;  // dy, x, dx (and grad_sum)
  const bool pair_rows =
      param_grads && D * (row_tensors * int64_t(sizeof(T)) + 2 * int64_t(sizeof(acc_t))) > kL1Bytes;
  // [block][term][feature]: sum(dy * (x - mean) * rstd), sum(dy); each block's
  // first run of rows assigns its sums, so nothing is zeroed first.
  std::unique_ptr<double[]> partials(param_grads ? new double[blocks * 2 * D] : nullptr);
  // Rows [r, r + kRows) through rows_pass, with the variant of the outputs wanted.
  const auto pass = [&](auto rows_c, int64_t r, acc_t* sum_dy_xhat, acc_t* sum_dy) {
    constexpr int kRows = decltype(rows_c)::value;
    acc_t row_mean[kRows], row_rstd[kRows];
    cpu::GradInputCoefficients<acc_t> k[kRows] = {};
    for (int i = 0; i < kRows; ++i) {
      row_mean[i] = mean[r + i];
      row_rstd[i] = rstd[r + i];
      if (!dx) continue;
      double sums[cpu::kTerms];
      cpu::reduce_run(sums_op, r + i, D, sums);
      k[i] = cpu::grad_input_coefficients(
          rms ? acc_t(0) : static_cast<acc_t>(sums[0]), static_cast<acc_t>(sums[1]), row_rstd[i],
          acc_t(1), static_cast<acc_t>(1.0 / static_cast<double>(D)));
    }
    const auto through = [&](auto input_c, auto params_c, auto add_sum_c) {
      rows_pass<kRows, decltype(input_c)::value, decltype(params_c)::value,
                decltype(add_sum_c)::value>(
          dy + r * D, x + r * D, gs ? gs + r * D : nullptr, w.data(), row_mean, row_rstd, k,
          dx ? dx + r * D : nullptr, sum_dy_xhat, sum_dy, D);
    };
    const std::true_type yes;
    const std::false_type no;
    if (dx && gs && param_grads) {
      through(yes, yes, yes);
    } else if (dx && gs) {
      through(yes, no, yes);
    } else if (dx && param_grads) {
      through(yes, yes, no);
    } else if (dx) {
      through(yes, no, no);
    } else {
      through(no, yes, no);
    }
  };
  at::parallel_for(0, blocks, cpu::grain_for(rows_per_block * D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> run_sums(param_grads ? 2 * D : 0);
    acc_t* sum_dy_xhat = param_grads ? run_sums.data() : nullptr;
    acc_t* sum_dy = param_grads ? run_sums.data() + D : nullptr;
    for (int64_t block = begin; block < end; ++block) {
      double* __restrict__ block_sums = param_grads ? partials.get() + block * 2 * D : nullptr;
      const int64_t b_begin = block * rows_per_block;
      const int64_t b_end = std::min(rows, b_begin + rows_per_block);
      for (int64_t run = b_begin; run < b_end; run += run_rows) {
        const int64_t run_end = std::min(b_end, run + run_rows);
        std::fill(run_sums.begin(), run_sums.end(), acc_t(0));
        int64_t r = run;
        for (; pair_rows && r + 2 <= run_end; r += 2) {
          pass(std::integral_constant<int, 2>{}, r, sum_dy_xhat, sum_dy);
        }
        for (; r < run_end; ++r) pass(std::integral_constant<int, 1>{}, r, sum_dy_xhat, sum_dy);
        if (!param_grads) continue;
        if (run == b_begin) {
#pragma omp simd
          for (int64_t i = 0; i < 2 * D; ++i) block_sums[i] = run_sums[i];
        } else {
#pragma omp simd
          for (int64_t i = 0; i < 2 * D; ++i) block_sums[i] += run_sums[i];
        }
      }
    }
  });
  if (!param_grads) return;
  std::vector<acc_t> totals(2 * D);
  at::parallel_for(0, D, cpu::grain_for(2 * blocks), [&](int64_t begin, int64_t end) {
    std::vector<double> total(2 * (end - begin), 0.0);
    for (int64_t block = 0; block < blocks; ++block) {
      for (int q = 0; q < 2; ++q) {
        const double* __restrict__ part = partials.get() + (block * 2 + q) * D + begin;
        double* __restrict__ sum = total.data() + q * (end - begin);
#pragma omp simd
        for (int64_t d = 0; d < end - begin; ++d) sum[d] += part[d];
      }
    }
    for (int q = 0; q < 2; ++q) {
      for (int64_t d = begin; d < end; ++d) {
        totals[q * D + d] = static_cast<acc_t>(total[q * (end - begin) + d - begin]);
      }
    }
  });
  if (grad_weight.defined()) {
    cpu::store_channel_values<acc_t>(c10::ArrayRef<acc_t>(totals.data(), D), grad_weight);
  }
  if (grad_bias.defined()) {
    cpu::store_channel_values<acc_t>(c10::ArrayRef<acc_t>(totals.data() + D, D), grad_bias);
  }
}

}  // namespace

void CpuKernels::backward(const Rows& grad_out, const Rows& input, const at::Tensor& mean,
                          const at::Tensor& rstd, const at::Tensor& weight, bool rms,
                          const at::Tensor& grad_sum, at::Tensor& grad_input,
                          at::Tensor& grad_weight, at::Tensor& grad_bias) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "layer_norm_backward", [&] {
    backward_rows<scalar_t>(grad_out, input, mean, rstd, weight, rms, grad_sum, grad_input,
                            grad_weight, grad_bias);
  });
}

}  // namespace normext::layer_norm::NORMEXT_CPU_CAPABILITY
