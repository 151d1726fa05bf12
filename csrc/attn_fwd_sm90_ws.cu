// Hopper (sm_90a) warp-specialised forward for dense two-segment attention (FA3 structure), D = 128.
//
// CTA = 3 warpgroups (384 threads): warpgroup 0 is the producer (one thread issues TMA
// `cp.async.bulk.tensor` loads, registers lowered with setmaxnreg), warpgroups 1 and 2 are the
// consumers, 64 query rows each (BM = 128). Q is loaded once; K and V tiles of BN = 128 keys come
// through an mbarrier ring of kStages stages (full barriers: TMA transaction bytes; empty barriers:
// one arrive per consumer warp). Keys/values are [seg0; seg1] along seq, every tile lies in one
// segment (seg0 tiles first); TMA zero-fills rows past a segment's end and those keys are masked.
//
// Per consumer warpgroup and key tile: S = Q K^T with wgmma m64n128k16 (Q, K from 128B-swizzled
// smem, K-major), fp32 online softmax with exp2, O += P V with wgmma m64n128k16 (P from registers,
// V from smem, MN-major), with intra-warpgroup overlap: at key tile j the warpgroup issues
// Q K_j^T and P_{j-1} V_{j-1} together, then does softmax(j) while P_{j-1} V_{j-1} runs on the
// tensor cores. kStages = 2. Variants that measured slower or tied on the H100 (no overlap,
// ping-pong of the two consumer warpgroups through named barriers, 3 stages, the O rescale
// between the GEMM issues) were removed; their numbers are in csrc/NOTES.md (v6).
// TMA tensor maps are built on the host with cuTensorMapEncodeTiled obtained through
// cudaGetDriverEntryPointByVersion (no libcuda link). No torch headers.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#include <cmath>
#include <initializer_list>

#include "attn_common.cuh"
#include "attn_fwd.h"
#include "sm90_ws_common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LONGCAT_SM90WS 1
#endif

