"""Which kernel runs a call, and why: the one place where that is decided.

Every public op does ``choice = choose(op, *tensors, requested=backend, **op facts)`` and then runs
``impl_fn(op, choice.impl)``. ``choose`` collects the facts of the call and of this machine into a
``Facts`` tuple and asks ``choose_kernel(op, facts, requested)``, a pure function of those facts
(the whole table is unit-tested on CPU with fake facts). ``python -m longcat_kernels.env`` prints
``choose_kernel``'s answer for representative inputs; ``last_choice(op)`` / ``record_choices()``
return what actually ran, and each choice is logged at DEBUG on the ``longcat_kernels`` logger.

Backends (user-facing names) and their implementations (``KernelChoice.impl``)::

    backend  impl                    what runs
    torch    torch_reference         ops/<op>/reference.py (SPEC semantics, any device and dtype)
    triton   triton                  the op's Triton kernels (select_blocks, BSA, qk_norm_rope)
    triton   triton_fused            cached-KV / prefix: one fused two-segment Triton kernel
    triton   triton_prologue_cudnn   cached-KV / prefix: Triton RoPE prologue + cuDNN SDPA + Triton
                                     lse merge. Only "auto" picks it; backend="triton" runs Triton
                                     kernels only (triton_fused).
    cuda     csrc_sm90_ws            csrc warp-specialised Hopper kernels (attn_fwd_sm90_ws.cu,
                                     bsa_fwd_sm90_ws.cu): head_dim 128; BSA also one key segment
                                     and 64-token query and key blocks
    cuda     csrc_sm90_ws_triton_bwd block_sparse_attn needing grad where csrc_sm90_ws applies: the
                                     csrc forward with the Triton backward (only "auto" picks it)
    cuda     csrc_sm90               csrc wgmma kernel (attn_fwd_sm90.cu), any other Hopper call
    cuda     csrc_sm80               csrc mma.sync kernel (attn_fwd_sm80.cu), non-Hopper GPUs or an
                                     extension built without sm_90a code

"auto" on CPU tensors runs the reference; on CUDA the measured-fastest implementation that can run
(numbers next to the rules in ``choose_kernel``). GQA/MQA calls (``Facts.gqa``: k/v with fewer heads
than q) run ``triton_fused`` (kv head ``h // group``): the csrc kernels and the cuDNN route take
equal head counts only. Every implementation takes ``return_lse``. An explicit backend (or ``LONGCAT_KERNELS_BACKEND``)
never falls back: it raises ``BackendUnavailableError`` with the reason.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import sys
import threading
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

from ._envvars import backend_override, check_environment
from ._validate import func_batched as _func_batched
from ._validate import func_differentiated as _func_differentiated
from ._validate import needs_grad as _needs_grad

__all__ = [
    "BACKENDS",
    "OPS",
    "BackendUnavailableError",
    "Facts",
    "KernelChoice",
    "choose_kernel",
    "choose",
    "choose_dense_grad",
    "machine_facts",
    "impl_fn",
    "last_choice",
    "record_choices",
]

log = logging.getLogger("longcat_kernels")

BACKENDS = ("auto", "torch", "triton", "cuda")

# public op name -> package under longcat_kernels.ops
OPS: Dict[str, str] = {
    "select_blocks": "block_sparse_attn",
    "block_sparse_attn": "block_sparse_attn",
    "block_sparse_attn_fwd": "block_sparse_attn",
    "attn_with_kv_cache": "kv_cache_attn",
    "prefix_attn": "kv_cache_attn",
    "qk_norm_rope": "rope",
    "fp8_quantize": "fp8_quant",
}

# ops the csrc extension implements (all forward only)
CSRC_OPS = ("block_sparse_attn", "block_sparse_attn_fwd", "attn_with_kv_cache", "prefix_attn")
KV_OPS = ("attn_with_kv_cache", "prefix_attn")
KERNEL_DTYPES = ("float16", "bfloat16", "float32")
# The Triton CPU interpreter emulates tensors with numpy, which has no bfloat16: bf16 loads, stores
# and tl.dot come out as garbage instead of failing, so only these dtypes may run there.
INTERPRETER_DTYPES = ("float16", "float32")
# ops whose Triton kernels (and csrc kernels) have no backward: "auto" takes the differentiable torch
# reference when gradients are needed (attn_with_kv_cache refuses them in its API instead)
TRITON_FORWARD_ONLY = ("qk_norm_rope", "fp8_quantize", "prefix_attn", "attn_with_kv_cache")
# fp8_quantize: the Triton kernel keeps a whole row in registers
FP8_MAX_COLS = 16384
# the Triton block-sparse backward's tiles at a head_dim padded past 256 need more shared memory than a
# Hopper SM has (head_dim 512 on the H100: 270,336 B required, 232,448 available; 256 runs:
# bench/dev/head_dim_probe_gpu.py, session 20); the forward runs at 512
BSA_TRITON_BWD_MAX_HEAD_DIM = 256
# the fused cached-KV / prefix Triton kernel likewise: head_dim 320 and 512 (tiles padded to 512) need
# 327,680 B of shared memory on the H100 (232,448 available); 256 runs (head_dim_probe_gpu.py, session 21)
KV_TRITON_MAX_HEAD_DIM = 256
# largest 3D block (tokens) the csrc block-sparse kernels take (csrc/attn_fwd.h kMaxBlockTokens)
CSRC_MAX_BLOCK_TOKENS = 1024


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run these inputs on this machine."""


