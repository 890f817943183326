// Top-k MoE: sigmoid router with selection bias, and the SwiGLU experts reading only the chosen experts.
//
// Router: logits = hidden @ gate_weight^T (fp32, then rounded to hidden's dtype as transformers computes
// it), s = sigmoid(logits) (rounded the same way), choose top_k on s + expert_bias
// (ties to the lower index, output sorted by descending biased score like torch.topk), weights = s of
// the chosen experts, divided by (sum + 1e-6) when normalising, times the scaling factor.
//
// Experts: the (token, slot) pairs are counting-sorted by expert, so every active expert's weights
// are read once per pass however many tokens chose it and unused experts are never touched. Three
// phases, each spread over all threads across all active experts together (a decode step has just k
// experts with one token each; splitting only inside one expert at a time would leave a barrier per
// expert):
//   1. act[p, j] = silu(gate_j . x) * (up_j . x) for every sorted pair p: a tile reads gate rows j, j+1
//      and up rows j, j+1 in one pass against up to kM tokens, SwiGLU applied to the tile's output,
//      so the [P, 2I] intermediate never exists.
//   2. y[p, h] = down_h . act[p] with the same tile kernel.
//   3. out[n] = sum over slots s in order of w[n, s] * y[pos(n, s)]: a fixed order, so the result does
//      not depend on the thread count.
// The tile kernel is a register-blocked dot product: kR weight rows x kM tokens of fp32 accumulators,
// weights converted bf16/fp16 -> fp32 in registers, each converted weight vector used for kM tokens.
// With one token (decode) it is a GEMV streaming kR rows sequentially with two accumulator sets.
// A work item's weight rows stay in L2 while token triples (in L1) pass over them.
//
// bf16_dot_min_rows > 0 (the Python layer sets it only for bf16 hidden and weights on CPUs with native
// bf16 dot products, see lfm_kernels/ops/moe.py): experts with at least that many tokens run on bf16
// dot products, which do twice the multiply-adds per instruction of AVX2 fp32 FMAs. With AVX512-BF16
// (act rounded to bf16 once in both of our kernels; thresholds and their measurements at kOuterMinRows):
//   - 4..63 tokens: the outer-product kernel (experts_pass_bf16op): tokens in the vector lanes,
//     weight pairs broadcast from the rows as stored, so each weight is read once per 16 tokens;
//   - fewer: the dot-product tile (tile_bf16dp: vdpbf16ps along K, rows as stored);
//   - 64 and more: two torch (oneDNN) GEMMs per expert with the SwiGLU between them here.
// All of them go to oneDNN when the portable path is forced (or on AMX without AVX512-BF16).
// The remaining experts keep the AVX2 tiled path.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "common.h"

namespace lfmk {
namespace {

constexpr int kR = 4;                // weight rows per tile
constexpr int kM = 3;                // tokens per tile: 12 ymm accumulators + 3 inputs + 1 weight
constexpr int64_t kUnits1 = 16;      // intermediate units (gate row + up row) per phase-1 work item
constexpr int64_t kRows2 = 32;       // down rows per phase-2 work item
constexpr int64_t kMaxPairs = 4096;  // pairs per pass: bounds the fp32 scratch (act, y) for long prompts
constexpr int64_t kGemmExpertsPerThread = 2;  // torch-GEMM experts per thread before one expert per thread
// Where each AVX512-BF16 route wins, measured on Zen 4 with 2 threads, 32 experts at H 2048, I 1792,
// every expert with the same token count n (ms for the whole call):
//   n = 3: dot-product tile 29, outer product 33 (both memory-bound; the dot tile overlaps better)
//   n = 6: 33 vs 31; n = 16: 55 vs 41; n = 24: 63 vs 50
//   n = 64: outer product 127, oneDNN 134; n = 128: 297 vs 248 (oneDNN's weight packing is paid off)
// The dot-product tile alone (H or I odd, so pairs would straddle rows) hands over to oneDNN at 32
// tokens: 16 tokens 55 ms both, 64 tokens 157 vs 130.
constexpr int64_t kOuterMinRows = 4;
constexpr int64_t kOuterOneDnnMinRows = 64;
constexpr int64_t kDotOneDnnMinRows = 32;
constexpr int64_t kLanes = 16;  // tokens per block of the outer-product path (fp32 lanes of a zmm)
// Its work items: only the first tile of an item has no prefetch ahead of it, so they are larger than
// the dot-product paths' (measured at 128 random tokens: 42.7 ms with 16 units / 32 rows per item,
// 39.5 with 64 / 128; 8 / 16 was 44.9)
constexpr int64_t kOpUnits1 = 64;
constexpr int64_t kOpRows2 = 128;

// out[m * R + r] = dot(w[r][0:K], x[m][0:K]) in fp32, R <= kR, M <= kM.
template <typename W>
using TileFn = void (*)(const W* const* w, int R, const float* const* x, int M, int64_t K, float* out);

template <typename W>
void tile_portable(const W* const* w, int R, const float* const* x, int M, int64_t K, float* out) {
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += to_f32(w[r][k]) * x[m][k];
      out[m * R + r] = acc;
    }
}

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
namespace lfmk {
namespace {

// One token: a GEMV over R rows. Two accumulator sets hide the FMA latency so the loop is limited
// by how fast the rows stream in, not by the dependency chain.
template <typename W, int R>
void gemv_avx2(const W* const* w, const float* x, int64_t K, float* out) {
  __m256 a0[R], a1[R];
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
    for (int r = 0; r < R; ++r) {
      a0[r] = _mm256_fmadd_ps(avx2::load8(w[r] + k), x0, a0[r]);
      a1[r] = _mm256_fmadd_ps(avx2::load8(w[r] + k + 8), x1, a1[r]);
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 x0 = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) a0[r] = _mm256_fmadd_ps(avx2::load8(w[r] + k), x0, a0[r]);
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    const __m256 x0 = avx2::load_partial(x + k, n);
    for (int r = 0; r < R; ++r) a1[r] = _mm256_fmadd_ps(avx2::load_partial(w[r] + k, n), x0, a1[r]);
  }
  for (int r = 0; r < R; ++r) out[r] = avx2::hsum(_mm256_add_ps(a0[r], a1[r]));
}

// One weight row against M tokens, U independent accumulator sets along K: the path for rows
// streamed from memory. Reading one row at a time keeps the access a single sequential stream,
// which the hardware prefetcher follows at full bandwidth; several rows in parallel (4 KB apart)
// measured at about half the bandwidth here.
template <typename W, int M, int U>
void row_avx2(const W* w, const float* const* x, int64_t K, float* out) {
  __m256 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U)
    for (int u = 0; u < U; ++u) {
      const __m256 wv = avx2::load8(w + k + 8 * u);
      for (int m = 0; m < M; ++m) acc[u][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[m] + k + 8 * u), acc[u][m]);
    }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = avx2::load8(w + k);
    for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x[m] + k), acc[0][m]);
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    const __m256 wv = avx2::load_partial(w + k, n);
    for (int m = 0; m < M; ++m) acc[0][m] = _mm256_fmadd_ps(wv, avx2::load_partial(x[m] + k, n), acc[0][m]);
  }
  for (int m = 0; m < M; ++m) {
    __m256 t = acc[0][m];
    for (int u = 1; u < U; ++u) t = _mm256_add_ps(t, acc[u][m]);
    out[m] = avx2::hsum(t);
  }
}

