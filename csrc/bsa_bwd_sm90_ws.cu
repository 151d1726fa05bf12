// Hopper (sm_90a) warp-specialised backward for block-sparse attention over 3D chunks (BSA), D = 128,
// 64-token query and key blocks (chunk volume 64), one key segment. Two kernels, no atomics
// (deterministic), the structure of the forward (bsa_fwd_sm90_ws.cu):
//
//   dkdv: one consumer warpgroup per KEY block; K and V stay in smem; the producer streams Q and dO
//         of every query block that selected it (the transposed selection, CSR) plus their lse
//         (times log2 e) and delta = rowsum(dO * O) rows:
//           S^T  = K Q^T            (wgmma m64n64k16, A = K, B = Q, both K-major)
//           dP^T = V dO^T           (same, A = V, B = dO)
//           P^T  = exp2(S^T * scale * log2 e - lse2[col])
//           dS^T = P^T * (dP^T - delta[col])
//           dV  += P^T dO           (wgmma m64n128k16, A = P^T from registers, B = dO MN-major)
//           dK  += dS^T Q           (same, B = Q)
//         then dK *= scale.
//   dq:   one consumer warpgroup per QUERY block; Q, dO, its lse and delta rows resident; the
//         producer streams K and V of its selected key blocks:
//           S = Q K^T, dP = dO V^T, P = exp2(S * c - lse2[row]) (key slots outside the grid -> 0),
//           dS = P * (dP - delta[row]), dQ += dS K (B = K MN-major); dQ *= scale.
//
// CTA = 3 warpgroups: warpgroup 0 = producer (warp c serves consumer c: lane 0 issues the TMA boxes,
// in dkdv all 32 lanes write the lse/delta rows of each streamed query block into smem before lane 0
// arrives on the stage's full barrier), warpgroups 1, 2 = consumers, one 64-token block each. Every
// block is one 5D TMA box per 64 columns ({D, heads, W, H, T} view, 128-byte swizzle), as in the
// forward. Per tile the order is plain (S and dP, elementwise, dV GEMM, dK GEMM; nothing in flight
// across tiles). Rows outside the grid: their tiles are zero-filled by TMA (and, in dkdv, their lse
// is +inf), so they add nothing; output rows outside the grid are not stored. An empty list stores
// zeros. Batches are separate launches. No torch headers.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#include <cmath>

#include "attn_common.cuh"
#include "attn_fwd.h"
#include "bsa_ws_common.cuh"
#include "sm90_ws_common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LONGCAT_BSA_BWD_WS 1
#endif

