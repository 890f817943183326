// The x8 tile (quant/x8.h) on AMX-INT8: many activation rows against Q8_0 / Q4_0 weights in the x8
// layout, for prefill. Include only between LFMK_AMX_BEGIN and LFMK_AMX_END, after common.h and
// quant/x8.h; run only where cpu_has_amx().
//
// One tile multiply covers one 32-block: A = 16 activation rows x 32 int8 (straight from the quantized
// activations), B = the block's 32 k x 16 weight rows in AMX's 4-byte k groups, which is what an x8
// vector already is (8 rows x 4 consecutive k): B row kk = vector kk of group 0 | vector kk of group 1
// (Q4_0: the nibbles unpacked to bytes 0..15 first, the low ones giving k 0..15, the high ones k
// 16..31). TDPBSSD (Q8_0: int8 x int8) or TDPBSUD (Q4_0: int8 activations x unsigned nibbles) gives
// the exact integer dot of every (activation row, weight row) pair, so the contract is the x8
// tile's, bit for bit: dot (Q4_0: minus 8 * sum(x), the -8 offset), then
// acc = fma(float(dot), d_w * d_x, acc) in block order, in fp32 vector lanes (one zmm per activation
// row, lane = weight row). Each block's 16 x 16 int32 result goes through memory into those fmas;
// two tile sets alternate so that block b + 1 multiplies while block b is scaled.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant/amx_config.h"

namespace lfmk {
namespace quant {
namespace amx {

constexpr int kRows = 16;  // activation rows per tile call (M <= kRows)

// Tiles 0-2: A, B, C of even blocks; 3-5: of odd blocks.
static inline void configure(int M, int G) {
  AmxTileConfig c;
  for (int t : {0, 3}) {
    c.rows[t] = static_cast<uint8_t>(M);
    c.colsb[t] = 32;                          // A: M rows x 32 int8
    c.rows[t + 1] = 8;
    c.colsb[t + 1] = static_cast<uint16_t>(32 * G);  // B: 8 k-groups x 8G rows x 4 bytes
    c.rows[t + 2] = static_cast<uint8_t>(M);
    c.colsb[t + 2] = static_cast<uint16_t>(32 * G);  // C: M x 8G int32
  }
  // the configuration's bytes must be in memory when ldtilecfg reads them: the compiler does not
  // model that read, and with constant arguments it dropped the stores as dead
  asm volatile("" : : "r"(&c) : "memory");
  _tile_loadconfig(&c);
}

// Block b of groups g (G of them, gs bytes apart) -> B rows of 64 bytes (bytes 32g.. of each row).
template <Format F>
static inline void pack_b(const uint8_t* w, int64_t gs, int G, int64_t b, uint8_t* bs) {
  for (int g = 0; g < G; ++g) {
    const uint8_t* v = w + g * gs + b * X8<F>::kGroupBlockBytes + 16;
    if constexpr (F == Format::Q8_0) {
      for (int kk = 0; kk < 8; ++kk)
        _mm256_store_si256(reinterpret_cast<__m256i*>(bs + 64 * kk + 32 * g),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * kk)));
    } else {
      const __m256i low4 = _mm256_set1_epi8(0x0F);
      for (int j = 0; j < 4; ++j) {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 32 * j));
        _mm256_store_si256(reinterpret_cast<__m256i*>(bs + 64 * j + 32 * g), _mm256_and_si256(q, low4));
        _mm256_store_si256(reinterpret_cast<__m256i*>(bs + 64 * (4 + j) + 32 * g),
                           _mm256_and_si256(_mm256_srli_epi16(q, 4), low4));
      }
    }
  }
}

// The activations as the tiles read them: xq rows ldq bytes apart, readable up to a multiple of 16
// rows past the first; per block b the rows' scales dxT[b * ldT + row] and (Q4_0) 8 * sums
// sT[b * ldT + row], so that 16 rows' values are one vector load.
struct Acts {
  const int8_t* xq;
  int64_t ldq;
  const float* dxT;
  const int32_t* sT;
  int64_t ldT;
};

// The activation rows' scales and sums transposed to blocks-major (Acts::dxT / sT): rows [0, M) of xd
// / xs8 (ldd apart), zero up to Mpad.
inline void transpose_scales(const float* xd, const int32_t* xs8, int64_t ldd, int64_t M, int64_t Mpad, int64_t nb,
                             float* dxT, int32_t* sT) {
  std::fill(dxT, dxT + nb * Mpad, 0.0f);
  std::fill(sT, sT + nb * Mpad, 0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      dxT[b * Mpad + m] = xd[m * ldd + b];
      if (xs8) sT[b * Mpad + m] = xs8[m * ldd + b];
    }
}