template <typename W, int R, int M>
void tile_avx2_t(const W* const* w, const float* const* x, int64_t K, float* out) {
  if (M == 1) return gemv_avx2<W, R>(w, x[0], K, out);
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x[m] + k);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = avx2::load8(w[r] + k);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  if (k < K) {
    const int n = static_cast<int>(K - k);
    __m256 xv[M];
    for (int m = 0; m < M; ++m) xv[m] = avx2::load_partial(x[m] + k, n);
    for (int r = 0; r < R; ++r) {
      const __m256 wv = avx2::load_partial(w[r] + k, n);
      for (int m = 0; m < M; ++m) acc[m][r] = _mm256_fmadd_ps(wv, xv[m], acc[m][r]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m * R + r] = avx2::hsum(acc[m][r]);
}

template <typename W, int R>
void tile_avx2_r(const W* const* w, const float* const* x, int M, int64_t K, float* out) {
  if (R == 1) {
    switch (M) {
      case 1: return row_avx2<W, 1, 4>(w[0], x, K, out);
      case 2: return row_avx2<W, 2, 2>(w[0], x, K, out);
      default: return row_avx2<W, 3, 2>(w[0], x, K, out);
    }
  }
  switch (M) {
    case 1: return tile_avx2_t<W, R, 1>(w, x, K, out);
    case 2: return tile_avx2_t<W, R, 2>(w, x, K, out);
    default: return tile_avx2_t<W, R, 3>(w, x, K, out);
  }
}

// a[j] = bf16(silu(g[j]) * u[j]) over one token's row: gate and up in bf16 (the oneDNN path's GEMM
// output) or fp32 (the AVX512-BF16 tile's)
template <typename T>
void swiglu_row_avx2(const T* g, const T* u, c10::BFloat16* a, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    avx2::store8(a + j, _mm256_mul_ps(avx2::silu8(avx2::load8(g + j)), avx2::load8(u + j)));
  if (j < n) {
    const int r = static_cast<int>(n - j);
    avx2::store_partial(a + j, _mm256_mul_ps(avx2::silu8(avx2::load_partial(g + j, r)), avx2::load_partial(u + j, r)), r);
  }
}

template <typename W>
void tile_avx2(const W* const* w, int R, const float* const* x, int M, int64_t K, float* out) {
  static_assert(kM == 3 && kR == 4, "tile_avx2 instantiates R <= 4, M <= 3");
  switch (R) {
    case 1: return tile_avx2_r<W, 1>(w, x, M, K, out);
    case 2: return tile_avx2_r<W, 2>(w, x, M, K, out);
    case 3: return tile_avx2_r<W, 3>(w, x, M, K, out);
    default: return tile_avx2_r<W, 4>(w, x, M, K, out);
  }
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

LFMK_AVX512BF16_BEGIN
namespace lfmk {
namespace {

constexpr int kMb = 6;  // tokens per AVX512-BF16 tile: 24 zmm accumulators + 4 weight rows + 1 input
constexpr int kOpRows = 8;  // weight rows per outer-product tile: 4 units (gate + up) in phase 1

// Sum of the 16 lanes. Through memory rather than AVX-512 shuffles: GCC 12 warns (-Wuninitialized)
// about the undefined pass-through operand inside those intrinsics; this runs once per R x M tile.
inline float hsum16(__m512 v) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, v);
  __m256 h = _mm256_add_ps(_mm256_load_ps(lanes), _mm256_load_ps(lanes + 8));
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  return _mm_cvtss_f32(q);
}

// The four lane sums of a, b, c, d into out[0..3] with one store instead of four: the in-lane
// transposes (mask forms with a defined pass-through operand, for the same reason as above) leave
// per 128-bit block the partial sums [a, b, c, d], and four blocks are added.
inline void hsum16x4(__m512 a, __m512 b, __m512 c, __m512 d, float* out) {
  const __mmask16 all = 0xFFFF;
  const __m512 ab = _mm512_add_ps(_mm512_mask_unpacklo_ps(a, all, a, b), _mm512_mask_unpackhi_ps(a, all, a, b));
  const __m512 cd = _mm512_add_ps(_mm512_mask_unpacklo_ps(c, all, c, d), _mm512_mask_unpackhi_ps(c, all, c, d));
  const __m512 s = _mm512_add_ps(_mm512_mask_shuffle_ps(ab, all, ab, cd, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_mask_shuffle_ps(ab, all, ab, cd, _MM_SHUFFLE(3, 2, 3, 2)));
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  _mm_storeu_ps(out, _mm_add_ps(_mm_add_ps(_mm_load_ps(lanes), _mm_load_ps(lanes + 4)),
                                _mm_add_ps(_mm_load_ps(lanes + 8), _mm_load_ps(lanes + 12))));
}

// out[m * R + r] = w[r] . x[m] over K bf16 values with vdpbf16ps (pairs of products summed into fp32
// lanes), R <= 4 rows, M <= kMb tokens. Rows are read as they are stored: no packing pass.
template <int R, int M>
void tile_bf16dp_t(const c10::BFloat16* const* w, const c10::BFloat16* const* x, int64_t K, float* out) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_si512(w[r] + k);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x[m] + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, (__m512bh)wv[r]);
    }
  }
  if (k < K) {  // masked loads read nothing past K and give zeros there
    const __mmask32 mask = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1);
    __m512i wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_epi16(mask, w[r] + k);
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x[m] + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, (__m512bh)wv[r]);
    }
  }
  for (int m = 0; m < M; ++m) {
    if constexpr (R == 4) {
      hsum16x4(acc[m][0], acc[m][1], acc[m][2], acc[m][3], out + m * 4);
    } else {
      for (int r = 0; r < R; ++r) out[m * R + r] = hsum16(acc[m][r]);
    }
  }
}

