// The tile configuration (palette 1, 64 bytes) that the AMX kernels load with ldtilecfg: quant/amx.h
// (AMX-INT8) and quant/amx_bf16.h (AMX-BF16). Plain data: include it anywhere.
#pragma once

#include <cstdint>

namespace lfmk {
namespace quant {

struct alignas(64) AmxTileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};  // bytes per row of tile t
  uint8_t rows[16] = {};    // rows of tile t
};

}  // namespace quant
}  // namespace lfmk
