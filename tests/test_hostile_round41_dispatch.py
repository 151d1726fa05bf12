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


@pytest.mark.triton_interpret
@pytest.mark.parametrize("which", ["rows", "layer_norm", "modulate", "silu_mul"])
def test_fp8_quantize_triton_compiles_fullgraph(which):
    """The fp8 quantisation ops launched their Triton kernel from plain Python, unlike every other op
    (README: "every op is a registered custom op with a fake implementation"): ``torch.compile(fullgraph=
    True)`` of ``fp8_quantize_rows(x, backend="triton")`` traced into the launcher and failed in the
    interpreter ("Dynamo does not know how to trace method data_ptr"); no op to ``opcheck`` either."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 32, device=DEV, dtype=DT)
    if which == "rows":
        def f(x):
            return lk.fp8_quantize_rows(x, return_input=True, backend="triton")
        args = (x,)
    elif which == "layer_norm":
        def f(x, w, b):
            return lk.fp8_layer_norm_quantize(x, w, b, backend="triton")
        args = (x, torch.randn(32, device=DEV, dtype=DT), torch.randn(32, device=DEV, dtype=DT))
    elif which == "modulate":
        def f(x, sh, sc):
            return lk.fp8_modulate_quantize(x, sh, sc, return_input=True, backend="triton")
        args = (x, torch.randn(2, 3, 1, 32, device=DEV), torch.randn(2, 3, 1, 32, device=DEV))
    else:
        def f(a, b):
            return lk.fp8_silu_mul_quantize(a, b, backend="triton")
        args = (x, torch.randn_like(x))
    want = f(*args)
    got = _compile(f)(*args)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.stride() == w.stride()
        torch.testing.assert_close(g.float(), w.float(), equal_nan=True, atol=0, rtol=0)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("return_input", [False, True])
@pytest.mark.parametrize("rows", [0, 5])
def test_fp8_quantize_rows_op_opcheck(return_input, rows):
    """The op the fp8 Triton path now goes through: fake outputs (e4m3 q, fp32 s, y or an empty
    placeholder) match the real ones in shape, dtype and strides, for no rows too."""
    from longcat_kernels.ops.fp8_quant import triton as _fp8_triton  # registers the op

    assert _fp8_triton.fp8_quantize_triton is not None

    x = torch.randn(rows, 32, device=DEV, dtype=DT)
    w, b = torch.randn(32, device=DEV, dtype=DT), torch.randn(32, device=DEV, dtype=DT)
    torch.library.opcheck(torch.ops.longcat_kernels.fp8_quantize_rows.default,
                          (x, None, None, None, w, b, "layer_norm", 1e-5, return_input))
    torch.library.opcheck(torch.ops.longcat_kernels.fp8_quantize_rows.default,
                          (x, torch.randn_like(x), None, None, None, None, "silu_mul", 0.0, return_input))


def _cpu_sdpa_for_cudnn(monkeypatch):
    """The cuDNN route's two SDPA helpers on CPU (math SDPA plus its lse): what the ops compute around them."""
    from longcat_kernels.ops.kv_cache_attn import cudnn

    def sdpa_lse(q, k, v, scale):
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
        lse = torch.logsumexp(s, dim=-1)
        o = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.float()).to(q.dtype)
        return o, lse

    monkeypatch.setattr(cudnn, "_sdpa_cudnn_lse", sdpa_lse)
    monkeypatch.setattr(cudnn, "_sdpa_cudnn", lambda q, k, v, scale: sdpa_lse(q, k, v, scale)[0])
    return cudnn


