// MoE experts on GGUF K-quant weights (Q4_K / Q5_K / Q6_K, quant/kquant.h), gate_up and down each in
// its own format (a Q4_K_M file holds gate / up in Q4_K and, in some layers, down in Q6_K): the
// plan, work-item loop and combine of moe_plan.h with the K-quant tiles of quant/kquant_kernels.h.
//
// The tokens are quantized once (per 256 to int8 with per-16 sums) and copied into sorted pair
// order, so that an expert's tokens are equidistant rows for a tile; the SwiGLU product act (fp32)
// is quantized the same way per pair row between the two phases. An expert with at most kKM tokens
// (decode) streams each weight row once through the plain tiles; with kKPackMinTokens or more
// (SIMD path) a work item's rows are first repacked into 8-row panels (quant/kquant_avx2.h), which
// every group of kKM tokens then passes over in L2. Packed and plain tiles compute the same
// integers and fused fp32 steps, so every result is one fixed-order sum of its own row and token:
// the bits depend neither on the thread count nor on the tokens an expert shares a pass with, and
// the portable and AVX2 paths agree bit for bit.
//
// moe_experts_kquant_x8 is the same op on weights in the x8 layout (quant/kquant_x8.h: each expert's
// rows interleaved in groups of 8, the same bytes; every work item's rows are whole groups): its
// work items stream the groups through the x8 tile, kKM tokens at a time (phase 1: a gate group and
// the matching up group in one tile), at any token count: an expert's prefill work item has too few
// tokens (128 tokens x top-4 / 32 experts: about 16) to repay packing its rows into panels, which
// measured 1.8x slower than these tiles. Same bits as on the rows layout.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "common.h"
#include "moe_plan.h"
#include "quant_dequant_gemm.h"
#include "quant/gemm_loops.h"
#include "quant/kquant_kernels.h"
#include "quant/kquant_x8_loops.h"
#include "quant/quant.h"