class Facts(NamedTuple):
    """Everything the choice depends on (plain values: a test passes fake ones).

    Attributes:
        device_type: ``"cpu"``, ``"cuda"``, ... of the op's tensors.
        dtype: e.g. ``"bfloat16"`` (``str(torch.dtype)`` without ``torch.``).
        head_dim: last dim of q (fp8_quantize: the row length K).
        capability: ``(major, minor)`` of the CUDA device, None on CPU.
        triton_error: None if ``import triton`` works, else why not.
        interpret: ``TRITON_INTERPRET=1`` (Triton runs on CPU tensors in the interpreter;
            ``triton_interpret()``).
        ext_error: None if the compiled extension is loaded, else why not.
        csrc_kernels: csrc kernel families this extension can run on this device
            (``"sm90_ws"``, ``"sm90"``, ``"sm80"``; reported by the extension itself, once, for the
            device current then: the sm90 families are used only where ``capability`` is 9.x).
        cudnn: cuDNN usable.
        requires_grad: some input requires grad and grad mode is on (or ``func_transform``).
        func_transform: a ``torch.func`` grad/jvp transform or forward-mode AD differentiates some input
            (``_validate.func_differentiated``): the Triton and csrc ops have no rule for them.
        func_vmap: some input is batched by ``torch.func.vmap`` (``_validate.func_batched``).
        block_sparse: the call is block-sparse (BSA ops; ``attn_with_kv_cache(block_sparse=)``).
        block_tokens: block-sparse: (query block tokens, key block tokens); None if unknown.
        key_segments: block-sparse: 1 (one key tensor) or 2 (``[cache; fresh]``).
        key_split_aligned: block-sparse with 2 key segments: the cache ends on a key-block
            boundary along t (cache frames a multiple of ``chunk_k[0]``), so that no key block
            straddles the two segments (the warp-specialised BSA kernel needs it).
        gqa: k/v have fewer heads than q (GQA/MQA): the fused Triton kernels index kv head
            ``h // group``; the csrc kernels and the cuDNN route do not take it.
        rope_pairs: ``qk_norm_rope``: ``"interleaved"`` or ``"half"`` (the Triton prologue rotates
            interleaved pairs only).
        norm_all_heads: ``qk_norm_rope``: RMSNorm over all heads (``[H*D]`` weight).
        env_backend: ``LONGCAT_KERNELS_BACKEND`` when set (replaces ``"auto"``), else None.
    """

    device_type: str = "cuda"
    dtype: str = "bfloat16"
    head_dim: int = 128
    capability: Optional[Tuple[int, int]] = (9, 0)
    triton_error: Optional[str] = None
    interpret: bool = False
    ext_error: Optional[str] = None
    csrc_kernels: Tuple[str, ...] = ("sm90_ws", "sm90", "sm80")
    cudnn: bool = True
    requires_grad: bool = False
    func_transform: bool = False
    func_vmap: bool = False
    block_sparse: bool = False
    block_tokens: Optional[Tuple[int, int]] = None
    key_segments: int = 1
    key_split_aligned: bool = True
    gqa: bool = False
    rope_pairs: str = "interleaved"
    norm_all_heads: bool = False
    env_backend: Optional[str] = None


class KernelChoice(NamedTuple):
    """The decision: ``backend`` (user-facing name), ``impl`` (what runs), ``reason`` (why)."""

    op: str
    backend: str
    impl: str
    reason: str


# ----------------------------------------------------------------------------------------------
# the decision (pure)
# ----------------------------------------------------------------------------------------------


def triton_tile_size(n: int) -> int:
    """``n`` rounded up to a power of two, at least 16: the size the Triton block-sparse kernels index
    with ``tl.arange`` and ``tl.dot``. They run at ``triton_tile_size(head_dim)`` (other head dims are
    zero-padded to it) and at ``triton_tile_size(tokens per block)`` rows per block (padded rows masked)."""
    return max(16, 1 << (int(n) - 1).bit_length())


