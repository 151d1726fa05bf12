"""Shared argument checks for the public ops.

Every check raises ``TypeError`` (wrong kind/dtype) or ``ValueError`` (wrong value/shape) with a
message naming the argument, what was expected and what was given. All checks are skipped while
``torch.compiler.is_compiling()`` (they are pure Python on metadata and would only add guards).
"""

from __future__ import annotations

import contextlib
import numbers
import os
import sys
from typing import Optional, Sequence

import torch

from .grid import Triple, as_triple, total_blocks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FP32_MAX = 3.4028234663852886e38
# the largest softmax scale: the kernels multiply by scale * log2(e) in fp32 (2.358648e38; printed in
# full by the error: rounded up to 5 digits, 2.3587e38, it read as a bound that 2.3587e38 meets)
MAX_SCALE = FP32_MAX / 1.4426950408889634


def compiling() -> bool:
    """True while torch.compile / dynamo traces the caller."""
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


_TORCH_DIR = os.path.join(os.path.dirname(os.path.abspath(torch.__file__)), "")


def user_stacklevel(*package_dirs: str) -> int:
    """``warnings.warn``'s ``stacklevel`` for the function calling this one that names the first frame outside
    ``package_dirs`` and torch (its ``no_grad`` wrappers): the line of the user's code that led to the warning,
    however deep inside the package the warning is raised."""
    own = tuple(os.path.join(os.path.abspath(d), "") for d in package_dirs) + (_TORCH_DIR,)
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(own):
        frame, level = frame.f_back, level + 1
    return level


