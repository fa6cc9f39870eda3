// Argument checks and value-dtype dispatch of the ops, one set for the CPU and the CUDA kernels (host code
// only). Every failure is a ValueError (TORCH_CHECK_VALUE) whose message starts with the op and names the
// argument and position, e.g. "masked_sgd_: grads[2] has shape [3] but params[2] has [4]", so that a bad call
// reads the same on either device. unlearn_ext/ops/checks.py makes the same checks in Python for the
// reference back-end. Every check runs before the kernel touches a device (or a device guard).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace unlearn_ext {

// The value dtypes of the ops: float32, float16, bfloat16; arithmetic happens in float32.
inline bool is_value_type(at::ScalarType st) {
  return st == at::kFloat || st == at::kHalf || st == at::kBFloat16;
}

// fn(scalar_t{}) for a value dtype. Callers check the dtype first, so the default branch is a guard only.
template <typename Fn>
void dispatch_value_type(at::ScalarType st, Fn&& fn) {
  switch (st) {
    case at::kFloat: fn(float{}); break;
    case at::kHalf: fn(c10::Half{}); break;
    case at::kBFloat16: fn(c10::BFloat16{}); break;
    default: TORCH_CHECK_VALUE(false, "unsupported dtype ", st, "; supported: float32, float16, bfloat16");
  }
}

// What a tensor list may hold.
enum class Dtypes { kValues, kSameValues, kBool };  // kSameValues: value dtypes, all that of element 0
// Read-only tensors are made contiguous (a copy); tensors written in place must already be contiguous.
enum class Access { kRead, kWrite };

// The checks of one op call; `op` prefixes every message.
class ArgChecks {
 public:
  explicit ArgChecks(const char* op) : op_(op) {}

  // The keep ratio r of the selection rule: 0 < r <= 1 (NaN fails both comparisons).
  void ratio(double r) const {
    TORCH_CHECK_VALUE(r > 0.0 && r <= 1.0, op_, ": ratio must be in (0, 1], got ", r);
  }

  void finite(const char* name, double v) const {
    TORCH_CHECK_VALUE(std::isfinite(v), op_, ": ", name, " must be finite, got ", v);
  }

