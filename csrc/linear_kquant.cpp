// out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias) for W in GGUF K-quant blocks (Q4_K / Q5_K /
// Q6_K, quant/kquant.h), x quantized per 256 to int8 with per-16 sums: integer dot products per
// sub-block, fp32 per super-block and across.
//
// x is quantized once (rows in parallel); then, because the bottleneck differs:
//  * Few rows (decode, M <= 4): a stream over the weight's bytes, each used M times. Threads claim
//    chunks of output rows from a shared counter.
//  * Many rows (prefill): panels of weight rows small enough to stay in L2 are reused by every
//    4-row tile of x; threads claim (panel, chunk of M) tasks. On the SIMD path the panel is first
//    repacked (8 rows interleaved per 32-bit lane, scales and mins as int16 vectors, see
//    quant/kquant_avx2.h), so one broadcast of x feeds eight rows and the inner loop decodes
//    nothing; the portable path runs the plain tiles.
// The same op on weights in the x8 layout (quant/kquant_x8.h, rows interleaved in groups of 8 with
// the same bytes), linear_kquant_x8, streams 8-row groups through the x8 tile at decode and packs
// its prefill panels from the groups; kquant_relayout converts between the two layouts.
// Every output element is one fixed-order sum over the super-blocks of exact integer parts with the
// same fused fp32 steps on every path (packed or not, x8 or rows), so the portable and AVX2 paths,
// either layout, any thread count and any batch position give the same bits.
#include "common.h"

#include <string>
#include <vector>

#include "quant/gemm_loops.h"
#include "quant/kquant_kernels.h"
#include "quant/kquant_x8_loops.h"
#include "quant/quant.h"

