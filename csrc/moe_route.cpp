// MoE router: LFM2-MoE's sigmoid router with a selection bias and top-k.
//
// logits = hidden @ gate_weight^T (fp32, then rounded to hidden's dtype as transformers computes it),
// s = sigmoid(logits) (rounded the same way), choose top_k on s + expert_bias (ties to the lower index,
// output sorted by descending biased score like torch.topk), weights = s of the chosen experts, divided
// by (sum + 1e-6) when normalising, times the scaling factor. The logits run on the experts' register
// tiles (moe_tiles_avx2.h): E router rows against token triples.
#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "moe_tiles_avx2.h"

namespace lfmk {
namespace {

// The order of the reference's stable descending sort: NaN above every number (so a NaN score is
// chosen first and its weight is NaN, as in the reference), then the larger score. Strict, so the
// lower index wins among equal scores and among NaNs.
inline bool ranks_above(float a, float b) { return std::isnan(a) ? !std::isnan(b) : a > b; }

template <typename W>
void route_logits(const float* X, const W* gw, int64_t N, int64_t E, int64_t H, float* logits) {
  const TileFn<W> tile = pick_tile<W>();
  const int64_t groups = (N + kM - 1) / kM, eblocks = (E + kR - 1) / kR;
  // Tasks of (token triple, block of kR router rows), at least 16K multiply-adds each: at a decode
  // step (one triple) the threads then split the router's rows (each row's sum is the same tile call
  // either way, so the bits do not depend on the split). Cold from the weight streams, the 32 x 2048
  // bf16 router took 10.8 us a call on one thread, 8.5 split over two (2-core Zen 5; 22 calls in a
  // ~19 ms Q4_0 token). Prefetching each thread's rows first gave nothing more.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, kR * kM * H));
  parallel_for(groups * eblocks, grain, [&](int64_t t0, int64_t t1) {
    const float* xp[kM];
    const W* wp[kR];
    float res[kM * kR];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t / eblocks * kM, e0 = t % eblocks * kR;
      const int M = static_cast<int>(std::min<int64_t>(kM, N - n0));
      for (int m = 0; m < M; ++m) xp[m] = X + (n0 + m) * H;
      const int R = static_cast<int>(std::min<int64_t>(kR, E - e0));
      for (int r = 0; r < R; ++r) wp[r] = gw + (e0 + r) * H;
      tile(wp, R, xp, M, H, res);
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) logits[(n0 + m) * E + e0 + r] = res[m * R + r];
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
  // hidden and the bias in fp32, converted here with plain loops: at a decode step (one token) the
  // tensor ops for it were a good part of the call, on caches the weight streams have just evicted
  std::vector<float> X(static_cast<size_t>(N * H));
  load_as_fp32(hidden, X.data());
  const at::Tensor gw = gate_weight.contiguous();
  std::vector<float> bias;
  if (expert_bias.has_value()) {
    TORCH_CHECK(expert_bias->numel() == E, "moe_route: expert_bias must be [E]");
    bias.resize(static_cast<size_t>(E));
    load_as_fp32(*expert_bias, bias.data());
  }
  auto fopt = hidden.options().dtype(at::kFloat);
  at::Tensor weights = at::empty({N, top_k}, fopt);
  at::Tensor ids = at::empty({N, top_k}, hidden.options().dtype(at::kLong));
  if (N == 0) return {weights, ids};
  at::Tensor logits = at::empty({N, E}, fopt);
  float* lg = logits.mutable_data_ptr<float>();
  LFMK_DISPATCH_FLOAT(gw.scalar_type(), "moe_route", [&] {
    route_logits<scalar_t>(X.data(), cptr<scalar_t>(gw), N, E, H, lg);
  });
  const float* bp = expert_bias.has_value() ? bias.data() : nullptr;
  float* wo = weights.mutable_data_ptr<float>();
  int64_t* io = ids.mutable_data_ptr<int64_t>();
  const float scale = static_cast<float>(routed_scaling_factor);
  // transformers runs the router in the model dtype: logits and sigmoid are rounded to hidden's
  // dtype, and the biased score to the promoted dtype of (sigmoid, expert_bias). Selection is
  // discrete, so rounding at the same points is what makes bf16 choices agree with transformers.
  const at::ScalarType hdt = hidden.scalar_type();
  const at::ScalarType cdt = expert_bias.has_value() ? c10::promoteTypes(hdt, expert_bias->scalar_type()) : hdt;
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
        int64_t best = -1;
        for (int64_t e = 0; e < E; ++e)
          if (!taken[e] && (best < 0 || ranks_above(c[e], c[best]))) best = e;
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

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("moe_route(Tensor hidden, Tensor gate_weight, Tensor? expert_bias, int top_k, bool norm_topk_prob, "
        "float routed_scaling_factor) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("moe_route", &lfmk::moe_route_cpu); }
