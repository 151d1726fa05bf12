"""3D RoPE (SPEC 5, generalised per SPEC 12) and the fused q/k RMSNorm + RoPE prologue.

Default (LongCat, and Wan 2.x, whose RoPE is the same): one head (D = 128) is
``[ t: 44 dims | h: 42 dims | w: 42 dims ]``; inside each part the angle ``pos * theta**(-2i/d)``
is repeated for the adjacent pair ``(2i, 2i+1)``, which rotates as
``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)`` (interleaved, GPT-J style). fp32 math.
Options: ``axis_dims`` (any even split), ``theta``, and ``pairs="half"`` (rotate-half applied per
axis part: lane j of a d-lane part pairs with lane j + d/2 of the same part).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from ...dispatch import choose, impl_fn
from ..._validate import (cache_mode, check_backend_name, check_dense, check_eps, check_same_device, check_tensor, compiling,
                          has_values, plain_float, plain_int)
from ...grid import Triple, as_triple
from . import reference as ref

__all__ = ["Rope3D", "apply_rope_3d", "qk_norm_rope"]


class Rope3D:
    """Per-axis fp32 cos/sin tables for a latent grid.

    Args:
        grid: ``(T, H, W)`` latent grid (tokens after patching) that positions refer to.
        head_dim: D, even, >= 6 (each of the t/h/w parts of the default split holds a pair).
        theta: base of the inverse frequencies (LongCat and Wan: 10000).
        device: where the tables live.
        axis_dims: ``(dt, dh, dw)``, even, summing to D; default ``D - 4*(D//6), 2*(D//6), 2*(D//6)``
            (LongCat's and Wan 2.x's split).
        pairs: ``"interleaved"`` (default; LongCat, Wan: lanes 2i, 2i+1) or ``"half"`` (rotate-half
            per axis part: lanes j, j + d/2 of each d-lane part). The Triton/CUDA kernels implement
            ``"interleaved"``; with ``"half"`` rotation runs in torch.

    Attributes:
        cos_t, sin_t: ``[T, dt]``; cos_h, sin_h: ``[H, dh]``; cos_w, sin_w: ``[W, dw]`` (fp32), each
            angle repeated for its pair (lanes 2i, 2i+1 of the table whatever ``pairs`` is).
    """

    def __init__(self, grid: Sequence[int], head_dim: int, theta: float = 10000.0, device=None, *,
                 axis_dims: Optional[Sequence[int]] = None, pairs: str = "interleaved"):
        self.grid: Triple = as_triple(grid, "grid")
        # numpy scalars (a head_dim or theta read from an array) as the Python numbers of their values
        head_dim, theta = plain_int(head_dim), plain_float(theta)
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim: expected an int, got {type(head_dim).__name__}")
        if head_dim < 6 or head_dim % 2:
            raise ValueError(f"head_dim: expected an even int >= 6, got {head_dim}")
        if isinstance(theta, bool) or not isinstance(theta, (int, float)):
            raise TypeError(f"theta: expected a positive float, got {type(theta).__name__} {theta!r}")
        # inf would make every frequency but the first 0 (no rotation), NaN every angle NaN
        if not 0 < theta < float("inf"):
            raise ValueError(f"theta: expected a finite positive float, got {theta!r}")
        # the tables are fp32: a theta past its maximum is inf there (no rotation, as theta=inf above)
        if theta > 3.4028234663852886e38:
            raise ValueError(f"theta: expected at most the fp32 maximum 3.4028e38 (the tables are fp32), got {theta!r}")
        if not isinstance(pairs, str):
            raise TypeError(f"pairs: expected 'interleaved' or 'half', got {type(pairs).__name__} {pairs!r}")
        if pairs not in ("interleaved", "half"):
            raise ValueError(f"pairs: expected 'interleaved' or 'half', got {pairs!r}")
        if axis_dims is None:
            dims = ref.rope_part_dims(head_dim)
        else:
            if isinstance(axis_dims, (str, bytes)) or not hasattr(axis_dims, "__iter__"):
                raise TypeError(f"axis_dims: expected a tuple of 3 even ints (dt, dh, dw), got "
                                f"{type(axis_dims).__name__} {axis_dims!r}")
            # numpy ints (an axis split read from an array) as Python ints, as head_dim takes them
            dims = tuple(plain_int(d) for d in axis_dims)
            if (len(dims) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 or d % 2 for d in dims)
                    or sum(dims) != head_dim):
                raise ValueError(f"axis_dims: expected 3 even non-negative ints summing to head_dim {head_dim}, "
                                 f"got {axis_dims!r}")
        self.head_dim = head_dim
        self.theta = float(theta)
        self.pairs = pairs
        self.dims = dims
        T, H, W = self.grid
        dt, dh, dw = self.dims
        self.cos_t, self.sin_t = ref.axis_tables(T, dt, self.theta, device)
        self.cos_h, self.sin_h = ref.axis_tables(H, dh, self.theta, device)
        self.cos_w, self.sin_w = ref.axis_tables(W, dw, self.theta, device)
        if self.theta < 1.0 and not compiling():
            # a tiny theta overflows the fp32 angles (1 / theta**(2i/d), times the position): NaN tables,
            # every rotated token NaN. Checked on the CPU (no device sync); theta >= 1 keeps angles <= position
            for n, d in zip(self.grid, dims):
                ang = ref.axis_angles(n, d, self.theta, "cpu")
                if not bool(torch.isfinite(ang).all()):
                    raise ValueError(
                        f"theta: expected a theta whose fp32 angles are finite on grid {self.grid} with axis_dims "
                        f"{tuple(dims)}, got {theta!r} (position * theta**(-2i/d) overflows fp32)")
        self._tables: Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def device(self) -> torch.device:
        return self.cos_t.device

    @property
    def frame_hw(self) -> Tuple[int, int]:
        return self.grid[1], self.grid[2]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    def to(self, device) -> "Rope3D":
        """A copy of the tables on ``device`` (self if already there)."""
        if torch.device(device) == self.device:
            return self
        return Rope3D(self.grid, self.head_dim, self.theta, device, axis_dims=self.dims, pairs=self.pairs)

    def tables(self, frame_offset: int = 0, num_frames: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Full-width token tables ``(cos, sin)``, each ``[num_frames*H*W, D]`` fp32.

        Args:
            frame_offset: first frame (grid position along t) covered.
            num_frames: frames covered; default: the rest of the grid.
        """
        T = self.grid[0]
        frame_offset, num_frames = plain_int(frame_offset), plain_int(num_frames)
        for name, val in (("frame_offset", frame_offset), ("num_frames", num_frames)):
            if (val is not None or name == "frame_offset") and (isinstance(val, bool) or not isinstance(val, int)):
                # a float offset failed in slicing ("slice indices must be integers") without naming it
                raise TypeError(f"{name}: expected an int, got {type(val).__name__} {val!r}")
        if num_frames is None:
            num_frames = T - frame_offset
        if frame_offset < 0 or num_frames < 0 or frame_offset + num_frames > T:
            raise ValueError(
                f"frame_offset/num_frames: expected 0 <= frame_offset and frame_offset + num_frames <= {T} "
                f"(rope grid {self.grid}), got frame_offset={frame_offset}, num_frames={num_frames}"
            )
        key = (frame_offset, num_frames)
        out = self._tables.get(key)
        if out is None:
            # kept tables are normal tensors whatever mode the first call ran in: made under
            # torch.inference_mode they would break every later call that autograd records
            with cache_mode():
                out = ref.full_tables(
                    self.cos_t, self.sin_t, self.cos_h, self.sin_h, self.cos_w, self.sin_w, frame_offset, num_frames
                )
            if not has_values(out[0]):  # traced with fake tensors (torch.export, FakeTensorMode): not kept,
                return out              # or every later eager call would get tables without values
            if compiling():
                # a dynamo trace: kept, the entry fails the graph's "key absent" guard on the next call
                # (every new frame offset compiled the caller twice); the graph computes them instead
                return out
            if len(self._tables) > 16:
                self._tables.clear()
            self._tables[key] = out
        return out

    def __repr__(self) -> str:
        return (f"Rope3D(grid={self.grid}, head_dim={self.head_dim}, theta={self.theta}, axis_dims={self.dims}, "
                f"pairs={self.pairs!r}, device={self.device})")


def check_rope_device(rope: Rope3D, x: torch.Tensor, name: str) -> None:
    """Tables without values (a Rope3D built under ``with torch.device("meta")``) cannot serve real
    tensors: copying them out failed with torch's "Cannot copy out of meta tensor; no data!"."""
    if rope.device.type == "meta" and x.device.type != "meta":
        raise ValueError(
            f"rope: expected tables that can be copied to {name}'s device {x.device}, got tables on the meta device "
            f"(built under torch.device('meta')?); use rope.to({name}.device) or build it with device="
        )


def _rope_frames(x: torch.Tensor, rope: Rope3D, frame_offset: int, name: str) -> int:
    """Frames held by ``x`` (validated against the rope grid)."""
    if not isinstance(rope, Rope3D):
        raise TypeError(f"rope: expected a Rope3D, got {type(rope).__name__}")
    check_rope_device(rope, x, name)
    S, D = x.shape[1], x.shape[3]
    if D != rope.head_dim:
        raise ValueError(f"{name}: expected head_dim {rope.head_dim} (rope.head_dim), got {D}")
    hw = rope.tokens_per_frame
    if S % hw:
        raise ValueError(
            f"{name}: expected seq to be a multiple of H*W = {hw} (rope grid {rope.grid}), got seq {S}"
        )
    nf = S // hw
    if isinstance(frame_offset, bool) or not isinstance(frame_offset, int):
        raise TypeError(f"frame_offset: expected an int, got {type(frame_offset).__name__}")
    if frame_offset < 0 or frame_offset + nf > rope.grid[0]:
        raise ValueError(
            f"frame_offset: expected 0 <= frame_offset <= {rope.grid[0] - nf} ({name} holds {nf} frames of the "
            f"{rope.grid[0]}-frame rope grid), got {frame_offset}"
        )
    return nf


def _tables_for(x: torch.Tensor, rope: Rope3D, frame_offset: int, nf: int):
    cos, sin = rope.tables(frame_offset, nf)
    if cos.device != x.device:
        cos, sin = cos.to(x.device), sin.to(x.device)
    return cos, sin


def apply_rope_3d(x: torch.Tensor, rope: Rope3D, frame_offset: int = 0) -> torch.Tensor:
    """Rotates ``x`` by 3D RoPE at its grid positions.

    Args:
        x (Tensor): ``[batch, seq, heads, head_dim]``, any float dtype, any strides; holds frames
            ``frame_offset .. frame_offset + seq/(H*W) - 1`` of ``rope.grid`` in (t, h, w) order.
        rope (Rope3D): tables for the grid.
        frame_offset (int): grid frame of x's first token.

    Returns:
        Tensor: same shape and dtype as x (contiguous); math in fp32.
    """
    if not compiling():
        check_tensor(x, "x")
    frame_offset = plain_int(frame_offset)  # a numpy int as the grid helpers take it
    nf = _rope_frames(x, rope, frame_offset, "x")
    if x.numel() == 0:  # batch, seq or heads 0: nothing to rotate (the tables of 0 frames are empty)
        return x.contiguous().clone()
    cos, sin = _tables_for(x, rope, frame_offset, nf)
    # contiguous as documented: pairs="half" concatenates, which keeps a channels_last-like x's layout
    return ref.apply_rope_reference(x, cos, sin, rope.pairs, rope.dims).contiguous()


def _check_weight(w, name: str, D: int, like: torch.Tensor) -> None:
    check_tensor(w, name, ndim=1, layout="[head_dim] or [heads*head_dim]")
    HD = like.shape[2] * D
    if w.shape[0] not in (D, HD):
        raise ValueError(
            f"{name}: expected shape ({D},) (per-head norm) or ({HD},) (heads*head_dim, norm over all heads), "
            f"got {tuple(w.shape)}"
        )


def _check_out(out, name: str, like: torch.Tensor, like_name: str) -> None:
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(out).__name__}")
    check_dense(out, name)
    if out.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)} (same as {like_name}), got {tuple(out.shape)}")
    if out.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (same as {like_name}), got {out.dtype}")
    if out.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (same as {like_name}), got {out.device}")
    if out.is_inference() and not torch.is_inference_mode_enabled():
        # torch refuses this write ("Inplace update to inference tensor outside InferenceMode", naming no
        # argument) on the torch path, the Triton kernel made it without a word
        raise ValueError(f"{name}: expected a tensor writable outside torch.inference_mode, got an inference "
                         "tensor; write it inside torch.inference_mode() or pass a normal tensor (or None)")
    if out.is_leaf and out.requires_grad and torch.is_grad_enabled():
        # torch's own error ("a leaf Variable that requires grad is being used in an in-place operation") named
        # no argument, and the Triton kernel wrote such a leaf (an nn.Parameter) without a word
        raise ValueError(f"{name}: expected a tensor that autograd lets us write (not a leaf that requires grad, "
                         "e.g. an nn.Parameter), got one; write it under torch.no_grad() or pass None")
    _check_no_internal_overlap(out, name)


