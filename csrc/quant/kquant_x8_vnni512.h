// The 512-bit vector operations of the K-quant x8 decode tile (quant/kquant_x8_vnni.h, kx8_tile_vec),
// for the AVX512-VNNI path. Included once, by quant/kquant_kernels.h, inside the target region that
// enables AVX-512 F/BW/VL/VNNI, before quant/kquant_x8_vnni.h.
//
// One zmm holds two consecutive qs (and qh) vectors of a group-block: the same 8 rows at 4 more k.
// Both halves of a vector then belong to the same sub-block, so the sub-block's scale (its byte picked
// into both halves) multiplies the 512-bit int32 dot, and the super-block's S folds its two halves
// once, exactly, before the 256-bit finish (the same integers: the same bits as every other path).
// The x bytes of a vector pair are one vpermd of the 64 activation bytes in reach (lanes 0-7 dword t,
// lanes 8-15 dword t + 1).
// Measured on 2 Zen 5 cores (full-width AVX-512), 6144 x 2048 weights in L3, 2 threads, GB/s of
// weight read, 256-bit VNNI tile -> this one: Q4_K 94 -> 119 at one row of x, 42 -> 56 at four;
// Q6_K 88 -> 100 and 24 -> 46. A one-row decode from DRAM is bound by memory there (unchanged).

#include "quant/zmm_common.h"

namespace lfmk {
namespace quant {
namespace avx512vnni {

struct KZmm {
  using V = __m512i;
  static constexpr int kStep = 2;
  // L * 64 activation bytes in reach of a step, in L zmm
  template <int L>
  struct X {
    __m512i z[L];
  };
  // xpick[p]: lanes 0-7 dword 2p, lanes 8-15 dword 2p + 1 of a zmm (built once, kept in registers)
  __m512i xpick[8];
  KZmm() {
    #pragma GCC unroll 16
    for (int p = 0; p < 8; ++p) xpick[p] = zmm_pair_pick(p);
  }
  template <int L>
  static X<L> xload(const int8_t* p) {
    X<L> x;
    #pragma GCC unroll 4
    for (int i = 0; i < L; ++i) x.z[i] = _mm512_loadu_si512(p + 64 * i);
    return x;
  }
  // dword d of x in lanes 0-7, dword d + 1 in lanes 8-15 (d even: a vector pair's activation bytes)
  template <int L>
  V xdw(const X<L>& x, int d) const { return _mm512_permutexvar_epi32(xpick[(d % 16) / 2], x.z[d / 16]); }
  static V ld(const void* p) { return _mm512_loadu_si512(p); }
  static V dup(__m256i v) { return _mm512_broadcast_i64x4(v); }
  static V set1(char c) { return _mm512_set1_epi8(c); }
  static V zero() { return _mm512_setzero_si512(); }
  static V and_(V a, V b) { return _mm512_and_si512(a, b); }
  static V or_(V a, V b) { return _mm512_or_si512(a, b); }
  static V add32(V a, V b) { return _mm512_add_epi32(a, b); }
  static V mullo32(V a, V b) { return _mm512_mullo_epi32(a, b); }
  static V shuffle8(V a, V b) { return _mm512_shuffle_epi8(a, b); }
  static V slli16(V v, int n) { return _mm512_slli_epi16(v, n); }
  static V srli16(V v, int n) { return _mm512_srli_epi16(v, n); }
  static V srai32(V v, int n) { return _mm512_srai_epi32(v, n); }
  static V shift16(V v, int n) {
    return n >= 0 ? _mm512_sll_epi16(v, _mm_cvtsi32_si128(n)) : _mm512_srl_epi16(v, _mm_cvtsi32_si128(-n));
  }
  static V dpbusd(V acc, V u8, V s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
  // the two halves' int32 sums folded into the 8 rows' lanes
  static __m256i fold(V v) { return zmm_fold_halves(v); }
};

}  // namespace avx512vnni
}  // namespace quant
}  // namespace lfmk
