"""Hostile-user round 41: the dispatcher and the torch.library surface (registered ops, fakes, compile)."""

from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.float16 if DEV == "cuda" else torch.float32


def _compile(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


@pytest.mark.triton_interpret
def test_kv_cache_block_sparse_with_rope_compiles_fullgraph():
    """``attn_with_kv_cache(rope=, block_sparse=, backend="triton")`` rotated fresh q/k by launching the
    Triton RoPE kernel outside any registered op: ``torch.compile(fullgraph=True)`` traced into the
    launcher (in the interpreter: "Dynamo does not know how to trace method data_ptr") instead of
    keeping one op boundary, as the same call without block_sparse does."""
    torch.manual_seed(0)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2), chunk_k=(1, 2, 2))

    def f(q, k, v, kc, vc):
        rope = lk.Rope3D((4, 2, 2), 16, device=q.device)
        return lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=bs, backend="triton")

    for B in (2, 3):
        args = [torch.randn(B, 8, 2, 16, device=DEV, dtype=DT) for _ in range(3)]
        args += [torch.randn(1, 8, 2, 16, device=DEV, dtype=DT) for _ in range(2)]
        want = lk.attn_with_kv_cache(*args, rope=lk.Rope3D((4, 2, 2), 16, device=DEV), block_sparse=bs,
                                     backend="torch")
        got = _compile(f)(*args)
        torch.testing.assert_close(got, want, atol=2e-3 if DT == torch.float16 else 1e-5, rtol=1e-3)