def _autocast_on(dev_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(dev_type)
    except RuntimeError:  # a device type autocast does not know
        return False


def autocast_dtype(device) -> Optional[torch.dtype]:
    """``torch.autocast``'s dtype for ``device``'s type while it is on there, else None."""
    dev_type = torch.device(device).type
    return torch.get_autocast_dtype(dev_type) if _autocast_on(dev_type) else None


def autocast_off(device):
    """A context turning ``torch.autocast`` off for ``device``'s type while it is on (else a no-op): work that
    must run in the dtype it is given (the fp32 references, the DiT's fp32 timestep embedding, adaLN
    modulations and final projection) under an outer bf16 autocast."""
    dev_type = torch.device(device).type
    return torch.autocast(dev_type, enabled=False) if _autocast_on(dev_type) else contextlib.nullcontext()


def has_values(t: torch.Tensor) -> bool:
    """False for a tensor without data (a meta tensor, a FakeTensor outside torch.compile): value checks,
    the value-sized shortcuts (``.item()``) and caches are skipped for it, shapes still flow. True while
    dynamo traces (it stands for the real tensor of each call; dynamo cannot trace ``is_fake``)."""
    if t.device.type == "meta":
        return False
    if torch.compiler.is_dynamo_compiling():
        return True
    from torch._subclasses.fake_tensor import is_fake  # noqa: PLC0415

    return not is_fake(t)


def cache_mode():
    """Context for building a cached tensor: outside ``torch.inference_mode`` even when the caller is in
    it, so the cache holds normal tensors (an inference tensor breaks every later call that autograd
    records: it cannot be saved for backward). A no-op while tracing (dynamo cannot ask the mode)."""
    if compiling() or not torch.is_inference_mode_enabled():
        return contextlib.nullcontext()
    return torch.inference_mode(False)


def plain_int(value):
    """A numpy (or other ``numbers.Integral``) integer as a Python int, as the grid helpers take it;
    anything else (bool, float, a Python int) unchanged, for the check that names it."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, int)):
        return int(value)
    return value


def plain_float(value):
    """A numpy float32 (or other non-``float`` ``numbers.Real``, not an integer) as a Python float, as
    ``plain_int`` does for integers: it was a TypeError where numpy float64 (a ``float`` subclass) passed,
    and kept as float32 it would compute ``1 - sparsity`` in float32. Anything else unchanged, for the check."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, float, numbers.Integral)):
        return float(value)
    return value


def check_dense(x: torch.Tensor, name: str) -> None:
    """``x`` is a dense strided tensor: the kernels and references index strided memory (a sparse tensor failed
    deep inside torch or Triton, "expand is unsupported for Sparse tensors"; a jagged nested q was taken for a
    batch of its sequences and k was blamed)."""
    if x.is_nested or x.layout != torch.strided:
        if x.is_nested:
            got, fix = "a nested tensor", f"pad it ({name}.to_padded_tensor(0.0)) or make one call per sequence"
        else:
            got, fix = f"layout {x.layout}", f"pass {name}.to_dense()"
        raise TypeError(f"{name}: expected a dense (strided) tensor, got {got}; {fix}")


def check_tensor(x, name: str, ndim: Optional[int] = 4, layout: str = "[batch, seq, heads, head_dim]") -> None:
    """``x`` is a floating tensor of rank ``ndim``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    check_dense(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a floating dtype (float16, bfloat16, float32; float64 on the torch backend), got {x.dtype}"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor {layout}, got shape {tuple(x.shape)}")


def check_same_device(named: Sequence[tuple]) -> None:
    """All given ``(name, tensor)`` pairs (None tensors ignored) are on one device."""
    items = [(n, t) for n, t in named if t is not None]
    if not items:
        return
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.device != t0.device:
            raise ValueError(f"{n}: expected a tensor on {n0}'s device {t0.device}, got {t.device}")


def check_same_dtype(named: Sequence[tuple]) -> None:
    items = [(n, t) for n, t in named if t is not None]
    if not items:
        return
    n0, t0 = items[0]
    for n, t in items[1:]:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n}: expected dtype {t0.dtype} (same as {n0}), got {t.dtype}")


def check_qkv(q, k, v, names=("q", "k", "v"), gqa: bool = False) -> None:
    """q, k, v are BSHD tensors with matching batch, heads, head_dim, dtype and device;
    k and v have the same sequence length. ``gqa``: k/v may have fewer heads dividing q's."""
    if compiling():
        return
    nq, nk, nv = names
    check_tensor(q, nq)
    check_tensor(k, nk)
    check_tensor(v, nv)
    check_same_device([(nq, q), (nk, k), (nv, v)])
    check_same_dtype([(nq, q), (nk, k), (nv, v)])
    B, _, H, D = q.shape
    for n, t in ((nk, k), (nv, v)):
        if t.shape[0] != B:
            raise ValueError(f"{n}: expected batch {B} (same as {nq}), got {t.shape[0]} (shape {tuple(t.shape)})")
        # heads 0 on q, k and v: an empty result (nothing to compute), not a GQA error
        if gqa and t is v and v.shape[2] != k.shape[2] and k.shape[2] >= 1 and H % k.shape[2] == 0:
            # k's count is valid: name it (the message below read "dividing q's 4 heads, got 4" for v)
            raise ValueError(f"{n}: expected {k.shape[2]} heads (same as {nk}: GQA shares each k/v head), got "
                             f"{t.shape[2]} (shape {tuple(t.shape)})")
        if gqa and not (H == 0 and t.shape[2] == 0) and (t.shape[2] < 1 or H % t.shape[2] or t.shape[2] != k.shape[2]):
            raise ValueError(
                f"{n}: expected a number of heads dividing {nq}'s {H} heads (same for {nk} and {nv}), got {t.shape[2]} "
                f"(shape {tuple(t.shape)})"
            )
        if not gqa and t.shape[2] != H:
            raise ValueError(f"{n}: expected {H} heads (same as {nq}), got {t.shape[2]} (shape {tuple(t.shape)})")
        if t.shape[3] != D:
            raise ValueError(f"{n}: expected head_dim {D} (same as {nq}), got {t.shape[3]} (shape {tuple(t.shape)})")
    if D == 0:
        raise ValueError(f"{nq}: expected head_dim >= 1, got 0 (shape {tuple(q.shape)})")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{nv}: expected seq {k.shape[1]} (same as {nk}), got {v.shape[1]}")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"{nq}/{nk}: expected non-empty sequences, got seq_q={q.shape[1]}, seq_k={k.shape[1]}")


def check_scale(scale, name: str = "scale") -> None:
    if scale is None or compiling():
        return
    scale = plain_float(scale)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{name}: expected a float or None, got {type(scale).__name__}")
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise ValueError(f"{name}: expected a finite positive float, got {scale}")
    # the kernels fold log2(e) into the scale in fp32 (Triton, csrc: exp2(s * scale * log2 e)): a scale past
    # fp32 max / log2(e) is inf there, every output NaN while the torch reference gave finite ones
    if scale > MAX_SCALE:
        raise ValueError(f"{name}: expected at most the fp32 maximum / log2(e) = {MAX_SCALE!r} (the kernels scale "
                         f"by scale * log2(e) in fp32), got {scale}")


def default_scale(q: torch.Tensor, scale) -> float:
    """The softmax scale an attention op runs with: ``head_dim ** -0.5`` for None (SPEC's default), else
    ``float(scale)`` (checked by ``check_scale``)."""
    return q.shape[-1] ** -0.5 if scale is None else float(scale)


def check_prefix_len(prefix_len, seq: int) -> None:
    """The cond/noisy prefix rule's ``prefix_len``: an int (no bool, no float: 2.5 truncated to 2 sliced
    the wrong tokens) with ``0 <= prefix_len <= seq`` (outside it gave plain attention, silently)."""
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise TypeError(f"prefix_len: expected an int, got {type(prefix_len).__name__}")
    if not 0 <= prefix_len <= seq:
        raise ValueError(f"prefix_len: expected 0 <= prefix_len <= seq = {seq}, got {prefix_len}")


def check_eps(eps, norm: str) -> float:
    """A norm's ``eps`` as a float: a real number (no bool), finite, >= 0 (NaN would turn every output into
    NaN) and at most the fp32 maximum (the ``norm`` adds it in fp32: inf there, every row silently 0)."""
    eps = plain_float(eps)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a finite float >= 0, got {type(eps).__name__} {eps!r}")
    if not 0 <= eps < float("inf"):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    if eps > FP32_MAX:
        raise ValueError(f"eps: expected at most the fp32 maximum 3.4028e38 (the {norm} is fp32), got {eps!r}")
    return float(eps)


def check_bool(value, name: str) -> None:
    """``value`` is a Python bool: a truthy stand-in (``"no"``, ``1``, ``None``) would silently pick a branch."""
    if compiling():
        return
    if not isinstance(value, bool):
        t = type(value)
        # numpy's bool class is also named "bool": "expected a bool, got bool" contradicted itself
        tn = t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__name__}"
        raise TypeError(f"{name}: expected a bool (True or False), got {tn} {value!r}")


