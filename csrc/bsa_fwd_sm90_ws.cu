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
// CTA = 3 warpgroups (384 threads), two neighbouring query blocks (one per consumer warpgroup, each
// with its own selection list). Each list (in list order) is cut into PAIR TILES of two key blocks
// (the last of an odd count alone); S = Q K^T runs as one wgmma m64n128k16 (SS) over both blocks
// and O += P V as m64n128k16 (RS, V transposed from smem), so a pair of key blocks costs one S
// wait, one set of row reductions and one O rescale. The two lists' tiles interleave (tile k of
// consumer c at ring position 2k + c while both have tiles, then the longer list's rest) in one
// K ring and one V ring shared by both consumers (32 KB per stage: panel p at p * 16 KB, block
// half b at b * 8 KB inside it). K has 2 stages and V 4: a K slot is released right after its S,
// a V slot only after its P V one tile later, so with 3 + 3 the V slot a consumer-1 tile reuses
// was freed by consumer 0 at the end of the same step (no lead), while with 2 + 4 each consumer
// reuses its own slots (position 2k + c: K slot c, V slot 2 (k % 2) + c), V a tile ahead and K
// as far ahead as with 3 stages; same smem. Warpgroup 0 = producer (setmaxnreg.dec): warp 0
// issues the K boxes, warp 1 the V boxes, warp 2 the two Q blocks; block ids are read one ring
// position ahead. Full barriers are per (stage, consumer): a consumer waits only on the phases of
// its own tiles (one full barrier per stage let a consumer see the other consumer's completed
// phase as its own: phase aliasing). Empty barriers: 8 arrives (2 per consumer warp). Consumers read the block
// ids of their next tile a tile ahead, so no dependent global load sits on the math chain. An
// entry outside [0, key blocks) keeps its place in its tile: the producer loads block 0, the
// consumer masks that half (-inf), the same result as the other kernels. A one-block tile loads
// its block into both halves (finite data under the PV wgmma) and masks half 1. Overlap: at tile
// j the consumer waits for K_j, issues Q K_j^T, then waits for V_{j-1} (so S runs during that
// wait) and issues P_{j-1} V_{j-1}, and does softmax(j) while P V runs
// (the wait for P V sits behind a warp-uniform branch on the softmax results so that ptxas cannot
// hoist it, as in attn_fwd_sm90_ws.cu). Geometry masks (partial edge blocks, zero-filled by TMA)
// only when the host says some key block reaches past the grid. Batches are separate launches
// (per-batch base pointers and tensor maps). No torch headers.
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
constexpr int kBTile = kBRows * kBD * 2;    // 16 KB: one Q tile or one key block of K or V
constexpr int kBPanel = kBRows * 128;       // 8 KB: one [64 x 64] 128B-swizzled panel
constexpr int kPTile = 2 * kBTile;          // 32 KB: K (or V) of a pair tile (two key blocks)
constexpr int kPPanel = 2 * kBPanel;        // 16 KB: one [128 x 64] panel of a pair tile
// pair tiles in flight: K ring and V ring (shared by both consumers; see the header for why 2 / 4)
constexpr int kKStages = 2;
constexpr int kVStages = 4;
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
  int partial;  // some key block reaches past the key grid (a chunk does not divide it): mask by geometry
  float scale_log2;
};

struct BsaSmem {
  // Q[2] | K[stage] | V[stage] (pair tiles) | slot tables | barriers
  static constexpr int kQ = 0;
  static constexpr int kK = 2 * kBTile;
  static constexpr int kV = kK + kKStages * kPTile;
  static constexpr int kTab = kV + kVStages * kPTile;  // int qtab[64], ktab[64]: dt | dh<<8 | dw<<16
  static constexpr int kBar = kTab + 2 * 64 * 4;
  // barriers (8 B each, indices): q_full[2], k_full[KS][2], k_empty[KS], v_full[VS][2], v_empty[VS]
  // (full: one per slot and consumer, so that a consumer never waits on a phase of the other
  // consumer's tile)
  static constexpr int kKFull = 2;
  static constexpr int kKEmpty = kKFull + 2 * kKStages;
  static constexpr int kVFull = kKEmpty + kKStages;
  static constexpr int kVEmpty = kVFull + 2 * kVStages;
  static constexpr int kBytes = kBar + 8 * (kVEmpty + kVStages);
  static constexpr int kAlloc = kBytes + 1024;  // slack to align the base to 1024 B
};

