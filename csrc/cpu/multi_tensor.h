// The CPU counterpart of cuda/multi_tensor.cuh: a list of layers cut into work items of at most
// kChunkSize elements, and a dynamic scheduler that hands the items to the intra-op thread pool.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

namespace unlearn_ext {
namespace cpu {

constexpr int64_t kChunkSize = int64_t{1} << 16;   // elements per work item
constexpr int64_t kSerialWork = int64_t{1} << 15;  // below this many elements threads cost more than they save

// Elements [begin, end) of layer `layer`.
struct Item {
  int64_t layer, begin, end;
};

// The layers cut into work items, in layer then index order: big layers spread over threads, small ones
// are one item each.
struct ChunkPlan {
  std::vector<Item> items;
  std::vector<int64_t> first_item;  // layer l owns items [first_item[l], first_item[l + 1])
  int64_t total = 0;

  explicit ChunkPlan(const std::vector<int64_t>& sizes) {
    first_item.reserve(sizes.size() + 1);
    for (size_t l = 0; l < sizes.size(); ++l) {
      first_item.push_back(static_cast<int64_t>(items.size()));
      for (int64_t b = 0; b < sizes[l]; b += kChunkSize) {
        items.push_back({static_cast<int64_t>(l), b, std::min(sizes[l], b + kChunkSize)});
      }
      total += sizes[l];
    }
    first_item.push_back(static_cast<int64_t>(items.size()));
  }
  int64_t size() const { return static_cast<int64_t>(items.size()); }
};

// A per-thread buffer of kChunkSize 32-bit words, for branch-free compaction of one item.
inline uint32_t* item_scratch() {
  thread_local std::vector<uint32_t> buf(kChunkSize);
  return buf.data();
}

// Runs f(j) for j in [0, n) on the intra-op pool, handing out j one at a time: at::parallel_for splits
// a range statically, which balances badly when items differ in size. `work` (elements) decides
// whether threads are worth starting.
template <class F>
void parallel_dynamic(int64_t n, int64_t work, const F& f) {
  if (n <= 1 || work < kSerialWork || at::get_num_threads() == 1 || at::in_parallel_region()) {
    for (int64_t j = 0; j < n; ++j) f(j);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), n), 1, [&](int64_t, int64_t) {
    for (int64_t j = next.fetch_add(1); j < n; j = next.fetch_add(1)) f(j);
  });
}

}  // namespace cpu
}  // namespace unlearn_ext
