"""Conditioning KV cache: cache on == cache off (SPEC 4), stored K rotated, offload, block-sparse paths."""

from __future__ import annotations

import pytest
import torch

from test_dit import lh_layernorm, lh_rms, lh_rope_angles, lh_rotate, lh_timestep_embedding, make_inputs, rel_l2
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config


def _cache_off_on(model, cfg, c, *, T=4, cache_batch=1, offload=False, mask_pad=True):
    x, t, y, mask = make_inputs(cfg, B=2, T=T, shared_cond=c)
    if not mask_pad:
        mask = None
    ts = t[:, None].repeat(1, T)
    ts[:, :c] = 0  # the pipeline zeroes the cond timesteps when the cache is off
    with torch.no_grad():
        off = model(x, ts, y, mask, num_cond_latents=c)
        cache = model.build_kv_cache(x[:cache_batch, :, :c], offload=offload)
        on = model(x[:, :, c:], t, y, mask, kv_cache=cache)
        on_frames = model(x[:, :, c:], ts[:, c:], y, mask, kv_cache=cache, num_cond_latents=c)
    assert torch.equal(on, on_frames)
    return off, on, cache


@pytest.mark.parametrize("c", [1, 2])
@pytest.mark.parametrize("zero_pad", [False, True])
def test_cache_on_equals_cache_off_fp32(c, zero_pad):
    cfg = tiny_config(text_tokens_zero_pad=zero_pad)
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=11))
    off, on, cache = _cache_off_on(model, cfg, c)
    assert on.shape == (2, 16, 4 - c, 4, 6) and on.dtype == torch.float32
    assert rel_l2(on, off[:, :, c:]) < 1e-5
    assert cache.batch == 1 and cache.num_frames == c and cache.grid_hw == (2, 3) and cache.depth == cfg.depth
    assert cache.keys[0].shape == (1, c * 6, cfg.num_heads, cfg.head_dim)
    assert cache.nbytes == 2 * cfg.depth * c * 6 * cfg.hidden_size * 4


def test_cache_batch_b_and_offload_equal_cache_off():
    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=12))
    off, on_b, cache_b = _cache_off_on(model, cfg, 2, cache_batch=2)
    assert cache_b.batch == 2
    assert rel_l2(on_b, off[:, :, 2:]) < 1e-5
    off2, on_o, cache_o = _cache_off_on(model, cfg, 2, offload=True)
    assert cache_o.offloaded and cache_o.keys[0].device.type == "cpu"
    assert rel_l2(on_o, off2[:, :, 2:]) < 1e-5


def test_cache_differs_from_wrong_positions_and_wrong_cond():
    """The test can fail: a cache of other cond latents gives a different answer."""
    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=13))
    x, t, y, mask = make_inputs(cfg, B=2, T=4, shared_cond=2)
    with torch.no_grad():
        good = model(x[:, :, 2:], t, y, mask, kv_cache=model.build_kv_cache(x[:1, :, :2]))
        bad = model(x[:, :, 2:], t, y, mask, kv_cache=model.build_kv_cache(torch.randn_like(x[:1, :, :2])))
    assert rel_l2(bad, good) > 1e-3


def test_cached_keys_are_rotated_at_cond_positions():
    """Block 0's cached K = RoPE(RMSNorm(qkv_k(modulate(patch(x), t=0)))) at frames 0..c-1 (longhand)."""
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=14)
    model = model_from_state_dict(cfg, sd)
    c = 2
    x = torch.randn(1, 16, c, 4, 6)
    with torch.no_grad():
        cache = model.build_kv_cache(x)
    sd64 = {k: v.double() for k, v in sd.items()}
    C, nh, D = cfg.hidden_size, cfg.num_heads, cfg.head_dim
    h = torch.nn.functional.conv3d(x.double(), sd64["x_embedder.proj.weight"], sd64["x_embedder.proj.bias"],
                                   stride=(1, 2, 2)).flatten(2).transpose(1, 2)
    temb = lh_timestep_embedding(sd64, cfg, torch.zeros(1, c))
    mod = torch.nn.functional.silu(temb) @ sd64["blocks.0.adaLN_modulation.1.weight"].T + sd64["blocks.0.adaLN_modulation.1.bias"]
    frame = torch.arange(h.shape[1]) // 6
    shift, scale = mod[:, frame, :C], mod[:, frame, C:2 * C]
    hm = lh_layernorm(h) * (1 + scale) + shift
    qkv = hm @ sd64["blocks.0.attn.qkv.weight"].T + sd64["blocks.0.attn.qkv.bias"]
    k = lh_rms(qkv[..., C:2 * C].reshape(1, -1, nh, D), sd64["blocks.0.attn.k_norm.weight"])
    k = lh_rotate(k, lh_rope_angles(c, 2, 3, D))
    v = qkv[..., 2 * C:].reshape(1, -1, nh, D)
    assert rel_l2(cache.keys[0], k) < 1e-5
    assert rel_l2(cache.values[0], v) < 1e-5


