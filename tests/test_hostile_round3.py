"""Hostile inputs found by the third audit (2026-12-06): each test fails on the code before its fix."""

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing import assert_close, attention_lowp, attention_oracle, bsa_token_mask

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_slots_past_counts_are_ignored(backend):
    # a hand-built selection with junk (not -1) after each row's count: the kernels never read those
    # slots, the torch reference gathered them (IndexError on CPU, a device assert on CUDA)
    grid, chunk, B, H, D = (2, 4, 4), (1, 2, 2), 2, 2, 16
    q, k, v = (torch.randn(B, 32, H, D) for _ in range(3))
    nb, w = 8, 5
    cnt = torch.randint(0, w + 1, (B, H, nb), dtype=torch.int32)
    idx = torch.stack([torch.randperm(nb)[:w] for _ in range(B * H * nb)]).view(B, H, nb, w).int()
    slot = torch.arange(w)
    junk = torch.where(slot < cnt[..., None], idx, torch.randint(nb, 10**6, idx.shape, dtype=torch.int32))
    clean = torch.where(slot < cnt[..., None], idx, -1)
    sel_j = lk.BlockSelection(junk, cnt, grid, grid, chunk, chunk)
    sel_c = lk.BlockSelection(clean, cnt, grid, grid, chunk, chunk)
    out, lse = lk.block_sparse_attn(q, k, v, selection=sel_j, backend=backend, return_lse=True)
    mask = bsa_token_mask(sel_c.to_mask(), grid, grid, chunk, chunk)
    ref, ref_lse = attention_oracle(q, k, v, mask, D**-0.5)
    assert_close(out, ref, attention_lowp(q, k, v, mask, D**-0.5), name=f"junk tail [{backend}]")
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert (lse[fin].double() - ref_lse[fin]).abs().max() < 1e-4


def test_backend_env_cuda_keeps_auto_for_ops_without_a_csrc_kernel(monkeypatch):
    # LONGCAT_KERNELS_BACKEND=cuda replaced "auto" for every op, and select_blocks, qk_norm_rope and
    # fp8_quantize have no csrc kernel: every block-sparse call without a selection (its gating) and
    # every DiT forward (its qk-norm + RoPE prologue) failed
    from longcat_kernels.dispatch import Facts, choose_kernel

    gpu = Facts(env_backend="cuda")
    for op in ("select_blocks", "qk_norm_rope", "fp8_quantize"):
        assert choose_kernel(op, gpu, "auto").backend == "triton", op
        with pytest.raises(lk.BackendUnavailableError, match="has no csrc kernel"):
            choose_kernel(op, gpu, "cuda")  # asked for by name: still refused
    # the ops the extension implements still follow the variable, and never fall back
    assert choose_kernel("prefix_attn", gpu, "auto").backend == "cuda"
    with pytest.raises(lk.BackendUnavailableError, match=r"LONGCAT_KERNELS_BACKEND=cuda"):
        choose_kernel("prefix_attn", gpu._replace(dtype="float32"), "auto")
    q = torch.randn(1, 64, 2, 16)
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "cuda")
    sel = lk.select_blocks(q, q, grid_q=(4, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5)  # auto: the reference on CPU
    assert sel.counts.shape == (1, 2, 8)
    # the attention call fails where it should: the cuda attention on CPU tensors, not the gating
    with pytest.raises(lk.BackendUnavailableError, match="^block_sparse_attn"):
        lk.block_sparse_attn(q, q, q, grid_q=(4, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5)
    # a prefix op needing gradients is told to use torch (its Triton kernels are forward only too)
    with pytest.raises(lk.BackendUnavailableError, match="use backend='torch' for gradients"):
        choose_kernel("prefix_attn", Facts(requires_grad=True), "cuda")


@pytest.mark.ext
def test_backend_env_cuda_runs_block_sparse_calls(monkeypatch):
    from longcat_kernels.dispatch import last_choice

    dev, dt, hw = "cuda", torch.bfloat16, (8, 8)
    q, k, v = (torch.randn(1, 256, 2, 128, device=dev, dtype=dt) for _ in range(3))
    kc, vc = (torch.randn(1, 128, 2, 128, device=dev, dtype=dt) for _ in range(2))
    ref = lk.block_sparse_attn(q, k, v, grid_q=(4, 8, 8), sparsity=0.5, backend="cuda")
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(4, 4, 4), frame_hw=hw)
    ref_kv = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="cuda")
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "cuda")
    out = lk.block_sparse_attn(q, k, v, grid_q=(4, 8, 8), sparsity=0.5)
    assert last_choice("block_sparse_attn").backend == "cuda"
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs)
    torch.testing.assert_close(out, ref_kv, atol=0, rtol=0)


