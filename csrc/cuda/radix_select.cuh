// Per-layer top-k selection on the GPU, shared by layerwise_topk(_mask) and the masked
// optimizer steps; the counterpart of cpu/radix_select.h. It runs the rule of select.h, so it selects
// exactly the CPU kernels' sets:
//
//   1. three radix passes (11 + 10 + 10 bits of the 31-bit rank key), each one launch sequence over
//      all layers: every block builds a shared-memory histogram of its chunk's candidates (keys whose
//      already-fixed digits match the layer's prefix) and adds it to the layer's global histogram;
//      a small kernel (one block per layer) then picks the layer's digit with radix_find_digit.
//      Afterwards each layer has a threshold key and take_equal: keep keys > threshold and the first
//      take_equal keys == threshold in flat index order. Layers kept whole (k == n) skip the passes;
//   2. per-chunk counts of strictly-selected and threshold-equal entries, and their exclusive scan per
//      layer (one block per layer); the count pass reads every element, so it also looks for NaN/Inf;
//   3. an ordered walk: every block rescans its chunk in index order with a block-wide scan, so each
//      element knows whether it is selected (exact lower-index-first tie order) and its output position,
//      and hands both to a sink (write values/indices, write a mask, or apply an optimizer step).
// Non-finite keys (NaN/Inf) are recorded in a device flag; check_finite() syncs and raises ValueError
// naming the first such layer.
#pragma once

#include <climits>
#include <type_traits>

#include "checks.h"
#include "cuda/multi_tensor.cuh"
#include "select.h"

namespace unlearn_ext {
namespace cuda {

// The value whose |.| is ranked: slot kX, or slot kX minus slot kS rounded to scalar_t — exactly what
// torch's `x - s` holds, computed on the fly instead of being materialised.
template <typename scalar_t, int kX, int kS = -1>
struct RankedValue {
  template <int D>
  __device__ __forceinline__ float operator()(const TensorTable<D>& tab, int t, int64_t i) const {
    const float x = static_cast<float>(slot_ptr<const scalar_t>(tab, kX, t)[i]);
    if constexpr (kS < 0) {
      return x;
    } else {
      const float s = static_cast<float>(slot_ptr<const scalar_t>(tab, kS, t)[i]);
      return static_cast<float>(static_cast<scalar_t>(x - s));
    }
  }
};

__device__ __forceinline__ uint2 operator+(uint2 a, uint2 b) { return make_uint2(a.x + b.x, a.y + b.y); }
__device__ __forceinline__ uint2 operator-(uint2 a, uint2 b) { return make_uint2(a.x - b.x, a.y - b.y); }

// Exclusive scan of one uint2 per thread, in thread order, over a block of kThreads threads; `total`
// receives the block's sum. `smem` holds kWarps entries. Every thread of the block must call it.
__device__ __forceinline__ uint2 block_exclusive_scan(uint2 v, uint2* smem, uint2& total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  uint2 inc = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned x = __shfl_up_sync(0xffffffffu, inc.x, o);
    const unsigned y = __shfl_up_sync(0xffffffffu, inc.y, o);
    if (lane >= o) inc = inc + make_uint2(x, y);
  }
  if (lane == 31) smem[warp] = inc;
  __syncthreads();
  uint2 before = make_uint2(0, 0), sum = make_uint2(0, 0);
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const uint2 s = smem[w];
    if (w < warp) before = before + s;
    sum = sum + s;
  }
  __syncthreads();  // smem is reused by the next call
  total = sum;
  return before + inc - v;
}

// f(i, value) for the elements of chunk c, thread-strided; 4 values are loaded before any is processed so
// that the loads overlap (f may use shared atomics, which the compiler will not move loads across).
template <typename Src, int D, typename F>
__device__ __forceinline__ void for_each_value(const TensorTable<D>& tab, const Chunk& c, F&& f) {
  constexpr int U = 4;
  const Src src;
  for (int64_t base = c.begin + threadIdx.x; base < c.end; base += U * kThreads) {
    float v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kThreads;
      v[u] = i < c.end ? src(tab, c.t, i) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * kThreads;
      if (i < c.end) f(i, v[u]);
    }
  }
}

