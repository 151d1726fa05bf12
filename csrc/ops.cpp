// torch binding of the csrc kernels: validation, output allocation, stream, op registration.
// Registers torch.ops.longcat_kernels.{bsa_fwd_cuda, kv_cache_attn_fwd_cuda, prefix_attn_fwd_cuda,
// rope3d_cuda, available_kernels}; the attention ops take `kernel` (the family to run, chosen in
// longcat_kernels/dispatch.py) and raise if it cannot run the call;
// the fake (meta) implementations live in longcat_kernels/ops/*/cuda.py (register_fake).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <Python.h>

#include <cmath>
#include <cstdio>
#include <string>
#include <cstdlib>
#include <tuple>
#include <vector>

#include "attn_fwd.h"
#include "rope3d.h"

namespace {

using at::Tensor;

// `import longcat_kernels._C` must find a module object; the ops register at load time.
PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "longcat_kernels compiled CUDA ops", -1,
                       nullptr};

constexpr double kLog2e = 1.4426950408889634;

// Error messages are assembled here with std::to_string and passed to TORCH_CHECK as one C string:
// streaming integers or IntArrayRefs into TORCH_CHECK from this library crashed in libstdc++'s
// ostream inside a JIT build on the device (torch 2.11 wheel vs the local toolchain).
std::string S(const char* v) { return v; }
std::string S(const std::string& v) { return v; }
std::string S(bool v) { return v ? "true" : "false"; }
std::string S(int v) { return std::to_string(v); }
std::string S(long v) { return std::to_string(v); }
std::string S(long long v) { return std::to_string(v); }
std::string S(size_t v) { return std::to_string(v); }
std::string S(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}
std::string S(c10::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}
std::string S(const c10::Device& d) { return d.str(); }
std::string S(at::ScalarType t) { return c10::toString(t); }

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  std::string msg;
  ((msg += S(args)), ...);
  TORCH_CHECK(false, msg.c_str());
  std::abort();  // not reached
}

#define LK_CHECK(cond, ...)   \
  do {                        \
    if (!(cond)) {            \
      fail(__VA_ARGS__);      \
    }                         \
  } while (0)


longcat::DType to_dtype(const Tensor& t, const char* name) {
  if (t.scalar_type() == at::kBFloat16) return longcat::DType::kBF16;
  if (t.scalar_type() == at::kHalf) return longcat::DType::kFP16;
  LK_CHECK(false, "longcat_kernels (cuda): ", name, " must be bfloat16 or float16, got ",
              t.scalar_type(), "; use backend='triton' or 'torch' for float32");
  return longcat::DType::kBF16;
}

