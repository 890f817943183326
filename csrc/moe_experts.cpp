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
#include <vector>

#include "common.h"
#include "moe_tiles_avx2.h"
#include "moe_tiles_avx512bf16.h"
#include "moe_tiles_quant.h"

namespace lfmk {
namespace {

constexpr int64_t kUnits1 = 16;      // intermediate units (gate row + up row) per phase-1 work item
constexpr int64_t kRows2 = 32;       // down rows per phase-2 work item
constexpr int64_t kMaxPairs = 4096;  // pairs per pass: bounds the fp32 scratch (act, y) for long prompts
constexpr int64_t kGemmExpertsPerThread = 2;  // torch-GEMM experts per thread before one expert per thread
constexpr int64_t kLanes = 16;  // tokens per block of the outer-product path (fp32 lanes of a zmm)
// Its work items: only the first tile of an item has no prefetch ahead of it, so they are larger than
// the dot-product paths' (measured at 128 random tokens: 42.7 ms with 16 units / 32 rows per item,
// 39.5 with 64 / 128; 8 / 16 was 44.9)
constexpr int64_t kOpUnits1 = 64;
constexpr int64_t kOpRows2 = 128;

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

// One work item of a phase: rows [r0, r1) of one active expert's weights (phase 1: intermediate
// units, phase 2: down rows) against all of that expert's tokens, sorted pairs [q0, q0 + tokens).
struct WorkItem {
  int64_t a;       // index in the pass's active list
  int64_t e;       // expert
  int64_t q0;      // first sorted pair of the expert
  int64_t tokens;  // its pairs
  int64_t r0, r1;  // weight rows of the item
};

// The work-item loop of every pass and phase. Items interleave experts (item i -> row chunk i / na,
// expert i % na) and are handed out dynamically, so experts with many and with few tokens spread
// over all threads together: a decode step has just k experts with one token each, and splitting
// only inside one expert at a time would leave a barrier per expert.
template <typename F>
void for_each_work_item(const Plan& pl, const std::vector<int64_t>& active, int64_t rows, int64_t per_item,
                        const F& body) {
  const int64_t na = static_cast<int64_t>(active.size());
  if (na == 0) return;
  const int64_t chunks = (rows + per_item - 1) / per_item;
  parallel_dynamic(chunks * na, [&](int64_t i) {
    WorkItem it;
    it.a = i % na;
    it.e = active[it.a];
    it.q0 = pl.offs[it.e];
    it.tokens = pl.offs[it.e + 1] - it.q0;
    it.r0 = (i / na) * per_item;
    it.r1 = std::min(rows, it.r0 + per_item);
    body(it);
  });
}

// Phases 1 and 2 for one chunk of tokens on the portable / AVX2 tiles; y [P, H] receives each sorted
// pair's expert output.
template <typename W>
void experts_pass(const float* X, const W* gu, const W* dn, int64_t H, int64_t I, const Plan& pl,
                  const std::vector<int64_t>& active, float* act, float* y) {
  const TileFn<W> tile = pick_tile<W>();

  // Phase 1: act[q, j] = silu(gate_j . x_q) * (up_j . x_q)
  for_each_work_item(pl, active, I, kUnits1, [&](const WorkItem& it) {
    const float* xp[kM];
    const W* wp[kR];
    float res[kM * kR];
    const int64_t j0 = it.r0, j1 = it.r1, q0 = it.q0, me = it.tokens;
    const W* G = gu + it.e * 2 * I * H;
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
  });

  // Phase 2: y[q, h] = down[e, h] . act[q]
  for_each_work_item(pl, active, H, kRows2, [&](const WorkItem& it) {
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
  for_each_work_item(pl, active, I, kUnits1, [&](const WorkItem& it) {
    const int64_t j0 = it.r0, j1 = it.r1, nj = j1 - j0, q0 = it.q0, me = it.tokens;
    const bf16* G = gu + it.e * 2 * I * H;
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
  for_each_work_item(pl, active, H, kRows2, [&](const WorkItem& it) {
    const int64_t h0 = it.r0, h1 = it.r1, q0 = it.q0, me = it.tokens;
    const bf16* D = dn + it.e * H * I;
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
                           int64_t bf16_dot_onednn_min_rows) {
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
      switch (choose_route(pl.offs[e + 1] - pl.offs[e], routes, own_bf16_tile, pairs_fit)) {
        case Route::kTiled: tiled.push_back(e); break;
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

// 64-byte aligned scratch (the packed panels are read with aligned loads).
struct AlignedBytes {
  explicit AlignedBytes(int64_t n) : p(static_cast<uint8_t*>(::operator new(static_cast<size_t>(n), std::align_val_t(64)))) {}
  ~AlignedBytes() { ::operator delete(p, std::align_val_t(64)); }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;
  uint8_t* p;
};

// s8[b] = 8 * sum of block b's int8 values: the packed Q4_0 panels take the -8 offset off with it.
inline void block_sums8(const int8_t* q, int64_t nb, int32_t* s8) {
  for (int64_t b = 0; b < nb; ++b) {
    int32_t s = 0;
    for (int j = 0; j < quant::kBlock; ++j) s += q[b * quant::kBlock + j];
    s8[b] = 8 * s;
  }
}

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

  // act's rows (every pair of the chunk belongs to an active expert) -> int8 blocks for phase 2
  const int64_t P = pl.offs.back();
  parallel_for(P, std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(1, I)), [&](int64_t a, int64_t b) {
    for (int64_t q = a; q < b; ++q) {
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

template <class Kern, quant::Format F>
void moe_experts_quant_run(const at::Tensor& hidden, const uint8_t* gu, const uint8_t* dn, const int64_t* idp,
                           const float* twp, int64_t E, int64_t I, int64_t k, at::Tensor& out) {
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
  std::vector<int8_t> xq(pmax * H), aq(pmax * I);
  std::vector<float> xd(pmax * nbH), ad(pmax * nbI), act(pmax * I), y(pmax * H);
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
    experts_pass_quant<Kern, F>(xq.data(), xd.data(), xs8.data(), gu, dn, H, I, pl, pl.active, act.data(), aq.data(),
                                ad.data(), as8.data(), y.data());
    LFMK_DISPATCH_FLOAT(out.scalar_type(), "moe_experts_quant", [&] {
      combine<scalar_t>(y.data(), twp, pl, n0, nt, k, H, mptr<scalar_t>(out));
    });
  }
}

template <class Kern>
void moe_experts_quant_isa(quant::Format f, const at::Tensor& hidden, const uint8_t* gu, const uint8_t* dn,
                           const int64_t* idp, const float* twp, int64_t E, int64_t I, int64_t k, at::Tensor& out) {
  if (f == quant::Format::Q8_0)
    moe_experts_quant_run<Kern, quant::Format::Q8_0>(hidden, gu, dn, idp, twp, E, I, k, out);
  else
    moe_experts_quant_run<Kern, quant::Format::Q4_0>(hidden, gu, dn, idp, twp, E, I, k, out);
}

// gate_up_q: [E, 2I, H] and down_q: [E, H, I] in `format` blocks (raw bytes, any uint8 shape with the
// right count). Validated in Python (lfm_kernels/ops/moe.py) with friendlier messages; these checks
// guard the memory safety of a direct call.
at::Tensor moe_experts_quant_cpu(const at::Tensor& hidden_in, const at::Tensor& gate_up_q, const at::Tensor& down_q,
                                 c10::string_view format, int64_t E, int64_t I, const at::Tensor& topk_ids,
                                 const at::Tensor& topk_weights) {
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
    case 3: moe_experts_quant_isa<QTilesAvx512Vnni>(f, hidden, gp, dp, idp, twp, E, I, k, out); break;
    case 2: moe_experts_quant_isa<QTilesAvxVnni>(f, hidden, gp, dp, idp, twp, E, I, k, out); break;
    case 1: moe_experts_quant_isa<QTilesAvx2>(f, hidden, gp, dp, idp, twp, E, I, k, out); break;
    default: moe_experts_quant_isa<QTilesPortable>(f, hidden, gp, dp, idp, twp, E, I, k, out); break;
  }
  return out;
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("moe_experts(Tensor hidden, Tensor gate_up_proj, Tensor down_proj, Tensor topk_ids, Tensor topk_weights, "
        "int bf16_min_rows, int bf16_outer_min_rows, int bf16_outer_onednn_min_rows, int bf16_dot_onednn_min_rows) "
        "-> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("moe_experts", &lfmk::moe_experts_cpu); }

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("moe_experts_quant(Tensor hidden, Tensor gate_up_q, Tensor down_q, str format, int num_experts, "
        "int intermediate, Tensor topk_ids, Tensor topk_weights) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("moe_experts_quant", &lfmk::moe_experts_quant_cpu); }
