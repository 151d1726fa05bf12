// 3D RoPE (SPEC 5, interleaved pairs) applied to a [B, S, H, D] tensor: plain C++ interface.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "attn_fwd.h"

namespace longcat {

struct Rope3DParams {
  const void* x;  // [B, S, H, D], last dim contiguous, strides in elements
  int64_t x_sb, x_ss, x_sh;
  void* y;  // output, same shape
  int64_t y_sb, y_ss, y_sh;
  int batch, seq, heads, head_dim;
  // per-axis fp32 tables [n, d_axis] (contiguous), angles already repeated per adjacent pair
  const float* cos_t;
  const float* sin_t;
  const float* cos_h;
  const float* sin_h;
  const float* cos_w;
  const float* sin_w;
  int dt, dh, dw;        // dt + dh + dw == head_dim
  int grid_h, grid_w;    // tokens per frame = grid_h * grid_w
  int frame_offset;      // grid frame of x's first token
};

cudaError_t rope3d_apply(const Rope3DParams& p, DType dtype, cudaStream_t stream);

}  // namespace longcat