def check_grid(grid, seq_len: int, name: str, seq_name: str) -> Triple:
    """``grid`` is 3 positive ints whose product equals ``seq_len``."""
    g = as_triple(grid, name)
    if g[0] * g[1] * g[2] != seq_len:
        raise ValueError(
            f"{name}: expected t*h*w == {seq_name} length {seq_len}, got {g} (product {g[0] * g[1] * g[2]})"
        )
    return g


def check_chunk(chunk, grid: Triple, name: str, grid_name: str) -> Triple:
    """``chunk`` is 3 positive ints, each at most the grid's extent on that axis."""
    c = as_triple(chunk, name)
    for axis, ci, gi in zip("thw", c, grid):
        if ci > gi:
            raise ValueError(f"{name}: expected each chunk size <= {grid_name} {grid}, got {c} ({axis}: {ci} > {gi})")
    return c


def check_sparsity(sparsity, cdf_threshold) -> None:
    if sparsity is None and cdf_threshold is None:
        raise ValueError(
            "sparsity/cdf_threshold: expected at least one selection rule (sparsity for top-k, "
            "cdf_threshold for cdf, or both), got sparsity=None and cdf_threshold=None"
        )
    sparsity, cdf_threshold = plain_float(sparsity), plain_float(cdf_threshold)
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise TypeError(f"sparsity: expected a float in [0, 1) or None, got {type(sparsity).__name__}")
        if not (0.0 <= sparsity < 1.0):
            raise ValueError(f"sparsity: expected a float in [0, 1), got {sparsity}")
    if cdf_threshold is not None:
        if isinstance(cdf_threshold, bool) or not isinstance(cdf_threshold, (int, float)):
            raise TypeError(f"cdf_threshold: expected a float in [0, 1] or None, got {type(cdf_threshold).__name__}")
        if not (0.0 <= cdf_threshold <= 1.0):
            raise ValueError(f"cdf_threshold: expected a float in [0, 1], got {cdf_threshold}")