template <int R>
void tile_bf16dp_r(const c10::BFloat16* const* w, const c10::BFloat16* const* x, int M, int64_t K, float* out) {
  static_assert(kMb == 6, "tile_bf16dp_r instantiates M <= 6");
  switch (M) {
    case 1: return tile_bf16dp_t<R, 1>(w, x, K, out);
    case 2: return tile_bf16dp_t<R, 2>(w, x, K, out);
    case 3: return tile_bf16dp_t<R, 3>(w, x, K, out);
    case 4: return tile_bf16dp_t<R, 4>(w, x, K, out);
    case 5: return tile_bf16dp_t<R, 5>(w, x, K, out);
    default: return tile_bf16dp_t<R, 6>(w, x, K, out);
  }
}

void tile_bf16dp(const c10::BFloat16* const* w, int R, const c10::BFloat16* const* x, int M, int64_t K, float* out) {
  switch (R) {
    case 1: return tile_bf16dp_r<1>(w, x, M, K, out);
    case 2: return tile_bf16dp_r<2>(w, x, M, K, out);
    case 3: return tile_bf16dp_r<3>(w, x, M, K, out);
    default: return tile_bf16dp_r<4>(w, x, M, K, out);
  }
}

// The outer-product form, tokens in the vector lanes: acc[r][b] (the tokens of block b) += the packed
// token pairs P_b[kp] (a dword per token: two consecutive bf16 inputs) times weight row r's pair kp
// broadcast to every lane. Each weight pair is loaded once per block straight from the row as stored
// (no packing pass over the weights; broadcasts don't mind their 4 KB row stride) and there is no
// horizontal sum. NZ blocks of 16 tokens (zmm) and NY of 8 (ymm: an expert's last block when at
// most 8 tokens are left; vdpbf16ps on ymm does ~86% of the zmm multiply-adds per cycle here, far
// more than 8 idle zmm lanes would leave). R rows x blocks x KS independent k-phases of accumulators
// (16 at R = 8) cover the instruction's latency. When wnext is given, the next tile's rows are
// prefetched into L2 one line per row per 16 pairs, so memory streams while this tile computes.
// out[(r * (NZ + NY) + b) * 16 + t]; lanes 8..15 of a ymm block are written as zeros.
template <int R, int NZ, int NY, int KS>
void tile_bf16op_t(const uint32_t* P, int64_t pstride, const c10::BFloat16* const* w,
                   const c10::BFloat16* const* wnext, int64_t Kp, float* out) {
  constexpr int NZa = NZ > 0 ? NZ : 1, NYa = NY > 0 ? NY : 1;  // no zero-length arrays
  __m512 accz[KS][R][NZa];
  __m256 accy[KS][R][NYa];
  for (int s = 0; s < KS; ++s)
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < NZ; ++b) accz[s][r][b] = _mm512_setzero_ps();
      for (int b = 0; b < NY; ++b) accy[s][r][b] = _mm256_setzero_ps();
    }
  const char* wr[R];
  for (int r = 0; r < R; ++r) wr[r] = reinterpret_cast<const char*>(w[r]);
  const auto step = [&](int s, int64_t kp) {
    __m512bh pz[NZa];
    __m256bh py[NYa];
    for (int b = 0; b < NZ; ++b) pz[b] = (__m512bh)_mm512_loadu_si512(P + b * pstride + kp * 16);
    for (int b = 0; b < NY; ++b) py[b] = (__m256bh)_mm256_loadu_si256(reinterpret_cast<const __m256i*>(P + (NZ + b) * pstride + kp * 16));
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, wr[r] + kp * 4, sizeof(pair));
      // one broadcast from memory; the ymm operand is its low half (a GPR broadcast per width
      // measured 1.7x slower)
      const __m512i wb = _mm512_set1_epi32(pair);
      for (int b = 0; b < NZ; ++b) accz[s][r][b] = _mm512_dpbf16_ps(accz[s][r][b], pz[b], (__m512bh)wb);
      if constexpr (NY > 0) {
        __m256i wy;  // the low half; _mm512_castsi512_si256 trips GCC 12's -Wuninitialized (see hsum16)
        std::memcpy(&wy, &wb, sizeof(wy));
        for (int b = 0; b < NY; ++b) accy[s][r][b] = _mm256_dpbf16_ps(accy[s][r][b], py[b], (__m256bh)wy);
      }
    }
  };
  const int64_t Kfull = Kp - Kp % KS;
  for (int64_t kp = 0; kp < Kfull; kp += KS) {
    if (wnext != nullptr && (kp & 15) == 0)
      for (int r = 0; r < R; ++r) __builtin_prefetch(reinterpret_cast<const char*>(wnext[r]) + kp * 4, 0, 2);
    for (int s = 0; s < KS; ++s) step(s, kp + s);
  }
  for (int64_t kp = Kfull; kp < Kp; ++kp) step(0, kp);
  for (int s = 1; s < KS; ++s)
    for (int r = 0; r < R; ++r) {
      for (int b = 0; b < NZ; ++b) accz[0][r][b] = _mm512_add_ps(accz[0][r][b], accz[s][r][b]);
      for (int b = 0; b < NY; ++b) accy[0][r][b] = _mm256_add_ps(accy[0][r][b], accy[s][r][b]);
    }
  for (int r = 0; r < R; ++r) {
    for (int b = 0; b < NZ; ++b) _mm512_storeu_ps(out + (r * (NZ + NY) + b) * 16, accz[0][r][b]);
    for (int b = 0; b < NY; ++b) {
      float* o = out + (r * (NZ + NY) + NZ + b) * 16;
      _mm256_storeu_ps(o, accy[0][r][b]);
      _mm256_storeu_ps(o + 8, _mm256_setzero_ps());
    }
  }
}

template <int R>
void tile_bf16op_r(const uint32_t* P, int64_t pstride, int nz, int ny, const c10::BFloat16* const* w,
                   const c10::BFloat16* const* wnext, int64_t Kp, float* out) {
  // one block: two k-phases so 2R accumulators are in flight; two blocks: R x 2 already are
  if (nz == 2) return tile_bf16op_t<R, 2, 0, 1>(P, pstride, w, wnext, Kp, out);
  if (nz == 1 && ny == 1) return tile_bf16op_t<R, 1, 1, 1>(P, pstride, w, wnext, Kp, out);
  if (nz == 1) return tile_bf16op_t<R, 1, 0, 2>(P, pstride, w, wnext, Kp, out);
  return tile_bf16op_t<R, 0, 1, 2>(P, pstride, w, wnext, Kp, out);
}

