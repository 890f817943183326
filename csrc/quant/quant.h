// Quantized-weight building blocks shared by the CPU ops that take GGUF Q8_0 / Q4_0 weights
// (linear today; the MoE expert passes reuse the same pieces).
//
// Weights stay in GGUF's block layout, 32 weights along K per block:
//   Q8_0: 34 bytes = fp16 d, 32 x int8 q                  w = d * q
//   Q4_0: 18 bytes = fp16 d, 16 bytes, byte j = q[j] | q[j + 16] << 4   w = d * (q - 8)
// Activations are quantized per block of 32 along K to int8 with an fp32 scale (d = max|x| / 127,
// q = round-half-even(x / d), so |q| <= 127), and a block's dot product is an exact integer; only
// the fp32 sum over blocks, scaled by d_w * d_x, rounds. Every ISA path implements the same two
// pieces, in its own header:
//   quantize_act_row<T>(x, K, q, d)         one activation row (K a multiple of 32) -> q[K], d[K / 32]
//   tile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, nb, res)
//       res[r * M + m] = sum over nb blocks of d_w[r] * d_x[m] * dot(w[r], x[m]) for R weight rows
//       (w: the first row's blocks, rows w_ld bytes apart) and M activation rows (xq rows ldq bytes
//       apart, xd rows ldd floats apart).
// Activation quantization gives the same bits on every path. A tile's result is a sum of the same
// terms on every path, in a path-specific order: each (r, m) result depends only on its own row
// pair, never on R, M, the tile's position or the thread that ran it.
//   portable.h: plain C++ (any CPU; the tests' forced path)
//   avx2.h:     AVX2 _mm256_maddubs_epi16 + _mm256_madd_epi16
//   vnni.h:     vpdpbusd (AVX-VNNI or AVX512-VNNI on 256-bit vectors)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

namespace lfmk {
namespace quant {

enum class Format : int { Q8_0 = 0, Q4_0 = 1 };

constexpr int kBlock = 32;

template <Format F>
struct Traits;
template <>
struct Traits<Format::Q8_0> {
  static constexpr int kBytes = 34;
};
template <>
struct Traits<Format::Q4_0> {
  static constexpr int kBytes = 18;
};

constexpr int64_t block_bytes(Format f) { return f == Format::Q8_0 ? Traits<Format::Q8_0>::kBytes : Traits<Format::Q4_0>::kBytes; }

// The path the quantized kernels take now, chosen (and pinned by the tests, or forced portable) in
// linear_quant.cpp, so every op on quantized weights follows one choice: 0 portable, 1 AVX2,
// 2 AVX-VNNI, 3 AVX512-VNNI.
int active_isa();

// The block's fp16 scale (unaligned: blocks are 18 or 34 bytes long).
static inline float block_scale(const uint8_t* blk) {
  uint16_t h;
  std::memcpy(&h, blk, sizeof h);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

}  // namespace quant
}  // namespace lfmk
