// A memory read-bandwidth probe for the benchmarks' floors: every byte of a buffer read once, 256-bit
// loads into eight independent XOR chains per thread. torch's reductions (sum, amax) read 15-35% slower
// than our GEMVs stream weights on a 2-core Zen 4, which made "share of the floor" figures above 100%
// possible: a floor must come from the fastest plain read the machine does (with or without software
// prefetch, whichever is faster there). (512-bit loads read ~12%
// slower than 256-bit ones in this loop on that Zen 4, so the probe keeps AVX2.)
#include "common.h"

namespace lfmk {
namespace {

uint64_t read_portable(const uint64_t* p, int64_t n) {
  uint64_t a = 0, b = 0, c = 0, d = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    a ^= p[i];
    b ^= p[i + 1];
    c ^= p[i + 2];
    d ^= p[i + 3];
  }
  for (; i < n; ++i) a ^= p[i];
  return a ^ b ^ c ^ d;
}

}  // namespace
}  // namespace lfmk

LFMK_AVX2_BEGIN
namespace lfmk {
namespace {

template <bool kPrefetch>
uint64_t read_avx2(const uint64_t* p, int64_t n) {
  __m256i acc[8];
  for (auto& v : acc) v = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    if constexpr (kPrefetch) prefetch_stream(p + i, 256);
    for (int u = 0; u < 8; ++u)
      acc[u] = _mm256_xor_si256(acc[u], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i + 4 * u)));
  }
  for (int u = 1; u < 8; ++u) acc[0] = _mm256_xor_si256(acc[0], acc[u]);
  alignas(32) uint64_t lanes[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[0]);
  return lanes[0] ^ lanes[1] ^ lanes[2] ^ lanes[3] ^ read_portable(p + i, n - i);
}

}  // namespace
}  // namespace lfmk
LFMK_AVX2_END

namespace lfmk {
namespace {

// XOR of every 8-byte word of buf (so the reads cannot be optimised away); the caller times it.
// prefetch: also ask for the bytes stream_ahead() ahead, as the decode GEMVs do (common.h); on cores
// whose hardware prefetcher alone does not keep the stream full (server Xeons) only this read reaches
// what the memory delivers, so the floors take the faster of both.
int64_t read_probe(const at::Tensor& buf, bool prefetch) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(), "_read_probe: buf must be a contiguous CPU tensor");
  const int64_t words = buf.nbytes() / 8;
  const auto* p = static_cast<const uint64_t*>(buf.const_data_ptr());
  // 1 MiB pieces claimed in turn, as the GEMVs read their weights: the threads then read close to one
  // another (the same DRAM pages), measured 20-50% faster here than one contiguous half per thread.
  constexpr int64_t kPiece = (int64_t(1) << 20) / 8;
  const int64_t pieces = (words + kPiece - 1) / kPiece;
  std::atomic<uint64_t> out{0};
  parallel_workers(pieces, [&](TaskQueue& queue) {
    uint64_t r = 0;
    for (int64_t t = queue.claim(); t >= 0; t = queue.claim()) {
      const int64_t lo = t * kPiece, n = std::min(words, lo + kPiece) - lo;
      r ^= !cpu_has_avx2() ? read_portable(p + lo, n)
           : prefetch      ? read_avx2<true>(p + lo, n)
                           : read_avx2<false>(p + lo, n);
    }
    out.fetch_xor(r, std::memory_order_relaxed);
  });
  return static_cast<int64_t>(out.load());
}

}  // namespace
}  // namespace lfmk

TORCH_LIBRARY_FRAGMENT(lfm_kernels_cpu, m) { m.def("_read_probe(Tensor buf, bool prefetch=False) -> int", &lfmk::read_probe); }
