// Fused double-gated short convolution: y = C * causal_depthwise_conv(B * x), width L in 2..4.
//
// bcx [B, T, 3D] (channel stride 1) is read once and y [B, T, D] written once. Work is split over
// (batch row, block of kChunk channels). The vector paths run a block as columns of channels (a
// cache line of each stream on AVX2, 16-lane vectors on AVX-512) through time blocks of kTimeBlock
// steps, with the last L values of u = B*x per channel in registers; between time blocks they live
// in a small L1-resident history (rows = time, columns = channels) that starts from conv_state and
// is written back to it at the end. u is rounded to the input dtype before it enters the conv and the
// state, exactly as transformers stores B*x, so chunked prefill is bit-identical to one prefill.
#include <algorithm>
#include <utility>
#include <vector>

#include "common.h"

namespace lfmk {
namespace {

constexpr int64_t kChunk = 256;  // channels per task: 3 history rows x 1 KiB stay in L1

struct ShortConvArgs {
  const void* bcx;
  int64_t bcx_sb, bcx_st;  // strides (elements) of bcx's batch and time dims
  const float* wt;         // fp32 taps as L rows of D, row j at wt + j * wd (wd >= D)
  int64_t wd;
  const float* bias;       // [D] fp32 or null
  void* state;             // conv_state or null
  int64_t st_sb, st_sd, st_sl;
  const bool* mask;        // [B, T] contiguous or null
  void* y;                 // [B, T, D] contiguous
  int64_t T, D;
};

template <typename T>
inline float round_to(float v) { return to_f32(from_f32<T>(v)); }
template <>
inline float round_to<float>(float v) { return v; }

template <typename T, int L>
void short_conv_block_portable(const ShortConvArgs& a, int64_t b, int64_t c0, int64_t cn) {
  float hist[L][kChunk] = {};
  const T* st = static_cast<const T*>(a.state);
  for (int64_t c = 0; c < cn; ++c)
    for (int j = 0; j < L; ++j)
      hist[j][c] = st ? to_f32(st[b * a.st_sb + (c0 + c) * a.st_sd + j * a.st_sl]) : 0.f;
  const T* base = static_cast<const T*>(a.bcx) + b * a.bcx_sb;
  T* yb = static_cast<T*>(a.y) + b * a.T * a.D;
  for (int64_t t = 0; t < a.T; ++t) {
    const T* row = base + t * a.bcx_st;
    const bool keep = !a.mask || a.mask[b * a.T + t];
    for (int64_t c = 0; c < cn; ++c) {
      const int64_t ch = c0 + c;
      const float u = keep ? round_to<T>(to_f32(row[ch]) * to_f32(row[2 * a.D + ch])) : 0.f;
      const float cg = keep ? to_f32(row[a.D + ch]) : 0.f;
      float acc = a.bias ? a.bias[ch] : 0.f;
      for (int j = 0; j < L - 1; ++j) acc += a.wt[j * a.wd + ch] * hist[j + 1][c];
      acc += a.wt[(L - 1) * a.wd + ch] * u;
      for (int j = 0; j < L - 1; ++j) hist[j][c] = hist[j + 1][c];
      hist[L - 1][c] = u;
      yb[t * a.D + ch] = from_f32<T>(cg * acc);
    }
  }
  if (st) {
    T* so = static_cast<T*>(a.state);
    for (int64_t c = 0; c < cn; ++c)
      for (int j = 0; j < L; ++j) so[b * a.st_sb + (c0 + c) * a.st_sd + j * a.st_sl] = from_f32<T>(hist[j][c]);
  }
}

// Every (batch row, block of kChunk channels) in parallel: block(b, c0, cn) for channels [c0, c0 + cn).
// One loop for every path; the path's block function (and so its instruction set) is the callable.
template <typename Block>
void for_each_block(const ShortConvArgs& a, int64_t batch, const Block& block) {
  const int64_t chunks = (a.D + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, 16384 / (kChunk * std::max<int64_t>(a.T, 1)));
  parallel_for(batch * chunks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / chunks, c0 = (i % chunks) * kChunk;
      block(b, c0, std::min(kChunk, a.D - c0));
    }
  });
}

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
namespace lfmk {
namespace {

// 8 rows of 3 (24 consecutive values in v0, v1, v2) <-> 3 columns of 8: transformers' [B, D, 3] conv
// state and [D, 3] taps moved 8 channels at a time instead of element by element (at a decode step
// those loops cost as much as the convolution). Two blends gather each column's values, in a fixed
// rotation that one lane permutation undoes; join3 is the exact inverse.
static inline void split3(__m256 v0, __m256 v1, __m256 v2, __m256 col[3]) {
  col[0] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x92), v2, 0x24),
                                    _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  col[1] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x24), v2, 0x49),
                                    _mm256_setr_epi32(1, 4, 7, 2, 5, 0, 3, 6));
  col[2] = _mm256_permutevar8x32_ps(_mm256_blend_ps(_mm256_blend_ps(v0, v1, 0x49), v2, 0x92),
                                    _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
}
static inline void join3(const __m256 col[3], __m256 v[3]) {
  const __m256 a = _mm256_permutevar8x32_ps(col[0], _mm256_setr_epi32(0, 3, 6, 1, 4, 7, 2, 5));
  const __m256 b = _mm256_permutevar8x32_ps(col[1], _mm256_setr_epi32(5, 0, 3, 6, 1, 4, 7, 2));
  const __m256 c = _mm256_permutevar8x32_ps(col[2], _mm256_setr_epi32(2, 5, 0, 3, 6, 1, 4, 7));
  v[0] = _mm256_blend_ps(_mm256_blend_ps(a, b, 0x92), c, 0x24);
  v[1] = _mm256_blend_ps(_mm256_blend_ps(c, a, 0x92), b, 0x24);
  v[2] = _mm256_blend_ps(_mm256_blend_ps(b, c, 0x92), a, 0x24);
}

