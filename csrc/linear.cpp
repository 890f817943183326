// out[M, N] = x[M, K] @ weight[N, K]^T (+ bias), fp32 arithmetic, out in x's dtype.
//
// Two regimes, because the bottleneck differs:
//  * Few rows (decode, M <= kGemvMaxRows): the weight is read once and every element is used only
//    M times, so the op is a stream over the weight at memory bandwidth. Weight vectors are widened
//    from bf16 to fp32 with a shift / mask in registers (x is stored permuted to match) and every x
//    row is applied to each loaded vector, into several independent fp32 accumulators. Threads
//    claim blocks of output columns N from a shared counter. On CPUs with AVX-512: bf16 x on bf16
//    weights with AVX512-BF16 at M <= 2 runs vdpbf16ps on the stored bits (no widening, x stays
//    bf16), other dtypes at M = 2 a 16-lane twin of the AVX2 loop; the kernel policy can keep those
//    calls on AVX2 where that measures faster (the op's avx512_max_rows).
//  * Many rows (prefill): compute bound. A BLIS-style blocked GEMM: a panel of kNc weight rows x kKc
//    columns is converted to fp32 and packed (transposed to [k][16]) once into an L2-sized buffer,
//    then reused by every 6-row block of x through a 6x16 register-blocked micro-kernel (12 fp32
//    accumulators, 2 weight vectors and one broadcast per k). bf16 weights therefore cost the same
//    as fp32 ones in the inner loop. Threads claim (panel of N) x (block of M) tasks; M is split only
//    when N has too few panels.
#include "common.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <new>
#include <vector>

