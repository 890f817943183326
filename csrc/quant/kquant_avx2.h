// AVX2 path of the K-quant kernels (interface and numerics in kquant.h). Include only between
// LFMK_AVX2_BEGIN and LFMK_AVX2_END, after common.h and simd_avx2.h; call only when cpu_has_avx2().
//
// The stored weights are unsigned (Q4_K 0..15, Q5_K 0..31, Q6_K 0..63) and go straight into
// vpmaddubsw as its unsigned operand against the int8 activations: a pair sum is at most
// 2 * 63 * 127 = 16002, within int16. vpmaddwd against the sub-block's scale (broadcast as int16)
// then gives int32 partial sums already weighted by sc_j, so a super-block's S1 (or S) is the sum
// of one int32 vector, reduced to a scalar and combined in fp32 exactly as the portable path does.
#pragma once

#include "quant/kquant.h"

namespace lfmk {
namespace quant {
namespace kavx2 {

static inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

static inline float fma_ss(float a, float b, float c) {
  return _mm_cvtss_f32(_mm_fmadd_ss(_mm_set_ss(a), _mm_set_ss(b), _mm_set_ss(c)));
}

// int8 q[32] of 4 x 8 fp32 values already scaled (see avx2.h's pack_q).
static inline __m256i pack_q(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256i i01 = _mm256_packs_epi32(_mm256_cvtps_epi32(v0), _mm256_cvtps_epi32(v1));
  const __m256i i23 = _mm256_packs_epi32(_mm256_cvtps_epi32(v2), _mm256_cvtps_epi32(v3));
  const __m256i b = _mm256_packs_epi16(i01, i23);
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

template <typename T>
static inline void quantize_act_row_k(const T* x, int64_t K, int8_t* q, float* d, int16_t* s) {
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
  for (int64_t b = 0; b < K / kSuper; ++b) {
    const T* p = x + b * kSuper;
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int i = 0; i < kSuper / 8; ++i) {
      const __m256 a = _mm256_andnot_ps(sign, lfmk::avx2::load8(p + 8 * i));
      amax = _mm256_max_ps(amax, a);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or inf
    }
    int8_t* qb = q + b * kSuper;
    if (_mm256_movemask_ps(bad)) {
      d[b] = NAN;
      std::memset(qb, 0, kSuper);
      continue;
    }
    const float db = lfmk::avx2::hmax(amax) / 127.f;
    const __m256 inv = _mm256_set1_ps(db != 0.f ? 1.f / db : 0.f);
    d[b] = db;
    for (int i = 0; i < kSuper / 32; ++i) {
      const T* pi = p + 32 * i;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 32 * i),
                          pack_q(_mm256_mul_ps(lfmk::avx2::load8(pi), inv), _mm256_mul_ps(lfmk::avx2::load8(pi + 8), inv),
                                 _mm256_mul_ps(lfmk::avx2::load8(pi + 16), inv),
                                 _mm256_mul_ps(lfmk::avx2::load8(pi + 24), inv)));
    }
  }
  kq_act_sums(q, K, s);
}

// Q4_K / Q5_K's twelve scale bytes -> the eight scales in bytes 0..7 and the eight mins in bytes
// 8..15 (the 6-bit fields moved with 32-bit masks and shifts, four at a time).
static inline __m128i scales_mins(const uint8_t* s12) {
  uint32_t u[4];
  std::memcpy(u, s12, 12);
  const uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
  const uint32_t sc_hi = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);
  const uint32_t mn_hi = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);
  return _mm_setr_epi32(static_cast<int>(u[0] & m6), static_cast<int>(sc_hi), static_cast<int>(u[1] & m6),
                        static_cast<int>(mn_hi));
}

