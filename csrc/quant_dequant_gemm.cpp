// Quantized weights with many rows: dequantize to bf16 panel by panel and multiply with oneDNN.
//
// Our integer-dot kernels (linear_quant*.cpp, moe_experts_*quant.cpp) stream a quantized weight once
// per call, which is what decode needs. With hundreds of rows (prefill) they are compute-bound at
// 0.2-0.5 TOP/s on 2 cores, while a CPU with AMX runs a bf16 GEMM through oneDNN at 1.5-2 TFLOP/s, so
// a quantized prefill took 3-4x the time of a bf16 one there. This route keeps the weight quantized
// in memory and, per panel of rows small enough for L2, dequantizes it exactly to bf16 and hands
// the panel to oneDNN (one panel per thread; each GEMM single-threaded inside our parallel region).
// The results are those of a bf16 model whose weights are the dequantized ones rounded to bf16;
// the policy (lfm_kernels/_policy.py) decides from how many rows the route is taken.
//
// Also here: the dequantization itself as an op (QuantizedTensor.dequantize runs on it).
#include <algorithm>
#include <vector>

#include "common.h"
#include "moe_tiles_avx2.h"
#include "quant/kquant_x8.h"
#include "quant/x8.h"
#include "quant_dequant_gemm.h"
#include "quant/vnni_target.h"

namespace lfmk {
namespace quant {
namespace {

// Bytes of bf16 weights per panel: the panel stays in L2 while oneDNN packs and multiplies it.
constexpr int64_t kPanelBytes = 1 << 20;

// ---- the second decode step, q -> s * q - m (dequant.h) ----

// One row of nb blocks at src -> out.
template <WFormat F, typename T>
void dequant_row_portable(const uint8_t* src, int64_t nb, T* out) {
  constexpr int n = F == WFormat::Q8_0 || F == WFormat::Q4_0 ? kBlock : kSuper;
  int8_t q[n];
  float s[n / kGroup], m[n / kGroup];
  for (int64_t b = 0; b < nb; ++b, out += n) {
    block_scales<F>(src + b * wblock_bytes(F), s, m);
    block_codes<F>(src + b * wblock_bytes(F), q);
    for (int g = 0; g < n / kGroup; ++g)
      for (int i = 0; i < kGroup; ++i)
        out[g * kGroup + i] = from_f32<T>(s[g] * static_cast<float>(q[g * kGroup + i]) - m[g]);
  }
}

}  // namespace
}  // namespace quant
}  // namespace lfmk

LFMK_AVX512BF16_BEGIN
#include "simd_avx512.h"
namespace lfmk {
namespace quant {
namespace {

// 16 codes (int8 lanes of q) -> s * q - m -> out[0:16]. One fused step gives the same values as
// gguf's product then difference: the product is exact, or m is 0 (dequant.h). bf16 by the
// AVX512-BF16 conversion (round to nearest even, as c10::BFloat16 for every finite value).
static inline __m512 expand16(__m128i q, float s, float m) {
  const __m512 v = _mm512_maskz_cvtepi32_ps(avx512::kAll, _mm512_maskz_cvtepi8_epi32(avx512::kAll, q));
  return _mm512_fmsub_ps(v, _mm512_set1_ps(s), _mm512_set1_ps(m));
}
static inline void put16(float* out, __m128i q, float s, float m) { _mm512_storeu_ps(out, expand16(q, s, m)); }
static inline void put16(c10::BFloat16* out, __m128i q, float s, float m) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(expand16(q, s, m))));
}
// One Q4_0 block's 16 nibble bytes (element j low, j + 16 high) / one Q8_0 block's two 16-byte halves.
template <typename T>
static inline void put_q4_0(T* out, __m128i v, float d) {
  const __m128i low4 = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
  put16(out, _mm_sub_epi8(_mm_and_si128(v, low4), eight), d, 0.0f);
  put16(out + 16, _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(v, 4), low4), eight), d, 0.0f);
}
template <typename T>
static inline void put_q8_0(T* out, __m128i lo, __m128i hi, float d) {
  put16(out, lo, d, 0.0f);
  put16(out + 16, hi, d, 0.0f);
}
static inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

// 4 x8 vectors (each: 4 bytes of 8 rows) -> per row its 16 bytes in vector order: rows[r] for r < 4
// in the low 128 bits of q[r], rows 4..7 in the high 128 bits of q[r - 4].
static inline void transpose_x8_4(const uint8_t* p, __m256i q[4]) {
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32));
  const __m256i v2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 64));
  const __m256i v3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 96));
  const __m256i t0 = _mm256_unpacklo_epi32(v0, v1), t1 = _mm256_unpackhi_epi32(v0, v1);
  const __m256i t2 = _mm256_unpacklo_epi32(v2, v3), t3 = _mm256_unpackhi_epi32(v2, v3);
  q[0] = _mm256_unpacklo_epi64(t0, t2);
  q[1] = _mm256_unpackhi_epi64(t0, t2);
  q[2] = _mm256_unpacklo_epi64(t1, t3);
  q[3] = _mm256_unpackhi_epi64(t1, t3);
}
static inline __m128i row_of(const __m256i q[4], int r) {
  return r < 4 ? _mm256_castsi256_si128(q[r]) : _mm256_extracti128_si256(q[r - 4], 1);
}

