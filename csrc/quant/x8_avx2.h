// AVX2 tile on x8-layout weights (see quant/x8.h for the layout and the contract). Include only
// between LFMK_AVX2_BEGIN and LFMK_AVX2_END, after simd_avx2.h and quant/avx2.h.
//
// Per (group, block): the 8 fp16 scales in one 128-bit load + vcvtph2ps, times the activation
// block's scale. Q4_0: the unsigned nibbles go straight into vpmaddubsw against a broadcast of 4
// activation bytes (one AND for the low nibbles, one shift + AND for the high ones of a vector); the
// 8 int16 pair sums of a block add up in int16 (|sum| <= 8 * 2 * 15 * 127 = 30480), one vpmaddwd
// widens them, and 8 * sum(x_q) comes off. Q8_0: |w| x sign-adjusted x, as the GGUF-layout tile.
// Lane r is row r throughout: no horizontal sums.
#pragma once

#include "quant/x8.h"

namespace lfmk {
namespace quant {
namespace avx2 {

template <Format F, int G, int M>
static inline void x8_tile(const uint8_t* w, int64_t gstride, int64_t nb, const int8_t* xq, int64_t ldq,
                           const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr,
                           int64_t pf) {
  constexpr int64_t kGB = X8<F>::kGroupBlockBytes;
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc[G][M];
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int g = 0; g < G; ++g) {
      const uint8_t* blk = w + g * gstride + b * kGB;
      prefetch_ahead(blk, pf, static_cast<int>(kGB));  // pf: the caller's (common.h)
      __m256i s[M];
      for (int m = 0; m < M; ++m) s[m] = _mm256_setzero_si256();
      if (F == Format::Q4_0) {
        for (int j = 0; j < 4; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * j));
          const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
          for (int m = 0; m < M; ++m) {
            const int8_t* x = xq + m * ldq + b * kBlock;
            const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, bcast4(x + 4 * j)),
                                               _mm256_maddubs_epi16(hi, bcast4(x + 16 + 4 * j)));
            s[m] = _mm256_add_epi16(s[m], p);
            lfmk::avx2::in_register(s[m]);  // simd_avx2.h: keeps the sum's order, and its registers
          }
        }
      } else {
        for (int j = 0; j < 8; ++j) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * j));
          const __m256i aw = _mm256_abs_epi8(v);
          for (int m = 0; m < M; ++m) {
            const __m256i sx = _mm256_sign_epi8(bcast4(xq + m * ldq + b * kBlock + 4 * j), v);
            s[m] = _mm256_add_epi32(s[m], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
            lfmk::avx2::in_register(s[m]);
          }
        }
      }
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
      for (int m = 0; m < M; ++m) {
        __m256i isum = s[m];
        if (F == Format::Q4_0)
          isum = _mm256_sub_epi32(_mm256_madd_epi16(isum, ones), _mm256_set1_epi32(xs8[m * lds + b]));
        const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(xd[m * ldd + b]));
        acc[g][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, acc[g][m]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
}

}  // namespace avx2
}  // namespace quant
}  // namespace lfmk
