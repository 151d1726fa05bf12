"""Cached-KV and prefix attention as Triton prologue + cuDNN SDPA (impl ``triton_prologue_cudnn``).

A Triton prologue rotates fresh q/k (when RoPE is asked for), then two cuDNN SDPA calls, queries
over the cache (a batch-1 cache read once, the batch folded into the query rows) and over the fresh
keys, merged by their log-sum-exp in one Triton pass; no concatenation, no copy of the cache.
``backend="auto"`` picks it on CUDA where the csrc warp-specialised kernel does not run (H100 cond 4:
69 ms vs 74 ms for the fused Triton kernel, bench/results/h100/bench-cache-bsa-cached-attn_20261124T180012Z_5a35d2e.json); see
``longcat_kernels/dispatch.py``. Same contract as the fused kernels in ``triton.py`` (``return_lse``
included: the lse of the two calls merged by ``logaddexp``), except GQA/MQA: equal q and k/v head
counts only (dispatch sends GQA calls to the fused Triton kernel). Forward only.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from longcat_kernels import dispatch
from longcat_kernels._validate import check_op_cache_rope, check_op_kv, check_op_prefix, default_scale
from longcat_kernels.dispatch import _dtype_name, cudnn_sdpa_takes, launcher, triton_interpret
from longcat_kernels.ops.kv_cache_attn.triton import new_lse, rope_tables_for
from longcat_kernels.ops.rope.triton import check_no_grad_triton, launch_norm_rope

_INTERPRET = triton_interpret()  # at import, as Triton decides at the @triton.jit of the kernels

def _block_sparse_unavailable():
    from longcat_kernels.dispatch import BackendUnavailableError
    raise BackendUnavailableError(
        "attn_with_kv_cache: the prologue + cuDNN route has no block_sparse= option "
        "(use attn_with_kv_cache_triton / backend='triton')")



# ----------------------------------------------------------------------------------------------
# alternative route: Triton prologue into a [cache; fresh] KV buffer + cuDNN SDPA
# ----------------------------------------------------------------------------------------------

def cudnn_available(q: torch.Tensor) -> bool:
    """cuDNN SDPA usable for these inputs (CUDA, bf16/fp16, head_dim <= 128 and a multiple of 8, compute
    capability 8.0+)."""
    cap = dispatch._capability(q.device) if q.device.type == "cuda" else None  # its per-device cache
    if not cudnn_sdpa_takes(q.device.type, _dtype_name(q.dtype), int(q.shape[-1]), cap):
        return False
    try:
        return bool(torch.backends.cudnn.is_available())
    except Exception:  # pragma: no cover
        return False


def _sdpa_cudnn(q, k, v, scale):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # cuDNN needs a unit stride on head_dim; any other BSHD/BHSD strides are taken as they are
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return o.transpose(1, 2)


def _sdpa_cudnn_lse(q, k, v, scale):
    """cuDNN SDPA on BSHD views -> (out ``[B, S, H, D]`` view, lse ``[B, H, S]`` fp32, natural log)."""
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True, 0.0, False, False, scale=scale)
    lse = res[1]
    # recent torch allocates (and its meta kernel declares) the lse as [B, H, S, 1]: taken as [B, H, S],
    # it came back 4-D, broadcast wrongly in logaddexp and failed the prefix op's slice assignment
    if lse.dim() == 4:
        lse = lse.squeeze(-1)
    return res[0].transpose(1, 2), lse


@triton.jit
def _merge_two_kernel(o1, l1, o2, l2, out, S, H,
                      s_o1b, s_o1s, s_o1h, s_o2b, s_o2s, s_o2h,
                      s_l1b, s_l1h, s_l1s, s_l2b, s_l2h, s_l2s,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """out[b, s, h] = softmax-weighted sum of two partial attentions (o_i, lse_i) over disjoint keys."""
    i_s = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    o_s = i_s * BLOCK_S + tl.arange(0, BLOCK_S)
    o_d = tl.arange(0, BLOCK_D)
    m_s = o_s < S
    m = m_s[:, None] & (o_d[None, :] < D)
    # row offsets in int64: o_s * s_o1s is a 32-bit product when the stride fits int32, and rows of a fused-qkv
    # view past 2^31 elements wrapped to an illegal address (round 56's GPU test)
    r = o_s.to(tl.int64)
    a = tl.load(l1 + i_b * s_l1b + i_h * s_l1h + r * s_l1s, mask=m_s, other=0.0)
    b = tl.load(l2 + i_b * s_l2b + i_h * s_l2h + r * s_l2s, mask=m_s, other=0.0)
    mx = tl.maximum(a, b)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    wa = tl.exp(a - mx)
    wb = tl.exp(b - mx)
    inv = 1.0 / (wa + wb)
    x1 = tl.load(o1 + i_b * s_o1b + i_h * s_o1h + r[:, None] * s_o1s + o_d[None, :], mask=m, other=0.0)
    x2 = tl.load(o2 + i_b * s_o2b + i_h * s_o2h + r[:, None] * s_o2s + o_d[None, :], mask=m, other=0.0)
    y = (x1.to(tl.float32) * (wa * inv)[:, None] + x2.to(tl.float32) * (wb * inv)[:, None])
    p_out = out + ((i_b * S + r[:, None]) * H + i_h) * D + o_d[None, :]
    tl.store(p_out, y.to(out.dtype.element_ty), mask=m)


def merge_partial_attention(o1, lse1, o2, lse2) -> torch.Tensor:
    """Combine two attentions of the same queries over disjoint key sets.

    ``o_i [B, S, H, D]`` (any strides), ``lse_i [B, H, S]`` fp32 natural-log
    (any strides) -> contiguous ``[B, S, H, D]`` in o1's dtype, weights computed in fp32.
    """
    # the kernel reads raw memory with a unit head_dim stride: a lazy negation (torch._neg_view) or another last
    # stride gave wrong values silently (a direct call: inside the registered op torch resolves negations)
    o1, lse1, o2, lse2 = (x.resolve_neg() for x in (o1, lse1, o2, lse2))
    o1, o2 = (x if x.stride(-1) == 1 else x.contiguous() for x in (o1, o2))
    B, S, H, D = o1.shape
    out = torch.empty((B, S, H, D), dtype=o1.dtype, device=o1.device)
    block_s = 16 if _INTERPRET else 32
    grid = (triton.cdiv(S, block_s), B * H)
    launcher(_merge_two_kernel, grid)(
        o1, lse1, o2, lse2, out, S, H,
        o1.stride(0), o1.stride(1), o1.stride(2), o2.stride(0), o2.stride(1), o2.stride(2),
        lse1.stride(0), lse1.stride(1), lse1.stride(2), lse2.stride(0), lse2.stride(1), lse2.stride(2),
        D=D, BLOCK_D=triton.next_power_of_2(D), BLOCK_S=block_s, num_warps=4,
    )
    return out


def _cache_part_cudnn(q, k_cache, v_cache, scale):
    """Attention of fresh queries over the cache alone -> (out ``[B, Sn, H, D]``, lse ``[B, H, Sn]``).

    A batch-1 cache shared by the batch is one call with the batch folded into the query rows
    (``[1, B*Sn]`` queries against ``[1, Sc]`` keys): no repeat, no copy of the cache.
    """
    B, Sn, H, D = q.shape
    if k_cache.shape[0] == B:
        return _sdpa_cudnn_lse(q, k_cache, v_cache, scale)
    o, lse = _sdpa_cudnn_lse(q.reshape(1, B * Sn, H, D), k_cache, v_cache, scale)
    return o.reshape(B, Sn, H, D), lse.reshape(H, B, Sn).transpose(0, 1)


def _refuse_gqa(op: str, q, k) -> None:
    # cuDNN SDPA here takes equal head counts; dispatch sends GQA/MQA calls to the fused Triton kernel
    if k.shape[2] != q.shape[2]:
        from longcat_kernels.dispatch import BackendUnavailableError
        raise BackendUnavailableError(
            f"{op}: the prologue + cuDNN route does not take GQA/MQA (q has {q.shape[2]} heads, "
            f"k {k.shape[2]}); use attn_with_kv_cache_triton / backend='triton'")


@torch.library.custom_op("longcat_kernels::kv_cache_attn_cudnn_fwd", mutates_args=())
def _kv_cache_attn_cudnn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            k_cache: Optional[torch.Tensor], v_cache: Optional[torch.Tensor],
                            cos_t: Optional[torch.Tensor], sin_t: Optional[torch.Tensor],
                            cos_h: Optional[torch.Tensor], sin_h: Optional[torch.Tensor],
                            cos_w: Optional[torch.Tensor], sin_w: Optional[torch.Tensor],
                            grid_h: int, grid_w: int, scale: float,
                            return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Two cuDNN calls (fresh queries over the cache; over the fresh keys) merged by their lse.

    Nothing is concatenated or copied: the cache is read where it lies (a batch-1 cache with the
    batch folded into the query rows); with RoPE, a Triton prologue rotates fresh q and k into
    temporaries first. v is used as given. The lse is empty unless ``return_lse``.
    """
    # the same op-level checks as the fused Triton op (a compiled graph skips the API's): a cache of partial
    # frames gave the fresh tokens a floored frame offset, mismatched k/v reached SDPA
    check_op_kv("kv_cache_attn_cudnn_fwd", q, [("k", k, "v", v, False), ("k_cache", k_cache, "v_cache", v_cache, True)])
    B, Sn, H, D = q.shape
    Sc = 0 if k_cache is None else k_cache.shape[1]
    tables = None if cos_t is None else [cos_t, sin_t, cos_h, sin_h, cos_w, sin_w]
    check_op_cache_rope("kv_cache_attn_cudnn_fwd", q, k, k_cache, tables, grid_h, grid_w)
    if tables is not None:
        q_rot = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        k_rot = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        launch_norm_rope(q=q, k=k, out_q=q_rot, out_k=k_rot, tables=tables, gh=grid_h, gw=grid_w,
                         frame_offset=Sc // (grid_h * grid_w))
        q, k = q_rot, k_rot
    if Sc == 0:
        if not return_lse:
            return _sdpa_cudnn(q, k, v, scale).contiguous(), new_lse(q, False)
        o, lse = _sdpa_cudnn_lse(q, k, v, scale)
        return o.contiguous(), lse.contiguous()
    o_c, lse_c = _cache_part_cudnn(q, k_cache, v_cache, scale)
    o_f, lse_f = _sdpa_cudnn_lse(q, k, v, scale)
    out = merge_partial_attention(o_c, lse_c, o_f, lse_f)
    return out, (torch.logaddexp(lse_c, lse_f).contiguous() if return_lse else new_lse(q, False))


@_kv_cache_attn_cudnn_op.register_fake
def _(q, k, v, k_cache, v_cache, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w,
      scale, return_lse=False):
    return q.new_empty(q.shape), new_lse(q, return_lse)


def attn_with_kv_cache_cudnn(q, k, v, k_cache=None, v_cache=None, rope=None, scale=None,
                             block_sparse=None, return_lse=False):
    """Same contract as `attn_with_kv_cache_triton`, via (RoPE prologue) + two cuDNN SDPA calls
    (queries over the cache, over the fresh keys) merged by their log-sum-exp; no KV copy.

    Needs CUDA bf16/fp16 inputs, cuDNN and as many k/v heads as q heads (no GQA).
    """
    if block_sparse is not None:
        _block_sparse_unavailable()
    if not cudnn_available(q):
        from longcat_kernels.dispatch import BackendUnavailableError
        raise BackendUnavailableError("attn_with_kv_cache: prologue + cuDNN route needs CUDA "
                                      "bf16/fp16 inputs with head_dim <= 128 (a multiple of 8), cuDNN and a GPU "
                                      "of compute capability 8.0+")
    _refuse_gqa("attn_with_kv_cache", q, k)
    check_no_grad_triton("attn_with_kv_cache", q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache)
    scale = default_scale(q, scale)
    Sc = 0 if k_cache is None else k_cache.shape[1]
    tabs, gh, gw = rope_tables_for(rope, q, Sc)
    out, lse = torch.ops.longcat_kernels.kv_cache_attn_cudnn_fwd(q, k, v, k_cache, v_cache, *tabs, gh,
                                                                 gw, scale, return_lse)
    return (out, lse) if return_lse else out


@torch.library.custom_op("longcat_kernels::prefix_attn_cudnn_fwd", mutates_args=())
def _prefix_attn_cudnn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len: int,
                          scale: float, return_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    check_op_kv("prefix_attn_cudnn_fwd", q, [("k", k, "v", v, False)])
    P, S = check_op_prefix("prefix_attn_cudnn_fwd", q, k, prefix_len), q.shape[1]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = new_lse(q, return_lse)
    for q0, q1, kn in ((0, P, P), (P, S, S)):
        if q1 <= q0:
            continue
        if return_lse:
            o, ls = _sdpa_cudnn_lse(q[:, q0:q1], k[:, :kn], v[:, :kn], scale)
            lse[:, :, q0:q1] = ls
        else:
            o = _sdpa_cudnn(q[:, q0:q1], k[:, :kn], v[:, :kn], scale)
        out[:, q0:q1] = o
    return out, lse


@_prefix_attn_cudnn_op.register_fake
def _(q, k, v, prefix_len, scale, return_lse=False):
    return q.new_empty(q.shape), new_lse(q, return_lse)


def prefix_attn_cudnn(q, k, v, prefix_len, scale=None, return_lse=False):
    """Same contract as `prefix_attn_triton`, as two cuDNN SDPA calls (cond rows, noisy rows)."""
    if not cudnn_available(q):
        from longcat_kernels.dispatch import BackendUnavailableError
        raise BackendUnavailableError("prefix_attn: cuDNN route needs CUDA bf16/fp16 inputs with "
                                      "head_dim <= 128 (a multiple of 8), cuDNN and a GPU of compute capability 8.0+")
    _refuse_gqa("prefix_attn", q, k)
    check_no_grad_triton("prefix_attn", q=q, k=k, v=v)
    scale = default_scale(q, scale)
    out, lse = torch.ops.longcat_kernels.prefix_attn_cudnn_fwd(q, k, v, int(prefix_len), scale, return_lse)
    return (out, lse) if return_lse else out
