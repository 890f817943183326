// A decode step's rotary embedding and KV-cache write for one attention layer, in one call.
//
// qk [B, Hq + Hkv, D] holds the q heads then the k heads (after their RMSNorm), v [B, Hkv, D]. Each
// head of row b is rotated at position pos[b] with the model's tables cos [S, D] and sin [S, D]
// (sin's first half negated: x * cos + roll(x, D/2) * sin is transformers' x * cos +
// rotate_half(x) * sin), the k heads and v are written to k_cache / v_cache [B, Hkv, S_max, D] at
// position pos[b], and the rotated q heads are returned [B, Hq, D].
//
// Why an op: in eager PyTorch this is a mul, a roll, a second mul, an add, a copy of q and two
// index_put writes, about 40 us a layer on a 2-core CPU with the caches cold from the weight
// streams, for work of a few hundred nanoseconds. The bits are the eager ops': both products and
// the sum are rounded to the model dtype in the same order (no fused multiply-add).
//
// bf16 / fp16 heads of a contiguous row (D a multiple of 16) run 8 lanes at a time on AVX2: the same
// products, roundings and sum per element, so the same bits. The scalar loop spent ~8.5 us a call
// on the conversions (32 + 8 heads of 64, 2-core Zen 5), 6 calls a token. fp32 stays scalar: GCC may
// contract a vector multiply and add into an FMA in the AVX2+FMA region, which would change its bits.
#include <algorithm>
#include <tuple>
#include <type_traits>

#include "common.h"

LFMK_AVX2_BEGIN
#include "simd_avx2.h"

