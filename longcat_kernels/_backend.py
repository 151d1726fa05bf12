"""Backend names, resolution and availability.

Backends: ``"torch"`` (reference, always available), ``"triton"``, ``"cuda"`` (compiled extension),
``"auto"``. An op's implementation for backend ``b`` is the function ``<impl>_<b>`` in the module
``longcat_kernels.ops.<package>.<b>`` (``triton.py`` / ``cuda.py``), imported lazily the first time
that backend is resolved. A missing module or function means that backend is unavailable for the
op, and the reason says so. A module may also define ``unsupported_reason(impl, *tensors) -> str |
None`` to refuse particular inputs (dtype, head_dim, ...); ``"auto"`` then moves on to the next
backend and an explicit request raises with that reason.

``"auto"``: CPU tensors -> ``"torch"``; CUDA tensors -> the first available backend of the op's
preference list (``PREFERENCE``, measured fastest first). ``LONGCAT_KERNELS_BACKEND`` replaces
``"auto"`` by that backend (which then must be available: it is treated as an explicit request).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Callable, Dict, Optional, Tuple

import torch

from ._validate import compiling

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "available_backends",
    "resolve_backend",
    "get_impl",
    "triton_status",
    "triton_interpret",
    "op_backend_status",
    "preload_kernel_modules",
]

BACKENDS = ("auto", "torch", "triton", "cuda")

# impl name -> package under longcat_kernels.ops
OPS: Dict[str, str] = {
    "select_blocks": "block_sparse_attn",
    "block_sparse_attn": "block_sparse_attn",
    "block_sparse_attn_fwd": "block_sparse_attn",
    "attn_with_kv_cache": "kv_cache_attn",
    "prefix_attn": "kv_cache_attn",
    "qk_norm_rope": "rope",
}

# "auto" preference on CUDA tensors, fastest first (update from bench/results).
PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "select_blocks": ("triton", "cuda", "torch"),
    # triton first: H100 BSA fwd 24x44x80 B1 H32 D128, 0.9375: triton 21.4 ms vs csrc sm90 25.9 ms
    # (bench/results/h100/cuda_ext.json); the cuda backend is forward only anyway
    "block_sparse_attn": ("triton", "cuda", "torch"),
    "block_sparse_attn_fwd": ("triton", "cuda", "torch"),
    # triton first: its auto route picks Triton prologue + cuDNN or the fused kernel (H100:
    # 69 / 74 ms vs csrc v1 165 ms at cond 4, bench/results/h100/kv_cache_attn.json)
    "attn_with_kv_cache": ("triton", "cuda", "torch"),
    "prefix_attn": ("triton", "cuda", "torch"),
    "qk_norm_rope": ("triton", "cuda", "torch"),
}

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Per-shape exception to PREFERENCE (measured): these ops put "cuda" first where the csrc
# warp-specialised Hopper kernel (csrc/attn_fwd_sm90_ws.cu) runs them: q head_dim 128, bf16/fp16,
# a compute-capability 9.0 GPU, LONGCAT_KERNELS_CUDA_IMPL unset/auto/sm90ws. H100, cached-KV
# B2 H32 D128 bf16 with RoPE, all work included, same run: cond 4 60.3 ms vs 69.6 ms for the
# triton auto route (Triton prologue + cuDNN; cuDNN alone on pre-built inputs 67.1), cond 16
# 24.4 vs 27.8 (27.8) (bench/results/h100/cuda_ext_v6_ws.json, run3).
# Dense calls only: with block_sparse= the kv-cache api keeps the triton route. prefix_attn (the
# cache-off rule: two launches of the same dense kernel into slices of one output) follows, so
# that cache on and cache off both run the fastest kernel (timed in the bench's cached-attn suite).
SM90WS_FIRST = ("attn_with_kv_cache", "prefix_attn")
# Block-sparse forward: "cuda" first where the warp-specialised BSA kernel (csrc/bsa_fwd_sm90_ws.cu)
# runs the call: the conditions above plus 64-token query and key blocks (the caller passes
# block_tokens = (chunk_q volume, chunk_k volume); without it PREFERENCE holds). Calls that need
# gradients still get triton: the cuda module refuses them (unsupported_reason), auto moves on.
# H100, B1 H32 D128 bf16, chunk 4x4x4, csrc vs triton forward in the same runs (medians, runs 1 / 3
# of bench/results/h100/cuda_ext_v7_bsa_ws.json): 24x44x80 at 0.9375 19.3 / 20.0 ms vs 21.5 / 21.8,
# at 0.875 38.5 / 39.2 vs 43.4 / 43.8; 24x30x52 at 0.9375 4.47 / 4.50 vs 5.65 / 5.69, at 0.875
# 8.72 / 8.89 vs 10.62 / 10.78.
SM90WS_BSA_FIRST = ("block_sparse_attn", "block_sparse_attn_fwd")
_CAPABILITY: Dict[int, Tuple[int, int]] = {}


def _sm90ws_fits(tensors) -> bool:
    q = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if q is None or q.device.type != "cuda" or q.dim() != 4 or q.shape[-1] != 128:
        return False
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if os.environ.get("LONGCAT_KERNELS_CUDA_IMPL", "auto").strip() not in ("", "auto", "sm90ws"):
        return False
    idx = q.device.index
    cap = _CAPABILITY.get(idx)
    if cap is None:
        if compiling() or idx is None:  # eager calls fill the cache; a traced first call keeps PREFERENCE
            return False
        cap = _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
    return cap == (9, 0)


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs on this machine."""


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1`` (Triton kernels run on CPU tensors, slowly)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_TRITON_STATUS: Optional[Tuple[bool, Optional[str]]] = None


