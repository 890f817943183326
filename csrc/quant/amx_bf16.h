// Quantized weights in the x8 layout (Q8_0 / Q4_0: quant/x8.h; K-quants: quant/kquant_x8.h) multiplied
// on AMX-BF16 tiles: the many-row route of quant_dequant_gemm.cpp (MoE experts and `linear`) on CPUs
// with AMX.
// Include only between LFMK_AMX_BF16_BEGIN and LFMK_AMX_BF16_END, after common.h and simd_avx2.h
// (the AVX2 K-quant helpers it reuses need them); run only where cpu_has_amx() and
// cpu_has_avx512bf16().
//
// The route's other implementation dequantizes a panel of rows to bf16 in row order and hands it to
// oneDNN, which reorders it again into its own tile layout on every call: on a 2-core Xeon the two
// passes over the dequantized weights cost twice the GEMM itself. Here the weights are dequantized
// once, straight from x8 into the B operand of TDPBF16PS, and the tokens are the A operand as they
// lie (bf16 rows), so nothing else is reordered:
//   B tile (16 pair-rows x 64 bytes): row P holds, for the 16 weight rows n of two x8 groups, the bf16
//   pair (w[n][2P], w[n][2P + 1]) of a 32-wide k step. An x8 vector holds 4 consecutive k of 8 rows
//   (row r in dword r), so one vector of each group, dequantized, is two B rows: one dword permute
//   (vpermt2d) per row sorts the 16 rows' pairs.
//   A tile: 16 token rows x 32 bf16 of the same k step; C: 16 tokens x 16 weight rows, fp32.
// Values: every weight is gguf's exact dequantized value (quant/dequant.h: w = s * q - m in one fused
// step), rounded to bf16 (nearest even); the tiles sum bf16 products in fp32 over all of K (AMX-BF16
// treats denormal inputs and results as zero). So the results are a bf16 model's on the dequantized
// weights, with fp32 gate / up (the oneDNN implementation rounds those to bf16 first).
#pragma once

#include <cstdint>
#include <cstring>

#include "quant/amx_config.h"
#include "quant/dequant.h"
#include "quant/kquant.h"
#include "quant/kquant_avx2.h"
#include "quant/kquant_x8_avx2.h"

