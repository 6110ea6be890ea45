// Elementwise passes: normalize (1 read + 1 write; also the input gradient
// under running statistics) and the input gradient under batch statistics
// (2 reads + 1 write), with per-channel coefficients computed once (math.h).
// Fused passes (common.h: Fusion) also read the residual, apply the
// activation, and in the backward write the residual's gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <utility>

#include "batch_norm/cpu/kernels.h"
#include "batch_norm/math.h"

namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY {
namespace {

// y = act(normalize(x) + r) over one run of a channel (contiguous layout).
template <bool kResidual, class Act, typename scalar_t, typename acc_t>
void normalize_run(const Act act, const scalar_t* __restrict__ x, const scalar_t* __restrict__ r,
                   scalar_t* __restrict__ y, int64_t length, acc_t mean, acc_t scale, acc_t bias) {
#if defined(NORMEXT_VECTOR_SILU)
  if constexpr (std::is_same_v<Act, cpu::SiluFn<float>> && std::is_same_v<scalar_t, float>) {
    cpu::silu_affine(x, kResidual ? r : nullptr, y, length, mean, scale, bias);
  } else
#endif
  {
#pragma omp simd
    for (int64_t i = 0; i < length; ++i) {
      acc_t z = normalize(static_cast<acc_t>(x[i]), mean, scale, bias);
      if constexpr (kResidual) z += static_cast<acc_t>(r[i]);
      cpu::store(y, i, act(z));
    }
  }
}

// Rows channels-last rows, C apart.
template <int Rows, bool kResidual, class Act, typename scalar_t, typename acc_t>
void normalize_rows(const Act act, const scalar_t* __restrict__ x,
                    const scalar_t* __restrict__ r, scalar_t* __restrict__ y, int64_t channels,
                    const acc_t* __restrict__ mean, const acc_t* __restrict__ scale,
                    const acc_t* __restrict__ bias) {
#if defined(NORMEXT_VECTOR_SILU)
  if constexpr (std::is_same_v<Act, cpu::SiluFn<float>> && std::is_same_v<scalar_t, float>) {
    for (int k = 0; k < Rows; ++k) {
      const int64_t i = k * channels;
      cpu::silu_affine(x + i, kResidual ? r + i : nullptr, y + i, channels, mean, scale, bias);
    }
  } else
#endif
  {
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      for (int k = 0; k < Rows; ++k) {
        const int64_t i = k * channels + c;
        acc_t z = normalize(static_cast<acc_t>(x[i]), mean[c], scale[c], bias[c]);
        if constexpr (kResidual) z += static_cast<acc_t>(r[i]);
        cpu::store(y, i, act(z));
      }
    }
  }
}

// (dz, x - mean) at element i of channel c: the plain batch norm's (dy, x -
// mean), or math.h's pre_activation_grad(_with_output, _of_output) through a
// fusion, from where kFrom says (fusion.h: GradFrom).
template <bool kPlain, int kFrom, bool kResidual, class Act, typename scalar_t, typename acc_t>
struct GradSource {
  // dz is the residual's gradient too, where the forward had one.
  static constexpr bool kResidualGrad = kResidual || kFrom == kFromInputAndOutput;
  static constexpr bool kPlainPass = kPlain;
  static constexpr bool kReadsOutput = kFrom == kFromInputAndOutput;
  static constexpr bool kReadsResidual = kResidual;
  // The same source over float tiles (the staged 16-bit passes below).
  using FloatSource = GradSource<kPlain, kFrom, kResidual, Act, float, acc_t>;

  Act act;
  const scalar_t* dy;
  const scalar_t* saved;   // x, or y kFromOutput
  const scalar_t* output;  // y beside x (kFromInputAndOutput)
  const scalar_t* residual;
  const acc_t* mean;
  const acc_t* scale;      // invstd * weight
  const acc_t* bias;
  const acc_t* inv_scale;  // 1 / scale

  // (dz, x - mean) from an element's values (o the output's, r the
  // residual's) and its channel's coefficients: scalars, or vectors of lanes
  // with the activation's vector formulas (normalize16.h: VectorActivation).
  template <class A, typename V>
  static C10_ALWAYS_INLINE void grads(const A& act, V g, V s, V o, V r, V mean_c, V scale_c,
                                      V bias_c, V inv_scale_c, V& dz, V& xmu) {
    if constexpr (kPlain) {
      dz = g;
      xmu = s - mean_c;
    } else if constexpr (kFrom == kFromOutput) {
      pre_activation_grad_of_output(act, g, s, r, inv_scale_c, bias_c, dz, xmu);
    } else if constexpr (kFrom == kFromInputAndOutput) {
      pre_activation_grad_with_output(act, g, s, o, mean_c, dz, xmu);
    } else {
      pre_activation_grad(act, g, s, r, mean_c, scale_c, bias_c, dz, xmu);
    }
  }

  // Channel c's values are passed as scalars (no struct: GCC does not
  // vectorize an omp simd loop with an aggregate local, which it keeps in
  // memory per lane); a run loads them once.
  void at(int64_t i, acc_t mean_c, acc_t scale_c, acc_t bias_c, acc_t inv_scale_c, acc_t& dz,
          acc_t& xmu) const {
    const acc_t o = kReadsOutput ? static_cast<acc_t>(output[i]) : acc_t(0);
    const acc_t r = kResidual ? static_cast<acc_t>(residual[i]) : acc_t(0);
    grads(act, static_cast<acc_t>(dy[i]), static_cast<acc_t>(saved[i]), o, r, mean_c, scale_c,
          bias_c, inv_scale_c, dz, xmu);
  }
};

// dx (and dz into dr with a residual) over elements [begin, end) of channel c
// (contiguous layout) or over Rows channels-last rows from `begin`. Under
// running statistics (!kBatchStats) dx = dz * scale, x - mean unused.
template <bool kBatchStats, class Source, typename scalar_t, typename acc_t>
void grad_input_run(const Source& source, scalar_t* __restrict__ dx, scalar_t* __restrict__ dr,
                    int64_t c, int64_t begin, int64_t end,
                    const GradInputCoefficients<acc_t> k) {
  const Source src = source;  // its pointers in registers, not reloaded past the stores
  const acc_t mean = src.mean[c], scale = src.scale[c], bias = src.bias[c];
  const acc_t inv_scale = src.inv_scale[c];
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    acc_t dz, xmu;
    src.at(i, mean, scale, bias, inv_scale, dz, xmu);
    if constexpr (Source::kResidualGrad) cpu::store(dr, i, dz);
    cpu::store(dx, i, kBatchStats ? grad_input_centred(dz, xmu, k) : dz * k.dy_scale);
  }
}