// One x8 group of Q8_0 / Q4_0 (8 rows, nb blocks) straight to 8 output rows (ld elements apart),
// without putting the rows back in GGUF's layout first.
template <WFormat F, typename T>
void dequant_group_x8_avx512(const uint8_t* grp, int64_t nb, T* out, int64_t ld) {
  constexpr int64_t kGB = X8<F == WFormat::Q8_0 ? Format::Q8_0 : Format::Q4_0>::kGroupBlockBytes;
  alignas(32) float d[8];
  __m256i q[4], q2[4];
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* g = grp + b * kGB;
    _mm256_store_ps(d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(g))));
    transpose_x8_4(g + 16, q);
    if constexpr (F == WFormat::Q8_0) transpose_x8_4(g + 16 + 128, q2);
    for (int r = 0; r < 8; ++r) {
      T* o = out + r * ld + b * kBlock;
      if constexpr (F == WFormat::Q8_0)
        put_q8_0(o, row_of(q, r), row_of(q2, r), d[r]);
      else
        put_q4_0(o, row_of(q, r), d[r]);
    }
  }
}

// kx8_to_rows_group with gathers: each 4-byte piece field of a super-block is [len / 4 vectors][8
// rows][4 bytes] in x8, so one gather collects 16 pieces of one row (64 bytes of its field).
template <KFormat F>
void kx8_to_rows_group_avx512(const uint8_t* src, int64_t nsb, uint8_t* dst, int64_t row_ld) {
  constexpr int kB = KTraits<F>::kBytes;
  const __m512i lane = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(32));
  for (int64_t b = 0; b < nsb; ++b) {
    const uint8_t* in = src + b * kKX8Rows * kB;
    for (const KX8Field& f : KX8<F>::kField) {
      if (f.piece != 4) {
        for (int r = 0; r < kKX8Rows; ++r)
          for (int j = 0; j < f.len / f.piece; ++j)
            kx8_piece(dst + r * row_ld + b * kB + f.off + f.piece * j, in + 8 * f.off + 8 * f.piece * j + f.piece * r, f.piece);
        continue;
      }
      for (int c = 0; c < f.len; c += 64) {
        const int lanes = std::min(16, (f.len - c) / 4);
        const __mmask16 k = static_cast<__mmask16>((1u << lanes) - 1);
        const uint8_t* base = in + 8 * f.off + 8 * c;
        for (int r = 0; r < kKX8Rows; ++r) {
          const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), k, lane, base + 4 * r, 1);
          _mm512_mask_storeu_epi32(dst + r * row_ld + b * kB + f.off + c, k, v);
        }
      }
    }
  }
}

static inline __m128i load128(const uint8_t* p) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)); }

