"""Block selection (gating) of block-sparse attention, torch implementation (SPEC 3 steps 1-2).

Numerics (shared by every backend, DESIGN.md):
- pooled block means over real tokens only, summed in fp32, divided in fp32, rounded to the input dtype;
- score = pooled_q @ pooled_k^T accumulated and kept in fp32, unscaled;
- top-k keeps ``int((1 - sparsity) * Nk)`` blocks; cdf keeps the number of entries ``<= threshold``
  of the cumulative sum of ``softmax(score / sqrt(D))`` sorted descending (possibly 0); both: the max
  of the two counts. Kept blocks are always the highest-scoring ones (stable sort: ties go to the
  lower block id).
- NaN is never hidden: a row whose cdf probabilities hold a NaN (a NaN score, or a +Inf one, or a
  row of -Inf) selects every key block under a cdf rule, so the NaN/Inf reaches that query block's
  output through attention instead of an empty selection returning exact zeros. Under top-k alone
  a NaN score sorts first (torch's sort and the Triton top-k agree), so NaN blocks are kept.
- A top-k rule that keeps 0 blocks (``int((1 - sparsity) * Nk) == 0``, e.g. the default 0.9375 on
  fewer than 16 key blocks) keeps upstream's semantics (all-zero output) but warns once per
  (grid, chunk, sparsity).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..._validate import autocast_off, compiling, user_stacklevel
from ...grid import Triple, as_triple, block_sizes, num_blocks, total_blocks

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # longcat_kernels/

__all__ = [
    "BlockSelection",
    "pool_blocks",
    "block_scores",
    "select_blocks_reference",
    "ieee_fp32_matmul",
    "exact_matmul",
    "warn_if_keeps_nothing",
    "empty_selection",
]

_WARNED_EMPTY: set = set()


def warn_if_keeps_nothing(sparsity: Optional[float], cdf_threshold: Optional[float], num_k_blocks: int,
                          grid_k, chunk_k) -> None:
    """Warns (once per grid/chunk/sparsity) when the top-k rule alone keeps no key block.

    Upstream's count ``int((1 - sparsity) * Nk)`` is 0 for ``Nk < 1 / (1 - sparsity)`` (16 key
    blocks at the default 0.9375): every query then outputs zeros. The semantics stay; the user is
    told which grid hit it and how to get a non-empty selection.
    """
    if cdf_threshold is not None or sparsity is None or int((1.0 - sparsity) * num_k_blocks) > 0:
        return
    try:
        if torch.compiler.is_compiling():
            return
    except AttributeError:  # pragma: no cover - old torch
        pass
    key = (tuple(grid_k), tuple(chunk_k), float(sparsity))
    if key in _WARNED_EMPTY:
        return
    if len(_WARNED_EMPTY) >= 256:  # one key per grid/chunk/sparsity seen: bounded in a long-running process
        _WARNED_EMPTY.clear()
    _WARNED_EMPTY.add(key)
    need = math.ceil(1.0 / (1.0 - sparsity)) if sparsity < 1 else float("inf")
    # the advised bound itself keeps a block: 1 - 1/Nk rounded (0.9 for Nk=10) kept 0 ((1 - 0.9) * 10 < 1)
    most = math.floor((1.0 - 1.0 / num_k_blocks) * 1e4) / 1e4
    while most > 0 and int((1.0 - most) * num_k_blocks) == 0:
        most = round(most - 1e-4, 4)
    warnings.warn(
        f"block-sparse gating: sparsity={sparsity} keeps int((1 - sparsity) * Nk) = 0 of the Nk={num_k_blocks} "
        f"key blocks of grid_k={tuple(grid_k)} with chunk_k={tuple(chunk_k)}: every query block selects nothing "
        f"and outputs zeros (upstream's formula). Use sparsity <= {most:.4f} for this grid, "
        f"a smaller chunk (>= {need} key blocks needed), a cdf_threshold, or dense attention.",
        RuntimeWarning,
        stacklevel=user_stacklevel(_PACKAGE_DIR),
    )


# threads inside ieee_fp32_matmul on CUDA, and the precision setting the first of them found: the last
# one out restores it (each thread restoring what it found left "ieee" behind when two overlapped)
_IEEE_LOCK = threading.Lock()
_IEEE_STATE = {"depth": 0, "restore": None}


def _cuda_fp32_ieee():
    """Sets CUDA fp32 matmuls to full IEEE precision (no TF32); returns the function that restores the setting.

    The legacy switch (``torch.set_float32_matmul_precision``) and the per-backend one
    (``torch.backends.cuda.matmul.fp32_precision``) must agree: torch checks them against each other on every
    cuBLAS handle it hands out ("mix of the legacy and new APIs"), so after a user's
    ``set_float32_matmul_precision("high")`` (the common call) setting only the new switch to "ieee" made every
    cuBLAS call inside the block raise. A legacy setting other than "highest" is switched through the legacy
    API (which sets both), and restored the same way, then the per-backend values found are put back."""
    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):  # older torch: the legacy switch only
        prev_tf32 = m.allow_tf32
        m.allow_tf32 = False

        def restore_old():
            m.allow_tf32 = prev_tf32
        return restore_old
    mk = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    prev_cuda = m.fp32_precision
    prev_mk = getattr(mk, "fp32_precision", None)
    try:
        prev_legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # already mixed by the caller: the legacy value cannot be read, nor restored
        prev_legacy = None
    if prev_legacy not in (None, "highest"):
        torch.set_float32_matmul_precision("highest")  # legacy "highest", cuda and mkldnn "ieee"
    else:
        m.fp32_precision = "ieee"

    def restore():
        if prev_legacy not in (None, "highest"):
            torch.set_float32_matmul_precision(prev_legacy)
            if prev_mk is not None:
                mk.fp32_precision = prev_mk
        m.fp32_precision = prev_cuda
    return restore


@contextlib.contextmanager
def ieee_fp32_matmul(device: torch.device):
    """Matmuls inside the block in the dtype they are given: autocast off for the device (an fp32
    reference inside ``torch.autocast`` ran its matmuls in bf16, unlike the kernels, which autocast
    never reaches) and, on CUDA, fp32 in full IEEE precision (no TF32) whatever the global setting
    (``torch.set_float32_matmul_precision``), restored when the last thread inside leaves."""
    dev_type = torch.device(device).type
    with autocast_off(dev_type):
        if dev_type != "cuda":
            yield
            return
        if compiling():  # traced as before: no lock in the graph
            restore = _cuda_fp32_ieee()
            try:
                yield
            finally:
                restore()
            return
        with _IEEE_LOCK:
            if _IEEE_STATE["depth"] == 0:
                _IEEE_STATE["restore"] = _cuda_fp32_ieee()
            _IEEE_STATE["depth"] += 1
        try:
            yield
        finally:
            with _IEEE_LOCK:
                _IEEE_STATE["depth"] -= 1
                if _IEEE_STATE["depth"] == 0:
                    restore, _IEEE_STATE["restore"] = _IEEE_STATE["restore"], None
                    restore()


class _ExactMatmulTraced(torch.autograd.Function):
    """``a @ b`` under ``ieee_fp32_matmul``: the base of ``_ExactMatmul`` and what dynamo traces of it. No jvp
    (forward-mode AD does not run under torch.compile) and a backward of plain matmuls under ``ieee_fp32_matmul``
    (a compiled graph's backward traced from plain forward matmuls took the autocast of the compiled call: bf16
    gradients, as in eager)."""

    @staticmethod
    def forward(a, b):
        with ieee_fp32_matmul(a.device):
            return torch.matmul(a, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        with ieee_fp32_matmul(g.device):
            ga = torch.matmul(g, b.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
            gb = torch.matmul(a.transpose(-1, -2), g) if ctx.needs_input_grad[1] else None
        return ga, gb


class _ExactMatmul(_ExactMatmulTraced):
    """``a @ b`` (same batch dims) under ``ieee_fp32_matmul`` in forward, backward and forward-mode alike.

    The autograd engine runs a backward under the autocast state of ``loss.backward()``'s caller, not the
    forward's: a backward called inside ``torch.autocast`` (as training loops write it) ran the reference's
    fp32 ``MmBackward`` in bf16, gradients ~1e-2 off, while the kernels stayed exact. The gradient products
    call this Function again, so double backward and ``torch.func`` (grad, jacrev, jvp, vmap) still work."""

    generate_vmap_rule = True

    @staticmethod
    def setup_context(ctx, inputs, output):  # (the forward is the base class's)
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = exact_matmul(g, b.transpose(-1, -2)) if ctx.needs_input_grad[0] else None
        gb = exact_matmul(a.transpose(-1, -2), g) if ctx.needs_input_grad[1] else None
        return ga, gb

    @staticmethod
    def jvp(ctx, ta, tb):
        a, b = ctx.saved_tensors
        out = None if ta is None else exact_matmul(ta, b)
        if tb is not None:
            out = exact_matmul(a, tb) if out is None else out + exact_matmul(a, tb)
        return out


def exact_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in the dtype given (``ieee_fp32_matmul``), its gradients too: ``[..., m, k] @ [..., k, n]``
    with the same leading dims (no broadcasting)."""
    if compiling():
        # dynamo cannot trace an autograd.Function with a custom jvp (a graph break; under fullgraph=True an
        # error: compile_repeated_blocks(fullgraph=True) of a model on the torch backend failed)
        return _ExactMatmulTraced.apply(a, b)
    return _ExactMatmul.apply(a, b)


