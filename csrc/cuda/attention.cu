// Scaled dot-product attention on CUDA (FlashAttention-2), registered under the CUDA dispatch key;
// the contract (layouts, GQA, masks, valid_lens, fully masked rows, Philox dropout, lse) is in
// common/attention.h, the schemas in csrc/ops.cpp.
//
// Forward: one block per (b * Hq + h, query tile of BM rows). The Q tile stays in shared memory; the
// block walks the key tiles (BN keys) -- with is_causal only those with a key j <= the tile's last
// query -- computing S = Q K^T, masking, and the online softmax (running max m and sum l per row in
// acc_t); the unnormalised O (BM, Ev) lives in shared memory in acc_t, rescaled by exp(m_old - m_new)
// before each O += P V. At the end out = O / l, lse = m + log(l) (acc_t; 0 and -inf for a row with
// no key left).
// Backward: (1) delta = rowsum(dO * O) per query row; (2) one block per (b * Hk + hk, key tile of BN
// keys) keeps K, V and the dK, dV accumulators in shared memory and walks the query heads of its GQA
// group and their query tiles (causal: from the first tile that reaches the key tile): P = exp(S - lse),
// dV += P_drop^T dO, dP = dO V^T, dS = P * (dP_drop - delta), dK += dS^T Q, and dQ += dS K goes to a
// zeroed acc_t buffer through atomicAdd (dQ is therefore not bitwise deterministic; dK, dV are).
// dS itself is the gradient of a float attn_mask (each (b, h, i, j) is visited by one block). Only the
// gradients the op's output_mask asks for are computed.
//
// NaN and Inf as torch's math SDPA (common/attention.h): masks add -inf to the score (NaN stays NaN),
// the row max propagates NaN (fmaxf and a plain `>` drop it), a row with l = NaN is live (out and lse
// NaN), and the causal skip of key tiles (forward) / query tiles (backward) is off for a key/value
// head whose inputs hold a NaN or an Inf (flags from the launcher, `bad`) or, in the forward, for a
// query tile that does.
//
// Matrix products run through block_mma(): float16/bfloat16 use tensor cores (nvcuda::wmma 16x16x16,
// float accumulation; P and dS are rounded to the input dtype before their products, as
// FlashAttention does); float32/float64 take a plain FMA loop in acc_t (slower, exact enough for
// gradcheck). Head dims: one template per bucket D in {64, 128, 256} >= max(E, Ev); tiles are
// zero-padded to D (to a multiple of 16 for the products). Inputs need a unit last-dim stride
// (copied otherwise); other strides are read as given. attn_mask is read through its four strides.
//
// Shared memory (dynamic, bytes = Fwd/BwdLayout::kBytes) stays under the 163 KiB an sm_80 block may
// opt into; tile sizes per dtype and bucket are in FwdTile / BwdTile.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <array>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../common/attention.h"
#include "common.cuh"

