// Weight quantizers, one block at a time: fp32 weights -> GGUF blocks (layouts in quant.h and
// kquant.h), byte for byte what the Python references make:
//   Q8_0 / Q4_0: ggml's reference round-to-nearest, as the gguf package's numpy port computes it
//                (round-half-away via floor, trunc(x / d + 8.5), the scale's fp16 rounding to
//                nearest even with overflow to inf).
//   Q4_K / Q5_K / Q6_K: llama.cpp's reference search (make_qkx2_quants, make_qx_quants) step for
//                step in its fp32 order (sums left to right, w * (diff * diff), ...), then the
//                refit of the fp16 super-block factors that lfm_kernels/kquants.py adds, in
//                float64 with the same left-to-right sums.
// Rounding to an integer is numpy's rint after a clip to +-2^30 (NaN -> INT32_MIN), which is
// ggml's nearest_int wherever that one is defined (|v| < 2^22).
//
// Exactness depends on every fp32 operation being rounded on its own: this header must not be
// compiled where the compiler may contract a * b + c into an FMA (e.g. inside LFMK_AVX2_BEGIN).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/util/Half.h>

#include "quant/kquant.h"
#include "quant/quant.h"

namespace lfmk {
namespace quant {
namespace qz {

static inline float fp16_round(float v) { return static_cast<float>(c10::Half(v)); }

static inline void store_fp16(uint8_t* p, float v) {
  const uint16_t h = c10::Half(v).x;
  std::memcpy(p, &h, sizeof h);
}

static inline int32_t nearest(float v) {
  if (std::fabs(v) < 4194304.f) {  // adding 1.5 * 2^23 leaves the integer part in the low bits
    const float t = v + 12582912.f;
    int32_t i;
    std::memcpy(&i, &t, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
  }
  if (std::isnan(v)) return std::numeric_limits<int32_t>::min();
  const float c = v < -1073741824.f ? -1073741824.f : v > 1073741824.f ? 1073741824.f : v;
  return static_cast<int32_t>(std::nearbyint(c));  // |c| in [2^22, 2^30]: representable
}

static inline int32_t clampi(int32_t v, int32_t lo, int32_t hi) { return v < lo ? lo : v > hi ? hi : v; }

// ---------------------------------------------------------------------------------- Q8_0 / Q4_0

// |v| <= 2^30 truncated toward zero by the int conversion (exact, and inline where std::trunc /
// std::floor are library calls on baseline x86-64); a non-finite product (a block so small that
// 1 / d overflows) has no defined int conversion in C: numpy (x86) gives 0 for it, and so do we.
static inline int32_t trunc_or_zero(float v) { return std::fabs(v) <= 1073741824.f ? static_cast<int32_t>(v) : 0; }

static inline void quantize_block_q8_0(const float* x, uint8_t* out) {
  float amax = 0.f;
  for (int j = 0; j < kBlock; ++j) amax = std::fabs(x[j]) > amax ? std::fabs(x[j]) : amax;  // finite x: no NaN
  const float d = amax / 127.f;
  const float id = d == 0.f ? 0.f : 1.f / d;
  store_fp16(out, d);
  for (int j = 0; j < kBlock; ++j) {
    // round half away from zero as gguf computes it: floor(a) + floor(2 * (a - floor(a))), exact in
    // fp32; |v| <= 127 (or non-finite), so the truncations are floors
    const float v = x[j] * id;
    const float a = std::fabs(v);
    const int32_t fl = trunc_or_zero(a);
    const int32_t b = fl + trunc_or_zero(2.f * (a - static_cast<float>(fl)));
    const int32_t r = v > 0.f ? b : v < 0.f ? -b : 0;
    out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(r));
  }
}

static inline void quantize_block_q4_0(const float* x, uint8_t* out) {
  float amax = std::fabs(x[0]), max = x[0];  // in an all-zero block, x[0] with its sign (gguf's argmax)
  for (int j = 1; j < kBlock; ++j) {
    if (std::fabs(x[j]) > amax) {  // the first of the largest magnitudes, sign kept
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.f;
  const float id = d == 0.f ? 0.f : 1.f / d;
  store_fp16(out, d);
  uint8_t q[kBlock];
  for (int j = 0; j < kBlock; ++j) q[j] = static_cast<uint8_t>(clampi(trunc_or_zero(x[j] * id + 8.5f), 0, 15));
  for (int j = 0; j < kBlock / 2; ++j) out[2 + j] = static_cast<uint8_t>(q[j] | (q[j + kBlock / 2] << 4));
}

// ---------------------------------------------------------------------------------- Q4_K / Q5_K

// make_qkx2_quants for one sub-block of 32: x ~ scale * L + min (min <= 0); returns scale, -min.
static inline float make_qkx2(const float* x, const float* w, int nmax, float rmin, float rdelta, int nstep,
                              uint8_t* L, float* the_min) {
  constexpr int n = 32;
  float min = x[0], max = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    if (x[i] < min) min = x[i];
    if (x[i] > max) max = x[i];
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (min > 0) min = 0;
  if (max == min) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *the_min = -min;
    return 0.f;
  }
  float iscale = nmax / (max - min);
  float scale = 1 / iscale;
  float best_error = 0;
  for (int i = 0; i < n; ++i) {
    L[i] = static_cast<uint8_t>(clampi(nearest(iscale * (x[i] - min)), 0, nmax));
    float diff = scale * L[i] + min - x[i];
    diff = diff * diff;
    best_error += w[i] * diff;
  }
  uint8_t Laux[n];
  for (int is = 0; is <= nstep; ++is) {
    iscale = (rmin + rdelta * is + nmax) / (max - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(nearest(iscale * (x[i] - min)), 0, nmax);
      Laux[i] = static_cast<uint8_t>(l);
      const float wl = w[i] * l;
      sum_l += wl;
      sum_l2 += wl * l;
      sum_xl += wl * x[i];
    }
    const float D = sum_w * sum_l2 - sum_l * sum_l;
    if (D > 0) {
      float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
      float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
      if (this_min > 0) {
        this_min = 0;
        this_scale = sum_xl / sum_l2;
      }
      float cur_error = 0;
      for (int i = 0; i < n; ++i) {
        float diff = this_scale * Laux[i] + this_min - x[i];
        diff = diff * diff;
        cur_error += w[i] * diff;
      }
      if (cur_error < best_error) {
        std::memcpy(L, Laux, n);
        best_error = cur_error;
        scale = this_scale;
        min = this_min;
      }
    }
  }
  *the_min = -min;
  return scale;
}

// The larger of 0 and every v[j], NaN if any is NaN (numpy's maximum(max(v), 0)).
static inline float max0_nan(const float* v, int n) {
  float m = 0.f;
  for (int j = 0; j < n; ++j) {
    if (std::isnan(v[j])) return v[j];
    if (v[j] > m) m = v[j];
  }
  return m;
}

// Rounds the weights of one super-block to 0..nmax with the stored factors; returns the squared
// error (float64, summed left to right). A sub-block whose scale is 0 keeps the search's L0.
static inline double requantize_affine(const float* x, float d, float dmin, const int32_t* ls, const int32_t* lm,
                                       int nmax, const uint8_t* L0, uint8_t* L) {
  double err = 0;
  for (int j = 0; j < 8; ++j) {
    const float ds = d * ls[j];
    const float dm = dmin * lm[j];
    for (int i = 32 * j; i < 32 * j + 32; ++i) {
      L[i] = ds != 0.f ? static_cast<uint8_t>(clampi(nearest((x[i] + dm) / ds), 0, nmax)) : L0[i];
      const double e = static_cast<double>(ds) * L[i] - static_cast<double>(dm) - static_cast<double>(x[i]);
      err += e * e;
    }
  }
  return err;
}

// Q4_K (nmax 15) / Q5_K (nmax 31) search for one super-block: the fp16-rounded factors, the 6-bit
// sub-block scales and mins, the 256 integers.
static inline void affine_k(const float* x, int nmax, float rmin, float rdelta, int nstep, float* d_out,
                            float* dmin_out, int32_t* ls, int32_t* lm, uint8_t* L) {
  float scales[8], mins[8], weights[32];
  uint8_t L0[kSuper];
  for (int j = 0; j < 8; ++j) {
    const float* xj = x + 32 * j;
    float sum_x2 = 0;
    for (int l = 0; l < 32; ++l) sum_x2 += xj[l] * xj[l];
    const float av_x = std::sqrt(sum_x2 / 32);
    for (int l = 0; l < 32; ++l) weights[l] = av_x + std::fabs(xj[l]);
    scales[j] = make_qkx2(xj, weights, nmax, rmin, rdelta, nstep, L0 + 32 * j, &mins[j]);
  }
  const float max_scale = max0_nan(scales, 8);
  const float max_min = max0_nan(mins, 8);
  const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
  const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
  for (int j = 0; j < 8; ++j) {
    ls[j] = clampi(nearest(inv_scale * scales[j]), 0, 63);
    lm[j] = clampi(nearest(inv_min * mins[j]), 0, 63);
  }
  float d = fp16_round(max_scale / 63.f);
  float dmin = fp16_round(max_min / 63.f);
  const double err = requantize_affine(x, d, dmin, ls, lm, nmax, L0, L);

  // the refit: least squares for (d, dmin) with the integers and 6-bit scales fixed,
  // x ~ d * a - dmin * b; kept only where it lowers the block's error
  double saa = 0, sbb = 0, sab = 0, sax = 0, sbx = 0;
  for (int i = 0; i < kSuper; ++i) {
    const double a = static_cast<double>(ls[i / 32]) * L[i];
    const double b = static_cast<double>(lm[i / 32]);
    const double xi = x[i];
    saa += a * a;
    sbb += b * b;
    sab += a * b;
    sax += a * xi;
    sbx += b * xi;
  }
  const double det = saa * sbb - sab * sab;
  const bool ok = det > 1e-30;
  double d2 = ok ? (sax * sbb - sbx * sab) / det : d;
  double m2 = ok ? (sax * sab - sbx * saa) / det : dmin;
  d2 = d2 < 0 ? 0 : d2 > 65504 ? 65504 : d2;  // NaN passes, as through np.clip
  m2 = m2 < 0 ? 0 : m2 > 65504 ? 65504 : m2;
  const float d2f = fp16_round(static_cast<float>(d2));
  const float m2f = fp16_round(static_cast<float>(m2));
  uint8_t L2[kSuper];
  const double err2 = requantize_affine(x, d2f, m2f, ls, lm, nmax, L0, L2);
  if (err2 < err) {
    d = d2f;
    dmin = m2f;
    std::memcpy(L, L2, kSuper);
  }
  *d_out = d;
  *dmin_out = dmin;
}

static inline void pack_scales_k4(const int32_t* ls, const int32_t* lm, uint8_t* s) {
  for (int j = 0; j < 4; ++j) {
    s[j] = static_cast<uint8_t>(ls[j] | ((ls[j + 4] >> 4) << 6));
    s[j + 4] = static_cast<uint8_t>(lm[j] | ((lm[j + 4] >> 4) << 6));
    s[j + 8] = static_cast<uint8_t>((ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4));
  }
}

static inline void quantize_block_q4_k(const float* x, uint8_t* out) {
  float d, dmin;
  int32_t ls[8], lm[8];
  uint8_t L[kSuper];
  affine_k(x, 15, -1.f, 0.1f, 20, &d, &dmin, ls, lm, L);
  store_fp16(out, d);
  store_fp16(out + 2, dmin);
  pack_scales_k4(ls, lm, out + 4);
  uint8_t* q = out + 16;
  for (int j = 0; j < kSuper; j += 64, q += 32)
    for (int l = 0; l < 32; ++l) q[l] = static_cast<uint8_t>(L[j + l] | (L[j + l + 32] << 4));
}

static inline void quantize_block_q5_k(const float* x, uint8_t* out) {
  float d, dmin;
  int32_t ls[8], lm[8];
  uint8_t L[kSuper];
  affine_k(x, 31, -0.5f, 0.1f, 15, &d, &dmin, ls, lm, L);
  store_fp16(out, d);
  store_fp16(out + 2, dmin);
  pack_scales_k4(ls, lm, out + 4);
  uint8_t* qh = out + 16;
  uint8_t* ql = out + 48;
  std::memset(qh, 0, 32);
  for (int s = 0; s < 8; ++s)
    for (int l = 0; l < 32; ++l) qh[l] = static_cast<uint8_t>(qh[l] | (((L[32 * s + l] >> 4) & 1) << s));
  for (int j = 0; j < kSuper; j += 64, ql += 32)
    for (int l = 0; l < 32; ++l) ql[l] = static_cast<uint8_t>((L[j + l] & 0xF) | ((L[j + l + 32] & 0xF) << 4));
}

// ---------------------------------------------------------------------------------- Q6_K

// make_qx_quants (rmse_type 1: weights x^2) for one group of 16, nmax 32: returns the scale and
// L in 0..63.
static inline float make_qx16(const float* x, uint8_t* L) {
  constexpr int n = 16, nmax = 32;
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < 1e-15f) {  // GROUP_MAX_EPS
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = clampi(nearest(iscale * x[i]), -nmax, nmax - 1);
    L[i] = static_cast<uint8_t>(l + nmax);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  float scale = suml2 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int is = -9; is <= 9; ++is) {
    if (is == 0) continue;
    iscale = -(nmax + 0.1f * is) / max;
    sumlx = suml2 = 0;
    for (int i = 0; i < n; ++i) {
      const int l = clampi(nearest(iscale * x[i]), -nmax, nmax - 1);
      const float w = x[i] * x[i];
      sumlx += w * x[i] * l;
      suml2 += w * l * l;
    }
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nmax + clampi(nearest(iscale * x[i]), -nmax, nmax - 1));
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

static inline double requantize_q6(const float* x, float d, const int32_t* sc, const uint8_t* L0, uint8_t* L) {
  double err = 0;
  for (int j = 0; j < 16; ++j) {
    const float ds = d * sc[j];
    for (int i = 16 * j; i < 16 * j + 16; ++i) {
      L[i] = ds != 0.f ? static_cast<uint8_t>(clampi(nearest(x[i] / ds), -32, 31) + 32) : L0[i];
      const double e = static_cast<double>(ds) * (L[i] - 32) - static_cast<double>(x[i]);
      err += e * e;
    }
  }
  return err;
}

static inline void quantize_block_q6_k(const float* x, uint8_t* out) {
  float scales[16];
  uint8_t L0[kSuper], L[kSuper];
  for (int ib = 0; ib < 16; ++ib) scales[ib] = make_qx16(x + 16 * ib, L0 + 16 * ib);
  float max_scale = scales[0], amax = std::fabs(scales[0]);  // the first of the largest |scale|
  for (int ib = 1; ib < 16; ++ib) {
    if (std::isnan(amax)) break;  // numpy's argmax stops at the first NaN
    if (std::fabs(scales[ib]) > amax || std::isnan(scales[ib])) {
      amax = std::fabs(scales[ib]);
      max_scale = scales[ib];
    }
  }
  std::memset(out, 0, KTraits<KFormat::Q6_K>::kBytes);
  if (std::fabs(max_scale) < 1e-15f) return;  // an all-zero block: d = 0, every byte 0
  const float iscale = -128.f / max_scale;
  float d = fp16_round(1.f / iscale);
  int32_t sc[16];
  for (int ib = 0; ib < 16; ++ib) sc[ib] = clampi(nearest(iscale * scales[ib]), -128, 127);
  const double err = requantize_q6(x, d, sc, L0, L);

  // the refit: least squares for d with the integers and int8 scales fixed; kept where better
  double saa = 0, sax = 0;
  for (int i = 0; i < kSuper; ++i) {
    const double a = static_cast<double>(sc[i / 16]) * (L[i] - 32);
    saa += a * a;
    sax += a * static_cast<double>(x[i]);
  }
  double d2 = saa > 0 ? sax / saa : d;
  d2 = d2 < -65504 ? -65504 : d2 > 65504 ? 65504 : d2;
  const float d2f = fp16_round(static_cast<float>(d2));
  uint8_t L2[kSuper];
  const double err2 = requantize_q6(x, d2f, sc, L0, L2);
  if (err2 < err) {
    d = d2f;
    std::memcpy(L, L2, kSuper);
  }

  uint8_t* ql = out;
  uint8_t* qh = out + 128;
  for (int h = 0; h < 2; ++h) {
    const uint8_t* Lh = L + 128 * h;
    for (int l = 0; l < 32; ++l) {
      ql[64 * h + l] = static_cast<uint8_t>((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4));
      ql[64 * h + l + 32] = static_cast<uint8_t>((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4));
      qh[32 * h + l] = static_cast<uint8_t>((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) | ((Lh[l + 64] >> 4) << 4) |
                                            ((Lh[l + 96] >> 4) << 6));
    }
  }
  for (int ib = 0; ib < 16; ++ib) out[192 + ib] = static_cast<uint8_t>(static_cast<int8_t>(sc[ib]));
  store_fp16(out + 208, d);
}

}  // namespace qz
}  // namespace quant
}  // namespace lfmk
