// The per-layer selection rule, shared by the CPU and CUDA kernels so both run the same
// arithmetic. Everything here is __host__ __device__ and free of ATen.
//
// Rule: layer of n elements, keep ratio r in (0, 1]: k = min(n, max(1, ceil(r*n))) (0 when n == 0).
// Keep the k entries of largest |x| (or smallest, largest=false); ties at the threshold go to the lower
// flat index first. |x| is compared through its float32 bit pattern with the sign cleared: for
// non-negative IEEE floats the unsigned bit order is the value order, so a radix select on these 31-bit
// keys is exact, and fp16/bf16 values are widened to float32 first (widening is exact and monotone).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define UE_HD __host__ __device__ __forceinline__
#else
#define UE_HD inline
#endif

namespace unlearn_ext {

// |x| bits >= this are Inf or NaN: selection refuses them.
constexpr uint32_t kNonFiniteKey = 0x7f800000u;
constexpr uint32_t kKeyMask = 0x7fffffffu;

// Three radix passes over the 31-bit key, most significant digit first: 11 + 10 + 10 bits.
constexpr int kRadixPasses = 3;
constexpr int kMaxRadixBins = 2048;

UE_HD int radix_shift(int pass) { return pass == 0 ? 20 : (pass == 1 ? 10 : 0); }
UE_HD int radix_bins(int pass) { return pass == 0 ? 2048 : 1024; }
// Bits of the key already fixed before `pass` (the prefix the pass filters on).
UE_HD uint32_t radix_prefix_mask(int pass) {
  return pass == 0 ? 0u : (pass == 1 ? 0x7ff00000u : 0x7ffffc00u);
}
UE_HD int radix_digit(uint32_t key, int pass) {
  return static_cast<int>((key >> radix_shift(pass)) & static_cast<uint32_t>(radix_bins(pass) - 1));
}

UE_HD uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__float_as_uint(v));
#else
  uint32_t b;
  __builtin_memcpy(&b, &v, sizeof(b));
  return b;
#endif
}

// Key of |v|: the float32 bit pattern with the sign cleared. Non-finite when >= kNonFiniteKey.
UE_HD uint32_t abs_key(float v) { return float_bits(v) & kKeyMask; }

// Key in "preference order": a larger rank key is selected first, for both directions.
UE_HD uint32_t rank_key(uint32_t abs_k, bool largest) { return largest ? abs_k : (kKeyMask - abs_k); }

// k for a layer of n elements. r*n is computed in double; a product within a relative 1e-9 above an
// integer counts as that integer, so e.g. r = 0.1, n = 30 keeps 3 (not 4 from 3.0000000000000004).
UE_HD int64_t keep_count(int64_t n, double ratio) {
  if (n <= 0) return 0;
  const double t = ratio * static_cast<double>(n);
  const double fl = floor(t);
  int64_t k = static_cast<int64_t>((t - fl <= 1e-9 * t) ? fl : fl + 1.0);
  if (k < 1) k = 1;
  if (k > n) k = n;
  return k;
}

// One radix step: `hist` counts the candidates (keys matching the prefix so far) by digit; `need` is how
// many of the candidates must still be kept. Scans digits from the most preferred down and returns the
// digit that holds the threshold; `need` becomes how many to keep inside that digit, and `above` receives
// how many candidates sit in strictly more preferred digits (all of them are kept).
template <typename Count>
UE_HD int radix_find_digit(const Count* hist, int bins, int64_t& need, int64_t& above) {
  int64_t cum = 0;
  for (int d = bins - 1; d >= 0; --d) {
    const int64_t c = static_cast<int64_t>(hist[d]);
    if (cum + c >= need) {
      above = cum;
      need -= cum;
      return d;
    }
    cum += c;
  }
  above = cum;  // unreachable when need <= number of candidates
  need = 0;
  return 0;
}

// The outcome of the radix passes for one layer: keep every entry whose rank key is > threshold, and the
// first `take_equal` entries (in flat index order) whose rank key == threshold.
struct LayerThreshold {
  uint32_t threshold;
  int64_t take_equal;
};

// A layer kept whole (k == n): every rank key is >= 0 and all n equal ones may be taken.
UE_HD LayerThreshold select_all(int64_t n) { return LayerThreshold{0u, n}; }

// Whether `rk` is a candidate of radix pass `pass`, given the digits `prefix` fixed by earlier passes.
UE_HD bool radix_is_candidate(uint32_t rk, int pass, uint32_t prefix) {
  return (rk & radix_prefix_mask(pass)) == prefix;
}

// A chunk of a layer (flat index order) holding `eq_in_chunk` threshold-equal keys, with `eq_before` of
// them in earlier chunks, takes this many of them: the lower-index-first tie rule across chunks.
UE_HD int64_t chunk_take_equal(int64_t take_equal, int64_t eq_before, int64_t eq_in_chunk) {
  const int64_t left = take_equal - eq_before;
  return left <= 0 ? 0 : (left < eq_in_chunk ? left : eq_in_chunk);
}

// Selection test for entries visited in flat index order within a chunk; `take_left` starts at the
// chunk's chunk_take_equal and is consumed by threshold-equal entries.
// Branch-free: at ratios like 10% a branch on the comparison mispredicts often.
UE_HD bool take_selected(uint32_t rk, uint32_t threshold, int64_t& take_left) {
  const bool tie = (rk == threshold) & (take_left > 0);
  take_left -= tie;
  return (rk > threshold) | tie;
}

}  // namespace unlearn_ext
