// out[M, N] = x[M, K] @ dequant(W)[N, K]^T (+ bias) for W in GGUF Q8_0 / Q4_0 blocks, with x
// quantized per 32-block to int8 (see quant/quant.h): integer dot products per block, fp32 across.
//
// x is quantized once (rows in parallel); then, because the bottleneck differs:
//  * Few rows (decode, M <= kGemvMaxRows): a stream over the weight's bytes, each used M times.
//    Threads claim chunks of output rows N (a few hundred KiB of blocks each) from a shared counter.
//  * Many rows (prefill): panels of weight rows small enough to stay in L2 are reused by every
//    4-row tile of the quantized x (which stays in L1 across the panel); threads claim
//    (panel, chunk of M) tasks.
//    On the SIMD paths the panel is first repacked (8 rows interleaved per 32-bit lane, see
//    quant/avx2.h) so that one broadcast of x feeds eight rows and no horizontal sums are needed;
//    the portable path runs the plain tiles.
// Every output element is one fixed-order sum over K, so the result does not depend on the thread
// count or on the row's position in the batch (bits equal); a row run alone (GEMV) and the same row
// in a prefill batch (GEMM) sum in different orders on the SIMD paths (fp32 rounding apart).
#include "common.h"

#include <new>
#include <string>
#include <vector>

#include "quant/quant.h"
#include "quant/portable.h"

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
#include "quant/avx2.h"
LFMK_AVX2_END

#include "quant/vnni_paths.h"

namespace lfmk {
namespace quant {
namespace {

constexpr int64_t kGemvMaxRows = 4;
constexpr int kGemmMr = 4;                   // activation rows per GEMM tile
constexpr int kGemmNr = 2;                   // weight rows per GEMM tile
constexpr int64_t kGemvTaskBytes = 256 << 10;  // weight bytes per decode task (at most)
constexpr int64_t kPanelBytes = 96 << 10;      // weight bytes per GEMM panel: stays in L2
constexpr int64_t kGemmMc = 64;              // activation rows per GEMM task

// ---- run-time ISA choice ----
enum class Isa : int { Portable = 0, Avx2 = 1, AvxVnni = 2, Avx512Vnni = 3 };
const char* const kIsaNames[] = {"portable", "avx2", "avxvnni", "avx512vnni"};

bool cpu_supports(Isa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::Portable: return true;
    case Isa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::AvxVnni: return cpu_supports(Isa::Avx2) && __builtin_cpu_supports("avxvnni");
    case Isa::Avx512Vnni:
      return cpu_supports(Isa::Avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }
#endif
  return isa == Isa::Portable;
}

// -1: choose the best the CPU has; otherwise the path the tests pinned (one the CPU supports).
std::atomic<int> g_pinned_isa{-1};

Isa current_isa() {
  if (!cpu_has_avx2()) return Isa::Portable;  // no AVX2, or the portable path is forced
  const int pinned = g_pinned_isa.load(std::memory_order_relaxed);
  if (pinned >= 0) return static_cast<Isa>(pinned);
  static const Isa best = cpu_supports(Isa::Avx512Vnni) ? Isa::Avx512Vnni
                          : cpu_supports(Isa::AvxVnni)  ? Isa::AvxVnni
                                                        : Isa::Avx2;
  return best;
}

// ---- one entry point per ISA: activation quantization and the tiles ----
struct PortableKernels {
  static constexpr bool kPacked = false;  // many rows: the plain tiles (no packed panels)
  template <typename T>
  static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) { portable::quantize_act_row(x, K, q, d); }
  template <Format F, int R, int M>
  static void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                   int64_t nb, float* res) {
    portable::tile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);
  }
};

}  // namespace
}  // namespace quant
}  // namespace lfmk

