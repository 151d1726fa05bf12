"""The conditioning KV cache of video continuation (SPEC 4).

Cond tokens see only cond tokens, get timestep 0 and no cross-attention, so their self-attention
keys and values are the same at every denoising step and in both CFG branches. ``LongCatDiT.
build_kv_cache`` computes them once; this module holds them.

Storage: per block ``k [Bc, Sc, H, D]`` (after RMSNorm and 3D RoPE at frames ``0..c-1``: the cache
is stored rotated, never re-rotated) and ``v [Bc, Sc, H, D]``, ``Bc`` in {1, B} (1 = shared by the
CFG batch without copying). With ``offload=True`` they live in pinned CPU memory and each forward
streams them back block by block on a side CUDA stream, one block ahead of the compute (two device
buffers, so device memory holds two blocks of cache instead of all of them).
"""

from __future__ import annotations

import functools
import itertools
import threading
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

import torch


# A stamp no other tensor object ever gets, for the checks that tell a tensor from its replacement
# (``LongCatDiT.state_fingerprint``, ``memory.BlockStreamer``'s prefetch signature): ``id()`` is handed
# to the next object once one is freed, so a weight replaced twice in a row (``module.weight =
# nn.Parameter(...)``) could take the id the cache was built with, and the stale cache was used.
# id -> (weak reference, stamp); the entry goes when its tensor is freed.
_TENSOR_STAMPS: Dict[int, Tuple[weakref.ref, int]] = {}
_STAMP_COUNTER = itertools.count()
_STAMPS_LOCK = threading.Lock()


def _drop_stamp(key: int, ref: weakref.ref) -> None:
    entry = _TENSOR_STAMPS.get(key)
    if entry is not None and entry[0] is ref:
        del _TENSOR_STAMPS[key]


def tensor_stamp(t: torch.Tensor) -> int:
    """``t``'s stamp (see above): equal for the same tensor object, never for another."""
    key = id(t)
    entry = _TENSOR_STAMPS.get(key)
    if entry is None or entry[0]() is not t:
        # a new stamp under the lock: two threads stamping a tensor the first time at once (two requests'
        # first build_kv_cache on a fresh model) each gave it their own, one of them replaced in the table,
        # and that thread's cache was then refused as stale ("the weights changed")
        with _STAMPS_LOCK:
            entry = _TENSOR_STAMPS.get(key)
            if entry is None or entry[0]() is not t:
                entry = _TENSOR_STAMPS[key] = (weakref.ref(t, functools.partial(_drop_stamp, key)),
                                               next(_STAMP_COUNTER))
    return entry[1]


def tensor_version(t: torch.Tensor) -> int:
    """``t._version``, or -1 for an inference tensor (made under ``torch.inference_mode()``: torch keeps
    no version counter for it and ``_version`` raises; its in-place edits are not seen, as ``.data`` ones)."""
    return -1 if t.is_inference() else t._version

__all__ = ["KVCache", "StateToken"]


class StateToken:
    """One state of a model (``LongCatDiT._state_version``): ``stale`` turns True when it moves on.

    A traced forward reads ``owner`` (the model's uid) and ``stale``: two values that stay the same across
    LoRA toggles and new caches, so the graph's guards hold (the counter itself changed every toggle)."""

    __slots__ = ("owner", "stale", "serial", "__weakref__")

    def __init__(self, owner: int) -> None:
        self.owner = owner
        self.stale = False
        self.serial = next(_TOKEN_SERIALS)
        _LIVE_TOKENS[self.serial] = self

    # A copied or pickled cache keeps the model's token itself: a copy of the token was never marked
    # stale, so a deepcopied or unpickled cache was used silently by a traced forward after a LoRA
    # toggle / load_state_dict. A token this process no longer holds (its model moved on, or it was
    # pickled elsewhere) comes back stale.
    def __copy__(self) -> "StateToken":
        return self

    def __deepcopy__(self, memo) -> "StateToken":
        return self

    def __reduce__(self):
        return _restore_token, (self.owner, self.serial, self.stale)


_TOKEN_SERIALS = itertools.count()
_LIVE_TOKENS: "weakref.WeakValueDictionary[int, StateToken]" = weakref.WeakValueDictionary()


def _restore_token(owner: int, serial: int, stale: bool) -> StateToken:
    tok = _LIVE_TOKENS.get(serial)
    if tok is not None and tok.owner == owner:
        return tok
    tok = StateToken(owner)
    tok.stale = True
    return tok


