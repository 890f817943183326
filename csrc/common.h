// Shared helpers for the lfm_kernels CPU ops: dtype conversion, runtime ISA selection, threading.
//
// Every op is one translation unit. Its portable path is plain C++ compiled for the baseline ISA;
// its fast path sits between LFMK_AVX2_BEGIN / LFMK_AVX2_END, which compiles just those functions
// for AVX2+FMA+F16C, and is only called when cpu_has_avx2() says the CPU (and OS) support it.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <immintrin.h>

#if defined(__clang__)
#define LFMK_AVX2_BEGIN \
  _Pragma("clang attribute push (__attribute__((target(\"avx2,fma,f16c\"))), apply_to = function)")
#define LFMK_AVX2_END _Pragma("clang attribute pop")
#elif defined(__GNUC__)
#define LFMK_AVX2_BEGIN _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c\")")
#define LFMK_AVX2_END _Pragma("GCC pop_options")
#else
#error "lfm_kernels needs GCC or clang"
#endif

// Functions compiled for AVX-512 with the BF16 dot-product instruction (vdpbf16ps), called only when
// cpu_has_avx512bf16(): the MoE experts' many-token path on CPUs that have it (Zen 4+, Cooper Lake,
// Sapphire Rapids+), where it does twice the multiply-adds per instruction of AVX2 fp32 FMAs and
// needs no bf16 -> fp32 conversion of the weights.
#if defined(__clang__)
#define LFMK_AVX512BF16_BEGIN                                                                           \
  _Pragma("clang attribute push (__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c\"))), apply_to = function)")
#define LFMK_AVX512BF16_END _Pragma("clang attribute pop")
#else
#define LFMK_AVX512BF16_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma,f16c\")")
#define LFMK_AVX512BF16_END _Pragma("GCC pop_options")
#endif

// Functions compiled for AVX-512 F/BW/VL/DQ (no BF16 instructions): the decode GEMVs of `linear`,
// 16 fp32 lanes per instruction, called only when cpu_has_avx512(). On CPUs with slower memory per
// core (server parts) the wider loads leave the core more room to keep loads in flight.
#if defined(__clang__)
#define LFMK_AVX512_BEGIN \
  _Pragma("clang attribute push (__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\"))), apply_to = function)")
#define LFMK_AVX512_END _Pragma("clang attribute pop")
#else
#define LFMK_AVX512_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define LFMK_AVX512_END _Pragma("GCC pop_options")
#endif

// AMX-INT8 kernels, with the AVX-512 helpers their fix-ups use. Only where cpu_has_amx() (the OS has
// granted the tile state to this process).
#if defined(__clang__)
#define LFMK_AMX_BEGIN \
  _Pragma("clang attribute push (__attribute__((target(\"amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\"))), apply_to = function)")
#define LFMK_AMX_END _Pragma("clang attribute pop")
#else
#define LFMK_AMX_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c\")")
#define LFMK_AMX_END _Pragma("GCC pop_options")
#endif

// AMX-BF16 kernels, with the AVX-512 (BF16) helpers that feed them. Only where cpu_has_amx() and
// cpu_has_avx512bf16().
#if defined(__clang__)
#define LFMK_AMX_BF16_BEGIN \
  _Pragma("clang attribute push (__attribute__((target(\"amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c\"))), apply_to = function)")
#define LFMK_AMX_BF16_END _Pragma("clang attribute pop")
#else
#define LFMK_AMX_BF16_BEGIN \
  _Pragma("GCC push_options") _Pragma("GCC target(\"amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c\")")
#define LFMK_AMX_BF16_END _Pragma("GCC pop_options")
#endif

