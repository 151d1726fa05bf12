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
records the layout. A full (unsharded) ``KVCache`` is accepted too (its heads are sliced).

CFG parallel (``cfg_parallel=True``, the group must be the whole world, even size): the ranks
split into two SP groups of ``P/2`` (ranks ``[0, P/2)`` and ``[P/2, P)``); with an even batch
(CFG ``[uncond; cond]``) each group runs half of the batch. With an odd batch both groups run the
whole batch (same result, no speed-up from the CFG split). Heads must divide by the SP size.

The result of ``forward`` is gathered on every rank (``[B, 16, T, H, W]`` fp32), so a pipeline runs
unchanged on every rank. Inference only: no autograd through the collectives (the forward runs
under ``torch.no_grad``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Tuple

import torch

from .kv_cache import KVCache

__all__ = [
    "ContextParallel",
    "ShardedKVCache",
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


@dataclass
class ShardedKVCache(KVCache):
    """A ``KVCache`` holding heads ``[head_start, head_start + heads_local)`` of every block
    (``keys[i], values[i]`` are ``[Bc, Sc, heads_local, D]``), built by a context-parallel DiT.

    Attributes (besides ``KVCache``'s):
        num_heads: heads of the model (all ranks together).
        head_start: first head held here.
        sp_size, sp_rank: the sequence-parallel group size and this rank's place in it.
    """

    num_heads: int = 0
    head_start: int = 0
    sp_size: int = 1
    sp_rank: int = 0

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
                   device=cache.device, offloaded=cache.offloaded, source=cache.source)


# --------------------------------------------------------------------------------------------
# the per-forward attention hook


class _ShardedAttention:
    """Called by ``Attention`` when ``AttnPlan.parallel`` is set (one per forward).

    Holds the global plan (whole grid, positions, cache reader) and the shard geometry:
    ``T`` frames, ``hw`` real tokens per frame, ``m`` token slots per frame per rank.
    """

    def __init__(self, cp: "ContextParallel", plan, T: int, hw: int, m: int) -> None:
        self.cp = cp
        self.plan = plan
        self.T, self.hw, self.m = T, hw, m

    # tokens <-> heads -------------------------------------------------------------------
    def _tokens_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """``[B, T*m, X, H, D]`` (local tokens, all heads) -> ``[B, T*hw, X, H/P, D]`` (all real
        tokens, local heads)."""
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

    def _heads_to_tokens(self, o: torch.Tensor) -> torch.Tensor:
        """``[B, T*hw, H/P, D]`` -> ``[B, T*m, H*D]`` (local token slots, all heads; zeros on
        padded slots)."""
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

    # hooks called by Attention -----------------------------------------------------------
    def qkv_heads(self, attn, x: torch.Tensor, plan) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, T*m, C]`` (shard) -> q, k (normalised, rotated at global positions), v, each
        ``[B, T*hw, H/P, D]`` over the whole sequence."""
        import longcat_kernels as lk

        B, N, _ = x.shape
        qkv = attn.qkv(x).view(B, N, 3, attn.num_heads, attn.head_dim)
        q, k, v = self._tokens_to_heads(qkv).unbind(2)
        g = self.plan
        # RMSNorm weights are shared by the heads: nothing to slice for the local heads.
        q, k = lk.qk_norm_rope(
            q, k, attn.q_norm.weight, attn.k_norm.weight, rope=g.rope, frame_offset=g.frame_offset,
            eps=attn.q_norm.eps, backend=g.prologue_backend,
        )
        return q, k, v

    def self_attention(self, attn, x: torch.Tensor, plan, layer: int) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_heads(attn, x, plan)
        if plan.record is not None:
            plan.record(layer, k, v)
        out = attn._attend(q, k, v, self.plan, layer)
        return attn.proj(self._heads_to_tokens(out).view(B, N, C))


# --------------------------------------------------------------------------------------------
# the model-level handler


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
        RuntimeError: torch.distributed is not initialised.
        ValueError: heads not divisible by the SP size; cfg_parallel with an odd world or a
            group other than the whole world.
    """

    def __init__(self, group=None, *, num_heads: int, cfg_parallel: bool = False, device=None) -> None:
        dist = _dist()
        if not dist.is_initialized():
            raise RuntimeError(
                "context parallel: torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun sets the environment)"
            )
        self.group = group if group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("context parallel: this process is not a member of the given process group")
        self.group_ranks = dist.get_process_group_ranks(self.group)
        self.cfg_parallel = bool(cfg_parallel)
        self.device = torch.device(device) if device is not None else None
        if self.cfg_parallel:
            if self.world_size % 2:
                raise ValueError(
                    f"context parallel: cfg_parallel needs an even number of ranks, got {self.world_size}"
                )
            if self.world_size != dist.get_world_size():
                raise ValueError(
                    "context parallel: cfg_parallel builds its two sub-groups from the whole world; pass "
                    f"group=None (the default group), got a group of {self.world_size} of "
                    f"{dist.get_world_size()} ranks"
                )
            half = self.world_size // 2
            self.cfg_size = 2
            self.cfg_rank = self.rank // half
            self.sp_size = half
            self.sp_rank = self.rank % half
        else:
            self.cfg_size, self.cfg_rank = 1, 0
            self.sp_size, self.sp_rank = self.world_size, self.rank
        self.num_heads = int(num_heads)
        if self.num_heads % self.sp_size:
            extra = f" (world size {self.world_size} halved by cfg_parallel)" if self.cfg_parallel else ""
            raise ValueError(
                f"context parallel: num_heads={self.num_heads} must be divisible by the sequence-parallel "
                f"size {self.sp_size}{extra}; use a number of ranks that divides the heads"
                + ("" if self.cfg_parallel else " (or cfg_parallel=True to halve it)")
            )
        if self.cfg_parallel:
            # new_group is collective over the world: every rank creates both halves.
            half = self.sp_size
            halves = [dist.new_group(list(range(0, half))), dist.new_group(list(range(half, 2 * half)))]
            self.sp_group = halves[self.cfg_rank]
        else:
            self.sp_group = self.group

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

    # sharding --------------------------------------------------------------------------------
    def _shard_tokens(self, x: torch.Tensor, T: int, hw: int, m: int) -> torch.Tensor:
        """``[B, T*hw, C]`` -> this rank's ``[B, T*m, C]`` (zero-padded slots)."""
        B, _, C = x.shape
        lo, n = self.sp_rank * m, self.valid_slots(self.sp_rank, hw, m)
        xv = x.view(B, T, hw, C)
        if n == m:
            return xv[:, :, lo:lo + m].reshape(B, T * m, C)
        out = x.new_zeros((B, T, m, C))
        if n > 0:
            out[:, :, :n] = xv[:, :, lo:lo + n]
        return out.view(B, T * m, C)

    def _gather_tokens(self, out: torch.Tensor, B: int, T: int, hw: int, m: int, batch_split: bool) -> torch.Tensor:
        """Local ``[b, T*m, X]`` of every rank -> ``[B, T*hw, X]`` on every rank."""
        dist = _dist()
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

    def _local_cache(self, model, cache: KVCache, B: int, Nh: int, Nw: int, batch: Optional[slice]) -> KVCache:
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
        if batch is not None and cache.batch == B and B > 1:
            return _cache_view(cache, heads, batch)
        if heads == slice(None):
            return cache
        return _cache_view(cache, heads)

    # the model's entry points ------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, model, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None, *,
                num_cond_latents: int = 0, kv_cache: Optional[KVCache] = None) -> torch.Tensor:
        """``LongCatDiT.forward`` across the ranks (same arguments, same result on every rank)."""
        cfg = model.config
        B, T, H, W = model._check_latents(hidden_states, "hidden_states")[:4]
        _, ph, pw = cfg.patch_size
        Nh, Nw = H // ph, W // pw
        num_cond_latents = model._check_num_cond(num_cond_latents, kv_cache, T)

        # CFG split: with an even batch each CFG group runs its half.
        batch_split = self.cfg_size == 2 and B % 2 == 0
        b = B // 2 if batch_split else B
        bsl = slice(self.cfg_rank * b, (self.cfg_rank + 1) * b) if batch_split else None

        # Text and timestep embeddings on the whole batch (validation messages name B), then cut.
        t = model._embed_timestep(timestep, B, T)
        y, y_mask = model._embed_text(encoder_hidden_states, encoder_attention_mask, B)
        xs = hidden_states
        if bsl is not None:
            t, y, xs = t[bsl], y[bsl], xs[bsl]
            y_mask = None if y_mask is None else y_mask[bsl]
        cache_local = None
        if kv_cache is not None:
            cache_local = self._local_cache(model, kv_cache, B, Nh, Nw, bsl)

        hw = Nh * Nw
        m = self.slots_per_frame(hw)
        x = self._shard_tokens(model.x_embedder(xs.to(model.dtype)), T, hw, m)

        plan = model._step_plan((T, Nh, Nw), x.device, num_cond_latents, cache_local)
        c_local = 0 if kv_cache is not None else num_cond_latents
        local = self._local_plan(plan, T, hw, m, c_local)
        for i, block in enumerate(model.blocks):
            x = block(x, t, y, y_mask, local, i)
        out = model.final_layer(x, t, T)  # [b, T*m, P*out] fp32
        out = self._gather_tokens(out, B, T, hw, m, batch_split)
        return model.unpatchify(out, T, Nh, Nw).float()

    def _local_plan(self, plan, T: int, hw: int, m: int, c_local: int):
        """The plan the blocks see on a shard: ``T`` frames of ``m`` slots, the cond prefix of the
        shard, and the hook that runs self-attention on the whole sequence."""
        if self.sp_size == 1:
            return plan  # a single-rank SP group holds the whole sequence
        hook = _ShardedAttention(self, plan, T, hw, m)
        return dataclasses.replace(plan, grid=(T, 1, m), prefix_tokens=c_local * m, cache=None, parallel=hook)

    @torch.no_grad()
    def build_kv_cache(self, model, cond_latents: torch.Tensor, *, offload: bool = False) -> ShardedKVCache:
        """``LongCatDiT.build_kv_cache`` across the SP group: each rank keeps its heads."""
        cfg = model.config
        Bc, c, H, W = model._check_latents(cond_latents, "cond_latents")[:4]
        _, ph, pw = cfg.patch_size
        Nh, Nw = H // ph, W // pw
        hw = Nh * Nw
        m = self.slots_per_frame(hw)
        x = self._shard_tokens(model.x_embedder(cond_latents.to(model.dtype)), c, hw, m)
        t = model._embed_timestep(torch.zeros(Bc, c, device=model.device), Bc, c)
        keys, values = model._record_kv(
            x, t, (c, Nh, Nw), offload, shard_plan=lambda plan: self._local_plan(plan, c, hw, m, 0)
        )
        h0, _ = self.head_range(cfg.num_heads)
        return ShardedKVCache(
            keys=keys, values=values, num_frames=c, grid_hw=(Nh, Nw), dtype=model.dtype, device=model.device,
            offloaded=offload, source=model.state_fingerprint(), num_heads=cfg.num_heads, head_start=h0, sp_size=self.sp_size, sp_rank=self.sp_rank,
        )


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


def init_distributed(world_size: int, device=None, *, timeout_s: Optional[float] = None) -> DistributedRun:
    """Initialise torch.distributed from the torchrun environment for ``world_size`` ranks.

    NCCL on CUDA (device ``cuda:LOCAL_RANK`` unless an index is given), gloo on CPU. Sets the
    NVLS/multicast environment defaults first (``set_multigpu_env_defaults``).

    Raises:
        ValueError: the environment (``WORLD_SIZE``) does not match ``world_size``.
    """
    set_multigpu_env_defaults()
    dist = _dist()
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world != world_size:
        raise ValueError(
            f"--context-parallel {world_size} needs {world_size} processes, this run has WORLD_SIZE={env_world}: "
            f"launch with torchrun --nproc-per-node {world_size} -m longcat_vc.cli ..."
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
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