// [D, 3] taps (rows of 3, contiguous) -> 3 fp32 rows of D at wt, wd apart.
template <typename T>
void taps_rows3_avx2(const T* src, int64_t D, float* wt, int64_t wd) {
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    __m256 col[3];
    split3(avx2::load8(src + 3 * d), avx2::load8(src + 3 * d + 8), avx2::load8(src + 3 * d + 16), col);
    for (int j = 0; j < 3; ++j) _mm256_storeu_ps(wt + j * wd + d, col[j]);
  }
  for (; d < D; ++d)
    for (int j = 0; j < 3; ++j) wt[j * wd + d] = to_f32(src[3 * d + j]);
}

// NV vectors (8 * NV channels starting at ch, column c of hist) over time steps [t0, t1), with the
// last L values of u and the taps held in registers: per step only bcx is loaded and y stored. hist
// ([L][kChunk] fp32) carries the history from one time block to the next.
template <typename T, int L, int NV>
struct ColumnAvx2 {
  static void run(const ShortConvArgs& a, int64_t b, int64_t ch, int64_t t0, int64_t t1, float (*hist)[kChunk],
                  int64_t c) {
    __m256 h[NV][L], w[NV][L], bias[NV];
    for (int v = 0; v < NV; ++v) {
      for (int j = 0; j < L; ++j) {
        h[v][j] = _mm256_loadu_ps(&hist[j][c + 8 * v]);
        w[v][j] = _mm256_loadu_ps(a.wt + j * a.wd + ch + 8 * v);
      }
      bias[v] = a.bias ? _mm256_loadu_ps(a.bias + ch + 8 * v) : _mm256_setzero_ps();
    }
    const T* row = static_cast<const T*>(a.bcx) + b * a.bcx_sb + t0 * a.bcx_st + ch;
    T* yrow = static_cast<T*>(a.y) + (b * a.T + t0) * a.D + ch;
    for (int64_t t = t0; t < t1; ++t, row += a.bcx_st, yrow += a.D) {
      const bool keep = !a.mask || a.mask[b * a.T + t];
      for (int v = 0; v < NV; ++v) {
        __m256 u = _mm256_setzero_ps(), cg = _mm256_setzero_ps();
        if (keep) {
          u = avx2::round_as<T>(_mm256_mul_ps(avx2::load8(row + 8 * v), avx2::load8(row + 2 * a.D + 8 * v)));
          cg = avx2::load8(row + a.D + 8 * v);
        }
        __m256 acc = bias[v];
        for (int j = 0; j < L - 1; ++j) {
          acc = _mm256_fmadd_ps(w[v][j], h[v][j + 1], acc);
          h[v][j] = h[v][j + 1];
        }
        acc = _mm256_fmadd_ps(w[v][L - 1], u, acc);
        h[v][L - 1] = u;
        avx2::store8(yrow + 8 * v, _mm256_mul_ps(cg, acc));
      }
    }
    for (int v = 0; v < NV; ++v)
      for (int j = 0; j < L; ++j) _mm256_storeu_ps(&hist[j][c + 8 * v], h[v][j]);
  }
};