namespace lfmk {

// True when the AVX2+FMA+F16C kernels may run: the CPU has them, the OS saves YMM state, and the
// portable path has not been forced (tests force it to check both paths give the same answers).
bool cpu_has_avx2();
// True when the AVX-512 (F/BW/VL/DQ) kernels may run: CPU and OS support, the portable path not
// forced and the AVX2 path not pinned.
bool cpu_has_avx512();
// Name of the path the next call will take: "avx512", "avx2" or "portable".
const char* cpu_isa();
// True when the AVX-512 BF16 kernels may run (CPU and OS support, and the portable path not forced;
// pinning AVX2 does not affect them: the kernel policy's thresholds choose them).
bool cpu_has_avx512bf16();
bool cpu_has_amx();  // AMX tiles usable (the OS granted the tile state) and the portable path not forced
void set_force_portable(bool force);
// Keeps the AVX-512 decode GEMVs off while true (cpu_has_avx512() false, cpu_isa() "avx2"): the tests
// compare the paths with it; the kernel policy chooses per call through linear's avx512_max_rows.
void set_pin_avx2(bool pin);
// Activation rows up to which the x8 integer tiles (Q8_0 / Q4_0 / K-quants in the x8 layout) read one
// 8-row group at a time per thread, a single sequential stream, instead of several groups interleaved
// (four at one row, two at two rows and, in the experts' tiles, at three and four; K-quants two at
// one row). Only the pace changes: every output is its own row's fixed-order sum either way (same
// bits). Which is faster depends on the CPU's
// memory system (one stream measured 10-13% faster per decoded token on a 2-core Zen 4, four streams
// 10-20% faster than two on an AVX2-only EPYC), so the kernel policy measures it (lfm_kernels/_policy.py).
int64_t x8_one_stream_max_rows();
void set_x8_one_stream_max_rows(int64_t rows);

// out (contiguous; float32, bfloat16 or float16, out.numel() values) = src rounded to out's dtype to
// nearest even, as a dtype-converting copy_ rounds (NaN: the canonical quiet NaN). For op results
// computed in fp32: a copy_ is a TensorIterator per call, a good part of a decode step's small
// matrix op on caches the weight streams have evicted. Split over the threads only when large.
void store_fp32_as(const float* src, at::Tensor& out);

// dst[0 .. t.numel()) = t's values (float32, bfloat16 or float16; any strides) as fp32, in t's
// logical order: a small operand (a token's activations, a bias) converted with a plain loop where a
// dtype-converting tensor op would cost more than the op that needs it.
void load_as_fp32(const at::Tensor& t, float* dst);

// ---- software prefetch of a weight stream ----
// The decode GEMVs read each weight row once, front to back. The hardware L2 streamer alone does not
// keep enough of such a stream in flight on server cores with long memory latency, and it restarts at
// every 4 KiB page boundary (one row of 2048 bf16 is a page). So the loops that stream rows also ask
// for the bytes stream_ahead() past what they load, into L2 (prefetcht2; a prefetch never faults, so
// running past the end of the weight is harmless). How far ahead pays depends on the memory system,
// so it is a run-time setting with a default per CPU vendor (module.cpp), share of the read-bandwidth
// floor, weights streamed from DRAM, 2 threads:
//   2-core Zen 3 (AVX2 only), a whole bf16 decode step (CPU graph), the distance alternated in one
//   process: 0.5 KiB 81.7%, 0.75-1.5 KiB 84.7-88.2%, 2 KiB 79.3-80.6%, 4 and 8 KiB 77-79%, none 83.5%.
//   Zen 4: 0.5-2 KiB neither a gain nor a loss. -> 1 KiB on AMD (and any other vendor).
//   2-core Xeon (Emerald Rapids class, 300 MiB L3), cold bf16 GEMVs at one row: 6144 x 2048 none
//   59%, 1 KiB 71%, 2 KiB 78%, 4 KiB 97%, 8 KiB 96%, 16 KiB 93%; 2048 x 7168 57 / 66 / 80 / 94 / 94 /
//   92%. An earlier Sapphire Rapids Xeon: MoE decode experts 1 KiB 96-98%, 4 KiB 95%, 8 KiB 100%.
//   -> 4 KiB on Intel.
int64_t stream_ahead();
// Bytes ahead of the weight streams' loads that they prefetch (0: none; a multiple of 64 up to 64 KiB,
// else std::invalid_argument). Only the pace changes, never a result.
void set_stream_ahead(int64_t bytes);
// Bytes of reading ahead that the K-quant x8 tiles prefetch in their own read order (quant/kquant_x8.h,
// KX8Ahead; at least one super-block step whatever the value): a per-vendor default like stream_ahead's
// (8 KiB on Intel, 4 KiB elsewhere), a multiple of 64 up to 64 KiB, else std::invalid_argument. Only
// the pace changes, never a result.
int64_t kquant_ahead();
void set_kquant_ahead(int64_t bytes);

// The x8 decode tiles of Q4_0 / Q8_0 (quant/x8.h) prefetch, with each block they load, the block pf
// bytes further on, where the caller says its thread reads next. A thread of the x8 GEMVs reads G
// groups of 8 rows per tile, each group a contiguous run of gstride bytes, then the next G groups of
// its task (or work item): pf = G * gstride is a whole tile ahead, at the pace the tile consumes,
// whatever K and G. A task's last tile would prefetch the next task, which another thread usually
// claims: it prefetches its own stream stream_ahead() ahead instead (tile_prefetch). A longer fixed
// distance would land, at some K, inside a group the tile is already reading. (The K-quant x8 tiles,
// whose blocks are 4-8x larger and slower to compute, follow their own read order:
// quant/kquant_x8.h, KX8Ahead.) The address past the weight's end is formed as an integer, not as a
// pointer past the end (a prefetch never faults).
inline void prefetch_ahead(const void* blk, int64_t pf, int bytes) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(blk) + static_cast<uintptr_t>(pf);
  for (int o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(a + o), _MM_HINT_T2);
}
// One prefetch per 64-byte line of [p + stream_ahead(), p + stream_ahead() + bytes).
inline void prefetch_stream(const void* p, int bytes) { prefetch_ahead(p, stream_ahead(), bytes); }
// pf for an x8 tile at `here`: the next tile, tile_bytes on, when the thread reads it next (more tiles
// follow in its task); else the first tile of the thread's next task at `next` where it knows it
// (parallel_dynamic_ahead below); else stream_ahead().
inline int64_t tile_prefetch(bool more, int64_t tile_bytes, const void* here = nullptr, const void* next = nullptr) {
  if (more) return tile_bytes;
  return next ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(next) - reinterpret_cast<uintptr_t>(here)) : stream_ahead();
}

