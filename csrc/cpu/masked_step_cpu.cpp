// masked_sgd_ and masked_adam_ on the CPU: one fused pass per layer chunk, the per-coordinate
// arithmetic of masked_step.h (shared with the CUDA kernels). The loops are branch-free (a data-dependent
// branch on a 50% mask mispredicts half the time): every coordinate is computed and an unselected one
// under off_scale == 0 gets its own loaded bits stored back, so it stays bitwise unchanged. The
// hyper-parameter switches are template arguments, so the per-element body has no branches and vectorises.
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <type_traits>

#include "checks.h"
#include "cpu/multi_tensor.h"
#include "cpu/radix_select.h"
#include "masked_step.h"

namespace unlearn_ext {
namespace cpu {
namespace {

// Builds the top-|grad| selection when no masks are given (refusing NaN/Inf before anything is written),
// then runs step(i, g, selected) over every element. `make_step(layer, T{})` returns the step for a layer
// of dtype T.
template <class MakeStep>
void run_masked_step(const char* op, const StepArgs& a, double ratio, const MakeStep& make_step) {
  std::optional<LayerSelection> sel;
  std::optional<ChunkPlan> own_plan;
  if (a.masks) {
    std::vector<int64_t> sizes;
    for (const at::Tensor& p : a.params) sizes.push_back(p.numel());
    own_plan.emplace(sizes);
  } else {
    std::vector<Source> src;
    for (const at::Tensor& g : a.grads) src.push_back({g, at::Tensor()});
    sel.emplace(std::move(src), ratio, /*largest=*/true);
    sel->compute();
    sel->check_finite(op, "grads");
  }
  const ChunkPlan& plan = sel ? sel->plan() : *own_plan;
  parallel_dynamic(plan.size(), plan.total, [&](int64_t j) {
    const Item& it = plan.items[j];
    dispatch_value_type(a.params[it.layer].scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      const auto step = make_step(it.layer, T{});
      const RankedValue<T> grad{a.grads[it.layer].const_data_ptr<T>(), nullptr};
      if (sel) {
        sel->scan(j, grad, step);
      } else {
        // Read as bytes and compared: GCC does not vectorise a loop that loads bool.
        const auto* m = reinterpret_cast<const uint8_t*>((*a.masks)[it.layer].const_data_ptr<bool>());
        for (int64_t i = it.begin; i < it.end; ++i) step(i, grad(i), m[i] != 0);
      }
    });
  });
}

// `take ? a : b` by bit masking, so that the compiler emits no branch (and can vectorise); exact for
// every bit pattern.
template <typename T>
inline T select_bits(bool take, T a, T b) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>;
  static_assert(sizeof(T) == sizeof(U), "float32/float16/bfloat16 only");
  U ua, ub;
  std::memcpy(&ua, &a, sizeof(U));
  std::memcpy(&ub, &b, sizeof(U));
  const U m = static_cast<U>(U{0} - static_cast<U>(take));
  const U r = static_cast<U>((ua & m) | (ub & static_cast<U>(~m)));
  T out;
  std::memcpy(&out, &r, sizeof(U));
  return out;
}

template <bool B>
using Flag = std::integral_constant<bool, B>;

// f(Flag<a>{}, Flag<b>{}, Flag<c>{}) for the runtime values a, b, c.
template <class F>
void with_flags(bool a, bool b, bool c, const F& f) {
  auto with_c = [&](auto fa, auto fb) { c ? f(fa, fb, Flag<true>{}) : f(fa, fb, Flag<false>{}); };
  auto with_b = [&](auto fa) { b ? with_c(fa, Flag<true>{}) : with_c(fa, Flag<false>{}); };
  a ? with_b(Flag<true>{}) : with_b(Flag<false>{});
}

void masked_sgd_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                    std::optional<at::TensorList> masks, double ratio, double lr, double momentum, double dampening,
                    double weight_decay, bool nesterov, bool maximize, double off_scale) {
  const StepArgs a = sgd_args(params, grads, momentum_buffers, masks, ratio, lr, momentum, dampening, weight_decay,
                              nesterov, off_scale);
  const bool use_momentum = momentum != 0.0;
  const bool frozen_off = off_scale == 0.0;
  const SgdCoeffs c{static_cast<float>(momentum), static_cast<float>(1.0 - dampening),
                    static_cast<float>(weight_decay), static_cast<float>(-lr)};
  const float off = static_cast<float>(off_scale), sign = maximize ? -1.0f : 1.0f;
  with_flags(use_momentum, use_momentum && nesterov, weight_decay != 0.0, [&](auto M, auto N, auto D) {
    constexpr bool kMomentum = decltype(M)::value, kNesterov = decltype(N)::value, kDecay = decltype(D)::value;
    run_masked_step("masked_sgd_", a, ratio, [&](int64_t l, auto tag) {
      using T = decltype(tag);
      T* p = a.params[l].data_ptr<T>();
      T* buf = kMomentum ? a.state[0][l].data_ptr<T>() : nullptr;
      return [=](int64_t i, float g, bool selected) __attribute__((always_inline)) {
        const bool moves = selected | !frozen_off;
        g = g * sign * select_bits(selected, 1.0f, off);  // maximize, off_scale (x +-1 is exact)
        const T p_old = p[i];
        const T b_old = kMomentum ? buf[i] : T{};
        const SgdCoordinate out = sgd_coordinate(static_cast<float>(p_old), static_cast<float>(b_old), g, c,
                                                 kMomentum, kNesterov, kDecay);
        if constexpr (kMomentum) buf[i] = select_bits(moves, static_cast<T>(out.momentum_buffer), b_old);
        p[i] = select_bits(moves, static_cast<T>(out.param), p_old);
      };
    });
  });
}

