"""fp64 oracles, written independently of ``longcat_kernels.ops.*.reference`` and ``grid.py``.

Dense ``[Sq, Sk]`` masks and fp64 einsums: for tiny test shapes only.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "token_block_ids",
    "bsa_token_mask",
    "attention_oracle",
    "attention_lowp",
    "pooled_oracle",
    "block_scores_oracle",
    "selection_oracle",
    "prefix_mask",
    "rope_oracle",
    "rms_norm_oracle",
    "check_selection",
]


def token_block_ids(grid: Sequence[int], chunk: Sequence[int]) -> torch.Tensor:
    """Block id of every token of a ``(T, H, W)`` grid, by a plain Python loop. LongTensor [S]."""
    T, H, W = grid
    ct, ch, cw = chunk
    nh, nw = math.ceil(H / ch), math.ceil(W / cw)
    ids = []
    for t in range(T):
        for h in range(H):
            for w in range(W):
                ids.append(((t // ct) * nh + h // ch) * nw + w // cw)
    return torch.tensor(ids, dtype=torch.long)


def bsa_token_mask(block_mask: torch.Tensor, grid_q, grid_k, chunk_q, chunk_k) -> torch.Tensor:
    """Token mask ``[B, H, Sq, Sk]`` bool from a block mask ``[B, H, Nq, Nk]``."""
    bq = token_block_ids(grid_q, chunk_q).to(block_mask.device)
    bk = token_block_ids(grid_k, chunk_k).to(block_mask.device)
    # a mask with more blocks than the grids give was indexed by its first ones: a wrong oracle, silently
    want = (int(bq.max()) + 1, int(bk.max()) + 1)
    if tuple(block_mask.shape[-2:]) != want:
        raise ValueError(f"block_mask: expected [B, H, {want[0]}, {want[1]}] blocks for grid_q {tuple(grid_q)} / chunk_q "
                         f"{tuple(chunk_q)} and grid_k {tuple(grid_k)} / chunk_k {tuple(chunk_k)}, got "
                         f"{list(block_mask.shape)}")
    return block_mask[:, :, bq][:, :, :, bk]


def kv_heads_like_q(x: torch.Tensor, heads: int, name: str = "k") -> torch.Tensor:
    """``x [B, S, Hkv, D]`` with its kv heads repeated to ``heads`` (GQA/MQA: query head h reads kv head
    ``h // (heads // Hkv)``, as the ops and SDPA's ``enable_gqa`` do); raises naming ``name`` if they do not divide."""
    hkv = x.shape[2]
    if hkv == heads:
        return x
    if hkv <= 0 or heads % hkv:
        raise ValueError(f"{name}: expected a number of heads that divides the {heads} query heads (GQA/MQA), "
                         f"got {hkv} (shape {tuple(x.shape)})")
    return x.repeat_interleave(heads // hkv, dim=2)


def _masked_scores(q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor], scale: Optional[float]):
    """Scaled scores ``[B, H, Sq, Sk]`` in q's dtype (k's batch of 1 broadcast, its GQA heads repeated),
    masked-out -> -inf.

    Shared by ``attention_oracle`` (fp64) and ``attention_lowp`` (input dtype) so the oracle and the
    tolerance baseline can never disagree on scale, broadcasting or mask semantics."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = kv_heads_like_q(k, q.shape[2], "k")
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.expand(q.shape[0], -1, -1, -1)) * scale
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask: expected a Tensor or None, got {type(mask).__name__}")
        if mask.dtype == torch.bool:
            s = s.masked_fill(~mask.to(s.device), float("-inf"))
        elif mask.is_floating_point():
            # SDPA's attn_mask convention (diffusers builds these: 0 attend, -inf masked): added to the scores
            s = s + mask.to(device=s.device, dtype=s.dtype)
        else:
            # a 0/1 int mask went through bitwise not (1 -> -2) and crashed in masked_fill
            raise TypeError(f"mask: expected a bool (True = attend) or floating (additive, as SDPA's attn_mask) "
                            f"mask, got {mask.dtype} (a 0/1 mask: pass mask.bool())")
    return s


def attention_oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp64 attention on BSHD tensors (differentiable w.r.t. q, k, v).

    Args:
        q: ``[B, Sq, H, D]``; k, v: ``[B or 1, Sk, H or Hkv, D]`` (GQA/MQA: ``Hkv`` divides ``H``; query head
            h attends with kv head ``h // (H // Hkv)``).
        mask: broadcastable to ``[B, H, Sq, Sk]`` as SDPA's ``attn_mask``: bool (True = attend), floating
            (added to the scaled scores: 0 attend, -inf masked, as diffusers builds them), or None.

    Returns:
        (out ``[B, Sq, H, D]`` fp64, lse ``[B, H, Sq]`` fp64); fully masked rows: out 0, lse -inf.
    """
    # differentiable in fp64 (no detach): gradients of the oracle come from autograd
    qd, kd, vd = q.double(), k.double(), v.double()
    s = _masked_scores(qd, kd, mask, scale)
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(den == 0, torch.ones_like(den), den)
    lse = (m + torch.log(den.detach())).squeeze(-1)
    vd = kv_heads_like_q(vd, qd.shape[2], "v")
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd.expand(qd.shape[0], -1, -1, -1))
    return out, lse