// The kernels copy 16-byte rows with cp.async: last dim contiguous, other strides multiples of
// 8 elements, base pointer 16-byte aligned. Anything else is copied to a contiguous tensor
// (correct, one extra pass over the tensor).
bool rows16_ok(const Tensor& t) {
  return t.stride(-1) == 1 && t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
         reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

Tensor rows16(const Tensor& t) {
  if (rows16_ok(t)) return t;
  Tensor c = t.contiguous();
  // contiguous() returns t itself when torch calls it contiguous: a misaligned start, or a size-1 dim
  // whose stride is not a multiple of 8 (torch ignores those strides; the sm90_ws TMA maps do not)
  if (!rows16_ok(c)) c = t.clone(at::MemoryFormat::Contiguous);
  return c;
}

void check_bshd(const Tensor& t, const char* name, const Tensor& q) {
  LK_CHECK(t.is_cuda(), "longcat_kernels (cuda): ", name, " must be a CUDA tensor, got ",
              t.device(), "; move it with .cuda() or use backend='torch'");
  LK_CHECK(t.device() == q.device(), "longcat_kernels (cuda): ", name, " is on ", t.device(),
              " but q is on ", q.device(), "; put all inputs on one device");
  LK_CHECK(t.dim() == 4, "longcat_kernels (cuda): ", name,
              " must be [batch, seq, heads, head_dim] (4-D), got shape ", t.sizes());
  LK_CHECK(t.scalar_type() == q.scalar_type(), "longcat_kernels (cuda): ", name, " has dtype ",
              t.scalar_type(), " but q has ", q.scalar_type(), "; cast all inputs to one dtype");
  LK_CHECK(t.size(2) == q.size(2) && t.size(3) == q.size(3), "longcat_kernels (cuda): ", name,
              " has heads x head_dim ", t.size(2), "x", t.size(3), " but q has ", q.size(2), "x",
              q.size(3));
}

void check_head_dim(const Tensor& q) {
  const int64_t d = q.size(3);
  LK_CHECK(d == 64 || d == 128, "longcat_kernels (cuda): head_dim must be 64 or 128, got ", d,
              "; use backend='triton' or 'torch' for other head dims");
}

void set_q_out(longcat::AttnFwdParams& p, const Tensor& q, const Tensor& out, const Tensor& lse) {
  p.q = q.data_ptr();
  p.q_sb = q.stride(0);
  p.q_ss = q.stride(1);
  p.q_sh = q.stride(2);
  p.out = out.data_ptr();
  p.o_sb = out.stride(0);
  p.o_ss = out.stride(1);
  p.o_sh = out.stride(2);
  const bool has_lse = lse.dim() == 3;
  p.lse = has_lse ? lse.data_ptr<float>() : nullptr;
  p.lse_sb = has_lse ? lse.stride(0) : 0;
  p.lse_sh = has_lse ? lse.stride(1) : 0;
  p.batch = static_cast<int>(q.size(0));
  p.sq = static_cast<int>(q.size(1));
  p.heads = static_cast<int>(q.size(2));
}

// Segment 0 may have batch 1 (broadcast over q's batch: stride 0, no copy) or q's batch.
void set_seg0(longcat::AttnFwdParams& p, const Tensor& k, const Tensor& v, int64_t batch) {
  p.k0 = k.data_ptr();
  p.v0 = v.data_ptr();
  const bool bcast = k.size(0) == 1 && batch != 1;
  p.k0_sb = bcast ? 0 : k.stride(0);
  p.v0_sb = bcast ? 0 : v.stride(0);
  p.k0_ss = k.stride(1);
  p.k0_sh = k.stride(2);
  p.v0_ss = v.stride(1);
  p.v0_sh = v.stride(2);
  p.s0 = static_cast<int>(k.size(1));
}

void set_seg1(longcat::AttnFwdParams& p, const Tensor& k, const Tensor& v) {
  p.k1 = k.data_ptr();
  p.v1 = v.data_ptr();
  p.k1_sb = k.stride(0);
  p.k1_ss = k.stride(1);
  p.k1_sh = k.stride(2);
  p.v1_sb = v.stride(0);
  p.v1_ss = v.stride(1);
  p.v1_sh = v.stride(2);
  p.s1 = static_cast<int>(k.size(1));
}

void set_seg1_empty(longcat::AttnFwdParams& p) {
  p.k1 = p.k0;
  p.v1 = p.v0;
  p.k1_sb = p.k1_ss = p.k1_sh = p.v1_sb = p.v1_ss = p.v1_sh = 0;
  p.s1 = 0;
}

void check_kv_pair(const Tensor& k, const Tensor& v, const char* kn, const char* vn,
                   const Tensor& q, bool allow_bcast) {
  check_bshd(k, kn, q);
  check_bshd(v, vn, q);
  LK_CHECK(k.sizes() == v.sizes(), "longcat_kernels (cuda): ", kn, " and ", vn,
              " must have the same shape, got ", k.sizes(), " and ", v.sizes());
  const bool batch_ok = k.size(0) == q.size(0) || (allow_bcast && k.size(0) == 1);
  LK_CHECK(batch_ok, "longcat_kernels (cuda): ", kn, " batch must be ",
              allow_bcast ? "1 or " : "", "q's batch ", q.size(0), ", got ", k.size(0));
}

void check_scale(double scale) {
  LK_CHECK(scale > 0 && std::isfinite(scale), "longcat_kernels (cuda): scale must be a positive "
              "finite number, got ", scale, "; use backend='torch' for other scales");
}

void check_launch(cudaError_t err, const char* op) {
  LK_CHECK(err == cudaSuccess, "longcat_kernels (cuda): ", op, " launch failed: ",
              cudaGetErrorString(err),
              " (cudaErrorInvalidValue means an unsupported configuration)");
}

// Kernel family, named by the caller (longcat_kernels/dispatch.py decides; nothing here reads the
// environment or switches to another family): "sm90_ws" (warp-specialised TMA + wgmma), "sm90"
// (wgmma) or "sm80" (mma.sync). A family that cannot run the call raises.
enum class Family { kSm90Ws, kSm90, kSm80 };

Family parse_family(const std::string& kernel) {
  if (kernel == "sm90_ws") return Family::kSm90Ws;
  if (kernel == "sm90") return Family::kSm90;
  if (kernel == "sm80") return Family::kSm80;
  fail("longcat_kernels (cuda): kernel must be 'sm90_ws', 'sm90' or 'sm80', got '", kernel, "'");
}

void check_family_available(Family f, const std::string& kernel) {
  if (f == Family::kSm80) {
    LK_CHECK(longcat::attn_fwd_sm80_available(), "longcat_kernels (cuda): kernel '", kernel,
             "' has no code for this device in this build; rebuild with LONGCAT_KERNELS_CUDA_ARCHS "
             "including this GPU's compute capability");
    return;
  }
  LK_CHECK(longcat::attn_fwd_sm90_available(), "longcat_kernels (cuda): kernel '", kernel,
           "' needs a compute capability 9.x GPU and sm_90a code in this build (rebuild with "
           "LONGCAT_KERNELS_CUDA_ARCHS including 9.0a); use kernel 'sm80'");
}

// The families this build can run on the current device, most specialised first ("sm90_ws,sm90,sm80").
std::string available_kernels() {
  std::string out;
  if (longcat::attn_fwd_sm90ws_available() && longcat::bsa_fwd_sm90ws_available()) out += "sm90_ws,";
  if (longcat::attn_fwd_sm90_available()) out += "sm90,";
  if (longcat::attn_fwd_sm80_available()) out += "sm80,";
  if (!out.empty()) out.pop_back();
  return out;
}

cudaError_t launch_dense(const longcat::AttnFwdParams& p, longcat::DType dtype, int d,
                         const std::string& kernel, cudaStream_t stream) {
  const Family f = parse_family(kernel);
  check_family_available(f, kernel);
  if (f == Family::kSm90Ws) {
    LK_CHECK(longcat::attn_fwd_sm90ws_supported(p, d), "longcat_kernels (cuda): kernel 'sm90_ws' "
             "cannot run this call (needs head_dim 128, got ", d, ", the driver's tensor-map encoder, "
             "16-byte aligned rows); use kernel 'sm90'");
    const cudaError_t err = longcat::attn_fwd_dense_sm90ws(p, dtype, d, stream);
    LK_CHECK(err != cudaErrorNotSupported, "longcat_kernels (cuda): kernel 'sm90_ws': the driver "
             "refused a TMA tensor map, an input has batch stride 0 (an expanded batch; only the first key "
             "segment's k and v together may be: pass the others .contiguous()), or batch*heads exceeds "
             "65535 (got ", p.batch * p.heads,
             "); use kernel 'sm90'");
    return err;
  }
  if (f == Family::kSm90) return longcat::attn_fwd_dense_sm90(p, dtype, d, stream);
  return longcat::attn_fwd_dense(p, dtype, d, stream);
}

cudaError_t launch_sparse(const longcat::AttnFwdParams& p, longcat::DType dtype, int d,
                          const std::string& kernel, cudaStream_t stream) {
  const Family f = parse_family(kernel);
  check_family_available(f, kernel);
  if (f == Family::kSm90Ws) {
    LK_CHECK(longcat::bsa_fwd_sm90ws_supported(p, d),
             "longcat_kernels (cuda): kernel 'sm90_ws' cannot run this block-sparse call (needs head_dim "
             "128, got ", d, "; query and key blocks of 64 tokens, got ", p.cq[0] * p.cq[1] * p.cq[2], " and ",
             p.ck[0] * p.ck[1] * p.ck[2], "; a [cache; fresh] split on a key-block boundary along t (cache of ",
             p.s0, " tokens, key chunk ", p.ck[0], " frames)); use kernel 'sm90'");
    const cudaError_t err = longcat::bsa_fwd_sm90ws(p, dtype, d, stream);
    LK_CHECK(err != cudaErrorNotSupported, "longcat_kernels (cuda): kernel '", kernel, "': the driver "
             "refused a TMA tensor map or the grid is too large (heads ", p.heads, ", query blocks ",
             p.num_q_blocks, "); use kernel 'sm90'");
    return err;
  }
  if (f == Family::kSm90) return longcat::attn_fwd_block_sparse_sm90(p, dtype, d, stream);
  return longcat::attn_fwd_block_sparse(p, dtype, d, stream);
}

// lse [B, H, Sq] fp32 when asked for; otherwise an empty tensor and the kernels get a null pointer
std::tuple<Tensor, Tensor> alloc_out(const Tensor& q, bool return_lse) {
  Tensor out = at::empty(q.sizes(), q.options());
  Tensor lse = return_lse ? at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat))
                          : at::empty({0}, q.options().dtype(at::kFloat));
  return {out, lse};
}

