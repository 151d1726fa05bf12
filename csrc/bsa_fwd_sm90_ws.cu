// Hopper (sm_90a) warp-specialised forward for block-sparse attention over 3D chunks (BSA), D = 128,
// 64-token query and key blocks (chunk volume 64), keys/values from one segment or from two
// ([cache; fresh], the second starting on a key-block boundary along t).
//
// Every key block is one TMA box: K (and V, Q) [B, S, H, 128] is viewed per batch as a 5D tensor
// {D, heads, W, H, T} (strides: 1, sh, ss, ss*W, ss*W*H) and a block with origin (t0, h0, w0) is
// the box {64, 1, cw, ch, ct} at {d0, head, w0, h0, t0} (two boxes, d0 = 0 and 64, for D = 128),
// 128-byte swizzled: smem row r = (dt*ch + dh)*cw + dw, the block's slot order. Rows outside the
// grid (partial edge blocks) are zero-filled by TMA and masked (-inf) from the block geometry.
//
// CTA = 3 warpgroups (384 threads). Warpgroup 0 = producer (setmaxnreg.dec): warp c (c = 0, 1)
// serves consumer c; its lane 0 loads the consumer's query block once, then walks the consumer's
// selection list and issues the K and V boxes into that consumer's own ring of kStages stages
// (full barriers: TMA transaction bytes; empty barriers: one arrive per consumer warp).
// Warpgroups 1, 2 = consumers (setmaxnreg.inc), each owning ONE query block (64 rows, its own
// selection list): S = Q K^T with wgmma m64n64k16 (SS), fp32 online softmax with exp2,
// O += P V with wgmma m64n128k16 (RS, V transposed from smem). kOverlap: at iteration j the
// consumer issues Q K_j^T and P_{j-1} V_{j-1} together and does softmax(j) while P V runs (the
// wait for P V sits behind a warp-uniform branch on the softmax results so that ptxas cannot
// hoist it, as in attn_fwd_sm90_ws.cu). Selection entries outside [0, num key blocks) are
// skipped by both sides (same result as the other kernels, which mask them). Batches are
// separate launches (per-batch base pointers and tensor maps). No torch headers.
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
#include "bsa_ws_common.cuh"
#include "sm90_ws_common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LONGCAT_BSA_WS 1
#endif