namespace pyfastdl {
namespace {

// ---- device code ------------------------------------------------------------------------------------

using namespace cuda_common;  // kWarpSize, fma/exp/log_acc, warp_sum, warp_max (common.cuh)

constexpr int kThreads = 128;  // threads of every block (4 warps)
constexpr int kWarps = kThreads / kWarpSize;
constexpr int64_t kMaxGridYZ = 65535;

// attn_mask element type.
enum MaskKind : int { kMaskNone = 0, kMaskBool, kMaskFloat, kMaskHalf, kMaskBFloat16, kMaskDouble };

// Everything a kernel reads. Tensors with a "stride" triple are (B, H, rows, cols) with unit column
// stride; out, lse, delta, dq_acc, grad_k, grad_v are contiguous.
template <typename scalar_t>
struct AttnParams {
  const scalar_t* q;  // (B, Hq, L, E)   strides q_sb, q_sh, q_sl
  const scalar_t* k;  // (B, Hk, S, E)   strides k_sb, k_sh, k_sl
  const scalar_t* v;  // (B, Hk, S, Ev)  strides v_sb, v_sh, v_sl
  int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;
  const void* mask;   // (B, Hq, L, S) of mask_kind, strides m_sb, m_sh, m_sl, m_ss; null if none
  int mask_kind;
  int64_t m_sb, m_sh, m_sl, m_ss;
  const int64_t* valid_lens;  // (B,) (vl_sl = 0) or (B, L) contiguous; null if none
  int64_t vl_sb, vl_sl;
  int64_t B, Hq, Hk, L, S, E, Ev;
  double scale;
  bool causal;
  bool dropout;          // dropout_p > 0
  double dropout_p;
  uint64_t drop_thresh;  // keep iff philox word >= drop_thresh = ceil(dropout_p * 2^32)
  uint64_t seed, offset;
  // forward outputs
  scalar_t* out;  // (B, Hq, L, Ev) contiguous
  void* lse;      // (B, Hq, L) contiguous, acc_t (float32; float64 for double); a backward input too
  // backward inputs / outputs
  const scalar_t* dout;  // (B, Hq, L, Ev) strides do_sb, do_sh, do_sl
  const scalar_t* o;     // (B, Hq, L, Ev) strides o_sb, o_sh, o_sl
  int64_t do_sb, do_sh, do_sl, o_sb, o_sh, o_sl;
  void* delta;    // (B, Hq, L) acc_t
  void* dq_acc;   // (B, Hq, L, E) acc_t, zeroed; null when grad_q is not asked for
  scalar_t* dk;   // (B, Hk, S, E) contiguous; null when not asked for
  scalar_t* dv;   // (B, Hk, S, Ev) contiguous; null when not asked for
  void* dmask;    // (B, Hq, L, S) acc_t contiguous, zeroed: dS, a float attn_mask's gradient; or null
  const bool* bad;  // (B, Hk): a NaN / Inf in the head's inputs, no causal skip there; null if not causal
};

// max(a, b) that propagates NaN (a plain `>` or fmaxf drops a NaN in one operand).
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

template <typename T>
constexpr bool kUseWmma = std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16>;

template <typename T>
struct WmmaType {
  using type = T;
};
template <>
struct WmmaType<at::Half> {
  using type = __half;
};
template <>
struct WmmaType<at::BFloat16> {
  using type = __nv_bfloat16;
};

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// Philox-4x32-10 (Salmon et al., Random123): key (seed low, seed high), counter (ctr low, ctr high, 0, 0);
// returns the first output word.
__device__ __forceinline__ uint32_t philox_first_word(uint64_t seed, uint64_t ctr) {
  uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c0;
}

// Dropout keep decision of score (b, h, i, j).
template <typename scalar_t>
__device__ __forceinline__ bool dropout_keep(const AttnParams<scalar_t>& p, int64_t bh, int64_t i, int64_t j) {
  const uint64_t lin = (static_cast<uint64_t>(bh) * p.L + i) * p.S + j;
  return static_cast<uint64_t>(philox_first_word(p.seed, p.offset + lin)) >= p.drop_thresh;
}

// The scaled, masked score of query i and key j from the raw dot product q_i . k_j, in the reference's
// order: valid_lens *replaces* the score (0 for a row of length <= 0, -inf past the length), is_causal
// and a bool mask *add* -inf, a float mask is added -- a NaN score or mask value stays NaN at a masked
// key, as in torch's math SDPA. -inf for i >= L or j >= S (the tiles' padding).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_score(const AttnParams<scalar_t>& p, int64_t b, int64_t h, int64_t i,
                                              int64_t j, acc_t raw) {
  if (i >= p.L || j >= p.S) return neg_inf<acc_t>();
  acc_t s = raw * static_cast<acc_t>(p.scale);
  if (p.valid_lens != nullptr) {
    const int64_t vl = p.valid_lens[b * p.vl_sb + i * p.vl_sl];
    if (vl <= 0) s = acc_t(0);  // the notes' -1e6 fill on the whole row: every key weighs the same
    else if (j >= vl) s = neg_inf<acc_t>();
  }
  if (p.causal && j > i) s += neg_inf<acc_t>();
  if (p.mask_kind != kMaskNone) {
    const int64_t off = b * p.m_sb + h * p.m_sh + i * p.m_sl + j * p.m_ss;
    switch (p.mask_kind) {
      case kMaskBool:
        if (!static_cast<const bool*>(p.mask)[off]) s += neg_inf<acc_t>();
        break;
      case kMaskFloat:
        s += static_cast<acc_t>(static_cast<const float*>(p.mask)[off]);
        break;
      case kMaskHalf:
        s += static_cast<acc_t>(static_cast<float>(static_cast<const at::Half*>(p.mask)[off]));
        break;
      case kMaskBFloat16:
        s += static_cast<acc_t>(static_cast<float>(static_cast<const at::BFloat16*>(p.mask)[off]));
        break;
      default:  // kMaskDouble
        s += static_cast<acc_t>(static_cast<const double*>(p.mask)[off]);
        break;
    }
  }
  return s;
}

// Copies rows [0, n_rows) x cols [0, n_cols) of a (rows, cols) global tile with row stride `ld_g` and
// unit column stride into dst (ROWS, D) with row stride LD; everything else of dst's (ROWS, D) is zeroed.
template <typename scalar_t, int ROWS, int D, int LD>
__device__ __forceinline__ void load_tile(scalar_t* __restrict__ dst, const scalar_t* __restrict__ src,
                                          int64_t ld_g, int64_t n_rows, int64_t n_cols) {
  for (int idx = threadIdx.x; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, c = idx % D;
    dst[r * LD + c] = (r < n_rows && c < n_cols) ? src[r * ld_g + c] : scalar_t(0);
  }
}

// C (M, n) = [C +] A (M, K) B (K, n) over the block, n = n_valid <= N, K = k_valid, in shared memory:
// A(m, k) = TA ? A[k * lda + m] : A[m * lda + k]; B(k, n) = TB ? B[n * ldb + k] : B[k * ldb + n];
// C[m * ldc + n]. Tensor-core path (float16/bfloat16): 16x16 output tiles over the warps, n and K
// rounded up to 16 -- the operands must be zero (finite) in the rounded-up part; M % 16 == 0, all
// tile pointers 32-byte aligned (ld a multiple of 8 elements of scalar_t / 4 of float). FMA path
// otherwise. All threads of the block call it; the caller synchronises.
template <typename scalar_t, typename acc_t, int M, int N, bool TA, bool TB>
__device__ __forceinline__ void block_mma(const scalar_t* __restrict__ A, int lda, const scalar_t* __restrict__ B,
                                          int ldb, acc_t* __restrict__ C, int ldc, int n_valid, int k_valid,
                                          bool accumulate) {
  if constexpr (kUseWmma<scalar_t>) {
    namespace wmma = nvcuda::wmma;
    using wt = typename WmmaType<scalar_t>::type;
    using LA = std::conditional_t<TA, wmma::col_major, wmma::row_major>;
    using LB = std::conditional_t<TB, wmma::col_major, wmma::row_major>;
    static_assert(M % 16 == 0 && N % 16 == 0, "wmma tiles need multiples of 16");
    const int warp = threadIdx.x / kWarpSize;
    const int tn = (n_valid + 15) / 16;
    const int kk = (k_valid + 15) / 16 * 16;
    const int tiles = (M / 16) * tn;
    const wt* a_base = reinterpret_cast<const wt*>(A);
    const wt* b_base = reinterpret_cast<const wt*>(B);
    for (int t = warp; t < tiles; t += kWarps) {
      const int m0 = (t / tn) * 16, n0 = (t % tn) * 16;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
      if (accumulate) {
        wmma::load_matrix_sync(c, C + m0 * ldc + n0, ldc, wmma::mem_row_major);
      } else {
        wmma::fill_fragment(c, 0.0f);
      }
      for (int k0 = 0; k0 < kk; k0 += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, wt, LA> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, wt, LB> bf;
        wmma::load_matrix_sync(a, a_base + (TA ? k0 * lda + m0 : m0 * lda + k0), lda);
        wmma::load_matrix_sync(bf, b_base + (TB ? n0 * ldb + k0 : k0 * ldb + n0), ldb);
        wmma::mma_sync(c, a, bf, c);
      }
      wmma::store_matrix_sync(C + m0 * ldc + n0, c, ldc, wmma::mem_row_major);
    }
  } else {
    for (int idx = threadIdx.x; idx < M * n_valid; idx += kThreads) {
      const int m = idx / n_valid, n = idx % n_valid;
      acc_t s = accumulate ? C[m * ldc + n] : acc_t(0);
      for (int kx = 0; kx < k_valid; ++kx) {
        const acc_t a = static_cast<acc_t>(TA ? A[kx * lda + m] : A[m * lda + kx]);
        const acc_t bv = static_cast<acc_t>(TB ? B[n * ldb + kx] : B[kx * ldb + n]);
        s = fma_acc(a, bv, s);
      }
      C[m * ldc + n] = s;
    }
  }
}

// Row paddings of the shared tiles: wmma needs ld % 8 == 0 (16-bit) / % 4 == 0 (float); the FMA path
// pads by one element against bank conflicts.
template <typename scalar_t>
struct Pad {
  static constexpr int kIn = kUseWmma<scalar_t> ? 8 : 1;   // tiles of scalar_t
  static constexpr int kAcc = kUseWmma<scalar_t> ? 4 : 1;  // tiles of acc_t
};

constexpr size_t align128(size_t n) { return (n + 127) / 128 * 128; }

// Tile sizes (query rows BM, keys BN) per dtype and head-dim bucket D; the shared-memory totals are
// in the comments (bytes, from the layouts below).
template <typename scalar_t, int D>
struct FwdTile {
  static constexpr bool kW = kUseWmma<scalar_t>;
  static constexpr bool kDouble = std::is_same_v<scalar_t, double>;
  static constexpr int BM = kW ? 64 : (kDouble ? 16 : 32);
  static constexpr int BN = kW ? (D <= 128 ? 64 : 32) : (kDouble ? 16 : 32);
};
template <typename scalar_t, int D>
struct BwdTile {
  static constexpr bool kW = kUseWmma<scalar_t>;
  static constexpr bool kDouble = std::is_same_v<scalar_t, double>;
  static constexpr int BM = kW ? (D <= 128 ? 32 : 16) : kDouble ? (D <= 128 ? 16 : 8) : (D <= 128 ? 32 : 16);
  static constexpr int BN = kW ? (D <= 64 ? 64 : 32) : kDouble ? (D <= 128 ? 16 : 8) : (D <= 128 ? 32 : 16);
};

// Forward shared memory: Q (BM, D), K (BN, D), V (BN, D) in scalar_t; S (BM, BN) and O (BM, D) in
// acc_t; P (BM, BN) in scalar_t.
template <typename scalar_t, int D, int BM, int BN>
struct FwdLayout {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int LDI = D + Pad<scalar_t>::kIn;
  static constexpr int LDS = BN + Pad<scalar_t>::kAcc;
  static constexpr int LDP = BN + Pad<scalar_t>::kIn;
  static constexpr int LDO = D + Pad<scalar_t>::kAcc;
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + align128(sizeof(scalar_t) * BM * LDI);
  static constexpr size_t kV = kK + align128(sizeof(scalar_t) * BN * LDI);
  static constexpr size_t kS = kV + align128(sizeof(scalar_t) * BN * LDI);
  static constexpr size_t kP = kS + align128(sizeof(acc_t) * BM * LDS);
  static constexpr size_t kO = kP + align128(sizeof(scalar_t) * BM * LDP);
  static constexpr size_t kBytes = kO + align128(sizeof(acc_t) * BM * LDO);
};

// Backward shared memory: K, V (BN, D), Q, dO (BM, D), P, dS (BM, BN) in scalar_t; dK, dV (BN, D),
// dQ (BM, D), S, dP (BM, BN), lse, delta (BM) in acc_t.
template <typename scalar_t, int D, int BM, int BN>
struct BwdLayout {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int LDI = D + Pad<scalar_t>::kIn;
  static constexpr int LDS = BN + Pad<scalar_t>::kAcc;
  static constexpr int LDP = BN + Pad<scalar_t>::kIn;
  static constexpr int LDO = D + Pad<scalar_t>::kAcc;
  static constexpr size_t kK = 0;
  static constexpr size_t kV = kK + align128(sizeof(scalar_t) * BN * LDI);
  static constexpr size_t kQ = kV + align128(sizeof(scalar_t) * BN * LDI);
  static constexpr size_t kDO = kQ + align128(sizeof(scalar_t) * BM * LDI);
  static constexpr size_t kP = kDO + align128(sizeof(scalar_t) * BM * LDI);
  static constexpr size_t kDS = kP + align128(sizeof(scalar_t) * BM * LDP);
  static constexpr size_t kDK = kDS + align128(sizeof(scalar_t) * BM * LDP);
  static constexpr size_t kDV = kDK + align128(sizeof(acc_t) * BN * LDO);
  static constexpr size_t kDQ = kDV + align128(sizeof(acc_t) * BN * LDO);
  static constexpr size_t kS = kDQ + align128(sizeof(acc_t) * BM * LDO);
  static constexpr size_t kDP = kS + align128(sizeof(acc_t) * BM * LDS);
  static constexpr size_t kLse = kDP + align128(sizeof(acc_t) * BM * LDS);
  static constexpr size_t kDelta = kLse + align128(sizeof(acc_t) * BM);
  static constexpr size_t kBytes = kDelta + align128(sizeof(acc_t) * BM);
};

// Forward. grid (B * Hq, ceil(L / BM)), block kThreads, dynamic shared memory FwdLayout::kBytes.
template <typename scalar_t, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads) _attention_fwd_kernel(const AttnParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Lay = FwdLayout<scalar_t, D, BM, BN>;
  constexpr int LDI = Lay::LDI, LDS = Lay::LDS, LDP = Lay::LDP, LDO = Lay::LDO;
  constexpr int TPR = kThreads / BM;  // threads per query row in the softmax step
  static_assert(kThreads % BM == 0 && TPR <= kWarpSize, "rows must split the block's warps");
  extern __shared__ __align__(128) unsigned char smem[];
  scalar_t* Qs = reinterpret_cast<scalar_t*>(smem + Lay::kQ);  // (BM, LDI)
  scalar_t* Ks = reinterpret_cast<scalar_t*>(smem + Lay::kK);  // (BN, LDI)
  scalar_t* Vs = reinterpret_cast<scalar_t*>(smem + Lay::kV);  // (BN, LDI)
  acc_t* Ss = reinterpret_cast<acc_t*>(smem + Lay::kS);        // (BM, LDS)
  scalar_t* Ps = reinterpret_cast<scalar_t*>(smem + Lay::kP);  // (BM, LDP)
  acc_t* Os = reinterpret_cast<acc_t*>(smem + Lay::kO);        // (BM, LDO)

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.Hq, h = bh % p.Hq;
  const int64_t hk = h / (p.Hq / p.Hk);
  const int64_t i0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int tid = threadIdx.x;
  const int r = tid / TPR, sub = tid % TPR;  // this thread's row and its lane within the row
  const int64_t i = i0 + r;
  const int ev_r = static_cast<int>(p.Ev + 15) / 16 * 16 < D ? static_cast<int>(p.Ev + 15) / 16 * 16 : D;

  load_tile<scalar_t, BM, D, LDI>(Qs, p.q + b * p.q_sb + h * p.q_sh + i0 * p.q_sl, p.q_sl, p.L - i0, p.E);
  for (int idx = tid; idx < BM * D; idx += kThreads) Os[(idx / D) * LDO + idx % D] = acc_t(0);
  // a NaN / Inf in this Q tile: the causal skip is off (masked scores may be NaN, as in torch)
  int q_bad = 0;
  if (p.causal) {
    for (int idx = tid; idx < BM * D; idx += kThreads) {
      const acc_t x = static_cast<acc_t>(Qs[(idx / D) * LDI + idx % D]);
      q_bad |= !(x - x == acc_t(0));
    }
  }
  q_bad = __syncthreads_or(q_bad);

  const scalar_t* kg = p.k + b * p.k_sb + hk * p.k_sh;
  const scalar_t* vg = p.v + b * p.v_sb + hk * p.v_sh;
  int64_t n_kt = (p.S + BN - 1) / BN;
  if (p.causal && !q_bad && !p.bad[b * p.Hk + hk]) {
    const int64_t last = (i0 + BM < p.L ? i0 + BM : p.L) - 1;
    n_kt = n_kt < last / BN + 1 ? n_kt : last / BN + 1;
  }
  const acc_t rp = p.dropout ? acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p)) : acc_t(1);
  acc_t m_i = neg_inf<acc_t>(), l_i = acc_t(0);

  for (int64_t kt = 0; kt < n_kt; ++kt) {
    const int64_t j0 = kt * BN;
    __syncthreads();  // the previous tile's K, V, P are consumed
    load_tile<scalar_t, BN, D, LDI>(Ks, kg + j0 * p.k_sl, p.k_sl, p.S - j0, p.E);
    load_tile<scalar_t, BN, D, LDI>(Vs, vg + j0 * p.v_sl, p.v_sl, p.S - j0, p.Ev);
    __syncthreads();
    block_mma<scalar_t, acc_t, BM, BN, false, true>(Qs, LDI, Ks, LDI, Ss, LDS, BN, static_cast<int>(p.E), false);
    __syncthreads();

    // Online softmax of row r over this tile (TPR threads a row, columns sub, sub + TPR, ...).
    acc_t tmax = neg_inf<acc_t>();
    for (int c = sub; c < BN; c += TPR) {
      const acc_t s = masked_score<scalar_t, acc_t>(p, b, h, i, j0 + c, Ss[r * LDS + c]);
      Ss[r * LDS + c] = s;
      tmax = nan_max(tmax, s);
    }
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) {
      const acc_t o = __shfl_xor_sync(0xffffffffu, tmax, off);
      tmax = nan_max(tmax, o);
    }
    const acc_t m_new = nan_max(m_i, tmax);  // NaN once any score of the row is NaN
    const acc_t m_use = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;  // all -inf so far: p = 0
    const acc_t alpha = exp_acc(m_i - m_use);
    acc_t lsum = acc_t(0);
    for (int c = sub; c < BN; c += TPR) {
      const acc_t pv = exp_acc(Ss[r * LDS + c] - m_use);
      lsum += pv;
      acc_t pd = pv;
      if (p.dropout) pd = dropout_keep(p, bh, i, j0 + c) ? pv * rp : acc_t(0);
      Ps[r * LDP + c] = static_cast<scalar_t>(pd);
    }
    lsum = warp_sum<TPR>(lsum);
    l_i = l_i * alpha + lsum;
    m_i = m_new;
    for (int c = sub; c < ev_r; c += TPR) Os[r * LDO + c] *= alpha;
    __syncthreads();
    block_mma<scalar_t, acc_t, BM, D, false, false>(Ps, LDP, Vs, LDI, Os, LDO, static_cast<int>(p.Ev), BN, true);
  }
  __syncthreads();

  if (i < p.L) {
    const bool live = !(l_i == acc_t(0));  // NaN is live: out and lse NaN
    const acc_t inv_l = live ? acc_t(1) / l_i : acc_t(1);  // a row with no key: out = 0 V (0, or NaN by 0 * inf)
    scalar_t* og = p.out + (bh * p.L + i) * p.Ev;
    for (int c = sub; c < p.Ev; c += TPR) og[c] = static_cast<scalar_t>(Os[r * LDO + c] * inv_l);
    if (sub == 0) {
      static_cast<acc_t*>(p.lse)[bh * p.L + i] = live ? static_cast<acc_t>(m_i + log_acc(l_i)) : neg_inf<acc_t>();
    }
  }
}

