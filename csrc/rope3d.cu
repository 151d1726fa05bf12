// 3D RoPE prologue for the cached-KV attention: fp32 math, result cast to the input dtype.
// One thread rotates 4 adjacent pairs (16 bytes) of one (token, head) row.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "rope3d.h"

namespace longcat {
namespace {

template <typename T>
__device__ __forceinline__ float2 to_f2(uint32_t v);
template <>
__device__ __forceinline__ float2 to_f2<__nv_bfloat16>(uint32_t v) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&v));
}
template <>
__device__ __forceinline__ float2 to_f2<__half>(uint32_t v) {
  return __half22float2(*reinterpret_cast<__half2*>(&v));
}
template <typename T>
__device__ __forceinline__ uint32_t from_f2(float a, float b);
template <>
__device__ __forceinline__ uint32_t from_f2<__nv_bfloat16>(float a, float b) {
  __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t from_f2<__half>(float a, float b) {
  __half2 v = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&v);
}

template <typename T>
__global__ void rope3d_kernel(const __grid_constant__ Rope3DParams p) {
  const int chunks = p.head_dim / 8;
  const int64_t n = static_cast<int64_t>(p.batch) * p.seq * p.heads * chunks;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % chunks);
    int64_t r = i / chunks;
    const int h = static_cast<int>(r % p.heads);
    r /= p.heads;
    const int s = static_cast<int>(r % p.seq);
    const int b = static_cast<int>(r / p.seq);
    const int hw = p.grid_h * p.grid_w;
    const int ft = s / hw + p.frame_offset;
    const int fh = (s % hw) / p.grid_w;
    const int fw = s % p.grid_w;
    const T* src = static_cast<const T*>(p.x) + b * p.x_sb + s * p.x_ss + h * p.x_sh + c * 8;
    T* dst = static_cast<T*>(p.y) + b * p.y_sb + s * p.y_ss + h * p.y_sh + c * 8;
    const uint4 in = *reinterpret_cast<const uint4*>(src);
    const uint32_t w[4] = {in.x, in.y, in.z, in.w};
    uint32_t o[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int d = c * 8 + 2 * k;  // even element of the pair
      float cs, sn;
      if (d < p.dt) {
        cs = p.cos_t[ft * p.dt + d];
        sn = p.sin_t[ft * p.dt + d];
      } else if (d < p.dt + p.dh) {
        cs = p.cos_h[fh * p.dh + d - p.dt];
        sn = p.sin_h[fh * p.dh + d - p.dt];
      } else {
        cs = p.cos_w[fw * p.dw + d - p.dt - p.dh];
        sn = p.sin_w[fw * p.dw + d - p.dt - p.dh];
      }
      const float2 x = to_f2<T>(w[k]);
      o[k] = from_f2<T>(x.x * cs - x.y * sn, x.y * cs + x.x * sn);
    }
    *reinterpret_cast<uint4*>(dst) = make_uint4(o[0], o[1], o[2], o[3]);
  }
}

}  // namespace

cudaError_t rope3d_apply(const Rope3DParams& p, DType dtype, cudaStream_t stream) {
  if (p.head_dim % 8 != 0 || p.dt + p.dh + p.dw != p.head_dim || p.dt % 2 || p.dh % 2) {
    return cudaErrorInvalidValue;
  }
  const int64_t n = static_cast<int64_t>(p.batch) * p.seq * p.heads * (p.head_dim / 8);
  if (n == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks64 = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 132 * 64 ? blocks64 : 132 * 64);
  if (dtype == DType::kBF16) {
    rope3d_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(p);
  } else {
    rope3d_kernel<__half><<<blocks, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace longcat
