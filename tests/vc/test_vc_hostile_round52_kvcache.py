"""Round 52 (the conditioning KV cache, hostile use):

* ``KVCache`` was a dataclass with the generated ``__eq__``: two distinct caches compared their tensor
  lists and raised torch's "Boolean value of Tensor with more than one value is ambiguous", and a cache
  was unhashable (no set, no dict key). Now compared and hashed by identity, as tensors and modules.
* a deep-copied or pickled cache carried a *copy* of the building model's ``StateToken``, which the
  model never marks stale: after a LoRA toggle / ``load_state_dict`` the traced (``torch.compile``)
  forward used the copied cache silently. Copies now share the token; an unpickled token this process
  no longer holds comes back stale.

Plus pins of the refusals (grid, frames, batch, dtype, block-sparse settings, weights) and of the
memory accounting (``nbytes`` = the bytes of the stored tensors, resident or offloaded).
"""

from __future__ import annotations

import copy
import gc
import pickle

import pytest
import torch

from longcat_vc.parallel import ShardedKVCache
from test_dit import make_inputs, rel_l2
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


@pytest.fixture
def setup():
    cfg = tiny_config()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    x, t, y, mask = make_inputs(cfg, B=2, T=4, shared_cond=2)
    return cfg, m, (x, t, y, mask)


def _step(m, inputs, cache, B=2, c=2):
    x, t, y, mask = inputs
    with torch.no_grad():
        return m(x[:B, :, c:], t[:B], y[:B], mask[:B], kv_cache=cache)


def test_caches_compare_and_hash_by_identity(setup):
    cfg, m, (x, *_rest) = setup
    a = m.build_kv_cache(x[:1, :, :2])
    b = m.build_kv_cache(x[:1, :, :2])
    assert a == a and a != b and not (a == copy.deepcopy(a))  # raised "Boolean value of Tensor ... ambiguous"
    assert len({a, b, a}) == 2 and {a: 1}[a] == 1  # raised "unhashable type: 'KVCache'"
    s = ShardedKVCache(keys=list(a.keys), values=list(a.values), num_frames=2, grid_hw=a.grid_hw, dtype=a.dtype,
                       device=a.device, num_heads=cfg.num_heads)
    s2 = copy.copy(s)
    assert s != s2 and len({s, s2}) == 2


def test_deepcopied_cache_is_stale_in_a_traced_forward(setup):
    """The traced check reads the token's ``stale`` flag: a deep copy's token was never marked."""
    cfg, m, inputs = setup
    x = inputs[0]
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    cache = m.build_kv_cache(x[:1, :, :2])
    for dup in (copy.deepcopy(cache), copy.copy(cache), pickle.loads(pickle.dumps(cache))):
        assert dup.state is cache.state
        m._check_cache_counter(dup)  # fresh: accepted
    dup = copy.deepcopy(cache)
    pick = pickle.loads(pickle.dumps(cache))
    m.load_state_dict(sd)
    for d in (dup, pick):
        with pytest.raises(ValueError, match="stale"):
            m._check_cache_counter(d)  # the check torch.compile runs: passed for the copies
        with pytest.raises(ValueError, match="stale"):
            _step(m, inputs, d)


def test_deepcopied_cache_under_torch_compile(setup):
    cfg, m, inputs = setup
    x, t, y, mask = inputs
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            m(x, t, y, mask)
            cm = torch.compile(m, backend="aot_eager", fullgraph=True)
            cache = m.build_kv_cache(x[:1, :, :2])
            dup = copy.deepcopy(cache)
            ref = _step(m, inputs, cache)
            out = cm(x[:, :, 2:], t, y, mask, kv_cache=dup)
            assert torch.isfinite(out).all() and rel_l2(out, ref) < 1e-5
            m.load_state_dict({k: v * 1.01 for k, v in m.state_dict().items()})
            with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match="stale"):
                cm(x[:, :, 2:], t, y, mask, kv_cache=dup)
    finally:
        torch._dynamo.reset()


