// out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias) for W in Q8_0 / Q4_0 blocks in the x8 layout
// (quant/x8.h: rows interleaved in groups of 8), and the conversion between x8 and GGUF's rows.
//
// x is quantized per 32-block as for GGUF-layout weights (quant/quant.h; the same bits), then:
//  * Few rows (decode, M <= kX8GemvMaxRows): a stream over the weight's bytes, each used M times;
//    threads claim chunks of 8-row groups (at most kX8TaskBytes each, at least 4 chunks a thread).
//  * Many rows (prefill): panels of groups small enough to stay in L2, reused by every 4-row tile of
//    the quantized x; threads claim (panel, chunk of M) tasks. The layout is already the packed
//    panel's form, so nothing is repacked (Q4_0's nibbles unpack in the tile, amortised over x's rows).
// Every output element is one fixed-order sum over K of exact integer block dots (quant/x8.h), so
// the bits do not depend on the thread count, the row's position in the batch, M (a GEMV row equals
// the same row in a prefill batch) or the ISA path.
#include "common.h"

#include <string>
#include <vector>

#include "quant/quant.h"
#include "quant/portable.h"
#include "quant/x8.h"

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
#include "quant/avx2.h"
#include "quant/x8_avx2.h"
LFMK_AVX2_END

#include "quant/vnni_paths.h"

namespace lfmk {
namespace quant {
namespace {

constexpr int64_t kX8GemvMaxRows = 4;
// Weight bytes per decode task (at most). A task is one sequential stream, and its first tile still
// starts as the stream ramps up where the previous task was not the same thread's: measured on 2
// Zen 5 cores, Q8_0 / Q4_0 6144 x 2048 at one row from DRAM, share of the read probe, 256 KiB -> 1 MiB
// tasks (the next task prefetched in both): 90 / 87% -> 93 / 91% (probe ~53 GB/s), 75 / 72% -> 80 /
// 77% (probe ~83 GB/s); a whole Q4_0 decode step 73.0 -> 75.0% (~83 GB/s).
constexpr int64_t kX8TaskBytes = 1 << 20;
constexpr int64_t kX8PanelBytes = 128 << 10;  // weight bytes per prefill panel: stays in L2

struct X8Portable {
  template <typename T>
  static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) { portable::quantize_act_row(x, K, q, d); }
  template <Format F, int G, int M>
  static void tile(const uint8_t* w, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                   int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr, int64_t pf) {
    portable::x8_tile<F, G, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr, pf);
  }
};

}  // namespace
}  // namespace quant
}  // namespace lfmk

LFMK_AVX2_BEGIN
namespace lfmk {
namespace quant {
namespace {
struct X8Avx2 {
  template <typename T>
  static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) { avx2::quantize_act_row(x, K, q, d); }
  template <Format F, int G, int M>
  static void tile(const uint8_t* w, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                   int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr, int64_t pf) {
    avx2::x8_tile<F, G, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr, pf);
  }
};
}  // namespace
}  // namespace quant
}  // namespace lfmk
LFMK_AVX2_END

#define LFMK_X8_VNNI_KERNELS(Name, ns)                                                                         \
  namespace lfmk {                                                                                             \
  namespace quant {                                                                                            \
  namespace {                                                                                                  \
  struct Name {                                                                                                \
    template <typename T>                                                                                      \
    static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) { avx2::quantize_act_row(x, K, q, d); } \
    template <Format F, int G, int M>                                                                          \
    static void tile(const uint8_t* w, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd, \
                     int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr, int64_t pf) {      \
      ns::x8_tile<F, G, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr, pf);                               \
    }                                                                                                          \
  };                                                                                                           \
  }                                                                                                            \
  }                                                                                                            \
  }

LFMK_QVNNI_BEGIN("avx2,fma,f16c,avxvnni")
LFMK_X8_VNNI_KERNELS(X8AvxVnni, avxvnni)
LFMK_QVNNI_END
LFMK_QVNNI_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
LFMK_X8_VNNI_KERNELS(X8Avx512Vnni, avx512vnni)
LFMK_QVNNI_END
#undef LFMK_X8_VNNI_KERNELS

LFMK_AMX_BEGIN
#include "quant/amx.h"
LFMK_AMX_END

