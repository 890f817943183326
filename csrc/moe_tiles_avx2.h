// MoE register tiles for plain weight formats (fp32 / bf16 / fp16): the portable C++ tile and the
// AVX2+FMA+F16C tiles, plus the SwiGLU row helper the bf16 paths share. Both the router
// (moe_route.cpp) and the experts (moe_experts.cpp) run their dot products on these tiles.
//
// A tile computes out[m * R + r] = dot(w[r][0:K], x[m][0:K]) in fp32 for R <= kR weight rows and M <= kM
// tokens, weights converted to fp32 in registers, each converted weight vector used for all M tokens.
// With one token (decode) it is a GEMV streaming R rows sequentially with two accumulator sets.
// A weight format brings its own tiles and its pick_tile<W>() choice; the passes that call them do
// not change.
//
// Everything here sits in an anonymous namespace: each translation unit that includes the header
// gets its own copy, so no AVX2-compiled function is merged with a baseline one by the linker.
#pragma once

#include <cstdint>

#include "common.h"
#include "moe_plan.h"

namespace lfmk {
namespace {

constexpr int kR = 4;  // weight rows per tile
constexpr int kM = 3;  // tokens per tile: 12 ymm accumulators + 3 inputs + 1 weight

// out[m * R + r] = dot(w[r][0:K], x[m][0:K]) in fp32, R <= kR, M <= kM.
template <typename W>
using TileFn = void (*)(const W* const* w, int R, const float* const* x, int M, int64_t K, float* out);

template <typename W>
void tile_portable(const W* const* w, int R, const float* const* x, int M, int64_t K, float* out) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += to_f32(w[r][k]) * x[m][k];
      out[m * R + r] = acc;
    }
}

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
namespace lfmk {
namespace {

// One token: a GEMV over R rows. Two accumulator sets hide the FMA latency so the loop is limited
// by how fast the rows stream in, not by the dependency chain.
template <typename W, int R>
void gemv_avx2(const W* const* w, const float* x, int64_t K, float* out) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(avx2::load8(w[r] + k), x0, a0[r]);
      a1[r] = _mm256_fmadd_ps(avx2::load8(w[r] + k + 8), x1, a1[r]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(avx2::load8(w[r] + k), x0, a0[r]);
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    const __m256 x0 = avx2::load_partial(x + k, n);
    for (int r = 0; r < R; ++r) a1[r] = _mm256_fmadd_ps(avx2::load_partial(w[r] + k, n), x0, a1[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = avx2::hsum(_mm256_add_ps(a0[r], a1[r]));
}

// One weight row against M tokens, U independent accumulator sets along K: the path for rows
// streamed from memory. Reading one row at a time keeps the access a single sequential stream
// (prefetched stream_ahead() bytes ahead, common.h); several rows in parallel (4 KB apart) measured at
// about half the bandwidth on a Zen 4.
template <typename W, int M, int U>
void row_avx2(const W* w, const float* const* x, int64_t K, float* out) {
  __m256 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    prefetch_stream(w + k, 8 * U * int(sizeof(W)));
    for (int u = 0; u < U; ++u) {
      const __m256 wv = avx2::load8(w + k + 8 * u);
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[m] + k + 8 * u), acc[u][m]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = avx2::load8(w + k);
    for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[m] + k), acc[0][m]);
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    const __m256 wv = avx2::load_partial(w + k, n);
    for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(wv, avx2::load_partial(x[m] + k, n), acc[0][m]);
  }
  for (int m = 0; m < M; ++m) {
    __m256 t = acc[0][m];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[u][m]);
    out[m] = avx2::hsum(t);
  }
}

template <typename W, int R, int M>
void tile_avx2_t(const W* const* w, const float* const* x, int64_t K, float* out) {
  if (M == 1) return gemv_avx2<W, R>(w, x[0], K, out);
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x[m] + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = avx2::load8(w[r] + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = avx2::load_partial(x[m] + k, n);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = avx2::load_partial(w[r] + k, n);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = avx2::hsum(acc[m][r]);
}

template <typename W, int R>
void tile_avx2_r(const W* const* w, const float* const* x, int M, int64_t K, float* out) {
  if (R == 1) {
    switch (M) {
      case 1: return row_avx2<W, 1, 4>(w[0], x, K, out);
      case 2: return row_avx2<W, 2, 2>(w[0], x, K, out);
      default: return row_avx2<W, 3, 2>(w[0], x, K, out);
    }
  }
  switch (M) {
    case 1: return tile_avx2_t<W, R, 1>(w, x, K, out);
    case 2: return tile_avx2_t<W, R, 2>(w, x, K, out);
    default: return tile_avx2_t<W, R, 3>(w, x, K, out);
  }
}

// a[j] = bf16(silu(g[j]) * u[j]) over one token's row: gate and up in bf16 (the oneDNN path's GEMM
// output) or fp32 (the AVX512-BF16 tile's)
template <typename T>
void swiglu_row_avx2(const T* g, const T* u, c10::BFloat16* a, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    avx2::store8(a + j, _mm256_mul_ps(avx2::silu8(avx2::load8(g + j)), avx2::load8(u + j)));
  if (j < n) {
    const int r = static_cast<int>(n - j);
    avx2::store_partial(a + j, _mm256_mul_ps(avx2::silu8(avx2::load_partial(g + j, r)), avx2::load_partial(u + j, r)), r);
  }
}

template <typename W>
void tile_avx2(const W* const* w, int R, const float* const* x, int M, int64_t K, float* out) {
  static_assert(kM == 3 && kR == 4, "tile_avx2 instantiates R <= 4, M <= 3");
  switch (R) {
    case 1: return tile_avx2_r<W, 1>(w, x, M, K, out);
    case 2: return tile_avx2_r<W, 2>(w, x, M, K, out);
    case 3: return tile_avx2_r<W, 3>(w, x, M, K, out);
    default: return tile_avx2_r<W, 4>(w, x, M, K, out);
  }
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

namespace lfmk {
namespace {

// a[j] = bf16(silu(g[j]) * u[j]) for bf16 gate and up rows (the oneDNN GEMMs' output), on AVX2 where
// the CPU has it.
inline void swiglu_row_bf16(const c10::BFloat16* g, const c10::BFloat16* u, c10::BFloat16* a, int64_t n) {
  if (cpu_has_avx2()) {
    swiglu_row_avx2(g, u, a, n);
  } else {
    for (int64_t j = 0; j < n; ++j) a[j] = c10::BFloat16(moe::silu(static_cast<float>(g[j])) * static_cast<float>(u[j]));
  }
}

template <typename W>
TileFn<W> pick_tile() {
  return cpu_has_avx2() ? &tile_avx2<W> : &tile_portable<W>;
}

}  // namespace
}  // namespace lfmk
