// Portable C++ path of the quantized kernels (see quant.h for the interface): any CPU, and the
// path the tests force to check the SIMD ones against.
#pragma once

#include "quant/quant.h"

namespace lfmk {
namespace quant {
namespace portable {

// One activation row -> int8 q[K] and fp32 d[K / 32]. A block holding NaN or inf gets d = NaN and
// q = 0, so whatever it feeds comes out NaN (and no NaN reaches a float -> int conversion).
template <typename T>
static inline void quantize_act_row(const T* x, int64_t K, int8_t* q, float* d) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    float v[kBlock];
    float amax = 0.f;
    bool finite = true;
    for (int j = 0; j < kBlock; ++j) {
      v[j] = static_cast<float>(x[b * kBlock + j]);
      finite = finite && std::isfinite(v[j]);
      amax = std::max(amax, std::fabs(v[j]));
    }
    if (!finite) {
      d[b] = NAN;
      std::memset(q + b * kBlock, 0, kBlock);
      continue;
    }
    const float db = amax / 127.f;
    const float inv = db != 0.f ? 1.f / db : 0.f;
    d[b] = db;
    // |v * inv| <= 127 (+ rounding), so the conversion is in range; nearbyint rounds half to even
    // in the default rounding mode, as the SIMD paths' cvtps2dq does
    for (int j = 0; j < kBlock; ++j) q[b * kBlock + j] = static_cast<int8_t>(static_cast<int>(std::nearbyint(v[j] * inv)));
  }
}

// Block b of a weight row as 32 signed integers.
template <Format F>
static inline void load_wq(const uint8_t* blk, int32_t* wq) {
  if (F == Format::Q8_0) {
    for (int j = 0; j < kBlock; ++j) wq[j] = static_cast<int8_t>(blk[2 + j]);
  } else {
    for (int j = 0; j < kBlock / 2; ++j) {
      wq[j] = (blk[2 + j] & 0x0F) - 8;
      wq[j + 16] = (blk[2 + j] >> 4) - 8;
    }
  }
}

template <Format F, int R, int M>
static inline void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                        int64_t nb, float* res) {
  constexpr int kB = Traits<F>::kBytes;
  float acc[R][M] = {};
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * w_ld + b * kB;
      int32_t wq[kBlock];
      load_wq<F>(blk, wq);
      const float dw = block_scale(blk);
      for (int m = 0; m < M; ++m) {
        const int8_t* x = xq + m * ldq + b * kBlock;
        int32_t s = 0;
        for (int j = 0; j < kBlock; ++j) s += wq[j] * x[j];
        acc[r][m] += static_cast<float>(s) * (dw * xd[m * ldd + b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) res[r * M + m] = acc[r][m];
}

}  // namespace portable
}  // namespace quant
}  // namespace lfmk
