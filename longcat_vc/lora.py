"""LoRA adapters for the LongCat-Video DiT (SPEC 8): LongCat's own files and FastVideo's conversion.

Math (both formats, per adapted ``nn.Linear`` ``y = W x + b``)::

    y = W x + b + sum_j  P_j( up_j( down_j(x) ) ) * multiplier * scale_j

where ``down`` is ``[R, in]``, its output is split into parts ``down_j`` (``R = sum r_j``), each
part has an up matrix ``up_j [out_j, r_j]`` and writes the output rows ``P_j`` it owns. Several
active adapters add up.

LongCat format (``lora/cfg_step_lora.safetensors``, ``lora/refinement_lora.safetensors``), keys::

    lora___lorahyphen___<module path with '.' -> '___lorahyphen___'>.lora_down.weight   [n*r, in]
        ... .lora_up.weight                [out, n*r]      (plain, one part: n = 1)
        ... .lora_up.blocks.{j}.weight     [out/n, r]      (split: part j = down rows j*r..,
                                                              output rows j*out/n..)
        ... .alpha_scale                   0-d             (scale of every part; 0.5 = 64/128)

``alpha_scale`` read from the file wins (0, an adapter that changes nothing, is refused); when a module has none, the upstream network default
``alpha / rank = 64 / 128 = 0.5`` is used (upstream's strict ``load_state_dict`` would refuse such
a file; we accept it).

FastVideo format (what we found reading FastVideo's ``scripts/checkpoint_conversion/
longcat_to_fastvideo.py`` and ``fastvideo/pipelines/lora_pipeline.py`` +
``fastvideo/layers/lora/linear.py``): the converter writes, per FastVideo module path (SPEC 9
names: ``blocks.i.self_attn.to_q/to_k/to_v/to_out``, ``blocks.i.cross_attn.to_q/to_k/to_v/
to_out``, ``blocks.i.ffn.w1/w2/w3``, ``blocks.i.adaln_linear_1``, ``final_layer.adaln_linear``,
``final_layer.proj``; read too: ``time_embedder.linear_1/2``, ``caption_embedder.linear_1/2``),
the keys ``<path>.lora_A [r, in]``, ``<path>.lora_B [out, r]`` and
``<path>.lora_alpha`` (0-d fp32, ``alpha = alpha_scale * r``). A fused LongCat target split in n
(``attn.qkv``: n = 3, ``cross_attn.kv_linear``: n = 2) becomes n FastVideo targets, each with its
slice of ``lora_down`` as ``lora_A`` and up block j as ``lora_B``; a split target that stays one
module in FastVideo (``adaLN_modulation.1``, n = 6 / 2) gets the whole ``lora_down`` and a
block-diagonal ``lora_B [out, n*r]``. FastVideo applies ``scale = lora_alpha / rank`` with
``rank = lora_A.shape[0]`` (``scale = 1`` when ``lora_alpha`` is absent), strips a
``diffusion_model.`` prefix and a trailing ``.weight`` from key names, and (in its merge path)
truncates ``lora_alpha`` to an int; we keep the float (identical for the released files, where
``alpha = 0.5 * 128 = 64``). Here each FastVideo target becomes one part of the LongCat module's
adapter (``to_k`` of ``cross_attn`` -> output rows ``0..C`` of ``kv_linear``, ``to_v`` -> rows
``C..2C``), so both formats run the same code and the same math.

Why not ``peft``: wrapping a layer with peft renames its base weight to ``<module>.base_layer.weight``
(the state dict must keep the upstream names exactly, SPEC 6), and the split form would have to
be expanded to a dense block-diagonal ``up`` (n times the memory and FLOPs of the up projection for
``attn.qkv``). The adapter here is a few lines on our own ``LoRALinear`` (a plain ``nn.Linear``
subclass, so names and shapes of the state dict are untouched).

Speed: ``fuse_lora`` merges the active adapters into the weights (no per-call LoRA matmuls);
``unfuse_lora`` subtracts them again (within rounding: ``W + delta`` is rounded to the weight dtype, so
the round trip can differ from the original weights by 1 ulp, in fp32 too; on the tiny test model
about a third of the entries, max 3e-8 in fp32 and 2e-3 in bf16; further round trips did not drift).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import numbers
import os
import re
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_kernels._validate import autocast_off, cache_mode

from .kv_cache import tensor_version
from .loading import _list

__all__ = [
    "LoRALinear",
    "LoRAAdapter",
    "LoRAPart",
    "LORA_PREFIX",
    "LORA_HYPHEN",
    "read_lora_file",
    "load_lora",
    "enable_loras",
    "disable_loras",
    "fuse_lora",
    "unfuse_lora",
    "longcat_lora_key",
]

# tensor dtypes of a LoRA file (those the DiT loader reads too); fp8 ones failed deep in the
# non-finite check ('"sum_cpu" not implemented for Float8_e4m3fn')
LORA_FILE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

LORA_PREFIX = "lora___lorahyphen___"
LORA_HYPHEN = "___lorahyphen___"
DEFAULT_ALPHA_SCALE = 0.5  # upstream network default alpha / rank = 64 / 128


# One lock per model for its LoRA state: ``fuse_lora`` from two threads at once both found nothing fused and
# both added the delta (W + 2 delta; the unfuse took one back: base weights lost without a word), two unfuses
# subtracted it twice. The LoRA functions below hold it; the pipeline's calls hold it for their length (an
# RLock: they change the LoRA state inside).
_MODEL_LOCKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()
_FALLBACK_LOCK = threading.RLock()  # a model that cannot be weakly referenced


def compiled_original(model):
    """``model`` itself for ``torch.compile(model)`` (an ``OptimizedModule``, whose attributes and LoRA methods
    reach the model it wraps): the key of the per-model state here and in the pipeline. Keyed on the wrapper, a
    pipeline on ``torch.compile(dit)`` and one on ``dit`` took two locks and tracked two LoRA owners for one DiT
    (the basic pipeline's calls ran with the distill pipeline's cfg-step LoRA, rel. L2 0.17, without a word)."""
    frames = sys.modules.get("torch._dynamo.eval_frame")  # loaded by any torch.compile: not imported here
    wrapper = getattr(frames, "OptimizedModule", None)
    while wrapper is not None and isinstance(model, wrapper):
        model = model._orig_mod
    return model


def model_lock(model) -> "threading.RLock":
    """The re-entrant lock that serialises changes of ``model``'s LoRA state (and the pipeline calls on it);
    the same for ``torch.compile(model)``."""
    model = compiled_original(model)
    with _MODEL_LOCKS_GUARD:
        try:
            lock = _MODEL_LOCKS.get(model)
            if lock is None:
                lock = _MODEL_LOCKS[model] = threading.RLock()
        except TypeError:
            lock = _FALLBACK_LOCK
    return lock


def _holding_model_lock(fn):
    """Runs a LoRA function (first argument: the model) holding ``model_lock(model)``."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with model_lock(model):
            return fn(model, *args, **kwargs)
    return wrapper


