"""The compiled extension (backend "cuda") as a backend across ops: the public API's dispatch and
refusals (dtype, gradients, head_dim, GQA), the C++ TORCH_CHECK messages, opcheck of every
registered op (bsa, cached-KV, prefix, rope3d) and torch.compile(fullgraph). Marked ``ext``.
Per-op kernel parity is in ``tests/<op>/test_*_cuda_kernels.py``."""

from __future__ import annotations

import pytest
import torch
from helpers import csrc_impls, family64, randn

pytestmark = pytest.mark.ext

DEV = "cuda"


def test_public_api_dispatch_and_refusals():
    from longcat_kernels._backend import BackendUnavailableError, available_backends
    from longcat_kernels.ops.block_sparse_attn.api import block_sparse_attn, select_blocks

    assert available_backends("block_sparse_attn", "cuda")["cuda"] is None
    grid = (4, 8, 8)
    q, k, v = (randn(1, 256, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    out = block_sparse_attn(q, k, v, grid_q=grid, sparsity=0.5, backend="cuda")
    assert out.shape == q.shape and not out.isnan().any()
    sel = select_blocks(q, k, grid_q=grid, sparsity=0.5, backend="torch")
    with pytest.raises(BackendUnavailableError, match="float32"):
        block_sparse_attn(q.float(), k.float(), v.float(), selection=sel, backend="cuda")
    qg = q.clone().requires_grad_(True)
    with pytest.raises(BackendUnavailableError, match="forward only"):
        block_sparse_attn(qg, k, v, selection=sel, backend="cuda")
    q96 = randn(1, 256, 2, 96, dtype=torch.bfloat16)
    sel96 = select_blocks(q96, q96, grid_q=grid, sparsity=0.5, backend="torch")
    with pytest.raises(BackendUnavailableError, match="head_dim"):
        block_sparse_attn(q96, q96, q96, selection=sel96, backend="cuda")


def test_torch_check_messages():
    from longcat_kernels.ops.block_sparse_attn.cuda import ops

    q = randn(1, 64, 2, 128, dtype=torch.bfloat16)
    k = randn(1, 64, 2, 128, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="cast all inputs to one dtype"):
        ops().kv_cache_attn_fwd_cuda(q, k, k, None, None, *[None] * 6, 0, 0, 0.1, "sm80")
    with pytest.raises(RuntimeError, match="grid_q"):
        idx = torch.zeros(1, 2, 1, 1, dtype=torch.int32, device=DEV)
        cnt = torch.ones(1, 2, 1, dtype=torch.int32, device=DEV)
        ops().bsa_fwd_cuda(q, q, q, None, None, idx, cnt, [1, 4, 8], [1, 8, 8], [4, 4, 4], [4, 4, 4], 0.1, "sm80")
    # the kernel family is named by the caller: an unknown one, or one that cannot run the call, raises
    with pytest.raises(RuntimeError, match="kernel must be 'sm90_ws', 'sm90' or 'sm80'"):
        ops().kv_cache_attn_fwd_cuda(q, q, q, None, None, *[None] * 6, 0, 0, 0.1, "sm90ws")
    q64 = randn(1, 64, 2, 64, dtype=torch.bfloat16)
    if "sm90_ws" in csrc_impls():
        with pytest.raises(RuntimeError, match="kernel 'sm90_ws' cannot run this call"):
            ops().kv_cache_attn_fwd_cuda(q64, q64, q64, None, None, *[None] * 6, 0, 0, 0.1, "sm90_ws")
    if "sm90" not in csrc_impls():
        with pytest.raises(RuntimeError, match="needs a compute capability 9.x GPU"):
            ops().kv_cache_attn_fwd_cuda(q64, q64, q64, None, None, *[None] * 6, 0, 0, 0.1, "sm90")


def test_opcheck_registered_ops():
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.block_sparse_attn.cuda import ops, selection_args
    from longcat_kernels.ops.rope.api import Rope3D

    grid = (4, 8, 8)
    q = randn(1, 2, 256, 64, dtype=torch.bfloat16).transpose(1, 2)  # permuted strides
    k, v = (randn(1, 256, 2, 64, dtype=torch.bfloat16) for _ in range(2))
    sel = select_blocks(q, k, grid_q=grid, sparsity=0.5, backend="torch")
    o = ops()
    fam = family64()
    torch.library.opcheck(o.bsa_fwd_cuda.default, (q, k, v, None, None, *selection_args(sel), 0.125, fam))
    torch.library.opcheck(o.kv_cache_attn_fwd_cuda.default,
                          (q, k, v, k[:, :64], v[:, :64], *[None] * 6, 0, 0, 0.125, fam))
    torch.library.opcheck(o.prefix_attn_fwd_cuda.default, (q, k, v, 100, 0.125, fam))
    # return_lse=False: an empty lse (the fakes must agree on its shape)
    torch.library.opcheck(o.bsa_fwd_cuda.default, (q, k, v, None, None, *selection_args(sel), 0.125, fam, False))
    torch.library.opcheck(o.kv_cache_attn_fwd_cuda.default,
                          (q, k, v, k[:, :64], v[:, :64], *[None] * 6, 0, 0, 0.125, fam, False))
    torch.library.opcheck(o.prefix_attn_fwd_cuda.default, (q, k, v, 100, 0.125, fam, False))
    rope = Rope3D((4, 8, 8), 64, device=DEV)
    torch.library.opcheck(o.rope3d_cuda.default,
                          (k, rope.cos_t, rope.sin_t, rope.cos_h, rope.sin_h, rope.cos_w, rope.sin_w, 8, 8, 0))


def test_torch_compile_fullgraph():
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks
    from longcat_kernels.ops.block_sparse_attn.cuda import bsa_forward_cuda
    from longcat_kernels.ops.kv_cache_attn.cuda import attn_with_kv_cache_cuda

    grid = (4, 8, 8)
    q, k, v = (randn(1, 256, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    sel = select_blocks(q, k, grid_q=grid, sparsity=0.5, backend="torch")
    bsa_forward_cuda(q, k, v, sel, 0.1)  # eager first: loads the extension and registers the fakes
    f = torch.compile(lambda a, b, c: bsa_forward_cuda(a, b, c, sel, 0.1)[0] * 2, fullgraph=True)
    torch.testing.assert_close(f(q, k, v), bsa_forward_cuda(q, k, v, sel, 0.1)[0] * 2)
    g = torch.compile(lambda a, b, c: attn_with_kv_cache_cuda(a, b, c, b[:, :64], c[:, :64], None, 0.1, None),
                      fullgraph=True)
    torch.testing.assert_close(g(q, k, v), attn_with_kv_cache_cuda(q, k, v, k[:, :64], v[:, :64], None, 0.1, None))
    h = torch.compile(lambda a, b, c: attn_with_kv_cache_cuda(a, b, c, None, None, None, 0.1, None, True), fullgraph=True)
    (ho, hl), (eo, el) = h(q, k, v), attn_with_kv_cache_cuda(q, k, v, None, None, None, 0.1, None, True)
    torch.testing.assert_close(ho, eo)
    torch.testing.assert_close(hl, el)


def test_gqa_refused_with_reason():
    """csrc kernels take equal head counts: backend='cuda' refuses GQA/MQA with the reason, auto runs Triton."""
    from longcat_kernels import BackendUnavailableError, attn_with_kv_cache, prefix_attn
    from longcat_kernels.dispatch import last_choice

    q = randn(1, 128, 4, 128, dtype=torch.bfloat16)
    k, v = (randn(1, 128, 2, 128, dtype=torch.bfloat16) for _ in range(2))
    with pytest.raises(BackendUnavailableError, match="GQA"):
        attn_with_kv_cache(q, k, v, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="GQA"):
        prefix_attn(q, k, v, 64, backend="cuda")
    attn_with_kv_cache(q, k, v)
    assert last_choice("attn_with_kv_cache").impl == "triton_fused"

