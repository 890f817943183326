// K-quant weights (GGUF Q4_K, Q5_K, Q6_K) for the quantized CPU ops: the block layouts, the
// activation quantization they pair with, and the interface every ISA path implements.
//
// A super-block holds 256 weights of one row along K:
//   Q4_K, 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales sc and mins mn (one per 32
//         weights), 128 bytes of 4-bit q (bytes 32c..32c+31: sub-block 2c in the low nibbles,
//         2c + 1 in the high ones)                                 w = d * sc_j * q - dmin * mn_j
//   Q5_K, 176 bytes: as Q4_K, plus 32 bytes qh before the nibbles: bit j of qh[i] is the fifth bit
//         of element i of sub-block j
//   Q6_K, 210 bytes: 128 bytes low nibbles, 64 bytes high bit pairs, sixteen int8 scales (one per
//         16 weights), fp16 d                                       w = d * sc_j * (q - 32)
// Activations are quantized per 256 along K (d = max|x| / 127, q = round-half-even(x / d), as for
// the 32-blocks of Q8_0 / Q4_0) and each super-block also carries the sums of q over its sixteen
// groups of 16 (exact int16). Those sums are why the activation block is 256 with per-16 sums: a
// sub-block's offset term (Q4_K / Q5_K: dmin * mn_j * sum(x_j); Q6_K: the -32 of every q times
// sc_j) needs sum(x) over that sub-block, so with the sums at hand the weights enter the integer
// dot products unsigned, as stored, and the offset is one multiply per sub-block.
//
// Per super-block and (weight row, activation row) every path computes the same exact integers
//   Q4_K / Q5_K: S1 = sum_j sc_j * dot(q_j, x_j), S2 = sum_j mn_j * sum(x_j)
//                acc = fma(dx, fma(d, S1, -(dmin * S2)), acc)
//   Q6_K:        S = sum_j sc_j * (dot(q_j, x_j) - 32 * sum(x_j))
//                acc = fma(dx * d, S, acc)
// (|S1| < 2^25, |S| < 2^29: int32 is exact), with the fp32 steps written as explicit fused
// operations, so every path gives the same bits, independent of R, M, tile position and thread.
//   kquant_portable.h: plain C++        kquant_avx2.h: _mm256_maddubs_epi16 + _mm256_madd_epi16
// Interface (namespace per path):
//   quantize_act_row_k<T>(x, K, q, d, s)   x[K] -> q[K], d[K / 256], s[K / 16] (int16 sums)
//   ktile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, xs, lds, nsb, res)
//       res[r * M + m] = row r of R weight rows (w_ld bytes apart) . activation row m of M (xq rows
//       ldq bytes apart, xd rows ldd floats apart, xs rows lds int16 apart) over nsb super-blocks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include <c10/util/Half.h>

namespace lfmk {
namespace quant {

enum class KFormat : int { Q4_K = 0, Q5_K = 1, Q6_K = 2 };

constexpr int kSuper = 256;
constexpr int kSub16 = kSuper / 16;

template <KFormat F>
struct KTraits;
template <>
struct KTraits<KFormat::Q4_K> {
  static constexpr int kBytes = 144;
};
template <>
struct KTraits<KFormat::Q5_K> {
  static constexpr int kBytes = 176;
};
template <>
struct KTraits<KFormat::Q6_K> {
  static constexpr int kBytes = 210;
};

// "q4_k" / "q5_k" / "q6_k" -> *f; false for any other name.
inline bool parse_kformat(const std::string& s, KFormat* f) {
  if (s == "q4_k") *f = KFormat::Q4_K;
  else if (s == "q5_k") *f = KFormat::Q5_K;
  else if (s == "q6_k") *f = KFormat::Q6_K;
  else return false;
  return true;
}

constexpr int64_t kblock_bytes(KFormat f) {
  return f == KFormat::Q4_K ? 144 : f == KFormat::Q5_K ? 176 : 210;
}

static inline float kq_half(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// Q4_K / Q5_K's twelve scale bytes -> eight 6-bit scales and eight 6-bit mins.
static inline void kq_scale_min(const uint8_t* s, int32_t* sc, int32_t* mn) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 63;
    mn[j] = s[j + 4] & 63;
  }
  for (int j = 4; j < 8; ++j) {
    sc[j] = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
    mn[j] = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Per-16 sums of one quantized activation row (exact: |sum| <= 16 * 127).
static inline void kq_act_sums(const int8_t* q, int64_t K, int16_t* s) {
  for (int64_t g = 0; g < K / 16; ++g) {
    int32_t t = 0;
    for (int i = 0; i < 16; ++i) t += q[g * 16 + i];
    s[g] = static_cast<int16_t>(t);
  }
}

// Sums of one quantized activation row per 32 (Q4_K / Q5_K's sub-blocks), from its per-16 sums.
static inline void kq_sub32_sums(const int16_t* s16, int64_t K, int16_t* s32) {
  for (int64_t j = 0; j < K / 32; ++j) s32[j] = static_cast<int16_t>(s16[2 * j] + s16[2 * j + 1]);
}

// S2 of Q4_K / Q5_K: sum_j mn_j * (sum of x over sub-block j of 32).
static inline int32_t kq_min_term(const int32_t* mn, const int16_t* xs) {
  int32_t s = 0;
  for (int j = 0; j < 8; ++j) s += mn[j] * (xs[2 * j] + xs[2 * j + 1]);
  return s;
}

}  // namespace quant
}  // namespace lfmk