// R even, 2 <= R <= kOpRows; (nz, ny) blocks of 16 and 8 tokens: (2, 0), (1, 1), (1, 0) or (0, 1)
void tile_bf16op(const uint32_t* P, int64_t pstride, int nz, int ny, const c10::BFloat16* const* w, int R,
                 const c10::BFloat16* const* wnext, int64_t Kp, float* out) {
  switch (R) {
    case 2: return tile_bf16op_r<2>(P, pstride, nz, ny, w, wnext, Kp, out);
    case 4: return tile_bf16op_r<4>(P, pstride, nz, ny, w, wnext, Kp, out);
    case 6: return tile_bf16op_r<6>(P, pstride, nz, ny, w, wnext, Kp, out);
    default: return tile_bf16op_r<8>(P, pstride, nz, ny, w, wnext, Kp, out);
  }
}

}  // namespace
}  // namespace lfmk
LFMK_AVX512BF16_END

namespace lfmk {
namespace {

template <typename W>
TileFn<W> pick_tile() {
  return cpu_has_avx2() ? &tile_avx2<W> : &tile_portable<W>;
}

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// Pulls a contiguous block of weight rows into the cache hierarchy in address order before a
// register tile reads it as several parallel rows: one sequential sweep runs at the stream
// bandwidth that the parallel-row pattern only half reaches (see row_avx2). The tile then finds
// the rows in L2 (a work item's block is at most 256 KB).
inline void prefetch_block(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

// res[m * R + r] = w[r] . x[m]. When the rows come from memory once (an expert with at most kM
// tokens: decode), they are read one after another as single streams (see row_avx2); otherwise a
// register tile of R rows reuses each input vector R times while the rows sit in L2.
template <typename W>
inline void run_tile(TileFn<W> tile, const W* const* wp, int R, const float* const* xp, int M, int64_t K,
                     float* res, bool streamed) {
  if (!streamed) return tile(wp, R, xp, M, K, res);
  float one[kM];
  for (int r = 0; r < R; ++r) {
    tile(wp + r, 1, xp, M, K, one);
    for (int m = 0; m < M; ++m) res[m * R + r] = one[m];
  }
}

// ---------------------------------------------------------------------------------------------
// Router

template <typename W>
void route_logits(const float* X, const W* gw, int64_t N, int64_t E, int64_t H, float* logits) {
  const TileFn<W> tile = pick_tile<W>();
  const int64_t groups = (N + kM - 1) / kM;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, E * H));
  parallel_for(groups, grain, [&](int64_t g0, int64_t g1) {
    const float* xp[kM];
    const W* wp[kR];
    float res[kM * kR];
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t n0 = g * kM;
      const int M = static_cast<int>(std::min<int64_t>(kM, N - n0));
      for (int m = 0; m < M; ++m) xp[m] = X + (n0 + m) * H;
      for (int64_t e0 = 0; e0 < E; e0 += kR) {
        const int R = static_cast<int>(std::min<int64_t>(kR, E - e0));
        for (int r = 0; r < R; ++r) wp[r] = gw + (e0 + r) * H;
        tile(wp, R, xp, M, H, res);
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) logits[(n0 + m) * E + e0 + r] = res[m * R + r];
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& hidden, const at::Tensor& gate_weight,
                                                 const std::optional<at::Tensor>& expert_bias, int64_t top_k,
                                                 bool norm_topk_prob, double routed_scaling_factor) {
  TORCH_CHECK(hidden.dim() == 2, "moe_route: hidden must be [N, H]");
  TORCH_CHECK(gate_weight.dim() == 2 && gate_weight.size(1) == hidden.size(1), "moe_route: gate_weight must be [E, H]");
  const int64_t N = hidden.size(0), H = hidden.size(1), E = gate_weight.size(0);
  TORCH_CHECK(top_k >= 1 && top_k <= E, "moe_route: top_k must be in [1, E]");
  const at::Tensor X = hidden.to(at::kFloat).contiguous();
  const at::Tensor gw = gate_weight.contiguous();
  at::Tensor bias;
  if (expert_bias.has_value()) {
    TORCH_CHECK(expert_bias->numel() == E, "moe_route: expert_bias must be [E]");
    bias = expert_bias->to(at::kFloat).contiguous();
  }
  auto fopt = hidden.options().dtype(at::kFloat);
  at::Tensor weights = at::empty({N, top_k}, fopt);
  at::Tensor ids = at::empty({N, top_k}, hidden.options().dtype(at::kLong));
  if (N == 0) return {weights, ids};
  at::Tensor logits = at::empty({N, E}, fopt);
  float* lg = logits.mutable_data_ptr<float>();
  LFMK_DISPATCH_FLOAT(gw.scalar_type(), "moe_route", [&] {
    route_logits<scalar_t>(X.const_data_ptr<float>(), cptr<scalar_t>(gw), N, E, H, lg);
  });
  const float* bp = bias.defined() ? bias.const_data_ptr<float>() : nullptr;
  float* wo = weights.mutable_data_ptr<float>();
  int64_t* io = ids.mutable_data_ptr<int64_t>();
  const float scale = static_cast<float>(routed_scaling_factor);
  // transformers runs the router in the model dtype: logits and sigmoid are rounded to hidden's
  // dtype, and the biased score to the promoted dtype of (sigmoid, expert_bias). Selection is
  // discrete, so rounding at the same points is what makes bf16 choices agree with transformers.
  const at::ScalarType hdt = hidden.scalar_type();
  const at::ScalarType cdt = expert_bias.has_value() ? at::promote_types(hdt, expert_bias->scalar_type()) : hdt;
  const auto rnd = [](at::ScalarType t, float v) -> float {
    if (t == at::kBFloat16) return static_cast<float>(c10::BFloat16(v));
    if (t == at::kHalf) return static_cast<float>(c10::Half(v));
    return v;
  };
  parallel_for(N, 256, [&](int64_t n0, int64_t n1) {
    std::vector<float> s(E), c(E);
    std::vector<char> taken(E);
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t e = 0; e < E; ++e) {
        const float l = rnd(hdt, lg[n * E + e]);
        s[e] = rnd(hdt, 1.f / (1.f + std::exp(-l)));
        c[e] = bp ? rnd(cdt, s[e] + bp[e]) : s[e];
        taken[e] = 0;
      }
      float sum = 0.f;
      for (int64_t j = 0; j < top_k; ++j) {
        // strict '>' keeps the lowest index among equal scores
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!taken[e] && (best < 0 || c[e] > c[best])) best = e;
        taken[best] = 1;
        io[n * top_k + j] = best;
        wo[n * top_k + j] = s[best];
        sum += s[best];
      }
      const float div = norm_topk_prob ? sum + 1e-6f : 1.f;
      for (int64_t j = 0; j < top_k; ++j) wo[n * top_k + j] = wo[n * top_k + j] / div * scale;
    }
  });
  return {weights, ids};
}