  // Hyper-parameters given as (name, value) pairs: each finite and >= 0.
  void non_negative(std::initializer_list<std::pair<const char*, double>> values) const {
    for (const auto& [name, v] : values) {
      TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0.0, op_, ": ", name, " must be finite and >= 0.0, got ", v);
    }
  }

  // A moment coefficient of Adam: 0 <= v < 1.
  void beta(const char* name, double v) const {
    TORCH_CHECK_VALUE(v >= 0.0 && v < 1.0, op_, ": ", name, " must be in [0, 1), got ", v);
  }

  void not_empty(const char* name, at::TensorList xs) const {
    TORCH_CHECK_VALUE(!xs.empty(), op_, ": ", name, " must hold at least one tensor");
  }

  // A list of layers (at most 2**31 - 1 elements each: indices are int32) on `device` (the device of
  // `device_owner`, e.g. "xs[0]"); returns the tensors, read-only ones made contiguous.
  std::vector<at::Tensor> layers(const char* name, at::TensorList xs, Dtypes dtypes, Access access,
                                 const at::Device& device, const std::string& device_owner) const {
    std::vector<at::Tensor> out;
    out.reserve(xs.size());
    for (size_t i = 0; i < xs.size(); ++i) {
      const at::Tensor& x = xs[i];
      TORCH_CHECK_VALUE(x.defined(), op_, ": ", name, "[", i, "] is undefined");
      dtype(name, i, x, dtypes, xs[0]);
      TORCH_CHECK_VALUE(x.numel() <= std::numeric_limits<int32_t>::max(), op_, ": ", name, "[", i, "] has ",
                        x.numel(), " elements; at most 2**31 - 1 are supported (indices are int32)");
      TORCH_CHECK_VALUE(x.device() == device, op_, ": ", name, "[", i, "] is on ", x.device(), " but ",
                        device_owner, " is on ", device);
      TORCH_CHECK_VALUE(access == Access::kRead || x.is_contiguous(), op_, ": ", name, "[", i,
                        "] is not contiguous; it is written in place, so pass a contiguous tensor");
      out.push_back(x.contiguous());
    }
    return out;
  }

  // `xs` pairs up with `refs`: same length and shapes, and dtypes too when `same_dtype`.
  void matching(const char* name, const std::vector<at::Tensor>& xs, const char* ref_name,
                const std::vector<at::Tensor>& refs, bool same_dtype) const {
    TORCH_CHECK_VALUE(xs.size() == refs.size(), op_, ": ", name, " has ", xs.size(), " tensors but ", ref_name,
                      " has ", refs.size());
    for (size_t i = 0; i < xs.size(); ++i) {
      TORCH_CHECK_VALUE(xs[i].sizes() == refs[i].sizes(), op_, ": ", name, "[", i, "] has shape ", xs[i].sizes(),
                        " but ", ref_name, "[", i, "] has ", refs[i].sizes());
      TORCH_CHECK_VALUE(!same_dtype || xs[i].scalar_type() == refs[i].scalar_type(), op_, ": ", name, "[", i,
                        "] has dtype ", xs[i].scalar_type(), " but ", ref_name, "[", i, "] has ",
                        refs[i].scalar_type());
    }
  }

  // A 1-D tensor of dtype `want` (or of a value dtype when `want` is undefined) on `device`; returned
  // contiguous.
  at::Tensor vector(const char* name, const at::Tensor& t, std::optional<at::ScalarType> want,
                    const at::Device& device, const std::string& device_owner) const {
    TORCH_CHECK_VALUE(t.defined(), op_, ": ", name, " is undefined");
    const bool ok_dtype = want ? t.scalar_type() == *want : is_value_type(t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && ok_dtype, op_, ": ", name, " must be a 1-D tensor of dtype ",
                      want ? c10::toString(*want) : "float32, float16 or bfloat16", ", got ", t.dim(), "-D ",
                      t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == device, op_, ": ", name, " is on ", t.device(), " but ", device_owner,
                      " is on ", device);
    return t.contiguous();
  }

  // No two tensors written in place share memory (one tensor twice, or overlapping views of one storage):
  // the kernels would read values the same call has already changed, and the CUDA ones would race.
  // `lists` are (name, contiguous tensors) pairs, all on one device.
  void disjoint(const std::vector<std::pair<const char*, const std::vector<at::Tensor>*>>& lists) const {
    struct Span {
      uintptr_t begin, end;
      const char* name;
      size_t i;
    };
    std::vector<Span> spans;
    for (const auto& [name, xs] : lists) {
      for (size_t i = 0; i < xs->size(); ++i) {
        const at::Tensor& x = (*xs)[i];
        if (x.numel() == 0) continue;
        const auto begin = reinterpret_cast<uintptr_t>(x.const_data_ptr());
        spans.push_back({begin, begin + x.nbytes(), name, i});
      }
    }
    // Equal starts keep the argument order, so the message names the earlier argument first.
    std::stable_sort(spans.begin(), spans.end(), [](const Span& a, const Span& b) { return a.begin < b.begin; });
    // Sweep in address order: a span overlaps an earlier one iff it starts before the furthest end so far.
    for (size_t j = 1, far = 0; j < spans.size(); ++j) {
      const Span &a = spans[far], &b = spans[j];
      TORCH_CHECK_VALUE(b.begin >= a.end, op_, ": ", a.name, "[", a.i, "] and ", b.name, "[", b.i,
                        "] share memory (the same tensor twice or overlapping views); tensors written in "
                        "place must not overlap");
      if (b.end > a.end) far = j;
    }
  }

 private:
  void dtype(const char* name, size_t i, const at::Tensor& x, Dtypes dtypes, const at::Tensor& first) const {
    if (dtypes == Dtypes::kBool) {
      TORCH_CHECK_VALUE(x.scalar_type() == at::kBool, op_, ": ", name, "[", i, "] has dtype ", x.scalar_type(),
                        "; supported: bool");
      return;
    }
    TORCH_CHECK_VALUE(is_value_type(x.scalar_type()), op_, ": ", name, "[", i, "] has dtype ", x.scalar_type(),
                      "; supported: float32, float16, bfloat16");
    TORCH_CHECK_VALUE(dtypes != Dtypes::kSameValues || x.scalar_type() == first.scalar_type(), op_, ": ", name,
                      "[", i, "] has dtype ", x.scalar_type(), " but ", name, "[0] has ", first.scalar_type());
  }

  const char* op_;
};