namespace lfmk {
namespace quant {
namespace amxbf16 {

constexpr int kRows = 16;          // tokens per A tile, weight rows per B tile
constexpr int kStepK = 32;         // k per tile multiply (16 bf16 pairs)
constexpr int kStepBytes = 1024;   // one B tile: 16 pair-rows x 64 bytes (kStepK k of 16 weight rows)

// Tiles 0-2: A, B0, B1 of even k steps, 3-5: of odd ones; 6, 7: C0, C1. All 16 rows x 64 bytes.
static inline void configure() {
  AmxTileConfig c;
  for (int t = 0; t < 8; ++t) {
    c.rows[t] = kRows;
    c.colsb[t] = 64;
  }
  // ldtilecfg reads the configuration from memory, which the compiler does not model (quant/amx.h)
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// One x8 group-block's s and m (quant/dequant.h) per weight row, transposed: s[g * 16 + row0 + r] for
// the block's groups of 16 weights g (Q4_K / Q5_K: one (s, m) per sub-block of 32, stored for both
// its groups; Q6_K: m = 32 s, so that s * q - m = s * (q - 32) for the unsigned six bits q, rounded
// once as gguf's product). The 8 rows' fields are vectors of the x8 layout (row r in dword r), so
// each (s, m) of the 8 rows is a few 8-lane operations (Q4_K / Q5_K: the AVX2 x8 tile's scale decode).
template <WFormat F>
static inline void group_scales(const uint8_t* blk, int row0, float* s, float* m) {
  const auto ld = [blk](int off) { return kavx2::ld(blk + off); };
  const auto half8 = [blk](int off) { return kavx2::half8(blk + off); };
  if constexpr (F == WFormat::Q8_0 || F == WFormat::Q4_0) {
    // one 32-block: s = d for both groups of 16; Q4_0's unsigned nibbles q: s * q - 8 s = d * (q - 8)
    const __m256 d = half8(0);
    const __m256 off = _mm256_mul_ps(_mm256_set1_ps(F == WFormat::Q4_0 ? 8.0f : 0.0f), d);
    for (int g = 0; g < 2; ++g) {
      _mm256_storeu_ps(s + g * kRows + row0, d);
      _mm256_storeu_ps(m + g * kRows + row0, off);
    }
  } else if constexpr (F == WFormat::Q6_K) {
    const __m256 d = half8(1664);
    for (int p = 0; p < 4; ++p) {
      const __m256i v = ld(1536 + 32 * p);  // int8 scales 4p .. 4p + 3
      for (int i = 0; i < 4; ++i) {
        const int g = 4 * p + i;
        const __m256 sg = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * i), 24)));
        _mm256_storeu_ps(s + g * kRows + row0, sg);
        _mm256_storeu_ps(m + g * kRows + row0, _mm256_mul_ps(_mm256_set1_ps(32.0f), sg));
      }
    }
  } else {
    const __m256i byte = _mm256_set1_epi32(0xFF);
    const kavx2::KX8Scales45 v = kavx2::kx8_scales45(blk);
    const __m256i sc[2] = {v.sc_lo, v.sc_hi}, mn[2] = {v.mn_lo, v.mn_hi};
    const __m256 d = half8(0), dmin = half8(16);
    for (int j = 0; j < 8; ++j) {
      const __m256 sj = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(sc[j / 4], 8 * (j % 4)), byte)));
      const __m256 mj = _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(mn[j / 4], 8 * (j % 4)), byte)));
      _mm256_storeu_ps(s + 2 * j * kRows + row0, sj);
      _mm256_storeu_ps(s + (2 * j + 1) * kRows + row0, sj);
      _mm256_storeu_ps(m + 2 * j * kRows + row0, mj);
      _mm256_storeu_ps(m + (2 * j + 1) * kRows + row0, mj);
    }
  }
}

// Unsigned codes of x8 vector t (0..7) of k step st of a group-block: 8 rows x 4 k, row r in dword r.
template <WFormat F>
static inline __m256i step_codes(const uint8_t* blk, int st, int t) {
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const auto ld = [blk](int off) { return kavx2::ld(blk + off); };
  if constexpr (F == WFormat::Q8_0) {
    return ld(16 + 32 * t);  // int8 elements 4t + i (quant/x8.h)
  } else if constexpr (F == WFormat::Q4_0) {
    // vector t % 4: low nibbles are elements 4t + i, high nibbles elements 16 + 4 (t - 4) + i
    const __m256i v = ld(16 + 32 * (t % 4));
    return t < 4 ? _mm256_and_si256(v, m4) : _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
  } else if constexpr (F == WFormat::Q6_K) {
    // step st = 4h + k: elements 128h + 32k + 4t + i, the AVX2 x8 tile's q[k] (the other three,
    // unused, are dropped by the compiler)
    __m256i q[4];
    kavx2::kx8_q6(blk, st / 4, t, q);
    return q[st % 4];
  } else {
    // step st = sub-block j: qs vector 8 (j / 2) + t, low nibbles for even j, high for odd
    constexpr int kQs = F == WFormat::Q4_K ? 128 : 384;
    const __m256i v = ld(kQs + 32 * (8 * (st / 2) + t));
    __m256i q = st % 2 ? _mm256_and_si256(_mm256_srli_epi16(v, 4), m4) : _mm256_and_si256(v, m4);
    if constexpr (F == WFormat::Q5_K) {
      // the fifth bit: bit j of qh byte 4t + i (qh vector t) -> bit 4
      const __m256i qh = ld(128 + 32 * t);
      const __m256i b = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(st)), _mm256_set1_epi8(1));
      q = _mm256_or_si256(q, _mm256_slli_epi16(b, 4));
    }
    return q;
  }
}

