"""Hostile audit, round 60: mixed precision as training and inference code uses it.

Bugs: under a ``torch.autocast`` of the other half dtype (fp16 tensors in a bf16 autocast, bf16 in an fp16
one) the torch backend of ``prefix_attn`` and of block-sparse ``attn_with_kv_cache`` raised torch's
"Unexpected floating ScalarType in at::autocast::prioritize" (their ``torch.cat``s); the registered Triton
ops that take rope tables (``rope_3d``, ``qk_norm_rope``, ``kv_cache_attn_fwd``) read a strided table as if
contiguous (silently wrong rotations) where the CUDA extension converts tables to contiguous fp32.
Pinned: fp32/fp16 inputs give the same result and dtype inside and outside autocast on every op, mixed
q/k/v dtypes are refused naming the argument, and inf/NaN in the incoming gradient of out or lse reaches
dq/dk/dv (so ``GradScaler`` sees fp16 overflow), on the DiT's LoRA training path too.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import longcat_kernels as lk

_TRITON = pytest.param("triton", marks=pytest.mark.triton_interpret)
GRID, CHUNK = (2, 4, 4), (1, 2, 2)
B, HEADS, D = 2, 2, 16
S = GRID[0] * GRID[1] * GRID[2]
OTHER_HALF = [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)]


def _backend(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    return backend


def _qkv(dtype, s=S, requires_grad=False):
    return [torch.randn(B, s, HEADS, D).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def _ref(q, k, v, scale, prefix=0, k_prefix=None):
    """fp64 attention; queries before ``prefix`` see keys before ``k_prefix`` (default prefix) only."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if prefix:
        s[:, :, :prefix, (prefix if k_prefix is None else k_prefix):] = float("-inf")
    return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), v.double()), torch.logsumexp(s, -1)


def _finite_close(got, want, tol):
    assert torch.isfinite(got).all()
    assert (got.double() - want.double()).abs().max().item() <= tol


# ------------------------------------------------------------------ bug 1: torch.cat under the other autocast
@pytest.mark.parametrize("dtype,ac", OTHER_HALF)
@pytest.mark.parametrize("return_lse", [False, True])
def test_prefix_attn_torch_other_half_autocast(dtype, ac, return_lse):
    q, k, v = _qkv(dtype)
    P = S // 2
    want = lk.prefix_attn(q, k, v, P, backend="torch", return_lse=return_lse)
    with torch.autocast("cpu", dtype=ac):
        got = lk.prefix_attn(q, k, v, P, backend="torch", return_lse=return_lse)
    got, want = (got, want) if return_lse else ((got,), (want,))
    assert got[0].dtype == dtype
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    ref_o, ref_l = _ref(q, k, v, D ** -0.5, P)
    _finite_close(got[0], ref_o, 2e-2)
    if return_lse:
        _finite_close(got[1], ref_l, 1e-3)


