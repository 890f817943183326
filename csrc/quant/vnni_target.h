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

// Around the AVX512-VNNI variants: GCC 12's AVX-512 intrinsic headers pass an undefined vector as the
// unused merge source of the unmasked forms (GCC bug 105593), and its -Wmaybe-uninitialized warnings
// there are false.
#if defined(__GNUC__) && !defined(__clang__)
#define LFMK_ZMM_DIAG_BEGIN                                                                    \
  _Pragma("GCC diagnostic push") _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")        \
      _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define LFMK_ZMM_DIAG_END _Pragma("GCC diagnostic pop")
#else
#define LFMK_ZMM_DIAG_BEGIN
#define LFMK_ZMM_DIAG_END
#endif