// 32 codes (one x8 vector, 8 rows x 4 k; int8 where kSigned, else unsigned) -> s * q - m as 32 bf16,
// dword 2r + p = row r's pair p. s_lo / m_lo, s_hi / m_hi: the scales and offsets of rows 0-3 and 4-7,
// each lane its own row's.
template <bool kSigned>
static inline __m512i widen_codes(__m128i v) {
  if constexpr (kSigned) return _mm512_cvtepi8_epi32(v);
  else return _mm512_cvtepu8_epi32(v);
}
template <bool kSigned>
static inline __m512i dequant_vector(__m256i q, __m512 s_lo, __m512 m_lo, __m512 s_hi, __m512 m_hi) {
  const __m512 lo = _mm512_fmsub_ps(_mm512_cvtepi32_ps(widen_codes<kSigned>(_mm256_castsi256_si128(q))), s_lo, m_lo);
  const __m512 hi = _mm512_fmsub_ps(_mm512_cvtepi32_ps(widen_codes<kSigned>(_mm256_extracti128_si256(q, 1))), s_hi, m_hi);
  return reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
}

// 16 weight rows (x8 groups ga, gb: their first block; group-blocks 8 blocks' bytes apart) over nb
// blocks -> B tiles at dst, k step after k step (nb * weights_per_block(F) / kStepK * kStepBytes
// bytes, 64-aligned).
template <WFormat F>
static inline void dequant_b(const uint8_t* ga, const uint8_t* gb, int64_t nb, uint8_t* dst) {
  constexpr int64_t kGB = 8 * wblock_bytes(F);
  constexpr int kSteps = weights_per_block(F) / kStepK;
  constexpr bool kSigned = F == WFormat::Q8_0;
  constexpr int kGroups = 16;  // groups of 16 weights per block, at most (a K-quant super-block)
  alignas(64) float s[kGroups * kRows], m[kGroups * kRows];
  // lane l of a 4-row piece belongs to row 4 * piece + l / 4
  __m512i pick[4];
  for (int p = 0; p < 4; ++p) {
    alignas(64) int32_t idx[16];
    for (int l = 0; l < 16; ++l) idx[l] = 4 * p + l / 4;
    pick[p] = _mm512_load_si512(idx);
  }
  // B row 2t + p: pair p of rows 0..7 (group a, dwords 2r + p) then of rows 0..7 (group b)
  alignas(64) int32_t e0[16], e1[16];
  for (int n = 0; n < 16; ++n) {
    e0[n] = n < 8 ? 2 * n : 16 + 2 * (n - 8);
    e1[n] = e0[n] + 1;
  }
  const __m512i even = _mm512_load_si512(e0), odd = _mm512_load_si512(e1);
  // the weights come from DRAM, a few KiB per group at a time: without a prefetch this far ahead the
  // dequantization waited on every load (measured 4 GB/s of weights on a 2-core Xeon)
  constexpr int64_t kAhead = kSteps == 1 ? 16 : 3;  // blocks: 4.6 / 2.2 KiB (Q8_0 / Q4_0), 3.4-5 KiB (K-quants)
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* ba = ga + b * kGB;
    const uint8_t* bb = gb + b * kGB;
    if (b + kAhead < nb)
      for (int64_t l = 0; l < kGB; l += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(ba + kAhead * kGB + l), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(bb + kAhead * kGB + l), _MM_HINT_T1);
      }
    group_scales<F>(ba, 0, s, m);
    group_scales<F>(bb, 8, s, m);
    #pragma GCC unroll 8
    for (int st = 0; st < kSteps; ++st) {
      uint8_t* out = dst + (b * kSteps + st) * kStepBytes;
      // Q6_K: the step's two groups of 16 (vectors t < 4: the first); Q4_K / Q5_K: one sub-block
      __m512 sv[2][4], mv[2][4];
      for (int h = 0; h < 2; ++h) {
        const int g = 2 * st + h;
        const __m512 s16 = _mm512_load_ps(s + g * kRows), m16 = _mm512_load_ps(m + g * kRows);
        for (int p = 0; p < 4; ++p) {
          sv[h][p] = _mm512_permutexvar_ps(pick[p], s16);
          mv[h][p] = _mm512_permutexvar_ps(pick[p], m16);
        }
      }
      #pragma GCC unroll 8
      for (int t = 0; t < 8; ++t) {
        const int h = t / 4;
        const __m512i a = dequant_vector<kSigned>(step_codes<F>(ba, st, t), sv[h][0], mv[h][0], sv[h][1], mv[h][1]);
        const __m512i c = dequant_vector<kSigned>(step_codes<F>(bb, st, t), sv[h][2], mv[h][2], sv[h][3], mv[h][3]);
        _mm512_store_si512(out + 64 * (2 * t), _mm512_permutex2var_epi32(a, even, c));
        _mm512_store_si512(out + 64 * (2 * t + 1), _mm512_permutex2var_epi32(a, odd, c));
      }
    }
  }
}

