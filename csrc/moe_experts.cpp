// MoE experts: the SwiGLU experts reading only the chosen experts' weights, summed with the routing weights.
//
// The (token, slot) pairs are counting-sorted by expert (the Plan), so every active expert's weights
// are read once per pass however many tokens chose it and unused experts are never touched. Three
// phases, the first two spread over all threads across all active experts together by one work-item
// loop (for_each_work_item):
//   1. act[p, j] = silu(gate_j . x) * (up_j . x) for every sorted pair p: a tile reads gate rows j, j+1
//      and up rows j, j+1 in one pass against its tokens, SwiGLU applied to the tile's output, so the
//      [P, 2I] intermediate never exists.
//   2. y[p, h] = down_h . act[p] with the same tile.
//   3. out[n] = sum over slots s in order of w[n, s] * y[pos(n, s)] (combine): a fixed order, so the
//      result does not depend on the thread count.
// A pass is phases 1 and 2 on one kind of tile; the tiles live in one header per instruction set
// (moe_tiles_avx2.h: portable and AVX2, any float weights; moe_tiles_avx512bf16.h). A work item's
// weight rows stay in L2 while groups of tokens (in L1) pass over them.
//
// Which pass an expert takes (its route) is decided per expert from its token count by choose_route,
// from thresholds the caller passes in: the kernel-choice policy (lfm_kernels/_policy.py, which also
// holds their measurements) owns them, this file has none. bf16 hidden and weights only: experts with
// enough tokens run on bf16 dot products, which do twice the multiply-adds per instruction of AVX2
// fp32 FMAs. With AVX512-BF16 (act rounded to bf16 once in both of our kernels):
//   - the outer-product pass (experts_pass_bf16op): tokens in the vector lanes, weight pairs broadcast
//     from the rows as stored, so each weight is read once per 16 tokens (H and I even);
//   - the dot-product pass (experts_pass_bf16dp: vdpbf16ps along K, rows as stored);
//   - oneDNN: two torch GEMMs per expert with the SwiGLU between them here.
// Every bf16 route goes to oneDNN when the portable path is forced (or on AMX without AVX512-BF16).
// The remaining experts keep the tiled path (experts_pass).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

#include "common.h"
#include "moe_plan.h"
#include "moe_tiles_avx2.h"
#include "moe_tiles_avx512bf16.h"

