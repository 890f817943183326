// The Python module lfm_kernels._C: CPU feature detection and the switch tests use to force the
// portable path. The ops themselves register into the `lfm_kernels_cpu` torch.library namespace
// from their own translation units.
#include <atomic>
#include <string>

#if defined(__linux__) && defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <torch/extension.h>

#include "common.h"

namespace lfmk {

static std::atomic<bool> g_force_portable{false};

static bool detect_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // libgcc's checks include the OS's XSAVE support of the YMM registers.
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

static bool detect_avx512bf16() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // as for AVX2, libgcc also checks that the OS saves the ZMM and opmask state
  return detect_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

static bool detect_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return detect_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// AMX (tile, BF16 and INT8) that this process may use. CPUID alone is not enough: the OS must enable
// the tile state in XCR0, and Linux (5.16+) hands the 8 KiB tile data area to a process only after it
// asks with arch_prctl(ARCH_REQ_XCOMP_PERM); a VM can advertise AMX while its kernel refuses that
// request, and an AMX instruction would then fault. So the answer is the request's result.
static bool detect_amx() {
#if defined(__linux__) && defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return false;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const unsigned amx_tile = 1u << 24, amx_bf16 = 1u << 22, amx_int8 = 1u << 25;
  if ((edx & (amx_tile | amx_bf16 | amx_int8)) != (amx_tile | amx_bf16 | amx_int8)) return false;
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const unsigned xtilecfg = 1u << 17, xtiledata = 1u << 18;
  if ((xcr0_lo & (xtilecfg | xtiledata)) != (xtilecfg | xtiledata)) return false;
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

static std::atomic<bool> g_pin_avx2{false};
static const bool g_has_avx2 = detect_avx2();
static const bool g_has_avx512 = detect_avx512();
static const bool g_has_avx512bf16 = detect_avx512bf16();
static const bool g_has_amx = detect_amx();

bool cpu_has_avx2() { return g_has_avx2 && !g_force_portable.load(std::memory_order_relaxed); }
static bool avx512_allowed() {
  return !g_force_portable.load(std::memory_order_relaxed) && !g_pin_avx2.load(std::memory_order_relaxed);
}
bool cpu_has_avx512() { return g_has_avx512 && avx512_allowed(); }
bool cpu_has_amx() { return g_has_amx && g_has_avx512 && !g_force_portable.load(std::memory_order_relaxed); }
// The AVX512-BF16 MoE tiles have their own switch (the policy's thresholds), so pinning AVX2 for the
// decode kernels does not take them away from prefill.
bool cpu_has_avx512bf16() { return g_has_avx512bf16 && !g_force_portable.load(std::memory_order_relaxed); }
const char* cpu_isa() { return cpu_has_avx512() ? "avx512" : cpu_has_avx2() ? "avx2" : "portable"; }
void set_force_portable(bool force) { g_force_portable.store(force); }
void set_pin_avx2(bool pin) { g_pin_avx2.store(pin); }
static std::atomic<int64_t> g_x8_one_stream_max_rows{0};
int64_t x8_one_stream_max_rows() { return g_x8_one_stream_max_rows.load(std::memory_order_relaxed); }
void set_x8_one_stream_max_rows(int64_t rows) {
  if (rows < 0) throw std::invalid_argument("x8_one_stream_max_rows must be >= 0, got " + std::to_string(rows));
  g_x8_one_stream_max_rows.store(rows);
}

// common.h, stream_ahead: 4 KiB on Intel CPUs, 1 KiB on any other (measured there).
static bool cpu_is_intel() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  return ebx == 0x756e6547u && edx == 0x49656e69u && ecx == 0x6c65746eu;  // "Genu" "ineI" "ntel"
#else
  return false;
#endif
}
static const int64_t kDefaultStreamAhead = cpu_is_intel() ? 4096 : 1024;
// A prefetch distance as set_stream_ahead / set_kquant_ahead take it, else std::invalid_argument.
static void check_prefetch_distance(const char* name, int64_t bytes) {
  if (bytes < 0 || bytes > 65536 || bytes % 64 != 0)
    throw std::invalid_argument(std::string(name) + " must be a multiple of 64 in [0, 65536], got " + std::to_string(bytes));
}
static std::atomic<int64_t> g_stream_ahead{kDefaultStreamAhead};
int64_t stream_ahead() { return g_stream_ahead.load(std::memory_order_relaxed); }
void set_stream_ahead(int64_t bytes) {
  check_prefetch_distance("stream_ahead", bytes);
  g_stream_ahead.store(bytes);
}
// common.h, kquant_ahead: 8 KiB on Intel CPUs, 4 KiB on any other (measured in quant/kquant_x8.h).
static const int64_t kDefaultKQuantAhead = cpu_is_intel() ? 8192 : 4096;
static std::atomic<int64_t> g_kquant_ahead{kDefaultKQuantAhead};
int64_t kquant_ahead() { return g_kquant_ahead.load(std::memory_order_relaxed); }
void set_kquant_ahead(int64_t bytes) {
  check_prefetch_distance("kquant_ahead", bytes);
  g_kquant_ahead.store(bytes);
}

void register_op_replay(py::module_& m);  // op_replay.cpp

}  // namespace lfmk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lfm_kernels CPU extension";
  m.def("cpu_supports_avx2", [] { return lfmk::g_has_avx2; },
        "whether this CPU and OS support the AVX2+FMA+F16C kernels");
  m.def("cpu_supports_avx512", [] { return lfmk::g_has_avx512; },
        "whether this CPU and OS support the AVX-512 (F/BW/VL/DQ) kernels (decode GEMVs)");
  m.def("cpu_supports_amx", [] { return lfmk::g_has_amx; },
        "AMX-BF16/INT8 usable: CPU flags, OS tile state in XCR0, and the kernel granted this process the tile data");
  m.def("cpu_supports_avx512bf16", [] { return lfmk::g_has_avx512bf16; },
        "whether this CPU and OS support the AVX-512 BF16 kernels (MoE experts with many tokens)");
  m.def("cpu_isa", [] { return std::string(lfmk::cpu_isa()); }, "the path the kernels take now");
  m.def("set_force_portable", &lfmk::set_force_portable,
        "force the portable (non-AVX2) kernels; for tests comparing both paths");
  m.def("set_x8_one_stream_max_rows", &lfmk::set_x8_one_stream_max_rows,
        "activation rows up to which the x8 integer tiles stream one 8-row group at a time (0: never); set by the kernel policy");
  m.def("x8_one_stream_max_rows", &lfmk::x8_one_stream_max_rows);
  m.def("set_pin_avx2", &lfmk::set_pin_avx2, "keep the AVX-512 decode GEMVs off (the AVX512-BF16 MoE tiles keep their own switch); for tests");
  m.def("stream_ahead", &lfmk::stream_ahead, "bytes ahead of their loads that the weight streams prefetch");
  m.def("set_stream_ahead", &lfmk::set_stream_ahead,
        "set the weight streams' prefetch distance in bytes (0: none; a multiple of 64, at most 65536)");
  m.def("default_stream_ahead", [] { return lfmk::kDefaultStreamAhead; }, "this CPU's default stream_ahead");
  m.def("kquant_ahead", &lfmk::kquant_ahead, "bytes of reading ahead that the K-quant x8 tiles prefetch (at least one super-block step)");
  m.def("set_kquant_ahead", &lfmk::set_kquant_ahead,
        "set the K-quant x8 tiles' prefetch distance in bytes (a multiple of 64, at most 65536; any value prefetches at least one step)");
  m.def("default_kquant_ahead", [] { return lfmk::kDefaultKQuantAhead; }, "this CPU's default kquant_ahead");
  m.def("num_threads", [] { return at::get_num_threads(); });
  lfmk::register_op_replay(m);
}