// c0 = A . B0, c1 = A . B1 over steps k steps: A = 16 bf16 rows lda elements apart (k step s at
// a + kStepK s), B0 / B1 = dequant_b's tiles. c0 / c1: 16 x 16 fp32, row m = token m. configure() first.
static inline void tiles2(const c10::BFloat16* a, int64_t lda, int64_t steps, const uint8_t* b0, const uint8_t* b1,
                          float* c0, float* c1) {
  const int64_t stride = lda * 2;
  _tile_zero(6);
  _tile_zero(7);
  int64_t s = 0;
  for (; s + 2 <= steps; s += 2) {
    _tile_loadd(0, a + kStepK * s, stride);
    _tile_loadd(1, b0 + s * kStepBytes, 64);
    _tile_loadd(2, b1 + s * kStepBytes, 64);
    _tile_dpbf16ps(6, 0, 1);
    _tile_dpbf16ps(7, 0, 2);
    _tile_loadd(3, a + kStepK * (s + 1), stride);
    _tile_loadd(4, b0 + (s + 1) * kStepBytes, 64);
    _tile_loadd(5, b1 + (s + 1) * kStepBytes, 64);
    _tile_dpbf16ps(6, 3, 4);
    _tile_dpbf16ps(7, 3, 5);
  }
  if (s < steps) {
    _tile_loadd(0, a + kStepK * s, stride);
    _tile_loadd(1, b0 + s * kStepBytes, 64);
    _tile_loadd(2, b1 + s * kStepBytes, 64);
    _tile_dpbf16ps(6, 0, 1);
    _tile_dpbf16ps(7, 0, 2);
  }
  _tile_stored(6, c0, 64);
  _tile_stored(7, c1, 64);
}

// The same for 32 rows of A (rows 16 .. 31 at a + 16 lda): c0 / c1 rows 0-15, c2 / c3 rows 16-31. Four
// multiplies per four tile loads instead of two per three: the loads, not the multiplies, bound
// tiles2 (a 16 x 16 x 32 multiply takes 16 cycles, three 1 KiB tile loads about as long). No double
// buffering (the 8 tiles are A0, A1, B0, B1 and four C), and each C element still sums the k steps in
// order, so the results are tiles2's bits.
static inline void tiles4(const c10::BFloat16* a, int64_t lda, int64_t steps, const uint8_t* b0, const uint8_t* b1,
                          float* c0, float* c1, float* c2, float* c3) {
  const int64_t stride = lda * 2;
  const c10::BFloat16* a1 = a + kRows * lda;
  _tile_zero(4);
  _tile_zero(5);
  _tile_zero(6);
  _tile_zero(7);
  for (int64_t s = 0; s < steps; ++s) {
    _tile_loadd(0, a + kStepK * s, stride);
    _tile_loadd(2, b0 + s * kStepBytes, 64);
    _tile_loadd(3, b1 + s * kStepBytes, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 0, 3);
    _tile_loadd(1, a1 + kStepK * s, stride);
    _tile_dpbf16ps(6, 1, 2);
    _tile_dpbf16ps(7, 1, 3);
  }
  _tile_stored(4, c0, 64);
  _tile_stored(5, c1, 64);
  _tile_stored(6, c2, 64);
  _tile_stored(7, c3, 64);
}

