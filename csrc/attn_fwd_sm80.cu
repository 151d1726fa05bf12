// FlashAttention-2-style forward with mma.sync m16n8k16 (sm_80+), for dense two-segment
// attention and for block-sparse attention over 3D chunked blocks. No torch headers here.
//
// Work split: one CTA per (query tile, batch*head); each warp owns 16 query rows; key/value
// tiles of 64 rows stream through shared memory (cp.async, two stages). Rows are gathered one
// token at a time (a 3D chunk is not contiguous in the sequence), 16 bytes per cp.async, so any
// BSHD strides work as long as the last dim is contiguous and strides are multiples of 8.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "attn_common.cuh"
#include "attn_fwd.h"

namespace longcat {
namespace {

using namespace detail;


template <typename T, int D, int BM, bool kSparse>
struct Kernel {
  static constexpr int kWarps = BM / 16;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kCPR = D / 8;                    // 16-byte chunks per row
  static constexpr int kRowsPerPass = kThreads / kCPR;  // rows one pass of the CTA loads
  static constexpr int kKPasses = kBN / kRowsPerPass;
  static constexpr int kQPasses = BM / kRowsPerPass;
  static_assert(kBN % kRowsPerPass == 0 && BM % kRowsPerPass == 0, "tile/threads mismatch");