@dataclass(frozen=True, eq=False)
class BlockSelection:
    """Which key blocks each query block attends to.

    Attributes:
        indices (Tensor): ``[B, H, Nq, max_sel]`` int32; the first ``counts`` entries of each row are
            unique key-block ids (highest score first for the torch gating, any order in general),
            the rest are -1.
        counts (Tensor): ``[B, H, Nq]`` int32, number of selected key blocks (may be 0).
        grid_q, grid_k (tuple): ``(T, H, W)`` token grids of queries and keys.
        chunk_q, chunk_k (tuple): ``(ct, ch, cw)`` block shapes.
    """

    indices: torch.Tensor
    counts: torch.Tensor
    grid_q: Triple
    grid_k: Triple
    chunk_q: Triple
    chunk_k: Triple

    def __post_init__(self):
        """Grids and chunks kept as tuples of 3 positive ints (a hand-built selection may pass lists,
        which compared unequal to the same tuple passed beside it, or floats, refused far below)."""
        if compiling():
            return
        for name in ("indices", "counts"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"selection.{name}: expected a torch.Tensor, got {type(getattr(self, name)).__name__}")
        for name in ("grid_q", "grid_k", "chunk_q", "chunk_k"):
            object.__setattr__(self, name, as_triple(getattr(self, name), f"selection.{name}"))

    @property
    def num_q_blocks(self) -> int:
        return total_blocks(self.grid_q, self.chunk_q)

    @property
    def num_k_blocks(self) -> int:
        return total_blocks(self.grid_k, self.chunk_k)

    @property
    def max_selected(self) -> int:
        return int(self.indices.shape[-1])

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device) -> "BlockSelection":
        device = torch.device(device)  # a dtype here would have made the int32 indices float / int64
        return BlockSelection(
            self.indices.to(device), self.counts.to(device), self.grid_q, self.grid_k, self.chunk_q, self.chunk_k
        )

    def _check_values(self) -> None:
        from .api import _check_selection_values  # noqa: PLC0415 (api imports this module)

        # shapes against the selection's own grids (block_sparse_attn checks them against q): a
        # hand-built one that did not fit gave a density over the wrong rows or a wrongly shaped mask
        if self.indices.dim() != 4:
            raise ValueError(f"selection.indices: expected a 4-D tensor [B, H, Nq, max_sel], got shape "
                             f"{tuple(self.indices.shape)}")
        if tuple(self.counts.shape) != tuple(self.indices.shape[:3]):
            raise ValueError(f"selection.counts: expected shape {tuple(self.indices.shape[:3])} (indices' first "
                             f"three dims), got {tuple(self.counts.shape)}")
        if self.counts.shape[2] != self.num_q_blocks:
            raise ValueError(f"selection.counts: expected [B, H, Nq] with Nq = {self.num_q_blocks} query blocks of "
                             f"grid_q={self.grid_q}, chunk_q={self.chunk_q}, got shape {tuple(self.counts.shape)}")
        _check_selection_values(self)

    def to_mask(self) -> torch.Tensor:
        """Dense block mask ``[B, H, Nq, Nk]`` bool (True = attend), for tests and debugging.
        Raises on contents the kernels refuse (an id ``Nk`` was dropped, ``counts > max_sel`` crashed)."""
        self._check_values()
        B, H, Nq, w = self.indices.shape
        valid = torch.arange(w, device=self.indices.device) < self.counts[..., None].long()
        mask = torch.zeros(B, H, Nq, self.num_k_blocks + 1, dtype=torch.bool, device=self.indices.device)
        idx = torch.where(valid, self.indices.long(), torch.full_like(self.indices, self.num_k_blocks, dtype=torch.long))
        mask.scatter_(-1, idx, True)
        return mask[..., :-1]

    def density(self) -> float:
        """Mean fraction of key blocks kept (raises on invalid counts: they gave a density > 1)."""
        self._check_values()
        return float(self.counts.double().mean() / self.num_k_blocks)


