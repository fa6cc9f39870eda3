// CUDA kernels of layerwise_topk and layerwise_topk_mask (SPEC §1.2, §1.3). The selection is the
// multi-layer radix select of radix_select.cuh; these ops only add the sinks of its ordered walk.
// Output sizes follow from the layer sizes and the ratio, so the only host sync is the NaN/Inf check
// at the end.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>

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

// xs checked and made contiguous, all of one dtype (the values output has one dtype).
std::vector<at::Tensor> checked_xs(at::TensorList xs) {
  TORCH_CHECK_VALUE(!xs.empty(), "xs must hold at least one tensor");
  std::vector<at::Tensor> out = checked_list("xs", xs, xs[0].device(), /*values_only=*/true, /*inplace=*/false);
  for (size_t i = 1; i < out.size(); ++i) {
    TORCH_CHECK_VALUE(out[i].scalar_type() == out[0].scalar_type(), "xs[", i, "] has dtype ",
                      out[i].scalar_type(), " but xs[0] has ", out[0].scalar_type());
  }
  return out;
}

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
  TensorLists<2> lists;
  lists[0] = checked_xs(xs);
  check_ratio(ratio);
  const c10::cuda::CUDAGuard guard(lists[0][0].device());
  if (!subtract.has_value()) return topk<XValue>(lists, ratio, largest, "xs");
  lists[1] = checked_list("subtract", *subtract, lists[0][0].device(), true, false);
  check_matching("subtract", lists[1], "xs", lists[0], /*same_dtype=*/true);
  return topk<DiffValue>(lists, ratio, largest, "xs - subtract");
}

std::vector<at::Tensor> layerwise_topk_mask_cuda(at::TensorList xs, double ratio, bool largest) {
  TensorLists<2> lists;
  lists[0] = checked_xs(xs);
  check_ratio(ratio);
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