// Time steps per pass over a block's columns. One column running through every step touched a new
// 4 KiB page per row and stream (rows of bcx are 3D elements apart), more pages than the TLBs hold,
// so every load paid a page walk: bf16 prefill T = 512, D = 2048 ran at the speed of fp32 (0.68 ms,
// 42% of its floor on a 2-core Xeon). Blocks of kTimeBlock steps revisit the same few dozen pages
// for all columns of the block, and the history moves between blocks through hist (L1). Measured
// there: 8 steps 0.42 ms, 4: 0.52, 16: 0.48, 32-64: 0.48-0.51 (bf16; fp32 0.41 ms at 8).
constexpr int64_t kTimeBlock = 8;

// One block on the vector path: the history from conv_state, columns(t0, t1, hist, cv) for each
// time block (channels [0, cv) of the block, cv a multiple of 8), the history back to the state,
// the last < 8 channels on the portable block.
template <typename T, int L, typename Columns>
void short_conv_block_columns(const ShortConvArgs& a, int64_t b, int64_t c0, int64_t cn, const Columns& columns) {
  const int64_t cv = cn & ~int64_t(7);
  float hist[L][kChunk];
  const T* st = static_cast<const T*>(a.state);
  // A channel-contiguous state (the model wrapper's: [B, L, D] memory seen as [B, D, L]) moves
  // through whole vectors; transformers' [B, D, L] layout element by element, which at a decode
  // step (T = 1) cost more than the convolution itself.
  const bool st_vec = st && a.st_sd == 1;
  bool st_rows3 = false;  // transformers' contiguous [B, D, 3]
  if constexpr (L == 3) {
    st_rows3 = st && a.st_sd == 3 && a.st_sl == 1;
    for (int64_t c = 0; st_rows3 && c < cv; c += 8) {
      const T* p = st + b * a.st_sb + (c0 + c) * 3;
      __m256 col[3];
      split3(avx2::load8(p), avx2::load8(p + 8), avx2::load8(p + 16), col);
      for (int j = 0; j < 3; ++j) _mm256_storeu_ps(&hist[j][c], col[j]);
    }
  }
  if (!st_rows3) {
    for (int j = 0; j < L; ++j) {
      if (st_vec) {
        const T* sj = st + b * a.st_sb + c0 + j * a.st_sl;
        for (int64_t c = 0; c < cv; c += 8) _mm256_storeu_ps(&hist[j][c], avx2::load8(sj + c));
      } else {
        for (int64_t c = 0; c < cv; ++c) hist[j][c] = st ? to_f32(st[b * a.st_sb + (c0 + c) * a.st_sd + j * a.st_sl]) : 0.f;
      }
    }
  }
  for (int64_t t0 = 0; t0 < a.T; t0 += kTimeBlock) columns(t0, std::min(a.T, t0 + kTimeBlock), hist, cv);
  if (st_vec) {
    T* so = static_cast<T*>(a.state) + b * a.st_sb + c0;
    for (int j = 0; j < L; ++j)
      for (int64_t c = 0; c < cv; c += 8) avx2::store8(so + j * a.st_sl + c, _mm256_loadu_ps(&hist[j][c]));
  } else if (st_rows3) {
    if constexpr (L == 3) {
      for (int64_t c = 0; c < cv; c += 8) {
        T* p = static_cast<T*>(a.state) + b * a.st_sb + (c0 + c) * 3;
        const __m256 col[3] = {_mm256_loadu_ps(&hist[0][c]), _mm256_loadu_ps(&hist[1][c]), _mm256_loadu_ps(&hist[2][c])};
        __m256 v[3];
        join3(col, v);
        avx2::store8(p, v[0]);
        avx2::store8(p + 8, v[1]);
        avx2::store8(p + 16, v[2]);
      }
    }
  } else if (st) {
    T* so = static_cast<T*>(a.state);
    for (int64_t c = 0; c < cv; ++c)
      for (int j = 0; j < L; ++j) so[b * a.st_sb + (c0 + c) * a.st_sd + j * a.st_sl] = from_f32<T>(hist[j][c]);
  }
  if (cv < cn) short_conv_block_portable<T, L>(a, b, c0 + cv, cn - cv);
}

