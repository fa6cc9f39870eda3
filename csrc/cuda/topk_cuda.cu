// CUDA kernels of layerwise_topk and layerwise_topk_mask (docs/algorithms.md#the-ops). The selection is the
// multi-layer radix select of radix_select.cuh; these ops only add the sinks of its ordered walk.
// Output sizes follow from the layer sizes and the ratio, so the only host sync is the NaN/Inf check
// at the end.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cuda/radix_select.cuh"

namespace unlearn_ext {
namespace cuda {
namespace {

template <typename T>
using XValue = RankedValue<T, 0>;
template <typename T>
using DiffValue = RankedValue<T, 0, 1>;  // xs - subtract

// Selected entries: signed value and flat index, at their output position.
template <typename scalar_t>
struct CompactSink {
  scalar_t* values;
  int32_t* indices;
  template <int D>
  __device__ __forceinline__ void operator()(const TensorTable<D>&, int, int64_t i, bool selected, int64_t pos,
                                             float v) const {
    if (selected) {
      values[pos] = static_cast<scalar_t>(v);  // exact: v is a value of scalar_t
      indices[pos] = static_cast<int32_t>(i);
    }
  }
};

// The bool mask in slot 1.
struct MaskSink {
  template <int D>
  __device__ __forceinline__ void operator()(const TensorTable<D>& tab, int t, int64_t i, bool selected, int64_t,
                                             float) const {
    slot_ptr<bool>(tab, 1, t)[i] = selected;
  }
};

template <template <typename> class Src>
std::tuple<at::Tensor, at::Tensor, at::Tensor> topk(const TensorLists<2>& lists, double ratio, bool largest,
                                                    const char* name) {
  LayerSelection<Src, 2> sel(lists, ratio, largest);
  const auto opts = lists[0][0].options();
  at::Tensor values = at::empty({sel.total()}, opts);
  at::Tensor indices = at::empty({sel.total()}, opts.dtype(at::kInt));
  sel.compute();
  sel.walk([&](auto tag) {
    using scalar_t = decltype(tag);
    return CompactSink<scalar_t>{static_cast<scalar_t*>(values.data_ptr()), indices.data_ptr<int32_t>()};
  });
  sel.check_finite("layerwise_topk", name);
  return {values, indices, sel.offsets()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layerwise_topk_cuda(at::TensorList xs, double ratio, bool largest,
                                                                   std::optional<at::TensorList> subtract) {
  ArgChecks("layerwise_topk").not_empty("xs", xs);
  TopkArgs a = topk_args("layerwise_topk", xs, ratio, subtract);
  const c10::cuda::CUDAGuard guard(a.xs[0].device());
  TensorLists<2> lists{std::move(a.xs), std::move(a.subtract)};
  if (lists[1].empty()) return topk<XValue>(lists, ratio, largest, "xs");
  return topk<DiffValue>(lists, ratio, largest, "xs - subtract");
}

std::vector<at::Tensor> layerwise_topk_mask_cuda(at::TensorList xs, double ratio, bool largest) {
  ArgChecks("layerwise_topk_mask").not_empty("xs", xs);
  TensorLists<2> lists{topk_args("layerwise_topk_mask", xs, ratio, std::nullopt).xs, {}};
  const c10::cuda::CUDAGuard guard(lists[0][0].device());
  for (const at::Tensor& x : lists[0]) lists[1].push_back(at::empty(x.sizes(), x.options().dtype(at::kBool)));
  LayerSelection<XValue, 2> sel(lists, ratio, largest);
  sel.compute();
  sel.walk([](auto) { return MaskSink{}; });
  sel.check_finite("layerwise_topk_mask", "xs");
  return lists[1];
}

}  // namespace
}  // namespace cuda
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("layerwise_topk", &unlearn_ext::cuda::layerwise_topk_cuda);
  m.impl("layerwise_topk_mask", &unlearn_ext::cuda::layerwise_topk_mask_cuda);
}
