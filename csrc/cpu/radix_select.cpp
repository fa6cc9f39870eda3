// LayerSelection on the CPU (radix_select.h): the steps of compute().
#include "cpu/radix_select.h"

#include <algorithm>
#include <cmath>
#include <functional>

namespace unlearn_ext {
namespace cpu {
namespace {

std::vector<int64_t> sizes_of(const std::vector<Source>& sources) {
  std::vector<int64_t> n;
  n.reserve(sources.size());
  for (const Source& s : sources) n.push_back(s.x.numel());
  return n;
}

// What a pass over one item's tiles found: how many rank keys lie above the range it looks for, and the
// keys inside it, copied from the thread's scratch into `cand`. Returns the largest |.| key seen.
template <class Value, class Above, class Inside>
uint32_t count_above_collect_inside(const Value& val, const Item& it, bool largest, const Above& above,
                                    const Inside& inside, int64_t& strict, std::vector<uint32_t>& cand) {
  uint32_t* scratch = item_scratch();
  int64_t s = 0, c = 0;
  const uint32_t worst =
      for_each_tile(val, it.begin, it.end - it.begin, largest, [&](const uint32_t* rk, int64_t, int64_t m) {
        int64_t t = 0;
        for (int64_t q = 0; q < m; ++q) t += above(rk[q]);
        s += t;
        for_each_match(rk, m, inside, [&](int64_t q) { scratch[c++] = rk[q]; });
      });
  strict = s;
  cand.assign(scratch, scratch + c);
  return worst;
}

// The need-th most preferred (largest) of `keys`, all within [base, base + width]; `need` becomes how many
// of the keys equal to it are taken. A radix select on key - base, 11 bits at a time from the width's
// highest bit down, each pass keeping only the keys of the chosen digit (the first pass sees them all,
// the next ones few).
uint32_t nth_preferred(std::vector<uint32_t>& keys, uint32_t base, uint32_t width, int64_t& need) {
  constexpr int kDigitBits = 11;
  static_assert(kMaxRadixBins == 1 << kDigitBits, "one digit per histogram bin");
  const int top = width == 0 ? 0 : 32 - __builtin_clz(width);
  int shift = std::max(top - kDigitBits, 0);
  uint32_t rel = 0;
  size_t m = keys.size();
  for (;;) {
    // Keys left share every bit of key - base above this digit; the digit may overlap bits fixed
    // already (when shift < kDigitBits), which all keys left share too.
    const auto digit = [&](uint32_t k) { return ((k - base) >> shift) & (kMaxRadixBins - 1); };
    uint32_t hist[kMaxRadixBins] = {};
    for (size_t q = 0; q < m; ++q) ++hist[digit(keys[q])];
    int64_t above = 0;
    const auto d = static_cast<uint32_t>(radix_find_digit(hist, kMaxRadixBins, need, above));
    rel |= d << shift;
    if (shift == 0) return base + rel;
    size_t c = 0;
    for (size_t q = 0; q < m; ++q) {
      keys[c] = keys[q];
      c += digit(keys[q]) == d;
    }
    m = c;
    shift = std::max(shift - kDigitBits, 0);
  }
}

}  // namespace

LayerSelection::LayerSelection(std::vector<Source> sources, double ratio, bool largest)
    : sources_(std::move(sources)),
      largest_(largest),
      plan_(sizes_of(sources_)),
      layers_(sources_.size()),
      items_(plan_.items.size()) {
  for (size_t l = 0; l < sources_.size(); ++l) {
    Layer& lay = layers_[l];
    lay.n = sources_[l].x.numel();
    lay.k = keep_count(lay.n, ratio);
    if (lay.k == lay.n) {
      lay.mode = kAll;
      lay.th = select_all(lay.n);
    }
  }
}

void LayerSelection::compute() {
  sample_brackets();
  if (!first_pass()) return;
  radix_for_missed_brackets();
  resolve_leading_digits();
  collect_threshold_digits();
  resolve_thresholds();
}

void LayerSelection::check_finite(const char* op, const char* name) const {
  for (int64_t j = 0; j < plan_.size(); ++j) {
    TORCH_CHECK_VALUE(!items_[j].nonfinite, op, ": ", name, "[", plan_.items[j].layer,
                      "] contains NaN or Inf; cannot select from it");
  }
}

// ---- step 1: bracket the threshold of every big layer from a sample ---------------------------------

void LayerSelection::sample_brackets() {
  std::vector<int64_t> sampled;
  for (int64_t l = 0; l < static_cast<int64_t>(layers_.size()); ++l) {
    if (layers_[l].mode == kRadix && layers_[l].n >= kSampleMin) sampled.push_back(l);
  }
  const auto n = static_cast<int64_t>(sampled.size());
  parallel_dynamic(n, n * kSampleBlocks * kSampleBlock, [&](int64_t b) { sample_bracket(sampled[b]); });
}

// A bracket [lo, hi] of rank keys that holds the layer's threshold with high probability: the keys of a
// deterministic sample of cache-line blocks spread over the layer, cut a generous margin (6 standard
// deviations of the sample rank, plus 32) either side of where the threshold falls in the sample. The
// result stays exact whatever the sample says; a missed bracket only costs the radix passes.
void LayerSelection::sample_bracket(int64_t l) {
  Layer& lay = layers_[l];
  visit_ranked_value(sources_[l], [&](const auto& val) {
    std::vector<uint32_t> s;
    s.reserve(kSampleBlocks * kSampleBlock);
    for (int64_t b = 0; b < kSampleBlocks; ++b) {
      const int64_t start = b * (lay.n - kSampleBlock) / (kSampleBlocks - 1);
      for (int64_t i = start; i < start + kSampleBlock; ++i) {
        const uint32_t a = abs_key(val(i));
        if (a >= kNonFiniteKey) return;  // stays kRadix; the full pass reports it
        s.push_back(rank_key(a, largest_));
      }
    }
    const auto m = static_cast<int64_t>(s.size());
    const double p = static_cast<double>(lay.k) / static_cast<double>(lay.n);
    const double q = p * static_cast<double>(m);
    const double margin = 6.0 * std::sqrt(static_cast<double>(m) * p * (1.0 - p)) + 32.0;
    const auto hi_idx = static_cast<int64_t>(std::floor(q - margin));
    const auto lo_idx = static_cast<int64_t>(std::ceil(q + margin));
    if (hi_idx < 0 && lo_idx >= m) return;  // the bracket would be the whole layer
    uint32_t hi = kKeyMask, lo = 0;  // nothing ranks above kKeyMask; everything is >= 0
    if (hi_idx >= 0) {
      std::nth_element(s.begin(), s.begin() + hi_idx, s.end(), std::greater<uint32_t>());
      hi = s[hi_idx];
    }
    if (lo_idx < m) {
      const int64_t from = hi_idx >= 0 ? hi_idx + 1 : 0;
      std::nth_element(s.begin() + from, s.begin() + lo_idx, s.end(), std::greater<uint32_t>());
      lo = s[lo_idx];
    }
    lay.lo = lo;
    lay.hi = hi;
    lay.mode = kBracket;
  });
}

// ---- step 2: one pass over everything: finiteness; the bracket pass or the leading-digit histogram ----

bool LayerSelection::first_pass() {
  parallel_dynamic(plan_.size(), plan_.total, [&](int64_t j) {
    switch (layers_[plan_.items[j].layer].mode) {
      case kAll: finite_item(j); break;
      case kBracket: bracket_item(j); break;
      case kRadix: histogram_item(j); break;
    }
  });
  return std::none_of(items_.begin(), items_.end(), [](const ItemState& st) { return st.nonfinite; });
}

// An item of a layer kept whole: finiteness only; it takes all its entries.
void LayerSelection::finite_item(int64_t j) {
  const Item& it = plan_.items[j];
  visit_ranked_value(sources_[it.layer], [&](const auto& val) {
    bool bad = false;
    for (int64_t i = it.begin; i < it.end; ++i) bad |= abs_key(val(i)) >= kNonFiniteKey;
    items_[j].nonfinite = bad;
  });
  items_[j].take = it.end - it.begin;
}

// Radix pass 0 of one item: finiteness, and the histogram of the leading digit into its layer's.
void LayerSelection::histogram_item(int64_t j) {
  const Item& it = plan_.items[j];
  Layer& lay = layers_[it.layer];
  visit_ranked_value(sources_[it.layer], [&](const auto& val) {
    // Two histograms for alternate entries: runs of equal digits (common, values cluster) would
    // otherwise serialise on one counter.
    uint32_t hist[2][kMaxRadixBins] = {};
    bool bad = false;
    for (int64_t i = it.begin; i < it.end; ++i) {
      const uint32_t a = abs_key(val(i));
      bad |= a >= kNonFiniteKey;
      ++hist[i & 1][radix_digit(rank_key(a, largest_), 0)];
    }
    items_[j].nonfinite |= bad;
    std::lock_guard<std::mutex> lock(lay.mu);
    for (int d = 0; d < radix_bins(0); ++d) lay.hist[d] += hist[0][d] + hist[1][d];
  });
}

// The bracket pass of one item: finiteness, entries above the bracket, and the keys inside it.
void LayerSelection::bracket_item(int64_t j) {
  const Item& it = plan_.items[j];
  const Layer& lay = layers_[it.layer];
  ItemState& st = items_[j];
  visit_ranked_value(sources_[it.layer], [&](const auto& val) {
    const uint32_t lo = lay.lo, hi = lay.hi, width = hi - lo;
    const auto above = [&](uint32_t r) { return r > hi; };
    const auto inside = [&](uint32_t r) { return r - lo <= width; };  // unsigned: keys below lo wrap around
    const uint32_t worst = count_above_collect_inside(val, it, largest_, above, inside, st.strict, st.cand);
    st.nonfinite |= worst >= kNonFiniteKey;
  });
}

// ---- step 3: brackets that missed the threshold fall back to the radix select -------------------------

void LayerSelection::radix_for_missed_brackets() {
  std::vector<int64_t> redo;
  for (int64_t l = 0; l < static_cast<int64_t>(layers_.size()); ++l) {
    Layer& lay = layers_[l];
    if (lay.mode != kBracket) continue;
    int64_t above = 0, inside = 0;
    for (int64_t j = plan_.first_item[l]; j < plan_.first_item[l + 1]; ++j) {
      above += items_[j].strict;
      inside += static_cast<int64_t>(items_[j].cand.size());
    }
    if (above < lay.k && lay.k <= above + inside) {
      lay.th = LayerThreshold{0u, lay.k - above};  // still needed from inside the bracket
      continue;
    }
    lay.mode = kRadix;
    for (int64_t j = plan_.first_item[l]; j < plan_.first_item[l + 1]; ++j) {
      items_[j] = ItemState{};
      redo.push_back(j);
    }
  }
  const auto n = static_cast<int64_t>(redo.size());
  parallel_dynamic(n, n * kChunkSize, [&](int64_t r) { histogram_item(redo[r]); });
}

// ---- step 4: the leading digit of each radix layer --------------------------------------------------

// th.take_equal carries the count still needed inside the digit.
void LayerSelection::resolve_leading_digits() {
  for (Layer& lay : layers_) {
    if (lay.mode != kRadix) continue;
    int64_t need = lay.k, above = 0;
    const int d = radix_find_digit(lay.hist, radix_bins(0), need, above);
    lay.th = LayerThreshold{static_cast<uint32_t>(d) << radix_shift(0), need};
  }
}

// ---- step 5: radix pass 1 over the items of radix layers --------------------------------------------

void LayerSelection::collect_threshold_digits() {
  std::vector<int64_t> radix_items;
  int64_t work = 0;
  for (int64_t j = 0; j < plan_.size(); ++j) {
    const Item& it = plan_.items[j];
    if (layers_[it.layer].mode != kRadix) continue;
    radix_items.push_back(j);
    work += it.end - it.begin;
  }
  parallel_dynamic(static_cast<int64_t>(radix_items.size()), work,
                   [&](int64_t r) { collect_digit_item(radix_items[r]); });
}

// Entries above the layer's leading threshold digit, and the keys inside it.
void LayerSelection::collect_digit_item(int64_t j) {
  const Item& it = plan_.items[j];
  const Layer& lay = layers_[it.layer];
  visit_ranked_value(sources_[it.layer], [&](const auto& val) {
    const uint32_t prefix = lay.th.threshold, mask = radix_prefix_mask(1);
    count_above_collect_inside(
        val, it, largest_, [&](uint32_t r) { return (r & mask) > prefix; },
        [&](uint32_t r) { return (r & mask) == prefix; }, items_[j].strict, items_[j].cand);
  });
}

// ---- step 6: the exact threshold of each layer from its collected keys, each item's share of the ties --

void LayerSelection::resolve_thresholds() {
  parallel_dynamic(static_cast<int64_t>(layers_.size()), plan_.total, [&](int64_t l) { resolve_layer(l); });
}

// Bracket layers resolve their threshold among the keys inside the bracket, radix layers among the keys
// in the threshold's leading digit.
void LayerSelection::resolve_layer(int64_t l) {
  Layer& lay = layers_[l];
  if (lay.mode == kAll) return;
  const int64_t j0 = plan_.first_item[l], j1 = plan_.first_item[l + 1];
  std::vector<uint32_t> keys;
  for (int64_t j = j0; j < j1; ++j) keys.insert(keys.end(), items_[j].cand.begin(), items_[j].cand.end());
  int64_t need = lay.th.take_equal;
  const bool bracket = lay.mode == kBracket;
  const uint32_t base = bracket ? lay.lo : lay.th.threshold;
  const uint32_t width = bracket ? lay.hi - lay.lo : kKeyMask & ~radix_prefix_mask(1);
  const uint32_t th = nth_preferred(keys, base, width, need);
  lay.th = LayerThreshold{th, need};
  int64_t eq_before = 0, kept = 0;
  for (int64_t j = j0; j < j1; ++j) {
    ItemState& st = items_[j];
    for (uint32_t rk : st.cand) {
      st.strict += rk > th;
      st.eq += rk == th;
    }
    std::vector<uint32_t>().swap(st.cand);
    st.take = chunk_take_equal(need, eq_before, st.eq);
    eq_before += st.eq;
    kept += st.strict + st.take;
  }
  TORCH_INTERNAL_ASSERT(kept == lay.k, "layer selection kept ", kept, " of layer ", l, ", expected ", lay.k);
}

}  // namespace cpu
}  // namespace unlearn_ext