namespace longcat {
namespace {

using namespace detail;
using namespace bsaws;

constexpr int kWD = 128;                  // head dim
constexpr int kWRows = 64;                // rows of a block
constexpr int kWTile = kWRows * kWD * 2;  // 16 KB
constexpr int kWPanel = kWRows * 128;     // 8 KB
constexpr int kWThreads = 384;
constexpr int kWStages = 2;
constexpr float kLog2e = 1.4426950408889634f;

struct BsaBwdWsParams {
  CUtensorMap tq, tk, tv, tdo;  // 5D {D, heads, W, H, T} of one batch (q/dO on the query grid, k/v on the key grid)
  const float* lse;             // [H, Sq] of this batch (natural log), row stride ls_sh
  const float* delta;           // [H, Sq] of this batch, row stride ls_sh
  int64_t ls_sh;
  void* dst0;  // dkdv: dK, dq: dQ (batch base)
  void* dst1;  // dkdv: dV
  int64_t d0_ss, d0_sh, d1_ss, d1_sh;
  // own-block lists: dq: selection indices [H, Nq, max_sel] / counts [H, Nq];
  // dkdv: CSR of the transposed selection: list of (h, kb) = qlist[off[h*Nk+kb] .. off[h*Nk+kb+1])
  const int* sel_idx;
  const int* sel_cnt;
  int64_t si_sh, si_sq, sc_sh, sc_sq;
  int max_sel;
  const int* t_off;
  const int* t_q;
  int heads, nq, nk;
  int gq[3], cq[3], nbq[3];
  int gk[3], ck[3], nbk[3];
  float scale, scale_log2;
};

struct BwdSmem {
  // R[consumer][2] (resident) | S0[consumer][stage] | S1[consumer][stage] | LD[consumer][stage][128]
  // | tables | barriers
  static constexpr int kR = 0;
  static constexpr int kS0 = kR + 4 * kWTile;
  static constexpr int kS1 = kS0 + 2 * kWStages * kWTile;
  static constexpr int kLD = kS1 + 2 * kWStages * kWTile;
  static constexpr int kTab = kLD + 2 * kWStages * 128 * 4;  // qtab[64], ktab[64]
  static constexpr int kBar = kTab + 2 * 64 * 4;
  // r_full[2], then per consumer and stage: s0_full, s0_empty, s1_full, s1_empty
  static constexpr int kBytes = kBar + 8 * (2 + 2 * kWStages * 4);
  static constexpr int kAlloc = kBytes + 1024;
};

#ifdef LONGCAT_BSA_BWD_WS

using namespace sm90ws;

__device__ __forceinline__ int geo_of(int r, const int (&c)[3]) {
  return (r / (c[2] * c[1])) | (((r / c[2]) % c[1]) << 8) | ((r % c[2]) << 16);
}

template <typename T, bool kDq>
__device__ __forceinline__ void bsa_bwd_body(const BsaBwdWsParams& p, unsigned char* smem) {
  using W = Wgmma<T>;
  using M = MmaType<T>;
  using Sm = BwdSmem;
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int h = blockIdx.y;
  const int pair = blockIdx.x;
  const int n_own = kDq ? p.nq : p.nk;

  const uint32_t sbase = smem_u32(smem);
  int* qtab = reinterpret_cast<int*>(smem + Sm::kTab);
  int* ktab = qtab + 64;
  float* ld = reinterpret_cast<float*>(smem + Sm::kLD);
  const uint32_t bar0 = sbase + Sm::kBar;
  auto bar_r = [&](int c) { return bar0 + 8 * c; };
  // kind: 0 s0_full, 1 s0_empty, 2 s1_full, 3 s1_empty
  auto bar_at = [&](int c, int s, int kind) { return bar0 + 8 * (2 + (c * kWStages + s) * 4 + kind); };
  auto sR = [&](int c, int i) { return sbase + Sm::kR + (c * 2 + i) * kWTile; };
  auto sS0 = [&](int c, int s) { return sbase + Sm::kS0 + (c * kWStages + s) * kWTile; };
  auto sS1 = [&](int c, int s) { return sbase + Sm::kS1 + (c * kWStages + s) * kWTile; };
  auto ld_at = [&](int c, int s) { return ld + (c * kWStages + s) * 128; };  // [0, 64): lse2, [64, 128): delta

  // own block geometry (dq: query blocks, dkdv: key blocks) and streamed block geometry
  const int(&own_nb)[3] = kDq ? p.nbq : p.nbk;
  const int(&own_c)[3] = kDq ? p.cq : p.ck;
  const int(&own_g)[3] = kDq ? p.gq : p.gk;
  const int(&str_nb)[3] = kDq ? p.nbk : p.nbq;
  const int(&str_c)[3] = kDq ? p.ck : p.cq;
  const int(&str_g)[3] = kDq ? p.gk : p.gq;

  if (tid < 64) {
    qtab[tid] = geo_of(tid, p.cq);
    ktab[tid] = geo_of(tid, p.ck);
  }
  if (tid == 0) {
    for (int c = 0; c < 2; ++c) {
      mbar_init(bar_r(c), 1);
      for (int s = 0; s < kWStages; ++s) {
        mbar_init(bar_at(c, s, 0), 1);
        mbar_init(bar_at(c, s, 1), 4);  // one arrive per consumer warp
        mbar_init(bar_at(c, s, 2), 1);
        mbar_init(bar_at(c, s, 3), 4);
      }
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // the list of the consumer's own block: n entries, entry(i) (may be out of range: skipped)
  auto list_len = [&](int own) -> int {
    if constexpr (kDq) {
      return min(p.sel_cnt[h * p.sc_sh + own * p.sc_sq], p.max_sel);
    } else {
      return p.t_off[h * p.nk + own + 1] - p.t_off[h * p.nk + own];
    }
  };
  auto list_at = [&](int own, int i) -> int {
    if constexpr (kDq) {
      return p.sel_idx[h * p.si_sh + own * p.si_sq + i];
    } else {
      return p.t_q[p.t_off[h * p.nk + own] + i];
    }
  };
  const int n_str = kDq ? p.nk : p.nq;  // blocks of the streamed kind

  if (wg == 0) {
    // ---------------- producer: warp c serves consumer c ----------------
    setmaxnreg_dec<40>();
    const int c = tid / 32;
    const int lane = tid % 32;
    const int own = pair * 2 + c;
    if (c >= 2 || own >= n_own) return;
    if (lane == 0) {
      prefetch_map(&p.tq);
      prefetch_map(&p.tk);
      prefetch_map(&p.tv);
      prefetch_map(&p.tdo);
      int t0, h0, w0;
      b_origin(own, own_nb, own_c, t0, h0, w0);
      const CUtensorMap* m0 = kDq ? &p.tq : &p.tk;
      const CUtensorMap* m1 = kDq ? &p.tdo : &p.tv;
      mbar_expect_tx(bar_r(c), 2 * kWTile);
      tma_load5(sR(c, 0), m0, 0, h, w0, h0, t0, bar_r(c));
      tma_load5(sR(c, 0) + kWPanel, m0, 64, h, w0, h0, t0, bar_r(c));
      tma_load5(sR(c, 1), m1, 0, h, w0, h0, t0, bar_r(c));
      tma_load5(sR(c, 1) + kWPanel, m1, 64, h, w0, h0, t0, bar_r(c));
    }
    const CUtensorMap* m0 = kDq ? &p.tk : &p.tq;
    const CUtensorMap* m1 = kDq ? &p.tv : &p.tdo;
    const int n = list_len(own);
    int j = 0;
    for (int i = 0; i < n; ++i) {
      const int blk = list_at(own, i);
      if (blk < 0 || blk >= n_str) continue;
      int t0, h0, w0;
      b_origin(blk, str_nb, str_c, t0, h0, w0);
      const int s = j % kWStages;
      const uint32_t par = ((j / kWStages) & 1) ^ 1;
      if (j >= kWStages) mbar_wait(bar_at(c, s, 1), par);
      if constexpr (!kDq) {
        // lse2 / delta rows of the streamed query block, in slot order; +inf / 0 outside the grid
        float* dstl = ld_at(c, s);
#pragma unroll
        for (int rr = 0; rr < 2; ++rr) {
          const int r = lane + 32 * rr;
          const int geo = qtab[r];
          const int t = t0 + (geo & 255), hh = h0 + ((geo >> 8) & 255), w = w0 + (geo >> 16);
          float l2 = INFINITY, dl = 0.f;
          if (t < p.gq[0] && hh < p.gq[1] && w < p.gq[2]) {
            const int64_t tok = (static_cast<int64_t>(t) * p.gq[1] + hh) * p.gq[2] + w;
            l2 = p.lse[h * p.ls_sh + tok] * kLog2e;
            dl = p.delta[h * p.ls_sh + tok];
          }
          dstl[r] = l2;
          dstl[64 + r] = dl;
        }
        __syncwarp();  // the lanes' smem writes before lane 0's release-arrive below
      }
      if (lane == 0) {
        mbar_expect_tx(bar_at(c, s, 0), kWTile);
        tma_load5(sS0(c, s), m0, 0, h, w0, h0, t0, bar_at(c, s, 0));
        tma_load5(sS0(c, s) + kWPanel, m0, 64, h, w0, h0, t0, bar_at(c, s, 0));
      }
      if (j >= kWStages) mbar_wait(bar_at(c, s, 3), par);
      if (lane == 0) {
        mbar_expect_tx(bar_at(c, s, 2), kWTile);
        tma_load5(sS1(c, s), m1, 0, h, w0, h0, t0, bar_at(c, s, 2));
        tma_load5(sS1(c, s) + kWPanel, m1, 64, h, w0, h0, t0, bar_at(c, s, 2));
      }
      ++j;
    }
    return;
  }

  // ---------------- consumers ----------------
  setmaxnreg_inc<232>();
  const int cw = wg - 1;
  const int own = pair * 2 + cw;
  if (own >= n_own) return;
  const int ctid = tid - 128 * wg;
  const int warp = ctid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const float c2 = p.scale_log2;

  // valid list entries (the producer issues exactly these)
  const int n = list_len(own);
  int n_tiles = 0;
  for (int i0 = 0; i0 < n; i0 += 32) {
    const int i = i0 + lane;
    const int blk = i < n ? list_at(own, i) : -1;
    n_tiles += __popc(__ballot_sync(0xffffffffu, blk >= 0 && blk < n_str));
  }
  int ot0, oh0, ow0;
  b_origin(own, own_nb, own_c, ot0, oh0, ow0);

  // dq: this thread's two query rows (g, g + 8 of its warp's 16): lse2 and delta, +inf / 0 outside
  float row_l2[2] = {INFINITY, INFINITY};
  float row_dl[2] = {0.f, 0.f};
  if constexpr (kDq) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int geo = qtab[warp * 16 + g + 8 * e];
      const int t = ot0 + (geo & 255), hh = oh0 + ((geo >> 8) & 255), w = ow0 + (geo >> 16);
      if (t < p.gq[0] && hh < p.gq[1] && w < p.gq[2]) {
        const int64_t tok = (static_cast<int64_t>(t) * p.gq[1] + hh) * p.gq[2] + w;
        row_l2[e] = p.lse[h * p.ls_sh + tok] * kLog2e;
        row_dl[e] = p.delta[h * p.ls_sh + tok];
      }
    }
  }

  float acc0[16][4];  // dq: dQ; dkdv: dK
  float acc1[16][4];  // dkdv: dV (unused in dq)
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    acc0[i][0] = acc0[i][1] = acc0[i][2] = acc0[i][3] = 0.f;
    acc1[i][0] = acc1[i][1] = acc1[i][2] = acc1[i][3] = 0.f;
  }
  float s[8][4];
  float dp[8][4];
  uint32_t pa[4][4];

