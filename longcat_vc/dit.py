"""The LongCat-Video DiT (SPEC 6), exact to the released checkpoints, with the conditioning KV cache.

Usage::

    dit = LongCatDiT.from_pretrained("LongCat-Video/dit", dtype=torch.bfloat16, device="cuda")
    cache = dit.build_kv_cache(latents[:, :, :c])                    # once per video
    v = dit(latents[:, :, c:], t, text, text_mask, kv_cache=cache)   # every step, CFG batch 2
    v_off = dit(latents, t_with_zero_cond, text, text_mask, num_cond_latents=c)   # same result

The state dict has exactly the upstream names and shapes (1022 tensors, 13,581,071,424 parameters
for the released config). Attention runs through ``longcat_kernels`` with ``config.attn_backend``.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import numbers
import os
import zlib
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from longcat_kernels._validate import autocast_dtype, autocast_off, check_bool, check_dense

from . import lora as _lora
from .config import DiTConfig
from .fp8 import Fp8Linear, check_fp8_state_dict
from .kv_cache import KVCache, StateToken, tensor_stamp, tensor_version
from .loading import check_dtype
from .modules.attention import AttnPlan
from .modules.block import LongCatBlock
from .modules.embedders import CaptionEmbedder, PatchEmbed3D, TimestepEmbedder
from .modules.final_layer import FinalLayer

__all__ = ["LongCatDiT"]

_MODEL_UIDS = itertools.count()
# What every rank of a context-parallel group must pass alike (checked before the first collective).
# Each checksummed input gives two values (``parallel.checksum``: row sums, position-weighted sum).
# A full ``KVCache`` is checksummed too (a ``ShardedKVCache`` holds other heads on every rank: the
# checksum of the cond latents it was built from, kept in it, stands in).
_RANK_STATE_FIELD = "model state (dtype, attention settings, LoRA, fp8 linears; rank_state)"
_FORWARD_FIELDS = ("batch", "latent frames", "latent height", "latent width", "num_cond_latents", "kv_cache frames",
                   "kv_cache batch", "kv_cache sharded", "text tokens", "text mask given",
                   "hidden_states (checksum)", "hidden_states (position checksum)",
                   "timestep (checksum of its embedding)", "timestep (position checksum of its embedding)",
                   "encoder_hidden_states (checksum of its embedding)",
                   "encoder_hidden_states (position checksum of its embedding)",
                   "encoder_attention_mask (checksum)", "encoder_attention_mask (position checksum)",
                   "kv_cache keys and values (checksum)", "kv_cache keys and values (position checksum)",
                   _RANK_STATE_FIELD)
_BUILD_FIELDS = ("batch", "cond latent frames", "latent height", "latent width", "cond_latents (checksum)",
                 "cond_latents (position checksum)", _RANK_STATE_FIELD)


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


class LongCatDiT(nn.Module):
    """LongCat-Video single-stream DiT.

    Args:
        config (DiTConfig): hyper-parameters (upstream ``config.json`` names). The model keeps a copy
            (``model.config``): switches flipped on a built model (``model.config.enable_bsa = True``) act on
            that model only, not on ``config`` nor on other models built from it.
        device, dtype: where and in which dtype the parameters are created (``device="meta"``
            builds the skeleton without memory, as ``from_pretrained`` does).

    State dict: ``x_embedder.proj.*``, ``t_embedder.mlp.{0,2}.*``, ``y_embedder.y_proj.{0,2}.*``,
    ``blocks.{i}.*`` (``LongCatBlock``), ``final_layer.*`` (SPEC 6 table).
    """

    def __init__(self, config: DiTConfig, device=None, dtype=None) -> None:
        super().__init__()
        if not isinstance(config, DiTConfig):
            raise TypeError(f"LongCatDiT: config must be a DiTConfig, got {type(config).__name__}")
        check_dtype(dtype)  # (an 8-bit float failed in torch's initialiser, or on meta at the first forward)
        # its own copy (as diffusers' ConfigMixin models hold their own config): two models built from one
        # DiTConfig shared it, and ``config.enable_bsa = True`` on one (the pipeline's ``use_bsa``) switched the other
        self.config = config = copy.deepcopy(config)
        c = config
        kw = dict(device=device, dtype=dtype)
        self.x_embedder = PatchEmbed3D(c.patch_size, c.in_channels, c.hidden_size, **kw)
        self.t_embedder = TimestepEmbedder(c.adaln_tembed_dim, c.frequency_embedding_size, **kw)
        self.y_embedder = CaptionEmbedder(c.caption_channels, c.hidden_size, **kw)
        self.blocks = nn.ModuleList(
            [LongCatBlock(c.hidden_size, c.num_heads, c.ffn_hidden_size, c.adaln_tembed_dim, **kw) for _ in range(c.depth)]
        )
        self.final_layer = FinalLayer(c.hidden_size, c.patch_volume, c.out_channels, c.adaln_tembed_dim, **kw)
        self._ropes: Dict[Tuple, object] = {}
        self._lora_names: List[str] = []
        self._lora_active_names: List[str] = []
        self._context_parallel = None
        self._uid = next(_MODEL_UIDS)  # which model a KV cache was built by (ids of dead objects repeat)
        # _state_version (below): bumped by LoRA changes (longcat_vc.lora._bump_state) and load_state_dict
        self._state_counter = 0
        self._state_token = StateToken(self._uid)

    @property
    def _state_version(self) -> int:
        return self._state_counter

    @_state_version.setter
    def _state_version(self, value: int) -> None:
        # every move retires the token the caches built before hold (the traced check reads it)
        self._state_counter = value
        self._state_token.stale = True
        self._state_token = StateToken(self._uid)

    # ------------------------------------------------------------------ facts
    def state_fingerprint(self) -> tuple:
        """What a KV cache built now depends on: the model-level state counter ``_state_version``
        (bumped by the LoRA APIs: load, enable, disable, fuse, unfuse, a multiplier change; by
        ``load_state_dict``; by a dtype conversion, ``.to(dtype)``), the block-sparse settings (they change the cond tokens' K/V),
        per parameter and buffer (and ``down`` / ``up`` tensor of an active, unfused LoRA adapter), its identity
        (a stamp no other tensor object gets, not the ``id()`` CPython reuses) and in-place version counter (a replaced parameter, e.g. FP8 quantisation;
        in-place edits and optimizer steps; not edits through ``.data``, which bypass the counter, nor those of
        inference tensors, which have none) and dtype (a submodule converted alone, ``dit.blocks.half()``; a round trip of the linears, which count
        their conversions),
        the state of peft adapters injected into the DiT (``longcat_vc.training.add_lora``: which
        are active, disabled or merged, and their scaling) and the number of dropout modules in
        training mode with ``p > 0`` (peft's ``lora_dropout``: ``build_kv_cache`` refuses them, a cache
        would keep one random draw; a cache built in eval mode is stale once they are on).

        Deliberately not the storage (``data_ptr``): the block streamer of the memory modes
        (``longcat_vc.memory``) points ``.data`` at pinned CPU homes and device copies, and
        ``.to()`` moves storage, without changing a value; ``.data`` assignment keeps the
        parameter's identity and version counter, so streaming leaves the fingerprint unchanged.
        Python-only metadata: ~1k tensors of the released model cost well under a millisecond,
        next to seconds per DiT step."""
        tensors, adapters, dropout = [], [], 0
        for i, mod in enumerate(self.modules()):  # one pass (parameters() and buffers() walk the modules too)
            for t in itertools.chain(mod._parameters.values(), mod._buffers.values()):
                if t is not None:
                    # the dtype too: a submodule's conversion (``dit.blocks.half()``) swaps ``.data``, keeping
                    # identity and version counter, and the DiT's own ``_apply`` (the state counter) never ran
                    tensors.append((tensor_stamp(t), tensor_version(t), t.dtype))
            if isinstance(mod, _lora.LoRALinear) and "_dtype_conversions" in mod.__dict__:
                tensors.append(("dtype conversions", mod.__dict__["_dtype_conversions"]))
            if isinstance(mod, _lora.LoRALinear) and mod.lora_active and not mod.lora_fused:
                # the active adapters' down / up matrices: plain attributes, not parameters (an in-place
                # edit changed the output and the cache stayed "fresh"); fused ones are in the weight
                for a in mod.lora_active:
                    tensors.extend((tensor_stamp(u), tensor_version(u)) for u in _lora._adapter_tensors(a))
            if _lora.is_peft_module(mod) and hasattr(mod, "merged_adapters"):
                adapters.append((i, *self._adapter_state(mod)))
            elif isinstance(mod, nn.modules.dropout._DropoutNd) and mod.training and mod.p > 0:
                dropout += 1
        return (self._uid, self._state_version, self._attn_fingerprint(), hash(tuple(tensors)), hash(tuple(adapters)),
                dropout)

    def rank_state(self) -> int:
        """What the ranks of a context-parallel run must share besides their inputs, as one number that
        is the same on every process for the same state (a CRC-32, not Python's per-process ``hash``):
        the dtype, the block-sparse settings, which linears are fp8 (``quantize_dit_fp8``) and the LoRA
        state (per adapted layer its active or fused adapters with their multipliers and part scales; peft
        adapters' state). The forward, ``build_kv_cache`` and the pipeline compare it across the ranks: a
        LoRA enabled, or given another multiplier, or the fp8 quantisation, on one rank only mixed two
        models' outputs without a word (each rank computes its tokens' projections with its own weights).
        Metadata only, not the weights' values."""
        state = [str(self.dtype), self._attn_fingerprint(),
                 [path for path, mod in self.named_modules() if isinstance(mod, Fp8Linear)]]
        for path, mod in self.named_modules():
            if isinstance(mod, _lora.LoRALinear) and (mod.lora_active or mod.lora_fused):
                # fused or not: the same model (one rank may fuse, another run the adapters unfused)
                adapters = mod.lora_fused or mod.lora_active
                state.append((path, [(a.name, a.multiplier, [p.scale for p in a.parts]) for a in adapters]))
            elif _lora.is_peft_module(mod) and hasattr(mod, "merged_adapters"):
                state.append((path, *self._adapter_state(mod)))
        return zlib.crc32(repr(state).encode())

    @staticmethod
    def _adapter_state(mod: nn.Module) -> tuple:
        """A peft-adapted layer (``longcat_vc.training.add_lora``; ``state_fingerprint``'s fifth entry):
        whether its adapters are disabled (``disable_adapter()``), which are active (``set_adapter``),
        which merged, and their scaling (``set_scale`` / ``scale_layer``). None of these touch a parameter."""
        scaling = getattr(mod, "scaling", None)
        return (bool(getattr(mod, "disable_adapters", False)), tuple(getattr(mod, "active_adapters", ())),
                tuple(mod.merged_adapters), repr(sorted(scaling.items())) if isinstance(scaling, dict) else None)

    def _attn_fingerprint(self) -> tuple:
        """The attention settings a cache's cond K/V depend on (``state_fingerprint``'s third entry)."""
        cfg = self.config
        return (True, repr(sorted(cfg.bsa_settings().items()))) if cfg.enable_bsa else (False,)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; KV caches built before are stale afterwards (the state
        counter is bumped even if every copy happened to keep the version counters). Refused while
        LoRAs are fused into the weights (the loaded weights would lose them while the model still
        counted them as fused, and a later unfuse would subtract them from the loaded weights), and
        refused (ValueError) where the state dict and the model disagree on fp8 quantisation
        (``longcat_vc.fp8.check_fp8_state_dict``). A state dict ``nn.Module.load_state_dict`` would refuse
        (a key of another shape, a value that is not a tensor; with ``strict``, a missing or unexpected key)
        is refused (RuntimeError) before anything is copied: torch raises only after copying every other
        tensor, which left a refused load half-applied."""
        fused = _lora.fused_loras(self)
        if fused:
            if any(isinstance(m, Fp8Linear) and m.lora_fused for m in self.modules()):
                # unfuse_lora refuses these layers: "call unfuse_lora() first" led nowhere
                raise RuntimeError(
                    f"load_state_dict: LoRA {fused} fused into the weights before fp8 quantisation, which "
                    "unfuse_lora() cannot take out again; load the state dict into a DiT quantised with "
                    "quantize_dit_fp8 without fusing a LoRA (a fused LoRA is in the state dict's weights)")
            raise RuntimeError(f"load_state_dict: LoRA {fused} fused into the weights; call unfuse_lora() first")
        check_fp8_state_dict(self, state_dict)
        self._check_loadable(state_dict, strict)
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        finally:
            self._state_version += 1

    def _check_loadable(self, state_dict, strict: bool) -> None:
        """RuntimeError (torch's words, plus "nothing was loaded") for what ``nn.Module.load_state_dict``
        would refuse only after its copies. Skipped where load or state-dict hooks may rename keys."""
        if not isinstance(state_dict, Mapping) or any(
                m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks or m._state_dict_hooks
                or m._state_dict_pre_hooks for m in self.modules()):
            return  # torch's own TypeError / the hooks' keys: nn.Module.load_state_dict decides
        expected = {k: v.shape for k, v in self.state_dict(keep_vars=True).items()}
        errors = []
        if strict:
            unexpected = [k for k in state_dict if k not in expected]
            missing = [k for k in expected if k not in state_dict]
            if unexpected:
                errors.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected[:10])
                              + (f" ... ({len(unexpected)} keys)" if len(unexpected) > 10 else ""))
            if missing:
                errors.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing[:10])
                              + (f" ... ({len(missing)} keys)" if len(missing) > 10 else ""))
        for k, shape in expected.items():
            if k not in state_dict:
                continue
            v = state_dict[k]
            if not torch.overrides.is_tensor_like(v):
                errors.append(f'While copying the parameter named "{k}", expected torch.Tensor or Tensor-like '
                              f"object from checkpoint but received {type(v)}")
            elif v.shape != shape and not (len(shape) == 0 and v.shape == (1,)):  # (torch takes a [1] for a 0-d)
                errors.append(f"size mismatch for {k}: copying a param with shape {v.shape} from checkpoint, "
                              f"the shape in current model is {shape}.")
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__} (nothing was loaded):\n\t"
                               + "\n\t".join(errors))

    def _apply(self, fn, recurse=True):
        # ``.to(dtype)`` / ``.half()`` / ``.float()`` keep each parameter's identity and version
        # counter (``.data`` is swapped), so a KV cache would survive a round trip (fp32 -> bf16 ->
        # fp32: rounded weights, same dtype): a dtype change counts as a state change. Device moves
        # do not (exact; the cache's device is checked).
        before = [t.dtype for t in itertools.chain(self.parameters(), self.buffers())]
        out = super()._apply(fn, recurse)
        # the RoPE tables made for the old device: ``dit.to("cpu")`` kept up to 17 grids' tables alive on the GPU
        self._ropes = {}
        if before != [t.dtype for t in itertools.chain(self.parameters(), self.buffers())]:
            self._state_version += 1
        return out

    @property
    def dtype(self) -> torch.dtype:
        """Weight dtype (the dtype activations run in; timesteps are rounded to it)."""
        return self.x_embedder.proj.weight.dtype

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the attention runs in: the weight dtype, or ``torch.autocast``'s where it is on for the
        model's device (it casts the projections' inputs; fp64 weights it leaves alone)."""
        ac = autocast_dtype(self.device)
        return ac if ac is not None and self.dtype != torch.float64 else self.dtype

    def __getstate__(self) -> dict:
        # what copy.deepcopy and pickling (torch.save of the whole model) read. A block streamer's hooks and
        # forward wrappers are closures over the original blocks: a deep copy ran the original's blocks with
        # its own embedders, silently, and a pickle failed on a local function; a context-parallel handler
        # holds a process group, which neither can copy ("cannot pickle ... ProcessGroup")
        if self.__dict__.get("_block_streamer") is not None:
            raise ValueError("LongCatDiT: cannot copy or pickle a DiT with a block streamer attached (memory='balanced'"
                             " or 'low'): detach() it first (dit._block_streamer.detach()), then copy, and attach a "
                             "BlockStreamer to each model")
        if self.__dict__.get("_context_parallel") is not None:
            raise ValueError("LongCatDiT: cannot copy or pickle a DiT that runs context parallel (its process group "
                             "cannot be copied): call disable_context_parallel() first, then copy, and "
                             "enable_context_parallel() on each model")
        # the RoPE tables cached per grid are rebuilt on use: a deep copy duplicated them, torch.save wrote them
        return {**super().__getstate__(), "_ropes": {}}

    def __setstate__(self, state) -> None:
        # unpickled (torch.save of the whole model) or deep-copied: its LoRA adapters report their changes to it again
        # (a pickle holds no weak references: LoRAAdapter.__getstate__)
        super().__setstate__(state)
        # a copy is another model: its own id, so the caches each one builds
        # are checked as another instance's by the other, not as stale ones of its own
        self._uid = next(_MODEL_UIDS)
        self._state_token = StateToken(self._uid)
        _lora.relink_adapters(self)

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    @classmethod
    def from_pretrained(cls, path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device, None] = None, *, strict: bool = True,
                        attn_backend: Optional[str] = None, progress: bool = True) -> "LongCatDiT":
        """Loads an upstream ``dit/`` folder or a FastVideo ``transformer/`` folder (or a checkpoint
        root holding one of them), with a progress bar over the tensors unless ``progress=False``.
        See ``longcat_vc.loading.load_dit``."""
        from .loading import load_dit

        return load_dit(path, dtype=dtype, device=device, strict=strict, attn_backend=attn_backend,
                        progress=progress, cls=cls)

    # ------------------------------------------------------------------ context parallel
    def enable_context_parallel(self, group=None, *, cfg_parallel: bool = False):
        """Run ``forward`` and ``build_kv_cache`` across the ranks of ``group`` (None: the default
        group), Ulysses-style; every rank calls them with the same arguments and gets the same
        result. See ``longcat_vc.parallel``. Returns the ``ContextParallel`` handler."""
        from .parallel import ContextParallel

        if getattr(self, "_block_streamer", None) is not None:  # (memory.refuse_streaming_with_context_parallel)
            raise ValueError("enable_context_parallel: the DiT streams its blocks (memory='balanced' or 'low'), which is "
                             "not supported with context parallel; use memory='resident'")
        self._context_parallel = ContextParallel(group, num_heads=self.config.num_heads,
                                                 cfg_parallel=cfg_parallel, device=self.device)
        return self._context_parallel

    def disable_context_parallel(self) -> None:
        self._context_parallel = None

    @property
    def context_parallel(self):
        """The ``longcat_vc.parallel.ContextParallel`` handler, or None (single process)."""
        return self._context_parallel

    # ------------------------------------------------------------------ helpers
    def _rope(self, grid: Tuple[int, int, int], device: torch.device):
        key = (tuple(grid), str(device))
        rope = self._ropes.get(key)
        if rope is None:
            from longcat_kernels import Rope3D

            if len(self._ropes) > 16:
                self._ropes.clear()
            rope = Rope3D(tuple(grid), self.config.head_dim, device=device)
            if _compiling():
                # kept only eagerly: an entry added by a trace fails that graph's "key absent" guard on
                # the next call, so every new grid compiled the whole DiT twice
                return rope
            self._ropes[key] = rope
        return rope

    def _check_latents(self, x, name: str) -> Tuple[int, int, int, int]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a Tensor [B, {self.config.in_channels}, T, H, W], got {type(x).__name__}")
        check_dense(x, name)  # a sparse one failed deep in the patch embedder ("Could not run 'aten::view'")
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"{name}: expected shape [B, {self.config.in_channels}, T, H, W], got {list(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{name}: expected a floating tensor, got {x.dtype}")
        B, _, T, H, W = x.shape
        _, ph, pw = self.config.patch_size
        if B == 0 or T == 0 or H == 0 or W == 0:
            raise ValueError(f"{name}: empty latent tensor, shape {list(x.shape)}")
        if H % ph or W % pw:
            raise ValueError(
                f"{name}: latent height and width must be divisible by the patch ({ph}, {pw}), got H={H}, W={W}"
            )
        if x.device != self.device and not _compiling():
            raise ValueError(f"{name}: on {x.device}, the model is on {self.device}")
        if self.dtype.itemsize < 2:  # .to(float8) converts every weight; the forward failed deep in GELU
            raise TypeError(f"LongCatDiT: weights are {self.dtype} (a .to() of the whole model); activations need "
                            "bfloat16/float16/float32 weights, fp8 GEMMs come from longcat_vc.fp8.quantize_dit_fp8")
        return B, T, H, W

    def _embed_text(self, enc: torch.Tensor, mask: Optional[torch.Tensor], B: int):
        """-> text states ``[B, L, C]`` and a key mask ``[B, L]`` bool or None (attend to all)."""
        c = self.config
        if not isinstance(enc, torch.Tensor):
            raise TypeError(f"encoder_hidden_states: expected a Tensor [B, 1, L, {c.caption_channels}], got {type(enc).__name__}")
        # padded + encoder_attention_mask, not a jagged nested batch (it failed inside a Linear)
        check_dense(enc, "encoder_hidden_states")
        if not enc.is_floating_point():  # (token ids or a mask in this slot ran as embeddings)
            raise TypeError(f"encoder_hidden_states: expected floating text states, got {enc.dtype}")
        if enc.ndim == 3:
            enc = enc.unsqueeze(1)
        if enc.ndim != 4 or enc.shape[0] != B or enc.shape[1] != 1 or enc.shape[3] != c.caption_channels or enc.shape[2] == 0:
            raise ValueError(
                f"encoder_hidden_states: expected shape [{B}, 1, L, {c.caption_channels}], got {list(enc.shape)}"
            )
        L = enc.shape[2]
        if enc.device != self.device and not _compiling():
            raise ValueError(f"encoder_hidden_states: on {enc.device}, the model is on {self.device}")
        if mask is not None:
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"encoder_attention_mask: expected a Tensor [B, L] or None, got {type(mask).__name__}")
            check_dense(mask, "encoder_attention_mask")
            if mask.ndim == 4 and mask.shape[1:3] == (1, 1):
                mask = mask[:, 0, 0]
            if mask.ndim != 2 or tuple(mask.shape) != (B, L):
                raise ValueError(f"encoder_attention_mask: expected shape [{B}, {L}], got {list(mask.shape)}")
            mask = mask.to(self.device)
            if mask.is_floating_point() and not _compiling() and bool(((mask < 0) | mask.isnan()).any()):
                # nonzero = valid: an additive mask (0 valid, -inf padded: diffusers' convention) read upside
                # down, padding attended and the prompt dropped. One sync, for floating masks only (the
                # pipeline's tokenizer masks are int64: nothing to check on its steps)
                raise ValueError("encoder_attention_mask: expected a 0/1 (bool, int or float) mask, nonzero = valid "
                                 "token; got negative or NaN entries (an additive 0 / -inf mask? pass mask == 0)")
        y = self.y_embedder(enc.to(self.dtype)).view(B, L, -1)
        if mask is None:
            return y, None
        valid = mask != 0
        # Padded tokens are never read: zero vectors (a where, not a product: 0 * NaN / inf is NaN, and a
        # collated batch may leave its padding uninitialised). Any non-zero entry is a valid token.
        y = torch.where(valid[:, :, None], y, 0)
        if c.text_tokens_zero_pad:
            # and all L tokens are attended (upstream)
            return y, None
        if not _compiling():
            counts = valid.sum(dim=1)
            if bool((counts == 0).any()):
                raise ValueError(
                    "encoder_attention_mask: every sample needs at least one valid text token "
                    f"(valid counts per sample: {counts.tolist()})"
                )
            if bool(valid.all()):
                return y, None
        # varlen: the padded keys are masked out (upstream drops them)
        return y, valid

    def _embed_timestep(self, timestep, B: int, T: int) -> torch.Tensor:
        if not isinstance(timestep, torch.Tensor):
            given = timestep
            timestep = torch.as_tensor(given, device=self.device)
            if timestep.is_floating_point():
                # Python floats became torch's default dtype: under set_default_dtype(torch.bfloat16) an fp32
                # DiT saw 987.654 as 988. float64 (on the CPU: not every device has it) holds every Python /
                # numpy float exactly; rounded once, to the weight dtype, as below
                timestep = torch.as_tensor(given, dtype=torch.float64).to(self.dtype).to(self.device)
        check_dense(timestep, "timestep")
        if timestep.dtype == torch.bool or timestep.is_complex():
            # (a bool ran as t = 1 / 0, a complex one lost its imaginary part with only a warning)
            raise TypeError(f"timestep: expected real (int or float) timesteps in [0, 1000], got {timestep.dtype}")
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        if timestep.ndim == 1:
            if timestep.shape[0] != B:
                raise ValueError(f"timestep: expected shape [{B}] or [{B}, {T}], got {list(timestep.shape)}")
            timestep = timestep[:, None].expand(B, T)
        elif timestep.ndim != 2 or tuple(timestep.shape) != (B, T):
            raise ValueError(
                f"timestep: expected shape [{B}] or [{B}, {T}] (one per latent frame of hidden_states), "
                f"got {list(timestep.shape)}"
            )
        if timestep.is_floating_point() and not _compiling() and not bool(timestep.isfinite().all()):
            # (a NaN/inf timestep embedded to NaN: the whole prediction came back NaN without an error)
            raise ValueError(f"timestep: expected finite timesteps in [0, 1000], got {timestep.flatten().tolist()[:8]}")
        # Rounded to the weight dtype first (bf16 in practice), then embedded in fp32.
        t = timestep.to(device=self.device).to(self.dtype)
        with autocast_off(self.device):  # fp32 also under torch.autocast (upstream: an fp32 autocast)
            return self.t_embedder(t.reshape(-1)).view(B, T, -1)

    def unpatchify(self, x: torch.Tensor, T: int, Nh: int, Nw: int) -> torch.Tensor:
        """``[B, N, pt*ph*pw*out]`` -> ``[B, out, T*pt, Nh*ph, Nw*pw]``; channel index
        ``((i_t*ph + i_h)*pw + i_w)*out + c`` (output channels innermost)."""
        B = x.shape[0]
        pt, ph, pw = self.config.patch_size
        co = self.config.out_channels
        x = x.view(B, T, Nh, Nw, pt, ph, pw, co)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, co, T * pt, Nh * ph, Nw * pw)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        *,
        num_cond_latents: int = 0,
        kv_cache: Optional[KVCache] = None,
    ) -> torch.Tensor:
        """Predicts the (negated) flow velocity.

        Args:
            hidden_states (Tensor): ``[B, 16, T, H, W]`` latents (any float dtype; cast to the
                weight dtype). With ``kv_cache`` only the noisy latents (frames ``c..``).
            timestep (Tensor): ``[B]`` or ``[B, T]`` (per latent frame), in [0, 1000]. Cache off
                with cond latents: pass ``[B, T]`` with zeros on the cond frames (as the pipeline
                does); the model uses the timesteps as given.
            encoder_hidden_states (Tensor): ``[B, 1, L, caption_channels]`` text states.
            encoder_attention_mask (Tensor): ``[B, L]`` (nonzero = valid token; a floating mask with negative
                or NaN entries, e.g. an additive 0 / -inf one, is refused) or None.
            num_cond_latents (int): cache off: the first ``c`` latent frames are clean conditioning
                (cond queries see only cond keys, zero cross-attention output). With ``kv_cache``:
                0 or ``kv_cache.num_frames``.
            kv_cache (KVCache): from ``build_kv_cache`` on the same grid, dtype (and ``torch.autocast``
                setting) and device; batch 1
                (shared by the CFG batch) or B. Noisy tokens then sit at frames ``c..c+T-1``.

        Returns:
            Tensor: ``[B, out_channels, T, H, W]`` fp32 (noisy frames only in cache mode).
        """
        cp = self._context_parallel  # None: single process, no hook runs
        if cp is not None and torch.is_grad_enabled():
            # The collectives carry no gradients: a context-parallel forward is inference only.
            with torch.no_grad():
                return self.forward(hidden_states, timestep, encoder_hidden_states, encoder_attention_mask,
                                    num_cond_latents=num_cond_latents, kv_cache=kv_cache)
        cfg = self.config
        check = not _compiling()
        # Context parallel: an argument error on one rank, or other inputs than the others', raises
        # on every rank here, before the first collective (else the others wait in it, or the
        # result mixes the ranks' inputs without a word). Not inside a pipeline's checked_region:
        # it checked its whole call once and every rank's inputs here derive from the same ones.
        exchange = check and cp is not None and not cp.in_checked_region()
        same = cp.same_call("forward", _FORWARD_FIELDS, self.device) if exchange else contextlib.nullcontext()
        with same:
            B, T, H, W = self._check_latents(hidden_states, "hidden_states")
            _, ph, pw = cfg.patch_size
            Nh, Nw = H // ph, W // pw
            num_cond_latents = self._check_num_cond(num_cond_latents, kv_cache, T)
            given_cache = kv_cache
            if cp is not None and kv_cache is not None:
                kv_cache = cp.local_cache(self, kv_cache, B, Nh, Nw)  # checked; this rank's heads
            elif kv_cache is not None and check:
                self._check_cache(kv_cache, B, Nh, Nw)
            elif kv_cache is not None and cp is None:
                # traced (torch.compile): the per-tensor freshness check is skipped, but a stale or
                # misfitting cache would be used silently (another token grid, batch or autocast dtype
                # ran without a word); its metadata, the model-level counter and the attention settings
                # are values the trace guards on (a change re-traces and raises here)
                self._check_cache(kv_cache, B, Nh, Nw, traced=True)

            # Text and timestep embeddings on the whole batch, so validation messages name B.
            t = self._embed_timestep(timestep, B, T)
            y, y_mask = self._embed_text(encoder_hidden_states, encoder_attention_mask, B)
            if exchange:
                from .parallel import ShardedKVCache, checksum

                sharded = isinstance(given_cache, ShardedKVCache)
                # a full cache: one more read of it per direct call (a pipeline's loop skips this check);
                # a sharded one holds other heads on every rank: the checksum of its cond latents
                cache_sums = ((0.0, 0.0) if given_cache is None else given_cache.cond_checksum if sharded
                              else checksum(*given_cache.keys, *given_cache.values))
                same.record(B, T, H, W, num_cond_latents, -1 if kv_cache is None else kv_cache.num_frames,
                            -1 if kv_cache is None else kv_cache.batch, sharded, y.shape[1], y_mask is not None,
                            *checksum(hidden_states), *checksum(t), *checksum(y),
                            *((0.0, 0.0) if y_mask is None else checksum(y_mask)), *cache_sums, self.rank_state())
        if cp is not None:
            hidden_states, t, y, y_mask = cp.split_batch(B, hidden_states, t, y, y_mask)  # CFG half
        x = self.x_embedder(hidden_states.to(self.dtype))

        plan = self._step_plan((T, Nh, Nw), x.device, num_cond_latents, kv_cache)
        if cp is not None:
            x, plan = cp.shard_tokens(x, plan)
        for i, block in enumerate(self.blocks):
            x = block(x, t, y, y_mask, plan, i)
        out = self.final_layer(x, t, T)
        if cp is not None:
            out = cp.gather_tokens(out, B, (T, Nh, Nw))
        return self.unpatchify(out, T, Nh, Nw).float()

    @staticmethod
    def _check_num_cond(num_cond_latents, kv_cache: Optional[KVCache], T: int) -> int:
        """``num_cond_latents`` as an int, checked against ``kv_cache`` (0 or its frames) or
        else against ``T`` latent frames. Raises TypeError / ValueError naming the argument."""
        if isinstance(num_cond_latents, bool) or not isinstance(num_cond_latents, numbers.Integral):
            raise TypeError(f"num_cond_latents: expected an int, got {type(num_cond_latents).__name__}")
        num_cond_latents = int(num_cond_latents)
        if kv_cache is not None:
            if not isinstance(kv_cache, KVCache):
                raise TypeError(f"kv_cache: expected a KVCache, got {type(kv_cache).__name__}")
            c = kv_cache.num_frames
            if num_cond_latents not in (0, c):
                raise ValueError(
                    f"num_cond_latents: with a kv_cache of {c} frames expected 0 or {c}, got {num_cond_latents}"
                )
        elif not 0 <= num_cond_latents <= T:
            raise ValueError(
                f"num_cond_latents: expected 0 <= num_cond_latents <= T={T} latent frames, got {num_cond_latents}"
            )
        return num_cond_latents

    def _step_plan(self, grid: Tuple[int, int, int], device: torch.device, num_cond_latents: int,
                   kv_cache: Optional[KVCache]) -> AttnPlan:
        """The attention plan of a denoising forward over the ``grid = (T, Nh, Nw)`` tokens: the
        noisy frames after ``kv_cache`` (read from it), or else a cond prefix of
        ``num_cond_latents`` frames (cond queries see only cond keys; no cross-attention when all
        frames are cond)."""
        cfg = self.config
        T, Nh, Nw = grid
        bsa = cfg.bsa_settings() if cfg.enable_bsa else {}
        if kv_cache is not None:
            c = kv_cache.num_frames
            return AttnPlan(
                mode="cache", grid=grid, rope=self._rope((c + T, Nh, Nw), device), frame_offset=c,
                use_bsa=cfg.enable_bsa, bsa=bsa, backend=cfg.attn_backend, cache=kv_cache.reader(),
            )
        c = num_cond_latents
        return AttnPlan(
            mode="prefix" if c else "full", grid=grid, rope=self._rope(grid, device),
            prefix_tokens=c * Nh * Nw, use_bsa=cfg.enable_bsa, bsa=bsa, backend=cfg.attn_backend,
            skip_cross=(c == T),
        )

    def _check_cache(self, cache: KVCache, B: int, Nh: int, Nw: int, *, heads: Optional[int] = None,
                     problems: Sequence[str] = (), traced: bool = False) -> None:
        """ValueError listing every way ``cache`` does not fit this model and a batch of ``B`` on
        an ``Nh x Nw`` token grid. ``heads``: the heads its tensors hold (default all);
        ``problems``: ones the caller found already (listed first); ``traced``: under torch.compile,
        freshness by ``_check_cache_counter`` (no per-tensor fingerprint)."""
        cfg = self.config
        problems = list(problems)
        if heads is None and getattr(cache, "sp_size", 1) > 1:
            # a ShardedKVCache handed to this model after disable_context_parallel (or to another)
            problems.append(f"sharded: heads {cache.head_start}..{cache.head_start + cache.heads_local - 1} of "
                            f"{cache.num_heads}, built by context-parallel rank {cache.sp_rank} of {cache.sp_size}, "
                            "and this model runs without context parallelism (rebuild it with build_kv_cache())")
        if cache.depth != cfg.depth:
            problems.append(f"built for depth {cache.depth}, model depth {cfg.depth}")
        if tuple(cache.grid_hw) != (Nh, Nw):
            # (traced: the grid may be symbolic, which dynamo cannot format under fullgraph=True)
            problems.append("built for another token grid per frame than hidden_states give" if traced else
                            f"built for a token grid {tuple(cache.grid_hw)} per frame, hidden_states give {(Nh, Nw)}")
        want = self._compute_dtype()
        if cache.dtype != want:
            problems.append(f"dtype {cache.dtype}, model dtype {self.dtype}"
                            + (f" under torch.autocast({want})" if want != self.dtype else "")
                            + " (a cache is used under the torch.autocast setting it was built under)")
        if cache.device != self.device:
            problems.append(f"device {cache.device}, model on {self.device}")
        if cache.batch not in (1, B):
            problems.append(f"batch {cache.batch}, expected 1 or {B}")
        shape = (cache.batch, cache.num_frames * Nh * Nw, cfg.num_heads if heads is None else heads, cfg.head_dim)
        if not problems and tuple(cache.keys[0].shape) != shape:
            problems.append(f"tensors of shape {list(cache.keys[0].shape)}, expected {list(shape)}")
        if problems:
            raise ValueError("kv_cache: " + "; ".join(problems))
        if traced:
            self._check_cache_counter(cache)
        else:
            self._check_cache_fresh(cache)  # fits, but was it built from this state of the model?

    def _check_cache_counter(self, cache: KVCache) -> None:
        """The traceable part of ``_check_cache_fresh``: ValueError when ``cache`` was built by this
        model before a LoRA / ``load_state_dict`` / dtype change or another block-sparse setting
        (not the per-tensor versions: in-place weight edits are not seen under ``torch.compile``).

        Reads the cache's ``StateToken`` (its ``stale`` flag), not the state counter: a guard on the
        counter's value recompiled the compiled DiT after every LoRA change (each refine call, each
        mode switch) until dynamo's recompile limit sent every step back to eager."""
        tok = cache.state
        if tok is None or tok.owner != self._uid:
            self._check_foreign_attn(cache)
            return
        if tok.stale or (cache.source is not None and cache.source[2] != self._attn_fingerprint()):
            raise ValueError("kv_cache: stale, built before the LoRA state, the loaded weights, the dtype or "
                             "the block-sparse settings changed (traced call); rebuild it with build_kv_cache()")

    def _check_foreign_attn(self, cache: KVCache) -> None:
        """ValueError when ``cache`` (built by another model instance) was built with other block-sparse
        settings than this model's: the cond tokens' K/V depend on them (a dense model's cache used by a
        block-sparse one ran the continuation against other conditioning without a word)."""
        if cache.source is None or cache.source[2] == self._attn_fingerprint():
            return

        def says(fp):
            return f"enable_bsa=True, {fp[1]}" if fp[0] else "enable_bsa=False"

        raise ValueError(f"kv_cache: built by another model instance with other block-sparse settings ({says(cache.source[2])}) "
                         f"than this model's ({says(self._attn_fingerprint())}); the cond tokens' K/V depend on them: "
                         "rebuild it with this model's build_kv_cache()")

    def _check_cache_fresh(self, cache: KVCache) -> None:
        """ValueError when ``cache`` was built from another state of this model (stale)."""
        if cache.source is None:
            return
        now = self.state_fingerprint()
        if cache.source == now or cache.source[0] != now[0]:
            # built by another model instance (e.g. a single-process cache handed to a context-
            # parallel copy): its shapes, dtype and device were checked; its weights cannot be, its
            # block-sparse settings can
            self._check_foreign_attn(cache)
            return
        what = []
        if cache.source[1] != now[1]:
            what.append("the LoRA state or the loaded weights changed (LoRA enable/disable/fuse/unfuse/load/"
                        "multiplier, load_state_dict, a dtype conversion)")
        if cache.source[2] != now[2]:
            what.append("the attention configuration changed (config.enable_bsa / bsa_params: the cond "
                        "tokens' K/V depend on it)")
        if cache.source[3] != now[3]:
            what.append("the weights changed (loaded, replaced, edited in place or converted to another dtype)")
        if cache.source[4:5] != now[4:5]:
            what.append("the peft adapters changed (enabled, disabled, switched, merged or rescaled)")
        if cache.source[5:] != now[5:]:
            what.append(f"dropout was switched on ({now[5]} dropout modules in training mode with p > 0, e.g. peft's "
                        "lora_dropout after .train(): call .eval() first)")
        raise ValueError(
            "kv_cache: stale, built before " + " and ".join(what) + "; rebuild it with build_kv_cache()"
        )

    # ------------------------------------------------------------------ KV cache
    @torch.no_grad()
    def build_kv_cache(self, cond_latents: torch.Tensor, *, offload: bool = False) -> KVCache:
        """One pass over the cond latents alone at timestep 0 without cross-attention, keeping
        each block's rotated K and V of the cond tokens (SPEC 6, "KV cache build").

        Args:
            cond_latents (Tensor): ``[Bc, 16, c, H, W]`` clean cond latents, ``Bc`` = 1 (shared by
                the CFG batch) or B.
            offload (bool): keep the cache in pinned CPU memory; each forward copies it back one
                block ahead of the compute on a side stream.

        Returns:
            KVCache: ``depth`` blocks of ``k, v [Bc, c*H/2*W/2, heads, head_dim]`` in the model dtype (under
            ``torch.autocast``: its dtype; the forwards that use it then run under the same autocast)
            (context parallel: a ``ShardedKVCache`` of this rank's ``heads / P`` heads).
        """
        cfg = self.config
        cp = self._context_parallel
        # (as forward: a traced call, or one inside a pipeline's checked_region, skips the exchange)
        check = cp is not None and not _compiling() and not cp.in_checked_region()
        same = cp.same_call("build_kv_cache", _BUILD_FIELDS, self.device) if check else contextlib.nullcontext()
        with same:  # as in forward: every rank raises, before the first collective
            # a truthy "no" offloaded the cache (and recorded offloaded="no"); None kept it, recording None
            check_bool(offload, "offload")
            Bc, c, H, W = self._check_latents(cond_latents, "cond_latents")
            source = self.state_fingerprint()
            if source[5]:
                # the cache would keep one random dropout draw for every later step
                raise ValueError(f"build_kv_cache: dropout is active ({source[5]} dropout modules in training mode "
                                 "with p > 0, e.g. peft's lora_dropout after .train()); call .eval() first")
            if cp is not None:
                from .parallel import checksum

                # kept in the sharded cache too: a direct forward compares it across the ranks
                cond_sums = checksum(cond_latents)
            if check:
                same.record(Bc, c, H, W, *cond_sums, self.rank_state())
        _, ph, pw = cfg.patch_size
        Nh, Nw = H // ph, W // pw
        x = self.x_embedder(cond_latents.to(self.dtype))
        t = self._embed_timestep(torch.zeros(Bc, c, device=self.device), Bc, c)
        keys, values = self._record_kv(x, t, (c, Nh, Nw), offload)
        # the tensors' dtype: under torch.autocast the K/V are in its dtype, not the weights'
        cache = KVCache(keys=keys, values=values, num_frames=c, grid_hw=(Nh, Nw), dtype=keys[0].dtype,
                        device=self.device, offloaded=offload, source=source, state=self._state_token)
        # Context parallel: this rank recorded its heads of every block; the cache says which
        # (shard_cache keeps every KVCache field, the fingerprint included).
        return cache if cp is None else cp.shard_cache(cache, cond_sums)

    def _record_kv(
        self, x: torch.Tensor, t: torch.Tensor, grid: Tuple[int, int, int], offload: bool,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Runs the blocks of a cache build over the embedded cond tokens ``x`` (``grid = (c, Nh,
        Nw)``, timestep embedding ``t``) and returns each block's rotated K and V: contiguous on
        the model's device, or copied to (pinned when CUDA is available) CPU memory when
        ``offload``. The last block stops after its K and V. Context parallel: the blocks run on
        this rank's token shard and record its heads of the whole sequence."""
        cfg = self.config
        pin = offload and torch.cuda.is_available()
        keys: List[Optional[torch.Tensor]] = [None] * cfg.depth
        values: List[Optional[torch.Tensor]] = [None] * cfg.depth

        def store(t_: torch.Tensor) -> torch.Tensor:
            if offload:
                dst = torch.empty(t_.shape, dtype=t_.dtype, device="cpu", pin_memory=pin)
                dst.copy_(t_, non_blocking=pin)
                return dst
            return t_.contiguous()

        def record(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            keys[layer], values[layer] = store(k), store(v)

        plan = AttnPlan(
            mode="build", grid=grid, rope=self._rope(grid, x.device),
            use_bsa=cfg.enable_bsa, bsa=cfg.bsa_settings() if cfg.enable_bsa else {},
            backend=cfg.attn_backend, record=record, skip_cross=True,
        )
        if self._context_parallel is not None:
            x, plan = self._context_parallel.shard_tokens(x, plan)
        last = cfg.depth - 1
        for i, block in enumerate(self.blocks):
            if i == last:
                block.forward_kv_only(x, t, plan, i)
            else:
                x = block(x, t, None, None, plan, i)
        if pin and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return keys, values

    # ------------------------------------------------------------------ LoRA
    def load_lora(self, path: Union[str, os.PathLike], name: str, multiplier: float = 1.0) -> List[str]:
        """Reads a LongCat or FastVideo LoRA file under ``name`` (see ``longcat_vc.lora``)."""
        return _lora.load_lora(self, path, name, multiplier)

    def enable_loras(self, names: Sequence[str]) -> None:
        """Activates exactly the LoRAs ``names`` (their contributions add up)."""
        _lora.enable_loras(self, names)

    def disable_loras(self) -> None:
        """Deactivates every LoRA (unfusing first if fused)."""
        _lora.disable_loras(self)

    def fuse_lora(self) -> None:
        """Merges the active LoRAs into the weights (faster steps; ``unfuse_lora`` undoes it)."""
        _lora.fuse_lora(self)

    def unfuse_lora(self) -> None:
        """Restores the base weights after ``fuse_lora`` (no-op when nothing is fused)."""
        _lora.unfuse_lora(self)

    @property
    def lora_names(self) -> List[str]:
        """Loaded LoRA names."""
        return list(self._lora_names)

    @property
    def active_loras(self) -> List[str]:
        return list(self._lora_active_names)