// Radix pass `pass`: histogram of the digit of every candidate key into hist[layer][digit]. Layers kept
// whole (k == n) need no threshold search and are skipped.
template <typename Src, int D>
__global__ void __launch_bounds__(kThreads)
    radix_histogram_kernel(const TensorTable<D> tab, int pass, bool largest, const int64_t* layer_offsets,
                           const LayerThreshold* state, uint32_t* hist) {
  __shared__ uint32_t sh[kMaxRadixBins];
  const Chunk c = chunk_of_block(tab);
  if (layer_offsets[c.layer + 1] - layer_offsets[c.layer] == tab.numel[c.t]) return;  // whole block
  const int bins = radix_bins(pass);
  for (int b = threadIdx.x; b < bins; b += kThreads) sh[b] = 0;
  const uint32_t prefix = pass == 0 ? 0u : state[c.layer].threshold;
  __syncthreads();
  for_each_value<Src>(tab, c, [&](int64_t, float v) {
    const uint32_t rk = rank_key(abs_key(v), largest);
    if (radix_is_candidate(rk, pass, prefix)) atomicAdd(&sh[radix_digit(rk, pass)], 1u);
  });
  __syncthreads();
  uint32_t* h = hist + static_cast<int64_t>(c.layer) * kMaxRadixBins;
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    if (sh[b]) atomicAdd(&h[b], sh[b]);
  }
}

// One block per layer: fix the digit of pass `pass` with radix_find_digit and clear the histogram for
// the next pass. The digit search runs in two levels (groups of bins/kThreads bins, then the bins of the
// chosen group); the first bin from the top whose cumulative count reaches `need` is the same either way.
static __global__ void __launch_bounds__(kThreads)
    radix_resolve_kernel(int pass, const int64_t* layer_offsets, const int64_t* n, LayerThreshold* state,
                         uint32_t* hist) {
  __shared__ uint32_t group[kThreads];
  const int l = blockIdx.x;
  uint32_t* h = hist + static_cast<int64_t>(l) * kMaxRadixBins;
  const int width = radix_bins(pass) / kThreads;
  uint32_t sum = 0;
  for (int j = 0; j < width; ++j) sum += h[threadIdx.x * width + j];
  group[threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    const int64_t k = layer_offsets[l + 1] - layer_offsets[l];
    LayerThreshold st = pass == 0 ? LayerThreshold{0u, k} : state[l];
    if (k == n[l]) {
      st = select_all(k);
    } else {
      int64_t above = 0;
      const int g = radix_find_digit(group, kThreads, st.take_equal, above);
      const int d = radix_find_digit(h + g * width, width, st.take_equal, above);
      st.threshold |= static_cast<uint32_t>(g * width + d) << radix_shift(pass);
    }
    state[l] = st;
  }
  __syncthreads();
  for (int j = 0; j < width; ++j) h[threadIdx.x * width + j] = 0;
}

// Per chunk: (# keys > threshold, # keys == threshold). Also records the first layer holding a
// non-finite value (this pass reads every element of every layer).
template <typename Src, int D>
__global__ void __launch_bounds__(kThreads)
    select_count_kernel(const TensorTable<D> tab, bool largest, const LayerThreshold* state,
                        const int64_t* chunk_base, uint2* counts, int* bad_layer) {
  __shared__ uint2 smem[kWarps];
  const Chunk c = chunk_of_block(tab);
  const uint32_t thr = state[c.layer].threshold;
  uint2 mine = make_uint2(0, 0);
  bool bad = false;
  for_each_value<Src>(tab, c, [&](int64_t, float v) {
    const uint32_t key = abs_key(v);
    bad |= key >= kNonFiniteKey;
    const uint32_t rk = rank_key(key, largest);
    mine.x += rk > thr;
    mine.y += rk == thr;
  });
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicMin(bad_layer, c.layer);
  uint2 total;
  block_exclusive_scan(mine, smem, total);
  if (threadIdx.x == 0) counts[chunk_base[c.layer] + c.chunk] = total;
}

