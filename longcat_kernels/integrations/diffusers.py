"""Block-sparse 3D attention in diffusers' Wan 2.1 / 2.2 transformer (``WanTransformer3DModel``).

::

    transformer.forward(hidden_states [B, C, F, H, W], ...)
      └─ pre-forward hook (ours): grid = (F / p_t, H / p_h, W / p_w)  -> shared state
      └─ rope(hidden_states) -> (cos, sin)   forward hook (ours): the grid tagged onto cos
      └─ blocks[i].attn1 (self-attention)  processor swapped for BlockSparseWanAttnProcessor:
             q/k/v projections; norm_q/norm_k over all heads + Wan RoPE, either as diffusers does
             or (fused_prologue, default on CUDA) in one lk.qk_norm_rope launch
             attention: lk.block_sparse_attn(q, k, v, grid_q=grid, ...)   (dense op at sparsity 0)
      └─ blocks[i].attn2 (text cross-attention, I2V image branch): untouched

Attention processors are not given the video grid, hence the hooks: the tables carry the grid of the
forward that made them (read by eager and compiled blocks alike, also when activation checkpointing
recomputes a block in backward after forwards at other grids).
``remove_block_sparse_attention`` puts the original processor objects back (on the blocks still running
ours) and removes the hooks.
diffusers is only needed by the caller (this module imports nothing from it).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .._validate import check_backend_name, check_bool, check_sparsity, needs_grad
from ..dispatch import choose_dense_grad
from ..grid import as_triple
from ..ops.block_sparse_attn.api import block_sparse_attn
from ..ops.kv_cache_attn.api import BlockSparseParams, flash_attn_with_kvcache
from ..ops.rope.api import Rope3D, apply_rope_3d, qk_norm_rope

__all__ = ["apply_block_sparse_attention", "remove_block_sparse_attention", "BlockSparseWanAttnProcessor"]

_ATTR = "_longcat_block_sparse"
# diffusers' self-attention processors that compute what BlockSparseWanAttnProcessor does (Wan 2.x, VACE,
# ChronoEdit and Wan-Animate use WanAttnProcessor, SkyReels-V2 a copy of it): q/k/v, norm_q/norm_k over all
# heads, Wan's (cos, sin) RoPE on a [B, C, F, H, W] input's (F, H, W) token grid
_WAN_SELF_ATTN = ("WanAttnProcessor", "SkyReelsV2AttnProcessor")
# attribute of the RoPE cos table holding the grid of the forward that made it (a Python attribute of the tensor:
# torch.compile reads and guards on it, a weak map it cannot trace)
_GRID_TAG = "_longcat_grid"


@dataclass
class _GridState:
    """Post-patch latent grid ``(T, H, W)`` of the current forward, written by the pre-forward hook."""

    grid: Optional[Tuple[int, int, int]] = None
    _rope: Optional[Rope3D] = None
    # does the model's own rotary_emb equal Rope3D's tables on this forward? (None: not checked yet;
    # reset by the hook: a model with another RoPE, e.g. ChronoEdit's temporal skip or another theta,
    # must not get Rope3D's angles from the fused prologue)
    rope_ok: Optional[bool] = None
    # set by the hook, cleared by the first new RoPE tables of that forward: new tables with no hook call before
    # them are a forward that skipped the hook (``transformer.forward(...)``) and would take the last grid
    _fresh: bool = field(default=False, repr=False)
    # the grid of each forward, keyed by its RoPE tables (new tensors per forward): blocks recomputed by
    # activation checkpointing run in backward, possibly after forwards at other grids
    _grids: Any = field(default_factory=WeakIdKeyDictionary, repr=False)

    def __getstate__(self):  # torch.save / deepcopy of the model: the per-forward map stays behind
        return {**self.__dict__, "_grids": None}

    def __setstate__(self, state):
        self.__dict__.update(state, _grids=WeakIdKeyDictionary())

    def grid_of(self, rotary_emb) -> Optional[Tuple[int, int, int]]:
        """The grid of the forward that made ``rotary_emb``: the current one the first time its tables
        are seen, the recorded one when a block of an earlier forward is recomputed."""
        if rotary_emb is None:
            return self.grid
        key = rotary_emb[0] if isinstance(rotary_emb, (tuple, list)) else rotary_emb
        # tagged by the hook on the model's rope module: exact, and traced by torch.compile (guarded: a block
        # recomputed in backward after a forward at another grid runs the graph of its own grid); read before
        # self.grid, which a compiled block would guard on as well (twice the recompiles)
        grid = getattr(key, _GRID_TAG, None)
        if grid is not None:
            return grid
        # torch.compile of the whole model (tables made inside the graph, untagged) or a model without a rope
        # module: dynamo cannot trace the weak map; the grid is the current forward's, guarded on by dynamo
        if self.grid is None or torch.compiler.is_compiling():
            return self.grid
        grid = self._grids.get(key)
        if grid is None:
            # a reentrant checkpoint recomputes in backward with detached (new) tables: not a new forward
            if not self._fresh and torch._C._current_graph_task_id() == -1:
                raise RuntimeError(
                    "BlockSparseWanAttnProcessor: RoPE tables of a forward the pre-forward hook did not see (the "
                    f"transformer called as .forward(...)?); its grid is unknown (the last call's was {self.grid}). "
                    "Call the transformer module itself: transformer(hidden_states, ...)"
                )
            self._fresh = False
            grid = self._grids[key] = self.grid
        return grid

    def rope_matches(self, rotary_emb, head_dim: int, device) -> bool:
        """Once per forward: rotate a probe with the model's tables and with Rope3D's, compare. False while
        torch.compile traces a forward whose tables were not compared yet (the comparison is a data-dependent
        branch, a graph break under fullgraph): diffusers' norm and RoPE ops run then."""
        if self.rope_ok is None and torch.compiler.is_compiling():
            return False
        if self.rope_ok is None:
            cos = rotary_emb[0]
            probe = torch.ones(1, cos.shape[1], 1, head_dim, dtype=torch.float32, device=device)
            theirs = _wan_rope(probe, *rotary_emb)
            ours = apply_rope_3d(probe, self.rope(head_dim, device))
            self.rope_ok = tuple(theirs.shape) == tuple(ours.shape) and bool(
                torch.allclose(theirs, ours, rtol=0, atol=1e-4))
        return self.rope_ok

    def rope(self, head_dim: int, device) -> Rope3D:
        """Rope3D of the current grid (Wan's convention is the default one), cached per grid."""
        r = self._rope
        if r is None or r.grid != self.grid or r.head_dim != head_dim or r.device != torch.device(device):
            r = self._rope = Rope3D(self.grid, head_dim, device=device)
        return r