LFMK_AVX2_BEGIN
namespace lfmk {
namespace quant {
namespace {
struct Avx2Kernels {
  static constexpr bool kPacked = true;
  template <Format F>
  static void pack_group(const uint8_t* w, int64_t w_ld, int rows, int64_t nb, uint8_t* dst) {
    avx2::pack_group<F>(w, w_ld, rows, nb, dst);
  }
  template <Format F, int G, int M>
  static void panel_tile(const uint8_t* pk, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                         int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr) {
    avx2::panel_tile<F, G, M>(pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr);
  }
  template <typename T>
  static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) { avx2::quantize_act_row(x, K, q, d); }
  template <Format F, int R, int M>
  static void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                   int64_t nb, float* res) {
    avx2::tile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);
  }
};
}  // namespace
}  // namespace quant
}  // namespace lfmk
LFMK_AVX2_END

#define LFMK_QVNNI_KERNELS(Name, ns)                                                                           \
  namespace lfmk {                                                                                             \
  namespace quant {                                                                                            \
  namespace {                                                                                                  \
  struct Name {                                                                                                \
    static constexpr bool kPacked = true;                                                                      \
    template <Format F>                                                                                        \
    static void pack_group(const uint8_t* w, int64_t w_ld, int rows, int64_t nb, uint8_t* dst) {               \
      avx2::pack_group<F>(w, w_ld, rows, nb, dst);                                                             \
    }                                                                                                          \
    template <Format F, int G, int M>                                                                          \
    static void panel_tile(const uint8_t* pk, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq,          \
                           const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res,          \
                           int64_t ldr) {                                                                      \
      ns::panel_tile<F, G, M>(pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr);                               \
    }                                                                                                          \
    template <typename T>                                                                                      \
    static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) { avx2::quantize_act_row(x, K, q, d); } \
    template <Format F, int R, int M>                                                                          \
    static void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd,          \
                     int64_t ldd, int64_t nb, float* res) {                                                    \
      ns::tile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);                                                   \
    }                                                                                                          \
  };                                                                                                           \
  }                                                                                                            \
  }                                                                                                            \
  }

LFMK_QVNNI_BEGIN("avx2,fma,f16c,avxvnni")
LFMK_QVNNI_KERNELS(AvxVnniKernels, avxvnni)
LFMK_QVNNI_END
LFMK_QVNNI_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
LFMK_QVNNI_KERNELS(Avx512VnniKernels, avx512vnni)
LFMK_QVNNI_END

namespace lfmk {
namespace quant {
namespace {

// The kernels after activation quantization are independent of x's dtype: they write fp32.
struct Args {
  const uint8_t* w;
  const float* bias;  // [N] fp32 or null
  float* out;         // [M, N] contiguous
  int64_t M, N, K;
};

// Quantizes x's rows into q [M, K] and d [M, K / 32].
template <class Kern, typename TX>
void quantize_rows(const TX* x, int64_t ldx, int64_t M, int64_t K, int8_t* q, float* d) {
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / K);
  parallel_for(M, grain, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) Kern::quantize_row(x + m * ldx, K, q + m * K, d + m * (K / kBlock));
  });
}

// Stores tile results res[r * M + m] (+ bias) to out[m0 + m][n0 + r].
template <int R, int M>
inline void store_tile(const float* res, const float* bias, float* out, int64_t N, int64_t m0, int64_t n0) {
  for (int r = 0; r < R; ++r) {
    const float b = bias ? bias[n0 + r] : 0.f;
    for (int m = 0; m < M; ++m) out[(m0 + m) * N + n0 + r] = res[r * M + m] + b;
  }
}

// Weight rows [n0, n1) against activation rows [m0, m0 + M), R rows at a time, then single rows.
template <class Kern, Format F, int R, int M>
inline void rows_x_tile(const Args& a, const int8_t* xq, const float* xd, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t nb = a.K / kBlock, w_ld = nb * Traits<F>::kBytes;
  float res[R * M];
  float* out = a.out;
  int64_t n = n0;
  for (; n + R <= n1; n += R) {
    Kern::template tile<F, R, M>(a.w + n * w_ld, w_ld, xq + m0 * a.K, a.K, xd + m0 * nb, nb, nb, res);
    store_tile<R, M>(res, a.bias, out, a.N, m0, n);
  }
  for (; n < n1; ++n) {
    Kern::template tile<F, 1, M>(a.w + n * w_ld, w_ld, xq + m0 * a.K, a.K, xd + m0 * nb, nb, nb, res);
    store_tile<1, M>(res, a.bias, out, a.N, m0, n);
  }
}

