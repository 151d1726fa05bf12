// Hopper (sm_90a) forward: wgmma for both products, same work split and gather loaders as the
// sm80 kernel. One warpgroup owns 64 query rows: S = Q K^T with Q and K read by wgmma straight
// from shared memory (128-byte swizzled, K-major), then P (registers) x V (shared memory,
// transposed operand). Tiles arrive by cp.async (rows of a 3D chunk are not one box, so every row
// is its own 16-byte gather) and are handed to the tensor cores after fence.proxy.async.
// No torch headers.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "attn_common.cuh"
#include "attn_fwd.h"
#include "sm90_ws_common.cuh"

#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LONGCAT_SM90_WGMMA 1
#endif

namespace longcat {
namespace {

using namespace detail;

template <typename T, int D, int NWG, bool kSparse, int KS>
struct K90 {
  static constexpr int BM = 64 * NWG;
  static constexpr int kThreads = 128 * NWG;
  static constexpr int kCPR = D / 8;
  static constexpr int kTileQ = BM * D * 2;
  static constexpr int kTileKV = kBN * D * 2;
  // K tiles in KS stages (prefetch distance KS - 1), V tiles in 2 stages (distance 1)
  static constexpr int kSmemTiles = kTileQ + (KS + 2) * kTileKV;
  static int smem_bytes(int key_table_entries) {
    return 1024 + kSmemTiles + KS * kBN + BM * 4 + key_table_entries * 8;
  }
};

#ifdef LONGCAT_SM90_WGMMA

using namespace sm90ws;  // wg_fence / wg_commit / wg_wait (sm90_ws_common.cuh)
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// keeps the compiler from moving register accesses across the asynchronous wgmma region
__device__ __forceinline__ void fence_regs(float (&d)[8][4]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(d[i][j])::"memory");
  }
}

// Shared-memory matrix descriptor, 128-byte swizzle. Both byte offsets are 1024 (one 8-row x
// 128-byte swizzle atom): the instructions below use N = 64 (one atom wide along MN), so the
// only stride that matters is between 8-row groups, whichever field the layout reads it from.
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr) {
  uint64_t d = static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>(1024 >> 4) << 16;
  d |= static_cast<uint64_t>(1024 >> 4) << 32;
  d |= static_cast<uint64_t>(1) << 62;
  return d;
}

// Element offset of 16-byte chunk c of row r in an [R, D] tile stored as D/64 column panels of
// [R, 64] with 128-byte rows, chunks XOR-swizzled by (r & 7) (the hardware's 128B pattern).
template <int R>
__device__ __forceinline__ int sw128(int r, int c) {
  return (c >> 3) * (R * 64) + r * 64 + (((c & 7) ^ (r & 7)) << 3);
}