// ---------------------------------------------------------------------------------------------
// Experts

struct Plan {
  std::vector<int64_t> offs;    // [E + 1] start of each expert's pairs in sorted order
  std::vector<int64_t> tok;     // [P] token (global row of X) of each sorted pair
  std::vector<int64_t> pos;     // [P] sorted position of pair p = n * k + s (chunk-local)
  std::vector<int64_t> active;  // experts with at least one pair, ascending
};

Plan make_plan(const int64_t* ids, int64_t n0, int64_t nt, int64_t k, int64_t E) {
  Plan pl;
  const int64_t P = nt * k;
  pl.offs.assign(E + 1, 0);
  for (int64_t p = 0; p < P; ++p) pl.offs[ids[n0 * k + p] + 1]++;
  for (int64_t e = 0; e < E; ++e) {
    if (pl.offs[e + 1] > 0) pl.active.push_back(e);
    pl.offs[e + 1] += pl.offs[e];
  }
  std::vector<int64_t> fill(pl.offs.begin(), pl.offs.end() - 1);
  pl.tok.resize(P);
  pl.pos.resize(P);
  for (int64_t p = 0; p < P; ++p) {  // ascending p: pairs of one expert keep token order
    const int64_t q = fill[ids[n0 * k + p]]++;
    pl.tok[q] = n0 + p / k;
    pl.pos[p] = q;
  }
  return pl;
}

// Phases 1 and 2 for one chunk of tokens; y [P, H] receives each sorted pair's expert output.
template <typename W>
void experts_pass(const float* X, const W* gu, const W* dn, int64_t H, int64_t I, const Plan& pl,
                  const std::vector<int64_t>& active, float* act, float* y) {
  const TileFn<W> tile = pick_tile<W>();
  const int64_t na = static_cast<int64_t>(active.size());
  if (na == 0) return;

  // Phase 1: items interleave experts (item i -> unit chunk i / na, expert i % na) and are handed
  // out dynamically, so experts with many and with few tokens spread over all threads.
  const int64_t chunks1 = (I + kUnits1 - 1) / kUnits1;
  parallel_dynamic(chunks1 * na, [&](int64_t i) {
    const float* xp[kM];
    const W* wp[kR];
    float res[kM * kR];
    {
      const int64_t e = active[i % na];
      const int64_t j0 = (i / na) * kUnits1, j1 = std::min(I, j0 + kUnits1);
      const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
      const W* G = gu + e * 2 * I * H;
      const W* U = G + I * H;
      if (me > kM) {
        prefetch_block(G + j0 * H, (j1 - j0) * H * static_cast<int64_t>(sizeof(W)));
        prefetch_block(U + j0 * H, (j1 - j0) * H * static_cast<int64_t>(sizeof(W)));
      }
      // token triples outside, row tiles inside: the triple's inputs stay in L1 while the item's
      // rows (kUnits1 * 2 rows, L2-resident after the first triple) stream past them
      for (int64_t t = 0; t < me; t += kM) {
        const int M = static_cast<int>(std::min<int64_t>(kM, me - t));
        for (int m = 0; m < M; ++m) xp[m] = X + pl.tok[q0 + t + m] * H;
        for (int64_t j = j0; j < j1; j += 2) {
          const int nu = static_cast<int>(std::min<int64_t>(2, j1 - j));
          for (int u = 0; u < nu; ++u) {
            wp[u] = G + (j + u) * H;
            wp[nu + u] = U + (j + u) * H;
          }
          run_tile(tile, wp, 2 * nu, xp, M, H, res, me <= kM);
          for (int m = 0; m < M; ++m)
            for (int u = 0; u < nu; ++u)
              act[(q0 + t + m) * I + j + u] = silu(res[m * 2 * nu + u]) * res[m * 2 * nu + nu + u];
        }
      }
    }
  });

  // Phase 2: y[q, h] = down[e, h] . act[q]
  const int64_t chunks2 = (H + kRows2 - 1) / kRows2;
  parallel_dynamic(chunks2 * na, [&](int64_t i) {
    const float* xp[kM];
    const W* wp[kR];
    float res[kM * kR];
    {
      const int64_t e = active[i % na];
      const int64_t h0 = (i / na) * kRows2, h1 = std::min(H, h0 + kRows2);
      const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
      const W* D = dn + e * H * I;
      if (me > kM) prefetch_block(D + h0 * I, (h1 - h0) * I * static_cast<int64_t>(sizeof(W)));
      for (int64_t t = 0; t < me; t += kM) {
        const int M = static_cast<int>(std::min<int64_t>(kM, me - t));
        for (int m = 0; m < M; ++m) xp[m] = act + (q0 + t + m) * I;
        for (int64_t h = h0; h < h1; h += kR) {
          const int R = static_cast<int>(std::min<int64_t>(kR, h1 - h));
          for (int r = 0; r < R; ++r) wp[r] = D + (h + r) * I;
          run_tile(tile, wp, R, xp, M, I, res, me <= kM);
          for (int m = 0; m < M; ++m)
            for (int r = 0; r < R; ++r) y[(q0 + t + m) * H + h + r] = res[m * R + r];
        }
      }
    }
  });
}

