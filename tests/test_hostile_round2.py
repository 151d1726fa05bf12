"""Hostile inputs that used to give a wrong answer or an unclear error without raising (second audit,
2026-12-06): each test fails on the code before its fix."""

import warnings

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.testing import assert_close, attention_lowp, attention_oracle, bsa_token_mask

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)]


def _dense_ref(q, k, v):
    return attention_oracle(q, k, v)[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cdf_threshold_one_keeps_every_block(backend):
    # the fp32 cumulative sum can reach 1.0 a few blocks before the end: rows then lost blocks, and
    # differently per backend; 1.0 is the whole mass, i.e. dense attention
    for _ in range(3):
        q, k, v = (torch.randn(1, 256, 2, 16) * 3 for _ in range(3))
        s = lk.select_blocks(q, k, grid_q=(4, 8, 8), chunk_q=(1, 2, 2), sparsity=None, cdf_threshold=1.0,
                             backend=backend)
        assert bool((s.counts == s.num_k_blocks).all()), s.counts.min()
        # the attention itself on the torch path (the Triton kernel over 64 tiny blocks is minutes in
        # the interpreter; the bug was in the selection)
        out = lk.block_sparse_attn(q, k, v, selection=s, backend="torch")
        ref = _dense_ref(q, k, v)
        assert_close(out, ref, attention_lowp(q, k, v), name=f"cdf 1.0 vs dense ({backend})")


def _qk_rope():
    q, k = torch.randn(1, 32, 2, 32), torch.randn(1, 32, 2, 32)
    return q, k, torch.rand(32) + 0.5, lk.Rope3D((2, 4, 4), 32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_rope_output_aliasing_an_input(backend):
    q, k, w, rope = _qk_rope()
    rq, rk = lk.qk_norm_rope(q, k, w, w, rope, backend="torch")
    tol = dict(rtol=1e-5, atol=1e-5)
    # out_q is k's buffer: the kernel used to read k after writing q's result over it
    kk = k.clone()
    a, c = lk.qk_norm_rope(q.clone(), kk, w, w, rope, out_q=kk, backend=backend)
    torch.testing.assert_close(a, rq, **tol)
    torch.testing.assert_close(c, rk, **tol)
    assert a.data_ptr() == kk.data_ptr()
    # in place (out is the input itself) stays allowed and right
    qq, kk = q.clone(), k.clone()
    a, c = lk.qk_norm_rope(qq, kk, w, w, rope, out_q=qq, out_k=kk, backend=backend)
    torch.testing.assert_close(qq, rq, **tol)
    torch.testing.assert_close(kk, rk, **tol)
    # q and k as slices of one packed buffer, written in place
    x = torch.stack([q, k, torch.randn_like(q)], 2)
    lk.qk_norm_rope(x[:, :, 0], x[:, :, 1], w, w, rope, out_q=x[:, :, 0], out_k=x[:, :, 1], backend=backend)
    torch.testing.assert_close(x[:, :, 0], rq, **tol)
    torch.testing.assert_close(x[:, :, 1], rk, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_qk_norm_rope_overlapping_outputs_raise(backend):
    q, k, w, rope = _qk_rope()
    o = torch.empty_like(q)
    with pytest.raises(ValueError, match=r"^out_q, out_k: expected disjoint output buffers"):
        lk.qk_norm_rope(q, k, w, w, rope, out_q=o, out_k=o, backend=backend)
    big = torch.empty(1, 33, 2, 32)
    with pytest.raises(ValueError, match=r"^out_q, out_k: expected disjoint output buffers"):
        lk.qk_norm_rope(q, k, w, w, rope, out_q=big[:, :32], out_k=big[:, 1:], backend=backend)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("op", ["layer_norm", "silu_mul", "modulate"])
def test_fp8_triton_refuses_an_input_that_needs_grad(op):
    # y (return_input=True, for unfused LoRA adapters) came back from Triton without a graph
    x = torch.randn(1, 2, 4, 32, requires_grad=True)
    calls = {
        "layer_norm": lambda b: lk.fp8_layer_norm_quantize(x, return_input=True, backend=b),
        "silu_mul": lambda b: lk.fp8_silu_mul_quantize(x, x.detach(), return_input=True, backend=b),
        "modulate": lambda b: lk.fp8_modulate_quantize(x, torch.zeros(1, 2, 1, 32), torch.zeros(1, 2, 1, 32),
                                                       return_input=True, backend=b),
    }
    with pytest.raises(lk.BackendUnavailableError, match="forward only"):
        calls[op]("triton")
    y = calls[op]("auto")[2]
    assert y.requires_grad
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():  # no gradient wanted: Triton runs
        assert calls[op]("triton")[0].dtype == torch.float8_e4m3fn


def _sel_inputs():
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    return q, k, v, lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5)


def test_chunks_that_contradict_the_selection_raise():
    q, k, v, sel = _sel_inputs()
    with pytest.raises(ValueError, match=r"^chunk_q: expected \(2, 2, 2\) \(selection.chunk_q\)"):
        lk.block_sparse_attn(q, k, v, selection=sel, chunk_q=(1, 1, 1))
    with pytest.raises(ValueError, match=r"^chunk_k: expected \(2, 2, 2\) \(selection.chunk_k\)"):
        lk.block_sparse_attn(q, k, v, selection=sel, chunk_k=(1, 4, 4))
    # the selection's own chunks, or the default chunk_q, are fine
    lk.block_sparse_attn(q, k, v, selection=sel, chunk_q=(2, 2, 2), chunk_k=(2, 2, 2))
    # the same through attn_with_kv_cache's BlockSparseParams (cache of 1 frame of 4x4)
    kc, vc = torch.randn(1, 16, 2, 16), torch.randn(1, 16, 2, 16)
    s2 = lk.select_blocks(q, torch.cat([kc, k], 1), grid_q=(2, 4, 4), grid_k=(3, 4, 4), chunk_q=(1, 2, 2),
                          sparsity=0.5)
    ok = lk.BlockSparseParams(selection=s2, frame_hw=(4, 4))
    lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=ok)
    bad = lk.BlockSparseParams(selection=s2, frame_hw=(4, 4), chunk_k=(3, 4, 4))
    with pytest.raises(ValueError, match=r"^block_sparse.chunk_k: expected \(1, 2, 2\)"):
        lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bad)