def check_backend_name(backend) -> None:
    from ._backend import BACKENDS  # noqa: PLC0415

    if not isinstance(backend, str):
        raise TypeError(f"backend: expected one of {BACKENDS}, got {type(backend).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def needs_grad(*ts) -> bool:
    """Grad mode is on and some tensor among ``ts`` (others: None, numbers, ignored) requires grad: the
    call would need a backward (metadata only)."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in ts)


def func_differentiated(*ts) -> bool:
    """Some tensor among ``ts`` is differentiated by a ``torch.func`` transform (``grad``, ``jacrev``,
    ``jvp``, ...: a functorch grad wrapper that requires grad or has a tangent anywhere in its wrapping,
    so also inside ``vmap``, where the outer ``requires_grad`` reads False) or carries a forward-mode AD tangent (``torch.autograd.forward_ad``).
    The torch.library ops have no rule for either (functorch raised an unrelated error, jvp got a zero
    tangent), and ``requires_grad`` alone misses both (metadata only)."""
    if compiling():  # dynamo cannot trace the functorch queries (metadata only, like requires_grad there)
        return False
    try:
        return _func_differentiated(ts)
    except AttributeError:  # private functorch / forward-AD queries moved in another torch: as before them
        return False


def _func_differentiated(ts) -> bool:
    if torch._C._functorch.peek_interpreter_stack() is None and torch.autograd.forward_ad._current_level < 0:
        return False
    for t in ts:
        if not isinstance(t, torch.Tensor):
            continue
        x = t
        while True:
            # a constant lifted into the transform is wrapped too, but neither requires grad nor has a tangent
            if torch.autograd.forward_ad._current_level >= 0 and torch.autograd.forward_ad.unpack_dual(x).tangent is not None:
                return True
            if not torch._C._functorch.is_functorch_wrapped_tensor(x):
                break
            if torch._C._functorch.is_gradtrackingtensor(x) and x.requires_grad and torch.is_grad_enabled():
                return True
            x = torch._C._functorch.get_unwrapped(x)
    return False


def func_batched(*ts) -> bool:
    """Some tensor among ``ts`` is batched by ``torch.func.vmap`` (a functorch batched tensor anywhere in its
    wrapping, e.g. under ``grad(vmap(...))``): ops that write a preallocated output in place have no vmap rule
    (torch's fallback refuses them: "Batching rule not implemented"). Metadata only."""
    if compiling():  # dynamo cannot trace the functorch queries; it batches through its own rules
        return False
    try:
        if torch._C._functorch.peek_interpreter_stack() is None:
            return False
        for t in ts:
            x = t
            while isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x):
                if torch._C._functorch.is_batchedtensor(x):
                    return True
                x = torch._C._functorch.get_unwrapped(x)
    except AttributeError:  # private functorch queries moved in another torch: as before them
        return False
    return False


def check_no_grad(named: Sequence[tuple], op: str) -> None:
    for n, t in named:
        if t is not None and func_differentiated(t):
            raise ValueError(
                f"{n}: {op} is forward-only (no backward); expected no torch.func grad/jvp transform or forward-mode "
                "AD over it, got one (call it on detached inputs, or outside the transform)"
            )
    if not torch.is_grad_enabled():
        return
    for n, t in named:
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{n}: {op} is forward-only (no backward); expected requires_grad=False, got True "
                "(call it under torch.no_grad() or detach the input)"
            )


