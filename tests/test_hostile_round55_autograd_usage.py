"""Autograd used as training code uses it (round 55): packed q/k/v views, partial requires_grad, retain_graph
and accumulation, activation checkpointing (reentrant and not), in-place edits after the forward, hooks,
grad-mode nesting, odd ``grad_output`` strides, double backward and zero-size batches, on the differentiable
public ops and the DiT. Every gradient is compared with an fp64 reference. These pin verified behaviour,
except ``*_fix``: ``LoRAPart(..., scale)`` was checked only on reassignment, so a NaN scale gave NaN outputs
silently and a 0-d tensor scale (e.g. a trainable one) failed inside ``add_``.
"""

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import CPU_BACKENDS

import longcat_kernels as lk
from longcat_kernels.ops.block_sparse_attn import reference as bsa_ref
from longcat_kernels.testing.oracle import bsa_token_mask
from longcat_vc.lora import LoRAAdapter, LoRALinear, LoRAPart

GQ, GK, CQ, CK = (2, 2, 3), (2, 2, 3), (1, 2, 2), (2, 1, 2)  # partial edge blocks, chunk_q != chunk_k
B, H, D, S = 2, 2, 16, 12


def _sel(x):
    return lk.select_blocks(x[:, :, 0].float(), x[:, :, 1].float(), grid_q=GQ, grid_k=GK, chunk_q=CQ, chunk_k=CK,
                            sparsity=0.5, backend="torch")


def _dense(q, k, v, mask, scale=D ** -0.5):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1).nan_to_num(0.0), v.double())


def _mask(sel):
    return bsa_token_mask(sel.to_mask(), GQ, GK, CQ, CK)


def _close(a, b, tol=2e-4):
    assert a is not None and torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


def _packed_ref_grad(x, mask, loss):
    x6 = x.detach().double().requires_grad_()
    q, k, v = x6.unbind(2)
    loss(_dense(q, k, v, mask)).backward()
    return x6.grad


