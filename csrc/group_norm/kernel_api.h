// A backend's group-norm kernels (the static methods ops.h composes), declared
// from this one list in each CPU capability's CpuKernels (cpu/kernels.h) and in
// the CpuKernels the ops use (cpu/dispatch.h). Included inside those struct
// bodies, after common/channel_view.h, common/activation.h and the ATen
// headers: no include guard.

// Each (sample, group)'s mean and rstd = 1 / sqrt(var + eps), (N, groups) in
// the accumulate type, and output = act((x - mean) * rstd * weight[c] +
// bias[c]) in the input's layout; an undefined weight or bias counts as 1 or 0.
static void forward(const ChannelView& input, int64_t groups, const at::Tensor& weight,
                    const at::Tensor& bias, double eps, const ActivationSpec& activation,
                    at::Tensor& output, at::Tensor& mean, at::Tensor& rstd);
// The gradients that are defined on entry, through the activation: with
// dz = dy * act'(z) at z = (x - mean) * rstd * weight + bias, grad_input from
// each group's sums of dz * weight and dz * weight * (x - mean),
// grad_weight[c] = sum of dz * (x - mean) * rstd and grad_bias[c] = sum of dz
// over samples and spatial elements, added in an order fixed by the shape.
// grad_out is in input's layout.
static void backward(const ChannelView& grad_out, const ChannelView& input, int64_t groups,
                     const at::Tensor& mean, const at::Tensor& rstd, const at::Tensor& weight,
                     const at::Tensor& bias, const ActivationSpec& activation,
                     at::Tensor& grad_input, at::Tensor& grad_weight, at::Tensor& grad_bias);