#ifdef LONGCAT_BSA_WS

using namespace sm90ws;  // wgmma, mbarrier, TMA and setmaxnreg helpers (sm90_ws_common.cuh)

__device__ __forceinline__ void mbar_arrive_n(uint32_t bar, uint32_t n) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(n) : "memory");
}

// The pair schedule of a CTA. Each query block's selection entries (in list order) are cut into
// pair tiles of two key blocks (the last one of an odd count alone); the two lists' tiles
// interleave in one ring: position 2k + c is tile k of query block c while both have tiles, then
// the longer list's remaining tiles follow in order. Producer and consumers derive the same
// positions from the two counts. An entry outside [0, key blocks) still takes its place in a tile:
// the producer loads block 0 there and the consumer masks the whole half (-inf), the same result
// as skipping it.
struct PairSched {
  int n0, n1;  // valid entries per query block
  int m0, m1;  // pair tiles per query block
  int mn, longer;
  __device__ __forceinline__ void init(int a, int b) {
    n0 = a;
    n1 = b;
    m0 = (a + 1) / 2;
    m1 = (b + 1) / 2;
    mn = min(m0, m1);
    longer = m0 >= m1 ? 0 : 1;
  }
  __device__ __forceinline__ int total() const { return m0 + m1; }
  __device__ __forceinline__ int tiles(int c) const { return c == 0 ? m0 : m1; }
  __device__ __forceinline__ int owner(int p) const { return p < 2 * mn ? (p & 1) : longer; }
  __device__ __forceinline__ int pos(int c, int k) const { return k < mn ? 2 * k + c : mn + k; }
  // key blocks in tile k of query block c (1 or 2)
  __device__ __forceinline__ int width(int c, int k) const { return 2 * k + 1 < (c == 0 ? n0 : n1) ? 2 : 1; }
};

