// VNNI path of the quantized kernels (see quant.h for the interface): the AVX2 tile with each
// block's vpmaddubsw + vpmaddwd pair replaced by one vpdpbusd (u8 x s8, four products summed into
// int32 without an int16 step). Included twice by a translation unit, between target pragmas that
// enable AVX2+FMA+F16C plus either AVX-VNNI or AVX512-VNNI+VL, with LFMK_QVNNI_NS naming the
// namespace and LFMK_QVNNI_DPBUSD the intrinsic of that variant; call only when the CPU has it.
// Activation quantization is the AVX2 one (avx2.h), which these targets can inline.

namespace lfmk {
namespace quant {
namespace LFMK_QVNNI_NS {

template <Format F, int R, int M>
static inline void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                        int64_t nb, float* res) {
  constexpr int kB = Traits<F>::kBytes;
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i wq[R], aw[R];
    float dw[R];
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * w_ld + b * kB;
      wq[r] = avx2::load_wq<F>(blk);
      aw[r] = _mm256_abs_epi8(wq[r]);
      dw[r] = avx2::scale(blk);
    }
    for (int m = 0; m < M; ++m) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * ldq + b * kBlock));
      const float dx = xd[m * ldd + b];
      for (int r = 0; r < R; ++r) {
        const __m256i p32 = LFMK_QVNNI_DPBUSD(_mm256_setzero_si256(), aw[r], _mm256_sign_epi8(xv, wq[r]));
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p32), _mm256_set1_ps(dw[r] * dx), acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) res[r * M + m] = lfmk::avx2::hsum(acc[r][m]);
}


// The packed-panel tile of avx2.h (same layout, packed by avx2::pack_group) with vpdpbusd
// accumulating straight into int32: Q4_0's unsigned nibbles times x, Q8_0's |w| times x signed by w.
template <Format F, int G, int M>
static inline void panel_tile(const uint8_t* pk, int64_t gstride, int64_t nb, const int8_t* xq, int64_t ldq,
                              const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr) {
  __m256 acc[G][M];
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int g = 0; g < G; ++g) {
      const uint8_t* blk = pk + g * gstride + b * avx2::kPackedBlockBytes;
      __m256i s[M];
      for (int m = 0; m < M; ++m) s[m] = _mm256_setzero_si256();
      for (int j = 0; j < 8; ++j) {
        const __m256i wv = _mm256_load_si256(reinterpret_cast<const __m256i*>(blk + 32 * j));
        if (F == Format::Q4_0) {
          for (int m = 0; m < M; ++m) s[m] = LFMK_QVNNI_DPBUSD(s[m], wv, avx2::bcast4(xq + m * ldq + b * kBlock + 4 * j));
        } else {
          const __m256i aw = _mm256_abs_epi8(wv);
          for (int m = 0; m < M; ++m)
            s[m] = LFMK_QVNNI_DPBUSD(s[m], aw, _mm256_sign_epi8(avx2::bcast4(xq + m * ldq + b * kBlock + 4 * j), wv));
        }
      }
      const __m256 dw = _mm256_load_ps(reinterpret_cast<const float*>(blk + 256));
      for (int m = 0; m < M; ++m) {
        __m256i isum = s[m];
        if (F == Format::Q4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(xs8[m * lds + b]));
        const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(xd[m * ldd + b]));
        acc[g][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, acc[g][m]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
}

// The x8-layout tile of quant/x8_avx2.h with vpdpbusd accumulating straight into int32 (Q4_0's
// unsigned nibbles times x; Q8_0's |w| times x signed by w); the same exact integers, so the same bits.
// The G groups go through a block together, so each 4-byte broadcast of x is loaded once for all of
// them rather than once per group (as in the K-quant tiles, quant/kquant_x8_vnni.h). One Zen 4 core,
// weights in L2: Q4_0 56-58 -> 62-63 GB/s at M = 1 and 15.5 -> 18.5 at M = 4; Q8_0 unchanged at M = 1
// (its sign per weight vector, not loads, is the cost), +4-6% at M = 2-4.
template <Format F, int G, int M>
static inline void x8_tile(const uint8_t* w, int64_t gstride, int64_t nb, const int8_t* xq, int64_t ldq,
                           const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr,
                           int64_t pf) {
#if defined(LFMK_QVNNI_ZMM)
  x8_tile_zmm<F, G, M>(w, gstride, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr, pf);
#else
  constexpr int64_t kGB = X8<F>::kGroupBlockBytes;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i m4hi = _mm256_set1_epi8(static_cast<char>(0xF0));
  __m256 acc[G][M];
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk[G];
    __m256i s[G][M];
    for (int g = 0; g < G; ++g) {
      blk[g] = w + g * gstride + b * kGB;
      prefetch_ahead(blk[g], pf, static_cast<int>(kGB));  // pf: the caller's (common.h)
      for (int m = 0; m < M; ++m) s[g][m] = _mm256_setzero_si256();
    }
    if (F == Format::Q4_0) {
      __m256i s16[G][M];
      for (int g = 0; g < G; ++g)
        for (int m = 0; m < M; ++m) s16[g][m] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        __m256i xa[M], xb[M];
        for (int m = 0; m < M; ++m) {
          const int8_t* x = xq + m * ldq + b * kBlock;
          xa[m] = avx2::bcast4(x + 4 * j);
          xb[m] = avx2::bcast4(x + 16 + 4 * j);
        }
        for (int g = 0; g < G; ++g) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[g] + 16 + 32 * j));
          const __m256i lo = _mm256_and_si256(v, m4), hi16 = _mm256_and_si256(v, m4hi);
          for (int m = 0; m < M; ++m) {
            s[g][m] = LFMK_QVNNI_DPBUSD(s[g][m], lo, xa[m]);
            s16[g][m] = LFMK_QVNNI_DPBUSD(s16[g][m], hi16, xb[m]);
          }
        }
      }
      for (int g = 0; g < G; ++g)
        for (int m = 0; m < M; ++m) s[g][m] = _mm256_add_epi32(s[g][m], _mm256_srai_epi32(s16[g][m], 4));
    } else {
      for (int j = 0; j < 8; ++j) {
        __m256i xa[M];
        for (int m = 0; m < M; ++m) xa[m] = avx2::bcast4(xq + m * ldq + b * kBlock + 4 * j);
        for (int g = 0; g < G; ++g) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk[g] + 16 + 32 * j));
          const __m256i aw = _mm256_abs_epi8(v);
          for (int m = 0; m < M; ++m) s[g][m] = LFMK_QVNNI_DPBUSD(s[g][m], aw, _mm256_sign_epi8(xa[m], v));
        }
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk[g])));
      for (int m = 0; m < M; ++m) {
        __m256i isum = s[g][m];
        if (F == Format::Q4_0) isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(xs8[m * lds + b]));
        const __m256 sc = _mm256_mul_ps(dw, _mm256_set1_ps(xd[m * ldd + b]));
        acc[g][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sc, acc[g][m]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
#endif
}

}  // namespace LFMK_QVNNI_NS
}  // namespace quant
}  // namespace lfmk