// delta[row] = sum_c dO[row, c] * O[row, c] in acc_t, one warp a row. grid ceil(B * Hq * L / kWarps).
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) _attention_bwd_delta_kernel(const AttnParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= p.B * p.Hq * p.L) return;
  const int64_t i = row % p.L, bh = row / p.L;
  const int64_t b = bh / p.Hq, h = bh % p.Hq;
  const scalar_t* dorow = p.dout + b * p.do_sb + h * p.do_sh + i * p.do_sl;
  const scalar_t* orow = p.o + b * p.o_sb + h * p.o_sh + i * p.o_sl;
  acc_t s = acc_t(0);
  for (int64_t c = lane; c < p.Ev; c += kWarpSize) {
    s = fma_acc(static_cast<acc_t>(dorow[c]), static_cast<acc_t>(orow[c]), s);
  }
  s = warp_sum(s);
  if (lane == 0) static_cast<acc_t*>(p.delta)[row] = s;
}

// dK, dV of one key tile (and dQ contributions). grid (B * Hk, ceil(S / BN)), block kThreads, dynamic
// shared memory BwdLayout::kBytes.
template <typename scalar_t, int D, int BM, int BN>
__global__ void __launch_bounds__(kThreads) _attention_bwd_kernel(const AttnParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  using Lay = BwdLayout<scalar_t, D, BM, BN>;
  constexpr int LDI = Lay::LDI, LDS = Lay::LDS, LDP = Lay::LDP, LDO = Lay::LDO;
  extern __shared__ __align__(128) unsigned char smem[];
  scalar_t* Ks = reinterpret_cast<scalar_t*>(smem + Lay::kK);   // (BN, LDI)
  scalar_t* Vs = reinterpret_cast<scalar_t*>(smem + Lay::kV);   // (BN, LDI)
  scalar_t* Qs = reinterpret_cast<scalar_t*>(smem + Lay::kQ);   // (BM, LDI)
  scalar_t* dOs = reinterpret_cast<scalar_t*>(smem + Lay::kDO); // (BM, LDI)
  scalar_t* Ps = reinterpret_cast<scalar_t*>(smem + Lay::kP);   // (BM, LDP) dropped P
  scalar_t* dSs = reinterpret_cast<scalar_t*>(smem + Lay::kDS); // (BM, LDP)
  acc_t* dKs = reinterpret_cast<acc_t*>(smem + Lay::kDK);       // (BN, LDO) unscaled
  acc_t* dVs = reinterpret_cast<acc_t*>(smem + Lay::kDV);       // (BN, LDO)
  acc_t* dQs = reinterpret_cast<acc_t*>(smem + Lay::kDQ);       // (BM, LDO) unscaled
  acc_t* Ss = reinterpret_cast<acc_t*>(smem + Lay::kS);         // (BM, LDS)
  acc_t* dPs = reinterpret_cast<acc_t*>(smem + Lay::kDP);       // (BM, LDS)
  acc_t* lse_s = reinterpret_cast<acc_t*>(smem + Lay::kLse);    // (BM,)
  acc_t* delta_s = reinterpret_cast<acc_t*>(smem + Lay::kDelta);// (BM,)

  const int64_t bhk = blockIdx.x;
  const int64_t b = bhk / p.Hk, hk = bhk % p.Hk;
  const int64_t G = p.Hq / p.Hk;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int tid = threadIdx.x;
  const int E = static_cast<int>(p.E), Ev = static_cast<int>(p.Ev);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t rp = p.dropout ? acc_t(1) / (acc_t(1) - static_cast<acc_t>(p.dropout_p)) : acc_t(1);
  const acc_t* delta = static_cast<const acc_t*>(p.delta);
  acc_t* dq_acc = static_cast<acc_t*>(p.dq_acc);

  load_tile<scalar_t, BN, D, LDI>(Ks, p.k + b * p.k_sb + hk * p.k_sh + j0 * p.k_sl, p.k_sl, p.S - j0, p.E);
  load_tile<scalar_t, BN, D, LDI>(Vs, p.v + b * p.v_sb + hk * p.v_sh + j0 * p.v_sl, p.v_sl, p.S - j0, p.Ev);
  for (int idx = tid; idx < BN * D; idx += kThreads) {
    dKs[(idx / D) * LDO + idx % D] = acc_t(0);
    dVs[(idx / D) * LDO + idx % D] = acc_t(0);
  }
  const int64_t n_qt = (p.L + BM - 1) / BM;
  // causal: rows i < j0 see no key of this tile -- skipped unless the head holds a NaN / Inf
  const int64_t qt_begin = p.causal && !p.bad[bhk] ? j0 / BM : 0;

  for (int64_t g = 0; g < G; ++g) {
    const int64_t h = hk * G + g;
    const int64_t bh = b * p.Hq + h;
    for (int64_t qt = qt_begin; qt < n_qt; ++qt) {
      const int64_t i0 = qt * BM;
      __syncthreads();  // the previous tile's Q, dO, P, dS, dQ are consumed
      load_tile<scalar_t, BM, D, LDI>(Qs, p.q + b * p.q_sb + h * p.q_sh + i0 * p.q_sl, p.q_sl, p.L - i0, p.E);
      load_tile<scalar_t, BM, D, LDI>(dOs, p.dout + b * p.do_sb + h * p.do_sh + i0 * p.do_sl, p.do_sl, p.L - i0,
                                      p.Ev);
      for (int r = tid; r < BM; r += kThreads) {
        const bool in = i0 + r < p.L;
        lse_s[r] = in ? static_cast<const acc_t*>(p.lse)[bh * p.L + i0 + r] : neg_inf<acc_t>();
        delta_s[r] = in ? delta[bh * p.L + i0 + r] : acc_t(0);
      }
      __syncthreads();
      block_mma<scalar_t, acc_t, BM, BN, false, true>(Qs, LDI, Ks, LDI, Ss, LDS, BN, E, false);    // S = Q K^T
      block_mma<scalar_t, acc_t, BM, BN, false, true>(dOs, LDI, Vs, LDI, dPs, LDS, BN, Ev, false); // dP = dO V^T
      __syncthreads();
      for (int idx = tid; idx < BM * BN; idx += kThreads) {
        const int r = idx / BN, c = idx % BN;
        const int64_t i = i0 + r, j = j0 + c;
        const acc_t s = masked_score<scalar_t, acc_t>(p, b, h, i, j, Ss[r * LDS + c]);
        const acc_t lse = lse_s[r];
        const acc_t pv = (s == neg_inf<acc_t>() || lse == neg_inf<acc_t>()) ? acc_t(0) : exp_acc(s - lse);
        acc_t kf = acc_t(1);
        if (p.dropout) kf = (pv != acc_t(0) && dropout_keep(p, bh, i, j)) ? rp : acc_t(0);
        Ps[r * LDP + c] = static_cast<scalar_t>(pv * kf);
        // a row with valid length <= 0 has constant scores (csrc/common/attention.h): no gradient to q, k
        const bool constant_row = p.valid_lens != nullptr && i < p.L && p.valid_lens[b * p.vl_sb + i * p.vl_sl] <= 0;
        const acc_t ds = pv * (dPs[r * LDS + c] * kf - delta_s[r]);
        if (p.dmask != nullptr && i < p.L && j < p.S) static_cast<acc_t*>(p.dmask)[(bh * p.L + i) * p.S + j] = ds;
        dSs[r * LDP + c] = constant_row ? scalar_t(0) : static_cast<scalar_t>(ds);
      }
      __syncthreads();
      if (p.dv != nullptr)
        block_mma<scalar_t, acc_t, BN, D, true, false>(Ps, LDP, dOs, LDI, dVs, LDO, Ev, BM, true);   // dV += P^T dO
      if (p.dk != nullptr)
        block_mma<scalar_t, acc_t, BN, D, true, false>(dSs, LDP, Qs, LDI, dKs, LDO, E, BM, true);    // dK += dS^T Q
      if (dq_acc != nullptr)
        block_mma<scalar_t, acc_t, BM, D, false, false>(dSs, LDP, Ks, LDI, dQs, LDO, E, BN, false); // dQ = dS K
      __syncthreads();
      const int64_t rows = p.L - i0 < BM ? p.L - i0 : BM;
      for (int idx = tid; dq_acc != nullptr && idx < rows * E; idx += kThreads) {
        const int r = idx / E, c = idx % E;
        atomicAdd(dq_acc + (bh * p.L + i0 + r) * p.E + c, scale * dQs[r * LDO + c]);
      }
    }
  }
  __syncthreads();
  const int64_t keys = p.S - j0 < BN ? p.S - j0 : BN;
  for (int64_t idx = tid; p.dk != nullptr && idx < keys * E; idx += kThreads) {
    const int64_t r = idx / E, c = idx % E;
    p.dk[(bhk * p.S + j0 + r) * p.E + c] = static_cast<scalar_t>(scale * dKs[r * LDO + c]);
  }
  for (int64_t idx = tid; p.dv != nullptr && idx < keys * Ev; idx += kThreads) {
    const int64_t r = idx / Ev, c = idx % Ev;
    p.dv[(bhk * p.S + j0 + r) * p.Ev + c] = static_cast<scalar_t>(dVs[r * LDO + c]);
  }
}

