// What every MoE experts pass shares (csrc/moe_experts.cpp: float and bf16 weights;
// csrc/moe_experts_quant.cpp: GGUF blocks): the sorted (token, slot) plan, the one work-item loop
// over all active experts, the combine with the routing weights, and the work-item sizes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace lfmk {
namespace moe {

constexpr int64_t kUnits1 = 16;      // intermediate units (gate row + up row) per phase-1 work item
constexpr int64_t kRows2 = 32;       // down rows per phase-2 work item
constexpr int64_t kMaxPairs = 4096;  // pairs per pass: bounds the fp32 scratch (act, y) for long prompts
// Decode: when no active expert has more tokens than one register tile takes, every weight row is read
// from memory once, as a single stream, and larger items let each thread read long runs of
// consecutive rows. Zen 4, 2 threads, bf16, 4 of 32 experts at H 2048, I 1792, one token: 128 / 256
// read 1.18x faster than kUnits1 / kRows2 (64 / 128: 1.16x, 224 / 512: 1.11x). The quantized x8 passes
// take them too: their tiles prefetch the next tile of the item (common.h, prefetch_ahead), which
// needs items of several tiles (x8_item_rows).
constexpr int64_t kUnits1Streamed = 128;
constexpr int64_t kRows2Streamed = 256;

inline float silu(float g) { return g / (1.f + std::exp(-g)); }

// Pulls a contiguous block of weight rows into the cache hierarchy in address order before a
// register tile reads it as several parallel rows: one sequential sweep runs at the stream
// bandwidth that the parallel-row pattern only half reaches (see row_avx2). The tile then finds
// the rows in L2 (a work item's block is at most 256 KB).
inline void prefetch_block(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 2);
}

struct Plan {
  std::vector<int64_t> offs;    // [E + 1] start of each expert's pairs in sorted order
  std::vector<int64_t> tok;     // [P] token (global row of X) of each sorted pair
  std::vector<int64_t> pos;     // [P] sorted position of pair p = n * k + s (chunk-local)
  std::vector<int64_t> active;  // experts with at least one pair, ascending
};

// The sorted pair positions of the experts in `experts` (all of pl's pairs when it is pl.active).
inline std::vector<int64_t> pairs_of(const Plan& pl, const std::vector<int64_t>& experts) {
  std::vector<int64_t> out;
  out.reserve(pl.offs.back());
  for (const int64_t e : experts)
    for (int64_t q = pl.offs[e]; q < pl.offs[e + 1]; ++q) out.push_back(q);
  return out;
}

inline Plan make_plan(const int64_t* ids, int64_t n0, int64_t nt, int64_t k, int64_t E) {
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
// only inside one expert at a time would leave a barrier per expert. A body that takes
// (item, next) is also told the item its thread runs next (null: none), claimed ahead, so that the
// item's last tile can prefetch the next one's first (common.h, parallel_dynamic_ahead).
template <typename F>
void for_each_work_item(const Plan& pl, const std::vector<int64_t>& active, int64_t rows, int64_t per_item,
                        const F& body) {
  const int64_t na = static_cast<int64_t>(active.size());
  if (na == 0) return;
  const int64_t chunks = (rows + per_item - 1) / per_item;
  const auto item = [&](int64_t i) {
    WorkItem it;
    it.a = i % na;
    it.e = active[it.a];
    it.q0 = pl.offs[it.e];
    it.tokens = pl.offs[it.e + 1] - it.q0;
    it.r0 = (i / na) * per_item;
    it.r1 = std::min(rows, it.r0 + per_item);
    return it;
  };
  if constexpr (std::is_invocable_v<const F&, const WorkItem&, const WorkItem*>) {
    parallel_dynamic_ahead(chunks * na, [&](int64_t i, int64_t next) {
      const WorkItem n = next >= 0 ? item(next) : WorkItem{};
      body(item(i), next >= 0 ? &n : nullptr);
    });
  } else {
    parallel_dynamic(chunks * na, [&](int64_t i) { body(item(i)); });
  }
}

// The most tokens any active expert of the plan has.
inline int64_t max_tokens(const Plan& pl, const std::vector<int64_t>& active) {
  int64_t m = 0;
  for (int64_t e : active) m = std::max(m, pl.offs[e + 1] - pl.offs[e]);
  return m;
}

// Rows per work item of a quantized experts pass: the streamed sizes on the x8 layout when no active
// expert has more tokens than one x8 tile takes (tile_tokens: decode), else plain.
inline int64_t x8_item_rows(bool x8, const Plan& pl, const std::vector<int64_t>& active, int64_t tile_tokens,
                            int64_t plain, int64_t streamed) {
  return x8 && max_tokens(pl, active) <= tile_tokens ? streamed : plain;
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

}  // namespace moe
}  // namespace lfmk