// block_codes' fields decoded 16 lanes at a time, straight into put16.
template <WFormat F, typename T>
void dequant_row_avx512(const uint8_t* src, int64_t nb, T* out) {
  constexpr int n = F == WFormat::Q8_0 || F == WFormat::Q4_0 ? kBlock : kSuper;
  const __m128i low4 = _mm_set1_epi8(0x0F);
  float s[n / kGroup], m[n / kGroup];
  for (int64_t b = 0; b < nb; ++b, out += n) {
    const uint8_t* blk = src + b * wblock_bytes(F);
    if constexpr (n == kSuper) block_scales<F>(blk, s, m);
    if constexpr (F == WFormat::Q8_0) {
      put_q8_0(out, load128(blk + 2), load128(blk + 18), half_at(blk));
    } else if constexpr (F == WFormat::Q4_0) {
      put_q4_0(out, load128(blk + 2), half_at(blk));
    } else if constexpr (F == WFormat::Q6_K) {
      const __m128i k32 = _mm_set1_epi8(32), three = _mm_set1_epi8(3);
      for (int h = 0; h < 2; ++h)
        for (int t = 0; t < 4; ++t)
          for (int half = 0; half < 2; ++half) {
            __m128i lo = load128(blk + 64 * h + 32 * (t & 1) + 16 * half);
            if (t >> 1) lo = _mm_srli_epi16(lo, 4);
            const __m128i hi = _mm_and_si128(_mm_srl_epi16(load128(blk + 128 + 32 * h + 16 * half), _mm_cvtsi32_si128(2 * t)), three);
            const __m128i q = _mm_sub_epi8(_mm_or_si128(_mm_and_si128(lo, low4), _mm_slli_epi16(hi, 4)), k32);
            const int g = 8 * h + 2 * t + half;
            put16(out + 16 * g, q, s[g], m[g]);
          }
    } else {
      constexpr bool five = F == WFormat::Q5_K;
      const uint8_t* qs = blk + (five ? 48 : 16);
      const __m128i one = _mm_set1_epi8(1);
      for (int c = 0; c < 4; ++c)
        for (int half = 0; half < 2; ++half) {
          const __m128i v = load128(qs + 32 * c + 16 * half);
          __m128i q0 = _mm_and_si128(v, low4), q1 = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
          if constexpr (five) {
            const __m128i qh = load128(blk + 16 + 16 * half);
            q0 = _mm_or_si128(q0, _mm_slli_epi16(_mm_and_si128(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * c)), one), 4));
            q1 = _mm_or_si128(q1, _mm_slli_epi16(_mm_and_si128(_mm_srl_epi16(qh, _mm_cvtsi32_si128(2 * c + 1)), one), 4));
          }
          put16(out + 64 * c + 16 * half, q0, s[4 * c + half], m[4 * c + half]);
          put16(out + 64 * c + 32 + 16 * half, q1, s[4 * c + 2 + half], m[4 * c + 2 + half]);
        }
    }
  }
}

}  // namespace
}  // namespace quant
}  // namespace lfmk
LFMK_AVX512BF16_END