namespace lfmk {
namespace {

using namespace moe;
using quant::KActs;
using quant::KFormat;
using quant::kKM;

// From this many tokens an expert's work item runs on packed panels (SIMD path): repacking costs
// about one token's plain-tile pass over the rows, and each further token then takes well under
// half of the plain tile's instructions.
constexpr int64_t kKPackMinTokens = 6;

// Phase 1: act[q, j] = silu(gate_j . x_q) * (up_j . x_q) for every sorted pair q.
template <class Kern, KFormat F>
void kphase1(const KActs& x, const uint8_t* gu, int64_t H, int64_t I, const Plan& pl, const std::vector<int64_t>& experts,
            float* act, bool x8) {
  const int64_t nsb = H / quant::kSuper, row = nsb * quant::KTraits<F>::kBytes;
  for_each_work_item(pl, experts, I, x8_item_rows(x8, pl, experts, kKM, kUnits1, kUnits1Streamed),
                     [&](const WorkItem& it, const WorkItem* next_item) {
    const int64_t j0 = it.r0, j1 = it.r1, q0 = it.q0, me = it.tokens, nu = j1 - j0;
    const uint8_t* G = gu + it.e * 2 * I * row;
    const uint8_t* U = G + I * row;
    // where the thread's next item starts (its gate rows; its up rows are as far on as these), for the
    // last tile's prefetch when this item's rows are read once (one pass over the tokens)
    const uint8_t* next_g = next_item && me <= kKM ? gu + next_item->e * 2 * I * row + next_item->r0 * row : nullptr;
    if constexpr (Kern::kPacked) {
      if (me >= kKPackMinTokens && !x8) {
        const int64_t gs = nsb * Kern::template pack_bytes<F>(), ng = (nu + 7) / 8;
        AlignedBytes pk(2 * ng * gs);
        if (x8) {
          AlignedBytes scratch(8 * row);
          quant::kpack_rows_x8<Kern, F>(G + j0 * row, row, nu, nsb, pk.p, scratch.p);
          quant::kpack_rows_x8<Kern, F>(U + j0 * row, row, nu, nsb, pk.p + ng * gs, scratch.p);
        } else {
          quant::kpack_rows<Kern, F>(G + j0 * row, row, nu, nsb, pk.p);
          quant::kpack_rows<Kern, F>(U + j0 * row, row, nu, nsb, pk.p + ng * gs);
        }
        alignas(32) float rg[kKM * 8], ru[kKM * 8];
        for (int64_t t = 0; t < me; t += kKM) {
          const int M = static_cast<int>(std::min<int64_t>(kKM, me - t));
          for (int64_t g = 0; g < ng; ++g) {
            quant::kpanel_m<Kern, F>(M, pk.p + g * gs, x, q0 + t, rg, 8);
            quant::kpanel_m<Kern, F>(M, pk.p + (ng + g) * gs, x, q0 + t, ru, 8);
            const int64_t cols = std::min<int64_t>(8, nu - 8 * g);
            for (int m = 0; m < M; ++m)
              for (int64_t c = 0; c < cols; ++c) act[(q0 + t + m) * I + j0 + 8 * g + c] = silu(rg[m * 8 + c]) * ru[m * 8 + c];
          }
        }
        return;
      }
    }
    if (me > kKM) {
      prefetch_block(G + j0 * row, nu * row);
      prefetch_block(U + j0 * row, nu * row);
    }
    if (x8) {
      // gate group j / 8 and up group (I + j) / 8 as the two groups of one tile (I * row bytes apart)
      alignas(32) float r2[kKM * 16];
      for (int64_t t = 0; t < me; t += kKM) {
        const int M = static_cast<int>(std::min<int64_t>(kKM, me - t));
        for (int64_t j = j0; j < j1; j += 8) {
          const int64_t next = quant::kx8_next(j + 8 < j1, 8 * row, G + j * row, next_g);  // the next gate and up groups
          if (M == 1)
            quant::kx8_tile_m<Kern, F, 2>(M, G + j * row, I * row, x, q0 + t, r2, 16, next);
          else {
            quant::kx8_tile_m<Kern, F, 1>(M, G + j * row, I * row, x, q0 + t, r2, 16, next);
            quant::kx8_tile_m<Kern, F, 1>(M, U + j * row, I * row, x, q0 + t, r2 + 8, 16, next);
          }
          for (int m = 0; m < M; ++m)
            for (int r = 0; r < 8; ++r) act[(q0 + t + m) * I + j + r] = silu(r2[m * 16 + r]) * r2[m * 16 + 8 + r];
        }
      }
      return;
    }
    float rg[4 * kKM], ru[4 * kKM];
    for (int64_t t = 0; t < me; t += kKM) {
      const int M = static_cast<int>(std::min<int64_t>(kKM, me - t));
      const int Rt = quant::ktile_rows(M);
      for (int64_t j = j0; j < j1;) {
        const int R = j1 - j >= Rt ? Rt : 1;
        quant::ktile_rm<Kern, F>(R, M, G + j * row, row, x, q0 + t, rg);
        quant::ktile_rm<Kern, F>(R, M, U + j * row, row, x, q0 + t, ru);
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) act[(q0 + t + m) * I + j + r] = silu(rg[r * M + m]) * ru[r * M + m];
        j += R;
      }
    }
  });
}

// Phase 2: y[q, h] = down[e, h] . act[q] (act quantized into a).
template <class Kern, KFormat F>
void kphase2(const KActs& a, const uint8_t* dn, int64_t H, int64_t I, const Plan& pl, const std::vector<int64_t>& experts,
            float* y, bool x8) {
  const int64_t nsb = I / quant::kSuper, row = nsb * quant::KTraits<F>::kBytes;
  for_each_work_item(pl, experts, H, x8_item_rows(x8, pl, experts, kKM, kRows2, kRows2Streamed),
                     [&](const WorkItem& it, const WorkItem* next_item) {
    const int64_t h0 = it.r0, h1 = it.r1, q0 = it.q0, me = it.tokens, nh = h1 - h0;
    const uint8_t* D = dn + it.e * H * row;
    const uint8_t* next_d = next_item && me <= kKM ? dn + next_item->e * H * row + next_item->r0 * row : nullptr;
    if constexpr (Kern::kPacked) {
      if (me >= kKPackMinTokens && !x8) {
        const int64_t gs = nsb * Kern::template pack_bytes<F>(), ng = (nh + 7) / 8;
        AlignedBytes pk(ng * gs);
        if (x8) {
          AlignedBytes scratch(8 * row);
          quant::kpack_rows_x8<Kern, F>(D + h0 * row, row, nh, nsb, pk.p, scratch.p);
        } else {
          quant::kpack_rows<Kern, F>(D + h0 * row, row, nh, nsb, pk.p);
        }
        alignas(32) float res[kKM * 8];
        for (int64_t t = 0; t < me; t += kKM) {
          const int M = static_cast<int>(std::min<int64_t>(kKM, me - t));
          for (int64_t g = 0; g < ng; ++g) {
            quant::kpanel_m<Kern, F>(M, pk.p + g * gs, a, q0 + t, res, 8);
            const int64_t cols = std::min<int64_t>(8, nh - 8 * g);
            for (int m = 0; m < M; ++m)
              for (int64_t c = 0; c < cols; ++c) y[(q0 + t + m) * H + h0 + 8 * g + c] = res[m * 8 + c];
          }
        }
        return;
      }
    }
    if (me > kKM) prefetch_block(D + h0 * row, nh * row);
    if (x8) {
      for (int64_t t = 0; t < me; t += kKM) {
        const int M = static_cast<int>(std::min<int64_t>(kKM, me - t));
        quant::kx8_groups<Kern, F>(M, D, 8 * row, h0 / 8, h1 / 8, a, q0 + t, y + (q0 + t) * H, H, next_d);
      }
      return;
    }
    float res[4 * kKM];
    for (int64_t t = 0; t < me; t += kKM) {
      const int M = static_cast<int>(std::min<int64_t>(kKM, me - t));
      const int Rt = quant::ktile_rows(M);
      for (int64_t h = h0; h < h1;) {
        const int R = h1 - h >= Rt ? Rt : 1;
        quant::ktile_rm<Kern, F>(R, M, D + h * row, row, a, q0 + t, res);
        for (int m = 0; m < M; ++m)
          for (int r = 0; r < R; ++r) y[(q0 + t + m) * H + h + r] = res[r * M + m];
        h += R;
      }
    }
  });
}

template <class Kern>
void phase1_fmt(KFormat f, const KActs& x, const uint8_t* gu, int64_t H, int64_t I, const Plan& pl,
                const std::vector<int64_t>& experts, float* act, bool x8) {
  switch (f) {
    case KFormat::Q4_K: return kphase1<Kern, KFormat::Q4_K>(x, gu, H, I, pl, experts, act, x8);
    case KFormat::Q5_K: return kphase1<Kern, KFormat::Q5_K>(x, gu, H, I, pl, experts, act, x8);
    case KFormat::Q6_K: return kphase1<Kern, KFormat::Q6_K>(x, gu, H, I, pl, experts, act, x8);
  }
}
template <class Kern>
void phase2_fmt(KFormat f, const KActs& a, const uint8_t* dn, int64_t H, int64_t I, const Plan& pl,
                const std::vector<int64_t>& experts, float* y, bool x8) {
  switch (f) {
    case KFormat::Q4_K: return kphase2<Kern, KFormat::Q4_K>(a, dn, H, I, pl, experts, y, x8);
    case KFormat::Q5_K: return kphase2<Kern, KFormat::Q5_K>(a, dn, H, I, pl, experts, y, x8);
    case KFormat::Q6_K: return kphase2<Kern, KFormat::Q6_K>(a, dn, H, I, pl, experts, y, x8);
  }
}

template <class Kern>
void moe_experts_kquant_run(KFormat fg, KFormat fd, const at::Tensor& hidden, const uint8_t* gu, const uint8_t* dn,
                            const int64_t* idp, const float* twp, int64_t E, int64_t I, int64_t k, at::Tensor& out,
                            bool x8, int64_t gemm_min_rows) {
  const int64_t N = hidden.size(0), H = hidden.size(1);
  // every token once, whatever number of experts chose it
  KActs tok(N, H);
  LFMK_DISPATCH_FLOAT(hidden.scalar_type(), "moe_experts_kquant",
                      [&] { quant::quantize_rows_k<Kern>(cptr<scalar_t>(hidden), H, N, tok); });
  const int64_t chunk = std::max<int64_t>(1, kMaxPairs / k);
  const int64_t pmax = std::min(N, chunk) * k;
  KActs xs(pmax, H), as(pmax, I);
  // the two big fp32 buffers: written for every pair of a chunk before they are read
  float* act = thread_scratch<float>(0, pmax * I);
  float* y = thread_scratch<float>(1, pmax * H);
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t nt = std::min(chunk, N - n0);
    const Plan pl = make_plan(idp, n0, nt, k, E);
    parallel_for(nt * k, std::max<int64_t>(1, (1 << 16) / H), [&](int64_t a, int64_t b) {
      for (int64_t q = a; q < b; ++q) xs.copy_row(q, tok, pl.tok[q]);
    });
    std::vector<int64_t> gemm, rest;
    quant::split_dequant_gemm(pl, gemm_min_rows, hidden.scalar_type() == at::kBFloat16, &gemm, &rest);
    quant::experts_dequant_gemm(hidden, gu, quant::to_wformat(fg), dn, quant::to_wformat(fd), x8, H, I, pl, gemm, y);
    if (!rest.empty()) {
      phase1_fmt<Kern>(fg, xs, gu, H, I, pl, rest, act, x8);
      // the pass's act rows -> int8 for phase 2
      const std::vector<int64_t> pairs = pairs_of(pl, rest);
      parallel_for(static_cast<int64_t>(pairs.size()), std::max<int64_t>(1, (1 << 14) / I), [&](int64_t a, int64_t b) {
        for (int64_t i = a; i < b; ++i) quant::quantize_act_k<Kern, float>(act + pairs[i] * I, as, pairs[i]);
      });
      phase2_fmt<Kern>(fd, as, dn, H, I, pl, rest, y, x8);
    }
    LFMK_DISPATCH_FLOAT(out.scalar_type(), "moe_experts_kquant", [&] {
      combine<scalar_t>(y, twp, pl, n0, nt, k, H, mptr<scalar_t>(out));
    });
  }
}