template <int Rows, bool kBatchStats, class Source, typename scalar_t, typename acc_t>
void grad_input_rows(const Source& source, scalar_t* __restrict__ dx, scalar_t* __restrict__ dr,
                     int64_t begin, int64_t channels, const acc_t* __restrict__ dy_scale,
                     const acc_t* __restrict__ xmu_scale, const acc_t* __restrict__ shift) {
  const Source src = source;
#pragma omp simd
  for (int64_t c = 0; c < channels; ++c) {
    const acc_t a = dy_scale[c], b = xmu_scale[c], s = shift[c];
    for (int row = 0; row < Rows; ++row) {
      const int64_t i = begin + row * channels + c;
      acc_t dz, xmu;
      src.at(i, src.mean[c], src.scale[c], src.bias[c], src.inv_scale[c], dz, xmu);
      if constexpr (Source::kResidualGrad) cpu::store(dr, i, dz);
      cpu::store(dx, i, kBatchStats ? grad_input_centred(dz, xmu, {a, b, s}) : dz * a);
    }
  }
}

// Whether the 16-bit vector passes group channels-last rows of C channels
// that fit L1 anyway: short rows load their coefficient vectors once for
// kRowGroup rows (float32's scalar loops lost by it: benchmarks/history,
// session 30).
template <typename T>
bool short_rows(int64_t C) {
  return C * static_cast<int64_t>(sizeof(T)) <= 256;
}

// float16 passes that do not go through whole vectors (the SiLU forward, and
// every pass of the baseline build, which has no F16C): tiles widened to
// float, the float32 kernels above run on them (out of line: the form the A/B
// measured), the results narrowed; Float16's per-element bit arithmetic bound
// the direct loops. The tiles stay in L1.
constexpr int64_t kStage = cpu::kStageElements;

