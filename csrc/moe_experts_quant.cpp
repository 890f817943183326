// MoE experts on GGUF Q8_0 / Q4_0 weights: the plan, work-item loop and combine of moe_plan.h with
// the integer-dot tiles of moe_tiles_quant.h (tokens and the SwiGLU product quantized per block of 32).
#include <algorithm>
#include <cmath>
#include <new>
#include <vector>

#include "common.h"
#include "moe_plan.h"
#include "moe_tiles_quant.h"
#include "quant_dequant_gemm.h"

LFMK_AMX_BEGIN
#include "quant/amx.h"
LFMK_AMX_END

namespace lfmk {
namespace {

using namespace moe;

// ---- Experts on GGUF Q8_0 / Q4_0 weights ----
// The same plan, work items and combine as the float passes; the tiles are the quantized ones
// (moe_tiles_quant.h), chosen per ISA at run time. The tokens are quantized once (per 32-block to
// int8 with an fp32 scale) and copied into sorted pair order, so that an expert's tokens are
// equidistant rows for a tile; the SwiGLU product act (fp32) is quantized per pair row between the
// two phases. Decode (an expert with at most kQM tokens) streams each weight row once; with more
// tokens a work item's rows stay in L2 while groups of kQM tokens (in L1) pass over them, and from
// kQPackMinTokens on (SIMD paths) the item's rows are first repacked into panels of 8 rows (as
// linear_quant's GEMM does), so that one broadcast of 4 activation bytes feeds 8 rows. Every result
// is one fixed-order sum of its own row and token: the bits do not depend on the thread count (a
// packed expert's sums are ordered differently from a plain one's: fp32 rounding apart).
// From this many tokens an expert runs on packed panels (SIMD paths): repacking a work item's rows
// costs about one token's plain-tile pass over them, and each further token then takes about a third
// of the plain tile's instructions.
constexpr int64_t kQPackMinTokens = 6;

// s8[b] = 8 * sum of block b's int8 values: the packed Q4_0 panels take the -8 offset off with it.
inline void block_sums8(const int8_t* q, int64_t nb, int32_t* s8) {
  for (int64_t b = 0; b < nb; ++b) {
    int32_t s = 0;
    for (int j = 0; j < quant::kBlock; ++j) s += q[b * quant::kBlock + j];
    s8[b] = 8 * s;
  }
}

// quant/amx.h's x8_groups_amx where the CPU has AMX (callers check cpu_has_amx()).
template <quant::Format F>
void amx_groups(int G, const uint8_t* w, int64_t gs, int64_t nb, const quant::amx::Acts& x, int64_t M, uint8_t* bs,
                float* res, int64_t ldr);

template <class Kern, quant::Format F>
void experts_pass_quant(const int8_t* xq, const float* xd, const int32_t* xs8, const uint8_t* gu, const uint8_t* dn,
                        int64_t H, int64_t I, const Plan& pl, const std::vector<int64_t>& active, float* act,
                        int8_t* aq, float* ad, int32_t* as8, float* y) {
  constexpr int64_t kB = quant::Traits<F>::kBytes;
  const int64_t nbH = H / quant::kBlock, nbI = I / quant::kBlock;
  const int64_t rowH = nbH * kB, rowI = nbI * kB;
  const int64_t gsH = nbH * quant::avx2::kPackedBlockBytes, gsI = nbI * quant::avx2::kPackedBlockBytes;

  // Phase 1: act[q, j] = silu(gate_j . x_q) * (up_j . x_q)
  for_each_work_item(pl, active, I, kUnits1, [&](const WorkItem& it) {
    const int64_t j0 = it.r0, j1 = it.r1, q0 = it.q0, me = it.tokens;
    const uint8_t* G = gu + it.e * 2 * I * rowH;
    const uint8_t* U = G + I * rowH;
    if constexpr (Kern::kPacked) {
      if (me >= kQPackMinTokens) {
        // the item's gate rows then up rows repacked once (8 rows per group), then every token
        // group passes over the packed panel in L2
        const int64_t nu = j1 - j0, ng = (nu + 7) / 8;
        AlignedBytes pk(2 * ng * gsH);
        for (int64_t g = 0; g < ng; ++g) {
          const int rows = static_cast<int>(std::min<int64_t>(8, nu - 8 * g));
          Kern::template pack_group<F>(G + (j0 + 8 * g) * rowH, rowH, rows, nbH, pk.p + g * gsH);
          Kern::template pack_group<F>(U + (j0 + 8 * g) * rowH, rowH, rows, nbH, pk.p + (ng + g) * gsH);
        }
        alignas(32) float rg[kQM * 16], ru[kQM * 16];
        for (int64_t t = 0; t < me; t += kQM) {
          const int M = static_cast<int>(std::min<int64_t>(kQM, me - t));
          const int8_t* xm = xq + (q0 + t) * H;
          const float* dm = xd + (q0 + t) * nbH;
          const int32_t* sm = xs8 + (q0 + t) * nbH;
          for (int64_t g0 = 0; g0 < ng; g0 += 2) {
            const int Gn = static_cast<int>(std::min<int64_t>(2, ng - g0));
            qpanel<Kern, F>(Gn, M, pk.p + g0 * gsH, gsH, nbH, xm, H, dm, nbH, sm, nbH, rg);
            qpanel<Kern, F>(Gn, M, pk.p + (ng + g0) * gsH, gsH, nbH, xm, H, dm, nbH, sm, nbH, ru);
            const int64_t cols = std::min<int64_t>(8 * Gn, nu - 8 * g0);
            for (int m = 0; m < M; ++m)
              for (int64_t c = 0; c < cols; ++c)
                act[(q0 + t + m) * I + j0 + 8 * g0 + c] = silu(rg[m * 16 + c]) * ru[m * 16 + c];
          }
        }
        return;
      }
    }
    if (me > kQM) {
      prefetch_block(G + j0 * rowH, (j1 - j0) * rowH);
      prefetch_block(U + j0 * rowH, (j1 - j0) * rowH);
    }
    float rg[4 * kQM], ru[4 * kQM];
    for (int64_t t = 0; t < me; t += kQM) {
      const int M = static_cast<int>(std::min<int64_t>(kQM, me - t));
      const int Rt = qtile_rows(M);
      const int8_t* xm = xq + (q0 + t) * H;
      const float* dm = xd + (q0 + t) * nbH;
      for (int64_t j = j0; j < j1;) {
        const int R = j1 - j >= Rt ? Rt : 1;
        qtile<Kern, F>(R, M, G + j * rowH, rowH, xm, H, dm, nbH, nbH, rg);
        qtile<Kern, F>(R, M, U + j * rowH, rowH, xm, H, dm, nbH, nbH, ru);
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) act[(q0 + t + m) * I + j + r] = silu(rg[r * M + m]) * ru[r * M + m];
        j += R;
      }
    }
  });

