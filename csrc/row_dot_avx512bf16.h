// One weight row streamed against M <= 2 bf16 inputs with vdpbf16ps (AVX512-BF16): the decode GEMV of
// `linear` (bf16 x, bf16 weights) and of the MoE experts' dot-product path. U independent
// accumulators per input cover the instruction's latency; the row is read as one sequential stream,
// prefetched stream_ahead() bytes ahead (common.h).
// Products of two bf16 values are exact in fp32, so this is the fp32 dot product in another order.
// Include between LFMK_AVX512BF16_BEGIN / _END; anonymous namespace, as the tiles headers.
#pragma once

#include "common.h"
#include "simd_avx512.h"

namespace lfmk {
namespace {

template <int M, int U>
inline void row_dot_bf16(const c10::BFloat16* w, int64_t K, const c10::BFloat16* const* x, float* res) {
  __m512 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
  const int64_t kvu = K - K % (32 * U);
  for (int64_t k = 0; k < kvu; k += 32 * U) {
    prefetch_stream(w + k, 64 * U);
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int m = 0; m < M; ++m)
        acc[u][m] = _mm512_dpbf16_ps(acc[u][m], (__m512bh)_mm512_loadu_si512(x[m] + k + 32 * u), wv);
    }
  }
  for (int64_t k = kvu; k < K; k += 32) {  // masked loads read nothing past K and give zeros there
    const __mmask32 mk = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mk, w + k);
    for (int m = 0; m < M; ++m)
      acc[0][m] = _mm512_dpbf16_ps(acc[0][m], (__m512bh)_mm512_maskz_loadu_epi16(mk, x[m] + k), wv);
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[0][m];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][m]);
    res[m] = avx512::hsum(sum);
  }
}

// row_dot_bf16 for a run-time M in {1, 2}.
inline void row_dot_bf16_m(const c10::BFloat16* w, int64_t K, const c10::BFloat16* const* x, int M, float* res) {
  if (M == 1)
    row_dot_bf16<1, 4>(w, K, x, res);
  else
    row_dot_bf16<2, 4>(w, K, x, res);
}

}  // namespace
}  // namespace lfmk
