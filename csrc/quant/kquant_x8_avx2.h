// AVX2 tile on x8-layout K-quant weights (layout and contract in quant/kquant_x8.h). Include only
// between LFMK_AVX2_BEGIN and LFMK_AVX2_END, after quant/kquant_avx2.h.
//
// Lane r is row r throughout. Per (group, super-block):
//  * Q4_K / Q5_K: the three scale vectors hold bytes 0..3, 4..7, 8..11 of each row's twelve scale
//    bytes, so kquant.h's 32-bit mask-and-shift decode runs on 8 rows at once, leaving the scales
//    in two vectors (sc0..3, sc4..7 as bytes of lane r) and the mins in two more. A vpshufb puts
//    sub-block j's scale into both int16 halves of each lane for the vpmaddwd that weights its
//    int16 sums; the mins, paired as int16 (mn_2i, mn_2i+1), meet a broadcast of the activation's
//    per-32 sum pair in one vpmaddwd each. A qs vector (4 bytes of 8 rows) gives sub-block 2c in
//    its low nibbles and 2c + 1 in its high ones against two broadcasts of 4 activation bytes;
//    Q5_K ors in the fifth bit from its qh vector (the same element positions).
//  * Q6_K: the 6-bit q of 4 elements per lane from one ql and one qh vector (as in load_q6); the
//    int8 scales of lane r sit in four vectors (scales 4i..4i+3) and are sign-extended into int16
//    halves by a vpshufb to the high byte and an arithmetic shift.
// int16 sums are widened before they can overflow: a vpmaddubsw pair is at most 2 * 15 * 127
// (Q4_K: 8 vectors summed), 2 * 31 * 127 (Q5_K: 4), 2 * 63 * 127 (Q6_K: 2). The fp32 steps are
// kquant.h's, lane by lane.
#pragma once

#include "quant/kquant_x8.h"

namespace lfmk {
namespace quant {
namespace kavx2 {

// vpshufb control: in every 32-bit lane, byte k = that lane's byte b[k] (b[k] < 0: zero). Every
// call site passes constants (literals, or the index of a loop the compiler unrolls), so this is
// written as one set intrinsic of computed bytes, which the compiler folds into a single constant
// load; built in a byte loop through memory, as it once was, it ran on every tile call and was
// about a third of the instructions of a Q4_K tile at K = 2048.
static inline __m256i lane_bytes(int b0, int b1, int b2, int b3) {
  const auto c = [=](int lane, int k) -> char {
    const int b = k == 0 ? b0 : k == 1 ? b1 : k == 2 ? b2 : b3;
    return static_cast<char>(b < 0 ? -128 : 4 * lane + b);
  };
  return _mm256_setr_epi8(c(0, 0), c(0, 1), c(0, 2), c(0, 3), c(1, 0), c(1, 1), c(1, 2), c(1, 3),
                          c(2, 0), c(2, 1), c(2, 2), c(2, 3), c(3, 0), c(3, 1), c(3, 2), c(3, 3),
                          c(0, 0), c(0, 1), c(0, 2), c(0, 3), c(1, 0), c(1, 1), c(1, 2), c(1, 3),
                          c(2, 0), c(2, 1), c(2, 2), c(2, 3), c(3, 0), c(3, 1), c(3, 2), c(3, 3));
}

static inline __m256 half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// v shifted left by n bits (right by -n) in 16-bit lanes; n is a constant where the caller's loop unrolls.
static inline __m256i shift16(__m256i v, int n) {
  return n >= 0 ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(n)) : _mm256_srl_epi16(v, _mm_cvtsi32_si128(-n));
}

// Pieces of one (group, super-block) step shared with the VNNI tile (quant/kquant_x8_vnni.h), which
// differs only in how it sums the products: the same exact integers, so the same bits.

// Q4_K / Q5_K: the 8 rows' six-bit sub-block scales (sc_lo: sub-blocks 0..3 as bytes 0..3 of lane r,
// sc_hi: 4..7) and mins (mn_lo, mn_hi), decoded from the three scale vectors as kquant.h does.
struct KX8Scales45 {
  __m256i sc_lo, sc_hi, mn_lo, mn_hi;
};
static inline KX8Scales45 kx8_scales45(const uint8_t* blk) {
  const __m256i m6 = _mm256_set1_epi32(0x3f3f3f3f), m4 = _mm256_set1_epi32(0x0f0f0f0f),
                m2 = _mm256_set1_epi32(0x03030303);
  const __m256i u0 = ld(blk + 32), u1 = ld(blk + 64), u2 = ld(blk + 96);
  return {_mm256_and_si256(u0, m6),
          _mm256_or_si256(_mm256_and_si256(u2, m4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), m2), 4)),
          _mm256_and_si256(u1, m6),
          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), m4),
                          _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), m2), 4))};
}

