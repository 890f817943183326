// AVX2+FMA+F16C vector helpers. Include only between LFMK_AVX2_BEGIN and LFMK_AVX2_END, after
// common.h: every function here is compiled for AVX2 and must only run when cpu_has_avx2().
// All helpers are static so each op's translation unit keeps its own copy (no ODR mixing of
// AVX2 and baseline code by the linker).
#pragma once

namespace lfmk {
namespace avx2 {

// An empty asm that takes v in a register and may change it: the compiler must finish v's sum here
// and cannot reorder it. The int16 sums are exact, so GCC reassociates their add chains into trees
// that compute every vpmaddubsw of a flush first; with AVX2's 16 registers those products went to
// the stack and back (in the K-quant x8 tile, a sixth of its instructions were such moves).
static inline void in_register(__m256i& v) { asm("" : "+x"(v)); }

// 8 lanes of float from float / bf16 / fp16 memory.
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Loads the first n (< 8) lanes, zero in the rest: for row tails without reading past the end.
template <typename T>
static inline __m256 load_partial(const T* p, int n) {
  alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < n; ++i) buf[i] = to_f32(p[i]);
  return _mm256_load_ps(buf);
}

// fp32 bits rounded to bf16 precision (round-to-nearest-even) in the high 16 bits of each lane;
// NaN becomes the canonical quiet NaN 0x7FC0, as c10::BFloat16 does, so stored states match torch.
static inline __m256i bf16_round_bits(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(_mm256_add_epi32(x, _mm256_set1_epi32(0x7FFF)), lsb);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC00000), nan);
}

// float -> 8 packed bf16 (round-to-nearest-even): pick the high half of each lane, then join the lanes.
static inline __m128i cvt_bf16(__m256 v) {
  const __m256i hi = _mm256_shuffle_epi8(
      bf16_round_bits(v), _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                           2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1));
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(hi, 0x08));
}

static inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
static inline void store8(c10::BFloat16* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), cvt_bf16(v));
}
static inline void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

template <typename T>
static inline void store_partial(T* p, __m256 v, int n) {
  alignas(32) float buf[8];
  _mm256_store_ps(buf, v);
  for (int i = 0; i < n; ++i) p[i] = from_f32<T>(buf[i]);
}

// Rounds each lane to T's precision and back (u = B*x is stored in the input dtype).
static inline __m256 round_as(__m256 v, const float*) { return v; }
static inline __m256 round_as(__m256 v, const c10::BFloat16*) {
  return _mm256_castsi256_ps(_mm256_and_si256(bf16_round_bits(v), _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
static inline __m256 round_as(__m256 v, const c10::Half*) {
  return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
template <typename T>
static inline __m256 round_as(__m256 v) { return round_as(v, static_cast<const T*>(nullptr)); }

static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for x <= 0 region used by softmax / sigmoid; relative error ~2e-7 over [-87, 88].
// Cody-Waite range reduction to 2^n * exp(r), |r| <= ln2/2, degree-6 polynomial.
static inline __m256 exp8(__m256 x) {
  const __m256 max_x = _mm256_set1_ps(88.3762626647949f);
  const __m256 min_x = _mm256_set1_ps(-87.3365447504019f);
  x = _mm256_min_ps(_mm256_max_ps(x, min_x), max_x);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  __m256 r2 = _mm256_mul_ps(r, r);
  p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// silu(x) = x / (1 + exp(-x))
static inline __m256 silu8(__m256 x) {
  __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
  return _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

}  // namespace avx2
}  // namespace lfmk