@pytest.mark.parametrize("dtype,ac", OTHER_HALF)
def test_kv_cache_block_sparse_torch_other_half_autocast(dtype, ac):
    q, k, v = _qkv(dtype, s=S // 2)
    kc, vc = (t[:1] for t in _qkv(dtype, s=S // 2)[:2])  # a batch-1 cache broadcast over the batch
    rope = lk.Rope3D(GRID, D)
    bs = lk.BlockSparseParams(sparsity=0.0, chunk_q=CHUNK)  # every block kept: dense over [cache; fresh]
    want = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=bs, backend="torch", return_lse=True)
    with torch.autocast("cpu", dtype=ac):
        got = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=bs, backend="torch", return_lse=True)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    kr = lk.apply_rope_3d(k.double(), rope, frame_offset=1)
    qr = lk.apply_rope_3d(q.double(), rope, frame_offset=1)
    k_all = torch.cat([kc.double().expand(B, -1, -1, -1), kr], 1)
    v_all = torch.cat([vc.double().expand(B, -1, -1, -1), v.double()], 1)
    ref_o, ref_l = _ref(qr, k_all, v_all, D ** -0.5)
    _finite_close(got[0], ref_o, 2e-2)
    _finite_close(got[1], ref_l, 2e-2)


def test_cat_cache_other_half_autocast():
    from longcat_kernels.ops.kv_cache_attn.reference import cat_cache

    k = torch.randn(B, 4, HEADS, D).half()
    kc = torch.randn(1, 3, HEADS, D).half()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = cat_cache(kc, k)
    assert got.dtype == torch.float16 and got.shape == (B, 7, HEADS, D)
    assert torch.equal(got[:, :3], kc.expand(B, -1, -1, -1)) and torch.equal(got[:, 3:], k)
    assert cat_cache(None, k) is k


# ------------------------------------------------------------------ bug 2: strided rope tables, direct ops
def _strided(tables):
    """The same values in column-major storage (a transposed view of a transposed copy)."""
    out = [t.t().contiguous().t() for t in tables]
    assert not any(t.is_contiguous() for t in out)
    return out


def _tables(rope):
    return [rope.cos_t, rope.sin_t, rope.cos_h, rope.sin_h, rope.cos_w, rope.sin_w]


@pytest.mark.triton_interpret
@pytest.mark.parametrize("layout", ["contiguous", "strided", "sliced"])
def test_rope_3d_op_table_layouts(layout):
    pytest.importorskip("triton")
    importlib.import_module("longcat_kernels.ops.rope.triton")  # registers the ops

    rope = lk.Rope3D(GRID, D)
    tabs = _tables(rope)
    if layout == "strided":
        tabs = _strided(tabs)
    elif layout == "sliced":
        tabs = [torch.cat([t, torch.randn_like(t)], 1)[:, : t.shape[1]] for t in tabs]
    x = torch.randn(B, S, HEADS, D)
    out = torch.empty_like(x)
    torch.ops.longcat_kernels.rope_3d(x, *tabs, GRID[1], GRID[2], 0, out)
    _finite_close(out, lk.apply_rope_3d(x.double(), rope), 1e-5)

    w = torch.randn(D)
    oq, ok = torch.empty_like(x), torch.empty_like(x)
    torch.ops.longcat_kernels.qk_norm_rope(x, x, w, w, *tabs, GRID[1], GRID[2], 0, 1e-6, oq, ok)
    want, _ = lk.qk_norm_rope(x.double(), x.double(), w.double(), w.double(), rope=rope, backend="torch")
    _finite_close(oq, want, 1e-4)
    _finite_close(ok, want, 1e-4)


@pytest.mark.triton_interpret
def test_kv_cache_attn_op_strided_tables():
    pytest.importorskip("triton")
    importlib.import_module("longcat_kernels.ops.kv_cache_attn.triton")  # registers the ops

    rope = lk.Rope3D(GRID, D)
    q, k, v = _qkv(torch.float32, s=S // 2)
    kc, vc = (t[:1] for t in _qkv(torch.float32, s=S // 2)[:2])
    out, _ = torch.ops.longcat_kernels.kv_cache_attn_fwd(
        q, k, v, kc, vc, *_strided(_tables(rope)), GRID[1], GRID[2], 0.25, False)
    want = lk.attn_with_kv_cache(*(t.double() for t in (q, k, v, kc, vc)), rope=rope, scale=0.25, backend="torch")
    _finite_close(out, want, 1e-5)


@pytest.mark.triton_interpret
def test_rope_3d_op_half_tables_are_upcast_like_cuda():
    """fp16 tables: the kernels read them as fp32 (the CUDA extension's conversion), values of the rounded table."""
    pytest.importorskip("triton")
    importlib.import_module("longcat_kernels.ops.rope.triton")  # registers the ops

    rope = lk.Rope3D(GRID, D)
    half = [t.half() for t in _tables(rope)]
    x = torch.randn(B, S, HEADS, D)
    out = torch.empty_like(x)
    torch.ops.longcat_kernels.rope_3d(x, *half, GRID[1], GRID[2], 0, out)
    # the same rotation with the rounded tables, in fp64
    cos, sin = (torch.cat([a.double()[t], b.double()[h], c.double()[w]], -1)
                for a, b, c in ((half[0], half[2], half[4]), (half[1], half[3], half[5]))
                for t, h, w in [torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), torch.arange(GRID[2]),
                                               indexing="ij")])
    cos, sin = cos.reshape(S, 1, D), sin.reshape(S, 1, D)
    xd = x.double()
    x0, x1 = xd[..., 0::2], xd[..., 1::2]
    want = torch.stack([x0 * cos[..., 0::2] - x1 * sin[..., 0::2], x1 * cos[..., 0::2] + x0 * sin[..., 0::2]],
                       -1).flatten(-2)
    _finite_close(out, want, 1e-5)


# ------------------------------------------------------------------ pinned: autocast leaves the ops alone
def _ops(be, q, k, v):
    rope = lk.Rope3D(GRID, D)
    h = S // 2
    w = torch.randn(D)
    return {
        "block_sparse_attn": lambda: lk.block_sparse_attn(q, k, v, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5,
                                                          backend=be, return_lse=True),
        "select_blocks": lambda: (lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=None,
                                                   cdf_threshold=0.7, backend=be).counts,),
        "attn_with_kv_cache": lambda: lk.attn_with_kv_cache(q[:, h:], k[:, h:], v[:, h:], k[:1, :h], v[:1, :h],
                                                            rope=rope, backend=be, return_lse=True),
        "flash_attn_with_kvcache": lambda: lk.flash_attn_with_kvcache(q, k, v, backend=be, return_softmax_lse=True),
        "prefix_attn": lambda: lk.prefix_attn(q, k, v, h, backend=be, return_lse=True),
        "qk_norm_rope": lambda: lk.qk_norm_rope(q, k, w, w, rope=rope, backend=be),
        "apply_rope_3d": lambda: (lk.apply_rope_3d(q, rope),),
    }


@pytest.mark.parametrize("backend", ["torch", _TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16])
def test_ops_ignore_autocast(backend, dtype, ac):
    be = _backend(backend)
    q, k, v = _qkv(dtype)
    for name, fn in _ops(be, q, k, v).items():
        want = fn()
        with torch.autocast("cpu", dtype=ac):
            got = fn()
        for g, w in zip(got, want):
            assert g.dtype == w.dtype, name
            assert torch.equal(g, w), name
        if name == "block_sparse_attn":
            assert got[0].dtype == dtype and got[1].dtype == torch.float32


@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16])
def test_fp8_quant_ignores_autocast(ac):
    x = torch.randn(5, 64)
    w, b = torch.randn(64), torch.randn(64)
    for fn in (lambda: lk.fp8_quantize_rows(x, backend="torch"),
               lambda: lk.fp8_layer_norm_quantize(x, w, b, backend="torch"),
               lambda: lk.fp8_silu_mul_quantize(x, 2 * x, backend="torch")):
        want = fn()
        with torch.autocast("cpu", dtype=ac):
            got = fn()
        for g, w_ in zip(got, want):
            assert g.dtype == w_.dtype and torch.equal(g.float(), w_.float())


