// MoE tiles on AVX-512 with the BF16 dot-product instruction (vdpbf16ps), bf16 weights and bf16
// inputs: the dot-product tile (tile_bf16dp, along K, rows read as stored) and the outer-product tile
// (tile_bf16op, tokens in the vector lanes). Compiled for that ISA function by function and called only
// when cpu_has_avx512bf16(). Anonymous namespace, as in moe_tiles_avx2.h.
#pragma once

#include <cstdint>
#include <cstring>

#include "common.h"

LFMK_AVX512BF16_BEGIN
#include "simd_avx512.h"
#include "row_dot_avx512bf16.h"
namespace lfmk {
namespace {

constexpr int kMb = 6;  // tokens per AVX512-BF16 tile: 24 zmm accumulators + 4 weight rows + 1 input
constexpr int kOpRows = 8;  // weight rows per outer-product tile: 4 units (gate + up) in phase 1

// The four lane sums of a, b, c, d into out[0..3] with one store instead of four: the in-lane
// transposes (mask forms with a defined pass-through operand: see the GCC 12 note in simd_avx512.h) leave
// per 128-bit block the partial sums [a, b, c, d], and four blocks are added.
inline void hsum16x4(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __mmask16 all = 0xFFFF;
  const __m512 ab = _mm512_add_ps(_mm512_mask_unpacklo_ps(a, all, a, b), _mm512_mask_unpackhi_ps(a, all, a, b));
  const __m512 cd = _mm512_add_ps(_mm512_mask_unpacklo_ps(c, all, c, d), _mm512_mask_unpackhi_ps(c, all, c, d));
  const __m512 s = _mm512_add_ps(_mm512_mask_shuffle_ps(ab, all, ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_mask_shuffle_ps(ab, all, ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  _mm_storeu_ps(out, _mm_add_ps(_mm_add_ps(_mm_load_ps(lanes), _mm_load_ps(lanes + 4)),
                                _mm_add_ps(_mm_load_ps(lanes + 8), _mm_load_ps(lanes + 12))));
}

// out[m * R + r] = w[r] . x[m] over K bf16 values with vdpbf16ps (pairs of products summed into fp32
// lanes), R <= 4 rows, M <= kMb tokens. Rows are read as they are stored: no packing pass.
template <int R, int M>
void tile_bf16dp_t(const c10::BFloat16* const* w, const c10::BFloat16* const* x, int64_t K, float* out) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w[r] + k);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[m] + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, (__m512bh)wv[r]);
    }
  }
  if (k < K) {  // masked loads read nothing past K and give zeros there
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w[r] + k);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x[m] + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, (__m512bh)wv[r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    if constexpr (R == 4) {
      hsum16x4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out + m * 4);
    } else {
      for (int r = 0; r < R; ++r) out[m * R + r] = avx512::hsum(acc[m][r]);
    }
  }
}

template <int R>
void tile_bf16dp_r(const c10::BFloat16* const* w, const c10::BFloat16* const* x, int M, int64_t K, float* out) {
  static_assert(kMb == 6, "tile_bf16dp_r instantiates M <= 6");
  switch (M) {
    case 1: return tile_bf16dp_t<R, 1>(w, x, K, out);
    case 2: return tile_bf16dp_t<R, 2>(w, x, K, out);
    case 3: return tile_bf16dp_t<R, 3>(w, x, K, out);
    case 4: return tile_bf16dp_t<R, 4>(w, x, K, out);
    case 5: return tile_bf16dp_t<R, 5>(w, x, K, out);
    default: return tile_bf16dp_t<R, 6>(w, x, K, out);
  }
}

void tile_bf16dp(const c10::BFloat16* const* w, int R, const c10::BFloat16* const* x, int M, int64_t K, float* out) {
  switch (R) {
    case 1: return tile_bf16dp_r<1>(w, x, M, K, out);
    case 2: return tile_bf16dp_r<2>(w, x, M, K, out);
    case 3: return tile_bf16dp_r<3>(w, x, M, K, out);
    default: return tile_bf16dp_r<4>(w, x, M, K, out);
  }
}

