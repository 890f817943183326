// GQA decode attention: one query token per sequence against [B, H_kv, S, D] K/V caches.
//
// Flash-decoding on the CPU. The work items are (sequence b, KV head h, split of positions): at
// batch 1 the 8 KV heads alone would leave threads idle or unbalanced, so the valid positions of
// each sequence are cut into splits of roughly equal size. An item streams its KV head's K and V
// rows once for all G = Hq / H_kv query heads that share them, keeping an online softmax per head
// (running max m, running sum l, unnormalised fp32 output o) updated once per block of kBlock
// positions. Items that cover a whole sequence write the output directly; split sequences write
// (o, m, l) partials that a second pass merges by log-sum-exp.
//
// The AVX2 path: scores for R positions x NG heads (R * NG = 8) are 8 FMA accumulators reduced
// by one hadd tree into one vector laid out [position][head], so the block of scores is contiguous
// and the softmax (max, exp8, sums) runs on whole vectors; P.V accumulates 8 vectors (NG heads x
// 8/NG chunks of D) over the block, so each V row is converted once per chunk and reused by NG
// heads. Everything after the load is fp32; bf16 is widened with a shift.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace lfmk {
namespace {

constexpr int kBlock = 64;          // positions per online-softmax update (scores stay in L1)
constexpr int64_t kMinSplit = 256;  // shortest split worth its partial write and merge
constexpr int64_t kItemsPerThread = 16;

struct AttnArgs {
  const void* q;
  int64_t q_sb, q_sh;  // strides (elements) of q's batch and head dims; last dim stride 1
  const void* k;
  const void* v;
  int64_t k_sb, k_sh, k_ss;  // cache strides: batch, head, position (last dim stride 1)
  int64_t v_sb, v_sh, v_ss;
  const int64_t* lens;  // [B]
  float scale;
  int64_t Hkv, G, D;
  void* out;  // [B, Hq, D] contiguous, q's dtype
};

// One work item: positions [s0, s1) of sequence b for KV head h.
struct Item {
  int64_t b, h, s0, s1;
  int64_t part;  // index of this item's partial slot, or -1 when it writes the output directly
};

// Partial results of split sequences: o [P, G, D], m and l [P, G].
struct Partials {
  float* o;
  float* m;
  float* l;
};

// Writes the normalised result of one item (o / l) for its G heads, or its partials.
template <typename T>
void finish_item(const AttnArgs& a, const Item& it, const Partials& pp, const float* o, const float* m,
                 const float* l) {
  const int64_t G = a.G, D = a.D;
  if (it.part >= 0) {
    std::copy(o, o + G * D, pp.o + it.part * G * D);
    std::copy(m, m + G, pp.m + it.part * G);
    std::copy(l, l + G, pp.l + it.part * G);
    return;
  }
  T* out = static_cast<T*>(a.out) + (it.b * a.Hkv * G + it.h * G) * D;
  for (int64_t g = 0; g < G; ++g) {
    const float inv = 1.f / l[g];
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = from_f32<T>(o[g * D + d] * inv);
  }
}

// ---- portable path: any D, scalar, same blocking and online softmax as the AVX2 path ----
template <typename T>
void item_portable(const AttnArgs& a, const Item& it, const Partials& pp, std::vector<float>& ws) {
  const int64_t G = a.G, D = a.D;
  ws.assign(G * D + G * (2 + kBlock) + G * D, 0.f);
  float* o = ws.data();
  float* m = o + G * D;
  float* l = m + G;
  float* s = l + G;       // [G][kBlock] scores, then probabilities
  float* qf = s + G * kBlock;  // [G][D] scaled query
  const T* qb = static_cast<const T*>(a.q) + it.b * a.q_sb + it.h * G * a.q_sh;
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -std::numeric_limits<float>::infinity();
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f32(qb[g * a.q_sh + d]) * a.scale;
  }
  const T* kb = static_cast<const T*>(a.k) + it.b * a.k_sb + it.h * a.k_sh;
  const T* vb = static_cast<const T*>(a.v) + it.b * a.v_sb + it.h * a.v_sh;
  for (int64_t j0 = it.s0; j0 < it.s1; j0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, it.s1 - j0));
    for (int j = 0; j < n; ++j) {
      const T* kr = kb + (j0 + j) * a.k_ss;
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0.f;
        for (int64_t d = 0; d < D; ++d) acc += qf[g * D + d] * to_f32(kr[d]);
        s[g * kBlock + j] = acc;
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      float bm = s[g * kBlock];
      for (int j = 1; j < n; ++j) bm = std::max(bm, s[g * kBlock + j]);
      const float mn = std::max(m[g], bm);
      // While every score so far is -inf, subtract 0: -inf - -inf would be NaN where the softmax has
      // exact zeros (a later finite score still gives the reference's answer; all -inf gives 0/0).
      // A NaN score is never dropped: exp(NaN) = NaN reaches l and o.
      const float ms = mn == -std::numeric_limits<float>::infinity() ? 0.f : mn;
      const float alpha = std::exp(m[g] - ms);  // exp(-inf) = 0 on the first block
      float sum = 0.f;
      for (int j = 0; j < n; ++j) sum += (s[g * kBlock + j] = std::exp(s[g * kBlock + j] - ms));
      l[g] = l[g] * alpha + sum;
      m[g] = mn;
      for (int64_t d = 0; d < D; ++d) o[g * D + d] *= alpha;
    }
    for (int j = 0; j < n; ++j) {
      const T* vr = vb + (j0 + j) * a.v_ss;
      for (int64_t g = 0; g < G; ++g) {
        const float p = s[g * kBlock + j];
        for (int64_t d = 0; d < D; ++d) o[g * D + d] += p * to_f32(vr[d]);
      }
    }
  }
  finish_item<T>(a, it, pp, o, m, l);
}

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
namespace lfmk {
namespace {

// Lane i of the result is the sum of the 8 lanes of v[i].
static inline __m256 hsum8x8(const __m256* v) {
  const __m256 t0 = _mm256_hadd_ps(v[0], v[1]);
  const __m256 t1 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 t2 = _mm256_hadd_ps(v[4], v[5]);
  const __m256 t3 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1);  // [s0..s3 low halves | s0..s3 high halves]
  const __m256 u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Online-softmax state of a tile of NG query heads: scores of a block laid out s[j * NG + g].
template <typename T, int D, int NG>
struct Tile {
  static constexpr int R = 8 / NG;   // positions per score vector
  static constexpr int C = 8 / NG;   // 8-float chunks of D per P.V accumulator set
  static_assert(D % (8 * C) == 0, "D must be a multiple of 64");