// gate_up_q: [E, 2I, H] in gate_up_format blocks, down_q: [E, H, I] in down_format blocks (raw
// bytes, any uint8 shape with the right count). Validated in Python (lfm_kernels/ops/moe.py) with
// friendlier messages; these checks guard the memory safety of a direct call.
at::Tensor moe_experts_kquant_any(const char* op, bool x8, const at::Tensor& hidden_in, const at::Tensor& gate_up_q,
                                  const at::Tensor& down_q, c10::string_view gate_up_format, c10::string_view down_format,
                                  int64_t E, int64_t I, const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                                  int64_t gemm_min_rows) {
  TORCH_CHECK_VALUE(gemm_min_rows >= 0, op, ": dequant_gemm_min_rows must be >= 0 (0: never), got ", gemm_min_rows);
  KFormat fg{}, fd{};
  TORCH_CHECK_VALUE(quant::parse_kformat(std::string(gate_up_format), &fg),
                    op, ": gate_up_format must be 'q4_k', 'q5_k' or 'q6_k', got '", gate_up_format, "'");
  TORCH_CHECK_VALUE(quant::parse_kformat(std::string(down_format), &fd),
                    op, ": down_format must be 'q4_k', 'q5_k' or 'q6_k', got '", down_format, "'");
  TORCH_CHECK_VALUE(hidden_in.dim() == 2, op, ": hidden must be [N, H], got ", hidden_in.sizes());
  const auto xdt = hidden_in.scalar_type();
  TORCH_CHECK_VALUE(xdt == at::kFloat || xdt == at::kBFloat16 || xdt == at::kHalf,
                    op, ": hidden must be float32, bfloat16 or float16, got ", xdt);
  const int64_t N = hidden_in.size(0), H = hidden_in.size(1);
  TORCH_CHECK_VALUE(H > 0 && H % quant::kSuper == 0,
                    op, ": H (hidden's last dimension) must be a positive multiple of 256, got ", H);
  TORCH_CHECK_VALUE(I > 0 && I % quant::kSuper == 0, op, ": I must be a positive multiple of 256, got ", I);
  TORCH_CHECK_VALUE(E > 0, op, ": num_experts must be positive, got ", E);
  const int64_t gu_bytes = E * 2 * I * (H / quant::kSuper) * quant::kblock_bytes(fg);
  const int64_t dn_bytes = E * H * (I / quant::kSuper) * quant::kblock_bytes(fd);
  TORCH_CHECK_VALUE(gate_up_q.scalar_type() == at::kByte && gate_up_q.numel() == gu_bytes,
                    op, ": gate_up_q must be uint8 holding ", gu_bytes, " bytes (", gate_up_format,
                    " blocks of [", E, ", ", 2 * I, ", ", H, "]), got ", gate_up_q.scalar_type(), " with ",
                    gate_up_q.numel());
  TORCH_CHECK_VALUE(down_q.scalar_type() == at::kByte && down_q.numel() == dn_bytes,
                    op, ": down_q must be uint8 holding ", dn_bytes, " bytes (", down_format,
                    " blocks of [", E, ", ", H, ", ", I, "]), got ", down_q.scalar_type(), " with ", down_q.numel());
  TORCH_CHECK_VALUE(topk_ids.dim() == 2 && topk_ids.size(0) == N, op, ": topk_ids must be [N=", N,
                    ", k], got ", topk_ids.sizes());
  const int64_t k = topk_ids.size(1);
  TORCH_CHECK_VALUE(topk_weights.dim() == 2 && topk_weights.size(0) == N && topk_weights.size(1) == k,
                    op, ": topk_weights must be [N, k] = ", topk_ids.sizes(), ", got ",
                    topk_weights.sizes());
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const int64_t* idp = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N * k; ++i)
    TORCH_CHECK_VALUE(idp[i] >= 0 && idp[i] < E, op, ": topk_ids must be in [0, ", E, "), got ", idp[i]);
  const at::Tensor tw = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor hidden = hidden_in.contiguous();
  const at::Tensor gu = gate_up_q.contiguous(), dn = down_q.contiguous();
  at::Tensor out = at::empty({N, H}, hidden.options().memory_format(at::MemoryFormat::Contiguous));
  if (N == 0) return out;
  if (k == 0) return out.zero_();
  const uint8_t *gp = gu.const_data_ptr<uint8_t>(), *dp = dn.const_data_ptr<uint8_t>();
  const float* twp = tw.const_data_ptr<float>();
  quant::with_kquant_kern([&](auto kern) {
    moe_experts_kquant_run<decltype(kern)>(fg, fd, hidden, gp, dp, idp, twp, E, I, k, out, x8, gemm_min_rows);
  });
  return out;
}