template <typename T, int D, int NWG, bool kSparse, int KS>
__device__ __forceinline__ void attn_fwd_sm90_body(const AttnFwdParams& p) {
  using K = K90<T, D, NWG, kSparse, KS>;
  static_assert(KS == 2 || KS == 3, "K stages");
  using M = MmaType<T>;
  using W = Wgmma<T>;
  constexpr int BM = K::BM;
  constexpr int kThreads = K::kThreads;
  constexpr int kCPR = K::kCPR;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // 1024-byte aligned tiles (swizzle atoms)
  unsigned char* smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = reinterpret_cast<T*>(smem + K::kTileQ);
  T* sV = reinterpret_cast<T*>(smem + K::kTileQ + KS * K::kTileKV);
  unsigned char* sFlag = smem + K::kSmemTiles;
  int* sQTok = reinterpret_cast<int*>(sFlag + KS * kBN);
  int2* sKTab = reinterpret_cast<int2*>(sQTok + BM);

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int wg = warp >> 2;
  const int bh = blockIdx.y;
  const int b = bh / p.heads;
  const int h = bh % p.heads;

  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k0b = static_cast<const T*>(p.k0) + b * p.k0_sb + h * p.k0_sh;
  const T* v0b = static_cast<const T*>(p.v0) + b * p.v0_sb + h * p.v0_sh;
  const T* k1b = static_cast<const T*>(p.k1) + b * p.k1_sb + h * p.k1_sh;
  const T* v1b = static_cast<const T*>(p.v1) + b * p.v1_sb + h * p.v1_sh;
  const int s_total = p.s0 + p.s1;

  const CtaWork work = cta_work<kSparse, BM, kThreads>(p, b, h, s_total, tid, sQTok, sKTab);
  int n_tiles = work.n_tiles;
  int k_subs = work.k_subs;
  const int* sel = work.sel;
  __syncthreads();

  // Loader mapping (one warpgroup): 8 consecutive threads share a row and take its 16-byte chunks
  // lp, lp + 8, ...: one warp instruction covers whole 128-byte lines of 4 rows (few L2
  // requests), and each thread does the row address math for kBN / kRPP rows only.
  constexpr int kTPR = 8;
  constexpr int kRPP = kThreads / kTPR;  // rows per pass
  constexpr int kCPT = kCPR / kTPR;      // chunks per thread and row
  static_assert(kBN % kRPP == 0 && kCPR % kTPR == 0, "loader mapping");
  const int lr0 = tid / kTPR;
  const int lp = tid % kTPR;

  // Gathers key tile j into dK (+ its row-valid flags into dF) and/or value tile j into dV
  // (null: skip); returns whether every row this thread loaded is a real token.
  auto load_tile = [&](int j, T* dK, T* dV, unsigned char* dF) -> bool {
    if constexpr (NWG == 2) {
      // dense two-warpgroup tiles: thread = one 16-byte chunk column of several rows (this
      // mapping keeps the kernel within the 128 registers that two CTAs per SM allow)
      static_assert(!kSparse, "the block-sparse kernel uses one warpgroup");
      constexpr int kRPP2 = kThreads / kCPR;
      const int c = tid % kCPR;
      bool all_valid = true;
#pragma unroll
      for (int i = 0; i < kBN / kRPP2; ++i) {
        const int r = tid / kCPR + i * kRPP2;
        const int s = j * kBN + r;
        const bool valid = s < s_total;
        const T* pk;
        const T* pv;
        if (s < p.s0) {
          pk = k0b + (int64_t)s * p.k0_ss;
          pv = v0b + (int64_t)s * p.v0_ss;
        } else {
          pk = k1b + (int64_t)(s - p.s0) * p.k1_ss;
          pv = v1b + (int64_t)(s - p.s0) * p.v1_ss;
        }
        if (!valid) pk = pv = k1b;
        if (dK != nullptr) {
          cp_async16(smem_u32(dK + sw128<kBN>(r, c)), pk + c * 8, valid);
          if (c == 0) dF[r] = valid;
        }
        if (dV != nullptr) cp_async16(smem_u32(dV + sw128<kBN>(r, c)), pv + c * 8, valid);
        all_valid = all_valid && valid;
      }
      return all_valid;
    }
    int t0 = 0, h0 = 0, w0 = 0, sub = 0;
    bool blk_ok = true;
    if constexpr (kSparse) {
      int blk = sel[j / k_subs];
      sub = j % k_subs;
      blk_ok = blk >= 0 && blk < p.nbk[0] * p.nbk[1] * p.nbk[2];
      if (!blk_ok) blk = 0;
      const int bw = blk % p.nbk[2];
      const int bhh = (blk / p.nbk[2]) % p.nbk[1];
      const int bt = blk / (p.nbk[2] * p.nbk[1]);
      t0 = bt * p.ck[0];
      h0 = bhh * p.ck[1];
      w0 = bw * p.ck[2];
    }
    const int base = (t0 * p.gk[1] + h0) * p.gk[2] + w0;
    bool all_valid = true;
#pragma unroll
    for (int pass = 0; pass < kBN / kRPP; ++pass) {
      const int lr = lr0 + pass * kRPP;
      int s;
      bool valid;
      if constexpr (kSparse) {
        const int2 e = sKTab[sub * kBN + lr];
        const int dt = e.y & 1023, dh = (e.y >> 10) & 1023, dw = e.y >> 20;
        // padding slots of the table carry dt = 1023 >= ct (chunks are < 1024 on each axis)
        valid = blk_ok && dt < p.ck[0] && t0 + dt < p.gk[0] && h0 + dh < p.gk[1] && w0 + dw < p.gk[2];
        s = base + e.x;
      } else {
        s = j * kBN + lr;
        valid = s < s_total;
      }
      const T* pk;
      const T* pv;
      if (s < p.s0) {
        pk = k0b + (int64_t)s * p.k0_ss;
        pv = v0b + (int64_t)s * p.v0_ss;
      } else {
        pk = k1b + (int64_t)(s - p.s0) * p.k1_ss;
        pv = v1b + (int64_t)(s - p.s0) * p.v1_ss;
      }
      if (!valid) pk = pv = k1b;
      if (dK != nullptr) {
#pragma unroll
        for (int i = 0; i < kCPT; ++i) {
          const int c = i * kTPR + lp;
          cp_async16(smem_u32(dK + sw128<kBN>(lr, c)), pk + c * 8, valid);
        }
        if (lp == 0) dF[lr] = valid;
      }
      if (dV != nullptr) {
#pragma unroll
        for (int i = 0; i < kCPT; ++i) {
          const int c = i * kTPR + lp;
          cp_async16(smem_u32(dV + sw128<kBN>(lr, c)), pv + c * 8, valid);
        }
      }
      all_valid = all_valid && valid;
    }
    return all_valid;
  };

  {
    // Q tile: BM rows over kThreads threads
    constexpr int kQTPR = kThreads / BM;
    constexpr int kQCPT = kCPR / kQTPR;
    const int qr = tid / kQTPR;
    const int qp = tid % kQTPR;
    const int s = sQTok[qr];
    const T* pq = s >= 0 ? qb + (int64_t)s * p.q_ss : qb;
#pragma unroll
    for (int i = 0; i < kQCPT; ++i) {
      const int c = i * kQTPR + qp;
      cp_async16(smem_u32(sQ + sw128<BM>(qr, c)), pq + (s >= 0 ? c * 8 : 0), s >= 0);
    }
  }
  constexpr int kTile = kBN * D;
  bool v0 = true, v1 = true;
  if (n_tiles > 0) v0 = load_tile(0, sK, sV, sFlag);
  if (KS == 3 && n_tiles > 1) v1 = load_tile(1, sK + kTile, nullptr, sFlag + kBN);
  cp_async_commit();
  // whether a tile has no padding key (then its masking is skipped): tiles j and j+1
  bool full_cur = __syncthreads_and(v0);
  bool full_n1 = KS == 3 ? __syncthreads_and(v1) : true;

  constexpr int kNH = D / 64;  // 64-wide column panels of O
  float o[kNH][8][4];
#pragma unroll
  for (int hf = 0; hf < kNH; ++hf)
#pragma unroll
    for (int i = 0; i < 8; ++i) o[hf][i][0] = o[hf][i][1] = o[hf][i][2] = o[hf][i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};
  float l_r[2] = {0.f, 0.f};
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int row0 = warp * 16;
  const uint32_t q_base = smem_u32(sQ) + wg * 64 * 128;

  for (int j = 0; j < n_tiles; ++j) {
    const int sk = j % KS;
    const int sv = j & 1;
    __syncthreads();  // every warp is done with the stages the prefetches below overwrite
    bool nv = true;
    if constexpr (KS == 2) {
      if (j + 1 < n_tiles) nv = load_tile(j + 1, sK + (sk ^ 1) * kTile, sV + (sv ^ 1) * kTile, sFlag + (sk ^ 1) * kBN);
    } else {
      const int sk2 = (j + 2) % 3;
      if (j + 2 < n_tiles) nv = load_tile(j + 2, sK + sk2 * kTile, nullptr, sFlag + sk2 * kBN);
      if (j + 1 < n_tiles) load_tile(j + 1, nullptr, sV + (sv ^ 1) * kTile, nullptr);
    }
    cp_async_commit();
    cp_async_wait<1>();
    // cp.async wrote through the generic proxy; wgmma reads through the async proxy
    fence_proxy_async();
    const bool full_new = __syncthreads_and(nv);
    const int st = sk;
    const uint32_t k_base = smem_u32(sK + sk * kTile);
    const uint32_t v_base = smem_u32(sV + sv * kTile);

    // S = Q K^T  [64, 64] per warpgroup
    float s[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    fence_regs(s);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t off = (kk & 3) * 32;  // k16 step inside a 64-column panel
      W::ss64(s, desc_sw128(q_base + (kk >> 2) * (BM * 128) + off),
              desc_sw128(k_base + (kk >> 2) * (kBN * 128) + off), 1);
    }
    wg_commit();
    wg_wait<0>();
    fence_regs(s);

    if (!full_cur) {
      const unsigned char* f = sFlag + st * kBN;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int c = i * 8 + 2 * tq;
        if (!f[c]) s[i][0] = s[i][2] = -INFINITY;
        if (!f[c + 1]) s[i][1] = s[i][3] = -INFINITY;
      }
    }

    // online softmax, rows g (e=0) and g+8 (e=1); m_r in log2 units (scores x scale x log2 e)
    const float c2 = p.scale_log2;
    float alpha[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < 8; ++i) mx = fmaxf(mx, fmaxf(s[i][2 * e], s[i][2 * e + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(m_r[e], mx * c2);
      // a row with every key masked so far keeps m = -inf; use 0 so exp2 gives 0, not NaN
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      alpha[e] = fast_exp2(m_r[e] - m_use);
      m_r[e] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        s[i][2 * e] = fast_exp2(fmaf(s[i][2 * e], c2, -m_use));
        s[i][2 * e + 1] = fast_exp2(fmaf(s[i][2 * e + 1], c2, -m_use));
        sum += s[i][2 * e] + s[i][2 * e + 1];
      }
      l_r[e] = l_r[e] * alpha[e] + sum;
    }
    // rescale O only when some row of the warp saw a new maximum (warp-uniform branch)
    if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
      for (int hf = 0; hf < kNH; ++hf) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          o[hf][i][0] *= alpha[0];
          o[hf][i][1] *= alpha[0];
          o[hf][i][2] *= alpha[1];
          o[hf][i][3] *= alpha[1];
        }
      }
    }

    // O += P V: P from registers (A), V transposed from shared memory (B)
    uint32_t pa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      pa[kk][0] = M::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = M::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