def _check_no_internal_overlap(out: torch.Tensor, name: str) -> None:
    """``out`` has no two elements at one address (e.g. an ``expand``-ed view): the kernels would race
    on them (torch's ``copy_`` refuses it). Metadata only; ATen's rule (undecidable layouts pass)."""
    if torch._debug_has_internal_overlap(out) == 1:
        raise ValueError(f"{name}: expected a tensor whose elements do not overlap, got strides {out.stride()} "
                         f"for shape {tuple(out.shape)} (an expanded view?); pass a fresh tensor or None")


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:  # empty tensors may all report data_ptr 0
        return False
    if not (has_values(a) and has_values(b)):  # meta / fake tensors: every storage reports data_ptr 0
        return False
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return _same_storage(a, b) and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: its elements fill one contiguous range, in some dim order."""
    expect = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expect:
            return False
        expect *= size
    return True


def _byte_ranges_meet(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The byte ranges of dense ``a`` and ``b`` intersect (exact for dense tensors; torch._C._overlaps
    is True for any two views of one storage, so it refused disjoint halves of one buffer)."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_outs_disjoint(out_q: Optional[torch.Tensor], out_k: Optional[torch.Tensor]) -> None:
    """Raises when out_q and out_k share elements (the result would depend on the write order).

    Exact for dense tensors; interleaved views of one buffer (q and k slices of a packed qkv tensor)
    pass, as in ATen's own overlap check."""
    if out_q is None or out_k is None or not _same_storage(out_q, out_k):
        return
    dense = _dense(out_q) and _dense(out_k)
    if _same_view(out_q, out_k) or (dense and _byte_ranges_meet(out_q, out_k)):
        raise ValueError("out_q, out_k: expected disjoint output buffers, got overlapping views of one storage")


