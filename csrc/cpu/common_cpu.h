// Shared pieces of the CPU kernels: argument checks (ValueError naming the argument and layer), dtype
// dispatch and readers, a chunked work plan with dynamic scheduling, and the exact per-layer radix
// selection of select.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <limits>
#include <mutex>
#include <string>
#include <vector>

#include "select.h"

// The three value dtypes of the ops (SPEC §1); double is not one of them.
#define UE_DISPATCH_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace unlearn_ext {
namespace cpu {

constexpr int64_t kChunk = int64_t{1} << 16;       // elements per work item
constexpr int64_t kSerialWork = int64_t{1} << 15;  // below this many elements threads cost more than they save

inline bool is_value_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_ratio(const char* op, double ratio) {
  TORCH_CHECK_VALUE(ratio > 0.0 && ratio <= 1.0, op, ": ratio must be in (0, 1], got ", ratio);
}

// Device and contiguity of one tensor argument, `label` like "xs[3]".
inline void check_cpu_tensor(const char* op, const std::string& label, const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.defined(), op, ": ", label, " is undefined");
  TORCH_CHECK_VALUE(x.device().is_cpu(), op, ": ", label, " is on ", x.device(),
                    " but this is the CPU kernel; pass all tensors on one device");
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": ", label, " is not contiguous");
}

// A layer: also addressed by int32 indices.
inline void check_layer_tensor(const char* op, const std::string& label, const at::Tensor& x) {
  check_cpu_tensor(op, label, x);
  TORCH_CHECK_VALUE(x.numel() <= std::numeric_limits<int32_t>::max(), op, ": ", label, " has ", x.numel(),
                    " elements; at most 2**31 - 1 are supported (indices are int32)");
}

inline std::string item_label(const char* name, size_t i) { return std::string(name) + "[" + std::to_string(i) + "]"; }

// A list of float32/float16/bfloat16 tensors (all of one dtype when `same_dtype`).
inline void check_value_list(const char* op, const char* name, at::TensorList xs, bool same_dtype) {
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string label = item_label(name, i);
    check_layer_tensor(op, label, xs[i]);
    TORCH_CHECK_VALUE(is_value_dtype(xs[i].scalar_type()), op, ": ", label, " has dtype ", xs[i].scalar_type(),
                      "; supported: float32, float16, bfloat16");
    TORCH_CHECK_VALUE(!same_dtype || xs[i].scalar_type() == xs[0].scalar_type(), op, ": ", label, " has dtype ",
                      xs[i].scalar_type(), " but ", name, "[0] has ", xs[0].scalar_type());
  }
}

// `xs` pairs up with `refs`: same length and shapes, each a CPU contiguous tensor of `dtype` or, when
// `dtype` is undefined, of the dtype of its partner in `refs`.
inline void check_pairs(const char* op, const char* name, at::TensorList xs, const char* ref_name,
                        at::TensorList refs, std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK_VALUE(xs.size() == refs.size(), op, ": ", name, " has ", xs.size(), " tensors but ", ref_name,
                    " has ", refs.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    const std::string label = item_label(name, i);
    check_layer_tensor(op, label, xs[i]);
    TORCH_CHECK_VALUE(xs[i].sizes() == refs[i].sizes(), op, ": ", label, " has shape ", xs[i].sizes(), " but ",
                      ref_name, "[", i, "] has ", refs[i].sizes());
    const at::ScalarType want = dtype ? *dtype : refs[i].scalar_type();
    TORCH_CHECK_VALUE(xs[i].scalar_type() == want, op, ": ", label, " has dtype ", xs[i].scalar_type(),
                      " but must be ", want);
  }
}

template <typename T>
struct PlainReader {
  const T* x;
  float operator()(int64_t i) const { return static_cast<float>(x[i]); }
};

// x - s rounded to T first, as torch's `x - s` does, then widened.
template <typename T>
struct DiffReader {
  const T* x;
  const T* s;
  float operator()(int64_t i) const { return static_cast<float>(static_cast<T>(x[i] - s[i])); }
};

// What a layer selects on: x, or x - s when s is defined.
struct Source {
  at::Tensor x, s;
};

template <class F>
void visit_reader(const Source& src, F&& f) {
  UE_DISPATCH_FLOATS(src.x.scalar_type(), "unlearn_ext_select", [&] {
    const scalar_t* x = src.x.const_data_ptr<scalar_t>();
    if (src.s.defined()) {
      f(DiffReader<scalar_t>{x, src.s.const_data_ptr<scalar_t>()});
    } else {
      f(PlainReader<scalar_t>{x});
    }
  });
}

// The layers cut into work items of at most kChunk elements, in layer then index order: big layers
// spread over threads, small ones are one item each.
struct Item {
  int64_t layer, begin, end;
};