template <bool kResidual, class Act>
C10_NOINLINE void normalize_float_run(const Act act, const float* x, const float* r, float* y,
                                      int64_t length, float mean, float scale, float bias) {
  normalize_run<kResidual>(act, x, r, y, length, mean, scale, bias);
}

// `rows` rows of `width` channels, one after the other.
template <bool kResidual, class Act>
C10_NOINLINE void normalize_float_rows(const Act act, const float* x, const float* r, float* y,
                                       int64_t rows, int64_t width, const float* mean,
                                       const float* scale, const float* bias) {
  for (int64_t k = 0; k < rows; ++k) {
    const int64_t i = k * width;
    normalize_rows<1, kResidual>(act, x + i, kResidual ? r + i : r, y + i, width, mean, scale,
                                 bias);
  }
}

template <bool kBatchStats, class Source>
C10_NOINLINE void grad_input_float_run(const Source& source, float* dx, float* dr, int64_t c,
                                       int64_t length, const GradInputCoefficients<float> k) {
  grad_input_run<kBatchStats>(source, dx, dr, c, 0, length, k);
}

template <bool kBatchStats, class Source>
C10_NOINLINE void grad_input_float_rows(const Source& source, float* dx, float* dr, int64_t rows,
                                        int64_t width, const float* dy_scale,
                                        const float* xmu_scale, const float* shift) {
  for (int64_t k = 0; k < rows; ++k) {
    grad_input_rows<1, kBatchStats>(source, dx, dr, k * width, width, dy_scale, xmu_scale,
                                    shift);
  }
}

// fn(first element, rows, width, first channel) over channels-last rows
// [begin, end) of C channels, in tiles of at most kStage elements: whole rows
// where a row fits, else channel slices, `group` rows per slice so that the
// slice's coefficients are read from L1 for all of them.
template <typename F>
void for_each_row_tile(int64_t begin, int64_t end, int64_t C, int64_t group, const F& fn) {
  if (C <= kStage) {
    const int64_t rows_per_tile = kStage / C;
    for (int64_t row = begin; row < end; row += rows_per_tile) {
      fn(row * C, std::min(rows_per_tile, end - row), C, int64_t{0});
    }
    return;
  }
  for (int64_t row = begin; row < end; row += group) {
    const int64_t rows = std::min(group, end - row);
    for (int64_t c0 = 0; c0 < C; c0 += kStage) {
      const int64_t width = std::min(kStage, C - c0);
      for (int64_t k = 0; k < rows; ++k) fn((row + k) * C + c0, int64_t{1}, width, c0);
    }
  }
}

// A 16-bit GradSource's arrays from element i widened into tiles, as a float
// source whose per-channel arrays start at channel c0.
struct GradTiles {
  float dy[kStage], saved[kStage], output[kStage], residual[kStage], dx[kStage], dr[kStage];
};
template <class Source>
typename Source::FloatSource widen_source(const Source& src, int64_t i, int64_t n, int64_t c0,
                                          GradTiles& t) {
  cpu::widen_n(src.dy + i, t.dy, n);
  cpu::widen_n(src.saved + i, t.saved, n);
  if constexpr (Source::kReadsOutput) cpu::widen_n(src.output + i, t.output, n);
  if constexpr (Source::kReadsResidual) cpu::widen_n(src.residual + i, t.residual, n);
  return {src.act,         t.dy,           t.saved,         t.output,
          t.residual,      src.mean + c0,  src.scale + c0,  src.bias + c0,
          src.inv_scale + c0};
}

#if defined(NORMEXT_VECTORS16)
// The 16-bit input gradients but the plain one under batch statistics
// through whole vectors: GradSource's formula on vectors, dz and dx stored
// with one test where both are written.
using cpu::FloatVector;

// A channel's coefficients (a run's splatted, rows' a vector of channels').
struct ChannelVectors {
  FloatVector mean, scale, bias, inv_scale;
  GradInputCoefficients<FloatVector> grad;
};