def _triton_reason(op: str, f: Facts) -> Optional[str]:
    """Why the op's Triton kernels cannot run these inputs (None if they can)."""
    if f.triton_error is not None:
        return f.triton_error
    if f.dtype not in KERNEL_DTYPES:
        return f"dtype {f.dtype} is supported by the torch backend only"
    if f.func_transform:
        # the autograd rules are registered with torch.library, which torch.func (grad, jacrev, jvp) and
        # forward-mode AD cannot run: an unrelated functorch error, or a zero jvp tangent, silently
        return "torch.func grad/jvp transforms and forward-mode AD cannot differentiate the Triton kernels; use backend='torch'"
    if f.func_vmap and (op == "qk_norm_rope" or (op == "attn_with_kv_cache" and f.block_sparse)):
        # their registered ops write preallocated outputs in place (qk_norm_rope, the rope_3d prologue) or gate
        # into buffers: vmap has no rule for that ("Batching rule not implemented", a broadcast error)
        return "torch.func.vmap cannot batch its Triton ops (they write preallocated outputs); use backend='torch'"
    if f.requires_grad and op in TRITON_FORWARD_ONLY:
        # "auto" then takes the differentiable reference (e.g. LoRA training); explicit triton raises
        return "forward only (no backward kernel); use backend='torch' for gradients"
    if op == "block_sparse_attn" and f.requires_grad and triton_tile_size(f.head_dim) > BSA_TRITON_BWD_MAX_HEAD_DIM:
        # "auto" then trains on the reference, explicit triton raises here instead of Triton's
        # OutOfResources at the first backward
        return (f"the backward kernel takes head_dim <= {BSA_TRITON_BWD_MAX_HEAD_DIM} (got {f.head_dim}: its tiles "
                "exceed shared memory); use backend='torch' for gradients")
    if op in KV_OPS and triton_tile_size(f.head_dim) > KV_TRITON_MAX_HEAD_DIM:
        # "auto" then takes the reference (SDPA), explicit triton raises here instead of Triton's OutOfResources
        return (f"the fused kernel takes head_dim <= {KV_TRITON_MAX_HEAD_DIM} (got {f.head_dim}: its tiles exceed "
                "shared memory); use backend='torch'")
    if op == "qk_norm_rope" and f.rope_pairs != "interleaved":
        return f"rope.pairs={f.rope_pairs!r} (the Triton prologue rotates interleaved pairs); use 'torch'"
    if op == "qk_norm_rope" and f.norm_all_heads and f.gqa:
        return "an all-heads norm with different q/k head counts; use 'torch'"
    if op == "fp8_quantize":
        if f.head_dim > FP8_MAX_COLS:
            return f"rows of {f.head_dim} elements (the Triton kernel holds a row of <= {FP8_MAX_COLS} in registers)"
        if f.device_type == "cuda" and f.capability is not None and tuple(f.capability) < (8, 9):
            return (f"float8 e4m3 conversion needs compute capability >= 8.9, got "
                    f"{f.capability[0]}.{f.capability[1]}")
    if f.device_type == "cuda":
        if f.interpret:
            return "TRITON_INTERPRET=1 is set: Triton runs in the CPU interpreter, CUDA tensors are not supported"
        return None
    if f.device_type == "cpu":
        if not f.interpret:
            return "CPU tensors need TRITON_INTERPRET=1 (the Triton CPU interpreter)"
        if f.dtype not in INTERPRETER_DTYPES:
            return (f"dtype {f.dtype} cannot be computed by the Triton CPU interpreter (fp32/fp16 only: numpy has "
                    "no bfloat16, results would be garbage); use backend='torch' or fp32/fp16 inputs")
        return None
    return f"tensors on device type {f.device_type!r} are not supported"


def _csrc_kernel(op: str, f: Facts) -> Tuple[Optional[str], str]:
    """(csrc kernel family that runs the call or None, reason)."""
    if op not in CSRC_OPS:
        return None, f"{op} has no csrc kernel"
    if f.device_type != "cuda":
        return None, f"needs CUDA tensors, got tensors on {f.device_type}"
    if f.ext_error is not None:
        return None, f.ext_error
    if f.dtype not in ("bfloat16", "float16"):
        return None, f"dtype {f.dtype} not supported (bf16/fp16 only; use 'triton' or 'torch' for fp32)"
    if f.head_dim not in (64, 128):
        return None, f"head_dim {f.head_dim} not supported (64 or 128)"
    if f.requires_grad:
        other = "'torch'" if op in TRITON_FORWARD_ONLY else "'triton' or 'torch'"
        return None, f"forward only (no backward kernel); use backend={other} for gradients"
    if f.gqa:
        return None, "GQA/MQA (k/v with fewer heads than q) not supported by the csrc kernels; use 'triton' or 'torch'"
    if f.block_sparse and f.block_tokens is not None and max(f.block_tokens) > CSRC_MAX_BLOCK_TOKENS:
        return None, (f"blocks of {f.block_tokens} tokens; the csrc kernels take at most "
                      f"{CSRC_MAX_BLOCK_TOKENS} tokens per block")
    ks = f.csrc_kernels
    if f.capability is not None and f.capability[0] != 9 and any(k in ks for k in ("sm90_ws", "sm90")):
        # csrc_kernels is what the extension reported for the device current when it was first asked;
        # the sm_90a kernels run on compute capability 9.x only (on another GPU of the machine their
        # build for that GPU is a __trap(): a sticky launch failure)
        ks = tuple(k for k in ks if k not in ("sm90_ws", "sm90"))
        if not ks:
            return None, (f"the extension has sm_90a kernels only, this device has compute capability "
                          f"{f.capability[0]}.{f.capability[1]}; rebuild with LONGCAT_KERNELS_CUDA_ARCHS "
                          "including it")
    if "sm90_ws" in ks and f.head_dim == 128:
        if not f.block_sparse:
            return "sm90_ws", "Hopper, head_dim 128: warp-specialised dense kernel"
        if f.block_tokens == (64, 64) and (f.key_segments == 1 or f.key_split_aligned):
            segs = "one key segment" if f.key_segments == 1 else "[cache; fresh] split on a key-block boundary"
            return "sm90_ws", f"Hopper, head_dim 128, 64-token blocks, {segs}: warp-specialised BSA kernel"
    if "sm90" in ks:
        why = "head_dim 64" if f.head_dim != 128 else (
            f"blocks of {f.block_tokens} tokens (not 64/64)" if f.block_sparse and f.block_tokens != (64, 64)
            else "block-sparse over [cache; fresh] keys whose cache does not end on a key-block boundary"
            if f.block_sparse
            else "no warp-specialised kernel in this build")
        return "sm90", f"Hopper wgmma kernel ({why}: the warp-specialised kernels do not apply)"
    if "sm80" in ks:
        return "sm80", "mma.sync kernel (no sm_90a code for this device in the extension)"
    return None, "the extension reports no kernel that runs on this device"


