"""LoRA fine-tuning of the LongCat-Video DiT with ``peft``, saved in LongCat's LoRA format (SPEC 8).

Usage::

    dit = LongCatDiT.from_pretrained(..., dtype=torch.bfloat16, device="cuda")   # enable_bsa in its config
    model = add_lora(dit, lora_config(rank=128, alpha=64))     # peft.PeftModel, only adapters train
    enable_activation_checkpointing(dit)                       # recompute each block in backward
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for latents, text, mask in data:
        loss = flow_matching_loss(model, latents, text, mask)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    save_longcat_lora(model, "my_lora.safetensors")            # dit.load_lora(...) reads it back

Adapters: ``peft.LoraConfig`` on the ``nn.Linear`` modules named in SPEC 8 (``attn.qkv``,
``attn.proj``, ``cross_attn.q_linear``, ``cross_attn.kv_linear``, ``ffn.w1/w2/w3``; the refinement
set adds ``adaLN_modulation.1`` and ``final_layer.linear``). peft wraps each target as
``<path>.base_layer`` + ``<path>.lora_A/B``; nothing of that reaches a file: ``save_longcat_lora``
writes the adapters under LongCat's keys and ``PeftModel.unload()`` gives back the DiT with its
upstream state-dict names (SPEC 6); after peft's ``merge_adapter()`` call ``unmerge_adapter()`` first:
``unload()`` keeps merged weights, and ``load_lora`` of the saved file on that DiT then applies the
adapter twice (the file itself is the same either way). The DiT's own ``LoRALinear`` adapters (``load_lora``) are a
separate, inference-side mechanism; leave them disabled while training.

Attention in the loop: BSA when the config has ``enable_bsa`` (``block_sparse_attn`` is
differentiable on the torch and triton backends; the csrc kernel is forward only, so on CUDA ``"auto"``
takes ``csrc_sm90_ws_triton_bwd``, the csrc forward with the Triton backward, where that forward
applies (Hopper with the extension, head_dim 128, 64-token blocks), else Triton), else dense SDPA (the DiT's dense path switches to SDPA when gradients
are needed). Training covers the plain text-to-video forward (no cond latents, no KV cache):
the cached and cond-prefix attention ops are forward only (with gradients on, a forward with a
``kv_cache``, or with ``num_cond_latents`` and BSA over more than one cond and one noisy latent frame,
raises ValueError; the dense cond-prefix path, which takes those small BSA grids too, runs ``prefix_attn``
on the torch backend, which has a backward, wherever gradients are needed under ``auto``).

Loss (rectified flow, LongCat's convention): ``x_s = (1 - s) x0 + s e``, timestep ``1000 s``; the
DiT predicts the negated velocity, ``-(e - x0) = x0 - e`` (SPEC 7: the sampler steps with
``v = -prediction``), so ``loss = mean((model(x_s, 1000 s) - (x0 - e))^2)`` in fp32.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_kernels._validate import check_bool

from .loading import _has_non_finite
from .lora import LORA_FILE_DTYPES, LORA_HYPHEN, LORA_PREFIX, carries_peft_adapters, longcat_lora_key

__all__ = [
    "LORA_TARGETS_CFG_STEP",
    "LORA_TARGETS_REFINEMENT",
    "lora_config",
    "add_lora",
    "enable_activation_checkpointing",
    "disable_activation_checkpointing",
    "sample_sigmas",
    "flow_matching_loss",
    "longcat_lora_state_dict",
    "save_longcat_lora",
]

# peft target names (suffixes of module paths) of LongCat's released LoRAs (SPEC 8).
LORA_TARGETS_CFG_STEP: Tuple[str, ...] = (
    "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "ffn.w1", "ffn.w2", "ffn.w3",
)
# "adaLN_modulation.1" matches both blocks.i.adaLN_modulation.1 and final_layer.adaLN_modulation.1.
LORA_TARGETS_REFINEMENT: Tuple[str, ...] = LORA_TARGETS_CFG_STEP + ("adaLN_modulation.1", "final_layer.linear")

# Fused outputs that LongCat's files store split in n parts (``lora_up.blocks.{j}``), SPEC 8.
_SPLIT_PARTS: Sequence[Tuple[re.Pattern, int]] = (
    (re.compile(r"^blocks\.\d+\.attn\.qkv$"), 3),
    (re.compile(r"^blocks\.\d+\.cross_attn\.kv_linear$"), 2),
    (re.compile(r"^blocks\.\d+\.adaLN_modulation\.1$"), 6),
    (re.compile(r"^final_layer\.adaLN_modulation\.1$"), 2),
)


def _split_parts(module_path: str) -> int:
    for pattern, n in _SPLIT_PARTS:
        if pattern.match(module_path):
            return n
    return 1


def _peft():
    try:
        import peft  # noqa: PLC0415
    except ImportError as e:  # pragma: no cover - peft is a declared dependency
        raise ImportError(f"longcat_vc.training needs peft (pip install peft): {e}") from None
    return peft


def lora_config(rank: int = 128, alpha: float = 64.0, targets: Sequence[str] = LORA_TARGETS_CFG_STEP,
                dropout: float = 0.0, **kwargs):
    """A ``peft.LoraConfig`` for the LongCat DiT.

    Args:
        rank (int): adapter rank r (LongCat's released LoRAs: 128).
        alpha (float): ``lora_alpha``; the adapter is scaled by ``alpha / rank`` (0.5 for 64 / 128),
            which is what ``save_longcat_lora`` writes as ``alpha_scale``.
        targets (sequence of str): module-path suffixes (``LORA_TARGETS_CFG_STEP`` /
            ``LORA_TARGETS_REFINEMENT``).
        dropout (float): ``lora_dropout`` (training only; not part of the saved adapter).
        kwargs: further ``LoraConfig`` fields (e.g. ``init_lora_weights``).
    """
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank: expected a positive int, got {type(rank).__name__} {rank!r}")
    if rank <= 0:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha: expected a finite positive number, got {type(alpha).__name__} {alpha!r}")
    # inf would scale the adapter by inf (NaN outputs after the first step), NaN likewise
    if not 0 < alpha < float("inf"):
        raise ValueError(f"alpha: expected a finite positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real):
        raise TypeError(f"dropout: expected a float in [0, 1), got {type(dropout).__name__} {dropout!r}")
    if not 0 <= dropout < 1:  # 1 would zero every adapter input
        raise ValueError(f"dropout: expected a float in [0, 1), got {dropout!r}")
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"lora_config: targets must be a non-empty sequence of module names, got {targets!r}")
    for bad in ("use_dora", "bias"):
        if kwargs.get(bad) not in (None, False, "none"):
            raise ValueError(f"lora_config: {bad}={kwargs[bad]!r} cannot be saved in LongCat's LoRA format")
    # per-module alphas as alpha itself (a NaN one gave a NaN loss from step 0, a 0 an inert adapter)
    for name, a in dict(kwargs.get("alpha_pattern") or {}).items():
        if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 < a < float("inf"):
            raise ValueError(f"lora_config: alpha_pattern[{name!r}]: expected a finite positive number, got {a!r}")
    # per-module ranks as rank itself (a float failed deep in torch: "empty(): argument 'size' ...")
    for name, r in dict(kwargs.get("rank_pattern") or {}).items():
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r <= 0:
            raise ValueError(f"lora_config: rank_pattern[{name!r}]: expected a positive int, got "
                             f"{type(r).__name__} {r!r}")
    config = _peft().LoraConfig(r=int(rank), lora_alpha=float(alpha), target_modules=list(targets),
                                lora_dropout=float(dropout), bias="none", **kwargs)
    _check_savable(config, "lora_config")
    return config


# initialisations that leave the base weights alone (orthogonal sets A and B only; pissa, olora,
# loftq, corda, eva rewrite them:
# a file of the adapter alone, applied to the released DiT, would then give another model)
_SAVABLE_INITS = (True, False, "gaussian", "orthogonal")


def _check_savable(config, where: str) -> None:
    """Raises for peft settings whose training result LongCat's LoRA format cannot hold."""
    if getattr(config, "modules_to_save", None):
        raise ValueError(f"{where}: modules_to_save={config.modules_to_save!r} trains whole modules, which LongCat's "
                         "LoRA format cannot hold (the saved file would silently lack them)")
    init = getattr(config, "init_lora_weights", True)
    if not any(init is v or (isinstance(v, str) and init == v) for v in _SAVABLE_INITS):
        raise ValueError(f"{where}: init_lora_weights={init!r} rewrites the base weights, so the saved adapter "
                         f"would not reproduce the trained model on the released DiT; use one of {_SAVABLE_INITS}")
    if getattr(config, "use_dora", False):
        raise ValueError(f"{where}: use_dora=True cannot be saved in LongCat's LoRA format")
    # a peft config made by hand: bias="all"/"lora_only" trains the base layers' biases, which the saved
    # file silently lacked; lora_bias was refused only by the save, after the training
    bias = getattr(config, "bias", "none")
    if bias != "none":
        raise ValueError(f"{where}: bias={bias!r} trains the base layers' biases, which LongCat's LoRA format cannot "
                         "hold (the saved file would silently lack them); use bias='none'")
    if getattr(config, "lora_bias", False):
        raise ValueError(f"{where}: lora_bias=True cannot be saved in LongCat's LoRA format")
    # peft's other LoRA variants change what the adapter computes (aLoRA applies it to part of the
    # tokens, KaSA adds a singular-value diagonal and rewrites the base weights, BD-LoRA keeps block-diagonal
    # factors, Arrow/MonteCLoRA route or sample): the file held plain B A and gave another model, or one
    # load_lora refused, found after the training. VeLoRA only compresses the activations kept for backward.
    for field in _variant_fields(config):
        if field not in ("use_dora", "velora_config") and getattr(config, field, None):
            raise ValueError(f"{where}: {field}={getattr(config, field)!r} (a peft LoRA variant) cannot be saved in "
                             "LongCat's LoRA format (plain y = W x + B A x * alpha_scale); leave it unset")


def _variant_fields(config) -> List[str]:
    """Names of the ``LoraConfig`` fields peft marks as selecting a LoRA variant (``is_lora_variant``)."""
    import dataclasses  # noqa: PLC0415

    if not dataclasses.is_dataclass(config):
        return []
    return [f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant")]


def add_lora(dit: nn.Module, config=None, *, adapter_name: str = "default", fp32_adapters: bool = True):
    """Wraps ``dit`` (a ``LongCatDiT``) with ``peft.get_peft_model``: adapters on the targets of
    ``config`` (default ``lora_config()``), every other parameter frozen.

    ``fp32_adapters`` (peft's ``autocast_adapter_dtype``): on a bf16/fp16 DiT, keep the adapter
    weights in fp32 (optimizer updates are not rounded to bf16; peft then runs each adapter in
    fp32, casting its input, which costs an fp32 copy of every adapted layer's input). False:
    adapters in the weight dtype (less memory and time, coarser updates).

    Returns:
        peft.PeftModel: call it like the DiT; ``.get_base_model()`` is ``dit`` (modified in place).

    Raises:
        ValueError: the DiT has LoRAs of its own (``load_lora``) active, already has peft adapters
            (a second call would re-initialise the trained ones), a target matches no ``nn.Linear`` (or
            also a module that is not one, e.g. ``"proj"`` the Conv3d ``x_embedder.proj``), or
            the config trains what LongCat's format cannot hold (``modules_to_save``, base biases,
            ``lora_bias``, DoRA or another peft LoRA variant but VeLoRA, an init that rewrites the base weights).
    """
    peft = _peft()
    config = lora_config() if config is None else config
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"add_lora: config must be a peft.LoraConfig, got {type(config).__name__}")
    _check_savable(config, "add_lora: config")
    if not isinstance(dit, nn.Module):
        raise TypeError(f"dit: expected a LongCatDiT, got {type(dit).__name__}")
    if not isinstance(adapter_name, str) or not adapter_name:
        raise TypeError(f"adapter_name: expected a non-empty str, got {adapter_name!r}")
    check_bool(fp32_adapters, "fp32_adapters")
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    if isinstance(dit, peft.PeftModel) or any(isinstance(m, LoraLayer) for m in dit.modules()):
        # peft would re-initialise an adapter of the same name in place: trained weights lost
        raise ValueError(
            "dit: expected a DiT without peft adapters, got one that already has them (add_lora was called on it "
            "before); keep training the model add_lora returned, or save it and call .unload() first"
        )
    _check_not_fp8(dit, "add_lora")
    active = list(getattr(dit, "_lora_active_names", []) or [])
    if active:
        raise ValueError(f"add_lora: the DiT has LoRAs {active} active; call dit.disable_loras() first")
    targets = config.target_modules
    if isinstance(targets, (list, tuple, set)):
        # peft raises only when no target matches: a misspelt one beside good ones was dropped silently
        linears = [n for n, m in dit.named_modules() if isinstance(m, nn.Linear)]
        missing = sorted(t for t in targets if not any(n == t or n.endswith("." + t) for n in linears))
        if missing:
            raise ValueError(f"add_lora: targets {missing} match no nn.Linear of the DiT (module paths end like "
                             f"{sorted({n.split('.', 2)[-1] for n in linears})[:8]})")
    _check_targets_are_linear(dit, config)
    return peft.get_peft_model(dit, config, adapter_name=adapter_name, autocast_adapter_dtype=bool(fp32_adapters))


def _check_not_fp8(model: nn.Module, where: str) -> None:
    """ValueError when the DiT in ``model`` has fp8 linears (``quantize_dit_fp8``)."""
    from .fp8 import Fp8Linear  # noqa: PLC0415

    fp8 = [n for n, m in _unwrap(model).named_modules() if isinstance(m, Fp8Linear)]
    if fp8:
        # the fp8 linears quantise their input without a gradient: every adapter before the last one
        # got a zero (or no) gradient, and the loss still went down through the rest, silently
        raise ValueError(f"{where}: the DiT's weights are fp8 (quantize_dit_fp8: {fp8[0]}, ... {len(fp8)} linears), "
                         "through which no gradient flows; train on the unquantised DiT (bfloat16) and quantise "
                         "for inference after")


def _check_targets_are_linear(dit: nn.Module, config) -> None:
    """Every module the config's targets match (peft's own rule) is an ``nn.Linear``: ``"proj"`` also matched
    ``x_embedder.proj`` (a Conv3d), which peft adapts and trains, and only the save refused it."""
    from peft.tuners.tuners_utils import check_target_module_exists  # noqa: PLC0415

    other = [f"{n} ({type(m).__name__})" for n, m in dit.named_modules()
             if n and not isinstance(m, nn.Linear) and check_target_module_exists(config, n)]
    if other:
        t = config.target_modules
        raise ValueError(f"add_lora: targets {sorted(t) if isinstance(t, (set, frozenset)) else t!r} also match {other}, "
                         "which LongCat's LoRA format cannot hold (nn.Linear only); name the linears by a longer "
                         "suffix (e.g. 'attn.proj') or leave these out with exclude_modules")


# ====================================================================== activation checkpointing
def _checkpointed_forward(block: nn.Module, *args, **kwargs):
    if torch.is_grad_enabled():
        # Non-reentrant: keeps the plan (non-tensor) arguments and works with frozen inputs.
        return torch.utils.checkpoint.checkpoint(type(block).forward, block, *args, use_reentrant=False, **kwargs)
    return type(block).forward(block, *args, **kwargs)


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recomputes each DiT block in the backward pass instead of keeping its activations.

    The block's ``forward`` is replaced on the instance (module names, and so the state dict,
    stay as they are). Under ``torch.no_grad()`` blocks run normally. ``model``: a ``LongCatDiT``
    or a peft model around one. Returns the number of blocks.
    """
    dit = _base_dit(model)
    _refuse_streamer(dit, "enable_activation_checkpointing")
    for block in dit.blocks:
        block.forward = functools.partial(_checkpointed_forward, block)
    return len(dit.blocks)


def disable_activation_checkpointing(model: nn.Module) -> None:
    """Undoes ``enable_activation_checkpointing``."""
    dit = _base_dit(model)
    _refuse_streamer(dit, "disable_activation_checkpointing")
    for block in dit.blocks:
        block.__dict__.pop("forward", None)


def _refuse_streamer(dit: nn.Module, where: str) -> None:
    """ValueError while a ``BlockStreamer`` is attached: it wraps each block's forward and puts back, at
    ``detach()``, the one it found; a switch in between replaced its wrapper (enable) or removed it (disable),
    and detach then silently undid the switch (checkpointing off again, or back on)."""
    if getattr(dit, "_block_streamer", None) is not None:
        raise ValueError(f"{where}: the DiT has a block streamer attached (memory='balanced'/'low'); switch "
                         "activation checkpointing before attaching it, or detach it first")


def _unwrap(model: nn.Module) -> nn.Module:
    """The DiT inside ``model``: a ``LongCatDiT``, a peft model around one, or that inside a wrapper
    (``DataParallel`` / ``DistributedDataParallel``'s ``.module``, peft's ``LoraModel`` at ``.base_model``).
    Module paths, and so the saved LongCat keys, are relative to it: through a wrapper they started with
    ``module.base_model.model.`` and the file matched no module of the DiT."""
    from .dit import LongCatDiT  # noqa: PLC0415

    if isinstance(model, nn.Module) and not isinstance(model, LongCatDiT):
        dits = [m for m in model.modules() if isinstance(m, LongCatDiT)]
        if len(dits) > 1:  # e.g. a student and a frozen teacher: the one with peft adapters
            dits = [d for d in dits if carries_peft_adapters(d)]
        if len(dits) == 1:
            return dits[0]
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _peft_configs(model: nn.Module) -> dict:
    """``peft_config`` of the peft model in ``model`` (itself, or inside a wrapper); {} when none."""
    for m in model.modules() if isinstance(model, nn.Module) else ():
        cfg = getattr(m, "peft_config", None)
        if isinstance(cfg, dict):
            return cfg
    return {}


def _base_dit(model: nn.Module) -> nn.Module:
    base = _unwrap(model)
    if not hasattr(base, "blocks") or not isinstance(base.blocks, nn.ModuleList):
        raise TypeError(f"expected a LongCatDiT (or a peft model around one), got {type(base).__name__}")
    return base


# ====================================================================== flow-matching loss
def sample_sigmas(batch: int, *, shift: float = 1.0, generator: Optional[torch.Generator] = None,
                  device=None, sigma_min: float = 1e-3) -> torch.Tensor:
    """``[batch]`` fp32 noise levels: uniform in ``[sigma_min, 1]``, then the sampler's shift
    ``s' = shift*s / (1 + (shift-1)*s)`` (SPEC 7; shift > 1 puts more steps at high noise)."""
    # a bool / float was torch.rand's unnamed "invalid combination of arguments", 0 an empty tensor
    if isinstance(batch, bool) or not isinstance(batch, numbers.Integral) or batch < 1:
        raise ValueError(f"sample_sigmas: batch must be a positive int, got {type(batch).__name__} {batch!r}")
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not 0 < shift < float("inf"):
        raise ValueError(f"sample_sigmas: shift must be a positive finite number, got {shift!r}")
    if isinstance(sigma_min, bool) or not isinstance(sigma_min, numbers.Real) or not 0 <= sigma_min < 1:
        raise ValueError(f"sample_sigmas: sigma_min must be a number in [0, 1), got {sigma_min!r}")
    s = torch.rand(int(batch), generator=generator, dtype=torch.float32)
    s = sigma_min + (1.0 - sigma_min) * s
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return s.to(device) if device is not None else s