  // scores of positions [0, n) of the block for heads q[0..NG); positions in [n, pad) get -inf
  static void scores(const float* q, const T* kb, int64_t k_ss, int n, float* s) {
    for (int j = 0; j < n; j += R) {
      __m256 acc[8];
      for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
      const T* kr[R];
      // rows past n repeat the last valid row (never read past the item's range); their scores are
      // overwritten below
      for (int r = 0; r < R; ++r) kr[r] = kb + std::min(j + r, n - 1) * k_ss;
      for (int d = 0; d < D; d += 8) {
        __m256 kv[R];
        for (int r = 0; r < R; ++r) kv[r] = avx2::load8(kr[r] + d);
        for (int g = 0; g < NG; ++g) {
          const __m256 qv = _mm256_loadu_ps(q + g * D + d);
          for (int r = 0; r < R; ++r) acc[r * NG + g] = _mm256_fmadd_ps(qv, kv[r], acc[r * NG + g]);
        }
      }
      _mm256_storeu_ps(s + j * NG, hsum8x8(acc));
    }
  }

  // Updates m, l and the scale alpha of o for this block, turning s into probabilities.
  static void softmax(float* s, int n, float* m, float* l, float* alpha) {
    const int nv = (n + R - 1) / R;  // score vectors in the block
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int i = n * NG; i < nv * 8; ++i) s[i] = ninf;  // padding positions of the last vector
    __m256 vmax = _mm256_set1_ps(ninf);
    for (int i = 0; i < nv; ++i) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i * 8));
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, vmax);
    alignas(32) float mnew[8];
    for (int g = 0; g < NG; ++g) {
      float bm = lanes[g];
      for (int r = 1; r < R; ++r) bm = std::max(bm, lanes[r * NG + g]);
      const float mn = std::max(m[g], bm);
      // While every score so far is -inf, subtract 0 (see item_portable): -inf - -inf would be NaN.
      mnew[g] = mn == ninf ? 0.f : mn;
      alpha[g] = std::exp(m[g] - mnew[g]);  // 0 on the first block (m = -inf)
      m[g] = mn;
    }
    for (int i = NG; i < 8; ++i) mnew[i] = mnew[i % NG];
    const __m256 mv = _mm256_load_ps(mnew);
    const __m256 zero = _mm256_setzero_ps();
    const __m256 vninf = _mm256_set1_ps(ninf);
    __m256 vsum = zero;
    for (int i = 0; i < nv; ++i) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(s + i * 8), mv);
      // exp8 clamps -inf to exp(-87) rather than 0: padding lanes and -inf scores are zeroed exactly.
      // It also clamps NaN (a NaN in q or K, or inf - inf) to a finite value, as if the position were
      // dropped: those lanes are set to all-ones bits, a NaN, so NaN in gives NaN out as in the
      // reference. Both masks are one compare each on the vector already in registers.
      const __m256 is_zero = _mm256_cmp_ps(d, vninf, _CMP_EQ_OQ);
      const __m256 is_nan = _mm256_cmp_ps(d, d, _CMP_UNORD_Q);
      const __m256 p = _mm256_or_ps(_mm256_blendv_ps(avx2::exp8(d), zero, is_zero), is_nan);
      _mm256_storeu_ps(s + i * 8, p);
      vsum = _mm256_add_ps(vsum, p);
    }
    _mm256_store_ps(lanes, vsum);
    for (int g = 0; g < NG; ++g) {
      float sum = 0.f;
      for (int r = 0; r < R; ++r) sum += lanes[r * NG + g];
      l[g] = l[g] * alpha[g] + sum;
    }
  }

  // o[g] = o[g] * alpha[g] + sum_j p[j, g] * V[j]
  static void accumulate(const float* p, const T* vb, int64_t v_ss, int n, const float* alpha, float* o) {
    for (int c0 = 0; c0 < D; c0 += 8 * C) {
      __m256 acc[NG][C];
      for (int g = 0; g < NG; ++g) {
        const __m256 al = _mm256_set1_ps(alpha[g]);
        for (int c = 0; c < C; ++c) acc[g][c] = _mm256_mul_ps(al, _mm256_loadu_ps(o + g * D + c0 + 8 * c));
      }
      for (int j = 0; j < n; ++j) {
        const T* vr = vb + j * v_ss + c0;
        __m256 vv[C];
        for (int c = 0; c < C; ++c) vv[c] = avx2::load8(vr + 8 * c);
        for (int g = 0; g < NG; ++g) {
          const __m256 pj = _mm256_broadcast_ss(p + j * NG + g);
          for (int c = 0; c < C; ++c) acc[g][c] = _mm256_fmadd_ps(pj, vv[c], acc[g][c]);
        }
      }
      for (int g = 0; g < NG; ++g)
        for (int c = 0; c < C; ++c) _mm256_storeu_ps(o + g * D + c0 + 8 * c, acc[g][c]);
    }
  }
};

