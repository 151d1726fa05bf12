"""Triton kernels for 3D RoPE and the fused q/k RMSNorm + RoPE prologue (SPEC 5, 6).

One kernel family, `norm_rope_fwd_kernel`, covers the jobs chosen by constexpr flags:

- `apply_rope_3d_triton`: RoPE only, one tensor.
- `qk_norm_rope_triton`: RMSNorm (fp32 statistics, cast to the input dtype, times the weight in
  the input dtype) then RoPE (fp32, cast back) of q and k in one launch, each written once.
- `launch_norm_rope` (internal, also used by the cached-KV kernels' RoPE prologue): RoPE of q
  and/or k into preallocated outputs of any strides.

RoPE tables are the per-axis fp32 tables of `Rope3D` (`cos_t/sin_t [T, dt]`, `cos_h/sin_h [H, dh]`,
`cos_w/sin_w [W, dw]`, each angle repeated for its adjacent pair), so each program reads a few
hundred bytes of tables per token from L2 instead of a full-width `[S, D]` table. Rotation pairs
adjacent elements (interleaved / GPT-J style): the tile is split into even / odd lanes with
`tl.reshape` + `tl.split`, rotated, and re-joined, so every load and store stays contiguous.

All functions are forward only (RoPE/RMSNorm have no backward here); inputs requiring grad raise.
Arbitrary strides are accepted for inputs and `out_*` buffers.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from longcat_kernels._validate import check_op_rope_tables
from longcat_kernels.dispatch import launcher, triton_interpret

_INTERPRET = triton_interpret()  # at import, as Triton decides at the @triton.jit of the kernels
# launch shape of the prologue (module-level so the GPU bench can sweep them). H100 sweep, B2 H32
# D128 bf16: 16 tokens x 1 head per program ran at 2.8 TB/s (copy ceiling 2.97), 0.73 ms for q+k
# at cond 4; sharing the table loads across 8 heads measured 2% slower.
PROLOGUE_BLOCK_S = 16
PROLOGUE_HEADS_PER_PROG = 1


@triton.jit
def rope_cos_sin(pos, m_s, offs_p, COS_T, SIN_T, COS_H, SIN_H, COS_W, SIN_W,
                  GH, GW, DT: tl.constexpr, DH: tl.constexpr, HEAD_DIM: tl.constexpr):
    """cos, sin [BLOCK_S, BLOCK_D // 2] fp32 of the even lanes of tokens at grid index `pos`."""
    # token (t, h, w) on the rope grid; pos is int64 [BLOCK_S]
    hw = GH * GW
    b_t = pos // hw
    b_r = pos % hw
    b_h = b_r // GW
    b_w = b_r % GW
    # column of the even lane; part boundaries DT, DT+DH are even so a pair never straddles parts
    o_c = 2 * offs_p
    DW = HEAD_DIM - DT - DH
    m_t = o_c < DT
    m_h = (o_c >= DT) & (o_c < DT + DH)
    m_w = (o_c >= DT + DH) & (o_c < HEAD_DIM)
    o_t = tl.where(m_t, o_c, 0)
    o_h = tl.where(m_h, o_c - DT, 0)
    o_w = tl.where(m_w, o_c - DT - DH, 0)
    p_t = b_t[:, None] * DT + o_t[None, :]
    p_h = b_h[:, None] * DH + o_h[None, :]
    p_w = b_w[:, None] * DW + o_w[None, :]
    mt = m_s[:, None] & m_t[None, :]
    mh = m_s[:, None] & m_h[None, :]
    mw = m_s[:, None] & m_w[None, :]
    # [BLOCK_S, BLOCK_D // 2] fp32; the three masks are disjoint, so the sum selects one table
    b_cos = (tl.load(COS_T + p_t, mask=mt, other=0.0) + tl.load(COS_H + p_h, mask=mh, other=0.0)
             + tl.load(COS_W + p_w, mask=mw, other=0.0))
    b_sin = (tl.load(SIN_T + p_t, mask=mt, other=0.0) + tl.load(SIN_H + p_h, mask=mh, other=0.0)
             + tl.load(SIN_W + p_w, mask=mw, other=0.0))
    return b_cos, b_sin


@triton.jit
def rope_apply(x, b_cos, b_sin, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rotate adjacent pairs of x [BLOCK_S, BLOCK_D] (any float dtype) -> fp32 [BLOCK_S, BLOCK_D]."""
    b_xe, b_xo = tl.split(tl.reshape(x.to(tl.float32), (BLOCK_S, BLOCK_D // 2, 2)))
    b_ye = b_xe * b_cos - b_xo * b_sin
    b_yo = b_xo * b_cos + b_xe * b_sin
    return tl.reshape(tl.join(b_ye, b_yo), (BLOCK_S, BLOCK_D))


@triton.jit
def _rstd_all_heads(X, b, offs_s, offs_d, S, H, eps,
                    stride_xb, stride_xs, stride_xh, stride_xd,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr):
    """1 / rms [BLOCK_S] fp32 of each token over all H heads together (Wan's inner-dim RMSNorm)."""
    m = (offs_s < S)[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for h in range(H):
        p_x = (X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs
               + offs_d[None, :] * stride_xd)
        b_xf = tl.load(p_x, mask=m, other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
        acc += tl.sum(b_xf * b_xf, axis=1)
    return 1.0 / tl.sqrt(acc / (H * HEAD_DIM) + eps)


@triton.jit
def _norm_rope_tile(X, W, OUT, b, h, offs_s, offs_d, S, eps, b_cos, b_sin, b_rstd_all,
                    stride_xb, stride_xs, stride_xh, stride_xd,
                    stride_ob, stride_os, stride_oh, stride_od,
                    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr, NORM_ALL: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    m_s = offs_s < S
    m_d = offs_d < HEAD_DIM
    m = m_s[:, None] & m_d[None, :]
    p_x = (X + b * stride_xb + h * stride_xh + offs_s[:, None] * stride_xs
           + offs_d[None, :] * stride_xd)
    b_x = tl.load(p_x, mask=m, other=0.0)  # [BLOCK_S, BLOCK_D], input dtype
    if HAS_NORM:
        b_xf = b_x.to(tl.float32)
        if NORM_ALL:
            # statistics over all heads (computed once per program); weight [H * HEAD_DIM]
            b_rstd = b_rstd_all
            b_w = tl.load(W + h * HEAD_DIM + offs_d, mask=m_d, other=0.0)  # [BLOCK_D]
        else:
            b_rstd = 1.0 / tl.sqrt(tl.sum(b_xf * b_xf, axis=1) / HEAD_DIM + eps)  # [BLOCK_S]
            b_w = tl.load(W + offs_d, mask=m_d, other=0.0)  # [BLOCK_D], input dtype
        # SPEC 6: normalise in fp32, cast to the input dtype, then multiply by the weight in it
        b_x = (b_xf * b_rstd[:, None]).to(b_x.dtype) * b_w[None, :]
    if HAS_ROPE:
        b_x = rope_apply(b_x, b_cos, b_sin, BLOCK_S, BLOCK_D).to(b_x.dtype)
    p_o = (OUT + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os
           + offs_d[None, :] * stride_od)
    tl.store(p_o, b_x.to(OUT.dtype.element_ty), mask=m)


@triton.jit(do_not_specialize=["S", "pos0", "GH", "GW"])
def norm_rope_fwd_kernel(
    Q, K, QW, KW, OUT_Q, OUT_K,
    COS_T, SIN_T, COS_H, SIN_H, COS_W, SIN_W,
    S, H, eps, pos0, GH, GW,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_oqb, stride_oqs, stride_oqh, stride_oqd,
    stride_okb, stride_oks, stride_okh, stride_okd,
    HAS_Q: tl.constexpr, HAS_K: tl.constexpr,
    HAS_NORM: tl.constexpr, HAS_ROPE: tl.constexpr,
    DT: tl.constexpr, DH: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    HEADS_PER_PROG: tl.constexpr, NORM_ALL: tl.constexpr = False,
):
    """Grid (cdiv(S, BLOCK_S), cdiv(H, HEADS_PER_PROG), B): a [BLOCK_S, D] tile of q and k
    for each of HEADS_PER_PROG heads; the RoPE tables of the tile's tokens are shared by them.
    NORM_ALL (HEADS_PER_PROG == H): RMSNorm statistics over all heads of a token (Wan), one
    extra read of the program's [BLOCK_S, H*D] rows (from L2) before the normalising pass."""
    pid_s = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    offs_s = pid_s.to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_D // 2)
    h0 = tl.program_id(1) * HEADS_PER_PROG
    if HAS_ROPE:
        # [BLOCK_S, BLOCK_D // 2] each, loaded once and shared by all heads of the program
        b_cos, b_sin = rope_cos_sin(pos0 + offs_s, offs_s < S, offs_p, COS_T, SIN_T, COS_H,
                                     SIN_H, COS_W, SIN_W, GH, GW, DT, DH, HEAD_DIM)
    else:
        b_cos = tl.zeros([BLOCK_S, BLOCK_D // 2], dtype=tl.float32)
        b_sin = b_cos
    b_rq = tl.zeros([BLOCK_S], dtype=tl.float32)
    b_rk = b_rq
    if NORM_ALL:
        if HAS_Q:
            b_rq = _rstd_all_heads(Q, b, offs_s, offs_d, S, H, eps, stride_qb, stride_qs, stride_qh,
                                   stride_qd, HEAD_DIM, BLOCK_S)
        if HAS_K:
            b_rk = _rstd_all_heads(K, b, offs_s, offs_d, S, H, eps, stride_kb, stride_ks, stride_kh,
                                   stride_kd, HEAD_DIM, BLOCK_S)
    for i in range(HEADS_PER_PROG):
        h = (h0 + i).to(tl.int64)
        if h < H:
            if HAS_Q:
                _norm_rope_tile(Q, QW, OUT_Q, b, h, offs_s, offs_d, S, eps, b_cos, b_sin, b_rq,
                                stride_qb, stride_qs, stride_qh, stride_qd,
                                stride_oqb, stride_oqs, stride_oqh, stride_oqd,
                                HAS_NORM, HAS_ROPE, NORM_ALL, HEAD_DIM, BLOCK_S, BLOCK_D)
            if HAS_K:
                _norm_rope_tile(K, KW, OUT_K, b, h, offs_s, offs_d, S, eps, b_cos, b_sin, b_rk,
                                stride_kb, stride_ks, stride_kh, stride_kd,
                                stride_okb, stride_oks, stride_okh, stride_okd,
                                HAS_NORM, HAS_ROPE, NORM_ALL, HEAD_DIM, BLOCK_S, BLOCK_D)


# ----------------------------------------------------------------------------------------------
# launcher (plain Python, no torch.library): shared by the registered ops below and by
# ops/kv_cache_attn/triton.py
# ----------------------------------------------------------------------------------------------

def rope_table_args(rope) -> tuple[list[torch.Tensor], int, int]:
    """Per-axis fp32 tables of a `Rope3D` as contiguous tensors, plus the grid's (H, W)."""
    tabs = [rope.cos_t, rope.sin_t, rope.cos_h, rope.sin_h, rope.cos_w, rope.sin_w]
    tabs = [t.to(torch.float32).contiguous() for t in tabs]
    _, gh, gw = rope.grid
    return tabs, int(gh), int(gw)


def kernel_tables(tables, x: torch.Tensor) -> list[torch.Tensor]:
    """The six rope tables as the kernels read them, as the CUDA extension converts them: fp32, contiguous
    ``[positions, dims]`` rows, on x's device. A strided table (a transposed or sliced view) passed to the
    registered ops was read as if contiguous (silently wrong angles), an fp16/bf16 one rounded the rotation."""
    return [t.to(device=x.device, dtype=torch.float32).contiguous() for t in tables]


def launch_norm_rope(*, q=None, k=None, q_weight=None, k_weight=None,
                     out_q=None, out_k=None, tables=None, gh=1, gw=1,
                     frame_offset=0, eps=1e-6) -> None:
    """Run `norm_rope_fwd_kernel` on whichever of q, k are given (same [B, S, H, D] shape).

    `tables` (six per-axis fp32 tables) enables RoPE; `q_weight`/`k_weight` enable RMSNorm for that
    tensor (both or neither). Writes out_q / out_k (any strides, preallocated).
    """
    ref = q if q is not None else k
    B, S, H, D = ref.shape
    if B * S * H == 0:
        return
    has_norm = q_weight is not None or k_weight is not None
    # the kernel reads a weight with unit stride, in its tensor's dtype (SPEC 6: ``* weight.to(x.dtype)``): a
    # strided weight passed to the registered op was read as if contiguous (silently wrong), an fp32 master
    # weight beside fp16/bf16 q/k multiplied unrounded (not the reference's result)
    if q_weight is not None:
        q_weight = q_weight.to(device=q.device, dtype=q.dtype).contiguous()
    if k_weight is not None:
        k_weight = k_weight.to(device=k.device, dtype=k.dtype).contiguous()
    w_ref = q_weight if q_weight is not None else k_weight
    # a [H*D] weight: RMSNorm over all heads of a token (Wan); [D]: over each head (LongCat)
    norm_all = has_norm and H > 1 and w_ref.numel() == H * D
    has_rope = tables is not None
    if has_rope:
        if D % 2:
            raise ValueError(f"rope: head_dim must be even, got {D}")
        # the split comes from the tables' widths (Rope3D.axis_dims), even so pairs never straddle
        dt, dh = int(tables[0].shape[1]), int(tables[2].shape[1])
        t_args = kernel_tables(tables, ref)
    else:
        dt, dh = D, 0
        t_args = [ref] * 6  # unused pointers
    block_d = triton.next_power_of_2(D)
    block_s = 16 if _INTERPRET else max(8, min(PROLOGUE_BLOCK_S, 8192 // block_d))
    dummy = ref

    def st(x):
        return x.stride() if x is not None else (0, 0, 0, 0)

    # heads per program: the tile's RoPE table loads (from L2) are shared by this many heads
    hpp = H if norm_all else (2 if _INTERPRET else min(H, PROLOGUE_HEADS_PER_PROG))
    grid = (triton.cdiv(S, block_s), triton.cdiv(H, hpp), B)
    launcher(norm_rope_fwd_kernel, grid)(
        q if q is not None else dummy, k if k is not None else dummy,
        q_weight if q_weight is not None else dummy, k_weight if k_weight is not None else dummy,
        out_q if out_q is not None else dummy, out_k if out_k is not None else dummy,
        *t_args,
        S, H, float(eps), int(frame_offset) * gh * gw, gh, gw,
        *st(q), *st(k), *st(out_q), *st(out_k),
        HAS_Q=q is not None, HAS_K=k is not None,
        HAS_NORM=has_norm, HAS_ROPE=has_rope, DT=dt, DH=dh,
        HEAD_DIM=D, BLOCK_S=block_s, BLOCK_D=block_d, HEADS_PER_PROG=hpp, NORM_ALL=norm_all,
        num_warps=4,
    )


def check_no_grad_triton(op: str, **tensors) -> None:
    """Raises if a named tensor requires grad (grad mode on): the Triton kernels here are forward only."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(
                f"{op}: the triton backend is forward only, but `{name}` requires grad; "
                f"call it under torch.no_grad() or use backend='torch'")


# ----------------------------------------------------------------------------------------------
# registered ops (namespace longcat_kernels): mutate preallocated outputs, return nothing, so
# the Python wrappers can hand back `out_k` that is a view into a caller's KV buffer
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("longcat_kernels::rope_3d", mutates_args=("out",))
def _rope_3d_op(x: torch.Tensor, cos_t: torch.Tensor, sin_t: torch.Tensor, cos_h: torch.Tensor,
                sin_h: torch.Tensor, cos_w: torch.Tensor, sin_w: torch.Tensor, grid_h: int,
                grid_w: int, frame_offset: int, out: torch.Tensor) -> None:
    from .api import _needs_temporary  # noqa: PLC0415 (api imports the dispatch that imports this module)

    check_op_rope_tables("rope_3d", x, [cos_t, sin_t, cos_h, sin_h, cos_w, sin_w], grid_h, grid_w, frame_offset)
    # an out over x other than exactly x (in place) is read after other programs wrote it: a temporary
    dst = torch.empty(x.shape, dtype=x.dtype, device=x.device) if _needs_temporary(out, x, ()) else out
    launch_norm_rope(q=x, out_q=dst, tables=[cos_t, sin_t, cos_h, sin_h, cos_w, sin_w],
                     gh=grid_h, gw=grid_w, frame_offset=frame_offset)
    if dst is not out:
        out.copy_(dst)


@_rope_3d_op.register_fake
def _(x, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w, frame_offset, out):
    return None


def _check_op_weight(w: torch.Tensor, name: str, x: torch.Tensor) -> None:
    """A norm weight of the registered op: 1-D, head_dim (per head) or heads*head_dim (all heads) elements; the
    kernel reads that many, so another size read past the weight or a part of it, silently."""
    H, D = x.shape[2], x.shape[3]
    if w.dim() != 1 or w.numel() not in (D, H * D):
        raise ValueError(f"qk_norm_rope: {name}: expected shape [{D}] (head_dim) or [{H * D}] (heads*head_dim), "
                         f"got {list(w.shape)}")


@torch.library.custom_op("longcat_kernels::qk_norm_rope", mutates_args=("out_q", "out_k"))
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                     k_weight: torch.Tensor, cos_t: Optional[torch.Tensor],
                     sin_t: Optional[torch.Tensor], cos_h: Optional[torch.Tensor],
                     sin_h: Optional[torch.Tensor], cos_w: Optional[torch.Tensor],
                     sin_w: Optional[torch.Tensor], grid_h: int, grid_w: int, frame_offset: int,
                     eps: float, out_q: torch.Tensor, out_k: torch.Tensor) -> None:
    tables = None if cos_t is None else [cos_t, sin_t, cos_h, sin_h, cos_w, sin_w]
    from .api import _needs_temporary  # noqa: PLC0415 (api imports the dispatch that imports this module)

    check_op_rope_tables("qk_norm_rope", q, tables, grid_h, grid_w, frame_offset, "q")
    check_op_rope_tables("qk_norm_rope", k, tables, grid_h, grid_w, frame_offset, "k")
    _check_op_weight(q_weight, "q_weight", q)
    _check_op_weight(k_weight, "k_weight", k)
    if q.shape == k.shape and q.shape[2] > 1 and q_weight.numel() != k_weight.numel():
        # one launch normalises both with q_weight's kind: a k_weight of the other kind was misread
        raise ValueError(f"qk_norm_rope: k_weight: expected {q_weight.numel()} elements (the norm kind of q_weight), "
                         f"got {k_weight.numel()}")

    # qk_norm_rope routes outputs over its inputs through temporaries, but not while dynamo traces: a graph
    # run without functionalization (torch.compile(backend="eager")) or a direct call reaches here with them
    if _needs_temporary(out_q, q, (k, q_weight, k_weight)) or _needs_temporary(out_k, k, (q, q_weight, k_weight)):
        tq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        tk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        _qk_norm_rope_op(q, k, q_weight, k_weight, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w,
                         frame_offset, eps, tq, tk)
        out_q.copy_(tq)
        out_k.copy_(tk)
        return
    if q.shape == k.shape:
        launch_norm_rope(q=q, k=k, q_weight=q_weight, k_weight=k_weight, out_q=out_q, out_k=out_k,
                         tables=tables, gh=grid_h, gw=grid_w, frame_offset=frame_offset, eps=eps)
    else:
        launch_norm_rope(q=q, q_weight=q_weight, out_q=out_q, tables=tables, gh=grid_h,
                         gw=grid_w, frame_offset=frame_offset, eps=eps)
        launch_norm_rope(k=k, k_weight=k_weight, out_k=out_k, tables=tables, gh=grid_h,
                         gw=grid_w, frame_offset=frame_offset, eps=eps)


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w,
      frame_offset, eps, out_q, out_k):
    return None


def _check_rope_fits(op: str, x: torch.Tensor, rope, frame_offset: int) -> None:
    if torch.compiler.is_compiling():
        return
    T, GH, GW = rope.grid
    S = x.shape[1]
    if x.shape[-1] != rope.head_dim:
        raise ValueError(f"{op}: head_dim {x.shape[-1]} does not match rope.head_dim "
                         f"{rope.head_dim}")
    if S % (GH * GW):
        raise ValueError(f"{op}: seq length {S} is not a whole number of frames of "
                         f"{GH}x{GW} tokens (rope.grid={tuple(rope.grid)})")
    if frame_offset < 0 or frame_offset + S // (GH * GW) > T:
        raise ValueError(f"{op}: frames {frame_offset}..{frame_offset + S // (GH * GW) - 1} do "
                         f"not fit in the rope grid of {T} frames")


def apply_rope_3d_triton(x: torch.Tensor, rope, frame_offset: int = 0,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """3D RoPE (SPEC 5) of `x` [B, S, H, D] holding frames `frame_offset..` of `rope.grid`.

    Forward only. Returns a new BSHD-contiguous tensor of x's dtype (or writes `out`).
    """
    check_no_grad_triton("apply_rope_3d", x=x)
    _check_rope_fits("apply_rope_3d", x, rope, frame_offset)
    if getattr(rope, "pairs", "interleaved") != "interleaved":
        from longcat_kernels.dispatch import BackendUnavailableError
        raise BackendUnavailableError(f"apply_rope_3d: the Triton kernel rotates interleaved pairs, got "
                                      f"rope.pairs={rope.pairs!r}; use the torch path")
    tabs, gh, gw = rope_table_args(rope)
    tabs = [t.to(x.device) for t in tabs]
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ops.longcat_kernels.rope_3d(x, *tabs, gh, gw, int(frame_offset), out)
    return out


def qk_norm_rope_triton(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor,
                        k_weight: torch.Tensor, rope=None, frame_offset: int = 0,
                        eps: float = 1e-6, out_q: Optional[torch.Tensor] = None,
                        out_k: Optional[torch.Tensor] = None):
    """Fused SPEC 6 q/k RMSNorm (over head_dim) then 3D RoPE, one launch, each output written once.

    Args:
        q (Tensor): [B, Sq, H, D], any strides. k (Tensor): [B, Sk, H, D].
        q_weight, k_weight (Tensor): [D] (norm over each head) or [H*D] (over all heads of a token,
            Wan's norm_q / norm_k); cast to q's / k's dtype.
        rope (Rope3D | None): RoPE at frames `frame_offset..`; None = norm only.
        out_q, out_k (Tensor | None): preallocated outputs (any strides, e.g. the tail of a
            [cache; fresh] KV buffer); new BSHD-contiguous tensors when None.

    Returns (out_q, out_k). Forward only.
    """
    check_no_grad_triton("qk_norm_rope", q=q, k=k, q_weight=q_weight, k_weight=k_weight, out_q=out_q, out_k=out_k)
    if rope is not None and getattr(rope, "pairs", "interleaved") != "interleaved":
        from longcat_kernels.dispatch import BackendUnavailableError
        raise BackendUnavailableError(f"qk_norm_rope: the Triton prologue rotates interleaved pairs, got "
                                      f"rope.pairs={rope.pairs!r}; use backend='torch'")
    if q_weight.numel() != k_weight.numel() and q.shape[2] > 1:
        raise ValueError(f"k_weight: expected {q_weight.numel()} elements (same norm kind as q_weight), "
                         f"got {k_weight.numel()}")
    if rope is not None:
        _check_rope_fits("qk_norm_rope", q, rope, frame_offset)
        _check_rope_fits("qk_norm_rope", k, rope, frame_offset)
        tabs, gh, gw = rope_table_args(rope)
        tabs = [t.to(q.device) for t in tabs]
    else:
        tabs, gh, gw = [None] * 6, 1, 1
    qw = q_weight.to(device=q.device, dtype=q.dtype).contiguous()
    kw = k_weight.to(device=k.device, dtype=k.dtype).contiguous()
    # an output that is a lazy negation (torch._neg_view) cannot be handed to the op: torch's negation fallback
    # refuses a mutated argument with one ("Expected Tensor but got None"); it gets a temporary, copied in below
    # (copy_ writes through the negation)
    def own(out, like):
        if out is None or (not torch.compiler.is_compiling() and out.is_neg()):
            return torch.empty(like.shape, dtype=like.dtype, device=like.device)
        return out

    dst_q, dst_k = own(out_q, q), own(out_k, k)
    torch.ops.longcat_kernels.qk_norm_rope(q, k, qw, kw, *tabs, gh, gw, int(frame_offset),
                                           float(eps), dst_q, dst_k)
    for out, dst in ((out_q, dst_q), (out_k, dst_k)):
        if out is not None and dst is not out:
            out.copy_(dst)
    return (dst_q if out_q is None else out_q), (dst_k if out_k is None else out_k)