// The block on vector columns (Column<T, L, NV>::run(a, b, ch, t0, t1, hist, c) for NV vectors of
// kLanes channels); a rest of 8 channels takes the 8-lane AVX2 column (FMA, so every vector path
// gives the same bits).
template <typename T, int L, template <typename, int, int> class Column, int kLanes>
void short_conv_block_vec(const ShortConvArgs& a, int64_t b, int64_t c0, int64_t cn) {
  short_conv_block_columns<T, L>(a, b, c0, cn, [&](int64_t t0, int64_t t1, float (*hist)[kChunk], int64_t cv) {
    int64_t c = 0;
    for (; c + 2 * kLanes <= cv; c += 2 * kLanes) Column<T, L, 2>::run(a, b, c0 + c, t0, t1, hist, c);
    for (; c + kLanes <= cv; c += kLanes) Column<T, L, 1>::run(a, b, c0 + c, t0, t1, hist, c);
    for (; c < cv; c += 8) ColumnAvx2<T, L, 1>::run(a, b, c0 + c, t0, t1, hist, c);
  });
}

// 16 channels as two fp32 vectors (lo, hi) in an order of the type's choosing, the same for every
// stream, so per channel the arithmetic is unchanged. bf16 takes the cheapest widening: one 32-byte
// load, unpacked against zero within each 128-bit lane, which puts channels 0-3 and 8-11 in lo and
// 4-7, 12-15 in hi; packus of the rounded halves restores the order on the way out. fp32 arrays
// (taps, history) load in that order through a lane swap. fp32 / fp16 keep the natural order.
template <typename T>
struct Lanes16 {
  static void load(const T* p, __m256& lo, __m256& hi) {
    lo = avx2::load8(p);
    hi = avx2::load8(p + 8);
  }
  static void store(T* p, __m256 lo, __m256 hi) {
    avx2::store8(p, lo);
    avx2::store8(p + 8, hi);
  }
  static void load_f32(const float* p, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  }
  static void store_f32(float* p, __m256 lo, __m256 hi) {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
};
template <>
struct Lanes16<c10::BFloat16> {
  static void load(const c10::BFloat16* p, __m256& lo, __m256& hi) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), z = _mm256_setzero_si256();
    lo = _mm256_castsi256_ps(_mm256_unpacklo_epi16(z, v));
    hi = _mm256_castsi256_ps(_mm256_unpackhi_epi16(z, v));
  }
  static void store(c10::BFloat16* p, __m256 lo, __m256 hi) {
    const __m256i l = _mm256_srli_epi32(avx2::bf16_round_bits(lo), 16), h = _mm256_srli_epi32(avx2::bf16_round_bits(hi), 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_packus_epi32(l, h));
  }
  static void load_f32(const float* p, __m256& lo, __m256& hi) {
    const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    lo = _mm256_permute2f128_ps(a, b, 0x20);
    hi = _mm256_permute2f128_ps(a, b, 0x31);
  }
  static void store_f32(float* p, __m256 lo, __m256 hi) {
    _mm256_storeu_ps(p, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
};

// One cache line of every stream (kLine channels: 32 for 16-bit types, 16 for fp32) over time steps
// [t0, t1): each line of bcx and y is touched by one column only, start to end. With bf16 D = 2048
// every stream and row starts a multiple of 4 KiB apart, so a time block's 24 lines of bcx fall in
// one L1 set (8 ways): a half-line column (16 channels) lost them before its neighbour came back
// for the other half and read each line twice from L2. The taps come from memory (pw: kLine
// channels per tap, in the Lanes16 order) to leave the registers to the history.
template <typename T, int L>
struct ColumnLineAvx2 {
  static constexpr int kLine = 64 / static_cast<int>(sizeof(T));
  static constexpr int G = kLine / 16;  // 16-channel groups per line
  static void run(const ShortConvArgs& a, int64_t b, int64_t ch, int64_t t0, int64_t t1, float (*hist)[kChunk],
                  int64_t c, const float* pw, const float* pbias) {
    __m256 h[G][2][L];
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < L; ++j) Lanes16<T>::load_f32(&hist[j][c + 16 * g], h[g][0][j], h[g][1][j]);
    const T* row = static_cast<const T*>(a.bcx) + b * a.bcx_sb + t0 * a.bcx_st + ch;
    T* yrow = static_cast<T*>(a.y) + (b * a.T + t0) * a.D + ch;
    const int64_t D = a.D, st = a.bcx_st;
    const bool* mask = a.mask ? a.mask + b * a.T : nullptr;
    for (int64_t t = t0; t < t1; ++t, row += st, yrow += D) {
      const bool keep = !mask || mask[t];
      for (int g = 0; g < G; ++g) {
        __m256 u[2], cg[2];
        if (keep) {
          __m256 bb[2], xx[2];
          Lanes16<T>::load(row + 16 * g, bb[0], bb[1]);
          Lanes16<T>::load(row + 2 * D + 16 * g, xx[0], xx[1]);
          Lanes16<T>::load(row + D + 16 * g, cg[0], cg[1]);
          for (int k = 0; k < 2; ++k) u[k] = avx2::round_as<T>(_mm256_mul_ps(bb[k], xx[k]));
        } else {
          u[0] = u[1] = cg[0] = cg[1] = _mm256_setzero_ps();
        }
        __m256 out[2];
        for (int k = 0; k < 2; ++k) {
          const int off = 16 * g + 8 * k;
          __m256 acc = pbias ? _mm256_load_ps(pbias + off) : _mm256_setzero_ps();
          for (int j = 0; j < L - 1; ++j) {
            acc = _mm256_fmadd_ps(_mm256_load_ps(pw + j * kLine + off), h[g][k][j + 1], acc);
            h[g][k][j] = h[g][k][j + 1];
          }
          acc = _mm256_fmadd_ps(_mm256_load_ps(pw + (L - 1) * kLine + off), u[k], acc);
          h[g][k][L - 1] = u[k];
          out[k] = _mm256_mul_ps(cg[k], acc);
        }
        Lanes16<T>::store(yrow + 16 * g, out[0], out[1]);
      }
    }
    for (int g = 0; g < G; ++g)
      for (int j = 0; j < L; ++j) Lanes16<T>::store_f32(&hist[j][c + 16 * g], h[g][0][j], h[g][1][j]);
  }
};

