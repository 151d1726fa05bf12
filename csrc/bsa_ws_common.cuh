// Helpers of the warp-specialised block-sparse forward (bsa_fwd_sm90_ws.cu): the 3D block geometry,
// and on the host the 5D TMA tensor map of one
// batch of a [S, heads, 128] tensor whose boxes are 3D chunks. No torch headers.
#pragma once
#include <cuda.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>
#include <stdint.h>

#include <initializer_list>

#include "attn_fwd.h"

namespace longcat {
namespace bsaws {

constexpr int kHeadDim = 128;  // the warp-specialised BSA kernels take head_dim 128

// origin (t, h, w) of block `blk` on a grid with nb[] blocks of chunk c[] per axis (raster t, h, w)
__device__ __forceinline__ void b_origin(int blk, const int (&nb)[3], const int (&c)[3], int& t0, int& h0, int& w0) {
  w0 = (blk % nb[2]) * c[2];
  h0 = ((blk / nb[2]) % nb[1]) * c[1];
  t0 = (blk / (nb[2] * nb[1])) * c[0];
}

inline PFN_cuTensorMapEncodeTiled_v12000 bsa_encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = []() -> PFN_cuTensorMapEncodeTiled_v12000 {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &q) !=
            cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  }();
  return fn;
}

// one batch of [S, H, 128] (element strides ss, sh) on grid g as {D, heads, W, H, T}, box chunk c
inline bool make_map5(CUtensorMap* map, const void* ptr, DType dt, int64_t heads, int64_t ss, int64_t sh,
               const int (&g)[3], const int (&c)[3]) {
  auto fn = bsa_encode_fn();
  if (fn == nullptr) return false;
  const int64_t es = 2;
  cuuint64_t dims[5] = {static_cast<cuuint64_t>(kHeadDim), static_cast<cuuint64_t>(heads), static_cast<cuuint64_t>(g[2]),
                        static_cast<cuuint64_t>(g[1]), static_cast<cuuint64_t>(g[0])};
  cuuint64_t strides[4] = {static_cast<cuuint64_t>(sh * es), static_cast<cuuint64_t>(ss * es),
                           static_cast<cuuint64_t>(ss * g[2] * es),
                           static_cast<cuuint64_t>(ss * g[2] * g[1] * es)};
  cuuint32_t box[5] = {64, 1, static_cast<cuuint32_t>(c[2]), static_cast<cuuint32_t>(c[1]),
                       static_cast<cuuint32_t>(c[0])};
  cuuint32_t estr[5] = {1, 1, 1, 1, 1};
  const CUresult r = fn(map, dt == DType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                        5, const_cast<void*>(ptr), dims, strides, box, estr, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                        CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

// TMA needs 16-byte aligned base pointers and strides that are multiples of 16 bytes
inline bool bsa_aligned16(const void* ptr, std::initializer_list<int64_t> strides) {
  if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  for (int64_t s : strides) {
    if (s % 8 != 0 || s < 0) return false;
  }
  return true;
}

}  // namespace bsaws
}  // namespace longcat