def flow_matching_loss(
    model: nn.Module,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    encoder_attention_mask: Optional[torch.Tensor] = None,
    *,
    sigmas: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    shift: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Rectified-flow loss of one batch (module docstring), a 0-d fp32 tensor.

    Args:
        model: a ``LongCatDiT`` or a peft model around one.
        latents (Tensor): ``[B, 16, T, H, W]`` clean latents ``x0`` (normalised as the VAE's).
        encoder_hidden_states (Tensor): ``[B, 1, L, caption_channels]``.
        encoder_attention_mask (Tensor | None): ``[B, L]``.
        sigmas (Tensor | None): ``[B]`` noise levels in [0, 1]; default ``sample_sigmas``.
        noise (Tensor | None): like ``latents``; default standard normal.
        shift, generator: for the default sigmas and noise (``generator`` on the CPU); a shift other than
            1.0 beside given ``sigmas`` raises ValueError (it would be ignored).
    """
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5:
        raise ValueError(
            f"latents: expected a Tensor [B, C, T, H, W], got "
            f"{list(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__}"
        )
    B = latents.shape[0]
    x0 = latents.float()
    if sigmas is not None and shift != 1.0:
        # the shift only shapes the default sigmas: given ones were used unshifted, without a word
        raise ValueError(f"shift={shift!r} is used only for the default sigmas (sigmas=None); apply it to the given "
                         "sigmas yourself (s' = shift*s / (1 + (shift-1)*s)) or leave shift at 1.0")
    if sigmas is None:
        sigmas = sample_sigmas(B, shift=shift, generator=generator)
    if not isinstance(sigmas, torch.Tensor) or tuple(sigmas.shape) != (B,):
        raise ValueError(f"sigmas: expected a Tensor of shape [{B}], got "
                         f"{list(sigmas.shape) if isinstance(sigmas, torch.Tensor) else type(sigmas).__name__}")
    if bool(((sigmas < 0) | (sigmas > 1) | sigmas.isnan()).any()):
        raise ValueError(f"sigmas: expected values in [0, 1], got {sigmas.tolist()}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    elif not isinstance(noise, torch.Tensor):  # a list / numpy array was an AttributeError on '.shape' / '.to'
        raise TypeError(f"noise: expected a Tensor shaped like the latents {list(latents.shape)} or None, got "
                        f"{type(noise).__name__}")
    elif tuple(noise.shape) != tuple(latents.shape):
        raise ValueError(f"noise: expected shape {list(latents.shape)}, got {list(noise.shape)}")
    if torch.is_grad_enabled():
        _check_no_own_loras(model, "flow_matching_loss")
        # add_lora refused an fp8 DiT, but quantize_dit_fp8 after it (or peft by hand) trained on silently
        _check_not_fp8(model, "flow_matching_loss")
    s = sigmas.to(device=x0.device, dtype=torch.float32).view(B, 1, 1, 1, 1)
    noise = noise.to(device=x0.device, dtype=torch.float32)
    x_s = (1.0 - s) * x0 + s * noise
    pred = model(x_s, sigmas.to(x0.device).float() * 1000.0, encoder_hidden_states, encoder_attention_mask)
    if tuple(pred.shape) != tuple(x0.shape):
        # mse_loss broadcast a 1-channel prediction against the target with only a UserWarning
        raise ValueError(f"flow_matching_loss: the model's prediction {list(pred.shape)} is not shaped like the latents "
                         f"{list(x0.shape)}; the velocity target needs a DiT with out_channels == in_channels")
    return F.mse_loss(pred.float(), x0 - noise)


def _check_no_own_loras(model: nn.Module, where: str) -> None:
    """The DiT's own ``load_lora`` adapters are off: add_lora refused them, but enable_loras / fuse_lora after
    it went through, and the peft adapter then trained on top of them (a file of it alone gave another model)."""
    base = _unwrap(model)
    active = list(getattr(base, "_lora_active_names", []) or [])
    if active:
        raise ValueError(f"{where}: the DiT has its own LoRAs {active} active (load_lora / enable_loras); the peft "
                         "adapter would be trained or saved on top of them, and a file of it alone would give another "
                         "model; call disable_loras() on the DiT first")


# ====================================================================== saving (LongCat format)
def _lora_layers(model: nn.Module, adapter_name: str) -> List[Tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    base = _unwrap(model)
    layers = []
    for path, mod in base.named_modules():
        if isinstance(mod, LoraLayer) and adapter_name in getattr(mod, "lora_A", {}):
            layers.append((path, mod))
    return layers


def _check_file_dtype(dtype: Optional[torch.dtype]) -> None:
    """``dtype`` is None or one ``load_lora`` reads (an fp8 file was written, then failed to load)."""
    if dtype is not None and dtype not in LORA_FILE_DTYPES:
        raise ValueError(f"dtype: expected None or one of {', '.join(map(str, LORA_FILE_DTYPES))} (what load_lora "
                         f"reads), got {dtype}")


def _cast_adapter(path: str, A: torch.Tensor, B: torch.Tensor, dtype: torch.dtype):
    """``(A.to(dtype), B.to(dtype), non_finite)``: each cast once and the result scanned once.

    Raises when finite adapter weights overflow the narrower ``dtype`` they are saved in (fp32 above
    65504 as fp16): the file would hold Inf/NaN that ``load_lora`` refuses. ``non_finite``: the
    adapter itself holds NaN/Inf (a cast keeps them, so only a non-finite cast looks at the original
    to tell an overflow from a diverged adapter)."""
    out, non_finite = [], False
    for name, t in (("lora_A", A), ("lora_B", B)):
        c = t.to(dtype)
        out.append(c)
        if not _has_non_finite(c):
            continue
        if t.dtype != dtype and not _has_non_finite(t):
            raise ValueError(f"dtype: {path}.{name} has values beyond the range of {dtype} "
                             f"(max |value| {t.abs().max().item():.4g}); save with a wider dtype (e.g. torch.float32); "
                             "nothing was saved")
        non_finite = True
    return out[0], out[1], non_finite


@torch.no_grad()
def longcat_lora_state_dict(model: nn.Module, *, adapter_name: str = "default", split_fused: bool = True,
                            dtype: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """The peft adapter ``adapter_name`` of ``model`` as LongCat LoRA tensors (SPEC 8).

    Per adapted module (path relative to the DiT, e.g. ``blocks.0.attn.qkv``) with peft's
    ``A [r, in]``, ``B [out, r]`` and scaling ``s`` (``alpha / r``, or ``alpha / sqrt(r)`` with
    rsLoRA): ``alpha_scale = s`` (0-d fp32) and

    * ``split_fused`` and a fused output of n parts (``attn.qkv`` 3, ``cross_attn.kv_linear`` 2,
      ``adaLN_modulation.1`` 6 in blocks / 2 in the final layer; the layout of LongCat's released
      files): ``lora_down = [A; A; ...] [n*r, in]`` and ``lora_up.blocks.{j} = B[j*out/n ..] [out/n, r]``.
      Exact: part j computes ``B_j A x``, the rows of ``B A x`` it owns (n times the down
      rows on disk and at inference, which is what a split file costs anyway).
    * otherwise ``lora_down = A``, ``lora_up.weight = B``.

    ``dtype``: of the down/up tensors (default: the adapter's).
    """
    _check_file_dtype(dtype)
    layers = _lora_layers(model, adapter_name)
    if not layers:
        raise ValueError(f"longcat_lora_state_dict: the model has no peft LoRA adapter named {adapter_name!r}")
    _check_no_own_loras(model, "longcat_lora_state_dict")
    cfg = _peft_configs(model).get(adapter_name)
    if cfg is not None:  # a config made without lora_config() / add_lora()
        _check_savable(cfg, "longcat_lora_state_dict")
    from peft.utils import ModulesToSaveWrapper  # noqa: PLC0415

    if any(isinstance(m, ModulesToSaveWrapper) for m in model.modules()):
        raise ValueError("longcat_lora_state_dict: the model trains whole modules (peft modules_to_save), which "
                         "LongCat's LoRA format cannot hold")
    out: Dict[str, torch.Tensor] = {}
    for path, mod in layers:
        if getattr(mod, "use_dora", {}).get(adapter_name, False):
            raise ValueError(f"{path}: DoRA adapters cannot be saved in LongCat's LoRA format")
        if getattr(mod, "lora_bias", {}).get(adapter_name, False):
            raise ValueError(f"{path}: LoRA biases cannot be saved in LongCat's LoRA format")
        variant = (getattr(mod, "lora_variant", None) or {}).get(adapter_name)
        if variant is not None and type(variant).__name__ != "VeloraLinearVariant":
            raise ValueError(f"{path}: a peft LoRA variant ({type(variant).__name__}) cannot be saved in LongCat's "
                             "LoRA format")
        base = mod.get_base_layer()
        if not isinstance(base, nn.Linear) or getattr(mod, "fan_in_fan_out", False):
            raise ValueError(f"{path}: only nn.Linear targets can be saved (got {type(base).__name__})")
        A = mod.lora_A[adapter_name].weight
        B = mod.lora_B[adapter_name].weight
        dt = A.dtype if dtype is None else dtype
        n = _split_parts(path) if split_fused else 1
        A_dt, B_dt, non_finite = _cast_adapter(path, A, B, dt)
        if n > 1 and B.shape[0] % n:
            raise ValueError(f"{path}: out_features {B.shape[0]} not divisible into {n} parts")
        scaling = float(mod.scaling[adapter_name])
        if not math.isfinite(scaling) or non_finite:
            # a diverged training run: the file would only be refused by load_lora, later
            raise ValueError(f"{path}: the adapter holds NaN/Inf (lora_A, lora_B or its scaling); training "
                             "diverged? nothing was saved")
        if n > 1:
            o = B.shape[0] // n
            out[longcat_lora_key(path, "lora_down.weight")] = A_dt.repeat(n, 1).contiguous()
            for j in range(n):
                out[longcat_lora_key(path, f"lora_up.blocks.{j}.weight")] = B_dt[j * o:(j + 1) * o].clone()
        else:
            # own copies (the cast is the parameter itself when the dtype matches)
            out[longcat_lora_key(path, "lora_down.weight")] = A_dt.clone()
            out[longcat_lora_key(path, "lora_up.weight")] = B_dt.clone()
        out[longcat_lora_key(path, "alpha_scale")] = torch.tensor(scaling, dtype=torch.float32)
    return {k: v.detach().cpu() for k, v in out.items()}


_SAVE_META = {"format": "pt", "lora_format": "longcat"}


def save_longcat_lora(model: nn.Module, path: "str | os.PathLike[str]", *, adapter_name: str = "default",
                      split_fused: bool = True, dtype: Optional[torch.dtype] = None,
                      metadata: Optional[Dict[str, str]] = None, overwrite: bool = False) -> List[str]:
    """Writes ``longcat_lora_state_dict(model, ...)`` to a ``.safetensors`` file that
    ``LongCatDiT.load_lora`` (and upstream LongCat-Video's LoRA loader) reads. Upstream's ``load_lora`` builds every
    module at one rank, ``lora_network_dim`` (default 128), and loads strictly: pass it the adapter's rank; a file
    with per-module ranks (``rank_pattern``) only ``LongCatDiT.load_lora`` reads.

    ``dtype``: float16, bfloat16, float32, float64 (what ``load_lora`` reads) or None; ``metadata``:
    extra str -> str header entries (not ``format`` / ``lora_format``, which this writes);
    ``overwrite``: replace an existing file.

    Returns the adapted module paths (``blocks.0.attn.qkv``, ...).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False (nothing is written).
        FileNotFoundError / IsADirectoryError: the folder of ``path`` is missing, or ``path`` is one.
        OSError: the file could not be written (e.g. a read-only folder), naming ``path``.
        ValueError / TypeError: bad arguments, or a model without the peft adapter.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    from .loading import check_dtype  # noqa: PLC0415

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    check_bool(overwrite, "overwrite")
    check_bool(split_fused, "split_fused")
    # a LoRA file takes the dtypes load_lora reads (check_dtype's fp8 hint is about DiT weights); an int
    # dtype would round every adapter weight to an integer without a word
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        _check_file_dtype(dtype)
    check_dtype(dtype)
    meta = dict(_SAVE_META)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise TypeError(f"metadata: expected a dict of str -> str or None, got {metadata!r}")
        clash = sorted(set(metadata) & set(_SAVE_META))
        if clash:
            raise ValueError(f"metadata: expected no keys {sorted(_SAVE_META)} (written by save_longcat_lora), "
                             f"got {clash}")
        meta.update(metadata)
    if os.path.isdir(path):
        raise IsADirectoryError(f"path: expected a file path, got the folder {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path: the folder {folder!r} of {path!r} does not exist")
    # checked before the tensors are built, and so before anything is written
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"path: {path!r} exists; pass overwrite=True to replace it")
    tensors = longcat_lora_state_dict(model, adapter_name=adapter_name, split_fused=split_fused, dtype=dtype)
    try:
        # safetensors writes a temporary file and renames it: a failed write leaves an old file intact
        save_file(tensors, path, metadata=meta)
    except Exception as e:
        raise OSError(f"path: could not write {path!r}: {e}") from e
    return sorted({k[len(LORA_PREFIX):].split(".", 1)[0].replace(LORA_HYPHEN, ".") for k in tensors})