# eq=False: compared (and hashed) by identity, as tensors and modules; the generated ``__eq__`` compared
# the tensor lists and raised "Boolean value of Tensor ... is ambiguous" for two distinct caches
@dataclass(eq=False)
class KVCache:
    """Per-block rotated K and V of the cond tokens.

    Attributes:
        keys, values: ``depth`` tensors ``[Bc, Sc, H, D]`` (``Sc = num_frames * H_tok * W_tok``),
            model dtype; on ``device``, or pinned CPU memory when ``offloaded``.
        num_frames: cond latent frames ``c``.
        grid_hw: ``(H_tok, W_tok)`` token grid per frame (after the 2x2 patch).
        dtype: dtype of the tensors (the model's weight dtype when built; ``torch.autocast``'s dtype when
            built under it, and then used under the same autocast).
        device: the compute device the cache is for (where the model runs).
        offloaded: tensors kept in (pinned) CPU memory and copied back per block.
        source: what the cache was built from (``LongCatDiT.state_fingerprint()``: the model
            instance, its state counter (LoRA APIs, ``load_state_dict``), the block-sparse
            settings, the identity/in-place version of every parameter and buffer (not their
            storage, which block streaming moves every step), the state of peft adapters and
            whether dropout is on); that model's ``forward`` refuses the cache once its
            fingerprint differs (a LoRA or peft adapter enabled, disabled, fused, unfused or
            re-weighted, weights loaded, replaced or edited in place, dropout switched on). Another
            model instance cannot compare its weights (shapes/dtype/device are still checked, and
            its block-sparse settings: another ``enable_bsa`` / ``bsa_params`` is refused). None: not
            checked (a hand-built cache).
        state: the building model's ``StateToken`` (set by ``build_kv_cache``): marked stale when that
            model's state counter moves, so a ``torch.compile``d forward guards on one boolean instead
            of on the counter's value (which recompiled after every LoRA toggle). None: not checked.
    """

    keys: List[torch.Tensor]
    values: List[torch.Tensor]
    num_frames: int
    grid_hw: Tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    offloaded: bool = False
    source: Optional[tuple] = None
    state: Optional["StateToken"] = None

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.values) or not self.keys:
            raise ValueError(
                f"KVCache: expected the same non-zero number of key and value tensors, got "
                f"{len(self.keys)} and {len(self.values)}"
            )
        self.device = torch.device(self.device)

    # ------------------------------------------------------------------ facts
    @property
    def depth(self) -> int:
        return len(self.keys)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    @property
    def num_tokens(self) -> int:
        return self.keys[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held by all K and V tensors."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (
            f"KVCache(depth={self.depth}, batch={self.batch}, frames={self.num_frames}, grid_hw={self.grid_hw}, "
            f"tokens={self.num_tokens}, dtype={self.dtype}, device={self.device}, offloaded={self.offloaded}, "
            f"{self.nbytes / 2**20:.1f} MiB)"
        )

    # ------------------------------------------------------------------ consumption
    def reader(self) -> Union["_DirectReader", "_PrefetchingReader"]:
        """Per-forward accessor: ``get(i) -> (k, v)`` on ``device``; ``release(i)`` after use."""
        if self.offloaded and self.device.type == "cuda":
            return _PrefetchingReader(self)
        return _DirectReader(self)


class _DirectReader:
    """Cache already on the compute device (or CPU-only runs): hands out the stored tensors."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache

    def get(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        return c.keys[i].to(c.device, non_blocking=True), c.values[i].to(c.device, non_blocking=True)

    def release(self, i: int) -> None:
        pass


class _PrefetchingReader:
    """Offloaded cache on a CUDA model: block ``i+1`` is copied on a side stream while block ``i``
    computes. Two device slots; a slot is overwritten only after the compute stream recorded that
    the block using it is done (``release``)."""

    def __init__(self, cache: KVCache) -> None:
        self.cache = cache
        dev = cache.device
        self.stream = torch.cuda.Stream(device=dev)
        k0, v0 = cache.keys[0], cache.values[0]
        self.slots = [
            (torch.empty(k0.shape, dtype=k0.dtype, device=dev), torch.empty(v0.shape, dtype=v0.dtype, device=dev))
            for _ in range(2)
        ]
        self.ready: List[Optional[torch.cuda.Event]] = [None] * cache.depth
        self.free: List[Optional[torch.cuda.Event]] = [None, None]
        # The fresh slots may reuse memory that queued compute-stream work still reads.
        self.stream.wait_stream(torch.cuda.current_stream(dev))
        self._issue(0)

    def _issue(self, i: int) -> None:
        if i >= self.cache.depth:
            return
        slot = i % 2
        with torch.cuda.stream(self.stream):
            if self.free[slot] is not None:
                self.stream.wait_event(self.free[slot])
            k, v = self.slots[slot]
            k.copy_(self.cache.keys[i], non_blocking=True)
            v.copy_(self.cache.values[i], non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.ready[i] = ev

    def get(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.ready[i] is None:
            self._issue(i)
        torch.cuda.current_stream(self.cache.device).wait_event(self.ready[i])
        # Start the next copy now; it waits for the slot's previous user (block i-1) on its own.
        if i + 1 < self.cache.depth and self.ready[i + 1] is None:
            self._issue(i + 1)
        return self.slots[i % 2]

    def release(self, i: int) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.cache.device))
        self.free[i % 2] = ev
