"""CUDA backend (compiled ``csrc/`` extension) of block-sparse attention: op wrappers + fakes.

The kernels run one CTA per (query block, batch*head), walk the selected key blocks of
``BlockSelection`` and gather each block's tokens from the 3D geometry (partial edge blocks
masked); online softmax in fp32; return ``(out, lse)``. Backward: kernel ``"sm90_ws"`` with one
key segment (``bsa_backward_cuda``, csrc/bsa_bwd_sm90_ws.cu); the other kernels are forward only. ``kernel`` names the csrc
kernel family (``"sm90_ws"``, ``"sm90"``, ``"sm80"``; experimental: ``"sm90_ws_union"``, the two
query blocks of a CTA loading the union of their selections once): ``longcat_kernels.dispatch`` decides it and
the C++ side raises if it cannot run that kernel (no silent switch). ``kernel=None`` asks the
dispatcher for the cuda backend's choice for these inputs.

Registered op: ``torch.ops.longcat_kernels.bsa_fwd_cuda(q, k, v, k_fresh, v_fresh, indices, counts,
grid_q, grid_k, chunk_q, chunk_k, scale, kernel, return_lse=True) -> (out, lse)`` (lse empty
when ``return_lse`` is False: the kernels skip its store); keys are ``[k; k_fresh]`` along
seq (``k_fresh=None`` for plain BSA, a batch-1 ``k`` is broadcast when ``k_fresh`` is given).
"""

from __future__ import annotations

import threading
from typing import Optional, Tuple

import torch

from ..._ext import extension

__all__ = [
    "bsa_forward_cuda",
    "block_sparse_attn_fwd_cuda",
    "block_sparse_attn_cuda",
    "bsa_forward_segments_cuda",
    "bsa_backward_cuda",
    "selection_args",
    "csrc_kernel",
    "ops",
]

_LOCK = threading.Lock()
_FAKES = {"done": False}
_AUTOGRAD = {"error": None}  # why the csrc backward could not be registered, if it could not


def _register_fakes() -> None:
    def lse_like(q, return_lse):
        B, Sq, H, _ = q.shape
        return q.new_empty((B, H, Sq) if return_lse else (0,), dtype=torch.float32)

    @torch.library.register_fake("longcat_kernels::bsa_fwd_cuda")
    def _(q, k, v, k_fresh, v_fresh, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale, kernel,
          return_lse=True):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::kv_cache_attn_fwd_cuda")
    def _(q, k, v, k_cache, v_cache, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w, scale,
          kernel, return_lse=True):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::prefix_attn_fwd_cuda")
    def _(q, k, v, prefix_len, scale, kernel, return_lse=True):
        return q.new_empty(q.shape), lse_like(q, return_lse)

    @torch.library.register_fake("longcat_kernels::bsa_bwd_cuda")
    def _(dout, q, k, v, lse, delta, indices, counts, t_off, t_q, grid_q, grid_k, chunk_q, chunk_k, scale, kernel):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    try:
        torch.library.register_autograd("longcat_kernels::bsa_fwd_cuda", _fwd_backward, setup_context=_fwd_setup)
    except Exception as e:  # noqa: BLE001 - the forward ops must keep working; gradients then refuse
        _AUTOGRAD["error"] = f"{type(e).__name__}: {e}"

    @torch.library.register_fake("longcat_kernels::rope3d_cuda")
    def _(x, cos_t, sin_t, cos_h, sin_h, cos_w, sin_w, grid_h, grid_w, frame_offset):
        return x.new_empty(x.shape)


def _fwd_setup(ctx, inputs, output):
    q, k, v, k_fresh, v_fresh, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale, kernel = inputs[:13]
    out, lse = output
    ctx.kernel = kernel
    ctx.two_segments = k_fresh is not None
    ctx.geom = (list(grid_q), list(grid_k), list(chunk_q), list(chunk_k), float(scale))
    ctx.save_for_backward(q, k, v, out, lse, indices, counts)


