// RMSNorm as transformers' Lfm2RMSNorm computes it: normalise in fp32, round to x's dtype, then
// multiply by the weight in that dtype (one more rounding).
//
// Why an op for something this small: in eager PyTorch it is about ten dispatches (casts, pow, mean,
// rsqrt, mul, ...), ~120 us per call on a 2-core CPU, and a decode step of the full model makes 55 of
// them: about 7% of a Q4_0 step. Here a row of 2048 is a few microseconds.
//
// add_rms_norm fuses the residual add in front of each norm of the decode step (x + residual rounded
// to x's dtype, as the eager add does, then the same normalisation): one call instead of two.
//
// The one difference from the eager ops is the order of the fp32 sum of squares (eight interleaved
// partial sums here), so the mean can differ in its last bit; the result is deterministic and
// independent of the thread count (one row is never split).
#include <cmath>
#include <tuple>

#include "common.h"

namespace lfmk {
namespace {

template <typename T>
float inv_rms(const T* x, int64_t d, float eps) {
  float part[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= d; i += 8)
    for (int j = 0; j < 8; ++j) {
      const float v = to_f32(x[i + j]);
      part[j] += v * v;
    }
  for (int j = 0; i < d; ++i, ++j) {
    const float v = to_f32(x[i]);
    part[j] += v * v;
  }
  const float sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  return 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
}

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
namespace lfmk {
namespace {

// One row on AVX2: the portable row's operations in its order (lane j of the accumulator is its
// part[j]; multiply and add kept apart, as the portable code compiles them), so the same bits.
template <typename T>
void rms_norm_row_avx2(const T* xr, const T* wr, T* yr, int64_t d, float eps, const T* rr, T* sr) {
  const int64_t dv = d & ~int64_t(7);
  if (rr) {
    for (int64_t i = 0; i < dv; i += 8) avx2::store8(sr + i, _mm256_add_ps(avx2::load8(xr + i), avx2::load8(rr + i)));
    for (int64_t i = dv; i < d; ++i) sr[i] = from_f32<T>(to_f32(xr[i]) + to_f32(rr[i]));
    xr = sr;
  }
  // (the empty asm keeps each square a rounded product: fused into an FMA it would change the bits)
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < dv; i += 8) {
    const __m256 v = avx2::load8(xr + i);
    __m256 sq = _mm256_mul_ps(v, v);
    asm("" : "+x"(sq));
    acc = _mm256_add_ps(acc, sq);
  }
  alignas(32) float part[8];
  _mm256_store_ps(part, acc);
  for (int64_t i = dv, j = 0; i < d; ++i, ++j) {
    const float v = to_f32(xr[i]);
    float sq = v * v;
    asm("" : "+x"(sq));
    part[j] += sq;
  }
  const float sum = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
  const float s = 1.f / std::sqrt(sum / static_cast<float>(d) + eps);
  const __m256 sv = _mm256_set1_ps(s);
  for (int64_t i = 0; i < dv; i += 8) {
    const __m256 normed = avx2::round_as<T>(_mm256_mul_ps(avx2::load8(xr + i), sv));
    avx2::store8(yr + i, _mm256_mul_ps(avx2::load8(wr + i), normed));
  }
  for (int64_t i = dv; i < d; ++i) yr[i] = from_f32<T>(to_f32(wr[i]) * to_f32(from_f32<T>(to_f32(xr[i]) * s)));
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

namespace lfmk {
namespace {

// res != null: x + res first, rounded to T as the eager add rounds it, written to sum and normalised
// (the residual add before each of the model's norms, one pass instead of two ops).
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t rows, int64_t d, int64_t w_rows, float eps,
                   const T* res = nullptr, T* sum = nullptr) {
  const bool avx2 = cpu_has_avx2();
  auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      if (avx2) {
        rms_norm_row_avx2<T>(x + r * d, w + (r % w_rows) * d, y + r * d, d, eps, res ? res + r * d : nullptr,
                             res ? sum + r * d : nullptr);
        continue;
      }
      const T* xr = x + r * d;
      if (res) {
        T* sr = sum + r * d;
        const T* rr = res + r * d;
        for (int64_t i = 0; i < d; ++i) sr[i] = from_f32<T>(to_f32(xr[i]) + to_f32(rr[i]));
        xr = sr;
      }
      const T* wr = w + (r % w_rows) * d;
      T* yr = y + r * d;
      const float s = inv_rms(xr, d, eps);
      for (int64_t i = 0; i < d; ++i) {
        const T normed = from_f32<T>(to_f32(xr[i]) * s);  // F.rms_norm's result in x's dtype
        yr[i] = from_f32<T>(to_f32(wr[i]) * to_f32(normed));
      }
    }
  };
  // a decode step's few rows stay on the calling thread: waking the pool costs more than the row
  if (rows * d < (int64_t{1} << 16)) {
    body(0, rows);
  } else {
    parallel_for(rows, std::max<int64_t>(1, (int64_t{1} << 14) / d), body);
  }
}

// Checks x and the norm weight for `op`; returns the weight's rows (1 for [D], R for [R, D]).
int64_t norm_weight_rows(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, op, ": x must have a non-empty last dim");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight dtype ", weight.scalar_type(),
              " must equal x's ", x.scalar_type());
  const int64_t d = x.size(-1);
  TORCH_CHECK(weight.dim() >= 1 && weight.dim() <= 2 && weight.size(-1) == d,
              op, ": weight must be [D] or [R, D] with D = x.size(-1) = ", d);
  const int64_t w_rows = weight.dim() == 2 ? weight.size(0) : 1;
  TORCH_CHECK(weight.dim() == 1 || (x.dim() >= 2 && x.size(-2) == w_rows), op, ": a [R, D] weight needs x [..., R, D]");
  return w_rows;
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t w_rows = norm_weight_rows("rms_norm", x, weight), d = x.size(-1);
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  at::Tensor y = at::empty_like(xc);
  const int64_t rows = xc.numel() / d;
  LFMK_DISPATCH_FLOAT(xc.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(cptr<scalar_t>(xc), cptr<scalar_t>(wc), mptr<scalar_t>(y), rows, d, w_rows,
                            static_cast<float>(eps));
  });
  return y;
}