// Phases 1 and 2 for the experts with many tokens, bf16 hidden and bf16 weights, on the AVX512-BF16
// tile: the same work items as experts_pass, but the inputs stay bf16 (no fp32 copy of the tokens)
// and act is rounded to bf16 once, since the second tile multiplies bf16 by bf16. Gate and up of an
// item are kept in fp32 and the SwiGLU runs vectorised over the item's units.
void experts_pass_bf16dp(const c10::BFloat16* X, const c10::BFloat16* gu, const c10::BFloat16* dn, int64_t H,
                         int64_t I, const Plan& pl, const std::vector<int64_t>& active, c10::BFloat16* act,
                         float* y) {
  using bf16 = c10::BFloat16;
  const int64_t na = static_cast<int64_t>(active.size());
  if (na == 0) return;
  const int64_t chunks1 = (I + kUnits1 - 1) / kUnits1;
  parallel_dynamic(chunks1 * na, [&](int64_t i) {
    const int64_t e = active[i % na];
    const int64_t j0 = (i / na) * kUnits1, j1 = std::min(I, j0 + kUnits1), nj = j1 - j0;
    const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
    const bf16* G = gu + e * 2 * I * H;
    const bf16* U = G + I * H;
    const int64_t row_bytes = H * static_cast<int64_t>(sizeof(bf16));
    const bf16* xp[kMb];
    const bf16* wp[4];
    float res[kMb * 4];
    // row pairs outer, token groups inner: a pair's four rows (16 KB at H = 2048) come from memory
    // once and stay in L1 while every token group passes over them
    std::vector<float> gbuf(me * kUnits1), ubuf(me * kUnits1);
    for (int64_t j = j0; j < j1; j += 2) {
      const int nu = static_cast<int>(std::min<int64_t>(2, j1 - j));
      for (int u = 0; u < nu; ++u) {
        wp[u] = G + (j + u) * H;
        wp[nu + u] = U + (j + u) * H;
      }
      // The next pair's rows (16 KB at H = 2048) start arriving while this pair computes: a small
      // lookahead keeps memory and the dot products overlapped (a whole item's block requested up
      // front would first wait for all of it).
      const int64_t jn = std::min<int64_t>(j + 2, j1), nn = std::min<int64_t>(2, j1 - jn);
      prefetch_block(G + jn * H, nn * row_bytes);
      prefetch_block(U + jn * H, nn * row_bytes);
      for (int64_t t = 0; t < me; t += kMb) {
        const int M = static_cast<int>(std::min<int64_t>(kMb, me - t));
        for (int m = 0; m < M; ++m) xp[m] = X + pl.tok[q0 + t + m] * H;
        tile_bf16dp(wp, 2 * nu, xp, M, H, res);
        for (int m = 0; m < M; ++m)
          for (int u = 0; u < nu; ++u) {
            gbuf[(t + m) * kUnits1 + j - j0 + u] = res[m * 2 * nu + u];
            ubuf[(t + m) * kUnits1 + j - j0 + u] = res[m * 2 * nu + nu + u];
          }
      }
    }
    for (int64_t m = 0; m < me; ++m)
      swiglu_row_avx2(&gbuf[m * kUnits1], &ubuf[m * kUnits1], act + (q0 + m) * I + j0, nj);
  });
  const int64_t chunks2 = (H + kRows2 - 1) / kRows2;
  parallel_dynamic(chunks2 * na, [&](int64_t i) {
    const int64_t e = active[i % na];
    const int64_t h0 = (i / na) * kRows2, h1 = std::min(H, h0 + kRows2);
    const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
    const bf16* D = dn + e * H * I;
    const int64_t row_bytes = I * static_cast<int64_t>(sizeof(bf16));
    const bf16* xp[kMb];
    const bf16* wp[4];
    float res[kMb * 4];
    for (int64_t h = h0; h < h1; h += 4) {
      const int R = static_cast<int>(std::min<int64_t>(4, h1 - h));
      for (int r = 0; r < R; ++r) wp[r] = D + (h + r) * I;
      const int64_t hn = std::min<int64_t>(h + 4, h1);  // lookahead, as in phase 1
      prefetch_block(D + hn * I, std::min<int64_t>(4, h1 - hn) * row_bytes);
      for (int64_t t = 0; t < me; t += kMb) {
        const int M = static_cast<int>(std::min<int64_t>(kMb, me - t));
        for (int m = 0; m < M; ++m) xp[m] = act + (q0 + t + m) * I;
        tile_bf16dp(wp, R, xp, M, I, res);
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) y[(q0 + t + m) * H + h + r] = res[m * R + r];
      }
    }
  });
}

// An expert's last block runs on ymm (8 lanes) when at most 8 of its tokens are left for it.
inline bool narrow_last_block(int64_t tokens) { return (tokens - 1) % kLanes < kLanes / 2; }