template <typename T, int D, int NG>
void run_tile(const float* q, const T* kb, const T* vb, const AttnArgs& a, int n, float* s, float* m, float* l,
              float* o) {
  alignas(32) float alpha[NG];
  Tile<T, D, NG>::scores(q, kb, a.k_ss, n, s);
  Tile<T, D, NG>::softmax(s, n, m, l, alpha);
  Tile<T, D, NG>::accumulate(s, vb, a.v_ss, n, alpha, o);
}

template <typename T, int D>
void item_avx2(const AttnArgs& a, const Item& it, const Partials& pp, std::vector<float>& ws) {
  const int64_t G = a.G;
  // o [G][D], q [G][D], m [G], l [G], scores [kBlock * 4 + 8] (one tile of up to 4 heads at a time)
  ws.assign(2 * G * D + 2 * G + kBlock * 4 + 8, 0.f);
  float* o = ws.data();
  float* qf = o + G * D;
  float* m = qf + G * D;
  float* l = m + G;
  float* s = l + G;
  const T* qb = static_cast<const T*>(a.q) + it.b * a.q_sb + it.h * G * a.q_sh;
  const __m256 sc = _mm256_set1_ps(a.scale);
  for (int64_t g = 0; g < G; ++g) {
    m[g] = -std::numeric_limits<float>::infinity();
    for (int d = 0; d < D; d += 8) _mm256_storeu_ps(qf + g * D + d, _mm256_mul_ps(sc, avx2::load8(qb + g * a.q_sh + d)));
  }
  const T* kb = static_cast<const T*>(a.k) + it.b * a.k_sb + it.h * a.k_sh;
  const T* vb = static_cast<const T*>(a.v) + it.b * a.v_sb + it.h * a.v_sh;
  for (int64_t j0 = it.s0; j0 < it.s1; j0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, it.s1 - j0));
    const T* kblk = kb + j0 * a.k_ss;
    const T* vblk = vb + j0 * a.v_ss;
    // heads in tiles of 4, 2, 1: later tiles re-read this block's K/V rows from L1, not memory
    int64_t g = 0;
    for (; g + 4 <= G; g += 4)
      run_tile<T, D, 4>(qf + g * D, kblk, vblk, a, n, s, m + g, l + g, o + g * D);
    if (g + 2 <= G) {
      run_tile<T, D, 2>(qf + g * D, kblk, vblk, a, n, s, m + g, l + g, o + g * D);
      g += 2;
    }
    if (g < G) run_tile<T, D, 1>(qf + g * D, kblk, vblk, a, n, s, m + g, l + g, o + g * D);
  }
  finish_item<T>(a, it, pp, o, m, l);
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