LFMK_AMX_BF16_BEGIN
LFMK_ZMM_DIAG_BEGIN
#include "quant/amx_bf16.h"
namespace lfmk {
namespace quant {
namespace {

// The experts of experts_dequant_gemm on AMX-BF16 tiles (quant/amx_bf16.h), weights in x8.
struct AmxExperts {
  const std::vector<int64_t>& experts;
  const moe::Plan& pl;
  const c10::BFloat16* xs;  // the experts' token rows (expert i's from row first[i]), then 16 rows of zeros
  const std::vector<int64_t>& first;
  c10::BFloat16* act;       // [pairs + 16, I] in pair order, zeros where not written
  float* y;                 // [pairs, H]
  int64_t H, I;
};

// act[q, j0:j0 + 16] = bf16(silu(gate . x_q) * (up . x_q)) for the pairs q of each expert, per strip
// of 16 intermediate units (its gate and up rows dequantized once, then every 16 tokens against them).
template <WFormat F>
void amx_phase1(const AmxExperts& a, const uint8_t* gu) {
  constexpr int kR = amxbf16::kRows;
  const int64_t nb = a.H / weights_per_block(F), gs = 8 * row_bytes(F, a.H), strips = a.I / kR;
  const auto load = [&](int64_t t, uint8_t* bg, uint8_t* bu) {
    const int64_t i = t / strips, j0 = t % strips * kR, e = a.experts[i];
    const uint8_t* G = gu + e * (2 * a.I / 8) * gs;  // gate rows [0, I), up rows [I, 2I), 8 per group
    const uint8_t* ga = G + j0 / 8 * gs;
    const uint8_t* ua = G + (a.I + j0) / 8 * gs;
    amxbf16::dequant_b<F>(ga, ga + gs, nb, bg);
    amxbf16::dequant_b<F>(ua, ua + gs, nb, bu);
    return amxbf16::Strip{a.xs + a.first[i] * a.H, a.H, a.pl.offs[e + 1] - a.pl.offs[e], a.pl.offs[e], j0};
  };
  const auto emit = [&](const amxbf16::Strip& st, int64_t m, const float* g, const float* u) {
    const __m256 lo = _mm256_mul_ps(avx2::silu8(_mm256_load_ps(g)), _mm256_load_ps(u));
    const __m256 hi = _mm256_mul_ps(avx2::silu8(_mm256_load_ps(g + 8)), _mm256_load_ps(u + 8));
    const __m512 v = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.act + (st.q0 + m) * a.I + st.col),
                        reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  };
  amxbf16::amx_strips(static_cast<int64_t>(a.experts.size()) * strips, a.H / amxbf16::kStepK, load, emit);
}

// y[q, h0:h0 + 32] = down[h0:h0 + 32] . act[q] for the pairs q of each expert, per strip of 32 rows.
template <WFormat F>
void amx_phase2(const AmxExperts& a, const uint8_t* dn) {
  constexpr int kR = amxbf16::kRows;
  const int64_t nb = a.I / weights_per_block(F), gs = 8 * row_bytes(F, a.I), strips = a.H / (2 * kR);
  const auto load = [&](int64_t t, uint8_t* b0, uint8_t* b1) {
    const int64_t e = a.experts[t / strips], h0 = t % strips * 2 * kR;
    const uint8_t* D = dn + e * (a.H / 8) * gs + h0 / 8 * gs;
    amxbf16::dequant_b<F>(D, D + gs, nb, b0);
    amxbf16::dequant_b<F>(D + 2 * gs, D + 3 * gs, nb, b1);
    const int64_t q0 = a.pl.offs[e];
    return amxbf16::Strip{a.act + q0 * a.I, a.I, a.pl.offs[e + 1] - q0, q0, h0};
  };
  const auto emit = [&](const amxbf16::Strip& st, int64_t m, const float* c0, const float* c1) {
    float* out = a.y + (st.q0 + m) * a.H + st.col;
    _mm512_storeu_ps(out, _mm512_load_ps(c0));
    _mm512_storeu_ps(out + kR, _mm512_load_ps(c1));
  };
  amxbf16::amx_strips(static_cast<int64_t>(a.experts.size()) * strips, a.I / amxbf16::kStepK, load, emit);
}

// out = bf16(x . w^T) on the tiles (amxbf16::amx_linear), each strip of 32 weight rows (four x8
// groups) dequantized once into the two B operands.
template <WFormat F>
void amx_linear(const c10::BFloat16* x, int64_t M, const uint8_t* w, int64_t N, int64_t K, const float* bias,
                c10::BFloat16* out) {
  const int64_t nb = K / weights_per_block(F), gs = 8 * row_bytes(F, K);
  amxbf16::amx_linear(x, M, N, K, bias, out, [&](int64_t t, uint8_t* b0, uint8_t* b1) {
    const uint8_t* W = w + t * 4 * gs;
    amxbf16::dequant_b<F>(W, W + gs, nb, b0);
    amxbf16::dequant_b<F>(W + 2 * gs, W + 3 * gs, nb, b1);
  });
}

void amx_linear_any(WFormat f, const c10::BFloat16* x, int64_t M, const uint8_t* w, int64_t N, int64_t K,
                    const float* bias, c10::BFloat16* out) {
  switch (f) {
    case WFormat::Q8_0: return amx_linear<WFormat::Q8_0>(x, M, w, N, K, bias, out);
    case WFormat::Q4_0: return amx_linear<WFormat::Q4_0>(x, M, w, N, K, bias, out);
    case WFormat::Q4_K: return amx_linear<WFormat::Q4_K>(x, M, w, N, K, bias, out);
    case WFormat::Q5_K: return amx_linear<WFormat::Q5_K>(x, M, w, N, K, bias, out);
    case WFormat::Q6_K: return amx_linear<WFormat::Q6_K>(x, M, w, N, K, bias, out);
  }
}

void amx_experts(const AmxExperts& a, const uint8_t* gu, WFormat fgu, const uint8_t* dn, WFormat fdn) {
  switch (fgu) {
    case WFormat::Q8_0: amx_phase1<WFormat::Q8_0>(a, gu); break;
    case WFormat::Q4_0: amx_phase1<WFormat::Q4_0>(a, gu); break;
    case WFormat::Q4_K: amx_phase1<WFormat::Q4_K>(a, gu); break;
    case WFormat::Q5_K: amx_phase1<WFormat::Q5_K>(a, gu); break;
    case WFormat::Q6_K: amx_phase1<WFormat::Q6_K>(a, gu); break;
  }
  switch (fdn) {
    case WFormat::Q8_0: amx_phase2<WFormat::Q8_0>(a, dn); break;
    case WFormat::Q4_0: amx_phase2<WFormat::Q4_0>(a, dn); break;
    case WFormat::Q4_K: amx_phase2<WFormat::Q4_K>(a, dn); break;
    case WFormat::Q5_K: amx_phase2<WFormat::Q5_K>(a, dn); break;
    case WFormat::Q6_K: amx_phase2<WFormat::Q6_K>(a, dn); break;
  }
}

}  // namespace
}  // namespace quant
}  // namespace lfmk
LFMK_ZMM_DIAG_END
LFMK_AMX_BF16_END