def _triton_impl(op: str) -> str:
    return "triton_fused" if op in KV_OPS else "triton"


def cudnn_sdpa_takes(device_type: str, dtype: str, head_dim: int,
                     capability: Optional[Tuple[int, int]] = None) -> bool:
    """Whether torch's cuDNN SDPA takes these inputs: CUDA, bf16/fp16, head_dim <= 128 and a multiple of 8
    (sdp_utils check_cudnn_tensor_shapes; another head_dim fails inside torch with "No available kernel"),
    on a GPU of compute capability 8.0 or newer when ``capability`` is known (check_cudnn_hardware_support:
    on a T4/V100 the forced cuDNN backend failed with "No available kernel" too)."""
    return (device_type == "cuda" and dtype in ("bfloat16", "float16") and head_dim <= 128 and head_dim % 8 == 0
            and (capability is None or tuple(capability) >= (8, 0)))


def _cudnn_reason(op: str, f: Facts) -> Optional[str]:
    if op not in KV_OPS:
        return f"{op} has no cuDNN route"
    if f.block_sparse:
        return "cuDNN has no block-sparse mode"
    if f.gqa:
        return "the cuDNN route does not take GQA/MQA (the fused Triton kernel does)"
    # another head_dim would fail inside torch instead of running Triton
    if not cudnn_sdpa_takes(f.device_type, f.dtype, f.head_dim):
        return "cuDNN SDPA needs CUDA bf16/fp16 inputs with head_dim <= 128 and a multiple of 8"
    if not cudnn_sdpa_takes(f.device_type, f.dtype, f.head_dim, f.capability):
        return (f"cuDNN SDPA needs compute capability 8.0 or newer, got "
                f"{f.capability[0]}.{f.capability[1]}")
    if not f.cudnn:
        return "cuDNN is not available"
    return _triton_reason(op, f)  # the RoPE prologue and the lse merge are Triton kernels