namespace longcat {
namespace {

using namespace detail;
using namespace bsaws;

constexpr int kBD = 128;                    // head dim
constexpr int kBRows = 64;                  // rows of a query block / key block (chunk volume)
constexpr int kBTile = kBRows * kBD * 2;    // 16 KB: one Q, K or V tile (two 8 KB panels)
constexpr int kBPanel = kBRows * 128;       // 8 KB: one [64 x 64] 128B-swizzled panel
constexpr int kBThreads = 384;
constexpr int kBProducerRegs = 40;
constexpr int kBConsumerRegs = 232;

struct BsaWsParams {
  CUtensorMap tq, tk, tv;  // 5D {D, heads, W, H, T} of one batch; boxes {64, 1, cw, ch, ct}
  CUtensorMap tk1, tv1;    // second key segment (fresh tokens after a cache), frames >= split
  void* out;               // batch base
  float* lse;              // batch base
  const int* sel_idx;      // batch base
  const int* sel_cnt;      // batch base
  int64_t o_ss, o_sh, lse_sh;
  int64_t si_sh, si_sq, sc_sh, sc_sq;
  int heads, nq, max_sel, nbk_total;
  int gq[3], cq[3], nbq[3];
  int gk[3], ck[3], nbk[3];
  // two key segments: key frames [0, split) from tk/tv, [split, gk[0]) from tk1/tv1 (at frame
  // t - split); split is a multiple of ck[0], so no key block straddles the two. 0: one segment.
  int split;
  float scale_log2;
};

template <int kStages>
struct BsaSmem {
  // Q[2] | K[consumer][stage] | V[consumer][stage] | slot tables | barriers
  static constexpr int kQ = 0;
  static constexpr int kK = 2 * kBTile;
  static constexpr int kV = kK + 2 * kStages * kBTile;
  static constexpr int kTab = kV + 2 * kStages * kBTile;  // int qtab[64], ktab[64]: dt | dh<<8 | dw<<16
  static constexpr int kBar = kTab + 2 * 64 * 4;
  // barriers: q_full[2], then per consumer and stage: k_full, k_empty, v_full, v_empty
  static constexpr int kBytes = kBar + 8 * (2 + 2 * kStages * 4);
  static constexpr int kAlloc = kBytes + 1024;  // slack to align the base to 1024 B
};

#ifdef LONGCAT_BSA_WS

using namespace sm90ws;  // wgmma, mbarrier, TMA and setmaxnreg helpers (sm90_ws_common.cuh)


template <typename T, bool kOverlap, int kStages>
__device__ __forceinline__ void bsa_ws_body(const BsaWsParams& p, unsigned char* smem) {
  using Sm = BsaSmem<kStages>;
  using W = Wgmma<T>;
  using M = MmaType<T>;
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  // grid (query-block pairs, heads): co-resident CTAs share one head's K/V in L2 (a heads-fastest
  // grid measured 2x slower)
  const int h = blockIdx.y;
  const int pair = blockIdx.x;

  const uint32_t sbase = smem_u32(smem);
  int* qtab = reinterpret_cast<int*>(smem + Sm::kTab);
  int* ktab = qtab + 64;
  const uint32_t bar0 = sbase + Sm::kBar;
  auto bar_q = [&](int c) { return bar0 + 8 * c; };
  // private rings: consumer c, stage s < kStages
  auto bar_at = [&](int c, int s, int kind) { return bar0 + 8 * (2 + (c * kStages + s) * 4 + kind); };
  // kind: 0 k_full, 1 k_empty, 2 v_full, 3 v_empty
  auto sK = [&](int c, int s) { return sbase + Sm::kK + (c * kStages + s) * kBTile; };
  auto sV = [&](int c, int s) { return sbase + Sm::kV + (c * kStages + s) * kBTile; };
  auto sel_count = [&](int qb) { return min(p.sel_cnt[h * p.sc_sh + qb * p.sc_sq], p.max_sel); };
  auto sel_list = [&](int qb) { return p.sel_idx + h * p.si_sh + qb * p.si_sq; };

  if (tid < 64) {
    const int r = tid;
    qtab[r] = (r / (p.cq[2] * p.cq[1])) | (((r / p.cq[2]) % p.cq[1]) << 8) | ((r % p.cq[2]) << 16);
    ktab[r] = (r / (p.ck[2] * p.ck[1])) | (((r / p.ck[2]) % p.ck[1]) << 8) | ((r % p.ck[2]) << 16);
  }
  if (tid == 0) {
    for (int c = 0; c < 2; ++c) {
      mbar_init(bar_q(c), 1);
      for (int s = 0; s < kStages; ++s) {
        // empty barriers: one arrive per consumer warp
        mbar_init(bar_at(c, s, 0), 1);
        mbar_init(bar_at(c, s, 1), 4);
        mbar_init(bar_at(c, s, 2), 1);
        mbar_init(bar_at(c, s, 3), 4);
      }
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  // one key block (K or V) as two TMA boxes, from the segment that holds it
  auto load_block = [&](uint32_t dst, const CUtensorMap* m0, const CUtensorMap* m1, int blk, uint32_t bar) {
    int t0, h0, w0;
    b_origin(blk, p.nbk, p.ck, t0, h0, w0);
    const CUtensorMap* m = m0;
    if (p.split > 0 && t0 >= p.split) {
      m = m1;
      t0 -= p.split;
    }
    tma_load5(dst, m, 0, h, w0, h0, t0, bar);
    tma_load5(dst + kBPanel, m, 64, h, w0, h0, t0, bar);
  };

  if (wg == 0) {
    // ---------------- producer ----------------
    // private rings: warp c loads Q block c and serves consumer c
    setmaxnreg_dec<kBProducerRegs>();
    const int c = tid / 32;
    if ((tid % 32) != 0 || c >= 2) return;
    prefetch_map(&p.tq);
    prefetch_map(&p.tk);
    prefetch_map(&p.tv);
    if (p.split > 0) {
      prefetch_map(&p.tk1);
      prefetch_map(&p.tv1);
    }
    const int qb = pair * 2 + c;
    if (qb >= p.nq) return;
    {
      int t0, h0, w0;
      b_origin(qb, p.nbq, p.cq, t0, h0, w0);
      const uint32_t dq = sbase + Sm::kQ + c * kBTile;
      mbar_expect_tx(bar_q(c), kBTile);
      tma_load5(dq, &p.tq, 0, h, w0, h0, t0, bar_q(c));
      tma_load5(dq + kBPanel, &p.tq, 64, h, w0, h0, t0, bar_q(c));
    }
    const int cnt = sel_count(qb);
    const int* sel = sel_list(qb);
    int j = 0;
    for (int i = 0; i < cnt; ++i) {
      const int blk = sel[i];
      if (blk < 0 || blk >= p.nbk_total) continue;
      const int s = j % kStages;
      const uint32_t par = ((j / kStages) & 1) ^ 1;
      if (j >= kStages) mbar_wait(bar_at(c, s, 1), par);
      mbar_expect_tx(bar_at(c, s, 0), kBTile);
      load_block(sK(c, s), &p.tk, &p.tk1, blk, bar_at(c, s, 0));
      if (j >= kStages) mbar_wait(bar_at(c, s, 3), par);
      mbar_expect_tx(bar_at(c, s, 2), kBTile);
      load_block(sV(c, s), &p.tv, &p.tv1, blk, bar_at(c, s, 2));
      ++j;
    }
    return;
  }

  // ---------------- consumers ----------------
  setmaxnreg_inc<kBConsumerRegs>();
  const int cw = wg - 1;
  const int qb = pair * 2 + cw;
  if (qb >= p.nq) return;  // odd number of query blocks: the last CTA has one
  const int ctid = tid - 128 * wg;
  const int warp = ctid / 32;
  const int lane = tid % 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const float c2 = p.scale_log2;

  const int cnt = sel_count(qb);
  const int* sel = sel_list(qb);
  // valid entries (the producer issues exactly these)
  int n_tiles = 0;
  for (int i0 = 0; i0 < cnt; i0 += 32) {  // warp-uniform rounds
    const int i = i0 + lane;
    const int blk = i < cnt ? sel[i] : -1;
    n_tiles += __popc(__ballot_sync(0xffffffffu, blk >= 0 && blk < p.nbk_total));
  }

  float o[16][4];
#pragma unroll
  for (int i = 0; i < 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};
  float l_r[2] = {0.f, 0.f};
  float s[8][4];
  uint32_t pa[4][4];

  // key columns of this thread: 8 groups x 2 (c = i*8 + 2*tq + e); their slot geometry
  const uint32_t q_base = sbase + Sm::kQ + cw * kBTile;
  auto issue_qk = [&](int st) {
    const uint32_t k_base = sK(cw, st);
    fence_acc(s);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kBD / 16; ++kk) {
      const uint32_t off = (kk >> 2) * kBPanel + (kk & 3) * 32;
      W::ss64(s, desc128(q_base + off, 16, 1024), desc128(k_base + off, 16, 1024), kk > 0);
    }
    wg_commit();
  };
  auto issue_pv = [&](int st) {
    const uint32_t v_base = sV(cw, st);
    fence_acc(o);
    fence_pa(pa);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kBRows / 16; ++kk) {
      W::rs128(o, pa[kk], desc128(v_base + kk * 16 * 128, kBPanel, 1024));
    }
    wg_commit();
  };
  // cursor over the selection list: block of the next valid entry
  int cur = 0;
  auto next_blk = [&]() -> int {
    int blk = -1;
    while (cur < cnt) {
      blk = sel[cur++];
      if (blk >= 0 && blk < p.nbk_total) break;
      blk = -1;
    }
    return blk;
  };
  // masks the key slots of block blk that lie outside the key grid (partial edge blocks only)
  auto mask = [&](int blk) {
    int t0, h0, w0;
    b_origin(blk, p.nbk, p.ck, t0, h0, w0);
    const int lt = p.gk[0] - t0, lh = p.gk[1] - h0, lw = p.gk[2] - w0;
    if (lt < p.ck[0] || lh < p.ck[1] || lw < p.ck[2]) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = ktab[i * 8 + 2 * tq + e];
          if ((r & 255) >= lt || ((r >> 8) & 255) >= lh || (r >> 16) >= lw) s[i][e] = s[i][e + 2] = -INFINITY;
        }
      }
    }
  };
  auto softmax = [&](float (&alpha)[2]) { online_softmax(s, m_r, l_r, c2, alpha); };
  auto scale_o = [&](const float (&alpha)[2]) { scale_rows(o, alpha); };
  auto convert_p = [&]() { pack_p<M>(s, pa); };
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbar_arrive(bar);
  };

  // always wait for Q: no TMA may still be writing this CTA's smem when it exits
  mbar_wait(bar_q(cw), 0);
  if (n_tiles > 0) {
    if constexpr (kOverlap) {
      mbar_wait(bar_at(cw, 0, 0), 0);
      issue_qk(0);
      wg_wait<0>();
      fence_acc(s);
      release(bar_at(cw, 0, 1));
      mask(next_blk());
      float alpha[2];
      softmax(alpha);  // O is zero: no rescale
      convert_p();
      for (int j = 1; j < n_tiles; ++j) {
        const int st = j % kStages;
        const int sp = (j - 1) % kStages;
        mbar_wait(bar_at(cw, st, 0), (j / kStages) & 1);
        mbar_wait(bar_at(cw, sp, 2), ((j - 1) / kStages) & 1);
        issue_qk(st);
        issue_pv(sp);
        wg_wait<1>();  // S_j ready, P_{j-1} V_{j-1} may still run
        fence_acc(s);
        release(bar_at(cw, st, 1));
        mask(next_blk());
        softmax(alpha);
        // the wait for P_{j-1} V_{j-1} behind a warp-uniform branch on every softmax result:
        // keeps ptxas from hoisting it above the softmax
        const bool resc = __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f || !(l_r[0] >= 0.f) ||
                                                      !(l_r[1] >= 0.f));
        if (resc) {
          wg_wait<0>();
          fence_acc(o);
          fence_pa(pa);
          scale_o(alpha);
        } else {
          wg_wait<0>();
          fence_pa(pa);
          fence_acc(o);
        }
        release(bar_at(cw, sp, 3));
        convert_p();
      }
      const int sl = (n_tiles - 1) % kStages;
      mbar_wait(bar_at(cw, sl, 2), ((n_tiles - 1) / kStages) & 1);
      issue_pv(sl);
      wg_wait<0>();
      fence_acc(o);
      release(bar_at(cw, sl, 3));
    } else {
      for (int j = 0; j < n_tiles; ++j) {
        const int st = j % kStages;
        const uint32_t par = (j / kStages) & 1;
        mbar_wait(bar_at(cw, st, 0), par);
        issue_qk(st);
        wg_wait<0>();
        fence_acc(s);
        release(bar_at(cw, st, 1));
        mask(next_blk());
        float alpha[2];
        softmax(alpha);
        if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) scale_o(alpha);
        convert_p();
        mbar_wait(bar_at(cw, st, 2), par);
        issue_pv(st);
        wg_wait<0>();
        fence_acc(o);
        fence_pa(pa);
        release(bar_at(cw, st, 3));
      }
    }
  }

  // epilogue: O / l -> out for the block's real tokens, lse in natural log
  int qt0, qh0, qw0;
  b_origin(qb, p.nbq, p.cq, qt0, qh0, qw0);
  T* ob = static_cast<T*>(p.out) + h * p.o_sh;
  float* lb = p.lse == nullptr ? nullptr : p.lse + h * p.lse_sh;  // null: lse not asked for
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float l = l_r[e];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = warp * 16 + g + 8 * e;
    const int geo = qtab[r];
    const int t = qt0 + (geo & 255), hh = qh0 + ((geo >> 8) & 255), w = qw0 + (geo >> 16);
    const float inv = l > 0.f ? 1.f / l : 0.f;
    if (t < p.gq[0] && hh < p.gq[1] && w < p.gq[2]) {
      const int tok = (t * p.gq[1] + hh) * p.gq[2] + w;
      T* po = ob + (int64_t)tok * p.o_ss;
#pragma unroll
      for (int i = 0; i < 16; ++i) M::store2(po + i * 8 + 2 * tq, o[i][2 * e] * inv, o[i][2 * e + 1] * inv);
      if (tq == 0 && lb != nullptr) lb[tok] = l > 0.f ? 0.6931471805599453f * (m_r[e] + __log2f(l)) : -INFINITY;
    }
  }
}