// One phase's tasks, each a strip of weight rows against its expert's tokens: per task,
// load(t, b0, b1) dequantizes the strip's two 16-row B operands into b0 / b1 and returns its tokens'
// A rows; every 32 tokens (tiles4, then 16 at a time: tiles2) the results go row by row to
// emit(strip, m, c0 row, c1 row).
struct Strip {
  const c10::BFloat16* a;  // the first token's bf16 row, lda elements between rows
  int64_t lda, tokens;
  int64_t q0, col;         // the first token's pair and the strip's first output column
};
template <class Load, class Emit>
void amx_strips(int64_t tasks, int64_t steps, const Load& load, const Emit& emit) {
  constexpr int kR = kRows;
  parallel_workers(tasks, [&](TaskQueue& queue) {
    AlignedBytes b0(steps * kStepBytes), b1(steps * kStepBytes);
    alignas(64) float c0[kR * kR], c1[kR * kR], c2[kR * kR], c3[kR * kR];
    configure();
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const Strip st = load(t, b0.p, b1.p);
      int64_t m0 = 0;
      for (; m0 + 2 * kR <= st.tokens; m0 += 2 * kR) {
        tiles4(st.a + m0 * st.lda, st.lda, steps, b0.p, b1.p, c0, c1, c2, c3);
        for (int64_t m = 0; m < kR; ++m) emit(st, m0 + m, c0 + m * kR, c1 + m * kR);
        for (int64_t m = 0; m < kR; ++m) emit(st, m0 + kR + m, c2 + m * kR, c3 + m * kR);
      }
      for (; m0 < st.tokens; m0 += kR) {
        tiles2(st.a + m0 * st.lda, st.lda, steps, b0.p, b1.p, c0, c1);
        const int64_t rows = std::min<int64_t>(kR, st.tokens - m0);
        for (int64_t m = 0; m < rows; ++m) emit(st, m0 + m, c0 + m * kR, c1 + m * kR);
      }
    }
    _tile_release();
  });
}

// out[m, n] = bf16(x_m . w_n) for M rows of x (then 16 rows of zeros for the tiles' last reads) and N
// weight rows (a multiple of 32), plus bias[n] where bias is not null: per strip t of 32 weight rows,
// pack(t, b0, b1) writes its two B operands, then the rows of x go against them (amx_strips). fp32 sums over
// all of K (and the bias), rounded to bf16 once (a bf16 GEMM's numerics).
template <class Pack>
void amx_linear(const c10::BFloat16* x, int64_t M, int64_t N, int64_t K, const float* bias, c10::BFloat16* out,
                const Pack& pack) {
  const auto load = [&](int64_t t, uint8_t* b0, uint8_t* b1) {
    pack(t, b0, b1);
    return Strip{x, K, M, 0, t * 2 * kRows};
  };
  const auto emit = [&](const Strip& st, int64_t m, const float* c0, const float* c1) {
    c10::BFloat16* o = out + m * N + st.col;
    __m512 v0 = _mm512_load_ps(c0), v1 = _mm512_load_ps(c1);
    if (bias) {
      v0 = _mm512_add_ps(v0, _mm512_loadu_ps(bias + st.col));
      v1 = _mm512_add_ps(v1, _mm512_loadu_ps(bias + st.col + kRows));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v0)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + kRows), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v1)));
  };
  amx_strips(N / (2 * kRows), K / kStepK, load, emit);
}

}  // namespace amxbf16
}  // namespace quant
}  // namespace lfmk