// ---- launchers ----------------------------------------------------------------------------------------

// A tensor whose last dimension has unit stride (a copy when it does not).
at::Tensor unit_last_stride(const at::Tensor& t) {
  return (t.size(3) <= 1 || t.stride(3) == 1) ? t : t.contiguous();
}

int head_dim_bucket(int64_t E, int64_t Ev, const char* op) {
  const int64_t d = E > Ev ? E : Ev;
  TORCH_CHECK(d <= 256, op, ": the CUDA kernels take head dims up to 256, got E = ", E, " and Ev = ", Ev);
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

void check_cuda(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.is_cuda(), op, ": expected q on a CUDA device, got ", q.device());
  const auto st = q.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
              ": q dtype ", st, " is not supported by the CUDA kernels (float32, float64, float16, bfloat16)");
}

template <typename scalar_t>
AttnParams<scalar_t> make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, const at::Tensor& vl, bool is_causal,
                                 double scale, double dropout_p, int64_t seed, int64_t offset) {
  AttnParams<scalar_t> p{};
  p.q = q.const_data_ptr<scalar_t>();
  p.k = k.const_data_ptr<scalar_t>();
  p.v = v.const_data_ptr<scalar_t>();
  p.q_sb = q.stride(0), p.q_sh = q.stride(1), p.q_sl = q.stride(2);
  p.k_sb = k.stride(0), p.k_sh = k.stride(1), p.k_sl = k.stride(2);
  p.v_sb = v.stride(0), p.v_sh = v.stride(1), p.v_sl = v.stride(2);
  p.B = q.size(0), p.Hq = q.size(1), p.L = q.size(2), p.E = q.size(3);
  p.Hk = k.size(1), p.S = k.size(2), p.Ev = v.size(3);
  p.mask = nullptr;
  p.mask_kind = kMaskNone;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    switch (m.scalar_type()) {
      case at::kBool: p.mask_kind = kMaskBool; break;
      case at::kFloat: p.mask_kind = kMaskFloat; break;
      case at::kHalf: p.mask_kind = kMaskHalf; break;
      case at::kBFloat16: p.mask_kind = kMaskBFloat16; break;
      case at::kDouble: p.mask_kind = kMaskDouble; break;
      default: TORCH_CHECK(false, "attention: attn_mask dtype ", m.scalar_type(), " is not supported on CUDA");
    }
    p.mask = m.const_data_ptr();
    p.m_sb = m.stride(0), p.m_sh = m.stride(1), p.m_sl = m.stride(2), p.m_ss = m.stride(3);
  }
  p.valid_lens = nullptr;
  if (vl.defined()) {
    p.valid_lens = vl.const_data_ptr<int64_t>();
    p.vl_sb = vl.dim() == 1 ? 1 : p.L;
    p.vl_sl = vl.dim() == 1 ? 0 : 1;
  }
  p.scale = scale;
  p.causal = is_causal;
  p.dropout = dropout_p > 0.0;
  p.dropout_p = dropout_p;
  p.drop_thresh = static_cast<uint64_t>(std::ceil(std::ldexp(dropout_p, 32)));  // uniform >= p, exactly
  p.seed = static_cast<uint64_t>(seed);
  p.offset = static_cast<uint64_t>(offset);
  return p;
}