namespace lfmk {
namespace quant {
namespace {

// Weight bytes per decode task (at most), for the reason linear_quant_x8.cpp gives. Measured on 2 Zen 5
// cores, a Q4_K_M decode step replayed, each op's share of the paired read probe (~50 GB/s), 256 KiB
// -> 1 MiB (the next task prefetched in both): the step 81.9 -> 84.9%, Q6_K 128000 x 2048 76.9 -> 85.4%,
// Q6_K 2048 x 7168 64.6 -> 73.1%, Q4_K 6144 x 2048 90.1 -> 93.2%.
constexpr int64_t kKGemvTaskBytes = 1 << 20;
constexpr int64_t kKPanelBytes = 96 << 10;       // plain tiles: weight bytes per GEMM panel (L2)
constexpr int64_t kKPackedPanelBytes = 160 << 10;  // packed panel bytes (L2)
constexpr int64_t kKGemmMc = 64;                 // activation rows per plain GEMM task

struct KArgs {
  const uint8_t* w;
  const float* bias;  // [N] fp32 or null
  float* out;         // [M, N] contiguous
  int64_t M, N, K;
  bool x8;            // w in the x8 layout (its last N % 8 rows, if any, in rows)
};

// out[m, n] += bias[n] for rows [m0, m0 + M), columns [n0, n1).
inline void add_bias(const KArgs& a, int64_t m0, int64_t M, int64_t n0, int64_t n1) {
  if (!a.bias) return;
  for (int64_t m = m0; m < m0 + M; ++m)
    for (int64_t n = n0; n < n1; ++n) a.out[m * a.N + n] += a.bias[n];
}

// Weight rows [n0, n1) against activation rows [m0, m0 + M), R rows at a time, then single rows.
template <class Kern, KFormat F>
inline void rows_x_ktile(const KArgs& a, const KActs& x, int R, int M, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t w_ld = a.K / kSuper * KTraits<F>::kBytes;
  float res[4 * kKM];
  for (int64_t n = n0; n < n1;) {
    const int r = n1 - n >= R ? R : 1;
    ktile_rm<Kern, F>(r, M, a.w + n * w_ld, w_ld, x, m0, res);
    for (int i = 0; i < r; ++i) {
      const float b = a.bias ? a.bias[n + i] : 0.f;
      for (int m = 0; m < M; ++m) a.out[(m0 + m) * a.N + n + i] = res[i * M + m] + b;
    }
    n += r;
  }
}

// x8 decode: threads claim chunks of 8-row groups (as kgemv's chunks of rows); the row-layout tail
// is one more task.
template <class Kern, KFormat F>
void kgemv_x8(const KArgs& a, const KActs& x) {
  const int M = static_cast<int>(a.M);
  const int64_t group_bytes = 8 * (a.K / kSuper) * KTraits<F>::kBytes;
  const int64_t groups = a.N / 8, threads = at::get_num_threads();
  int64_t per = std::min((groups + 4 * threads - 1) / (4 * threads), std::max<int64_t>(1, kKGemvTaskBytes / group_bytes));
  per = std::max<int64_t>(2, (per + 1) / 2 * 2);
  const int64_t gtasks = (groups + per - 1) / per;
  parallel_dynamic_ahead(gtasks + (a.N % 8 ? 1 : 0), [&](int64_t t, int64_t next) {
    if (t == gtasks) return rows_x_ktile<Kern, F>(a, x, ktile_rows(M), M, 0, 8 * groups, a.N);
    const int64_t g0 = t * per, g1 = std::min(groups, g0 + per);
    kx8_groups<Kern, F>(M, a.w, group_bytes, g0, g1, x, 0, a.out, a.N,
                        next >= 0 && next < gtasks ? a.w + next * per * group_bytes : nullptr);
    add_bias(a, 0, M, 8 * g0, 8 * g1);
  });
}

template <class Kern, KFormat F>
void kgemv(const KArgs& a, const KActs& x) {
  const int M = static_cast<int>(a.M);
  const int R = ktile_rows(M);
  const int64_t row_bytes = a.K / kSuper * KTraits<F>::kBytes;
  const int64_t threads = at::get_num_threads();
  // at least 4 tasks per thread (a descheduled thread holds up little), at most kKGemvTaskBytes each
  int64_t rows = std::min((a.N + 4 * threads - 1) / (4 * threads), std::max<int64_t>(1, kKGemvTaskBytes / row_bytes));
  rows = std::max<int64_t>(R, (rows + R - 1) / R * R);
  const int64_t tasks = (a.N + rows - 1) / rows;
  parallel_dynamic(tasks, [&](int64_t t) {
    const int64_t n0 = t * rows, n1 = std::min(a.N, n0 + rows);
    rows_x_ktile<Kern, F>(a, x, R, M, 0, n0, n1);
  });
}

// Portable path, many rows: plain tiles over L2-sized panels.
template <class Kern, KFormat F>
void kgemm(const KArgs& a, const KActs& x) {
  const int64_t row_bytes = a.K / kSuper * KTraits<F>::kBytes;
  int64_t panel = std::max<int64_t>(2, kKPanelBytes / row_bytes / 2 * 2);
  panel = std::min(panel, (a.N + 1) / 2 * 2);
  const int64_t npanels = (a.N + panel - 1) / panel;
  const int64_t mchunks = (a.M + kKGemmMc - 1) / kKGemmMc;
  parallel_dynamic(npanels * mchunks, [&](int64_t t) {
    const int64_t p = t / mchunks, c = t % mchunks;
    const int64_t n0 = p * panel, n1 = std::min(a.N, n0 + panel);
    const int64_t m_end = std::min(a.M, (c + 1) * kKGemmMc);
    for (int64_t m = c * kKGemmMc; m < m_end; m += kKM)
      rows_x_ktile<Kern, F>(a, x, 2, static_cast<int>(std::min<int64_t>(kKM, m_end - m)), m, n0, n1);
  });
}

// Portable path, many rows, x8: as kgemm, over panels of groups (the tail rows: plain tiles).
template <class Kern, KFormat F>
void kgemm_x8(const KArgs& a, const KActs& x) {
  const int64_t group_bytes = 8 * (a.K / kSuper) * KTraits<F>::kBytes, groups = a.N / 8;
  const int64_t panel = std::max<int64_t>(1, kKPanelBytes / group_bytes);
  const int64_t npanels = (groups + panel - 1) / panel + (a.N % 8 ? 1 : 0);
  const int64_t mchunks = (a.M + kKGemmMc - 1) / kKGemmMc;
  parallel_dynamic(npanels * mchunks, [&](int64_t t) {
    const int64_t p = t / mchunks, c = t % mchunks;
    const int64_t g0 = p * panel, g1 = std::min(groups, g0 + panel);
    const int64_t m_end = std::min(a.M, (c + 1) * kKGemmMc);
    for (int64_t m = c * kKGemmMc; m < m_end; m += kKM) {
      const int Mt = static_cast<int>(std::min<int64_t>(kKM, m_end - m));
      if (g0 >= groups) {
        rows_x_ktile<Kern, F>(a, x, 2, Mt, m, 8 * groups, a.N);
      } else {
        kx8_groups<Kern, F>(Mt, a.w, group_bytes, g0, g1, x, m, a.out + m * a.N, a.N);
        add_bias(a, m, Mt, 8 * g0, 8 * g1);
      }
    }
  });
}

// SIMD path, many rows: each task packs its panel of 8-row groups once, then 4-row tiles of x pass
// over it.
template <class Kern, KFormat F>
void kgemm_packed(const KArgs& a, const KActs& x) {
  const int64_t nsb = a.K / kSuper, w_ld = nsb * KTraits<F>::kBytes;
  const int64_t gs = nsb * Kern::template pack_bytes<F>();
  const int64_t total_groups = (a.N + 7) / 8;
  const int64_t threads = at::get_num_threads();
  const int64_t groups = std::min(total_groups, std::max<int64_t>(1, kKPackedPanelBytes / gs));
  const int64_t npanels = (total_groups + groups - 1) / groups;
  // split M only when there are too few panels to share among the threads (each split packs again)
  int64_t mchunks = npanels >= 2 * threads ? 1 : std::min((a.M + 15) / 16, (2 * threads + npanels - 1) / npanels);
  const int64_t mc = ((a.M + mchunks - 1) / mchunks + 3) / 4 * 4;
  mchunks = (a.M + mc - 1) / mc;
  parallel_workers(npanels * mchunks, [&](TaskQueue& queue) {
    AlignedBytes pk(groups * gs);
    AlignedBytes scratch(a.x8 ? 8 * w_ld : 0);  // an x8 group back in rows, for pack_group
    alignas(32) float res[kKM * 8];
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t p = t / mchunks, c = t % mchunks;
      const int64_t g0 = p * groups, ng = std::min(groups, total_groups - g0), n0 = g0 * 8;
      if (a.x8)
        kpack_rows_x8<Kern, F>(a.w + n0 * w_ld, w_ld, std::min(a.N - n0, ng * 8), nsb, pk.p, scratch.p);
      else
        kpack_rows<Kern, F>(a.w + n0 * w_ld, w_ld, std::min(a.N - n0, ng * 8), nsb, pk.p);
      const int64_t m_end = std::min(a.M, (c + 1) * mc);
      for (int64_t m = c * mc; m < m_end; m += kKM) {
        const int M = static_cast<int>(std::min<int64_t>(kKM, m_end - m));
        for (int64_t g = 0; g < ng; ++g) {
          kpanel_m<Kern, F>(M, pk.p + g * gs, x, m, res, 8);
          const int64_t nlo = n0 + g * 8, cols = std::min<int64_t>(8, a.N - nlo);
          for (int i = 0; i < M; ++i) {
            float* o = a.out + (m + i) * a.N + nlo;
            for (int64_t col = 0; col < cols; ++col) o[col] = res[i * 8 + col] + (a.bias ? a.bias[nlo + col] : 0.f);
          }
        }
      }
    }
  });
}

template <class Kern, KFormat F>
void krun(const KArgs& a, const KActs& x) {
  if (a.M <= kKM) return a.x8 ? kgemv_x8<Kern, F>(a, x) : kgemv<Kern, F>(a, x);
  if constexpr (Kern::kPacked)
    return kgemm_packed<Kern, F>(a, x);
  else
    return a.x8 ? kgemm_x8<Kern, F>(a, x) : kgemm<Kern, F>(a, x);
}

template <class Kern>
void run_kern_k(KFormat f, const at::Tensor& x, const KArgs& a) {
  KActs act(a.M, a.K);
  const int64_t ldx = a.M <= 1 ? a.K : x.stride(0);
  LFMK_DISPATCH_FLOAT(x.scalar_type(), "linear_kquant", [&] { quantize_rows_k<Kern>(cptr<scalar_t>(x), ldx, a.M, act); });
  switch (f) {
    case KFormat::Q4_K: return krun<Kern, KFormat::Q4_K>(a, act);
    case KFormat::Q5_K: return krun<Kern, KFormat::Q5_K>(a, act);
    case KFormat::Q6_K: return krun<Kern, KFormat::Q6_K>(a, act);
  }
}

// Shapes and dtypes were validated in Python (lfm_kernels/quant.py); these checks guard the memory
// safety of a direct call.
at::Tensor linear_kquant_any(const char* op, bool x8, const at::Tensor& x_in, const at::Tensor& qweight,
                             c10::string_view format, int64_t N, int64_t K, const std::optional<at::Tensor>& bias) {
  KFormat f{};
  TORCH_CHECK_VALUE(parse_kformat(std::string(format), &f), op, ": format must be 'q4_k', 'q5_k' or 'q6_k', got '",
                    format, "'");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) == K, op, ": x must be [M, K=", K, "], got ", x_in.sizes());
  TORCH_CHECK_VALUE(K > 0 && K % kSuper == 0, op, ": K must be a positive multiple of 256 for ", format,
                    ", got ", K);
  TORCH_CHECK_VALUE(N > 0, op, ": N must be positive, got ", N);
  const auto xdt = x_in.scalar_type();
  TORCH_CHECK_VALUE(xdt == at::kFloat || xdt == at::kBFloat16 || xdt == at::kHalf,
                    op, ": x must be float32, bfloat16 or float16, got ", xdt);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte, op, ": qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.numel() == N * (K / kSuper) * kblock_bytes(f), op, ": qweight must hold ",
                    N * (K / kSuper) * kblock_bytes(f), " bytes (", format, " blocks of [", N, ", ", K, "]), got ",
                    qweight.numel());
  const int64_t M = x_in.size(0);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor w = qweight.contiguous();
  auto out = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->numel() == N, op, ": bias must be [N=", N, "], got ", bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous().reshape({N});
  }
  // fp32 results straight into out, or into a buffer rounded to x's dtype after
  at::Tensor out_f = xdt == at::kFloat ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
  KArgs a{};
  a.w = w.const_data_ptr<uint8_t>();
  a.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  a.out = out_f.mutable_data_ptr<float>();
  a.M = M;
  a.N = N;
  a.K = K;
  a.x8 = x8;
  with_kquant_kern([&](auto kern) { run_kern_k<decltype(kern)>(f, x, a); });
  if (xdt != at::kFloat) store_fp32_as(out_f.const_data_ptr<float>(), out);
  return out;
}