template <class Kern, Format F, int M>
void gemv(const Args& a, const int8_t* xq, const float* xd) {
  constexpr int R = M == 1 ? 4 : 2;  // R * M accumulators + 2R weight vectors fit the 16 registers
  const int64_t row_bytes = a.K / kBlock * Traits<F>::kBytes;
  const int64_t threads = at::get_num_threads();
  // at least 4 tasks per thread (a descheduled thread holds up little), at most kGemvTaskBytes each
  int64_t rows = std::min((a.N + 4 * threads - 1) / (4 * threads), std::max<int64_t>(1, kGemvTaskBytes / row_bytes));
  rows = std::max<int64_t>(R, (rows + R - 1) / R * R);
  const int64_t tasks = (a.N + rows - 1) / rows;
  parallel_dynamic(tasks, [&](int64_t t) {
    const int64_t n0 = t * rows, n1 = std::min(a.N, n0 + rows);
    rows_x_tile<Kern, F, R, M>(a, xq, xd, 0, n0, n1);
  });
}

template <class Kern, Format F>
void gemm(const Args& a, const int8_t* xq, const float* xd) {
  const int64_t row_bytes = a.K / kBlock * Traits<F>::kBytes;
  int64_t panel = std::max<int64_t>(kGemmNr, kPanelBytes / row_bytes / kGemmNr * kGemmNr);
  panel = std::min(panel, (a.N + kGemmNr - 1) / kGemmNr * kGemmNr);
  const int64_t npanels = (a.N + panel - 1) / panel;
  const int64_t mchunks = (a.M + kGemmMc - 1) / kGemmMc;
  parallel_dynamic(npanels * mchunks, [&](int64_t t) {
    const int64_t p = t / mchunks, c = t % mchunks;
    const int64_t n0 = p * panel, n1 = std::min(a.N, n0 + panel);
    const int64_t m_end = std::min(a.M, (c + 1) * kGemmMc);
    int64_t m = c * kGemmMc;
    for (; m + kGemmMr <= m_end; m += kGemmMr) rows_x_tile<Kern, F, kGemmNr, kGemmMr>(a, xq, xd, m, n0, n1);
    switch (m_end - m) {
      case 3: rows_x_tile<Kern, F, kGemmNr, 3>(a, xq, xd, m, n0, n1); break;
      case 2: rows_x_tile<Kern, F, kGemmNr, 2>(a, xq, xd, m, n0, n1); break;
      case 1: rows_x_tile<Kern, F, kGemmNr, 1>(a, xq, xd, m, n0, n1); break;
      default: break;
    }
  });
  static_assert(kGemmMr == 4, "the M tail switch covers 1..kGemmMr-1 rows");
}

// 8-row groups per packed panel: the panel (packed: 36 bytes per 32 weights) stays in L2.
constexpr int64_t kPackedPanelBytes = 160 << 10;

