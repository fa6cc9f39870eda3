// CUDA kernels of masked_sgd_ and masked_adam_ (SPEC §1.5): torch.optim.SGD / AdamW steps on the
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

// params (in place), grads and masks checked; returns the lists with empty state slots.
TensorLists<kSlots> step_lists(at::TensorList params, at::TensorList grads,
                               const std::optional<at::TensorList>& masks, double ratio) {
  TORCH_CHECK_VALUE(!params.empty(), "params must hold at least one tensor");
  const at::Device device = params[0].device();
  TensorLists<kSlots> lists;
  lists[0] = checked_list("params", params, device, true, /*inplace=*/true);
  lists[1] = checked_list("grads", grads, device, true, false);
  check_matching("grads", lists[1], "params", lists[0], /*same_dtype=*/true);
  check_ratio(ratio);
  if (masks.has_value()) {
    lists[kMaskSlot] = checked_list("masks", *masks, device, false, false);
    for (size_t i = 0; i < lists[kMaskSlot].size(); ++i) {
      TORCH_CHECK_VALUE(lists[kMaskSlot][i].scalar_type() == at::kBool, "masks[", i, "] has dtype ",
                        lists[kMaskSlot][i].scalar_type(), "; supported: torch.bool");
    }
    check_matching("masks", lists[kMaskSlot], "params", lists[0], /*same_dtype=*/false);
  }
  return lists;
}

void state_list(TensorLists<kSlots>& lists, int slot, const char* name, at::TensorList xs) {
  lists[slot] = checked_list(name, xs, lists[0][0].device(), true, /*inplace=*/true);
  check_matching(name, lists[slot], "params", lists[0], /*same_dtype=*/true);
}

void check_hyper(const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, name, " must be finite and >= 0.0, got ", v);
}

void masked_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                     std::optional<at::TensorList> masks, double ratio, double lr, double momentum,
                     double dampening, double weight_decay, bool nesterov, bool maximize, double off_scale) {
  check_hyper("lr", lr);
  check_hyper("momentum", momentum);
  check_hyper("dampening", dampening);
  check_hyper("weight_decay", weight_decay);
  check_hyper("off_scale", off_scale);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0),
                    "nesterov requires momentum > 0 and dampening == 0");
  TensorLists<kSlots> lists = step_lists(params, grads, masks, ratio);
  // With momentum == 0 the buffers are never touched and may be an empty list.
  if (momentum != 0 || !momentum_buffers.empty()) state_list(lists, 2, "momentum_buffers", momentum_buffers);
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
  check_hyper("lr", lr);
  check_hyper("eps", eps);
  check_hyper("weight_decay", weight_decay);
  check_hyper("off_scale", off_scale);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1, got ", step);
  TensorLists<kSlots> lists = step_lists(params, grads, masks, ratio);
  state_list(lists, 2, "exp_avgs", exp_avgs);
  state_list(lists, 3, "exp_avg_sqs", exp_avg_sqs);
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