# --- registered Triton ops (torch.ops.longcat_kernels.*): shape-only checks of what their launchers index ---
# The public functions pass valid arguments; a direct torch.ops call (or a hand-written graph) may not, and
# the kernels then read and write out of bounds (a segfault or heap corruption under the interpreter, wrong
# memory on a GPU). The csrc twins check the same in csrc/ops.cpp. Metadata only: no device sync.

def _op_triple(op: str, value, name: str) -> Triple:
    if len(value) != 3 or any(isinstance(x, bool) or int(x) <= 0 for x in value):
        raise ValueError(f"{op}: {name}: expected 3 positive ints (t, h, w), got {list(value)}")
    return (int(value[0]), int(value[1]), int(value[2]))


def check_op_kv(op: str, q: torch.Tensor, pairs: Sequence[tuple], gqa: bool = False) -> None:
    """Each ``(k_name, k, v_name, v, batch_one_ok)`` of ``pairs`` (k None: skipped): k and v of one shape,
    batch q's (or 1 where ``batch_one_ok``), heads q's (or dividing them with ``gqa``, the same for every
    pair), head_dim, dtype and device q's (the kernels mix no dtypes: a direct ``torch.ops`` call with, say,
    fp16 v and fp32 q ran silently in mixed precision, or failed inside Triton)."""
    if not q.dtype.is_floating_point:
        raise TypeError(f"{op}: q: expected a floating dtype, got {q.dtype}")
    B, _, H, D = q.shape
    kv_heads = None
    for kn, k, vn, v, batch_one_ok in pairs:
        if k is None:
            continue
        for n, t in ((kn, k), (vn, v)):
            if t.dtype != q.dtype or t.device != q.device:
                raise TypeError(f"{op}: {n}: expected q's dtype {q.dtype} on {q.device}, got {t.dtype} on {t.device}")
        if k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
            raise ValueError(f"{op}: {vn}: expected a 4-D tensor of {kn}'s shape {tuple(k.shape)}, got {tuple(v.shape)}")
        if k.shape[0] != B and not (batch_one_ok and k.shape[0] == 1):
            raise ValueError(f"{op}: {kn}: expected batch {'1 or ' if batch_one_ok else ''}{B} (q's), got shape "
                             f"{tuple(k.shape)}")
        h = k.shape[2]
        # heads 0 on q and k/v: an empty result (nothing to compute), as in check_qkv
        gqa_bad = gqa and not (H == 0 and h == 0) and (h < 1 or H % h)
        if (h != H and not gqa) or gqa_bad or (kv_heads is not None and h != kv_heads):
            raise ValueError(f"{op}: {kn}: expected {H} heads (q's{', or a divisor of them' if gqa else ''}), got shape "
                             f"{tuple(k.shape)}")
        kv_heads = h
        if k.shape[3] != D:
            raise ValueError(f"{op}: {kn}: expected head_dim {D} (q's), got shape {tuple(k.shape)}")


