// The "x8" layout of K-quant weights (Q4_K / Q5_K / Q6_K; lfm_kernels.QuantizedTensor(layout="x8"))
// and its portable tile. In GGUF's row-major super-blocks a decode GEMV is compute-bound: every
// (row, super-block) pays a 6-bit scale decode, scalar fp16 conversions and a horizontal reduction
// per activation row. x8 interleaves the rows of each matrix in groups of 8 so that one 32-byte
// vector holds the same 4 bytes of 8 rows (row r in 32-bit lane r): one broadcast of 4 activation
// bytes feeds 8 rows, lane r accumulates row r (no horizontal sums), the 8 rows' scales and mins
// decode together with 32-bit vector masks and shifts, and their d / dmin arrive as one fp16 vector.
//
// Per (group of 8 rows, super-block), 8 * block bytes, groups in N order, super-blocks in K order
// (a group occupies exactly the bytes its 8 rows occupy in GGUF's layout). The block's fields are
// kept in GGUF's order; field at byte offset o of length L moves to bytes [8o, 8o + 8L) of the
// group-block, in pieces of p bytes (p = 2 for the fp16 d / dmin, 4 for every other field):
//   byte o + p * j + i of row r  ->  byte 8 * o + 8 * p * j + p * r + i        (0 <= i < p)
// so an fp16 field becomes 8 consecutive fp16 (row r at 2r) and a 4n-byte field n vectors of 32.
//   Q4_K (144): d @0, dmin @16, scales @32 (3 vectors), qs @128 (32 vectors)            = 1152
//   Q5_K (176): d @0, dmin @16, scales @32 (3 vectors), qh @128 (8), qs @384 (32)       = 1408
//   Q6_K (210): ql @0 (32 vectors), qh @1024 (16), scales @1536 (4), d @1664             = 1680
// A matrix whose N is not a multiple of 8 keeps its last N % 8 rows in GGUF's row layout after the
// groups: row n then starts at byte n * row_bytes in either layout, for every n. A stack [E, N, K]
// interleaves each matrix on its own. No byte changes value: the conversion is a shuffle of 2- and
// 4-byte pieces, exact both ways.
//
// x8 tile (every ISA path the same contract):
//   kx8_tile<F, G, M>(w, gstride, nsb, xq, ldq, xd, ldd, xs, lds, res, ldr, next)
//     res[m * ldr + g * 8 + r] = row (g, r) . activation row m over nsb super-blocks, for G groups
//     (gstride bytes apart; w = the first group's first super-block) and M activation rows (xq rows
//     ldq bytes apart, xd rows ldd floats apart, xs rows lds int16 apart holding the activation's
//     sums per sub-block: per 32 for Q4_K / Q5_K, per 16 for Q6_K, as KActs::sub_sums); next: where
//     the thread reads next, for the prefetch (KX8Ahead below).
// Per (row, activation row, super-block) every path computes kquant.h's exact integers and fused
// fp32 steps in super-block order, so an x8 result has the bits of the row-layout ktile's (and of
// the packed prefill panels'), whatever G, M, the tile's position, the thread or the path.
#pragma once

#include "common.h"
#include "quant/kquant.h"
#include "quant/kquant_portable.h"

#include <immintrin.h>

