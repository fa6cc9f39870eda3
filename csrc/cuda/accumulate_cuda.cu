// CUDA kernel of sparse_accumulate_: dense[s % L].view(-1)[indices[seg s]] += alpha * values[seg s].
//
// 1. One validation launch checks offsets (start 0, end len(values), never decrease) and every index
//    against its layer's size into a small report; the host reads it (one sync) and raises ValueError
//    before anything is written.
// 2. Apply. Every element update is dense = dtype(float(dense) + float(value) * float(alpha)), the
//    reference's per-segment float32 arithmetic. When every segment's indices ascend strictly (as
//    layerwise_topk writes them) no index repeats within a segment, so the segments of one stored
//    update touch disjoint elements:
//    - ordered path (deterministic mode, or B == 1): one launch per stored update b = 0..B-1, plain
//      read-modify-writes; stream order applies the updates in order, so the result is bitwise
//      reproducible and equals the reference;
//    - otherwise one launch over all B*L segments with atomic adds (float32 atomicAdd, a 32-bit CAS
//      loop for fp16/bf16), equal to the reference up to the order of float rounding.
//    Segments whose indices do not ascend may repeat an index; then the whole call runs the reference's
//    torch ops segment by segment (slow, but exact; index_add_ is deterministic in deterministic mode).
// Entry j finds its segment by binary search in offsets; the per-layer pointers, sizes and dtypes are a
// small device table.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "checks.h"
#include "cuda/multi_tensor.cuh"

namespace unlearn_ext {
namespace cuda {
namespace {

enum LayerDtype : int64_t { kF32 = 0, kF16 = 1, kBF16 = 2 };

struct LayerRef {
  int64_t ptr;
  int64_t numel;
  int64_t dtype;
};

// The segment s in [0, nseg) holding entry j: the last s with off[s] <= j (empty segments before it
// are skipped). Always in range, whatever the offsets hold.
__device__ __forceinline__ int64_t segment_of(const int64_t* off, int64_t nseg, int64_t j) {
  int64_t lo = 0, hi = nseg;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (off[mid] <= j) lo = mid; else hi = mid;
  }
  return lo;
}

// report = [off[0], off[nseg], first decreasing segment, first segment with an index out of range,
//           first segment whose indices do not ascend strictly] (INT64_MAX when there is none).
__global__ void __launch_bounds__(kThreads)
    validate_kernel(const int64_t* off, int64_t nseg, int64_t nvals, const int32_t* idx, const LayerRef* layers,
                    int L, long long* report) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (tid == 0) {
    report[0] = off[0];
    report[1] = off[nseg];
  }
  for (int64_t s = tid; s < nseg; s += stride) {
    if (off[s + 1] < off[s]) atomicMin(&report[2], static_cast<long long>(s));
  }
  if (nseg == 0) return;
  for (int64_t j = tid; j < nvals; j += stride) {
    const int64_t s = segment_of(off, nseg, j);
    const int32_t i = idx[j];
    if (i < 0 || i >= layers[s % L].numel) atomicMin(&report[3], static_cast<long long>(s));
    // j > 0 as well: with invalid (negative) offsets off[s] may be < 0, and idx[-1] must not be read.
    if (j > 0 && j > off[s] && i <= idx[j - 1]) atomicMin(&report[4], static_cast<long long>(s));
  }
}

__device__ __forceinline__ void add_atomic(float* p, float t) { atomicAdd(p, t); }

// 16-bit types: CAS on the aligned 32-bit word holding *p, so the add rounds once, like the reference.
template <typename T>
__device__ __forceinline__ void add_atomic(T* p, float t) {
  const uintptr_t addr = reinterpret_cast<uintptr_t>(p);
  unsigned int* word = reinterpret_cast<unsigned int*>(addr & ~uintptr_t(3));
  const int shift = (addr & 2) ? 16 : 0;
  unsigned int old = *word, assumed;
  do {
    assumed = old;
    const T cur(static_cast<unsigned short>((old >> shift) & 0xffffu), T::from_bits());
    const T next = static_cast<T>(static_cast<float>(cur) + t);
    const unsigned int updated = (old & ~(0xffffu << shift)) | (static_cast<unsigned int>(next.x) << shift);
    old = atomicCAS(word, assumed, updated);
  } while (assumed != old);
}

template <bool kAtomic, typename T>
__device__ __forceinline__ void add_to(int64_t ptr, int32_t i, float t) {
  T* p = reinterpret_cast<T*>(ptr) + i;
  if constexpr (kAtomic) {
    add_atomic(p, t);
  } else {
    *p = static_cast<T>(static_cast<float>(*p) + t);
  }
}

// Applies segments [seg0, seg0 + nseg) (whose entries are off[seg0] .. off[seg0 + nseg]).
template <typename vt, bool kAtomic>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(const int64_t* off, int64_t seg0, int64_t nseg, const vt* values, const int32_t* idx,
                 const LayerRef* layers, int L, float alpha) {
  const int64_t lo = off[seg0], hi = off[seg0 + nseg];
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t j = lo + static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < hi; j += stride) {
    const int64_t s = seg0 + segment_of(off + seg0, nseg, j);
    const LayerRef r = layers[s % L];
    const float t = static_cast<float>(values[j]) * alpha;
    switch (r.dtype) {
      case kF32: add_to<kAtomic, float>(r.ptr, idx[j], t); break;
      case kF16: add_to<kAtomic, c10::Half>(r.ptr, idx[j], t); break;
      default: add_to<kAtomic, c10::BFloat16>(r.ptr, idx[j], t); break;
    }
  }
}

