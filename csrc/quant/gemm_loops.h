// What the K-quant ops (linear_kquant.cpp, moe_experts_kquant.cpp) share: the quantized activation
// rows and their quantization, the run-time R x M tile and M-row panel dispatch, aligned scratch.
#pragma once

#include <algorithm>
#include <cstdint>
#include <new>
#include <vector>

#include "common.h"
#include "quant/kquant.h"

namespace lfmk {
namespace quant {
namespace {

// Activation rows quantized per 256 (quantize_act_row_k): q [rows, K], d [rows, K / 256], the sums
// per 16 s [rows, K / 16] and per 32 s32 [rows, K / 32] (the packed Q4_K / Q5_K panels read those).
struct KActs {
  int64_t K = 0;
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int16_t> s, s32;

  KActs(int64_t rows, int64_t k)
      : K(k), q(rows * k), d(rows * (k / kSuper)), s(rows * (k / 16)), s32(rows * (k / 32)) {}
  int64_t nsb() const { return K / kSuper; }
  const int8_t* qr(int64_t m) const { return q.data() + m * K; }
  const float* dr(int64_t m) const { return d.data() + m * nsb(); }
  const int16_t* sr(int64_t m) const { return s.data() + m * (K / 16); }
  // the per-sub-block sums a packed panel of format F reads, and their row stride
  template <KFormat F>
  const int16_t* sub_sums(int64_t m) const {
    return F == KFormat::Q6_K ? s.data() + m * (K / 16) : s32.data() + m * (K / 32);
  }
  template <KFormat F>
  int64_t sub_ld() const { return F == KFormat::Q6_K ? K / 16 : K / 32; }

  // Row dst <- row src of another set with the same K (MoE: tokens into sorted pair order).
  void copy_row(int64_t dst, const KActs& o, int64_t src) {
    std::copy_n(o.q.data() + src * K, K, q.data() + dst * K);
    std::copy_n(o.d.data() + src * nsb(), nsb(), d.data() + dst * nsb());
    std::copy_n(o.s.data() + src * (K / 16), K / 16, s.data() + dst * (K / 16));
    std::copy_n(o.s32.data() + src * (K / 32), K / 32, s32.data() + dst * (K / 32));
  }
};

// Quantizes row m of x (its own K floats) into row m of a.
template <class Kern, typename T>
inline void quantize_act_k(const T* x, KActs& a, int64_t m) {
  const int64_t K = a.K;
  Kern::quantize_row_k(x, K, a.q.data() + m * K, a.d.data() + m * a.nsb(), a.s.data() + m * (K / 16));
  kq_sub32_sums(a.s.data() + m * (K / 16), K, a.s32.data() + m * (K / 32));
}

// Rows [0, M) of x (rows ldx elements apart), in parallel.
template <class Kern, typename T>
inline void quantize_rows_k(const T* x, int64_t ldx, int64_t M, KActs& a) {
  parallel_for(M, std::max<int64_t>(1, (1 << 16) / a.K), [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_act_k<Kern>(x + m * ldx, a, m);
  });
}

// ktile<F, R, M> for run-time R in {1, 2, 4} and M in 1..4, activation rows [m0, m0 + M) of x.
constexpr int kKM = 4;
template <class Kern, KFormat F, int M>
inline void ktile_r(int R, const uint8_t* w, int64_t w_ld, const KActs& x, int64_t m0, float* res) {
  const int64_t nsb = x.nsb();
  const int8_t* q = x.qr(m0);
  const float* d = x.dr(m0);
  const int16_t* s = x.sr(m0);
  switch (R) {
    case 4: return Kern::template ktile<F, 4, M>(w, w_ld, q, x.K, d, nsb, s, x.K / 16, nsb, res);
    case 2: return Kern::template ktile<F, 2, M>(w, w_ld, q, x.K, d, nsb, s, x.K / 16, nsb, res);
    default: return Kern::template ktile<F, 1, M>(w, w_ld, q, x.K, d, nsb, s, x.K / 16, nsb, res);
  }
}
template <class Kern, KFormat F>
inline void ktile_rm(int R, int M, const uint8_t* w, int64_t w_ld, const KActs& x, int64_t m0, float* res) {
  switch (M) {
    case 4: return ktile_r<Kern, F, 4>(R, w, w_ld, x, m0, res);
    case 3: return ktile_r<Kern, F, 3>(R, w, w_ld, x, m0, res);
    case 2: return ktile_r<Kern, F, 2>(R, w, w_ld, x, m0, res);
    default: return ktile_r<Kern, F, 1>(R, w, w_ld, x, m0, res);
  }
}
// Weight rows per tile for M activation rows: R * M accumulators plus the weight vectors fit the 16
// ymm registers.
inline int ktile_rows(int M) { return M == 1 ? 4 : 2; }

// One packed group of 8 rows against activation rows [m0, m0 + M), M in 1..4: res[m * ldr + r].
template <class Kern, KFormat F>
inline void kpanel_m(int M, const uint8_t* pk, const KActs& x, int64_t m0, float* res, int64_t ldr) {
  const int64_t nsb = x.nsb();
  const int8_t* q = x.qr(m0);
  const float* d = x.dr(m0);
  const int16_t* p = x.template sub_sums<F>(m0);
  const int64_t lp = x.template sub_ld<F>();
  switch (M) {
    case 4: return Kern::template panel_tile<F, 4>(pk, nsb, q, x.K, d, nsb, p, lp, res, ldr);
    case 3: return Kern::template panel_tile<F, 3>(pk, nsb, q, x.K, d, nsb, p, lp, res, ldr);
    case 2: return Kern::template panel_tile<F, 2>(pk, nsb, q, x.K, d, nsb, p, lp, res, ldr);
    default: return Kern::template panel_tile<F, 1>(pk, nsb, q, x.K, d, nsb, p, lp, res, ldr);
  }
}

// Packs weight rows [0, rows) (row stride w_ld) into ceil(rows / 8) groups gs bytes apart.
template <class Kern, KFormat F>
inline void kpack_rows(const uint8_t* w, int64_t w_ld, int64_t rows, int64_t nsb, uint8_t* dst) {
  const int64_t gs = nsb * Kern::template pack_bytes<F>();
  for (int64_t g = 0; g * 8 < rows; ++g)
    Kern::template pack_group<F>(w + 8 * g * w_ld, w_ld, static_cast<int>(std::min<int64_t>(8, rows - 8 * g)), nsb,
                                 dst + g * gs);
}

}  // namespace
}  // namespace quant
}  // namespace lfmk
