"""Round 75: tensor subclasses and functional transforms at the public ops and the DiT forward.

Bugs (each test below fails before its fix):
- sparse / nested tensors were not refused: a sparse q failed deep inside torch or Triton ("expand is
  unsupported for Sparse tensors", "Cannot access storage of SparseTensorImpl"), a jagged nested q was read as a
  batch of its sequences and k was blamed ("k: expected batch 2"), ``fp8_quantize_rows`` took a nested x on the
  torch backend; the same for ``selection.indices``/``counts``, ``out_q`` (named an "expanded view") and the DiT's
  inputs. Now ``_validate.check_dense`` names the argument.
- ``torch.func.vmap`` over ``qk_norm_rope`` and block-sparse ``attn_with_kv_cache`` on the Triton backend failed
  in functorch ("Batching rule not implemented for longcat_kernels::qk_norm_rope", a broadcast error in the
  gating); ``"auto"`` took that route on a GPU. Now dispatch names vmap (explicit triton) or runs the reference.
- an inference tensor as ``qk_norm_rope``'s ``out_q`` outside inference mode: written by Triton without a word,
  refused by torch with an error naming no argument; now a ValueError naming it on both backends.

Pins of verified behaviour: negated views (``torch._neg_view``) and ``conj()`` of real tensors, ``nn.Parameter``
(refused by the forward-only op, named), a ``__torch_function__`` subclass, inference tensors mixed with normal
ones, ``vmap`` of the other ops, ``torch.func.grad`` of the torch BSA with grad on one input only, meta / fake
tensor shapes equal to the real call's, complex / quantized inputs refused by name.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import longcat_kernels as lk
from longcat_kernels import BackendUnavailableError
from longcat_kernels.testing.oracle import attention_oracle

from helpers import CPU_BACKENDS

B, S, H, D = 1, 8, 2, 8
GRID, CHUNK = (2, 2, 2), (1, 2, 2)


def _qkv(batch=B):
    return [torch.randn(batch, S, H, D) for _ in range(3)]


def _close(a, b, tol=1e-5):
    assert not torch.isnan(a).any() and not torch.isnan(b).any()
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol, err


class _Logged(torch.Tensor):
    """A logging ``__torch_function__`` wrapper."""

    seen: list = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


# ------------------------------------------------------------------ sparse / nested / complex / quantized refused
def _sparse(t):
    return t.to_sparse()


def _nested(t):
    return torch.nested.nested_tensor([t[0], t[0, : S // 2]], layout=torch.jagged)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("make", [_sparse, _nested], ids=["sparse", "nested"])
@pytest.mark.parametrize("which", ["q", "k", "v", "k_cache"])
def test_attn_with_kv_cache_refuses_sparse_and_nested_naming_the_argument(backend, make, which):
    q, k, v = _qkv()
    args = dict(q=q, k=k, v=v, k_cache=k.clone(), v_cache=v.clone())
    args[which] = make(args[which])
    with pytest.raises(TypeError, match=rf"^{which}: expected a dense \(strided\) tensor"):
        lk.attn_with_kv_cache(args["q"], args["k"], args["v"], args["k_cache"], args["v_cache"], backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_other_ops_refuse_sparse_and_nested_inputs(backend):
    q, k, v = _qkv()
    w = torch.randn(D)
    rope = lk.Rope3D((2, 2, 2), D)
    x = torch.randn(2, 3, 16)
    for make in (_sparse, _nested):
        with pytest.raises(TypeError, match=r"^k: expected a dense"):
            lk.prefix_attn(q, make(k), v, 4, backend=backend)
        with pytest.raises(TypeError, match=r"^q: expected a dense"):
            lk.block_sparse_attn(make(q), k, v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend)
        with pytest.raises(TypeError, match=r"^k: expected a dense"):
            lk.select_blocks(q, make(k), grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend)
        with pytest.raises(TypeError, match=r"^x: expected a dense"):
            lk.apply_rope_3d(make(q), rope)
        with pytest.raises(TypeError, match=r"^x: expected a dense"):
            lk.fp8_quantize_rows(make(x), backend=backend)
        with pytest.raises(TypeError, match=r"^q: expected a dense"):
            lk.qk_norm_rope(make(q), k, w, w, rope, backend=backend)
        with pytest.raises(TypeError, match=r"^v_cache: expected a dense"):
            lk.flash_attn_with_kvcache(q, k, make(v), backend=backend)
    with pytest.raises(TypeError, match=r"^k_weight: expected a dense"):
        lk.qk_norm_rope(q, k, w, w.to_sparse(), rope, backend=backend)
    with pytest.raises(TypeError, match=r"^out_q: expected a dense"):
        lk.qk_norm_rope(q, k, w, w, rope, out_q=torch.zeros_like(q).to_sparse(), backend=backend)
    with pytest.raises(TypeError, match=r"^weight: expected a dense"):
        lk.fp8_layer_norm_quantize(x, torch.ones(16).to_sparse(), torch.zeros(16), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("field", ["indices", "counts"])
def test_selection_with_sparse_tensors_is_refused_by_name(backend, field):
    import dataclasses

    q, k, v = _qkv()
    sel = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend)
    bad = dataclasses.replace(sel, **{field: getattr(sel, field).to_sparse()})
    with pytest.raises(TypeError, match=rf"^selection\.{field}: expected a dense"):
        lk.block_sparse_attn(q, k, v, selection=bad, backend=backend)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_complex_and_quantized_inputs_are_refused_by_name(backend):
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"^q: expected a floating dtype.*complex64"):
        lk.attn_with_kv_cache(q.to(torch.complex64), k, v, backend=backend)
    with pytest.raises(TypeError, match=r"^v: expected a floating dtype.*qint8"):
        lk.prefix_attn(q, k, torch.quantize_per_tensor(v, 0.1, 0, torch.qint8), 4, backend=backend)
    with pytest.raises(TypeError, match=r"^x: expected a floating dtype.*complex64"):
        lk.fp8_quantize_rows(torch.randn(2, 16, dtype=torch.complex64), backend=backend)


# ------------------------------------------------------------------ vmap
@pytest.mark.triton_interpret
def test_vmap_over_triton_qk_norm_rope_and_bsa_kv_cache_names_vmap():
    q5, k5, v5 = [torch.randn(2, B, S, H, D) for _ in range(3)]
    w = torch.randn(D)
    rope = lk.Rope3D((4, 2, 2), D)
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=CHUNK, frame_hw=(2, 2))
    with pytest.raises(BackendUnavailableError, match="vmap"):
        torch.func.vmap(lambda a, b: lk.qk_norm_rope(a, b, w, w, rope, backend="triton"))(q5, k5)
    with pytest.raises(BackendUnavailableError, match="vmap"):
        torch.func.vmap(lambda a, b, c: lk.attn_with_kv_cache(a, b, c, b, c, block_sparse=bs, backend="triton"))(
            q5, k5, v5)
    # outside vmap the same calls still run the Triton kernels
    lk.qk_norm_rope(q5[0], k5[0], w, w, rope, backend="triton")
    from longcat_kernels import dispatch
    assert dispatch.last_choice("qk_norm_rope").backend == "triton"


@pytest.mark.triton_interpret
def test_vmap_under_triton_env_names_vmap_and_torch_backend_batches(monkeypatch):
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "triton")
    q5, k5 = [torch.randn(2, B, S, H, D) for _ in range(2)]
    w = torch.randn(D)
    rope = lk.Rope3D((4, 2, 2), D)
    # the variable's backend refuses it with the reason (no silent fallback), backend="torch" computes it
    with pytest.raises(BackendUnavailableError, match="vmap"):
        torch.func.vmap(lambda a, b: lk.qk_norm_rope(a, b, w, w, rope))(q5, k5)
    got = torch.func.vmap(lambda a, b: lk.qk_norm_rope(a, b, w, w, rope, backend="torch"))(q5, k5)
    for i in range(2):
        exp = lk.qk_norm_rope(q5[i], k5[i], w, w, rope, backend="torch")
        _close(got[0][i], exp[0], 0)
        _close(got[1][i], exp[1], 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_of_the_attention_ops_equals_a_loop(backend):
    q5, k5, v5 = [torch.randn(3, B, S, H, D) for _ in range(3)]
    rope = lk.Rope3D((4, 2, 2), D)
    fns = [
        lambda a, b, c: lk.attn_with_kv_cache(a, b, c, b, c, rope=rope, backend=backend),
        lambda a, b, c: lk.prefix_attn(a, b, c, 4, backend=backend),
        lambda a, b, c: lk.block_sparse_attn(a, b, c, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend),
    ]
    for fn in fns:
        got = torch.func.vmap(fn)(q5, k5, v5)
        got2 = torch.func.vmap(fn, in_dims=2)(*(t.movedim(0, 2) for t in (q5, k5, v5)))
        for i in range(3):
            exp = fn(q5[i], k5[i], v5[i])
            _close(got[i], exp)
            _close(got2[i], exp)
    # with the torch backend the block-sparse kv-cache path batches too
    bs = lk.BlockSparseParams(sparsity=0.5, chunk_q=CHUNK, frame_hw=(2, 2))
    f = lambda a, b, c: lk.attn_with_kv_cache(a, b, c, b, c, rope=rope, block_sparse=bs, backend="torch")  # noqa: E731
    got = torch.func.vmap(f)(q5, k5, v5)
    for i in range(3):
        _close(got[i], f(q5[i], k5[i], v5[i]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_vmap_fp8_quantize_rows_equals_the_plain_call(backend):
    x = torch.randn(3, 4, 16)
    for dim in (0, 1):
        q8, s = torch.func.vmap(lambda a: lk.fp8_quantize_rows(a, backend=backend), in_dims=dim, out_dims=dim)(x)
        q8e, se = lk.fp8_quantize_rows(x, backend="torch")
        assert torch.equal(q8.float(), q8e.float()) and torch.equal(s, se)


# ------------------------------------------------------------------ inference tensors, Parameters, partial grad
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_tensor_out_q_outside_inference_mode_is_refused_by_name(backend):
    q, k, _ = _qkv()
    w = torch.randn(D)
    with torch.inference_mode():
        out = torch.zeros_like(q)
    before = out.clone()
    with pytest.raises(ValueError, match=r"^out_q: expected a tensor writable outside torch.inference_mode"):
        lk.qk_norm_rope(q, k, w, w, out_q=out, backend=backend)
    assert torch.equal(out, before)
    # inside inference mode it is written, as without out_q
    with torch.inference_mode():
        got_q, _ = lk.qk_norm_rope(q, k, w, w, out_q=out, backend=backend)
    assert got_q is out
    _close(out, lk.qk_norm_rope(q, k, w, w, backend="torch")[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_inference_tensors_mixed_with_normal_ones_match_plain(backend):
    q, k, v = _qkv()
    rope = lk.Rope3D((4, 2, 2), D)
    with torch.inference_mode():
        ki, vi = k.clone(), v.clone()
    exp = lk.attn_with_kv_cache(q, k, v, k, v, rope=rope, backend=backend)
    _close(lk.attn_with_kv_cache(q, ki, v, ki, vi, rope=rope, backend=backend), exp, 0)
    with torch.inference_mode():
        _close(lk.attn_with_kv_cache(q, ki, v, k, vi, rope=rope, backend=backend), exp, 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_parameter_inputs_are_refused_by_forward_only_ops_and_fine_under_no_grad(backend):
    q, k, v = _qkv()
    p = torch.nn.Parameter(q.clone())
    with pytest.raises(ValueError, match=r"^q: attn_with_kv_cache is forward-only"):
        lk.attn_with_kv_cache(p, k, v, backend=backend)
    with torch.no_grad():
        _close(lk.attn_with_kv_cache(p, k, v, backend=backend), attention_oracle(q, k, v)[0], 1e-5)


@pytest.mark.parametrize("which", [0, 1, 2])
def test_bsa_torch_grad_with_one_input_requiring_grad_matches_fp64(which):
    q, k, v = _qkv()
    ins = [q.clone(), k.clone(), v.clone()]
    ins[which].requires_grad_()
    ref = [t.double() for t in (q, k, v)]
    ref[which].requires_grad_()
    kw = dict(grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend="torch")
    lk.block_sparse_attn(*ins, **kw).square().sum().backward()
    lk.block_sparse_attn(*ref, **kw).square().sum().backward()
    for i in range(3):
        assert (ins[i].grad is None) == (i != which)
    _close(ins[which].grad, ref[which].grad, 1e-4)
    # torch.func.grad of the same
    g = torch.func.grad(lambda a: lk.block_sparse_attn(*[a if i == which else t for i, t in enumerate((q, k, v))],
                                                       **kw).square().sum())((q, k, v)[which])
    _close(g, ref[which].grad, 1e-4)


# ------------------------------------------------------------------ negated / conjugated views, subclasses
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_neg_views_and_conj_of_real_equal_the_materialised_call(backend):
    q, k, v = _qkv()
    rope = lk.Rope3D((4, 2, 2), D)
    w = torch.randn(D)
    neg = torch._neg_view
    _close(lk.attn_with_kv_cache(neg(q), k, v, neg(k), v.clone(), rope=rope, backend=backend),
           lk.attn_with_kv_cache(-q, k, v, -k, v, rope=rope, backend=backend))
    _close(lk.prefix_attn(q, k, neg(v), 4, backend=backend), lk.prefix_attn(q, k, -v, 4, backend=backend))
    _close(lk.block_sparse_attn(q, neg(k), v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend),
           lk.block_sparse_attn(q, -k, v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend))
    for a, b in zip(lk.qk_norm_rope(neg(q), k, neg(w), w, rope, backend=backend),
                    lk.qk_norm_rope(-q, k, -w, w, rope, backend=backend)):
        _close(a, b)
    x = torch.randn(2, 3, 16)
    for a, b in zip(lk.fp8_quantize_rows(neg(x), backend=backend), lk.fp8_quantize_rows(-x, backend=backend)):
        assert torch.equal(a.float(), b.float())
    _close(lk.attn_with_kv_cache(q.conj(), k.conj(), v, backend=backend), attention_oracle(q, k, v)[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_function_subclass_inputs_equal_plain_tensors(backend):
    q, k, v = _qkv()
    rope = lk.Rope3D((4, 2, 2), D)
    L = lambda t: t.as_subclass(_Logged)  # noqa: E731
    _Logged.seen.clear()
    _close(lk.attn_with_kv_cache(L(q), L(k), L(v), L(k), L(v), rope=rope, backend=backend),
           lk.attn_with_kv_cache(q, k, v, k, v, rope=rope, backend=backend), 0)
    assert _Logged.seen  # the wrapper saw the calls
    _close(lk.block_sparse_attn(L(q), L(k), L(v), grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend),
           lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend=backend), 0)
    _close(lk.prefix_attn(L(q), L(k), L(v), 4, backend=backend), lk.prefix_attn(q, k, v, 4, backend=backend), 0)


# ------------------------------------------------------------------ meta / fake shapes equal the real call
@pytest.mark.parametrize("mode", ["meta", "fake"])
def test_meta_and_fake_shapes_equal_the_real_call(mode):
    q, k, v = _qkv(2)
    x = torch.randn(2, 3, 16)
    calls = [
        (lambda a, b, c: lk.attn_with_kv_cache(a, b, c, b[:1], c[:1], backend="torch", return_lse=True), (q, k, v)),
        (lambda a, b, c: lk.prefix_attn(a, b, c, 4, backend="torch", return_lse=True), (q, k, v)),
        (lambda a, b, c: lk.block_sparse_attn(a, b, c, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5, backend="torch",
                                              return_lse=True), (q, k, v)),
        (lambda a: lk.fp8_quantize_rows(a, return_input=True, backend="torch"), (x,)),
        (lambda a, b, c: (lk.flash_attn_with_kvcache(a, b, c, backend="torch"),), (q, k, v)),
    ]
    for fn, ts in calls:
        real = fn(*ts)
        if mode == "meta":
            fake = fn(*(t.to("meta") for t in ts))
        else:
            fm = FakeTensorMode()
            fts = [fm.from_tensor(t) for t in ts]
            with fm:
                fake = fn(*fts)
        for r, f in zip(real, fake):
            assert (tuple(r.shape), r.dtype, r.stride()) == (tuple(f.shape), f.dtype, f.stride())


# ------------------------------------------------------------------ DiT forward
@pytest.fixture(scope="module")
def tiny_dit():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent / "vc"))
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

    cfg = tiny_config()
    return cfg, model_from_state_dict(cfg, random_state_dict(cfg, seed=0)).eval()


def _dit_inputs(cfg, B=2, T=2, Hl=4, Wl=4, L=5):
    x = torch.randn(B, cfg.in_channels, T, Hl, Wl)
    t = torch.rand(B) * 1000
    y = torch.randn(B, 1, L, cfg.caption_channels)
    mask = torch.ones(B, L, dtype=torch.long)
    return x, t, y, mask


def test_dit_forward_refuses_sparse_and_nested_inputs_by_name(tiny_dit):
    cfg, m = tiny_dit
    x, t, y, mask = _dit_inputs(cfg)
    with torch.no_grad():
        with pytest.raises(TypeError, match=r"^hidden_states: expected a dense"):
            m(x.to_sparse(), t, y, mask)
        with pytest.raises(TypeError, match=r"^timestep: expected a dense"):
            m(x, t.to_sparse(), y, mask)
        with pytest.raises(TypeError, match=r"^encoder_hidden_states: expected a dense"):
            m(x, t, y.to_sparse(), mask)
        with pytest.raises(TypeError, match=r"^encoder_hidden_states: expected a dense.*to_padded_tensor"):
            m(x, t, torch.nested.nested_tensor([y[0, 0], y[1, 0, :3]], layout=torch.jagged), None)
        with pytest.raises(TypeError, match=r"^encoder_attention_mask: expected a dense"):
            m(x, t, y, mask.to_sparse())


def test_dit_forward_with_views_subclasses_parameters_and_inference_tensors_equals_plain(tiny_dit):
    cfg, m = tiny_dit
    x, t, y, mask = _dit_inputs(cfg)
    with torch.no_grad():
        ref = m(x, t, y, mask)
        assert not torch.isnan(ref).any()
        _close(m(torch._neg_view(x), t, y, mask), m(-x, t, y, mask), 0)
        _close(m(x, t, torch._neg_view(y), mask), m(x, t, -y, mask), 0)
        _close(m(x.conj(), t, y, mask), ref, 0)
        _close(m(torch.nn.Parameter(x), t, y, mask), ref, 0)
        _close(m(x.as_subclass(_Logged), t, y, mask), ref, 0)
        with torch.inference_mode():
            xi, ti = x.clone(), t.clone()
        _close(m(xi, ti, y, mask), ref, 0)