def triton_status() -> Optional[str]:
    """None if ``import triton`` works, else the reason. The import is attempted once."""
    global _TRITON_STATUS
    if _TRITON_STATUS is None:
        try:
            import triton  # noqa: F401, PLC0415

            _TRITON_STATUS = (True, None)
        except Exception as e:  # noqa: BLE001 - any failure means unusable
            _TRITON_STATUS = (False, f"import triton failed: {type(e).__name__}: {e}")
    return _TRITON_STATUS[1]


def _cuda_status() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _ext_status() -> Optional[str]:
    from ._ext import extension_error  # noqa: PLC0415

    return extension_error()


_MODULES: Dict[Tuple[str, str], Tuple[object, Optional[str]]] = {}


def _load_module(package: str, backend: str):
    """Imports ``longcat_kernels.ops.<package>.<backend>`` once; returns (module | None, reason)."""
    key = (package, backend)
    if key not in _MODULES:
        name = f"longcat_kernels.ops.{package}.{backend}"
        if name in sys.modules:
            _MODULES[key] = (sys.modules[name], None)
            return _MODULES[key]
        try:
            spec = importlib.util.find_spec(name)
        except ModuleNotFoundError:
            spec, err = None, None
        except Exception as e:  # noqa: BLE001
            spec, err = None, e
        else:
            err = None
        if spec is None:
            reason = f"not implemented (no module {name})" if err is None else f"{name}: {err}"
            _MODULES[key] = (None, reason)
        else:
            try:
                _MODULES[key] = (importlib.import_module(name), None)
            except Exception as e:  # noqa: BLE001 - keep the reason visible
                _MODULES[key] = (None, f"import {name} failed: {type(e).__name__}: {e}")
    return _MODULES[key]


def preload_kernel_modules() -> None:
    """Imports the Triton backend modules now if they can run here (CUDA device or TRITON_INTERPRET=1).

    ``torch.compile`` cannot trace ``importlib``: without this, the first call of an op inside a
    ``fullgraph=True`` compiled function failed on the lazy import. Called once from
    ``longcat_kernels/__init__.py``; a failure is recorded as that backend's reason, never raised, and
    nothing happens on a machine without triton or without CUDA.
    """
    if not (triton_interpret() or torch.cuda.is_available()) or triton_status() is not None:
        return
    for package in sorted(set(OPS.values())):
        _load_module(package, "triton")


def _machine_reason(backend: str, device_type: Optional[str]) -> Optional[str]:
    """Why ``backend`` cannot run on tensors of ``device_type`` on this machine (None if it can)."""
    if backend == "torch":
        return None
    if backend == "triton":
        r = triton_status()
        if r is not None:
            return r
        if device_type == "cuda":
            if triton_interpret():
                return "TRITON_INTERPRET=1 is set: Triton runs in the CPU interpreter, CUDA tensors are not supported"
            return None
        if device_type == "cpu":
            if triton_interpret():
                return None
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton CPU interpreter)"
        if device_type is None:
            return _cuda_status() if not triton_interpret() else None
        return f"tensors on device type {device_type!r} are not supported"
    if backend == "cuda":
        r = _cuda_status()
        if r is not None:
            return r
        if device_type not in (None, "cuda"):
            return f"needs CUDA tensors, got tensors on {device_type}"
        return _ext_status()
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


