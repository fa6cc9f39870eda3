// The selection's full passes on the CPU: the rank keys of a tile of entries are computed into a buffer
// in one loop without data-dependent control (it vectorises), comparisons on them become a 64-bit mask
// per block of 64 keys, and the few entries a pass must collect are visited by walking the masks' set
// bits. A per-element loop that compacts as it goes (`out[c] = x; c += cond`) carries a dependence
// through c and runs at scalar speed.
#pragma once

#include <cstdint>
#include <cstring>

#include "select.h"

// The functions that run these passes are built for AVX-512 and AVX2 beside the baseline x86-64 and the
// CPU picks one when the library loads (function multi-versioning); `flatten` inlines the per-element
// code into each version, so the whole loop gets that instruction set. The result is the same in every
// version: integer keys and comparisons, and a subtraction rounded to the value dtype either way.
// UNLEARN_EXT_NO_CPU_CLONES builds the baseline only (the C++ tests do, to check that version).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(UNLEARN_EXT_NO_CPU_CLONES)
#define UE_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define UE_CPU_CLONES
#endif

namespace unlearn_ext {
namespace cpu {

constexpr int kBlock = 64;

// The rank keys of entries [b, b + n) into rk[0, n); returns the largest |.| key seen (>= kNonFiniteKey
// when they hold NaN/Inf). One loop over the range: it vectorises, and the reduction stays in registers.
template <class Value>
inline uint32_t rank_keys(const Value& val, int64_t b, int64_t n, bool largest, uint32_t* rk) {
  uint32_t worst = 0;
  for (int64_t q = 0; q < n; ++q) {
    const uint32_t a = abs_key(val(b + q));
    worst = worst > a ? worst : a;
    rk[q] = rank_key(a, largest);
  }
  return worst;
}

// Keys per tile: 8 KB, still in L1 when the comparisons read them back.
constexpr int64_t kTile = 2048;

// g(rk, t, m) for the tiles of entries [b, b + n): rk[0, m) holds the rank keys of entries
// [b + t, b + t + m). Returns the largest |.| key seen.
template <class Value, class G>
inline uint32_t for_each_tile(const Value& val, int64_t b, int64_t n, bool largest, const G& g) {
  alignas(64) uint32_t rk[kTile];
  uint32_t worst = 0;
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = n - t < kTile ? n - t : kTile;
    const uint32_t w = rank_keys(val, b + t, m, largest, rk);
    worst = worst > w ? worst : w;
    g(static_cast<const uint32_t*>(rk), t, m);
  }
  return worst;
}

// Bit q of the result is flags[q], for kBlock bytes each 0 or 1: eight bytes at a time, the multiply
// gathers byte g's low bit into bit 56 + g (the partial products never overlap, so nothing carries).
inline uint64_t pack_flags(const uint8_t* flags) {
  uint64_t bits = 0;
  for (int g = 0; g < kBlock / 8; ++g) {
    uint64_t w;
    std::memcpy(&w, flags + 8 * g, sizeof(w));
    bits |= ((w * 0x0102040810204080ull) >> 56) << (8 * g);
  }
  return bits;
}

// The mask of pred(rk[q]) over a block of n <= kBlock keys (bits n.. clear).
template <class Pred>
inline uint64_t block_mask(const uint32_t* rk, int n, const Pred& pred) {
  alignas(64) uint8_t flags[kBlock];
  for (int q = 0; q < n; ++q) flags[q] = static_cast<uint8_t>(pred(rk[q]));
  for (int q = n; q < kBlock; ++q) flags[q] = 0;
  return pack_flags(flags);
}

// f(q) for every set bit q of `bits`, lowest first.
template <class F>
inline void for_each_bit(uint64_t bits, const F& f) {
  while (bits) {
    f(__builtin_ctzll(bits));
    bits &= bits - 1;
  }
}

// f(q) for every q < n with pred(rk[q]), in order: a mask per block of kBlock keys, then its set bits.
template <class Pred, class F>
inline void for_each_match(const uint32_t* rk, int64_t n, const Pred& pred, const F& f) {
  for (int64_t b = 0; b < n; b += kBlock) {
    const int m = static_cast<int>(n - b < kBlock ? n - b : kBlock);
    for_each_bit(block_mask(rk + b, m, pred), [&](int q) { f(b + q); });
  }
}

}  // namespace cpu
}  // namespace unlearn_ext