// Q4_K / Q5_K, the rest of a step once S1 is summed: S2 = sum_j mn_j * sum(x_j) (mins paired as int16
// against the activation's per-32 sum pairs; pair = kx8_pair45()), then
// acc += dx * (d * S1 - dmin * S2).
static inline void kx8_pair45(__m256i pair[2]) {
  pair[0] = lane_bytes(0, -1, 1, -1);
  pair[1] = lane_bytes(2, -1, 3, -1);
}
template <int M>
static inline void kx8_finish45(const uint8_t* blk, const KX8Scales45& s, const __m256i pair[2], const int16_t* xs,
                                int64_t lds, const float* xd, int64_t ldd, int64_t b, const __m256i* S1, __m256* acc) {
  const __m256i mp[4] = {_mm256_shuffle_epi8(s.mn_lo, pair[0]), _mm256_shuffle_epi8(s.mn_lo, pair[1]),
                         _mm256_shuffle_epi8(s.mn_hi, pair[0]), _mm256_shuffle_epi8(s.mn_hi, pair[1])};
  const __m256 d = half8(blk), dmin = half8(blk + 16);
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    const int16_t* x = xs + m * lds + b * (kSub16 / 2);
    __m256i S2 = _mm256_setzero_si256();
    #pragma GCC unroll 16
    for (int i = 0; i < 4; ++i) S2 = _mm256_add_epi32(S2, _mm256_madd_epi16(mp[i], bcast4(x + 2 * i)));
    const __m256 t = _mm256_fmsub_ps(d, _mm256_cvtepi32_ps(S1[m]), _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(S2)));
    acc[m] = _mm256_fmadd_ps(_mm256_set1_ps(xd[m * ldd + b]), t, acc[m]);
  }
}

// Q6_K: the 6-bit q of elements 128h + 32k + 4t .. + 3 (k = 0..3) of the 8 rows, from one ql pair
// and one qh vector (as in load_q6).
static inline void kx8_q6(const uint8_t* blk, int h, int t, __m256i q[4]) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  const __m256i la = ld(blk + 32 * (16 * h + t)), lb = ld(blk + 32 * (16 * h + 8 + t));
  const __m256i qh = ld(blk + 1024 + 32 * (8 * h + t));
  q[0] = _mm256_or_si256(_mm256_and_si256(la, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
  q[1] = _mm256_or_si256(_mm256_and_si256(lb, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
  q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4), _mm256_and_si256(qh, m30));
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4), _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
}

// Q6_K, the rest of a step once S = sum_j sc_j * dot(q_j, x_j) is summed: the -32 of every q, 32 *
// sum_j sc_j * sum(x_j) (int8 scales scv paired as int16; pair = kx8_pair6()), then acc += dx * d * s.
static inline void kx8_pair6(__m256i pair[2]) {
  pair[0] = lane_bytes(-1, 0, -1, 1);
  pair[1] = lane_bytes(-1, 2, -1, 3);
}
template <int M>
static inline void kx8_finish6(const uint8_t* blk, const __m256i scv[4], const __m256i pair[2], const int16_t* xs,
                               int64_t lds, const float* xd, int64_t ldd, int64_t b, const __m256i* S, __m256* acc) {
  __m256i O[M];
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) O[m] = _mm256_setzero_si256();
  #pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    const __m256i sp = _mm256_srai_epi16(_mm256_shuffle_epi8(scv[i / 2], pair[i % 2]), 8);
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m)
      O[m] = _mm256_add_epi32(O[m], _mm256_madd_epi16(sp, bcast4(xs + m * lds + b * kSub16 + 2 * i)));
  }
  const __m256 d = half8(blk + 1664);
  #pragma GCC unroll 16
  for (int m = 0; m < M; ++m) {
    const __m256i s = _mm256_sub_epi32(S[m], _mm256_slli_epi32(O[m], 5));
    acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(xd[m * ldd + b]), d), _mm256_cvtepi32_ps(s), acc[m]);
  }
}