def attention_lowp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """The tolerance baseline: attention computed by torch in the inputs' own (low) precision.

    Scores and ``p @ v`` in the input dtype, softmax in the input dtype (as eager PyTorch would);
    fully masked rows give 0; ``mask`` as in ``attention_oracle``. ``[B, Sq, H, D]`` in q's dtype.
    """
    s = _masked_scores(q, k, mask, scale)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)
    v = kv_heads_like_q(v, q.shape[2], "v")
    return torch.einsum("bhqk,bkhd->bqhd", p, v.expand(q.shape[0], -1, -1, -1))


def prefix_mask(seq: int, prefix_len: int, device=None) -> torch.Tensor:
    """``[S, S]`` bool: rows < p see columns < p; rows >= p see everything (``0 <= p <= S``)."""
    # a negative or too long prefix gave an all-True mask, a fractional one a mask no rule gives, silently
    from .._validate import check_prefix_len, plain_int  # noqa: PLC0415

    prefix_len = plain_int(prefix_len)
    check_prefix_len(prefix_len, seq)
    r = torch.arange(seq, device=device)[:, None]
    c = torch.arange(seq, device=device)[None, :]
    return (r >= prefix_len) | (c < prefix_len)


def pooled_oracle(x: torch.Tensor, grid, chunk) -> torch.Tensor:
    """Block means over real tokens ``[B, H, N, D]``: fp32 sums, rounded to x's dtype (DESIGN)."""
    B, S, H, D = x.shape
    ids = token_block_ids(grid, chunk).to(x.device)
    N = int(ids.max()) + 1
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    sums = torch.zeros(B, N, H, D, dtype=acc, device=x.device).index_add_(1, ids, x.detach().to(acc))
    cnt = torch.bincount(ids, minlength=N).to(acc).view(1, N, 1, 1)
    return (sums / cnt).to(x.dtype).transpose(1, 2)


def block_scores_oracle(q, k, grid_q, grid_k, chunk_q, chunk_k) -> torch.Tensor:
    """Unscaled block scores ``[B, H, Nq, Nk]`` in fp64 from the (rounded) pooled means."""
    qb = pooled_oracle(q, grid_q, chunk_q).double()
    kb = pooled_oracle(k, grid_k, chunk_k).double()
    return qb @ kb.transpose(-1, -2)