@dataclass
class _Installed:
    state: _GridState
    hook: Any
    originals: Dict[int, Any] = field(default_factory=dict)  # block index -> original attn1 processor
    end_hook: Any = None  # the forward hook that clears _GridState._fresh
    rope_hook: Any = None  # the forward hook on transformer.rope that tags the tables with their grid


def _wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's RoPE as diffusers applies it: interleaved pairs (x0, x1) over the whole head, tables
    ``[1, S, 1, D]`` with each angle repeated for its pair; computed in the tables' dtype (fp64 /
    fp32), cast back to x's dtype."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.type_as(x)


def _via_original(name: str) -> property:
    """``name`` read from and written to the original processor. diffusers' ``set_attention_backend`` /
    ``enable_parallelism`` write ``_attention_backend`` / ``_parallel_config`` onto each processor that has
    the attribute: the original serves the calls passed on and is put back by ``remove_block_sparse_attention``,
    so the setting must land there (a restored processor without the model's ``_parallel_config`` attends
    over its rank's shard of the sequence only). No such attribute on the original: none here either."""

    def get(self):
        return getattr(self.original, name)

    def set(self, value):
        setattr(self.original, name, value)

    return property(get, set, doc=f"The original processor's ``{name}``.")


class BlockSparseWanAttnProcessor:
    """Self-attention processor of a ``WanAttention``: diffusers' projections, norms and RoPE, then
    LongCat block-sparse attention over the video grid of the current forward.

    Args:
        state (_GridState): filled by the transformer's pre-forward hook.
        params (BlockSparseParams): sparsity / cdf_threshold / chunk_q / chunk_k (``frame_hw`` and
            ``selection`` must be None: the grid changes with the input).
        original: the processor it replaces; calls it cannot serve (cross-attention, an attention
            mask) go there unchanged.
        backend (str): longcat-kernels backend of the attention (and of the fused prologue when "torch" or
            "triton"; with "cuda" the prologue, which has no csrc kernel, runs on "auto").
        dense_at_zero (bool): at sparsity 0 (no cdf rule) run the dense attention op instead of the
            block-sparse kernel (same result, the faster kernel); PyTorch SDPA where gradients are
            needed (the dense op is forward only) on ``"auto"`` and ``"torch"``; ``"triton"`` runs the
            block-sparse kernel there (sparsity 0 keeps every block; it has a Triton backward) and ``"cuda"``
            raises ``BackendUnavailableError`` (``dispatch.choose_dense_grad``).
        fused_prologue (bool | None): norm_q/norm_k (RMSNorm over all heads) and Wan's RoPE in one
            ``qk_norm_rope`` call (fp32 statistics and angles; diffusers applies RoPE with fp64
            tables) instead of diffusers' separate ops; None: on CUDA inputs only. Used only where
            the norms are ``torch.nn.RMSNorm`` over heads*head_dim on the inputs' device without hooks
            (offloading hooks bring weights in when the module runs) and grad is disabled (inference),
            else diffusers' path runs.
    """

    _attention_backend = _via_original("_attention_backend")
    _parallel_config = _via_original("_parallel_config")

    def __init__(self, state: _GridState, params: BlockSparseParams, original: Any, backend: str = "auto",
                 dense_at_zero: bool = True, fused_prologue: Optional[bool] = None):
        self.state = state
        self.params = params
        self.original = original
        self.backend = backend
        self.dense_at_zero = dense_at_zero
        self.fused_prologue = fused_prologue

    def _dense(self) -> bool:
        p = self.params
        return self.dense_at_zero and p.cdf_threshold is None and p.sparsity is not None and float(p.sparsity) == 0.0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 **kwargs):
        if (encoder_hidden_states is not None or attention_mask is not None or kwargs
                or getattr(attn, "add_k_proj", None) is not None):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb, **kwargs)
        grid = self.state.grid_of(rotary_emb)
        if grid is None:
            raise RuntimeError(
                "BlockSparseWanAttnProcessor: no video grid; call the transformer itself (its pre-forward "
                "hook records the grid), not the attention module alone"
            )
        S = hidden_states.shape[1]
        if grid[0] * grid[1] * grid[2] != S:
            n = grid[0] * grid[1] * grid[2]
            # a whole fraction of the grid: most likely diffusers' context parallelism sharding the sequence
            hint = (f" (1/{n // S} of the grid: a sequence sharded by context parallelism? block-sparse attention "
                    f"needs the whole sequence on each rank)" if 0 < S < n and n % S == 0 else "")
            raise ValueError(f"hidden_states: expected {n} tokens (grid {grid}), got {S}{hint}")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        fused = hidden_states.is_cuda if self.fused_prologue is None else self.fused_prologue
        # the fused prologue is forward only: training (grad enabled) keeps diffusers' ops
        if (fused and rotary_emb is not None and not torch.is_grad_enabled() and _all_heads_rms(attn, query.shape[-1], query.device)
                and self.state.rope_matches(rotary_emb, query.shape[-1] // attn.heads, query.device)):
            query = query.unflatten(2, (attn.heads, -1))
            key = key.unflatten(2, (attn.heads, -1))
            eps = attn.norm_q.eps if attn.norm_q.eps is not None else torch.finfo(query.dtype).eps
            rope = self.state.rope(query.shape[-1], query.device)
            # [H*D] weights select the all-heads RMSNorm; Wan's RoPE is Rope3D's default convention
            # the prologue has no csrc kernel: "cuda" (attention) leaves it to auto, as longcat_vc's prologue_backend
            query, key = qk_norm_rope(query, key, attn.norm_q.weight, attn.norm_k.weight, rope, eps=eps,
                                      backend=self.backend if self.backend in ("torch", "triton") else "auto")
        else:
            # Wan's qk-norm is one RMSNorm over all heads together (inner dim), before the head split
            query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
            key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
            if rotary_emb is not None:
                query = _wan_rope(query, *rotary_emb)
                key = _wan_rope(key, *rotary_emb)
        value = value.unflatten(2, (attn.heads, -1))
        grad = needs_grad(query, key, value)
        # training on an explicit "triton": the block-sparse kernel at sparsity 0 (every block kept: the dense
        # attention) has a Triton backward, where the dense op is forward only
        if self._dense() and not (grad and self.backend == "triton"):
            if grad:
                # training: the dense op is forward only; SDPA is the same attention with a backward
                # (an explicit "cuda" raises there instead of being replaced)
                choose_dense_grad(query, key, value, self.backend)
                out = torch.nn.functional.scaled_dot_product_attention(
                    query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)
            else:
                out = flash_attn_with_kvcache(query, key, value, backend=self.backend)
        else:
            p = self.params
            cq, ck = _fit_chunk(p.chunk_q, grid), _fit_chunk(p.chunk_q if p.chunk_k is None else p.chunk_k, grid)
            out = block_sparse_attn(
                query, key, value, grid_q=grid, chunk_q=cq, chunk_k=ck, sparsity=p.sparsity,
                cdf_threshold=p.cdf_threshold, backend=self.backend,
            )
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def _fit_chunk(chunk, grid: Tuple[int, int, int]) -> Tuple[int, int, int]:
    """``chunk`` capped at the grid on each axis. The grid changes with every forward (1 latent frame
    for an image, a smaller resolution) while the chunk is fixed at apply time; a chunk longer than
    an axis tiles it with one partial block, which is the block of the axis' own length (same blocks,
    same selection), and that is what block_sparse_attn (which rejects the longer chunk) is given."""
    return tuple(min(c, g) for c, g in zip(as_triple(chunk, "chunk"), grid))  # a VideoGrid chunk too


def _all_heads_rms(attn, inner: int, device) -> bool:
    """norm_q / norm_k are torch RMSNorms with a weight over all heads (Wan's qk_norm default), on ``device``
    and not hooked: offloading (accelerate's ``cpu_offload``, diffusers' group offloading) keeps the weight
    elsewhere (meta, CPU) and brings it in only when the module itself runs, which the fused prologue skips."""
    nq, nk = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
    return all(
        isinstance(n, torch.nn.RMSNorm) and n.weight is not None and n.weight.shape == (inner,)
        and n.eps == nq.eps and n.weight.device == device
        and not (n._forward_pre_hooks or n._forward_hooks or "forward" in vars(n))
        for n in (nq, nk)
    )


def _check_transformer(transformer) -> Tuple[int, int, int]:
    """Wan-shaped: a 3D ``config.patch_size``, ``blocks`` whose ``attn1`` takes processors; returns the patch."""
    cfg = getattr(transformer, "config", None)
    blocks = getattr(transformer, "blocks", None)
    want = "a diffusers WanTransformer3DModel (with .config.patch_size and .blocks[i].attn1)"
    if (cfg is None or blocks is None or not hasattr(cfg, "patch_size") or not isinstance(transformer, torch.nn.Module)
            or not hasattr(blocks, "__len__")):
        raise TypeError(f"transformer: expected {want}, got {type(transformer).__name__}")
    ps = cfg.patch_size
    try:
        patch = as_triple(tuple(ps) if isinstance(ps, list) else ps, "transformer.config.patch_size")
    except (TypeError, ValueError):
        raise TypeError(f"transformer: expected {want}; its config.patch_size is {ps!r}, not (p_t, p_h, p_w)") from None
    # checked before anything is changed: a failure halfway would leave a hook nobody can remove
    for i, block in enumerate(blocks):
        attn = getattr(block, "attn1", None)
        if attn is None or not hasattr(attn, "processor") or not callable(getattr(attn, "set_processor", None)):
            raise TypeError(
                f"transformer: expected {want}; blocks[{i}] ({type(block).__name__}) has no attn1 with "
                "processor / set_processor"
            )
    return patch


def _unwrap(transformer):
    """The model under ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``) and peft's ``PeftModel``
    (``get_base_model()``) wrappers: the hooks, processors and marker go on the model that owns ``blocks`` (on
    the wrapper, the hooks did not run when the model was called directly, and ``remove_block_sparse_attention``
    of the model, or of a wrapper made after apply, left the processors in or failed halfway). Both wrappers
    call the model as a module, so its hooks run."""
    seen = set()
    while isinstance(transformer, torch.nn.Module) and "blocks" not in transformer._modules and id(transformer) not in seen:
        seen.add(id(transformer))
        inner = transformer._modules.get("_orig_mod")
        if inner is None and callable(getattr(type(transformer), "get_base_model", None)):
            inner = transformer.get_base_model()
        if not isinstance(inner, torch.nn.Module):
            break
        transformer = inner
    return transformer


def _check_layers(layers, n: int):
    """Distinct block indices in [0, n) as a list, at least one (a float or a str would silently pick other
    blocks; an empty list, or a model without blocks, installed nothing and reported success)."""
    if n == 0:
        raise ValueError("transformer.blocks: the model has no transformer blocks; there is no attention to make "
                         "block-sparse")
    if layers is None:
        return list(range(n))
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise TypeError(f"layers: expected an iterable of block indices (ints) or None, got {type(layers).__name__}")
    given = list(layers)  # a generator is consumed once: keep it for the message
    if any(isinstance(i, (bool, float)) or not hasattr(i, "__index__") for i in given):
        raise TypeError(f"layers: expected block indices (ints), got {given!r}")
    idx = [int(i) for i in given]
    if not idx:
        raise ValueError("layers: expected at least one block index, got an empty list (None: every block)")
    if any(not 0 <= i < n for i in idx) or len(set(idx)) != len(idx):
        raise ValueError(f"layers: expected distinct block indices in [0, {n}), got {given}")
    return idx


def _grid_hook(patch: Tuple[int, int, int], module, args, kwargs):
    """Pre-forward hook: records the post-patch grid in the module's own state (not a closure's: a
    ``copy.deepcopy`` of the model, e.g. an EMA copy, shares the hook but has its own state and
    processors; a module-level function also lets ``torch.save(model)`` pickle it)."""
    x = args[0] if args else kwargs.get("hidden_states")
    if x is None or x.dim() != 5:
        raise ValueError("hidden_states: expected [batch, channels, frames, height, width]")
    _, _, F, H, W = x.shape
    st = getattr(module, _ATTR).state
    st.grid = (F // patch[0], H // patch[1], W // patch[2])
    st.rope_ok = None
    st._fresh = True
    return None


def _rope_hook(patch: Tuple[int, int, int], state: _GridState, module, args, output):
    """Forward hook on the model's ``rope`` (WanRotaryPosEmbed: ``(cos, sin)`` of the 5-D input's grid, new tensors
    per call): the grid of the input is tagged onto cos, and the transformer's mark is consumed here, where the
    forward's tables are made, rather than at the first block (a call stopped in between, e.g. by a
    KeyboardInterrupt, which always_call hooks do not see, left the mark to a later ``transformer.forward(...)``).
    Tables of a call the pre-forward hook did not mark stay untagged: refused at the first block."""
    x = args[0] if args else None
    cos = output[0] if isinstance(output, (tuple, list)) and output else None
    # torch.compile of the whole model: no attribute on a traced tensor; its blocks read the current grid
    if (torch.compiler.is_compiling() or not isinstance(x, torch.Tensor) or x.dim() != 5
            or not isinstance(cos, torch.Tensor)):
        return None
    if state._fresh:
        _, _, F, H, W = x.shape
        grid = (F // patch[0], H // patch[1], W // patch[2])
        if grid != state.grid:  # the rope's own input rules (equal to the pre-forward hook's in diffusers' models)
            state.grid, state.rope_ok = grid, None
        setattr(cos, _GRID_TAG, grid)
        state._fresh = False
    return None


def _end_hook(module, args, output):
    """Forward hook, also run when the forward raised (``always_call``): the forward's mark goes. A call that
    failed before its first block left it set, and a following ``transformer.forward(...)`` (no hook) took
    that call's grid instead of being refused."""
    inst = getattr(module, _ATTR, None)
    if inst is not None:
        inst.state._fresh = False
    return None


def apply_block_sparse_attention(
    transformer,
    params: BlockSparseParams,
    *,
    layers: Optional[Iterable[int]] = None,
    backend: str = "auto",
    dense_at_zero: bool = True,
    fused_prologue: Optional[bool] = None,
):
    """Swap the self-attention of Wan blocks for LongCat block-sparse 3D attention.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (Wan 2.1 / 2.2, T2V or I2V), also under
            ``torch.compile`` or peft's ``get_peft_model`` (the model inside is changed, the wrapper returned).
        params (BlockSparseParams): selection rule and chunks (``sparsity``, ``cdf_threshold``,
            ``chunk_q``, ``chunk_k``; checked here); ``frame_hw`` and ``selection`` must be None. A
            chunk longer than a forward's grid axis (e.g. 1 latent frame) is capped at that axis.
        layers (iterable of int | None): distinct block indices to change; default all.
        backend (str): ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        dense_at_zero (bool): at sparsity 0 run the dense attention op (see the processor).
        fused_prologue (bool | None): q/k norm + RoPE in one fused op (see the processor).

    Returns:
        The same transformer (modified in place). The grid of each forward comes from a pre-forward
        hook: ``(F // p_t, H // p_h, W // p_w)`` of ``hidden_states [B, C, F, H, W]`` (floored, as
        diffusers' patch embedding and RoPE floor them). ``transformer.forward(...)`` skips the hook and
        is refused at its first block (RuntimeError) rather than run on the previous call's grid.

    Raises:
        TypeError / ValueError: naming the argument, before the model is changed; also for a block
            whose ``attn1`` processor is not diffusers' own (it would be dropped silently) or not Wan's
            self-attention (Helios: history tokens; AnyFlow: another RoPE and input layout).

    A model whose RoPE differs from Wan's default (another theta, ChronoEdit's temporal skip) is
    detected on each forward and keeps its own tables (the fused prologue is then skipped). A
    ``copy.deepcopy`` of the applied model runs on its own grid state. Blocks recomputed in backward
    (``enable_gradient_checkpointing``) use the grid of their own forward, also after forwards at
    other resolutions: a hook on the model's ``rope`` module tags each forward's RoPE tables with its grid,
    which eager blocks and blocks compiled by ``compile_repeated_blocks`` (``fullgraph=True`` included; they
    run diffusers' norm and RoPE ops) both read. ``torch.compile`` of the whole transformer makes the tables
    inside the graph, untagged: its blocks read the current forward's grid, and a recompute is part of that
    forward's compiled graph.
    """
    given, transformer = transformer, _unwrap(transformer)
    p_t, p_h, p_w = _check_transformer(transformer)
    if not isinstance(params, BlockSparseParams):
        raise TypeError(f"params: expected a longcat_kernels.BlockSparseParams, got {type(params).__name__}")
    if params.frame_hw is not None or params.selection is not None:
        raise ValueError(
            "params: expected frame_hw=None and selection=None (the grid comes from each forward's input), got "
            f"frame_hw={params.frame_hw}, selection={'set' if params.selection is not None else None}"
        )
    # the rule and chunks are checked now, not at the first forward (a str sparsity "0" would even pass
    # the processor's dense-at-zero test); chunks vs each forward's grid are checked by block_sparse_attn
    try:
        check_sparsity(params.sparsity, params.cdf_threshold)
        as_triple(params.chunk_q, "chunk_q")
        if params.chunk_k is not None:
            as_triple(params.chunk_k, "chunk_k")
    except (TypeError, ValueError) as e:
        raise type(e)(f"params.{e}") from None
    check_backend_name(backend)
    check_bool(dense_at_zero, "dense_at_zero")
    if fused_prologue is not None:
        check_bool(fused_prologue, "fused_prologue")
    if getattr(transformer, _ATTR, None) is not None:
        raise ValueError("transformer: block-sparse attention is already applied; call remove_block_sparse_attention first")
    if any(isinstance(b.attn1.processor, BlockSparseWanAttnProcessor) for b in transformer.blocks):
        # e.g. a copy.deepcopy of an applied model: its processors share the original's grid state
        raise ValueError(
            "transformer: some blocks already have a BlockSparseWanAttnProcessor not installed by "
            "apply_block_sparse_attention on this model (a copy of an applied model?); apply to the original "
            "model, or remove first"
        )
    idx = _check_layers(layers, len(transformer.blocks))
    for i in idx:
        proc = transformer.blocks[i].attn1.processor
        name = type(proc).__qualname__
        if not (type(proc).__module__ or "").startswith("diffusers."):
            # ours would replace it for plain self-attention and drop whatever it does
            raise ValueError(
                f"transformer.blocks[{i}].attn1: its processor {name} is not one of diffusers' own; block-sparse "
                "attention would replace it and silently drop its behaviour (restore diffusers' processor, or leave "
                "this block out with layers=)"
            )
        if type(proc).__name__ not in _WAN_SELF_ATTN:
            # another diffusers model with Wan's structure (AnyFlow: complex RoPE tables in a dict, [B, F, C, H, W]
            # input; Helios: history tokens) passed every check above and failed or went wrong at its first forward
            raise TypeError(
                f"transformer: {type(transformer).__name__} is not supported: blocks[{i}].attn1 runs {name}, not the "
                f"Wan self-attention this processor reimplements (expected one of {', '.join(_WAN_SELF_ATTN)})"
            )
    state = _GridState()

    handle = transformer.register_forward_pre_hook(functools.partial(_grid_hook, (p_t, p_h, p_w)), with_kwargs=True)
    inst = _Installed(state=state, hook=handle)
    # all or nothing: an exception or a KeyboardInterrupt part way left the hooks registered and some blocks on
    # our processor without the record, and both apply (refused: "a copy of an applied model?") and remove (a
    # no-op without the record) left the model half-applied for good
    try:
        inst.end_hook = transformer.register_forward_hook(_end_hook, always_call=True)
        rope = getattr(transformer, "rope", None)
        if isinstance(rope, torch.nn.Module):  # every model of _WAN_SELF_ATTN has one, called on hidden_states
            inst.rope_hook = rope.register_forward_hook(functools.partial(_rope_hook, (p_t, p_h, p_w), state))
        for i in idx:
            attn = transformer.blocks[i].attn1
            inst.originals[i] = attn.processor
            attn.set_processor(
                BlockSparseWanAttnProcessor(state, params, attn.processor, backend, dense_at_zero, fused_prologue)
            )
        setattr(transformer, _ATTR, inst)
    except BaseException:
        _uninstall(transformer, inst)
        raise
    return given


def remove_block_sparse_attention(transformer):
    """Undo ``apply_block_sparse_attention``: the original processor objects back, the hook removed.

    A block whose processor was replaced after apply (``set_attn_processor``) keeps that processor. Settings
    diffusers made on the processors meanwhile (``set_attention_backend``, ``enable_parallelism``) reached the
    originals, which carry them back.
    Returns the transformer; a transformer without our attention is returned unchanged.
    """
    given, transformer = transformer, _unwrap(transformer)
    inst = getattr(transformer, _ATTR, None)
    if inst is None:
        return given
    _uninstall(transformer, inst)
    return given


def _uninstall(transformer, inst: "_Installed") -> None:
    """Puts back the processors and removes the hooks ``inst`` records, then the record itself (if set)."""
    for i, proc in inst.originals.items():
        attn = transformer.blocks[i].attn1
        cur = attn.processor
        # only ours goes: a processor the user set since apply was silently replaced by diffusers' original
        if isinstance(cur, BlockSparseWanAttnProcessor) and cur.state is inst.state:
            attn.set_processor(proc)
    inst.hook.remove()
    for h in (getattr(inst, "end_hook", None), getattr(inst, "rope_hook", None)):
        if h is not None:  # an _Installed pickled before it had one
            h.remove()
    if getattr(transformer, _ATTR, None) is inst:
        delattr(transformer, _ATTR)
