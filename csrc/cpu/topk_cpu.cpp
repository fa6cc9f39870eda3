// layerwise_topk and layerwise_topk_mask on the CPU (docs/algorithms.md#the-ops): the layer selection of
// radix_select.h and its ordered walk, which writes values/indices or masks.
#include <torch/library.h>

#include <type_traits>

#include "checks.h"
#include "cpu/radix_select.h"

namespace unlearn_ext {
namespace cpu {
namespace {

std::vector<Source> sources_of(const TopkArgs& a) {
  std::vector<Source> src;
  src.reserve(a.xs.size());
  for (size_t l = 0; l < a.xs.size(); ++l) {
    src.push_back({a.xs[l], a.subtract.empty() ? at::Tensor() : a.subtract[l]});
  }
  return src;
}

// The selection of `ratio` of each layer of `a`, computed and checked for NaN/Inf.
LayerSelection computed_selection(const TopkArgs& a, double ratio, bool largest, const char* op) {
  LayerSelection sel(sources_of(a), ratio, largest);
  sel.compute();
  sel.check_finite(op, a.subtract.empty() ? "xs" : "xs - subtract");
  return sel;
}

// Item j's selected entries, from position pos of the output: index and value (the source's dtype).
UE_CPU_CLONES void write_kept(const LayerSelection& sel, int64_t j, int64_t pos, int32_t* idx, void* out) {
  visit_ranked_value(sel.source(sel.plan().items[j].layer), [&](const auto& val) {
    using T = typename std::decay_t<decltype(val)>::value_type;
    T* o = static_cast<T*>(out);
    sel.scan_kept(j, val, [&](int64_t i) {
      idx[pos] = static_cast<int32_t>(i);
      o[pos] = static_cast<T>(val(i));
      ++pos;
    });
  });
}

// Item j's part of its layer's mask.
UE_CPU_CLONES void write_mask(const LayerSelection& sel, int64_t j, bool* m) {
  visit_ranked_value(sel.source(sel.plan().items[j].layer), [&](const auto& val) {
    sel.scan(j, val, [&](int64_t i, float, bool keep) { m[i] = keep; });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layerwise_topk_cpu(at::TensorList xs_in, double ratio, bool largest,
                                                                  std::optional<at::TensorList> subtract) {
  const TopkArgs a = topk_args("layerwise_topk", xs_in, ratio, subtract);
  const LayerSelection sel = computed_selection(a, ratio, largest, "layerwise_topk");
  const ChunkPlan& plan = sel.plan();
  const int64_t L = static_cast<int64_t>(a.xs.size());
  at::Tensor offsets = at::empty({L + 1}, at::kLong);
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t l = 0; l < L; ++l) off[l + 1] = off[l] + sel.kept(l);
  // Where each item's selection starts in the output.
  std::vector<int64_t> base(plan.size());
  for (int64_t l = 0; l < L; ++l) {
    int64_t pos = off[l];
    for (int64_t j = plan.first_item[l]; j < plan.first_item[l + 1]; ++j) {
      base[j] = pos;
      pos += sel.kept_in_item(j);
    }
  }

  const auto dtype = L ? a.xs[0].scalar_type() : at::kFloat;
  at::Tensor values = at::empty({off[L]}, at::TensorOptions(dtype));
  at::Tensor indices = at::empty({off[L]}, at::kInt);
  int32_t* idx = indices.data_ptr<int32_t>();
  void* out = values.data_ptr();
  parallel_dynamic(plan.size(), plan.total, [&](int64_t j) { write_kept(sel, j, base[j], idx, out); });
  return {values, indices, offsets};
}

std::vector<at::Tensor> layerwise_topk_mask_cpu(at::TensorList xs_in, double ratio, bool largest) {
  const TopkArgs a = topk_args("layerwise_topk_mask", xs_in, ratio, std::nullopt);
  const LayerSelection sel = computed_selection(a, ratio, largest, "layerwise_topk_mask");
  std::vector<at::Tensor> masks;
  masks.reserve(a.xs.size());
  for (const at::Tensor& x : a.xs) masks.push_back(at::empty(x.sizes(), x.options().dtype(at::kBool)));
  const ChunkPlan& plan = sel.plan();
  parallel_dynamic(plan.size(), plan.total,
                   [&](int64_t j) { write_mask(sel, j, masks[plan.items[j].layer].data_ptr<bool>()); });
  return masks;
}

}  // namespace
}  // namespace cpu
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("layerwise_topk", &unlearn_ext::cpu::layerwise_topk_cpu);
  m.impl("layerwise_topk_mask", &unlearn_ext::cpu::layerwise_topk_mask_cpu);
}
