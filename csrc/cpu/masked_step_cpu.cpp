// masked_sgd_ and masked_adam_ on the CPU (SPEC §1.5): one fused pass per layer chunk, float32
// arithmetic in the reference's (= torch.optim's) operation order, each scalar rounded to float32 as torch
// does for a Python scalar. With off_scale == 0 an unselected coordinate is not even written.
#include <torch/library.h>

#include <cmath>
#include <optional>

#include "cpu/common_cpu.h"

namespace unlearn_ext {
namespace cpu {
namespace {

// Checks masks (or builds the top-|grad| selection, refusing NaN/Inf) before anything is written, then
// runs step(i, g, selected) over every element. `make_step(layer, T{})` returns the step for a layer
// of dtype T.
template <class MakeStep>
void run_masked_step(const char* op, at::TensorList params, at::TensorList grads,
                     const std::optional<at::TensorList>& masks, double ratio, const MakeStep& make_step) {
  check_ratio(op, ratio);
  if (masks) check_pairs(op, "masks", *masks, "params", params, at::kBool);
  std::optional<LayerwiseSelection> sel;
  std::optional<ChunkPlan> own_plan;
  if (masks) {
    std::vector<int64_t> sizes;
    for (const at::Tensor& p : params) sizes.push_back(p.numel());
    own_plan.emplace(sizes);
  } else {
    std::vector<Source> src;
    for (const at::Tensor& g : grads) src.push_back({g, at::Tensor()});
    sel.emplace(std::move(src), ratio, /*largest=*/true, op, "grads");
  }
  const ChunkPlan& plan = sel ? sel->plan() : *own_plan;
  parallel_dynamic(plan.size(), plan.total, [&](int64_t j) {
    const Item& it = plan.items[j];
    UE_DISPATCH_FLOATS(params[it.layer].scalar_type(), "unlearn_ext_masked_step", [&] {
      const auto step = make_step(it.layer, scalar_t{});
      const PlainReader<scalar_t> grad{grads[it.layer].const_data_ptr<scalar_t>()};
      if (sel) {
        sel->scan(j, grad, step);
      } else {
        const bool* m = (*masks)[it.layer].const_data_ptr<bool>();
        for (int64_t i = it.begin; i < it.end; ++i) step(i, grad(i), m[i]);
      }
    });
  });
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    std::optional<at::TensorList> masks, double ratio, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool maximize, double off_scale) {
  constexpr const char* op = "masked_sgd_";
  check_value_list(op, "params", params, /*same_dtype=*/false);
  check_pairs(op, "grads", grads, "params", params);
  const bool use_momentum = momentum != 0.0;
  if (use_momentum || !momentum_buffers.empty()) check_pairs(op, "momentum_buffers", momentum_buffers, "params", params);
  const bool scale_off = off_scale != 1.0, frozen_off = off_scale == 0.0, decay = weight_decay != 0.0;
  const float mom = static_cast<float>(momentum), keep_d = static_cast<float>(1.0 - dampening),
              wd = static_cast<float>(weight_decay), neg_lr = static_cast<float>(-lr),
              off = static_cast<float>(off_scale);
  run_masked_step(op, params, grads, masks, ratio, [&](int64_t l, auto tag) {
    using T = decltype(tag);
    T* p = params[l].data_ptr<T>();
    T* buf = use_momentum ? momentum_buffers[l].data_ptr<T>() : nullptr;
    return [=](int64_t i, float g, bool selected) {
      if (!selected && frozen_off) return;
      if (maximize) g = -g;
      if (!selected && scale_off) g = g * off;
      const float pv = static_cast<float>(p[i]);
      float d = g;
      if (decay) d = d + wd * pv;
      if (use_momentum) {
        const float b = static_cast<float>(buf[i]) * mom + keep_d * d;
        buf[i] = static_cast<T>(b);
        d = nesterov ? d + mom * b : b;
      }
      p[i] = static_cast<T>(pv + neg_lr * d);
    };
  });
}

void masked_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     std::optional<at::TensorList> masks, double ratio, double lr, double beta1, double beta2,
                     double eps, double weight_decay, int64_t step, bool maximize, double off_scale) {
  constexpr const char* op = "masked_adam_";
  check_value_list(op, "params", params, /*same_dtype=*/false);
  check_pairs(op, "grads", grads, "params", params);
  check_pairs(op, "exp_avgs", exp_avgs, "params", params);
  check_pairs(op, "exp_avg_sqs", exp_avg_sqs, "params", params);
  TORCH_CHECK_VALUE(step >= 1, op, ": step must be >= 1, got ", step);
  // Python's float ** is C pow, so these doubles match torch.optim.AdamW's bit for bit.
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2_sqrt = std::pow(1.0 - std::pow(beta2, static_cast<double>(step)), 0.5);
  const bool scale_off = off_scale != 1.0, frozen_off = off_scale == 0.0;
  const float decay = static_cast<float>(1.0 - lr * weight_decay), w = static_cast<float>(1.0 - beta1),
              b2 = static_cast<float>(beta2), one_minus_b2 = static_cast<float>(1.0 - beta2),
              bc2 = static_cast<float>(bias_correction2_sqrt), eps_f = static_cast<float>(eps),
              neg_step = static_cast<float>(-(lr / bias_correction1)), off = static_cast<float>(off_scale);
  const bool small_w = std::abs(w) < 0.5f;
  run_masked_step(op, params, grads, masks, ratio, [&](int64_t l, auto tag) {
    using T = decltype(tag);
    T* p = params[l].data_ptr<T>();
    T* m1 = exp_avgs[l].data_ptr<T>();
    T* m2 = exp_avg_sqs[l].data_ptr<T>();
    return [=](int64_t i, float g, bool selected) {
      if (!selected && frozen_off) return;
      if (maximize) g = -g;
      if (!selected && scale_off) g = g * off;
      const float pv = static_cast<float>(p[i]) * decay;
      const float a = static_cast<float>(m1[i]);
      // torch's lerp: the form that is exact at the nearer end of the weight.
      const float ea = small_w ? a + w * (g - a) : g - (g - a) * (1.0f - w);
      const float eas = static_cast<float>(m2[i]) * b2 + one_minus_b2 * g * g;
      const float denom = std::sqrt(eas) / bc2 + eps_f;
      m1[i] = static_cast<T>(ea);
      m2[i] = static_cast<T>(eas);
      p[i] = static_cast<T>(pv + neg_step * ea / denom);
    };
  });
}

}  // namespace
}  // namespace cpu
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("masked_sgd_", &unlearn_ext::cpu::masked_sgd_cpu);
  m.impl("masked_adam_", &unlearn_ext::cpu::masked_adam_cpu);
}
