// The sampler of the model wrapper's generate loop: repetition penalty, top-k, temperature, top-p and
// the draw, for one decode step's logits [B, V], in one dispatch.
//
// Why an op: in Python the same step is a dozen dispatches (the fp32 copy of the logits, the
// penalty's gather / where / scatter, the top-k, softmax, multinomial, ...), each on caches the
// weight streams have just evicted: about 0.5 ms a token, 1.5% of a Q4_K_M token on a 2-core CPU.
//
// penalized_top_k: the k best tokens by penalised score (transformers' RepetitionPenaltyLogitsProcessor
// on the ids in history: s < 0 ? s * p : s / p, in fp32), in descending order; NaN ranks above every
// number, and equal scores rank by the lower token id (torch.argmax's choice, and a stable order,
// where torch.topk promises none). It reads the logits once for the maxima of blocks of 64 and then
// ranks only the k best blocks' elements: an element of the top k lies in one of the k blocks that
// rank highest by (maximum, lower block), since a block left out has k blocks ranking above it, each
// holding an element (its maximum) that ranks above everything in the left-out block.
//
// sample_top_k: with temperature 0 the best id (greedy); otherwise the candidates' scores divided by
// the temperature, top-p masking (transformers' TopPLogitsWarper) and softmax over the k candidates,
// then one uniform draw per row from the caller's generator: the Python sampler's distribution, but
// not torch.multinomial's random stream, so a seed picks other tokens than the Python path does.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/DistributionsHelper.h>

#include <mutex>

#include "common.h"

