"""Hostile inputs found by the fourth audit of the kernels' public API (2026-12-06): each test fails on
the code before its fix."""

import pytest
import torch

import longcat_kernels as lk
from helpers import TRITON

TRITON_CPU = pytest.param("triton", marks=pytest.mark.triton_interpret)


def _head_dim_outer(x):
    """The same values with head_dim not innermost (stride(-1) != 1): a cache kept in another layout."""
    return x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_block_sparse_kv_cache_with_differently_strided_segments(backend):
    # the Triton two-segment block-sparse kernel read the fresh keys/values with the cache's head_dim
    # stride (and the reverse never): a cache whose head_dim is not innermost gave garbage (~1e18)
    from helpers import DEV

    B, H, D = 1, 2, 16
    q, k, v = (torch.randn(B, 32, H, D, device=DEV) for _ in range(3))
    kc, vc = (torch.randn(1, 16, H, D, device=DEV) for _ in range(2))
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2), frame_hw=(4, 4))
    ref = lk.attn_with_kv_cache(q, k, v, kc, vc, block_sparse=bs, backend="torch")
    for args in ((q, k, v, _head_dim_outer(kc), _head_dim_outer(vc)),
                 (q, _head_dim_outer(k), _head_dim_outer(v), kc, vc)):
        out = lk.attn_with_kv_cache(*args, block_sparse=bs, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_qk_norm_rope_refuses_an_output_with_overlapping_elements(backend):
    # an expanded out_q (stride 0) was written by the Triton kernel without a word (every token's
    # result raced into one row); the torch path failed inside copy_ with torch's message
    q, k = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)
    w = torch.rand(16) + 0.5
    rope = lk.Rope3D((2, 4, 4), 16)
    over = torch.zeros(1, 1, 2, 16).expand(1, 32, 2, 16)
    with pytest.raises(ValueError, match=r"^out_q: expected a tensor whose elements do not overlap"):
        lk.qk_norm_rope(q, k, w, w, rope, out_q=over, backend=backend)
    with pytest.raises(ValueError, match=r"^out_k: expected a tensor whose elements do not overlap"):
        lk.qk_norm_rope(q, k, w, w, rope, out_k=torch.zeros(1, 32, 2, 1).expand(1, 32, 2, 16), backend=backend)


def _qkv_sel(**kw):
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    return q, k, v, lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5, **kw)