def choose_kernel(op: str, facts: Facts, requested: str = "auto") -> KernelChoice:
    """The implementation that runs ``op`` for these facts, and why.

    Args:
        op: a public op name from ``OPS``.
        facts: the call's and the machine's facts (``choose`` collects them).
        requested: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Raises:
        BackendUnavailableError: an explicit backend (or ``LONGCAT_KERNELS_BACKEND``) cannot run.
        ValueError: unknown op or backend name.
    """
    if op not in OPS:
        raise ValueError(f"op: expected one of {sorted(OPS)}, got {op!r}")
    if requested not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {requested!r}")
    via = ""
    # LONGCAT_KERNELS_BACKEND replaces "auto" for the ops that backend implements: with cuda, the ops
    # without any csrc kernel (select_blocks, qk_norm_rope, fp8_quantize) keep auto's choice, or
    # the variable would stop every model that calls them (the DiT's prologue, the gating inside a
    # block-sparse call); an op it implements but cannot run for these inputs still raises
    if requested == "auto" and facts.env_backend not in (None, "auto") and not (
            facts.env_backend == "cuda" and op not in CSRC_OPS):
        requested = facts.env_backend
        via = f" (LONGCAT_KERNELS_BACKEND={requested})"

    if requested == "torch":
        return KernelChoice(op, "torch", "torch_reference", "backend='torch' requested" + via)
    if requested == "triton":
        r = _triton_reason(op, facts)
        if r is not None:
            raise BackendUnavailableError(f"{op}: backend 'triton' unavailable{via}: {r}")
        return KernelChoice(op, "triton", _triton_impl(op), "backend='triton' requested" + via)
    if requested == "cuda":
        kernel, r = _csrc_kernel(op, facts)
        if kernel is None:
            raise BackendUnavailableError(f"{op}: backend 'cuda' unavailable{via}: {r}")
        return KernelChoice(op, "cuda", f"csrc_{kernel}", f"backend='cuda' requested{via}; {r}")

    # ---- auto ----
    if facts.device_type != "cuda":
        return KernelChoice(op, "torch", "torch_reference",
                            f"auto on {facts.device_type} tensors runs the reference")
    if facts.dtype not in KERNEL_DTYPES:
        return KernelChoice(op, "torch", "torch_reference", f"dtype {facts.dtype}: only the reference takes it")
    kernel, csrc_why = _csrc_kernel(op, facts)
    triton_r = _triton_reason(op, facts)
    # 1. csrc warp-specialised Hopper kernels where they apply (measured, H100, same runs):
    #    cached-KV B2 H32 D128 bf16 with RoPE, all work: cond 4 60.3 ms vs 69.6 ms for the Triton
    #    prologue + cuDNN route, cond 16 24.4 vs 27.8 (bench/results/h100/cuda-ext-v6-ws_20261124.json run 3);
    #    prefix_attn is two launches of the same kernel. BSA B1 H32 D128 chunk 4x4x4: 24x44x80 at
    #    0.9375 19.3 ms vs triton 21.5, 24x30x52 4.47 vs 5.65 (cuda_ext_v7_bsa_ws.json). Block-sparse
    #    cached-KV calls ([cache; fresh] keys, the refine step's 40 fresh frames against 8 cached + 40,
    #    44x80, 0.9375): the same kernel over two key segments 63.4 ms vs the Triton two-segment kernel
    #    97.3 (H200, bench/results/h200/bsa-ws-v8_20261203_5004d75.json). v10 (pair tiles, H200):
    #    24x44x80 0.9375 17.9 ms vs Triton 21.1 (bsa-vs-upstream_20261205_ad7328a.json), refine
    #    call 61.7 vs 96.9 (bsa-refine-call_20261205_08180d8.json). v12 (K/V rings 2/4, H100):
    #    17.1-17.7 ms vs v10 17.2-18.2 (bench/results/h100/bsa-ring-stages-ab_20261205_e9f67b6.json).
    if kernel == "sm90_ws":
        return KernelChoice(op, "cuda", "csrc_sm90_ws", f"fastest measured on H100 ({csrc_why})")
    # 1b. block_sparse_attn needing grad: the csrc forward where it applies, the Triton backward
    #    (H200, 24x44x80 4x4x4 0.9375 B1 H32 D128 bf16: forward 17.9 ms vs Triton's 21.1, the
    #    backward unchanged: fwd+bwd 75.9 ms vs 79.8 all-Triton, video 0.9375;
    #    bench/results/h200/bsa-vs-upstream_20261205_ad7328a.log)
    if op == "block_sparse_attn" and facts.requires_grad and triton_r is None:
        k_fwd, why_fwd = _csrc_kernel(op, facts._replace(requires_grad=False))
        if k_fwd == "sm90_ws" and facts.key_segments == 1:
            return KernelChoice(op, "cuda", "csrc_sm90_ws_triton_bwd",
                                f"csrc forward ({why_fwd}), Triton backward: fastest measured for training")
    # 2. dense cached-KV / prefix: Triton RoPE prologue + cuDNN (H100 cond 4: 69 ms vs 74 ms for the
    #    fused Triton kernel, bench/results/h100/bench-cache-bsa-cached-attn_20261124T180012Z_5a35d2e.json)
    if op in KV_OPS and _cudnn_reason(op, facts) is None:
        why = "Hopper warp-specialised csrc kernel not available: " + csrc_why if kernel is None else (
            "csrc " + kernel + " kernel is slower")
        return KernelChoice(op, "triton", "triton_prologue_cudnn",
                            f"fastest measured where the warp-specialised csrc kernel does not run ({why})")
    # 3. Triton: BSA 24x44x80 triton 21.4 ms vs csrc sm90 25.9 ms (bench/results/h100/cuda-ext-v5_20261124.json);
    #    cached-KV fused kernel vs csrc sm80 v1 165 ms
    if triton_r is None:
        if op in CSRC_OPS:
            why = f"csrc: {csrc_why}" if kernel is None else f"faster than csrc {kernel}"
        else:
            why = "no csrc kernel for this op"
        return KernelChoice(op, "triton", _triton_impl(op), f"Triton kernel ({why})")
    # 4. csrc without Triton
    if kernel is not None:
        return KernelChoice(op, "cuda", f"csrc_{kernel}", f"Triton unavailable ({triton_r}); {csrc_why}")
    return KernelChoice(op, "torch", "torch_reference",
                        f"no kernel backend can run (triton: {triton_r}; cuda: {csrc_why})")


# ----------------------------------------------------------------------------------------------
# facts of this machine and of a call
# ----------------------------------------------------------------------------------------------

_TRITON: Dict[str, Optional[str]] = {}
_CAPABILITY: Dict[int, Tuple[int, int]] = {}


# Values of TRITON_INTERPRET that only some Triton versions read as on: 3.3+ (``knobs.runtime.interpret``;
# 3.9: ``getenv_bool``) takes 1/true/on/yes/y, ASCII case-insensitive, nothing stripped; 3.0-3.2 (``jit``)
# only "1". Every other value is off for all of them (" 1", "2", "enable" included).
_TRITON_INTERPRET_WORDS = ("true", "on", "yes", "y")