@pytest.mark.triton_interpret
@pytest.mark.parametrize("prefix_len", [-2, 9])
def test_prefix_attn_cudnn_op_refuses_prefix_len_outside_seq(monkeypatch, prefix_len):
    """``longcat_kernels::prefix_attn_cudnn_fwd`` (the "auto" route on Ampere+ for dense prefix attention)
    sliced with an unchecked ``prefix_len``: -2 wrote only the last 2 query rows and returned the rest of
    ``torch.empty`` (garbage; NaN under the test poison), 9 > seq ran plain attention for every row. The
    Triton and csrc ops raise; a compiled graph skips the API's checks (README), so the op must check."""
    _cpu_sdpa_for_cudnn(monkeypatch)
    q, k, v = (torch.randn(1, 6, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="prefix_len"):
        torch.ops.longcat_kernels.prefix_attn_cudnn_fwd(q, k, v, prefix_len, 0.25, True)
    # in range it still runs: equal to the Triton op
    out, lse = torch.ops.longcat_kernels.prefix_attn_cudnn_fwd(q, k, v, 2, 0.25, True)
    want, wlse = torch.ops.longcat_kernels.prefix_attn_fwd(q, k, v, 2, 0.25, True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, wlse, atol=1e-5, rtol=1e-5)


@pytest.mark.triton_interpret
def test_kv_cache_cudnn_op_refuses_a_cache_of_partial_frames(monkeypatch):
    """``longcat_kernels::kv_cache_attn_cudnn_fwd`` with RoPE took the fresh frames' offset as
    ``Sc // (grid_h * grid_w)`` without checking: a cache of 5 tokens on a 2x2 grid rotated the fresh
    q/k at frame 1 silently (wrong positions), where the Triton op raises. Mismatched k/v shapes
    likewise reached SDPA unchecked."""
    cudnn = _cpu_sdpa_for_cudnn(monkeypatch)
    rope = lk.Rope3D((4, 2, 2), 16)
    from longcat_kernels.ops.kv_cache_attn.triton import rope_table_args

    tabs, gh, gw = rope_table_args(rope)
    q, k, v = (torch.randn(2, 4, 2, 16) for _ in range(3))
    kc, vc = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
    with pytest.raises(ValueError, match="k_cache"):
        torch.ops.longcat_kernels.kv_cache_attn_cudnn_fwd(q, k, v, kc, vc, *tabs, gh, gw, 0.25, False)
    with pytest.raises(ValueError, match="v"):
        torch.ops.longcat_kernels.kv_cache_attn_cudnn_fwd(q, k, v[:, :3], None, None, *([None] * 6), 1, 1, 0.25)
    # whole frames still run, equal to the fused Triton op
    kc, vc = kc[:, :4], vc[:, :4]
    got = cudnn._kv_cache_attn_cudnn_op(q, k, v, kc, vc, *tabs, gh, gw, 0.25, True)
    want = torch.ops.longcat_kernels.kv_cache_attn_fwd(q, k, v, kc, vc, *tabs, gh, gw, 0.25, True)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_attn_with_kv_cache_does_not_drop_gradients(fullgraph):
    """``attn_with_kv_cache`` is forward only and refuses inputs that need grad, but only outside
    ``torch.compile`` (the check sat among the skipped argument checks): compiled, "auto" / "torch" ran the
    reference under ``no_grad`` and returned an output with ``requires_grad=False``: the gradient through
    attention was silently lost (a loss that also used q backpropagated only the rest)."""
    q, k, v = (torch.randn(1, 8, 2, 16, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return lk.attn_with_kv_cache(q, k, v, backend="torch")

    torch._dynamo.reset()
    with pytest.raises(Exception, match="forward-only"):
        torch.compile(f, fullgraph=fullgraph, backend="aot_eager")(q, k, v)
    # without grad it still compiles and runs
    with torch.no_grad():
        out = torch.compile(f, fullgraph=fullgraph, backend="aot_eager")(q, k, v)
    torch.testing.assert_close(out, f(q.detach(), k.detach(), v.detach()))


@pytest.mark.triton_interpret
@pytest.mark.parametrize("head_dim", [48, 24])
def test_bsa_ops_called_directly_name_the_head_dim_they_take(head_dim):
    """``torch.ops.longcat_kernels.bsa_fwd`` / ``bsa_bwd`` / ``bsa_pool_scores`` index head_dim with
    ``tl.arange``: a head_dim of 48 or 24 (which the public functions zero-pad) failed inside Triton
    ("arange's range must be a power of 2"), naming no argument."""
    from longcat_kernels.ops.block_sparse_attn import triton as bt

    q, k, v = (torch.randn(1, 16, 2, head_dim, device=DEV, dtype=DT) for _ in range(3))
    geo = ([1, 4, 4], [1, 4, 4], [1, 2, 2], [1, 2, 2])
    sel = lk.select_blocks(q, k, grid_q=(1, 4, 4), chunk_q=(1, 2, 2), sparsity=0.5, backend="torch")
    idx, cnt = bt._prep(q, k, v, sel)[3:5]
    O = torch.ops.longcat_kernels
    with pytest.raises(ValueError, match="bsa_fwd: q: expected head_dim a power of two"):
        O.bsa_fwd(q, k, v, idx, cnt, *geo, 0.25)
    with pytest.raises(ValueError, match="bsa_pool_scores: q: expected head_dim a power of two"):
        O.bsa_pool_scores(q, k, *geo)
    lse = torch.zeros(1, 2, 16, device=DEV)
    with pytest.raises(ValueError, match="bsa_bwd: q: expected head_dim a power of two"):
        O.bsa_bwd(q, q, k, v, q, lse, idx, cnt, *geo, 0.25, False)
    # the public function pads and runs
    out = lk.block_sparse_attn(q, k, v, selection=sel, backend="triton")
    torch.testing.assert_close(out, lk.block_sparse_attn(q, k, v, selection=sel, backend="torch"),
                               atol=2e-3 if DT == torch.float16 else 1e-5, rtol=1e-3)


@pytest.mark.triton_interpret
def test_fp8_quantize_rows_op_checks_what_the_kernel_indexes():
    """The registered fp8 op (new this round) called directly: rows that do not split into the shift's
    B*F frames, a strided row, or a missing x2 would make the kernel read out of bounds; each is a
    ValueError naming the argument. Empty inputs (batch 0) still run."""
    from longcat_kernels.ops.fp8_quant import triton as _fp8_triton

    assert _fp8_triton.PROLOGUES
    op = torch.ops.longcat_kernels.fp8_quantize_rows
    x = torch.randn(6, 32, device=DEV, dtype=DT)
    sh = torch.randn(1, 4, 32, device=DEV)
    with pytest.raises(ValueError, match="x: expected rows a multiple of B\\*F = 4"):
        op(x, None, sh, sh, None, None, "modulate", 1e-6, False)
    with pytest.raises(ValueError, match="x: expected \\[M, C\\] with unit stride"):
        op(torch.randn(32, 6, device=DEV, dtype=DT).t(), None, None, None, None, None, "none", 0.0, False)
    with pytest.raises(ValueError, match="x2: expected a tensor"):
        op(x, None, None, None, None, None, "silu_mul", 0.0, False)
    with pytest.raises(ValueError, match="prologue"):
        op(x, None, None, None, None, None, "gelu", 0.0, False)
    # batch 0 through the public function
    q, s = lk.fp8_modulate_quantize(torch.randn(0, 4, 3, 32, device=DEV, dtype=DT), torch.randn(0, 4, 1, 32, device=DEV),
                                    torch.randn(0, 4, 1, 32, device=DEV), backend="triton")
    assert q.shape == (0, 4, 3, 32) and s.shape == (0, 4, 3, 1)


@pytest.mark.triton_interpret
def test_fresh_compile_follows_triton_interpret_changed_since_the_last_eager_call(monkeypatch):
    """A trace reused the machine facts of the last eager call whatever the environment was then: after a
    call with ``TRITON_INTERPRET`` unset (refused: "CPU tensors need TRITON_INTERPRET=1"), setting it and
    calling ``torch._dynamo.reset()`` as the README says still failed every fresh compile with the stale
    refusal, until some eager call happened (an order-dependent failure of
    test_hostile_round26_ops.py::test_qk_norm_rope_swapped_outputs_under_compile_eager_backend)."""
    from longcat_kernels import BackendUnavailableError

    rope = lk.Rope3D((2, 2, 2), 16)
    q, w = torch.randn(1, 8, 2, 16), torch.ones(16)

    def f(q, k):
        return lk.qk_norm_rope(q, k, w, w, rope, backend="triton")

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET"):
        f(q, q)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, q)
    want = lk.qk_norm_rope(q, q, w, w, rope, backend="torch")
    torch.testing.assert_close(got, want)