  const uint32_t r0 = sR(cw, 0);  // dq: Q, dkdv: K
  const uint32_t r1 = sR(cw, 1);  // dq: dO, dkdv: V
  auto issue_s_dp = [&](int st) {
    const uint32_t b0 = sS0(cw, st);  // dq: K, dkdv: Q
    const uint32_t b1 = sS1(cw, st);  // dq: V, dkdv: dO
    fence_acc(s);
    fence_acc(dp);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kWD / 16; ++kk) {
      const uint32_t off = (kk >> 2) * kWPanel + (kk & 3) * 32;
      W::ss64(s, desc128(r0 + off, 16, 1024), desc128(b0 + off, 16, 1024), kk > 0);
    }
#pragma unroll
    for (int kk = 0; kk < kWD / 16; ++kk) {
      const uint32_t off = (kk >> 2) * kWPanel + (kk & 3) * 32;
      W::ss64(dp, desc128(r1 + off, 16, 1024), desc128(b1 + off, 16, 1024), kk > 0);
    }
    wg_commit();
  };
  // acc[64 x 128] += A (registers, 64 x 64) x B (smem tile [64 x 128], MN-major)
  auto issue_rs = [&](float (&acc)[16][4], uint32_t b_base) {
    fence_acc(acc);
    fence_pa(pa);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kWRows / 16; ++kk) {
      W::rs128(acc, pa[kk], desc128(b_base + kk * 16 * 128, kWPanel, 1024));
    }
    wg_commit();
  };
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbar_arrive(bar);
  };

  mbar_wait(bar_r(cw), 0);  // always: no TMA may still write this CTA's smem when it exits
  int cur = 0;
  for (int j = 0; j < n_tiles; ++j) {
    int blk = -1;
    while (cur < n) {  // the next valid entry (the same walk as the producer's)
      blk = list_at(own, cur++);
      if (blk >= 0 && blk < n_str) break;
      blk = -1;
    }
    const int st = j % kWStages;
    const uint32_t par = (j / kWStages) & 1;
    mbar_wait(bar_at(cw, st, 0), par);
    mbar_wait(bar_at(cw, st, 2), par);
    issue_s_dp(st);
    wg_wait<0>();
    fence_acc(s);
    fence_acc(dp);
    if constexpr (kDq) {
      // key slots outside the key grid (partial edge blocks): P = 0
      int t0, h0, w0;
      b_origin(blk, p.nbk, p.ck, t0, h0, w0);
      const int lt = p.gk[0] - t0, lh = p.gk[1] - h0, lw = p.gk[2] - w0;
      const bool edge = lt < p.ck[0] || lh < p.ck[1] || lw < p.ck[2];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          bool ok = true;
          if (edge) {
            const int r = ktab[i * 8 + 2 * tq + jj];
            ok = (r & 255) < lt && ((r >> 8) & 255) < lh && (r >> 16) < lw;
          }
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = ok ? fast_exp2(fmaf(s[i][jj + 2 * e], c2, -row_l2[e])) : 0.f;
            dp[i][jj + 2 * e] = pv * (dp[i][jj + 2 * e] - row_dl[e]);
          }
        }
      }
      pack_p<M>(dp, pa);
      issue_rs(acc0, sS0(cw, st));  // dQ += dS K
      wg_wait<0>();
      fence_acc(acc0);
      fence_pa(pa);
    } else {
      const float* l = ld_at(cw, st);
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const int col = i * 8 + 2 * tq + jj;
          const float l2 = l[col];
          const float dl = l[64 + col];
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pv = fast_exp2(fmaf(s[i][jj + 2 * e], c2, -l2));
            s[i][jj + 2 * e] = pv;
            dp[i][jj + 2 * e] = pv * (dp[i][jj + 2 * e] - dl);
          }
        }
      }
      pack_p<M>(s, pa);
      issue_rs(acc1, sS1(cw, st));  // dV += P^T dO
      wg_wait<0>();
      fence_acc(acc1);
      fence_pa(pa);
      pack_p<M>(dp, pa);
      issue_rs(acc0, sS0(cw, st));  // dK += dS^T Q
      wg_wait<0>();
      fence_acc(acc0);
      fence_pa(pa);
    }
    release(bar_at(cw, st, 1));
    release(bar_at(cw, st, 3));
  }

  // epilogue: rows of the own block inside its grid
  T* d0 = static_cast<T*>(p.dst0) + h * p.d0_sh;
  T* d1 = static_cast<T*>(p.dst1) + h * p.d1_sh;
  const int* tab = kDq ? qtab : ktab;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int r = warp * 16 + g + 8 * e;
    const int geo = tab[r];
    const int t = ot0 + (geo & 255), hh = oh0 + ((geo >> 8) & 255), w = ow0 + (geo >> 16);
    if (t < own_g[0] && hh < own_g[1] && w < own_g[2]) {
      const int64_t tok = (static_cast<int64_t>(t) * own_g[1] + hh) * own_g[2] + w;
      T* p0 = d0 + tok * p.d0_ss;
#pragma unroll
      for (int i = 0; i < 16; ++i)
        M::store2(p0 + i * 8 + 2 * tq, acc0[i][2 * e] * p.scale, acc0[i][2 * e + 1] * p.scale);
      if constexpr (!kDq) {
        T* p1 = d1 + tok * p.d1_ss;
#pragma unroll
        for (int i = 0; i < 16; ++i) M::store2(p1 + i * 8 + 2 * tq, acc1[i][2 * e], acc1[i][2 * e + 1]);
      }
    }
  }
  (void)str_g;
}

