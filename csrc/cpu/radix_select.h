// Per-layer top-k selection on the CPU, shared by layerwise_topk(_mask) and the masked
// optimizer steps; the counterpart of cuda/radix_select.cuh, with the same rule (select.h) and the same
// interface: plan in the constructor, compute(), check_finite(), then an ordered walk (scan) per item.
//
// The selection is computed up front, so an op can refuse NaN/Inf before it writes anything. Big layers
// (>= kSampleMin elements) first bracket their threshold from a sample of 4096 keys (256 cache-line
// blocks), then one full pass counts the entries above the bracket and collects the keys inside it (a few
// % of the layer); the exact threshold is resolved on those keys alone, so each value is read twice in
// all (this pass and the output pass). A bracket that misses (possible, not likely) and small layers use a
// radix select instead: a histogram of the leading 11-bit digit, one scan collecting the keys in the
// threshold digit, the rest of the threshold resolved on those keys. The full passes work on tiles of
// rank keys (key_blocks.h). What is left per item (how many threshold-equal entries it takes) lets every
// item be written independently.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <mutex>
#include <vector>

#include "checks.h"
#include "cpu/key_blocks.h"
#include "cpu/multi_tensor.h"
#include "select.h"

namespace unlearn_ext {
namespace cpu {

// The value whose |.| is ranked: x, or x - s rounded to T first (as torch's `x - s` does), then widened.
template <typename T, bool kSubtract = false>
struct RankedValue {
  using value_type = T;
  const T* x;
  const T* s;
  float operator()(int64_t i) const {
    if constexpr (kSubtract) {
      return static_cast<float>(static_cast<T>(x[i] - s[i]));
    } else {
      return static_cast<float>(x[i]);
    }
  }
};

// What a layer selects on: x, or x - s when s is defined.
struct Source {
  at::Tensor x, s;
};

// f(value) with the RankedValue of a source, for its dtype.
template <class F>
void visit_ranked_value(const Source& src, F&& f) {
  dispatch_value_type(src.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* x = src.x.const_data_ptr<T>();
    if (src.s.defined()) {
      f(RankedValue<T, true>{x, src.s.const_data_ptr<T>()});
    } else {
      f(RankedValue<T>{x, nullptr});
    }
  });
}

constexpr int64_t kSampleMin = int64_t{1} << 14;
constexpr int64_t kSampleBlocks = 256, kSampleBlock = 16;

class LayerSelection {
 public:
  // Plans the selection (keep counts, chunks); reads no data.
  LayerSelection(std::vector<Source> sources, double ratio, bool largest);

  // Finds each layer's threshold. Stops after the first full pass if a layer holds NaN/Inf.
  void compute();
  // ValueError "<op>: <name>[l] contains NaN or Inf; cannot select from it" for the first such layer.
  void check_finite(const char* op, const char* name) const;

  const ChunkPlan& plan() const { return plan_; }
  const Source& source(int64_t layer) const { return sources_[layer]; }
  int64_t kept(int64_t layer) const { return layers_[layer].k; }
  int64_t kept_in_item(int64_t j) const { return items_[j].strict + items_[j].take; }

  // The ordered walk of item j: f(i, v, selected) for each element i in index order, v the ranked value.
  // Only the (at most one per layer) item that takes some but not all of its threshold-equal entries
  // needs the ordered tie walk; every other item is a plain comparison, which vectorises.
  template <class Value, class F>
  void scan(int64_t j, const Value& val, const F& f) const {
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

  // f(i) for each selected element i of item j, in index order: the same selection as scan(), walked
  // block by block (key_blocks.h) unless the item needs the ordered tie walk.
  template <class Value, class F>
  void scan_kept(int64_t j, const Value& val, const F& f) const {
    const Item& it = plan_.items[j];
    const Layer& lay = layers_[it.layer];
    const ItemState& st = items_[j];
    if (lay.mode == kAll) {
      for (int64_t i = it.begin; i < it.end; ++i) f(i);
      return;
    }
    const uint32_t th = lay.th.threshold;
    int64_t take = st.take;
    if (take > 0 && take < st.eq) {
      scan(j, val, [&](int64_t i, float, bool keep) {
        if (keep) f(i);
      });
      return;
    }
    for_each_tile(val, it.begin, it.end - it.begin, largest_, [&](const uint32_t* rk, int64_t t, int64_t m) {
      const auto at = [&](int64_t q) { f(it.begin + t + q); };
      if (take > 0) {  // it takes all its threshold-equal entries
        for_each_match(rk, m, [&](uint32_t r) { return r >= th; }, at);
      } else {
        for_each_match(rk, m, [&](uint32_t r) { return r > th; }, at);
      }
    });
  }

 private:
  enum Mode : uint8_t { kAll, kRadix, kBracket };
  struct Layer {
    int64_t n = 0, k = 0;
    Mode mode = kRadix;       // kAll: k == n, kept whole, only checked for finiteness
    uint32_t lo = 0, hi = 0;  // kBracket: the threshold's rank key is taken to lie in [lo, hi]
    uint32_t hist[kMaxRadixBins] = {};
    std::mutex mu;
    LayerThreshold th{0u, 0};
  };
  struct ItemState {
    int64_t strict = 0, eq = 0, take = 0;
    bool nonfinite = false;
    std::vector<uint32_t> cand;  // rank keys collected by the bracket or digit pass
  };

  // The steps of compute(), in order.
  void sample_brackets();
  bool first_pass();  // false when some layer holds NaN/Inf
  void radix_for_missed_brackets();
  void resolve_leading_digits();
  void collect_threshold_digits();
  void resolve_thresholds();

  // Their work on one layer l or one item j.
  void sample_bracket(int64_t l);
  UE_CPU_CLONES void finite_item(int64_t j);
  UE_CPU_CLONES void histogram_item(int64_t j);
  UE_CPU_CLONES void bracket_item(int64_t j);
  UE_CPU_CLONES void collect_digit_item(int64_t j);
  UE_CPU_CLONES void resolve_layer(int64_t l);

  std::vector<Source> sources_;
  bool largest_;
  ChunkPlan plan_;
  std::vector<Layer> layers_;
  std::vector<ItemState> items_;
};

}  // namespace cpu
}  // namespace unlearn_ext