def check_op_grad_inputs(op: str, q: torch.Tensor, do: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                         dlse: Optional[torch.Tensor] = None) -> None:
    """A backward op's saved and incoming tensors: ``do`` and ``out`` of q's shape, dtype and device, ``lse``
    ``[B, H, Sq]`` float32 and ``dlse`` (if any) ``[B, H, Sq]`` floating, on q's device (the kernels index them with q's strides and
    sizes: a direct ``torch.ops`` call with a transposed ``do`` or a ``[B, Sq, H]`` lse read out of bounds or
    the wrong rows, silently)."""
    for n, t in (("do", do), ("out", out)):
        if tuple(t.shape) != tuple(q.shape) or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{op}: {n}: expected q's shape {tuple(q.shape)}, dtype {q.dtype} on {q.device}, got "
                             f"{tuple(t.shape)} {t.dtype} on {t.device}")
    B, Sq, H, _ = q.shape
    for n, t in (("lse", lse), ("dlse", dlse)):
        # lse as the forward wrote it (fp32: a half copy moves every row's exp by up to 2^-8 relative)
        if t is None:
            continue
        ok_dtype = t.dtype == torch.float32 if n == "lse" else t.dtype.is_floating_point
        if tuple(t.shape) != (B, H, Sq) or not ok_dtype or t.device != q.device:
            want = "float32" if n == "lse" else "floating"
            raise ValueError(f"{op}: {n}: expected a {want} [B, H, Sq] = {[B, H, Sq]} tensor on {q.device}, got "
                             f"{list(t.shape)} {t.dtype} on {t.device}")


def check_op_block_geometry(op: str, q: torch.Tensor, seq_k: int, grid_q, grid_k, chunk_q, chunk_k,
                            indices: Optional[torch.Tensor] = None, counts: Optional[torch.Tensor] = None) -> None:
    """Grids and chunks of 3 positive ints, ``grid_q`` covering q's seq and ``grid_k`` the ``seq_k`` keys with
    grid_q's (h, w) (the kernels place key tokens with it), and ``indices [B, H, Nq, max_sel]`` /
    ``counts [B, H, Nq]`` of that geometry."""
    gq, gk = _op_triple(op, grid_q, "grid_q"), _op_triple(op, grid_k, "grid_k")
    cq, _ = _op_triple(op, chunk_q, "chunk_q"), _op_triple(op, chunk_k, "chunk_k")
    if gq[0] * gq[1] * gq[2] != q.shape[1]:
        raise ValueError(f"{op}: grid_q: expected t*h*w == q's seq {q.shape[1]}, got {list(gq)}")
    if gk[0] * gk[1] * gk[2] != seq_k:
        raise ValueError(f"{op}: grid_k: expected t*h*w == the keys' seq {seq_k}, got {list(gk)}")
    if gk[1:] != gq[1:]:
        raise ValueError(f"{op}: grid_k: expected grid_q's (h, w) {list(gq[1:])}, got {list(gk)}")
    if indices is None:
        return
    for n, t in (("indices", indices), ("counts", counts)):
        # block ids as integers (a float tensor failed inside Triton: "unexpected type fp32")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{op}: {n}: expected an integer dtype (torch.int32), got {t.dtype}")
    B, _, H, _ = q.shape
    nq = total_blocks(gq, cq)
    if indices.dim() != 4 or tuple(indices.shape[:3]) != (B, H, nq):
        raise ValueError(f"{op}: indices: expected shape [{B}, {H}, {nq}, max_sel] (batch, heads, query blocks of "
                         f"grid_q {list(gq)} / chunk_q {list(cq)}), got {list(indices.shape)}")
    if tuple(counts.shape) != (B, H, nq):
        raise ValueError(f"{op}: counts: expected shape [{B}, {H}, {nq}], got {list(counts.shape)}")