def _fwd_backward(ctx, grad_out, grad_lse):
    """Gradients of ``bsa_fwd_cuda``: the sm90_ws backward kernels (csrc/bsa_bwd_sm90_ws.cu)."""
    q, k, v, out, lse, indices, counts = ctx.saved_tensors
    # one gradient per argument the dispatcher passed (it drops trailing arguments equal to their
    # defaults, e.g. return_lse=True)
    n_args = len(ctx.needs_input_grad)
    if ctx.two_segments or ctx.kernel != "sm90_ws":
        from ...dispatch import BackendUnavailableError  # noqa: PLC0415

        raise BackendUnavailableError(
            f"block_sparse_attn: backend 'cuda' has a backward for kernel 'sm90_ws' with one key segment only "
            f"(this forward ran kernel {ctx.kernel!r}{' over two key segments' if ctx.two_segments else ''}); "
            "use backend='triton' for gradients")
    if grad_out is None:
        return (None,) * n_args
    if lse.numel() == 0:
        raise RuntimeError("bsa_fwd_cuda: backward needs the forward's lse; call it with return_lse=True "
                           "(block_sparse_attn_cuda does when inputs require grad)")
    dq, dk, dv = bsa_backward_cuda(grad_out, q, k, v, out, lse, indices, counts, *ctx.geom)
    return (dq, dk, dv) + (None,) * (n_args - 3)


