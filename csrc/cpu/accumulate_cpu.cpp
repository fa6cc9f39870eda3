// sparse_accumulate_ on the CPU (SPEC §1.4). Every check (offsets and all index ranges) runs before the
// first write. Layers run in parallel, the B updates of one layer in order, so results are bitwise
// reproducible.
#include <torch/library.h>

#include <memory>

#include "cpu/common_cpu.h"

namespace unlearn_ext {
namespace cpu {
namespace {

constexpr const char* kOp = "sparse_accumulate_";

void check_vector(const std::string& name, const at::Tensor& t) {
  check_cpu_tensor(kOp, name, t);
  TORCH_CHECK_VALUE(t.dim() == 1, kOp, ": ", name, " must be 1-D, got ", t.dim(), "-D");
}

// One segment's additions on a reduced-precision layer whose indices repeat or are unordered: summed in
// float32 per entry and rounded once, as the reference's float32 index_add_ on the widened layer does.
template <typename T, typename V>
void add_segment_widened(T* d, const V* v, const int32_t* idx, int64_t lo, int64_t hi, float alpha, float* acc) {
  for (int64_t e = lo; e < hi; ++e) acc[idx[e]] = static_cast<float>(d[idx[e]]);
  for (int64_t e = lo; e < hi; ++e) acc[idx[e]] += static_cast<float>(v[e]) * alpha;
  for (int64_t e = lo; e < hi; ++e) d[idx[e]] = static_cast<T>(acc[idx[e]]);
}

void sparse_accumulate_cpu(at::TensorList dense, const at::Tensor& values, const at::Tensor& indices,
                           const at::Tensor& offsets, double alpha) {
  TORCH_CHECK_VALUE(!dense.empty(), kOp, ": dense must hold at least one tensor");
  check_value_list(kOp, "dense", dense, /*same_dtype=*/false);
  check_vector("values", values);
  check_vector("indices", indices);
  check_vector("offsets", offsets);
  TORCH_CHECK_VALUE(is_value_dtype(values.scalar_type()), kOp, ": values has dtype ", values.scalar_type(),
                    "; supported: float32, float16, bfloat16");
  TORCH_CHECK_VALUE(indices.scalar_type() == at::kInt, kOp, ": indices must be int32, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(offsets.scalar_type() == at::kLong, kOp, ": offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK_VALUE(values.numel() == indices.numel(), kOp, ": values has ", values.numel(),
                    " entries but indices has ", indices.numel());
  TORCH_CHECK_VALUE(offsets.numel() >= 1, kOp, ": offsets must have at least one entry (0)");

  const int64_t L = static_cast<int64_t>(dense.size());
  const int64_t S = offsets.numel() - 1;
  const int64_t* off = offsets.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(off[0] == 0 && off[S] == values.numel(), kOp,
                    ": offsets must start at 0 and end at len(values) = ", values.numel(), ", got ", off[0],
                    " ... ", off[S]);
  TORCH_CHECK_VALUE(S % L == 0, kOp, ": offsets has ", S, " segments, not a multiple of len(dense) = ", L);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK_VALUE(off[s] <= off[s + 1], kOp, ": offsets decrease at segment ", s, " (", off[s], " > ",
                      off[s + 1], ")");
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
    TORCH_CHECK_VALUE(!(seg[s] & kOutOfRange), kOp, ": indices of segment ", s, " (layer ", s % L,
                      ") out of range [0, ", dense[s % L].numel(), ")");
  }

  const float a = static_cast<float>(alpha);
  parallel_dynamic(L, values.numel(), [&](int64_t l) {
    UE_DISPATCH_FLOATS(dense[l].scalar_type(), "sparse_accumulate_cpu", [&] {
      using T = scalar_t;
      T* d = dense[l].data_ptr<T>();
      std::unique_ptr<float[]> acc;  // only for repeated indices in a reduced-precision layer
      UE_DISPATCH_FLOATS(values.scalar_type(), "sparse_accumulate_cpu_values", [&] {
        const scalar_t* v = values.const_data_ptr<scalar_t>();
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
