// MoE tiles for GGUF Q8_0 / Q4_0 expert weights: the quantized kernels of csrc/quant (activation
// quantization and the R weight rows x M activation rows integer-dot tile, one header per ISA)
// wrapped as one kernel struct per instruction set, so that the experts' quantized pass
// (moe_experts.cpp) is written once, as a template over the struct, and picks the struct at run time
// from the path linear_quant.cpp chooses (quant::active_isa(): the same choice, the same pin the
// tests set, the same forced portable path).
//
// Everything here sits in an anonymous namespace (see moe_tiles_avx2.h for why).
#pragma once

#include <cstdint>

#include "common.h"
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
namespace {

// Each struct: quantize_row<T>(x, K, q, d) and tile<F, R, M>(...) with quant.h's contract (a result
// depends only on its own weight row and activation row, never on R, M or the thread), so the pass
// gives the same bits for any thread count and any grouping of an expert's tokens.
struct QTilesPortable {
  static constexpr bool kPacked = false;  // many tokens: the plain tiles
  template <typename T>
  static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) { quant::portable::quantize_act_row(x, K, q, d); }
  template <quant::Format F, int R, int M>
  static void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                   int64_t nb, float* res) {
    quant::portable::tile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);
  }
  template <quant::Format F, int G, int M>
  static void x8_tile(const uint8_t* w, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                      int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr, int64_t pf) {
    quant::portable::x8_tile<F, G, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr, pf);
  }
};

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
namespace lfmk {
namespace {
struct QTilesAvx2 {
  static constexpr bool kPacked = true;
  template <quant::Format F>
  static void pack_group(const uint8_t* w, int64_t w_ld, int rows, int64_t nb, uint8_t* dst) {
    quant::avx2::pack_group<F>(w, w_ld, rows, nb, dst);
  }
  template <quant::Format F, int G, int M>
  static void panel_tile(const uint8_t* pk, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                         int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr) {
    quant::avx2::panel_tile<F, G, M>(pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr);
  }
  template <typename T>
  static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) { quant::avx2::quantize_act_row(x, K, q, d); }
  template <quant::Format F, int R, int M>
  static void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd, int64_t ldd,
                   int64_t nb, float* res) {
    quant::avx2::tile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);
  }
  template <quant::Format F, int G, int M>
  static void x8_tile(const uint8_t* w, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                      int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t ldr, int64_t pf) {
    quant::avx2::x8_tile<F, G, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr, pf);
  }
};
}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

#define LFMK_QMOE_VNNI_TILES(Name, ns)                                                                         \
  namespace lfmk {                                                                                             \
  namespace {                                                                                                  \
  struct Name {                                                                                                \
    static constexpr bool kPacked = true;                                                                      \
    template <quant::Format F>                                                                                 \
    static void pack_group(const uint8_t* w, int64_t w_ld, int rows, int64_t nb, uint8_t* dst) {               \
      quant::avx2::pack_group<F>(w, w_ld, rows, nb, dst);                                                      \
    }                                                                                                          \
    template <quant::Format F, int G, int M>                                                                   \
    static void panel_tile(const uint8_t* pk, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq,          \
                           const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res,          \
                           int64_t ldr) {                                                                      \
      quant::ns::panel_tile<F, G, M>(pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr);                        \
    }                                                                                                          \
    template <typename T>                                                                                      \
    static void quantize_row(const T* x, int64_t K, int8_t* q, float* d) {                                     \
      quant::avx2::quantize_act_row(x, K, q, d);                                                               \
    }                                                                                                          \
    template <quant::Format F, int R, int M>                                                                   \
    static void tile(const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd,          \
                     int64_t ldd, int64_t nb, float* res) {                                                    \
      quant::ns::tile<F, R, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);                                            \
    }                                                                                                          \
    template <quant::Format F, int G, int M>                                                                   \
    static void x8_tile(const uint8_t* w, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq,              \
                        const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res,             \
                        int64_t ldr, int64_t pf) {                                                             \
      quant::ns::x8_tile<F, G, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, ldr, pf);                        \
    }                                                                                                          \
  };                                                                                                           \
  }                                                                                                            \
  }

LFMK_QVNNI_BEGIN("avx2,fma,f16c,avxvnni")
LFMK_QMOE_VNNI_TILES(QTilesAvxVnni, avxvnni)
LFMK_QVNNI_END
LFMK_QVNNI_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
LFMK_QMOE_VNNI_TILES(QTilesAvx512Vnni, avx512vnni)
LFMK_QVNNI_END
#undef LFMK_QMOE_VNNI_TILES