// (dz, dx) at elements [i, i + n); dz is stored where it is the residual's gradient too.
template <bool kBatchStats, class Source, class N>
C10_ALWAYS_INLINE std::pair<FloatVector, FloatVector> grad_vectors(const Source& src, int64_t i,
                                                                   N n,
                                                                   const ChannelVectors& k) {
  const FloatVector zero = cpu::splat(0.0f);
  FloatVector o = zero, r = zero, dz, xmu;
  if constexpr (Source::kReadsOutput) o = cpu::load_vector(src.output + i, n);
  if constexpr (Source::kReadsResidual) r = cpu::load_vector(src.residual + i, n);
  Source::grads(cpu::VectorActivation<decltype(src.act)>{src.act},
                cpu::load_vector(src.dy + i, n), cpu::load_vector(src.saved + i, n), o, r,
                k.mean, k.scale, k.bias, k.inv_scale, dz, xmu);
  return {dz, kBatchStats ? grad_input_centred(dz, xmu, k.grad) : dz * k.grad.dy_scale};
}

// grad_input_run and grad_input_rows through grad_vectors. (with_narrowing's
// lambdas always inlined: GCC outlined them, and reloaded their captures
// after every store.)
template <bool kBatchStats, class Source, typename T>
void grad_input_run_vectors(const Source& source, T* dx, T* dr, int64_t c, int64_t begin,
                            int64_t end, const GradInputCoefficients<float> k) {
  using cpu::splat;
  const Source src = source;
  const ChannelVectors kv{splat(src.mean[c]),
                          splat(src.scale[c]),
                          splat(src.bias[c]),
                          splat(src.inv_scale[c]),
                          {splat(k.dy_scale), splat(k.xmu_scale), splat(k.shift)}};
  const auto values = [&](int64_t i, auto n) {
    return grad_vectors<kBatchStats>(src, begin + i, n, kv);
  };
  cpu::with_narrowing<T>([&](auto how) __attribute__((always_inline)) {
    if constexpr (Source::kResidualGrad) {
      cpu::store_run_both(dr + begin, dx + begin, end - begin, how, values);
    } else {
      cpu::store_run(dx + begin, end - begin, how,
                     [&](int64_t i, auto n) { return values(i, n).second; });
    }
  });
}

template <int Rows, bool kBatchStats, class Source, typename T>
void grad_input_rows_vectors(const Source& source, T* dx, T* dr, int64_t begin, int64_t channels,
                             const float* dy_scale, const float* xmu_scale, const float* shift) {
  using cpu::load_floats;
  const Source src = source;
  const auto coefficients = [&](int64_t c, auto n) {
    return ChannelVectors{load_floats(src.mean + c, n),
                          load_floats(src.scale + c, n),
                          load_floats(src.bias + c, n),
                          load_floats(src.inv_scale + c, n),
                          {load_floats(dy_scale + c, n), load_floats(xmu_scale + c, n),
                           load_floats(shift + c, n)}};
  };
  const auto values = [&](int64_t i, auto n, const ChannelVectors& k) {
    return grad_vectors<kBatchStats>(src, begin + i, n, k);
  };
  cpu::with_narrowing<T>([&](auto how) __attribute__((always_inline)) {
    if constexpr (Source::kResidualGrad) {
      cpu::store_rows_both<Rows>(dr + begin, dx + begin, channels, how, coefficients, values);
    } else {
      cpu::store_rows<Rows>(dx + begin, channels, how, coefficients,
                            [&](int64_t i, auto n, const ChannelVectors& k) {
                              return values(i, n, k).second;
                            });
    }
  });
}
#endif

#if defined(NORMEXT_VECTORS16)
// float16 and bfloat16 through whole vectors (common/cpu/normalize16.h): the
// forward but SiLU's and the plain input gradient under batch statistics.
using cpu::plain_grad_input_rows;
using cpu::plain_grad_input_run;
using cpu::normalize_rows_vectors;
using cpu::normalize_run_vectors;
#endif

}  // namespace