namespace lfmk {
namespace {

constexpr int64_t kBlock = 64;

// The rank order: NaN above every number, then the larger score, then the lower id.
inline bool ranks_above(float a, int64_t ia, float b, int64_t ib) {
  const bool na = std::isnan(a), nb = std::isnan(b);
  if (na != nb) return na;
  if (!na && a != b) return a > b;
  return ia < ib;
}

template <typename T>
inline float block_max_portable(const T* p, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const float v = to_f32(p[i]);
    if (std::isnan(v)) return v;
    m = std::max(m, v);
  }
  return m;
}

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
namespace lfmk {
namespace {

// The maximum of n (a multiple of 8) values, NaN where any is NaN.
template <typename T>
float block_max_avx2(const T* p, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = avx2::load8(p + i);
    m = _mm256_max_ps(m, v);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) return std::numeric_limits<float>::quiet_NaN();
  alignas(32) float l[8];
  _mm256_store_ps(l, m);
  return *std::max_element(l, l + 8);
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

namespace lfmk {
namespace {

template <typename T>
float block_max(const T* p, int64_t n, bool avx2) {
  if (avx2 && n % 8 == 0) return block_max_avx2(p, n);
  return block_max_portable(p, n);
}

// Row `row` of V logits: the k best (score, id) into vals / ids, descending.
template <typename T>
void top_k_row(const T* row, int64_t V, const int64_t* hist, int64_t nh, float penalty, int64_t k, float* vals,
               int64_t* ids) {
  const bool avx2 = cpu_has_avx2();
  // the penalised scores of the seen ids (each from the logit itself: duplicates are harmless)
  std::vector<std::pair<int64_t, float>> seen;
  seen.reserve(static_cast<size_t>(nh));
  for (int64_t j = 0; j < nh; ++j) {
    const float s = to_f32(row[hist[j]]);
    seen.emplace_back(hist[j], s < 0 ? s * penalty : s / penalty);
  }
  std::sort(seen.begin(), seen.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  seen.erase(std::unique(seen.begin(), seen.end(), [](const auto& a, const auto& b) { return a.first == b.first; }),
             seen.end());
  // block b's scores, penalties applied, into buf; returns its length. s: a cursor into `seen`, for
  // blocks visited in ascending order.
  const auto fill = [&](int64_t b, size_t& s, float* buf) -> int64_t {
    const int64_t v0 = b * kBlock, n = std::min(kBlock, V - v0);
    for (int64_t i = 0; i < n; ++i) buf[i] = to_f32(row[v0 + i]);
    while (s < seen.size() && seen[s].first < v0) ++s;
    for (size_t t = s; t < seen.size() && seen[t].first < v0 + n; ++t) buf[seen[t].first - v0] = seen[t].second;
    return n;
  };
  alignas(32) float buf[kBlock];
  const int64_t nb = (V + kBlock - 1) / kBlock;
  std::vector<float> bmax(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) bmax[b] = block_max(row + b * kBlock, std::min(kBlock, V - b * kBlock), avx2);
  // blocks holding a penalised id: their maxima again, with the penalties
  for (size_t s = 0, c = 0; s < seen.size();) {
    const int64_t b = seen[s].first / kBlock;
    bmax[b] = block_max(buf, fill(b, c, buf), avx2);
    while (s < seen.size() && seen[s].first < (b + 1) * kBlock) ++s;
  }
  const int64_t kb = std::min(k, nb);
  std::vector<int64_t> order(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) order[b] = b;
  const auto block_above = [&](int64_t a, int64_t b) { return ranks_above(bmax[a], a, bmax[b], b); };
  std::nth_element(order.begin(), order.begin() + (kb - 1), order.end(), block_above);
  // With k blocks, the k-th best block's maximum: the k best elements are all at least that (each of
  // the k best blocks holds one), so only those enter the final ranking (NaN: only NaNs). With fewer
  // blocks than k, every element does.
  const float thr = kb == k ? bmax[order[kb - 1]] : -std::numeric_limits<float>::infinity();
  std::sort(order.begin(), order.begin() + kb);  // ascending blocks, for fill's cursor
  std::vector<std::pair<float, int64_t>> cand;
  cand.reserve(static_cast<size_t>(4 * k));
  size_t cursor = 0;
  for (int64_t i = 0; i < kb; ++i) {
    const int64_t n = fill(order[i], cursor, buf);
    for (int64_t j = 0; j < n; ++j)
      if (std::isnan(buf[j]) || (!std::isnan(thr) && buf[j] >= thr)) cand.emplace_back(buf[j], order[i] * kBlock + j);
  }
  const auto above = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
    return ranks_above(a.first, a.second, b.first, b.second);
  };
  std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), above);
  for (int64_t i = 0; i < k; ++i) {
    vals[i] = cand[i].first;
    ids[i] = cand[i].second;
  }
}

std::tuple<at::Tensor, at::Tensor> penalized_top_k_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& history,
                                                       int64_t k, double repetition_penalty) {
  TORCH_CHECK_VALUE(logits.dim() == 2, "penalized_top_k: logits must be [B, V], got ", logits.sizes());
  const int64_t B = logits.size(0), V = logits.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= V, "penalized_top_k: k must be in [1, V=", V, "], got ", k);
  TORCH_CHECK_VALUE(std::isfinite(repetition_penalty) && repetition_penalty > 0,
                    "penalized_top_k: repetition_penalty must be finite and > 0, got ", repetition_penalty);
  const at::Tensor x = logits.contiguous();
  at::Tensor h;
  int64_t nh = 0, ldh = 0;
  const bool penalise = repetition_penalty != 1.0 && history.has_value() && history->numel() > 0;
  if (penalise) {
    TORCH_CHECK_VALUE(history->dim() == 2 && history->size(0) == B && history->scalar_type() == at::kLong,
                      "penalized_top_k: history must be int64 [B=", B, ", n], got ", history->scalar_type(), " ",
                      history->sizes());
    h = history->stride(1) == 1 ? *history : history->contiguous();  // generate passes a prefix of its rows
    nh = h.size(1);
    ldh = h.stride(0);
    const int64_t* hp = h.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < nh; ++j)
        TORCH_CHECK_VALUE(hp[b * ldh + j] >= 0 && hp[b * ldh + j] < V, "penalized_top_k: history holds id ",
                          hp[b * ldh + j], ", outside [0, V=", V, ")");
  }
  at::Tensor vals = at::empty({B, k}, x.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({B, k}, x.options().dtype(at::kLong));
  const float p = static_cast<float>(repetition_penalty);
  LFMK_DISPATCH_FLOAT(x.scalar_type(), "penalized_top_k", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b)
      top_k_row(xp + b * V, V, penalise ? h.const_data_ptr<int64_t>() + b * ldh : nullptr, nh, p, k,
                vals.mutable_data_ptr<float>() + b * k, ids.mutable_data_ptr<int64_t>() + b * k);
  });
  return {vals, ids};
}