namespace lfmk {
namespace {

// Runs tile<F, R, M> for a run-time R in {1, 2, 4} and M in 1..4 (kQM).
constexpr int kQM = 4;
template <class Kern, quant::Format F, int M>
inline void qtile_r(int R, const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd,
                    int64_t ldd, int64_t nb, float* res) {
  switch (R) {
    case 4: return Kern::template tile<F, 4, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);
    case 2: return Kern::template tile<F, 2, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);
    default: return Kern::template tile<F, 1, M>(w, w_ld, xq, ldq, xd, ldd, nb, res);
  }
}
template <class Kern, quant::Format F>
inline void qtile(int R, int M, const uint8_t* w, int64_t w_ld, const int8_t* xq, int64_t ldq, const float* xd,
                  int64_t ldd, int64_t nb, float* res) {
  switch (M) {
    case 4: return qtile_r<Kern, F, 4>(R, w, w_ld, xq, ldq, xd, ldd, nb, res);
    case 3: return qtile_r<Kern, F, 3>(R, w, w_ld, xq, ldq, xd, ldd, nb, res);
    case 2: return qtile_r<Kern, F, 2>(R, w, w_ld, xq, ldq, xd, ldd, nb, res);
    default: return qtile_r<Kern, F, 1>(R, w, w_ld, xq, ldq, xd, ldd, nb, res);
  }
}

// Packed panels (SIMD paths; see quant/avx2.h): G in {1, 2} groups of 8 rows against M in 1..4
// activation rows, res[m * 16 + g * 8 + r].
template <class Kern, quant::Format F, int M>
inline void qpanel_g(int G, const uint8_t* pk, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                     int64_t ldd, const int32_t* xs8, int64_t lds, float* res) {
  if (G == 2)
    Kern::template panel_tile<F, 2, M>(pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, 16);
  else
    Kern::template panel_tile<F, 1, M>(pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, 16);
}
template <class Kern, quant::Format F>
inline void qpanel(int G, int M, const uint8_t* pk, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq,
                   const float* xd, int64_t ldd, const int32_t* xs8, int64_t lds, float* res) {
  switch (M) {
    case 4: return qpanel_g<Kern, F, 4>(G, pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res);
    case 3: return qpanel_g<Kern, F, 3>(G, pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res);
    case 2: return qpanel_g<Kern, F, 2>(G, pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res);
    default: return qpanel_g<Kern, F, 1>(G, pk, gs, nb, xq, ldq, xd, ldd, xs8, lds, res);
  }
}

// x8 tiles (quant/x8.h): G groups of 8 rows (qx8_groups) against M in 1..4 activation rows,
// res[m * kX8Res + g * 8 + r].
constexpr int kX8Res = 32;
// Groups per x8 tile for M activation rows and n groups left: each group is its own stream through
// memory, and on some cores the streaming rate grows with the streams in flight (measured on an AVX2
// EPYC: 4 streams read ~10-20% faster than 2 at one token), on others one stream reads fastest
// (common.h, x8_one_stream_max_rows); G * M accumulators must fit the registers.
inline int qx8_groups(int M, int64_t n) {
  if (M <= x8_one_stream_max_rows()) return 1;
  const int64_t g = std::min<int64_t>(M == 1 ? 4 : 2, n);
  return g >= 4 ? 4 : g >= 2 ? 2 : 1;
}
template <class Kern, quant::Format F, int M>
inline void qx8_g(int G, const uint8_t* w, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                  int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t pf) {
  if constexpr (M == 1) {
    if (G == 4) return Kern::template x8_tile<F, 4, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, kX8Res, pf);
  }
  if (G == 2)
    Kern::template x8_tile<F, 2, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, kX8Res, pf);
  else
    Kern::template x8_tile<F, 1, M>(w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, kX8Res, pf);
}
template <class Kern, quant::Format F>
inline void qx8(int G, int M, const uint8_t* w, int64_t gs, int64_t nb, const int8_t* xq, int64_t ldq, const float* xd,
                int64_t ldd, const int32_t* xs8, int64_t lds, float* res, int64_t pf) {
  switch (M) {
    case 4: return qx8_g<Kern, F, 4>(G, w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, pf);
    case 3: return qx8_g<Kern, F, 3>(G, w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, pf);
    case 2: return qx8_g<Kern, F, 2>(G, w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, pf);
    default: return qx8_g<Kern, F, 1>(G, w, gs, nb, xq, ldq, xd, ldd, xs8, lds, res, pf);
  }
}

// Weight rows per tile for M activation rows: R * M accumulators plus 2R weight vectors fit the 16
// ymm registers (as linear_quant's GEMV/GEMM); one row streams per accumulator set at M = 1.
inline int qtile_rows(int M) { return M == 1 ? 4 : 2; }

}  // namespace
}  // namespace lfmk
