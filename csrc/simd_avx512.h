// AVX-512 (F, BW, VL, DQ) vector helpers shared by the AVX-512 and AVX512-BF16 kernels. Include only
// between LFMK_AVX512_BEGIN / _END or LFMK_AVX512BF16_BEGIN / _END, after common.h: every function here
// is compiled for AVX-512 and must only run when the CPU has it. Static, as in simd_avx2.h, so each
// translation unit keeps its own copy.
//
// GCC 12 warns (-Wuninitialized) about the undefined pass-through operand inside some unmasked
// AVX-512 intrinsics (_mm512_slli_epi32, _mm512_cvtepu16_epi32, _mm512_cvtph_ps, the 256-bit
// extracts and reductions); the helpers use zero-masked forms with a full mask, or go through memory.
#pragma once

namespace lfmk {
namespace avx512 {

constexpr __mmask16 kAll = 0xFFFF;

static inline __m512i shl16(__m512i v) { return _mm512_maskz_slli_epi32(kAll, v, 16); }
static inline __m512i widen_u16(__m256i h) { return _mm512_maskz_cvtepu16_epi32(kAll, h); }

// 16 lanes of float from fp16 memory.
static inline __m512 load16(const c10::Half* p) {
  return _mm512_maskz_cvtph_ps(kAll, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

static inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(shl16(widen_u16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))));
}

// fp32 bits rounded to nearest even at bit 16 (bf16 in the high half; NaN -> quiet NaN), as
// avx2::bf16_round_bits and c10::BFloat16 do.
static inline __m512i bf16_round_bits(__m512 v) {
  const __m512i x = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_maskz_srli_epi32(kAll, x, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(0x7FFF)), lsb);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
}

// v rounded to T's precision and back (for values that must enter later steps as T holds them).
static inline __m512 round_as(__m512 v, const float*) { return v; }
static inline __m512 round_as(__m512 v, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_and_si512(bf16_round_bits(v), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
static inline __m512 round_as(__m512 v, const c10::Half*) {
  return _mm512_maskz_cvtph_ps(kAll, _mm512_maskz_cvtps_ph(kAll, v, _MM_FROUND_TO_NEAREST_INT));
}
template <typename T>
static inline __m512 round_as(__m512 v) { return round_as(v, static_cast<const T*>(nullptr)); }

static inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
static inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_maskz_cvtepi32_epi16(kAll, _mm512_maskz_srli_epi32(kAll, bf16_round_bits(v), 16)));
}
static inline void store16(c10::Half* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtps_ph(kAll, v, _MM_FROUND_TO_NEAREST_INT));
}

// The first n (<= 16) lanes, zero in the rest; nothing past p + n is read (masked loads do not fault).
static inline __m512 load_partial(const float* p, int n) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
}
static inline __m512 load_partial(const c10::BFloat16* p, int n) {
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
  return _mm512_castsi512_ps(shl16(widen_u16(h)));
}
static inline __m512 load_partial(const c10::Half* p, int n) {
  return _mm512_maskz_cvtph_ps(kAll, _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
}

// Sum of the 16 lanes, through memory (see the note on GCC 12 above); once per row or tile, not per step.
static inline float hsum(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  const __m256 h = _mm256_add_ps(_mm256_load_ps(lanes), _mm256_load_ps(lanes + 8));
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

}  // namespace avx512
}  // namespace lfmk
