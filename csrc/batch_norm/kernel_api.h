// A backend's kernels, the static methods ops.h composes, declared from this
// one list in CudaKernels (cuda/kernels.h), in each CPU capability's
// CpuKernels (cpu/kernels.h), which implement them, and in the CpuKernels the
// ops use (cpu/dispatch.h), which forwards each call to the capability chosen
// at run time. Included inside those struct bodies, after batch_norm/common.h
// and the ATen headers: no include guard, no includes.

// Biased per-channel variance and mean, in the accumulate type.
static void moments(const ChannelView& input, at::Tensor& mean, at::Tensor& var);
// invstd from var; updates the running stats when they are defined.
static void finalize(const at::Tensor& mean, const at::Tensor& var, double count,
                     const at::Tensor& running_mean, const at::Tensor& running_var,
                     double momentum, double eps, at::Tensor& invstd);
// moments then finalize, without a variance tensor: the training forward's statistics.
static void batch_stats(const ChannelView& input, const at::Tensor& running_mean,
                        const at::Tensor& running_var, double momentum, double eps,
                        at::Tensor& mean, at::Tensor& invstd);
// The eval statistics: running_mean and 1/sqrt(running_var + eps) in the accumulate type.
static void running_stats(const at::Tensor& running_mean, const at::Tensor& running_var,
                          double eps, at::Tensor& mean, at::Tensor& invstd);
// (x - mean) * invstd * weight + bias; an undefined mean, weight or bias
// counts as 0, 1 or 0. A fusion adds its residual and applies its activation.
static void normalize(const ChannelView& input, const at::Tensor& mean,
                      const at::Tensor& invstd, const at::Tensor& weight,
                      const at::Tensor& bias, at::Tensor& output, const Fusion& fusion = {});
// sum(dy) and sum(dy * (x - mean)) per channel, and from them the parameter
// gradients sum(dy * (x - mean)) * invstd and sum(dy) in their own dtype.
// Through a fusion, dz (common.h: FusedGrad) takes dy's place; where the
// backend's kReduceWritesGradResidual, dz is also written to fused.grad_residual
// when that is defined and the input is not the output (!fused.from_output).
static void backward_reduce(const ChannelView& grad_out, const ChannelView& input,
                            const at::Tensor& mean, const at::Tensor& invstd,
                            at::Tensor& sum_dy, at::Tensor& sum_dy_xmu,
                            at::Tensor& grad_weight, at::Tensor& grad_bias,
                            const FusedGrad& fused = {});
// The input gradient under batch statistics (math.h: grad_input); through a
// fusion, with dz for dy, and under running statistics where sum_dy is undefined.
static void backward_elemt(const ChannelView& grad_out, const ChannelView& input,
                           const at::Tensor& mean, const at::Tensor& invstd,
                           const at::Tensor& weight, const at::Tensor& sum_dy,
                           const at::Tensor& sum_dy_xmu, double count, at::Tensor& grad_input,
                           const FusedGrad& fused = {});
