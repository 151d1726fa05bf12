// Pair reorder of a block-sparse selection for the sm90_ws forward's shared ring
// (bsa_fwd_sm90_ws.cu): for each pair of neighbouring query blocks (2i, 2i+1) of a (batch, head),
// both lists are rewritten as [the key blocks the two share, ascending; the block's own key
// blocks, ascending; -1 ...]; `common` gets the shared count for both blocks of the pair (the
// last block of an odd count has no partner: its own blocks ascending, common 0). Ascending order
// also lets the CTAs resident together sweep the key blocks in the same order (L2 reuse).
// One warp per pair: the two lists become two bitmaps over the key blocks in shared memory, and
// the warp walks the bitmap words in order (lane-parallel, exclusive scans for the output
// positions). Ids outside [0, nbk) are dropped (the forward skips them anyway) and a repeated id
// is kept once (a validated selection has neither). Reference: pair_common_first in
// longcat_kernels/ops/block_sparse_attn/cuda.py. No torch headers.
#include <cuda_runtime.h>
#include <stdint.h>

#include "attn_fwd.h"

namespace longcat {
namespace {

__device__ __forceinline__ int excl_scan(int v, int lane, int& total) {
  int x = v;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const int y = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += y;
  }
  total = __shfl_sync(0xffffffffu, x, 31);
  return x - v;
}

// writes the set bits of word m (word index w) ascending at out[pos...]
__device__ __forceinline__ void emit(uint32_t m, int w, int* out, int pos) {
  while (m != 0u) {
    const int bit = __ffs(m) - 1;
    out[pos++] = w * 32 + bit;
    m &= m - 1u;
  }
}

__global__ void bsa_pair_reorder_kernel(PairReorderParams p, int words) {
  extern __shared__ uint32_t bits[];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + warp;
  const int npairs = (p.nq + 1) / 2;
  const int64_t rows = static_cast<int64_t>(p.batch) * p.heads;
  if (pair >= rows * npairs) return;
  const int pr = static_cast<int>(pair % npairs);
  const int64_t bh = pair / npairs;
  const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
  const int qa = 2 * pr, qb = qa + 1;
  const bool paired = qb < p.nq;
  const int K = p.max_sel;
  auto cnt_at = [&](int q) {
    const int c = p.cnt[b * p.c_sb + h * p.c_sh + q * p.c_sq];
    return c < 0 ? 0 : (c > K ? K : c);
  };
  auto in_row = [&](int q) { return p.idx + b * p.i_sb + h * p.i_sh + q * p.i_sq; };
  auto out_row = [&](int q) { return p.out + ((static_cast<int64_t>(b) * p.heads + h) * p.nq + q) * K; };
  auto common_at = [&](int q) -> int& { return p.common[(static_cast<int64_t>(b) * p.heads + h) * p.nq + q]; };

  uint32_t* ma = bits + static_cast<int64_t>(warp) * 2 * words;
  uint32_t* mb = ma + words;
  for (int w = lane; w < words; w += 32) ma[w] = mb[w] = 0u;
  __syncwarp();
  auto mark = [&](uint32_t* m, const int* list, int n) {
    for (int i = lane; i < n; i += 32) {
      const int x = list[i];
      if (x >= 0 && x < p.nbk) atomicOr(&m[x >> 5], 1u << (x & 31));
    }
  };
  mark(ma, in_row(qa), cnt_at(qa));
  if (paired) mark(mb, in_row(qb), cnt_at(qb));
  __syncwarp();

  int* oa = out_row(qa);
  int* ob = paired ? out_row(qb) : nullptr;
  // shared count first: the own blocks start after it
  int nc = 0;
  for (int w = lane; w < words; w += 32) nc += __popc(ma[w] & mb[w]);
#pragma unroll
  for (int d = 16; d > 0; d /= 2) nc += __shfl_xor_sync(0xffffffffu, nc, d);
  int pc = 0, pa = nc, pb = nc;
  for (int w0 = 0; w0 < words; w0 += 32) {
    const int w = w0 + lane;
    const uint32_t a = w < words ? ma[w] : 0u, bb = w < words ? mb[w] : 0u;
    const uint32_t c = a & bb, oa_bits = a & ~bb, ob_bits = bb & ~a;
    int tc, ta, tb;
    const int xc = excl_scan(__popc(c), lane, tc);
    const int xa = excl_scan(__popc(oa_bits), lane, ta);
    const int xb = excl_scan(__popc(ob_bits), lane, tb);
    emit(c, w, oa, pc + xc);
    emit(oa_bits, w, oa, pa + xa);
    if (paired) {
      emit(c, w, ob, pc + xc);
      emit(ob_bits, w, ob, pb + xb);
    }
    pc += tc;
    pa += ta;
    pb += tb;
  }
  for (int i = pa + lane; i < K; i += 32) oa[i] = -1;
  if (paired) {
    for (int i = pb + lane; i < K; i += 32) ob[i] = -1;
  }
  if (lane == 0) {
    common_at(qa) = nc;
    if (paired) common_at(qb) = nc;
  }
}

}  // namespace

int bsa_pair_reorder_max_key_blocks() {
  // one warp's two bitmaps must fit in a CTA's shared memory (227 KB)
  return (227 * 1024 / 8) * 32;
}

cudaError_t bsa_pair_reorder(const PairReorderParams& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.heads <= 0 || p.nq <= 0 || p.max_sel <= 0) return cudaSuccess;
  if (p.nbk <= 0 || p.nbk > bsa_pair_reorder_max_key_blocks()) return cudaErrorInvalidValue;
  const int words = (p.nbk + 31) / 32;
  const int64_t per_warp = static_cast<int64_t>(words) * 2 * 4;
  int warps = static_cast<int>((48 * 1024) / per_warp);  // default smem limit when it fits
  int64_t smem_cap = 48 * 1024;
  if (warps < 1) {
    warps = 1;
    smem_cap = per_warp;
  }
  if (warps > 8) warps = 8;
  const int64_t smem = per_warp * warps;
  if (smem > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(bsa_pair_reorder_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(smem_cap));
    if (e != cudaSuccess) return e;
  }
  const int64_t pairs = static_cast<int64_t>(p.batch) * p.heads * ((p.nq + 1) / 2);
  const int64_t blocks = (pairs + warps - 1) / warps;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  bsa_pair_reorder_kernel<<<static_cast<unsigned>(blocks), warps * 32, static_cast<size_t>(smem), stream>>>(p, words);
  return cudaGetLastError();
}

}  // namespace longcat