// The AVX2 block: whole-line columns, then 8-channel columns (all FMA in the same order per channel,
// so the same bits whichever column a channel lands in).
template <typename T, int L>
void short_conv_block_avx2(const ShortConvArgs& a, int64_t b, int64_t c0, int64_t cn) {
  using Col = ColumnLineAvx2<T, L>;
  constexpr int kLine = Col::kLine;
  const int64_t cl = cn - cn % kLine;
  // Taps and bias of each line in the Lanes16 order, kLine channels per tap.
  alignas(32) float pw[kChunk / kLine][L][kLine];
  alignas(32) float pbias[kChunk / kLine][kLine];
  for (int64_t c = 0; c < cl; c += kLine)
    for (int g = 0; g < Col::G; ++g) {
      __m256 lo, hi;
      for (int j = 0; j < L; ++j) {
        Lanes16<T>::load_f32(a.wt + j * a.wd + c0 + c + 16 * g, lo, hi);
        _mm256_store_ps(&pw[c / kLine][j][16 * g], lo);
        _mm256_store_ps(&pw[c / kLine][j][16 * g + 8], hi);
      }
      if (a.bias) {
        Lanes16<T>::load_f32(a.bias + c0 + c + 16 * g, lo, hi);
        _mm256_store_ps(&pbias[c / kLine][16 * g], lo);
        _mm256_store_ps(&pbias[c / kLine][16 * g + 8], hi);
      }
    }
  short_conv_block_columns<T, L>(a, b, c0, cn, [&](int64_t t0, int64_t t1, float (*hist)[kChunk], int64_t cv) {
    int64_t c = 0;
    for (; c < cl; c += kLine) Col::run(a, b, c0 + c, t0, t1, hist, c, &pw[c / kLine][0][0], a.bias ? pbias[c / kLine] : nullptr);
    for (; c < cv; c += 8) ColumnAvx2<T, L, 1>::run(a, b, c0 + c, t0, t1, hist, c);
  });
}

