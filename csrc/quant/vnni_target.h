// LFMK_QVNNI_BEGIN("target list") ... LFMK_QVNNI_END: the code between them is compiled for that
// target (the VNNI variants of the quantized tiles: quant/vnni_paths.h, quant/kquant_kernels.h).
#pragma once

#if defined(__clang__)
#define LFMK_QVNNI_BEGIN(tgt) _Pragma("clang attribute push (__attribute__((target(" tgt "))), apply_to = function)")
#define LFMK_QVNNI_END _Pragma("clang attribute pop")
#else
#define LFMK_QVNNI_PRAGMA(x) _Pragma(#x)
#define LFMK_QVNNI_BEGIN(tgt) _Pragma("GCC push_options") LFMK_QVNNI_PRAGMA(GCC target(tgt))
#define LFMK_QVNNI_END _Pragma("GCC pop_options")
#endif