// The outer-product form, tokens in the vector lanes: acc[r][b] (the tokens of block b) += the packed
// token pairs P_b[kp] (a dword per token: two consecutive bf16 inputs) times weight row r's pair kp
// broadcast to every lane. Each weight pair is loaded once per block straight from the row as stored
// (no packing pass over the weights; broadcasts don't mind their 4 KB row stride) and there is no
// horizontal sum. NZ blocks of 16 tokens (zmm) and NY of 8 (ymm: an expert's last block when at
// most 8 tokens are left; vdpbf16ps on ymm does ~86% of the zmm multiply-adds per cycle here, far
// more than 8 idle zmm lanes would leave). R rows x blocks x KS independent k-phases of accumulators
// (16 at R = 8) cover the instruction's latency. When wnext is given, the next tile's rows are
// prefetched into L2 one line per row per 16 pairs, so memory streams while this tile computes.
// out[(r * (NZ + NY) + b) * 16 + t]; lanes 8..15 of a ymm block are written as zeros.
template <int R, int NZ, int NY, int KS>
void tile_bf16op_t(const uint32_t* P, int64_t pstride, const c10::BFloat16* const* w,
                   const c10::BFloat16* const* wnext, int64_t Kp, float* out) {
  constexpr int NZa = NZ > 0 ? NZ : 1, NYa = NY > 0 ? NY : 1;  // no zero-length arrays
  __m512 accz[KS][R][NZa];
  __m256 accy[KS][R][NYa];
  for (int s = 0; s < KS; ++s)
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < NZ; ++b) accz[s][r][b] = _mm512_setzero_ps();
      for (int b = 0; b < NY; ++b) accy[s][r][b] = _mm256_setzero_ps();
    }
  const char* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const char*>(w[r]);
  const auto step = [&](int s, int64_t kp) {
    __m512bh pz[NZa];
    __m256bh py[NYa];
    for (int b = 0; b < NZ; ++b) pz[b] = (__m512bh)_mm512_loadu_si512(P + b * pstride + kp * 16);
    for (int b = 0; b < NY; ++b) py[b] = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + (NZ + b) * pstride + kp * 16));
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, wr[r] + kp * 4, sizeof(pair));
      // one broadcast from memory; the ymm operand is its low half (a GPR broadcast per width
      // measured 1.7x slower)
      const __m512i wb = _mm512_set1_epi32(pair);
      for (int b = 0; b < NZ; ++b) accz[s][r][b] = _mm512_dpbf16_ps(accz[s][r][b], pz[b], (__m512bh)wb);
      if constexpr (NY > 0) {
        __m256i wy;  // the low half; _mm512_castsi512_si256 trips GCC 12's -Wuninitialized (see simd_avx512.h)
        std::memcpy(&wy, &wb, sizeof(wy));
        for (int b = 0; b < NY; ++b) accy[s][r][b] = _mm256_dpbf16_ps(accy[s][r][b], py[b], (__m256bh)wy);
      }
    }
  };
  const int64_t Kfull = Kp - Kp % KS;
  for (int64_t kp = 0; kp < Kfull; kp += KS) {
    if (wnext != nullptr && (kp & 15) == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(reinterpret_cast<const char*>(wnext[r]) + kp * 4, 0, 2);
    for (int s = 0; s < KS; ++s) step(s, kp + s);
  }
  for (int64_t kp = Kfull; kp < Kp; ++kp) step(0, kp);
  for (int s = 1; s < KS; ++s)
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < NZ; ++b) accz[0][r][b] = _mm512_add_ps(accz[0][r][b], accz[s][r][b]);
      for (int b = 0; b < NY; ++b) accy[0][r][b] = _mm256_add_ps(accy[0][r][b], accy[s][r][b]);
    }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NZ; ++b) _mm512_storeu_ps(out + (r * (NZ + NY) + b) * 16, accz[0][r][b]);
    for (int b = 0; b < NY; ++b) {
      float* o = out + (r * (NZ + NY) + NZ + b) * 16;
      _mm256_storeu_ps(o, accy[0][r][b]);
      _mm256_storeu_ps(o + 8, _mm256_setzero_ps());
    }
  }
}

template <int R>
void tile_bf16op_r(const uint32_t* P, int64_t pstride, int nz, int ny, const c10::BFloat16* const* w,
                   const c10::BFloat16* const* wnext, int64_t Kp, float* out) {
  // one block: two k-phases so 2R accumulators are in flight; two blocks: R x 2 already are
  if (nz == 2) return tile_bf16op_t<R, 2, 0, 1>(P, pstride, w, wnext, Kp, out);
  if (nz == 1 && ny == 1) return tile_bf16op_t<R, 1, 1, 1>(P, pstride, w, wnext, Kp, out);
  if (nz == 1) return tile_bf16op_t<R, 1, 0, 2>(P, pstride, w, wnext, Kp, out);
  return tile_bf16op_t<R, 0, 1, 2>(P, pstride, w, wnext, Kp, out);
}

// R even, 2 <= R <= kOpRows; (nz, ny) blocks of 16 and 8 tokens: (2, 0), (1, 1), (1, 0) or (0, 1)
void tile_bf16op(const uint32_t* P, int64_t pstride, int nz, int ny, const c10::BFloat16* const* w, int R,
                 const c10::BFloat16* const* wnext, int64_t Kp, float* out) {
  switch (R) {
    case 2: return tile_bf16op_r<2>(P, pstride, nz, ny, w, wnext, Kp, out);
    case 4: return tile_bf16op_r<4>(P, pstride, nz, ny, w, wnext, Kp, out);
    case 6: return tile_bf16op_r<6>(P, pstride, nz, ny, w, wnext, Kp, out);
    default: return tile_bf16op_r<8>(P, pstride, nz, ny, w, wnext, Kp, out);
  }
}

}  // namespace
}  // namespace lfmk
LFMK_AVX512BF16_END
