// The packed prefill panel's loop (quant/kquant_avx2.h's KPack), shared by its ISA variants:
// per super-block, `sub(blk, b, j, S)` adds sub-block j's scaled integer dot to S[m] for each
// activation row m (the variant's own inner loop), then kavx2::kpanel_finish applies the fp32 steps.
//
// No include guard, on purpose: included inside each variant's namespace and target region
// (quant/kquant_avx2.h: AVX2; quant/kquant_x8_vnni.h: AVX-VNNI, AVX512-VNNI), so that each gets a
// frame compiled for its own ISA, into which its lambda inlines (GCC does not inline a function into
// a caller compiled for fewer instruction sets).

template <KFormat F, int M, class Sub>
static inline void kpanel_frame(const uint8_t* pk, int64_t nsb, const float* xd, int64_t ldd, const int16_t* xp,
                                int64_t ldp, float* res, int64_t ldr, const Sub& sub) {
  using P = kavx2::KPack<F>;
  __m256 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const uint8_t* blk = pk + b * P::kBytes;
    __m256i S[M];
    for (int m = 0; m < M; ++m) S[m] = _mm256_setzero_si256();
    for (int j = 0; j < P::kSubs; ++j) sub(blk, b, j, S);
    kavx2::kpanel_finish<F, M>(blk, xp, ldp, xd, ldd, b, S, acc);
  }
  for (int m = 0; m < M; ++m) _mm256_storeu_ps(res + m * ldr, acc[m]);
}