#endif  // LONGCAT_BSA_WS

template <typename T, bool kOverlap, int kStages>
__global__ void __launch_bounds__(kBThreads, 1) bsa_fwd_sm90ws_kernel(const __grid_constant__ BsaWsParams p) {
#ifdef LONGCAT_BSA_WS
  extern __shared__ unsigned char bsa_ws_smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(bsa_ws_smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  bsa_ws_body<T, kOverlap, kStages>(p, smem);
#else
  // built for another target: the host only launches this kernel from an sm_90a binary
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
template <typename T, bool kOverlap, int kStages>
cudaError_t launch_bsa_ws(const BsaWsParams& bp, dim3 grid, cudaStream_t stream) {
  auto* fn = bsa_fwd_sm90ws_kernel<T, kOverlap, kStages>;
  const int smem = BsaSmem<kStages>::kAlloc;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  fn<<<grid, kBThreads, smem, stream>>>(bp);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_bsa_ws(const BsaWsParams& bp, dim3 grid, cudaStream_t stream) {
  // variant 1 (intra-warpgroup overlap, 2 K/V stages per consumer): the measured winner (NOTES.md,
  // v7; the v8 union walk measured slower and was removed)
  return launch_bsa_ws<T, true, 2>(bp, grid, stream);
}


}  // namespace

// frames of key segment 0 when the call has two key segments laid out along whole key blocks,
// else 0 (one segment) or -1 (two segments this kernel cannot split)
int bsa_ws_split(const AttnFwdParams& p) {
  if (p.s1 == 0) return 0;
  const int64_t hw = static_cast<int64_t>(p.gk[1]) * p.gk[2];
  if (p.s0 <= 0 || hw <= 0 || p.s0 % hw != 0) return -1;
  const int64_t frames0 = p.s0 / hw;
  if (frames0 % p.ck[0] != 0 || frames0 >= p.gk[0]) return -1;
  return static_cast<int>(frames0);
}

bool bsa_fwd_sm90ws_supported(const AttnFwdParams& p, int head_dim) {
  if (head_dim != kBD || !attn_fwd_sm90_available() || bsa_encode_fn() == nullptr) return false;
  if (p.s0 <= 0) return false;
  int vq = 1, vk = 1;
  for (int a = 0; a < 3; ++a) {
    if (p.cq[a] <= 0 || p.ck[a] <= 0 || p.cq[a] > 64 || p.ck[a] > 64) return false;
    vq *= p.cq[a];
    vk *= p.ck[a];
  }
  if (vq != kBRows || vk != kBRows) return false;
  if (static_cast<int64_t>(p.gk[0]) * p.gk[1] * p.gk[2] != static_cast<int64_t>(p.s0) + p.s1) return false;
  // a second key segment ([cache; fresh]) must start on a key-block boundary along t
  if (bsa_ws_split(p) < 0) return false;
  if (p.s1 > 0 && !(bsa_aligned16(p.k1, {p.k1_sb, p.k1_ss, p.k1_sh}) && bsa_aligned16(p.v1, {p.v1_sb, p.v1_ss, p.v1_sh})))
    return false;
  return bsa_aligned16(p.q, {p.q_sb, p.q_ss, p.q_sh}) && bsa_aligned16(p.k0, {p.k0_sb, p.k0_ss, p.k0_sh}) &&
         bsa_aligned16(p.v0, {p.v0_sb, p.v0_ss, p.v0_sh});
}

bool bsa_fwd_sm90ws_available() { return attn_fwd_sm90_available() && bsa_encode_fn() != nullptr; }

cudaError_t bsa_fwd_sm90ws(const AttnFwdParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (!bsa_fwd_sm90ws_supported(p, head_dim)) return cudaErrorNotSupported;
  if (p.batch <= 0 || p.heads <= 0 || p.sq <= 0 || p.num_q_blocks <= 0) return cudaSuccess;
  if (p.heads > 65535) return cudaErrorNotSupported;
  const int es = 2;
  const int split = bsa_ws_split(p);
  // segment grids: one segment = the whole key grid; two = [split frames; the rest]
  const int g0[3] = {split > 0 ? split : p.gk[0], p.gk[1], p.gk[2]};
  const int g1[3] = {split > 0 ? p.gk[0] - split : 0, p.gk[1], p.gk[2]};
  for (int b = 0; b < p.batch; ++b) {
    BsaWsParams bp{};
    const char* qb = static_cast<const char*>(p.q) + b * p.q_sb * es;
    const char* kb = static_cast<const char*>(p.k0) + b * p.k0_sb * es;
    const char* vb = static_cast<const char*>(p.v0) + b * p.v0_sb * es;
    bool ok = make_map5(&bp.tq, qb, dtype, p.heads, p.q_ss, p.q_sh, p.gq, p.cq) &&
              make_map5(&bp.tk, kb, dtype, p.heads, p.k0_ss, p.k0_sh, g0, p.ck) &&
              make_map5(&bp.tv, vb, dtype, p.heads, p.v0_ss, p.v0_sh, g0, p.ck);
    if (ok && split > 0) {
      const char* kb1 = static_cast<const char*>(p.k1) + b * p.k1_sb * es;
      const char* vb1 = static_cast<const char*>(p.v1) + b * p.v1_sb * es;
      ok = make_map5(&bp.tk1, kb1, dtype, p.heads, p.k1_ss, p.k1_sh, g1, p.ck) &&
           make_map5(&bp.tv1, vb1, dtype, p.heads, p.v1_ss, p.v1_sh, g1, p.ck);
    }
    if (!ok) {
      // the driver refused a tensor map: the caller raises
      if (b == 0) return cudaErrorNotSupported;
      return cudaErrorInvalidValue;
    }
    bp.split = split;
    bp.out = static_cast<char*>(p.out) + b * p.o_sb * es;
    bp.lse = p.lse == nullptr ? nullptr : p.lse + b * p.lse_sb;
    bp.sel_idx = p.sel_idx + b * p.si_sb;
    bp.sel_cnt = p.sel_cnt + b * p.sc_sb;
    bp.o_ss = p.o_ss;
    bp.o_sh = p.o_sh;
    bp.lse_sh = p.lse_sh;
    bp.si_sh = p.si_sh;
    bp.si_sq = p.si_sq;
    bp.sc_sh = p.sc_sh;
    bp.sc_sq = p.sc_sq;
    bp.heads = p.heads;
    bp.nq = p.num_q_blocks;
    bp.max_sel = p.max_sel;
    bp.nbk_total = p.nbk[0] * p.nbk[1] * p.nbk[2];
    for (int a = 0; a < 3; ++a) {
      bp.gq[a] = p.gq[a];
      bp.cq[a] = p.cq[a];
      bp.nbq[a] = p.nbq[a];
      bp.gk[a] = p.gk[a];
      bp.ck[a] = p.ck[a];
      bp.nbk[a] = p.nbk[a];
    }
    bp.scale_log2 = p.scale_log2;
    if ((p.num_q_blocks + 1) / 2 > 65535) return cudaErrorNotSupported;
    dim3 grid((p.num_q_blocks + 1) / 2, p.heads);
    const cudaError_t err = dtype == DType::kBF16 ? dispatch_bsa_ws<__nv_bfloat16>(bp, grid, stream)
                                                  : dispatch_bsa_ws<__half>(bp, grid, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace longcat