  // the pass's act rows -> int8 blocks for phase 2
  const std::vector<int64_t> pairs = pairs_of(pl, active);
  parallel_for(static_cast<int64_t>(pairs.size()), std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, I)),
               [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t q = pairs[i];
      Kern::template quantize_row<float>(act + q * I, I, aq + q * I, ad + q * nbI);
      block_sums8(aq + q * I, nbI, as8 + q * nbI);
    }
  });

  // Phase 2: y[q, h] = down[e, h] . act[q]
  for_each_work_item(pl, active, H, kRows2, [&](const WorkItem& it) {
    const int64_t h0 = it.r0, h1 = it.r1, q0 = it.q0, me = it.tokens;
    const uint8_t* D = dn + it.e * H * rowI;
    if constexpr (Kern::kPacked) {
      if (me >= kQPackMinTokens) {
        const int64_t nh = h1 - h0, ng = (nh + 7) / 8;
        AlignedBytes pk(ng * gsI);
        for (int64_t g = 0; g < ng; ++g)
          Kern::template pack_group<F>(D + (h0 + 8 * g) * rowI, rowI, static_cast<int>(std::min<int64_t>(8, nh - 8 * g)),
                                       nbI, pk.p + g * gsI);
        alignas(32) float res[kQM * 16];
        for (int64_t t = 0; t < me; t += kQM) {
          const int M = static_cast<int>(std::min<int64_t>(kQM, me - t));
          const int8_t* am = aq + (q0 + t) * I;
          const float* dm = ad + (q0 + t) * nbI;
          const int32_t* sm = as8 + (q0 + t) * nbI;
          for (int64_t g0 = 0; g0 < ng; g0 += 2) {
            const int Gn = static_cast<int>(std::min<int64_t>(2, ng - g0));
            qpanel<Kern, F>(Gn, M, pk.p + g0 * gsI, gsI, nbI, am, I, dm, nbI, sm, nbI, res);
            const int64_t cols = std::min<int64_t>(8 * Gn, nh - 8 * g0);
            for (int m = 0; m < M; ++m)
              for (int64_t c = 0; c < cols; ++c) y[(q0 + t + m) * H + h0 + 8 * g0 + c] = res[m * 16 + c];
          }
        }
        return;
      }
    }
    if (me > kQM) prefetch_block(D + h0 * rowI, (h1 - h0) * rowI);
    float res[4 * kQM];
    for (int64_t t = 0; t < me; t += kQM) {
      const int M = static_cast<int>(std::min<int64_t>(kQM, me - t));
      const int Rt = qtile_rows(M);
      const int8_t* am = aq + (q0 + t) * I;
      const float* dm = ad + (q0 + t) * nbI;
      for (int64_t h = h0; h < h1;) {
        const int R = h1 - h >= Rt ? Rt : 1;
        qtile<Kern, F>(R, M, D + h * rowI, rowI, am, I, dm, nbI, nbI, res);
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) y[(q0 + t + m) * H + h + r] = res[r * M + m];
        h += R;
      }
    }
  });
}