// Sums of the eight int32 lanes of a and of the four of b.
static inline void hsum2_i32(__m256i a, __m128i b, int32_t* sa, int32_t* sb) {
  const __m128i a4 = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  const __m128i h = _mm_hadd_epi32(a4, b);  // a01 a23 b01 b23
  const __m128i t = _mm_hadd_epi32(h, h);   // a, b, a, b
  *sa = _mm_cvtsi128_si32(t);
  *sb = _mm_extract_epi32(t, 1);
}

static inline __m256i ld(const void* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// Q4_K / Q5_K: 32 bytes c of the nibbles (and Q5_K's fifth bits) -> sub-blocks 2c and 2c + 1.
template <KFormat F>
static inline void load_pair(const uint8_t* blk, int c, __m256i& lo, __m256i& hi) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i v = ld(blk + (F == KFormat::Q4_K ? 16 : 48) + 32 * c);
  lo = _mm256_and_si256(v, m4);
  hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  if (F == KFormat::Q5_K) {
    const __m256i qh = ld(blk + 16), bit = _mm256_set1_epi8(0x10);
    // bit 2c (2c + 1) of each qh byte moved to bit 4
    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * c), 4), bit));
    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_slli_epi16(_mm256_srli_epi16(qh, 2 * c + 1), 4), bit));
  }
}

// Q6_K: the 32-element group g (0..3) of half h as unsigned 6-bit integers.
static inline __m256i load_q6(const uint8_t* blk, int h, int g) {
  const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
  const __m256i l = ld(blk + 64 * h + 32 * (g & 1));
  const __m256i qh = ld(blk + 128 + 32 * h);
  const __m256i lo = g < 2 ? _mm256_and_si256(l, m4) : _mm256_and_si256(_mm256_srli_epi16(l, 4), m4);
  __m256i hb;
  switch (g) {
    case 0: hb = _mm256_slli_epi16(qh, 4); break;
    case 1: hb = _mm256_slli_epi16(qh, 2); break;
    case 2: hb = qh; break;
    default: hb = _mm256_srli_epi16(qh, 2); break;
  }
  return _mm256_or_si256(lo, _mm256_and_si256(hb, m30));
}

