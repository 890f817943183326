// The K-quant kernels (Q4_K / Q5_K / Q6_K, see quant/kquant.h) wrapped as one struct per path, so
// that linear_kquant.cpp and moe_experts_kquant.cpp are each written once, as templates over the
// struct, and pick it at run time from quant::active_isa() (the choice, pin and forced portable
// path of the Q8_0 / Q4_0 kernels). AVX-VNNI / AVX512-VNNI CPUs run the AVX2 structs with the x8
// decode tile and the packed prefill panel replaced by their vpdpbusd variants
// (quant/kquant_x8_vnni.h; activation quantization and packing stay AVX2).
//
// Each struct: quantize_row_k<T>, ktile<F, R, M> (kquant.h's contract), kx8_tile<F, G, M> (on the
// x8 layout, kquant_x8.h's contract) and,
// where kPacked, the packed panels of kquant_avx2.h (pack_group<F>, panel_tile<F, M>, pack_bytes<F>()).
//
// Everything here sits in an anonymous namespace (see moe_tiles_avx2.h for why).
#pragma once

#include <cstdint>

#include "common.h"
#include "quant/kquant.h"
#include "quant/kquant_portable.h"
#include "quant/kquant_x8.h"
#include "quant/quant.h"
#include "quant/vnni_target.h"

LFMK_AVX2_BEGIN
#include "simd_avx2.h"
#include "quant/kquant_avx2.h"
#include "quant/kquant_x8_avx2.h"
LFMK_AVX2_END

namespace lfmk {
namespace quant {
namespace {

struct KKernPortable {
  static constexpr bool kPacked = false;  // many rows: the plain tiles
  template <typename T>
  static void quantize_row_k(const T* x, int64_t K, int8_t* q, float* d, int16_t* s) {
    kportable::quantize_act_row_k(x, K, q, d, s);
  }
  template <KFormat F, int R, int M>
  static void ktile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                    const int16_t* xs, int64_t lds, int64_t nsb, float* res) {
    kportable::ktile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, xs, lds, nsb, res);
  }
  template <KFormat F, int G, int M>
  static void kx8_tile(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq, const float* xd,
                       int64_t ldd, const int16_t* xs, int64_t lds, float* res, int64_t ldr, int64_t next) {
    kportable::kx8_tile<F, G, M>(w, gstride, nsb, xq, ldq, xd, ldd, xs, lds, res, ldr, next);
  }
  // never called (kPacked is false); present so the templates over the struct compile
  template <KFormat F>
  static constexpr int64_t pack_bytes() { return 0; }
  template <KFormat F>
  static void pack_group(const uint8_t*, int64_t, int, int64_t, uint8_t*) {}
  template <KFormat F, int M>
  static void panel_tile(const uint8_t*, int64_t, const int8_t*, int64_t, const float*, int64_t, const int16_t*,
                         int64_t, float*, int64_t) {}
};

}  // namespace
}  // namespace quant
}  // namespace lfmk

LFMK_AVX2_BEGIN
namespace lfmk {
namespace quant {
namespace {
struct KKernAvx2 {
  static constexpr bool kPacked = true;
  template <typename T>
  static void quantize_row_k(const T* x, int64_t K, int8_t* q, float* d, int16_t* s) {
    kavx2::quantize_act_row_k(x, K, q, d, s);
  }
  template <KFormat F, int R, int M>
  static void ktile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                    const int16_t* xs, int64_t lds, int64_t nsb, float* res) {
    kavx2::ktile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, xs, lds, nsb, res);
  }
  template <KFormat F, int G, int M>
  static void kx8_tile(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq, const float* xd,
                       int64_t ldd, const int16_t* xs, int64_t lds, float* res, int64_t ldr, int64_t next) {
    kavx2::kx8_tile<F, G, M>(w, gstride, nsb, xq, ldq, xd, ldd, xs, lds, res, ldr, next);
  }
  template <KFormat F>
  static constexpr int64_t pack_bytes() { return kavx2::KPack<F>::kBytes; }
  template <KFormat F>
  static void pack_group(const uint8_t* w, int64_t w_ld, int rows, int64_t nsb, uint8_t* dst) {
    kavx2::pack_kgroup<F>(w, w_ld, rows, nsb, dst);
  }
  template <KFormat F, int M>
  static void panel_tile(const uint8_t* pk, int64_t nsb, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                         const int16_t* xp, int64_t ldp, float* res, int64_t ldr) {
    kavx2::kpanel_tile<F, M>(pk, nsb, xq, ldq, xd, ldd, xp, ldp, res, ldr);
  }
};
}  // namespace
}  // namespace quant
}  // namespace lfmk
LFMK_AVX2_END