  // Shared memory: Q [BM, D], K [2, BN, D], V [2, BN, D], key-valid flags [2, BN],
  // query tokens [BM], key slot table [max_block_tokens] (block-sparse only).
  static constexpr int kSmemTiles = (BM + 4 * kBN) * D * (int)sizeof(T);
  static constexpr int kSmemFlags = 2 * kBN;
  static constexpr int kSmemQTok = BM * 4;
  static int smem_bytes(int key_table_entries) {
    return kSmemTiles + kSmemFlags + kSmemQTok + key_table_entries * 8;
  }
};

template <typename T, int D, int BM, bool kSparse>
__global__ void __launch_bounds__(Kernel<T, D, BM, kSparse>::kThreads)
    attn_fwd_kernel(const __grid_constant__ AttnFwdParams p) {
  using K = Kernel<T, D, BM, kSparse>;
  using M = MmaType<T>;
  constexpr int kThreads = K::kThreads;
  constexpr int kCPR = K::kCPR;
  constexpr int kRowsPerPass = K::kRowsPerPass;

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * D;
  T* sV = sK + 2 * kBN * D;
  unsigned char* sFlag = reinterpret_cast<unsigned char*>(sV + 2 * kBN * D);
  int* sQTok = reinterpret_cast<int*>(sFlag + 2 * kBN);
  int2* sKTab = reinterpret_cast<int2*>(sQTok + BM);

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int bh = blockIdx.y;
  const int b = bh / p.heads;
  const int h = bh % p.heads;

  const T* qb = static_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh;
  const T* k0b = static_cast<const T*>(p.k0) + b * p.k0_sb + h * p.k0_sh;
  const T* v0b = static_cast<const T*>(p.v0) + b * p.v0_sb + h * p.v0_sh;
  const T* k1b = static_cast<const T*>(p.k1) + b * p.k1_sb + h * p.k1_sh;
  const T* v1b = static_cast<const T*>(p.v1) + b * p.v1_sb + h * p.v1_sh;
  const int s_total = p.s0 + p.s1;

  // ---- work description: query rows and the list of key tiles (attn_common.cuh) ---------------
  const CtaWork work = cta_work<kSparse, BM, kThreads>(p, b, h, s_total, tid, sQTok, sKTab);
  int n_tiles = work.n_tiles;
  int k_subs = work.k_subs;
  const int* sel = work.sel;
  __syncthreads();

  // ---- loaders -------------------------------------------------------------------------------
  const int ld_c = tid % kCPR;
  const int ld_r = tid / kCPR;

  // Loads key/value tile `j` into stage `st`, writes per-row valid flags; returns whether every
  // row this thread loaded is a real token.
  auto load_kv = [&](int j, int st) -> bool {
    bool all_valid = true;
    T* dK = sK + st * kBN * D;
    T* dV = sV + st * kBN * D;
    unsigned char* dF = sFlag + st * kBN;
    if constexpr (kSparse) {
      int blk = sel[j / k_subs];
      const int sub = j % k_subs;
      // an out-of-range block id (corrupt selection) reads nothing instead of faulting
      const bool blk_ok = blk >= 0 && blk < p.nbk[0] * p.nbk[1] * p.nbk[2];
      if (!blk_ok) blk = 0;
      const int bw = blk % p.nbk[2];
      const int bhh = (blk / p.nbk[2]) % p.nbk[1];
      const int bt = blk / (p.nbk[2] * p.nbk[1]);
      const int t0 = bt * p.ck[0], h0 = bhh * p.ck[1], w0 = bw * p.ck[2];
      const int et = min(p.ck[0], p.gk[0] - t0);
      const int eh = min(p.ck[1], p.gk[1] - h0);
      const int ew = min(p.ck[2], p.gk[2] - w0);
      const int base = (t0 * p.gk[1] + h0) * p.gk[2] + w0;
#pragma unroll
      for (int i = 0; i < K::kKPasses; ++i) {
        const int r = ld_r + i * kRowsPerPass;
        const int2 e = sKTab[sub * kBN + r];
        const int dt = e.y & 1023, dh = (e.y >> 10) & 1023, dw = e.y >> 20;
        const bool valid = blk_ok && dt < et && dh < eh && dw < ew;
        const int s = base + e.x;
        const T* pk;
        const T* pv;
        if (s < p.s0) {
          pk = k0b + s * p.k0_ss;
          pv = v0b + s * p.v0_ss;
        } else {
          pk = k1b + (int64_t)(s - p.s0) * p.k1_ss;
          pv = v1b + (int64_t)(s - p.s0) * p.v1_ss;
        }
        if (!valid) pk = pv = k1b;
        cp_async16(smem_u32(dK + swz<D>(r, ld_c)), pk + ld_c * 8, valid);
        cp_async16(smem_u32(dV + swz<D>(r, ld_c)), pv + ld_c * 8, valid);
        if (ld_c == 0) dF[r] = valid;
        all_valid = all_valid && valid;
      }
    } else {
#pragma unroll
      for (int i = 0; i < K::kKPasses; ++i) {
        const int r = ld_r + i * kRowsPerPass;
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
        cp_async16(smem_u32(dK + swz<D>(r, ld_c)), pk + ld_c * 8, valid);
        cp_async16(smem_u32(dV + swz<D>(r, ld_c)), pv + ld_c * 8, valid);
        if (ld_c == 0) dF[r] = valid;
        all_valid = all_valid && valid;
      }
    }
    return all_valid;
  };

  // Q tile
#pragma unroll
  for (int i = 0; i < K::kQPasses; ++i) {
    const int r = ld_r + i * kRowsPerPass;
    const int s = sQTok[r];
    const T* pq = s >= 0 ? qb + (int64_t)s * p.q_ss + ld_c * 8 : qb;
    cp_async16(smem_u32(sQ + swz<D>(r, ld_c)), pq, s >= 0);
  }
  bool first_valid = true;
  if (n_tiles > 0) first_valid = load_kv(0, 0);
  cp_async_commit();
  // whether the current tile has no padding key (then the masking below is skipped)
  bool full_cur = __syncthreads_and(first_valid);

  // ---- per-thread state ----------------------------------------------------------------------
  constexpr int kNT = kBN / 8;  // S n-tiles per row block
  constexpr int kDT = D / 8;    // O n-tiles
  float o[kDT][4];
#pragma unroll
  for (int i = 0; i < kDT; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY};
  float l_r[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];
  const int g = lane >> 2;
  const int tq = lane & 3;
  const int row0 = warp * 16;

  for (int j = 0; j < n_tiles; ++j) {
    const int st = j & 1;
    __syncthreads();  // everyone is done with the stage the next prefetch overwrites
    bool next_valid = true;
    if (j + 1 < n_tiles) next_valid = load_kv(j + 1, st ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    const bool full_next = __syncthreads_and(next_valid);
    if (j == 0) {
      // Q fragments stay in registers for the whole key loop.
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const int r = row0 + (lane & 15);
        const int c = kk * 2 + (lane >> 4);
        ldsm_x4(qf[kk], smem_u32(sQ + swz<D>(r, c)));
      }
    }
    const T* cK = sK + st * kBN * D;
    const T* cV = sV + st * kBN * D;

    // S = Q K^T  [16, BN] per warp
    float s[kNT][4];
#pragma unroll
    for (int i = 0; i < kNT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t kf[4];
        const int r = np * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int c = kk * 2 + ((lane >> 3) & 1);
        ldsm_x4(kf, smem_u32(cK + swz<D>(r, c)));
        M::mma(s[2 * np], qf[kk], kf[0], kf[1]);
        M::mma(s[2 * np + 1], qf[kk], kf[2], kf[3]);
      }
    }

    // masking of padding keys (partial blocks, sequence tail)
    if (!full_cur) {
      const unsigned char* f = sFlag + st * kBN;
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        const int c = i * 8 + 2 * tq;
        if (!f[c]) s[i][0] = s[i][2] = -INFINITY;
        if (!f[c + 1]) s[i][1] = s[i][3] = -INFINITY;
      }
    }