// Row b's draw from its k candidates (scores descending): scores / temperature, the top-p cut,
// softmax, and the first candidate whose cumulative probability passes u * total.
int64_t draw(const float* vals, const int64_t* ids, int64_t k, float temperature, double top_p, double u) {
  // unnormalised probabilities exp(t_i - t_0), t = scores / temperature (t_0 the largest)
  const float mx = vals[0] / temperature;
  std::vector<double> p(static_cast<size_t>(k));
  double total = 0;
  for (int64_t i = 0; i < k; ++i) total += p[i] = std::exp(static_cast<double>(vals[i] / temperature) - mx);
  TORCH_CHECK_VALUE(std::isfinite(total) && total > 0, "sample_top_k: the candidates' probabilities are not finite "
                    "(NaN or infinite logits)");
  // top-p (transformers' TopPLogitsWarper): in ascending order, drop the candidates whose cumulative
  // probability stays <= 1 - top_p, always keeping the best
  int64_t keep = k;
  if (top_p < 1.0) {
    double cum = 0;
    for (int64_t i = k - 1; i > 0 && (cum += p[i] / total) <= 1.0 - top_p; --i) keep = i;
  }
  double kept = 0;
  for (int64_t i = 0; i < keep; ++i) kept += p[i];
  const double target = u * kept;
  double cum = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cum += p[i];
    if (cum > target) return ids[i];
  }
  return ids[keep - 1];
}

at::Tensor sample_top_k_cpu(const at::Tensor& logits, const std::optional<at::Tensor>& history, double temperature,
                            int64_t top_k, double top_p, double repetition_penalty,
                            std::optional<at::Generator> generator) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature >= 0, "sample_top_k: temperature must be finite and >= 0, got ",
                    temperature);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "sample_top_k: top_p must be in (0, 1], got ", top_p);
  const int64_t k = temperature == 0 ? 1 : top_k;
  auto [vals, ids] = penalized_top_k_cpu(logits, history, k, repetition_penalty);
  const int64_t B = logits.size(0);
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  int64_t* o = out.mutable_data_ptr<int64_t>();
  const float* v = vals.const_data_ptr<float>();
  const int64_t* id = ids.const_data_ptr<int64_t>();
  if (temperature == 0) {
    for (int64_t b = 0; b < B; ++b) o[b] = id[b];
    return out;
  }
  // one uniform draw per row from the caller's generator (the default one when none is given)
  auto* gen = at::get_generator_or_default<at::CPUGeneratorImpl>(generator, at::detail::getDefaultCPUGenerator());
  std::vector<double> u(static_cast<size_t>(B));
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);
    at::uniform_real_distribution<double> uniform(0.0, 1.0);
    for (int64_t b = 0; b < B; ++b) u[b] = uniform(gen);
  }
  for (int64_t b = 0; b < B; ++b)
    o[b] = draw(v + b * k, id + b * k, k, static_cast<float>(temperature), top_p, u[b]);
  return out;
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("penalized_top_k(Tensor logits, Tensor? history, int k, float repetition_penalty) -> (Tensor, Tensor)");
  m.def("sample_top_k(Tensor logits, Tensor? history, float temperature, int top_k, float top_p, "
        "float repetition_penalty, Generator? generator) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("penalized_top_k", &lfmk::penalized_top_k_cpu);
  m.impl("sample_top_k", &lfmk::sample_top_k_cpu);
}