namespace lfmk {
namespace {

using namespace moe;

constexpr int64_t kGemmExpertsPerThread = 2;  // torch-GEMM experts per thread before one expert per thread
constexpr int64_t kLanes = 16;  // tokens per block of the outer-product path (fp32 lanes of a zmm)
// Tokens per expert up to which the dot-product path streams each row once (row_dot_bf16).
constexpr int kStreamedTokens = 2;
// Its work items: only the first tile of an item has no prefetch ahead of it, so they are larger than
// the dot-product paths' (measured at 128 random tokens: 42.7 ms with 16 units / 32 rows per item,
// 39.5 with 64 / 128; 8 / 16 was 44.9)
constexpr int64_t kOpUnits1 = 64;
constexpr int64_t kOpRows2 = 128;

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

// Phases 1 and 2 for one chunk of tokens on the portable / AVX2 tiles; y [P, H] receives each sorted
// pair's expert output.
template <typename W>
void experts_pass(const float* X, const W* gu, const W* dn, int64_t H, int64_t I, const Plan& pl,
                  const std::vector<int64_t>& active, float* act, float* y) {
  const TileFn<W> tile = pick_tile<W>();
  const bool streamed = max_tokens(pl, active) <= kM;
  const int64_t units1 = streamed ? kUnits1Streamed : kUnits1, rows2 = streamed ? kRows2Streamed : kRows2;

  // Phase 1: act[q, j] = silu(gate_j . x_q) * (up_j . x_q)
  for_each_work_item(pl, active, I, units1, [&](const WorkItem& it) {
    const float* xp[kM];
    const W* wp[kR];
    float res[kM * kR];
    const int64_t j0 = it.r0, j1 = it.r1, q0 = it.q0, me = it.tokens;
    const W* G = gu + it.e * 2 * I * H;
    const W* U = G + I * H;
    if (me <= kM) {
      // Decode: a chunk of the item's gate rows, then the same up rows, row by row: two sequential
      // streams, each row prefetching into the next (row_avx2, stream_ahead()). In the tile order below
      // (gate j, j + 1, up j, j + 1, gate j + 2, ...) every jump between the two matrices started
      // cold, two DRAM latencies per 8 KB of bf16 rows. The same per-row dots, so the same bits.
      // Zen 3 (AVX2), 2 threads, full-size bf16 decode step, both orders alternated in one process:
      // the experts 95.9 -> 90.4 ms a token (76 -> 80% of the read probe).
      const int M = static_cast<int>(me);
      for (int m = 0; m < M; ++m) xp[m] = X + pl.tok[q0 + m] * H;
      constexpr int64_t kChunk = 64;
      float g[kChunk * kM], u[kChunk * kM];
      for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
        const int64_t c1 = std::min(j1, c0 + kChunk);
        for (int64_t j = c0; j < c1; ++j) {
          const W* row = G + j * H;
          tile(&row, 1, xp, M, H, g + (j - c0) * kM);
        }
        for (int64_t j = c0; j < c1; ++j) {
          const W* row = U + j * H;
          tile(&row, 1, xp, M, H, u + (j - c0) * kM);
        }
        for (int m = 0; m < M; ++m)
          for (int64_t j = c0; j < c1; ++j)
            act[(q0 + m) * I + j] = silu(g[(j - c0) * kM + m]) * u[(j - c0) * kM + m];
      }
      return;
    }
    prefetch_block(G + j0 * H, (j1 - j0) * H * static_cast<int64_t>(sizeof(W)));
    prefetch_block(U + j0 * H, (j1 - j0) * H * static_cast<int64_t>(sizeof(W)));
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
        tile(wp, 2 * nu, xp, M, H, res);
        for (int m = 0; m < M; ++m)
          for (int u = 0; u < nu; ++u)
            act[(q0 + t + m) * I + j + u] = silu(res[m * 2 * nu + u]) * res[m * 2 * nu + nu + u];
      }
    }
  });

  // Phase 2: y[q, h] = down[e, h] . act[q]
  for_each_work_item(pl, active, H, rows2, [&](const WorkItem& it) {
    const float* xp[kM];
    const W* wp[kR];
    float res[kM * kR];
    const int64_t h0 = it.r0, h1 = it.r1, q0 = it.q0, me = it.tokens;
    const W* D = dn + it.e * H * I;
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
  });
}

