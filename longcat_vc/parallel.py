"""Context (sequence) parallelism for the LongCat DiT on the GPUs of one host (torch.distributed).

    torchrun --nproc-per-node 4 -m longcat_vc.cli continue in.mp4 --prompt ... --checkpoint DIR \\
        --out out.mp4 --context-parallel 4 [--cfg-parallel]

    # Python: every rank runs the same program; the DiT's outputs are identical on all ranks.
    dist.init_process_group("nccl")                      # gloo on CPU
    pipe = VideoContinuationPipeline.from_pretrained(ckpt, device=f"cuda:{local_rank}",
                                                     process_group=dist.group.WORLD)
    # or, for the model alone: dit.enable_context_parallel(group, cfg_parallel=False)

Scheme (Ulysses). ``P`` ranks of a sequence-parallel (SP) group each hold a shard of the video
tokens with all heads. Everything in a block except self-attention is per token (adaLN modulation
per latent frame, LayerNorms, cross-attention to the replicated text, FFN), so it runs on the
shard. Around self-attention two ``all_to_all_single`` calls swap the layout: after the first,
each rank holds q/k/v of the *whole* sequence for ``heads / P`` heads; RMSNorm and 3D RoPE are
applied there (global positions, the fused prologue unchanged), then the unchanged
``longcat_kernels`` attention (dense, cond/noisy prefix rule, KV cache, block-sparse: all are per
head and see whole grids); the second all-to-all returns the output to token shards.

Sharding (frame-striped, padded): rank ``r`` holds token slots ``[r*m, (r+1)*m)`` of *every*
latent frame, ``m = ceil(H*W / P)`` (``H, W`` the token grid per frame). So the per-frame adaLN
modulation, the cond-frame prefix (cond frames first) and a generation of fewer frames than ranks
all work on a shard as on the whole. When ``H*W`` is not divisible by ``P`` the last rank(s) hold
zero-padded slots; padded tokens never enter attention (they are dropped by the first
all-to-all's unpacking and get a zero output) and are dropped from the result.

KV cache: built sharded by heads (each rank keeps the rotated K and V of its ``heads / P`` heads
for the whole cond sequence: cache memory per rank is divided by ``P``); a ``ShardedKVCache``
records the layout. A full (unsharded) ``KVCache`` is accepted too (its heads are sliced; a direct
``forward`` checks that every rank passed the same one, one read of the cache per call).

CFG parallel (``cfg_parallel=True``, the group must be the whole world, even size): the ranks
split into two SP groups of ``P/2`` (ranks ``[0, P/2)`` and ``[P/2, P)``); with an even batch
(CFG ``[uncond; cond]``) each group runs half of the batch. With an odd batch both groups run the
whole batch (same result, no speed-up from the CFG split). Heads must divide by the SP size.

The result of ``forward`` is gathered on every rank (``[B, 16, T, H, W]`` fp32), so a pipeline runs
unchanged on every rank. Inference only: no autograd through the collectives (the forward runs
under ``torch.no_grad``).

Every rank must make the same calls with the same inputs. ``forward``, ``build_kv_cache`` and the
pipeline check it before their first collective (``ContextParallel.same_call``: one small all-gather
of the shapes and value checksums, and of ``LongCatDiT.rank_state()``: dtype, block-sparse settings, fp8
linears, LoRA state): an argument error on one rank, or inputs or a LoRA state that differ, raise on every rank instead of
leaving the others waiting in a collective or mixing the ranks' inputs (or models). The weights' values are
not compared: ranks must load the same checkpoint. The
pipeline and the refinement check their whole call once and then run their cache build and denoising
loop inside ``ContextParallel.checked_region()``, where ``forward`` and ``build_kv_cache`` skip their
own exchange (their inputs derive from the checked, broadcast ones: one all-gather per call, not one
per step); a direct call of the model outside such a region is checked as before.

How it runs: ``LongCatDiT.forward`` and ``build_kv_cache`` are the only forwards. With a
``ContextParallel`` enabled they call its hooks: ``local_cache`` (this rank's heads of the cache),
``split_batch`` (CFG half), ``shard_tokens`` after the patch embedding (the token shard, and a
block plan whose ``AttnPlan.parallel`` makes ``Attention`` do the two all-to-alls around its own
prologue and kernels), ``gather_tokens`` after the final layer, ``shard_cache`` on a built cache.
Nothing here runs a model layer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Optional, Tuple

import torch

from .kv_cache import KVCache

__all__ = [
    "ContextParallel",
    "ShardedKVCache",
    "check_context_parallel",
    "DistributedRun",
    "init_distributed",
    "set_multigpu_env_defaults",
]

# NVLink multicast / NVLS stays off on the lent multi-GPU hosts (and is harmless elsewhere).
_ENV_DEFAULTS = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def set_multigpu_env_defaults() -> None:
    """``os.environ.setdefault`` of NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
    NVSHMEM_DISABLE_NVLS=1 (call before the process group is created)."""
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)


def _dist():
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("context parallelism needs torch.distributed, which this torch build lacks")
    return dist


# --------------------------------------------------------------------------------------------
# the sharded KV cache


@dataclass(eq=False)
class ShardedKVCache(KVCache):
    """A ``KVCache`` holding heads ``[head_start, head_start + heads_local)`` of every block
    (``keys[i], values[i]`` are ``[Bc, Sc, heads_local, D]``), built by a context-parallel DiT.

    Attributes (besides ``KVCache``'s):
        num_heads: heads of the model (all ranks together).
        head_start: first head held here.
        sp_size, sp_rank: the sequence-parallel group size and this rank's place in it.
        cond_checksum: ``checksum`` of the cond latents it was built from, the same on every rank
            (a direct ``forward`` compares it: the ranks' own heads differ, their cond latents must not).
    """

    num_heads: int = 0
    head_start: int = 0
    sp_size: int = 1
    sp_rank: int = 0
    cond_checksum: Tuple[float, float] = (0.0, 0.0)

    @property
    def heads_local(self) -> int:
        return self.keys[0].shape[2]


def _cache_view(cache: KVCache, heads: slice, batch: Optional[slice] = None) -> KVCache:
    """A ``KVCache`` of views of ``cache`` (heads and, optionally, batch sliced); no copy."""
    b = slice(None) if batch is None else batch

    def cut(t: torch.Tensor) -> torch.Tensor:
        return t[b, :, heads]

    return KVCache(keys=[cut(k) for k in cache.keys], values=[cut(v) for v in cache.values],
                   num_frames=cache.num_frames, grid_hw=tuple(cache.grid_hw), dtype=cache.dtype,
                   device=cache.device, offloaded=cache.offloaded, source=cache.source, state=cache.state)


# --------------------------------------------------------------------------------------------
# the per-forward attention hook (AttnPlan.parallel)


class _ShardedAttention:
    """``AttnPlan.parallel`` of a token-sharded forward (one per forward, made by
    ``ContextParallel.shard_tokens``).

    ``Attention`` calls ``tokens_to_heads`` on its qkv projection and ``heads_to_tokens`` on the
    attention output; in between it runs its own prologue and kernels with ``plan``, the plan of
    the whole sequence (grid, positions, prefix rule, cache reader), on heads/P heads.

    Attributes:
        plan: the ``AttnPlan`` of the whole (unsharded) grid.
        T, hw, m: frames, real tokens per frame, token slots per frame on each rank.
    """

    def __init__(self, cp: "ContextParallel", plan, T: int, hw: int, m: int) -> None:
        self.cp = cp
        self.plan = plan
        self.T, self.hw, self.m = T, hw, m

    def tokens_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, T*m, X, H, D]`` (local tokens, all heads) -> ``[B, T*hw, X, H/P, D]`` (all real
        tokens, local heads): the first all-to-all."""
        cp, T, hw, m = self.cp, self.T, self.hw, self.m
        P = cp.sp_size
        B, _, X, H, D = t.shape
        Hl = H // P
        # [P(dst head group), B, T, m, X, Hl, D]
        send = t.view(B, T, m, X, P, Hl, D).permute(4, 0, 1, 2, 3, 5, 6).contiguous()
        recv = torch.empty_like(send)
        cp._all_to_all(recv, send)
        # recv[r]: the token slots of rank r, our heads.
        if P * m == hw:
            return recv.permute(1, 2, 0, 3, 4, 5, 6).reshape(B, T * hw, X, Hl, D)
        out = recv.new_empty((B, T, hw, X, Hl, D))
        for r in range(P):
            lo, n = r * m, cp.valid_slots(r, hw, m)
            if n > 0:
                out[:, :, lo:lo + n] = recv[r, :, :, :n]
        return out.view(B, T * hw, X, Hl, D)

    def heads_to_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """``[B, T*hw, H/P, D]`` -> ``[B, T*m, H*D]`` (local token slots, all heads; zeros on
        padded slots): the second all-to-all."""
        cp, T, hw, m = self.cp, self.T, self.hw, self.m
        P = cp.sp_size
        B, _, Hl, D = o.shape
        if P * m == hw:
            send = o.reshape(B, T, P, m, Hl, D).permute(2, 0, 1, 3, 4, 5).contiguous()
        else:
            send = o.new_zeros((P, B, T, m, Hl, D))
            ov = o.reshape(B, T, hw, Hl, D)
            for r in range(P):
                lo, n = r * m, cp.valid_slots(r, hw, m)
                if n > 0:
                    send[r, :, :, :n] = ov[:, :, lo:lo + n]
        recv = torch.empty_like(send)
        cp._all_to_all(recv, send)
        # recv[g]: our token slots, heads of group g -> head index g*Hl + h.
        return recv.permute(1, 2, 3, 0, 4, 5).reshape(B, T * m, P * Hl * D)


# --------------------------------------------------------------------------------------------
# every rank makes the same call


# Elements per chunk of ``checksum``'s weighted sum (its fp64 weights: 2 MiB on CPU, where a larger
# fresh buffer is page-faulted in on every call, 6x slower at 2**22; 32 MiB on an accelerator).
_CHECKSUM_CHUNK = {"cpu": 2**18}
_CHECKSUM_CHUNK_DEFAULT = 2**22
# Weight of flat element i: frac((i + 1) * golden ratio), never periodic, never 0, distinct per i.
_GOLDEN = 0.6180339887498949


def checksum(*tensors: torch.Tensor) -> Tuple[float, float]:
    """A cheap fingerprint of the values of ``tensors`` (one or more, each batch first): equal
    inputs give bitwise equal numbers on every rank of one device type (NaN included).

    Returns ``(rows, positions)``: ``rows`` is the fp64 sum of each batch row weighted by the row
    number (swapped rows differ), summed over the tensors; ``positions`` the fp64 sum of every
    element weighted by ``frac((i + 1) * golden ratio)`` of its flat index ``i``, counted on across
    the tensors, so two values swapped inside a row (a flipped frame, permuted tokens) or a
    ``+d``/``-d`` pair that leaves the sums unchanged change it too, save for measure-zero cases.
    Two reads of each tensor on its own device, the second in chunks of ``_CHECKSUM_CHUNK``
    elements (the fp64 weights of one chunk are the only extra memory; a non-contiguous tensor is
    first copied contiguous in its dtype); one copy to the host per device. The chunking does not
    change the result's meaning, only its bits: compare values made on one device type.
    """
    sums = {}  # device -> fp64 [rows, positions] there: one copy to the host per device at the end
    start = 0
    for t in tensors:
        n = t.numel()
        if n == 0:
            continue
        acc = sums.setdefault(t.device, torch.zeros(2, dtype=torch.float64, device=t.device))
        flat = t.reshape(-1)  # one contiguous copy at most, read by both sums
        rows = flat.view(t.shape[0], -1).sum(dim=1, dtype=torch.float64)
        acc[0] += (rows * torch.arange(1, t.shape[0] + 1, device=t.device, dtype=torch.float64)).sum()
        chunk = _CHECKSUM_CHUNK.get(t.device.type, _CHECKSUM_CHUNK_DEFAULT)
        for lo in range(0, n, chunk):
            hi = min(n, lo + chunk)
            w = torch.arange(start + lo + 1, start + hi + 1, device=t.device, dtype=torch.float64)
            # in place: the chunk is read in its own dtype, only the weights take fp64 memory
            acc[1] += w.mul_(_GOLDEN).frac_().mul_(flat[lo:hi]).sum()
        start += n
    total = torch.zeros(2, dtype=torch.float64)
    for acc in sums.values():
        total += acc.cpu()
    a, b = total.tolist()
    return a, b


class _SameCall:
    """``with cp.same_call(what, names, device) as call: ...; call.record(values)``: on leaving
    the block every rank of the group learns whether any rank raised inside it or recorded other
    ``values`` (one tiny all-gather), and then every rank raises: a rank that raised re-raises its
    own error, the others a ``RuntimeError`` naming the failed ranks; different values give a
    ``ValueError`` naming each differing field per rank. Without it the failing (or odd) rank
    left, or sent tensors of another size, and the others waited in the next collective until the
    process group's timeout (or gloo aborted the process)."""

    def __init__(self, cp: "ContextParallel", what: str, names: Tuple[str, ...], device) -> None:
        self.cp, self.what, self.names, self.device = cp, what, names, device
        self.values: Optional[Tuple[float, ...]] = None

    def __enter__(self) -> "_SameCall":
        return self

    def record(self, *values) -> None:
        if len(values) != len(self.names):  # pragma: no cover - a programming error
            raise AssertionError(f"{self.what}: {len(values)} values for {len(self.names)} names")
        self.values = tuple(float(v) for v in values)

    def __exit__(self, exc_type, exc, tb) -> bool:
        failed = exc_type is not None or self.values is None
        mine = [1.0] + [0.0] * len(self.names) if failed else [0.0] + list(self.values)
        dev = torch.device(self.device) if self.device is not None else torch.device("cpu")
        if _dist().get_backend(self.cp.group) == "nccl" and dev.type != "cuda":
            dev = torch.device("cuda", torch.cuda.current_device())
        buf = torch.tensor(mine, dtype=torch.float64, device=dev)
        parts = [torch.empty_like(buf) for _ in range(self.cp.world_size)]
        _dist().all_gather(parts, buf, group=self.cp.group)
        got = torch.stack(parts).cpu()  # one copy to the host (one sync), read two ways:
        rows = got.view(torch.int64).tolist()  # bitwise: NaN == NaN, -0.0 != 0.0 (same inputs, same bits)
        vals = got.tolist()
        bad = [r for r, v in enumerate(vals) if v[0] != 0.0]
        if exc_type is not None:
            return False  # this rank's own error propagates
        if self.values is None:  # pragma: no cover - a programming error
            raise AssertionError(f"{self.what}: nothing recorded")
        if bad:
            raise RuntimeError(
                f"context parallel: rank(s) {bad} of the group raised in {self.what} (see their error); this rank "
                "stops too instead of waiting for them in a collective"
            )
        diff = [i for i in range(len(self.names)) if len({row[i + 1] for row in rows}) > 1]
        if diff:
            def show(x: float) -> str:
                return str(int(x)) if x == x and abs(x) < 2**53 and x == int(x) else repr(x)

            what = "; ".join(f"{self.names[i]}: " + ", ".join(f"rank {r}: {show(v[i + 1])}" for r, v in enumerate(vals))
                             for i in diff)
            raise ValueError(
                f"context parallel: the ranks called {self.what} with different arguments ({what}); every rank "
                "of the group must pass the same inputs (broadcast them from one rank)"
            )
        return False


# --------------------------------------------------------------------------------------------
# the model-level handler


def _check_cfg_parallel(value) -> None:
    """TypeError unless ``value`` is a bool: a truthy stand-in (``"no"``, ``1``) would split the ranks."""
    if not isinstance(value, bool):
        raise TypeError(f"cfg_parallel: expected a bool (True or False), got {type(value).__name__} {value!r}")


@dataclass(frozen=True)
class _Layout:
    """What ``check_context_parallel`` found: the group, this rank's place, the CFG/SP split."""

    group: Any
    world_size: int
    rank: int
    cfg_size: int
    cfg_rank: int
    sp_size: int
    sp_rank: int
    num_heads: int


def check_context_parallel(group=None, *, num_heads: int, cfg_parallel: bool = False) -> _Layout:
    """The preconditions of ``ContextParallel(group, num_heads=..., cfg_parallel=...)`` that need
    only the process group and the DiT config (its ``num_heads``), no weights and no collective:
    ``VideoContinuationPipeline.from_pretrained`` calls it before it loads anything (a refusal came
    after every rank had loaded the whole DiT), ``ContextParallel`` on construction.

    Raises:
        TypeError: cfg_parallel is not a bool.
        RuntimeError: torch.distributed is not initialised.
        ValueError: this process is not in ``group``; heads not divisible by the SP size;
            cfg_parallel with an odd world or a group other than the whole world.
    """
    _check_cfg_parallel(cfg_parallel)
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError(
            "context parallel: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first (torchrun sets the environment)"
        )
    group = group if group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("context parallel: this process is not a member of the given process group")
    if cfg_parallel:
        if world_size % 2:
            raise ValueError(
                f"context parallel: cfg_parallel needs an even number of ranks, got {world_size}"
            )
        if world_size != dist.get_world_size():
            raise ValueError(
                "context parallel: cfg_parallel builds its two sub-groups from the whole world; pass "
                f"group=None (the default group), got a group of {world_size} of "
                f"{dist.get_world_size()} ranks"
            )
        half = world_size // 2
        cfg_size, cfg_rank, sp_size, sp_rank = 2, rank // half, half, rank % half
    else:
        cfg_size, cfg_rank, sp_size, sp_rank = 1, 0, world_size, rank
    num_heads = int(num_heads)
    if num_heads % sp_size:
        extra = f" (world size {world_size} halved by cfg_parallel)" if cfg_parallel else ""
        raise ValueError(
            f"context parallel: num_heads={num_heads} must be divisible by the sequence-parallel "
            f"size {sp_size}{extra}; use a number of ranks that divides the heads"
            + ("" if cfg_parallel else " (or cfg_parallel=True to halve it)")
        )
    return _Layout(group=group, world_size=world_size, rank=rank, cfg_size=cfg_size, cfg_rank=cfg_rank,
                   sp_size=sp_size, sp_rank=sp_rank, num_heads=num_heads)


class ContextParallel:
    """Context-parallel settings of one ``LongCatDiT`` (``dit.enable_context_parallel``).

    Args:
        group: the ``torch.distributed`` process group spanning the ranks that run this model
            together (None: the default group). Every rank of it must call the model with the same
            arguments in the same order.
        num_heads (int): attention heads of the model; must divide by the SP size.
        cfg_parallel (bool): split the ranks into two CFG groups (see the module docstring).
        device: the model's device (collective buffers live there; NCCL needs CUDA tensors).

    Raises:
        TypeError: cfg_parallel is not a bool.
        RuntimeError: torch.distributed is not initialised.
        ValueError: heads not divisible by the SP size; cfg_parallel with an odd world or a
            group other than the whole world.
    """

    def __init__(self, group=None, *, num_heads: int, cfg_parallel: bool = False, device=None) -> None:
        layout = check_context_parallel(group, num_heads=num_heads, cfg_parallel=cfg_parallel)
        dist = _dist()
        self.group = layout.group
        self.world_size, self.rank = layout.world_size, layout.rank
        self.group_ranks = dist.get_process_group_ranks(self.group)
        self.cfg_parallel = bool(cfg_parallel)
        self.device = torch.device(device) if device is not None else None
        self.cfg_size, self.cfg_rank = layout.cfg_size, layout.cfg_rank
        self.sp_size, self.sp_rank = layout.sp_size, layout.sp_rank
        self.num_heads = layout.num_heads
        if self.cfg_parallel:
            # new_group is collective over the world: every rank creates both halves.
            half = self.sp_size
            halves = [dist.new_group(list(range(0, half))), dist.new_group(list(range(half, 2 * half)))]
            self.sp_group = halves[self.cfg_rank]
        else:
            self.sp_group = self.group
        # per thread: a pipeline's region on one thread leaves a direct call on another checked
        self._region = threading.local()

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        return (f"ContextParallel(world={self.world_size}, rank={self.rank}, sp={self.sp_size}, "
                f"cfg={self.cfg_size}, heads={self.num_heads})")

    # geometry --------------------------------------------------------------------------------
    def head_range(self, num_heads: int) -> Tuple[int, int]:
        """Heads ``[h0, h1)`` this rank attends (and caches)."""
        hl = num_heads // self.sp_size
        return self.sp_rank * hl, (self.sp_rank + 1) * hl

    def slots_per_frame(self, hw: int) -> int:
        """``m = ceil(hw / P)`` token slots per frame on every rank."""
        return -(-hw // self.sp_size)

    @staticmethod
    def valid_slots(r: int, hw: int, m: int) -> int:
        """Real tokens among rank ``r``'s ``m`` slots of a frame of ``hw`` tokens."""
        return max(0, min(m, hw - r * m))

    # collectives -----------------------------------------------------------------------------
    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor) -> None:
        _dist().all_to_all_single(out, inp, group=self.sp_group)

    def broadcast(self, *tensors: torch.Tensor):
        """Every rank gets rank 0's copy of ``tensors`` (in place); returns them (a tuple when
        more than one). Used by the pipeline so all ranks denoise the same latents."""
        dist = _dist()
        src = self.group_ranks[0]
        out = []
        for t in tensors:
            buf = t.contiguous()
            dist.broadcast(buf, src=src, group=self.group)
            if buf is not t:
                t.copy_(buf)
            out.append(t)
        return out[0] if len(out) == 1 else tuple(out)

    def same_call(self, what: str, names: Tuple[str, ...], device=None) -> _SameCall:
        """A context manager checking, collectively, that no rank raised inside it and that every
        rank recorded the same values (``_SameCall``); ``what`` names the call in the errors."""
        return _SameCall(self, what, tuple(names), device if device is not None else self.device)

    @contextlib.contextmanager
    def checked_region(self) -> Iterator["ContextParallel"]:
        """``with cp.checked_region(): ...``: a caller that already checked its whole call
        (``same_call``) and hands every rank the same (broadcast) inputs runs the model's calls
        inside it; ``forward`` and ``build_kv_cache`` then skip their own ``same_call`` (one
        all-gather and a few host syncs each). On this thread only; the previous state comes back on
        leaving, an exception included. Inside, a rank that raises before the model's first
        collective (only a resource error can: the inputs are the same) leaves the others waiting
        in it until the process group's timeout, as an error inside the blocks always did."""
        before = self.in_checked_region()
        self._region.active = True
        try:
            yield self
        finally:
            self._region.active = before

    def in_checked_region(self) -> bool:
        """Whether this thread runs inside ``checked_region()`` (the model's calls skip their check)."""
        return getattr(self._region, "active", False)

    # hooks of LongCatDiT.forward and build_kv_cache ------------------------------------------
    def batch_slice(self, B: int) -> Optional[slice]:
        """The part of a batch of ``B`` this rank's CFG group runs: its half with cfg_parallel and
        an even ``B``, else None (the whole batch)."""
        if self.cfg_size == 2 and B % 2 == 0:
            b = B // 2
            return slice(self.cfg_rank * b, (self.cfg_rank + 1) * b)
        return None

    def split_batch(self, B: int, *tensors: Optional[torch.Tensor]):
        """``tensors`` (batch first, ``B`` rows; None passes through) cut to ``batch_slice(B)``."""
        batch = self.batch_slice(B)
        if batch is None:
            return tensors
        return tuple(None if t is None else t[batch] for t in tensors)

    def local_cache(self, model, cache: KVCache, B: int, Nh: int, Nw: int) -> KVCache:
        """The part of ``cache`` this rank reads (its heads; its CFG half of a per-sample cache),
        after checking it against ``model``, a batch of ``B`` and an ``Nh x Nw`` token grid.
        A ``ShardedKVCache`` must be sharded as this rank is; a full ``KVCache`` is sliced."""
        cfg = model.config
        if isinstance(cache, ShardedKVCache):
            problems = []
            if cache.num_heads != cfg.num_heads:
                problems.append(f"built for {cache.num_heads} heads, model has {cfg.num_heads}")
            if (cache.sp_size, cache.sp_rank) != (self.sp_size, self.sp_rank):
                problems.append(
                    f"sharded for sequence-parallel rank {cache.sp_rank} of {cache.sp_size}, this rank is "
                    f"{self.sp_rank} of {self.sp_size} (build the cache with the same context-parallel model)"
                )
            model._check_cache(cache, B, Nh, Nw, heads=cfg.num_heads // self.sp_size, problems=problems)
            heads = slice(None)
        else:
            model._check_cache(cache, B, Nh, Nw)
            h0, h1 = self.head_range(cfg.num_heads)
            heads = slice(h0, h1)
        batch = self.batch_slice(B)
        if batch is not None and cache.batch == B and B > 1:
            return _cache_view(cache, heads, batch)
        if heads == slice(None):
            return cache
        return _cache_view(cache, heads)

    def shard_tokens(self, x: torch.Tensor, plan):
        """``[B, T*hw, C]`` tokens of ``plan.grid = (T, Nh, Nw)`` -> this rank's ``[B, T*m, C]``
        (zero-padded slots) and the plan the blocks see on them: ``T`` frames of ``m`` slots, the
        cond prefix of the shard, and the attention hook that holds ``plan``."""
        T, Nh, Nw = plan.grid
        hw = Nh * Nw
        m = self.slots_per_frame(hw)
        B, _, C = x.shape
        lo, n = self.sp_rank * m, self.valid_slots(self.sp_rank, hw, m)
        xv = x.view(B, T, hw, C)
        if n == m:
            x = xv[:, :, lo:lo + m].reshape(B, T * m, C)
        else:
            x = x.new_zeros((B, T, m, C))
            if n > 0:
                x[:, :, :n] = xv[:, :, lo:lo + n]
            x = x.view(B, T * m, C)
        if self.sp_size == 1:
            return x, plan  # a single-rank SP group holds the whole sequence
        cond_frames = plan.prefix_tokens // hw
        hook = _ShardedAttention(self, plan, T, hw, m)
        return x, dataclasses.replace(plan, grid=(T, 1, m), prefix_tokens=cond_frames * m, cache=None, parallel=hook)

    def gather_tokens(self, out: torch.Tensor, B: int, grid: Tuple[int, int, int]) -> torch.Tensor:
        """Every rank's ``[b, T*m, X]`` (``b``: its CFG group's part of ``B``) -> ``[B, T*hw, X]``
        on every rank, ``grid = (T, Nh, Nw)``."""
        dist = _dist()
        T, Nh, Nw = grid
        hw = Nh * Nw
        m = self.slots_per_frame(hw)
        batch_split = self.batch_slice(B) is not None
        b, _, X = out.shape
        out = out.contiguous()
        parts = [torch.empty_like(out) for _ in range(self.world_size)]
        dist.all_gather(parts, out, group=self.group)
        full = out.new_empty((B, T, hw, X))
        P = self.sp_size
        for i, part in enumerate(parts):
            half, r = divmod(i, P)
            if not batch_split and half:
                continue  # the other CFG group computed the same batch
            n = self.valid_slots(r, hw, m)
            if n == 0:
                continue
            bs = slice(half * b, (half + 1) * b) if batch_split else slice(None)
            full[bs, :, r * m:r * m + n] = part.view(b, T, m, X)[:, :, :n]
        return full.view(B, T * hw, X)

    def shard_cache(self, cache: KVCache, cond_checksum: Tuple[float, float]) -> "ShardedKVCache":
        """``cache`` built on this rank (its heads of every block) labelled with the layout and the
        ``checksum`` of the cond latents it was built from."""
        h0, _ = self.head_range(self.num_heads)
        fields = {f.name: getattr(cache, f.name) for f in dataclasses.fields(KVCache) if f.init}
        return ShardedKVCache(**fields, num_heads=self.num_heads, head_start=h0, sp_size=self.sp_size,
                              sp_rank=self.sp_rank, cond_checksum=tuple(cond_checksum))


# --------------------------------------------------------------------------------------------
# launching (CLI and scripts under torchrun)


@dataclass
class DistributedRun:
    """What ``init_distributed`` set up: the group, this process's place and device."""

    group: Any
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    owns_process_group: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (e.g. a random seed)."""
        dist = _dist()
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def close(self) -> None:
        """Destroys the process group if ``init_distributed`` created it."""
        dist = _dist()
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False


def _env_int(name: str, default: int) -> int:
    """A torchrun variable as an int (``default`` when unset), or a ValueError naming it."""
    raw = os.environ.get(name, "")
    if raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an int (torchrun sets it), got {raw!r}") from None


def init_distributed(world_size: int, device=None, *, timeout_s: Optional[float] = None) -> DistributedRun:
    """Initialise torch.distributed from the torchrun environment for ``world_size`` ranks.

    NCCL on CUDA (device ``cuda:LOCAL_RANK`` unless an index is given), gloo on CPU. Sets the
    NVLS/multicast environment defaults first (``set_multigpu_env_defaults``).

    Raises:
        ValueError: the process group already initialised (else the environment's ``WORLD_SIZE``)
            does not have ``world_size`` ranks.
    """
    set_multigpu_env_defaults()
    dist = _dist()
    if dist.is_initialized():
        # the group that will run (the environment may be unset or stale when the caller made it)
        have, where = dist.get_world_size(), "the initialised process group has {} ranks"
    else:
        have, where = _env_int("WORLD_SIZE", 1), "this run has WORLD_SIZE={}"
    if have != world_size:
        raise ValueError(
            f"--context-parallel {world_size} needs {world_size} processes, {where.format(have)}: "
            f"launch with torchrun --nproc-per-node {world_size} -m longcat_vc.cli ..."
        )
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(
                f"rank {os.environ.get('RANK', '?')} wants {device}, but only {torch.cuda.device_count()} CUDA devices are visible"
            )
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    owns = False
    if not dist.is_initialized():
        kw = {}
        if timeout_s is not None:
            kw["timeout"] = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, **kw)
        owns = True
    return DistributedRun(group=dist.group.WORLD, rank=dist.get_rank(), world_size=dist.get_world_size(),
                          local_rank=local_rank, device=device, backend=backend, owns_process_group=owns)