namespace lfmk {
namespace {

constexpr int64_t kGemvMaxRows = 4;
constexpr int kMr = 6;          // micro-kernel rows of x
constexpr int kNr = 16;         // micro-kernel output columns (two AVX2 vectors)
constexpr int64_t kNc = 128;    // weight rows per packed panel: kNc*kKc*4 B = 256 KiB, in L2
constexpr int64_t kKc = 512;    // K per panel: a 6 x kKc x panel (12 KiB) stays in L1

struct LinearArgs {
  const void* x;
  int64_t ldx;         // row stride of x (elements); its column stride is 1
  const void* w;       // [N, K] contiguous
  const float* bias;   // [N] fp32 or null
  void* out;           // [M, N] contiguous
  int64_t M, N, K;
};

// 64-byte aligned scratch that is not zero-filled (zero-filling would cost a pass over memory).
struct AlignedBuf {
  float* p = nullptr;
  explicit AlignedBuf(size_t n) : p(static_cast<float*>(::operator new(n * sizeof(float), std::align_val_t(64)))) {}
  ~AlignedBuf() { ::operator delete(p, std::align_val_t(64)); }
  AlignedBuf(const AlignedBuf&) = delete;
  AlignedBuf& operator=(const AlignedBuf&) = delete;
};

// Weight rows per GEMV task (a multiple of R): tasks of up to 1 MiB of weight, at least two per thread.
// Each task is one sequential sweep over its rows; measured on Zen 4 (2 threads, weights streamed
// from DRAM), 1 MiB tasks read 1.2-1.45x faster than 64 KiB ones (lm_head 128000 x 2048: 53 vs
// 36.5 GB/s; 6144 x 2048: 38.7 vs 30.0). Two per thread still balance a small weight (512 x 2048: one
// task per thread read 22 GB/s).
inline int64_t gemv_rows_per_task(int64_t N, int64_t row_bytes_in, int64_t R) {
  const int64_t row_bytes = std::max<int64_t>(1, row_bytes_in);
  const int64_t task_bytes = std::clamp<int64_t>(N * row_bytes / (2 * int64_t(at::get_num_threads())),
                                                 int64_t(1) << 16, int64_t(1) << 20);
  return std::max<int64_t>(R, task_bytes / row_bytes / R * R);
}

// The decode GEMVs that read one weight row at a time (the AVX-512 ones): the rows in tasks of
// gemv_rows_per_task, claimed by the threads; row(n, res) leaves row n's M dot products in res, and
// bias and the store in x's dtype follow.
template <typename TX, int M, typename RowFn>
void gemv_stream_rows(const LinearArgs& a, int64_t row_bytes, const RowFn& row) {
  TX* out = static_cast<TX*>(a.out);
  const int64_t N = a.N;
  const int64_t rows_per_task = gemv_rows_per_task(N, row_bytes, 1);
  const int64_t ntasks = (N + rows_per_task - 1) / rows_per_task;
  parallel_workers(ntasks, [&](TaskQueue& queue) {
    float res[M];
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t n_end = std::min(N, (t + 1) * rows_per_task);
      for (int64_t n = t * rows_per_task; n < n_end; ++n) {
        row(n, res);
        const float b = a.bias ? a.bias[n] : 0.f;
        for (int m = 0; m < M; ++m) out[m * N + n] = from_f32<TX>(res[m] + b);
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------
// Portable path: plain C++ for CPUs without AVX2 (and the tests' cross-check). Weight rows are
// widened to fp32 a block at a time so the dot products run on floats.

template <typename TX, typename TW>
void linear_portable(const LinearArgs& a) {
  constexpr int64_t kRows = 32;
  const TX* x = static_cast<const TX*>(a.x);
  const TW* w = static_cast<const TW*>(a.w);
  TX* out = static_cast<TX*>(a.out);
  // x widened once to fp32 [M, K]
  std::vector<float> xf(static_cast<size_t>(a.M * a.K));
  for (int64_t m = 0; m < a.M; ++m)
    for (int64_t k = 0; k < a.K; ++k) xf[m * a.K + k] = to_f32(x[m * a.ldx + k]);
  const int64_t blocks = (a.N + kRows - 1) / kRows;
  parallel_for(blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wf(static_cast<size_t>(kRows * a.K));
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = b * kRows, nn = std::min(kRows, a.N - n0);
      for (int64_t r = 0; r < nn; ++r)
        for (int64_t k = 0; k < a.K; ++k) wf[r * a.K + k] = to_f32(w[(n0 + r) * a.K + k]);
      for (int64_t m = 0; m < a.M; ++m) {
        const float* xr = xf.data() + m * a.K;
        for (int64_t r = 0; r < nn; ++r) {
          const float* wr = wf.data() + r * a.K;
          // four partial sums: independent dependency chains, and pairwise-ish rounding
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
          int64_t k = 0;
          for (; k + 4 <= a.K; k += 4) {
            s0 += xr[k] * wr[k];
            s1 += xr[k + 1] * wr[k + 1];
            s2 += xr[k + 2] * wr[k + 2];
            s3 += xr[k + 3] * wr[k + 3];
          }
          for (; k < a.K; ++k) s0 += xr[k] * wr[k];
          float acc = (s0 + s1) + (s2 + s3);
          if (a.bias) acc += a.bias[n0 + r];
          out[m * a.N + n0 + r] = from_f32<TX>(acc);
        }
      }
    }
  });
}

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
namespace lfmk {
namespace {

// ---- weight loads: 16 consecutive elements as two fp32 vectors ----
// For bf16 the two vectors hold the even and the odd elements (shift / mask of 32-bit lanes: the
// cheapest widening there is), so x is stored permuted the same way for the GEMV (see pack_x16).
template <typename TW>
struct WLoad;
template <>
struct WLoad<c10::BFloat16> {
  static constexpr bool kInterleaved = true;
  static inline void load16(const c10::BFloat16* p, __m256& even, __m256& odd) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
template <>
struct WLoad<float> {
  static constexpr bool kInterleaved = false;
  static inline void load16(const float* p, __m256& lo, __m256& hi) {
    lo = _mm256_loadu_ps(p);
    hi = _mm256_loadu_ps(p + 8);
  }
};
template <>
struct WLoad<c10::Half> {
  static constexpr bool kInterleaved = false;
  static inline void load16(const c10::Half* p, __m256& lo, __m256& hi) {
    lo = avx2::load8(p);
    hi = avx2::load8(p + 8);
  }
};

// x row -> fp32, in the element order WLoad<TW> produces for each full block of 16 (tail in order).
template <typename TX, bool kInterleaved>
void pack_x16(const TX* src, float* dst, int64_t K) {
  const int64_t kv = K & ~int64_t(15);
  for (int64_t k = 0; k < kv; k += 16) {
    if (kInterleaved) {
      for (int i = 0; i < 8; ++i) {
        dst[k + i] = to_f32(src[k + 2 * i]);
        dst[k + 8 + i] = to_f32(src[k + 2 * i + 1]);
      }
    } else {
      for (int i = 0; i < 16; ++i) dst[k + i] = to_f32(src[k + i]);
    }
  }
  for (int64_t k = kv; k < K; ++k) dst[k] = to_f32(src[k]);
}

// R weight rows against M x rows; one accumulator per (weight row, x row). Each step loads 16
// elements of all R rows first, then streams the x rows past them, so the registers hold R*M
// accumulators + 2R weight vectors + 2 x vectors (<= 16: nothing is spilled to the stack). No
// software prefetch: the hardware prefetcher follows these few sequential streams (prefetching
// 0.5-2 KiB ahead gave no consistent gain here).
template <typename TW, int M, int R>
inline void gemv_rows(const TW* w, int64_t K, const float* xf, float* res /* [R][M] */) {
  static_assert(R * M + 2 * R + 2 <= 16, "gemv_rows would spill registers");
  __m256 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
  const int64_t kv = K & ~int64_t(15);
  for (int64_t k = 0; k < kv; k += 16) {
    __m256 w0[R], w1[R];
    for (int r = 0; r < R; ++r) {
      WLoad<TW>::load16(w + r * K + k, w0[r], w1[r]);
    }
    for (int m = 0; m < M; ++m) {
      const __m256 x0 = _mm256_loadu_ps(xf + m * K + k), x1 = _mm256_loadu_ps(xf + m * K + k + 8);
      for (int r = 0; r < R; ++r) {
        acc[r][m] = _mm256_fmadd_ps(w0[r], x0, acc[r][m]);
        acc[r][m] = _mm256_fmadd_ps(w1[r], x1, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) {
      float s = avx2::hsum(acc[r][m]);
      for (int64_t k = kv; k < K; ++k) s += to_f32(w[r * K + k]) * xf[m * K + k];
      res[r * M + m] = s;
    }
}

// One weight row read as a single sequential stream, 16*U elements per step into U independent
// accumulators per x row, with the stream prefetched stream_ahead() bytes ahead (common.h).
template <typename TW, int M, int U>
inline void gemv_row_wide(const TW* w, int64_t K, const float* xf, float* res) {
  static_assert(U * M + 4 <= 16, "U*M accumulators + 2 weight + 2 x vectors must fit the 16 registers");
  __m256 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm256_setzero_ps();
  const int64_t kvu = K - K % (16 * U);
  for (int64_t k = 0; k < kvu; k += 16 * U) {
    prefetch_stream(w + k, 16 * U * int(sizeof(TW)));
    for (int u = 0; u < U; ++u) {
      __m256 w0, w1;
      WLoad<TW>::load16(w + k + 16 * u, w0, w1);
      for (int m = 0; m < M; ++m) {
        acc[u][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + m * K + k + 16 * u), acc[u][m]);
        acc[u][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + m * K + k + 16 * u + 8), acc[u][m]);
      }
    }
  }
  const int64_t kv = K & ~int64_t(15);
  for (int64_t k = kvu; k < kv; k += 16) {
    __m256 w0, w1;
    WLoad<TW>::load16(w + k, w0, w1);
    for (int m = 0; m < M; ++m) {
      acc[0][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xf + m * K + k), acc[0][m]);
      acc[0][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xf + m * K + k + 8), acc[0][m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m256 sum = acc[0][m];
    for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[u][m]);
    float s = avx2::hsum(sum);
    for (int64_t k = kv; k < K; ++k) s += to_f32(w[k]) * xf[m * K + k];
    res[m] = s;
  }
}

template <typename TX, typename TW, int M>
void gemv_avx2(const LinearArgs& a) {
  // M <= 2: one sequential stream per row (gemv_row_wide; measured ~1.5x the 4-interleaved-rows
  // variant for M = 1). M = 3, 4: gemv_rows with R = 2 rows at a time (measured faster there than a
  // single stream with 2 accumulators per x row: more independent loads per FMA).
  constexpr bool kWide = M <= 2;
  constexpr int R = kWide ? 1 : 2;
  const TX* x = static_cast<const TX*>(a.x);
  const TW* w = static_cast<const TW*>(a.w);
  TX* out = static_cast<TX*>(a.out);
  const int64_t K = a.K, N = a.N;
  AlignedBuf xf(static_cast<size_t>(M * K) + 1);
  for (int m = 0; m < M; ++m) pack_x16<TX, WLoad<TW>::kInterleaved>(x + m * a.ldx, xf.p + m * K, K);
  auto finish = [&](int64_t n, const float* res, int rows) {
    for (int r = 0; r < rows; ++r)
      for (int m = 0; m < M; ++m) {
        const float b = a.bias ? a.bias[n + r] : 0.f;
        out[m * N + n + r] = from_f32<TX>(res[r * M + m] + b);
      }
  };
  const int64_t rows_per_task = gemv_rows_per_task(N, K * int64_t(sizeof(TW)), R);
  const int64_t ntasks = (N + rows_per_task - 1) / rows_per_task;
  parallel_workers(ntasks, [&](TaskQueue& queue) {
    float res[R * M];
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t n_end = std::min(N, (t + 1) * rows_per_task);
      int64_t n = t * rows_per_task;
      if constexpr (kWide) {
        for (; n < n_end; ++n) {
          gemv_row_wide<TW, M, 4>(w + n * K, K, xf.p, res);
          finish(n, res, 1);
        }
      } else {
        for (; n + R <= n_end; n += R) {
          gemv_rows<TW, M, R>(w + n * K, K, xf.p, res);
          finish(n, res, R);
        }
        for (; n < n_end; ++n) {
          gemv_rows<TW, M, 1>(w + n * K, K, xf.p, res);
          finish(n, res, 1);
        }
      }
    }
  });
}

// ---- GEMM ----

// 8x8 transpose of fp32 vectors in place: r[i] lane j -> r[j] lane i.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i + 0], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Weight rows [n0, n0+nn) x columns [k0, k0+kc) -> fp32 panel [ceil(nn/16)][kc][16], zero in the
// columns past nn (their outputs are computed and dropped; they are never stored to `out`).
template <typename TW>
void pack_w(const TW* w, int64_t K, int64_t n0, int64_t nn, int64_t k0, int64_t kc, float* dst) {
  const int64_t kv = kc & ~int64_t(7);
  for (int64_t j = 0; j * kNr < nn; ++j) {
    float* pj = dst + j * kc * kNr;
    for (int h = 0; h < 2; ++h) {
      const int64_t rb = j * kNr + h * 8;  // first of these 8 rows, relative to n0
      const int rows = static_cast<int>(std::clamp<int64_t>(nn - rb, 0, 8));
      for (int64_t k = 0; k < kv; k += 8) {
        __m256 v[8];
        for (int i = 0; i < 8; ++i)
          v[i] = i < rows ? avx2::load8(w + (n0 + rb + i) * K + k0 + k) : _mm256_setzero_ps();
        transpose8(v);
        for (int i = 0; i < 8; ++i) _mm256_store_ps(pj + (k + i) * kNr + h * 8, v[i]);
      }
      for (int64_t k = kv; k < kc; ++k)
        for (int i = 0; i < 8; ++i)
          pj[k * kNr + h * 8 + i] = i < rows ? to_f32(w[(n0 + rb + i) * K + k0 + k]) : 0.f;
    }
  }
}

// c[6][16] (row stride ldc) (+)= xp[kc][6] * wp[kc][16]; first: start from zero instead of c.
inline void micro_6x16(const float* xp, const float* wp, int64_t kc, float* c, int64_t ldc, bool first) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (first) {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  } else {
    c00 = _mm256_load_ps(c + 0 * ldc); c01 = _mm256_load_ps(c + 0 * ldc + 8);
    c10 = _mm256_load_ps(c + 1 * ldc); c11 = _mm256_load_ps(c + 1 * ldc + 8);
    c20 = _mm256_load_ps(c + 2 * ldc); c21 = _mm256_load_ps(c + 2 * ldc + 8);
    c30 = _mm256_load_ps(c + 3 * ldc); c31 = _mm256_load_ps(c + 3 * ldc + 8);
    c40 = _mm256_load_ps(c + 4 * ldc); c41 = _mm256_load_ps(c + 4 * ldc + 8);
    c50 = _mm256_load_ps(c + 5 * ldc); c51 = _mm256_load_ps(c + 5 * ldc + 8);
  }
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(wp + k * kNr), b1 = _mm256_load_ps(wp + k * kNr + 8);
    const float* xk = xp + k * kMr;
    __m256 a;
    a = _mm256_broadcast_ss(xk + 0); c00 = _mm256_fmadd_ps(a, b0, c00); c01 = _mm256_fmadd_ps(a, b1, c01);
    a = _mm256_broadcast_ss(xk + 1); c10 = _mm256_fmadd_ps(a, b0, c10); c11 = _mm256_fmadd_ps(a, b1, c11);
    a = _mm256_broadcast_ss(xk + 2); c20 = _mm256_fmadd_ps(a, b0, c20); c21 = _mm256_fmadd_ps(a, b1, c21);
    a = _mm256_broadcast_ss(xk + 3); c30 = _mm256_fmadd_ps(a, b0, c30); c31 = _mm256_fmadd_ps(a, b1, c31);
    a = _mm256_broadcast_ss(xk + 4); c40 = _mm256_fmadd_ps(a, b0, c40); c41 = _mm256_fmadd_ps(a, b1, c41);
    a = _mm256_broadcast_ss(xk + 5); c50 = _mm256_fmadd_ps(a, b0, c50); c51 = _mm256_fmadd_ps(a, b1, c51);
  }
  _mm256_store_ps(c + 0 * ldc, c00); _mm256_store_ps(c + 0 * ldc + 8, c01);
  _mm256_store_ps(c + 1 * ldc, c10); _mm256_store_ps(c + 1 * ldc + 8, c11);
  _mm256_store_ps(c + 2 * ldc, c20); _mm256_store_ps(c + 2 * ldc + 8, c21);
  _mm256_store_ps(c + 3 * ldc, c30); _mm256_store_ps(c + 3 * ldc + 8, c31);
  _mm256_store_ps(c + 4 * ldc, c40); _mm256_store_ps(c + 4 * ldc + 8, c41);
  _mm256_store_ps(c + 5 * ldc, c50); _mm256_store_ps(c + 5 * ldc + 8, c51);
}

template <typename TX, typename TW>
void gemm_avx2(const LinearArgs& a) {
  const TX* x = static_cast<const TX*>(a.x);
  const TW* w = static_cast<const TW*>(a.w);
  TX* out = static_cast<TX*>(a.out);
  const int64_t M = a.M, N = a.N, K = a.K;
  const int64_t mpanels = (M + kMr - 1) / kMr;

  // x -> fp32 micro-panels [mpanels][K][6] (rows past M are zero): the micro-kernel then reads one
  // contiguous stream of x, and x's dtype and row stride cost nothing in the inner loop.
  AlignedBuf xp(static_cast<size_t>(mpanels * K * kMr));
  parallel_for(mpanels, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      float* dst = xp.p + p * K * kMr;
      for (int i = 0; i < kMr; ++i) {
        const int64_t m = p * kMr + i;
        if (m < M) {
          const TX* src = x + m * a.ldx;
          for (int64_t k = 0; k < K; ++k) dst[k * kMr + i] = to_f32(src[k]);
        } else {
          for (int64_t k = 0; k < K; ++k) dst[k * kMr + i] = 0.f;
        }
      }
    }
  });

  // Tasks: (panel of kNc weight rows) x (chunk of m-panels). M is split only when N alone gives
  // too few tasks to keep every thread busy; each M chunk then packs the panel again.
  const int64_t nblocks = (N + kNc - 1) / kNc;
  const int64_t threads = at::get_num_threads();
  int64_t mchunks = 1;
  if (nblocks < 2 * threads) mchunks = std::min(mpanels, (2 * threads + nblocks - 1) / nblocks);
  const int64_t panels_per_chunk = (mpanels + mchunks - 1) / mchunks;
  mchunks = (mpanels + panels_per_chunk - 1) / panels_per_chunk;

  parallel_workers(nblocks * mchunks, [&](TaskQueue& queue) {
    AlignedBuf wp(static_cast<size_t>(kNc * kKc));
    AlignedBuf cbuf(static_cast<size_t>(panels_per_chunk * kMr * kNc));
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t nb = t / mchunks, mc = t % mchunks;
      const int64_t n0 = nb * kNc, nn = std::min(kNc, N - n0);
      const int64_t nsub = (nn + kNr - 1) / kNr;
      const int64_t p0 = mc * panels_per_chunk, p1 = std::min(mpanels, p0 + panels_per_chunk);
      for (int64_t k0 = 0; k0 < K; k0 += kKc) {
        const int64_t kc = std::min(kKc, K - k0);
        pack_w<TW>(w, K, n0, nn, k0, kc, wp.p);
        for (int64_t p = p0; p < p1; ++p) {
          const float* xpp = xp.p + p * K * kMr + k0 * kMr;
          float* c = cbuf.p + (p - p0) * kMr * kNc;
          for (int64_t j = 0; j < nsub; ++j)
            micro_6x16(xpp, wp.p + j * kc * kNr, kc, c + j * kNr, kNc, k0 == 0);
        }
      }
      // epilogue: bias, convert, store the valid rows and columns
      const int64_t nv = nn & ~int64_t(7);
      for (int64_t p = p0; p < p1; ++p)
        for (int i = 0; i < kMr; ++i) {
          const int64_t m = p * kMr + i;
          if (m >= M) break;
          const float* c = cbuf.p + ((p - p0) * kMr + i) * kNc;
          TX* o = out + m * N + n0;
          int64_t n = 0;
          for (; n < nv; n += 8) {
            __m256 v = _mm256_load_ps(c + n);
            if (a.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(a.bias + n0 + n));
            avx2::store8(o + n, v);
          }
          for (; n < nn; ++n) o[n] = from_f32<TX>(c[n] + (a.bias ? a.bias[n0 + n] : 0.f));
        }
    }
  });
}

template <typename TX, typename TW>
void linear_avx2(const LinearArgs& a) {
  switch (a.M) {
    case 1: return gemv_avx2<TX, TW, 1>(a);
    case 2: return gemv_avx2<TX, TW, 2>(a);
    case 3: return gemv_avx2<TX, TW, 3>(a);
    case 4: return gemv_avx2<TX, TW, 4>(a);
    default: return gemm_avx2<TX, TW>(a);
  }
}
static_assert(kGemvMaxRows == 4, "linear_avx2's switch covers M = 1..kGemvMaxRows");

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

LFMK_AVX512_BEGIN
#include "simd_avx512.h"
namespace lfmk {
namespace {

// ---- AVX-512 GEMV (M <= 2): gemv_row_wide with 32 weight elements per load ----
// Half the instructions per weight byte of the AVX2 loop, so a core keeps more loads in flight;
// what a server core with high memory latency and few cores needs to reach its share of bandwidth.
template <typename TW>
struct WLoad512;
template <>
struct WLoad512<c10::BFloat16> {
  static constexpr bool kInterleaved = true;
  static inline void load32(const c10::BFloat16* p, __m512& even, __m512& odd) {
    const __m512i v = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(avx512::shl16(v));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
};
template <>
struct WLoad512<float> {
  static constexpr bool kInterleaved = false;
  static inline void load32(const float* p, __m512& lo, __m512& hi) {
    lo = _mm512_loadu_ps(p);
    hi = _mm512_loadu_ps(p + 16);
  }
};
template <>
struct WLoad512<c10::Half> {
  static constexpr bool kInterleaved = false;
  static inline void load32(const c10::Half* p, __m512& lo, __m512& hi) {
    lo = avx512::load16(p);
    hi = avx512::load16(p + 16);
  }
};

// x row -> fp32 in the element order WLoad512<TW> produces for each full block of 32 (tail in order).
template <typename TX, bool kInterleaved>
void pack_x32(const TX* src, float* dst, int64_t K) {
  const int64_t kv = K & ~int64_t(31);
  for (int64_t k = 0; k < kv; k += 32) {
    for (int i = 0; i < 16; ++i) {
      dst[k + i] = to_f32(src[k + (kInterleaved ? 2 * i : i)]);
      dst[k + 16 + i] = to_f32(src[k + (kInterleaved ? 2 * i + 1 : 16 + i)]);
    }
  }
  for (int64_t k = kv; k < K; ++k) dst[k] = to_f32(src[k]);
}

// One weight row as a single sequential stream, 32*U elements per step into U accumulators per x row.
template <typename TW, int M, int U>
inline void gemv_row_wide_avx512(const TW* w, int64_t K, const float* xf, float* res) {
  __m512 acc[U][M];
  for (int u = 0; u < U; ++u)
    for (int m = 0; m < M; ++m) acc[u][m] = _mm512_setzero_ps();
  const int64_t kvu = K - K % (32 * U);
  for (int64_t k = 0; k < kvu; k += 32 * U) {
    for (int u = 0; u < U; ++u) {
      __m512 w0, w1;
      WLoad512<TW>::load32(w + k + 32 * u, w0, w1);
      for (int m = 0; m < M; ++m) {
        acc[u][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + m * K + k + 32 * u), acc[u][m]);
        acc[u][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xf + m * K + k + 32 * u + 16), acc[u][m]);
      }
    }
  }
  const int64_t kv = K & ~int64_t(31);
  for (int64_t k = kvu; k < kv; k += 32) {
    __m512 w0, w1;
    WLoad512<TW>::load32(w + k, w0, w1);
    for (int m = 0; m < M; ++m) {
      acc[0][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xf + m * K + k), acc[0][m]);
      acc[0][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xf + m * K + k + 16), acc[0][m]);
    }
  }
  if (kv < K) {  // < 32 left, in order: up to two masked 16-lane steps
    for (int64_t k = kv; k < K; k += 16) {
      const int n = static_cast<int>(std::min<int64_t>(16, K - k));
      const __m512 wv = avx512::load_partial(w + k, n);
      for (int m = 0; m < M; ++m) acc[0][m] = _mm512_fmadd_ps(wv, avx512::load_partial(xf + m * K + k, n), acc[0][m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = acc[0][m];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[u][m]);
    res[m] = avx512::hsum(sum);
  }
}

template <typename TX, typename TW, int M>
void gemv_avx512(const LinearArgs& a) {
  const TX* x = static_cast<const TX*>(a.x);
  const TW* w = static_cast<const TW*>(a.w);
  const int64_t K = a.K;
  AlignedBuf xf(static_cast<size_t>(M * K) + 1);
  for (int m = 0; m < M; ++m) pack_x32<TX, WLoad512<TW>::kInterleaved>(x + m * a.ldx, xf.p + m * K, K);
  gemv_stream_rows<TX, M>(a, K * int64_t(sizeof(TW)),
                          [&](int64_t n, float* res) { gemv_row_wide_avx512<TW, M, 4>(w + n * K, K, xf.p, res); });
}

}  // namespace
}  // namespace lfmk
LFMK_AVX512_END

LFMK_AVX512BF16_BEGIN
#include "row_dot_avx512bf16.h"
namespace lfmk {
namespace {

// bf16 x and bf16 weights on a CPU with AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs and adds
// them into 16 fp32 lanes in one instruction, on the stored bits of both (no widening, no x packing).
template <int M>
void gemv_bf16dp(const LinearArgs& a) {
  using bf16 = c10::BFloat16;
  const bf16* x = static_cast<const bf16*>(a.x);
  const bf16* w = static_cast<const bf16*>(a.w);
  const int64_t K = a.K;
  const bf16* xr[M];
  for (int m = 0; m < M; ++m) xr[m] = x + m * a.ldx;
  gemv_stream_rows<bf16, M>(a, K * int64_t(sizeof(bf16)),
                            [&](int64_t n, float* res) { row_dot_bf16<M, 4>(w + n * K, K, xr, res); });
}

}  // namespace
}  // namespace lfmk
LFMK_AVX512BF16_END

namespace lfmk {
namespace {

// Rows up to which an AVX-512 GEMV exists; the caller's avx512_max_rows (the kernel policy's,
// measured per machine) may lower it.
constexpr int64_t kAvx512GemvMaxRows = 2;

template <typename TX, typename TW>
void run(const LinearArgs& a, int64_t avx512_max_rows) {
  const bool avx512 = a.M <= std::min(avx512_max_rows, kAvx512GemvMaxRows) && cpu_has_avx512();
  if constexpr (std::is_same_v<TX, c10::BFloat16> && std::is_same_v<TW, c10::BFloat16>) {
    // Zen 4, 2 threads, M = 1: 1.06-1.17x the AVX2 GEMV on 2048-wide weights, 2.2x at K = 7168 (bf16 x
    // stays in L1 where AVX2's fp32 copy does not), equal on lm_head; M = 2: 1.15-1.7x
    if (avx512 && cpu_has_avx512bf16()) {
      if (a.M == 1) return gemv_bf16dp<1>(a);
      return gemv_bf16dp<2>(a);
    }
  }
  // The FMA twin (fp32 / fp16 weights, or x and weight dtypes that differ). At M = 1 it measured
  // 0.72-0.97x the AVX2 GEMV on Zen 4 (fp32 weights; a 512-bit load is split in two there) and
  // 1.1-1.27x on Zen 5 (fp32 weights cycled from DRAM, 2 threads; equal on lm_head); at M = 2 1.1-1.2x
  // on Zen 4. avx512_max_rows is the policy's measured choice of 512-bit streaming on this core.
  if (avx512 && a.M == 2) return gemv_avx512<TX, TW, 2>(a);
  if (avx512 && a.M == 1) return gemv_avx512<TX, TW, 1>(a);
  if (cpu_has_avx2())
    linear_avx2<TX, TW>(a);
  else
    linear_portable<TX, TW>(a);
}

// Shapes, dtypes and devices were validated in Python (lfm_kernels/ops/linear.py); the checks here
// only guard the memory safety of this function if it is called directly.
at::Tensor linear_cpu(const at::Tensor& x_in, const at::Tensor& weight_in, const std::optional<at::Tensor>& bias,
                      int64_t avx512_max_rows) {
  TORCH_CHECK(x_in.dim() == 2, "linear: x must be [M, K]");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.size(1) == x_in.size(1), "linear: weight must be [N, K]");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0);
  const auto wdt = weight_in.scalar_type();
  TORCH_CHECK(wdt == at::kBFloat16 || wdt == at::kFloat || wdt == at::kHalf,
              "linear: weight must be bfloat16, float32 or float16");
  // any row stride (even 0, a broadcast row) is fine; the column stride must be 1
  const at::Tensor x = x_in.stride(1) == 1 || K <= 1 ? x_in : x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  auto out = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0 || N == 0) return out;
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "linear: bias must be [N]");
    bias_f = bias->to(at::kFloat).contiguous().reshape({N});
  }
  if (K == 0) {  // empty sum: bias or zero
    if (bias_f.defined())
      out.copy_(bias_f.unsqueeze(0).expand({M, N}));
    else
      out.zero_();
    return out;
  }
  LinearArgs a{};
  a.x = x.const_data_ptr();
  a.ldx = M <= 1 ? K : x.stride(0);
  a.w = weight.const_data_ptr();
  a.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  a.out = out.mutable_data_ptr();
  a.M = M;
  a.N = N;
  a.K = K;
  LFMK_DISPATCH_FLOAT(x.scalar_type(), "linear", [&] {
    using TX = scalar_t;
    LFMK_DISPATCH_FLOAT(wdt, "linear", [&] { run<TX, scalar_t>(a, avx512_max_rows); });
  });
  return out;
}

}  // namespace
}  // namespace lfmk

// avx512_max_rows: calls with at most this many rows (and at most 2) take the AVX-512 GEMV on CPUs that
// have it; 0 keeps every call on the AVX2 / portable kernels.
TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, int avx512_max_rows=2) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("linear", &lfmk::linear_cpu); }