@pytest.mark.parametrize("c", [1, 2])
def test_block_sparse_cache_on_equals_off_and_dense_at_zero_sparsity(c):
    bsa = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}
    cfg = tiny_config(enable_bsa=True, bsa_params=bsa)
    sd = random_state_dict(cfg, seed=15)
    model = model_from_state_dict(cfg, sd)
    off, on, _ = _cache_off_on(model, cfg, c, T=5)
    assert rel_l2(on, off[:, :, c:]) < 1e-5
    dense = model_from_state_dict(tiny_config(), sd)
    off_dense, _, _ = _cache_off_on(dense, cfg, c, T=5)
    assert rel_l2(off, off_dense) > 1e-4  # sparsity 0.5 really drops blocks
    # sparsity 0: every block kept == dense attention, in all three modes.
    cfg0 = tiny_config(enable_bsa=True, bsa_params=dict(bsa, sparsity=0.0))
    m0 = model_from_state_dict(cfg0, sd)
    x, t, y, mask = make_inputs(cfg, B=2, T=5, shared_cond=c)
    ts = t[:, None].repeat(1, 5)
    ts[:, :c] = 0
    with torch.no_grad():
        full0, fulld = m0(x, t, y, mask), dense(x, t, y, mask)
        pre0, pred = m0(x, ts, y, mask, num_cond_latents=c), dense(x, ts, y, mask, num_cond_latents=c)
        on0 = m0(x[:, :, c:], t, y, mask, kv_cache=m0.build_kv_cache(x[:1, :, :c]))
    assert rel_l2(full0, fulld) < 1e-5
    assert rel_l2(pre0, pred) < 1e-5
    assert rel_l2(on0, pred[:, :, c:]) < 1e-5


def test_explicit_torch_backend_cache_on_equals_off():
    cfg = tiny_config(attn_backend="torch")
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=16))
    off, on, _ = _cache_off_on(model, cfg, 1)
    assert rel_l2(on, off[:, :, 1:]) < 1e-5


def test_prefetching_reader_slot_protocol(monkeypatch):
    """The offload reader's stream/event protocol, with CUDA streams and events faked on CPU:
    block j is copied into slot j % 2 only after block j-2 released that slot, every block is
    waited for before use, and block j+1's copy is started before block j is handed out."""
    import contextlib

    from longcat_vc import kv_cache as kvm

    log = []

    class FakeEvent:
        def __init__(self):
            self.tag = None

        def record(self, stream=None):
            self.tag = (stream.name, len(log))
            log.append(("record", stream.name, self))

    class FakeStream:
        def __init__(self, name="side", device=None):
            self.name = name

        def wait_event(self, ev):
            assert ev is not None and ev.tag is not None, "waiting on an unrecorded event"
            log.append(("wait", self.name, ev))

        def wait_stream(self, other):
            log.append(("wait_stream", self.name, other.name))

    compute = FakeStream("compute")
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())

    depth = 5
    keys = [torch.full((1, 6, 2, 4), float(i)) for i in range(depth)]
    values = [torch.full((1, 6, 2, 4), float(-i)) for i in range(depth)]
    cache = kvm.KVCache(keys, values, num_frames=1, grid_hw=(2, 3), dtype=torch.float32,
                        device=torch.device("cpu"), offloaded=True)
    reader = kvm._PrefetchingReader(cache)
    releases = {}
    for i in range(depth):
        k, v = reader.get(i)
        assert torch.equal(k, keys[i]) and torch.equal(v, values[i])
        # the compute stream waited for block i's copy; block i+1's copy was issued already
        assert reader.ready[i] is not None and ("wait", "compute", reader.ready[i]) in log
        if i + 1 < depth:
            assert reader.ready[i + 1] is not None
        reader.release(i)
        releases[i] = reader.free[i % 2]
    # copies into a slot waited for the release of the block that used it two steps earlier
    for j in range(2, depth):
        rec = log.index(("record", "side", reader.ready[j]))
        waits = [e for (op, s, e) in log[:rec] if op == "wait" and s == "side"]
        assert waits and waits[-1] is releases[j - 2], f"block {j} copied before block {j - 2} released its slot"
    assert cache.nbytes == 2 * depth * 6 * 2 * 4 * 4