template <typename T, int L>
void run_avx2(const ShortConvArgs& a, int64_t batch) {
  for_each_block(a, batch, [&](int64_t b, int64_t c0, int64_t cn) { short_conv_block_avx2<T, L>(a, b, c0, cn); });
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

LFMK_AVX512_BEGIN
#include "simd_avx512.h"
namespace lfmk {
namespace {

// The AVX2 column on 16-lane vectors: the same operations in the same order per channel (bits equal
// to the AVX2 path), half the instructions per channel. bf16 / fp16 prefill is bound by the
// conversions around three loads and a store per step, not by memory, so this is where it pays.
template <typename T, int L, int NV>
struct ColumnAvx512 {
  static void run(const ShortConvArgs& a, int64_t b, int64_t ch, int64_t t0, int64_t t1, float (*hist)[kChunk],
                  int64_t c) {
    __m512 h[NV][L], w[NV][L], bias[NV];
    for (int v = 0; v < NV; ++v) {
      for (int j = 0; j < L; ++j) {
        h[v][j] = _mm512_loadu_ps(&hist[j][c + 16 * v]);
        w[v][j] = _mm512_loadu_ps(a.wt + j * a.wd + ch + 16 * v);
      }
      bias[v] = a.bias ? _mm512_loadu_ps(a.bias + ch + 16 * v) : _mm512_setzero_ps();
    }
    const T* row = static_cast<const T*>(a.bcx) + b * a.bcx_sb + t0 * a.bcx_st + ch;
    T* yrow = static_cast<T*>(a.y) + (b * a.T + t0) * a.D + ch;
    for (int64_t t = t0; t < t1; ++t, row += a.bcx_st, yrow += a.D) {
      const bool keep = !a.mask || a.mask[b * a.T + t];
      for (int v = 0; v < NV; ++v) {
        __m512 u = _mm512_setzero_ps(), cg = _mm512_setzero_ps();
        if (keep) {
          u = avx512::round_as<T>(_mm512_mul_ps(avx512::load16(row + 16 * v), avx512::load16(row + 2 * a.D + 16 * v)));
          cg = avx512::load16(row + a.D + 16 * v);
        }
        __m512 acc = bias[v];
        for (int j = 0; j < L - 1; ++j) {
          acc = _mm512_fmadd_ps(w[v][j], h[v][j + 1], acc);
          h[v][j] = h[v][j + 1];
        }
        acc = _mm512_fmadd_ps(w[v][L - 1], u, acc);
        h[v][L - 1] = u;
        avx512::store16(yrow + 16 * v, _mm512_mul_ps(cg, acc));
      }
    }
    for (int v = 0; v < NV; ++v)
      for (int j = 0; j < L; ++j) _mm512_storeu_ps(&hist[j][c + 16 * v], h[v][j]);
  }
};

template <typename T, int L>
void run_avx512(const ShortConvArgs& a, int64_t batch) {
  for_each_block(a, batch, [&](int64_t b, int64_t c0, int64_t cn) { short_conv_block_vec<T, L, ColumnAvx512, 16>(a, b, c0, cn); });
}

}  // namespace
}  // namespace lfmk
LFMK_AVX512_END

namespace lfmk {
namespace {

template <typename T, int L>
void run_portable(const ShortConvArgs& a, int64_t batch) {
  for_each_block(a, batch, [&](int64_t b, int64_t c0, int64_t cn) { short_conv_block_portable<T, L>(a, b, c0, cn); });
}

template <typename T, int L>
void run(const ShortConvArgs& a, int64_t batch) {
  if (cpu_has_avx512())
    run_avx512<T, L>(a, batch);
  else if (cpu_has_avx2())
    run_avx2<T, L>(a, batch);
  else
    run_portable<T, L>(a, batch);
}

// True when no two elements of t share memory, by a sufficient test: with the dims of size > 1
// sorted by stride, each stride exceeds the span of the dims before it. (Exotic interleaved layouts
// that never overlap are refused too; at::has_internal_overlap gives up on any non-dense tensor.)
bool surely_non_overlapping(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // largest offset reachable with the dims so far
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return false;
    span += stride * (size - 1);
  }
  return true;
}

// True when the memory ranges of a and b (first to last element) intersect in one storage.
bool share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || !a.has_storage() || !b.has_storage()) return false;
  if (a.storage().data() != b.storage().data()) return false;
  auto range = [](const at::Tensor& t) {
    int64_t lo = t.storage_offset(), hi = lo;
    for (int64_t d = 0; d < t.dim(); ++d) {
      const int64_t ext = t.stride(d) * (t.size(d) - 1);
      (ext < 0 ? lo : hi) += ext;
    }
    return std::make_pair(lo * t.element_size(), (hi + 1) * t.element_size());
  };
  const auto ra = range(a), rb = range(b);
  return ra.first < rb.second && rb.first < ra.second;
}

