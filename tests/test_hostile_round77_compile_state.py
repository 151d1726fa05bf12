"""Round 77 (hostile audit): a ``torch.compile``d tiny DiT (CPU, backends "eager" / "aot_eager") against the
eager model across state changes between calls: LoRA enable / disable / fuse / unfuse / multiplier, block-sparse
switches and ``bsa_params`` edited in place, ``attn_backend``, dtype round trips, autocast, train / eval, new
grids and frame counts, and KV caches that do not fit the call (another grid, batch or autocast dtype)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch._dynamo

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vc"))

from test_dit import make_inputs  # noqa: E402
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _model():
    cfg = tiny_config(attn_backend="torch")
    return cfg, model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))


def _same(got, want):
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_compiled_forward_refuses_a_cache_that_does_not_fit(fullgraph):
    """The traced forward skipped every check of ``kv_cache`` but the stale-state one: a cache built on another
    token grid with as many tokens per frame (2x8 against 4x4: the cond tokens at other positions), of another
    batch (2 against 3), or under a bf16 autocast used without it ran without a word (eager refuses all three)."""
    cfg, model = _model()
    cm = torch.compile(model, backend="eager", fullgraph=fullgraph)
    errors = (ValueError, torch._dynamo.exc.Unsupported)
    x, t, y, mask = make_inputs(cfg, B=2, T=3, H=8, W=8, seed=_seed())
    with torch.no_grad():
        good = model.build_kv_cache(x[:1, :, :1])
        _same(cm(x[:, :, 1:], t, y, mask, kv_cache=good), model(x[:, :, 1:], t, y, mask, kv_cache=good))
        other_grid = model.build_kv_cache(torch.randn(1, 16, 1, 4, 16))
        with pytest.raises(ValueError, match="token grid"):
            model(x[:, :, 1:], t, y, mask, kv_cache=other_grid)
        with pytest.raises(errors, match="token grid"):
            cm(x[:, :, 1:], t, y, mask, kv_cache=other_grid)
        other_batch = model.build_kv_cache(torch.randn(2, 16, 1, 8, 8))
        x3, t3, y3, m3 = make_inputs(cfg, B=3, T=2, H=8, W=8, seed=_seed())
        with pytest.raises(errors, match="batch 2, expected 1 or 3"):
            cm(x3, t3, y3, m3, kv_cache=other_batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model.build_kv_cache(x[:1, :, :1])
        with pytest.raises(errors, match="autocast"):
            cm(x[:, :, 1:], t, y, mask, kv_cache=bf16)
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(errors, match="autocast"):
            cm(x[:, :, 1:], t, y, mask, kv_cache=good)
        # the fitting cache still runs, equal to eager
        _same(cm(x[:, :, 1:], t, y, mask, kv_cache=good), model(x[:, :, 1:], t, y, mask, kv_cache=good))


# ---------------------------------------------------------------------- pinned (verified in this audit)
def _runner(model, cm):
    def run(*args, **kw):
        with torch.no_grad():
            want = model(*args, **kw)
            got = cm(*args, **kw)
        _same(got, want)
        return want
    return run


def _adapters(model, name):
    return [m.lora_adapters[name] for m in model.modules() if name in getattr(m, "lora_adapters", {})]


def test_compiled_follows_lora_changes(tmp_path):
    """enable / switch / fuse / unfuse / multiplier / disable between calls of one compiled DiT: each equals eager,
    and each change that changes the output changes the compiled one."""
    cfg, model = _model()
    for name, seed in (("a", 1), ("b", 2)):
        write_longcat_lora(str(tmp_path / f"{name}.safetensors"), cfg, rank=4, seed=_seed() + seed)
        model.load_lora(str(tmp_path / f"{name}.safetensors"), name)
    run = _runner(model, torch.compile(model, backend="aot_eager"))
    x, t, y, mask = make_inputs(cfg, B=2, T=2, H=4, W=4, seed=_seed())
    base = run(x, t, y, mask)
    model.enable_loras(["a"])
    a = run(x, t, y, mask)
    assert not torch.allclose(a, base)
    model.enable_loras(["a", "b"])
    run(x, t, y, mask)
    model.enable_loras(["b"])
    b = run(x, t, y, mask)
    model.fuse_lora()
    torch.testing.assert_close(run(x, t, y, mask), b, rtol=0, atol=1e-4)
    model.unfuse_lora()
    for mult in (0.3, 4.0):  # |s| <= 1 and > 1 take two paths of LoRAAdapter.add_to
        for ad in _adapters(model, "b"):
            ad.multiplier = mult
        run(x, t, y, mask)
    model.fuse_lora()
    run(x, t, y, mask)
    model.unfuse_lora()
    model.disable_loras()
    torch.testing.assert_close(run(x, t, y, mask), base, rtol=0, atol=1e-5)


def test_compiled_follows_attention_settings_edited_in_place():
    """``enable_bsa``, ``bsa_params`` replaced or edited in place (a sparsity, one entry of a chunk list) and
    ``attn_backend`` between calls: the compiled DiT re-traces and equals eager each time; a cache built before
    such an edit is refused as stale by the compiled call too."""
    cfg, model = _model()
    run = _runner(model, torch.compile(model, backend="aot_eager"))
    x, t, y, mask = make_inputs(cfg, B=2, T=4, H=8, W=8, seed=_seed())
    dense = run(x, t, y, mask)
    model.config.enable_bsa = True
    model.config.bsa_params = {"sparsity": 0.5, "chunk_3d_shape_q": [1, 2, 2]}
    s50 = run(x, t, y, mask)
    assert not torch.allclose(s50, dense)
    with torch.no_grad():
        cache = model.build_kv_cache(x[:1, :, :2])
    model.config.bsa_params["sparsity"] = 0.75
    assert not torch.allclose(run(x, t, y, mask), s50)
    cm = torch.compile(model, backend="aot_eager")
    with torch.no_grad(), pytest.raises(ValueError, match="stale"):
        cm(x[:, :, 2:], t, y, mask, kv_cache=cache)
    model.config.bsa_params["chunk_3d_shape_q"][2] = 4
    run(x, t, y, mask)
    model.config.enable_bsa = False
    torch.testing.assert_close(run(x, t, y, mask), dense, rtol=0, atol=1e-5)
    model.config.attn_backend = "auto"
    run(x, t, y, mask)


def test_compiled_follows_autocast_dtype_and_mode_changes():
    """An autocast switched on / off between calls, a dtype round trip and train() / eval(): compiled == eager."""
    cfg, model = _model()
    run = _runner(model, torch.compile(model, backend="aot_eager"))
    x, t, y, mask = make_inputs(cfg, B=2, T=2, H=4, W=4, seed=_seed())
    plain = run(x, t, y, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = run(x, t, y, mask)
    assert not torch.equal(bf, plain)
    torch.testing.assert_close(run(x, t, y, mask), plain, rtol=0, atol=0)
    model.half()
    run(x.half(), t, y, mask)
    model.float()
    run(x, t, y, mask)
    model.train()
    run(x, t, y, mask)
    model.eval()


def test_compiled_dynamic_grids_frames_and_caches():
    """``dynamic=True``: new token grids, frame counts, batches, ``num_cond_latents`` and rebuilt caches between
    calls equal eager."""
    cfg, model = _model()
    run = _runner(model, torch.compile(model, backend="aot_eager", dynamic=True))
    for T, H, W, B in ((3, 4, 6, 2), (4, 8, 4, 1)):
        x, t, y, mask = make_inputs(cfg, B=B, T=T, H=H, W=W, seed=_seed())
        for c in (0, 1, T):
            ts = t[:, None].repeat(1, T)
            ts[:, :c] = 0
            run(x, ts, y, mask, num_cond_latents=c)
        with torch.no_grad():
            cache = model.build_kv_cache(x[:1, :, :1])
        run(x[:, :, 1:], t, y, mask, kv_cache=cache)
        run(x[:, :, 1:], t, y, None, kv_cache=cache, num_cond_latents=1)


def test_compiled_ops_dynamic_scalar_args():
    """The public ops (torch backend) compiled with ``dynamic=True`` while prefix_len, frame_offset, grid, chunk
    and sparsity change between calls: equal to eager."""
    import longcat_kernels as lk

    pa = torch.compile(lambda q, k, v, p: lk.prefix_attn(q, k, v, p, backend="torch"), backend="aot_eager", dynamic=True)
    for S, p in ((16, 4), (16, 8), (20, 0), (20, 20)):
        q, k, v = (torch.randn(1, S, 2, 16) for _ in range(3))
        _same(pa(q, k, v, p), lk.prefix_attn(q, k, v, p, backend="torch"))

    def qr(q, k, w, rope, fo):
        return lk.qk_norm_rope(q, k, w, w, rope=rope, frame_offset=fo, backend="torch")

    cqr = torch.compile(qr, backend="aot_eager", dynamic=True)
    for grid, T, fo in (((4, 2, 2), 2, 0), ((4, 2, 2), 2, 2), ((6, 2, 3), 3, 3)):
        n = T * grid[1] * grid[2]
        q, k, w = torch.randn(1, n, 2, 16), torch.randn(1, n, 2, 16), torch.randn(16)
        rope = lk.Rope3D(grid, 16)
        for got, want in zip(cqr(q, k, w, rope, fo), qr(q, k, w, rope, fo)):
            _same(got, want)

    def bsa(q, k, v, grid, chunk, sp):
        return lk.block_sparse_attn(q, k, v, grid_q=grid, chunk_q=chunk, sparsity=sp, backend="torch")

    cb = torch.compile(bsa, backend="aot_eager", dynamic=True)
    for grid, chunk, sp in (((2, 4, 4), (1, 2, 2), 0.5), ((2, 4, 4), (1, 2, 2), 0.75), ((3, 4, 2), (1, 2, 1), 0.25)):
        q, k, v = (torch.randn(1, grid[0] * grid[1] * grid[2], 2, 16) for _ in range(3))
        _same(cb(q, k, v, grid, chunk, sp), bsa(q, k, v, grid, chunk, sp))
