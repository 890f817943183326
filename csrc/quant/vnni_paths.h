// The two VNNI variants of the Q8_0 / Q4_0 integer-dot tiles (quant/vnni.h), each compiled for its
// own target (AVX-VNNI's VEX vpdpbusd, AVX512-VNNI's EVEX vpdpbusd on 256-bit vectors, and its
// x8 tile on 512-bit ones) and chosen
// at run time. Included at file scope by every translation unit that runs quantized tiles.
#pragma once

#include "quant/x8.h"  // outside the target regions: its portable code must run on any CPU

#include "quant/vnni_target.h"

LFMK_QVNNI_BEGIN("avx2,fma,f16c,avxvnni")
#define LFMK_QVNNI_NS avxvnni
#define LFMK_QVNNI_DPBUSD _mm256_dpbusd_avx_epi32
#include "quant/vnni.h"
#undef LFMK_QVNNI_NS
#undef LFMK_QVNNI_DPBUSD
LFMK_QVNNI_END

LFMK_QVNNI_BEGIN("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define LFMK_QVNNI_NS avx512vnni
#define LFMK_QVNNI_DPBUSD _mm256_dpbusd_epi32
#define LFMK_QVNNI_ZMM 1  // the x8 tile on 512-bit vectors (quant/x8_vnni512.h)
LFMK_ZMM_DIAG_BEGIN
#include "quant/x8_vnni512.h"
#include "quant/vnni.h"
LFMK_ZMM_DIAG_END
#undef LFMK_QVNNI_NS
#undef LFMK_QVNNI_DPBUSD
#undef LFMK_QVNNI_ZMM
LFMK_QVNNI_END