namespace lfmk {
namespace {

template <typename T>
void run_item(const AttnArgs& a, const Item& it, const Partials& pp, std::vector<float>& ws) {
  if (cpu_has_avx2() && a.D == 64)
    item_avx2<T, 64>(a, it, pp, ws);
  else if (cpu_has_avx2() && a.D == 128)
    item_avx2<T, 128>(a, it, pp, ws);
  else
    item_portable<T>(a, it, pp, ws);
}

// out[b, h*G + g] = sum_i exp(m_i - M) o_i / sum_i exp(m_i - M) l_i over the splits i of (b, h).
template <typename T>
void merge(const AttnArgs& a, const std::vector<Item>& items, const std::vector<int64_t>& first, const Partials& pp) {
  const int64_t G = a.G, D = a.D;
  const int64_t groups = static_cast<int64_t>(first.size()) - 1;
  parallel_for(groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(D);
    for (int64_t gi = begin; gi < end; ++gi) {
      const Item& it0 = items[first[gi]];
      if (it0.part < 0) continue;  // written directly
      const int64_t p0 = it0.part, np = first[gi + 1] - first[gi];
      T* out = static_cast<T*>(a.out) + (it0.b * a.Hkv * G + it0.h * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < np; ++i) mx = std::max(mx, pp.m[(p0 + i) * G + g]);
        std::fill(acc.begin(), acc.end(), 0.f);
        float den = 0.f;
        for (int64_t i = 0; i < np; ++i) {
          const float w = std::exp(pp.m[(p0 + i) * G + g] - mx);
          den += w * pp.l[(p0 + i) * G + g];
          const float* o = pp.o + ((p0 + i) * G + g) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += w * o[d];
        }
        const float inv = 1.f / den;
        for (int64_t d = 0; d < D; ++d) out[g * D + d] = from_f32<T>(acc[d] * inv);
      }
    }
  });
}