namespace lfmk {
namespace quant {

constexpr int kKX8Rows = 8;

struct KX8Field {
  int off, len, piece;
};

template <KFormat F>
struct KX8;
template <>
struct KX8<KFormat::Q4_K> {
  static constexpr int kFields = 4;
  static constexpr KX8Field kField[kFields] = {{0, 2, 2}, {2, 2, 2}, {4, 12, 4}, {16, 128, 4}};
};
template <>
struct KX8<KFormat::Q5_K> {
  static constexpr int kFields = 5;
  static constexpr KX8Field kField[kFields] = {{0, 2, 2}, {2, 2, 2}, {4, 12, 4}, {16, 32, 4}, {48, 128, 4}};
};
template <>
struct KX8<KFormat::Q6_K> {
  static constexpr int kFields = 4;
  static constexpr KX8Field kField[kFields] = {{0, 128, 4}, {128, 64, 4}, {192, 16, 4}, {208, 2, 2}};
};

// A 2- or 4-byte piece, as a fixed-size copy (a variable-size memcpy is a library call per piece).
static inline void kx8_piece(uint8_t* d, const uint8_t* s, int piece) {
  if (piece == 4)
    std::memcpy(d, s, 4);
  else
    std::memcpy(d, s, 2);
}

// One group of 8 rows (GGUF rows row_ld bytes apart) of nsb super-blocks -> x8 bytes at dst.
template <KFormat F>
inline void rows_to_kx8_group(const uint8_t* src, int64_t row_ld, int64_t nsb, uint8_t* dst) {
  constexpr int kB = KTraits<F>::kBytes;
  for (int64_t b = 0; b < nsb; ++b) {
    uint8_t* o = dst + b * kKX8Rows * kB;
    for (const KX8Field& f : KX8<F>::kField)
      for (int r = 0; r < kKX8Rows; ++r) {
        const uint8_t* blk = src + r * row_ld + b * kB;
        for (int j = 0; j < f.len / f.piece; ++j)
          kx8_piece(o + 8 * f.off + 8 * f.piece * j + f.piece * r, blk + f.off + f.piece * j, f.piece);
      }
  }
}

// The inverse: one x8 group of nsb super-blocks -> 8 GGUF rows (row_ld bytes apart) at dst.
template <KFormat F>
inline void kx8_to_rows_group(const uint8_t* src, int64_t nsb, uint8_t* dst, int64_t row_ld) {
  constexpr int kB = KTraits<F>::kBytes;
  for (int64_t b = 0; b < nsb; ++b) {
    const uint8_t* in = src + b * kKX8Rows * kB;
    for (const KX8Field& f : KX8<F>::kField)
      for (int r = 0; r < kKX8Rows; ++r) {
        uint8_t* blk = dst + r * row_ld + b * kB;
        for (int j = 0; j < f.len / f.piece; ++j)
          kx8_piece(blk + f.off + f.piece * j, in + 8 * f.off + 8 * f.piece * j + f.piece * r, f.piece);
      }
  }
}

// Software prefetch of the x8 tiles below. A tile reads one super-block of each of its G groups per
// step (group g's stream at w + g * gstride, nsb blocks of kGB bytes); `next` is the byte offset
// from w to the tile its thread reads after this one (same G and gstride), or 0 where this is the
// task's last tile (the next one belongs to another thread). At step b the tile prefetches, into
// L2, the block it reads D steps later in that order: block b + D of the same group, or past the
// group's end the next tile's; D steps are about kquant_ahead() bytes of reading (common.h, a
// per-vendor default), at least one step.
// The block goes in pieces spread over the step's work, not in one burst at its start: 18-26 lines
// at once stalled the loads behind them, so the core's arithmetic no longer overlapped the stream.
// Measured on a 2-core Zen 3 (AVX2), weights from DRAM, 2 threads, one row, share of the read
// probe: burst a tile ahead -> spread a tile ahead -> spread 1-2 steps ahead, Q6_K 128000 x 2048
// 61 -> 72 -> 78-84%, Q6_K 2048 x 7168 50 -> 57 -> 73-75%; Q4_K 6144 x 2048 66-68 -> 76-79 -> 73-78%.
// The distance, alternated in one process on the same machine (6-8 rounds, medians, share of the
// probe). One row, 2 threads (G = 2: a step is 2.3 KiB of Q4_K, 3.4 KiB of Q6_K), one step / ~8 KiB
// / a whole tile: Q4_K 6144 x 2048 78.5 / 72.7 / 73.5%, Q4_K 2048 x 2048 72.6 / 65.5 / 66.6%, Q6_K
// 2048 x 7168 83-87 / 77.4 / 71.7%, Q6_K 16384 x 2048 84-86 / 76.0 / 73.0%; a whole Q4_K_M decode
// step (CPU graph) 85.9% at one step, 82.4% at ~8 KiB. Two rows (G = 1, steps of 1.1 / 1.7 KiB):
// one step 59-66%, 4 KiB 61-69%, 8 KiB 63-73%. One thread, one row: two runs disagreed (one step
// 66-75% against 8 KiB 68-79% in one, 82-85% against 73-81% in the other). So about 4 KiB: one step
// where a step is 2-4 KiB (the batch-1 decode), three or two where steps are shorter.
// On Intel the distance pays to be longer: a 2-core Emerald Rapids Xeon (VNNI 512-bit tiles, 300 MiB
// L3), weights from DRAM, 2 threads, distances alternated in one process: a whole Q4_K_M decode step
// (CPU graph, medians of 12 rounds) 58.1 ms at 4 KiB, 51.3-51.8 at 6, 8 and 12 KiB, 50.3 at 16 KiB;
// one row, GB/s of weight read, 4 / 8 / 16 KiB: Q6_K 128000 x 2048 20.5 / 23.4 / 23.2, Q4_K 6144 x
// 2048 18.0 / 19.2 / 17.9, the MoE decode experts (Q4_K gate_up, Q4_K / Q6_K down) 20.8 / 21.9 / 22.1.
// So kquant_ahead() is 8 KiB on Intel, 4 KiB on AMD and any other (the Zen 3 figures above; a Zen 4
// was not measured). No prefetch at all: 19-30%. Addresses are formed as integers: one past a
// matrix's end is never dereferenced (a prefetch never faults).
struct KX8Ahead {
  uintptr_t w;
  int64_t gstride, nsb, next, kgb, D;
  // for a tile of G groups of kGB-byte blocks
  KX8Ahead(const uint8_t* w_, int64_t gstride_, int64_t nsb_, int64_t next_, int64_t kGB, int G)
      : w(reinterpret_cast<uintptr_t>(w_)), gstride(gstride_), nsb(nsb_), next(next_), kgb(kGB),
        D(std::max<int64_t>(1, kquant_ahead() / (G * kGB))) {}
  // the address of the block read D steps after step b of group g, 0 where there is none to prefetch
  __attribute__((always_inline)) inline uintptr_t at(int64_t b, int g) const {
    int64_t bb = b + D;
    uintptr_t a = w + static_cast<uintptr_t>(g * gstride);
    if (bb >= nsb) {
      if (next == 0) return 0;
      a += static_cast<uintptr_t>(next);
      bb -= nsb;
      if (bb >= nsb) return 0;  // more than a tile ahead (a short K): leave it to the next steps
    }
    return a + static_cast<uintptr_t>(bb * kgb);
  }
};
// Piece p of kParts of the kGB-byte block at a (from KX8Ahead::at; 0: nothing). Always inlined: GCC
// otherwise splits it, finds the out-of-line part "const" (a prefetch has no visible effect) and
// deletes every call, leaving the tile with no prefetch at all.
template <int64_t kGB, int kParts>
__attribute__((always_inline)) static inline void kx8_prefetch_piece(uintptr_t a, int p) {
  constexpr int64_t kPiece = (kGB + 64 * kParts - 1) / (64 * kParts) * 64;
  if (a == 0) return;
  #pragma GCC unroll 16
  for (int64_t o = 0; o < kPiece; o += 64)
    if (p * kPiece + o < kGB) _mm_prefetch(reinterpret_cast<const char*>(a + p * kPiece + o), _MM_HINT_T2);
}
// `next` for a tile at `here`: the next tile's offset where its thread reads one (more), else the
// offset of the thread's next task at `nexttask` where it knows it (common.h, parallel_dynamic_ahead),
// else 0.
inline int64_t kx8_next(bool more, int64_t tile_bytes, const uint8_t* here = nullptr, const uint8_t* nexttask = nullptr) {
  if (more) return tile_bytes;
  return nexttask ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(nexttask) - reinterpret_cast<uintptr_t>(here)) : 0;
}

namespace kportable {

// The portable x8 tile: each (group, super-block) is put back into its 8 GGUF blocks and run
// through ktile's per-block steps, so the bits are ktile's by construction.
template <KFormat F, int G, int M>
static inline void kx8_tile(const uint8_t* w, int64_t gstride, int64_t nsb, const int8_t* xq, int64_t ldq,
                            const float* xd, int64_t ldd, const int16_t* xs, int64_t lds, float* res, int64_t ldr,
                            int64_t /*next*/) {
  constexpr int kB = KTraits<F>::kBytes;
  // sub-block sums per 16 (what kblock_step reads) from the per-32 ones of Q4_K / Q5_K: only their
  // pair sums enter the result, so any split of a 32-sum into two halves gives the same integers
  constexpr bool kPer32 = F != KFormat::Q6_K;
  float acc[G][M][kKX8Rows] = {};
  uint8_t blk[kKX8Rows * kB];
  for (int64_t b = 0; b < nsb; ++b) {
    for (int g = 0; g < G; ++g) {
      kx8_to_rows_group<F>(w + g * gstride + b * kKX8Rows * kB, 1, blk, kB);
      for (int r = 0; r < kKX8Rows; ++r) {
        int32_t q[kSuper];
        load_kq<F>(blk + r * kB, q);
        for (int m = 0; m < M; ++m) {
          int16_t s16[kSub16];
          const int16_t* sm = xs + m * lds + b * (kPer32 ? kSub16 / 2 : kSub16);
          for (int j = 0; j < kSub16; ++j) s16[j] = kPer32 ? (j % 2 ? 0 : sm[j / 2]) : sm[j];
          acc[g][m][r] = kblock_step<F>(blk + r * kB, q, xq + m * ldq + b * kSuper, s16, xd[m * ldd + b], acc[g][m][r]);
        }
      }
    }
  }
  for (int g = 0; g < G; ++g)
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < kKX8Rows; ++r) res[m * ldr + g * 8 + r] = acc[g][m][r];
}

}  // namespace kportable
}  // namespace quant
}  // namespace lfmk