void masked_adam_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     std::optional<at::TensorList> masks, double ratio, double lr, double beta1, double beta2,
                     double eps, double weight_decay, int64_t step, bool maximize, double off_scale) {
  const StepArgs a = adam_args(params, grads, exp_avgs, exp_avg_sqs, masks, ratio, lr, beta1, beta2, eps,
                               weight_decay, step, off_scale);
  // Python's float ** is C pow, so these doubles match torch.optim.AdamW's bit for bit.
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bias_correction2_sqrt = std::pow(1.0 - std::pow(beta2, static_cast<double>(step)), 0.5);
  const bool frozen_off = off_scale == 0.0;
  const float w = static_cast<float>(1.0 - beta1);
  const AdamCoeffs c{static_cast<float>(1.0 - lr * weight_decay), w, static_cast<float>(beta2),
                     static_cast<float>(1.0 - beta2), static_cast<float>(bias_correction2_sqrt),
                     static_cast<float>(eps), static_cast<float>(-(lr / bias_correction1))};
  const float off = static_cast<float>(off_scale), sign = maximize ? -1.0f : 1.0f;
  with_flags(std::abs(w) < 0.5f, false, false, [&](auto SW, auto, auto) {
    constexpr bool kSmallWeight = decltype(SW)::value;
    run_masked_step("masked_adam_", a, ratio, [&](int64_t l, auto tag) {
      using T = decltype(tag);
      T* p = a.params[l].data_ptr<T>();
      T* m1 = a.state[0][l].data_ptr<T>();
      T* m2 = a.state[1][l].data_ptr<T>();
      return [=](int64_t i, float g, bool selected) __attribute__((always_inline)) {
        const bool moves = selected | !frozen_off;
        g = g * sign * select_bits(selected, 1.0f, off);
        const T p_old = p[i], a_old = m1[i], s_old = m2[i];
        const AdamCoordinate out = adam_coordinate(static_cast<float>(p_old), static_cast<float>(a_old),
                                                   static_cast<float>(s_old), g, c, kSmallWeight);
        m1[i] = select_bits(moves, static_cast<T>(out.exp_avg), a_old);
        m2[i] = select_bits(moves, static_cast<T>(out.exp_avg_sq), s_old);
        p[i] = select_bits(moves, static_cast<T>(out.param), p_old);
      };
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("masked_sgd_", &unlearn_ext::cpu::masked_sgd_cpu);
  m.impl("masked_adam_", &unlearn_ext::cpu::masked_adam_cpu);
}