def _needs_temporary(out: Optional[torch.Tensor], own: torch.Tensor, others) -> bool:
    """True when ``out`` shares storage with an input other than as exactly ``own`` (in place): the
    kernel could then read elements it already overwrote, so the result goes through a temporary."""
    if out is None:
        return False
    if _same_storage(out, own) and not _same_view(out, own):
        return True
    return any(_same_storage(out, t) for t in others)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    rope: Optional[Rope3D] = None,
    frame_offset: int = 0,
    eps: float = 1e-6,
    *,
    out_q: Optional[torch.Tensor] = None,
    out_k: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm on q and k, then (optionally) 3D RoPE: the attention prologue.

    ``norm(x) = (x_fp32 * rsqrt(mean(x_fp32^2) + eps)).to(x.dtype) * weight.to(x.dtype)``, then
    ``apply_rope_3d(norm(x), rope, frame_offset)``. The weight's shape picks the norm: ``[head_dim]``
    normalises each head (LongCat); ``[heads*head_dim]`` normalises all heads of a token together
    (Wan's ``norm_q``/``norm_k`` over the inner dim; weight indexed ``h*head_dim + d``).

    Args:
        q (Tensor): ``[batch, seq, heads_q, head_dim]``, any strides.
        k (Tensor): ``[batch, seq, heads_k, head_dim]``, same batch, seq, dtype and device as q.
        q_weight, k_weight (Tensor): ``[head_dim]`` (per head) or ``[heads*head_dim]`` (all heads).
        rope (Rope3D | None): tables; q and k hold frames ``frame_offset ..`` of ``rope.grid``.
        frame_offset (int): grid frame of the first token.
        eps (float): RMSNorm epsilon.
        out_q, out_k (Tensor | None): preallocated outputs (e.g. the tail of a [cache; fresh] key
            buffer); written and returned when given.
        backend (str): ``"auto"``, ``"torch"`` or ``"triton"`` (``"cuda"`` raises
            ``BackendUnavailableError``: no csrc kernel for this op).

    Returns:
        (Tensor, Tensor): normalised (and rotated) q and k in the input dtype, new BSHD-contiguous
        tensors (``out_q`` / ``out_k`` when given).
    """
    if not compiling():
        check_backend_name(backend)
        check_tensor(q, "q")
        check_tensor(k, "k")
        check_tensor(q_weight, "q_weight", ndim=1, layout="[head_dim] or [heads*head_dim]")
        check_tensor(k_weight, "k_weight", ndim=1, layout="[head_dim] or [heads*head_dim]")
        check_same_device([("q", q), ("k", k), ("q_weight", q_weight), ("k_weight", k_weight)])
        if k.dtype != q.dtype:
            raise TypeError(f"k: expected dtype {q.dtype} (same as q), got {k.dtype}")
        if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1] or k.shape[3] != q.shape[3]:
            raise ValueError(
                f"k: expected batch, seq and head_dim {(q.shape[0], q.shape[1], q.shape[3])} (same as q), "
                f"got shape {tuple(k.shape)}"
            )
        D = q.shape[3]
        _check_weight(q_weight, "q_weight", D, q)
        _check_weight(k_weight, "k_weight", D, k)
        # one norm kind for both: the fused kernels take a single kind; with one head a weight is both
        q_all, k_all = q_weight.shape[0] != D, k_weight.shape[0] != D
        if q_all != k_all and q.shape[2] > 1 and k.shape[2] > 1:
            raise ValueError(
                f"k_weight: expected the same norm kind as q_weight ({'all heads, shape ' + str((k.shape[2] * D,)) if q_all else 'per head, shape ' + str((D,))}), "
                f"got shape {tuple(k_weight.shape)} with q_weight of shape {tuple(q_weight.shape)}"
            )
        _check_out(out_q, "out_q", q, "q")
        _check_out(out_k, "out_k", k, "k")
        _check_outs_disjoint(out_q, out_k)
        check_eps(eps, "norm")
        if D == 0:
            raise ValueError(f"q: expected head_dim >= 1, got 0 (shape {tuple(q.shape)})")
    nf = None
    frame_offset = plain_int(frame_offset)  # a numpy int as the grid helpers take it
    if rope is not None:
        nf = _rope_frames(q, rope, frame_offset, "q")
    elif not compiling() and (isinstance(frame_offset, bool) or not isinstance(frame_offset, int) or frame_offset != 0):
        # the offset positions tokens on the rope grid: without a rope it would be dropped silently
        raise ValueError(f"frame_offset: expected 0 without a rope (nothing is rotated), got {frame_offset!r}; "
                         "pass rope=Rope3D(...) to rotate frames from that offset")
    if q.numel() == 0 and k.numel() == 0:  # batch, seq or heads 0: nothing to compute (no 0-frame tables)
        return (q.contiguous().clone() if out_q is None else out_q), (k.contiguous().clone() if out_k is None else out_k)
    # all-heads norm: a [heads*head_dim] weight (not [head_dim]; one head is both kinds at once)
    all_heads = (q_weight.shape[0] != q.shape[3] or k_weight.shape[0] != k.shape[3]) and not (
        q.shape[2] == 1 and k.shape[2] == 1)
    # the weights count for requires_grad too (trained norm weights): the Triton prologue is forward only
    # and so do outputs that require grad (a view of a training KV buffer): the reference's copy_ into them
    # is recorded, the Triton kernel's write was not (their old values kept their gradient, silently)
    c = choose("qk_norm_rope", q, k, q_weight, k_weight, out_q, out_k, requested=backend, norm_all_heads=all_heads,
               rope_pairs=rope.pairs if rope is not None else "interleaved")
    # outputs over the inputs (other than in place): the Triton op computes into temporaries itself
    # (_qk_norm_rope_op, also for torch.ops callers and unfunctionalised graphs); the reference below
    # computes both results before it copies either into an output
    if c.impl != "torch_reference":
        return impl_fn("qk_norm_rope", c.impl)(q, k, q_weight, k_weight, rope, frame_offset, eps, out_q, out_k)
    tables = _tables_for(q, rope, frame_offset, nf) if rope is not None else None
    qo, ko = ref.qk_norm_rope_reference(
        q, k, q_weight, k_weight, tables, eps, rope.pairs if rope is not None else "interleaved",
        rope.dims if rope is not None else None)
    # BSHD-contiguous as from the Triton prologue (without a rope the norm kept a strided input's layout)
    qo, ko = qo.contiguous(), ko.contiguous()
    if out_q is not None:
        out_q.copy_(qo)
        qo = out_q
    if out_k is not None:
        out_k.copy_(ko)
        ko = out_k
    return qo, ko