// The same pass on x8-layout weights (quant/x8.h): a work item's rows are whole 8-row groups (its
// row range starts at a multiple of kUnits1 / kRows2, and I, H are multiples of 32), which the x8
// tiles read in place for any token count: up to 4 groups x up to kQM tokens per tile, lane r = row r. No
// repacking, and a result's bits do not depend on the token count, the thread count or the path.
template <class Kern, quant::Format F>
void experts_pass_quant_x8(const int8_t* xq, const float* xd, const int32_t* xs8, const uint8_t* gu, const uint8_t* dn,
                           int64_t H, int64_t I, const Plan& pl, const std::vector<int64_t>& active, float* act,
                           int8_t* aq, float* ad, int32_t* as8, float* y, int64_t amx_min_rows) {
  constexpr int64_t kB = quant::Traits<F>::kBytes;
  const int64_t nbH = H / quant::kBlock, nbI = I / quant::kBlock;
  const int64_t rowH = nbH * kB, rowI = nbI * kB;
  const int64_t gsH = 8 * rowH, gsI = 8 * rowI;
  static_assert(kUnits1 % 8 == 0 && kRows2 % 8 == 0 && kUnits1Streamed % 8 == 0 && kRows2Streamed % 8 == 0,
                "x8 work items hold whole groups");

  // Phase 1: act[q, j] = silu(gate_j . x_q) * (up_j . x_q); items of 4 groups, so that a token's
  // tile streams 4 groups at once (qx8_groups)
  // Experts with at least amx_min_rows tokens run on AMX-INT8 tiles (quant/amx.h: the same bits);
  // the tiles read the tokens' scales transposed, and activation rows up to 16 past the last pair.
  const int64_t P = pl.offs.back(), Ppad = P + quant::amx::kRows;
  bool any_amx = false;
  for (const int64_t e : active) any_amx |= amx_min_rows > 0 && pl.offs[e + 1] - pl.offs[e] >= amx_min_rows;
  std::vector<float> dxT, adT;
  std::vector<int32_t> sxT, saT;
  if (any_amx) {
    dxT.resize(nbH * Ppad);
    sxT.resize(nbH * Ppad);
    quant::amx::transpose_scales(xd, F == quant::Format::Q4_0 ? xs8 : nullptr, nbH, P, Ppad, nbH, dxT.data(), sxT.data());
  }
  const auto use_amx = [&](int64_t tokens) { return any_amx && tokens >= amx_min_rows; };

  const auto gate_rows = [&](const WorkItem& it) { return gu + it.e * 2 * I * rowH + it.r0 * rowH; };
  for_each_work_item(pl, active, I, x8_item_rows(true, pl, active, kQM, 2 * kUnits1, kUnits1Streamed),
                     [&](const WorkItem& it, const WorkItem* next) {
    const int64_t j0 = it.r0, ng = (it.r1 - it.r0) / 8, q0 = it.q0, me = it.tokens;
    const uint8_t* Gp = gate_rows(it);
    const uint8_t* Up = Gp + I * rowH;
    // the last tile of a one-token item prefetches the next item's first (its up rows: the same
    // distance on); with more tokens the item's rows are read again from the cache
    const uint8_t* next_gp = next && me <= kQM ? gate_rows(*next) : nullptr;
    if (use_amx(me)) {
      const quant::amx::Acts x{xq + q0 * H, H, dxT.data() + q0, sxT.data() + q0, Ppad};
      std::vector<float> g(me * 8 * ng), u(me * 8 * ng);
      AlignedBytes scratch(quant::amx::b_scratch_bytes(nbH));
      uint8_t* bs = scratch.p;
      for (int64_t g0 = 0; g0 < ng; g0 += 2) {
        const int G = static_cast<int>(std::min<int64_t>(2, ng - g0));
        amx_groups<F>(G, Gp + g0 * gsH, gsH, nbH, x, me, bs, g.data() + 8 * g0, 8 * ng);
        amx_groups<F>(G, Up + g0 * gsH, gsH, nbH, x, me, bs, u.data() + 8 * g0, 8 * ng);
      }
      for (int64_t m = 0; m < me; ++m)
        for (int64_t c = 0; c < 8 * ng; ++c) act[(q0 + m) * I + j0 + c] = silu(g[m * 8 * ng + c]) * u[m * 8 * ng + c];
      return;
    }
    alignas(32) float rg[kQM * kX8Res], ru[kQM * kX8Res];
    for (int64_t t = 0; t < me; t += kQM) {
      const int M = static_cast<int>(std::min<int64_t>(kQM, me - t));
      const int8_t* xm = xq + (q0 + t) * H;
      const float* dm = xd + (q0 + t) * nbH;
      const int32_t* sm = xs8 + (q0 + t) * nbH;
      for (int64_t g0 = 0, Gn = 0; g0 < ng; g0 += Gn) {
        Gn = qx8_groups(M, ng - g0);
        const int64_t pf = tile_prefetch(g0 + Gn < ng, Gn * gsH, Gp + g0 * gsH, next_gp);
        qx8<Kern, F>(static_cast<int>(Gn), M, Gp + g0 * gsH, gsH, nbH, xm, H, dm, nbH, sm, nbH, rg, pf);
        qx8<Kern, F>(static_cast<int>(Gn), M, Up + g0 * gsH, gsH, nbH, xm, H, dm, nbH, sm, nbH, ru, pf);
        for (int m = 0; m < M; ++m)
          for (int c = 0; c < 8 * Gn; ++c)
            act[(q0 + t + m) * I + j0 + 8 * g0 + c] = silu(rg[m * kX8Res + c]) * ru[m * kX8Res + c];
      }
    }
  });

  // the pass's act rows -> int8 blocks for phase 2
  const std::vector<int64_t> pairs = pairs_of(pl, active);
  parallel_for(static_cast<int64_t>(pairs.size()), std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, I)),
               [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t q = pairs[i];
      Kern::template quantize_row<float>(act + q * I, I, aq + q * I, ad + q * nbI);
      block_sums8(aq + q * I, nbI, as8 + q * nbI);
    }
  });
  if (any_amx) {
    adT.resize(nbI * Ppad);
    saT.resize(nbI * Ppad);
    quant::amx::transpose_scales(ad, F == quant::Format::Q4_0 ? as8 : nullptr, nbI, P, Ppad, nbI, adT.data(), saT.data());
  }

  // Phase 2: y[q, h] = down[e, h] . act[q]
  const auto down_rows = [&](const WorkItem& it) { return dn + it.e * H * rowI + it.r0 * rowI; };
  for_each_work_item(pl, active, H, x8_item_rows(true, pl, active, kQM, kRows2, kRows2Streamed),
                     [&](const WorkItem& it, const WorkItem* next) {
    const int64_t h0 = it.r0, ng = (it.r1 - it.r0) / 8, q0 = it.q0, me = it.tokens;
    const uint8_t* D = down_rows(it);
    const uint8_t* next_d = next && me <= kQM ? down_rows(*next) : nullptr;  // as in phase 1
    if (use_amx(me)) {
      const quant::amx::Acts a{aq + q0 * I, I, adT.data() + q0, saT.data() + q0, Ppad};
      AlignedBytes scratch(quant::amx::b_scratch_bytes(nbI));
      uint8_t* bs = scratch.p;
      for (int64_t g0 = 0; g0 < ng; g0 += 2)
        amx_groups<F>(static_cast<int>(std::min<int64_t>(2, ng - g0)), D + g0 * gsI, gsI, nbI, a, me, bs,
                      y + q0 * H + h0 + 8 * g0, H);
      return;
    }
    alignas(32) float res[kQM * kX8Res];
    for (int64_t t = 0; t < me; t += kQM) {
      const int M = static_cast<int>(std::min<int64_t>(kQM, me - t));
      const int8_t* am = aq + (q0 + t) * I;
      const float* dm = ad + (q0 + t) * nbI;
      const int32_t* sm = as8 + (q0 + t) * nbI;
      for (int64_t g0 = 0, Gn = 0; g0 < ng; g0 += Gn) {
        Gn = qx8_groups(M, ng - g0);
        qx8<Kern, F>(static_cast<int>(Gn), M, D + g0 * gsI, gsI, nbI, am, I, dm, nbI, sm, nbI, res,
                     tile_prefetch(g0 + Gn < ng, Gn * gsI, D + g0 * gsI, next_d));
        for (int m = 0; m < M; ++m)
          for (int c = 0; c < 8 * Gn; ++c) y[(q0 + t + m) * H + h0 + 8 * g0 + c] = res[m * kX8Res + c];
      }
    }
  });
}