#pragma unroll
    for (int hf = 0; hf < kNH; ++hf) fence_regs(o[hf]);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int hf = 0; hf < kNH; ++hf) {
        W::rs64(o[hf], pa[kk], desc_sw128(v_base + hf * (kBN * 128) + kk * 16 * 128));
      }
    }
    wg_commit();
    wg_wait<0>();
#pragma unroll
    for (int hf = 0; hf < kNH; ++hf) fence_regs(o[hf]);
    if constexpr (KS == 2) {
      full_cur = full_new;
    } else {
      full_cur = full_n1;
      full_n1 = full_new;
    }
  }
  cp_async_wait<0>();

  T* ob = static_cast<T*>(p.out) + b * p.o_sb + h * p.o_sh;
  // lse is optional: a null pointer means the caller did not ask for it
  float* lb = p.lse == nullptr ? nullptr : p.lse + b * p.lse_sb + h * p.lse_sh;
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    float l = l_r[e];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int r = row0 + g + 8 * e;
    const int tok = sQTok[r];
    const float inv = l == 0.f ? 0.f : 1.f / l;  // NaN l (a NaN reached the row) stays NaN
    if (tok >= 0) {
      T* po = ob + (int64_t)tok * p.o_ss;
#pragma unroll
      for (int hf = 0; hf < kNH; ++hf) {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          M::store2(po + hf * 64 + i * 8 + 2 * tq, o[hf][i][2 * e] * inv, o[hf][i][2 * e + 1] * inv);
        }
      }
      if (tq == 0 && lb != nullptr) {
        lb[tok] = l == 0.f ? -INFINITY : 0.6931471805599453f * (m_r[e] + __log2f(l));
      }
    }
  }
}