@pytest.mark.parametrize("op", ["block_sparse_attn", "attn_with_kv_cache", "prefix_attn", "flash_attn_with_kvcache"])
def test_mixed_dtypes_refused_by_name(op):
    q = torch.randn(B, S, HEADS, D)
    kb, vb = torch.randn(B, S, HEADS, D).bfloat16(), torch.randn(B, S, HEADS, D).bfloat16()
    call = {
        "block_sparse_attn": lambda: lk.block_sparse_attn(q, kb, vb, grid_q=GRID, chunk_q=CHUNK),
        "attn_with_kv_cache": lambda: lk.attn_with_kv_cache(q, q, q, kb, vb),
        "prefix_attn": lambda: lk.prefix_attn(q, kb, vb, 4),
        "flash_attn_with_kvcache": lambda: lk.flash_attn_with_kvcache(q, kb, vb),
    }[op]
    with pytest.raises(TypeError, match=r"^k(_cache)?: expected dtype torch.float32 \(same as q\), got torch.bfloat16"):
        call()


def test_qk_norm_rope_fp32_weight_keeps_input_dtype():
    """fp32 master norm weights with bf16 activations (autocast training): outputs in the input dtype."""
    q, k, _ = _qkv(torch.bfloat16)
    w = torch.randn(D, requires_grad=True)
    rope = lk.Rope3D(GRID, D)
    with torch.autocast("cpu", dtype=torch.float16):
        oq, ok = lk.qk_norm_rope(q, k, w, w, rope=rope, backend="torch")
    assert oq.dtype == ok.dtype == torch.bfloat16
    (gw,) = torch.autograd.grad(oq.float().sum() + ok.float().sum(), w)
    assert gw.dtype == torch.float32 and torch.isfinite(gw).all()