def triton_interpret() -> bool:
    """True when Triton runs its kernels in the CPU interpreter: ``TRITON_INTERPRET`` read the way the
    installed Triton reads it (the one reader: the op modules, the env report and the dispatcher ask
    this, so they never think kernels run interpreted while Triton compiles them, or the reverse).

    ``"1"`` is on and anything outside 1/true/on/yes/y (any case) off without importing Triton; for
    the words the installed Triton decides (imported then: the user is asking for it), off when it
    cannot be imported.
    """
    import os  # noqa: PLC0415

    raw = os.environ.get("TRITON_INTERPRET", "")
    if raw == "1":
        return True
    if not (raw.isascii() and raw.lower() in _TRITON_INTERPRET_WORDS) or triton_status() is not None:
        return False
    import triton  # noqa: PLC0415

    knobs = getattr(triton, "knobs", None)  # Triton >= 3.3; before, jit() took "1" only
    return bool(knobs.runtime.interpret) if knobs is not None else False


# The Triton CPU interpreter keeps a launch's state in module globals (the program id and grid, the patched
# ``tl`` functions): two threads launching interpreted kernels at once failed ("x >= grid_dim[0]") or mixed
# up their programs. Interpreted launches run one at a time (compiled kernels are not held).
_INTERPRETER_LOCK = threading.RLock()


def launcher(kernel, grid) -> Callable:
    """``kernel[grid]``, launched with the device of its first CUDA tensor argument current, and held under a
    process-wide lock while it runs when ``kernel`` runs in the Triton CPU interpreter (``TRITON_INTERPRET=1``
    at its ``@triton.jit``); every launch of the package's kernels goes through it.

    Triton compiles for and launches on the *current* device's stream: tensors on ``cuda:1`` while ``cuda:0``
    was current (``model.to("cuda:1")`` without ``torch.cuda.set_device``, diffusers' ``device_map``) failed
    with "Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)". Under ``torch.compile`` the
    launch is returned as it is (the compiled graph sets the device)."""
    launch = kernel[grid]
    if torch.compiler.is_compiling():
        return launch
    if type(kernel).__module__.startswith("triton.runtime.interpreter"):
        def run_interpreted(*args, **kwargs):
            with _INTERPRETER_LOCK:
                return launch(*args, **kwargs)

        return run_interpreted

    def run(*args, **kwargs):
        index = _launch_device(args)
        if index is None or index == torch.cuda.current_device():
            return launch(*args, **kwargs)
        with torch.cuda.device(index):
            return launch(*args, **kwargs)

    return run