template <KFormat F, int R, int M>
static inline void ktile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                         const int16_t* xs, int64_t lds, int64_t nsb, float* res) {
  constexpr int kB = KTraits<F>::kBytes;
  float acc[R][M] = {};
  for (int64_t b = 0; b < nsb; ++b) {
    __m256i isum[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) isum[r][m] = _mm256_setzero_si256();
    if (F == KFormat::Q6_K) {
      for (int h = 0; h < 2; ++h)
        for (int g = 0; g < 4; ++g) {
          __m256i wq[R], sc[R];
          for (int r = 0; r < R; ++r) {
            const uint8_t* blk = w + r * w_ld + b * kB;
            wq[r] = load_q6(blk, h, g);
            const int8_t* s8 = reinterpret_cast<const int8_t*>(blk + 192) + 8 * h + 2 * g;
            sc[r] = _mm256_set_m128i(_mm_set1_epi16(s8[1]), _mm_set1_epi16(s8[0]));
          }
          for (int m = 0; m < M; ++m) {
            const __m256i xv = ld(xq + m * ldq + b * kSuper + 128 * h + 32 * g);
            for (int r = 0; r < R; ++r)
              isum[r][m] = _mm256_add_epi32(isum[r][m], _mm256_madd_epi16(_mm256_maddubs_epi16(wq[r], xv), sc[r]));
          }
        }
      for (int r = 0; r < R; ++r) {
        const uint8_t* blk = w + r * w_ld + b * kB;
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
        const float d = kq_half(blk + 208);
        for (int m = 0; m < M; ++m) {
          // the -32 offset of every q: 32 * sum_j sc_j * sum(x_j)
          const __m256i off = _mm256_madd_epi16(sc16, ld(xs + m * lds + b * kSub16));
          const int32_t S = hsum_i32(_mm256_sub_epi32(isum[r][m], _mm256_slli_epi32(off, 5)));
          acc[r][m] = fma_ss(xd[m * ldd + b] * d, static_cast<float>(S), acc[r][m]);
        }
      }
    } else {
      alignas(16) int16_t sc[R][8];
      __m128i mn[R];
      for (int r = 0; r < R; ++r) {
        const __m128i sm = scales_mins(w + r * w_ld + b * kB + 4);
        _mm_store_si128(reinterpret_cast<__m128i*>(sc[r]), _mm_cvtepu8_epi16(sm));
        mn[r] = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
      }
      for (int c = 0; c < 4; ++c) {
        __m256i lo[R], hi[R];
        for (int r = 0; r < R; ++r) load_pair<F>(w + r * w_ld + b * kB, c, lo[r], hi[r]);
        for (int m = 0; m < M; ++m) {
          const int8_t* x = xq + m * ldq + b * kSuper + 64 * c;
          const __m256i xl = ld(x), xh = ld(x + 32);
          for (int r = 0; r < R; ++r) {
            const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo[r], xl), _mm256_set1_epi16(sc[r][2 * c]));
            const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi[r], xh), _mm256_set1_epi16(sc[r][2 * c + 1]));
            isum[r][m] = _mm256_add_epi32(isum[r][m], _mm256_add_epi32(pl, ph));
          }
        }
      }
      for (int m = 0; m < M; ++m) {
        // sums of x over the eight sub-blocks of 32, from the sixteen per-16 sums
        const int16_t* s = xs + m * lds + b * kSub16;
        const __m128i xs32 = _mm_hadd_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s)),
                                            _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 8)));
        for (int r = 0; r < R; ++r) {
          const uint8_t* blk = w + r * w_ld + b * kB;
          int32_t S1, S2;
          hsum2_i32(isum[r][m], _mm_madd_epi16(mn[r], xs32), &S1, &S2);
          const float t = fma_ss(kq_half(blk), static_cast<float>(S1), -(kq_half(blk + 2) * static_cast<float>(S2)));
          acc[r][m] = fma_ss(xd[m * ldd + b], t, acc[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) res[r * M + m] = acc[r][m];
}


// ---- packed panels for many activation rows (prefill) ----
// As for Q8_0 / Q4_0 (quant/avx2.h), a panel of weight rows is repacked once per task, eight rows
// at a time, so that one 32-byte vector holds the same four consecutive k of eight rows (row r in
// 32-bit lane r): a broadcast of four activation bytes feeds eight rows, and the per-sub-block
// scales, mins and fp32 steps are vectors over the eight rows (no horizontal sums, no scale
// decoding in the inner loop). Per (group, super-block), kPackedKBytes<F> bytes:
//   2048 bytes: vector v (v < 64) = rows 0..7 x elements 4v..4v+3, the stored unsigned q
//   scale vectors, one per sub-block j (Q4_K / Q5_K: 8 of 32 weights; Q6_K: 16 of 16):
//              lane r = int16 pair (sc_rj, sc_rj)
//   pair vectors, one per two sub-blocks i: lane r = int16 pair (c_r,2i, c_r,2i+1), with c = the
//              mins (Q4_K / Q5_K) or the scales (Q6_K, for its -32 offset)
//   d as 8 fp32 (and Q4_K / Q5_K: dmin as 8 fp32)
// The kernel computes the same integers S1, S2 (S) and the same fused fp32 steps as ktile, lane by
// lane, so a packed panel gives the bits of the plain tiles and of the portable path.
template <KFormat F>
struct KPack {
  static constexpr int kSubs = F == KFormat::Q6_K ? 16 : 8;           // sub-blocks per super-block
  static constexpr int kVecsPerSub = 64 / kSubs;                      // q vectors per sub-block
  // q vectors summed in int16 before the scale: their pair sums (<= 2 * qmax * 127) must fit
  static constexpr int kFlush = F == KFormat::Q4_K ? 8 : F == KFormat::Q5_K ? 4 : 2;
  static constexpr int64_t kScOff = 2048;
  static constexpr int64_t kPairOff = kScOff + 32 * kSubs;
  static constexpr int64_t kDOff = kPairOff + 32 * (kSubs / 2);
  static constexpr int64_t kBytes = kDOff + (F == KFormat::Q6_K ? 32 : 64);
};
static_assert(KPack<KFormat::Q4_K>::kFlush * 2 * 15 * 127 <= 32767, "Q4_K int16 sums");
static_assert(KPack<KFormat::Q5_K>::kFlush * 2 * 31 * 127 <= 32767, "Q5_K int16 sums");
static_assert(KPack<KFormat::Q6_K>::kFlush * 2 * 63 * 127 <= 32767, "Q6_K int16 sums");

// Packs rows [0, rows) (rows <= 8; missing rows are zero, with zero scales) of nsb super-blocks
// into dst (32-byte aligned, nsb * KPack<F>::kBytes).
template <KFormat F>
static inline void pack_kgroup(const uint8_t* w, int64_t w_ld, int rows, int64_t nsb, uint8_t* dst) {
  using P = KPack<F>;
  constexpr int kB = KTraits<F>::kBytes;
  alignas(32) uint8_t q[8][kSuper];
  int16_t sc[8][16];
  int16_t pr[8][16];
  float d[8], dm[8];
  for (int64_t b = 0; b < nsb; ++b) {
    for (int r = 0; r < 8; ++r) {
      if (r >= rows) {
        std::memset(q[r], 0, kSuper);
        std::memset(sc[r], 0, sizeof sc[r]);
        std::memset(pr[r], 0, sizeof pr[r]);
        d[r] = dm[r] = 0.f;
        continue;
      }
      const uint8_t* blk = w + r * w_ld + b * kB;
      if (F == KFormat::Q6_K) {
        for (int h = 0; h < 2; ++h)
          for (int g = 0; g < 4; ++g) _mm256_store_si256(reinterpret_cast<__m256i*>(q[r] + 128 * h + 32 * g), load_q6(blk, h, g));
        const int8_t* s8 = reinterpret_cast<const int8_t*>(blk + 192);
        for (int j = 0; j < 16; ++j) sc[r][j] = pr[r][j] = s8[j];
        d[r] = kq_half(blk + 208);
        dm[r] = 0.f;
      } else {
        for (int c = 0; c < 4; ++c) {
          __m256i lo, hi;
          load_pair<F>(blk, c, lo, hi);
          _mm256_store_si256(reinterpret_cast<__m256i*>(q[r] + 64 * c), lo);
          _mm256_store_si256(reinterpret_cast<__m256i*>(q[r] + 64 * c + 32), hi);
        }
        int32_t s[8], m[8];
        kq_scale_min(blk + 4, s, m);
        for (int j = 0; j < 8; ++j) {
          sc[r][j] = static_cast<int16_t>(s[j]);
          pr[r][j] = static_cast<int16_t>(m[j]);
        }
        d[r] = kq_half(blk);
        dm[r] = kq_half(blk + 2);
      }
    }
    uint8_t* o = dst + b * P::kBytes;
    for (int v = 0; v < 64; ++v)
      for (int r = 0; r < 8; ++r) std::memcpy(o + 32 * v + 4 * r, q[r] + 4 * v, 4);
    int16_t* so = reinterpret_cast<int16_t*>(o + P::kScOff);
    for (int j = 0; j < P::kSubs; ++j)
      for (int r = 0; r < 8; ++r) so[16 * j + 2 * r] = so[16 * j + 2 * r + 1] = sc[r][j];
    int16_t* po = reinterpret_cast<int16_t*>(o + P::kPairOff);
    for (int i = 0; i < P::kSubs / 2; ++i)
      for (int r = 0; r < 8; ++r) {
        po[16 * i + 2 * r] = pr[r][2 * i];
        po[16 * i + 2 * r + 1] = pr[r][2 * i + 1];
      }
    std::memcpy(o + P::kDOff, d, sizeof d);
    if (F != KFormat::Q6_K) std::memcpy(o + P::kDOff + 32, dm, sizeof dm);
  }
}

static inline __m256i bcast4(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The rest of a packed super-block once S (sum_j sc_j * dot_j, exact int32 per row lane) is summed:
// O = the mins (Q4_K / Q5_K) or scales (Q6_K, for the -32 of every q) against the activation's
// sub-block sums, then the fp32 steps into acc. Shared with the VNNI panel (quant/kquant_x8_vnni.h).
template <KFormat F, int M>
static inline void kpanel_finish(const uint8_t* blk, const int16_t* xp, int64_t ldp, const float* xd, int64_t ldd,
                                 int64_t b, const __m256i* S, __m256* acc) {
  using P = KPack<F>;
  const __m256 d = _mm256_load_ps(reinterpret_cast<const float*>(blk + P::kDOff));
  for (int m = 0; m < M; ++m) {
    const int16_t* xs = xp + m * ldp + b * P::kSubs;
    __m256i O = _mm256_setzero_si256();
    for (int i = 0; i < P::kSubs / 2; ++i)
      O = _mm256_add_epi32(O, _mm256_madd_epi16(_mm256_load_si256(reinterpret_cast<const __m256i*>(blk + P::kPairOff + 32 * i)),
                                                bcast4(xs + 2 * i)));
    const __m256 dx = _mm256_set1_ps(xd[m * ldd + b]);
    if (F == KFormat::Q6_K) {
      const __m256i s = _mm256_sub_epi32(S[m], _mm256_slli_epi32(O, 5));
      acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(dx, d), _mm256_cvtepi32_ps(s), acc[m]);
    } else {
      const __m256 dmin = _mm256_load_ps(reinterpret_cast<const float*>(blk + P::kDOff + 32));
      const __m256 t = _mm256_fmsub_ps(d, _mm256_cvtepi32_ps(S[m]), _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(O)));
      acc[m] = _mm256_fmadd_ps(dx, t, acc[m]);
    }
  }
}