// One block per layer: the counts of the layer's chunks become exclusive prefix sums (in chunk order).
static __global__ void __launch_bounds__(kThreads) select_scan_kernel(const int64_t* chunk_base, uint2* counts) {
  __shared__ uint2 smem[kWarps];
  const int64_t lo = chunk_base[blockIdx.x], hi = chunk_base[blockIdx.x + 1];
  uint2 carry = make_uint2(0, 0);
  for (int64_t base = lo; base < hi; base += kThreads) {
    const int64_t j = base + threadIdx.x;
    const uint2 v = j < hi ? counts[j] : make_uint2(0, 0);
    uint2 total;
    const uint2 before = block_exclusive_scan(v, smem, total);
    if (j < hi) counts[j] = carry + before;
    carry = carry + total;
  }
}

// The ordered walk: sink(tab, t, i, selected, out_pos, value) for every element of the chunk, where
// out_pos = layer_offsets[layer] + (# selected elements of the layer before i). Each thread takes 4
// consecutive elements of a 4*kThreads tile so that a block scan over threads is in index order.
template <typename Src, int D, typename Sink>
__global__ void __launch_bounds__(kThreads)
    select_walk_kernel(const TensorTable<D> tab, bool largest, const LayerThreshold* state,
                       const int64_t* chunk_base, const uint2* counts, const int64_t* layer_offsets,
                       const Sink sink) {
  constexpr int U = 4;
  __shared__ uint2 smem[kWarps];
  const Chunk c = chunk_of_block(tab);
  const LayerThreshold th = state[c.layer];
  const int64_t out0 = layer_offsets[c.layer];
  uint2 seen = counts[chunk_base[c.layer] + c.chunk];  // (strict, equal) entries of the layer before the tile
  const Src src;
  for (int64_t tile = c.begin; tile < c.end; tile += U * kThreads) {
    const int64_t i0 = tile + U * static_cast<int64_t>(threadIdx.x);
    float v[U];
    uint32_t rk[U];
    uint2 mine = make_uint2(0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = i0 + u < c.end;
      v[u] = in ? src(tab, c.t, i0 + u) : 0.f;
      rk[u] = rank_key(abs_key(v[u]), largest);
      mine.x += in && rk[u] > th.threshold;
      mine.y += in && rk[u] == th.threshold;
    }
    uint2 total;
    const uint2 before = seen + block_exclusive_scan(mine, smem, total);
    // Threshold-equal entries before this thread's, and how many of its own the tie rule takes.
    const int64_t taken_before = chunk_take_equal(th.take_equal, 0, before.y);
    int64_t take_left = chunk_take_equal(th.take_equal, before.y, mine.y);
    int64_t pos = out0 + before.x + taken_before;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (i0 + u < c.end) {
        const bool selected = take_selected(rk[u], th.threshold, take_left);
        sink(tab, c.t, i0 + u, selected, pos, v[u]);
        pos += selected;
      }
    }
    seen = seen + total;
  }
}

// Host side: the selection over the layers of lists (slot 0 gives each layer's size and dtype; layers of
// different dtypes are launched as separate groups), on the values Src<scalar_t> reads.
//   compute()       the radix passes, counts and scan (asynchronous)
//   walk(make_sink) the ordered walk; make_sink(scalar_t{}) returns the sink for a dtype group
//   check_finite()  syncs and raises ValueError if a selected-from layer holds NaN/Inf
template <template <typename> class Src, int D>
class LayerSelection {
 public:
  LayerSelection(const TensorLists<D>& lists, double ratio, bool largest)
      : lists_(lists), groups_(dtype_groups<D>(lists)), largest_(largest),
        L_(static_cast<int>(lists[0].size())) {
    const at::Device device = lists[0][0].device();
    // off: prefix sums of k; meta: [chunk_base (prefix sums of chunk counts, L+1) | numel (L)]
    at::Tensor off = at::empty({L_ + 1}, at::kLong), meta = at::empty({2 * L_ + 1}, at::kLong);
    int64_t* o = off.data_ptr<int64_t>();
    int64_t* b = meta.data_ptr<int64_t>();
    o[0] = b[0] = 0;
    for (int l = 0; l < L_; ++l) {
      const int64_t n = lists[0][l].numel();
      o[l + 1] = o[l] + keep_count(n, ratio);
      b[l + 1] = b[l] + num_chunks(n);
      b[L_ + 1 + l] = n;
    }
    total_ = o[L_];
    total_chunks_ = b[L_];
    offsets_ = off.to(off.options().device(device), /*non_blocking=*/true);
    meta_ = meta.to(meta.options().device(device), /*non_blocking=*/true);
    if (total_chunks_ == 0) return;
    const auto i32 = at::TensorOptions().dtype(at::kInt).device(device);
    hist_ = at::zeros({L_, kMaxRadixBins}, i32);
    static_assert(sizeof(LayerThreshold) % sizeof(int64_t) == 0, "state is stored in an int64 tensor");
    state_ = at::empty({L_ * static_cast<int64_t>(sizeof(LayerThreshold) / sizeof(int64_t))},
                       i32.dtype(at::kLong));
    counts_ = at::empty({2 * total_chunks_}, i32);
    bad_ = at::full({1}, INT_MAX, i32);
  }

