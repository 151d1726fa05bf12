"""Upstream LongCat-Video's DiT for side-by-side GPU measurements (refine step, memory modes).

The device machine has no network: a checkout of ``meituan-longcat/LongCat-Video`` is carried
(``.gpu_carry/upstream``, its ``longcat_video`` package) and imported from that path. Upstream's
cross-attention (and dense self-attention) calls ``flash_attn``; where it is not installed, a
PyTorch SDPA stand-in with the same signatures is put in ``sys.modules`` first (said in the note
each function returns). Upstream's own Triton BSA is used as is.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys
import types
from typing import Optional, Tuple


def upstream_bsa(path: Optional[str]):
    """``(flash_attn_bsa_3d, note)`` of the checkout at ``path`` (upstream's gating + Triton BSA
    forward/backward, [B, H, S, D] inputs), or ``(None, why)``."""
    if not path:
        return None, "no --upstream"
    sys.path.insert(0, os.path.abspath(path))
    try:
        from longcat_video.block_sparse_attention.bsa_interface import flash_attn_bsa_3d

        return flash_attn_bsa_3d, "longcat_video.block_sparse_attention.bsa_interface.flash_attn_bsa_3d"
    except Exception as e:  # noqa: BLE001 - reported, the caller times the rest
        return None, f"upstream import failed: {type(e).__name__}: {e}"


def flash_attn_or_standin() -> str:
    """Imports ``flash_attn`` or installs the SDPA stand-in; returns which one upstream will use."""
    try:
        import flash_attn  # noqa: F401

        return "flash_attn (installed)"
    except ImportError:
        pass
    import torch
    import torch.nn.functional as F

    try:
        import diffusers  # noqa: F401  (probes for flash_attn at import: before the stand-in exists)
    except ImportError:
        pass
    fa = types.ModuleType("flash_attn")
    # a spec, so that later import probes (transformers' is_flash_attn_2_available, importlib.util.
    # find_spec) see a module, find no installed distribution, and report it unavailable
    fa.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)

    def unsupported(kw):
        # the stand-in is plain non-causal softmax attention: an option that changes the result (causal,
        # a window, ALiBi, softcap, dropout) was swallowed by **kwargs and upstream measured as something else
        bad = {k: v for k, v in kw.items() if k in ("causal", "window_size", "alibi_slopes", "softcap", "dropout_p")
               and v not in (False, None, 0, 0.0, (-1, -1), [-1, -1])}
        if bad:
            raise NotImplementedError(f"flash_attn SDPA stand-in (bench/upstream.py): {bad} not supported")

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                               dropout_p=0.0, softmax_scale=None, **kw):
        unsupported(dict(kw, dropout_p=dropout_p))
        outs, cq, ck = [], cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        for i in range(len(cq) - 1):
            qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
            ki, vi = (z[ck[i]:ck[i + 1]].transpose(0, 1)[None] for z in (k, v))
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, scale=softmax_scale)[0].transpose(0, 1))
        return torch.cat(outs, 0)

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, **kw):
        unsupported(dict(kw, dropout_p=dropout_p))
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=softmax_scale)
        return o.transpose(1, 2)

    fa.flash_attn_func, fa.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    sys.modules["flash_attn"] = fa
    return "PyTorch SDPA stand-in for flash_attn"


def upstream_dit(path: str, cfg, device, dtype, *, state_dict: Optional[dict] = None, enable_bsa: bool = False,
                 generator=None) -> Tuple[object, str]:
    """Upstream's ``LongCatVideoTransformer3DModel`` with our ``DiTConfig``'s hyper-parameters.

    Args:
        path: the checkout (the folder holding ``longcat_video``).
        cfg: ``longcat_vc.DiTConfig``.
        state_dict: our DiT's state dict (upstream names), loaded strictly; None: random weights
            (``bench.suites.dit_common.init_random_`` with ``generator``), for memory and speed only.
        enable_bsa: upstream's BSA with ``cfg.bsa_params``.

    Returns:
        (model in eval mode without gradients, note naming the flash-attn implementation).
    """
    import torch

    path = os.path.abspath(path)
    if path not in sys.path:
        sys.path.insert(0, path)
    note = flash_attn_or_standin()
    from longcat_video.modules.longcat_video_dit import LongCatVideoTransformer3DModel

    with torch.device("meta"):
        m = LongCatVideoTransformer3DModel(
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, hidden_size=cfg.hidden_size,
            depth=cfg.depth, num_heads=cfg.num_heads, caption_channels=cfg.caption_channels,
            mlp_ratio=cfg.mlp_ratio, adaln_tembed_dim=cfg.adaln_tembed_dim,
            frequency_embedding_size=cfg.frequency_embedding_size, patch_size=tuple(cfg.patch_size),
            enable_flashattn2=True, enable_bsa=enable_bsa, bsa_params=dict(cfg.bsa_params) if cfg.bsa_params else None, cp_split_hw=[1, 1],
            text_tokens_zero_pad=cfg.text_tokens_zero_pad,
        )
    if state_dict is not None:
        m.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=True, assign=True)
        m = m.to(device=device, dtype=dtype)
    else:
        from bench.suites.dit_common import init_random_

        m = m.to_empty(device=device).to(dtype)
        with torch.no_grad():
            init_random_(m, generator if generator is not None else torch.Generator(device=device).manual_seed(0))
    return m.eval().requires_grad_(False), note
