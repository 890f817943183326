// store_fp32_as / load_as_fp32 (common.h): fp32 results into an output tensor of the input's dtype,
// and small operands into fp32.
#include <algorithm>
#include <type_traits>

#include "common.h"

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
namespace lfmk {
namespace {

template <typename T>
void store_range_avx2(const float* src, T* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) avx2::store8(dst + i, _mm256_loadu_ps(src + i));
  for (; i < n; ++i) dst[i] = from_f32<T>(src[i]);
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

namespace lfmk {

void store_fp32_as(const float* src, at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous(), "store_fp32_as: out must be contiguous");
  const int64_t n = out.numel();
  const bool avx2 = cpu_has_avx2();
  LFMK_DISPATCH_FLOAT(out.scalar_type(), "store_fp32_as", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const auto range = [&](int64_t b, int64_t e) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        std::copy(src + b, src + e, dst + b);
      } else {
        if (avx2)
          store_range_avx2(src + b, dst + b, e - b);
        else
          for (int64_t i = b; i < e; ++i) dst[i] = from_f32<scalar_t>(src[i]);
      }
    };
    if (n < (int64_t{1} << 16))
      range(0, n);
    else
      parallel_for(n, int64_t{1} << 15, range);
  });
}

void load_as_fp32(const at::Tensor& t, float* dst) {
  const at::Tensor c = t.contiguous();
  const int64_t n = c.numel();
  LFMK_DISPATCH_FLOAT(c.scalar_type(), "load_as_fp32", [&] {
    const scalar_t* src = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) dst[i] = to_f32(src[i]);
  });
}

}  // namespace lfmk