// ---- the arguments of each op, checked (the same function for both devices) -------------------------

// The device a call runs on: that of the first tensor of its leading list (CPU for an empty list).
inline at::Device leading_device(at::TensorList xs) {
  return xs.empty() || !xs[0].defined() ? at::Device(at::kCPU) : xs[0].device();
}

// layerwise_topk / layerwise_topk_mask: xs of one value dtype; subtract (empty when not given) pairs up.
struct TopkArgs {
  std::vector<at::Tensor> xs, subtract;
};

inline TopkArgs topk_args(const char* op, at::TensorList xs, double ratio,
                          const std::optional<at::TensorList>& subtract) {
  const ArgChecks check(op);
  const at::Device device = leading_device(xs);
  TopkArgs a;
  a.xs = check.layers("xs", xs, Dtypes::kSameValues, Access::kRead, device, "xs[0]");
  check.ratio(ratio);
  if (subtract) {
    a.subtract = check.layers("subtract", *subtract, Dtypes::kValues, Access::kRead, device, "xs[0]");
    check.matching("subtract", a.subtract, "xs", a.xs, /*same_dtype=*/true);
  }
  return a;
}

// sparse_accumulate_: the metadata of the batch. The data checks (offsets start at 0, never decrease and
// end at len(values); indices inside their layers) read the offsets and indices, so each device makes
// them its own way, with the messages of accumulate_data_error.
struct AccumulateArgs {
  std::vector<at::Tensor> dense;
  at::Tensor values, indices, offsets;
};

inline AccumulateArgs accumulate_args(at::TensorList dense, const at::Tensor& values, const at::Tensor& indices,
                                      const at::Tensor& offsets, double alpha) {
  const ArgChecks check("sparse_accumulate_");
  check.not_empty("dense", dense);
  const at::Device device = leading_device(dense);
  AccumulateArgs a;
  a.dense = check.layers("dense", dense, Dtypes::kValues, Access::kWrite, device, "dense[0]");
  check.disjoint({{"dense", &a.dense}});
  check.finite("alpha", alpha);
  a.values = check.vector("values", values, std::nullopt, device, "dense[0]");
  a.indices = check.vector("indices", indices, at::kInt, device, "dense[0]");
  a.offsets = check.vector("offsets", offsets, at::kLong, device, "dense[0]");
  TORCH_CHECK_VALUE(values.numel() == indices.numel(), "sparse_accumulate_: values has ", values.numel(),
                    " entries but indices has ", indices.numel());
  TORCH_CHECK_VALUE(offsets.numel() >= 1, "sparse_accumulate_: offsets must have at least one entry (0)");
  const int64_t segments = offsets.numel() - 1, L = static_cast<int64_t>(dense.size());
  TORCH_CHECK_VALUE(segments % L == 0, "sparse_accumulate_: offsets has ", segments,
                    " segments, not a multiple of len(dense) = ", L);
  return a;
}

