"""Hostile round 61: unusual memory layouts into the public ops (storage offsets, expanded batch/heads, overlapping
``as_strided`` views, a strided or outermost head_dim, BHSD views of BSHD, ``nn.Parameter`` and read-only numpy
inputs, lazy negations) against an fp64 oracle on the same values, on the torch path and the Triton interpreter.

Fixed here: ``qk_norm_rope`` outputs that are lazy negations (the Triton path raised torch's "Expected Tensor but
got None"), outputs that require grad (the Triton kernel wrote a view of a training buffer unrecorded: the old
values kept their gradient; a leaf ``nn.Parameter`` was written without a word where the reference raised an
error naming no argument), and ``merge_partial_attention`` (the cuDNN route's lse merge) read a strided head_dim or
a negated view as raw memory."""
from __future__ import annotations

import warnings

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.dispatch import BackendUnavailableError

pytestmark = pytest.mark.triton_interpret

GRID, CHUNK = (2, 4, 4), (1, 2, 2)  # 32 tokens, 8 blocks of 4
B, S, H, D = 2, 32, 2, 16
BACKENDS = ("torch", "triton")
LAYOUTS = ("offset", "batch_expand", "head_expand", "overlap", "head_dim_stride2", "head_dim_outer", "bhsd",
           "parameter", "readonly_numpy", "neg_view")