at::Tensor linear_kquant_cpu(const at::Tensor& x, const at::Tensor& qweight, c10::string_view format, int64_t N,
                             int64_t K, const std::optional<at::Tensor>& bias) {
  return linear_kquant_any("linear_kquant", false, x, qweight, format, N, K, bias);
}

at::Tensor linear_kquant_x8_cpu(const at::Tensor& x, const at::Tensor& qweight, c10::string_view format, int64_t N,
                                int64_t K, const std::optional<at::Tensor>& bias) {
  return linear_kquant_any("linear_kquant_x8", true, x, qweight, format, N, K, bias);
}

// data: mats stacked [N, K] matrices in `format` blocks, in the other layout -> the same bytes in
// layout `to` ("rows" or "x8", quant/kquant_x8.h), a new tensor of data's shape.
at::Tensor kquant_relayout_cpu(const at::Tensor& data, c10::string_view format, int64_t mats, int64_t N, int64_t K,
                               c10::string_view to) {
  KFormat f{};
  TORCH_CHECK_VALUE(parse_kformat(std::string(format), &f), "kquant_relayout: format must be 'q4_k', 'q5_k' or 'q6_k', got '",
                    format, "'");
  TORCH_CHECK_VALUE(to == "x8" || to == "rows", "kquant_relayout: to must be 'x8' or 'rows', got '", to, "'");
  TORCH_CHECK_VALUE(K > 0 && K % kSuper == 0, "kquant_relayout: K must be a positive multiple of 256, got ", K);
  TORCH_CHECK_VALUE(N > 0 && mats > 0, "kquant_relayout: mats and N must be positive, got ", mats, " and ", N);
  const int64_t nsb = K / kSuper, bytes = mats * N * nsb * kblock_bytes(f);
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte && data.numel() == bytes, "kquant_relayout: data must be uint8 holding ",
                    bytes, " bytes, got ", data.scalar_type(), " with ", data.numel());
  const at::Tensor src = data.contiguous();
  at::Tensor dst = at::empty_like(src, at::MemoryFormat::Contiguous);
  const uint8_t* s = src.const_data_ptr<uint8_t>();
  uint8_t* d = dst.mutable_data_ptr<uint8_t>();
  const bool to_x8 = to == "x8";
  switch (f) {
    case KFormat::Q4_K: kx8_relayout<KFormat::Q4_K>(s, d, mats, N, nsb, to_x8); break;
    case KFormat::Q5_K: kx8_relayout<KFormat::Q5_K>(s, d, mats, N, nsb, to_x8); break;
    case KFormat::Q6_K: kx8_relayout<KFormat::Q6_K>(s, d, mats, N, nsb, to_x8); break;
  }
  return dst;
}

}  // namespace
}  // namespace quant
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("linear_kquant(Tensor x, Tensor qweight, str format, int N, int K, Tensor? bias) -> Tensor");
  m.def("linear_kquant_x8(Tensor x, Tensor qweight, str format, int N, int K, Tensor? bias) -> Tensor");
  m.def("kquant_relayout(Tensor data, str format, int mats, int N, int K, str to) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("linear_kquant", &lfmk::quant::linear_kquant_cpu);
  m.impl("linear_kquant_x8", &lfmk::quant::linear_kquant_x8_cpu);
  m.impl("kquant_relayout", &lfmk::quant::kquant_relayout_cpu);
}
