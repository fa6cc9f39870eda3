// sparse_accumulate_ on the CPU. Every check (offsets and all index ranges) runs before the
// first write. Layers run in parallel, the B updates of one layer in order, so results are bitwise
// reproducible.
#include <torch/library.h>

#include <memory>

#include "checks.h"
#include "cpu/multi_tensor.h"

namespace unlearn_ext {
namespace cpu {
namespace {

// One segment's additions on a reduced-precision layer whose indices repeat or are unordered: summed in
// float32 per entry and rounded once, as the reference's float32 index_add_ on the widened layer does.
template <typename T, typename V>
void add_segment_widened(T* d, const V* v, const int32_t* idx, int64_t lo, int64_t hi, float alpha, float* acc) {
  for (int64_t e = lo; e < hi; ++e) acc[idx[e]] = static_cast<float>(d[idx[e]]);
  for (int64_t e = lo; e < hi; ++e) acc[idx[e]] += static_cast<float>(v[e]) * alpha;
  for (int64_t e = lo; e < hi; ++e) d[idx[e]] = static_cast<T>(acc[idx[e]]);
}

void sparse_accumulate_cpu(at::TensorList dense_in, const at::Tensor& values_in, const at::Tensor& indices_in,
                           const at::Tensor& offsets_in, double alpha) {
  const AccumulateArgs args = accumulate_args(dense_in, values_in, indices_in, offsets_in, alpha);
  const std::vector<at::Tensor>& dense = args.dense;
  const at::Tensor &values = args.values, &indices = args.indices;
  const int64_t L = static_cast<int64_t>(dense.size());
  const int64_t S = args.offsets.numel() - 1;
  const int64_t* off = args.offsets.const_data_ptr<int64_t>();
  AccumulateDataError::span(off[0], off[S], values.numel());
  for (int64_t s = 0; s < S; ++s) {
    if (off[s] > off[s + 1]) AccumulateDataError::decreasing(s, off[s], off[s + 1]);
  }

  // Index ranges, and whether each segment is strictly ascending (then no entry repeats).
  const int32_t* idx = indices.const_data_ptr<int32_t>();
  enum : uint8_t { kAscending = 1, kOutOfRange = 2 };
  std::vector<uint8_t> seg(S, 0);
  parallel_dynamic(S, values.numel(), [&](int64_t s) {
    const int64_t n = dense[s % L].numel();
    bool in_range = true, ascending = true;
    for (int64_t e = off[s]; e < off[s + 1]; ++e) {
      in_range &= idx[e] >= 0 && idx[e] < n;
      ascending &= e == off[s] || idx[e] > idx[e - 1];
    }
    seg[s] = (in_range ? 0 : kOutOfRange) | (ascending ? kAscending : 0);
  });
  for (int64_t s = 0; s < S; ++s) {
    if (seg[s] & kOutOfRange) AccumulateDataError::out_of_range(s, L, dense[s % L].numel());
  }

  const float a = static_cast<float>(alpha);
  parallel_dynamic(L, values.numel(), [&](int64_t l) {
    dispatch_value_type(dense[l].scalar_type(), [&](auto layer_tag) {
      using T = decltype(layer_tag);
      T* d = dense[l].data_ptr<T>();
      std::unique_ptr<float[]> acc;  // only for repeated indices in a reduced-precision layer
      dispatch_value_type(values.scalar_type(), [&](auto value_tag) {
        const auto* v = values.const_data_ptr<decltype(value_tag)>();
        for (int64_t s = l; s < S; s += L) {
          if (std::is_same_v<T, float> || (seg[s] & kAscending)) {
            for (int64_t e = off[s]; e < off[s + 1]; ++e)
              d[idx[e]] = static_cast<T>(static_cast<float>(d[idx[e]]) + static_cast<float>(v[e]) * a);
          } else {
            if (!acc) acc.reset(new float[dense[l].numel()]);
            add_segment_widened(d, v, idx, off[s], off[s + 1], a, acc.get());
          }
        }
      });
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("sparse_accumulate_", &unlearn_ext::cpu::sparse_accumulate_cpu);
}