std::vector<int> three(c10::IntArrayRef a, const char* name) {
  LK_CHECK(a.size() == 3, "longcat_kernels (cuda): ", name, " must have 3 entries (t, h, w), got ",
              a.size());
  for (auto x : a) {
    LK_CHECK(x > 0, "longcat_kernels (cuda): ", name, " entries must be positive, got ", a);
  }
  return {static_cast<int>(a[0]), static_cast<int>(a[1]), static_cast<int>(a[2])};
}

// Block-sparse forward: q [B, Sq, H, D] on grid_q; keys/values = [k; k_fresh] on grid_k
// (k_fresh/v_fresh absent for plain BSA; k may have batch 1 when k_fresh is given: a cache).
std::tuple<Tensor, Tensor> bsa_fwd_cuda(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                        const c10::optional<Tensor>& k_fresh,
                                        const c10::optional<Tensor>& v_fresh,
                                        const Tensor& indices, const Tensor& counts,
                                        c10::IntArrayRef grid_q, c10::IntArrayRef grid_k,
                                        c10::IntArrayRef chunk_q, c10::IntArrayRef chunk_k,
                                        double scale, const std::string& kernel,
                                        bool return_lse) {
  LK_CHECK(q_in.is_cuda() && q_in.dim() == 4,
              "longcat_kernels (cuda): q must be a 4-D CUDA tensor [batch, seq, heads, head_dim], "
              "got ", q_in.sizes(), " on ", q_in.device());
  const auto dtype = to_dtype(q_in, "q");
  check_head_dim(q_in);
  const bool two = k_fresh.has_value();
  LK_CHECK(two == v_fresh.has_value(),
              "longcat_kernels (cuda): pass k_fresh and v_fresh together (or neither)");
  check_kv_pair(k_in, v_in, "k", "v", q_in, /*allow_bcast=*/two);
  if (two) check_kv_pair(*k_fresh, *v_fresh, "k_fresh", "v_fresh", q_in, false);
  auto gq = three(grid_q, "grid_q");
  auto gk = three(grid_k, "grid_k");
  auto cq = three(chunk_q, "chunk_q");
  auto ck = three(chunk_k, "chunk_k");
  LK_CHECK(static_cast<int64_t>(gq[0]) * gq[1] * gq[2] == q_in.size(1),
              "longcat_kernels (cuda): grid_q ", grid_q, " has ", gq[0] * gq[1] * gq[2],
              " tokens but q has seq ", q_in.size(1));
  const int64_t sk = k_in.size(1) + (two ? k_fresh->size(1) : 0);
  LK_CHECK(static_cast<int64_t>(gk[0]) * gk[1] * gk[2] == sk, "longcat_kernels (cuda): grid_k ",
              grid_k, " has ", gk[0] * gk[1] * gk[2], " tokens but the keys have seq ", sk);
  LK_CHECK(cq[0] * cq[1] * cq[2] <= longcat::kMaxBlockTokens &&
                  ck[0] * ck[1] * ck[2] <= longcat::kMaxBlockTokens,
              "longcat_kernels (cuda): blocks of more than ", longcat::kMaxBlockTokens,
              " tokens are not supported (chunk_q ", chunk_q, ", chunk_k ", chunk_k,
              "); use backend='triton'");
  int nbq[3], nbk[3];
  for (int a = 0; a < 3; ++a) {
    nbq[a] = (gq[a] + cq[a] - 1) / cq[a];
    nbk[a] = (gk[a] + ck[a] - 1) / ck[a];
  }
  const int64_t nq = static_cast<int64_t>(nbq[0]) * nbq[1] * nbq[2];
  LK_CHECK(indices.is_cuda() && counts.is_cuda() && indices.device() == q_in.device() &&
                  counts.device() == q_in.device(),
              "longcat_kernels (cuda): selection indices/counts must be on q's device ",
              q_in.device());
  LK_CHECK(indices.scalar_type() == at::kInt && counts.scalar_type() == at::kInt,
              "longcat_kernels (cuda): selection indices/counts must be int32, got ",
              indices.scalar_type(), "/", counts.scalar_type());
  LK_CHECK(indices.dim() == 4 && counts.dim() == 3,
              "longcat_kernels (cuda): selection indices must be [B, H, Nq, max_sel] and counts "
              "[B, H, Nq], got ", indices.sizes(), " and ", counts.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(2);
  LK_CHECK((indices.size(0) == B || indices.size(0) == 1) && indices.size(1) == H &&
                  indices.size(2) == nq && counts.size(0) == indices.size(0) &&
                  counts.size(1) == H && counts.size(2) == nq,
              "longcat_kernels (cuda): selection shape ", indices.sizes(), " / ", counts.sizes(),
              " does not match batch ", B, ", heads ", H, ", query blocks ", nq,
              " (grid_q ", grid_q, ", chunk_q ", chunk_q, "); recompute it with select_blocks");

  c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = rows16(q_in), k = rows16(k_in), v = rows16(v_in);
  Tensor kf, vf;
  if (two) {
    kf = rows16(*k_fresh);
    vf = rows16(*v_fresh);
  }
  auto [out, lse] = alloc_out(q, return_lse);

  longcat::AttnFwdParams p{};
  set_q_out(p, q, out, lse);
  set_seg0(p, k, v, B);
  if (two) {
    set_seg1(p, kf, vf);
  } else {
    set_seg1_empty(p);
  }
  check_scale(scale);
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  for (int a = 0; a < 3; ++a) {
    p.gq[a] = gq[a];
    p.gk[a] = gk[a];
    p.cq[a] = cq[a];
    p.ck[a] = ck[a];
    p.nbq[a] = nbq[a];
    p.nbk[a] = nbk[a];
  }
  const bool sel_bcast = indices.size(0) == 1 && B != 1;
  p.sel_idx = indices.data_ptr<int>();
  p.sel_cnt = counts.data_ptr<int>();
  p.si_sb = sel_bcast ? 0 : indices.stride(0);
  p.si_sh = indices.stride(1);
  p.si_sq = indices.stride(2);
  LK_CHECK(indices.stride(3) == 1 || indices.size(3) <= 1,
              "longcat_kernels (cuda): selection indices must be contiguous in the last dim; "
              "call .contiguous()");
  p.sc_sb = sel_bcast ? 0 : counts.stride(0);
  p.sc_sh = counts.stride(1);
  p.sc_sq = counts.stride(2);
  p.num_q_blocks = static_cast<int>(nq);
  p.max_sel = static_cast<int>(indices.size(3));
  if (q.numel() == 0) return {out, lse};
  check_launch(launch_sparse(p, dtype, static_cast<int>(q.size(3)), kernel,
                             c10::cuda::getCurrentCUDAStream()),
               "bsa_fwd_cuda");
  return {out, lse};
}

struct RopeTables {
  Tensor cos_t, sin_t, cos_h, sin_h, cos_w, sin_w;
};

c10::optional<RopeTables> rope_tables(const c10::optional<Tensor>& cos_t,
                                      const c10::optional<Tensor>& sin_t,
                                      const c10::optional<Tensor>& cos_h,
                                      const c10::optional<Tensor>& sin_h,
                                      const c10::optional<Tensor>& cos_w,
                                      const c10::optional<Tensor>& sin_w, const Tensor& q) {
  const int given = cos_t.has_value() + sin_t.has_value() + cos_h.has_value() +
                    sin_h.has_value() + cos_w.has_value() + sin_w.has_value();
  if (given == 0) return c10::nullopt;
  LK_CHECK(given == 6, "longcat_kernels (cuda): pass all six rope tables (cos/sin for t, h, w) "
              "or none, got ", given);
  auto prep = [&](const Tensor& t, const char* name) {
    LK_CHECK(t.dim() == 2, "longcat_kernels (cuda): rope table ", name, " must be [n, d], got ",
                t.sizes());
    return t.to(q.device(), at::kFloat).contiguous();
  };
  RopeTables r{prep(*cos_t, "cos_t"), prep(*sin_t, "sin_t"), prep(*cos_h, "cos_h"),
               prep(*sin_h, "sin_h"), prep(*cos_w, "cos_w"), prep(*sin_w, "sin_w")};
  // each sin table is read with its cos table's sizes: a smaller one was read out of bounds
  LK_CHECK(r.sin_t.sizes() == r.cos_t.sizes() && r.sin_h.sizes() == r.cos_h.sizes() &&
               r.sin_w.sizes() == r.cos_w.sizes(),
           "longcat_kernels (cuda): each rope sin table must have its cos table's shape, got sin_t ",
           r.sin_t.sizes(), " vs cos_t ", r.cos_t.sizes(), ", sin_h ", r.sin_h.sizes(), " vs cos_h ",
           r.cos_h.sizes(), ", sin_w ", r.sin_w.sizes(), " vs cos_w ", r.cos_w.sizes());
  LK_CHECK(r.cos_t.size(1) + r.cos_h.size(1) + r.cos_w.size(1) == q.size(3),
              "longcat_kernels (cuda): rope table widths ", r.cos_t.size(1), "+", r.cos_h.size(1),
              "+", r.cos_w.size(1), " must add up to head_dim ", q.size(3));
  return r;
}

// Rotates x ([B, S, H, D], frames frame_offset.. of the rope grid) into a new contiguous tensor.
Tensor apply_rope(const Tensor& x, const RopeTables& r, int64_t grid_h, int64_t grid_w,
                  int64_t frame_offset) {
  // two negative sizes multiply to a positive hw and a negative offset passed the coverage test below
  LK_CHECK(grid_h > 0 && grid_w > 0 && frame_offset >= 0, "longcat_kernels (cuda): rope grid_h ", grid_h,
           ", grid_w ", grid_w, " must be positive and frame_offset ", frame_offset, " >= 0");
  const int64_t hw = grid_h * grid_w;
  LK_CHECK(hw > 0 && x.size(1) % hw == 0, "longcat_kernels (cuda): seq ", x.size(1),
              " must be whole frames of grid_h*grid_w = ", hw, " tokens");
  LK_CHECK(r.cos_h.size(0) >= grid_h && r.cos_w.size(0) >= grid_w &&
                  r.cos_t.size(0) >= frame_offset + x.size(1) / hw,
              "longcat_kernels (cuda): rope tables (", r.cos_t.size(0), " frames, ", r.cos_h.size(0),
              "x", r.cos_w.size(0), ") do not cover frames ", frame_offset, "..",
              frame_offset + x.size(1) / hw - 1, " of a ", grid_h, "x", grid_w, " grid");
  Tensor y = at::empty(x.sizes(), x.options());
  longcat::Rope3DParams p{};
  p.x = x.data_ptr();
  p.x_sb = x.stride(0);
  p.x_ss = x.stride(1);
  p.x_sh = x.stride(2);
  p.y = y.data_ptr();
  p.y_sb = y.stride(0);
  p.y_ss = y.stride(1);
  p.y_sh = y.stride(2);
  p.batch = static_cast<int>(x.size(0));
  p.seq = static_cast<int>(x.size(1));
  p.heads = static_cast<int>(x.size(2));
  p.head_dim = static_cast<int>(x.size(3));
  p.cos_t = r.cos_t.data_ptr<float>();
  p.sin_t = r.sin_t.data_ptr<float>();
  p.cos_h = r.cos_h.data_ptr<float>();
  p.sin_h = r.sin_h.data_ptr<float>();
  p.cos_w = r.cos_w.data_ptr<float>();
  p.sin_w = r.sin_w.data_ptr<float>();
  p.dt = static_cast<int>(r.cos_t.size(1));
  p.dh = static_cast<int>(r.cos_h.size(1));
  p.dw = static_cast<int>(r.cos_w.size(1));
  p.grid_h = static_cast<int>(grid_h);
  p.grid_w = static_cast<int>(grid_w);
  p.frame_offset = static_cast<int>(frame_offset);
  check_launch(longcat::rope3d_apply(p, to_dtype(x, "x"), c10::cuda::getCurrentCUDAStream()),
               "rope3d_cuda");
  return y;
}

Tensor rope3d_cuda(const Tensor& x_in, const Tensor& cos_t, const Tensor& sin_t,
                   const Tensor& cos_h, const Tensor& sin_h, const Tensor& cos_w,
                   const Tensor& sin_w, int64_t grid_h, int64_t grid_w, int64_t frame_offset) {
  LK_CHECK(x_in.is_cuda() && x_in.dim() == 4,
              "longcat_kernels (cuda): x must be a 4-D CUDA tensor [batch, seq, heads, head_dim], "
              "got ", x_in.sizes(), " on ", x_in.device());
  to_dtype(x_in, "x");
  c10::cuda::CUDAGuard guard(x_in.device());
  auto r = rope_tables(cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, x_in);
  return apply_rope(rows16(x_in), *r, grid_h, grid_w, frame_offset);
}

// Dense two-segment attention: keys/values = [k_cache; k] (cache batch 1 or B).
std::tuple<Tensor, Tensor> kv_cache_attn_fwd_cuda(const Tensor& q_in, const Tensor& k_in,
                                                  const Tensor& v_in,
                                                  const c10::optional<Tensor>& k_cache,
                                                  const c10::optional<Tensor>& v_cache,
                                                  const c10::optional<Tensor>& cos_t,
                                                  const c10::optional<Tensor>& sin_t,
                                                  const c10::optional<Tensor>& cos_h,
                                                  const c10::optional<Tensor>& sin_h,
                                                  const c10::optional<Tensor>& cos_w,
                                                  const c10::optional<Tensor>& sin_w,
                                                  int64_t grid_h, int64_t grid_w, double scale,
                                                  const std::string& kernel,
                                                  bool return_lse) {
  LK_CHECK(q_in.is_cuda() && q_in.dim() == 4,
              "longcat_kernels (cuda): q must be a 4-D CUDA tensor [batch, seq, heads, head_dim], "
              "got ", q_in.sizes(), " on ", q_in.device());
  const auto dtype = to_dtype(q_in, "q");
  check_head_dim(q_in);
  check_kv_pair(k_in, v_in, "k", "v", q_in, false);
  const bool cached = k_cache.has_value();
  LK_CHECK(cached == v_cache.has_value(),
              "longcat_kernels (cuda): pass k_cache and v_cache together (or neither)");
  if (cached) check_kv_pair(*k_cache, *v_cache, "k_cache", "v_cache", q_in, true);

  c10::cuda::CUDAGuard guard(q_in.device());
  Tensor q = rows16(q_in), k = rows16(k_in), v = rows16(v_in);
  // RoPE prologue: fresh q and k rotated at frames Sc/(H*W).. (cached K is already rotated)
  auto rope = rope_tables(cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, q_in);
  if (rope) {
    const int64_t sc = cached ? k_cache->size(1) : 0;
    LK_CHECK(grid_h > 0 && grid_w > 0 && sc % (grid_h * grid_w) == 0,
                "longcat_kernels (cuda): cache length ", sc, " must be whole frames of ", grid_h,
                "x", grid_w, " tokens");
    const int64_t f0 = sc / (grid_h * grid_w);
    q = apply_rope(q, *rope, grid_h, grid_w, f0);
    k = apply_rope(k, *rope, grid_h, grid_w, f0);
  }
  auto [out, lse] = alloc_out(q, return_lse);
  longcat::AttnFwdParams p{};
  set_q_out(p, q, out, lse);
  if (cached) {
    const Tensor kc = rows16(*k_cache), vc = rows16(*v_cache);
    set_seg0(p, kc, vc, q.size(0));
    set_seg1(p, k, v);
  } else {
    set_seg0(p, k, v, q.size(0));
    set_seg1_empty(p);
  }
  check_scale(scale);
  p.scale_log2 = static_cast<float>(scale * kLog2e);
  if (q.numel() == 0) return {out, lse};
  check_launch(launch_dense(p, dtype, static_cast<int>(q.size(3)), kernel,
                            c10::cuda::getCurrentCUDAStream()),
               "kv_cache_attn_fwd_cuda");
  return {out, lse};
}

// Prefix attention: queries [:P] attend keys [:P], queries [P:] attend all keys.
std::tuple<Tensor, Tensor> prefix_attn_fwd_cuda(const Tensor& q_in, const Tensor& k_in,
                                                const Tensor& v_in, int64_t prefix_len,
                                                double scale, const std::string& kernel,
                                                bool return_lse) {
  LK_CHECK(q_in.is_cuda() && q_in.dim() == 4,
              "longcat_kernels (cuda): q must be a 4-D CUDA tensor [batch, seq, heads, head_dim], "
              "got ", q_in.sizes(), " on ", q_in.device());
  const auto dtype = to_dtype(q_in, "q");
  check_head_dim(q_in);
  check_kv_pair(k_in, v_in, "k", "v", q_in, false);
  LK_CHECK(k_in.size(1) == q_in.size(1), "longcat_kernels (cuda): prefix_attn needs q and k of "
              "the same seq, got ", q_in.size(1), " and ", k_in.size(1));
  const int64_t S = q_in.size(1);
  LK_CHECK(prefix_len >= 0 && prefix_len <= S, "longcat_kernels (cuda): prefix_len must be in [0, ",
              S, "], got ", prefix_len);
  c10::cuda::CUDAGuard guard(q_in.device());
  const Tensor q = rows16(q_in), k = rows16(k_in), v = rows16(v_in);
  auto [out, lse] = alloc_out(q, return_lse);
  const int d = static_cast<int>(q.size(3));
  auto stream = c10::cuda::getCurrentCUDAStream();
  // two launches into slices of one output: [prefix queries x prefix keys], [rest x all keys]
  for (int part = 0; part < 2; ++part) {
    const int64_t q0 = part == 0 ? 0 : prefix_len;
    const int64_t q1 = part == 0 ? prefix_len : S;
    const int64_t kl = part == 0 ? prefix_len : S;
    if (q1 <= q0) continue;
    Tensor qs = q.narrow(1, q0, q1 - q0);
    Tensor os = out.narrow(1, q0, q1 - q0);
    Tensor ls = return_lse ? lse.narrow(2, q0, q1 - q0) : lse;
    longcat::AttnFwdParams p{};
    set_q_out(p, qs, os, ls);
    set_seg0(p, k.narrow(1, 0, kl), v.narrow(1, 0, kl), q.size(0));
    set_seg1_empty(p);
    check_scale(scale);
    p.scale_log2 = static_cast<float>(scale * kLog2e);
    check_launch(launch_dense(p, dtype, d, kernel, stream), "prefix_attn_fwd_cuda");
  }
  return {out, lse};
}

}  // namespace