// Shapes, dtypes and devices were validated in Python (lfm_kernels/ops/decode_attention.py); the
// checks here guard the memory safety of this function when it is called directly.
at::Tensor decode_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                const at::Tensor& seq_lens, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 4 && v_in.dim() == 4, "decode_attention: q must be [B, Hq, D], caches [B, H_kv, S, D]");
  const int64_t B = q_in.size(0), Hq = q_in.size(1), D = q_in.size(2);
  const int64_t Hkv = k_in.size(1), S = k_in.size(2);
  TORCH_CHECK(k_in.sizes() == v_in.sizes() && k_in.size(0) == B && k_in.size(3) == D,
              "decode_attention: k_cache and v_cache must be [B, H_kv, S, D] matching q");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "decode_attention: Hq must be a multiple of H_kv");
  TORCH_CHECK(q_in.scalar_type() == k_in.scalar_type() && q_in.scalar_type() == v_in.scalar_type(),
              "decode_attention: q, k_cache and v_cache must share a dtype");
  TORCH_CHECK(seq_lens.dim() == 1 && seq_lens.size(0) == B, "decode_attention: seq_lens must be [B]");
  const at::Tensor q = q_in.stride(2) == 1 ? q_in : q_in.contiguous();
  const at::Tensor k = k_in.stride(3) == 1 ? k_in : k_in.contiguous();
  const at::Tensor v = v_in.stride(3) == 1 ? v_in : v_in.contiguous();
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();
  const int64_t* len = lens.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(len[b] >= 1 && len[b] <= S, "decode_attention: seq_lens[", b, "] = ", len[b], " is outside [1, S=", S, "]");
  auto out = at::empty({B, Hq, D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  if (B == 0 || Hq == 0 || D == 0) return out;

  AttnArgs a{};
  a.q = q.const_data_ptr();
  a.q_sb = q.stride(0);
  a.q_sh = q.stride(1);
  a.k = k.const_data_ptr();
  a.v = v.const_data_ptr();
  a.k_sb = k.stride(0), a.k_sh = k.stride(1), a.k_ss = k.stride(2);
  a.v_sb = v.stride(0), a.v_sh = v.stride(1), a.v_ss = v.stride(2);
  a.lens = len;
  a.scale = static_cast<float>(scale);
  a.Hkv = Hkv;
  a.G = Hq / Hkv;
  a.D = D;
  a.out = out.mutable_data_ptr();

  // Split length: about kItemsPerThread items per thread over all (sequence, KV head) pairs, so one
  // long sequence (batch 1) still spreads over every thread, but never below kMinSplit positions.
  // Threads take items from a shared counter rather than fixed ranges: on a busy machine a thread
  // that starts late (or runs slower) then simply takes fewer items.
  int64_t total = 0;
  for (int64_t b = 0; b < B; ++b) total += len[b] * Hkv;
  const int64_t nthreads = at::get_num_threads();
  const int64_t target = kItemsPerThread * nthreads;
  int64_t chunk = std::max<int64_t>(kMinSplit, (total + target - 1) / target);
  chunk = (chunk + kBlock - 1) / kBlock * kBlock;
  std::vector<Item> items;
  std::vector<int64_t> first;  // items of (b, h) are items[first[i] .. first[i+1])
  int64_t parts = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t ns = (len[b] + chunk - 1) / chunk;
    // equal splits, each a whole number of blocks
    int64_t step = (len[b] + ns - 1) / ns;
    step = (step + kBlock - 1) / kBlock * kBlock;
    for (int64_t h = 0; h < Hkv; ++h) {
      first.push_back(static_cast<int64_t>(items.size()));
      for (int64_t s0 = 0; s0 < len[b]; s0 += step)
        items.push_back({b, h, s0, std::min(len[b], s0 + step), ns > 1 ? parts++ : -1});
    }
  }
  first.push_back(static_cast<int64_t>(items.size()));
  at::Tensor part_buf;
  Partials pp{nullptr, nullptr, nullptr};
  if (parts > 0) {
    part_buf = at::empty({parts * a.G * (D + 2)}, q.options().dtype(at::kFloat));
    pp.o = part_buf.mutable_data_ptr<float>();
    pp.m = pp.o + parts * a.G * D;
    pp.l = pp.m + parts * a.G;
  }
  LFMK_DISPATCH_FLOAT(q.scalar_type(), "decode_attention", [&] {
    parallel_workers(static_cast<int64_t>(items.size()), [&](TaskQueue& queue) {
      std::vector<float> ws;  // per-thread scratch, reused across the items this thread claims
      for (int64_t i = queue.claim(); i >= 0; i = queue.claim()) run_item<scalar_t>(a, items[i], pp, ws);
    });
    if (parts > 0) merge<scalar_t>(a, items, first, pp);
  });
  return out;
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seq_lens, float scale) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("decode_attention", &lfmk::decode_attention_cpu); }