// Bytes of B scratch x8_groups_amx needs for nb blocks.
inline int64_t b_scratch_bytes(int64_t nb) { return nb * 8 * 64; }

// res[m * ldr + n] for m < M activation rows (any count; tiles of 16, the rows past M computed on
// whatever the padding holds and dropped) and n < 8G (G = 1 or 2 groups of 8 weight rows, gs bytes
// apart): x8_tile<F, G, M>'s contract and bits. bs: b_scratch_bytes(nb), 64-byte aligned.
template <Format F>
void x8_groups_amx(int G, const uint8_t* w, int64_t gs, int64_t nb, const Acts& x, int64_t M, uint8_t* bs, float* res,
                   int64_t ldr) {
  for (int64_t b = 0; b < nb; ++b) pack_b<F>(w, gs, G, b, bs + b * 512);
  configure(kRows, G);
  alignas(64) int32_t cbuf[3][kRows * 16] = {};  // lanes past 8G stay 0
  const __mmask16 lanes = static_cast<__mmask16>(G == 2 ? 0xFFFF : 0x00FF);
  for (int64_t m0 = 0; m0 < M; m0 += kRows) {
    const int8_t* a = x.xq + m0 * x.ldq;
    __m512 acc[kRows];
    for (int m = 0; m < kRows; ++m) acc[m] = _mm512_setzero_ps();
    // block b's product into tile set b & 1; its result is stored one block later, after the next
    // product has been issued, so the store does not wait for a multiply just started (tiles are not
    // renamed: a set is free again once its result is stored)
    const auto multiply = [&](int64_t b) {
      if (b & 1) {
        _tile_loadd(3, a + b * kBlock, x.ldq);
        _tile_loadd(4, bs + b * 512, 64);
        _tile_zero(5);
        if constexpr (F == Format::Q8_0) _tile_dpbssd(5, 3, 4); else _tile_dpbsud(5, 3, 4);
      } else {
        _tile_loadd(0, a + b * kBlock, x.ldq);
        _tile_loadd(1, bs + b * 512, 64);
        _tile_zero(2);
        if constexpr (F == Format::Q8_0) _tile_dpbssd(2, 0, 1); else _tile_dpbsud(2, 0, 1);
      }
    };
    // block b - 1's result is scaled while block b's is stored and block b + 1's multiplied: the
    // vector loads of a stored result come an iteration after its store
    const auto scale = [&](int64_t b) {
      const uint8_t* s0 = w + b * X8<F>::kGroupBlockBytes;
      __m256i h = _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s0)));
      h = _mm256_inserti128_si256(
          h, G == 2 ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(s0 + gs)) : _mm_setzero_si128(), 1);
      const __m512 dw = _mm512_maskz_cvtph_ps(0xFFFF, h);
      const float* dx = x.dxT + b * x.ldT + m0;
      const int32_t* sx = x.sT + b * x.ldT + m0;
      const int32_t* c = cbuf[b % 3];
#pragma GCC unroll 16
      for (int m = 0; m < kRows; ++m) {
        __m512i dot = _mm512_load_si512(c + 16 * m);
        if constexpr (F == Format::Q4_0) dot = _mm512_sub_epi32(dot, _mm512_set1_epi32(sx[m]));
        acc[m] = _mm512_fmadd_ps(_mm512_maskz_cvtepi32_ps(0xFFFF, dot), _mm512_mul_ps(dw, _mm512_set1_ps(dx[m])), acc[m]);
      }
    };
    multiply(0);
    for (int64_t b = 0; b < nb; ++b) {
      if (b + 1 < nb) multiply(b + 1);
      if (b & 1)
        _tile_stored(5, cbuf[b % 3], 64);
      else
        _tile_stored(2, cbuf[b % 3], 64);
      if (b > 0) scale(b - 1);
    }
    scale(nb - 1);
    const int64_t rows = std::min<int64_t>(kRows, M - m0);
    for (int m = 0; m < rows; ++m) _mm512_mask_storeu_ps(res + (m0 + m) * ldr, lanes, acc[m]);
  }
  _tile_release();
}

}  // namespace amx
}  // namespace quant
}  // namespace lfmk