// The VNNI structs: KKernAvx2 with the x8 tile and the packed panel of quant/kquant_x8_vnni.h (the same
// bits; the packing is the AVX2 one).
#define LFMK_KX8_VNNI_KERN(Name, ns)                                                                             \
  namespace lfmk {                                                                                             \
  namespace quant {                                                                                            \
  namespace {                                                                                                  \
  struct Name : KKernAvx2 {                                                                                    \
    template <KFormat F, int G, int M>                                                                         \
    static void kx8_tile(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq,       \
                         const float* xd, int64_t ldd, const int16_t* xs, int64_t lds, float* res, int64_t ldr, \
                         int64_t next) {                                                                         \
      ns::kx8_tile<F, G, M>(w, gstride, nsb, xq, ldq, xd, ldd, xs, lds, res, ldr, next);                         \
    }                                                                                                          \
    template <KFormat F, int M>                                                                                \
    static void panel_tile(const uint8_t* pk, int64_t nsb, const int8_t* xq, int64_t ldq, const float* xd,     \
                           int64_t ldd, const int16_t* xp, int64_t ldp, float* res, int64_t ldr) {             \
      ns::kpanel_tile<F, M>(pk, nsb, xq, ldq, xd, ldd, xp, ldp, res, ldr);                                     \
    }                                                                                                          \
  };                                                                                                           \
  }                                                                                                            \
  }                                                                                                            \
  }

LFMK_QVNNI_BEGIN("avx2,fma,f16c,avxvnni")
#define LFMK_QVNNI_NS avxvnni
#define LFMK_QVNNI_DPBUSD _mm256_dpbusd_avx_epi32
#include "quant/kquant_x8_vnni.h"
#undef LFMK_QVNNI_NS
#undef LFMK_QVNNI_DPBUSD
LFMK_KX8_VNNI_KERN(KKernAvxVnni, avxvnni)
LFMK_QVNNI_END

LFMK_QVNNI_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define LFMK_QVNNI_NS avx512vnni
#define LFMK_QVNNI_DPBUSD _mm256_dpbusd_epi32
#define LFMK_QVNNI_ZMM 1  // the x8 tile on 512-bit vectors
LFMK_ZMM_DIAG_BEGIN
#include "quant/kquant_x8_vnni512.h"
#include "quant/kquant_x8_vnni.h"
LFMK_ZMM_DIAG_END
#undef LFMK_QVNNI_NS
#undef LFMK_QVNNI_DPBUSD
#undef LFMK_QVNNI_ZMM
LFMK_KX8_VNNI_KERN(KKernAvx512Vnni, avx512vnni)
LFMK_QVNNI_END
#undef LFMK_KX8_VNNI_KERN

namespace lfmk {
namespace quant {
namespace {
// fn(Kern{}) with the struct of the quantized path in force (active_isa(): its choice, pin or forced
// portable path), so each op picks its K-quant struct in one place.
template <typename Fn>
inline void with_kquant_kern(const Fn& fn) {
  switch (active_isa()) {
    case 3: fn(KKernAvx512Vnni{}); break;
    case 2: fn(KKernAvxVnni{}); break;
    case 1: fn(KKernAvx2{}); break;
    default: fn(KKernPortable{}); break;
  }
}
}  // namespace
}  // namespace quant
}  // namespace lfmk
