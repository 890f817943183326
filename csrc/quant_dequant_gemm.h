// The dequantize-then-GEMM route for quantized weights with many rows (quant_dequant_gemm.cpp), as
// the MoE expert ops call it.
#pragma once

#include <cstdint>
#include <vector>

#include "common.h"
#include "moe_plan.h"
#include "quant/dequant.h"

namespace lfmk {
namespace quant {

// y[q, :] = down_e(silu(gate_e . x) * (up_e . x)) for the pairs q of each expert e in `experts` (its
// tokens per pl), in the numerics of a bf16 model's experts on the dequantized weights: the weights
// dequantized exactly and rounded to bf16, panel by panel (never a whole expert in memory), the
// GEMMs oneDNN's (fp32 accumulation, bf16 results), SwiGLU on the bf16 gate and up rounded to bf16.
// On AMX, x8 weights run on AMX-BF16 tiles of our own instead (quant/amx_bf16.h): the same weight
// values, gate and up kept in fp32 until SwiGLU, y in fp32.
// hidden: bf16 [N, H] contiguous (rows indexed by pl.tok). gu / dn: the first expert's [2I, H] /
// [H, I] matrix in formats fgu / fdn, layout x8 or rows. y: fp32, H per pair, in pl's sorted order.
void experts_dequant_gemm(const at::Tensor& hidden, const uint8_t* gu, WFormat fgu, const uint8_t* dn, WFormat fdn,
                          bool x8, int64_t H, int64_t I, const moe::Plan& pl, const std::vector<int64_t>& experts,
                          float* y);

// Splits pl.active into the experts with at least min_rows tokens (the route above; none when
// min_rows is 0 or hidden is not bf16) and the rest.
inline void split_dequant_gemm(const moe::Plan& pl, int64_t min_rows, bool bf16_hidden, std::vector<int64_t>* gemm,
                               std::vector<int64_t>* rest) {
  for (const int64_t e : pl.active) {
    const bool many = bf16_hidden && min_rows > 0 && pl.offs[e + 1] - pl.offs[e] >= min_rows;
    (many ? gemm : rest)->push_back(e);
  }
}

}  // namespace quant
}  // namespace lfmk
