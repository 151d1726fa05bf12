"""Round 72 (GPU, written without a device; first run owed): the ops inside CUDA graphs, the path of
``torch.compile(mode="reduce-overhead")`` and of hand-captured diffusion steps. A host sync in an op's steady
state (``.item()``, ``.tolist()``, ``bool(tensor)``) fails a capture with "operation not permitted when stream
is capturing", and costs a stall per call outside one. After a warm-up call, each op runs with
``torch.cuda.set_sync_debug_mode("error")`` (a sync raises), is captured, and its replays on new inputs
match eager calls."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing.tolerance import rel_l2

pytestmark = pytest.mark.cuda

B, H, D = 2, 4, 128
GRID = (4, 8, 8)  # 256 tokens


def _r(*shape):
    return torch.randn(*shape, dtype=torch.bfloat16, device="cuda")


def _cases():
    rope = lk.Rope3D((8, 8, 8), D)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(4, 4, 4), chunk_k=(4, 4, 4), frame_hw=GRID[1:])
    return {
        "kv_cache": (lambda q, k, v, kc, vc: lk.attn_with_kv_cache(q, k, v, kc, vc)),
        "kv_cache_rope": (lambda q, k, v, kc, vc: lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)),
        "kv_cache_bsa": (lambda q, k, v, kc, vc: lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs)),
        "bsa": (lambda q, k, v, kc, vc: lk.block_sparse_attn(q, k, v, grid_q=GRID, grid_k=GRID, sparsity=0.5)),
    }


def _inputs():
    S = GRID[0] * GRID[1] * GRID[2]
    return [_r(B, S, H, D), _r(B, S, H, D), _r(B, S, H, D), _r(1, S, H, D), _r(1, S, H, D)]


@pytest.mark.parametrize("case", ["kv_cache", "kv_cache_rope", "kv_cache_bsa", "bsa"])
def test_no_host_sync_in_the_steady_state(case):
    fn = _cases()[case]
    x = _inputs()
    with torch.no_grad():
        fn(*x)  # warm-up: compiles, builds tables, checks once
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = fn(*x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert out.isfinite().all()


@pytest.mark.parametrize("case", ["kv_cache", "kv_cache_rope", "kv_cache_bsa", "bsa"])
def test_captured_op_replays_match_eager(case):
    fn = _cases()[case]
    static = _inputs()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        out = fn(*static)
    for _ in range(2):
        new = _inputs()
        for t, n in zip(static, new):
            t.copy_(n)
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            ref = fn(*new)
        assert out.isfinite().all() and rel_l2(out.float(), ref.float()) < 1e-3, (case, rel_l2(out.float(), ref.float()))
