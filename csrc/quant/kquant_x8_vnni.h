// VNNI variant of the x8 K-quant tile (layout and contract in quant/kquant_x8.h; the AVX2 tile it
// replaces is quant/kquant_x8_avx2.h). Included twice by quant/kquant_kernels.h, between target
// pragmas that enable AVX2+FMA+F16C plus either AVX-VNNI or AVX512-VNNI+VL, with LFMK_QVNNI_NS
// naming the namespace and LFMK_QVNNI_DPBUSD the intrinsic of that variant; call only when the CPU
// has it.
//
// Q4_K: decode of Q4_K weights is bound by the tile's vector ALU ops, not by memory, on the server
// cores measured. The AVX2 tile spends two per qs vector and row of x on vpmaddubsw + an int16 add,
// and three on the nibbles; here one vpdpbusd per vector sums each sub-block's products straight
// into int32, the high nibbles stay in place (one AND: 16 * q, its exact sums shifted back once per
// sub-block), and the sub-block scale multiplies the int32 sum once (vpmulld) instead of weighting
// int16 partial sums with vpmaddwd. The integers are kquant.h's exact S1 / S2 (|sub-block dot| <=
// 32 * 15 * 127, |S1| < 2^25), so the bits are the AVX2 tile's.
// Q6_K: the same for its 6-bit q (unpacked as the AVX2 tile does): one vpdpbusd per vector into
// each 16-element sub-block's int32 sum (<= 16 * 63 * 127), times its sign-extended int8 scale
// (|S| < 2^29).
// Q5_K: as Q4_K, its fifth bits ored in from the qh vectors (so its high nibbles are shifted down:
// a fifth bit has no room above an in-place nibble); sub-block dots <= 32 * 31 * 127.