namespace lfmk {
namespace quant {
namespace {

// The rows of an x8 group (8 rows interleaved) back in GGUF's row layout, row_ld bytes apart.
void unshuffle_group(WFormat f, bool simd, const uint8_t* src, int64_t K, uint8_t* dst, int64_t row_ld) {
  if (simd) {
    switch (f) {
      case WFormat::Q4_K: return kx8_to_rows_group_avx512<KFormat::Q4_K>(src, K / kSuper, dst, row_ld);
      case WFormat::Q5_K: return kx8_to_rows_group_avx512<KFormat::Q5_K>(src, K / kSuper, dst, row_ld);
      case WFormat::Q6_K: return kx8_to_rows_group_avx512<KFormat::Q6_K>(src, K / kSuper, dst, row_ld);
      default: break;
    }
  }
  switch (f) {
    case WFormat::Q8_0: return x8_to_rows_group<Format::Q8_0>(src, K / kBlock, dst, row_ld);
    case WFormat::Q4_0: return x8_to_rows_group<Format::Q4_0>(src, K / kBlock, dst, row_ld);
    case WFormat::Q4_K: return kx8_to_rows_group<KFormat::Q4_K>(src, K / kSuper, dst, row_ld);
    case WFormat::Q5_K: return kx8_to_rows_group<KFormat::Q5_K>(src, K / kSuper, dst, row_ld);
    case WFormat::Q6_K: return kx8_to_rows_group<KFormat::Q6_K>(src, K / kSuper, dst, row_ld);
  }
}

template <typename T>
void dequant_row(WFormat f, bool simd, const uint8_t* src, int64_t nb, T* out) {
  switch (f) {
#define LFMK_DEQUANT_CASE(F) \
  case F: return simd ? dequant_row_avx512<F, T>(src, nb, out) : dequant_row_portable<F, T>(src, nb, out);
    LFMK_DEQUANT_CASE(WFormat::Q8_0)
    LFMK_DEQUANT_CASE(WFormat::Q4_0)
    LFMK_DEQUANT_CASE(WFormat::Q4_K)
    LFMK_DEQUANT_CASE(WFormat::Q5_K)
    LFMK_DEQUANT_CASE(WFormat::Q6_K)
#undef LFMK_DEQUANT_CASE
  }
}

// Rows [r0, r1) of one [N, K] matrix `mat` (layout x8 or rows) -> out, rows ld elements apart.
// group: scratch of 8 row_bytes(f, K) bytes (x8 only).
template <typename T>
void dequant_rows(WFormat f, bool x8, const uint8_t* mat, int64_t N, int64_t K, int64_t r0, int64_t r1, T* out,
                  int64_t ld, uint8_t* group) {
  const int64_t rb = row_bytes(f, K), nb = K / weights_per_block(f);
  // x8: rows up to `body` sit in groups of 8 (a K-quant's last N % 8 rows stay in row layout)
  const int64_t body = x8 ? (is_kformat(f) ? N / 8 * 8 : N) : 0;
  // the vector path needs AVX512-BF16 (its bf16 conversion), which every CPU the GEMM route runs on has
  const bool simd = cpu_has_avx512() && cpu_has_avx512bf16();
  for (int64_t r = r0; r < r1;) {
    const uint8_t* src;
    int64_t n;
    if (simd && r < body && r % 8 == 0 && r + 8 <= r1 && (f == WFormat::Q8_0 || f == WFormat::Q4_0)) {
      T* o = out + (r - r0) * ld;
      if (f == WFormat::Q8_0)
        dequant_group_x8_avx512<WFormat::Q8_0>(mat + r * rb, nb, o, ld);
      else
        dequant_group_x8_avx512<WFormat::Q4_0>(mat + r * rb, nb, o, ld);
      r += 8;
      continue;
    }
    if (r < body) {
      const int64_t g0 = r / 8 * 8;
      unshuffle_group(f, simd, mat + g0 * rb, K, group, rb);
      src = group + (r - g0) * rb;
      n = std::min(g0 + 8, r1) - r;
    } else {
      src = mat + r * rb;
      n = r1 - r;
    }
    for (int64_t i = 0; i < n; ++i) dequant_row(f, simd, src + i * rb, nb, out + (r + i - r0) * ld);
    r += n;
  }
}

// Panel rows: a multiple of 8 (x8 groups never straddle panels), about kPanelBytes of bf16 but at least
// 128 rows (narrower panels cost oneDNN a third more time per row: a Xeon, K 7168 at 72 rows), and at
// least 4 panels per thread where N allows, so the threads share the work evenly.
int64_t panel_rows(int64_t N, int64_t K) {
  const int64_t by_bytes = std::max<int64_t>(128, kPanelBytes / (2 * std::max<int64_t>(K, 1)) / 8 * 8);
  const int64_t by_threads = std::max<int64_t>(8, (N / (4 * at::get_num_threads()) + 7) / 8 * 8);
  return std::min(by_bytes, by_threads);
}

bool parse_layout(c10::string_view layout, const char* op) {
  TORCH_CHECK_VALUE(layout == "x8" || layout == "rows", op, ": layout must be 'rows' or 'x8', got '", layout, "'");
  return layout == "x8";
}

WFormat parse_format(c10::string_view format, const char* op) {
  WFormat f;
  TORCH_CHECK_VALUE(parse_wformat(format, &f), op, ": format must be one of q8_0, q4_0, q4_k, q5_k, q6_k, got '",
                    format, "'");
  return f;
}

// A quantized table as the dequantizing ops take it: `mats` stacked [N, K] matrices in `format`
// blocks and `layout` (x8: true), read into float32 or bfloat16. The checks are op's ValueErrors.
struct QuantTable {
  WFormat f;
  bool x8;
  int64_t rb;  // bytes per row
};
QuantTable check_table(const char* op, const at::Tensor& data, c10::string_view format, c10::string_view layout,
                       int64_t mats, int64_t N, int64_t K, at::ScalarType dtype) {
  const WFormat f = parse_format(format, op);
  const bool x8 = parse_layout(layout, op);
  TORCH_CHECK_VALUE(mats >= 0 && N >= 0 && K >= 0 && K % weights_per_block(f) == 0, op,
                    ": mats, N >= 0 and K a multiple of ", weights_per_block(f), " needed, got ", mats, ", ", N, ", ", K);
  TORCH_CHECK_VALUE(!x8 || is_kformat(f) || N % 8 == 0, op, ": layout x8 of ", format, " needs N a multiple of 8, got ",
                    N);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16, op, ": dtype must be float32 or bfloat16");
  const int64_t rb = row_bytes(f, K);
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte && data.numel() == mats * N * rb, op, ": data must be uint8 holding ",
                    mats * N * rb, " bytes, got ", data.scalar_type(), " with ", data.numel());
  return {f, x8, rb};
}

// Rows [r0, r1) of the matrix at mp dequantized into out (float32 or bfloat16) from element `offset` on.
inline void dequant_rows_into(at::Tensor& out, int64_t offset, const QuantTable& t, const uint8_t* mp, int64_t N,
                              int64_t K, int64_t r0, int64_t r1, uint8_t* group) {
  if (out.scalar_type() == at::kFloat)
    dequant_rows(t.f, t.x8, mp, N, K, r0, r1, mptr<float>(out) + offset, K, group);
  else
    dequant_rows(t.f, t.x8, mp, N, K, r0, r1, mptr<c10::BFloat16>(out) + offset, K, group);
}

// data: `mats` stacked [N, K] matrices in `format` blocks and `layout` -> [mats, N, K] in dtype.
at::Tensor quant_dequantize_cpu(const at::Tensor& data_in, c10::string_view format, c10::string_view layout,
                                int64_t mats, int64_t N, int64_t K, at::ScalarType dtype) {
  const QuantTable t = check_table("quant_dequantize", data_in, format, layout, mats, N, K, dtype);
  const at::Tensor data = data_in.contiguous();
  at::Tensor out = at::empty({mats, N, K}, data.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const uint8_t* dp = data.const_data_ptr<uint8_t>();
  const int64_t groups = (N + 7) / 8;
  parallel_workers(mats * groups, [&](TaskQueue& queue) {
    std::vector<uint8_t> group(t.x8 ? 8 * t.rb : 0);
    for (int64_t task = queue.claim(); task >= 0; task = queue.claim()) {
      const int64_t mat = task / groups, r0 = task % groups * 8, r1 = std::min(N, r0 + 8);
      dequant_rows_into(out, (mat * N + r0) * K, t, dp + mat * N * t.rb, N, K, r0, r1, group.data());
    }
  });
  return out;
}

// Rows ids (int64, any shape) of an [N, K] quantized matrix, dequantized -> [*ids.shape, K] in dtype:
// an embedding lookup in a quantized table. A tensor op (the ids never become Python numbers), so a
// recorded decode step holds it and the looked-up row costs one dispatch; each row the values of
// quant_dequantize's. An id outside [0, N) is an IndexError.
at::Tensor quant_embedding_cpu(const at::Tensor& data_in, const at::Tensor& ids_in, c10::string_view format,
                               c10::string_view layout, int64_t N, int64_t K, at::ScalarType dtype) {
  const QuantTable t = check_table("quant_embedding", data_in, format, layout, 1, N, K, dtype);
  TORCH_CHECK_VALUE(N > 0 && K > 0, "quant_embedding: a table of N > 0 rows of K > 0 values needed, got N=", N, ", K=", K);
  TORCH_CHECK_VALUE(ids_in.scalar_type() == at::kLong, "quant_embedding: ids must be int64, got ", ids_in.scalar_type());
  const at::Tensor data = data_in.contiguous(), ids = ids_in.contiguous();
  std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
  shape.push_back(K);
  at::Tensor out = at::empty(shape, data.options().dtype(dtype));
  const int64_t n = ids.numel();
  const int64_t* ip = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK_INDEX(ip[i] >= 0 && ip[i] < N, "quant_embedding: index ", ip[i], " is out of range for a table of ", N,
                      " rows");
  const uint8_t* dp = data.const_data_ptr<uint8_t>();
  std::vector<uint8_t> group(t.x8 ? 8 * t.rb : 0);
  for (int64_t i = 0; i < n; ++i) dequant_rows_into(out, i * K, t, dp, N, K, ip[i], ip[i] + 1, group.data());
  return out;
}

// out[M, N] = x[M, K] @ dequant(W)^T (+ bias), x bf16: the route for many rows.
at::Tensor linear_quant_dequant_gemm_cpu(const at::Tensor& x_in, const at::Tensor& qweight, c10::string_view format,
                                         c10::string_view layout, int64_t N, int64_t K,
                                         const c10::optional<at::Tensor>& bias) {
  const WFormat f = parse_format(format, "linear_quant_dequant_gemm");
  const bool x8 = parse_layout(layout, "linear_quant_dequant_gemm");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) == K && x_in.scalar_type() == at::kBFloat16,
                    "linear_quant_dequant_gemm: x must be bfloat16 [M, K=", K, "], got ", x_in.scalar_type(), " ",
                    x_in.sizes());
  TORCH_CHECK_VALUE(N > 0 && K > 0 && K % weights_per_block(f) == 0, "linear_quant_dequant_gemm: N > 0 and K a positive multiple of ",
                    weights_per_block(f), " needed, got N=", N, ", K=", K);
  TORCH_CHECK_VALUE(!x8 || is_kformat(f) || N % 8 == 0, "linear_quant_dequant_gemm: layout x8 of ", format,
                    " needs N a multiple of 8, got ", N);
  const int64_t rb = row_bytes(f, K);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte && qweight.numel() == N * rb,
                    "linear_quant_dequant_gemm: qweight must be uint8 holding ", N * rb, " bytes, got ",
                    qweight.scalar_type(), " with ", qweight.numel());
  if (bias.has_value())
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, "linear_quant_dequant_gemm: bias must be [N=", N, "]");
  const at::Tensor x = x_in.contiguous(), w = qweight.contiguous();
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const uint8_t* wp = w.const_data_ptr<uint8_t>();
  if (x8 && N % (2 * amxbf16::kRows) == 0 && cpu_has_amx() && cpu_has_avx512bf16()) {
    // AMX-BF16 tiles of our own: each strip of weight rows dequantized once, straight into the tiles'
    // B layout (oneDNN would reorder every dequantized panel into its own layout again)
    const at::Tensor xp = at::cat({x, at::zeros({amxbf16::kRows, K}, x.options())});
    // the bias joins the fp32 sums before their one rounding
    const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    amx_linear_any(f, cptr<c10::BFloat16>(xp), M, wp, N, K, b.defined() ? cptr<float>(b) : nullptr,
                   mptr<c10::BFloat16>(out));
    return out;
  }
  const int64_t P = panel_rows(N, K), panels = (N + P - 1) / P;
  parallel_workers(panels, [&](TaskQueue& queue) {
    at::Tensor panel = at::empty({P, K}, x.options());
    std::vector<uint8_t> group(x8 ? 8 * rb : 0);
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t n0 = t * P, p = std::min(P, N - n0);
      dequant_rows(f, x8, wp, N, K, n0, n0 + p, mptr<c10::BFloat16>(panel), K, group.data());
      // a view made here, not out.narrow: under inference mode `out` is an inference tensor, and the
      // worker threads do not carry the caller's InferenceMode, so an in-place op on it would be refused
      at::Tensor dst = at::from_blob(mptr<c10::BFloat16>(out) + n0, {M, p}, {N, 1}, x.options());
      at::mm_out(dst, x, panel.narrow(0, 0, p).t());
    }
  });
  if (bias.has_value()) out.add_(bias->to(at::kBFloat16));
  return out;
}

}  // namespace