namespace lfmk {
namespace quant {
namespace {

struct X8Args {
  const uint8_t* w;
  const float* bias;  // [N] fp32 or null
  float* out;         // [M, N] contiguous
  int64_t M, N, K;
  const int8_t* xq;   // [M, K]
  const float* xd;    // [M, K / 32]
  const int32_t* xs8; // [M, K / 32]
  bool amx;           // the many-row product on AMX-INT8 tiles (cpu_has_amx())
};

// Groups [g0, g1) against activation rows [m0, m0 + M), G groups at a time, straight into out.
template <class Kern, Format F, int G, int M>
inline void groups_x_rows(const X8Args& a, int64_t g0, int64_t g1, int64_t m0, const uint8_t* wnext = nullptr) {
  const int64_t nb = a.K / kBlock, gs = nb * X8<F>::kGroupBlockBytes;
  const int8_t* xq = a.xq + m0 * a.K;
  const float* xd = a.xd + m0 * nb;
  const int32_t* xs8 = a.xs8 + m0 * nb;
  float* out = a.out + m0 * a.N;
  // each tile prefetches the next one's bytes; the last one those at wnext, where the thread's next
  // task starts, else its own stream's (common.h, tile_prefetch)
  int64_t g = g0;
  for (; g + G <= g1; g += G)
    Kern::template tile<F, G, M>(a.w + g * gs, gs, nb, xq, a.K, xd, nb, xs8, nb, out + 8 * g, a.N,
                                 tile_prefetch(g + G < g1, G * gs, a.w + g * gs, wnext));
  for (; g < g1; ++g)
    Kern::template tile<F, 1, M>(a.w + g * gs, gs, nb, xq, a.K, xd, nb, xs8, nb, out + 8 * g, a.N,
                                 tile_prefetch(g + 1 < g1, gs, a.w + g * gs, wnext));
  if (a.bias)
    for (int m = 0; m < M; ++m)
      for (int64_t n = 8 * g0; n < 8 * g1; ++n) out[m * a.N + n] += a.bias[n];
}

template <class Kern, Format F, int M, int G>
void x8_gemv_groups(const X8Args& a);

// Independent 8-row groups per tile: more streams in flight per core (see moe_tiles_quant.h), or one
// where the policy measured a single stream faster (common.h, x8_one_stream_max_rows).
template <class Kern, Format F, int M>
void x8_gemv(const X8Args& a) {
  constexpr int kG = M == 1 ? 4 : M == 2 ? 2 : 1;
  if (kG > 1 && M <= x8_one_stream_max_rows()) return x8_gemv_groups<Kern, F, M, 1>(a);
  x8_gemv_groups<Kern, F, M, kG>(a);
}

template <class Kern, Format F, int M, int G>
void x8_gemv_groups(const X8Args& a) {
  const int64_t group_bytes = 8 * (a.K / kBlock) * Traits<F>::kBytes;
  const int64_t groups = a.N / 8;
  const int64_t threads = at::get_num_threads();
  // at least 4 tasks per thread (a descheduled thread holds up little), at most kX8TaskBytes each
  int64_t per = std::min((groups + 4 * threads - 1) / (4 * threads), std::max<int64_t>(1, kX8TaskBytes / group_bytes));
  per = std::max<int64_t>(G, (per + G - 1) / G * G);
  const int64_t tasks = (groups + per - 1) / per;
  parallel_dynamic_ahead(tasks, [&](int64_t t, int64_t next) {
    const int64_t g0 = t * per, g1 = std::min(groups, g0 + per);
    groups_x_rows<Kern, F, G, M>(a, g0, g1, 0, next >= 0 ? a.w + next * per * group_bytes : nullptr);
  });
}

template <class Kern, Format F>
void x8_gemm(const X8Args& a) {
  const int64_t group_bytes = 8 * (a.K / kBlock) * Traits<F>::kBytes;
  const int64_t total = a.N / 8;
  const int64_t threads = at::get_num_threads();
  int64_t groups = std::max<int64_t>(2, kX8PanelBytes / group_bytes / 2 * 2);
  groups = std::min(groups, total);
  const int64_t npanels = (total + groups - 1) / groups;
  // split M only when there are too few panels to share among the threads
  int64_t mchunks = npanels >= 2 * threads ? 1 : std::min((a.M + 15) / 16, (2 * threads + npanels - 1) / npanels);
  const int64_t mc = ((a.M + mchunks - 1) / mchunks + 3) / 4 * 4;
  mchunks = (a.M + mc - 1) / mc;
  parallel_dynamic(npanels * mchunks, [&](int64_t t) {
    const int64_t p = t / mchunks, c = t % mchunks;
    const int64_t g0 = p * groups, g1 = std::min(total, g0 + groups);
    const int64_t m_end = std::min(a.M, (c + 1) * mc);
    int64_t m = c * mc;
    for (; m + 4 <= m_end; m += 4) groups_x_rows<Kern, F, 2, 4>(a, g0, g1, m);
    switch (m_end - m) {
      case 3: groups_x_rows<Kern, F, 2, 3>(a, g0, g1, m); break;
      case 2: groups_x_rows<Kern, F, 2, 2>(a, g0, g1, m); break;
      case 1: groups_x_rows<Kern, F, 2, 1>(a, g0, g1, m); break;
      default: break;
    }
  });
}

// Many rows on AMX: tasks of group pairs, each against all M rows (tiles of 16), the pair's B blocks
// packed once and kept in L1 / L2 across the row tiles.
template <Format F>
void x8_gemm_amx(const X8Args& a) {
  const int64_t nb = a.K / kBlock, gs = nb * X8<F>::kGroupBlockBytes;
  const int64_t total = a.N / 8, Mpad = (a.M + amx::kRows - 1) / amx::kRows * amx::kRows;
  std::vector<float> dxT(static_cast<size_t>(nb * Mpad));
  std::vector<int32_t> sT(static_cast<size_t>(nb * Mpad));
  amx::transpose_scales(a.xd, F == Format::Q4_0 ? a.xs8 : nullptr, nb, a.M, Mpad, nb, dxT.data(), sT.data());
  const amx::Acts acts{a.xq, a.K, dxT.data(), sT.data(), Mpad};
  const int64_t pairs = (total + 1) / 2;
  parallel_workers(pairs, [&](TaskQueue& queue) {
    AlignedBytes scratch(amx::b_scratch_bytes(nb));
    uint8_t* bs = scratch.p;
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t g = 2 * t;
      const int G = static_cast<int>(std::min<int64_t>(2, total - g));
      amx::x8_groups_amx<F>(G, a.w + g * gs, gs, nb, acts, a.M, bs, a.out + 8 * g, a.N);
      if (a.bias)
        for (int64_t m = 0; m < a.M; ++m)
          for (int64_t n = 8 * g; n < 8 * (g + G); ++n) a.out[m * a.N + n] += a.bias[n];
    }
  });
}

template <class Kern, Format F>
void x8_run(const X8Args& a) {
  if (a.amx) return x8_gemm_amx<F>(a);
  switch (a.M) {
    case 1: return x8_gemv<Kern, F, 1>(a);
    case 2: return x8_gemv<Kern, F, 2>(a);
    case 3: return x8_gemv<Kern, F, 3>(a);
    case 4: return x8_gemv<Kern, F, 4>(a);
    default: return x8_gemm<Kern, F>(a);
  }
}
static_assert(kX8GemvMaxRows == 4, "x8_run's switch covers M = 1..kX8GemvMaxRows");

template <class Kern>
void x8_run_kern(Format f, const at::Tensor& x, X8Args a) {
  const int64_t nb = a.K / kBlock;
  // the AMX tiles read activation rows in 16s: zero rows up to the next multiple of 16
  const int64_t rows = a.amx ? (a.M + amx::kRows - 1) / amx::kRows * amx::kRows : a.M;
  std::vector<int8_t> xq(static_cast<size_t>(rows * a.K));
  std::vector<float> xd(static_cast<size_t>(a.M * nb));
  std::vector<int32_t> xs8(static_cast<size_t>(a.M * nb));
  const int64_t ldx = a.M <= 1 ? a.K : x.stride(0);
  LFMK_DISPATCH_FLOAT(x.scalar_type(), "linear_quant_x8", [&] {
    const scalar_t* xp = cptr<scalar_t>(x);
    parallel_for(a.M, std::max<int64_t>(1, (1 << 16) / a.K), [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) {
        Kern::quantize_row(xp + m * ldx, a.K, xq.data() + m * a.K, xd.data() + m * nb);
        block_sums8_x8(xq.data() + m * a.K, nb, xs8.data() + m * nb);
      }
    });
  });
  a.xq = xq.data();
  a.xd = xd.data();
  a.xs8 = xs8.data();
  if (f == Format::Q8_0)
    x8_run<Kern, Format::Q8_0>(a);
  else
    x8_run<Kern, Format::Q4_0>(a);
}

Format x8_parse_format(c10::string_view s, const char* op) {
  if (s == "q8_0") return Format::Q8_0;
  if (s == "q4_0") return Format::Q4_0;
  TORCH_CHECK_VALUE(false, op, ": format must be 'q8_0' or 'q4_0' for the x8 layout, got '", s, "'");
}

// Shapes and dtypes were validated in Python (lfm_kernels/quant.py); these checks guard the memory
// safety of a direct call.
// amx_min_rows: from this many rows of x on, the product runs on AMX-INT8 tiles where the CPU has them
// (0: never); the same bits as the other paths.
at::Tensor linear_quant_x8_cpu(const at::Tensor& x_in, const at::Tensor& qweight, c10::string_view format, int64_t N,
                               int64_t K, const std::optional<at::Tensor>& bias, int64_t amx_min_rows) {
  const Format f = x8_parse_format(format, "linear_quant_x8");
  TORCH_CHECK_VALUE(amx_min_rows >= 0, "linear_quant_x8: amx_min_rows must be >= 0 (0: never), got ", amx_min_rows);
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) == K, "linear_quant_x8: x must be [M, K=", K, "], got ", x_in.sizes());
  TORCH_CHECK_VALUE(K > 0 && K % kBlock == 0, "linear_quant_x8: K must be a positive multiple of 32, got ", K);
  TORCH_CHECK_VALUE(N > 0 && N % 8 == 0, "linear_quant_x8: N must be a positive multiple of 8, got ", N);
  const auto xdt = x_in.scalar_type();
  TORCH_CHECK_VALUE(xdt == at::kFloat || xdt == at::kBFloat16 || xdt == at::kHalf,
                    "linear_quant_x8: x must be float32, bfloat16 or float16, got ", xdt);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte, "linear_quant_x8: qweight must be uint8, got ",
                    qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.numel() == N * (K / kBlock) * block_bytes(f), "linear_quant_x8: qweight must hold ",
                    N * (K / kBlock) * block_bytes(f), " bytes (", format, " x8 blocks of [", N, ", ", K, "]), got ",
                    qweight.numel());
  const int64_t M = x_in.size(0);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor w = qweight.contiguous();
  auto out = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->numel() == N, "linear_quant_x8: bias must be [N=", N, "], got ", bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous().reshape({N});
  }
  at::Tensor out_f = xdt == at::kFloat ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
  X8Args a{};
  a.w = w.const_data_ptr<uint8_t>();
  a.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  a.out = out_f.mutable_data_ptr<float>();
  a.M = M;
  a.N = N;
  a.K = K;
  // the AMX tiles replace the integer tiles of the active path: they run where that path is not the
  // portable one (forced portable keeps everything portable)
  a.amx = amx_min_rows > 0 && M >= amx_min_rows && cpu_has_amx() && active_isa() > 0;
  switch (active_isa()) {
    case 3: x8_run_kern<X8Avx512Vnni>(f, x, a); break;
    case 2: x8_run_kern<X8AvxVnni>(f, x, a); break;
    case 1: x8_run_kern<X8Avx2>(f, x, a); break;
    default: x8_run_kern<X8Portable>(f, x, a); break;
  }
  if (xdt != at::kFloat) store_fp32_as(out_f.const_data_ptr<float>(), out);
  return out;
}