  // Device int64 [L+1]: layer l's selected entries are [offsets[l], offsets[l+1]) of the output.
  const at::Tensor& offsets() const { return offsets_; }
  int64_t total() const { return total_; }

  void compute() {
    if (total_chunks_ == 0) return;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    for (int pass = 0; pass < kRadixPasses; ++pass) {
      for_each_table([&](auto tag, const TensorTable<D>& tab, int nc) {
        using scalar_t = decltype(tag);
        radix_histogram_kernel<Src<scalar_t>, D><<<nc, kThreads, 0, stream>>>(
            tab, pass, largest_, offsets_.data_ptr<int64_t>(), state(), hist());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      radix_resolve_kernel<<<L_, kThreads, 0, stream>>>(pass, offsets_.data_ptr<int64_t>(), numel(), state(),
                                                        hist());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    for_each_table([&](auto tag, const TensorTable<D>& tab, int nc) {
      using scalar_t = decltype(tag);
      select_count_kernel<Src<scalar_t>, D><<<nc, kThreads, 0, stream>>>(
          tab, largest_, state(), chunk_base(), counts(), bad_.data_ptr<int>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    select_scan_kernel<<<L_, kThreads, 0, stream>>>(chunk_base(), counts());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename MakeSink>
  void walk(MakeSink&& make_sink) {
    if (total_chunks_ == 0) return;
    const auto stream = c10::cuda::getCurrentCUDAStream();
    for_each_table([&](auto tag, const TensorTable<D>& tab, int nc) {
      using scalar_t = decltype(tag);
      const auto sink = make_sink(scalar_t{});
      select_walk_kernel<Src<scalar_t>, D, std::decay_t<decltype(sink)>><<<nc, kThreads, 0, stream>>>(
          tab, largest_, state(), chunk_base(), counts(), offsets_.data_ptr<int64_t>(),
          sink);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // Syncs the stream. `name` is the argument the values come from (e.g. "xs", "grads").
  void check_finite(const char* op, const char* name) const {
    if (total_chunks_ == 0) return;
    const int bad = bad_.item<int>();
    TORCH_CHECK_VALUE(bad == INT_MAX, op, ": ", name, "[", bad, "] contains NaN or Inf; cannot select from it");
  }

 private:
  // fn(scalar_t{}, table, num_chunks) for every table of every dtype group.
  template <typename Fn>
  void for_each_table(Fn&& fn) const {
    for (const auto& group : groups_) {
      dispatch_value_type(group.first, [&](auto tag) {
        multi_tensor_apply<D>(lists_, group.second,
                              [&](const TensorTable<D>& tab, int nc) { fn(tag, tab, nc); });
      });
    }
  }
  LayerThreshold* state() const { return reinterpret_cast<LayerThreshold*>(state_.data_ptr<int64_t>()); }
  uint32_t* hist() const { return reinterpret_cast<uint32_t*>(hist_.data_ptr<int>()); }
  const int64_t* chunk_base() const { return meta_.data_ptr<int64_t>(); }
  const int64_t* numel() const { return meta_.data_ptr<int64_t>() + L_ + 1; }
  uint2* counts() const { return reinterpret_cast<uint2*>(counts_.data_ptr<int>()); }

  const TensorLists<D>& lists_;
  std::map<at::ScalarType, std::vector<int>> groups_;
  bool largest_;
  int L_;
  int64_t total_ = 0, total_chunks_ = 0;
  at::Tensor offsets_, meta_, hist_, state_, counts_, bad_;
};

}  // namespace cuda
}  // namespace unlearn_ext
