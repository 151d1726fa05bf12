"""Input factories shared by tests and benchmarks. Fresh random values unless a generator is given."""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "LATENT_GRIDS",
    "TEST_GRIDS",
    "make_qkv",
    "make_tensor",
    "make_cache",
    "make_video_qkv",
    "selection_overlap",
    "poison_",
    "empty_poisoned",
]

# real latent grids (T, H, W) after the 1x2x2 patch (SPEC 10)
LATENT_GRIDS: Dict[str, Tuple[int, int, int]] = {
    "480p_93f": (24, 30, 52),  # 37,440 tokens, not divisible by 4x4x4 (H=30)
    "720p_93f": (24, 44, 80),  # 84,480 tokens, divisible
    "704x1280_93f": (24, 44, 80),
}

# scaled-down grids for CPU tests: divisible and non-divisible by (4,4,4) / (2,2,4) chunks
TEST_GRIDS: Dict[str, Tuple[int, int, int]] = {
    "div_4x8x8": (4, 8, 8),
    "480p_like_6x6x13": (6, 6, 13),  # H, W not multiples of 4 (like 30 x 52 / 4)
    "odd_5x7x9": (5, 7, 9),
    "tiny_3x5x6": (3, 5, 6),
}


def make_tensor(
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    device="cpu",
    *,
    requires_grad: bool = False,
    permuted: bool = False,
    std: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random normal ``shape`` tensor. ``permuted=True`` returns a BSHD view of a BHSD buffer
    (non-contiguous strides, like ``x.transpose(1, 2)``)."""
    shape = tuple(shape)
    if not dtype.is_floating_point:  # randn cast to an integer dtype: mostly zeros
        raise ValueError(f"dtype: expected a floating dtype, got {dtype}")
    if permuted and len(shape) != 4:
        # it used to return a contiguous tensor: a test of strided inputs that tested nothing
        raise ValueError(f"permuted: needs a 4-D (B, S, H, D) shape, got {shape}")
    if permuted:
        B, S, H, D = shape
        x = torch.randn((B, H, S, D), dtype=torch.float32, device=device, generator=generator) * std
        x = x.to(dtype).transpose(1, 2)
    else:
        x = (torch.randn(shape, dtype=torch.float32, device=device, generator=generator) * std).to(dtype)
    if requires_grad:
        x.requires_grad_(True)
    return x


def make_qkv(
    batch: int,
    seq_q: int,
    heads: int,
    head_dim: int,
    seq_k: Optional[int] = None,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    requires_grad: bool = False,
    permuted: bool = False,
    std: float = 1.0,
    generator: Optional[torch.Generator] = None,
):
    """``q [B, Sq, H, D]``, ``k, v [B, Sk, H, D]`` random normal (times ``std``)."""
    seq_k = seq_q if seq_k is None else seq_k
    kw = dict(dtype=dtype, device=device, requires_grad=requires_grad, permuted=permuted, std=std, generator=generator)
    q = make_tensor((batch, seq_q, heads, head_dim), **kw)
    k = make_tensor((batch, seq_k, heads, head_dim), **kw)
    v = make_tensor((batch, seq_k, heads, head_dim), **kw)
    return q, k, v


def make_cache(
    cache_batch: int,
    seq_cache: int,
    heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    generator: Optional[torch.Generator] = None,
):
    """``k_cache, v_cache [Bc, Sc, H, D]`` random normal."""
    kc = make_tensor((cache_batch, seq_cache, heads, head_dim), dtype, device, generator=generator)
    vc = make_tensor((cache_batch, seq_cache, heads, head_dim), dtype, device, generator=generator)
    return kc, vc


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill a float tensor with NaN in place (an output that is not written then fails)."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty_poisoned(*shape, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return poison_(torch.empty(*shape, dtype=dtype, device=device))


# ---------------------------------------------------------------------------------------------
# video-like inputs: what block-sparse kernels see on real latents, unlike independent noise
# ---------------------------------------------------------------------------------------------
def _smooth_field(
    shape_bc: Tuple[int, int], grid: Tuple[int, int, int], corr: Tuple[float, float, float],
    device, generator: Optional[torch.Generator],
) -> torch.Tensor:
    """``[B, C, T, H, W]`` fp32 Gaussian field, smooth over ``(t, h, w)`` with correlation lengths
    ``corr`` (tokens), unit variance per element: trilinear upsampling of white noise drawn on a
    coarse lattice of spacing ``corr``."""
    # Upsample so that one coarse cell spans `corr` (rounded) tokens; crop to the grid. The lattice
    # was sized by the unrounded `corr`: with round(c) < c (1.4, 2.5) it came out shorter than the
    # grid and q, k, v had fewer tokens than the grid, silently.
    step = [max(1, round(c)) for c in corr]
    coarse = [max(2, math.ceil(g / st) + 1) for g, st in zip(grid, step)]
    noise = torch.randn((*shape_bc, *coarse), dtype=torch.float32, generator=generator, device=device)
    size = [(n - 1) * st + 1 for n, st in zip(coarse, step)]
    field = F.interpolate(noise, size=size, mode="trilinear", align_corners=True)
    field = field[:, :, : grid[0], : grid[1], : grid[2]]
    return field / field.std().clamp_min(1e-12)


def make_video_qkv(
    batch: int,
    grid: Sequence[int],
    heads: int,
    head_dim: int,
    *,
    grid_k: Optional[Sequence[int]] = None,
    corr: Sequence[float] = (8.0, 12.0, 12.0),
    content_dim: int = 16,
    qk_alignment: float = 0.8,
    noise: float = 0.3,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    permuted: bool = False,
    generator: Optional[torch.Generator] = None,
):
    """Video-like ``q [B, Sq, H, D]``, ``k, v [B, Sk, H, D]`` on ``(t, h, w)`` token grids.

    Real latents are smooth in space and time, so neighbouring query blocks pick mostly the same
    key blocks (and a query block favours keys of similar content nearby); independent random
    inputs give unrelated selections. Model::

        c(t, h, w) in R^content_dim : a smooth Gaussian field (correlation lengths ``corr`` tokens)
        q_h = c P_h            + noise * e_q          (per-head projection, per-head white noise)
        k_h = c (a P_h + sqrt(1 - a^2) R_h) + noise * e_k      (a = ``qk_alignment``)
        v_h = c V_h            + noise * e_v

    then each of q, k, v is scaled to unit variance per element (the same logit scale as
    ``make_qkv``). ``a`` sets how much a query prefers keys with its own content (locality);
    ``noise`` sets how much per-head, per-token detail breaks the smoothness.

    Args:
        batch, heads, head_dim: sizes.
        grid (tuple | VideoGrid): ``(Tq, H, W)`` query token grid.
        grid_k (tuple | VideoGrid | None): ``(Tk, H, W)`` key grid, ``Tk >= Tq``, same ``(H, W)``; queries are
            the last ``Tq`` frames of it (noisy frames after cond frames). Default ``grid``.
        corr (tuple): correlation lengths in tokens along ``(t, h, w)``, each > 0.
        content_dim (int): width of the shared content field.
        qk_alignment (float): in [0, 1].
        noise (float): >= 0, per-head white noise relative to the unit-variance field.
        dtype, device, permuted, generator: as ``make_qkv`` (a generator lives on ``device``).

    Returns:
        (q, k, v).
    """
    from ..grid import VideoGrid  # noqa: PLC0415

    grid = grid.shape if isinstance(grid, VideoGrid) else grid
    grid_k = grid_k.shape if isinstance(grid_k, VideoGrid) else grid_k
    gq = tuple(int(g) for g in grid)
    gk = gq if grid_k is None else tuple(int(g) for g in grid_k)
    # int() truncated a fractional size (4.5 -> 4) into a grid other than the one asked for
    if len(gq) != 3 or min(gq) <= 0 or list(gq) != list(grid):
        raise ValueError(f"grid: expected (t, h, w) positive ints, got {tuple(grid)}")
    if (len(gk) != 3 or min(gk) <= 0 or gk[1:] != gq[1:] or gk[0] < gq[0]
            or (grid_k is not None and list(gk) != list(grid_k))):
        raise ValueError(f"grid_k: expected (Tk, {gq[1]}, {gq[2]}) with Tk >= {gq[0]}, got {tuple(grid_k)}")
    corr = tuple(float(c) for c in corr)
    if len(corr) != 3 or not all(0 < c < math.inf for c in corr):
        raise ValueError(f"corr: expected three positive finite correlation lengths, got {corr}")
    if not 0.0 <= float(qk_alignment) <= 1.0:
        raise ValueError(f"qk_alignment: expected a value in [0, 1], got {qk_alignment}")
    # inf passed ">= 0" and made every q, k, v NaN
    if not 0.0 <= float(noise) < math.inf:
        raise ValueError(f"noise: expected a finite value >= 0, got {noise}")
    for name, val in (("batch", batch), ("heads", heads), ("head_dim", head_dim), ("content_dim", content_dim)):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name}: expected a positive int, got {val!r}")
    B, H, D, C = batch, heads, head_dim, content_dim
    Tk, Hg, Wg = gk
    Sk, Sq = Tk * Hg * Wg, gq[0] * Hg * Wg
    content = _smooth_field((B, C), gk, corr, device, generator)  # [B, C, Tk, H, W]
    content = content.flatten(2).transpose(1, 2)  # [B, Sk, C]

    def proj() -> torch.Tensor:
        return torch.randn((H, C, D), dtype=torch.float32, generator=generator, device=device) * C ** -0.5

    def finish(x: torch.Tensor) -> torch.Tensor:  # x [B, S, H, D] fp32
        x = x + float(noise) * torch.randn(x.shape, dtype=torch.float32, generator=generator, device=device)
        x = x / x.std().clamp_min(1e-12)
        if permuted:
            return x.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
        return x.to(dtype).contiguous()

    a = float(qk_alignment)
    p_q, r_k, p_v = proj(), proj(), proj()
    p_k = a * p_q + math.sqrt(max(0.0, 1.0 - a * a)) * r_k
    cq = content[:, Sk - Sq:]
    q = finish(torch.einsum("bsc,hcd->bshd", cq, p_q))
    k = finish(torch.einsum("bsc,hcd->bshd", content, p_k))
    v = finish(torch.einsum("bsc,hcd->bshd", content, p_v))
    return q, k, v


def selection_overlap(selection) -> Dict[str, float]:
    """How much neighbouring query blocks share their selected key blocks.

    For every pair of query blocks adjacent along t, h or w (block raster over ``grid_q /
    chunk_q``), per batch and head: ``jaccard = |S_a & S_b| / |S_a | S_b|`` (1: same key blocks,
    0: disjoint; pairs whose union is empty are skipped). And for the pairing of the two-query-block
    kernel (``bench/dev/bsa_pairs_triton.py``, not in the product: blocks ``(t, h, 2i)`` and ``(t, h, 2i + 1)``;
    with an odd row length the last block of a row is alone):
    ``pair_load_ratio = sum |S_a | S_b| / sum (|S_a| + |S_b|)``, the fraction of key-block loads
    left when each pair loads the union of its selections once (0.5: identical selections, 1.0:
    disjoint).

    Args:
        selection (BlockSelection): from ``select_blocks``.

    Returns:
        dict: ``jaccard_t``, ``jaccard_h``, ``jaccard_w`` (means; NaN when the grid has one block
        along that axis), ``jaccard_mean`` (over all adjacent pairs), ``pair_load_ratio``,
        ``mean_selected`` (key blocks per query block), ``num_k_blocks``.
    """
    from ..grid import num_blocks, total_blocks  # noqa: PLC0415

    idx, counts = selection.indices, selection.counts
    B, H, Nq, M = idx.shape
    Nk = total_blocks(selection.grid_k, selection.chunk_k)
    nt, nh, nw = num_blocks(selection.grid_q, selection.chunk_q)
    if nt * nh * nw != Nq:
        raise ValueError(f"selection: {Nq} query blocks, grid_q / chunk_q give {nt}x{nh}x{nw}")
    valid = torch.arange(M, device=idx.device)[None, None, None, :] < counts[..., None]
    member = torch.zeros((B, H, Nq, Nk + 1), dtype=torch.bool, device=idx.device)
    # invalid slots go to the dummy column Nk
    member.scatter_(3, torch.where(valid, idx.long(), torch.full_like(idx.long(), Nk)), True)
    member = member[..., :Nk]
    grid_m = member.view(B, H, nt, nh, nw, Nk)

    def jac(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
        inter = (a & b).sum(-1).double()
        union = (a | b).sum(-1).double()
        keep = union > 0
        return float((inter[keep] / union[keep]).sum()), float(keep.sum())

    out: Dict[str, float] = {}
    tot_j, tot_n = 0.0, 0.0
    for axis, name in ((2, "t"), (3, "h"), (4, "w")):
        n = grid_m.shape[axis]
        if n < 2:
            out[f"jaccard_{name}"] = float("nan")
            continue
        a = grid_m.narrow(axis, 0, n - 1)
        b = grid_m.narrow(axis, 1, n - 1)
        s, cnt = jac(a, b)
        out[f"jaccard_{name}"] = s / cnt if cnt else float("nan")
        tot_j, tot_n = tot_j + s, tot_n + cnt
    out["jaccard_mean"] = tot_j / tot_n if tot_n else float("nan")
    a = grid_m[:, :, :, :, 0::2]  # first block of each pair along w
    b = grid_m[:, :, :, :, 1::2]
    if b.shape[4] < a.shape[4]:  # odd row length: the lone last block pairs with nothing
        b = torch.cat([b, torch.zeros_like(a[:, :, :, :, :1])], dim=4)
    union = (a | b).sum(-1).double().sum()
    both = (a.sum(-1) + b.sum(-1)).double().sum()
    out["pair_load_ratio"] = float(union / both) if both > 0 else float("nan")
    out["mean_selected"] = float(counts.double().mean())
    out["num_k_blocks"] = float(Nk)
    return out
