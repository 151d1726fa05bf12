"""Video token grids and 3D block geometry (SPEC 2), pure torch, CPU-capable.

Tokens of a latent video are in row-major ``(t, h, w)`` order, ``S = T*H*W``. A chunk
``(ct, ch, cw)`` tiles the grid into blocks numbered in raster order over
``(ceil(T/ct), ceil(H/ch), ceil(W/cw))``; edge blocks are partial when the grid is not divisible.
Inside a block, slot ``r`` in ``[0, ct*ch*cw)`` is ``(dt, dh, dw) = (r // (ch*cw), (r // cw) % ch,
r % cw)``; it holds a real token iff all three coordinates fall inside the grid.
"""

from __future__ import annotations

import functools
import operator
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch

Triple = Tuple[int, int, int]

__all__ = [
    "Triple",
    "VideoGrid",
    "as_triple",
    "num_blocks",
    "total_blocks",
    "cache_split_aligned",
    "block_token_index",
    "block_sizes",
    "token_to_slot",
]


def as_triple(value, name: str = "grid") -> Triple:
    """Returns ``value`` as a tuple of three positive Python ints, or raises naming ``name``."""
    if isinstance(value, VideoGrid):
        return value.shape
    if isinstance(value, torch.Size):
        value = tuple(value)
    if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise TypeError(f"{name}: expected a tuple of 3 ints (t, h, w), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, (bool, float)) or (isinstance(v, torch.Tensor) and v.dtype == torch.bool):
            raise TypeError(f"{name}: expected a tuple of 3 ints (t, h, w), got {value!r}")
        try:
            v = operator.index(v)
        except TypeError:
            raise TypeError(f"{name}: expected a tuple of 3 ints (t, h, w), got {value!r}") from None
        if v <= 0:
            raise ValueError(f"{name}: expected 3 positive ints (t, h, w), got {tuple(value)!r}")
        out.append(int(v))
    return (out[0], out[1], out[2])


@dataclass(frozen=True)
class VideoGrid:
    """A latent token grid of ``t`` frames of ``h x w`` tokens (after patching)."""

    t: int
    h: int
    w: int

    def __post_init__(self):
        """Fields kept as plain ints (a numpy or 0-d tensor t stayed as given: ``num_tokens`` was a
        tensor, ``shape`` held it, and the grid hashed unlike the equal ``VideoGrid(2, h, w)``)."""
        for name, v in zip(("t", "h", "w"), as_triple((self.t, self.h, self.w), "VideoGrid")):
            object.__setattr__(self, name, v)

    @property
    def shape(self) -> Triple:
        return (self.t, self.h, self.w)

    @property
    def tokens_per_frame(self) -> int:
        return self.h * self.w

    @property
    def num_tokens(self) -> int:
        return self.t * self.h * self.w

    def num_blocks(self, chunk: Sequence[int]) -> Triple:
        return num_blocks(self.shape, chunk)


def num_blocks(grid: Sequence[int], chunk: Sequence[int]) -> Triple:
    """Blocks per axis ``(ceil(T/ct), ceil(H/ch), ceil(W/cw))``."""
    g = as_triple(grid, "grid")
    c = as_triple(chunk, "chunk")
    return tuple(-(-gi // ci) for gi, ci in zip(g, c))  # type: ignore[return-value]


def total_blocks(grid: Sequence[int], chunk: Sequence[int]) -> int:
    """Total number of (possibly partial) blocks."""
    nt, nh, nw = num_blocks(grid, chunk)
    return nt * nh * nw


@functools.lru_cache(maxsize=64)
def cache_split_aligned(cache_tokens: int, tokens_per_frame: int, chunk_t: int) -> bool:
    """Keys ``[cache; fresh]``: True when the cache (``cache_tokens`` of whole frames of
    ``tokens_per_frame``) ends on a key-block boundary along t, so that no key block straddles the
    two segments (what the warp-specialised BSA kernel needs; ``dispatch.Facts.key_split_aligned``)."""
    return (int(cache_tokens) // int(tokens_per_frame)) % int(chunk_t) == 0


def _block_token_index_cpu(grid: Triple, chunk: Triple) -> torch.Tensor:
    T, H, W = grid
    ct, ch, cw = chunk
    nt, nh, nw = num_blocks(grid, chunk)
    # on the CPU whatever torch.set_default_device says (the name promises it; callers .to() their device)
    bt = torch.arange(nt, device="cpu").view(nt, 1, 1, 1, 1, 1)
    bh = torch.arange(nh, device="cpu").view(1, nh, 1, 1, 1, 1)
    bw = torch.arange(nw, device="cpu").view(1, 1, nw, 1, 1, 1)
    dt = torch.arange(ct, device="cpu").view(1, 1, 1, ct, 1, 1)
    dh = torch.arange(ch, device="cpu").view(1, 1, 1, 1, ch, 1)
    dw = torch.arange(cw, device="cpu").view(1, 1, 1, 1, 1, cw)
    t = bt * ct + dt
    h = bh * ch + dh
    w = bw * cw + dw
    idx = (t * H + h) * W + w
    real = (t < T) & (h < H) & (w < W)
    idx = torch.where(real, idx, torch.full_like(idx, -1))
    return idx.reshape(nt * nh * nw, ct * ch * cw).contiguous()


_DEVICE_CACHE: dict = {}


def block_token_index(grid: Sequence[int], chunk: Sequence[int], device=None) -> torch.Tensor:
    """Sequence index of every block slot.

    Returns:
        LongTensor ``[num_blocks, ct*ch*cw]``: the token's sequence index, or -1 for a padding slot
        of a partial edge block. Cached per (grid, chunk, device); do not modify in place.
    """
    g = as_triple(grid, "grid")
    c = as_triple(chunk, "chunk")
    cpu = _block_token_index_cpu(g, c)
    if device is None or torch.device(device).type == "cpu":
        return cpu
    key = (g, c, str(torch.device(device)))
    out = _DEVICE_CACHE.get(key)
    if out is None:
        if len(_DEVICE_CACHE) > 64:
            _DEVICE_CACHE.clear()
        from ._validate import cache_mode, has_values  # noqa: PLC0415 (imports this module)

        with cache_mode():
            out = cpu.to(device)
        if not has_values(out):  # fake tensors (torch.export, FakeTensorMode): not kept for eager calls
            return out
        _DEVICE_CACHE[key] = out
    return out


def block_sizes(grid: Sequence[int], chunk: Sequence[int], device=None) -> torch.Tensor:
    """Number of real tokens per block, LongTensor ``[num_blocks]``."""
    return (block_token_index(grid, chunk, device) >= 0).sum(dim=1)


def token_to_slot(grid: Sequence[int], chunk: Sequence[int], device=None) -> torch.Tensor:
    """Position of every token in the flattened block-slot layout, LongTensor ``[S]``.

    ``block_token_index(grid, chunk).reshape(-1)[token_to_slot(grid, chunk)] == arange(S)``.
    """
    idx = block_token_index(grid, chunk, device).reshape(-1)
    g = as_triple(grid, "grid")
    S = g[0] * g[1] * g[2]
    slots = torch.arange(idx.numel(), device=idx.device)
    # a scatter, not boolean indexing (a sync on CUDA, impossible on meta/fake tensors): padding slots
    # all land in a spare entry S, dropped
    dest = torch.where(idx >= 0, idx, S)
    return torch.empty(S + 1, dtype=torch.long, device=idx.device).scatter_(0, dest, slots)[:S]
