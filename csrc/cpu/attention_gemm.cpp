// The block-product switch of the CPU flash attention (csrc/cpu/attention_kernel.cpp): the own
// register-blocked SIMD micro-kernel on packed K / V panels ("own"), or one BLAS sgemm per block
// ("blas", the fallback and the tests' oracle). "auto" is the own kernel wherever the capability has
// one (AVX2, AVX-512) and the dtype is float32, except on AVX2 the backward at head dims > 64 (BLAS
// measured as fast or faster there: attention_kernel.cpp, use_own_gemm), and for bfloat16 on a CPU with
// AVX512_BF16 the bf16 kernels; float64 and the DEFAULT capability always use BLAS. "own" and "blas"
// pin the float32 kernel for bfloat16 too.
// The mode comes from PYFASTDL_ATTENTION_GEMM=auto|own|blas, read once at the first use, and can be
// changed later by the op attention_cpu_gemm(mode) (tests, benchmark), which returns the old mode.
#include <ATen/ATen.h>

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <string>

namespace pyfastdl {
namespace cpu {
namespace {

constexpr const char* kModeNames[] = {"auto", "own", "blas"};

int parse(std::string m, bool* ok) {
  for (auto& ch : m) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  *ok = true;
  if (m == "auto") return 0;
  if (m == "own") return 1;
  if (m == "blas") return 2;
  *ok = false;
  return 0;
}

std::atomic<int>& mode_ref() {
  static std::atomic<int> mode{[] {
    const char* env = std::getenv("PYFASTDL_ATTENTION_GEMM");
    if (!env || !*env) return 0;
    bool ok = false;
    const int m = parse(env, &ok);
    TORCH_CHECK(ok, "PYFASTDL_ATTENTION_GEMM: expected auto, own or blas, got '", env, "'");
    return m;
  }()};
  return mode;
}

// The block product of the last CPU attention forward / backward: -1 none yet, 1 own, 2 blas, 3 the bf16
// kernel (bfloat16 inputs on a CPU with AVX512_BF16).
std::atomic<int> last_fwd{-1}, last_bwd{-1};

}  // namespace

// Declared where used (attention_kernel.cpp, ops.cpp): 0 auto, 1 own, 2 blas.
int attention_gemm_mode() { return mode_ref().load(); }

void attention_gemm_note(bool backward, bool own, bool bf16) {
  (backward ? last_bwd : last_fwd).store(bf16 ? 3 : own ? 1 : 2);
}

std::string attention_cpu_gemm(c10::string_view mode) {
  auto name = [](int a) { return a < 0 ? "none" : a == 3 ? "bf16" : kModeNames[a]; };
  if (mode.empty()) return kModeNames[mode_ref().load()];
  if (mode == "last") return std::string("fwd=") + name(last_fwd.load()) + ";bwd=" + name(last_bwd.load());
  bool ok = false;
  const int m = parse(std::string(mode), &ok);
  TORCH_CHECK(ok, "attention_cpu_gemm: expected mode 'auto', 'own', 'blas', '' or 'last', got '", std::string(mode),
              "'");
  return kModeNames[mode_ref().exchange(m)];
}

}  // namespace cpu
}  // namespace pyfastdl