// data: `rows` weight rows (every stacked matrix's rows, each matrix's N a multiple of 8) of K in
// `format` blocks, in layout `from` -> the same bytes in layout `to` ("rows" or "x8"), a new tensor
// of data's shape.
at::Tensor quant_relayout_cpu(const at::Tensor& data, c10::string_view format, int64_t rows, int64_t K,
                              c10::string_view to) {
  const Format f = x8_parse_format(format, "quant_relayout");
  TORCH_CHECK_VALUE(to == "x8" || to == "rows", "quant_relayout: to must be 'x8' or 'rows', got '", to, "'");
  TORCH_CHECK_VALUE(K > 0 && K % kBlock == 0, "quant_relayout: K must be a positive multiple of 32, got ", K);
  TORCH_CHECK_VALUE(rows > 0 && rows % 8 == 0, "quant_relayout: rows must be a positive multiple of 8, got ", rows);
  const int64_t nb = K / kBlock, row_bytes = nb * block_bytes(f);
  TORCH_CHECK_VALUE(data.scalar_type() == at::kByte && data.numel() == rows * row_bytes,
                    "quant_relayout: data must be uint8 holding ", rows * row_bytes, " bytes, got ",
                    data.scalar_type(), " with ", data.numel());
  const at::Tensor src = data.contiguous();
  at::Tensor dst = at::empty_like(src, at::MemoryFormat::Contiguous);
  const uint8_t* s = src.const_data_ptr<uint8_t>();
  uint8_t* d = dst.mutable_data_ptr<uint8_t>();
  const int64_t group_bytes = 8 * row_bytes;
  const bool to_x8 = to == "x8";
  parallel_for(rows / 8, std::max<int64_t>(1, (1 << 20) / group_bytes), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* in = s + g * group_bytes;
      uint8_t* o = d + g * group_bytes;
      if (f == Format::Q8_0) {
        if (to_x8) rows_to_x8_group<Format::Q8_0>(in, row_bytes, nb, o);
        else x8_to_rows_group<Format::Q8_0>(in, nb, o, row_bytes);
      } else {
        if (to_x8) rows_to_x8_group<Format::Q4_0>(in, row_bytes, nb, o);
        else x8_to_rows_group<Format::Q4_0>(in, nb, o, row_bytes);
      }
    }
  });
  return dst;
}

}  // namespace
}  // namespace quant
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("linear_quant_x8(Tensor x, Tensor qweight, str format, int N, int K, Tensor? bias, int amx_min_rows=0) -> Tensor");
  m.def("quant_relayout(Tensor data, str format, int rows, int K, str to) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("linear_quant_x8", &lfmk::quant::linear_quant_x8_cpu);
  m.impl("quant_relayout", &lfmk::quant::quant_relayout_cpu);
}