template <typename T>
__device__ __forceinline__ void bsa_ws_body(const BsaWsParams& p, unsigned char* smem) {
  using Sm = BsaSmem;
  using W = Wgmma<T>;
  using M = MmaType<T>;
  const int tid = threadIdx.x;
  const int wg = tid / 128;
  const int lane = tid % 32;
  // grid (query-block pairs, heads): co-resident CTAs share one head's K/V in L2 (a heads-fastest
  // grid measured 2x slower)
  const int h = blockIdx.y;
  const int pair = blockIdx.x;
  const int qb0 = pair * 2;
  const bool two = qb0 + 1 < p.nq;  // odd number of query blocks: the last CTA has one

  const uint32_t sbase = smem_u32(smem);
  int* qtab = reinterpret_cast<int*>(smem + Sm::kTab);
  int* ktab = qtab + 64;
  const uint32_t bar0 = sbase + Sm::kBar;
  auto bar_q = [&](int c) { return bar0 + 8 * c; };
  // kind: 0 k_full, 1 k_empty, 2 v_full, 3 v_empty; full barriers per consumer c
  auto bar_full = [&](int s, int kind, int c) { return bar0 + 8 * ((kind == 0 ? Sm::kKFull : Sm::kVFull) + 2 * s + c); };
  auto bar_empty = [&](int s, int kind) { return bar0 + 8 * ((kind == 1 ? Sm::kKEmpty : Sm::kVEmpty) + s); };
  auto sK = [&](int s) { return sbase + Sm::kK + s * kPTile; };
  auto sV = [&](int s) { return sbase + Sm::kV + s * kPTile; };
  auto sel_count = [&](int qb) { return min(p.sel_cnt[h * p.sc_sh + qb * p.sc_sq], p.max_sel); };
  auto sel_list = [&](int qb) { return p.sel_idx + h * p.si_sh + qb * p.si_sq; };
  auto valid = [&](int blk) { return blk >= 0 && blk < p.nbk_total; };
  if (tid < 64) {
    const int r = tid;
    qtab[r] = (r / (p.cq[2] * p.cq[1])) | (((r / p.cq[2]) % p.cq[1]) << 8) | ((r % p.cq[2]) << 16);
    ktab[r] = (r / (p.ck[2] * p.ck[1])) | (((r / p.ck[2]) % p.ck[1]) << 8) | ((r % p.ck[2]) << 16);
  }
  if (tid == 0) {
    mbar_init(bar_q(0), 1);
    mbar_init(bar_q(1), 1);
    // empty barriers: every tile is released by the 4 warps of its consumer, 2 arrives each
    for (int s = 0; s < kKStages; ++s) {
      for (int c = 0; c < 2; ++c) mbar_init(bar_full(s, 0, c), 1);
      mbar_init(bar_empty(s, 1), 8);
    }
    for (int s = 0; s < kVStages; ++s) {
      for (int c = 0; c < 2; ++c) mbar_init(bar_full(s, 2, c), 1);
      mbar_init(bar_empty(s, 3), 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // ---------------- producer ----------------
    // warp 0 issues the K boxes, warp 1 the V boxes (both in ring order), warp 2 the two Q blocks
    setmaxnreg_dec<kBProducerRegs>();
    const int warp = tid / 32;
    if (warp == 3) return;
    if (warp == 2) {
      if (lane != 0) return;
      prefetch_map(&p.tq);
      for (int c = 0; c < (two ? 2 : 1); ++c) {
        int t0, h0, w0;
        b_origin(qb0 + c, p.nbq, p.cq, t0, h0, w0);
        const uint32_t dq = sbase + Sm::kQ + c * kBTile;
        mbar_expect_tx(bar_q(c), kBTile);
        tma_load5(dq, &p.tq, 0, h, w0, h0, t0, bar_q(c));
        tma_load5(dq + kBPanel, &p.tq, 64, h, w0, h0, t0, bar_q(c));
      }
      return;
    }
    if (lane != 0) return;
    PairSched sc;
    sc.init(sel_count(qb0), two ? sel_count(qb0 + 1) : 0);
    const bool is_v = warp == 1;
    const CUtensorMap* m0 = is_v ? &p.tv : &p.tk;
    const CUtensorMap* m1 = is_v ? &p.tv1 : &p.tk1;
    prefetch_map(m0);
    if (p.split > 0) prefetch_map(m1);
    const int full = is_v ? 2 : 0;
    const int ns = is_v ? kVStages : kKStages;
    // key block blk into half `half` of the pair tile at dst: two boxes (d0 = 0, 64)
    auto load_block = [&](uint32_t dst, int half, int blk, uint32_t bar) {
      int t0, h0, w0;
      b_origin(blk, p.nbk, p.ck, t0, h0, w0);
      const CUtensorMap* m = m0;
      if (p.split > 0 && t0 >= p.split) {
        m = m1;
        t0 -= p.split;
      }
      tma_load5(dst + half * kBPanel, m, 0, h, w0, h0, t0, bar);
      tma_load5(dst + kPPanel + half * kBPanel, m, 64, h, w0, h0, t0, bar);
    };
    const int* sel0 = sel_list(qb0);
    const int* sel1 = sel_list(two ? qb0 + 1 : qb0);
    int k0 = 0, k1 = 0;
    // owner and block ids of ring position ps (in order); the ids are read one position ahead,
    // so that their load overlaps the wait for the slot instead of following it
    auto fetch = [&](int ps, int& oc, int& ob0, int& ob1) {
      oc = sc.owner(ps);
      const int k = oc == 0 ? k0++ : k1++;
      const int* sl = oc == 0 ? sel0 : sel1;
      ob0 = sl[2 * k];
      // a one-block tile loads its block into both halves: the unused half then holds finite
      // data for the PV GEMM (its P is 0) instead of stale smem
      ob1 = sc.width(oc, k) == 2 ? sl[2 * k + 1] : ob0;
    };
    int nc = 0, nb0 = 0, nb1 = 0;
    if (sc.total() > 0) fetch(0, nc, nb0, nb1);
    for (int pos = 0; pos < sc.total(); ++pos) {
      const int c = nc;
      const int b0 = valid(nb0) ? nb0 : 0;
      const int b1 = valid(nb1) ? nb1 : 0;
      if (pos + 1 < sc.total()) fetch(pos + 1, nc, nb0, nb1);
      const int s = pos % ns;
      if (pos >= ns) mbar_wait(bar_empty(s, full + 1), ((pos / ns) & 1) ^ 1);
      const uint32_t dst = is_v ? sV(s) : sK(s);
      const uint32_t bf = bar_full(s, full, c);
      mbar_expect_tx(bf, kPTile);
      load_block(dst, 0, b0, bf);
      load_block(dst, 1, b1, bf);
    }
    return;
  }

  // ---------------- consumers ----------------
  setmaxnreg_inc<kBConsumerRegs>();
  const int cw = wg - 1;
  const int qb = qb0 + cw;
  if (qb >= p.nq) return;
  const int ctid = tid - 128 * wg;
  const int warp = ctid / 32;
  const int g = lane >> 2;
  const int tq = lane & 3;
  const float c2 = p.scale_log2;

  PairSched sc;
  sc.init(sel_count(qb0), two ? sel_count(qb0 + 1) : 0);
  const int n_tiles = sc.tiles(cw);
  const int cnt = cw == 0 ? sc.n0 : sc.n1;
  const int* sel = sel_list(qb);

  float o[16][4];
#pragma unroll
  for (int i = 0; i < 16; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};
  float l_r[2] = {0.f, 0.f};
  float s[16][4];
  uint32_t pa[8][4];

  const uint32_t q_base = sbase + Sm::kQ + cw * kBTile;
  auto issue_qk = [&](int st) {
    const uint32_t k_base = sK(st);
    fence_acc(s);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < kBD / 16; ++kk) {
      // a one-block tile holds its block twice: the second half's columns are set to -inf
      W::ss128(s, desc128(q_base + (kk >> 2) * kBPanel + (kk & 3) * 32, 16, 1024),
               desc128(k_base + (kk >> 2) * kPPanel + (kk & 3) * 32, 16, 1024), kk > 0);
    }
    wg_commit();
  };
  auto issue_pv = [&](int st) {
    const uint32_t v_base = sV(st);
    fence_acc(o);
    fence_pa(pa);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) W::rs128(o, pa[kk], desc128(v_base + kk * 16 * 128, kPPanel, 1024));
    wg_commit();
  };
  // masks the key slots of block blk (columns 64*half ..) that lie outside the key grid, or the
  // whole half for an entry outside [0, key blocks)
  auto mask_half = [&](int blk, int half) {
    if (!valid(blk)) {
#pragma unroll
      for (int i = 0; i < 8; ++i) s[half * 8 + i][0] = s[half * 8 + i][1] = s[half * 8 + i][2] = s[half * 8 + i][3] = -INFINITY;
      return;
    }
    if (!p.partial) return;
    int t0, h0, w0;
    b_origin(blk, p.nbk, p.ck, t0, h0, w0);
    const int lt = p.gk[0] - t0, lh = p.gk[1] - h0, lw = p.gk[2] - w0;
    if (lt < p.ck[0] || lh < p.ck[1] || lw < p.ck[2]) {
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int r = ktab[i * 8 + 2 * tq + e];
          if ((r & 255) >= lt || ((r >> 8) & 255) >= lh || (r >> 16) >= lw)
            s[half * 8 + i][e] = s[half * 8 + i][e + 2] = -INFINITY;
        }
      }
    }
  };
  // block ids of the current tile and the next one (read a tile ahead: the load's latency stays
  // off the S -> softmax chain)
  int cb0 = -1, cb1 = -1, nb0 = -1, nb1 = -1;
  auto fetch_ids = [&](int k, int& b0, int& b1) {
    if (k < n_tiles) {
      b0 = sel[2 * k];
      b1 = 2 * k + 1 < cnt ? sel[2 * k + 1] : -1;
    }
  };
  auto mask_tile = [&](int w) {
    mask_half(cb0, 0);
    if (w == 2) {
      mask_half(cb1, 1);
    } else {
#pragma unroll
      for (int i = 8; i < 16; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = -INFINITY;
    }
    cb0 = nb0;
    cb1 = nb1;
  };
  // this consumer's full barrier of the slot of ring position ps; its phase parity per slot flips
  // with every tile this consumer takes from the slot (bits of kph / vph). One full barrier per
  // slot for both consumers would let a consumer whose slot's previous fill belongs to the other
  // consumer (and has not landed) pass on the parity of the phase before.
  uint32_t kph = 0, vph = 0;
  auto wait_full = [&](int ps, int kind) {
    const int st = ps % (kind == 0 ? kKStages : kVStages);
    uint32_t& ph = kind == 0 ? kph : vph;
    mbar_wait(bar_full(st, kind, cw), (ph >> st) & 1);
    ph ^= 1u << st;
  };
  auto convert_p = [&]() { pack_p<M>(s, pa); };
  auto release = [&](uint32_t bar) {
    if (lane == 0) mbar_arrive_n(bar, 2);
  };

  // always wait for Q: no TMA may still be writing this CTA's smem when it exits
  mbar_wait(bar_q(cw), 0);
  if (n_tiles > 0) {
    fetch_ids(0, cb0, cb1);
    fetch_ids(1, nb0, nb1);
    int pos = sc.pos(cw, 0);
    int w = sc.width(cw, 0);
    wait_full(pos, 0);
    issue_qk(pos % kKStages);
    wg_wait<0>();
    fence_acc(s);
    release(bar_empty(pos % kKStages, 1));
    mask_tile(w);
    float alpha[2];
    online_softmax(s, m_r, l_r, c2, alpha);  // O is zero: no rescale
    convert_p();
    for (int k = 1; k < n_tiles; ++k) {
      const int pp = pos;
      pos = sc.pos(cw, k);
      w = sc.width(cw, k);
      const int st = pos % kKStages;  // K slot of tile k
      const int sp = pp % kVStages;   // V slot of tile k - 1
      fetch_ids(k + 1, nb0, nb1);
      wait_full(pos, 0);
      issue_qk(st);
      wait_full(pp, 2);
      issue_pv(sp);
      wg_wait<1>();  // S_k ready, P_{k-1} V_{k-1} may still run
      fence_acc(s);
      release(bar_empty(st, 1));
      mask_tile(w);
      online_softmax(s, m_r, l_r, c2, alpha);
      // the wait for P_{k-1} V_{k-1} behind a warp-uniform branch on every softmax result:
      // keeps ptxas from hoisting it above the softmax
      const bool resc = __any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f || !(l_r[0] >= 0.f) ||
                                                    !(l_r[1] >= 0.f));
      if (resc) {
        wg_wait<0>();
        fence_acc(o);
        fence_pa(pa);
        scale_rows(o, alpha);
      } else {
        wg_wait<0>();
        fence_pa(pa);
        fence_acc(o);
      }
      release(bar_empty(sp, 3));
      convert_p();
    }
    const int sl = pos % kVStages;
    wait_full(pos, 2);
    issue_pv(sl);
    wg_wait<0>();
    fence_acc(o);
    release(bar_empty(sl, 3));
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
    const float inv = l == 0.f ? 0.f : 1.f / l;  // NaN l (a NaN reached the row) stays NaN
    if (t < p.gq[0] && hh < p.gq[1] && w < p.gq[2]) {
      const int tok = (t * p.gq[1] + hh) * p.gq[2] + w;
      T* po = ob + (int64_t)tok * p.o_ss;
#pragma unroll
      for (int i = 0; i < 16; ++i) M::store2(po + i * 8 + 2 * tq, o[i][2 * e] * inv, o[i][2 * e + 1] * inv);
      if (tq == 0 && lb != nullptr) lb[tok] = l == 0.f ? -INFINITY : 0.6931471805599453f * (m_r[e] + __log2f(l));
    }
  }
}

