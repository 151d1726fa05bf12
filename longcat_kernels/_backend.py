"""Backend names and what works on this machine (user-facing); the decision is in ``dispatch.py``.

Backends: ``"torch"`` (reference, always available), ``"triton"``, ``"cuda"`` (compiled extension),
``"auto"``. Which implementation runs a call (and why) is decided by
``longcat_kernels.dispatch.choose_kernel``; this module only answers "can backend b run here".
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from .dispatch import (
    BACKENDS,
    OPS,
    BackendUnavailableError,
    choose_kernel,
    machine_facts,
    preload_kernel_modules,
    triton_interpret,
    triton_status,
)

__all__ = [
    "BACKENDS",
    "OPS",
    "BackendUnavailableError",
    "available_backends",
    "representative_facts",
    "triton_status",
    "triton_interpret",
    "preload_kernel_modules",
]


def representative_facts(device_type: str):
    """Machine facts plus representative inputs: bf16 head_dim 128 on CUDA, fp32 elsewhere."""
    f = machine_facts(device_type)
    if device_type == "cuda":
        return f._replace(dtype="bfloat16", head_dim=128)
    return f._replace(dtype="float32", head_dim=128)


# public functions whose dispatch name differs (the user knows the former: ``available_backends("fp8_quantize_rows")``
# was a ValueError listing only the internal names)
_PUBLIC_ALIASES = {
    "fp8_quantize_rows": "fp8_quantize",
    "fp8_layer_norm_quantize": "fp8_quantize",
    "fp8_modulate_quantize": "fp8_quantize",
    "fp8_silu_mul_quantize": "fp8_quantize",
    "flash_attn_with_kvcache": "attn_with_kv_cache",
}


def available_backends(op: Optional[str] = None, device: Optional[str] = None) -> Dict[str, Optional[str]]:
    """What works on this machine.

    Args:
        op: the op to ask about (default ``"attn_with_kv_cache"``: the op every backend implements): a
            dispatch name (``dispatch.choose_kernel``'s) or the name (a str) of a public function that dispatches as one
            (``fp8_quantize_rows`` and the other fp8 prologues: ``fp8_quantize``;
            ``flash_attn_with_kvcache``: ``attn_with_kv_cache``).
        device: ``"cuda"`` or ``"cpu"``; default: cuda if available else cpu.

    Returns:
        ``{backend: None if usable else the reason}`` for ``"torch"``, ``"triton"``, ``"cuda"``, for
        representative inputs (bf16 head_dim 128 on CUDA, fp32 on CPU).

    Raises:
        ValueError: ``op`` is not an op name (``""`` too), or ``device`` is not cuda/cpu.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev_type = torch.device(device).type
    except (RuntimeError, TypeError):
        dev_type = None
    if dev_type not in ("cuda", "cpu"):
        # "" was torch's "Device string must not be empty", naming no argument; "meta" answered for tensors
        # no op computes on (torch "usable")
        raise ValueError(f"device: expected 'cuda' or 'cpu' (or None: this machine's), got {device!r}")
    f = representative_facts(dev_type)._replace(env_backend=None)
    op = _PUBLIC_ALIASES.get(op, op) if isinstance(op, str) else op
    out: Dict[str, Optional[str]] = {}
    for b in ("torch", "triton", "cuda"):
        try:
            choose_kernel("attn_with_kv_cache" if op is None else op, f, b)
            out[b] = None
        except BackendUnavailableError as e:
            out[b] = str(e).split(": ", 2)[-1]
    if dev_type == "cuda" and not torch.cuda.is_available():
        # the facts describe CUDA inputs; without a device neither GPU backend runs (Triton's GPU
        # kernels included: only the CPU interpreter runs without one, on CPU tensors)
        for b in ("triton", "cuda"):
            out[b] = out[b] or "no CUDA device on this machine"
    return out
