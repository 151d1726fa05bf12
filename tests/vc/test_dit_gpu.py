"""GPU checks of the DiT (skipped without CUDA): offloaded cache streamed back on a side stream,
fused fp32 islands, bf16 cache on == off through the default ("auto") kernels, head_dim 128."""

from __future__ import annotations

import pytest
import torch

from longcat_vc.modules import norms
from test_dit import make_inputs, rel_l2
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

pytestmark = pytest.mark.cuda


def _cfg(**kw):
    # head_dim 128 as the real model; small width and depth
    kw.setdefault("depth", 3)
    return tiny_config(hidden_size=256, num_heads=2, caption_channels=64, **kw)


def _inputs(cfg, c, T=6, H=16, W=20, dev="cuda"):
    x, t, y, mask = make_inputs(cfg, B=2, T=T, H=H, W=W, L=12, shared_cond=c)
    ts = t[:, None].repeat(1, T)
    ts[:, :c] = 0
    return [a.to(dev) for a in (x, t, ts, y, mask)]


@pytest.mark.parametrize("c", [1, 2])
def test_gpu_fp32_torch_backend_cache_on_equals_off(c):
    cfg = _cfg(attn_backend="torch")
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=51)).cuda()
    x, t, ts, y, mask = _inputs(cfg, c)
    with torch.no_grad():
        off = m(x, ts, y, mask, num_cond_latents=c)
        on = m(x[:, :, c:], t, y, mask, kv_cache=m.build_kv_cache(x[:1, :, :c]))
    assert rel_l2(on, off[:, :, c:]) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_auto_backend(dtype):
    cfg = _cfg()
    sd = random_state_dict(cfg, seed=52)
    ref = model_from_state_dict(cfg, sd).cuda()
    m = model_from_state_dict(cfg, sd, dtype=dtype).cuda()
    c = 2
    x, t, ts, y, mask = _inputs(cfg, c)
    t = t.to(dtype).float()
    ts = ts.to(dtype).float()
    with torch.no_grad():
        r = ref(x, ts, y, mask, num_cond_latents=c)
        off = m(x, ts, y, mask, num_cond_latents=c)
        cache = m.build_kv_cache(x[:1, :, :c])
        on = m(x[:, :, c:], t, y, mask, kv_cache=cache)
        cache_o = m.build_kv_cache(x[:1, :, :c], offload=True)
        assert cache_o.keys[0].is_pinned() and cache_o.device.type == "cuda"
        on_o = m(x[:, :, c:], t, y, mask, kv_cache=cache_o)
        torch.cuda.synchronize()
    assert torch.isfinite(on).all()
    assert rel_l2(off, r) < 1e-2
    assert rel_l2(on, r[:, :, c:]) < 1e-2
    assert rel_l2(on, off[:, :, c:]) < 1e-2
    # same values, streamed back from pinned memory block by block
    assert all(torch.equal(a.cuda(), b) for a, b in zip(cache_o.keys + cache_o.values, cache.keys + cache.values))
    assert rel_l2(on_o, on) < 1e-3


def test_gpu_fused_islands_match_eager(monkeypatch):
    cfg = _cfg()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=53), dtype=torch.bfloat16).cuda()
    x, t, ts, y, mask = _inputs(cfg, 1)
    with torch.no_grad():
        fused = m(x, ts, y, mask, num_cond_latents=1)
        assert norms._failed == {}, norms._failed
        monkeypatch.setenv("LONGCAT_KERNELS_FUSE_ISLANDS", "0")
        eager = m(x, ts, y, mask, num_cond_latents=1)
    assert rel_l2(fused, eager) < 1e-2


def test_gpu_offload_overlaps_many_blocks():
    """Deeper model than the two prefetch slots: every block gets its own cache back."""
    cfg = _cfg(depth=5, attn_backend="torch")
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=54)).cuda()
    x, t, ts, y, mask = _inputs(cfg, 2)
    with torch.no_grad():
        off = m(x, ts, y, mask, num_cond_latents=2)
        for _ in range(2):
            on = m(x[:, :, 2:], t, y, mask, kv_cache=m.build_kv_cache(x[:1, :, :2], offload=True))
    assert rel_l2(on, off[:, :, 2:]) < 1e-5