#endif  // LONGCAT_BSA_BWD_WS

template <typename T, bool kDq>
__global__ void __launch_bounds__(kWThreads, 1) bsa_bwd_sm90ws_kernel(const __grid_constant__ BsaBwdWsParams p) {
#ifdef LONGCAT_BSA_BWD_WS
  extern __shared__ unsigned char bsa_bwd_smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(bsa_bwd_smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  bsa_bwd_body<T, kDq>(p, smem);
#else
  __trap();  // built for another target: the host only launches this kernel from an sm_90a binary
#endif
}

template <typename T, bool kDq>
cudaError_t launch_bwd(const BsaBwdWsParams& bp, dim3 grid, cudaStream_t stream) {
  auto* fn = bsa_bwd_sm90ws_kernel<T, kDq>;
  const int smem = BwdSmem::kAlloc;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  fn<<<grid, kWThreads, smem, stream>>>(bp);
  return cudaGetLastError();
}

}  // namespace

bool bsa_bwd_sm90ws_supported(const BsaBwdParams& p, int head_dim) {
  if (head_dim != kWD || !bsa_fwd_sm90ws_available()) return false;
  int vq = 1, vk = 1;
  for (int a = 0; a < 3; ++a) {
    if (p.cq[a] <= 0 || p.ck[a] <= 0 || p.cq[a] > 64 || p.ck[a] > 64) return false;
    vq *= p.cq[a];
    vk *= p.ck[a];
  }
  if (vq != kWRows || vk != kWRows) return false;
  if (static_cast<int64_t>(p.gq[0]) * p.gq[1] * p.gq[2] != p.sq) return false;
  if (static_cast<int64_t>(p.gk[0]) * p.gk[1] * p.gk[2] != p.sk) return false;
  return bsa_aligned16(p.q, {p.q_sb, p.q_ss, p.q_sh}) && bsa_aligned16(p.k, {p.k_sb, p.k_ss, p.k_sh}) &&
         bsa_aligned16(p.v, {p.v_sb, p.v_ss, p.v_sh}) && bsa_aligned16(p.dout, {p.do_sb, p.do_ss, p.do_sh});
}