def pool_blocks(x: torch.Tensor, grid: Triple, chunk: Triple) -> torch.Tensor:
    """Mean of ``x [B, S, H, D]`` over the real tokens of every block -> ``[B, H, N, D]`` in x's dtype.

    Sums in fp32 over a zero-padded grid, divides by the real-token count in fp32, then rounds.
    """
    B, S, H, D = x.shape
    T, Hg, Wg = grid
    ct, ch, cw = chunk
    nt, nh, nw = num_blocks(grid, chunk)
    xg = x.reshape(B, T, Hg, Wg, H, D)
    pt, ph, pw = nt * ct - T, nh * ch - Hg, nw * cw - Wg
    if pt or ph or pw:
        xg = F.pad(xg, (0, 0, 0, 0, 0, pw, 0, ph, 0, pt))
    xg = xg.reshape(B, nt, ct, nh, ch, nw, cw, H, D)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = xg.sum(dim=(2, 4, 6), dtype=acc)  # [B, nt, nh, nw, H, D]
    n = block_sizes(grid, chunk, x.device).to(acc).view(1, nt, nh, nw, 1, 1)
    mean = (s / n).to(x.dtype)
    return mean.reshape(B, nt * nh * nw, H, D).transpose(1, 2).contiguous()


def block_scores(q_blk: torch.Tensor, k_blk: torch.Tensor) -> torch.Tensor:
    """Unscaled ``q_blk @ k_blk^T`` in fp32 (fp64 for fp64 inputs): ``[B, H, Nq, Nk]``."""
    acc = torch.float64 if q_blk.dtype == torch.float64 else torch.float32
    with ieee_fp32_matmul(q_blk.device):
        return torch.matmul(q_blk.to(acc), k_blk.to(acc).transpose(-1, -2))