// ---- scalar conversions (portable; also used for vector tails) ----
inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T from_f32(float v) { return static_cast<T>(v); }  // c10 rounds to nearest even

// Raw pointer for a tensor's data in its own scalar type.
template <typename T>
inline const T* cptr(const at::Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); }
template <typename T>
inline T* mptr(at::Tensor& t) { return reinterpret_cast<T*>(t.mutable_data_ptr()); }

// Splits [0, n) into chunks of at least `grain` for at::parallel_for (OpenMP in torch's CPU builds).
template <typename F>
inline void parallel_for(int64_t n, int64_t grain, const F& f) {
  at::parallel_for(0, n, grain, f);
}

// Hands out task indices 0..n-1 (then -1) from a shared counter.
class TaskQueue {
 public:
  explicit TaskQueue(int64_t n) : n_(n) {}
  int64_t claim() {
    const int64_t t = next_.fetch_add(1, std::memory_order_relaxed);
    return t < n_ ? t : -1;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_;
};

// Runs worker(queue) once on each of up to min(threads, ntasks) threads; the workers claim tasks
// until none are left (a worker can set up per-thread scratch once). Unlike at::parallel_for's
// static split, a thread that the OS deschedules (a busy machine) or that drew slower tasks holds
// up only the task it is on: the others simply claim more.
template <typename W>
inline void parallel_workers(int64_t ntasks, const W& worker) {
  TaskQueue queue(ntasks);
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), ntasks);
  if (workers <= 1) {
    worker(queue);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) worker(queue);
  });
}

// 64-byte aligned scratch bytes for one call (packed panels are read with aligned loads; AMX tile
// loads want their rows aligned). At least 64 bytes, so a zero-size request still has an address.
struct AlignedBytes {
  explicit AlignedBytes(int64_t n)
      : p(static_cast<uint8_t*>(::operator new(static_cast<size_t>(std::max<int64_t>(n, 64)), std::align_val_t(64)))) {}
  ~AlignedBytes() { ::operator delete(p, std::align_val_t(64)); }
  AlignedBytes(const AlignedBytes&) = delete;
  AlignedBytes& operator=(const AlignedBytes&) = delete;
  uint8_t* p;
};

// Scratch of n elements of T that stays allocated for the calling thread between calls (slot: one
// buffer per use in a call). A prefill's MoE pass needs tens of MB of it; a fresh allocation would
// page-fault those in on every call (and std::vector would zero them), about a tenth of a 512-token
// experts call. The contents are left as they are: callers write before they read.
template <typename T>
inline T* thread_scratch(int slot, size_t n) {
  constexpr int kSlots = 8;
  struct Buf {
    std::unique_ptr<T[]> p;
    size_t n = 0;
  };
  thread_local Buf bufs[kSlots];
  Buf& b = bufs[slot];
  if (b.n < n) {
    b.p.reset(new T[n]);
    b.n = n;
  }
  return b.p.get();
}

// body(i) for every i in [0, n), items claimed one at a time (see parallel_workers).
template <typename F>
inline void parallel_dynamic(int64_t n, const F& body) {
  parallel_workers(n, [&](TaskQueue& queue) {
    for (int64_t i = queue.claim(); i >= 0; i = queue.claim()) body(i);
  });
}

// body(t, next) for every t in [0, n), where next is the task the same thread runs after t (-1: none).
// Each thread claims its next task before it runs the current one, so that a decode GEMV's last tile
// of a task can prefetch the first tile of the next (which otherwise starts on demand misses, while
// the stream ramps up again). Measured on 2 Zen 5 cores, Q8_0 / Q4_0 6144 x 2048 at one row, weights
// from DRAM, share of the read probe in the same round: 256 KiB tasks 83 / 81% -> 90 / 87% with the
// next task prefetched (probe ~53 GB/s), 68 / 67% -> 75 / 72% (probe ~83 GB/s). A thread holds at most
// one claimed task it has not started, so the balance is as coarse as one task more.
template <typename F>
inline void parallel_dynamic_ahead(int64_t n, const F& body) {
  parallel_workers(n, [&](TaskQueue& queue) {
    for (int64_t t = queue.claim(), next = -1; t >= 0; t = next) {
      next = queue.claim();
      body(t, next);
    }
  });
}

}  // namespace lfmk

// Dispatch over the three float dtypes the kernels accept, naming the C++ type `scalar_t`.
#define LFMK_DISPATCH_FLOAT(dtype, name, ...)                                              \
  [&] {                                                                                    \
    switch (dtype) {                                                                       \
      case at::kFloat: { using scalar_t = float; return __VA_ARGS__(); }                   \
      case at::kBFloat16: { using scalar_t = c10::BFloat16; return __VA_ARGS__(); }        \
      case at::kHalf: { using scalar_t = c10::Half; return __VA_ARGS__(); }                \
      default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);                    \
    }                                                                                      \
  }()