// Phases 1 and 2 for bf16 hidden and bf16 weights on the AVX512-BF16 dot-product tile: the same work
// items as experts_pass, but the inputs stay bf16 (no fp32 copy of the tokens) and act is rounded to
// bf16 once, since the second tile multiplies bf16 by bf16. Gate and up of an item are kept in fp32
// and the SwiGLU runs vectorised over the item's units.
void experts_pass_bf16dp(const c10::BFloat16* X, const c10::BFloat16* gu, const c10::BFloat16* dn, int64_t H,
                         int64_t I, const Plan& pl, const std::vector<int64_t>& active, c10::BFloat16* act,
                         float* y) {
  using bf16 = c10::BFloat16;
  // Decode (at most kStreamedTokens tokens per expert): every row read once as a single stream by
  // row_dot_bf16, in the larger streamed work items; otherwise the register tile on row pairs.
  const bool streamed = max_tokens(pl, active) <= kStreamedTokens;
  const int64_t units1 = streamed ? kUnits1Streamed : kUnits1, rows2 = streamed ? kRows2Streamed : kRows2;
  for_each_work_item(pl, active, I, units1, [&](const WorkItem& it) {
    const int64_t j0 = it.r0, j1 = it.r1, nj = j1 - j0, q0 = it.q0, me = it.tokens;
    const bf16* G = gu + it.e * 2 * I * H;
    const bf16* U = G + I * H;
    const int64_t row_bytes = H * static_cast<int64_t>(sizeof(bf16));
    const bf16* xp[kMb];
    const bf16* wp[4];
    float res[kMb * 4];
    std::vector<float> gbuf(me * units1), ubuf(me * units1);
    if (streamed) {
      for (int m = 0; m < me; ++m) xp[m] = X + pl.tok[q0 + m] * H;
      const int M = static_cast<int>(me);
      for (int64_t j = j0; j < j1; ++j) {
        row_dot_bf16_m(G + j * H, H, xp, M, res);
        for (int m = 0; m < M; ++m) gbuf[m * units1 + j - j0] = res[m];
      }
      for (int64_t j = j0; j < j1; ++j) {
        row_dot_bf16_m(U + j * H, H, xp, M, res);
        for (int m = 0; m < M; ++m) ubuf[m * units1 + j - j0] = res[m];
      }
    } else {
      // row pairs outer, token groups inner: a pair's four rows (16 KB at H = 2048) come from memory
      // once and stay in L1 while every token group passes over them
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
              gbuf[(t + m) * units1 + j - j0 + u] = res[m * 2 * nu + u];
              ubuf[(t + m) * units1 + j - j0 + u] = res[m * 2 * nu + nu + u];
            }
        }
      }
    }
    for (int64_t m = 0; m < me; ++m)
      swiglu_row_avx2(&gbuf[m * units1], &ubuf[m * units1], act + (q0 + m) * I + j0, nj);
  });
  for_each_work_item(pl, active, H, rows2, [&](const WorkItem& it) {
    const int64_t h0 = it.r0, h1 = it.r1, q0 = it.q0, me = it.tokens;
    const bf16* D = dn + it.e * H * I;
    const int64_t row_bytes = I * static_cast<int64_t>(sizeof(bf16));
    const bf16* xp[kMb];
    const bf16* wp[4];
    float res[kMb * 4];
    if (streamed) {
      for (int m = 0; m < me; ++m) xp[m] = act + (q0 + m) * I;
      for (int64_t h = h0; h < h1; ++h) {
        row_dot_bf16_m(D + h * I, I, xp, static_cast<int>(me), res);
        for (int m = 0; m < me; ++m) y[(q0 + m) * H + h] = res[m];
      }
      return;
    }
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

  for_each_work_item(pl, active, I, kOpUnits1, [&](const WorkItem& it) {
    const int64_t j0 = it.r0, j1 = it.r1;
    const int64_t nb = first[it.a + 1] - first[it.a];
    const bool narrow_last = narrow_last_block(it.tokens);
    const bf16* G = gu + it.e * 2 * I * H;
    const bf16* U = G + I * H;
    const uint32_t* Pe = xpack + first[it.a] * Hp * kLanes;
    uint32_t* Ae = apack + first[it.a] * Ip * kLanes;
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

  for_each_work_item(pl, active, H, kOpRows2, [&](const WorkItem& it) {
    const int64_t h0 = it.r0, h1 = it.r1, q0 = it.q0, me = it.tokens;
    const int64_t nb = first[it.a + 1] - first[it.a];
    const bool narrow_last = narrow_last_block(me);
    const bf16* D = dn + it.e * H * I;
    const uint32_t* Ae = apack + first[it.a] * Ip * kLanes;
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

// The rows of x (tokens) that chose expert e, in the plan's order, as a new [tokens, H] tensor.
at::Tensor expert_tokens(const at::Tensor& x, const Plan& pl, int64_t e) {
  const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
  at::Tensor rows = at::empty({me}, x.options().dtype(at::kLong));
  std::memcpy(rows.mutable_data_ptr<int64_t>(), pl.tok.data() + q0, me * sizeof(int64_t));
  return x.index_select(0, rows);
}

// One expert's tokens through torch's GEMMs, in the weights' dtype T: g = X_e @ gate_up[e]^T,
// act = silu(g_gate) * g_up, y_e = act @ down[e]^T.
// bf16 (oneDNN): the GEMMs take and return bf16 (what F.linear computes in a bf16 model), so gate, up,
// act and the expert output are each rounded to bf16 once; accumulation inside them is fp32.
// fp32 (MKL / oneDNN, AVX-512 where the CPU has it): all fp32. With tens of tokens per expert its
// blocked GEMMs outrun our fp32 tiles, which reread the weights per 4-token tile (a 2-core Xeon, 32
// experts, 64 tokens each: 266 vs 341 ms).
// Scheduled by run_torch_gemm_experts: alone, each GEMM spread over all threads by torch; with many
// experts, one expert per thread with single-threaded GEMMs.
template <typename T>
void expert_torch_gemm(const at::Tensor& X, const at::Tensor& gu, const at::Tensor& dn, int64_t e, const Plan& pl,
                       float* y) {
  const int64_t q0 = pl.offs[e], me = pl.offs[e + 1] - q0;
  const int64_t H = X.size(1), I = dn.size(2);
  const at::Tensor g = at::mm(expert_tokens(X, pl, e), gu[e].t());
  at::Tensor act = at::empty({me, I}, g.options());
  const T* gp = cptr<T>(g);
  T* ap = mptr<T>(act);
  parallel_for(me, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, I)), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      if constexpr (std::is_same_v<T, float>) {
        for (int64_t j = 0; j < I; ++j) ap[m * I + j] = silu(gp[m * 2 * I + j]) * gp[m * 2 * I + I + j];
      } else {
        swiglu_row_bf16(gp + m * 2 * I, gp + m * 2 * I + I, ap + m * I, I);
      }
    }
  });
  // the expert's rows of y (fp32): fp32 GEMMs write them, a bf16 output is widened exactly by copy_
  at::Tensor ye = at::from_blob(y + q0 * H, {me, H}, X.options().dtype(at::kFloat));
  if constexpr (std::is_same_v<T, float>)
    at::mm_out(ye, act, dn[e].t());
  else
    ye.copy_(at::mm(act, dn[e].t()));
}

// run(e) for each expert of `experts` that goes to torch's GEMMs. Many experts (prefill): one expert
// per thread at a time, each GEMM single-threaded (nested in our parallel region). A single thread's
// GEMM computes while the hardware prefetcher streams its weights, so the cores overlap compute and
// memory; splitting every GEMM over all threads instead leaves each expert first bandwidth- then
// compute-bound. Largest first, so the last experts claimed are the short ones. Few experts: one
// after another, each GEMM spread over all threads by torch.
template <typename F>
void run_torch_gemm_experts(std::vector<int64_t>& experts, const Plan& pl, const F& run) {
  if (static_cast<int64_t>(experts.size()) < kGemmExpertsPerThread * at::get_num_threads()) {
    for (const int64_t e : experts) run(e);
    return;
  }
  std::stable_sort(experts.begin(), experts.end(), [&](int64_t a, int64_t b) {
    return pl.offs[a + 1] - pl.offs[a] > pl.offs[b + 1] - pl.offs[b];
  });
  parallel_dynamic(static_cast<int64_t>(experts.size()), [&](int64_t i) { run(experts[i]); });
}

// The passes an expert can take.
enum class Route { kTiled, kBf16Dot, kBf16Outer, kOneDnn };

// The policy's thresholds, in tokens per expert (see lfm_kernels/_policy.py for what each one means).
struct Bf16Routes {
  int64_t min_rows;                // below: the tiled path; 0: every expert on the tiled path
  int64_t outer_min_rows;          // AVX512-BF16, H and I even: the outer product from here ...
  int64_t outer_onednn_min_rows;   // ... up to here, then oneDNN
  int64_t dot_onednn_min_rows;     // otherwise the dot-product tile up to here, then oneDNN
};

// own_bf16_kernels: our AVX512-BF16 passes may run; pairs_fit: H and I even (the outer product's pairs).
Route choose_route(int64_t tokens, const Bf16Routes& t, bool own_bf16_kernels, bool pairs_fit) {
  if (t.min_rows == 0 || tokens < t.min_rows) return Route::kTiled;
  if (!own_bf16_kernels) return Route::kOneDnn;
  if (pairs_fit && tokens >= t.outer_min_rows)
    return tokens < t.outer_onednn_min_rows ? Route::kBf16Outer : Route::kOneDnn;
  return tokens < t.dot_onednn_min_rows ? Route::kBf16Dot : Route::kOneDnn;
}

// Shapes and dtypes were validated in Python (lfm_kernels/ops/moe.py); the checks here guard the memory
// safety of this function when it is called directly. The id range is checked only here, where the
// ids are read anyway: a check in Python would need their values on the host (a device sync on CUDA,
// a data-dependent branch under torch.compile). TORCH_CHECK_VALUE raises a Python ValueError.
at::Tensor moe_experts_cpu(const at::Tensor& hidden, const at::Tensor& gate_up_proj, const at::Tensor& down_proj,
                           const at::Tensor& topk_ids, const at::Tensor& topk_weights, int64_t bf16_min_rows,
                           int64_t bf16_outer_min_rows, int64_t bf16_outer_onednn_min_rows,
                           int64_t bf16_dot_onednn_min_rows, int64_t fp32_torch_min_rows) {
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
    TORCH_CHECK_VALUE(idp[i] >= 0 && idp[i] < E, "topk_ids must hold expert ids in [0, E=", E, "), got ", idp[i],
                      " at topk_ids[", i / k, ", ", i % k, "]");
  const at::Tensor tw = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor X = hidden.to(at::kFloat).contiguous();
  const at::Tensor gu = gate_up_proj.contiguous(), dn = down_proj.contiguous();
  TORCH_CHECK(bf16_min_rows >= 0, "moe_experts: bf16_min_rows must be >= 0 (0: no bf16 routes)");
  TORCH_CHECK(bf16_min_rows == 0 || (bf16_outer_min_rows >= 1 && bf16_outer_onednn_min_rows >= 1 &&
                                     bf16_dot_onednn_min_rows >= 1),
              "moe_experts: the bf16 route thresholds must be >= 1");
  const bool bf16_dot = bf16_min_rows > 0 && hidden.scalar_type() == at::kBFloat16 &&
                        gu.scalar_type() == at::kBFloat16;
  const Bf16Routes routes{bf16_dot ? bf16_min_rows : 0, bf16_outer_min_rows, bf16_outer_onednn_min_rows,
                          bf16_dot_onednn_min_rows};
  TORCH_CHECK(fp32_torch_min_rows >= 0, "moe_experts: fp32_torch_min_rows must be >= 0 (0: never)");
  // fp32 weights (any hidden dtype; computed in fp32): experts with this many tokens or more go to
  // torch's fp32 GEMM (expert_torch_gemm<float>)
  const int64_t fp32_gemm_rows = gu.scalar_type() == at::kFloat ? fp32_torch_min_rows : 0;
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
    std::vector<int64_t> tiled, dot, outer, gemm, gemm32;
    for (const int64_t e : pl.active) {
      const int64_t tokens = pl.offs[e + 1] - pl.offs[e];
      switch (choose_route(tokens, routes, own_bf16_tile, pairs_fit)) {
        case Route::kTiled: (fp32_gemm_rows > 0 && tokens >= fp32_gemm_rows ? gemm32 : tiled).push_back(e); break;
        case Route::kBf16Dot: dot.push_back(e); break;
        case Route::kBf16Outer: outer.push_back(e); break;
        case Route::kOneDnn: gemm.push_back(e); break;
      }
    }
    float* yp = y.mutable_data_ptr<float>();
    if (!outer.empty())
      experts_pass_bf16op(cptr<c10::BFloat16>(hidden_c), cptr<c10::BFloat16>(gu), cptr<c10::BFloat16>(dn), H, I, pl,
                          outer, yp);
    if (!dot.empty())
      experts_pass_bf16dp(cptr<c10::BFloat16>(hidden_c), cptr<c10::BFloat16>(gu), cptr<c10::BFloat16>(dn), H, I, pl,
                          dot, mptr<c10::BFloat16>(act16), yp);
    run_torch_gemm_experts(gemm, pl, [&](int64_t e) { expert_torch_gemm<c10::BFloat16>(hidden_c, gu, dn, e, pl, yp); });
    run_torch_gemm_experts(gemm32, pl, [&](int64_t e) { expert_torch_gemm<float>(X, gu, dn, e, pl, yp); });
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
  m.def("moe_experts(Tensor hidden, Tensor gate_up_proj, Tensor down_proj, Tensor topk_ids, Tensor topk_weights, "
        "int bf16_min_rows, int bf16_outer_min_rows, int bf16_outer_onednn_min_rows, int bf16_dot_onednn_min_rows, "
        "int fp32_torch_min_rows=0) "
        "-> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("moe_experts", &lfmk::moe_experts_cpu); }
