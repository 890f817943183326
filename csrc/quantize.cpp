// quantize_rows(rows [R, K] fp32 / bf16 / fp16, format) -> uint8 [R, K / block * block_bytes]:
// float weights to GGUF blocks (q8_0, q4_0, q4_k, q5_k, q6_k), rows in parallel. The block
// quantizers (quant/quantize_blocks.h) give the bytes of lfm_kernels.quantize's Python references,
// so the result does not depend on the thread count. Plain C++: the K-quant search is a chain of
// dependent fp32 sums whose order fixes the bytes, so it is not vectorised within a block.
//
// A NaN or infinite weight raises ValueError naming its row and column, before any row is returned.
#include "common.h"

#include <atomic>
#include <limits>
#include <string>

#include "quant/quantize_blocks.h"

namespace lfmk {
namespace quant {
namespace {

enum class QFormat : int { Q8_0, Q4_0, Q4_K, Q5_K, Q6_K };

struct FormatInfo {
  const char* name;
  QFormat fmt;
  int block;  // weights per block
  int bytes;  // bytes per block
};

constexpr FormatInfo kFormats[] = {
    {"q8_0", QFormat::Q8_0, kBlock, Traits<Format::Q8_0>::kBytes},
    {"q4_0", QFormat::Q4_0, kBlock, Traits<Format::Q4_0>::kBytes},
    {"q4_k", QFormat::Q4_K, kSuper, KTraits<KFormat::Q4_K>::kBytes},
    {"q5_k", QFormat::Q5_K, kSuper, KTraits<KFormat::Q5_K>::kBytes},
    {"q6_k", QFormat::Q6_K, kSuper, KTraits<KFormat::Q6_K>::kBytes},
};

static inline bool finite_bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return (b & 0x7f800000u) != 0x7f800000u;
}

// Quantizes rows [r0, r1); returns the flat index (row * K + column) of the first non-finite weight
// met in those rows, or -1 (a row holding one is left unwritten).
template <typename T, QFormat F>
int64_t quantize_range(const T* x, int64_t K, uint8_t* out, int64_t row_bytes, int64_t r0, int64_t r1) {
  constexpr int kB = F == QFormat::Q8_0 || F == QFormat::Q4_0 ? kBlock : kSuper;
  float buf[kB];
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * K;
    uint8_t* o = out + r * row_bytes;
    for (int64_t b = 0; b < K / kB; ++b) {
      bool ok = true;
      for (int i = 0; i < kB; ++i) {
        buf[i] = to_f32(xr[b * kB + i]);
        ok &= finite_bits(buf[i]);
      }
      if (!ok) {
        for (int i = 0; i < kB; ++i)
          if (!finite_bits(buf[i])) return r * K + b * kB + i;
      }
      if constexpr (F == QFormat::Q8_0) {
        qz::quantize_block_q8_0(buf, o + b * Traits<Format::Q8_0>::kBytes);
      } else if constexpr (F == QFormat::Q4_0) {
        qz::quantize_block_q4_0(buf, o + b * Traits<Format::Q4_0>::kBytes);
      } else if constexpr (F == QFormat::Q4_K) {
        qz::quantize_block_q4_k(buf, o + b * KTraits<KFormat::Q4_K>::kBytes);
      } else if constexpr (F == QFormat::Q5_K) {
        qz::quantize_block_q5_k(buf, o + b * KTraits<KFormat::Q5_K>::kBytes);
      } else {
        qz::quantize_block_q6_k(buf, o + b * KTraits<KFormat::Q6_K>::kBytes);
      }
    }
  }
  return -1;
}

template <typename T>
int64_t quantize_all(const T* x, int64_t R, int64_t K, const FormatInfo& fi, uint8_t* out) {
  using Fn = int64_t (*)(const T*, int64_t, uint8_t*, int64_t, int64_t, int64_t);
  Fn fn = nullptr;
  switch (fi.fmt) {
    case QFormat::Q8_0: fn = &quantize_range<T, QFormat::Q8_0>; break;
    case QFormat::Q4_0: fn = &quantize_range<T, QFormat::Q4_0>; break;
    case QFormat::Q4_K: fn = &quantize_range<T, QFormat::Q4_K>; break;
    case QFormat::Q5_K: fn = &quantize_range<T, QFormat::Q5_K>; break;
    case QFormat::Q6_K: fn = &quantize_range<T, QFormat::Q6_K>; break;
  }
  const int64_t row_bytes = K / fi.block * fi.bytes;
  // a task of at least ~64K weights (Q8_0 / Q4_0) or ~4K (the far slower K-quant search)
  const int64_t min_weights = fi.block == kBlock ? (int64_t{1} << 16) : (int64_t{1} << 12);
  const int64_t grain = std::max<int64_t>(1, min_weights / K);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    const int64_t bad = fn(x, K, out, row_bytes, r0, r1);
    if (bad >= 0) {
      int64_t cur = first_bad.load();
      while (bad < cur && !first_bad.compare_exchange_weak(cur, bad)) {
      }
    }
  });
  const int64_t bad = first_bad.load();
  return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
}

at::Tensor quantize_rows_cpu(const at::Tensor& rows, c10::string_view format) {
  const FormatInfo* fi = nullptr;
  for (const auto& f : kFormats)
    if (format == f.name) fi = &f;
  TORCH_CHECK_VALUE(fi != nullptr, "quantize_rows: format must be one of q8_0, q4_0, q4_k, q5_k, q6_k, got '", format, "'");
  TORCH_CHECK_VALUE(rows.device().is_cpu(), "quantize_rows: rows must be a CPU tensor, got ", rows.device());
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kBFloat16 || rows.scalar_type() == at::kHalf,
                    "quantize_rows: rows must be float32, bfloat16 or float16, got ", rows.scalar_type());
  TORCH_CHECK_VALUE(rows.dim() == 2, "quantize_rows: rows must have shape [R, K], got ", rows.sizes());
  TORCH_CHECK_VALUE(rows.is_contiguous(), "quantize_rows: rows must be contiguous [R, K], got strides ", rows.strides());
  const int64_t R = rows.size(0), K = rows.size(1);
  TORCH_CHECK_VALUE(K > 0 && K % fi->block == 0, "quantize_rows: rows' K (last dimension) must be a positive multiple of ",
                    fi->block, " for ", fi->name, ", got rows of shape ", rows.sizes());
  auto out = at::empty({R, K / fi->block * fi->bytes}, rows.options().dtype(at::kByte));
  if (R == 0) return out;
  uint8_t* o = out.data_ptr<uint8_t>();
  int64_t bad = -1;
  switch (rows.scalar_type()) {
    case at::kFloat: bad = quantize_all(rows.data_ptr<float>(), R, K, *fi, o); break;
    case at::kBFloat16: bad = quantize_all(rows.data_ptr<c10::BFloat16>(), R, K, *fi, o); break;
    default: bad = quantize_all(rows.data_ptr<c10::Half>(), R, K, *fi, o); break;
  }
  if (bad >= 0) {
    const float v = rows.flatten()[bad].item<float>();
    TORCH_CHECK_VALUE(false, "quantize_rows: rows must be finite to quantize; it has ", v, " at row ", bad / K,
                      ", column ", bad % K);
  }
  return out;
}

}  // namespace
}  // namespace quant
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) { m.def("quantize_rows(Tensor rows, str format) -> Tensor"); }
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("quantize_rows", &lfmk::quant::quantize_rows_cpu); }