def test_hand_built_selection_with_list_grids_is_normalised():
    # grids/chunks given as lists were kept as lists: the selection's own grid passed beside it was
    # refused ("expected [2, 4, 4] ... got (2, 4, 4)"); a float grid failed far below, named "grid"
    q, k, v, s = _qkv_sel()
    s2 = lk.BlockSelection(s.indices, s.counts, list(s.grid_q), list(s.grid_k), list(s.chunk_q), list(s.chunk_k))
    assert s2.grid_q == (2, 4, 4) and s2.chunk_k == (2, 2, 2)
    out = lk.block_sparse_attn(q, k, v, selection=s2, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), backend="torch")
    torch.testing.assert_close(out, lk.block_sparse_attn(q, k, v, selection=s, backend="torch"), rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"^selection.grid_q: expected a tuple of 3 ints"):
        lk.BlockSelection(s.indices, s.counts, (2.0, 4, 4), s.grid_k, s.chunk_q, s.chunk_k)
    with pytest.raises(ValueError, match=r"^selection.chunk_k: expected 3 positive ints"):
        lk.BlockSelection(s.indices, s.counts, s.grid_q, s.grid_k, s.chunk_q, (0, 2, 2))
    with pytest.raises(TypeError, match=r"^selection.indices: expected a torch.Tensor, got list"):
        lk.BlockSelection(s.indices.tolist(), s.counts, s.grid_q, s.grid_k, s.chunk_q, s.chunk_k)


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_selection_of_width_zero(backend):
    # indices [B, H, Nq, 0] with every count 0 is a valid selection (counts <= max_sel): Triton gave
    # zeros, the torch reference failed with "shape '[1, 2, 4, 8]' is invalid for input of size 0"
    q, k, v, s = _qkv_sel()
    s0 = lk.BlockSelection(s.indices[..., :0], torch.zeros_like(s.counts), s.grid_q, s.grid_k, s.chunk_q, s.chunk_k)
    qg = q.clone().requires_grad_()
    out, lse = lk.block_sparse_attn(qg, k, v, selection=s0, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    out.sum().backward()
    assert torch.equal(qg.grad, torch.zeros_like(q))


def test_rope_tables_traced_by_torch_export_are_not_cached():
    # torch.export (non-strict: Python runs on FakeTensors) cached the Rope3D's token tables as
    # FakeTensors: every later eager call (apply_rope_3d, qk_norm_rope, attn_with_kv_cache(rope=) on
    # the torch path) returned a FakeTensor, a result without values, and no error
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    rope = lk.Rope3D((2, 4, 4), 16)
    x = torch.randn(1, 32, 2, 16)

    class M(torch.nn.Module):
        def forward(self, x):
            return lk.apply_rope_3d(x, rope)

    torch.export.export(M(), (x,))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        lk.apply_rope_3d(mode.from_tensor(x), rope, frame_offset=0)
    out = lk.apply_rope_3d(x, rope)
    assert not isinstance(out, FakeTensor)
    torch.testing.assert_close(out, lk.apply_rope_3d(x, lk.Rope3D((2, 4, 4), 16)), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_block_sparse_ops_run_on_tensors_without_values(mode):
    # shape-only tensors (meta, FakeTensorMode): the other ops ran, block-sparse attention on the torch
    # path failed deep inside (Tensor.item() on meta, nonzero's data-dependent shape, the selection's
    # value check copying out of a meta tensor)
    from torch._subclasses.fake_tensor import FakeTensorMode

    q0 = torch.randn(1, 32, 2, 16)
    s0 = lk.select_blocks(q0, q0, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5)
    kc0 = torch.randn(1, 16, 2, 16)
    fake = FakeTensorMode() if mode == "fake" else None
    import contextlib

    def conv(t):
        return t.to("meta") if fake is None else fake.from_tensor(t)

    q, kc = conv(q0), conv(kc0)
    s = lk.BlockSelection(conv(s0.indices), conv(s0.counts), s0.grid_q, s0.grid_k, s0.chunk_q, s0.chunk_k)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2), frame_hw=(4, 4))
    with fake if fake is not None else contextlib.nullcontext():
        outs = [
            lk.block_sparse_attn(q, q, q, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), sparsity=0.5, backend="torch"),
            lk.block_sparse_attn(q, q, q, selection=s, backend="torch"),
            lk.attn_with_kv_cache(q, q, q, kc, kc, block_sparse=bs, backend="torch"),
        ]
    for out in outs:
        assert out.shape == (1, 32, 2, 16)


def test_env_report_refuses_unknown_arguments(capsys):
    # python -m longcat_kernels.env --jsno printed the text report (any argument but --json was ignored)
    from longcat_kernels import env

    with pytest.raises(SystemExit) as e:
        env.main(["--jsno"])
    assert e.value.code == 2
    assert "unrecognized arguments: --jsno" in capsys.readouterr().err
    assert env.main(["--json"]) == 0


def test_rope_tables_first_built_under_inference_mode_serve_training():
    # an evaluation under torch.inference_mode cached the Rope3D token tables as inference tensors:
    # every later training call (apply_rope_3d, qk_norm_rope on the torch path) failed with
    # "Inference tensors cannot be saved for backward", tensors the user never made
    rope = lk.Rope3D((2, 4, 4), 16)
    x = torch.randn(1, 32, 2, 16)
    w = torch.rand(16) + 0.5
    with torch.inference_mode():
        lk.apply_rope_3d(x, rope)
    xg = x.clone().requires_grad_()
    (lk.apply_rope_3d(xg, rope).sum() + lk.qk_norm_rope(xg, x, w, w, rope, backend="torch")[0].sum()).backward()
    assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("backend", ["torch", TRITON])
def test_inference_mode_selection_and_geometry_serve_training(backend):
    # a selection made under torch.inference_mode (gating once, reused): the torch reference trained
    # with it, the Triton op failed saving it for backward (on CUDA the first inference-mode call also
    # caches the block geometry, grid.block_token_index: now built as normal tensors, a precaution)
    from helpers import DEV

    q, k, v = (torch.randn(1, 32, 2, 16, device=DEV) for _ in range(3))
    with torch.inference_mode():
        s = lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(1, 4, 2), sparsity=0.5)
        lk.block_sparse_attn(q, k, v, selection=s, backend=backend)
    qg = q.clone().requires_grad_()
    lk.block_sparse_attn(qg, k, v, selection=s, backend=backend).sum().backward()
    assert torch.isfinite(qg.grad).all()