template <class Kern, quant::Format F>
void moe_experts_quant_run(const at::Tensor& hidden, const uint8_t* gu, const uint8_t* dn, const int64_t* idp,
                           const float* twp, int64_t E, int64_t I, int64_t k, bool x8, int64_t gemm_min_rows,
                           int64_t amx_min_rows, at::Tensor& out) {
  const quant::WFormat wf = quant::to_wformat(F);
  const int64_t N = hidden.size(0), H = hidden.size(1);
  const int64_t nbH = H / quant::kBlock, nbI = I / quant::kBlock;
  // every token once, whatever number of experts chose it
  std::vector<int8_t> xq_tok(N * H);
  std::vector<float> xd_tok(N * nbH);
  std::vector<int32_t> xs8_tok(N * nbH);
  LFMK_DISPATCH_FLOAT(hidden.scalar_type(), "moe_experts_quant", [&] {
    const scalar_t* xp = cptr<scalar_t>(hidden);
    parallel_for(N, std::max<int64_t>(1, (1 << 16) / H), [&](int64_t a, int64_t b) {
      for (int64_t n = a; n < b; ++n) {
        Kern::template quantize_row<scalar_t>(xp + n * H, H, xq_tok.data() + n * H, xd_tok.data() + n * nbH);
        block_sums8(xq_tok.data() + n * H, nbH, xs8_tok.data() + n * nbH);
      }
    });
  });
  const int64_t chunk = std::max<int64_t>(1, kMaxPairs / k);
  const int64_t pmax = std::min(N, chunk) * k;
  // 16 rows past the last pair: the AMX tiles read activation rows in 16s
  std::vector<int8_t> xq((pmax + quant::amx::kRows) * H), aq((pmax + quant::amx::kRows) * I);
  std::vector<float> xd(pmax * nbH), ad(pmax * nbI);
  // the two big fp32 buffers: written for every pair of a chunk before they are read
  float* act = thread_scratch<float>(0, pmax * I);
  float* y = thread_scratch<float>(1, pmax * H);
  std::vector<int32_t> xs8(pmax * nbH), as8(pmax * nbI);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nt = std::min(chunk, N - n0);
    const Plan pl = make_plan(idp, n0, nt, k, E);
    parallel_for(nt * k, std::max<int64_t>(1, (1 << 16) / H), [&](int64_t a, int64_t b) {
      for (int64_t q = a; q < b; ++q) {
        std::memcpy(xq.data() + q * H, xq_tok.data() + pl.tok[q] * H, H);
        std::memcpy(xd.data() + q * nbH, xd_tok.data() + pl.tok[q] * nbH, nbH * sizeof(float));
        std::memcpy(xs8.data() + q * nbH, xs8_tok.data() + pl.tok[q] * nbH, nbH * sizeof(int32_t));
      }
    });
    std::vector<int64_t> gemm, rest;
    quant::split_dequant_gemm(pl, gemm_min_rows, hidden.scalar_type() == at::kBFloat16, &gemm, &rest);
    quant::experts_dequant_gemm(hidden, gu, wf, dn, wf, x8, H, I, pl, gemm, y);
    if (rest.empty()) {
      // every expert took the GEMM route
    } else if (x8) {
      experts_pass_quant_x8<Kern, F>(xq.data(), xd.data(), xs8.data(), gu, dn, H, I, pl, rest, act, aq.data(),
                                     ad.data(), as8.data(), y, amx_min_rows);
    } else {
      experts_pass_quant<Kern, F>(xq.data(), xd.data(), xs8.data(), gu, dn, H, I, pl, rest, act, aq.data(),
                                  ad.data(), as8.data(), y);
    }
    LFMK_DISPATCH_FLOAT(out.scalar_type(), "moe_experts_quant", [&] {
      combine<scalar_t>(y, twp, pl, n0, nt, k, H, mptr<scalar_t>(out));
    });
  }
}