void experts_dequant_gemm(const at::Tensor& hidden, const uint8_t* gu, WFormat fgu, const uint8_t* dn, WFormat fdn,
                          bool x8, int64_t H, int64_t I, const moe::Plan& pl, const std::vector<int64_t>& experts,
                          float* y) {
  if (experts.empty()) return;
  const int64_t rbH = row_bytes(fgu, H), rbI = row_bytes(fdn, I);
  const int64_t mat_gu = 2 * I * rbH, mat_dn = H * rbI;
  const auto opt = hidden.options();
  // the token rows of these experts' pairs only, expert after expert; xs row first[i] is expert
  // experts[i]'s first pair
  const int64_t ne = static_cast<int64_t>(experts.size());
  std::vector<int64_t> first(ne);
  std::vector<int64_t> tok;
  for (int64_t i = 0; i < ne; ++i) {
    first[i] = static_cast<int64_t>(tok.size());
    tok.insert(tok.end(), pl.tok.begin() + pl.offs[experts[i]], pl.tok.begin() + pl.offs[experts[i] + 1]);
  }
  at::Tensor rows = at::empty({static_cast<int64_t>(tok.size())}, opt.dtype(at::kLong));
  std::memcpy(rows.mutable_data_ptr<int64_t>(), tok.data(), tok.size() * sizeof(int64_t));
  const int64_t pairs = pl.offs.back();
  if (x8 && cpu_has_amx() && cpu_has_avx512bf16()) {
    // the tiles read tokens 16 at a time: 16 rows of zeros past the last, in both A operands
    const at::Tensor xs = at::cat({hidden.index_select(0, rows), at::zeros({amxbf16::kRows, H}, opt)});
    at::Tensor act = at::zeros({pairs + amxbf16::kRows, I}, opt);
    amx_experts({experts, pl, cptr<c10::BFloat16>(xs), first, mptr<c10::BFloat16>(act), y, H, I}, gu, fgu, dn, fdn);
    return;
  }
  const at::Tensor xs = hidden.index_select(0, rows);
  at::Tensor act = at::empty({pairs, I}, opt);
  c10::BFloat16* ap = mptr<c10::BFloat16>(act);
  // Phase 1, per (expert, panel of P1 intermediate units): gate and up rows -> one [2 p, H] panel
  const int64_t P1 = std::max<int64_t>(8, std::min<int64_t>(kPanelBytes / (4 * H) / 8 * 8, (I + 7) / 8 * 8));
  const int64_t n1 = (I + P1 - 1) / P1;
  parallel_workers(ne * n1, [&](TaskQueue& queue) {
    at::Tensor panel = at::empty({2 * P1, H}, opt);
    c10::BFloat16* pp = mptr<c10::BFloat16>(panel);
    std::vector<uint8_t> group(x8 ? 8 * rbH : 0);
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t i = t / n1, e = experts[i], j0 = t % n1 * P1, p = std::min(P1, I - j0);
      const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
      const uint8_t* G = gu + e * mat_gu;
      dequant_rows(fgu, x8, G, 2 * I, H, j0, j0 + p, pp, H, group.data());
      dequant_rows(fgu, x8, G, 2 * I, H, I + j0, I + j0 + p, pp + p * H, H, group.data());
      const at::Tensor g = at::mm(xs.narrow(0, first[i], me), panel.narrow(0, 0, 2 * p).t());
      const c10::BFloat16* gp = cptr<c10::BFloat16>(g);
      for (int64_t m = 0; m < me; ++m) swiglu_row_bf16(gp + m * 2 * p, gp + m * 2 * p + p, ap + (q0 + m) * I + j0, p);
    }
  });
  // Phase 2, per (expert, panel of P2 down rows): y[q, h0:h0 + p] = act[q] . down[h0:h0 + p]
  const int64_t P2 = std::max<int64_t>(8, std::min<int64_t>(kPanelBytes / (2 * I) / 8 * 8, (H + 7) / 8 * 8));
  const int64_t n2 = (H + P2 - 1) / P2;
  parallel_workers(ne * n2, [&](TaskQueue& queue) {
    at::Tensor panel = at::empty({P2, I}, opt);
    std::vector<uint8_t> group(x8 ? 8 * rbI : 0);
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t e = experts[t / n2], h0 = t % n2 * P2, p = std::min(P2, H - h0);
      const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
      dequant_rows(fdn, x8, dn + e * mat_dn, H, I, h0, h0 + p, mptr<c10::BFloat16>(panel), I, group.data());
      const at::Tensor r = at::mm(act.narrow(0, q0, me), panel.narrow(0, 0, p).t());
      const c10::BFloat16* rp = cptr<c10::BFloat16>(r);
      for (int64_t i = 0; i < me; ++i)
        for (int64_t c = 0; c < p; ++c) y[(q0 + i) * H + h0 + c] = static_cast<float>(rp[i * p + c]);
    }
  });
}

}  // namespace quant
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("quant_dequantize(Tensor data, str format, str layout, int mats, int N, int K, ScalarType dtype) -> Tensor");
  m.def("quant_embedding(Tensor data, Tensor ids, str format, str layout, int N, int K, ScalarType dtype) -> Tensor");
  m.def("linear_quant_dequant_gemm(Tensor x, Tensor qweight, str format, str layout, int N, int K, Tensor? bias) "
        "-> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("quant_dequantize", &lfmk::quant::quant_dequantize_cpu);
  m.impl("quant_embedding", &lfmk::quant::quant_embedding_cpu);
  m.impl("linear_quant_dequant_gemm", &lfmk::quant::linear_quant_dequant_gemm_cpu);
}
