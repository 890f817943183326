// The x8-layout Q8_0 / Q4_0 tile (layout and contract: quant/x8.h) on 512-bit vectors, for the
// AVX512-VNNI path. Included once, by quant/vnni_paths.h, inside the target region that enables
// AVX-512 F/BW/VL/VNNI; quant/vnni.h's x8_tile calls it there.
//
// Measured on 2 Zen 5 cores (full-width AVX-512), 6144 x 2048 weights in L3, 2 threads, GB/s of
// weight read, 256-bit VNNI tile -> this one: Q4_0 95 -> 111 at one row of x, 38 -> 48 at four;
// Q8_0 122 -> 132 and 71 -> 96. A one-row decode from DRAM is bound by memory there (unchanged, within
// noise); the gain is where the tile binds: several rows of x (batched decode, experts with a few
// tokens), weights in cache, slower cores.
// Q8_0 has no 512-bit vpsignb: x goes in as the unsigned x + 128 and the excess, 128 * sum(w), comes
// off once per block (sum(w) by one more vpdpbusd of ones against w, shared by the M rows of x):
// two vpdpbusd per weight vector at M = 1 instead of abs + sign + vpdpbusd.

#include "quant/zmm_common.h"

namespace lfmk {
namespace quant {
namespace avx512vnni {

template <Format F, int G, int M>
static inline void x8_tile_zmm(const uint8_t* w, int64_t gstride, int64_t nb, const int8_t* xq, int64_t ldq,
                               const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res,
                               int64_t ldr, int64_t pf) {
  constexpr int64_t kGB = X8<F>::kGroupBlockBytes;
  constexpr int kPairs = X8<F>::kVectors / 2;  // Q4_0: 2, Q8_0: 4
  // pick[p]: lanes 0-7 dword 2p of the block's x, lanes 8-15 dword 2p + 1
  __m512i pick[4];
  for (int p = 0; p < 4; ++p)
    pick[p] = zmm_pair_pick(p);
  const __m512i m4 = _mm512_set1_epi8(0x0F), m4hi = _mm512_set1_epi8(static_cast<char>(0xF0));
  const __m512i ones = _mm512_set1_epi8(1);
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[G][M];
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i xb[M];  // the block's 32 bytes of x (Q8_0: as x + 128) in the low half
    for (int m = 0; m < M; ++m) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * ldq + b * kBlock));
      xb[m] = _mm512_zextsi256_si512(F == Format::Q8_0 ? _mm256_xor_si256(v, bias) : v);
    }
    const uint8_t* blk[G];
    __m512i s[G][M];
    for (int g = 0; g < G; ++g) {
      blk[g] = w + g * gstride + b * kGB;
      prefetch_ahead(blk[g], pf, static_cast<int>(kGB));  // pf: the caller's (common.h)
      for (int m = 0; m < M; ++m) s[g][m] = _mm512_setzero_si512();
    }
    if (F == Format::Q4_0) {
      __m512i s16[G][M];
      for (int g = 0; g < G; ++g)
        for (int m = 0; m < M; ++m) s16[g][m] = _mm512_setzero_si512();
      for (int p = 0; p < kPairs; ++p) {
        __m512i xa[M], xh[M];  // elements 8p..8p+7 (low nibbles) and 16 + 8p.. (high nibbles)
        for (int m = 0; m < M; ++m) {
          xa[m] = _mm512_permutexvar_epi32(pick[p], xb[m]);
          xh[m] = _mm512_permutexvar_epi32(pick[p + 2], xb[m]);
        }
        for (int g = 0; g < G; ++g) {
          const __m512i v = _mm512_loadu_si512(blk[g] + 16 + 64 * p);
          const __m512i lo = _mm512_and_si512(v, m4), hi16 = _mm512_and_si512(v, m4hi);
          for (int m = 0; m < M; ++m) {
            s[g][m] = _mm512_dpbusd_epi32(s[g][m], lo, xa[m]);
            s16[g][m] = _mm512_dpbusd_epi32(s16[g][m], hi16, xh[m]);
          }
        }
      }
      for (int g = 0; g < G; ++g)
        for (int m = 0; m < M; ++m) s[g][m] = _mm512_add_epi32(s[g][m], _mm512_srai_epi32(s16[g][m], 4));
    } else {
      __m512i sw[G];  // sum of w per lane: the x + 128 excess is 128 times it
      for (int g = 0; g < G; ++g) sw[g] = _mm512_setzero_si512();
      for (int p = 0; p < kPairs; ++p) {
        __m512i xa[M];
        for (int m = 0; m < M; ++m) xa[m] = _mm512_permutexvar_epi32(pick[p], xb[m]);
        for (int g = 0; g < G; ++g) {
          const __m512i v = _mm512_loadu_si512(blk[g] + 16 + 64 * p);
          sw[g] = _mm512_dpbusd_epi32(sw[g], ones, v);
          for (int m = 0; m < M; ++m) s[g][m] = _mm512_dpbusd_epi32(s[g][m], xa[m], v);
        }
      }
      for (int g = 0; g < G; ++g) {
        const __m512i excess = _mm512_slli_epi32(sw[g], 7);
        for (int m = 0; m < M; ++m) s[g][m] = _mm512_sub_epi32(s[g][m], excess);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[g])));
      for (int m = 0; m < M; ++m) {
        __m256i isum = zmm_fold_halves(s[g][m]);
        if (F == Format::Q4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(xs8[m * lds + b]));
        const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(xd[m * ldd + b]));
        acc[g][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, acc[g][m]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
}

}  // namespace avx512vnni
}  // namespace quant
}  // namespace lfmk