at::Tensor moe_experts_kquant_cpu(const at::Tensor& hidden, const at::Tensor& gate_up_q, const at::Tensor& down_q,
                                  c10::string_view gate_up_format, c10::string_view down_format, int64_t E, int64_t I,
                                  const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t dequant_gemm_min_rows) {
  return moe_experts_kquant_any("moe_experts_kquant", false, hidden, gate_up_q, down_q, gate_up_format, down_format, E, I,
                                topk_ids, topk_weights, dequant_gemm_min_rows);
}

// The same, on gate_up_q / down_q in the x8 layout (any H and I the op takes: both are multiples of 256,
// so every expert's matrices are whole groups of 8 rows).
at::Tensor moe_experts_kquant_x8_cpu(const at::Tensor& hidden, const at::Tensor& gate_up_q, const at::Tensor& down_q,
                                     c10::string_view gate_up_format, c10::string_view down_format, int64_t E, int64_t I,
                                     const at::Tensor& topk_ids, const at::Tensor& topk_weights,
                                     int64_t dequant_gemm_min_rows) {
  return moe_experts_kquant_any("moe_experts_kquant_x8", true, hidden, gate_up_q, down_q, gate_up_format, down_format, E,
                                I, topk_ids, topk_weights, dequant_gemm_min_rows);
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("moe_experts_kquant(Tensor hidden, Tensor gate_up_q, Tensor down_q, str gate_up_format, str down_format, "
        "int num_experts, int intermediate, Tensor topk_ids, Tensor topk_weights, int dequant_gemm_min_rows=0) -> Tensor");
  m.def("moe_experts_kquant_x8(Tensor hidden, Tensor gate_up_q, Tensor down_q, str gate_up_format, str down_format, "
        "int num_experts, int intermediate, Tensor topk_ids, Tensor topk_weights, int dequant_gemm_min_rows=0) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("moe_experts_kquant", &lfmk::moe_experts_kquant_cpu);
  m.impl("moe_experts_kquant_x8", &lfmk::moe_experts_kquant_x8_cpu);
}