def _owner_lock(model):
    """``model_lock(model)``, or no lock for None. An adapter's multiplier / tensors set from another thread
    while ``fuse_lora`` ran went in between the module's delta and its fused flag (or after the overflow
    check): the weights held W + delta(old value), the unfuse took delta(new value) off, and the base
    weights were lost without a word. The change now waits for the fuse (and is then refused as fused)."""
    return model_lock(model) if model is not None else contextlib.nullcontext()


@dataclass
class LoRAPart:
    """One up projection of an adapter: ``y[..., out_start:out_end] += up @ down[rank_start:rank_end] x * scale``."""

    out_start: int
    out_end: int
    rank_start: int
    rank_end: int
    up: torch.Tensor  # [out_end - out_start, rank_end - rank_start]
    scale: float

    def __setattr__(self, key, value) -> None:
        # As LoRAAdapter.multiplier: a new scale (or up matrix) changes what the model computes, so a
        # KV cache built before is stale, and while fused the weights hold W + delta(old value) (an
        # unfuse then subtracted delta(new value): the base weights were lost without a word).
        # Device moves and the block streamer bypass this with object.__setattr__.
        ref = self.__dict__.get("_adapter")
        adapter = ref() if ref is not None else None
        if key == "scale":  # at construction too: a NaN / bool / tensor scale passed LoRAPart(...) unchecked
            _check_multiplier(value, "LoRAPart.scale")
            value = float(value)
        owner = adapter.__dict__.get("_owner") if adapter is not None else None
        model = owner() if owner is not None else None
        with _owner_lock(model if key in ("scale", "up") else None):
            if adapter is not None and key in ("scale", "up"):
                if adapter.__dict__.get("_fused"):
                    raise RuntimeError(
                        f"LoRA {adapter.name!r}: a part's {key} cannot change while the adapter is fused into the "
                        "weights; call unfuse_lora() first (and fuse_lora() again after the change)")
            super().__setattr__(key, value)
            if model is not None and key in ("scale", "up"):
                _bump_state(model)

    def __getstate__(self) -> dict:
        # a weak reference cannot be pickled (torch.save of a model with a LoRA loaded failed with
        # "cannot pickle 'weakref.ReferenceType' object"); the adapter links its parts again
        state = dict(self.__dict__)
        state.pop("_adapter", None)
        return state