# ------------------------------------------------------------------ pinned: overflow reaches the gradients
@pytest.mark.parametrize("backend", ["torch", _TRITON])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("through", ["out", "lse"])
def test_block_sparse_backward_keeps_nonfinite_grads(backend, dtype, bad, through):
    be = _backend(backend)
    q, k, v = _qkv(dtype, requires_grad=True)
    sel = lk.select_blocks(q, k, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5)
    out, lse = lk.block_sparse_attn(q, k, v, selection=sel, backend=be, return_lse=True)
    g = torch.randn_like(out if through == "out" else lse)
    # one query row of the incoming gradient overflowed (fp16 backward under a GradScaler)
    g[(0, 3, 1) if through == "out" else (0, 1, 3)] = bad
    loss = (out.float() * g).sum() if through == "out" else (lse * g).sum()
    dq, dk = torch.autograd.grad(loss, (q, k))
    assert not torch.isfinite(dq).all() and not torch.isfinite(dk).all()


def test_lora_training_grad_scaler_sees_fp16_overflow():
    """fp32 master weights, LoRA (peft), forward under fp16 autocast, block-sparse attention: a scale that
    overflows fp16 in backward is found by unscale_ (the step is skipped, the scale halved); a sane scale
    gives grads close to the fp32 ones and no inf."""
    pytest.importorskip("peft")
    from longcat_vc import training as tr
    from longcat_vc.config import DiTConfig
    from longcat_vc.dit import LongCatDiT

    bp = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}
    dit = LongCatDiT(DiTConfig.tiny(enable_bsa=True, bsa_params=bp, attn_backend="torch"), dtype=torch.float32)
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.2)
    dit.requires_grad_(False)
    model = tr.add_lora(dit, tr.lora_config(rank=4, alpha=4))
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    model.train()
    x0 = torch.randn(1, 16, 4, 8, 8)
    text, mask = torch.randn(1, 1, 5, 32), torch.ones(1, 5, dtype=torch.long)
    kw = dict(sigmas=torch.tensor([0.5]), noise=torch.randn(x0.shape))
    g32 = torch.autograd.grad(tr.flow_matching_loss(model, x0, text, mask, **kw), params)

    def step(init_scale):
        for p in params:
            p.grad = None
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        opt = torch.optim.SGD(params, lr=0.0)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = tr.flow_matching_loss(model, x0, text, mask, **kw)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        found = sum(v.item() for v in scaler._per_optimizer_states[id(opt)]["found_inf_per_device"].values())
        scaler.step(opt)
        scaler.update()
        return found, scaler.get_scale()

    found, scale = step(2.0 ** 100)
    assert found == 1.0 and scale == 2.0 ** 99
    found, scale = step(2.0 ** 10)
    assert found == 0.0 and scale == 2.0 ** 10
    num = sum((p.grad.double() - g.double()).norm() ** 2 for p, g in zip(params, g32)) ** 0.5
    den = sum(g.double().norm() ** 2 for g in g32) ** 0.5
    assert torch.isfinite(num) and num / den < 2e-2
    clipped = torch.nn.utils.clip_grad_norm_(params, 1e-3)
    assert torch.isfinite(clipped)


# ------------------------------------------------------------------ pinned: inference-mode tensors
@pytest.mark.parametrize("backend", ["torch", _TRITON])
def test_inference_mode_selection_and_kv_train_q(backend):
    be = _backend(backend)
    with torch.inference_mode():
        qi, ki, vi = _qkv(torch.float32)
        sel = lk.select_blocks(qi, ki, grid_q=GRID, chunk_q=CHUNK, sparsity=0.5)
    q = torch.randn(B, S, HEADS, D, requires_grad=True)
    out = lk.block_sparse_attn(q, ki, vi, selection=sel, backend=be)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0
    want = lk.block_sparse_attn(q.detach(), ki.clone(), vi.clone(), selection=sel, backend="torch")
    assert (out.detach() - want).abs().max() < 1e-5