def selection_oracle(q, k, grid_q, grid_k, chunk_q, chunk_k, sparsity, cdf_threshold):
    """(block mask ``[B, H, Nq, Nk]`` bool, scores fp64, counts long) by SPEC 3 in fp64."""
    s = block_scores_oracle(q, k, grid_q, grid_k, chunk_q, chunk_k)
    Nk = s.shape[-1]
    D = q.shape[-1]
    count = torch.zeros(s.shape[:-1], dtype=torch.long, device=s.device)
    if sparsity is not None:
        count += int((1 - sparsity) * Nk)
    order = torch.argsort(s, dim=-1, descending=True, stable=True)
    if cdf_threshold is not None:
        p = torch.softmax(s / math.sqrt(D), dim=-1)
        cdf = torch.cumsum(torch.gather(p, -1, order), dim=-1)
        n = torch.searchsorted(cdf, torch.full_like(cdf[..., :1], cdf_threshold), right=True)[..., 0]
        if cdf_threshold >= 1.0:
            # in exact arithmetic every cumulative sum of a softmax is <= 1: all blocks (the fp64 sum ends a few
            # ulps above 1.0 and searchsorted stopped short of the last blocks)
            n = torch.full_like(n, Nk)
        count = torch.maximum(count, n)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(Nk, device=s.device).expand_as(order))
    return rank < count[..., None], s, count