// The data errors of sparse_accumulate_, found by either device's scan of offsets and indices.
struct AccumulateDataError {
  // offsets[0] and offsets[S] must be 0 and len(values).
  static void span(int64_t first, int64_t last, int64_t nvals) {
    TORCH_CHECK_VALUE(first == 0 && last == nvals, "sparse_accumulate_: offsets must start at 0 and end at "
                      "len(values) = ", nvals, ", got ", first, " ... ", last);
  }
  [[noreturn]] static void decreasing(int64_t segment, int64_t lo, int64_t hi) {
    TORCH_CHECK_VALUE(false, "sparse_accumulate_: offsets decrease at segment ", segment, " (", lo, " > ", hi,
                      ")");
    __builtin_unreachable();
  }
  [[noreturn]] static void out_of_range(int64_t segment, int64_t L, int64_t numel) {
    TORCH_CHECK_VALUE(false, "sparse_accumulate_: indices of segment ", segment, " (layer ", segment % L,
                      ") out of range [0, ", numel, ")");
    __builtin_unreachable();
  }
};

// masked_sgd_ / masked_adam_: params (written in place) of value dtypes, grads and optimizer state of the
// params' dtypes and shapes, bool masks, no two written tensors sharing memory. `state` is empty for
// masked_sgd_ with momentum == 0 and no buffers.
struct StepArgs {
  std::vector<at::Tensor> params, grads;
  std::vector<std::vector<at::Tensor>> state;
  std::optional<std::vector<at::Tensor>> masks;  // none: select the top-|grad| per layer
};

inline StepArgs step_args(const char* op, at::TensorList params, at::TensorList grads,
                          const std::vector<std::pair<const char*, at::TensorList>>& state,
                          const std::optional<at::TensorList>& masks, double ratio) {
  const ArgChecks check(op);
  const at::Device device = leading_device(params);
  StepArgs a;
  a.params = check.layers("params", params, Dtypes::kValues, Access::kWrite, device, "params[0]");
  a.grads = check.layers("grads", grads, Dtypes::kValues, Access::kRead, device, "params[0]");
  check.matching("grads", a.grads, "params", a.params, /*same_dtype=*/true);
  check.ratio(ratio);
  std::vector<std::pair<const char*, const std::vector<at::Tensor>*>> written = {{"params", &a.params}};
  a.state.reserve(state.size());  // `written` points into it
  for (const auto& [name, xs] : state) {
    a.state.push_back(check.layers(name, xs, Dtypes::kValues, Access::kWrite, device, "params[0]"));
    check.matching(name, a.state.back(), "params", a.params, /*same_dtype=*/true);
    written.push_back({name, &a.state.back()});
  }
  if (masks) {
    a.masks = check.layers("masks", *masks, Dtypes::kBool, Access::kRead, device, "params[0]");
    check.matching("masks", *a.masks, "params", a.params, /*same_dtype=*/false);
  }
  check.disjoint(written);
  return a;
}

inline StepArgs sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         const std::optional<at::TensorList>& masks, double ratio, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, double off_scale) {
  const char* op = "masked_sgd_";
  const ArgChecks check(op);
  check.non_negative({{"lr", lr}, {"momentum", momentum}, {"dampening", dampening}, {"weight_decay", weight_decay},
                      {"off_scale", off_scale}});
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0 && dampening == 0), op,
                    ": nesterov requires momentum > 0 and dampening == 0");
  // With momentum == 0 the buffers are never touched and may be an empty list.
  if (momentum == 0.0 && momentum_buffers.empty()) return step_args(op, params, grads, {}, masks, ratio);
  return step_args(op, params, grads, {{"momentum_buffers", momentum_buffers}}, masks, ratio);
}

inline StepArgs adam_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, const std::optional<at::TensorList>& masks, double ratio,
                          double lr, double beta1, double beta2, double eps, double weight_decay, int64_t step,
                          double off_scale) {
  const char* op = "masked_adam_";
  const ArgChecks check(op);
  check.non_negative({{"lr", lr}, {"eps", eps}, {"weight_decay", weight_decay}, {"off_scale", off_scale}});
  check.beta("beta1", beta1);
  check.beta("beta2", beta2);
  TORCH_CHECK_VALUE(step >= 1, op, ": step must be >= 1, got ", step);
  return step_args(op, params, grads, {{"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}}, masks, ratio);
}

}  // namespace unlearn_ext
