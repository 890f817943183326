// AVX2 path of the quantized kernels (see quant.h for the interface). Include only between
// LFMK_AVX2_BEGIN and LFMK_AVX2_END, after common.h and simd_avx2.h; call only when cpu_has_avx2().
//
// A block's 32 weight x 32 activation products: vpmaddubsw needs one unsigned operand, so the
// weights enter as |w| and the activations take w's sign (vpsignb), as ggml does; |w| <= 128 and
// |x| <= 127 keep each pair sum within int16 (2 * 128 * 127 = 32512). vpmaddwd with ones widens to
// eight int32 partial sums, which are converted and scaled by d_w * d_x into eight fp32 lanes per
// (weight row, activation row), summed across lanes once at the end.
#pragma once

#include "quant/quant.h"

namespace lfmk {
namespace quant {
namespace avx2 {

// Block's 32 weights as signed bytes in element order (Q4_0: nibbles unpacked, 8 subtracted).
template <Format F>
static inline __m256i load_wq(const uint8_t* blk) {
  if (F == Format::Q8_0) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2));
  const __m128i lo_mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(b, lo_mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), lo_mask);
  return _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
}

static inline float scale(const uint8_t* blk) {
  uint16_t h;
  std::memcpy(&h, blk, sizeof h);
  return _cvtsh_ss(h);
}

// int8 q[32] of 4 x 8 fp32 values already scaled: round half to even (cvtps2dq in the default
// rounding mode), pack with saturation (never reached: |v| <= 127), undo the packs' lane interleave.
static inline __m256i pack_q(__m256 v0, __m256 v1, __m256 v2, __m256 v3) {
  const __m256i i01 = _mm256_packs_epi32(_mm256_cvtps_epi32(v0), _mm256_cvtps_epi32(v1));
  const __m256i i23 = _mm256_packs_epi32(_mm256_cvtps_epi32(v2), _mm256_cvtps_epi32(v3));
  const __m256i b = _mm256_packs_epi16(i01, i23);
  return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

template <typename T>
static inline void quantize_act_row(const T* x, int64_t K, int8_t* q, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.0f), inf = _mm256_set1_ps(INFINITY);
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const T* p = x + b * kBlock;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = lfmk::avx2::load8(p + 8 * i);
      const __m256 a = _mm256_andnot_ps(sign, v[i]);
      amax = _mm256_max_ps(amax, a);
      bad = _mm256_or_ps(bad, _mm256_cmp_ps(a, inf, _CMP_NLT_UQ));  // NaN or inf
    }
    if (_mm256_movemask_ps(bad)) {
      d[b] = NAN;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock), _mm256_setzero_si256());
      continue;
    }
    const float db = lfmk::avx2::hmax(amax) / 127.f;
    const __m256 inv = _mm256_set1_ps(db != 0.f ? 1.f / db : 0.f);
    d[b] = db;
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + b * kBlock),
                        pack_q(_mm256_mul_ps(v[0], inv), _mm256_mul_ps(v[1], inv), _mm256_mul_ps(v[2], inv),
                               _mm256_mul_ps(v[3], inv)));
  }
}

template <Format F, int R, int M>
static inline void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                        int64_t nb, float* res) {
  constexpr int kB = Traits<F>::kBytes;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i wq[R], aw[R];
    float dw[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * w_ld + b * kB;
      wq[r] = load_wq<F>(blk);
      aw[r] = _mm256_abs_epi8(wq[r]);
      dw[r] = scale(blk);
    }
    for (int m = 0; m < M; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * ldq + b * kBlock));
      const float dx = xd[m * ldd + b];
      for (int r = 0; r < R; ++r) {
        const __m256i p16 = _mm256_maddubs_epi16(aw[r], _mm256_sign_epi8(xv, wq[r]));
        const __m256i p32 = _mm256_madd_epi16(p16, ones);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(dw[r] * dx), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) res[r * M + m] = lfmk::avx2::hsum(acc[r][m]);
}


