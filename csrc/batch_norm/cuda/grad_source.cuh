// (dz, x - mean) of an element for the CUDA backward passes, shared by the
// reduction and the input-gradient pass: the plain batch norm's (dy, x -
// mean), or through a fusion math.h's pre_activation_grad(_with_output,
// _of_output), from where kFrom says (fusion.h: GradFrom).
#pragma once

#include <type_traits>

#include "batch_norm/cuda/launch.cuh"
#include "batch_norm/fusion.h"
#include "batch_norm/math.h"

namespace normext::batch_norm::cuda {

// A channel's values an element needs: the plain pass reads the mean alone.
template <typename acc_t>
struct PlainChannel {
  acc_t mean;
};
template <typename acc_t>
struct FusedChannel {
  acc_t mean, scale, bias, inv_scale;  // scale = invstd * weight, inv_scale = 1 / scale
};

template <bool kPlain, int kFrom, bool kResidual, class Act, typename scalar_type,
          typename accumulate_t, typename param_t>
struct GradSource {
  using scalar_t = scalar_type;
  using acc_t = accumulate_t;
  using Channel = std::conditional_t<kPlain, PlainChannel<acc_t>, FusedChannel<acc_t>>;
  // A third tensor is read: the residual, or the output beside the input.
  static constexpr bool kBeside = kResidual || kFrom == kFromInputAndOutput;
  // dz is then the residual's gradient too (the forward had one).
  static constexpr bool kResidualGrad = kBeside;

  Act act;
  const scalar_t* dy;
  const scalar_t* saved;   // x, or y (kFromOutput)
  const scalar_t* beside;  // the residual, or y beside x; null unless kBeside
  const acc_t* mean;
  const acc_t* invstd;
  const param_t* weight;  // null: 1
  const param_t* bias;    // null: 0

  __device__ acc_t weight_or_one(int64_t c) const {
    return weight ? static_cast<acc_t>(weight[c]) : acc_t(1);
  }

  __device__ Channel channel(int64_t c) const {
    if constexpr (kPlain) {
      return {mean[c]};
    } else {
      const acc_t scale = invstd[c] * weight_or_one(c);
      return {mean[c], scale, bias ? static_cast<acc_t>(bias[c]) : acc_t(0),
              kFrom == kFromOutput ? acc_t(1) / scale : acc_t(0)};
    }
  }

  template <int size>
  struct Loaded {
    Pack<scalar_t, size> dy, saved, beside;
  };

  template <int size, typename index_t>
  __device__ Loaded<size> load(index_t first) const {
    Loaded<size> v;
    v.dy = load_pack<size>(dy, first);
    v.saved = load_pack<size>(saved, first);
    if constexpr (kBeside) v.beside = load_pack<size>(beside, first);
    return v;
  }

  template <int size>
  __device__ void at(const Loaded<size>& v, int k, const Channel& ch, acc_t& dz,
                     acc_t& xmu) const {
    const acc_t g = static_cast<acc_t>(v.dy.value[k]), s = static_cast<acc_t>(v.saved.value[k]);
    if constexpr (kPlain) {
      dz = g;
      xmu = s - ch.mean;
    } else {
      const acc_t r = kBeside ? static_cast<acc_t>(v.beside.value[k]) : acc_t(0);
      if constexpr (kFrom == kFromOutput) {
        pre_activation_grad_of_output(act, g, s, r, ch.inv_scale, ch.bias, dz, xmu);
      } else if constexpr (kFrom == kFromInputAndOutput) {
        pre_activation_grad_with_output(act, g, s, r, ch.mean, dz, xmu);
      } else {
        pre_activation_grad(act, g, s, r, ch.mean, ch.scale, ch.bias, dz, xmu);
      }
    }
  }
};

// fn(source) with the GradSource of a fused backward (fusion.h:
// with_grad_source) over dy, the saved tensor and the per-channel values.
template <typename scalar_t, typename acc_t, typename param_t, typename F>
void with_grad_source(const FusedGrad& fused, const at::Tensor& dy, const at::Tensor& saved,
                      const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
                      const at::Tensor& bias, const F& fn) {
  const at::Tensor& beside = fused.fusion.residual.defined() ? fused.fusion.residual
                                                             : fused.output;
  batch_norm::with_grad_source<acc_t>(fused, [&](auto act, auto plain, auto from, auto residual) {
    fn(GradSource<plain(), from(), residual(), decltype(act), scalar_t, acc_t, param_t>{
        act, dy.const_data_ptr<scalar_t>(), saved.const_data_ptr<scalar_t>(),
        data_or_null<scalar_t>(beside), mean.const_data_ptr<acc_t>(),
        invstd.const_data_ptr<acc_t>(), data_or_null<param_t>(weight),
        data_or_null<param_t>(bias)});
  });
}

}  // namespace normext::batch_norm::cuda