// Activation rows [m0, m0 + M) against a packed panel of `groups` 8-row groups, two groups at a time.
template <class Kern, Format F, int M>
inline void panel_rows(const Args& a, const uint8_t* pk, int64_t gstride, int64_t groups, int64_t n0,
                       const int8_t* xq, const float* xd, const int32_t* xs8, int64_t m0) {
  const int64_t nb = a.K / kBlock;
  alignas(32) float res[M * 16];
  for (int64_t g = 0; g < groups; g += 2) {
    const int gg = groups - g >= 2 ? 2 : 1;
    const uint8_t* p = pk + g * gstride;
    const int8_t* xm = xq + m0 * a.K;
    if (gg == 2)
      Kern::template panel_tile<F, 2, M>(p, gstride, nb, xm, a.K, xd + m0 * nb, nb, xs8 + m0 * nb, nb, res, 16);
    else
      Kern::template panel_tile<F, 1, M>(p, gstride, nb, xm, a.K, xd + m0 * nb, nb, xs8 + m0 * nb, nb, res, 16);
    const int64_t nlo = n0 + g * 8, cols = std::min<int64_t>(8 * gg, a.N - nlo);
    for (int m = 0; m < M; ++m) {
      float* o = a.out + (m0 + m) * a.N + nlo;
      for (int64_t c = 0; c < cols; ++c) o[c] = res[m * 16 + c] + (a.bias ? a.bias[nlo + c] : 0.f);
    }
  }
}

template <class Kern, Format F>
void gemm_packed(const Args& a, const int8_t* xq, const float* xd) {
  const int64_t nb = a.K / kBlock;
  // 8 * sum of each activation block's q: Q4_0's -8 offset, taken off per block
  std::vector<int32_t> xs8(static_cast<size_t>(a.M * nb), 0);
  if (F == Format::Q4_0)
    for (int64_t i = 0; i < a.M * nb; ++i) {
      int32_t s = 0;
      for (int j = 0; j < kBlock; ++j) s += xq[i * kBlock + j];
      xs8[i] = 8 * s;
    }
  const int64_t gstride = nb * avx2::kPackedBlockBytes;
  const int64_t total_groups = (a.N + 7) / 8;
  const int64_t threads = at::get_num_threads();
  int64_t groups = std::max<int64_t>(2, kPackedPanelBytes / gstride / 2 * 2);
  groups = std::min(groups, total_groups);
  const int64_t npanels = (total_groups + groups - 1) / groups;
  // split M only when there are too few panels to share among the threads
  int64_t mchunks = npanels >= 2 * threads ? 1 : std::min((a.M + 15) / 16, (2 * threads + npanels - 1) / npanels);
  const int64_t mc = ((a.M + mchunks - 1) / mchunks + 3) / 4 * 4;
  mchunks = (a.M + mc - 1) / mc;
  const int64_t w_ld = nb * Traits<F>::kBytes;
  parallel_workers(npanels * mchunks, [&](TaskQueue& queue) {
    uint8_t* pk = static_cast<uint8_t*>(::operator new(static_cast<size_t>(groups * gstride), std::align_val_t(64)));
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t p = t / mchunks, c = t % mchunks;
      const int64_t g0 = p * groups, ng = std::min(groups, total_groups - g0), n0 = g0 * 8;
      for (int64_t g = 0; g < ng; ++g) {
        const int64_t r0 = n0 + g * 8;
        Kern::template pack_group<F>(a.w + r0 * w_ld, w_ld, static_cast<int>(std::min<int64_t>(8, a.N - r0)), nb,
                                     pk + g * gstride);
      }
      const int64_t m_end = std::min(a.M, (c + 1) * mc);
      int64_t m = c * mc;
      for (; m + 4 <= m_end; m += 4) panel_rows<Kern, F, 4>(a, pk, gstride, ng, n0, xq, xd, xs8.data(), m);
      switch (m_end - m) {
        case 3: panel_rows<Kern, F, 3>(a, pk, gstride, ng, n0, xq, xd, xs8.data(), m); break;
        case 2: panel_rows<Kern, F, 2>(a, pk, gstride, ng, n0, xq, xd, xs8.data(), m); break;
        case 1: panel_rows<Kern, F, 1>(a, pk, gstride, ng, n0, xq, xd, xs8.data(), m); break;
        default: break;
      }
    }
    ::operator delete(pk, std::align_val_t(64));
  });
}

