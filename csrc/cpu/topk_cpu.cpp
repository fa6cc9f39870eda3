// layerwise_topk and layerwise_topk_mask on the CPU (SPEC §1.2, §1.3), and the selection they and
// masked_*_ share.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <functional>

#include "cpu/common_cpu.h"

namespace unlearn_ext {
namespace cpu {
namespace {

std::vector<int64_t> sizes_of(const std::vector<Source>& sources) {
  std::vector<int64_t> n;
  n.reserve(sources.size());
  for (const Source& s : sources) n.push_back(s.x.numel());
  return n;
}

}  // namespace

// A bracket [lo, hi] of rank keys that holds the layer's threshold with high probability: the keys of a
// deterministic sample of cache-line blocks spread over the layer, cut a generous margin (6 standard
// deviations of the sample rank, plus 32) either side of where the threshold falls in the sample. The
// result stays exact whatever the sample says; a missed bracket only costs the radix passes.
void LayerwiseSelection::sample_bracket(int64_t l) {
  Layer& lay = layers_[l];
  visit_reader(sources_[l], [&](const auto& val) {
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

// Radix pass 0 of one item: finiteness, and the histogram of the leading digit into its layer's.
void LayerwiseSelection::histogram_item(int64_t j) {
  const Item& it = plan_.items[j];
  Layer& lay = layers_[it.layer];
  visit_reader(sources_[it.layer], [&](const auto& val) {
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

// Radix pass 1 of one item: entries above the layer's leading threshold digit, and the keys inside it.
void LayerwiseSelection::collect_digit_item(int64_t j) {
  const Item& it = plan_.items[j];
  const Layer& lay = layers_[it.layer];
  visit_reader(sources_[it.layer], [&](const auto& val) {
    const uint32_t prefix = lay.th.threshold, mask = radix_prefix_mask(1);
    uint32_t* cand = item_scratch();
    int64_t strict = 0, c = 0;
    for (int64_t i = it.begin; i < it.end; ++i) {
      const uint32_t rk = rank_key(abs_key(val(i)), largest_);
      const uint32_t top = rk & mask;
      strict += top > prefix;
      cand[c] = rk;
      c += top == prefix;
    }
    items_[j].strict = strict;
    items_[j].cand.assign(cand, cand + c);
  });
}

// The bracket pass of one item: finiteness, entries above the bracket, and the keys inside it.
void LayerwiseSelection::bracket_item(int64_t j) {
  const Item& it = plan_.items[j];
  const Layer& lay = layers_[it.layer];
  visit_reader(sources_[it.layer], [&](const auto& val) {
    const uint32_t lo = lay.lo, hi = lay.hi;
    uint32_t* cand = item_scratch();
    int64_t strict = 0, c = 0;
    bool bad = false;
    for (int64_t i = it.begin; i < it.end; ++i) {
      const uint32_t a = abs_key(val(i));
      bad |= a >= kNonFiniteKey;
      const uint32_t rk = rank_key(a, largest_);
      strict += rk > hi;
      cand[c] = rk;
      c += (rk >= lo) & (rk <= hi);
    }
    items_[j].nonfinite |= bad;
    items_[j].strict = strict;
    items_[j].cand.assign(cand, cand + c);
  });
}

LayerwiseSelection::LayerwiseSelection(std::vector<Source> sources, double ratio, bool largest, const char* op,
                                       const char* arg)
    : sources_(std::move(sources)),
      largest_(largest),
      plan_(sizes_of(sources_)),
      layers_(sources_.size()),
      items_(plan_.items.size()) {
  const int64_t L = static_cast<int64_t>(sources_.size());
  std::vector<int64_t> sampled;
  for (int64_t l = 0; l < L; ++l) {
    Layer& lay = layers_[l];
    lay.n = sources_[l].x.numel();
    lay.k = keep_count(lay.n, ratio);
    if (lay.k == lay.n) {
      lay.mode = kAll;
      lay.th = select_all(lay.n);
    } else if (lay.n >= kSampleMin) {
      sampled.push_back(l);
    }
  }
  const auto n_sampled = static_cast<int64_t>(sampled.size());
  parallel_dynamic(n_sampled, n_sampled * kSampleBlocks * kSampleBlock,
                   [&](int64_t b) { sample_bracket(sampled[b]); });

  // One pass over everything: finiteness; the bracket pass or the radix histogram.
  parallel_dynamic(plan_.size(), plan_.total, [&](int64_t j) {
    const Item& it = plan_.items[j];
    const Layer& lay = layers_[it.layer];
    if (lay.mode == kAll) {
      visit_reader(sources_[it.layer], [&](const auto& val) {
        bool bad = false;
        for (int64_t i = it.begin; i < it.end; ++i) bad |= abs_key(val(i)) >= kNonFiniteKey;
        items_[j].nonfinite = bad;
      });
      items_[j].take = it.end - it.begin;
    } else if (lay.mode == kBracket) {
      bracket_item(j);
    } else {
      histogram_item(j);
    }
  });
  for (int64_t j = 0; j < plan_.size(); ++j) {
    TORCH_CHECK_VALUE(!items_[j].nonfinite, op, ": ", arg, "[", plan_.items[j].layer,
                      "] contains NaN or Inf; cannot select from it");
  }

  // Brackets that missed the threshold fall back to the radix select (one more histogram pass).
  std::vector<int64_t> redo;
  for (int64_t l = 0; l < L; ++l) {
    Layer& lay = layers_[l];
    if (lay.mode != kBracket) continue;
    int64_t above = 0, inside = 0;
    for (int64_t j = plan_.first_item[l]; j < plan_.first_item[l + 1]; ++j) {
      above += items_[j].strict;
      inside += static_cast<int64_t>(items_[j].cand.size());
    }
    if (above < lay.k && lay.k <= above + inside) {
      lay.th = LayerThreshold{0u, lay.k - above};  // still needed from inside the bracket
    } else {
      lay.mode = kRadix;
      for (int64_t j = plan_.first_item[l]; j < plan_.first_item[l + 1]; ++j) {
        items_[j].strict = 0;
        std::vector<uint32_t>().swap(items_[j].cand);
        redo.push_back(j);
      }
    }
  }
  const auto n_redo = static_cast<int64_t>(redo.size());
  parallel_dynamic(n_redo, n_redo * kChunk, [&](int64_t r) { histogram_item(redo[r]); });

  // Leading digit of each radix layer; th.take_equal carries the count still needed inside the digit.
  for (Layer& lay : layers_) {
    if (lay.mode != kRadix) continue;
    int64_t need = lay.k, above = 0;
    const int d = radix_find_digit(lay.hist, radix_bins(0), need, above);
    lay.th = LayerThreshold{static_cast<uint32_t>(d) << radix_shift(0), need};
  }
  // Radix pass 1 over the items of radix layers: entries above the leading digit, the keys inside it.
  std::vector<int64_t> radix_items;
  for (int64_t j = 0; j < plan_.size(); ++j)
    if (layers_[plan_.items[j].layer].mode == kRadix) radix_items.push_back(j);
  const auto n_radix = static_cast<int64_t>(radix_items.size());
  int64_t radix_work = 0;
  for (int64_t j : radix_items) radix_work += plan_.items[j].end - plan_.items[j].begin;
  parallel_dynamic(n_radix, radix_work, [&](int64_t r) { collect_digit_item(radix_items[r]); });

  // The exact threshold of each layer from its collected keys (radix: the last two digits; bracket: all
  // three), then each item's share of the ties.
  parallel_dynamic(L, plan_.total, [&](int64_t l) {
    Layer& lay = layers_[l];
    if (lay.mode == kAll) return;
    const int64_t j0 = plan_.first_item[l], j1 = plan_.first_item[l + 1];
    uint32_t prefix = lay.th.threshold;
    int64_t need = lay.th.take_equal;
    for (int pass = lay.mode == kBracket ? 0 : 1; pass < kRadixPasses; ++pass) {
      uint32_t hist[kMaxRadixBins] = {};
      for (int64_t j = j0; j < j1; ++j)
        for (uint32_t rk : items_[j].cand)
          if (radix_is_candidate(rk, pass, prefix)) ++hist[radix_digit(rk, pass)];
      int64_t above = 0;
      const int d = radix_find_digit(hist, radix_bins(pass), need, above);
      prefix |= static_cast<uint32_t>(d) << radix_shift(pass);
    }
    lay.th = LayerThreshold{prefix, need};
    int64_t eq_before = 0, kept = 0;
    for (int64_t j = j0; j < j1; ++j) {
      ItemState& st = items_[j];
      for (uint32_t rk : st.cand) {
        st.strict += rk > prefix;
        st.eq += rk == prefix;
      }
      std::vector<uint32_t>().swap(st.cand);
      st.take = chunk_take_equal(need, eq_before, st.eq);
      eq_before += st.eq;
      kept += st.strict + st.take;
    }
    TORCH_INTERNAL_ASSERT(kept == lay.k, "layerwise selection kept ", kept, " of layer ", l, ", expected ", lay.k);
  });
}

namespace {

std::vector<Source> sources_for(at::TensorList xs, const std::optional<at::TensorList>& subtract) {
  std::vector<Source> src;
  src.reserve(xs.size());
  for (size_t l = 0; l < xs.size(); ++l) src.push_back({xs[l], subtract ? (*subtract)[l] : at::Tensor()});
  return src;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> layerwise_topk_cpu(at::TensorList xs, double ratio, bool largest,
                                                                  std::optional<at::TensorList> subtract) {
  constexpr const char* op = "layerwise_topk";
  check_value_list(op, "xs", xs, /*same_dtype=*/true);
  check_ratio(op, ratio);
  if (subtract) check_pairs(op, "subtract", *subtract, "xs", xs);
  const int64_t L = static_cast<int64_t>(xs.size());
  const auto dtype = L ? xs[0].scalar_type() : at::kFloat;

  const LayerwiseSelection sel(sources_for(xs, subtract), ratio, largest, op, subtract ? "xs - subtract" : "xs");
  const ChunkPlan& plan = sel.plan();
  at::Tensor offsets = at::empty({L + 1}, at::kLong);
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t l = 0; l < L; ++l) off[l + 1] = off[l] + sel.kept(l);
  // Where each item's selection starts in the output.
  std::vector<int64_t> base(plan.size());
  for (int64_t l = 0; l < L; ++l) {
    int64_t pos = off[l];
    for (int64_t j = plan.first_item[l]; j < plan.first_item[l + 1]; ++j) {
      base[j] = pos;
      pos += sel.kept_in_item(j);
    }
  }

  at::Tensor values = at::empty({off[L]}, xs.empty() ? at::TensorOptions(at::kFloat) : xs[0].options());
  at::Tensor indices = at::empty({off[L]}, at::kInt);
  int32_t* idx = indices.data_ptr<int32_t>();
  UE_DISPATCH_FLOATS(dtype, "layerwise_topk_cpu", [&] {
    scalar_t* out = values.data_ptr<scalar_t>();
    parallel_dynamic(plan.size(), plan.total, [&](int64_t j) {
      visit_reader(sel.source(plan.items[j].layer), [&](const auto& val) {
        auto* kept = reinterpret_cast<int32_t*>(item_scratch());
        int64_t c = 0;
        sel.scan(j, val, [&](int64_t i, float, bool keep) {
          kept[c] = static_cast<int32_t>(i);
          c += keep;
        });
        for (int64_t q = 0, pos = base[j]; q < c; ++q, ++pos) {
          idx[pos] = kept[q];
          out[pos] = static_cast<scalar_t>(val(kept[q]));
        }
      });
    });
  });
  return {values, indices, offsets};
}

std::vector<at::Tensor> layerwise_topk_mask_cpu(at::TensorList xs, double ratio, bool largest) {
  constexpr const char* op = "layerwise_topk_mask";
  check_value_list(op, "xs", xs, /*same_dtype=*/true);
  check_ratio(op, ratio);
  const LayerwiseSelection sel(sources_for(xs, std::nullopt), ratio, largest, op, "xs");
  std::vector<at::Tensor> masks;
  masks.reserve(xs.size());
  for (const at::Tensor& x : xs) masks.push_back(at::empty_like(x, x.options().dtype(at::kBool)));
  const ChunkPlan& plan = sel.plan();
  parallel_dynamic(plan.size(), plan.total, [&](int64_t j) {
    bool* m = masks[plan.items[j].layer].data_ptr<bool>();
    visit_reader(sel.source(plan.items[j].layer), [&](const auto& val) {
      sel.scan(j, val, [&](int64_t i, float, bool keep) { m[i] = keep; });
    });
  });
  return masks;
}

}  // namespace
}  // namespace cpu
}  // namespace unlearn_ext

TORCH_LIBRARY_IMPL(unlearn_ext, CPU, m) {
  m.impl("layerwise_topk", &unlearn_ext::cpu::layerwise_topk_cpu);
  m.impl("layerwise_topk_mask", &unlearn_ext::cpu::layerwise_topk_mask_cpu);
}
