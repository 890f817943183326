// The K-quant x8 decode tile (layout and contract: quant/kquant_x8.h) on 512-bit vectors, for the
// AVX512-VNNI path. Included once, by quant/kquant_kernels.h, inside the target region that enables
// AVX-512 F/BW/VL/VNNI; quant/kquant_x8_vnni.h's kx8_tile calls it there.
//
// As the 256-bit VNNI tile (quant/kquant_x8_vnni.h), with one zmm holding two consecutive qs (and
// qh) vectors of a group-block: the same 8 rows at 4 more k. Both halves of a vector then belong to
// the same sub-block, so the sub-block's scale (its byte picked into both halves) multiplies the
// 512-bit int32 dot, and the super-block's S folds its two halves once, exactly, before the 256-bit
// finish (the same integers: the same bits as every other path). The x bytes of a vector pair are one
// vpermd of the 64 activation bytes in reach (lanes 0-7 dword t, lanes 8-15 dword t + 1).
// Measured on 2 Zen 5 cores (full-width AVX-512), 6144 x 2048 weights in L3, 2 threads, GB/s of
// weight read, 256-bit VNNI tile -> this one: Q4_K 94 -> 119 at one row of x, 42 -> 56 at four;
// Q6_K 88 -> 100 and 24 -> 46. A one-row decode from DRAM is bound by memory there (unchanged).

// GCC 12's AVX-512 intrinsic headers pass an undefined vector as the unused merge source of the
// unmasked forms (GCC bug 105593): its -Wmaybe-uninitialized warnings there are false.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "quant/zmm_common.h"

