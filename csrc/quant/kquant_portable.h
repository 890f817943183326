// Portable C++ path of the K-quant kernels (interface and numerics in kquant.h): any CPU, and the
// path the tests force to check the SIMD one against (the two give the same bits).
#pragma once

#include "quant/kquant.h"

namespace lfmk {
namespace quant {
namespace kportable {

// One activation row -> q[K], d[K / 256], s[K / 16]. A super-block holding NaN or inf gets d = NaN
// and q = 0, so whatever it feeds comes out NaN (and no NaN reaches a float -> int conversion).
template <typename T>
static inline void quantize_act_row_k(const T* x, int64_t K, int8_t* q, float* d, int16_t* s) {
  for (int64_t b = 0; b < K / kSuper; ++b) {
    float amax = 0.f;
    bool finite = true;
    for (int j = 0; j < kSuper; ++j) {
      const float v = static_cast<float>(x[b * kSuper + j]);
      finite = finite && std::isfinite(v);
      amax = std::max(amax, std::fabs(v));
    }
    if (!finite) {
      d[b] = NAN;
      std::memset(q + b * kSuper, 0, kSuper);
      continue;
    }
    const float db = amax / 127.f;
    const float inv = db != 0.f ? 1.f / db : 0.f;
    d[b] = db;
    for (int j = 0; j < kSuper; ++j)
      q[b * kSuper + j] = static_cast<int8_t>(static_cast<int>(std::nearbyint(static_cast<float>(x[b * kSuper + j]) * inv)));
  }
  kq_act_sums(q, K, s);
}

// Super-block's 256 weights as their stored unsigned integers (Q4_K 0..15, Q5_K 0..31, Q6_K
// 0..63) in element order.
template <KFormat F>
static inline void load_kq(const uint8_t* blk, int32_t* q) {
  if (F == KFormat::Q4_K) {
    const uint8_t* qs = blk + 16;
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 32; ++i) {
        q[64 * c + i] = qs[32 * c + i] & 0x0F;
        q[64 * c + 32 + i] = qs[32 * c + i] >> 4;
      }
  } else if (F == KFormat::Q5_K) {
    const uint8_t* qh = blk + 16;
    const uint8_t* qs = blk + 48;
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 32; ++i) {
        q[64 * c + i] = (qs[32 * c + i] & 0x0F) | (((qh[i] >> (2 * c)) & 1) << 4);
        q[64 * c + 32 + i] = (qs[32 * c + i] >> 4) | (((qh[i] >> (2 * c + 1)) & 1) << 4);
      }
  } else {
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 32; ++i) {
        const int hb = qh[32 * h + i];
        int32_t* o = q + 128 * h;
        o[i] = (ql[64 * h + i] & 0x0F) | ((hb & 3) << 4);
        o[32 + i] = (ql[64 * h + 32 + i] & 0x0F) | (((hb >> 2) & 3) << 4);
        o[64 + i] = (ql[64 * h + i] >> 4) | (((hb >> 4) & 3) << 4);
        o[96 + i] = (ql[64 * h + 32 + i] >> 4) | (((hb >> 6) & 3) << 4);
      }
  }
}

// One super-block of one weight row (blk, its q from load_kq) against one activation row's
// super-block (x, its per-16 sums s, its scale dx): acc plus kquant.h's fused fp32 step.
template <KFormat F>
static inline float kblock_step(const uint8_t* blk, const int32_t* q, const int8_t* x, const int16_t* s, float dx,
                                float acc) {
  if (F == KFormat::Q6_K) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + 192);
    int32_t S = 0;
    for (int j = 0; j < 16; ++j) {
      int32_t dot = 0;
      for (int i = 0; i < 16; ++i) dot += q[16 * j + i] * x[16 * j + i];
      S += sc[j] * (dot - 32 * s[j]);
    }
    return std::fma(dx * kq_half(blk + 208), static_cast<float>(S), acc);
  }
  int32_t sc[8], mn[8];
  kq_scale_min(blk + 4, sc, mn);
  int32_t S1 = 0;
  for (int j = 0; j < 8; ++j) {
    int32_t dot = 0;
    for (int i = 0; i < 32; ++i) dot += q[32 * j + i] * x[32 * j + i];
    S1 += sc[j] * dot;
  }
  const int32_t S2 = kq_min_term(mn, s);
  const float t = std::fma(kq_half(blk), static_cast<float>(S1), -(kq_half(blk + 2) * static_cast<float>(S2)));
  return std::fma(dx, t, acc);
}

template <KFormat F, int R, int M>
static inline void ktile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                         const int16_t* xs, int64_t lds, int64_t nsb, float* res) {
  constexpr int kB = KTraits<F>::kBytes;
  float acc[R][M] = {};
  for (int64_t b = 0; b < nsb; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * w_ld + b * kB;
      int32_t q[kSuper];
      load_kq<F>(blk, q);
      for (int m = 0; m < M; ++m)
        acc[r][m] = kblock_step<F>(blk, q, xq + m * ldq + b * kSuper, xs + m * lds + b * kSub16, xd[m * ldd + b],
                                   acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) res[r * M + m] = acc[r][m];
}

}  // namespace kportable
}  // namespace quant
}  // namespace lfmk
