// What every norm's ops share: the (outer, C, inner) view of an (N, C, *)
// input that the per-channel norms' kernels (batch norm, group norm, instance
// norm) work on, and the dtype statistics are kept in.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace normext {

// An input seen as statistics over every dim except dim 1 (the channels).
// Contiguous layout: memory is (outer, channels, inner) row-major.
// Channels-last layout: memory is (outer * inner, channels) row-major; this is
// also how an (N, C) input is stored.
struct ChannelView {
  at::Tensor data;  // dense in the layout below
  int64_t outer;
  int64_t channels;
  int64_t inner;
  bool channels_last;

  int64_t count() const { return outer * inner; }  // elements per channel
};

// Picks the layout the strides suggest (channels_last(_3d) or contiguous, as
// torch does), copying the input only when it is not dense in that layout.
ChannelView channel_view(const at::Tensor& input);

// `tensor` (same shape as view.data) dense in view's layout, copied only if it is not.
at::Tensor in_layout_of(const ChannelView& view, const at::Tensor& tensor);

// Float32 for float/half/bfloat16 inputs, float64 for float64: the dtype of
// accumulation and of the saved statistics.
inline at::ScalarType accumulate_type(at::ScalarType input_type) {
  return input_type == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace normext