template <class Kern, Format F>
void run(const Args& a, const int8_t* xq, const float* xd) {
  switch (a.M) {
    case 1: return gemv<Kern, F, 1>(a, xq, xd);
    case 2: return gemv<Kern, F, 2>(a, xq, xd);
    case 3: return gemv<Kern, F, 3>(a, xq, xd);
    case 4: return gemv<Kern, F, 4>(a, xq, xd);
    default:
      if constexpr (Kern::kPacked)
        return gemm_packed<Kern, F>(a, xq, xd);
      else
        return gemm<Kern, F>(a, xq, xd);
  }
}
static_assert(kGemvMaxRows == 4, "run's switch covers M = 1..kGemvMaxRows");

template <class Kern>
void run_kern(Format f, const at::Tensor& x, const Args& a) {
  const int64_t nb = a.K / kBlock;
  std::vector<int8_t> xq(static_cast<size_t>(a.M * a.K));
  std::vector<float> xd(static_cast<size_t>(a.M * nb));
  const int64_t ldx = a.M <= 1 ? a.K : x.stride(0);
  LFMK_DISPATCH_FLOAT(x.scalar_type(), "linear_quant", [&] {
    quantize_rows<Kern>(cptr<scalar_t>(x), ldx, a.M, a.K, xq.data(), xd.data());
  });
  if (f == Format::Q8_0)
    run<Kern, Format::Q8_0>(a, xq.data(), xd.data());
  else
    run<Kern, Format::Q4_0>(a, xq.data(), xd.data());
}

void run_isa(Format f, const at::Tensor& x, const Args& a) {
  switch (current_isa()) {
    case Isa::Avx512Vnni: return run_kern<Avx512VnniKernels>(f, x, a);
    case Isa::AvxVnni: return run_kern<AvxVnniKernels>(f, x, a);
    case Isa::Avx2: return run_kern<Avx2Kernels>(f, x, a);
    case Isa::Portable: return run_kern<PortableKernels>(f, x, a);
  }
}

Format parse_format(const std::string& s, const char* op) {
  if (s == "q8_0") return Format::Q8_0;
  if (s == "q4_0") return Format::Q4_0;
  TORCH_CHECK_VALUE(false, op, ": format must be 'q8_0' or 'q4_0' (K-quants: linear_kquant), got '", s, "'");
}

// Shapes and dtypes were validated in Python (lfm_kernels/ops/linear.py); these checks guard the
// memory safety of a direct call.
at::Tensor linear_quant_cpu(const at::Tensor& x_in, const at::Tensor& qweight, c10::string_view format, int64_t N,
                            int64_t K, const std::optional<at::Tensor>& bias) {
  const Format f = parse_format(std::string(format), "linear_quant");
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) == K, "linear_quant: x must be [M, K=", K, "], got ", x_in.sizes());
  TORCH_CHECK_VALUE(K > 0 && K % kBlock == 0, "linear_quant: K must be a positive multiple of 32, got ", K);
  TORCH_CHECK_VALUE(N > 0, "linear_quant: N must be positive, got ", N);
  const auto xdt = x_in.scalar_type();
  TORCH_CHECK_VALUE(xdt == at::kFloat || xdt == at::kBFloat16 || xdt == at::kHalf,
                    "linear_quant: x must be float32, bfloat16 or float16, got ", xdt);
  TORCH_CHECK_VALUE(qweight.scalar_type() == at::kByte, "linear_quant: qweight must be uint8, got ", qweight.scalar_type());
  TORCH_CHECK_VALUE(qweight.numel() == N * (K / kBlock) * block_bytes(f), "linear_quant: qweight must hold ",
                    N * (K / kBlock) * block_bytes(f), " bytes (", format, " blocks of [", N, ", ", K, "]), got ",
                    qweight.numel());
  const int64_t M = x_in.size(0);
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const at::Tensor w = qweight.contiguous();
  auto out = at::empty({M, N}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (M == 0) return out;
  at::Tensor bias_f;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->numel() == N, "linear_quant: bias must be [N=", N, "], got ", bias->sizes());
    bias_f = bias->to(at::kFloat).contiguous().reshape({N});
  }
  // fp32 results straight into out, or into a buffer rounded to x's dtype after (M x N: small
  // next to the weight)
  at::Tensor out_f = xdt == at::kFloat ? out : at::empty({M, N}, x.options().dtype(at::kFloat));
  Args a{};
  a.w = w.const_data_ptr<uint8_t>();
  a.bias = bias_f.defined() ? bias_f.const_data_ptr<float>() : nullptr;
  a.out = out_f.mutable_data_ptr<float>();
  a.M = M;
  a.N = N;
  a.K = K;
  run_isa(f, x, a);
  if (xdt != at::kFloat) store_fp32_as(out_f.const_data_ptr<float>(), out);
  return out;
}

