"""Compiled public ops (aot_eager, CPU, torch backend): graph counts across grids and symbolic shapes."""

import torch
import torch._dynamo

import longcat_kernels as lk


def test_kv_cache_block_sparse_frame_hw_from_symbolic_shape_fullgraph():
    """A compiled DiT that met a second grid (stage 1, then refine) passes frame_hw as SymInts:
    ``hasattr(SymInt, "__index__")`` in the check was untraceable, fullgraph raised Unsupported."""
    from torch._dynamo.utils import counters

    def f(q, k, v, kc, vc, hw):
        bs = lk.BlockSparseParams(frame_hw=(hw.shape[0], hw.shape[1]), chunk_q=(1, 2, 2), sparsity=0.5)
        return lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="torch")

    torch._dynamo.reset()
    cf = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    before = counters["stats"]["unique_graphs"]
    for hf, wf in ((4, 4), (4, 6), (6, 4)):
        n = hf * wf
        q, k, v = (torch.randn(1, n, 2, 16) for _ in range(3))
        kc, vc = torch.randn(1, n, 2, 16), torch.randn(1, n, 2, 16)
        hw = torch.empty(hf, wf)
        torch.testing.assert_close(cf(q, k, v, kc, vc, hw), f(q, k, v, kc, vc, hw))
    assert counters["stats"]["unique_graphs"] - before <= 3
    torch._dynamo.reset()
