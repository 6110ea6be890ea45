// A backend's layer-norm kernels (the static methods ops.h composes), declared
// from this one list in each CPU capability's CpuKernels (cpu/kernels.h) and in
// the CpuKernels the ops use (cpu/dispatch.h). Included inside those struct
// bodies, after layer_norm/common.h and the ATen headers: no include guard.

// Each row's mean (0 where rms) and rstd = 1 / sqrt(var + eps) (rms: the mean
// square for var), in the accumulate type, and
// output = (x - mean) * rstd * weight + bias; an undefined weight or bias
// counts as 1 or 0. With a residual (contiguous, the input's shape and dtype)
// x is input + residual, rounded to the input's dtype and written to `sum`.
static void forward(const Rows& input, const at::Tensor& residual, const at::Tensor& weight,
                    const at::Tensor& bias, double eps, bool rms, at::Tensor& output,
                    at::Tensor& sum, at::Tensor& mean, at::Tensor& rstd);
// The gradients that are defined on entry: grad_input from one pass over each
// row (plus grad_sum where defined: contiguous, the input's shape and dtype),
// grad_weight = sum over rows of dy * (x - mean) * rstd and grad_bias = sum of
// dy, added in an order fixed by the shape.
static void backward(const Rows& grad_out, const Rows& input, const at::Tensor& mean,
                     const at::Tensor& rstd, const at::Tensor& weight, bool rms,
                     const at::Tensor& grad_sum, at::Tensor& grad_input,
                     at::Tensor& grad_weight, at::Tensor& grad_bias);