template <KFormat F, int G, int M>
static inline void kx8_tile(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq,
                            const float* xd, int64_t ldd, const int16_t* xs, int64_t lds, float* res, int64_t ldr,
                            int64_t next) {
  constexpr int64_t kGB = kKX8Rows * KTraits<F>::kBytes;
  const KX8Ahead ahead(w, gstride, nsb, next, kGB, G);
  __m256 acc[G][M];
  for (int g = 0; g < G; ++g)
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
  if constexpr (F == KFormat::Q6_K) {
    const __m256i dup[4] = {lane_bytes(-1, 0, -1, 0), lane_bytes(-1, 1, -1, 1), lane_bytes(-1, 2, -1, 2),
                            lane_bytes(-1, 3, -1, 3)};
    __m256i pair[2];
    kx8_pair6(pair);
    for (int64_t b = 0; b < nsb; ++b) {
      const int8_t* x[M];
      #pragma GCC unroll 16
      for (int m = 0; m < M; ++m) x[m] = xq + m * ldq + b * kSuper;
      for (int g = 0; g < G; ++g) {
        const uint8_t* blk = w + g * gstride + b * kGB;
        const uintptr_t pa = ahead.at(b, g);
        __m256i scv[4];
        #pragma GCC unroll 16
        for (int i = 0; i < 4; ++i) scv[i] = ld(blk + 1536 + 32 * i);
        __m256i S[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) S[m] = _mm256_setzero_si256();
        __m256i sc[16];  // sub-block j's scale in both int16 halves of each lane
        #pragma GCC unroll 16
        for (int j = 0; j < 16; ++j) sc[j] = _mm256_srai_epi16(_mm256_shuffle_epi8(scv[j / 4], dup[j % 4]), 8);
        #pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
          #pragma GCC unroll 4
          for (int tp = 0; tp < 4; ++tp) {
            // elements 128h + 32k + 4t .. + 3 for k < 4 and t = 2tp, 2tp + 1: sub-block 8h + 2k + tp / 2
            kx8_prefetch_piece<kGB, 8>(pa, 4 * h + tp);
            __m256i p[4][M];
            #pragma GCC unroll 16
            for (int k = 0; k < 4; ++k)
              #pragma GCC unroll 16
              for (int m = 0; m < M; ++m) p[k][m] = _mm256_setzero_si256();
            #pragma GCC unroll 16
            for (int t = 2 * tp; t < 2 * tp + 2; ++t) {
              __m256i q[4];
              kx8_q6(blk, h, t, q);
              #pragma GCC unroll 16
              for (int k = 0; k < 4; ++k)
                #pragma GCC unroll 16
                for (int m = 0; m < M; ++m) {
                  p[k][m] = _mm256_add_epi16(p[k][m], _mm256_maddubs_epi16(q[k], bcast4(x[m] + 128 * h + 32 * k + 4 * t)));
                  lfmk::avx2::in_register(p[k][m]);
                }
            }
            #pragma GCC unroll 16
            for (int k = 0; k < 4; ++k)
              #pragma GCC unroll 16
              for (int m = 0; m < M; ++m)
                S[m] = _mm256_add_epi32(S[m], _mm256_madd_epi16(p[k][m], sc[8 * h + 2 * k + tp / 2]));
          }
        kx8_finish6<M>(blk, scv, pair, xs, lds, xd, ldd, b, S, acc[g]);
      }
    }
  } else {
    const __m256i dup[4] = {lane_bytes(0, -1, 0, -1), lane_bytes(1, -1, 1, -1), lane_bytes(2, -1, 2, -1),
                            lane_bytes(3, -1, 3, -1)};
    __m256i pair[2];
    kx8_pair45(pair);
    const __m256i m4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10);
    constexpr int kQs = F == KFormat::Q4_K ? 128 : 384;  // Q5_K: 8 qh vectors before the qs
    constexpr int kFlush = F == KFormat::Q4_K ? 8 : 4;   // int16 sums widened before they can overflow
    for (int64_t b = 0; b < nsb; ++b) {
      const int8_t* x[M];
      #pragma GCC unroll 16
      for (int m = 0; m < M; ++m) x[m] = xq + m * ldq + b * kSuper;
      // The G groups go through each sub-block pair together, so that every broadcast of x is loaded
      // once for all of them (one group at a time, the compiler kept the group loop rolled and loaded
      // each broadcast G times: a fifth of the tile's instructions at G = 2).
      const uint8_t* blk[G];
      KX8Scales45 sv[G];
      uintptr_t pa[G];
      __m256i S1[G][M];
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        blk[g] = w + g * gstride + b * kGB;
        pa[g] = ahead.at(b, g);
        sv[g] = kx8_scales45(blk[g]);
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) S1[g][m] = _mm256_setzero_si256();
      }
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g) kx8_prefetch_piece<kGB, 4>(pa[g], c);
        // qs vectors 8c..8c+7: sub-block 2c in the low nibbles, 2c + 1 in the high ones
        #pragma GCC unroll 2
        for (int f = 0; f < 8; f += kFlush) {
          __m256i pl[G][M], ph[G][M];
          #pragma GCC unroll 16
          for (int g = 0; g < G; ++g)
            #pragma GCC unroll 16
            for (int m = 0; m < M; ++m) pl[g][m] = ph[g][m] = _mm256_setzero_si256();
          #pragma GCC unroll 16
          for (int t = f; t < f + kFlush; ++t) {
            __m256i xa[M], xb[M];
            #pragma GCC unroll 16
            for (int m = 0; m < M; ++m) {
              xa[m] = bcast4(x[m] + 64 * c + 4 * t);
              xb[m] = bcast4(x[m] + 64 * c + 32 + 4 * t);
            }
            #pragma GCC unroll 16
            for (int g = 0; g < G; ++g) {
              const __m256i v = ld(blk[g] + kQs + 32 * (8 * c + t));
              __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
              if constexpr (F == KFormat::Q5_K) {
                // the fifth bit of sub-blocks 2c and 2c + 1 (bits 2c, 2c + 1 of each qh byte) to bit 4
                const __m256i qh = ld(blk[g] + 128 + 32 * t);
                lo = _mm256_or_si256(lo, _mm256_and_si256(shift16(qh, 4 - 2 * c), bit4));
                hi = _mm256_or_si256(hi, _mm256_and_si256(shift16(qh, 3 - 2 * c), bit4));
              }
              #pragma GCC unroll 16
              for (int m = 0; m < M; ++m) {
                pl[g][m] = _mm256_add_epi16(pl[g][m], _mm256_maddubs_epi16(lo, xa[m]));
                ph[g][m] = _mm256_add_epi16(ph[g][m], _mm256_maddubs_epi16(hi, xb[m]));
                lfmk::avx2::in_register(pl[g][m]);
                lfmk::avx2::in_register(ph[g][m]);
              }
            }
          }
          #pragma GCC unroll 16
          for (int g = 0; g < G; ++g) {
            const __m256i scv = c < 2 ? sv[g].sc_lo : sv[g].sc_hi;
            const __m256i scl = _mm256_shuffle_epi8(scv, dup[(2 * c) % 4]);
            const __m256i sch = _mm256_shuffle_epi8(scv, dup[(2 * c + 1) % 4]);
            #pragma GCC unroll 16
            for (int m = 0; m < M; ++m)
              S1[g][m] = _mm256_add_epi32(S1[g][m], _mm256_add_epi32(_mm256_madd_epi16(pl[g][m], scl),
                                                                     _mm256_madd_epi16(ph[g][m], sch)));
          }
        }
      }
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g) kx8_finish45<M>(blk[g], sv[g], pair, xs, lds, xd, ldd, b, S1[g], acc[g]);
    }
  }
  for (int g = 0; g < G; ++g)
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
}

}  // namespace kavx2
}  // namespace quant
}  // namespace lfmk