// Grid-stride launches: enough blocks to fill the device, fewer for small work.
int grid_for(int64_t work) {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t want = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sms) * 8)));
}

// The reference's arithmetic with torch ops, one segment at a time (for segments that may repeat an index).
void accumulate_by_segments(const std::vector<at::Tensor>& dense, const at::Tensor& values,
                            const at::Tensor& indices, const at::Tensor& offsets, double alpha) {
  const int64_t L = static_cast<int64_t>(dense.size());
  const at::Tensor off = offsets.cpu();
  const int64_t* o = off.data_ptr<int64_t>();
  const at::Tensor scaled = values.to(at::kFloat) * alpha;
  const at::Tensor idx = indices.to(at::kLong);
  for (int64_t s = 0; s + 1 < off.numel(); ++s) {
    if (o[s + 1] == o[s]) continue;
    at::Tensor flat = dense[s % L].view(-1);
    at::Tensor acc = flat.to(at::kFloat);  // flat itself for float32
    acc.index_add_(0, idx.slice(0, o[s], o[s + 1]), scaled.slice(0, o[s], o[s + 1]));
    flat.copy_(acc);
  }
}

void sparse_accumulate_cuda(at::TensorList dense_in, const at::Tensor& values_in, const at::Tensor& indices_in,
                            const at::Tensor& offsets_in, double alpha) {
  const AccumulateArgs args = accumulate_args(dense_in, values_in, indices_in, offsets_in, alpha);
  const std::vector<at::Tensor>& dense = args.dense;
  const at::Tensor &values = args.values, &indices = args.indices, &offsets = args.offsets;
  const int L = static_cast<int>(dense.size());
  const int64_t nseg = offsets.numel() - 1, nvals = values.numel();
  const at::Device device = dense[0].device();
  const c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();

  at::Tensor table = at::empty({L, 3}, at::kLong);
  LayerRef* rows = reinterpret_cast<LayerRef*>(table.data_ptr<int64_t>());
  for (int l = 0; l < L; ++l) {
    const at::ScalarType st = dense[l].scalar_type();
    rows[l] = {reinterpret_cast<int64_t>(dense[l].data_ptr()), dense[l].numel(),
               st == at::kFloat ? kF32 : (st == at::kHalf ? kF16 : kBF16)};
  }
  table = table.to(table.options().device(device), /*non_blocking=*/true);
  const LayerRef* layers = reinterpret_cast<const LayerRef*>(table.data_ptr<int64_t>());
  const int64_t* off = offsets.data_ptr<int64_t>();

  at::Tensor report = at::full({5}, INT64_MAX, offsets.options());
  validate_kernel<<<grid_for(std::max(nseg, nvals)), kThreads, 0, stream>>>(
      off, nseg, nvals, indices.data_ptr<int32_t>(), layers, L,
      reinterpret_cast<long long*>(report.data_ptr<int64_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor rep = report.cpu();  // syncs
  const int64_t* r = rep.data_ptr<int64_t>();
  AccumulateDataError::span(r[0], r[1], nvals);
  if (r[2] != INT64_MAX) {
    AccumulateDataError::decreasing(r[2], offsets[r[2]].item<int64_t>(), offsets[r[2] + 1].item<int64_t>());
  }
  if (r[3] != INT64_MAX) AccumulateDataError::out_of_range(r[3], L, dense[r[3] % L].numel());
  if (nvals == 0) return;
  if (r[4] != INT64_MAX) return accumulate_by_segments(dense, values, indices, offsets, alpha);

  const int64_t B = nseg / L;
  const bool ordered = B == 1 || at::globalContext().deterministicAlgorithms();
  const float a = static_cast<float>(alpha);
  dispatch_value_type(values.scalar_type(), [&](auto tag) {
    using vt = decltype(tag);
    const vt* v = static_cast<const vt*>(values.data_ptr());
    const int32_t* idx = indices.data_ptr<int32_t>();
    if (ordered) {
      const int grid = grid_for(nvals / B + 1);  // about one update's entries
      for (int64_t b = 0; b < B; ++b) {
        apply_kernel<vt, false><<<grid, kThreads, 0, stream>>>(off, b * L, L, v, idx, layers, L, a);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    } else {
      apply_kernel<vt, true><<<grid_for(nvals), kThreads, 0, stream>>>(off, 0, nseg, v, idx, layers, L, a);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace
}  // namespace cuda
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, CUDA, m) {
  m.impl("sparse_accumulate_", &unlearn_ext::cuda::sparse_accumulate_cuda);
}
