// CUDA kernels of masked_sgd_ and masked_adam_: torch.optim.SGD / AdamW steps on the
// selected coordinates, the off_scale-scaled step elsewhere, fused over all layers.
//
// The mask is `masks` (one elementwise pass) or, when masks is None, the per-layer top-k of |grad|
// computed by the radix select of radix_select.cuh; its ordered walk applies the step directly, so no
// mask is materialised. The NaN/Inf check of the grads syncs before any parameter is written.
// With off_scale == 0 an unselected coordinate is not read or written at all (its param and state keep
// their bits). Arithmetic is float32 in the order of unlearn_ext/ops/reference.py as torch's CPU kernels
// evaluate it (addcmul: self + (value * t1) * t2, addcdiv: self + (value * t1) / t2, division by the
// bias-correction scalar); hyper-parameter scalars are formed in double, like Python, then cast to float.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "cuda/radix_select.cuh"
#include "masked_step.h"

namespace unlearn_ext {
namespace cuda {
namespace {

// Table slots: 0 param, 1 grad, 2 and 3 optimizer state (SGD: momentum buffer, -; Adam: exp_avg,
// exp_avg_sq), 4 mask.
constexpr int kSlots = 5;
constexpr int kMaskSlot = 4;
template <typename T>
using GradValue = RankedValue<T, 1>;

// One coordinate of an SGD step on the prepared gradient g (masked_step.h's arithmetic).
struct SgdUpdate {
  SgdCoeffs c;
  bool use_momentum, use_weight_decay, nesterov;
  template <typename scalar_t, int D>
  __device__ __forceinline__ void apply(const TensorTable<D>& tab, int t, int64_t i, float g) const {
    scalar_t* p = slot_ptr<scalar_t>(tab, 0, t);
    scalar_t* buf = use_momentum ? slot_ptr<scalar_t>(tab, 2, t) : nullptr;
    const SgdCoordinate out = sgd_coordinate(static_cast<float>(p[i]), buf ? static_cast<float>(buf[i]) : 0.f, g,
                                             c, use_momentum, nesterov, use_weight_decay);
    if (buf) buf[i] = static_cast<scalar_t>(out.momentum_buffer);
    p[i] = static_cast<scalar_t>(out.param);
  }
};

// One coordinate of an AdamW step on the prepared gradient g.
struct AdamUpdate {
  AdamCoeffs c;
  bool small_weight;
  template <typename scalar_t, int D>
  __device__ __forceinline__ void apply(const TensorTable<D>& tab, int t, int64_t i, float g) const {
    scalar_t* p = slot_ptr<scalar_t>(tab, 0, t);
    scalar_t* m = slot_ptr<scalar_t>(tab, 2, t);
    scalar_t* v = slot_ptr<scalar_t>(tab, 3, t);
    const AdamCoordinate out = adam_coordinate(static_cast<float>(p[i]), static_cast<float>(m[i]),
                                               static_cast<float>(v[i]), g, c, small_weight);
    m[i] = static_cast<scalar_t>(out.exp_avg);
    v[i] = static_cast<scalar_t>(out.exp_avg_sq);
    p[i] = static_cast<scalar_t>(out.param);
  }
};

// The step functor of both ops: an unselected coordinate is left alone under off_scale == 0, else its
// gradient (negated under maximize) is scaled by off_scale; then the optimizer's update.
template <typename scalar_t, typename Update>
struct MaskedStep {
  Update update;
  float off_scale;
  bool maximize, freeze_unselected;
  template <int D>
  __device__ __forceinline__ void operator()(const TensorTable<D>& tab, int t, int64_t i, bool selected, int64_t,
                                             float grad) const {
    if (!selected && freeze_unselected) return;
    float g = maximize ? -grad : grad;
    if (!selected) g = g * off_scale;
    update.template apply<scalar_t>(tab, t, i, g);
  }
};

// Given masks: one elementwise pass.
template <typename scalar_t, int D, typename Step>
__global__ void __launch_bounds__(kThreads) masked_step_kernel(const TensorTable<D> tab, const Step step) {
  const Chunk c = chunk_of_block(tab);
  const scalar_t* g = slot_ptr<const scalar_t>(tab, 1, c.t);
  const bool* mask = slot_ptr<const bool>(tab, kMaskSlot, c.t);
  for (int64_t i = c.begin + threadIdx.x; i < c.end; i += kThreads) {
    step(tab, c.t, i, mask[i], 0, static_cast<float>(g[i]));
  }
}

// MakeStep(scalar_t{}) returns the step functor of a dtype group.
template <typename MakeStep>
void run_step(const char* op, const TensorLists<kSlots>& lists, bool have_masks, double ratio, MakeStep&& make_step) {
  if (have_masks) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    for (const auto& group : dtype_groups<kSlots>(lists)) {
      dispatch_value_type(group.first, [&](auto tag) {
        using scalar_t = decltype(tag);
        const auto step = make_step(tag);
        multi_tensor_apply<kSlots>(lists, group.second, [&](const TensorTable<kSlots>& tab, int nc) {
          masked_step_kernel<scalar_t, kSlots, std::decay_t<decltype(step)>><<<nc, kThreads, 0, stream>>>(tab, step);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
    }
    return;
  }
  LayerSelection<GradValue, kSlots> sel(lists, ratio, /*largest=*/true);
  sel.compute();
  sel.check_finite(op, "grads");  // before anything is written
  sel.walk(make_step);
}

// The checked arguments in the table slots.
TensorLists<kSlots> step_lists(StepArgs&& a) {
  TensorLists<kSlots> lists;
  lists[0] = std::move(a.params);
  lists[1] = std::move(a.grads);
  for (size_t s = 0; s < a.state.size(); ++s) lists[2 + s] = std::move(a.state[s]);
  if (a.masks) lists[kMaskSlot] = std::move(*a.masks);
  return lists;
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     std::optional<at::TensorList> masks, double ratio, double lr, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize, double off_scale) {
  const TensorLists<kSlots> lists = step_lists(sgd_args(params, grads, momentum_buffers, masks, ratio, lr, momentum,
                                                        dampening, weight_decay, nesterov, off_scale));
  if (lists[0].empty()) return;
  const c10::cuda::CUDAGuard guard(lists[0][0].device());
  const SgdUpdate update{SgdCoeffs{static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                                  static_cast<float>(weight_decay), static_cast<float>(-lr)},
                        momentum != 0, weight_decay != 0, nesterov};
  run_step("masked_sgd_", lists, masks.has_value(), ratio, [&](auto tag) {
    return MaskedStep<decltype(tag), SgdUpdate>{update, static_cast<float>(off_scale), maximize, off_scale == 0};
  });
}

void masked_adam_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, std::optional<at::TensorList> masks, double ratio, double lr,
                      double beta1, double beta2, double eps, double weight_decay, int64_t step, bool maximize,
                      double off_scale) {
  const TensorLists<kSlots> lists = step_lists(adam_args(params, grads, exp_avgs, exp_avg_sqs, masks, ratio, lr,
                                                         beta1, beta2, eps, weight_decay, step, off_scale));
  if (lists[0].empty()) return;
  const c10::cuda::CUDAGuard guard(lists[0][0].device());
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2_sqrt = std::pow(1.0 - std::pow(beta2, static_cast<double>(step)), 0.5);
  const float w = static_cast<float>(1.0 - beta1);
  const AdamUpdate update{AdamCoeffs{static_cast<float>(1.0 - lr * weight_decay), w, static_cast<float>(beta2),
                                     static_cast<float>(1.0 - beta2), static_cast<float>(bias_correction2_sqrt),
                                     static_cast<float>(eps), static_cast<float>(-(lr / bias_correction1))},
                          std::fabs(w) < 0.5f};
  run_step("masked_adam_", lists, masks.has_value(), ratio, [&](auto tag) {
    return MaskedStep<decltype(tag), AdamUpdate>{update, static_cast<float>(off_scale), maximize, off_scale == 0};
  });
}

}  // namespace
}  // namespace cuda
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("masked_sgd_", &unlearn_ext::cuda::masked_sgd_cuda);
  m.impl("masked_adam_", &unlearn_ext::cuda::masked_adam_cuda);
}