def _layout(name: str, shape) -> torch.Tensor:
    """A fresh random tensor of ``shape`` in the named layout (its values are what the oracle sees)."""
    b, s, h, d = shape
    x = torch.randn(shape)
    if name == "offset":  # a slice of a bigger buffer
        buf = torch.randn(x.numel() + 37)
        return buf[37:].view(shape).copy_(x)
    if name == "batch_expand":
        return x[:1].expand(shape)
    if name == "head_expand":
        return x[:, :, :1].expand(shape)
    if name == "overlap":  # rows of one token overlap the next token's
        return torch.randn(x.numel()).as_strided(shape, (s * h * d // 2, h * d // 2, d, 1))
    if name == "head_dim_stride2":
        return torch.randn(b, s, h, 2 * d)[..., ::2].copy_(x)
    if name == "head_dim_outer":
        return x.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    if name == "bhsd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if name == "parameter":
        return torch.nn.Parameter(x, requires_grad=False)
    if name == "readonly_numpy":
        a = x.numpy().copy()
        a.setflags(write=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "The given NumPy array is not writable"
            return torch.from_numpy(a)
    if name == "neg_view":
        return torch._neg_view(-x)
    raise AssertionError(name)


def _f64(x: torch.Tensor) -> torch.Tensor:
    return x.detach().resolve_neg().to(torch.float64)


def _close(got, want, atol=2e-5):
    got, want = (got, want) if isinstance(got, (tuple, list)) else ((got,), (want,))
    for g, w in zip(got, want):
        assert not g.isnan().any()
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=atol)


# ----------------------------------------------------------------------------------------------
# pinned: every attention op, the gating, rope and the prologue give the oracle's answer for each layout
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_attn_and_gating_of_any_layout_match_the_fp64_oracle(layout, backend):
    q, k, v = (_layout(layout, (B, S, H, D)) for _ in range(3))
    sel = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend)
    want_sel = lk.select_blocks(_f64(q), _f64(k), grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend="torch")
    assert torch.equal(sel.counts, want_sel.counts)
    assert torch.equal(sel.indices.sort(-1).values, want_sel.indices.sort(-1).values)
    got = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend, return_lse=True)
    want = lk.block_sparse_attn(_f64(q), _f64(k), _f64(v), selection=sel, backend="torch", return_lse=True)
    _close(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_kv_ops_of_any_layout_match_the_fp64_oracle(layout, backend):
    Sn, Sc = 16, 32
    q, k, v = (_layout(layout, (B, Sn, H, D)) for _ in range(3))
    kc, vc = (_layout(layout, (B, Sc, H, D)) for _ in range(2))
    rope = lk.Rope3D((4, 4, 4), D)
    f = [_f64(t) for t in (q, k, v, kc, vc)]
    _close(lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, backend=backend, return_lse=True),
           lk.attn_with_kv_cache(*f, rope=rope, backend="torch", return_lse=True))
    _close(lk.flash_attn_with_kvcache(q, kc, vc, backend=backend),
           lk.flash_attn_with_kvcache(f[0], f[3], f[4], backend="torch"))
    _close(lk.prefix_attn(q, k, v, 5, backend=backend, return_lse=True),
           lk.prefix_attn(*f[:3], 5, backend="torch", return_lse=True))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_and_qk_norm_rope_of_any_layout_match_the_fp64_oracle(layout, backend):
    rope = lk.Rope3D((2, 4, 4), D)
    q, k = _layout(layout, (B, S, H, D)), _layout(layout, (B, S, H, D))
    qw, kw = torch._neg_view(-torch.randn(D)), torch.randn(2 * D)[::2]
    _close(lk.qk_norm_rope(q, k, qw, kw, rope, backend=backend),
           lk.qk_norm_rope(_f64(q), _f64(k), _f64(qw), _f64(kw), rope, backend="torch"))
    _close(lk.apply_rope_3d(q, rope), lk.apply_rope_3d(_f64(q), rope))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp8_prologues_of_any_layout_match_the_reference_on_a_contiguous_copy(layout, backend):
    x, x2 = _layout(layout, (2, 3, 4, 16)), _layout(layout, (2, 3, 4, 16))
    xc, x2c = (t.detach().resolve_neg().contiguous() for t in (x, x2))
    shift = torch.randn(1, 3, 1, 16).expand(2, 3, 1, 16)  # per frame, batch broadcast
    scale = torch._neg_view(-torch.randn(2, 1, 1, 16)).expand(2, 3, 1, 16)  # frames broadcast, negated
    for got, want in (
        (lk.fp8_quantize_rows(x, return_input=True, backend=backend),
         lk.fp8_quantize_rows(xc, return_input=True, backend="torch")),
        (lk.fp8_modulate_quantize(x, shift, scale, return_input=True, backend=backend),
         lk.fp8_modulate_quantize(xc, shift.contiguous(), scale.resolve_neg().contiguous(), return_input=True, backend="torch")),
        (lk.fp8_silu_mul_quantize(x, x2, return_input=True, backend=backend),
         lk.fp8_silu_mul_quantize(xc, x2c, return_input=True, backend="torch")),
    ):
        for g, w in zip(got, want):
            assert not g.float().isnan().any()
            torch.testing.assert_close(g.float(), w.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("out_layout", ("offset", "head_dim_stride2", "head_dim_outer", "bhsd", "in_place", "swapped"))
def test_qk_norm_rope_writes_strided_or_aliasing_outputs_with_the_oracles_values(backend, out_layout):
    rope = lk.Rope3D((2, 4, 4), D)
    q, k, qw, kw = torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(D), torch.randn(D)
    want = lk.qk_norm_rope(_f64(q), _f64(k), _f64(qw), _f64(kw), rope, backend="torch")
    if out_layout == "in_place":
        oq, ok = q, k
    elif out_layout == "swapped":  # each output over the other input
        oq, ok = k, q
    else:
        oq, ok = _layout(out_layout, (B, S, H, D)), _layout(out_layout, (B, S, H, D))
    got = lk.qk_norm_rope(q, k, qw, kw, rope, out_q=oq, out_k=ok, backend=backend)
    assert got[0] is oq and got[1] is ok
    _close(got, want)


# ----------------------------------------------------------------------------------------------
# fixed
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ("out_q", "out_k", "both"))
def test_qk_norm_rope_writes_through_negated_output_views(backend, which):
    # the Triton path raised torch's negation fallback error ("Expected Tensor but got None" / "more than one
    # mutable tensors with negationbit"), naming nothing
    rope = lk.Rope3D((2, 4, 4), D)
    q, k, qw, kw = torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(D), torch.randn(D)
    want = lk.qk_norm_rope(_f64(q), _f64(k), _f64(qw), _f64(kw), rope, backend="torch")
    outs = {n: torch._neg_view(torch.full((B, S, H, D), float("nan"))) if which in (n, "both") else None
            for n in ("out_q", "out_k")}
    got = lk.qk_norm_rope(q, k, qw, kw, rope, backend=backend, **outs)
    _close(got, want)
    for i, n in enumerate(("out_q", "out_k")):
        if outs[n] is not None:
            assert got[i] is outs[n] and outs[n].is_neg()
            _close(outs[n].resolve_neg(), want[i])


