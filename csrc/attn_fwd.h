// Plain C++ interface of the attention forward kernels (no torch headers).
// One kernel family serves three ops:
//   * dense two-segment attention: keys/values = [seg0; seg1] along seq (cached-KV attention,
//     seg0 = cache with batch stride 0 when broadcast, seg1 = fresh tokens);
//   * block-sparse attention over 3D chunked blocks (BSA), keys again taken from [seg0; seg1]
//     (seg0 empty for plain BSA), each query block walking its selected key blocks.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

namespace longcat {

enum class DType : int { kBF16 = 0, kFP16 = 1 };

struct AttnFwdParams {
  // queries [B, Sq, H, D]; strides in elements, last dim contiguous.
  const void* q;
  int64_t q_sb, q_ss, q_sh;
  // key/value segment 0 ([B0, S0, H, D]; batch stride 0 broadcasts one cache over the batch).
  const void* k0;
  const void* v0;
  int64_t k0_sb, k0_ss, k0_sh, v0_sb, v0_ss, v0_sh;
  int s0;
  // key/value segment 1 ([B, S1, H, D]).
  const void* k1;
  const void* v1;
  int64_t k1_sb, k1_ss, k1_sh, v1_sb, v1_ss, v1_sh;
  int s1;
  // output [B, Sq, H, D] and lse [B, H, Sq] fp32 (natural log), row stride 1; lse may be
  // nullptr (not asked for): the kernels then skip its store.
  void* out;
  int64_t o_sb, o_ss, o_sh;
  float* lse;
  int64_t lse_sb, lse_sh;
  int batch, heads, sq;
  // softmax scale times log2(e): the kernels work with exp2.
  float scale_log2;
  // Block-sparse geometry (unused in dense mode). Grids (T, H, W), chunks (ct, ch, cw),
  // blocks per axis; the key grid covers [seg0; seg1] tokens.
  int gq[3], cq[3], nbq[3];
  int gk[3], ck[3], nbk[3];
  // Selection: indices [B, H, Nq, max_sel] int32 and counts [B, H, Nq] int32 (strides in elements).
  const int* sel_idx;
  const int* sel_cnt;
  int64_t si_sb, si_sh, si_sq;
  int64_t sc_sb, sc_sh, sc_sq;
  int num_q_blocks;
  int max_sel;
};

// Three kernel families; the caller (ops.cpp, told by longcat_kernels/dispatch.py) names the one
// to run, and none of the launchers switches to another. Each returns the launch error
// (cudaSuccess if none); a bad configuration returns cudaErrorInvalidValue, a kernel that cannot
// run on this binary/device/inputs cudaErrorNotSupported.

// sm80 (csrc/attn_fwd_sm80.cu, mma.sync): any sm_80+ GPU the binary has code for. head_dim 64/128.
bool attn_fwd_sm80_available();
cudaError_t attn_fwd_dense(const AttnFwdParams& p, DType dtype, int head_dim, cudaStream_t stream);
cudaError_t attn_fwd_block_sparse(const AttnFwdParams& p, DType dtype, int head_dim,
                                  cudaStream_t stream);

// sm90 (csrc/attn_fwd_sm90.cu, wgmma): available when this binary holds sm_90a code and the
// current device is compute capability 9.x. Dense: 2 warpgroups per CTA; block-sparse: 1
// warpgroup, 2 key stages (the measured winners; NOTES.md has the lost configurations).
bool attn_fwd_sm90_available();
cudaError_t attn_fwd_dense_sm90(const AttnFwdParams& p, DType dtype, int head_dim, cudaStream_t stream);
cudaError_t attn_fwd_block_sparse_sm90(const AttnFwdParams& p, DType dtype, int head_dim,
                                       cudaStream_t stream);

// sm90_ws, dense (csrc/attn_fwd_sm90_ws.cu: TMA producer warpgroup + 2 wgmma consumer warpgroups,
// FA3 structure, intra-warpgroup overlap, 2 K/V stages), head_dim 128 only.
// available: sm90 available and the driver's tensor-map encoder found.
// supported(p): also head_dim 128, 16-byte aligned base pointers and strides that are multiples
// of 8 elements (TMA). cudaErrorNotSupported when not supported or the driver refuses a tensor map.
bool attn_fwd_sm90ws_available();
bool attn_fwd_sm90ws_supported(const AttnFwdParams& p, int head_dim);
cudaError_t attn_fwd_dense_sm90ws(const AttnFwdParams& p, DType dtype, int head_dim, cudaStream_t stream);

// sm90_ws, block-sparse (csrc/bsa_fwd_sm90_ws.cu: one TMA box per 3D key chunk, producer warpgroup
// + 2 consumer warpgroups that each own one 64-token query block; overlap, 2 K/V stages).
// supported(p): head_dim 128, query and key chunk volume 64, one key segment or two whose split
// (s0 tokens) falls on a key-block boundary along t, sm90_ws available, 16-byte aligned pointers
// and strides that are multiples of 8 elements.
bool bsa_fwd_sm90ws_available();
bool bsa_fwd_sm90ws_supported(const AttnFwdParams& p, int head_dim);
cudaError_t bsa_fwd_sm90ws(const AttnFwdParams& p, DType dtype, int head_dim, cudaStream_t stream);

// Largest 3D-chunk block (tokens) the block-sparse kernel accepts.
constexpr int kMaxBlockTokens = 1024;

}  // namespace longcat