// valid_lens as a contiguous int64 tensor (undefined when absent).
at::Tensor prepare_valid_lens(const std::optional<at::Tensor>& valid_lens) {
  if (!valid_lens.has_value() || !valid_lens->defined()) return at::Tensor();
  return valid_lens->to(at::kLong).contiguous();
}

template <typename Kernel>
void set_smem(Kernel kernel, size_t bytes, const char* op) {
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(bytes <= prop->sharedMemPerBlockOptin, op, ": the kernel needs ", bytes,
              " bytes of shared memory a block, the device allows ", prop->sharedMemPerBlockOptin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <typename scalar_t, int D>
void launch_fwd(const AttnParams<scalar_t>& p, cudaStream_t stream) {
  constexpr int BM = FwdTile<scalar_t, D>::BM, BN = FwdTile<scalar_t, D>::BN;
  constexpr size_t bytes = FwdLayout<scalar_t, D, BM, BN>::kBytes;
  auto kernel = _attention_fwd_kernel<scalar_t, D, BM, BN>;
  const int64_t q_tiles = (p.L + BM - 1) / BM;
  TORCH_CHECK(q_tiles <= kMaxGridYZ, "attention_fwd: L = ", p.L, " is too long (at most ", kMaxGridYZ * BM, ")");
  set_smem(kernel, bytes, "attention_fwd");
  kernel<<<dim3(static_cast<unsigned>(p.B * p.Hq), static_cast<unsigned>(q_tiles)), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int D>
void launch_bwd(const AttnParams<scalar_t>& p, cudaStream_t stream) {
  constexpr int BM = BwdTile<scalar_t, D>::BM, BN = BwdTile<scalar_t, D>::BN;
  constexpr size_t bytes = BwdLayout<scalar_t, D, BM, BN>::kBytes;
  auto kernel = _attention_bwd_kernel<scalar_t, D, BM, BN>;
  const int64_t k_tiles = (p.S + BN - 1) / BN;
  TORCH_CHECK(k_tiles <= kMaxGridYZ, "attention_bwd: S = ", p.S, " is too long (at most ", kMaxGridYZ * BN, ")");
  set_smem(kernel, bytes, "attention_bwd");
  kernel<<<dim3(static_cast<unsigned>(p.B * p.Hk), static_cast<unsigned>(k_tiles)), kThreads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// (B, Hk) bool flags, only for is_causal: the key/value head's K or V -- and, given q, delta and lse
// (backward), the Q, delta (not finite when dO or out is not) or lse (NaN or +inf) of its query heads
// -- hold a NaN or an Inf, so the kernels skip no masked tile there. Device-side ATen ops, no sync.
at::Tensor nonfinite_heads(const at::Tensor& k, const at::Tensor& v, const at::Tensor& q = at::Tensor(),
                           const at::Tensor& delta = at::Tensor(), const at::Tensor& lse = at::Tensor()) {
  const int64_t B = k.size(0), Hk = k.size(1);
  at::Tensor bad = at::isfinite(k).flatten(2).all(-1).logical_and(at::isfinite(v).flatten(2).all(-1)).logical_not();
  if (q.defined()) {
    at::Tensor qb = at::isfinite(q).flatten(2).all(-1).logical_not();
    qb = qb.logical_or(at::isfinite(delta).all(-1).logical_not());
    qb = qb.logical_or(at::isnan(lse).logical_or(at::isposinf(lse)).any(-1));
    bad = bad.logical_or(qb.reshape({B, Hk, q.size(1) / Hk}).any(-1));
  }
  return bad.contiguous();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& attn_mask,
                                                      const std::optional<at::Tensor>& valid_lens, bool is_causal,
                                                      double scale, double dropout_p, int64_t seed, int64_t offset) {
  constexpr const char* op = "attention_fwd";
  attention::check(op, q, k, v, attn_mask, valid_lens, dropout_p);
  check_cuda(op, q);
  const int D = head_dim_bucket(q.size(3), v.size(3), op);
  TORCH_CHECK(q.size(0) * q.size(1) <= std::numeric_limits<int32_t>::max(), op, ": B * Hq is too large");
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), Ev = v.size(3);
  at::Tensor out = at::empty({B, Hq, L, Ev}, q.options());
  at::Tensor lse = at::empty({B, Hq, L}, q.options().dtype(attention::lse_dtype(q.scalar_type())));
  if (B * Hq * L == 0) return {out, lse};
  const at::Tensor qc = unit_last_stride(q), kc = unit_last_stride(k), vc = unit_last_stride(v);
  const at::Tensor vl = prepare_valid_lens(valid_lens);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor bad = is_causal ? nonfinite_heads(kc, vc) : at::Tensor();
  const double sc = q.size(3) == 0 ? 0.0 : scale;  // E = 0: scores 0 whatever the scale (torch's 1 / sqrt(0))
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cuda", [&] {
    AttnParams<scalar_t> p = make_params<scalar_t>(qc, kc, vc, attn_mask, vl, is_causal, sc, dropout_p, seed, offset);
    p.out = out.mutable_data_ptr<scalar_t>();
    p.lse = lse.mutable_data_ptr();
    p.bad = bad.defined() ? bad.const_data_ptr<bool>() : nullptr;
    if (D == 64) launch_fwd<scalar_t, 64>(p, stream);
    else if (D == 128) launch_fwd<scalar_t, 128>(p, stream);
    else launch_fwd<scalar_t, 256>(p, stream);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& attn_mask, const std::optional<at::Tensor>& valid_lens,
    bool is_causal, double scale, double dropout_p, int64_t seed, int64_t offset, std::array<bool, 4> output_mask) {
  constexpr const char* op = "attention_bwd";
  attention::check(op, q, k, v, attn_mask, valid_lens, dropout_p);
  attention::check_bwd_tensors(op, grad_out, out, lse, q, v);
  attention::check_output_mask(op, attn_mask, output_mask);
  check_cuda(op, q);
  const int D = head_dim_bucket(q.size(3), v.size(3), op);
  TORCH_CHECK(k.size(0) * k.size(1) <= std::numeric_limits<int32_t>::max(), op, ": B * Hk is too large");
  c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), Hq = q.size(1), L = q.size(2), E = q.size(3);
  const int64_t Hk = k.size(1), S = k.size(2), Ev = v.size(3);
  const at::ScalarType acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // gradients not asked for: empty (0,) tensors
  const at::Tensor none = at::empty({0}, q.options());
  at::Tensor dq_acc = output_mask[0] ? at::zeros({B, Hq, L, E}, q.options().dtype(acc)) : none;
  at::Tensor grad_k = output_mask[1] ? at::zeros({B, Hk, S, E}, q.options()) : none;
  at::Tensor grad_v = output_mask[2] ? at::zeros({B, Hk, S, Ev}, q.options()) : none;
  at::Tensor dmask = output_mask[3] ? at::zeros({B, Hq, L, S}, q.options().dtype(acc)) : none;
  const bool any = output_mask[0] || output_mask[1] || output_mask[2] || output_mask[3];
  if (any && B * Hq * L > 0 && S > 0 && Ev > 0) {
    const at::Tensor qc = unit_last_stride(q), kc = unit_last_stride(k), vc = unit_last_stride(v);
    const at::Tensor doc = unit_last_stride(grad_out), oc = unit_last_stride(out);
    const at::Tensor lsec = lse.contiguous();
    const at::Tensor vl = prepare_valid_lens(valid_lens);
    at::Tensor delta = at::empty({B, Hq, L}, q.options().dtype(acc));
    at::Tensor bad;
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    const double sc = E == 0 ? 0.0 : scale;  // see attention_fwd_cuda
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cuda", [&] {
      AttnParams<scalar_t> p =
          make_params<scalar_t>(qc, kc, vc, attn_mask, vl, is_causal, sc, dropout_p, seed, offset);
      p.lse = const_cast<void*>(lsec.const_data_ptr());  // read only in the backward
      p.dout = doc.const_data_ptr<scalar_t>();
      p.o = oc.const_data_ptr<scalar_t>();
      p.do_sb = doc.stride(0), p.do_sh = doc.stride(1), p.do_sl = doc.stride(2);
      p.o_sb = oc.stride(0), p.o_sh = oc.stride(1), p.o_sl = oc.stride(2);
      p.delta = delta.mutable_data_ptr();
      p.dq_acc = output_mask[0] ? dq_acc.mutable_data_ptr() : nullptr;
      p.dk = output_mask[1] ? grad_k.mutable_data_ptr<scalar_t>() : nullptr;
      p.dv = output_mask[2] ? grad_v.mutable_data_ptr<scalar_t>() : nullptr;
      p.dmask = output_mask[3] ? dmask.mutable_data_ptr() : nullptr;
      const int64_t rows = B * Hq * L;
      _attention_bwd_delta_kernel<scalar_t>
          <<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (is_causal) bad = nonfinite_heads(kc, vc, qc, delta, lsec);
      p.bad = bad.defined() ? bad.const_data_ptr<bool>() : nullptr;
      if (D == 64) launch_bwd<scalar_t, 64>(p, stream);
      else if (D == 128) launch_bwd<scalar_t, 128>(p, stream);
      else launch_bwd<scalar_t, 256>(p, stream);
    });
  }
  at::Tensor grad_q = !output_mask[0] || dq_acc.scalar_type() == q.scalar_type() ? dq_acc : dq_acc.to(q.scalar_type());
  if (output_mask[3]) dmask = dmask.to(attn_mask->scalar_type());
  return {grad_q, grad_k, grad_v, dmask};
}

}  // namespace pyfastdl

TORCH_LIBRARY_IMPL(pyfastdl, CUDA, m) {
  m.impl("attention_fwd", &pyfastdl::attention_fwd_cuda);
  m.impl("attention_bwd", &pyfastdl::attention_bwd_cuda);
}