namespace longcat {
namespace {

using namespace detail;

constexpr int kWsD = 128;   // head dim
constexpr int kWsBM = 128;  // query rows per CTA (2 consumer warpgroups x 64)
constexpr int kWsBN = 128;  // keys per tile
constexpr int kWsThreads = 384;
constexpr int kWsTileBytes = kWsBN * kWsD * 2;  // one K or V tile (= the Q tile)
constexpr int kStages = 2;  // K and V ring depth (3 stages tied on the H100, NOTES.md v6)
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;

struct WsParams {
  CUtensorMap tq, tk0, tv0, tk1, tv1;  // dims {D, S, H, B}; seg0 maps have B = 1 when broadcast
  float* lse;
  void* out;
  int64_t o_sb, o_ss, o_sh;
  int64_t lse_sb, lse_sh;
  int heads, sq, s0, s1;
  int bcast0;  // seg0 broadcast over the batch (its maps have B = 1)
  float scale_log2;
};

struct WsSmem {
  static constexpr int kQ = 0;
  static constexpr int kK = kWsTileBytes;
  static constexpr int kV = kK + kStages * kWsTileBytes;
  static constexpr int kBar = kV + kStages * kWsTileBytes;
  // barriers: q_full, k_full[S], k_empty[S], v_full[S], v_empty[S]
  static constexpr int kBytes = kBar + 8 * (1 + 4 * kStages);
  static constexpr int kAlloc = kBytes + 1024;  // slack to align the base to 1024 B
};

#ifdef LONGCAT_SM90WS

using namespace sm90ws;  // wgmma, mbarrier, TMA and setmaxnreg helpers (sm90_ws_common.cuh)

// Key tile j of [seg0; seg1]: segment, first row inside the segment, valid rows.
struct TileRef {
  int seg, row, valid;
};
__device__ __forceinline__ TileRef tile_ref(int j, int n0, int s0, int s1) {
  TileRef t;
  if (j < n0) {
    t.seg = 0;
    t.row = j * kWsBN;
    t.valid = min(kWsBN, s0 - t.row);
  } else {
    t.seg = 1;
    t.row = (j - n0) * kWsBN;
    t.valid = min(kWsBN, s1 - t.row);
  }
  return t;
}

template <typename T>
__device__ __forceinline__ void ws_body(const WsParams& p, unsigned char* smem) {
  using Sm = WsSmem;
  using W = Wgmma<T>;
  using M = MmaType<T>;
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int m_tile = blockIdx.x;
  const int h = blockIdx.y % p.heads;
  const int b = blockIdx.y / p.heads;
  const int n0 = (p.s0 + kWsBN - 1) / kWsBN;
  const int n1 = (p.s1 + kWsBN - 1) / kWsBN;
  const int n_tiles = n0 + n1;

  const uint32_t sbase = smem_u32(smem);
  const uint32_t sQ = sbase + Sm::kQ;
  const uint32_t sK = sbase + Sm::kK;
  const uint32_t sV = sbase + Sm::kV;
  const uint32_t bar_q = sbase + Sm::kBar;
  auto bar_kf = [&](int s) { return bar_q + 8 * (1 + s); };
  auto bar_ke = [&](int s) { return bar_q + 8 * (1 + kStages + s); };
  auto bar_vf = [&](int s) { return bar_q + 8 * (1 + 2 * kStages + s); };
  auto bar_ve = [&](int s) { return bar_q + 8 * (1 + 3 * kStages + s); };

  if (tid == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bar_kf(s), 1);
      mbar_init(bar_vf(s), 1);
      mbar_init(bar_ke(s), 8);  // one arrive per consumer warp
      mbar_init(bar_ve(s), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    setmaxnreg_dec<kProducerRegs>();
    if (tid == 0) {
      prefetch_map(&p.tq);
      prefetch_map(&p.tk0);
      prefetch_map(&p.tv0);
      prefetch_map(&p.tk1);
      prefetch_map(&p.tv1);
      const int b0 = p.bcast0 ? 0 : b;
      mbar_expect_tx(bar_q, kWsTileBytes);
      tma_load4(sQ, &p.tq, 0, m_tile * kWsBM, h, b, bar_q);
      tma_load4(sQ + kWsBM * 128, &p.tq, 64, m_tile * kWsBM, h, b, bar_q);
      for (int j = 0; j < n_tiles; ++j) {
        const int s = j % kStages;
        const uint32_t par = ((j / kStages) & 1) ^ 1;
        const TileRef t = tile_ref(j, n0, p.s0, p.s1);
        const CUtensorMap* mk = t.seg == 0 ? &p.tk0 : &p.tk1;
        const CUtensorMap* mv = t.seg == 0 ? &p.tv0 : &p.tv1;
        const int bb = t.seg == 0 ? b0 : b;
        if (j >= kStages) mbar_wait(bar_ke(s), par);
        mbar_expect_tx(bar_kf(s), kWsTileBytes);
        tma_load4(sK + s * kWsTileBytes, mk, 0, t.row, h, bb, bar_kf(s));
        tma_load4(sK + s * kWsTileBytes + kWsBN * 128, mk, 64, t.row, h, bb, bar_kf(s));
        if (j >= kStages) mbar_wait(bar_ve(s), par);
        mbar_expect_tx(bar_vf(s), kWsTileBytes);
        tma_load4(sV + s * kWsTileBytes, mv, 0, t.row, h, bb, bar_vf(s));
        tma_load4(sV + s * kWsTileBytes + kWsBN * 128, mv, 64, t.row, h, bb, bar_vf(s));
      }
    }
    return;
  }

  // ---------------- consumers ----------------
  setmaxnreg_inc<kConsumerRegs>();
  const int cw = wg - 1;  // consumer warpgroup 0/1: query rows cw*64 .. cw*64+63
  const int ctid = tid - 128;
  const int warp = (ctid / 32) % 4;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const float c2 = p.scale_log2;

  float o[16][4];
#pragma unroll
  for (int i = 0; i < 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};
  float l_r[2] = {0.f, 0.f};
  float s[16][4];
  uint32_t pa[8][4];

  const uint32_t q_base = sQ + cw * 64 * 128;
  auto issue_qk = [&](int st) {
    const uint32_t k_base = sK + st * kWsTileBytes;
    fence_acc(s);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kWsD / 16; ++kk) {
      const uint32_t off = (kk & 3) * 32;  // k16 step inside a 64-column panel
      W::ss128(s, desc128(q_base + (kk >> 2) * (kWsBM * 128) + off, 16, 1024),
            desc128(k_base + (kk >> 2) * (kWsBN * 128) + off, 16, 1024), kk > 0);
    }
    wg_commit();
  };
  auto issue_pv = [&](int st) {
    const uint32_t v_base = sV + st * kWsTileBytes;
    fence_acc(o);
    fence_pa(pa);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kWsBN / 16; ++kk) {
      W::rs128(o, pa[kk], desc128(v_base + kk * 16 * 128, kWsBN * 128, 1024));
    }
    wg_commit();
  };
  // masks keys >= valid of the current tile (only partial tiles at a segment's end)
  auto mask = [&](int valid) {
    if (valid < kWsBN) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int c = i * 8 + 2 * tq;
        if (c >= valid) s[i][0] = s[i][2] = -INFINITY;
        if (c + 1 >= valid) s[i][1] = s[i][3] = -INFINITY;
      }
    }
  };
  // online softmax of s (in place: s becomes P); returns the O rescale factors
  auto softmax = [&](float (&alpha)[2]) { online_softmax(s, m_r, l_r, c2, alpha); };
  auto convert_p = [&]() { pack_p<M>(s, pa); };
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbar_arrive(bar);
  };

  mbar_wait(bar_q, 0);
  if (n_tiles > 0) {
    // tile 0: S only
    mbar_wait(bar_kf(0), 0);
    issue_qk(0);
    wg_wait<0>();
    fence_acc(s);
    release(bar_ke(0));
    mask(tile_ref(0, n0, p.s0, p.s1).valid);
    float alpha[2];
    softmax(alpha);  // O is zero: no rescale
    convert_p();
    for (int j = 1; j < n_tiles; ++j) {
      const int st = j % kStages;
      const int sp = (j - 1) % kStages;
      mbar_wait(bar_kf(st), (j / kStages) & 1);
      mbar_wait(bar_vf(sp), ((j - 1) / kStages) & 1);
      issue_qk(st);
      issue_pv(sp);
      wg_wait<1>();  // S_j ready, P_{j-1} V_{j-1} may still run
      fence_acc(s);
      release(bar_ke(st));
      mask(tile_ref(j, n0, p.s0, p.s1).valid);
      softmax(alpha);
      // The wait for P_{j-1} V_{j-1} sits behind a warp-uniform branch that depends on every
      // softmax result (row sums included): ptxas otherwise hoists the wait above the softmax
      // and serialises the two (seen in the SASS).
      const bool resc = __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f ||
                                                    !(l_r[0] >= 0.f) || !(l_r[1] >= 0.f));
      if (resc) {
        wg_wait<0>();
        fence_acc(o);
        fence_pa(pa);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          o[i][0] *= alpha[0];
          o[i][1] *= alpha[0];
          o[i][2] *= alpha[1];
          o[i][3] *= alpha[1];
        }
      } else {
        wg_wait<0>();
        fence_pa(pa);
        fence_acc(o);
      }
      release(bar_ve(sp));
      convert_p();
    }
    const int sl = (n_tiles - 1) % kStages;
    mbar_wait(bar_vf(sl), ((n_tiles - 1) / kStages) & 1);
    issue_pv(sl);
    wg_wait<0>();
    fence_acc(o);
    release(bar_ve(sl));
  }

  // epilogue: O / l -> out (rows past sq are not stored), lse in natural log
  T* ob = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
  // lse is optional: a null pointer means the caller did not ask for it
  float* lb = p.lse == nullptr ? nullptr : p.lse + b * p.lse_sb + h * p.lse_sh;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float l = l_r[e];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int tok = m_tile * kWsBM + cw * 64 + warp * 16 + g + 8 * e;
    const float inv = l == 0.f ? 0.f : 1.f / l;  // NaN l (a NaN reached the row) stays NaN
    if (tok < p.sq) {
      T* po = ob + (int64_t)tok * p.o_ss;
#pragma unroll
      for (int i = 0; i < 16; ++i) M::store2(po + i * 8 + 2 * tq, o[i][2 * e] * inv, o[i][2 * e + 1] * inv);
      if (tq == 0 && lb != nullptr) lb[tok] = l == 0.f ? -INFINITY : 0.6931471805599453f * (m_r[e] + __log2f(l));
    }
  }
}