// A prefill writes y while it reads bcx, step by step at the same channels. Where y's row t and
// bcx's streams of row t + 1 start at the same address modulo 4 KiB (large allocations tend to share
// their offset in the page, and bf16 D = 2048 makes every stream and row start a multiple of 4 KiB
// apart), each step's loads match the low 12 address bits of the stores just issued, and the core
// holds them back as possible dependences ("4K aliasing"). Measured on a 2-core Zen 3, T = 512, 2
// threads, inputs in cache, y placed at 16 offsets from bcx (0, 256, ... 3840 bytes mod 4 KiB): D =
// 2048 bf16 636 us at offset 0 against 401-426 at every other, fp32 616 against 338-401; D = 1536 and
// 1024 lose 10-70% at the offsets where some row pair lines up (0 or 2048, say), D = 2000 nowhere.
// `lfm-kernels bench --ops short_conv`, bf16 T = 512: 589-613 us (44-47% of the floor) -> 449 us (62%).
// So a prefill's y (a fresh tensor) starts at the offset in a page, among 64 steps of 64 bytes,
// farthest from every stream start of the next rows.
at::Tensor prefill_output(const at::Tensor& bcx, int64_t batch, int64_t T, int64_t D) {
  const int64_t es = bcx.element_size(), n = batch * T * D;
  at::Tensor buf = at::empty({n + 4096 / es}, bcx.options());
  const uintptr_t x = reinterpret_cast<uintptr_t>(bcx.const_data_ptr()), y0 = reinterpret_cast<uintptr_t>(buf.const_data_ptr());
  int64_t best = 0, best_gap = -1;
  for (int64_t k = 0; k < 64; ++k) {
    int64_t gap = 4096;  // the smallest distance, modulo 4 KiB, between a row of y and a stream of the next bcx row
    for (int64_t t = 0; t < 16; ++t)
      for (int64_t s = 0; s < 3; ++s) {
        const uintptr_t ys = y0 + static_cast<uintptr_t>(k * 64 + t * D * es);
        const uintptr_t xs = x + static_cast<uintptr_t>(((t + 1) * bcx.stride(1) + s * D) * es);
        const int64_t d = static_cast<int64_t>((ys - xs) & 4095);
        gap = std::min(gap, std::min(d, 4096 - d));
      }
    if (gap > best_gap) {
      best_gap = gap;
      best = k;
    }
  }
  // A tensor of its own at that address (storage offset 0, like any fresh output: torch.library's fake
  // tensors promise that), keeping the larger buffer alive for as long as its storage lives.
  return at::from_blob(static_cast<char*>(buf.data_ptr()) + best * 64, {batch, T, D}, [buf](void*) {}, bcx.options());
}

