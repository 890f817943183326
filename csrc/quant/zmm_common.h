// Helpers of the 512-bit x8 tiles (quant/x8_vnni512.h, quant/kquant_x8_vnni512.h), shared by both.
// Include only inside the AVX512-VNNI target region (quant/vnni_target.h), as those headers do.
#pragma once

namespace lfmk {
namespace quant {
namespace avx512vnni {

// The int32 lanes of a zmm that holds two 32-byte vectors of the same 8 rows (at different k), summed
// into the 8 rows' lanes of a ymm: exact integers, so any fold order gives the same result.
static inline __m256i zmm_fold_halves(__m512i v) {
  return _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1));
}

// vpermd indices: lanes 0-7 take dword 2p of the source, lanes 8-15 dword 2p + 1 (the activation bytes
// of a vector pair, broadcast to the 8 row lanes of each half).
static inline __m512i zmm_pair_pick(int p) {
  return _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(2 * p), _mm512_set1_epi32(2 * p + 1));
}

}  // namespace avx512vnni
}  // namespace quant
}  // namespace lfmk