template <class Kern>
void moe_experts_quant_isa(quant::Format f, const at::Tensor& hidden, const uint8_t* gu, const uint8_t* dn,
                           const int64_t* idp, const float* twp, int64_t E, int64_t I, int64_t k, bool x8,
                           int64_t gemm_min_rows, int64_t amx_min_rows, at::Tensor& out) {
  if (f == quant::Format::Q8_0)
    moe_experts_quant_run<Kern, quant::Format::Q8_0>(hidden, gu, dn, idp, twp, E, I, k, x8, gemm_min_rows, amx_min_rows,
                                                     out);
  else
    moe_experts_quant_run<Kern, quant::Format::Q4_0>(hidden, gu, dn, idp, twp, E, I, k, x8, gemm_min_rows, amx_min_rows,
                                                     out);
}

// gate_up_q: [E, 2I, H] and down_q: [E, H, I] in `format` blocks (raw bytes, any uint8 shape with the
// right count). Validated in Python (lfm_kernels/ops/moe.py) with friendlier messages; these checks
// guard the memory safety of a direct call.
// x8: the weights are in the x8 layout (quant/x8.h; the same byte counts).
at::Tensor moe_experts_quant_any(const at::Tensor& hidden_in, const at::Tensor& gate_up_q, const at::Tensor& down_q,
                                 c10::string_view format, int64_t E, int64_t I, const at::Tensor& topk_ids,
                                 const at::Tensor& topk_weights, bool x8, int64_t gemm_min_rows,
                                 int64_t amx_min_rows) {
  TORCH_CHECK_VALUE(gemm_min_rows >= 0, "moe_experts_quant: dequant_gemm_min_rows must be >= 0 (0: never), got ",
                    gemm_min_rows);
  TORCH_CHECK_VALUE(amx_min_rows >= 0, "moe_experts_quant: amx_min_rows must be >= 0 (0: never), got ", amx_min_rows);
  // the AMX tiles stand in for the active path's integer tiles (x8 layout; not on the forced portable path)
  const int64_t amx = x8 && cpu_has_amx() && quant::active_isa() > 0 ? amx_min_rows : 0;
  quant::Format f;
  if (format == "q8_0") {
    f = quant::Format::Q8_0;
  } else if (format == "q4_0") {
    f = quant::Format::Q4_0;
  } else {
    TORCH_CHECK_VALUE(false, "moe_experts_quant: format must be 'q8_0' or 'q4_0', got '", format, "'");
  }
  TORCH_CHECK_VALUE(hidden_in.dim() == 2, "moe_experts_quant: hidden must be [N, H], got ", hidden_in.sizes());
  const auto xdt = hidden_in.scalar_type();
  TORCH_CHECK_VALUE(xdt == at::kFloat || xdt == at::kBFloat16 || xdt == at::kHalf,
                    "moe_experts_quant: hidden must be float32, bfloat16 or float16, got ", xdt);
  const int64_t N = hidden_in.size(0), H = hidden_in.size(1);
  TORCH_CHECK_VALUE(H > 0 && H % quant::kBlock == 0, "moe_experts_quant: H (hidden's last dimension) must be a positive multiple of 32, got ", H);
  TORCH_CHECK_VALUE(I > 0 && I % quant::kBlock == 0, "moe_experts_quant: I must be a positive multiple of 32, got ", I);
  TORCH_CHECK_VALUE(E > 0, "moe_experts_quant: num_experts must be positive, got ", E);
  const int64_t bb = quant::block_bytes(f);
  TORCH_CHECK_VALUE(gate_up_q.scalar_type() == at::kByte && gate_up_q.numel() == E * 2 * I * (H / quant::kBlock) * bb,
                    "moe_experts_quant: gate_up_q must be uint8 holding ", E * 2 * I * (H / quant::kBlock) * bb,
                    " bytes (", format, " blocks of [", E, ", ", 2 * I, ", ", H, "]), got ", gate_up_q.scalar_type(),
                    " with ", gate_up_q.numel());
  TORCH_CHECK_VALUE(down_q.scalar_type() == at::kByte && down_q.numel() == E * H * (I / quant::kBlock) * bb,
                    "moe_experts_quant: down_q must be uint8 holding ", E * H * (I / quant::kBlock) * bb, " bytes (",
                    format, " blocks of [", E, ", ", H, ", ", I, "]), got ", down_q.scalar_type(), " with ",
                    down_q.numel());
  TORCH_CHECK_VALUE(topk_ids.dim() == 2 && topk_ids.size(0) == N, "moe_experts_quant: topk_ids must be [N=", N,
                    ", k], got ", topk_ids.sizes());
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK_VALUE(topk_weights.dim() == 2 && topk_weights.size(0) == N && topk_weights.size(1) == k,
                    "moe_experts_quant: topk_weights must be [N, k] = ", topk_ids.sizes(), ", got ", topk_weights.sizes());
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N * k; ++i)
    TORCH_CHECK_VALUE(idp[i] >= 0 && idp[i] < E, "moe_experts_quant: topk_ids must be in [0, ", E, "), got ", idp[i]);
  const at::Tensor tw = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor gu = gate_up_q.contiguous(), dn = down_q.contiguous();
  at::Tensor out = at::empty({N, H}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  if (k == 0) return out.zero_();
  const uint8_t *gp = gu.const_data_ptr<uint8_t>(), *dp = dn.const_data_ptr<uint8_t>();
  const float* twp = tw.const_data_ptr<float>();
  switch (quant::active_isa()) {
    case 3: moe_experts_quant_isa<QTilesAvx512Vnni>(f, hidden, gp, dp, idp, twp, E, I, k, x8, gemm_min_rows, amx, out); break;
    case 2: moe_experts_quant_isa<QTilesAvxVnni>(f, hidden, gp, dp, idp, twp, E, I, k, x8, gemm_min_rows, amx, out); break;
    case 1: moe_experts_quant_isa<QTilesAvx2>(f, hidden, gp, dp, idp, twp, E, I, k, x8, gemm_min_rows, amx, out); break;
    default: moe_experts_quant_isa<QTilesPortable>(f, hidden, gp, dp, idp, twp, E, I, k, x8, gemm_min_rows, amx, out); break;
  }
  return out;
}

