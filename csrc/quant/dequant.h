// GGUF blocks (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) back to floats, for the route that multiplies many rows
// by a quantized weight through a bf16 GEMM (quant_dequant_gemm.cpp) and for QuantizedTensor's
// dequantize.
//
// Every format decodes in two steps. block_codes / block_scales turn one block into int8 codes q and, per group
// of 16 weights, a float scale s and offset m, so that every weight is w = s * q - m:
//   Q8_0  s = d,           q = q8,       m = 0
//   Q4_0  s = d,           q = nib - 8,  m = 0
//   Q4_K  s = d * sc_j,    q = nib,      m = dmin * mn_j     (j: the sub-block of 32)
//   Q5_K  s = d * sc_j,    q = nib | hb << 4, m = dmin * mn_j
//   Q6_K  s = d * sc_g,    q = six bits - 32, m = 0          (g: the group of 16)
// These are the fp32 operations of gguf.quants' decoders in their order, so the values are theirs
// bit for bit: s is exact (an fp16 times an integer of at most 8 bits), s * q is exact for every
// format but Q6_K (at most 11 + 6 + 6 significant bits), where it rounds once, as gguf's product
// does, and the one subtraction rounds once. A fused multiply-add gives the same results (the
// product it skips rounding is exact, or m is 0), so contraction by the compiler cannot change them.
// The second step, q -> s * q - m -> bf16 / fp32, is the only one with an ISA-specific version.
#pragma once

#include <cstdint>
#include <cstring>

#include "quant/kquant.h"
#include "quant/quant.h"

namespace lfmk {
namespace quant {

// Every GGUF block format the quantized ops take.
enum class WFormat : int { Q8_0 = 0, Q4_0 = 1, Q4_K = 2, Q5_K = 3, Q6_K = 4 };

constexpr int kGroup = 16;  // weights per (s, m) pair

inline bool parse_wformat(c10::string_view s, WFormat* f) {
  if (s == "q8_0") *f = WFormat::Q8_0;
  else if (s == "q4_0") *f = WFormat::Q4_0;
  else if (s == "q4_k") *f = WFormat::Q4_K;
  else if (s == "q5_k") *f = WFormat::Q5_K;
  else if (s == "q6_k") *f = WFormat::Q6_K;
  else return false;
  return true;
}

constexpr bool is_kformat(WFormat f) { return f == WFormat::Q4_K || f == WFormat::Q5_K || f == WFormat::Q6_K; }
constexpr int weights_per_block(WFormat f) { return is_kformat(f) ? kSuper : kBlock; }
inline WFormat to_wformat(Format f) { return f == Format::Q8_0 ? WFormat::Q8_0 : WFormat::Q4_0; }
inline WFormat to_wformat(KFormat f) {
  return f == KFormat::Q4_K ? WFormat::Q4_K : f == KFormat::Q5_K ? WFormat::Q5_K : WFormat::Q6_K;
}
constexpr KFormat to_kformat(WFormat f) {
  return f == WFormat::Q4_K ? KFormat::Q4_K : f == WFormat::Q5_K ? KFormat::Q5_K : KFormat::Q6_K;
}
constexpr int64_t wblock_bytes(WFormat f) {
  switch (f) {
    case WFormat::Q8_0: return block_bytes(Format::Q8_0);
    case WFormat::Q4_0: return block_bytes(Format::Q4_0);
    default: return kblock_bytes(to_kformat(f));
  }
}
constexpr int64_t row_bytes(WFormat f, int64_t K) { return K / weights_per_block(f) * wblock_bytes(f); }

// Block b's s and m per group of 16 (dequant.h's table above).
template <WFormat F>
inline void block_scales(const uint8_t* b, float* s, float* m) {
  if constexpr (F == WFormat::Q8_0 || F == WFormat::Q4_0) {
    s[0] = s[1] = block_scale(b);
    m[0] = m[1] = 0.0f;
  } else if constexpr (F == WFormat::Q6_K) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    const float d = kq_half(b + 208);
    for (int g = 0; g < 16; ++g) {
      s[g] = d * static_cast<float>(sc[g]);
      m[g] = 0.0f;
    }
  } else {
    const float d = kq_half(b), dmin = kq_half(b + 2);
    int32_t sc[8], mn[8];
    kq_scale_min(b + 4, sc, mn);
    for (int j = 0; j < 8; ++j) {
      s[2 * j] = s[2 * j + 1] = d * static_cast<float>(sc[j]);
      m[2 * j] = m[2 * j + 1] = dmin * static_cast<float>(mn[j]);
    }
  }
}

// Block b's int8 codes q[weights_per_block(F)] (the plain C++ decoder; ISA paths decode the same
// fields with vector instructions).
template <WFormat F>
inline void block_codes(const uint8_t* b, int8_t* q) {
  if constexpr (F == WFormat::Q8_0) {
    std::memcpy(q, b + 2, kBlock);
  } else if constexpr (F == WFormat::Q4_0) {
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<int8_t>((b[2 + j] & 0x0F) - 8);
      q[j + 16] = static_cast<int8_t>((b[2 + j] >> 4) - 8);
    }
  } else if constexpr (F == WFormat::Q6_K) {
    const uint8_t *ql = b, *qh = b + 128;
    for (int h = 0; h < 2; ++h)      // halves of 128 weights: 64 bytes of ql, 32 of qh each
      for (int t = 0; t < 4; ++t)    // quarter t of the half: ql low / low / high / high nibbles
        for (int l = 0; l < 32; ++l) {
          const int lo = (ql[64 * h + 32 * (t & 1) + l] >> (4 * (t >> 1))) & 0x0F;
          const int hi = (qh[32 * h + l] >> (2 * t)) & 0x03;
          q[128 * h + 32 * t + l] = static_cast<int8_t>((lo | hi << 4) - 32);
        }
  } else {
    constexpr bool five = F == WFormat::Q5_K;
    const uint8_t* qh = b + 16;  // Q5_K only
    const uint8_t* qs = b + (five ? 48 : 16);
    for (int c = 0; c < 4; ++c)  // bytes 32c.. hold sub-blocks 2c (low nibbles) and 2c + 1 (high)
      for (int l = 0; l < 32; ++l) {
        q[64 * c + l] = static_cast<int8_t>(qs[32 * c + l] & 0x0F);
        q[64 * c + 32 + l] = static_cast<int8_t>(qs[32 * c + l] >> 4);
      }
    if (five)
      for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 32; ++l) q[32 * j + l] = static_cast<int8_t>(q[32 * j + l] | (((qh[l] >> j) & 1) << 4));
  }
}

}  // namespace quant
}  // namespace lfmk
