"""Round 45 hostile audit: torch's process-wide state (default dtype/device, autocast, grad modes,
threads) as it reaches the kernels package."""
from __future__ import annotations

import pytest
import torch

import longcat_kernels as lk


def _qkv(S=32, H=2, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, S, H, D, generator=g) for _ in range(3)]


def test_torch_reference_attention_stays_fp32_inside_autocast():
    """Inside ``torch.autocast("cpu", bfloat16)`` the torch reference ran its fp32 matmuls in bf16
    (abs err up to 0.013 on fp32 inputs for block_sparse_attn / prefix_attn / attn_with_kv_cache,
    lse too), while the Triton/CUDA kernels ignore autocast: the same fp32 call gave a different
    answer per backend. The reference promises fp32 scores and statistics for fp32 inputs."""
    q, k, v = _qkv()
    grid = (2, 4, 4)
    calls = {
        "bsa": lambda: lk.block_sparse_attn(q, k, v, grid_q=grid, chunk_q=(1, 2, 2), sparsity=0.5,
                                            backend="torch", return_lse=True),
        "prefix": lambda: lk.prefix_attn(q, k, v, 16, backend="torch", return_lse=True),
        "prefix_nolse": lambda: lk.prefix_attn(q, k, v, 16, backend="torch"),
        "kv": lambda: lk.attn_with_kv_cache(q[:, 16:], k[:, 16:], v[:, 16:], k[:, :16], v[:, :16],
                                            backend="torch", return_lse=True),
        "kv_nocache": lambda: lk.attn_with_kv_cache(q, k, v, backend="torch"),
        "flash": lambda: lk.flash_attn_with_kvcache(q[:, 16:], k[:, :16], v[:, :16], k[:, 16:], v[:, 16:],
                                                    return_softmax_lse=True),
    }
    for name, call in calls.items():
        ref = call()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = call()
        ref = ref if isinstance(ref, tuple) else (ref,)
        got = got if isinstance(got, tuple) else (got,)
        for r, g_ in zip(ref, got):
            assert g_.dtype == r.dtype, name
            torch.testing.assert_close(g_, r, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_torch_selection_scores_stay_fp32_inside_autocast():
    """select_blocks (torch backend) promises block scores in fp32, but inside
    ``torch.autocast("cpu", bfloat16)`` its block-mean matmul ran in bf16: two key blocks whose
    scores differ by 0.1% (below bf16's resolution) tied, and the stable sort kept the wrong one."""
    D = 8
    q = torch.zeros(1, 4, 1, D)
    q[..., 0] = 1.0
    k = torch.zeros(1, 4, 1, D)
    # key blocks (1 token each, grid (1, 1, 4)): scores 1.000, 1.001, 0.5, 0.25
    k[0, :, 0, 0] = torch.tensor([1.0, 1.001, 0.5, 0.25])
    kw = dict(grid_q=(1, 1, 4), chunk_q=(1, 1, 1), sparsity=0.75, backend="torch")
    ref = lk.select_blocks(q, k, **kw)
    assert int(ref.indices[0, 0, 0, 0]) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lk.select_blocks(q, k, **kw)
    torch.testing.assert_close(got.indices, ref.indices, rtol=0, atol=0)


def test_rope_built_under_meta_device_context_fails_clearly_on_real_tensors():
    """A Rope3D built inside ``with torch.device("meta")`` (a model skeleton made on meta, then
    loaded) keeps tables without values; apply_rope_3d / qk_norm_rope / attn_with_kv_cache on real
    CPU tensors then failed deep inside with torch's "Cannot copy out of meta tensor; no data!"."""
    with torch.device("meta"):
        rope = lk.Rope3D((2, 4, 4), 32)
    assert rope.device.type == "meta"
    q, k, v = _qkv()
    w = torch.ones(32)
    calls = [lambda: lk.apply_rope_3d(q, rope),
             lambda: lk.qk_norm_rope(q, k, w, w, rope=rope, backend="torch"),
             lambda: lk.attn_with_kv_cache(q, k, v, rope=rope, backend="torch")]
    for call in calls:
        with pytest.raises(ValueError, match=r"rope: .*meta device.*rope\.to"):
            call()
    # on meta tensors (shape-only use) the meta tables are fine; rope.to(cpu) rebuilds real tables
    qm = torch.empty(1, 32, 2, 32, device="meta")
    assert lk.apply_rope_3d(qm, rope).device.type == "meta"
    torch.testing.assert_close(lk.apply_rope_3d(q, rope.to("cpu")), lk.apply_rope_3d(q, lk.Rope3D((2, 4, 4), 32)),
                               rtol=0, atol=0)


def test_ieee_fp32_matmul_overlapping_threads_restore_the_users_setting():
    """ieee_fp32_matmul (around every fp32 matmul of the torch references and gating on CUDA) saved
    and restored the process-wide TF32 setting per thread: two threads whose blocks overlapped
    (A enters, B enters and saves "ieee", A restores "tf32", B restores "ieee") left the user's
    ``fp32_precision = "tf32"`` replaced by "ieee" for the rest of the process."""
    import threading

    from longcat_kernels.ops.block_sparse_attn.selection import ieee_fp32_matmul

    m = torch.backends.cuda.matmul
    if not hasattr(m, "fp32_precision"):
        pytest.skip("torch without backends.cuda.matmul.fp32_precision")
    old = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        a_in, b_in = threading.Event(), threading.Event()
        seen = []

        def a():
            with ieee_fp32_matmul(torch.device("cuda")):
                a_in.set()
                b_in.wait(5)
                seen.append(m.fp32_precision)

        def b():
            a_in.wait(5)
            with ieee_fp32_matmul(torch.device("cuda")):
                b_in.set()
                for _ in range(50):  # until A has left
                    if len(seen):
                        break
                    threading.Event().wait(0.01)
                seen.append(m.fp32_precision)  # A left, B still inside: still ieee

        ts = [threading.Thread(target=a), threading.Thread(target=b)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert seen == ["ieee", "ieee"]
        assert m.fp32_precision == "tf32"
    finally:
        m.fp32_precision = old


def test_block_geometry_ignores_the_default_device():
    """With ``torch.set_default_device`` naming another device than the inputs' (e.g. "cuda" in
    an LLM-style script, then CPU tensors; "meta" here), grid's "CPU" block-token table was built on
    the default device: select_blocks, block_sparse_attn and attn_with_kv_cache(block_sparse=) on
    CPU tensors raised "Tensor on device meta is not on the expected device cpu!"."""
    q, k, v = _qkv()
    grid = (2, 4, 4)
    rope = lk.Rope3D(grid, 32)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))
    calls = {
        "select": lambda: lk.select_blocks(q, k, grid_q=grid, chunk_q=(1, 2, 2), sparsity=0.5,
                                           backend="torch").indices,
        "bsa": lambda: lk.block_sparse_attn(q, k, v, grid_q=grid, chunk_q=(1, 2, 2), sparsity=0.5,
                                            backend="torch", return_lse=True),
        "kv_bsa": lambda: lk.attn_with_kv_cache(q[:, 16:], k[:, 16:], v[:, 16:], k[:, :16], v[:, :16], rope=rope,
                                                block_sparse=bs, backend="torch", return_lse=True),
    }
    ref = {n: c() for n, c in calls.items()}
    torch.set_default_device("meta")
    try:
        got = {n: c() for n, c in calls.items()}
    finally:
        torch.set_default_device(None)
    for n in calls:
        r = ref[n] if isinstance(ref[n], tuple) else (ref[n],)
        g = got[n] if isinstance(got[n], tuple) else (got[n],)
        for a, b in zip(g, r):
            assert a.device == b.device, n
            torch.testing.assert_close(a, b, rtol=0, atol=0)