def test_grid_given_as_video_grid_is_compared_not_crashing():
    q, k, v, sel = _sel_inputs()
    with pytest.raises(ValueError, match=r"^grid_q: expected \(2, 4, 4\) \(selection.grid_q\).* got \(1, 4, 8\)"):
        lk.block_sparse_attn(q, k, v, selection=sel, grid_q=lk.VideoGrid(1, 4, 8))


def test_selection_made_under_inference_mode_is_usable_and_still_checked():
    q, k, v, _ = _sel_inputs()
    with torch.inference_mode():
        qi, ki, vi = q.clone(), k.clone(), v.clone()
        s = lk.select_blocks(qi, ki, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5)
        out = lk.block_sparse_attn(qi, ki, vi, selection=s)
        ref = attention_oracle(q, k, v, bsa_token_mask(s.to_mask(), (2, 4, 4), (2, 4, 4), (2, 2, 2), (2, 2, 2)))[0]
        assert_close(out, ref, name="inference-mode selection")
        s.counts[0, 0, 0] = 99  # inference tensors have no version counter: checked again on each call
        with pytest.raises(ValueError, match=r"^selection.counts: expected values in \[0, 2\]"):
            lk.block_sparse_attn(qi, ki, vi, selection=s)


def test_scale_beyond_fp32_raises():
    q, k, v = (torch.randn(1, 16, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match=r"^scale: expected at most the fp32 maximum"):
        lk.prefix_attn(q, k, v, 0, scale=1e39)
    with pytest.raises(ValueError, match=r"^scale: expected at most the fp32 maximum"):
        lk.block_sparse_attn(q, k, v, grid_q=(1, 4, 4), chunk_q=(1, 2, 2), sparsity=0.5, scale=1e39)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_zero_query_with_batch_one_cache(backend):
    q = torch.randn(0, 16, 2, 16)
    kc = torch.randn(1, 16, 2, 16)
    assert lk.attn_with_kv_cache(q, q, q, k_cache=kc, v_cache=kc, backend=backend).shape == (0, 16, 2, 16)
    assert lk.flash_attn_with_kvcache(q, kc, kc).shape == (0, 16, 2, 16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_selection_tensors_in_any_layout(backend):
    q, k, v = (torch.randn(2, 32, 2, 16) for _ in range(3))
    s = lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5)
    idx = s.indices.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    cnt = s.counts.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    s2 = lk.BlockSelection(idx, cnt, s.grid_q, s.grid_k, s.chunk_q, s.chunk_k)
    assert not s2.indices.is_contiguous()
    mask = bsa_token_mask(s.to_mask(), (2, 4, 4), (2, 4, 4), (2, 2, 2), (2, 2, 2))
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = lk.block_sparse_attn(qg, kg, vg, selection=s2, backend=backend)
    ref = attention_oracle(q, k, v, mask)[0]
    assert_close(out, ref, attention_lowp(q, k, v, mask), name=f"non-contiguous selection ({backend})")
    out.sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_misspelt_environment_variable_warns_once(monkeypatch):
    from longcat_kernels import _envvars

    monkeypatch.setenv("LONGCAT_KERNELS_BACKENDS", "triton")
    monkeypatch.setenv("LONGCAT_KERNEL_JIT", "0")
    monkeypatch.setattr(_envvars, "_scanned", False)
    q = torch.randn(1, 8, 1, 8)
    with pytest.warns(UserWarning, match=r"LONGCAT_KERNELS_BACKENDS, LONGCAT_KERNEL_JIT: not a longcat_kernels setting"):
        lk.prefix_attn(q, q, q, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.prefix_attn(q, q, q, 0)  # once per process


@pytest.mark.parametrize("name", ["LONGCAT_KERNELS_DETERMINISTIC", "LONGCAT_KERNELS_FUSE_ISLANDS",
                                  "LONGCAT_KERNELS_JIT"])
def test_bad_flag_value_raises_on_any_call(monkeypatch, name):
    # DETERMINISTIC used to be parsed only inside a Triton BSA backward: elsewhere "2" passed silently
    monkeypatch.setenv(name, "2")
    q = torch.randn(1, 8, 1, 8)
    with pytest.raises(ValueError, match=rf"^{name}: expected 0 or 1 \(or false/true, no/yes, off/on\), got '2'"):
        lk.prefix_attn(q, q, q, 0)