@dataclass
class LoRAAdapter:
    """An adapter on one ``LoRALinear``: ``down [R, in]`` shared by its parts."""

    name: str
    down: torch.Tensor  # [R, in]
    parts: List[LoRAPart]
    multiplier: float = 1.0

    def __setattr__(self, key, value) -> None:
        # A KV cache built with this adapter active is stale once its multiplier (or tensors)
        # change: tell the owning model (set by load_lora), whose state counter the cache records.
        if key == "multiplier":
            _check_multiplier(value, "multiplier")
            value = float(value)
        owner = self.__dict__.get("_owner")
        model = owner() if owner is not None else None
        with _owner_lock(model if key in ("multiplier", "down", "parts") else None):
            if key in ("multiplier", "down", "parts") and self.__dict__.get("_fused"):
                # the weights hold W + delta(old value): unfusing would subtract delta(new value)
                raise RuntimeError(
                    f"LoRA {self.name!r}: {key} cannot change while the adapter is fused into the weights; "
                    "call unfuse_lora() first (and fuse_lora() again after the change)")
            super().__setattr__(key, value)
            if key == "parts":  # each part reports a change of its scale / up matrix (LoRAPart.__setattr__)
                for p in value:
                    object.__setattr__(p, "_adapter", weakref.ref(self))
            if model is not None and key in ("multiplier", "down", "parts"):
                _bump_state(model)

    def __getstate__(self) -> dict:
        # (pickling, as LoRAPart.__getstate__) without the owner: a module pickled alone would drag the whole
        # model along; a LongCatDiT links its adapters again when it is unpickled (LongCatDiT.__setstate__)
        state = dict(self.__dict__)
        state.pop("_owner", None)
        state.pop("_fused_tensors", None)  # weak references (the unpickled tensors are new objects anyway)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        for p in self.parts:
            object.__setattr__(p, "_adapter", weakref.ref(self))

    def __deepcopy__(self, memo) -> "LoRAAdapter":
        # ``copy.deepcopy`` keeps weak references as they are: a copied model's parts asked the original
        # adapter whether they were fused (the copy's unfuse then subtracted another delta) and its changes
        # bumped the original model (the copy's KV caches stayed "fresh"). Point them at the copies.
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_owner":
                owner = value()
                value = weakref.ref(memo[id(owner)]) if owner is not None and id(owner) in memo else value
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        for p in new.parts:
            object.__setattr__(p, "_adapter", weakref.ref(new))
        return new

    def delta_weight(self, dtype: torch.dtype = torch.float32, out_features: Optional[int] = None) -> torch.Tensor:
        """Dense ``[out, in]`` update ``sum_j P_j up_j down_j * scale_j * multiplier`` (``dtype``).

        ``out_features``: the module's (default: the last row a part writes). A FastVideo file adapting
        only some of a fused target's parts (``to_q``/``to_k`` of ``attn.qkv``) ends before the last row:
        the module passes its own height so that ``W + delta`` lines up."""
        out = max(p.out_end for p in self.parts)
        if out_features is not None:
            if out_features < out:
                raise ValueError(f"LoRA {self.name!r}: parts write rows up to {out}, beyond out_features={out_features}")
            out = out_features
        d = torch.zeros(out, self.down.shape[1], dtype=dtype, device=self.down.device)
        down = self.down.to(dtype)
        # in ``dtype`` also under torch.autocast: a fuse_lora inside a bf16 autocast merged a bf16 product (7e-4
        # off in fp32 weights) and the unfuse_lora after it left the base weights that far from the originals
        with autocast_off(self.down.device):
            for p in self.parts:
                d[p.out_start:p.out_end] += (p.up.to(dtype) @ down[p.rank_start:p.rank_end]) * (p.scale * self.multiplier)
        return d

    def to_(self, device=None, dtype=None) -> "LoRAAdapter":
        self.down = self.down.to(device=device, dtype=dtype)
        for p in self.parts:
            object.__setattr__(p, "up", p.up.to(device=device, dtype=dtype))
        return self

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Adds the adapter's output to ``y`` (the base output, a fresh tensor) in place and returns it.

        A scale of at most 1 in magnitude (``alpha_scale * multiplier``) is applied to the rank-sized
        ``down(x)`` before ``up``: applied after it, ``up(down(x))`` overflowed fp16 to Inf where the scaled
        update fits (alpha_scale 1/128, or multiplier 0.01), while the fused weights (an fp32 delta) were finite."""
        h = F.linear(x, self.down.to(x.dtype))  # [..., R]
        for p in self.parts:
            s = p.scale * self.multiplier
            hp = h[..., p.rank_start:p.rank_end]
            if abs(s) <= 1:
                y[..., p.out_start:p.out_end].add_(F.linear(hp * s, p.up.to(x.dtype)))
            else:
                y[..., p.out_start:p.out_end].add_(F.linear(hp, p.up.to(x.dtype)), alpha=s)
        return y


class LoRALinear(nn.Linear):
    """``nn.Linear`` that can carry LoRA adapters without changing its state dict.

    Forward: ``F.linear(x, W, b)`` computed in ``x.dtype`` (weights are cast when ``x`` has
    another dtype, which is how the fp32 islands of SPEC 6 run on bf16 weights), plus the active
    adapters unless they are fused into ``W``. Adapters live in plain attributes (not registered
    buffers), so ``state_dict()`` is exactly ``weight`` (+ ``bias``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lora_adapters: Dict[str, LoRAAdapter] = {}
        self.lora_active: List[LoRAAdapter] = []
        self.lora_fused: List[LoRAAdapter] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if w.dtype != x.dtype:
            w = w.to(x.dtype)
            b = None if b is None else b.to(x.dtype)
        y = F.linear(x, w, b)
        if self.lora_active and not self.lora_fused:
            for adapter in self.lora_active:
                y = adapter.add_to(x, y)
        return y

    def _apply(self, fn, recurse=True):
        # ``.to(device)`` / ``.cuda()`` / ``.cpu()`` move the weight, and the adapters (plain attributes)
        # stayed behind: the first forward failed deep in F.linear on mixed devices. They follow the
        # weight's device (their dtype is cast per call). ``object.__setattr__``: a move is no state change.
        dtype = self.weight.dtype
        super()._apply(fn, recurse)
        if self.weight.dtype != dtype:
            # counted for ``LongCatDiT.state_fingerprint``: a round trip of a submodule alone (``dit.blocks.half()
            # .float()``: rounded weights, same dtype, identity and version) left the DiT's KV caches "fresh"
            self.__dict__["_dtype_conversions"] = self.__dict__.get("_dtype_conversions", 0) + 1
        dev = self.weight.device
        lost = sorted(a.name for a in self.lora_adapters.values() if dev.type != "meta"
                      and any(u.is_meta for u in _adapter_tensors(a)))
        if lost:
            # (torch's "Cannot copy out of meta tensor; no data!" named neither the LoRA nor what to do)
            raise RuntimeError(
                f"LoRALinear: LoRA {lost} moved to the meta device with the weights (.to('meta')) and has no values "
                f"to bring to {dev}; a LoRA is not in the state dict, so to_empty() / load_state_dict() cannot restore "
                "it: build the model again and load_lora() after its weights are loaded")
        for a in self.lora_adapters.values():
            if a.down.device != dev:
                object.__setattr__(a, "down", a.down.to(dev))
            for p in a.parts:
                if p.up.device != dev:
                    object.__setattr__(p, "up", p.up.to(dev))
        return self

    # -------------------------------------------------------------- fusing
    def _check_fuse(self) -> None:
        """Raises when ``_fuse`` cannot run (``fuse_lora`` asks every module before fusing any)."""

    def _check_unfuse(self) -> None:
        """Raises when ``_unfuse`` cannot run (``unfuse_lora`` asks every module before unfusing any):
        a fused adapter's ``down`` / ``up`` edited in place since ``_fuse`` (assignment is refused while
        fused; ``down.mul_(3)`` was not, and the unfuse subtracted another delta than the fuse added:
        the base weights were lost without a word). Tensors moved since (device, block streamer) are
        other objects and not compared."""
        for a in self.lora_fused:
            for (ref, version), u in zip(a.__dict__.get("_fused_tensors", ()), _adapter_tensors(a)):
                if ref() is u and tensor_version(u) != version:
                    raise RuntimeError(
                        f"unfuse_lora: LoRA {a.name!r}'s tensors were edited in place while fused into the weights: "
                        "unfusing would subtract another update than the one fused in; reload the model (or its "
                        "state dict) and the LoRA")

    @torch.no_grad()
    def _fuse(self) -> None:
        if self.lora_fused or not self.lora_active:
            return
        acc = _merge_dtype(self.weight.dtype)
        delta = sum(a.delta_weight(acc, self.out_features) for a in self.lora_active)
        fused = (self.weight.to(acc) + delta.to(self.weight.device)).to(self.weight.dtype)

        def record():
            self.lora_fused = list(self.lora_active)
            for a in self.lora_fused:
                object.__setattr__(a, "_fused", True)
                # what _check_unfuse compares: an in-place edit while fused
                object.__setattr__(a, "_fused_tensors",
                                   tuple((weakref.ref(u), tensor_version(u)) for u in _adapter_tensors(a)))

        _write_then_record(self.weight, fused, record)

    @torch.no_grad()
    def _unfuse(self) -> None:
        if not self.lora_fused:
            return
        acc = _merge_dtype(self.weight.dtype)
        delta = sum(a.delta_weight(acc, self.out_features) for a in self.lora_fused)
        unfused = (self.weight.to(acc) - delta.to(self.weight.device)).to(self.weight.dtype)

        def record():
            for a in self.lora_fused:
                object.__setattr__(a, "_fused", False)
            self.lora_fused = []

        _write_then_record(self.weight, unfused, record)


def _write_then_record(weight: torch.Tensor, value: torch.Tensor, record) -> None:
    """``weight.copy_(value)``, then ``record()``: also when an exception (a KeyboardInterrupt) lands between
    the two, while it does not when the write did not happen. A write left unrecorded fused the delta twice on
    the next ``fuse_lora()`` and took none back on ``unfuse_lora()``. (The write is seen by the weight's version
    counter; an inference tensor keeps none, and relies on the flag alone.)"""
    before = tensor_version(weight)
    done = False
    try:
        weight.copy_(value)
        done = True
    finally:
        if done or (before != -1 and tensor_version(weight) != before):
            record()


def _merge_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype ``W + delta`` is computed in: float32, or the weight's own when wider (float64: a float32
    merge rounded every fused and unfused weight to float32, about 3e8 fp64 ulps off)."""
    return torch.promote_types(weight_dtype, torch.float32)


def _adapter_tensors(a: "LoRAAdapter") -> Tuple[torch.Tensor, ...]:
    """``a.down`` and the ``up`` of each of its parts."""
    return (a.down, *(p.up for p in a.parts))


def _check_multiplier(value, name: str = "multiplier") -> None:
    # any real number (numpy scalars too: np.float32 is no float subclass), as guidance_scale; not a bool
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a finite float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value}")


def _bump_state(model: nn.Module) -> None:
    """Counts a change of what the model computes (LoRA state): KV caches built before are stale."""
    try:
        object.__setattr__(model, "_state_version", getattr(model, "_state_version", 0) + 1)
    except AttributeError:  # pragma: no cover - exotic modules
        pass


def _scalar(t: torch.Tensor, key: str, problems: List[str]) -> Optional[float]:
    """The value of a 0-d / 1-element finite tensor, else None with a problem recorded."""
    if not isinstance(t, torch.Tensor) or t.numel() != 1:
        problems.append(f"{key}: expected a scalar (0-d or 1 element), got shape {tuple(getattr(t, 'shape', ()))}")
        return None
    v = float(t.float().reshape(-1)[0])
    if not math.isfinite(v):
        problems.append(f"{key}: expected a finite value, got {v}")
        return None
    return v


# ====================================================================== file parsing
def longcat_lora_key(module_path: str, suffix: str) -> str:
    """LongCat key for ``module_path`` (e.g. ``blocks.0.attn.qkv``) and ``suffix`` (``lora_down.weight``...)."""
    return LORA_PREFIX + module_path.replace(".", LORA_HYPHEN) + "." + suffix


_FASTVIDEO_TO_LONGCAT: Sequence[Tuple[re.Pattern, str, Optional[Tuple[int, int]]]] = [
    # (pattern on the FastVideo module path, LongCat module path, (part index, n parts) of rows)
    (re.compile(r"^blocks\.(\d+)\.self_attn\.to_q$"), r"blocks.\1.attn.qkv", (0, 3)),
    (re.compile(r"^blocks\.(\d+)\.self_attn\.to_k$"), r"blocks.\1.attn.qkv", (1, 3)),
    (re.compile(r"^blocks\.(\d+)\.self_attn\.to_v$"), r"blocks.\1.attn.qkv", (2, 3)),
    (re.compile(r"^blocks\.(\d+)\.self_attn\.to_out$"), r"blocks.\1.attn.proj", None),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.to_q$"), r"blocks.\1.cross_attn.q_linear", None),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.to_k$"), r"blocks.\1.cross_attn.kv_linear", (0, 2)),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.to_v$"), r"blocks.\1.cross_attn.kv_linear", (1, 2)),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.to_out$"), r"blocks.\1.cross_attn.proj", None),
    (re.compile(r"^blocks\.(\d+)\.ffn\.(w[123])$"), r"blocks.\1.ffn.\2", None),
    (re.compile(r"^blocks\.(\d+)\.adaln_linear_1$"), r"blocks.\1.adaLN_modulation.1", None),
    (re.compile(r"^final_layer\.adaln_linear$"), r"final_layer.adaLN_modulation.1", None),
    (re.compile(r"^final_layer\.proj$"), r"final_layer.linear", None),
    # the embedders' Linears (SPEC 9 names; their FastVideo keys were refused as matching no Linear module)
    (re.compile(r"^time_embedder\.linear_1$"), r"t_embedder.mlp.0", None),
    (re.compile(r"^time_embedder\.linear_2$"), r"t_embedder.mlp.2", None),
    (re.compile(r"^caption_embedder\.linear_1$"), r"y_embedder.y_proj.0", None),
    (re.compile(r"^caption_embedder\.linear_2$"), r"y_embedder.y_proj.2", None),
]


def _fastvideo_module(path: str) -> Optional[Tuple[str, Optional[Tuple[int, int]]]]:
    for pattern, repl, rows in _FASTVIDEO_TO_LONGCAT:
        if pattern.match(path):
            return pattern.sub(repl, path), rows
    return None


def read_lora_file(path: "str | os.PathLike[str]") -> Tuple[str, Dict[str, torch.Tensor]]:
    """Reads a LoRA ``.safetensors`` file; returns ``(format, tensors)`` with format ``"longcat"``
    or ``"fastvideo"``. Raises ``FileNotFoundError`` for a missing file, ``IsADirectoryError`` for a
    folder (naming the ``.safetensors`` files in it), ``ValueError`` for an
    unreadable file, non-floating or non-finite tensors, or an unknown format."""
    from .loading import _has_non_finite, _open_safetensors_all

    if os.path.isdir(os.fspath(path)):
        # FastVideo's converter writes each LoRA into a folder (lora/distilled/) and its scripts pass the folder:
        # that was "LoRA file not found" for a path that exists
        inside = sorted(f for f in os.listdir(os.fspath(path)) if f.endswith(".safetensors"))
        raise IsADirectoryError(f"LoRA file: {os.fspath(path)} is a folder; pass the .safetensors file in it "
                                f"(found: {', '.join(inside[:5]) if inside else 'none'})")
    if not os.path.isfile(os.fspath(path)):  # else "checkpoint file not found" from the DiT loader
        raise FileNotFoundError(f"LoRA file not found: {os.fspath(path)}")
    # own, aligned copies: safetensors hands out views of the file's bytes at arbitrary offsets, and
    # CPU GEMM kernels pick alignment-dependent paths, so a misaligned adapter could round
    # differently from its aligned copy (the block streamer's device copies: tests/vc/test_memory.py)
    tensors = {k: t.clone() for k, t in _open_safetensors_all(os.fspath(path)).items()}
    if not tensors:
        raise ValueError(f"load_lora: {os.fspath(path)} holds no tensors")
    keys = list(tensors)
    ints = sorted(f"{k} ({t.dtype})" for k, t in tensors.items() if not t.is_floating_point())
    if ints:  # an integer up/down/alpha would be cast silently to the weight dtype
        raise ValueError(
            f"load_lora: {os.fspath(path)} holds non-floating tensor(s): " + ", ".join(ints[:10])
            + (" ..." if len(ints) > 10 else "")
        )
    odd = sorted(f"{k} ({t.dtype})" for k, t in tensors.items() if t.dtype not in LORA_FILE_DTYPES)
    if odd:
        raise ValueError(
            f"load_lora: {os.fspath(path)} holds tensor(s) of a dtype other than "
            f"{', '.join(str(d).replace('torch.', '') for d in LORA_FILE_DTYPES)}: " + ", ".join(odd[:10])
            + (" ..." if len(odd) > 10 else "")
        )
    bad = sorted(k for k, t in tensors.items() if _has_non_finite(t))
    if bad:  # a NaN adapter would turn every output of its module into NaN
        def readable(k):  # LongCat keys spell the module path with '___lorahyphen___' for '.'
            return k[len(LORA_PREFIX):].replace(LORA_HYPHEN, ".") if k.startswith(LORA_PREFIX) else k

        raise ValueError(f"load_lora({os.fspath(path)!r}): non-finite values (NaN/Inf) in "
                         + ", ".join(readable(k) for k in bad[:10]) + (" ..." if len(bad) > 10 else ""))
    if any(k.startswith(LORA_PREFIX) for k in keys):
        return "longcat", tensors
    if any(re.search(r"\.lora_[AB](\.weight)?$", k) for k in keys):
        return "fastvideo", tensors
    raise ValueError(
        f"load_lora: {os.fspath(path)} is neither LongCat LoRA ('{LORA_PREFIX}...lora_down.weight') nor "
        f"FastVideo LoRA ('<module>.lora_A/.lora_B'); first keys: {keys[:5]}"
    )


def _parse_longcat(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, dict], List[str]]:
    per_module: Dict[str, dict] = {}
    bad: List[str] = []
    pat = re.compile(r"^(lora_down\.weight|lora_up\.weight|lora_up\.blocks\.(\d+)\.weight|alpha_scale)$")
    for key, t in tensors.items():
        if not key.startswith(LORA_PREFIX) or "." not in key:
            bad.append(key)
            continue
        name, suffix = key.split(".", 1)
        m = pat.match(suffix)
        if m is None:
            bad.append(key)
            continue
        module = name[len(LORA_PREFIX):].replace(LORA_HYPHEN, ".")
        entry = per_module.setdefault(module, {"blocks": {}, "keys": [], "block_keys": {}, "duplicates": []})
        entry["keys"].append(key)
        if suffix == "lora_down.weight":
            entry["down"] = t
        elif suffix == "lora_up.weight":
            entry["up"] = t
        elif suffix == "alpha_scale":
            entry["alpha_scale_tensor"] = t
        else:
            j = int(m.group(2))
            if j in entry["blocks"]:  # "blocks.1" and "blocks.01": the one read last won silently
                entry["duplicates"].append(f"{entry['block_keys'][j]!r} and {key!r}")
                continue
            entry["blocks"][j] = t
            entry["block_keys"][j] = key
    return per_module, bad


def _parse_fastvideo(tensors: Dict[str, torch.Tensor]) -> Tuple[Dict[str, dict], List[str]]:
    per_target: Dict[str, dict] = {}
    bad: List[str] = []
    for key, t in tensors.items():
        name = key
        for prefix in ("diffusion_model.", "transformer."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if name.endswith(".weight"):
            name = name[: -len(".weight")]
        m = re.match(r"^(.*)\.(lora_A|lora_B|lora_alpha)$", name)
        if m is None:
            bad.append(key)
            continue
        entry = per_target.setdefault(m.group(1), {"keys": [], "sources": {}, "duplicates": []})
        entry["keys"].append(key)
        slot = "alpha_tensor" if m.group(2) == "lora_alpha" else m.group(2)
        if slot in entry["sources"]:  # e.g. "x.lora_A" and "diffusion_model.x.lora_A.weight": one would win silently
            entry["duplicates"].append(f"{entry['sources'][slot]!r} and {key!r}")
            continue
        entry["sources"][slot] = key
        entry[slot] = t
    return per_target, bad


def _build_adapters(model: nn.Module, fmt: str, tensors: Dict[str, torch.Tensor], name: str,
                    multiplier: float, path: str) -> Dict[str, LoRAAdapter]:
    """Turns a parsed file into ``{module path: LoRAAdapter}``; raises listing every problem."""
    unmatched: List[str] = []
    problems: List[str] = []
    adapters: Dict[str, LoRAAdapter] = {}

    def linear(module_path: str) -> Optional[LoRALinear]:
        try:
            mod = model.get_submodule(module_path)
        except AttributeError:
            return None
        return mod if isinstance(mod, LoRALinear) else None

    if fmt == "longcat":
        per_module, bad = _parse_longcat(tensors)
        unmatched.extend(bad)
        for module_path, e in sorted(per_module.items()):
            mod = linear(module_path)
            if mod is None:
                unmatched.extend(e["keys"])
                continue
            if e["duplicates"]:
                problems.append(f"{module_path}: " + ", ".join(e["duplicates"]) + " name the same up block")
                continue
            down = e.get("down")
            if down is None:
                problems.append(f"{module_path}: no lora_down.weight")
                continue
            if e.get("up") is not None and e["blocks"]:
                problems.append(f"{module_path}: has both lora_up.weight and lora_up.blocks.*")
                continue
            scale = DEFAULT_ALPHA_SCALE
            if "alpha_scale_tensor" in e:
                scale = _scalar(e["alpha_scale_tensor"], f"{module_path}.alpha_scale", problems)
                if scale is None:
                    continue
                if scale == 0:  # as rank 0: loaded, an adapter that changes nothing, without a word
                    problems.append(f"{module_path}.alpha_scale: 0 switches the adapter off; refused "
                                    "(use multiplier / disable_loras to switch a LoRA off)")
                    continue
            out_f, in_f = mod.out_features, mod.in_features
            if down.ndim != 2 or down.shape[1] != in_f:
                problems.append(f"{module_path}: lora_down.weight shape {tuple(down.shape)}, expected [R, {in_f}]")
                continue
            R = down.shape[0]
            if R == 0:  # loaded, it would be an adapter that changes nothing, without a word
                problems.append(f"{module_path}: rank 0 (lora_down.weight shape {tuple(down.shape)}); refused")
                continue
            parts: List[LoRAPart] = []
            if e["blocks"]:
                n = len(e["blocks"])
                if sorted(e["blocks"]) != list(range(n)):
                    problems.append(f"{module_path}: lora_up.blocks indices {sorted(e['blocks'])} are not 0..{n - 1}")
                    continue
                if R % n or out_f % n:
                    problems.append(
                        f"{module_path}: {n} up blocks need rank {R} and out_features {out_f} divisible by {n}"
                    )
                    continue
                r, o = R // n, out_f // n
                ok = True
                for j in range(n):
                    up = e["blocks"][j]
                    if tuple(up.shape) != (o, r):
                        problems.append(
                            f"{module_path}: lora_up.blocks.{j}.weight shape {tuple(up.shape)}, expected ({o}, {r})"
                        )
                        ok = False
                        continue
                    parts.append(LoRAPart(j * o, (j + 1) * o, j * r, (j + 1) * r, up, scale))
                if not ok:
                    continue
            else:
                up = e.get("up")
                if up is None:
                    problems.append(f"{module_path}: no lora_up.weight nor lora_up.blocks.*")
                    continue
                if tuple(up.shape) != (out_f, R):
                    problems.append(f"{module_path}: lora_up.weight shape {tuple(up.shape)}, expected ({out_f}, {R})")
                    continue
                parts.append(LoRAPart(0, out_f, 0, R, up, scale))
            adapters[module_path] = LoRAAdapter(name, down, parts, multiplier)
    else:
        upstream_named: List[str] = []  # targets spelt with our (upstream) module names, not FastVideo's
        per_target, bad = _parse_fastvideo(tensors)
        unmatched.extend(bad)
        grouped: Dict[str, List[Tuple[Optional[Tuple[int, int]], str, dict]]] = {}
        for target, e in sorted(per_target.items()):
            mapped = _fastvideo_module(target)
            if mapped is None or linear(mapped[0]) is None:
                unmatched.extend(e["keys"])
                if linear(target) is not None:
                    upstream_named.append(target)
                continue
            grouped.setdefault(mapped[0], []).append((mapped[1], target, e))
        for module_path, items in grouped.items():
            mod = linear(module_path)
            out_f, in_f = mod.out_features, mod.in_features
            downs: List[torch.Tensor] = []
            parts = []
            rank0 = 0
            seen_rows = set()
            for rows, target, e in sorted(items, key=lambda it: (it[0] or (0, 1))[0]):
                if e["duplicates"]:
                    problems.append(f"{target}: " + ", ".join(e["duplicates"]) + " name the same tensor (a "
                                    "'diffusion_model.'/'transformer.' prefix and a '.weight' suffix are dropped)")
                    continue
                A, B = e.get("lora_A"), e.get("lora_B")
                if A is None or B is None:
                    problems.append(f"{target}: needs both lora_A and lora_B")
                    continue
                j, n = rows if rows is not None else (0, 1)
                if out_f % n:
                    problems.append(f"{target}: out_features {out_f} of {module_path} not divisible by {n}")
                    continue
                o = out_f // n
                r = A.shape[0] if A.ndim == 2 else -1
                if A.ndim != 2 or A.shape[1] != in_f:
                    problems.append(f"{target}: lora_A shape {tuple(A.shape)}, expected [r, {in_f}]")
                    continue
                if r == 0:  # lora_alpha / 0 was a bare ZeroDivisionError; without alpha, a no-op adapter
                    problems.append(f"{target}: rank 0 (lora_A shape {tuple(A.shape)}); refused")
                    continue
                if tuple(B.shape) != (o, r):
                    problems.append(f"{target}: lora_B shape {tuple(B.shape)}, expected ({o}, {r})")
                    continue
                if j in seen_rows:
                    problems.append(f"{target}: duplicate target for {module_path}")
                    continue
                seen_rows.add(j)
                alpha = None
                if "alpha_tensor" in e:
                    alpha = _scalar(e["alpha_tensor"], f"{target}.lora_alpha", problems)
                    if alpha is None:
                        continue
                if alpha == 0:
                    # alpha / rank would switch the adapter off, "0 = unset" would apply it fully:
                    # neither reading is safe to pick silently
                    problems.append(f"{target}.lora_alpha: 0 is ambiguous (scale 0, or unset = scale 1); refused")
                    continue
                scale = 1.0 if alpha is None else alpha / r
                downs.append(A)
                parts.append(LoRAPart(j * o, (j + 1) * o, rank0, rank0 + r, B, scale))
                rank0 += r
            if parts:
                # the widest of the parts' dtypes (the first one's rounded the others: fp32 parts to fp16)
                dt = functools.reduce(torch.promote_types, [d.dtype for d in downs])
                adapters[module_path] = LoRAAdapter(name, torch.cat([d.to(dt) for d in downs], 0), parts, multiplier)

    if unmatched or problems:
        lines = []
        if unmatched:
            show = sorted(unmatched)
            lines.append(
                f"{len(show)} key(s) match no Linear module of the model: {_list(show, 20)}")
            if fmt != "longcat" and upstream_named:
                # (the message said only "match no Linear module", of a module the model has under that name)
                one = len(upstream_named) == 1
                lines.append(f"{_list(upstream_named, 5)} {'is' if one else 'are'} this model's (upstream) module "
                             f"name{'' if one else 's'}; lora_A/lora_B files are read with FastVideo's module names (SPEC 9: attn.qkv -> self_attn.to_q/to_k/"
                             "to_v, attn.proj -> self_attn.to_out, ...); for upstream names use the LongCat format "
                             f"({LORA_PREFIX}<path>.lora_down.weight / .lora_up.weight / .alpha_scale)")
            if any(k.startswith("base_model.model.") for k in show):
                # its scale (lora_alpha / r) is in adapter_config.json beside it, not in the file
                lines.append("this is a peft adapter file (PeftModel.save_pretrained); write the adapter with "
                             "longcat_vc.training.save_longcat_lora(model, path) to load it here")
        if problems:
            lines.append(f"{len(problems)} bad adapter(s): " + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))
        raise ValueError(f"load_lora({path!r}, name={name!r}): " + " | ".join(lines))
    if not adapters:
        raise ValueError(f"load_lora({path!r}): the file has no adapter for this model")
    return adapters


# ====================================================================== model-level API
def _lora_linears(model: nn.Module) -> Iterable[Tuple[str, LoRALinear]]:
    for n, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield n, m


def relink_adapters(model: nn.Module) -> None:
    """Makes ``model`` the owner of the adapters its modules carry (after unpickling, which drops the
    weak references): their multiplier/scale changes bump its state counter again. An adapter whose owner is
    alive and holds the same module keeps it: a shallow ``copy.copy(model)`` shares its modules with the original,
    and took the original's adapters over (once the copy was gone, a multiplier change bumped no model, and the
    original's KV caches stayed "fresh")."""
    for path, mod in _lora_linears(model):
        for a in mod.lora_adapters.values():
            ref = a.__dict__.get("_owner")
            owner = ref() if ref is not None else None
            if owner is not None and owner is not model and _holds_module(owner, path, mod):
                continue
            a.__dict__["_owner"] = weakref.ref(model)