def test_hand_built_selection_with_another_key_frame_shape_is_refused():
    # select_blocks refuses a grid_k with another (h, w) than grid_q, a hand-built selection carried
    # one through: the Triton kernel placed key tokens with the query grid's (h, w) (NaN/garbage), the
    # torch reference with the key grid's, and no error
    q, k, v = (torch.randn(1, 32, 2, 16) for _ in range(3))
    idx = torch.tensor([0, 1], dtype=torch.int32).expand(1, 2, 8, 2)
    cnt = torch.full((1, 2, 8), 2, dtype=torch.int32)
    s = lk.BlockSelection(idx, cnt, (2, 4, 4), (2, 2, 8), (1, 2, 2), (1, 2, 4))
    with pytest.raises(ValueError, match=r"^selection.grid_k: expected the same \(h, w\) as selection.grid_q \(4, 4\), "
                                         r"got \(2, 8\)"):
        lk.block_sparse_attn(q, k, v, selection=s, backend="torch")


def test_cache_variable_with_a_quoted_tilde(monkeypatch):
    # LONGCAT_KERNELS_CACHE="~/kcache" (quoted: the shell leaves the ~) built the extension into a
    # folder literally named "~" under the working directory: a new JIT build per directory
    import os

    from longcat_kernels._envvars import cache_dir

    monkeypatch.setenv("LONGCAT_KERNELS_CACHE", "~/kcache")
    assert cache_dir() == os.path.join(os.path.expanduser("~"), "kcache")
    monkeypatch.setenv("LONGCAT_KERNELS_CACHE", " ")
    assert cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "longcat_kernels")


@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_qk_norm_rope_outputs_on_tensors_without_values(mode):
    # every meta/fake storage reports data_ptr 0: two distinct out_q / out_k buffers were refused as
    # "overlapping views of one storage"
    from torch._subclasses.fake_tensor import FakeTensorMode

    import contextlib

    fake = FakeTensorMode() if mode == "fake" else None
    q0, w0 = torch.randn(1, 32, 2, 16), torch.rand(16) + 0.5
    q, w = (t.to("meta") for t in (q0, w0)) if fake is None else (fake.from_tensor(t) for t in (q0, w0))
    with fake if fake is not None else contextlib.nullcontext():
        oq, ok = torch.empty_like(q), torch.empty_like(q)
        a, b = lk.qk_norm_rope(q, q, w, w, out_q=oq, out_k=ok, backend="torch")
    assert a is oq and b is ok


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_fp8_q_and_s_carry_no_gradient_on_any_backend(backend):
    # q and s are documented as not differentiable (only y of return_input=True is): the torch path
    # returned both with a graph (through the e4m3 cast and the row amax), the Triton kernel without,
    # so a loss through q * s trained x on one backend and silently not on the other
    x = torch.randn(2, 3, 4, 16, requires_grad=True)
    sh = torch.zeros(2, 3, 1, 16)
    for q, s in (lk.fp8_quantize_rows(x, backend=backend), lk.fp8_layer_norm_quantize(x, backend=backend),
                 lk.fp8_modulate_quantize(x, sh, sh, backend=backend),
                 lk.fp8_silu_mul_quantize(x, x.detach(), backend=backend)):
        assert not q.requires_grad and not s.requires_grad
    q, s, y = lk.fp8_layer_norm_quantize(x, return_input=True, backend="torch")  # y keeps its graph
    assert y.requires_grad and not q.requires_grad and not s.requires_grad


@pytest.mark.parametrize("backend", ["torch", TRITON_CPU])
def test_block_sparse_row_whose_scores_are_all_minus_inf_is_not_hidden(backend):
    # keys of -inf (an fp16 overflow upstream) make every score of a row -inf: the kernels and the
    # dense/cached-KV references give NaN (0/0), the torch BSA reference gave 0 and lse -inf, the value
    # reserved for "attends to nothing", hiding the non-finite input
    q = torch.rand(1, 16, 1, 16) + 0.1
    k = torch.full((1, 16, 1, 16), float("-inf"))
    v = torch.randn(1, 16, 1, 16)
    out, lse = lk.block_sparse_attn(q, k, v, grid_q=(1, 4, 4), chunk_q=(1, 2, 2), sparsity=0.0, backend=backend,
                                    return_lse=True)
    assert bool(torch.isnan(out).all()) and bool(torch.isnan(lse).all())
    # a query block that selects nothing still gives 0 and -inf
    s = lk.BlockSelection(torch.full((1, 1, 4, 1), -1, dtype=torch.int32), torch.zeros(1, 1, 4, dtype=torch.int32),
                          (1, 4, 4), (1, 4, 4), (1, 2, 2), (1, 2, 2))
    out, lse = lk.block_sparse_attn(q, k, v, selection=s, backend=backend, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
