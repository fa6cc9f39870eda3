// Multi-tensor launcher (apex multi_tensor_apply style) shared by the CUDA kernels of unlearn_ext.
//
// A call covers many layers in one launch: the host cuts every layer into chunks of kChunkSize elements
// and fills a TensorTable — per-tensor pointers/sizes plus a chunk table of (tensor slot, chunk number) —
// that is passed BY VALUE as a kernel argument, so no host-to-device copy is needed. Block b of a launch
// works on chunk b of the table. When the table fills up the launcher launches and starts a new one
// (a layer may straddle launches). The table stays below the 4 KiB kernel-parameter limit that holds on
// every CUDA version we build with (the 32 KiB limit needs CUDA >= 12.1).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cstdint>
#include <map>
#include <vector>

namespace unlearn_ext {
namespace cuda {

constexpr int kThreads = 256;  // threads per block of every kernel in this extension
constexpr int kWarps = kThreads / 32;
constexpr int64_t kChunkSize = 65536;  // elements per block
constexpr int kMaxChunksPerLaunch = 512;
constexpr int kParamBudget = 3584;  // bytes of the 4096 kernel-parameter bytes left for the table
// Chunk numbers are stored as uint16: a layer of < 2^31 elements has at most 32768 chunks.
static_assert(kChunkSize * 65536 >= (int64_t(1) << 31), "chunk numbers must fit in uint16");

// D slots (e.g. param, grad, buffer, mask) of up to kMaxTensors layers, and the chunk table.
template <int D>
struct TensorTable {
  static constexpr int kMaxTensors = (kParamBudget - 3 * kMaxChunksPerLaunch) / (8 * D + 12);
  void* ptr[D][kMaxTensors];   // nullptr for an absent slot
  int64_t numel[kMaxTensors];
  int32_t layer[kMaxTensors];  // index of the tensor in the caller's lists
  uint8_t chunk_tensor[kMaxChunksPerLaunch];
  uint16_t chunk_number[kMaxChunksPerLaunch];
};
static_assert(sizeof(TensorTable<1>) <= kParamBudget && sizeof(TensorTable<5>) <= kParamBudget,
              "TensorTable exceeds the kernel parameter budget");
static_assert(TensorTable<1>::kMaxTensors <= 256, "chunk_tensor is a uint8");

// The chunk of the current block: tensor slot t (of layer `layer`), elements [begin, end).
struct Chunk {
  int t;
  int layer;
  int chunk;  // chunk number within its layer
  int64_t begin;
  int64_t end;
};

template <int D>
__device__ __forceinline__ Chunk chunk_of_block(const TensorTable<D>& tab) {
  Chunk c;
  c.t = tab.chunk_tensor[blockIdx.x];
  c.layer = tab.layer[c.t];
  c.chunk = tab.chunk_number[blockIdx.x];
  c.begin = static_cast<int64_t>(c.chunk) * kChunkSize;
  const int64_t end = c.begin + kChunkSize;
  c.end = end < tab.numel[c.t] ? end : tab.numel[c.t];
  return c;
}

template <typename T, int D>
__device__ __forceinline__ T* slot_ptr(const TensorTable<D>& tab, int s, int t) {
  return static_cast<T*>(tab.ptr[s][t]);
}

inline int64_t num_chunks(int64_t n) { return (n + kChunkSize - 1) / kChunkSize; }

// D parallel lists of per-layer tensors. Slot 0 is always present and defines each layer's size and
// dtype; an empty list in another slot means that slot is absent (its pointers are nullptr).
template <int D>
using TensorLists = std::array<std::vector<at::Tensor>, D>;

// Calls launch(table, num_chunks) for consecutive tables covering the chunks of `layers` (indices into
// the lists, in order). Empty layers get no chunks; nothing is launched when there are no chunks.
template <int D, typename Launch>
void multi_tensor_apply(const TensorLists<D>& lists, const std::vector<int>& layers, Launch&& launch) {
  using Table = TensorTable<D>;
  Table tab;
  int nt = 0;  // tensor slots used
  int nc = 0;  // chunks used
  for (const int l : layers) {
    const int64_t n = lists[0][l].numel();
    if (n == 0) continue;
    int slot = nt++;
    for (int s = 0; s < D; ++s) tab.ptr[s][slot] = lists[s].empty() ? nullptr : lists[s][l].data_ptr();
    tab.numel[slot] = n;
    tab.layer[slot] = l;
    const int64_t chunks = num_chunks(n);
    for (int64_t c = 0; c < chunks; ++c) {
      tab.chunk_tensor[nc] = static_cast<uint8_t>(slot);
      tab.chunk_number[nc] = static_cast<uint16_t>(c);
      ++nc;
      const bool last_of_tensor = c == chunks - 1;
      if (nc == kMaxChunksPerLaunch || (last_of_tensor && nt == Table::kMaxTensors)) {
        launch(static_cast<const Table&>(tab), nc);
        nc = 0;
        if (last_of_tensor) {
          nt = 0;
        } else {  // the layer goes on in the next table: keep it, in slot 0
          for (int s = 0; s < D; ++s) tab.ptr[s][0] = tab.ptr[s][slot];
          tab.numel[0] = tab.numel[slot];
          tab.layer[0] = tab.layer[slot];
          slot = 0;
          nt = 1;
        }
      }
    }
  }
  if (nc > 0) launch(static_cast<const Table&>(tab), nc);
}

// Layer indices grouped by the dtype of slot 0 (one launch sequence per dtype), each group in order.
template <int D>
std::map<at::ScalarType, std::vector<int>> dtype_groups(const TensorLists<D>& lists) {
  std::map<at::ScalarType, std::vector<int>> groups;
  for (int l = 0; l < static_cast<int>(lists[0].size()); ++l) groups[lists[0][l].scalar_type()].push_back(l);
  return groups;
}

}  // namespace cuda
}  // namespace unlearn_ext