cudaError_t bsa_bwd_sm90ws(const BsaBwdParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (!bsa_bwd_sm90ws_supported(p, head_dim)) return cudaErrorNotSupported;
  if (p.batch <= 0 || p.heads <= 0 || p.sq <= 0 || p.sk <= 0) return cudaSuccess;
  if (p.heads > 65535 || (p.num_q_blocks + 1) / 2 > 65535 || (p.num_k_blocks + 1) / 2 > 65535)
    return cudaErrorNotSupported;
  const int es = 2;
  for (int b = 0; b < p.batch; ++b) {
    BsaBwdWsParams bp{};
    const char* qb = static_cast<const char*>(p.q) + b * p.q_sb * es;
    const char* kb = static_cast<const char*>(p.k) + b * p.k_sb * es;
    const char* vb = static_cast<const char*>(p.v) + b * p.v_sb * es;
    const char* db = static_cast<const char*>(p.dout) + b * p.do_sb * es;
    const bool ok = make_map5(&bp.tq, qb, dtype, p.heads, p.q_ss, p.q_sh, p.gq, p.cq) &&
                    make_map5(&bp.tdo, db, dtype, p.heads, p.do_ss, p.do_sh, p.gq, p.cq) &&
                    make_map5(&bp.tk, kb, dtype, p.heads, p.k_ss, p.k_sh, p.gk, p.ck) &&
                    make_map5(&bp.tv, vb, dtype, p.heads, p.v_ss, p.v_sh, p.gk, p.ck);
    if (!ok) return b == 0 ? cudaErrorNotSupported : cudaErrorInvalidValue;
    bp.lse = p.lse + b * p.ls_sb;
    bp.delta = p.delta + b * p.ls_sb;
    bp.ls_sh = p.ls_sh;
    bp.heads = p.heads;
    bp.nq = p.num_q_blocks;
    bp.nk = p.num_k_blocks;
    for (int a = 0; a < 3; ++a) {
      bp.gq[a] = p.gq[a];
      bp.cq[a] = p.cq[a];
      bp.nbq[a] = p.nbq[a];
      bp.gk[a] = p.gk[a];
      bp.ck[a] = p.ck[a];
      bp.nbk[a] = p.nbk[a];
    }
    bp.scale = p.scale;
    bp.scale_log2 = p.scale * kLog2e;
    // dkdv over the transposed selection (CSR: offsets of this batch's heads, then query blocks)
    BsaBwdWsParams kv = bp;
    kv.dst0 = static_cast<char*>(p.dk) + b * p.dk_sb * es;
    kv.dst1 = static_cast<char*>(p.dv) + b * p.dv_sb * es;
    kv.d0_ss = p.dk_ss;
    kv.d0_sh = p.dk_sh;
    kv.d1_ss = p.dv_ss;
    kv.d1_sh = p.dv_sh;
    kv.t_off = p.t_off + static_cast<int64_t>(b) * p.heads * p.num_k_blocks;
    kv.t_q = p.t_q;
    dim3 grid_kv((p.num_k_blocks + 1) / 2, p.heads);
    cudaError_t err = dtype == DType::kBF16 ? launch_bwd<__nv_bfloat16, false>(kv, grid_kv, stream)
                                            : launch_bwd<__half, false>(kv, grid_kv, stream);
    if (err != cudaSuccess) return err;
    // dq over the selection
    BsaBwdWsParams dq = bp;
    dq.dst0 = static_cast<char*>(p.dq) + b * p.dq_sb * es;
    dq.dst1 = dq.dst0;
    dq.d0_ss = dq.d1_ss = p.dq_ss;
    dq.d0_sh = dq.d1_sh = p.dq_sh;
    dq.sel_idx = p.sel_idx + b * p.si_sb;
    dq.sel_cnt = p.sel_cnt + b * p.sc_sb;
    dq.si_sh = p.si_sh;
    dq.si_sq = p.si_sq;
    dq.sc_sh = p.sc_sh;
    dq.sc_sq = p.sc_sq;
    dq.max_sel = p.max_sel;
    dim3 grid_q((p.num_q_blocks + 1) / 2, p.heads);
    err = dtype == DType::kBF16 ? launch_bwd<__nv_bfloat16, true>(dq, grid_q, stream)
                                : launch_bwd<__half, true>(dq, grid_q, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace longcat