// ---- packed panels for many activation rows (prefill) ----
// A panel of weight rows is repacked once per GEMM task, eight rows at a time, so that one 32-byte
// vector holds the same four consecutive k of eight rows (row r in 32-bit lane r): a broadcast of
// four activation bytes then feeds eight rows' dot products, lane r accumulating row r, and the
// per-block scaling is one vector multiply for eight rows (no horizontal sums). Per (group, block):
//   256 bytes: vector j (j < 8) = rows 0..7 x elements 4j..4j+3  (Q4_0: nibbles 0..15 unsigned;
//              Q8_0: the signed bytes)
//   32 bytes:  the eight rows' scales as fp32
// Q4_0's unsigned nibbles go straight into vpmaddubsw (|pair sum| <= 2*15*127, eight of them fit
// int16), and the -8 offset is taken off once per block as 8 * sum(x_q) (an exact integer).
constexpr int kPanelRows = 8;
constexpr int64_t kPackedBlockBytes = 8 * 32 + 8 * 4;

// Packs rows [0, rows) (rows <= 8; missing rows are zero with scale 0) of nb blocks each.
template <Format F>
static inline void pack_group(const uint8_t* w, int64_t w_ld, int rows, int64_t nb, uint8_t* dst) {
  constexpr int kB = Traits<F>::kBytes;
  alignas(32) uint8_t tmp[kPanelRows][kBlock];
  alignas(32) float d[kPanelRows];
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < kPanelRows; ++r) {
      if (r >= rows) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(tmp[r]), _mm256_setzero_si256());
        d[r] = 0.f;
        continue;
      }
      const uint8_t* blk = w + r * w_ld + b * kB;
      __m256i v = load_wq<F>(blk);
      if (F == Format::Q4_0) v = _mm256_add_epi8(v, _mm256_set1_epi8(8));  // back to 0..15
      _mm256_store_si256(reinterpret_cast<__m256i*>(tmp[r]), v);
      d[r] = scale(blk);
    }
    uint8_t* o = dst + b * kPackedBlockBytes;
    for (int j = 0; j < 8; ++j)
      for (int r = 0; r < kPanelRows; ++r) std::memcpy(o + j * 32 + r * 4, tmp[r] + 4 * j, 4);
    std::memcpy(o + 256, d, sizeof d);
  }
}

static inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// res[m * ldr + g * 8 + r] = row (g * 8 + r) of G packed groups (gstride bytes apart) . activation
// row m, for M rows. xs8[m * lds + b] = 8 * sum of x_q over block b (read for Q4_0 only).
template <Format F, int G, int M>
static inline void panel_tile(const uint8_t* pk, int64_t gstride, int64_t nb, const int8_t* xq, int64_t ldq,
                              const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[G][M];
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int g = 0; g < G; ++g) {
      const uint8_t* blk = pk + g * gstride + b * kPackedBlockBytes;
      __m256i s[M];
      for (int m = 0; m < M; ++m) s[m] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + 32 * j));
        if (F == Format::Q4_0) {
          for (int m = 0; m < M; ++m) {
            s[m] = _mm256_add_epi16(s[m], _mm256_maddubs_epi16(wv, bcast4(xq + m * ldq + b * kBlock + 4 * j)));
            lfmk::avx2::in_register(s[m]);  // simd_avx2.h: keeps the sum's order, and its registers
          }
        } else {
          const __m256i aw = _mm256_abs_epi8(wv);
          for (int m = 0; m < M; ++m) {
            const __m256i sx = _mm256_sign_epi8(bcast4(xq + m * ldq + b * kBlock + 4 * j), wv);
            s[m] = _mm256_add_epi32(s[m], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones));
          }
        }
      }
      const __m256 dw = _mm256_load_ps(reinterpret_cast<const float*>(blk + 256));
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