def test_unpickled_cache_of_a_token_no_longer_held_is_stale(setup):
    cfg, m, inputs = setup
    x = inputs[0]
    cache = m.build_kv_cache(x[:1, :, :2])
    blob = pickle.dumps(cache)
    m.load_state_dict({k: v.clone() for k, v in m.state_dict().items()})
    del cache
    gc.collect()
    back = pickle.loads(blob)  # its model moved on and nothing holds the old token
    assert back.state.stale
    with pytest.raises(ValueError, match="stale"):
        m._check_cache_counter(back)
    with pytest.raises(ValueError, match="stale"):
        _step(m, inputs, back)


def test_fresh_pickled_and_copied_caches_give_the_same_answer(setup):
    cfg, m, inputs = setup
    cache = m.build_kv_cache(inputs[0][:1, :, :2])
    ref = _step(m, inputs, cache)
    assert torch.isfinite(ref).all()
    for d in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert torch.equal(_step(m, inputs, d), ref)


def test_refusals_grid_frames_batch_dtype_bsa(setup):
    cfg, m, inputs = setup
    x, t, y, mask = inputs
    cache = m.build_kv_cache(x[:1, :, :2])
    with torch.no_grad():
        with pytest.raises(ValueError, match="token grid"):
            m(x[:, :, 2:, :2], t, y, mask, kv_cache=cache)
        with pytest.raises(ValueError, match="num_cond_latents"):
            m(x[:, :, 2:], t, y, mask, num_cond_latents=1, kv_cache=cache)
        with pytest.raises(ValueError, match="batch 2, expected 1 or 1"):
            _step(m, inputs, m.build_kv_cache(x[:, :, :2]), B=1)
    # a CFG-batch cache (batch 2) equals the shared one for batch 2
    assert rel_l2(_step(m, inputs, m.build_kv_cache(x[:, :, :2])), _step(m, inputs, cache)) < 1e-6
    # fp32 cache into a half model (another instance and the same one after .half())
    m16 = model_from_state_dict(cfg, {k: v.clone() for k, v in m.state_dict().items()}).half()
    with pytest.raises(ValueError, match="dtype"):
        _step(m16, inputs, cache)
    m.config.enable_bsa = True
    try:
        with pytest.raises(ValueError, match="block-sparse|attention configuration"):
            _step(m, inputs, cache)
    finally:
        m.config.enable_bsa = False
    m.half()
    with pytest.raises(ValueError, match="dtype|stale"):
        _step(m, inputs, cache)


def test_weights_edited_in_place_make_the_cache_stale(setup):
    cfg, m, inputs = setup
    cache = m.build_kv_cache(inputs[0][:1, :, :2])
    with torch.no_grad():
        m.blocks[-1].attn.qkv.weight.mul_(1.0 + torch.rand(()).item())
    with pytest.raises(ValueError, match="stale"):
        _step(m, inputs, cache)


@pytest.mark.parametrize("offload", [False, True])
def test_nbytes_is_the_stored_tensor_bytes(setup, offload):
    cfg, m, inputs = setup
    x = inputs[0]
    cache = m.build_kv_cache(x[:1, :, :2], offload=offload)
    tensors = cache.keys + cache.values
    assert cache.nbytes == sum(t.untyped_storage().nbytes() for t in tensors)
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)  # no shared storage
    Nh, Nw = x.shape[-2] // 2, x.shape[-1] // 2
    assert cache.nbytes == 2 * cfg.depth * 2 * Nh * Nw * cfg.num_heads * cfg.head_dim * 4
    assert all(t.device.type == "cpu" for t in tensors) and cache.offloaded == offload
    resident = m.build_kv_cache(x[:1, :, :2])
    out = _step(m, inputs, cache)
    assert torch.isfinite(out).all() and torch.equal(out, _step(m, inputs, resident))