struct ChunkPlan {
  std::vector<Item> items;
  std::vector<int64_t> first_item;  // layer l owns items [first_item[l], first_item[l + 1])
  int64_t total = 0;

  explicit ChunkPlan(const std::vector<int64_t>& sizes) {
    first_item.reserve(sizes.size() + 1);
    for (size_t l = 0; l < sizes.size(); ++l) {
      first_item.push_back(static_cast<int64_t>(items.size()));
      for (int64_t b = 0; b < sizes[l]; b += kChunk) items.push_back({static_cast<int64_t>(l), b, std::min(sizes[l], b + kChunk)});
      total += sizes[l];
    }
    first_item.push_back(static_cast<int64_t>(items.size()));
  }
  int64_t size() const { return static_cast<int64_t>(items.size()); }
};

// A per-thread buffer of kChunk 32-bit words, for branch-free compaction of one item.
inline uint32_t* item_scratch() {
  thread_local std::vector<uint32_t> buf(kChunk);
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

// Exact layer-wise selection (SPEC §1.1) over a list of sources, computed up front so that the op can
// refuse NaN/Inf before it writes anything. Big layers (>= kSampleMin elements) first bracket their
// threshold from a sample of 4096 keys (256 cache-line blocks), then one full pass counts the entries
// above the bracket and collects the keys inside it (a few % of the layer); the exact threshold is
// resolved on those keys alone, so each value is read twice in all (this pass and the output pass). A
// bracket that misses (possible, not likely) and small layers use a 3-digit radix select instead: a
// histogram of the leading 11-bit digit, one scan collecting the keys in the threshold digit, the last
// two digits resolved on those keys. What is left per item (how many threshold-equal entries it takes)
// lets every item be written independently.
constexpr int64_t kSampleMin = int64_t{1} << 14;
constexpr int64_t kSampleBlocks = 256, kSampleBlock = 16;

class LayerwiseSelection {
 public:
  // Throws ValueError "<op>: <arg>[l] contains NaN or Inf" for the first such layer.
  LayerwiseSelection(std::vector<Source> sources, double ratio, bool largest, const char* op, const char* arg);

  const ChunkPlan& plan() const { return plan_; }
  const Source& source(int64_t layer) const { return sources_[layer]; }
  int64_t kept(int64_t layer) const { return layers_[layer].k; }
  int64_t kept_in_item(int64_t j) const { return items_[j].strict + items_[j].take; }

  // f(i, v, selected) for each element i of item j in index order; v is the reader's float value.
  // Only the (at most one per layer) item that takes some but not all of its threshold-equal entries
  // needs the ordered tie walk; every other item is a plain comparison, which vectorises.
  template <class Reader, class F>
  void scan(int64_t j, const Reader& val, const F& f) const {
    const Item& it = plan_.items[j];
    const Layer& lay = layers_[it.layer];
    if (lay.mode == kAll) {
      for (int64_t i = it.begin; i < it.end; ++i) f(i, val(i), true);
      return;
    }
    const uint32_t th = lay.th.threshold;
    const bool largest = largest_;
    int64_t take = items_[j].take;
    if (take == 0) {
      for (int64_t i = it.begin; i < it.end; ++i) {
        const float v = val(i);
        f(i, v, rank_key(abs_key(v), largest) > th);
      }
    } else if (take >= items_[j].eq) {
      for (int64_t i = it.begin; i < it.end; ++i) {
        const float v = val(i);
        f(i, v, rank_key(abs_key(v), largest) >= th);
      }
    } else {
      for (int64_t i = it.begin; i < it.end; ++i) {
        const float v = val(i);
        f(i, v, take_selected(rank_key(abs_key(v), largest), th, take));
      }
    }
  }

 private:
  enum Mode : uint8_t { kAll, kRadix, kBracket };
  struct Layer {
    int64_t n = 0, k = 0;
    Mode mode = kRadix;  // kAll: k == n, kept whole, only checked for finiteness
    uint32_t lo = 0, hi = 0;  // kBracket: the threshold's rank key is taken to lie in [lo, hi]
    uint32_t hist[kMaxRadixBins] = {};
    std::mutex mu;
    LayerThreshold th{0u, 0};
  };
  struct ItemState {
    int64_t strict = 0, eq = 0, take = 0;
    bool nonfinite = false;
    std::vector<uint32_t> cand;
  };

  void sample_bracket(int64_t l);
  void histogram_item(int64_t j);
  void collect_digit_item(int64_t j);
  void bracket_item(int64_t j);

  std::vector<Source> sources_;
  bool largest_;
  ChunkPlan plan_;
  std::vector<Layer> layers_;
  std::vector<ItemState> items_;
};

}  // namespace cpu
}  // namespace unlearn_ext