#endif  // LONGCAT_SM90WS

template <typename T>
__global__ void __launch_bounds__(kWsThreads, 1) attn_fwd_sm90ws_kernel(const __grid_constant__ WsParams p) {
#ifdef LONGCAT_SM90WS
  extern __shared__ unsigned char ws_smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(ws_smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  ws_body<T>(p, smem);
#else
  // built for another target: the host only launches this kernel from an sm_90a binary
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault,
                                         &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// [B, S, H, 128] view (element strides) as a 4D tensor map {D, S, H, B}, box {64, 128, 1, 1},
// 128-byte swizzle, out-of-range rows zero-filled.
bool make_map(CUtensorMap* map, const void* ptr, DType dt, int64_t batch, int64_t seq, int64_t heads,
              int64_t sb, int64_t ss, int64_t sh) {
  auto fn = encode_fn();
  if (fn == nullptr) return false;
  const int64_t es = 2;
  if (sb == 0) {
    // an expanded batch (stride 0) cannot be mapped: batch b would read b * seq rows past the start;
    // segment 0 broadcast as a pair gets batch = 1 here (bcast0), the wrappers copy the others
    if (batch > 1) return false;
    sb = ss * seq;  // batch of 1: the stride is never used but must be valid
  }
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(kWsD), static_cast<cuuint64_t>(seq),
                        static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(batch)};
  cuuint64_t strides[3] = {static_cast<cuuint64_t>(ss * es), static_cast<cuuint64_t>(sh * es),
                           static_cast<cuuint64_t>(sb * es)};
  cuuint32_t box[4] = {64, static_cast<cuuint32_t>(kWsBN), 1, 1};
  cuuint32_t estr[4] = {1, 1, 1, 1};
  const CUresult r = fn(map, dt == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                        4, const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

template <typename T>
cudaError_t launch_ws(const WsParams& wp, dim3 grid, cudaStream_t stream) {
  auto* fn = attn_fwd_sm90ws_kernel<T>;
  const int smem = WsSmem::kAlloc;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  fn<<<grid, kWsThreads, smem, stream>>>(wp);
  return cudaGetLastError();
}

bool aligned16(const void* ptr, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (int64_t s : strides) {
    if (s % 8 != 0 || s < 0) return false;
  }
  return true;
}

}  // namespace

bool attn_fwd_sm90ws_supported(const AttnFwdParams& p, int head_dim) {
  if (head_dim != kWsD || !attn_fwd_sm90_available() || encode_fn() == nullptr) return false;
  if (p.s0 < 0 || p.s1 < 0) return false;
  bool ok = aligned16(p.q, {p.q_sb, p.q_ss, p.q_sh});
  if (p.s0 > 0) ok = ok && aligned16(p.k0, {p.k0_sb, p.k0_ss, p.k0_sh}) && aligned16(p.v0, {p.v0_sb, p.v0_ss, p.v0_sh});
  if (p.s1 > 0) ok = ok && aligned16(p.k1, {p.k1_sb, p.k1_ss, p.k1_sh}) && aligned16(p.v1, {p.v1_sb, p.v1_ss, p.v1_sh});
  return ok;
}

bool attn_fwd_sm90ws_available() { return attn_fwd_sm90_available() && encode_fn() != nullptr; }

cudaError_t attn_fwd_dense_sm90ws(const AttnFwdParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (!attn_fwd_sm90ws_supported(p, head_dim)) return cudaErrorNotSupported;
  if (p.batch <= 0 || p.heads <= 0 || p.sq <= 0) return cudaSuccess;
  WsParams wp{};
  bool ok = make_map(&wp.tq, p.q, dtype, p.batch, p.sq, p.heads, p.q_sb, p.q_ss, p.q_sh);
  const bool bc0 = p.k0_sb == 0 && p.v0_sb == 0;
  const int64_t b0 = bc0 ? 1 : p.batch;
  // an empty segment gets the other segment's maps (never read: it has no tiles)
  const bool has0 = p.s0 > 0, has1 = p.s1 > 0;
  if (has0) {
    ok = ok && make_map(&wp.tk0, p.k0, dtype, b0, p.s0, p.heads, p.k0_sb, p.k0_ss, p.k0_sh) &&
         make_map(&wp.tv0, p.v0, dtype, b0, p.s0, p.heads, p.v0_sb, p.v0_ss, p.v0_sh);
  }
  if (has1) {
    ok = ok && make_map(&wp.tk1, p.k1, dtype, p.batch, p.s1, p.heads, p.k1_sb, p.k1_ss, p.k1_sh) &&
         make_map(&wp.tv1, p.v1, dtype, p.batch, p.s1, p.heads, p.v1_sb, p.v1_ss, p.v1_sh);
  }
  if (!ok) return cudaErrorNotSupported;  // the driver refused a tensor map: the caller raises
  if (!has0 && has1) {
    wp.tk0 = wp.tk1;
    wp.tv0 = wp.tv1;
  }
  if (!has1 && has0) {
    wp.tk1 = wp.tk0;
    wp.tv1 = wp.tv0;
  }
  if (!has0 && !has1) {
    wp.tk0 = wp.tv0 = wp.tk1 = wp.tv1 = wp.tq;
  }
  wp.lse = p.lse;
  wp.out = p.out;
  wp.o_sb = p.o_sb;
  wp.o_ss = p.o_ss;
  wp.o_sh = p.o_sh;
  wp.lse_sb = p.lse_sb;
  wp.lse_sh = p.lse_sh;
  wp.heads = p.heads;
  wp.sq = p.sq;
  wp.s0 = p.s0;
  wp.s1 = p.s1;
  wp.bcast0 = bc0 ? 1 : 0;
  wp.scale_log2 = p.scale_log2;
  const int64_t gy = static_cast<int64_t>(p.batch) * p.heads;
  if (gy > 65535) return cudaErrorNotSupported;
  dim3 grid((p.sq + kWsBM - 1) / kWsBM, static_cast<unsigned>(gy));
  if (dtype == DType::kBF16) return launch_ws<__nv_bfloat16>(wp, grid, stream);
  return launch_ws<__half>(wp, grid, stream);
}

}  // namespace longcat