void CpuKernels::normalize(const ChannelView& input, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& weight,
                           const at::Tensor& bias, at::Tensor& output, const Fusion& fusion) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using T = cpu::loop_t<scalar_t>;
    const int64_t C = input.channels;
    const std::vector<acc_t> m = cpu::channel_values<acc_t>(mean, C, 0);
    std::vector<acc_t> scale = cpu::channel_values<acc_t>(weight, C, 1);
    const std::vector<acc_t> istd = cpu::channel_values<acc_t>(invstd, C, 0);
    const std::vector<acc_t> b = cpu::channel_values<acc_t>(bias, C, 0);
    for (int64_t c = 0; c < C; ++c) scale[c] *= istd[c];
    const T* x = cpu::loop_data<scalar_t>(input.data);
    const T* r = cpu::loop_data_or_null<scalar_t>(fusion.residual);
    T* y = cpu::mutable_loop_data<scalar_t>(output);
    with_fusion<acc_t>(fusion, [&](auto act, auto residual) {
      constexpr bool kResidual = decltype(residual)::value;
      // SiLU keeps its own loops (float32's vector formula, float16's tiles,
      // bfloat16's direct loop).
      constexpr bool kVectors = cpu::kVectorElement<T> &&
                                decltype(act)::kKind != Activation::kSilu;
      constexpr bool kStaged = std::is_same_v<T, cpu::Float16> && !kVectors;
      if (input.channels_last) {
        const bool grouped = cpu::group_rows<acc_t>(C, 3) || (kVectors && short_rows<T>(C));
        cpu::for_each_row_range(input, [&](int64_t begin, int64_t end) {
          if constexpr (kStaged) {
            float rs[kStage];
            const int64_t group = grouped ? cpu::kRowGroup : 1;
            for_each_row_tile(begin, end, C, group, [&](int64_t i, int64_t rows, int64_t width,
                                                         int64_t c0) {
              cpu::for_each_tile(x + i, y + i, rows * width, [&](const float* xs, float* ys,
                                                                 int64_t, int64_t n) {
                if constexpr (kResidual) cpu::widen_n(r + i, rs, n);
                normalize_float_rows<kResidual>(act, xs, rs, ys, rows, width, m.data() + c0,
                                                scale.data() + c0, b.data() + c0);
              });
            });
          } else {
            cpu::for_each_row_group(begin, end, grouped, [&](int64_t row, auto rows) {
              const int64_t i = row * C;
#if defined(NORMEXT_VECTORS16)
              if constexpr (kVectors) {
                return normalize_rows_vectors<rows(), kResidual>(
                    act, x + i, r ? r + i : r, y + i, C, m.data(), scale.data(), b.data());
              } else
#endif
              {
                normalize_rows<rows(), kResidual>(act, x + i, r ? r + i : r, y + i, C,
                                                  m.data(), scale.data(), b.data());
              }
            });
          }
        });
      } else {
        cpu::for_each_row_segment(input, [&](int64_t c, int64_t begin, int64_t end) {
          if constexpr (kStaged) {
            float rs[kStage];
            cpu::for_each_tile(x + begin, y + begin, end - begin, [&](const float* xs, float* ys,
                                                                      int64_t i, int64_t n) {
              if constexpr (kResidual) cpu::widen_n(r + begin + i, rs, n);
              normalize_float_run<kResidual>(act, xs, rs, ys, n, m[c], scale[c], b[c]);
            });
          } else {
#if defined(NORMEXT_VECTORS16)
            if constexpr (kVectors) {
              return normalize_run_vectors<kResidual>(act, x + begin, r ? r + begin : r,
                                                      y + begin, end - begin, m[c], scale[c],
                                                      b[c]);
            } else
#endif
            {
              normalize_run<kResidual>(act, x + begin, r ? r + begin : r, y + begin,
                                       end - begin, m[c], scale[c], b[c]);
            }
          }
        });
      }
    });
  });
}