#endif  // LONGCAT_BSA_WS

template <typename T>
__global__ void __launch_bounds__(kBThreads, 1) bsa_fwd_sm90ws_kernel(const __grid_constant__ BsaWsParams p) {
#ifdef LONGCAT_BSA_WS
  extern __shared__ unsigned char bsa_ws_smem_raw[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(
      (reinterpret_cast<uintptr_t>(bsa_ws_smem_raw) + 1023) & ~static_cast<uintptr_t>(1023));
  bsa_ws_body<T>(p, smem);
#else
  // built for another target: the host only launches this kernel from an sm_90a binary
  __trap();
#endif
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
template <typename T>
cudaError_t launch_bsa_ws(const BsaWsParams& bp, dim3 grid, cudaStream_t stream) {
  auto* fn = bsa_fwd_sm90ws_kernel<T>;
  const int smem = BsaSmem::kAlloc;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  fn<<<grid, kBThreads, smem, stream>>>(bp);
  return cudaGetLastError();
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
    bp.partial = (p.gk[0] % p.ck[0]) != 0 || (p.gk[1] % p.ck[1]) != 0 || (p.gk[2] % p.ck[2]) != 0;
    if ((p.num_q_blocks + 1) / 2 > 65535) return cudaErrorNotSupported;
    dim3 grid((p.num_q_blocks + 1) / 2, p.heads);
    const cudaError_t err = dtype == DType::kBF16 ? launch_bsa_ws<__nv_bfloat16>(bp, grid, stream)
                                                  : launch_bsa_ws<__half>(bp, grid, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace longcat