// (x + residual, rms_norm(x + residual)): the sum rounded to x's dtype, as `x + residual` is, then
// normalised exactly as rms_norm_cpu does; same shapes and dtypes, no broadcasting.
std::tuple<at::Tensor, at::Tensor> add_rms_norm_cpu(const at::Tensor& x, const at::Tensor& residual,
                                                    const at::Tensor& weight, double eps) {
  TORCH_CHECK_VALUE(residual.sizes() == x.sizes() && residual.scalar_type() == x.scalar_type(),
                    "add_rms_norm: residual must have x's shape ", x.sizes(), " and dtype ", x.scalar_type(),
                    ", got ", residual.sizes(), " ", residual.scalar_type());
  const int64_t w_rows = norm_weight_rows("add_rms_norm", x, weight), d = x.size(-1);
  const at::Tensor xc = x.contiguous(), rc = residual.contiguous(), wc = weight.contiguous();
  at::Tensor sum = at::empty_like(xc), y = at::empty_like(xc);
  const int64_t rows = xc.numel() / d;
  LFMK_DISPATCH_FLOAT(xc.scalar_type(), "add_rms_norm", [&] {
    rms_norm_rows<scalar_t>(cptr<scalar_t>(xc), cptr<scalar_t>(wc), mptr<scalar_t>(y), rows, d, w_rows,
                            static_cast<float>(eps), cptr<scalar_t>(rc), mptr<scalar_t>(sum));
  });
  return {sum, y};
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) {
  m.impl("rms_norm", &lfmk::rms_norm_cpu);
  m.impl("add_rms_norm", &lfmk::add_rms_norm_cpu);
}