def _launch_device(args) -> Optional[int]:
    """The index of the first CUDA tensor among a launch's arguments (None without one)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.device.type == "cuda":
            return a.device.index if a.device.index is not None else torch.cuda.current_device()
    return None


def triton_status() -> Optional[str]:
    """None if ``import triton`` works, else the reason. The import is attempted once."""
    if "error" not in _TRITON:
        try:
            import triton  # noqa: F401, PLC0415

            _TRITON["error"] = None
        except Exception as e:  # noqa: BLE001 - any failure means unusable
            _TRITON["error"] = f"import triton failed: {type(e).__name__}: {e}"
    return _TRITON["error"]


def _capability(device: torch.device) -> Tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))
    return _CAPABILITY[idx]


def _cudnn() -> bool:
    try:
        return bool(torch.backends.cudnn.is_available())
    except Exception:  # noqa: BLE001
        return False


_MACHINE: Dict[tuple, Tuple[Facts, Tuple[str, str]]] = {}
# the variables the facts read that a user flips between calls (README: after changing one, reset dynamo or
# compile again): a trace reuses the last eager call's facts only if these are unchanged since
_FACT_VARS = ("TRITON_INTERPRET", "LONGCAT_KERNELS_BACKEND")


def _fact_env() -> Tuple[str, str]:
    import os  # noqa: PLC0415

    return tuple(os.environ.get(n, "") for n in _FACT_VARS)


def machine_facts(device_type: str, device: Optional[torch.device] = None, probe_triton: bool = True) -> Facts:
    """Facts of this machine for tensors on ``device_type`` (input facts left at defaults).

    The compiled extension is loaded (or JIT-built) only for CUDA tensors; ``import triton`` is
    tried for CUDA tensors, under ``TRITON_INTERPRET=1`` or when ``probe_triton`` (a plain CPU call
    on "auto" runs the reference and never imports triton). Eager calls read the
    environment each time; inside ``torch.compile`` the facts of the last eager call are reused
    (nothing to trace: the environment and the extension's lock stay out of the graph) while
    ``TRITON_INTERPRET`` and ``LONGCAT_KERNELS_BACKEND`` are as they were then (else read anew)."""
    key = (device_type, None if device is None else device.index, probe_triton)
    if torch.compiler.is_compiling():
        hit = _MACHINE.get(key)
        # facts cached under other settings (an eager call before TRITON_INTERPRET or the backend was changed)
        # made a fresh compile, after torch._dynamo.reset() too, keep the old choice: traced anew then
        if hit is not None and hit[1] == _fact_env():
            return hit[0]
    f = _machine_facts(device_type, device, probe_triton)
    if not torch.compiler.is_compiling():
        _MACHINE[key] = (f, _fact_env())
    return f


def _machine_facts(device_type: str, device: Optional[torch.device], probe_triton: bool) -> Facts:
    # a trace must not read or flip the scan's once-per-process flag (its guard failed on the next call)
    check_environment(scan=not torch.compiler.is_compiling())
    interpret = triton_interpret()
    triton_error = triton_status() if (probe_triton or device_type == "cuda" or interpret) else None
    if device_type == "cuda" and torch.cuda.is_available():
        from ._ext import csrc_kernels, extension_error  # noqa: PLC0415

        cap = _capability(device if device is not None else torch.device("cuda"))
        ext_error = extension_error()
        ks = csrc_kernels() if ext_error is None else ()
        return Facts("cuda", capability=cap, triton_error=triton_error, interpret=interpret,
                     ext_error=ext_error, csrc_kernels=ks, cudnn=_cudnn(), env_backend=backend_override())
    ext_error = "no CUDA device (torch.cuda.is_available() is False)"
    return Facts(device_type, capability=None, triton_error=triton_error, interpret=interpret,
                 ext_error=ext_error, csrc_kernels=(), cudnn=False, env_backend=backend_override())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_LAST: Dict[str, KernelChoice] = {}
# copy on write: registering or unregistering a recorder binds a new list (under the lock), never edits the
# one a `choose` in another thread may be iterating (an in-place removal shifted the later recorders down one
# index under that loop: the next recorder missed the choice)
_RECORDERS: List[List[KernelChoice]] = []
_RECORDERS_LOCK = threading.Lock()


def choose(
    op: str,
    *tensors,
    requested: str = "auto",
    block_sparse: bool = False,
    block_tokens: Optional[Tuple[int, int]] = None,
    key_segments: int = 1,
    key_split_aligned: bool = True,
    needs_grad: Optional[bool] = None,
    gqa: Optional[bool] = None,
    rope_pairs: str = "interleaved",
    norm_all_heads: bool = False,
    record: bool = True,
) -> KernelChoice:
    """Collects the facts of this call (first tensor: device, dtype, head_dim) and decides.

    Args:
        op: public op name.
        tensors: the op's tensor inputs (None entries ignored).
        requested: the ``backend=`` argument.
        block_sparse, block_tokens, key_segments, key_split_aligned, rope_pairs, norm_all_heads:
            see ``Facts``.
        needs_grad: override of ``requires_grad`` (default: any tensor requires grad, grad mode on).
        gqa: override of ``Facts.gqa`` (default: some other 4-D tensor has a different head count
            (dim 2) than the first).
        record: False for a question that runs nothing (whether a backend could run the op): the answer
            is not logged, nor seen by ``last_choice`` / ``record_choices``, which list what ran.
    """
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    q = ts[0]
    if needs_grad is None:
        needs_grad = _needs_grad(*ts)
    func_transform = _func_differentiated(*ts)
    if gqa is None:
        gqa = q.dim() == 4 and any(t.dim() == 4 and t.shape[2] != q.shape[2] for t in ts[1:])
    probe = requested == "triton" or (
        requested == "auto" and not torch.compiler.is_compiling() and backend_override() == "triton")
    f = machine_facts(q.device.type, q.device, probe_triton=probe)._replace(
        dtype=_dtype_name(q.dtype), head_dim=int(q.shape[-1]), requires_grad=bool(needs_grad) or func_transform,
        func_transform=func_transform, func_vmap=_func_batched(*ts),
        block_sparse=bool(block_sparse), block_tokens=block_tokens, key_segments=int(key_segments),
        key_split_aligned=bool(key_split_aligned),
        gqa=bool(gqa), rope_pairs=str(rope_pairs), norm_all_heads=bool(norm_all_heads),
    )
    choice = choose_kernel(op, f, requested)
    if record and not torch.compiler.is_compiling():
        _LAST[op] = choice
        for rec in _RECORDERS:
            rec.append(choice)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: backend=%s impl=%s (%s)", op, choice.backend, choice.impl, choice.reason)
    return choice


def choose_dense_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, requested: str) -> Optional[KernelChoice]:
    """Dense self-attention needing gradients (training): ``attn_with_kv_cache`` is forward only, so its callers
    (``longcat_vc``'s self-attention, the diffusers processor) run PyTorch SDPA, which has a backward. This
    decides whether they may, and records it as the op's ``torch_reference`` (SDPA): ``"auto"`` and ``"torch"``
    do; ``"triton"`` / ``"cuda"`` raise ``BackendUnavailableError`` with the reason (forward-only kernels)
    instead of being replaced by SDPA without a word. Under ``LONGCAT_KERNELS_BACKEND=triton``/``cuda`` (which
    would refuse the forward-only op) ``"auto"`` still runs SDPA, unrecorded (None returned)."""
    try:
        c = choose("attn_with_kv_cache", q, k, v, requested=requested)
    except BackendUnavailableError:
        if requested == "auto":  # only the variable's backend raises here: auto's SDPA is kept
            return None
        raise
    if c.impl != "torch_reference":  # not reached today: no kernel of the op has a backward
        raise BackendUnavailableError(f"attn_with_kv_cache: backend {requested!r} unavailable: dense attention "
                                      f"needing gradients runs SDPA, not {c.impl}")
    return c


def last_choice(op: str) -> Optional[KernelChoice]:
    """The last ``KernelChoice`` made for ``op`` in this process (eager calls), or None."""
    return _LAST.get(op)


@contextlib.contextmanager
def record_choices() -> Iterator[List[KernelChoice]]:
    """``with record_choices() as got: ...``: ``got`` lists every choice made inside, in order, by any thread
    of the process (the recorders are process-wide: another thread's op calls during the block are listed
    too; a per-thread list would need thread-local state, which ``torch.compile`` traces of ``choose``
    would have to guard on)."""
    global _RECORDERS
    rec: List[KernelChoice] = []
    with _RECORDERS_LOCK:
        _RECORDERS = [*_RECORDERS, rec]
    try:
        yield rec
    finally:
        # by identity: ``list.remove`` compares by equality, and a nested recorder that saw the same choices
        # as the outer one removed the outer list (which then missed the later choices; its own exit raised)
        with _RECORDERS_LOCK:
            _RECORDERS = [r for r in _RECORDERS if r is not rec]


# ----------------------------------------------------------------------------------------------
# the registry: (op, impl) -> callable
# ----------------------------------------------------------------------------------------------

# Every implementation takes the op's normalised arguments (see each op's api.py docstring).
# csrc impls are one function per op with kernel=<family>; the kernel is passed explicitly.
_REGISTRY: Dict[Tuple[str, str], Tuple[str, str, Optional[str]]] = {
    ("select_blocks", "triton"): ("block_sparse_attn.triton", "select_blocks_triton", None),
    ("block_sparse_attn", "triton"): ("block_sparse_attn.triton", "block_sparse_attn_triton", None),
    ("block_sparse_attn_fwd", "triton"): ("block_sparse_attn.triton", "bsa_forward_triton", None),
    ("attn_with_kv_cache", "triton_fused"): ("kv_cache_attn.triton", "attn_with_kv_cache_triton", None),
    ("attn_with_kv_cache", "triton_prologue_cudnn"): ("kv_cache_attn.cudnn", "attn_with_kv_cache_cudnn", None),
    ("prefix_attn", "triton_fused"): ("kv_cache_attn.triton", "prefix_attn_triton", None),
    ("prefix_attn", "triton_prologue_cudnn"): ("kv_cache_attn.cudnn", "prefix_attn_cudnn", None),
    ("qk_norm_rope", "triton"): ("rope.triton", "qk_norm_rope_triton", None),
    ("fp8_quantize", "triton"): ("fp8_quant.triton", "fp8_quantize_triton", None),
}
_REGISTRY[("block_sparse_attn", "csrc_sm90_ws_triton_bwd")] = (
    "block_sparse_attn.cuda", "block_sparse_attn_ws_train", None)
for _op, _fn in (
    ("block_sparse_attn", "block_sparse_attn_cuda"),
    ("block_sparse_attn_fwd", "bsa_forward_cuda"),
    ("attn_with_kv_cache", "attn_with_kv_cache_cuda"),
    ("prefix_attn", "prefix_attn_cuda"),
):
    _pkg = OPS[_op]
    for _k in ("sm90_ws", "sm90", "sm80"):
        _REGISTRY[(_op, f"csrc_{_k}")] = (f"{_pkg}.cuda", _fn, _k)

_CALLABLES: Dict[Tuple[str, str], Callable] = {}


def _bind(fn: Callable, kernel: Optional[str]) -> Callable:
    if kernel is None:
        return fn

    def run(*args, **kwargs):
        return fn(*args, kernel=kernel, **kwargs)

    run.__name__ = f"{fn.__name__}[{kernel}]"
    return run


def impl_fn(op: str, impl: str) -> Callable:
    """The callable registered for ``(op, impl)`` (``torch_reference`` is run by the op's api)."""
    key = (op, impl)
    fn = _CALLABLES.get(key)
    if fn is None:
        if key not in _REGISTRY:
            raise KeyError(f"no implementation {impl!r} registered for {op!r}")
        module, name, kernel = _REGISTRY[key]
        full = f"longcat_kernels.ops.{module}"
        mod = sys.modules.get(full)
        if mod is None:
            mod = importlib.import_module(full)
        fn = _CALLABLES[key] = _bind(getattr(mod, name), kernel)
    return fn


def preload_kernel_modules() -> None:
    """Imports the Triton modules now if they can run here (CUDA device or ``TRITON_INTERPRET=1``).

    ``torch.compile`` cannot trace ``importlib``: the first call of an op inside a ``fullgraph=True``
    compiled function would fail on the lazy import. Failures are left to the call that needs them.
    """
    if not (triton_interpret() or torch.cuda.is_available()) or triton_status() is not None:
        return
    for (op, impl), (module, _, _) in _REGISTRY.items():
        if impl.startswith("triton"):
            try:
                impl_fn(op, impl)
            except Exception as e:  # noqa: BLE001 - reported when the op is called
                log.debug("preloading %s failed: %s", module, e)