// Phases 1 and 2 for bf16 hidden and weights on the outer-product tile (tile_bf16op): each expert's
// tokens are packed into blocks of kLanes, [block][K/2][kLanes] dwords of bf16 pairs (zero lanes past
// the last token, which then compute zeros), so a weight pair is read from memory once per block and
// multiplies 16 tokens in one instruction. Phase 1 writes act straight into the same packed layout
// (rounded to bf16 once, by the shared SwiGLU row helper) for phase 2. Work items as in experts_pass,
// only larger (kOpUnits1, kOpRows2).
// Needs H and I even: pairs never straddle two rows.
void experts_pass_bf16op(const c10::BFloat16* X, const c10::BFloat16* gu, const c10::BFloat16* dn, int64_t H,
                         int64_t I, const Plan& pl, const std::vector<int64_t>& active, float* y) {
  using bf16 = c10::BFloat16;
  const int64_t na = static_cast<int64_t>(active.size());
  if (na == 0) return;
  const int64_t Hp = H / 2, Ip = I / 2;
  std::vector<int64_t> first(na + 1, 0);  // first block of each active expert
  for (int64_t a = 0; a < na; ++a) {
    const int64_t me = pl.offs[active[a] + 1] - pl.offs[active[a]];
    first[a + 1] = first[a] + (me + kLanes - 1) / kLanes;
  }
  const int64_t nblocks = first[na];
  std::vector<int64_t> block_expert(nblocks);  // active index of each block
  for (int64_t a = 0; a < na; ++a)
    std::fill(block_expert.begin() + first[a], block_expert.begin() + first[a + 1], a);
  // Not zero-filled (5 MB at 128 tokens): the packing writes every lane of xpack, zeros included, and
  // phase 1 every lane of apack (padded lanes compute silu(0) * 0 = 0).
  const std::unique_ptr<uint32_t[]> xpack_buf(new uint32_t[nblocks * Hp * kLanes]);
  const std::unique_ptr<uint32_t[]> apack_buf(new uint32_t[nblocks * Ip * kLanes]);
  uint32_t* const xpack = xpack_buf.get();
  uint32_t* const apack = apack_buf.get();

  parallel_for(nblocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      const int64_t a = block_expert[blk], e = active[a];
      const int64_t q0 = pl.offs[e] + (blk - first[a]) * kLanes;
      const int64_t valid = std::min<int64_t>(kLanes, pl.offs[e + 1] - q0);
      uint32_t* dst = xpack + blk * Hp * kLanes;
      for (int64_t t = 0; t < kLanes; ++t) {
        if (t >= valid) {
          for (int64_t kp = 0; kp < Hp; ++kp) dst[kp * kLanes + t] = 0;
          continue;
        }
        const char* src = reinterpret_cast<const char*>(X + pl.tok[q0 + t] * H);
        for (int64_t kp = 0; kp < Hp; ++kp) std::memcpy(&dst[kp * kLanes + t], src + kp * 4, 4);
      }
    }
  });

  const int64_t chunks1 = (I + kOpUnits1 - 1) / kOpUnits1;
  parallel_dynamic(chunks1 * na, [&](int64_t i) {
    const int64_t a = i % na, e = active[a];
    const int64_t j0 = (i / na) * kOpUnits1, j1 = std::min(I, j0 + kOpUnits1);
    const int64_t nb = first[a + 1] - first[a];
    const bool narrow_last = narrow_last_block(pl.offs[e + 1] - pl.offs[e]);
    const bf16* G = gu + e * 2 * I * H;
    const bf16* U = G + I * H;
    const uint32_t* Pe = xpack + first[a] * Hp * kLanes;
    uint32_t* Ae = apack + first[a] * Ip * kLanes;
    constexpr int kUnits = kOpRows / 2;
    const bf16* wp[kOpRows];
    const bf16* wn[kOpRows];
    alignas(64) float res[kOpRows * 2 * kLanes];
    bf16 act[kUnits][2 * kLanes];
    for (int64_t j = j0; j < j1; j += kUnits) {
      const int nu = static_cast<int>(std::min<int64_t>(kUnits, j1 - j));  // even: I and kOpUnits1 are
      const int64_t jn = j + nu, nn = std::min<int64_t>(kUnits, j1 - jn);
      for (int u = 0; u < nu; ++u) {
        wp[u] = G + (j + u) * H;
        wp[nu + u] = U + (j + u) * H;
      }
      for (int u = 0; u < 2 * nu; ++u) {  // next tile of this item, or nothing (nullptr)
        const int64_t jj = jn + std::min<int64_t>(u % nu, std::max<int64_t>(nn - 1, 0));
        wn[u] = (u < nu ? G : U) + jj * H;
      }
      for (int64_t b = 0; b < nb; b += 2) {
        const int tb = static_cast<int>(std::min<int64_t>(2, nb - b));
        const int ny = (b + tb == nb && narrow_last) ? 1 : 0;
        tile_bf16op(Pe + b * Hp * kLanes, Hp * kLanes, tb - ny, ny, wp, 2 * nu, (b == 0 && nn > 0) ? wn : nullptr, Hp, res);
        const int lanes = tb * static_cast<int>(kLanes);
        for (int u = 0; u < nu; ++u) swiglu_row_avx2(res + u * lanes, res + (nu + u) * lanes, act[u], lanes);
        for (int u = 0; u < nu; u += 2) {
          uint32_t* dst = Ae + b * Ip * kLanes + ((j + u) / 2) * kLanes;
          for (int l = 0; l < lanes; ++l) {
            const uint32_t lo = act[u][l].x, hi = act[u + 1][l].x;
            dst[(l / kLanes) * Ip * kLanes + l % kLanes] = lo | (hi << 16);
          }
        }
      }
    }
  });

  const int64_t chunks2 = (H + kOpRows2 - 1) / kOpRows2;
  parallel_dynamic(chunks2 * na, [&](int64_t i) {
    const int64_t a = i % na, e = active[a];
    const int64_t h0 = (i / na) * kOpRows2, h1 = std::min(H, h0 + kOpRows2);
    const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
    const int64_t nb = first[a + 1] - first[a];
    const bool narrow_last = narrow_last_block(me);
    const bf16* D = dn + e * H * I;
    const uint32_t* Ae = apack + first[a] * Ip * kLanes;
    const bf16* wp[kOpRows];
    const bf16* wn[kOpRows];
    alignas(64) float res[kOpRows * 2 * kLanes];
    for (int64_t h = h0; h < h1; h += kOpRows) {
      // even: H is, and so are kOpRows2 and kOpRows
      const int R = static_cast<int>(std::min<int64_t>(kOpRows, h1 - h));
      const int64_t hn = h + R, nn = std::min<int64_t>(kOpRows, h1 - hn);
      for (int r = 0; r < R; ++r) {
        wp[r] = D + (h + r) * I;
        wn[r] = D + (hn + std::min<int64_t>(r, std::max<int64_t>(nn - 1, 0))) * I;
      }
      for (int64_t b = 0; b < nb; b += 2) {
        const int tb = static_cast<int>(std::min<int64_t>(2, nb - b));
        const int ny = (b + tb == nb && narrow_last) ? 1 : 0;
        tile_bf16op(Ae + b * Ip * kLanes, Ip * kLanes, tb - ny, ny, wp, R, (b == 0 && nn > 0) ? wn : nullptr, Ip, res);
        const int64_t lanes = std::min<int64_t>(tb * kLanes, me - b * kLanes);
        for (int64_t l = 0; l < lanes; ++l)
          for (int r = 0; r < R; ++r) y[(q0 + b * kLanes + l) * H + h + r] = res[r * tb * kLanes + l];
      }
    }
  });
}

// One expert's tokens through oneDNN: g = X_e @ gate_up[e]^T, act = silu(g_gate) * g_up, y_e =
// act @ down[e]^T. The GEMMs take and return bf16 (what F.linear computes in a bf16 model), so gate,
// up, act and the expert output are each rounded to bf16 once; accumulation inside them is fp32.
// The mm calls run outside any parallel region: oneDNN spreads each one over all threads itself.
void expert_torch_gemm(const at::Tensor& hidden, const at::Tensor& gu, const at::Tensor& dn, int64_t e,
                       const Plan& pl, float* y) {
  const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
  const int64_t H = hidden.size(1), I = dn.size(2);
  at::Tensor rows = at::empty({me}, hidden.options().dtype(at::kLong));
  std::memcpy(rows.mutable_data_ptr<int64_t>(), pl.tok.data() + q0, me * sizeof(int64_t));
  const at::Tensor xe = hidden.index_select(0, rows);
  const at::Tensor g = at::mm(xe, gu[e].t());
  at::Tensor act = at::empty({me, I}, g.options());
  const c10::BFloat16* gp = cptr<c10::BFloat16>(g);
  c10::BFloat16* ap = mptr<c10::BFloat16>(act);
  const bool avx2 = cpu_has_avx2();
  parallel_for(me, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, I)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const c10::BFloat16 *gr = gp + m * 2 * I, *ur = gr + I;
      c10::BFloat16* ar = ap + m * I;
      if (avx2) {
        swiglu_row_avx2(gr, ur, ar, I);
      } else {
        for (int64_t j = 0; j < I; ++j) ar[j] = c10::BFloat16(silu(static_cast<float>(gr[j])) * static_cast<float>(ur[j]));
      }
    }
  });
  // the expert's rows of y (fp32) take the bf16 output; copy_ widens exactly
  at::from_blob(y + q0 * H, {me, H}, hidden.options().dtype(at::kFloat)).copy_(at::mm(act, dn[e].t()));
}