namespace lfmk {
namespace quant {
namespace LFMK_QVNNI_NS {

template <KFormat F, int G, int M>
static inline void kx8_tile(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq,
                            const float* xd, int64_t ldd, const int16_t* xs, int64_t lds, float* res, int64_t ldr) {
  if constexpr (F == KFormat::Q6_K) {
    constexpr int64_t kGB = kKX8Rows * KTraits<F>::kBytes;
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    // byte j of each lane to the lane's top byte: an arithmetic shift then sign-extends it to int32
    const __m256i top[4] = {kavx2::lane_bytes(-1, -1, -1, 0), kavx2::lane_bytes(-1, -1, -1, 1),
                            kavx2::lane_bytes(-1, -1, -1, 2), kavx2::lane_bytes(-1, -1, -1, 3)};
    const __m256i pair[2] = {kavx2::lane_bytes(-1, 0, -1, 1), kavx2::lane_bytes(-1, 2, -1, 3)};
    __m256 acc[G][M];
    for (int g = 0; g < G; ++g)
      for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nsb; ++b) {
      const int8_t* x[M];
      for (int m = 0; m < M; ++m) x[m] = xq + m * ldq + b * kSuper;
      for (int g = 0; g < G; ++g) {
        const uint8_t* blk = w + g * gstride + b * kGB;
        prefetch_stream(blk, static_cast<int>(kGB));  // common.h: decode streams these bytes once
        __m256i scv[4];
        for (int i = 0; i < 4; ++i) scv[i] = kavx2::ld(blk + 1536 + 32 * i);
        __m256i S[M], O[M];
        for (int m = 0; m < M; ++m) S[m] = O[m] = _mm256_setzero_si256();
        for (int h = 0; h < 2; ++h)
          for (int half = 0; half < 2; ++half) {
            // elements 128h + 32k + 4t .. + 3 for k < 4, t in [4 half, 4 half + 4): sub-block 8h + 2k + half
            __m256i p[4][M];
            for (int kk = 0; kk < 4; ++kk)
              for (int m = 0; m < M; ++m) p[kk][m] = _mm256_setzero_si256();
            for (int t = 4 * half; t < 4 * half + 4; ++t) {
              const __m256i la = kavx2::ld(blk + 32 * (16 * h + t)), lb = kavx2::ld(blk + 32 * (16 * h + 8 + t));
              const __m256i qh = kavx2::ld(blk + 1024 + 32 * (8 * h + t));
              const __m256i q[4] = {
                  _mm256_or_si256(_mm256_and_si256(la, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30)),
                  _mm256_or_si256(_mm256_and_si256(lb, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30)),
                  _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4), _mm256_and_si256(qh, m30)),
                  _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4),
                                  _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30))};
              for (int kk = 0; kk < 4; ++kk)
                for (int m = 0; m < M; ++m)
                  p[kk][m] = LFMK_QVNNI_DPBUSD(p[kk][m], q[kk], kavx2::bcast4(x[m] + 128 * h + 32 * kk + 4 * t));
            }
            for (int kk = 0; kk < 4; ++kk) {
              const int j = 8 * h + 2 * kk + half;
              const __m256i sc = _mm256_srai_epi32(_mm256_shuffle_epi8(scv[j / 4], top[j % 4]), 24);
              for (int m = 0; m < M; ++m) S[m] = _mm256_add_epi32(S[m], _mm256_mullo_epi32(p[kk][m], sc));
            }
          }
        // the -32 of every q: 32 * sum_j sc_j * sum(x_j), scales paired (sc_2i, sc_2i+1) as int16
        for (int i = 0; i < 8; ++i) {
          const __m256i sp = _mm256_srai_epi16(_mm256_shuffle_epi8(scv[i / 2], pair[i % 2]), 8);
          for (int m = 0; m < M; ++m)
            O[m] = _mm256_add_epi32(O[m], _mm256_madd_epi16(sp, kavx2::bcast4(xs + m * lds + b * kSub16 + 2 * i)));
        }
        const __m256 d = kavx2::half8(blk + 1664);
        for (int m = 0; m < M; ++m) {
          const __m256i s = _mm256_sub_epi32(S[m], _mm256_slli_epi32(O[m], 5));
          acc[g][m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(xd[m * ldd + b]), d), _mm256_cvtepi32_ps(s), acc[g][m]);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
  } else {
    constexpr int64_t kGB = kKX8Rows * KTraits<F>::kBytes;
    constexpr int kQs = F == KFormat::Q4_K ? 128 : 384;  // Q5_K: 8 qh vectors before the qs
    const __m256i bit4 = _mm256_set1_epi8(0x10);
    // qh shifted left by n bits (right by -n) in 16-bit lanes; n is a constant once the loop unrolls
    const auto shift_bits = [](__m256i v, int n) {
      return n >= 0 ? _mm256_sll_epi16(v, _mm_cvtsi32_si128(n)) : _mm256_srl_epi16(v, _mm_cvtsi32_si128(-n));
    };
    const __m256i m6 = _mm256_set1_epi32(0x3f3f3f3f), m4 = _mm256_set1_epi32(0x0f0f0f0f),
                  m2 = _mm256_set1_epi32(0x03030303), m4hi = _mm256_set1_epi8(static_cast<char>(0xF0));
    // byte j of each lane zero-extended to the lane's int32: sub-block j's scale (j < 4 of a vector)
    const __m256i pick[4] = {kavx2::lane_bytes(0, -1, -1, -1), kavx2::lane_bytes(1, -1, -1, -1),
                             kavx2::lane_bytes(2, -1, -1, -1), kavx2::lane_bytes(3, -1, -1, -1)};
    const __m256i pair[2] = {kavx2::lane_bytes(0, -1, 1, -1), kavx2::lane_bytes(2, -1, 3, -1)};
    __m256 acc[G][M];
    for (int g = 0; g < G; ++g)
      for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nsb; ++b) {
      const int8_t* x[M];
      for (int m = 0; m < M; ++m) x[m] = xq + m * ldq + b * kSuper;
      for (int g = 0; g < G; ++g) {
        const uint8_t* blk = w + g * gstride + b * kGB;
        prefetch_stream(blk, static_cast<int>(kGB));  // common.h: decode streams these bytes once
        const __m256i u0 = kavx2::ld(blk + 32), u1 = kavx2::ld(blk + 64), u2 = kavx2::ld(blk + 96);
        const __m256i sc_lo = _mm256_and_si256(u0, m6);
        const __m256i sc_hi = _mm256_or_si256(_mm256_and_si256(u2, m4),
                                              _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), m2), 4));
        const __m256i mn_lo = _mm256_and_si256(u1, m6);
        const __m256i mn_hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), m4),
                                              _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), m2), 4));
        __m256i S1[M], S2[M];
        for (int m = 0; m < M; ++m) S1[m] = S2[m] = _mm256_setzero_si256();
        for (int c = 0; c < 4; ++c) {
          // qs vectors 8c..8c+7: sub-block 2c in the low nibbles, 2c + 1 in the high ones
          const __m256i scv = c < 2 ? sc_lo : sc_hi;
          const __m256i sc_a = _mm256_shuffle_epi8(scv, pick[(2 * c) % 4]);
          const __m256i sc_b = _mm256_shuffle_epi8(scv, pick[(2 * c + 1) % 4]);
          __m256i sa[M], sb16[M];
          for (int m = 0; m < M; ++m) sa[m] = sb16[m] = _mm256_setzero_si256();
          for (int t = 0; t < 8; ++t) {
            const __m256i v = kavx2::ld(blk + kQs + 32 * (8 * c + t));
            __m256i lo = _mm256_and_si256(v, m4), hi;
            if constexpr (F == KFormat::Q5_K) {
              // the fifth bit of sub-blocks 2c and 2c + 1 (bits 2c, 2c + 1 of each qh byte) to bit 4
              const __m256i qh = kavx2::ld(blk + 128 + 32 * t);
              lo = _mm256_or_si256(lo, _mm256_and_si256(shift_bits(qh, 4 - 2 * c), bit4));
              hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), m4),
                                   _mm256_and_si256(shift_bits(qh, 3 - 2 * c), bit4));
            } else {
              hi = _mm256_and_si256(v, m4hi);  // 16 * q: shifted back once per sub-block below
            }
            for (int m = 0; m < M; ++m) {
              sa[m] = LFMK_QVNNI_DPBUSD(sa[m], lo, kavx2::bcast4(x[m] + 64 * c + 4 * t));
              sb16[m] = LFMK_QVNNI_DPBUSD(sb16[m], hi, kavx2::bcast4(x[m] + 64 * c + 32 + 4 * t));
            }
          }
          for (int m = 0; m < M; ++m) {
            const __m256i sb = F == KFormat::Q5_K ? sb16[m] : _mm256_srai_epi32(sb16[m], 4);
            S1[m] = _mm256_add_epi32(S1[m], _mm256_add_epi32(_mm256_mullo_epi32(sa[m], sc_a),
                                                             _mm256_mullo_epi32(sb, sc_b)));
          }
        }
        const __m256i mp[4] = {_mm256_shuffle_epi8(mn_lo, pair[0]), _mm256_shuffle_epi8(mn_lo, pair[1]),
                               _mm256_shuffle_epi8(mn_hi, pair[0]), _mm256_shuffle_epi8(mn_hi, pair[1])};
        for (int m = 0; m < M; ++m) {
          const int16_t* s = xs + m * lds + b * (kSub16 / 2);
          for (int i = 0; i < 4; ++i)
            S2[m] = _mm256_add_epi32(S2[m], _mm256_madd_epi16(mp[i], kavx2::bcast4(s + 2 * i)));
        }
        const __m256 d = kavx2::half8(blk), dmin = kavx2::half8(blk + 16);
        for (int m = 0; m < M; ++m) {
          const __m256 t = _mm256_fmsub_ps(d, _mm256_cvtepi32_ps(S1[m]), _mm256_mul_ps(dmin, _mm256_cvtepi32_ps(S2[m])));
          acc[g][m] = _mm256_fmadd_ps(_mm256_set1_ps(xd[m * ldd + b]), t, acc[g][m]);
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
  }
}

}  // namespace LFMK_QVNNI_NS
}  // namespace quant
}  // namespace lfmk