def bsa_backward_cuda(grad_out, q, k, v, out, lse, indices, counts, grid_q, grid_k, chunk_q, chunk_k, scale):
    """``(dq, dk, dv)`` of the block-sparse forward through the same selection (sm90_ws kernels).

    delta = rowsum(grad_out * out) in fp32 and the transposed selection (key block -> query blocks,
    CSR) are built here with torch ops; a batch-1 selection is expanded to the batch first."""
    from .triton import transpose_selection  # noqa: PLC0415 - device-side CSR build, torch ops only

    B = q.shape[0]
    if indices.shape[0] != B:
        indices = indices.expand(B, -1, -1, -1).contiguous()
        counts = counts.expand(B, -1, -1).contiguous()
    nk = 1
    for g, c in zip(grid_k, chunk_k):
        nk *= -(-int(g) // int(c))
    t_off, t_q = transpose_selection(indices, counts, nk)
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    return ops().bsa_bwd_cuda(grad_out.contiguous() if grad_out.stride(-1) != 1 else grad_out, q, k, v, lse,
                              delta, indices, counts, t_off, t_q, list(grid_q), list(grid_k), list(chunk_q),
                              list(chunk_k), float(scale), "sm90_ws")


def ops():
    """``torch.ops.longcat_kernels`` with the compiled ops loaded and their fakes registered.

    Raises ImportError with the reason when the extension is unavailable (never falls back).
    Under ``torch.compile`` (after an eager call loaded it) this is a plain attribute lookup.
    """
    if torch.compiler.is_compiling():
        return torch.ops.longcat_kernels
    if not _FAKES["done"]:
        with _LOCK:
            if not _FAKES["done"]:
                extension()
                _register_fakes()
                _FAKES["done"] = True
    return torch.ops.longcat_kernels


def csrc_kernel(op: str, kernel, q, *tensors, **facts) -> str:
    """``kernel`` if given, else the family ``dispatch`` picks for backend ``"cuda"`` on these inputs
    (raises ``BackendUnavailableError`` with the reason for inputs the csrc kernels refuse, e.g. GQA)."""
    if kernel is not None:
        return kernel
    from ...dispatch import choose  # noqa: PLC0415

    return choose(op, q, *tensors, requested="cuda", **facts).impl[len("csrc_"):]


def selection_args(selection):
    """(indices, counts, grid_q, grid_k, chunk_q, chunk_k) as the csrc ops take them."""
    indices, counts = selection.indices, selection.counts
    if indices.dtype != torch.int32 or indices.stride(-1) != 1:
        indices = indices.to(torch.int32).contiguous()
    if counts.dtype != torch.int32:
        counts = counts.to(torch.int32)
    return (
        indices,
        counts,
        [int(x) for x in selection.grid_q],
        [int(x) for x in selection.grid_k],
        [int(x) for x in selection.chunk_q],
        [int(x) for x in selection.chunk_k],
    )


def _block_tokens(selection) -> Tuple[int, int]:
    cq, ck = selection.chunk_q, selection.chunk_k
    return (int(cq[0] * cq[1] * cq[2]), int(ck[0] * ck[1] * ck[2]))


def bsa_forward_cuda(q, k, v, selection, scale, *, kernel: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse forward: ``(out [B,Sq,H,D], lse [B,H,Sq] fp32)``; no autograd.

    Args:
        q (Tensor): ``[B, Sq, H, D]`` bf16/fp16 CUDA, any strides with a contiguous last dim.
        k, v (Tensor): ``[B, Sk, H, D]``.
        selection (BlockSelection): from ``select_blocks`` (batch 1 broadcasts over B).
        scale (float): softmax scale.
        kernel (str | None): csrc kernel family; None: the dispatcher's choice.
    """
    kernel = csrc_kernel("block_sparse_attn_fwd", kernel, q, k, v, block_sparse=True,
                         block_tokens=_block_tokens(selection), needs_grad=False)
    return ops().bsa_fwd_cuda(q, k, v, None, None, *selection_args(selection), float(scale), kernel)


def bsa_forward_segments_cuda(q, k_cache, v_cache, k, v, selection, scale, *, kernel: Optional[str] = None,
                              return_lse: bool = True):
    """Block-sparse forward over keys ``[k_cache; k]`` (cache batch 1 or B), no concatenation;
    ``(out, lse)`` with an empty lse when not ``return_lse``."""
    gk, ck = selection.grid_k, selection.chunk_k
    cache_frames = k_cache.shape[1] // (int(gk[1]) * int(gk[2]))
    kernel = csrc_kernel("block_sparse_attn_fwd", kernel, q, k, v, block_sparse=True,
                         block_tokens=_block_tokens(selection), key_segments=2,
                         key_split_aligned=cache_frames % int(ck[0]) == 0, needs_grad=False)
    return ops().bsa_fwd_cuda(q, k_cache, v_cache, k, v, *selection_args(selection), float(scale), kernel,
                              bool(return_lse))


block_sparse_attn_fwd_cuda = bsa_forward_cuda


def block_sparse_attn_cuda(q, k, v, selection, scale, return_lse: bool = False, *, kernel: Optional[str] = None):
    """Block-sparse attention output ``[B,Sq,H,D]``; with ``return_lse`` ``(out, lse [B,H,Sq] fp32)``.

    Differentiable w.r.t. q, k, v where the sm90_ws kernels run (Hopper, D 128, 64-token blocks): the
    backward is ``bsa_backward_cuda``; other kernels are forward only (the dispatcher refuses them
    for inputs that need gradients)."""
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    kernel = csrc_kernel("block_sparse_attn", kernel, q, k, v, block_sparse=True,
                         block_tokens=_block_tokens(selection), needs_grad=grad)
    if grad:
        ops()  # registers the backward (or records why it could not)
        why = (f"no backward for kernel {kernel!r} (sm90_ws only)" if kernel != "sm90_ws"
               else f"its backward could not be registered ({_AUTOGRAD['error']})" if _AUTOGRAD["error"] else None)
        if why is not None:
            from ...dispatch import BackendUnavailableError  # noqa: PLC0415

            raise BackendUnavailableError(
                f"block_sparse_attn: backend 'cuda': {why}; use backend='triton' or 'torch' for gradients")
    # the backward needs lse: always computed when gradients are wanted
    out, lse = ops().bsa_fwd_cuda(q, k, v, None, None, *selection_args(selection), float(scale), kernel,
                                  bool(return_lse or grad))
    return (out, lse) if return_lse else out