at::Tensor moe_experts_quant_cpu(const at::Tensor& hidden, const at::Tensor& gate_up_q, const at::Tensor& down_q,
                                 c10::string_view format, int64_t E, int64_t I, const at::Tensor& topk_ids,
                                 const at::Tensor& topk_weights, int64_t dequant_gemm_min_rows, int64_t amx_min_rows) {
  return moe_experts_quant_any(hidden, gate_up_q, down_q, format, E, I, topk_ids, topk_weights, false,
                               dequant_gemm_min_rows, amx_min_rows);
}

at::Tensor moe_experts_quant_x8_cpu(const at::Tensor& hidden, const at::Tensor& gate_up_q, const at::Tensor& down_q,
                                    c10::string_view format, int64_t E, int64_t I, const at::Tensor& topk_ids,
                                    const at::Tensor& topk_weights, int64_t dequant_gemm_min_rows,
                                    int64_t amx_min_rows) {
  return moe_experts_quant_any(hidden, gate_up_q, down_q, format, E, I, topk_ids, topk_weights, true,
                               dequant_gemm_min_rows, amx_min_rows);
}

}  // namespace
}  // namespace lfmk

LFMK_AMX_BEGIN
namespace lfmk {
namespace {
template <quant::Format F>
void amx_groups(int G, const uint8_t* w, int64_t gs, int64_t nb, const quant::amx::Acts& x, int64_t M, uint8_t* bs,
                float* res, int64_t ldr) {
  quant::amx::x8_groups_amx<F>(G, w, gs, nb, x, M, bs, res, ldr);
}
template void amx_groups<quant::Format::Q8_0>(int, const uint8_t*, int64_t, int64_t, const quant::amx::Acts&, int64_t,
                                              uint8_t*, float*, int64_t);
template void amx_groups<quant::Format::Q4_0>(int, const uint8_t*, int64_t, int64_t, const quant::amx::Acts&, int64_t,
                                              uint8_t*, float*, int64_t);
}  // namespace
}  // namespace lfmk
LFMK_AMX_END

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("moe_experts_quant(Tensor hidden, Tensor gate_up_q, Tensor down_q, str format, int num_experts, "
        "int intermediate, Tensor topk_ids, Tensor topk_weights, int dequant_gemm_min_rows=0, int amx_min_rows=0) -> Tensor");
  m.def("moe_experts_quant_x8(Tensor hidden, Tensor gate_up_q, Tensor down_q, str format, int num_experts, "
        "int intermediate, Tensor topk_ids, Tensor topk_weights, int dequant_gemm_min_rows=0, int amx_min_rows=0) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("moe_experts_quant", &lfmk::moe_experts_quant_cpu);
  m.impl("moe_experts_quant_x8", &lfmk::moe_experts_quant_x8_cpu);
}
