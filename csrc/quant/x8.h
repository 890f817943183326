// The "x8" layout of Q8_0 / Q4_0 weights (lfm_kernels.QuantizedTensor(layout="x8")) and its portable
// kernels. GGUF's row-major blocks make a decode GEMV compute-bound: every (row, 32-block) pays an
// unpack, a scalar fp16 scale conversion and a horizontal reduction. x8 interleaves rows in groups of
// 8, so that one 32-byte vector holds 4 consecutive k of each of the 8 rows (row r in 32-bit lane r):
// one broadcast of 4 activation bytes then feeds 8 rows, lane r accumulates row r (no horizontal
// sums), and the 8 rows' scales arrive as one 16-byte fp16 vector.
//
// Per (group of 8 rows, 32-block), kGroupBlockBytes<F> = 8 * (GGUF block bytes), in K order, groups
// in N order (so a group occupies exactly the bytes its 8 rows occupy in the GGUF layout):
//   16 bytes: the 8 rows' fp16 scales, row r at bytes 2r..2r+1
//   Q4_0: 4 vectors of 32 bytes; vector j, lane r, byte i = GGUF byte 4j + i of row r's block: low
//         nibble = element 4j + i, high nibble = element 16 + 4j + i (unsigned, 0..15; w = d (q - 8))
//   Q8_0: 8 vectors of 32 bytes; vector j, lane r, byte i = int8 element 4j + i of row r
// Every block byte is a GGUF byte moved, none changed: the conversion is a 4-byte shuffle.
//
// x8 tile (every ISA path the same contract):
//   x8_tile<F, G, M>(w, gstride, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr)
//     res[m * ldr + g * 8 + r] = sum over nb blocks of d_w * d_x * dot(w row (g, r), x row m), for
//     G groups (gstride bytes apart, w the first group's first block) and M activation rows (xq rows
//     ldq bytes apart, xd rows ldd floats apart, xs8[m * lds + b] = 8 * sum of x_q over block b:
//     Q4_0's -8 offset, taken off per block as one exact integer).
// Per (row, activation row, block) every path computes the same exact integer dot, then
// acc = fma(float(dot), d_w * d_x, acc) in block order: the result of an element depends only on its
// own row pair, never on G, M, the tile's position, the thread or the path (portable == AVX2 bits).
#pragma once

#include "quant/quant.h"

namespace lfmk {
namespace quant {

constexpr int kX8Rows = 8;

template <Format F>
struct X8 {
  static constexpr int kQuantBytes = Traits<F>::kBytes - 2;         // GGUF bytes of quants per block
  static constexpr int kVectors = kQuantBytes / 4;                  // 32-byte vectors per group-block
  static constexpr int64_t kGroupBlockBytes = 16 + 32 * kVectors;   // == 8 * Traits<F>::kBytes
  static_assert(kGroupBlockBytes == 8 * Traits<F>::kBytes, "x8 keeps GGUF's byte count");
};

inline int64_t x8_group_block_bytes(Format f) { return 8 * block_bytes(f); }

// One group of 8 rows (GGUF rows row_ld bytes apart) of nb blocks -> x8 bytes at dst, and back.
template <Format F>
inline void rows_to_x8_group(const uint8_t* src, int64_t row_ld, int64_t nb, uint8_t* dst) {
  constexpr int kB = Traits<F>::kBytes;
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* o = dst + b * X8<F>::kGroupBlockBytes;
    for (int r = 0; r < kX8Rows; ++r) {
      const uint8_t* blk = src + r * row_ld + b * kB;
      std::memcpy(o + 2 * r, blk, 2);
      for (int j = 0; j < X8<F>::kVectors; ++j) std::memcpy(o + 16 + 32 * j + 4 * r, blk + 2 + 4 * j, 4);
    }
  }
}

template <Format F>
inline void x8_to_rows_group(const uint8_t* src, int64_t nb, uint8_t* dst, int64_t row_ld) {
  constexpr int kB = Traits<F>::kBytes;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* in = src + b * X8<F>::kGroupBlockBytes;
    for (int r = 0; r < kX8Rows; ++r) {
      uint8_t* blk = dst + r * row_ld + b * kB;
      std::memcpy(blk, in + 2 * r, 2);
      for (int j = 0; j < X8<F>::kVectors; ++j) std::memcpy(blk + 2 + 4 * j, in + 16 + 32 * j + 4 * r, 4);
    }
  }
}

// 8 * sum of each activation block's q (Q4_0's offset term).
inline void block_sums8_x8(const int8_t* q, int64_t nb, int32_t* s8) {
  for (int64_t b = 0; b < nb; ++b) {
    int32_t s = 0;
    for (int j = 0; j < kBlock; ++j) s += q[b * kBlock + j];
    s8[b] = 8 * s;
  }
}

namespace portable {

template <Format F, int G, int M>
static inline void x8_tile(const uint8_t* w, int64_t gstride, int64_t nb, const int8_t* xq, int64_t ldq,
                           const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr,
                           int64_t /*pf*/) {
  float acc[G][M][kX8Rows] = {};
  for (int64_t b = 0; b < nb; ++b) {
    for (int g = 0; g < G; ++g) {
      const uint8_t* blk = w + g * gstride + b * X8<F>::kGroupBlockBytes;
      for (int r = 0; r < kX8Rows; ++r) {
        const float dw = block_scale(blk + 2 * r);
        for (int m = 0; m < M; ++m) {
          const int8_t* x = xq + m * ldq + b * kBlock;
          int32_t s = 0;
          for (int j = 0; j < X8<F>::kVectors; ++j)
            for (int i = 0; i < 4; ++i) {
              const uint8_t byte = blk[16 + 32 * j + 4 * r + i];
              if (F == Format::Q8_0) {
                s += static_cast<int8_t>(byte) * x[4 * j + i];
              } else {
                s += (byte & 0x0F) * x[4 * j + i] + (byte >> 4) * x[16 + 4 * j + i];
              }
            }
          if (F == Format::Q4_0) s -= xs8[m * lds + b];
          // the SIMD paths' vector fma, so every path gives the same bits
          acc[g][m][r] = std::fma(static_cast<float>(s), dw * xd[m * ldd + b], acc[g][m][r]);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < kX8Rows; ++r) res[m * ldr + g * 8 + r] = acc[g][m][r];
}

}  // namespace portable
}  // namespace quant
}  // namespace lfmk