#endif  // LONGCAT_SM90_WGMMA

template <typename T, int D, int NWG, bool kSparse, int KS>
__global__ void __launch_bounds__(128 * NWG, NWG == 2 ? 2 : 1)
    attn_fwd_sm90_kernel(const __grid_constant__ AttnFwdParams p) {
#ifdef LONGCAT_SM90_WGMMA
  attn_fwd_sm90_body<T, D, NWG, kSparse, KS>(p);
#else
  // built for another target: the host only launches this kernel from an sm_90a binary
  __trap();
#endif
}

template <typename T, int D, int NWG, bool kSparse, int KS>
cudaError_t launch90(const AttnFwdParams& p, dim3 grid, int table_entries, cudaStream_t stream) {
  using K = K90<T, D, NWG, kSparse, KS>;
  const int smem = K::smem_bytes(table_entries);
  auto* fn = attn_fwd_sm90_kernel<T, D, NWG, kSparse, KS>;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  fn<<<grid, K::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Dense: 2 warpgroups (128 query rows) per CTA, 2 key stages (1 warpgroup lost: cond 4 109.6 ms
// vs 89.9 ms, NOTES.md v5).
template <typename T, int D>
cudaError_t dense90(const AttnFwdParams& p, cudaStream_t stream) {
  dim3 grid((p.sq + 127) / 128, p.batch * p.heads);
  return launch90<T, D, 2, false, 2>(p, grid, 0, stream);
}

// Block-sparse: 1 warpgroup per CTA, 2 key stages (3 stages lost: 24x44x80 32.9 ms vs 25.9 ms,
// NOTES.md v5).
template <typename T, int D>
cudaError_t sparse90(const AttnFwdParams& p, cudaStream_t stream) {
  const int lq = p.cq[0] * p.cq[1] * p.cq[2];
  const int lk = p.ck[0] * p.ck[1] * p.ck[2];
  const int table = (lk + kBN - 1) / kBN * kBN;
  dim3 grid(p.num_q_blocks * ((lq + 63) / 64), p.batch * p.heads);
  return launch90<T, D, 1, true, 2>(p, grid, table, stream);
}

// whether the sm_90a kernels of this binary can run on the current device
bool sm90_ready() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    return false;
  }
  if (major != 9) return false;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, attn_fwd_sm90_kernel<__nv_bfloat16, 128, 1, true, 2>) !=
      cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return attr.binaryVersion == 90;
}

}  // namespace

