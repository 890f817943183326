// VNNI variants of the K-quant tiles: the x8 decode tile (layout and contract in quant/kquant_x8.h;
// the AVX2 tile it replaces is quant/kquant_x8_avx2.h) and the packed prefill panel (kquant_avx2.h's
// kpanel_tile, at the end). Included twice by quant/kquant_kernels.h, between target pragmas that
// enable AVX2+FMA+F16C plus either AVX-VNNI or AVX512-VNNI+VL, with LFMK_QVNNI_NS naming the
// namespace and LFMK_QVNNI_DPBUSD the intrinsic of that variant; call only when the CPU has it.
//
// Q4_K: decode of Q4_K weights is bound by the tile's vector ALU ops, not by memory, on the server
// cores measured. The AVX2 tile spends two per qs vector and row of x on vpmaddubsw + an int16 add,
// and three on the nibbles; here one vpdpbusd per vector sums each sub-block's products straight
// into int32, the high nibbles stay in place (one AND: 16 * q, its exact sums shifted back once per
// sub-block), and the sub-block scale multiplies the int32 sum once (vpmulld) instead of weighting
// int16 partial sums with vpmaddwd. The integers are kquant.h's exact S1 / S2 (|sub-block dot| <=
// 32 * 15 * 127, |S1| < 2^25), so the bits are the AVX2 tile's. The G groups of a call go through a
// block's sub-blocks together: each 4-byte broadcast of x is then loaded once for all G groups instead
// of once per group. At G = 2 that is a third fewer loads per weight vector (two broadcasts shared,
// one weight load each), which is what limited this tile: on a Zen 4 core, weights in L2, it went
// from 35 to 41-42 GB/s at M = 1 and from 17 to 20 GB/s at M = 4 (Q6_K, bound by its unpacking
// instead, gained 2% the same way and keeps one group at a time).
// The AVX512-VNNI variant runs the same tile (kx8_tile_vec) on 512-bit vectors: quant/kquant_x8_vnni512.h.
// Q6_K: the same for its 6-bit q (unpacked as the AVX2 tile does): one vpdpbusd per vector into
// each 16-element sub-block's int32 sum (<= 16 * 63 * 127), times its sign-extended int8 scale
// (|S| < 2^29).
// Q5_K: as Q4_K, its fifth bits ored in from the qh vectors (so its high nibbles are shifted down:
// a fifth bit has no room above an in-place nibble); sub-block dots <= 32 * 31 * 127.