# The Triton CPU interpreter emulates tensors with numpy, which has no bfloat16: bf16 loads, stores
# and tl.dot come out as garbage instead of failing, so only these dtypes may run there.
INTERPRETER_DTYPES = (torch.float16, torch.float32)


def _interpreter_dtype_reason(tensors) -> Optional[str]:
    """Why the Triton interpreter (CPU tensors) cannot compute these tensors' dtypes, or None."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in INTERPRETER_DTYPES:
            return (
                f"dtype {t.dtype} cannot be computed by the Triton CPU interpreter (fp32/fp16 only: numpy has "
                "no bfloat16, results would be garbage); use backend='torch' or fp32/fp16 inputs"
            )
    return None


def op_backend_status(impl: str, backend: str, *tensors, check_inputs: bool = True) -> Optional[str]:
    """None if ``impl`` can run on ``backend`` for these tensors, else the reason.

    ``check_inputs=False`` skips the module's ``unsupported_reason`` hook (machine-level check only)."""
    if backend == "torch":
        return None
    device_type = None
    for t in tensors:
        if isinstance(t, torch.Tensor):
            device_type = t.device.type
            if t.dtype not in _KERNEL_DTYPES:
                return f"dtype {t.dtype} is supported by the torch backend only"
            break
    r = _machine_reason(backend, device_type)
    if r is not None:
        return r
    if backend == "triton" and device_type == "cpu":
        r = _interpreter_dtype_reason(tensors)
        if r is not None:
            return r
    module, r = _load_module(OPS[impl], backend)
    if module is None:
        return r
    fname = f"{impl}_{backend}"
    if not hasattr(module, fname):
        return f"not implemented ({module.__name__} has no {fname})"
    hook = getattr(module, "unsupported_reason", None)
    if hook is not None and tensors and check_inputs:
        r = hook(impl, *tensors)
        if r is not None:
            return r
    return None


def resolve_backend(op: str, requested: str, *tensors, block_tokens: Optional[Tuple[int, int]] = None) -> str:
    """Picks the backend that will run ``op`` on ``tensors``.

    Args:
        op: an implementation name from ``OPS`` (e.g. ``"block_sparse_attn"``).
        requested: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.
        tensors: the op's tensor inputs (the first one decides the device and dtype).
        block_tokens: block-sparse ops: (query block tokens, key block tokens) of the selection.

    Raises:
        BackendUnavailableError: an explicit backend (or ``LONGCAT_KERNELS_BACKEND``) cannot run.
    """
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; known: {sorted(OPS)}")
    if not compiling():
        if not isinstance(requested, str) or requested not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS}, got {requested!r}")
    if requested == "auto":
        env = os.environ.get("LONGCAT_KERNELS_BACKEND", "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"LONGCAT_KERNELS_BACKEND: expected one of {BACKENDS}, got {env!r}")
            requested = env
    if requested != "auto":
        reason = op_backend_status(op, requested, *tensors)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend '{requested}' unavailable: {reason}")
        return requested
    device_type = next((t.device.type for t in tensors if isinstance(t, torch.Tensor)), "cpu")
    if device_type != "cuda":
        return "torch"
    order = PREFERENCE[op]
    if (op in SM90WS_FIRST or (op in SM90WS_BSA_FIRST and block_tokens == (64, 64))) and _sm90ws_fits(tensors):
        order = ("cuda",) + tuple(b for b in order if b != "cuda")
    for b in order:
        if op_backend_status(op, b, *tensors) is None:
            return b
    return "torch"


def get_impl(op: str, backend: str) -> Callable:
    """The function ``<op>_<backend>`` of a resolved (non-torch) backend."""
    module, reason = _load_module(OPS[op], backend)
    if module is None:
        raise BackendUnavailableError(f"{op}: backend '{backend}' unavailable: {reason}")
    return getattr(module, f"{op}_{backend}")


def available_backends(op: Optional[str] = None, device: Optional[str] = None) -> Dict[str, Optional[str]]:
    """What works on this machine.

    Args:
        op: if given, also check that the op has an implementation for each backend.
        device: ``"cuda"`` or ``"cpu"``; default: cuda if available else cpu.

    Returns:
        ``{backend: None if usable else the reason}`` for ``"torch"``, ``"triton"``, ``"cuda"``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    out: Dict[str, Optional[str]] = {}
    for b in ("torch", "triton", "cuda"):
        r = _machine_reason(b, device_type)
        if r is None and op is not None and b != "torch":
            module, r = _load_module(OPS[op], b)
            if module is not None and not hasattr(module, f"{op}_{b}"):
                r = f"not implemented ({module.__name__} has no {op}_{b})"
        out[b] = r
    return out