# ------------------------------------------------------------------ bug 3: norm weights of the registered op
@pytest.mark.triton_interpret
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_qk_norm_rope_op_weight_layout_and_dtype(dtype):
    """A strided weight was read as if contiguous; an fp32 master weight beside fp16 q/k multiplied unrounded.
    The op now gives what it gives for the weight cast to q's dtype, contiguous (the public path's weight)."""
    pytest.importorskip("triton")
    importlib.import_module("longcat_kernels.ops.rope.triton")  # registers the ops

    rope = lk.Rope3D(GRID, D)
    x = torch.randn(B, S, HEADS, D).to(dtype)
    wide = torch.randn(2 * D)
    strided = wide[::2]  # fp32, stride 2
    plain = strided.to(dtype).contiguous()

    def op(w):
        oq, ok = torch.empty_like(x), torch.empty_like(x)
        torch.ops.longcat_kernels.qk_norm_rope(x, x, w, w, *_tables(rope), GRID[1], GRID[2], 0, 1e-6, oq, ok)
        return oq, ok

    want = op(plain)
    for w in (strided, strided.contiguous(), strided.double()):
        got = op(w)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    ref, _ = lk.qk_norm_rope(x.double(), x.double(), plain.double(), plain.double(), rope=rope, backend="torch")
    _finite_close(want[0], ref, 1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("shapes", [((8,), (8,)), ((D, 1), (D, 1)), ((D + 4,), (D + 4,)), ((HEADS * D,), (D,))])
def test_qk_norm_rope_op_weight_shape_refused(shapes):
    pytest.importorskip("triton")
    importlib.import_module("longcat_kernels.ops.rope.triton")  # registers the ops

    x = torch.randn(B, S, HEADS, D)
    wq, wk = (torch.randn(s) for s in shapes)
    bad = "q_weight" if shapes[0] != (HEADS * D,) else "k_weight"
    with pytest.raises(ValueError, match=rf"^qk_norm_rope: {bad}: expected"):
        torch.ops.longcat_kernels.qk_norm_rope(x, x, wq, wk, None, None, None, None, None, None, 1, 1, 0, 1e-6,
                                               torch.empty_like(x), torch.empty_like(x))


# ------------------------------------------------------------------ bug 4: fuse_lora under autocast
@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16])
def test_fuse_lora_under_autocast_merges_fp32_delta(tmp_path, ac):
    """``W += delta`` computed in fp32 (fuse_lora's docstring) also inside torch.autocast: the delta was a
    bf16/fp16 product, and an unfuse_lora outside autocast left the base weights ~7e-4 off (not 1 ulp)."""
    from helpers import folder_module

    tc = folder_module("vc", "tiny_ckpt")
    cfg = tc.tiny_config()
    path = str(tmp_path / "a.safetensors")
    tc.write_longcat_lora(path, cfg, targets=tc.LORA_TARGETS_CFG_STEP, rank=2, seed=int(torch.randint(1 << 20, ())))
    m = tc.model_from_state_dict(cfg, tc.random_state_dict(cfg, seed=int(torch.randint(1 << 20, ()))),
                                 dtype=torch.float32)
    m.load_lora(path, "a")
    m.enable_loras(["a"])
    mod = m.blocks[0].attn.qkv
    w0 = mod.weight.detach().clone()
    m.fuse_lora()
    fused_plain = mod.weight.detach().clone()
    m.unfuse_lora()
    with torch.autocast("cpu", dtype=ac):
        m.fuse_lora()
    assert torch.equal(mod.weight.detach(), fused_plain)
    m.unfuse_lora()
    assert (mod.weight.detach() - w0).abs().max().item() <= 4 * torch.finfo(torch.float32).eps * w0.abs().max().item()
    a = mod.lora_adapters["a"]
    with torch.autocast("cpu", dtype=ac):
        d = a.delta_weight(torch.float32, mod.out_features)
    assert d.dtype == torch.float32 and torch.equal(d, a.delta_weight(torch.float32, mod.out_features))