namespace lfmk {
namespace quant {
namespace LFMK_QVNNI_NS {

// The vector operations of the x8 tile below at 256 bits (this variant's vpdpbusd). The 512-bit ones
// (quant/kquant_x8_vnni512.h, KZmm) have the same members: a load then covers kStep consecutive 32-byte
// weight vectors of a group-block (the same 8 rows at kStep times more k).
struct KYmm {
  using V = __m256i;
  static constexpr int kStep = 1;
  // L * 64 activation bytes in reach of a step (a ymm tile broadcasts each dword from memory)
  template <int L>
  struct X {
    const int8_t* p;
  };
  template <int L>
  static X<L> xload(const int8_t* p) { return {p}; }
  // dword d of x in every lane
  template <int L>
  static V xdw(const X<L>& x, int d) { return kavx2::bcast4(x.p + 4 * d); }
  static V ld(const void* p) { return kavx2::ld(p); }
  static V dup(__m256i v) { return v; }
  static V set1(char c) { return _mm256_set1_epi8(c); }
  static V zero() { return _mm256_setzero_si256(); }
  static V and_(V a, V b) { return _mm256_and_si256(a, b); }
  static V or_(V a, V b) { return _mm256_or_si256(a, b); }
  static V add32(V a, V b) { return _mm256_add_epi32(a, b); }
  static V mullo32(V a, V b) { return _mm256_mullo_epi32(a, b); }
  static V shuffle8(V a, V b) { return _mm256_shuffle_epi8(a, b); }
  static V slli16(V v, int n) { return _mm256_slli_epi16(v, n); }
  static V srli16(V v, int n) { return _mm256_srli_epi16(v, n); }
  static V srai32(V v, int n) { return _mm256_srai_epi32(v, n); }
  static V shift16(V v, int n) { return kavx2::shift16(v, n); }
  static V dpbusd(V acc, V u8, V s8) { return LFMK_QVNNI_DPBUSD(acc, u8, s8); }
  // the 8 rows' int32 sums
  static __m256i fold(V v) { return v; }
};

// The x8 tile, written once over the vector operations Vec (KYmm; KZmm on AVX512-VNNI). Per step of
// kStep weight vectors: the G groups' unpacked q against the activation dwords of those vectors,
// into each sub-block's int32 dot; times the sub-block's scale (vpmulld) into S, exactly; S folded to
// the 8 rows' lanes and finished in fp32 by the AVX2 tile's steps (kavx2::kx8_finish45 / 6).
template <class Vec, KFormat F, int G, int M>
static inline void kx8_tile_vec(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq,
                                const float* xd, int64_t ldd, const int16_t* xs, int64_t lds, float* res,
                                int64_t ldr, int64_t next) {
  using V = typename Vec::V;
  constexpr int kStep = Vec::kStep;
  const Vec o;
  constexpr int64_t kGB = kKX8Rows * KTraits<F>::kBytes;
  const KX8Ahead ahead(w, gstride, nsb, next, kGB, G);
  constexpr int kQs = F == KFormat::Q4_K ? 128 : 384;  // Q5_K: 8 qh vectors before the qs
  const V m4 = o.set1(0x0F), m4hi = o.set1(static_cast<char>(0xF0)), bit4 = o.set1(0x10), m30 = o.set1(0x30);
  // byte j of each lane zero-extended to the lane's int32 (Q4_K / Q5_K's unsigned scales), or moved
  // to its top byte for an arithmetic shift to sign-extend (Q6_K's int8 scales)
  V pick[4];
  #pragma GCC unroll 16
  for (int j = 0; j < 4; ++j)
    pick[j] = o.dup(F == KFormat::Q6_K ? kavx2::lane_bytes(-1, -1, -1, j) : kavx2::lane_bytes(j, -1, -1, -1));
  __m256i pair[2];
  if constexpr (F == KFormat::Q6_K)
    kavx2::kx8_pair6(pair);
  else
    kavx2::kx8_pair45(pair);
  __m256 acc[G][M];
  for (int g = 0; g < G; ++g)
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) acc[g][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const int8_t* x[M];
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) x[m] = xq + m * ldq + b * kSuper;
    if constexpr (F == KFormat::Q6_K) {
      for (int g = 0; g < G; ++g) {
        const uint8_t* blk = w + g * gstride + b * kGB;
        const uintptr_t pa = ahead.at(b, g);
        V S[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) S[m] = o.zero();
        __m256i scv[4];
        V scw[4];
        #pragma GCC unroll 16
        for (int i = 0; i < 4; ++i) {
          scv[i] = kavx2::ld(blk + 1536 + 32 * i);
          scw[i] = o.dup(scv[i]);
        }
        // unrolled: the sub-block index j = 8h + 2k + half then picks its scale vector and shuffle at
        // compile time (left as loops, both were indexed arrays in memory on every sub-block)
        #pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          typename Vec::template X<2> xh[M];  // elements 128h .. 128h + 127
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) xh[m] = o.template xload<2>(x[m] + 128 * h);
          #pragma GCC unroll 2
          for (int half = 0; half < 2; ++half) {
            // elements 128h + 32k + 4t .. + 3 for k < 4, t in [4 half, 4 half + 4): sub-block 8h + 2k + half
            kx8_prefetch_piece<kGB, 4>(pa, 2 * h + half);
            V p[4][M];
            #pragma GCC unroll 16
            for (int k = 0; k < 4; ++k)
              #pragma GCC unroll 16
              for (int m = 0; m < M; ++m) p[k][m] = o.zero();
            #pragma GCC unroll 4
            for (int t = 4 * half; t < 4 * half + 4; t += kStep) {
              // the 6-bit q of vectors t .. t + kStep - 1 (as kavx2::kx8_q6)
              const V la = o.ld(blk + 32 * (16 * h + t)), lb = o.ld(blk + 32 * (16 * h + 8 + t));
              const V qh = o.ld(blk + 1024 + 32 * (8 * h + t));
              V q[4];
              q[0] = o.or_(o.and_(la, m4), o.and_(o.slli16(qh, 4), m30));
              q[1] = o.or_(o.and_(lb, m4), o.and_(o.slli16(qh, 2), m30));
              q[2] = o.or_(o.and_(o.srli16(la, 4), m4), o.and_(qh, m30));
              q[3] = o.or_(o.and_(o.srli16(lb, 4), m4), o.and_(o.srli16(qh, 2), m30));
              #pragma GCC unroll 16
              for (int k = 0; k < 4; ++k)
                #pragma GCC unroll 16
                for (int m = 0; m < M; ++m) p[k][m] = o.dpbusd(p[k][m], q[k], o.xdw(xh[m], 8 * k + t));
            }
            #pragma GCC unroll 16
            for (int k = 0; k < 4; ++k) {
              const int j = 8 * h + 2 * k + half;
              const V sc = o.srai32(o.shuffle8(scw[j / 4], pick[j % 4]), 24);
              #pragma GCC unroll 16
              for (int m = 0; m < M; ++m) S[m] = o.add32(S[m], o.mullo32(p[k][m], sc));
            }
          }
        }
        __m256i S8[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) S8[m] = o.fold(S[m]);
        kavx2::kx8_finish6<M>(blk, scv, pair, xs, lds, xd, ldd, b, S8, acc[g]);
      }
    } else {
      // The G groups go through each sub-block together, so that every activation dword in a vector
      // serves all of them (see the top of this file).
      const uint8_t* blk[G];
      kavx2::KX8Scales45 sv[G];
      V sc_lo[G], sc_hi[G];
      uintptr_t pa[G];
      V S[G][M];
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        blk[g] = w + g * gstride + b * kGB;
        pa[g] = ahead.at(b, g);
        sv[g] = kavx2::kx8_scales45(blk[g]);
        sc_lo[g] = o.dup(sv[g].sc_lo);
        sc_hi[g] = o.dup(sv[g].sc_hi);
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) S[g][m] = o.zero();
      }
      #pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g) kx8_prefetch_piece<kGB, 4>(pa[g], c);
        // qs vectors 8c..8c+7: sub-block 2c in the low nibbles (x dwords 0..7 of the 64 bytes at 64c),
        // 2c + 1 in the high ones (dwords 8..15)
        typename Vec::template X<1> xc[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) xc[m] = o.template xload<1>(x[m] + 64 * c);
        V sa[G][M], sb[G][M];
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g)
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) sa[g][m] = sb[g][m] = o.zero();
        #pragma GCC unroll 16
        for (int t = 0; t < 8; t += kStep) {
          V xa[M], xb[M];
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            xa[m] = o.xdw(xc[m], t);
            xb[m] = o.xdw(xc[m], 8 + t);
          }
          #pragma GCC unroll 16
          for (int g = 0; g < G; ++g) {
            const V v = o.ld(blk[g] + kQs + 32 * (8 * c + t));
            V lo = o.and_(v, m4), hi;
            if constexpr (F == KFormat::Q5_K) {
              // the fifth bit of sub-blocks 2c and 2c + 1 (bits 2c, 2c + 1 of each qh byte) to bit 4
              const V qh = o.ld(blk[g] + 128 + 32 * t);
              lo = o.or_(lo, o.and_(o.shift16(qh, 4 - 2 * c), bit4));
              hi = o.or_(o.and_(o.srli16(v, 4), m4), o.and_(o.shift16(qh, 3 - 2 * c), bit4));
            } else {
              hi = o.and_(v, m4hi);  // 16 * q: shifted back once per sub-block below
            }
            #pragma GCC unroll 16
            for (int m = 0; m < M; ++m) {
              sa[g][m] = o.dpbusd(sa[g][m], lo, xa[m]);
              sb[g][m] = o.dpbusd(sb[g][m], hi, xb[m]);
            }
          }
        }
        #pragma GCC unroll 16
        for (int g = 0; g < G; ++g) {
          const V scv = c < 2 ? sc_lo[g] : sc_hi[g];
          const V sc_a = o.shuffle8(scv, pick[(2 * c) % 4]);
          const V sc_b = o.shuffle8(scv, pick[(2 * c + 1) % 4]);
          #pragma GCC unroll 16
          for (int m = 0; m < M; ++m) {
            const V b16 = F == KFormat::Q5_K ? sb[g][m] : o.srai32(sb[g][m], 4);
            S[g][m] = o.add32(S[g][m], o.add32(o.mullo32(sa[g][m], sc_a), o.mullo32(b16, sc_b)));
          }
        }
      }
      #pragma GCC unroll 16
      for (int g = 0; g < G; ++g) {
        __m256i S8[M];
        #pragma GCC unroll 16
        for (int m = 0; m < M; ++m) S8[m] = o.fold(S[g][m]);
        kavx2::kx8_finish45<M>(blk[g], sv[g], pair, xs, lds, xd, ldd, b, S8, acc[g]);
      }
    }
  }
  for (int g = 0; g < G; ++g)
    #pragma GCC unroll 16
    for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr + g * 8, acc[g][m]);
}