namespace lfmk {
namespace {

// out[i * os] for one head of D elements (D % 16 == 0): x * cos + roll(x, D/2) * sin, each product
// rounded to T, then the sum rounded to T (store8). os: the output's element stride (1 or not).
template <typename T>
void rope_head_avx2(const T* xh, const T* c, const T* s, int64_t D, T* out, int64_t os) {
  using namespace avx2;
  const int64_t half = D / 2;
  alignas(32) T tmp[8];
  for (int64_t i = 0; i < D; i += 8) {
    const int64_t r = i < half ? i + half : i - half;
    const __m256 a = round_as<T>(_mm256_mul_ps(load8(xh + i), load8(c + i)));
    const __m256 b = round_as<T>(_mm256_mul_ps(load8(xh + r), load8(s + i)));
    const __m256 y = _mm256_add_ps(a, b);
    if (os == 1) {
      store8(out + i, y);
    } else {
      store8(tmp, y);
      for (int j = 0; j < 8; ++j) out[(i + j) * os] = tmp[j];
    }
  }
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

namespace lfmk {
namespace {

template <typename T>
inline T rope_elem(T x, T xr, T c, T s) {
  const T a = from_f32<T>(to_f32(x) * to_f32(c));
  const T b = from_f32<T>(to_f32(xr) * to_f32(s));
  return from_f32<T>(to_f32(a) + to_f32(b));
}

template <>
inline float rope_elem<float>(float x, float xr, float c, float s) {
  const float a = x * c, b = xr * s;
  return a + b;
}

template <typename T>
void rope_rows(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
               at::Tensor& k_cache, at::Tensor& v_cache, const int64_t* pos, int64_t Hq, at::Tensor& q) {
  const int64_t B = qk.size(0), H = qk.size(1), D = qk.size(2), Hkv = H - Hq, half = D / 2;
  const T* x = cptr<T>(qk);
  const T* vp = cptr<T>(v);
  const T* ct = cptr<T>(cos);
  const T* st = cptr<T>(sin);
  T* qo = mptr<T>(q);
  T* kc = mptr<T>(k_cache);
  T* vc = mptr<T>(v_cache);
  const auto ks = k_cache.strides(), vs = v_cache.strides();
  const bool vector = D % 16 == 0 && cpu_has_avx2();
  for (int64_t b = 0; b < B; ++b) {
    const int64_t p = pos[b];
    const T* c = ct + p * cos.stride(0);
    const T* s = st + p * sin.stride(0);
    for (int64_t h = 0; h < H; ++h) {
      const T* xh = x + (b * H + h) * D;
      T* out = h < Hq ? qo + (b * Hq + h) * D : kc + b * ks[0] + (h - Hq) * ks[1] + p * ks[2];
      const int64_t os = h < Hq ? 1 : ks[3];
      if constexpr (!std::is_same_v<T, float>) {
        if (vector) {
          rope_head_avx2<T>(xh, c, s, D, out, os);
          continue;
        }
      }
      for (int64_t i = 0; i < D; ++i) {
        const int64_t r = i < half ? i + half : i - half;  // roll(x, D/2)[i] = x[i - D/2 mod D]
        out[i * os] = rope_elem<T>(xh[i], xh[r], c[i], s[i]);
      }
    }
    for (int64_t h = 0; h < Hkv; ++h) {
      const T* src = vp + b * v.stride(0) + h * v.stride(1);
      T* dst = vc + b * vs[0] + h * vs[1] + p * vs[2];
      for (int64_t i = 0; i < D; ++i) dst[i * vs[3]] = src[i * v.stride(2)];
    }
  }
}

at::Tensor rope_cache_write_cpu(const at::Tensor& qk_in, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, at::Tensor& k_cache, at::Tensor& v_cache,
                                const at::Tensor& pos_in, int64_t num_q_heads) {
  TORCH_CHECK_VALUE(qk_in.dim() == 3, "rope_cache_write: qk must be [B, Hq + Hkv, D], got ", qk_in.sizes());
  const int64_t B = qk_in.size(0), H = qk_in.size(1), D = qk_in.size(2), Hq = num_q_heads, Hkv = H - Hq;
  TORCH_CHECK_VALUE(Hq >= 1 && Hkv >= 1, "rope_cache_write: num_q_heads must be in [1, ", H - 1, "], got ", Hq);
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0, "rope_cache_write: head_dim must be even, got ", D);
  const auto dt = qk_in.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                    "rope_cache_write: qk must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_VALUE(v.dim() == 3 && v.size(0) == B && v.size(1) == Hkv && v.size(2) == D && v.scalar_type() == dt,
                    "rope_cache_write: v must be [B, Hkv, D] = [", B, ", ", Hkv, ", ", D, "] of qk's dtype, got ",
                    v.sizes(), " ", v.scalar_type());
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK_VALUE(t->dim() == 2 && t->size(1) == D && t->scalar_type() == dt && t->stride(1) == 1,
                      "rope_cache_write: cos and sin must be [S, D=", D, "] of qk's dtype with unit stride, got ",
                      t->sizes(), " ", t->scalar_type());
  for (const at::Tensor* t : {&k_cache, &v_cache})
    TORCH_CHECK_VALUE(t->dim() == 4 && t->size(0) == B && t->size(1) == Hkv && t->size(3) == D &&
                          t->scalar_type() == dt,
                      "rope_cache_write: k_cache and v_cache must be [B, Hkv, S_max, D] = [", B, ", ", Hkv,
                      ", S_max, ", D, "] of qk's dtype, got ", t->sizes(), " ", t->scalar_type());
  TORCH_CHECK_VALUE(k_cache.size(2) == v_cache.size(2), "rope_cache_write: k_cache and v_cache lengths differ");
  TORCH_CHECK_VALUE(pos_in.dim() == 1 && pos_in.size(0) == B, "rope_cache_write: pos must be [B=", B, "], got ",
                    pos_in.sizes());
  TORCH_CHECK_VALUE(!k_cache.is_same(v_cache), "rope_cache_write: k_cache and v_cache must be different tensors");
  const at::Tensor pos = pos_in.to(at::kLong).contiguous();
  const int64_t* pp = pos.const_data_ptr<int64_t>();
  const int64_t smax = k_cache.size(2), tab = std::min(cos.size(0), sin.size(0));
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(pp[b] >= 0 && pp[b] < smax && pp[b] < tab, "rope_cache_write: pos[", b, "] = ", pp[b],
                      " is outside the cache (", smax, " positions) or the rope tables (", tab, ")");
  const at::Tensor qk = qk_in.contiguous();
  at::Tensor q = at::empty({B, Hq, D}, qk.options().memory_format(at::MemoryFormat::Contiguous));
  LFMK_DISPATCH_FLOAT(dt, "rope_cache_write", [&] { rope_rows<scalar_t>(qk, v, cos, sin, k_cache, v_cache, pp, Hq, q); });
  return q;
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) {
  m.def("rope_cache_write(Tensor qk, Tensor v, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor pos, int num_q_heads) -> Tensor");
}
TORCH_LIBRARY_IMPL(lfm_kernels_cpu, CPU, m) { m.impl("rope_cache_write", &lfmk::rope_cache_write_cpu); }