// x [M, K] -> (q int8 [M, K], d float32 [M, K / 32]): the activation quantization the kernels use.
std::tuple<at::Tensor, at::Tensor> quantize_activations_cpu(const at::Tensor& x_in) {
  TORCH_CHECK_VALUE(x_in.dim() == 2 && x_in.size(1) % kBlock == 0,
                    "quantize_activations: x must be [M, K] with K a multiple of 32, got ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto d = at::empty({M, K / kBlock}, x.options().dtype(at::kFloat));
  if (M == 0 || K == 0) return {q, d};
  LFMK_DISPATCH_FLOAT(x.scalar_type(), "quantize_activations", [&] {
    const auto* xp = cptr<scalar_t>(x);
    int8_t* qp = mptr<int8_t>(q);
    float* dp = mptr<float>(d);
    switch (current_isa()) {
      case Isa::Avx512Vnni: return quantize_rows<Avx512VnniKernels>(xp, K, M, K, qp, dp);
      case Isa::AvxVnni: return quantize_rows<AvxVnniKernels>(xp, K, M, K, qp, dp);
      case Isa::Avx2: return quantize_rows<Avx2Kernels>(xp, K, M, K, qp, dp);
      case Isa::Portable: return quantize_rows<PortableKernels>(xp, K, M, K, qp, dp);
    }
  });
  return {q, d};
}

// [the path the next call takes, then every path this CPU supports]
std::vector<std::string> isa_info() {
  std::vector<std::string> out{kIsaNames[static_cast<int>(current_isa())]};
  for (int i = 0; i < 4; ++i)
    if (cpu_supports(static_cast<Isa>(i))) out.emplace_back(kIsaNames[i]);
  return out;
}

// Pins the path ("" = the best the CPU has), for tests that check every path the CPU supports.
void pin_isa(c10::string_view name) {
  if (name.empty()) {
    g_pinned_isa.store(-1);
    return;
  }
  for (int i = 0; i < 4; ++i)
    if (name == kIsaNames[i]) {
      TORCH_CHECK_VALUE(cpu_supports(static_cast<Isa>(i)), "_quant_pin_isa: this CPU does not support ", name);
      g_pinned_isa.store(i);
      return;
    }
  TORCH_CHECK_VALUE(false, "_quant_pin_isa: unknown path '", name, "' (portable, avx2, avxvnni, avx512vnni)");
}

}  // namespace

int active_isa() { return static_cast<int>(current_isa()); }

}  // namespace quant
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("linear_quant(Tensor x, Tensor qweight, str format, int N, int K, Tensor? bias) -> Tensor");
  m.def("quantize_activations(Tensor x) -> (Tensor, Tensor)");
  // no tensor arguments, so a catch-all kernel rather than a per-backend one
  m.def("_quant_isa_info() -> str[]", &lfmk::quant::isa_info);
  m.def("_quant_pin_isa(str name) -> ()", &lfmk::quant::pin_isa);
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("linear_quant", &lfmk::quant::linear_quant_cpu);
  m.impl("quantize_activations", &lfmk::quant::quantize_activations_cpu);
}
