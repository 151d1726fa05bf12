// Device helpers shared by the sm80 (mma.sync) and sm90 (wgmma) attention kernels.
// No torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace longcat {
namespace detail {

constexpr int kBN = 64;  // key rows per tile

template <typename T>
struct MmaType;
template <>
struct MmaType<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void store2(__nv_bfloat16* p, float lo, float hi) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
  }
};
template <>
struct MmaType<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                             uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void store2(__half* p, float lo, float hi) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);
  }
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 writes zeros (padding rows must be zero: 0 * garbage = NaN).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Element offset of 16-byte chunk c of row r in a [rows, D] tile: XOR swizzle so that the 8 rows
// an ldmatrix reads at one logical chunk land in 8 different bank groups.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Token of slot r of a 3D block whose origin is (t0, h0, w0): -1 for padding slots.
__device__ __forceinline__ int block_slot_token(int r, const int (&grid)[3], const int (&chunk)[3],
                                                int t0, int h0, int w0) {
  const int cw = chunk[2], ch = chunk[1];
  const int dw = r % cw;
  const int dh = (r / cw) % ch;
  const int dt = r / (cw * ch);
  const int t = t0 + dt, h = h0 + dh, w = w0 + dw;
  if (dt >= chunk[0] || t >= grid[0] || h >= grid[1] || w >= grid[2]) return -1;
  return (t * grid[1] + h) * grid[2] + w;
}

// Work of one CTA of the sm80 / sm90 forward kernels (grid x: query tiles, y: batch*head).
// Dense: query rows blockIdx.x*BM .. into sQTok (-1 past Sq), key tiles of kBN rows over
// [seg0; seg1]. Block-sparse: query block and sub-tile from blockIdx.x, sQTok = the tile's token
// ids (-1 for padding slots), sKTab[k_subs*kBN] = each key slot's offset from its block origin and
// its packed (dt, dh, dw) (out of every extent for padding slots), tiles = selected blocks x k_subs.
struct CtaWork {
  int n_tiles;
  int k_subs;
  const int* sel;
};
template <bool kSparse, int BM, int kThreads, typename Params>
__device__ __forceinline__ CtaWork cta_work(const Params& p, int b, int h, int s_total, int tid, int* sQTok,
                                            int2* sKTab) {
  CtaWork w{0, 1, nullptr};
  if constexpr (kSparse) {
    const int lq = p.cq[0] * p.cq[1] * p.cq[2];
    const int lk = p.ck[0] * p.ck[1] * p.ck[2];
    const int q_subs = (lq + BM - 1) / BM;
    const int q_block = blockIdx.x / q_subs;
    const int q_sub = blockIdx.x % q_subs;
    w.k_subs = (lk + kBN - 1) / kBN;
    const int cnt = min(p.sel_cnt[b * p.sc_sb + h * p.sc_sh + q_block * p.sc_sq], p.max_sel);
    w.sel = p.sel_idx + b * p.si_sb + h * p.si_sh + q_block * p.si_sq;
    w.n_tiles = cnt * w.k_subs;
    for (int r = tid; r < w.k_subs * kBN; r += kThreads) {
      int2 e;
      if (r < lk) {
        const int dw = r % p.ck[2];
        const int dh = (r / p.ck[2]) % p.ck[1];
        const int dt = r / (p.ck[2] * p.ck[1]);
        e.x = (dt * p.gk[1] + dh) * p.gk[2] + dw;
        e.y = dt | (dh << 10) | (dw << 20);
      } else {
        e.x = 0;
        e.y = 0x3FFFFFFF;  // out of every extent
      }
      sKTab[r] = e;
    }
    const int bq_w = q_block % p.nbq[2];
    const int bq_h = (q_block / p.nbq[2]) % p.nbq[1];
    const int bq_t = q_block / (p.nbq[2] * p.nbq[1]);
    for (int r = tid; r < BM; r += kThreads) {
      const int slot = q_sub * BM + r;
      sQTok[r] = slot < lq ? block_slot_token(slot, p.gq, p.cq, bq_t * p.cq[0], bq_h * p.cq[1],
                                              bq_w * p.cq[2])
                           : -1;
    }
  } else {
    const int m0 = blockIdx.x * BM;
    for (int r = tid; r < BM; r += kThreads) sQTok[r] = (m0 + r < p.sq) ? m0 + r : -1;
    w.n_tiles = (s_total + kBN - 1) / kBN;
  }
  return w;
}

}  // namespace detail
}  // namespace longcat