#include "quant/kpanel_frame.h"

// res[m * ldr + r] = row r of one packed group . activation row m, for M rows over nsb
// super-blocks. xp rows (ldp int16 apart) hold the activation's sums per sub-block (Q4_K / Q5_K:
// per 32, see kq_sub32_sums; Q6_K: per 16, the s of quantize_act_row_k).
template <KFormat F, int M>
static inline void kpanel_tile(const uint8_t* pk, int64_t nsb, const int8_t* xq, int64_t ldq, const float* xd,
                               int64_t ldd, const int16_t* xp, int64_t ldp, float* res, int64_t ldr) {
  using P = KPack<F>;
  kpanel_frame<F, M>(pk, nsb, xd, ldd, xp, ldp, res, ldr, [&](const uint8_t* blk, int64_t b, int j, __m256i* S) {
    const __m256i scv = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + P::kScOff + 32 * j));
    for (int f = 0; f < P::kVecsPerSub; f += P::kFlush) {
      __m256i t[M];
      for (int m = 0; m < M; ++m) t[m] = _mm256_setzero_si256();
      for (int u = 0; u < P::kFlush; ++u) {
        const int v = j * P::kVecsPerSub + f + u;
        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + 32 * v));
        for (int m = 0; m < M; ++m) {
          t[m] = _mm256_add_epi16(t[m], _mm256_maddubs_epi16(wv, bcast4(xq + m * ldq + b * kSuper + 4 * v)));
          lfmk::avx2::in_register(t[m]);  // simd_avx2.h: keeps the sum's order, and its registers
        }
      }
      for (int m = 0; m < M; ++m) S[m] = _mm256_add_epi32(S[m], _mm256_madd_epi16(t[m], scv));
    }
  });
}

}  // namespace kavx2
}  // namespace quant
}  // namespace lfmk
