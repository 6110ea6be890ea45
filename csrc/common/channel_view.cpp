#include "common/channel_view.h"

#include <ATen/ops/empty_strided.h>

namespace normext {

ChannelView channel_view(const at::Tensor& input) {
  ChannelView view;
  view.outer = input.size(0);
  view.channels = input.size(1);
  view.inner = 1;
  for (int64_t d = 2; d < input.dim(); ++d) view.inner *= input.size(d);
  // torch's rule for batch norm: work (and answer) in the layout the strides
  // suggest, copying inputs that are not dense in it.
  const at::MemoryFormat format = input.suggest_memory_format();
  view.data = input.is_contiguous(format) ? input : input.contiguous(format);
  // With one spatial element both layouts are the same memory; the
  // channels-last kernels vectorize over C, which is then the long dim.
  view.channels_last = format != at::MemoryFormat::Contiguous || view.inner == 1;
  return view;
}

at::Tensor in_layout_of(const ChannelView& view, const at::Tensor& tensor) {
  // Dense in the view's layout is enough: the kernels compute offsets from the
  // sizes, so strides of size-1 dims (which is_contiguous ignores) don't matter.
  // With inner == 1 both layouts are the plain row-major one.
  const at::MemoryFormat format =
      !view.channels_last || view.inner == 1 ? at::MemoryFormat::Contiguous
      : tensor.dim() == 4                    ? at::MemoryFormat::ChannelsLast
                                             : at::MemoryFormat::ChannelsLast3d;
  if (tensor.is_contiguous(format)) return tensor;
  at::Tensor out = at::empty_strided(view.data.sizes(), view.data.strides(), tensor.options());
  out.copy_(tensor);
  return out;
}

}  // namespace normext