// Shapes, dtypes and devices were validated in Python (lfm_kernels/ops/short_conv.py); the checks
// here only guard the memory safety of this function if it is called directly.
at::Tensor short_conv_cpu(const at::Tensor& bcx_in, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& conv_state, const std::optional<at::Tensor>& mask,
                          const std::optional<at::Tensor>& out) {
  TORCH_CHECK(bcx_in.dim() == 3 && bcx_in.size(2) % 3 == 0, "bcx must be [B, T, 3D]");
  const int64_t batch = bcx_in.size(0), T = bcx_in.size(1), D = bcx_in.size(2) / 3;
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == D, "weight must be [D, L]");
  const int64_t L = weight.size(1);
  TORCH_CHECK(L >= 2 && L <= 4, "conv width must be 2..4");
  const at::Tensor bcx = bcx_in.stride(2) == 1 ? bcx_in : bcx_in.contiguous();
  at::Tensor y;
  if (out.has_value()) {  // tests pass a NaN-poisoned buffer to prove every element is written
    TORCH_CHECK(out->is_contiguous() && out->scalar_type() == bcx.scalar_type() && out->dim() == 3 &&
                    out->size(0) == batch && out->size(1) == T && out->size(2) == D,
                "out must be a contiguous [B, T, D] tensor in bcx's dtype");
    y = *out;
    TORCH_CHECK_VALUE(!share_memory(y, bcx_in), "out shares memory with bcx; pass a separate tensor");
    TORCH_CHECK_VALUE(!conv_state.has_value() || !share_memory(y, *conv_state),
                      "out shares memory with conv_state (the state is written while y is); pass a separate tensor");
  } else if (T > 1) {
    y = prefill_output(bcx, batch, T, D);
  } else {
    y = at::empty({batch, T, D}, bcx.options().memory_format(at::MemoryFormat::Contiguous));
  }
  // The kernels read fp32 taps as [L, D] rows. fp32 taps already in that memory order (a [D, L]
  // view of an [L, D] tensor, as the model wrapper keeps them) are read in place; any other weight
  // is converted into such rows here, with plain loops (at the decode step, T = 1, a tensor op
  // would cost more than the conv, and even these loops cost a third of it).
  // (Not where the state or out shares the taps' memory: they are written while the taps are read.)
  const bool taps_in_place = weight.scalar_type() == at::kFloat && weight.stride(0) == 1 && weight.stride(1) >= D &&
                             !(conv_state.has_value() && share_memory(weight, *conv_state)) &&
                             !(out.has_value() && share_memory(weight, *out));
  const int64_t Dp = taps_in_place ? weight.stride(1) : (D + 7) & ~int64_t(7);
  std::vector<float> wt(taps_in_place ? 0 : static_cast<size_t>(L * Dp), 0.f);
  if (!taps_in_place) {
    const at::Tensor w = weight.contiguous();
    const bool avx2 = cpu_has_avx2();
    LFMK_DISPATCH_FLOAT(w.scalar_type(), "short_conv weight", [&] {
      const scalar_t* src = w.const_data_ptr<scalar_t>();
      if (L == 3 && avx2) {
        taps_rows3_avx2(src, D, wt.data(), Dp);
      } else {
        for (int64_t d = 0; d < D; ++d)
          for (int64_t j = 0; j < L; ++j) wt[j * Dp + d] = to_f32(src[d * L + j]);
      }
    });
  }
  std::vector<float> bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == D, "bias must be [D]");
    bias_f.assign(static_cast<size_t>(Dp), 0.f);
    load_as_fp32(*bias, bias_f.data());
  }
  at::Tensor mask_b;
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == batch && mask->size(1) == T, "mask must be [B, T]");
    mask_b = mask->to(at::kBool).contiguous();
  }
  ShortConvArgs a{};
  a.bcx = bcx.const_data_ptr();
  a.bcx_sb = bcx.stride(0);
  a.bcx_st = bcx.stride(1);
  a.wt = taps_in_place ? weight.const_data_ptr<float>() : wt.data();
  a.wd = Dp;
  a.bias = bias_f.empty() ? nullptr : bias_f.data();
  if (conv_state.has_value()) {
    const auto& s = *conv_state;
    TORCH_CHECK(s.dim() == 3 && s.size(0) == batch && s.size(1) == D && s.size(2) == L &&
                    s.scalar_type() == bcx.scalar_type(),
                "conv_state must be [B, D, L] in bcx's dtype");
    // Updated in place from parallel tasks: overlapping elements (an expanded, stride-0 state) would
    // be written by several rows at once, and a state inside bcx or the mask would change them while
    // they are read (weight and bias are copied first). ValueErrors, as the Python checks raise.
    TORCH_CHECK_VALUE(surely_non_overlapping(s), "conv_state has overlapping elements (e.g. an expanded, stride-0 "
                      "tensor); it is updated in place, so pass a tensor whose elements are distinct");
    TORCH_CHECK_VALUE(!share_memory(s, bcx_in), "conv_state shares memory with bcx; pass a separate tensor");
    TORCH_CHECK_VALUE(!mask.has_value() || !share_memory(s, *mask),
                      "conv_state shares memory with attention_mask; pass a separate tensor");
    a.state = s.data_ptr();
    a.st_sb = s.stride(0);
    a.st_sd = s.stride(1);
    a.st_sl = s.stride(2);
  }
  a.mask = mask_b.defined() ? mask_b.const_data_ptr<bool>() : nullptr;
  a.y = y.mutable_data_ptr();
  a.T = T;
  a.D = D;
  if (batch == 0 || D == 0) return y;
  LFMK_DISPATCH_FLOAT(bcx.scalar_type(), "short_conv", [&] {
    switch (L) {
      case 2: run<scalar_t, 2>(a, batch); break;
      case 3: run<scalar_t, 3>(a, batch); break;
      default: run<scalar_t, 4>(a, batch); break;
    }
  });
  return y;
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def(
      "short_conv(Tensor bcx, Tensor weight, Tensor? bias, Tensor(a!)? conv_state, Tensor? mask, "
      "Tensor(b!)? out=None) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("short_conv", &lfmk::short_conv_cpu); }