def test_prefix_attn_needing_grad_takes_the_reference_under_auto():
    # on CUDA, auto picked a forward-only kernel (triton_prologue_cudnn / triton_fused) for inputs
    # that need grad, which then raised; on CPU auto ran the differentiable reference
    from longcat_kernels.dispatch import Facts, choose_kernel

    gpu = Facts(device_type="cuda", dtype="bfloat16", head_dim=128, cudnn=True, csrc_kernels=("sm90_ws", "sm90", "sm80"),
                requires_grad=True)
    assert choose_kernel("prefix_attn", gpu, "auto").impl == "torch_reference"
    for be in ("triton", "cuda"):
        with pytest.raises(lk.BackendUnavailableError, match="forward only"):
            choose_kernel("prefix_attn", gpu, be)
    assert choose_kernel("prefix_attn", gpu._replace(requires_grad=False), "auto").impl == "csrc_sm90_ws"
    # and the gradient the reference gives is attention's (fp64 autograd on the oracle)
    q, k, v = (torch.randn(1, 12, 2, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    torch.autograd.gradcheck(lambda a, b, c: lk.prefix_attn(a, b, c, 5), (q, k, v))


@pytest.mark.triton_gpu
def test_direct_triton_launches_compile_fullgraph_gpu():
    # the fp8 prologues and the block-sparse + RoPE cached-KV route launch Triton kernels directly
    # (no custom op); under the CPU interpreter dynamo cannot trace that, on the GPU it must.
    # backend="aot_eager": the trace is the question; inductor's own codegen of this suite's NaN
    # poisoning of torch.empty (an fp8 fill) fails on torch 2.11 + triton 3.6 (get_fp8e4nv)
    dev = "cuda"
    x = torch.randn(64, 256, device=dev, dtype=torch.bfloat16)
    w, b = torch.randn(256, device=dev), torch.randn(256, device=dev)

    def f8(x):
        q1, s1 = lk.fp8_quantize_rows(x, backend="triton")
        q2, s2 = lk.fp8_layer_norm_quantize(x, w, b, backend="triton")
        return q1.float() * s1, q2.float() * s2

    eager = f8(x)
    torch._dynamo.reset()
    comp = torch.compile(f8, fullgraph=True, backend="aot_eager")(x)
    for e, c in zip(eager, comp):
        torch.testing.assert_close(c, e, rtol=0, atol=0)
    q, k, v = (torch.randn(1, 256, 2, 128, device=dev, dtype=torch.bfloat16) for _ in range(3))
    kc, vc = (torch.randn(1, 128, 2, 128, device=dev, dtype=torch.bfloat16) for _ in range(2))
    rope = lk.Rope3D((6, 8, 8), 128, device=dev)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(4, 4, 4), frame_hw=(8, 8))

    def fkv(q, k, v, kc, vc):
        return lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=bs, backend="triton")

    with torch.no_grad():
        eager = fkv(q, k, v, kc, vc)
        torch._dynamo.reset()
        comp = torch.compile(fkv, fullgraph=True, backend="aot_eager")(q, k, v, kc, vc)
    torch.testing.assert_close(comp, eager, rtol=0, atol=0)


@pytest.mark.parametrize("name, value", [("LONGCAT_KERNELS_JIT", "maybe"), ("LONGCAT_KERNELS_BACKEND", "bogus"),
                                         ("LONGCAT_KERNELS_CUDA_ARCHS", "sm_90"),
                                         ("LONGCAT_KERNELS_SM90WS_VARIANT", "x")])
def test_env_report_lists_invalid_settings_instead_of_failing(monkeypatch, capsys, name, value):
    # the report crashed on the first invalid value (or printed it as a setting like any other)
    from longcat_kernels import env

    monkeypatch.setenv(name, value)
    assert env.main([]) == 0
    out = capsys.readouterr().out
    assert f"INVALID {name}" in out and "kernel choice per op" in out
    import os

    assert os.environ[name] == value  # left as the user set it


def test_env_report_with_a_backend_that_cannot_run_here(monkeypatch, capsys):
    from longcat_kernels import env

    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "cuda")
    assert env.main([]) == 0
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "prefix_attn            auto -> -      unavailable" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_available_backends_for_cuda_without_a_device():
    # said triton works for CUDA inputs on a machine without CUDA
    got = lk.available_backends("attn_with_kv_cache", "cuda")
    assert got["torch"] is None and got["triton"] and got["cuda"]


def test_block_sparse_params_with_a_selection_and_a_rule_is_refused():
    # BlockSparseParams(selection=..., sparsity=0.1) ignored the sparsity silently (block_sparse_attn refuses it)
    hw, B, H, D = (4, 4), 1, 2, 16
    q, k, v = (torch.randn(B, 32, H, D) for _ in range(3))
    kc, vc = (torch.randn(1, 16, H, D) for _ in range(2))
    k_all = torch.cat([kc, k], 1)
    sel = lk.select_blocks(q, k_all, grid_q=(2, 4, 4), grid_k=(3, 4, 4), chunk_q=(1, 2, 2), sparsity=0.5)
    for kw in (dict(sparsity=0.1), dict(cdf_threshold=0.9)):
        bs = lk.BlockSparseParams(frame_hw=hw, chunk_q=(1, 2, 2), selection=sel, **kw)
        with pytest.raises(ValueError, match="expected either selection= or a selection rule"):
            lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="torch")
    for kw in (dict(), dict(sparsity=None)):  # the defaults: the selection alone
        bs = lk.BlockSparseParams(frame_hw=hw, chunk_q=(1, 2, 2), selection=sel, **kw)
        lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="torch")