bool attn_fwd_sm90_available() {
  static const bool ready = sm90_ready();
  return ready;
}

cudaError_t attn_fwd_dense_sm90(const AttnFwdParams& p, DType dtype, int head_dim, cudaStream_t stream) {
  if (!attn_fwd_sm90_available()) return cudaErrorNotSupported;
  if (dtype == DType::kBF16) {
    if (head_dim == 128) return dense90<__nv_bfloat16, 128>(p, stream);
    if (head_dim == 64) return dense90<__nv_bfloat16, 64>(p, stream);
  } else {
    if (head_dim == 128) return dense90<__half, 128>(p, stream);
    if (head_dim == 64) return dense90<__half, 64>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attn_fwd_block_sparse_sm90(const AttnFwdParams& p, DType dtype, int head_dim,
                                       cudaStream_t stream) {
  if (!attn_fwd_sm90_available()) return cudaErrorNotSupported;
  for (int a = 0; a < 3; ++a) {
    if (p.cq[a] <= 0 || p.ck[a] <= 0 || p.ck[a] >= 1024) return cudaErrorInvalidValue;
  }
  if (p.ck[0] * p.ck[1] * p.ck[2] > kMaxBlockTokens || p.cq[0] * p.cq[1] * p.cq[2] > kMaxBlockTokens) {
    return cudaErrorInvalidValue;
  }
  if (dtype == DType::kBF16) {
    if (head_dim == 128) return sparse90<__nv_bfloat16, 128>(p, stream);
    if (head_dim == 64) return sparse90<__nv_bfloat16, 64>(p, stream);
  } else {
    if (head_dim == 128) return sparse90<__half, 128>(p, stream);
    if (head_dim == 64) return sparse90<__half, 64>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longcat