def select_rows(
    score: torch.Tensor, head_dim: int, sparsity: Optional[float], cdf_threshold: Optional[float], max_sel: int
):
    """score ``[R, Nq, Nk]`` -> (indices ``[R, Nq, max_sel]`` int32, counts ``[R, Nq]`` int32)."""
    Nk = score.shape[-1]
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices
    counts = torch.zeros(score.shape[:-1], dtype=torch.long, device=score.device)
    if sparsity is not None:
        counts = counts + int((1.0 - sparsity) * Nk)
    if cdf_threshold is not None:
        p = torch.softmax(score / math.sqrt(head_dim), dim=-1)
        cdf = torch.cumsum(torch.gather(p, -1, order), dim=-1)
        # searchsorted(cdf, threshold, right=True) on a non-decreasing cdf
        if cdf_threshold >= 1.0:
            # the whole mass: every block, whatever the rounding of the cumulative sum (it can pass
            # 1.0 a few blocks before the end, and differently per backend)
            counts = torch.full_like(counts, Nk)
        else:
            counts = torch.maximum(counts, (cdf <= cdf_threshold).sum(dim=-1))
        # NaN/Inf in the row make p NaN and the count 0: select everything so the NaN reaches the output
        counts = torch.where(torch.isnan(p).any(dim=-1), torch.full_like(counts, Nk), counts)
    idx = order[..., :max_sel]
    keep = torch.arange(max_sel, device=score.device) < counts[..., None]
    idx = torch.where(keep, idx, torch.full_like(idx, -1))
    return idx.to(torch.int32), counts.to(torch.int32)