template <KFormat F, int G, int M>
static inline void kx8_tile(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq,
                            const float* xd, int64_t ldd, const int16_t* xs, int64_t lds, float* res, int64_t ldr,
                            int64_t next) {
#if defined(LFMK_QVNNI_ZMM)
  kx8_tile_vec<KZmm, F, G, M>(w, gstride, nsb, xq, ldq, xd, ldd, xs, lds, res, ldr, next);
#else
  kx8_tile_vec<KYmm, F, G, M>(w, gstride, nsb, xq, ldq, xd, ldd, xs, lds, res, ldr, next);
#endif
}

#include "quant/kpanel_frame.h"

// The packed prefill panel of quant/kquant_avx2.h (KPack, packed by kavx2::pack_kgroup): one vpdpbusd
// per weight vector into the sub-block's int32 dot, times the sub-block's scale once (vpmulld), in
// place of vpmaddubsw + int16 adds flushed through vpmaddwd. The same exact S, so the AVX2 panel's bits.
template <KFormat F, int M>
static inline void kpanel_tile(const uint8_t* pk, int64_t nsb, const int8_t* xq, int64_t ldq, const float* xd,
                               int64_t ldd, const int16_t* xp, int64_t ldp, float* res, int64_t ldr) {
  using P = kavx2::KPack<F>;
  kpanel_frame<F, M>(pk, nsb, xd, ldd, xp, ldp, res, ldr, [&](const uint8_t* blk, int64_t b, int j, __m256i* S) {
    // the scale sits in both int16 halves of a lane: the high one, sign-extended, is the int32 scale
    const __m256i sc = _mm256_srai_epi32(kavx2::ld(blk + P::kScOff + 32 * j), 16);
    __m256i t[M];
    for (int m = 0; m < M; ++m) t[m] = _mm256_setzero_si256();
    for (int u = 0; u < P::kVecsPerSub; ++u) {
      const int v = j * P::kVecsPerSub + u;
      const __m256i wv = kavx2::ld(blk + 32 * v);
      for (int m = 0; m < M; ++m) t[m] = LFMK_QVNNI_DPBUSD(t[m], wv, kavx2::bcast4(xq + m * ldq + b * kSuper + 4 * v));
    }
    for (int m = 0; m < M; ++m) S[m] = _mm256_add_epi32(S[m], _mm256_mullo_epi32(t[m], sc));
  });
}

}  // namespace LFMK_QVNNI_NS
}  // namespace quant
}  // namespace lfmk