    // online softmax over rows g (e=0) and g+8 (e=1), in the exp2 domain
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float mx = m_r[e];
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        s[i][2 * e] *= p.scale_log2;
        s[i][2 * e + 1] *= p.scale_log2;
        mx = fmaxf(mx, fmaxf(s[i][2 * e], s[i][2 * e + 1]));
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // a row with every key masked so far keeps m = -inf; use 0 so exp2 gives 0, not NaN
      const float m_use = mx == -INFINITY ? 0.f : mx;
      const float alpha = fast_exp2(m_r[e] - m_use);
      m_r[e] = mx;
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < kNT; ++i) {
        s[i][2 * e] = fast_exp2(s[i][2 * e] - m_use);
        s[i][2 * e + 1] = fast_exp2(s[i][2 * e + 1] - m_use);
        sum += s[i][2 * e] + s[i][2 * e + 1];
      }
      l_r[e] = l_r[e] * alpha + sum;
#pragma unroll
      for (int i = 0; i < kDT; ++i) {
        o[i][2 * e] *= alpha;
        o[i][2 * e + 1] *= alpha;
      }
    }

    // O += P V  (P from registers as the A operand)
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = M::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = M::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = M::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = M::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t vf[4];
        const int r = kk * 16 + (lane & 15);
        const int c = dp * 2 + (lane >> 4);
        ldsm_x4_t(vf, smem_u32(cV + swz<D>(r, c)));
        M::mma(o[2 * dp], pa, vf[0], vf[1]);
        M::mma(o[2 * dp + 1], pa, vf[2], vf[3]);
      }
    }
    full_cur = full_next;
  }
  cp_async_wait<0>();

  // ---- epilogue: normalise, write out and lse ------------------------------------------------
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
      for (int i = 0; i < kDT; ++i) {
        M::store2(po + i * 8 + 2 * tq, o[i][2 * e] * inv, o[i][2 * e + 1] * inv);
      }
      if (tq == 0 && lb != nullptr) {
        // m_r is in log2 units: lse = ln(2) * (m + log2(l)); -inf when nothing was visited.
        lb[tok] = l == 0.f ? -INFINITY : 0.6931471805599453f * (m_r[e] + __log2f(l));
      }
    }
  }
}

template <typename T, int D, int BM, bool kSparse>
cudaError_t launch(const AttnFwdParams& p, dim3 grid, int table_entries, cudaStream_t stream) {
  using K = Kernel<T, D, BM, kSparse>;
  const int smem = K::smem_bytes(table_entries);
  auto* fn = attn_fwd_kernel<T, D, BM, kSparse>;
  cudaError_t err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  if (grid.x == 0 || grid.y == 0) return cudaSuccess;
  fn<<<grid, K::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t dispatch_dense(const AttnFwdParams& p, cudaStream_t stream) {
  constexpr int BM = 128;
  dim3 grid((p.sq + BM - 1) / BM, p.batch * p.heads);
  return launch<T, D, BM, false>(p, grid, 0, stream);
}

template <typename T, int D>
cudaError_t dispatch_sparse(const AttnFwdParams& p, cudaStream_t stream) {
  const int lq = p.cq[0] * p.cq[1] * p.cq[2];
  const int lk = p.ck[0] * p.ck[1] * p.ck[2];
  const int table = (lk + kBN - 1) / kBN * kBN;
  if (lq <= 64) {
    dim3 grid(p.num_q_blocks, p.batch * p.heads);
    return launch<T, D, 64, true>(p, grid, table, stream);
  }
  dim3 grid(p.num_q_blocks * ((lq + 127) / 128), p.batch * p.heads);
  return launch<T, D, 128, true>(p, grid, table, stream);
}

bool sparse_config_ok(const AttnFwdParams& p) {
  for (int a = 0; a < 3; ++a) {
    if (p.cq[a] <= 0 || p.ck[a] <= 0 || p.ck[a] >= 1024) return false;
  }
  return p.cq[0] * p.cq[1] * p.cq[2] <= kMaxBlockTokens &&
         p.ck[0] * p.ck[1] * p.ck[2] <= kMaxBlockTokens;
}

}  // namespace

bool attn_fwd_sm80_available() {
  // whether this binary holds code (SASS or PTX) the current device can run
  static const bool ready = [] {
    cudaFuncAttributes attr;
    if (cudaFuncGetAttributes(&attr, attn_fwd_kernel<__nv_bfloat16, 128, 128, false>) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return true;
  }();
  return ready;
}

cudaError_t attn_fwd_dense(const AttnFwdParams& p, DType dtype, int head_dim,
                           cudaStream_t stream) {
  if (dtype == DType::kBF16) {
    if (head_dim == 128) return dispatch_dense<__nv_bfloat16, 128>(p, stream);
    if (head_dim == 64) return dispatch_dense<__nv_bfloat16, 64>(p, stream);
  } else {
    if (head_dim == 128) return dispatch_dense<__half, 128>(p, stream);
    if (head_dim == 64) return dispatch_dense<__half, 64>(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t attn_fwd_block_sparse(const AttnFwdParams& p, DType dtype, int head_dim,
                                  cudaStream_t stream) {
  if (!sparse_config_ok(p)) return cudaErrorInvalidValue;
  if (dtype == DType::kBF16) {
    if (head_dim == 128) return dispatch_sparse<__nv_bfloat16, 128>(p, stream);
    if (head_dim == 64) return dispatch_sparse<__nv_bfloat16, 64>(p, stream);
  } else {
    if (head_dim == 128) return dispatch_sparse<__half, 128>(p, stream);
    if (head_dim == 64) return dispatch_sparse<__half, 64>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace longcat