template <typename T>
void combine(const float* y, const float* tw, const Plan& pl, int64_t n0, int64_t nt, int64_t k, int64_t H, T* out) {
  parallel_for(nt, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * k)), [&](int64_t a, int64_t b) {
    std::vector<float> acc(H);
    for (int64_t n = a; n < b; ++n) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t s = 0; s < k; ++s) {  // slot order: deterministic whatever the threads did
        const float w = tw[(n0 + n) * k + s];
        const float* yr = y + pl.pos[n * k + s] * H;
        for (int64_t h = 0; h < H; ++h) acc[h] += w * yr[h];
      }
      T* o = out + (n0 + n) * H;
      for (int64_t h = 0; h < H; ++h) o[h] = from_f32<T>(acc[h]);
    }
  });
}

// Shapes, dtypes and id ranges were validated in Python (lfm_kernels/ops/moe.py); the checks here
// guard the memory safety of this function when it is called directly.
at::Tensor moe_experts_cpu(const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                           const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                           int64_t bf16_dot_min_rows) {
  TORCH_CHECK(hidden.dim() == 2, "moe_experts: hidden must be [N, H]");
  const int64_t N = hidden.size(0), H = hidden.size(1);
  TORCH_CHECK(gate_up_proj.dim() == 3 && gate_up_proj.size(2) == H && gate_up_proj.size(1) % 2 == 0,
              "moe_experts: gate_up_proj must be [E, 2I, H]");
  const int64_t E = gate_up_proj.size(0), I = gate_up_proj.size(1) / 2;
  TORCH_CHECK(down_proj.dim() == 3 && down_proj.size(0) == E && down_proj.size(1) == H && down_proj.size(2) == I,
              "moe_experts: down_proj must be [E, H, I]");
  TORCH_CHECK(down_proj.scalar_type() == gate_up_proj.scalar_type(), "moe_experts: weights must share a dtype");
  TORCH_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == N, "moe_experts: topk_ids must be [N, k]");
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK(topk_weights.dim() == 2 && topk_weights.size(0) == N && topk_weights.size(1) == k,
              "moe_experts: topk_weights must be [N, k]");
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N * k; ++i)
    TORCH_CHECK(idp[i] >= 0 && idp[i] < E, "moe_experts: expert id ", idp[i], " out of range [0, ", E, ")");
  const at::Tensor tw = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor X = hidden.to(at::kFloat).contiguous();
  const at::Tensor gu = gate_up_proj.contiguous(), dn = down_proj.contiguous();
  const bool bf16_dot = bf16_dot_min_rows > 0 && hidden.scalar_type() == at::kBFloat16 &&
                        gu.scalar_type() == at::kBFloat16;
  const bool own_bf16_tile = bf16_dot && cpu_has_avx512bf16();
  const bool pairs_fit = H % 2 == 0 && I % 2 == 0;
  const at::Tensor hidden_c = bf16_dot ? hidden.contiguous() : at::Tensor();
  at::Tensor out = at::empty({N, H}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0 || H == 0) return out;
  if (k == 0 || I == 0) return out.zero_();
  const int64_t chunk = std::max<int64_t>(1, kMaxPairs / k);
  const int64_t pmax = std::min(N, chunk) * k;
  auto fopt = hidden.options().dtype(at::kFloat);
  at::Tensor act = at::empty({pmax, I}, fopt), y = at::empty({pmax, H}, fopt);
  at::Tensor act16 = own_bf16_tile ? at::empty({pmax, I}, hidden.options()) : at::Tensor();
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nt = std::min(chunk, N - n0);
    const Plan pl = make_plan(idp, n0, nt, k, E);
    std::vector<int64_t> tiled, dot, outer, gemm;
    for (const int64_t e : pl.active) {
      const int64_t me = pl.offs[e + 1] - pl.offs[e];
      if (!bf16_dot || me < bf16_dot_min_rows) {
        tiled.push_back(e);
      } else if (!own_bf16_tile) {
        gemm.push_back(e);
      } else if (pairs_fit && me >= kOuterMinRows) {
        (me < kOuterOneDnnMinRows ? outer : gemm).push_back(e);
      } else {
        (me < kDotOneDnnMinRows ? dot : gemm).push_back(e);
      }
    }
    float* yp = y.mutable_data_ptr<float>();
    if (!outer.empty())
      experts_pass_bf16op(cptr<c10::BFloat16>(hidden_c), cptr<c10::BFloat16>(gu), cptr<c10::BFloat16>(dn), H, I, pl,
                          outer, yp);
    if (!dot.empty())
      experts_pass_bf16dp(cptr<c10::BFloat16>(hidden_c), cptr<c10::BFloat16>(gu), cptr<c10::BFloat16>(dn), H, I, pl,
                          dot, mptr<c10::BFloat16>(act16), yp);
    if (static_cast<int64_t>(gemm.size()) >= kGemmExpertsPerThread * at::get_num_threads()) {
      // Many experts (prefill): one expert per thread at a time, each GEMM single-threaded (nested
      // in our parallel region). A single thread's GEMM computes while the hardware prefetcher
      // streams its weights, so the cores overlap compute and memory; splitting every GEMM over all
      // threads instead leaves each expert first bandwidth- then compute-bound. Largest first, so the
      // last experts claimed are the short ones.
      std::stable_sort(gemm.begin(), gemm.end(), [&](int64_t a, int64_t b) {
        return pl.offs[a + 1] - pl.offs[a] > pl.offs[b + 1] - pl.offs[b];
      });
      parallel_dynamic(static_cast<int64_t>(gemm.size()),
                       [&](int64_t i) { expert_torch_gemm(hidden_c, gu, dn, gemm[i], pl, yp); });
    } else {
      for (const int64_t e : gemm) expert_torch_gemm(hidden_c, gu, dn, e, pl, yp);
    }
    LFMK_DISPATCH_FLOAT(gu.scalar_type(), "moe_experts", [&] {
      experts_pass<scalar_t>(X.const_data_ptr<float>(), cptr<scalar_t>(gu), cptr<scalar_t>(dn), H, I, pl, tiled,
                             act.mutable_data_ptr<float>(), y.mutable_data_ptr<float>());
    });
    LFMK_DISPATCH_FLOAT(out.scalar_type(), "moe_experts", [&] {
      combine<scalar_t>(y.const_data_ptr<float>(), tw.const_data_ptr<float>(), pl, n0, nt, k, H, mptr<scalar_t>(out));
    });
  }
  return out;
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("moe_route(Tensor hidden, Tensor gate_weight, Tensor? expert_bias, int top_k, bool norm_topk_prob, "
        "float routed_scaling_factor) -> (Tensor, Tensor)");
  m.def("moe_experts(Tensor hidden, Tensor gate_up_proj, Tensor down_proj, Tensor topk_ids, Tensor topk_weights, "
        "int bf16_dot_min_rows=0) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("moe_route", &lfmk::moe_route_cpu);
  m.impl("moe_experts", &lfmk::moe_experts_cpu);
}