void CpuKernels::backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                                const at::Tensor& mean, const at::Tensor& invstd,
                                const at::Tensor& weight, const at::Tensor& sum_dy,
                                const at::Tensor& sum_dy_xmu, double count,
                                at::Tensor& grad_input, const FusedGrad& fused) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.data.scalar_type(),
                                  "batch_norm_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using T = cpu::loop_t<scalar_t>;
    const int64_t C = input.channels;
    const bool batch_stats = sum_dy.defined();
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
    const std::vector<acc_t> b = cpu::channel_values<acc_t>(fused.bias, C, 0);
    const std::vector<acc_t> inv_scale = cpu::reciprocals(dy_scale);
    const T* dy = cpu::loop_data<scalar_t>(grad_out.data);
    const T* x = cpu::loop_data<scalar_t>(input.data);
    T* dx = cpu::mutable_loop_data<scalar_t>(grad_input);
    at::Tensor grad_residual = fused.grad_residual;  // (a handle: writes go to the caller's)
    T* dr = grad_residual.defined() ? cpu::mutable_loop_data<scalar_t>(grad_residual) : nullptr;
    const T* r = cpu::loop_data_or_null<scalar_t>(fused.fusion.residual);
    const T* y = cpu::loop_data_or_null<scalar_t>(fused.output);
    with_grad_source<acc_t>(fused, [&](auto act, auto plain, auto from, auto residual) {
      const auto run = [&](auto source, auto batch) {
        using Source = decltype(source);
        constexpr bool kBatchStats = decltype(batch)::value;
        constexpr bool kVectors = Source::kPlainPass && kBatchStats && cpu::kVectorElement<T>;
        constexpr bool kSourceVectors = cpu::kVectorElement<T> && !kVectors;
        constexpr bool kStaged = std::is_same_v<T, cpu::Float16> && !cpu::kVectorElement<T>;
        if (input.channels_last) {
          const bool grouped =
              cpu::group_rows<acc_t>(C, 4) || (cpu::kVectorElement<T> && short_rows<T>(C));
          cpu::for_each_row_range(input, [&](int64_t begin, int64_t end) {
            if constexpr (kStaged) {
              GradTiles t;
              const int64_t group = grouped ? cpu::kRowGroup : 1;
              for_each_row_tile(begin, end, C, group, [&](int64_t i, int64_t rows,
                                                          int64_t width, int64_t c0) {
                const int64_t n = rows * width;
                grad_input_float_rows<kBatchStats>(
                    widen_source(source, i, n, c0, t), t.dx, t.dr, rows, width,
                    dy_scale.data() + c0, xmu_scale.data() + c0, shift.data() + c0);
                cpu::narrow_n(t.dx, dx + i, n);
                if constexpr (Source::kResidualGrad) cpu::narrow_n(t.dr, dr + i, n);
              });
            } else {
              cpu::for_each_row_group(begin, end, grouped, [&](int64_t row, auto rows) {
                const int64_t i = row * C;
#if defined(NORMEXT_VECTORS16)
                if constexpr (kVectors) {
                  return plain_grad_input_rows<rows()>(dy + i, x + i, dx + i, C, m.data(),
                                                       dy_scale.data(), xmu_scale.data(),
                                                       shift.data());
                } else if constexpr (kSourceVectors) {
                  return grad_input_rows_vectors<rows(), kBatchStats>(
                      source, dx, dr, i, C, dy_scale.data(), xmu_scale.data(), shift.data());
                } else
#endif
                {
                  grad_input_rows<rows(), kBatchStats>(source, dx, dr, i, C, dy_scale.data(),
                                                       xmu_scale.data(), shift.data());
                }
              });
            }
          });
        } else {
          cpu::for_each_row_segment(input, [&](int64_t c, int64_t begin, int64_t end) {
            const GradInputCoefficients<acc_t> k{dy_scale[c], xmu_scale[c], shift[c]};
            if constexpr (kStaged) {
              GradTiles t;
              for (int64_t i = begin; i < end; i += kStage) {
                const int64_t n = std::min(kStage, end - i);
                grad_input_float_run<kBatchStats>(widen_source(source, i, n, 0, t), t.dx, t.dr,
                                                  c, n, k);
                cpu::narrow_n(t.dx, dx + i, n);
                if constexpr (Source::kResidualGrad) cpu::narrow_n(t.dr, dr + i, n);
              }
            } else {
#if defined(NORMEXT_VECTORS16)
              if constexpr (kVectors) {
                return plain_grad_input_run(dy + begin, x + begin, dx + begin, end - begin,
                                            m[c], k);
              } else if constexpr (kSourceVectors) {
                return grad_input_run_vectors<kBatchStats>(source, dx, dr, c, begin, end, k);
              } else
#endif
              {
                grad_input_run<kBatchStats>(source, dx, dr, c, begin, end, k);
              }
            }
          });
        }
      };
      const GradSource<plain(), from(), residual(), decltype(act), T, acc_t> source{
          act, dy, x, y, r, m.data(), dy_scale.data(), b.data(), inv_scale.data()};
      if (batch_stats) return run(source, std::true_type{});
      run(source, std::false_type{});
    });
  });
}

}  // namespace normext::batch_norm::NORMEXT_CPU_CAPABILITY