def test_qk_norm_rope_into_a_buffer_that_requires_grad_keeps_autograd_right():
    # a view of a training buffer as out_q: the Triton kernel's write was not recorded, so the overwritten
    # elements kept their old gradient (1 instead of 0) silently; "auto" now takes the reference, explicit
    # "triton" refuses as for inputs that need grad
    rope = lk.Rope3D((2, 4, 4), D)
    q, k, qw, kw = torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(D), torch.randn(D)
    want = lk.qk_norm_rope(_f64(q), _f64(k), _f64(qw), _f64(kw), rope, backend="torch")
    src = torch.randn(B, 2 * S, H, D, requires_grad=True)
    buf = src * 1
    got = lk.qk_norm_rope(q, k, qw, kw, rope, out_q=buf[:, S:], backend="auto")
    _close(got[0], want[0])
    buf.sum().backward()
    assert torch.equal(src.grad[:, S:], torch.zeros_like(src.grad[:, S:]))
    assert torch.equal(src.grad[:, :S], torch.ones_like(src.grad[:, :S]))
    buf = torch.randn(B, 2 * S, H, D, requires_grad=True) * 1
    with pytest.raises(BackendUnavailableError, match="forward only"):
        lk.qk_norm_rope(q, k, qw, kw, rope, out_k=buf[:, :S], backend="triton")
    with torch.no_grad():  # no gradient asked: the kernel may write it
        got = lk.qk_norm_rope(q, k, qw, kw, rope, out_k=buf[:, :S], backend="triton")
        _close(got[1], want[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ("out_q", "out_k"))
def test_qk_norm_rope_refuses_a_parameter_output_that_requires_grad_naming_it(backend, name):
    # the reference raised torch's in-place error naming no argument, the Triton kernel wrote the leaf silently
    q, k, qw, kw = torch.randn(B, S, H, D), torch.randn(B, S, H, D), torch.randn(D), torch.randn(D)
    p = torch.nn.Parameter(torch.zeros(B, S, H, D))
    with pytest.raises(ValueError, match=f"^{name}: .*leaf that requires grad"):
        lk.qk_norm_rope(q, k, qw, kw, backend=backend, **{name: p})
    assert torch.equal(p.detach(), torch.zeros_like(p))
    with torch.no_grad():  # as torch allows it: a parameter written under no_grad
        got = lk.qk_norm_rope(q, k, qw, kw, backend=backend, **{name: p})
    want = lk.qk_norm_rope(_f64(q), _f64(k), _f64(qw), _f64(kw), backend="torch")
    i = 0 if name == "out_q" else 1
    assert got[i] is p
    _close(p.detach(), want[i])


def test_merge_partial_attention_reads_strided_and_negated_partials():
    # the cuDNN route's lse merge (a Triton kernel launched directly) read head_dim with unit stride and raw
    # memory: a strided o1 or a negated o2 gave wrong values, silently
    from longcat_kernels.ops.kv_cache_attn.cudnn import merge_partial_attention

    b, s, h, d = 2, 5, 3, 8
    o1, o2 = torch.randn(b, s, h, 2 * d)[..., ::2], torch._neg_view(-torch.randn(b, s, h, d))
    l1, l2 = torch.randn(b, h, s), torch.randn(b, s, h).transpose(1, 2)
    lse = torch.logaddexp(_f64(l1), _f64(l2))
    w1, w2 = (torch.exp(_f64(x) - lse).transpose(1, 2)[..., None] for x in (l1, l2))
    want = _f64(o1) * w1 + _f64(o2) * w2
    _close(merge_partial_attention(o1, l1, o2, torch._neg_view(-l2)), want)
