// What the K-quant ops share for weights in the x8 layout (quant/kquant_x8.h): the run-time M / G
// tile dispatch over 8-row groups, the x8 <-> rows conversion of whole matrices, and the packing
// of x8 groups into the prefill panels (quant/kquant_avx2.h's KPack).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.h"
#include "quant/gemm_loops.h"
#include "quant/kquant_kernels.h"

namespace lfmk {
namespace quant {
namespace {

// kx8_tile<F, G, M> for run-time M in 1..kKM, activation rows [m0, m0 + M) of x; next: the next
// tile's offset from w, or 0 (quant/kquant_x8.h, KX8Ahead).
template <class Kern, KFormat F, int G>
inline void kx8_tile_m(int M, const uint8_t* w, int64_t gstride, const KActs& x, int64_t m0, float* res, int64_t ldr,
                       int64_t next) {
  const int64_t nsb = x.nsb();
  const int8_t* q = x.qr(m0);
  const float* d = x.dr(m0);
  const int16_t* s = x.template sub_sums<F>(m0);
  const int64_t ls = x.template sub_ld<F>();
  switch (M) {
    case 4: return Kern::template kx8_tile<F, G, 4>(w, gstride, nsb, q, x.K, d, nsb, s, ls, res, ldr, next);
    case 3: return Kern::template kx8_tile<F, G, 3>(w, gstride, nsb, q, x.K, d, nsb, s, ls, res, ldr, next);
    case 2: return Kern::template kx8_tile<F, G, 2>(w, gstride, nsb, q, x.K, d, nsb, s, ls, res, ldr, next);
    default: return Kern::template kx8_tile<F, G, 1>(w, gstride, nsb, q, x.K, d, nsb, s, ls, res, ldr, next);
  }
}

// Groups [g0, g1) of an x8 matrix at w (group g at byte g * group_bytes) against activation rows
// [m0, m0 + M): out[m * ldo + 8 * g + r] for row 8g + r. One activation row shares each
// broadcast between two groups (unless the policy measured one stream faster: common.h,
// x8_one_stream_max_rows); more rows already reuse each weight vector M times. Each tile is told
// where the next one starts, for its prefetch (quant/kquant_x8.h, KX8Ahead); the last one where the
// thread's next task starts (wnext; null: none, common.h, parallel_dynamic_ahead).
template <class Kern, KFormat F>
inline void kx8_groups(int M, const uint8_t* w, int64_t group_bytes, int64_t g0, int64_t g1, const KActs& x,
                       int64_t m0, float* out, int64_t ldo, const uint8_t* wnext = nullptr) {
  int64_t g = g0;
  if (M == 1 && M > x8_one_stream_max_rows())
    for (; g + 2 <= g1; g += 2)
      kx8_tile_m<Kern, F, 2>(M, w + g * group_bytes, group_bytes, x, m0, out + 8 * g, ldo,
                             kx8_next(g + 2 < g1, 2 * group_bytes, w + g * group_bytes, wnext));
  for (; g < g1; ++g)
    kx8_tile_m<Kern, F, 1>(M, w + g * group_bytes, group_bytes, x, m0, out + 8 * g, ldo,
                           kx8_next(g + 1 < g1, group_bytes, w + g * group_bytes, wnext));
}

// Rows [0, rows) of an x8 matrix at w (its first row starts a group; rows of a group of fewer than 8
// are its row-layout tail) packed as kpack_rows does, through scratch (8 * w_ld bytes).
template <class Kern, KFormat F>
inline void kpack_rows_x8(const uint8_t* w, int64_t w_ld, int64_t rows, int64_t nsb, uint8_t* dst, uint8_t* scratch) {
  const int64_t gs = nsb * Kern::template pack_bytes<F>();
  for (int64_t g = 0; g * 8 < rows; ++g) {
    const int n = static_cast<int>(std::min<int64_t>(8, rows - 8 * g));
    const uint8_t* src = w + 8 * g * w_ld;
    if (n == 8) {
      kx8_to_rows_group<F>(src, nsb, scratch, w_ld);
      src = scratch;
    }
    Kern::template pack_group<F>(src, w_ld, n, nsb, dst + g * gs);
  }
}

// mats matrices of N rows x row_bytes, "rows" <-> "x8" (the last N % 8 rows of each copied as they
// are), in parallel over groups.
template <KFormat F>
inline void kx8_relayout(const uint8_t* src, uint8_t* dst, int64_t mats, int64_t N, int64_t nsb, bool to_x8) {
  const int64_t row_bytes = nsb * KTraits<F>::kBytes, group_bytes = 8 * row_bytes, groups = N / 8;
  const int64_t mat_bytes = N * row_bytes, tail_bytes = (N % 8) * row_bytes;
  parallel_for(mats * (groups + 1), std::max<int64_t>(1, (1 << 20) / group_bytes), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e = t / (groups + 1), g = t % (groups + 1);
      const uint8_t* in = src + e * mat_bytes + g * group_bytes;
      uint8_t* out = dst + e * mat_bytes + g * group_bytes;
      if (g == groups)
        std::copy_n(in, tail_bytes, out);
      else if (to_x8)
        rows_to_kx8_group<F>(in, row_bytes, nsb, out);
      else
        kx8_to_rows_group<F>(in, nsb, out, row_bytes);
    }
  });
}

}  // namespace
}  // namespace quant
}  // namespace lfmk