extern "C" PyObject* PyInit__C() { return PyModule_Create(&kModule); }

TORCH_LIBRARY(longcat_kernels, m) {
  m.def(
      "bsa_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor? k_fresh, Tensor? v_fresh, "
      "Tensor indices, Tensor counts, int[] grid_q, int[] grid_k, int[] chunk_q, int[] chunk_k, "
      "float scale, str kernel, bool return_lse=True) -> (Tensor, Tensor)");
  m.def(
      "kv_cache_attn_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor? k_cache, Tensor? v_cache, "
      "Tensor? cos_t, Tensor? sin_t, Tensor? cos_h, Tensor? sin_h, Tensor? cos_w, Tensor? sin_w, "
      "int grid_h, int grid_w, float scale, str kernel, bool return_lse=True) -> (Tensor, Tensor)");
  m.def(
      "rope3d_cuda(Tensor x, Tensor cos_t, Tensor sin_t, Tensor cos_h, Tensor sin_h, Tensor cos_w, "
      "Tensor sin_w, int grid_h, int grid_w, int frame_offset) -> Tensor");
  m.def(
      "prefix_attn_fwd_cuda(Tensor q, Tensor k, Tensor v, int prefix_len, float scale, str kernel, "
      "bool return_lse=True) -> (Tensor, Tensor)");
  // the kernel families this build can run on the current device, e.g. "sm90_ws,sm90,sm80"
  m.def("available_kernels() -> str", &available_kernels);
}

TORCH_LIBRARY_IMPL(longcat_kernels, CUDA, m) {
  m.impl("bsa_fwd_cuda", &bsa_fwd_cuda);
  m.impl("kv_cache_attn_fwd_cuda", &kv_cache_attn_fwd_cuda);
  m.impl("prefix_attn_fwd_cuda", &prefix_attn_fwd_cuda);
  m.impl("rope3d_cuda", &rope3d_cuda);
}