def check_op_rope_tables(op: str, x: torch.Tensor, tables: Optional[Sequence], grid_h: int, grid_w: int,
                         frame_offset: int, name: str = "x") -> None:
    """Six 2-D rope tables (cos/sin of t, h, w; each sin of its cos's shape) whose widths add up to
    head_dim and which cover frames ``frame_offset ..`` of ``x`` on a ``grid_h x grid_w`` grid."""
    if tables is None:
        return
    names = ("cos_t", "sin_t", "cos_h", "sin_h", "cos_w", "sin_w")
    if any(t is None for t in tables):
        raise ValueError(f"{op}: {'/'.join(names)}: expected all six rope tables or none, got "
                         f"{[n for n, t in zip(names, tables) if t is None]} missing")
    for n, t in zip(names, tables):
        if t.dim() != 2:
            raise ValueError(f"{op}: {n}: expected a 2-D table [positions, dims], got shape {list(t.shape)}")
    for i in (0, 2, 4):
        if tables[i + 1].shape != tables[i].shape:
            raise ValueError(f"{op}: {names[i + 1]}: expected {names[i]}'s shape {list(tables[i].shape)}, got "
                             f"{list(tables[i + 1].shape)}")
    D = x.shape[3]
    if tables[0].shape[1] + tables[2].shape[1] + tables[4].shape[1] != D:
        raise ValueError(f"{op}: cos_t/cos_h/cos_w: expected widths adding up to {name}'s head_dim {D}, got "
                         f"{tables[0].shape[1]}+{tables[2].shape[1]}+{tables[4].shape[1]}")
    if grid_h <= 0 or grid_w <= 0 or frame_offset < 0:
        raise ValueError(f"{op}: grid_h/grid_w/frame_offset: expected positive grid_h, grid_w and frame_offset >= 0, "
                         f"got {grid_h}, {grid_w}, {frame_offset}")
    hw = grid_h * grid_w
    if x.shape[1] % hw:
        raise ValueError(f"{op}: {name}: expected seq to be whole frames of grid_h*grid_w = {hw} tokens, got seq "
                         f"{x.shape[1]}")
    last = frame_offset + x.shape[1] // hw
    if tables[0].shape[0] < last or tables[2].shape[0] < grid_h or tables[4].shape[0] < grid_w:
        raise ValueError(f"{op}: cos_t/cos_h/cos_w: expected tables covering frames {frame_offset}..{last - 1} of a "
                         f"{grid_h}x{grid_w} grid, got {tables[0].shape[0]} frames, {tables[2].shape[0]}x"
                         f"{tables[4].shape[0]}")


def check_op_cache_rope(op: str, q: torch.Tensor, k: torch.Tensor, k_cache: Optional[torch.Tensor],
                        tables: Optional[Sequence], grid_h: int, grid_w: int) -> None:
    """The cached-KV ops' rope checks (``tables`` None: no rope): the cache is whole frames of a
    ``grid_h x grid_w`` grid (the fresh tokens start at the frame after it) and the tables cover q's and k's
    frames from there (``check_op_rope_tables``)."""
    if tables is None or all(t is None for t in tables):
        return
    Sc = 0 if k_cache is None else k_cache.shape[1]
    if grid_h <= 0 or grid_w <= 0 or Sc % (grid_h * grid_w):
        raise ValueError(f"{op}: k_cache: expected whole frames of grid_h*grid_w = {grid_h}x{grid_w} tokens, got seq {Sc}")
    frame = Sc // (grid_h * grid_w)
    check_op_rope_tables(op, q, tables, grid_h, grid_w, frame, "q")
    check_op_rope_tables(op, k, tables, grid_h, grid_w, frame, "k")


def check_op_prefix(op: str, q: torch.Tensor, k: torch.Tensor, prefix_len: int) -> int:
    """The prefix ops' (Triton and cuDNN) ``prefix_len`` as an int: k of q's seq and ``0 <= prefix_len <= seq``
    (the kernels slice k[:, :P] / k[:, P:] as Python slices: outside it, rows were left unwritten or plain
    attention ran, silently; the csrc op raises too)."""
    P, S = int(prefix_len), q.shape[1]
    if k.shape[1] != S:
        raise ValueError(f"{op}: k: expected seq {S} (q's), got shape {tuple(k.shape)}")
    if not 0 <= P <= S:
        raise ValueError(f"{op}: prefix_len: expected 0 <= prefix_len <= seq = {S}, got {P}")
    return P