def rope_oracle(x: torch.Tensor, grid, frame_offset: int = 0, theta: float = 10000.0, *,
                axis_dims: Optional[Sequence[int]] = None, pairs: str = "interleaved") -> torch.Tensor:
    """SPEC 5 (SPEC 12's conventions too) written out longhand with Python math, fp64: ``[B, S, H, D]`` fp64.

    ``axis_dims`` ``(dt, dh, dw)``: default ``D - 4*(D//6), 2*(D//6), 2*(D//6)``. ``pairs``: ``"interleaved"``
    (lanes 2i, 2i+1 of the head) or ``"half"`` (rotate-half inside each axis part: lanes j, j + d/2 of its d lanes),
    angle ``pos * theta**(-2i/d)`` for pair i of a d-lane part either way."""
    B, S, Hh, D = x.shape
    T, H, W = grid
    dh = 2 * (D // 6)
    dims = [D - 2 * dh, dh, dh] if axis_dims is None else [int(d) for d in axis_dims]
    if len(dims) != 3 or sum(dims) != D or any(d < 0 or d % 2 for d in dims):
        raise ValueError(f"axis_dims: expected 3 even ints summing to head_dim {D}, got {axis_dims!r}")
    if pairs not in ("interleaved", "half"):
        raise ValueError(f"pairs: expected 'interleaved' or 'half', got {pairs!r}")
    # lane pairs (a, b) and their angle index, in the order the angles are listed below
    lanes, c0 = [], 0
    for d in dims:
        for i in range(d // 2):
            lanes.append((c0 + 2 * i, c0 + 2 * i + 1) if pairs == "interleaved" else (c0 + i, c0 + d // 2 + i))
        c0 += d
    ia = torch.tensor([a for a, _ in lanes], dtype=torch.long)
    ib = torch.tensor([b for _, b in lanes], dtype=torch.long)
    xd = x.detach().double().cpu()
    out = torch.empty_like(xd)
    hw = H * W
    for s in range(S):
        t, h, w = frame_offset + s // hw, (s % hw) // W, s % W
        ang = []
        for pos, d in zip((t, h, w), dims):
            for i in range(d // 2):
                ang.append(pos * theta ** (-(2 * i) / d))
        c = torch.tensor([math.cos(g) for g in ang], dtype=torch.float64)
        sn = torch.tensor([math.sin(g) for g in ang], dtype=torch.float64)
        x0, x1 = xd[:, s, :, ia], xd[:, s, :, ib]
        out[:, s, :, ia] = x0 * c - x1 * sn
        out[:, s, :, ib] = x1 * c + x0 * sn
    return out.to(x.device)


def rms_norm_oracle(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """fp64 RMSNorm over the last dim times weight."""
    xd = x.detach().double()
    return xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.detach().double()


def check_selection(
    selection,
    q: torch.Tensor,
    k: torch.Tensor,
    sparsity,
    cdf_threshold,
    *,
    score_rtol: Optional[float] = None,
    cdf_atol: Optional[float] = None,
) -> Optional[str]:
    """None if ``selection`` (a BlockSelection) is a valid SPEC 3 selection for q, k, else why not.

    Format: ``indices`` int32 with unique ids in ``[0, Nk)`` in the first ``counts`` entries of a
    row and -1 after. Semantics against the fp64 oracle: counts equal (a cdf count may differ only
    where the oracle's cumulative sums between the two counts are all within ``cdf_atol`` of the threshold), and
    every selected block scores at least every unselected one, up to ``score_rtol * max|score|``
    (rounding of the pooled means in low precision can swap near-ties).
    Defaults: exact up to 1e-6 for fp32/fp64 inputs; 2e-2 / 1e-2 for fp16/bf16.
    """
    half = q.dtype in (torch.float16, torch.bfloat16)
    if score_rtol is None:
        score_rtol = 2e-2 if half else 1e-6
    if cdf_atol is None:
        cdf_atol = 1e-2 if half else 1e-6
    idx, cnt = selection.indices, selection.counts
    if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
        return f"indices/counts: expected int32, got {idx.dtype}/{cnt.dtype}"
    _, s, cnt_e = selection_oracle(
        q, k, selection.grid_q, selection.grid_k, selection.chunk_q, selection.chunk_k, sparsity, cdf_threshold
    )
    Nk = s.shape[-1]
    if tuple(cnt.shape) != tuple(cnt_e.shape):
        return f"counts: shape {tuple(cnt.shape)} != expected {tuple(cnt_e.shape)}"
    w = idx.shape[-1]
    pos = torch.arange(w, device=idx.device)
    inside = pos < cnt[..., None].long()
    if (cnt.long() > w).any():
        return f"counts: some count exceeds indices width {w}"
    if (idx[~inside] != -1).any():
        return "indices: entries past counts must be -1"
    if ((idx[inside] < 0) | (idx[inside] >= Nk)).any():
        return f"indices: valid entries must be in [0, {Nk})"
    mask_a = selection.to_mask().to(s.device)
    if not torch.equal(mask_a.sum(-1), cnt.long().to(s.device)):
        return "indices: duplicate block ids within a row"
    cnt_a = cnt.long().to(s.device)
    bad_cnt = cnt_a != cnt_e
    if bad_cnt.any():
        if cdf_threshold is None:
            return f"counts: {int(bad_cnt.sum())} rows differ from the top-k count"
        D = q.shape[-1]
        p = torch.softmax(s / math.sqrt(D), dim=-1)
        cdf = torch.cumsum(torch.sort(p, dim=-1, descending=True).values, dim=-1)
        lo = torch.minimum(cnt_a, cnt_e).clamp(max=Nk - 1)
        hi = torch.maximum(cnt_a, cnt_e).clamp(min=1) - 1
        # the whole gap between the two counts must sit at the threshold: with "either end" (|) a
        # count of every block passed where the oracle keeps 1 and only its 2nd cdf entry was near
        near = ((torch.gather(cdf, -1, lo[..., None]) - cdf_threshold).abs() <= cdf_atol) & (
            (torch.gather(cdf, -1, hi[..., None]) - cdf_threshold).abs() <= cdf_atol
        )
        topk_floor = int((1 - sparsity) * Nk) if sparsity is not None else 0
        allowed = near[..., 0] & (torch.minimum(cnt_a, cnt_e) >= topk_floor)
        if (bad_cnt & ~allowed).any():
            n = int((bad_cnt & ~allowed).sum())
            return f"counts: {n} rows differ from the cdf/top-k count away from the threshold"
    tol = score_rtol * float(s.abs().max().clamp(min=1e-30))
    sel_min = torch.where(mask_a, s, torch.full_like(s, float("inf"))).amin(-1)
    unsel_max = torch.where(~mask_a, s, torch.full_like(s, float("-inf"))).amax(-1)
    bad = sel_min < unsel_max - tol
    if bad.any():
        return f"indices: {int(bad.sum())} rows keep a block scoring below an unselected one (tol {tol:.2e})"
    return None