@torch.no_grad()
def select_blocks_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    grid_q: Triple,
    grid_k: Triple,
    chunk_q: Triple,
    chunk_k: Triple,
    sparsity: Optional[float],
    cdf_threshold: Optional[float],
) -> BlockSelection:
    """Torch gating; arguments already validated (see ``api.select_blocks``).

    ``max_sel`` is ``max(1, int((1 - sparsity) * Nk))`` for top-k alone and ``Nk`` when a cdf rule is
    involved (a static width, no device sync).
    """
    B, _, H, D = q.shape
    Nq, Nk = total_blocks(grid_q, chunk_q), total_blocks(grid_k, chunk_k)
    warn_if_keeps_nothing(sparsity, cdf_threshold, Nk, grid_k, chunk_k)
    if cdf_threshold is None:
        max_sel = max(1, int((1.0 - sparsity) * Nk))
    else:
        max_sel = Nk
    if B * H == 0:
        return empty_selection(B, H, grid_q, grid_k, chunk_q, chunk_k, max_sel, q.device)
    q_blk = pool_blocks(q, grid_q, chunk_q)
    k_blk = pool_blocks(k, grid_k, chunk_k)
    q_rows = q_blk.reshape(B * H, Nq, D)
    k_rows = k_blk.reshape(B * H, Nk, D)
    # bound the [rows, Nq, Nk] score/sort temporaries (~64M elements per slice)
    per_row = max(1, Nq * Nk)
    step = max(1, (1 << 26) // per_row)
    idx_parts, cnt_parts = [], []
    for r0 in range(0, B * H, step):
        s = block_scores(q_rows[r0 : r0 + step], k_rows[r0 : r0 + step])
        i, c = select_rows(s, D, sparsity, cdf_threshold, max_sel)
        idx_parts.append(i)
        cnt_parts.append(c)
    indices = torch.cat(idx_parts).reshape(B, H, Nq, max_sel)
    counts = torch.cat(cnt_parts).reshape(B, H, Nq)
    return BlockSelection(indices, counts, tuple(grid_q), tuple(grid_k), tuple(chunk_q), tuple(chunk_k))


def empty_selection(B: int, H: int, grid_q: Triple, grid_k: Triple, chunk_q: Triple, chunk_k: Triple,
                    max_sel: int, device) -> BlockSelection:
    """The selection of a batch or head count of 0: ``indices [B, H, Nq, max_sel]``, nothing selected."""
    Nq = total_blocks(grid_q, chunk_q)
    return BlockSelection(
        torch.full((B, H, Nq, max(1, max_sel)), -1, dtype=torch.int32, device=device),
        torch.zeros((B, H, Nq), dtype=torch.int32, device=device),
        tuple(grid_q), tuple(grid_k), tuple(chunk_q), tuple(chunk_k),
    )