def _holds_module(model: nn.Module, path: str, mod: nn.Module) -> bool:
    try:
        return model.get_submodule(path) is mod
    except AttributeError:
        return False


def fused_loras(model: nn.Module) -> List[str]:
    """Names of the adapters fused into ``model``'s weights (``fuse_lora``), sorted; [] when none."""
    return sorted({a.name for _, m in _lora_linears(model) for a in m.lora_fused})


def is_peft_module(m: nn.Module) -> bool:
    """A module of peft's (an injected adapter layer or peft's model wrapper), told by its class's module
    so that nothing here imports peft."""
    return type(m).__module__.startswith("peft.")


def carries_peft_adapters(model: nn.Module) -> bool:
    """``model`` holds peft modules (``longcat_vc.training.add_lora``)."""
    return any(is_peft_module(m) for m in model.modules())


@_holding_model_lock
def load_lora(model: nn.Module, path: "str | os.PathLike[str]", name: str, multiplier: float = 1.0) -> List[str]:
    """Reads a LoRA file (LongCat or FastVideo format) into ``model`` under ``name`` (not enabled).

    Adapter tensors are stored in each target's compute dtype (``_adapter_dtype``) and on its weight's
    device. Returns the adapted module paths. Raises ``ValueError`` listing keys that match no module
    and bad shapes, or naming modules whose values overflow that dtype.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"load_lora: name must be a non-empty str, got {name!r}")
    _check_multiplier(multiplier, "load_lora: multiplier")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_lora: path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    if carries_peft_adapters(model):
        # its Linear layers are wrapped by peft: every key would "match no Linear module"
        raise ValueError("load_lora: the model carries peft adapters (add_lora); save them with save_longcat_lora and "
                         "load the file into a DiT without peft adapters (or unload them first)")
    # normal tensors also when called under torch.inference_mode: inference-tensor adapters broke every later
    # forward that autograd records (training, or an input needing grad) with torch's "Inference tensors cannot
    # be saved for backward", naming neither the adapter nor load_lora
    with cache_mode():
        fmt, tensors = read_lora_file(path)
        adapters = _build_adapters(model, fmt, tensors, name, float(multiplier), os.fspath(path))
        for module_path, adapter in adapters.items():  # converted before the model changes: a refusal leaves it as it was
            mod = model.get_submodule(module_path)
            if mod.weight.is_meta:
                # the adapters were moved there and lost their values (then "Tensor.item() cannot be called on meta
                # tensors" from the overflow check); a later load_state_dict(assign=True) does not bring them back
                raise ValueError(f"load_lora({os.fspath(path)!r}): the weights of {module_path} are on the meta device "
                                 "(a skeleton, or after .to('meta')), where the LoRA would lose its values; load the "
                                 "weights first (load_state_dict(..., assign=True) or to_empty()), then load_lora")
            adapter.to_(device=mod.weight.device, dtype=_adapter_dtype(mod))
    _check_adapters_fit_dtype(adapters, os.fspath(path))
    # Replacing an adapter of the same name: unfuse everything first so weights stay exact.
    was_active = name in getattr(model, "_lora_active_names", [])
    if was_active:
        unfuse_lora(model)
    for _, mod in _lora_linears(model):
        old = mod.lora_adapters.pop(name, None)
        if old is not None:
            mod.lora_active = [a for a in mod.lora_active if a is not old]
    _bump_state(model)
    for module_path, adapter in adapters.items():
        mod = model.get_submodule(module_path)
        adapter.__dict__["_owner"] = weakref.ref(model)
        mod.lora_adapters[name] = adapter
        if was_active:
            mod.lora_active.append(adapter)
    names = getattr(model, "_lora_names", [])
    if name not in names:
        names.append(name)
    model._lora_names = names
    return sorted(adapters)


def _adapter_dtype(mod: LoRALinear) -> torch.dtype:
    """The dtype a module's adapter tensors are stored in: the dtype it computes in, i.e. its weight
    dtype, or for an fp8 ``Fp8Linear`` its ``act_dtype`` (an adapter loaded after ``quantize_dit_fp8``,
    as the refinement LoRA is, was cast to e4m3 without a scale: small values flushed to zero)."""
    return getattr(mod, "act_dtype", None) or mod.weight.dtype


def _check_adapters_fit_dtype(adapters: Dict[str, LoRAAdapter], path: str) -> None:
    """ValueError naming the modules whose adapter tensors (finite in the file) became Inf once cast to
    their dtype, e.g. an fp32 value above 65504 into an fp16 model: every output of the module would be
    NaN, found only after a whole run as NaN latents."""
    from .loading import _has_non_finite

    bad = sorted(f"{module_path} ({a.down.dtype})" for module_path, a in adapters.items()
                 if _has_non_finite(a.down) or any(_has_non_finite(p.up) for p in a.parts))
    if bad:
        raise ValueError(f"load_lora({path!r}): values overflow the model dtype (finite in the file, Inf once "
                         "converted) in " + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
                         + "; load the model in a wider dtype (bfloat16 or float32)")


@_holding_model_lock
def enable_loras(model: nn.Module, names: Sequence[str]) -> None:
    """Makes exactly ``names`` active (in that order; their outputs add up). Unfuses first."""
    if isinstance(names, str):
        names = [names]
    # a generator was read up by the checks below: nothing was enabled, without a word
    names = list(names)
    known = getattr(model, "_lora_names", [])
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"enable_loras: unknown LoRA name(s) {missing}; loaded: {known}")
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:  # each occurrence would add the adapter's output once more
        raise ValueError(f"enable_loras: name(s) {dup} given more than once; got {list(names)}")
    unfuse_lora(model)
    try:
        for _, mod in _lora_linears(model):
            mod.lora_active = [mod.lora_adapters[n] for n in names if n in mod.lora_adapters]
        model._lora_active_names = list(names)
    finally:  # (see fuse_lora)
        _bump_state(model)


@_holding_model_lock
def disable_loras(model: nn.Module) -> None:
    """No adapter active (weights restored if they were fused)."""
    unfuse_lora(model)
    try:
        for _, mod in _lora_linears(model):
            mod.lora_active = []
        model._lora_active_names = []
    finally:  # (see fuse_lora)
        _bump_state(model)


@_holding_model_lock
def fuse_lora(model: nn.Module) -> None:
    """Merges the active adapters into the weights (``W += delta`` computed in fp32, in fp64 for fp64
    weights). A refusal (fp8 weights: ``longcat_vc.fp8``; merged weights not finite in the weight dtype)
    comes before any module changed. While fused, ``state_dict()`` holds the merged weights under the base names."""
    for _, mod in _lora_linears(model):
        mod._check_fuse()
    _check_fuse_fits_dtype(model)
    try:
        for _, mod in _lora_linears(model):
            mod._fuse()
    finally:
        # also after a failure part way (out of memory for a module's delta, a KeyboardInterrupt): the modules
        # fused so far changed the weights, and a KV cache built before stayed "fresh" for a compiled forward,
        # which checks this counter only (each module keeps its own fused state: fuse_lora() again completes
        # the fuse, unfuse_lora() takes back what was fused)
        _bump_state(model)


@torch.no_grad()
def _check_fuse_fits_dtype(model: nn.Module) -> None:
    """ValueError naming the modules whose fused weights ``W + delta`` would not be finite in the weight
    dtype (e.g. multiplier 1e7 on an fp16 model): the fuse wrote Inf weights and ``unfuse_lora`` could
    not take them back (Inf - delta = Inf), so the base weights were lost. Runs before any module
    changes (one extra delta per module; fusing is done once)."""
    bad = []
    for path, mod in _lora_linears(model):
        if mod.lora_fused or not mod.lora_active or mod.weight.dtype not in LORA_FILE_DTYPES:  # fp8: _check_fuse
            continue
        acc = _merge_dtype(mod.weight.dtype)
        delta = sum(a.delta_weight(acc, mod.out_features) for a in mod.lora_active)
        fused = (mod.weight.to(acc) + delta.to(mod.weight.device)).to(mod.weight.dtype)
        if not bool(torch.isfinite(fused).all()):
            bad.append(f"{path} ({mod.weight.dtype}, multiplier(s) "
                       + ", ".join(f"{a.name}={a.multiplier:g}" for a in mod.lora_active) + ")")
    if bad:
        raise ValueError("fuse_lora: the fused weights overflow the weight dtype (non-finite W + delta) in "
                         + ", ".join(bad[:10]) + (" ..." if len(bad) > 10 else "")
                         + "; nothing was fused: lower the multiplier or load the model in a wider dtype")


@_holding_model_lock
def unfuse_lora(model: nn.Module) -> None:
    """Undoes ``fuse_lora`` (``W -= delta``; within 1 ulp of the weight dtype). A refusal
    (fp8 weights quantised with the LoRA fused in) comes before any module changed."""
    for _, mod in _lora_linears(model):
        mod._check_unfuse()
    try:
        for _, mod in _lora_linears(model):
            mod._unfuse()
    finally:  # (see fuse_lora)
        _bump_state(model)