# ------------------------------------------------------------------------------------ block_sparse_attn
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_packed_qkv_retain_accumulate_then_freed(backend):
    x = torch.randn(B, S, 3, H, D, requires_grad=True)
    sel = _sel(x.detach())
    q, k, v = x.unbind(2)
    out = lk.block_sparse_attn(q, k, v, selection=sel, backend=backend)
    g = torch.randn_like(out)
    out.backward(g, retain_graph=True)
    want = _packed_ref_grad(x, _mask(sel), lambda o: (o * g.double()).sum())
    _close(x.grad, want)
    out.backward(g)  # gradient accumulation into the shared base
    _close(x.grad, 2 * want)
    with pytest.raises(RuntimeError, match="second time"):
        out.backward(g)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_chunked_last_dim_and_odd_grad_output_strides(backend):
    x = torch.randn(B, S, H, 3 * D, requires_grad=True)
    sel = _sel(x.detach().view(B, S, H, 3, D).transpose(2, 3))
    w, ws = torch.randn(D), torch.randn(S, 1, 1)
    for loss in (lambda o: (o * w).sum(), lambda o: (o * ws).sum(), lambda o: o.mean(),
                 lambda o: (o.transpose(1, 3).contiguous() * o.detach().transpose(1, 3).sin()).sum()):
        x.grad = None
        q, k, v = x.chunk(3, -1)
        loss(lk.block_sparse_attn(q, k, v, selection=sel, backend=backend)).backward()
        x6 = x.detach().double().requires_grad_()
        loss(_dense(*x6.chunk(3, -1), _mask(sel))).backward()
        _close(x.grad, x6.grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reentrant", [True, False])
def test_bsa_under_torch_checkpoint(backend, reentrant):
    x = torch.randn(B, S, 3, H, D, requires_grad=True)
    sel = _sel(x.detach())
    g = torch.randn(B, S, H, D)
    out = torch.utils.checkpoint.checkpoint(
        lambda t: lk.block_sparse_attn(*t.unbind(2), selection=sel, backend=backend), x, use_reentrant=reentrant)
    out.backward(g)
    _close(x.grad, _packed_ref_grad(x, _mask(sel), lambda o: (o * g.double()).sum()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_only_k_requires_grad_hook_and_grad_mode_nesting(backend):
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    sel = _sel(torch.stack([q, k], 2))
    kt = k.clone().requires_grad_()
    seen = []
    kt.register_hook(lambda gr: seen.append(gr) or gr * 3)
    with torch.no_grad():
        with torch.enable_grad():
            out = lk.block_sparse_attn(q, kt, v, selection=sel, backend=backend)
        assert not lk.block_sparse_attn(q, kt, v, selection=sel, backend=backend).requires_grad
    g = torch.randn_like(out)
    out.backward(g)
    k6 = k.double().requires_grad_()
    _dense(q, k6, v, _mask(sel)).backward(g.double())
    assert len(seen) == 1
    _close(kt.grad, 3 * k6.grad)
    out.detach_()
    assert not out.requires_grad and out.grad_fn is None


@pytest.mark.triton_interpret
def test_bsa_triton_in_place_edit_after_forward_raises():
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    sel = _sel(torch.stack([q, k], 2))
    qt = q.clone().requires_grad_()
    out = lk.block_sparse_attn(qt, k, v, selection=sel, backend="triton")
    k.mul_(2)  # a frozen key edited before the backward: never a gradient from the new values
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()
    out = lk.block_sparse_attn(qt, k, v, selection=sel, backend="triton")
    out.add_(1.0)  # the backward reads out (delta = rowsum(dO * O))
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()


@pytest.mark.parametrize("grouped", [False, True])
def test_bsa_torch_in_place_edit_after_forward_forward_values_or_raise(monkeypatch, grouped):
    if grouped:  # query-block groups recomputed in backward (torch.utils.checkpoint inside the reference)
        monkeypatch.setattr(bsa_ref, "CPU_BUDGET_BYTES", 1)
    q, k, v = (torch.randn(B, S, H, D) for _ in range(3))
    sel = _sel(torch.stack([q, k], 2))
    qt = q.clone().requires_grad_()
    out = lk.block_sparse_attn(qt, k.clone(), v, selection=sel, backend="torch")
    g = torch.randn_like(out)
    kk = k.clone()
    out = lk.block_sparse_attn(qt, kk, v, selection=sel, backend="torch")
    kk.mul_(3)
    if grouped:
        with pytest.raises(RuntimeError, match="inplace"):
            out.backward(g)
        return
    out.backward(g)  # the gathered keys are copies: the gradient of the function that ran
    q6 = q.double().requires_grad_()
    _dense(q6, k, v, _mask(sel)).backward(g.double())
    _close(qt.grad, q6.grad)


def test_bsa_torch_grouped_double_backward_fp64(monkeypatch):
    monkeypatch.setattr(bsa_ref, "CPU_BUDGET_BYTES", 1)
    x = torch.randn(1, S, 3, H, 8, dtype=torch.float64)
    sel = _sel(x)
    ins = [t.clone().requires_grad_() for t in x.unbind(2)]
    f = lambda q, k, v: lk.block_sparse_attn(q, k, v, selection=sel, backend="torch", return_lse=True)  # noqa: E731
    assert torch.autograd.gradgradcheck(lambda q, k, v: f(q, k, v)[0], ins)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bsa_zero_batch_with_lse_backward(backend):
    x = torch.randn(0, S, 3, H, D, requires_grad=True)
    out, lse = lk.block_sparse_attn(*x.unbind(2), grid_q=GQ, chunk_q=CQ, sparsity=0.5, backend=backend,
                                    return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert x.grad.shape == x.shape and out.shape == (0, S, H, D) and lse.shape == (0, H, S)


# ------------------------------------------------------------------------------------ prefix_attn
def _prefix_dense(q, k, v, p):
    k, v = (t.double().repeat_interleave(q.shape[2] // t.shape[2], 2) for t in (k, v))
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k) * q.shape[-1] ** -0.5
    m = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool)
    m[:p, p:] = False
    s = s.masked_fill(~m, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), v), s.logsumexp(-1)


@pytest.mark.parametrize("p", [0, 3, 8])
def test_prefix_attn_packed_gqa_lse_grads(p):
    q = torch.randn(B, 8, 4, 8, requires_grad=True)
    kv = torch.randn(B, 8, 2, 2, 8, requires_grad=True)
    o, lse = lk.prefix_attn(q, *kv.unbind(2), p, backend="torch", return_lse=True)
    g, gl = torch.randn_like(o), torch.randn_like(lse)
    ((o * g).sum() + (lse * gl).sum()).backward()
    q6, kv6 = q.detach().double().requires_grad_(), kv.detach().double().requires_grad_()
    o6, l6 = _prefix_dense(q6, *kv6.unbind(2), p)
    ((o6 * g.double()).sum() + (l6 * gl.double()).sum()).backward()
    _close(q.grad, q6.grad)
    _close(kv.grad, kv6.grad)


def test_prefix_attn_in_place_and_double_backward():
    q, k, v = (torch.randn(1, 8, 2, 8) for _ in range(3))
    qt = q.clone().requires_grad_()
    out = lk.prefix_attn(qt, k, v, 3, backend="torch")
    v.add_(1.0)
    with pytest.raises(RuntimeError, match="inplace"):
        out.sum().backward()
    out = lk.prefix_attn(qt, k, v, 3, backend="torch")
    (gq,) = torch.autograd.grad(out.pow(2).sum(), qt, create_graph=True)
    try:  # SDPA's CPU kernel has no double backward: a clear refusal, or the right answer
        (gg,) = torch.autograd.grad(gq.sum(), qt)
    except RuntimeError as e:
        assert "not implemented" in str(e)
        return
    q6 = q.double().requires_grad_()
    (gq6,) = torch.autograd.grad(_prefix_dense(q6, k, v, 3)[0].pow(2).sum(), q6, create_graph=True)
    _close(gg, torch.autograd.grad(gq6.sum(), q6)[0])


@pytest.mark.triton_interpret
def test_prefix_attn_triton_with_grad_refuses():
    x = torch.randn(1, 8, 3, 2, 16, requires_grad=True)
    with pytest.raises(lk.BackendUnavailableError, match="backend='torch' for gradients"):
        lk.prefix_attn(*x.unbind(2), 3, backend="triton")


# ------------------------------------------------------------------------------------ rope / qk_norm_rope
def _norm_rope64(x, w, rope):
    x = x.double()
    n = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.double()
    return lk.apply_rope_3d(n, rope)


def test_qk_norm_rope_packed_weights_out_view_and_in_place_weight():
    rope = lk.Rope3D((2, 2, 2), 8)
    x = torch.randn(B, 8, 3, H, 8, requires_grad=True)
    qw, kw = (torch.randn(8, requires_grad=True) for _ in range(2))
    buf = torch.zeros(B, 12, H, 8)  # out_k: the tail of a [cache; fresh] key buffer
    qo, ko = lk.qk_norm_rope(x[:, :, 0], x[:, :, 1], qw, kw, rope, out_k=buf[:, 4:], backend="torch")
    g1, g2 = torch.randn_like(qo), torch.randn(buf.shape)
    ((qo * g1).sum() + (buf * g2).sum()).backward()
    x6, qw6, kw6 = (t.detach().double().requires_grad_() for t in (x, qw, kw))
    ((_norm_rope64(x6[:, :, 0], qw6, rope) * g1.double()).sum()
     + (_norm_rope64(x6[:, :, 1], kw6, rope) * g2[:, 4:].double()).sum()).backward()
    for a, b in ((x, x6), (qw, qw6), (kw, kw6)):
        _close(a.grad, b.grad)
    qo, _ = lk.qk_norm_rope(x[:, :, 0], x[:, :, 1], qw, kw, rope, backend="torch")
    with torch.no_grad():
        qw.mul_(2)  # an optimizer step before the backward of a retained graph
    with pytest.raises(RuntimeError, match="inplace"):
        qo.sum().backward()


def test_rope_hooks_zero_batch_and_double_backward():
    rope = lk.Rope3D((2, 2, 2), 8)
    x = torch.randn(1, 8, 2, 8, requires_grad=True)
    y = x * 2  # non-leaf input with a hook that rescales its gradient
    y.register_hook(lambda g: g * 10)
    lk.apply_rope_3d(y, rope).pow(2).sum().backward()
    x6 = x.detach().double().requires_grad_()
    lk.apply_rope_3d(x6 * 2, rope).pow(2).sum().backward()
    _close(x.grad, 10 * x6.grad)
    x64 = torch.randn(1, 8, 1, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: lk.apply_rope_3d(t, rope), (x64,))
    z = torch.randn(0, 8, 2, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    a, b = lk.qk_norm_rope(z, z * 1, w, w, rope, backend="torch")
    (a.sum() + b.sum() + lk.apply_rope_3d(z, rope).sum()).backward()
    assert z.grad.shape == z.shape and not z.grad.any()


# ------------------------------------------------------------------------------------ LoRA layers
def test_lora_linear_trainable_split_adapter_grads_and_checkpoint():
    C, r = 8, 2
    m = LoRALinear(C, 3 * C, bias=True)
    down = torch.randn(3 * r, C, requires_grad=True)
    ups = [torch.randn(C, r, requires_grad=True) for _ in range(3)]
    a = LoRAAdapter("a", down, [LoRAPart(j * C, (j + 1) * C, j * r, (j + 1) * r, ups[j], 0.5) for j in range(3)],
                    multiplier=1.5)
    m.lora_adapters["a"] = a
    m.lora_active = [a]
    x = torch.randn(2, 5, C, requires_grad=True)
    g = torch.randn(2, 5, 3 * C)
    for reentrant in (None, True, False):
        y = m(x) if reentrant is None else torch.utils.checkpoint.checkpoint(m, x, use_reentrant=reentrant)
        y.backward(g)
    x6, d6, *u6 = (t.detach().double().requires_grad_() for t in (x, down, *ups))
    delta = torch.cat([(u6[j] @ d6[j * r:(j + 1) * r]) * 0.75 for j in range(3)])
    F.linear(x6, m.weight.detach().double() + delta, m.bias.detach().double()).backward(3 * g.double())
    for t, t6 in zip((x, down, *ups), (x6, d6, *u6)):
        _close(t.grad, t6.grad)
    y = m(x)
    with torch.no_grad():
        down.mul_(2)
    with pytest.raises(RuntimeError, match="inplace"):
        y.sum().backward()


# ------------------------------------------------------------------------------------ DiT block checkpointing
def test_dit_activation_checkpointing_input_and_param_grads_match_fp64():
    from longcat_vc import training as tr

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vc"))
    try:
        from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config
    finally:
        sys.path.pop(0)

    bsa = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}
    cfg = tiny_config(enable_bsa=True, bsa_params=bsa, attn_backend="torch")
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 1000, ())))
    x0, y = torch.randn(1, 16, 4, 4, 4), torch.randn(1, 1, 3, 32)
    mask = torch.ones(1, 3, dtype=torch.long)
    grads = []
    for dtype, ckpt in ((torch.float64, False), (torch.float32, True)):
        m = model_from_state_dict(cfg, sd).to(dtype).train().requires_grad_(True)
        if ckpt:
            assert tr.enable_activation_checkpointing(m) == cfg.depth
        x = x0.to(dtype).requires_grad_()
        m(x * 1.0, torch.full((1,), 500.0, dtype=dtype), y.to(dtype), mask).float().pow(2).mean().backward()
        grads.append({"x": x.grad, **{n: p.grad for n, p in m.named_parameters()}})
    assert grads[0].keys() == grads[1].keys()
    for n, want in grads[0].items():
        got = grads[1][n]
        assert got is not None and torch.isfinite(got).all(), n
        assert (got.double() - want).abs().max() <= 1e-4 * want.abs().max().clamp_min(1e-6), n


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), True, "0.5", "tensor", "tensor_grad"])
def test_lora_part_scale_checked_at_construction_fix(scale):
    """``LoRAPart(..., scale)`` took any value (only a later assignment was checked): NaN gave a NaN output
    silently, a trainable 0-d tensor failed inside ``add_`` ("argument 'alpha' must be Number")."""
    if scale in ("tensor", "tensor_grad"):
        scale = torch.tensor(0.5, requires_grad=scale == "tensor_grad")
    with pytest.raises((TypeError, ValueError), match="LoRAPart.scale"):
        LoRAPart(0, 4, 0, 2, torch.randn(4, 2), scale)
    p = LoRAPart(0, 4, 0, 2, torch.randn(4, 2), __import__("numpy").float32(0.5))  # a real number: stored as float
    assert type(p.scale) is float and p.scale == 0.5