namespace lfmk {
namespace quant {
namespace avx512vnni {

static inline __m512i kz_dup(__m256i v) { return _mm512_broadcast_i64x4(v); }
static inline __m512i kz_ld(const void* p) { return _mm512_loadu_si512(p); }
static inline __m512i kz_shift16(__m512i v, int n) {
  return n >= 0 ? _mm512_sll_epi16(v, _mm_cvtsi32_si128(n)) : _mm512_srl_epi16(v, _mm_cvtsi32_si128(-n));
}

template <KFormat F, int G, int M>
static inline void kx8_tile_zmm(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq,
                                const float* xd, int64_t ldd, const int16_t* xs, int64_t lds, float* res,
                                int64_t ldr, int64_t next) {
  constexpr int64_t kGB = kKX8Rows * KTraits<F>::kBytes;
  const KX8Ahead ahead(w, gstride, nsb, next, kGB, G);
  constexpr int kQs = F == KFormat::Q4_K ? 128 : 384;  // Q5_K: 8 qh vectors before the qs
  const __m512i m4 = _mm512_set1_epi8(0x0F), m4hi = _mm512_set1_epi8(static_cast<char>(0xF0)),
                bit4 = _mm512_set1_epi8(0x10), m30 = _mm512_set1_epi8(0x30);
  // the scale byte picks of the 256-bit tile, in both halves
  __m512i pick[4];
  #pragma GCC unroll 16
  for (int j = 0; j < 4; ++j)
    pick[j] = kz_dup(F == KFormat::Q6_K ? kavx2::lane_bytes(-1, -1, -1, j) : kavx2::lane_bytes(j, -1, -1, -1));
  // xpick[p]: lanes 0-7 dword 2p, lanes 8-15 dword 2p + 1 of 64 activation bytes
  __m512i xpick[8];
  #pragma GCC unroll 16
  for (int p = 0; p < 8; ++p)
    xpick[p] = zmm_pair_pick(p);
  __m256i pair[2];
  if constexpr (F == KFormat::Q6_K)
    kavx2::kx8_pair6(pair);
  else
    kavx2::kx8_pair45(pair);
  __m256 acc[G][M];
  for (int g = 0; g < G; ++g)
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const int8_t* x[M];
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) x[m] = xq + m * ldq + b * kSuper;
    if constexpr (F == KFormat::Q6_K) {
      for (int g = 0; g < G; ++g) {
        const uint8_t* blk = w + g * gstride + b * kGB;
        const uintptr_t pa = ahead.at(b, g);
        __m512i S[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) S[m] = _mm512_setzero_si512();
        __m256i scv[4];
        __m512i scz[4];
        #pragma GCC unroll 16
        for (int i = 0; i < 4; ++i) {
          scv[i] = kavx2::ld(blk + 1536 + 32 * i);
          scz[i] = kz_dup(scv[i]);
        }
        #pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          __m512i xz[M][2];  // elements 128h .. 128h + 127
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            xz[m][0] = kz_ld(x[m] + 128 * h);
            xz[m][1] = kz_ld(x[m] + 128 * h + 64);
          }
          #pragma GCC unroll 2
          for (int half = 0; half < 2; ++half) {
            // elements 128h + 32k + 4t .. + 3 for k < 4, t in [4 half, 4 half + 4): sub-block 8h + 2k + half
            kx8_prefetch_piece<kGB, 4>(pa, 2 * h + half);
            __m512i p[4][M];
            #pragma GCC unroll 16
            for (int k = 0; k < 4; ++k)
              #pragma GCC unroll 16
              for (int m = 0; m < M; ++m) p[k][m] = _mm512_setzero_si512();
            #pragma GCC unroll 2
            for (int t = 4 * half; t < 4 * half + 4; t += 2) {
              // kavx2::kx8_q6 on vectors t and t + 1
              const __m512i la = kz_ld(blk + 32 * (16 * h + t)), lb = kz_ld(blk + 32 * (16 * h + 8 + t));
              const __m512i qh = kz_ld(blk + 1024 + 32 * (8 * h + t));
              __m512i q[4];
              q[0] = _mm512_or_si512(_mm512_and_si512(la, m4), _mm512_and_si512(_mm512_slli_epi16(qh, 4), m30));
              q[1] = _mm512_or_si512(_mm512_and_si512(lb, m4), _mm512_and_si512(_mm512_slli_epi16(qh, 2), m30));
              q[2] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(la, 4), m4), _mm512_and_si512(qh, m30));
              q[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lb, 4), m4),
                                     _mm512_and_si512(_mm512_srli_epi16(qh, 2), m30));
              #pragma GCC unroll 16
              for (int k = 0; k < 4; ++k)
                #pragma GCC unroll 16
                for (int m = 0; m < M; ++m)
                  p[k][m] = _mm512_dpbusd_epi32(p[k][m], q[k],
                                                _mm512_permutexvar_epi32(xpick[4 * (k & 1) + t / 2], xz[m][k >> 1]));
            }
            #pragma GCC unroll 16
            for (int k = 0; k < 4; ++k) {
              const int j = 8 * h + 2 * k + half;
              const __m512i sc = _mm512_srai_epi32(_mm512_shuffle_epi8(scz[j / 4], pick[j % 4]), 24);
              #pragma GCC unroll 16
              for (int m = 0; m < M; ++m) S[m] = _mm512_add_epi32(S[m], _mm512_mullo_epi32(p[k][m], sc));
            }
          }
        }
        __m256i Sy[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) Sy[m] = zmm_fold_halves(S[m]);
        kavx2::kx8_finish6<M>(blk, scv, pair, xs, lds, xd, ldd, b, Sy, acc[g]);
      }
    } else {
      // The G groups go through each sub-block together, so that every vpermd of x serves all of them.
      const uint8_t* blk[G];
      kavx2::KX8Scales45 sv[G];
      __m512i sc_lo[G], sc_hi[G];
      uintptr_t pa[G];
      __m512i S[G][M];
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        blk[g] = w + g * gstride + b * kGB;
        pa[g] = ahead.at(b, g);
        sv[g] = kavx2::kx8_scales45(blk[g]);
        sc_lo[g] = kz_dup(sv[g].sc_lo);
        sc_hi[g] = kz_dup(sv[g].sc_hi);
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) S[g][m] = _mm512_setzero_si512();
      }
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g) kx8_prefetch_piece<kGB, 4>(pa[g], c);
        // qs vectors 8c..8c+7: sub-block 2c in the low nibbles (x dwords 0..7 of the 64 bytes at
        // 64c), 2c + 1 in the high ones (dwords 8..15)
        __m512i xz[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) xz[m] = kz_ld(x[m] + 64 * c);
        __m512i sa[G][M], sb[G][M];
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g)
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) sa[g][m] = sb[g][m] = _mm512_setzero_si512();
        #pragma GCC unroll 16
        for (int t = 0; t < 8; t += 2) {
          __m512i xa[M], xb[M];
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            xa[m] = _mm512_permutexvar_epi32(xpick[t / 2], xz[m]);
            xb[m] = _mm512_permutexvar_epi32(xpick[4 + t / 2], xz[m]);
          }
          #pragma GCC unroll 16
          for (int g = 0; g < G; ++g) {
            const __m512i v = kz_ld(blk[g] + kQs + 32 * (8 * c + t));
            __m512i lo = _mm512_and_si512(v, m4), hi;
            if constexpr (F == KFormat::Q5_K) {
              // the fifth bit of sub-blocks 2c and 2c + 1 (bits 2c, 2c + 1 of each qh byte) to bit 4
              const __m512i qh = kz_ld(blk[g] + 128 + 32 * t);
              lo = _mm512_or_si512(lo, _mm512_and_si512(kz_shift16(qh, 4 - 2 * c), bit4));
              hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), m4),
                                   _mm512_and_si512(kz_shift16(qh, 3 - 2 * c), bit4));
            } else {
              hi = _mm512_and_si512(v, m4hi);  // 16 * q: shifted back once per sub-block below
            }
            #pragma GCC unroll 16
            for (int m = 0; m < M; ++m) {
              sa[g][m] = _mm512_dpbusd_epi32(sa[g][m], lo, xa[m]);
              sb[g][m] = _mm512_dpbusd_epi32(sb[g][m], hi, xb[m]);
            }
          }
        }
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g) {
          const __m512i scv = c < 2 ? sc_lo[g] : sc_hi[g];
          const __m512i sc_a = _mm512_shuffle_epi8(scv, pick[(2 * c) % 4]);
          const __m512i sc_b = _mm512_shuffle_epi8(scv, pick[(2 * c + 1) % 4]);
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            const __m512i b16 = F == KFormat::Q5_K ? sb[g][m] : _mm512_srai_epi32(sb[g][m], 4);
            S[g][m] = _mm512_add_epi32(S[g][m],
                                       _mm512_add_epi32(_mm512_mullo_epi32(sa[g][m], sc_a), _mm512_mullo_epi32(b16, sc_b)));
          }
        }
      }
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        __m256i Sy[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) Sy[m] = zmm_fold_halves(S[g][m]);
        kavx2::kx8_finish45<M>(blk[g], sv[g], pair, xs, lds, xd, ldd, b, Sy, acc[g]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
}

}  // namespace avx512vnni
}  // namespace quant
}  // namespace lfmk

#pragma GCC diagnostic pop
