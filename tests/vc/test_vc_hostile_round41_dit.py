"""Round 41 (the DiT core: ``LongCatDiT``, its modules and the KV cache) hostile audit.

* a KV cache built by another model instance with other block-sparse settings (``enable_bsa`` /
  ``bsa_params``) was used without a word: the cond tokens' K/V depend on them, so the continuation
  was computed against another model's conditioning (cache on != cache off);
* a KV cache built under ``torch.autocast`` held bf16 K/V but said ``dtype=torch.float32`` (the weight
  dtype); used outside autocast (or an fp32 cache used inside it) the forward failed deep in the kernel
  with "k_cache: expected dtype ... (same as q)", an argument the caller never passed;
* ``copy.deepcopy`` / ``torch.save`` + ``torch.load`` of a model kept its instance id: a cache of the original
  used on the copy (same weights) was refused as stale ("the weights changed"), which nothing had done;
* under ``torch.autocast(bfloat16)`` the timestep embedding, the adaLN modulations and the final projection ran
  in bf16, where SPEC 6 (and upstream, with an fp32 autocast around them) computes them in fp32;
* NaN / inf text states at masked-out positions made every output NaN (both text-mask modes).
"""

from __future__ import annotations

import pytest
import torch

from test_dit import make_inputs, rel_l2
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

_BSA = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}


@pytest.mark.parametrize("builder_bsa, user_bsa", [(False, True), (True, False),
                                                   (True, {**_BSA, "sparsity": 0.0})])
def test_cache_of_another_instance_with_other_block_sparse_settings_is_refused(builder_bsa, user_bsa):
    """Was: accepted (only shapes/dtype/device are compared across instances) and wrong: rel err 0.011 (cache
    of a dense model used by a block-sparse one), 0.0035 (the other way round)."""
    def model(bsa):
        cfg = tiny_config(enable_bsa=True, bsa_params=bsa if isinstance(bsa, dict) else _BSA) if bsa else tiny_config()
        return model_from_state_dict(cfg, sd)

    sd = random_state_dict(tiny_config(), seed=41)
    builder, user = model(builder_bsa), model(user_bsa)
    c, T = 2, 5
    x, t, y, mask = make_inputs(user.config, B=2, T=T, shared_cond=c)
    with torch.no_grad():
        cache = builder.build_kv_cache(x[:1, :, :c])
        with pytest.raises(ValueError, match="kv_cache: built by another model instance with other block-sparse"):
            user(x[:, :, c:], t, y, mask, kv_cache=cache)
        # the same settings on another instance: still accepted, and equal to the user's own cache
        twin = model(user_bsa)
        own = user(x[:, :, c:], t, y, mask, kv_cache=user.build_kv_cache(x[:1, :, :c]))
        assert rel_l2(user(x[:, :, c:], t, y, mask, kv_cache=twin.build_kv_cache(x[:1, :, :c])), own) < 1e-6


def test_kv_cache_built_under_autocast_says_its_dtype_and_a_mismatch_names_autocast():
    """Was: the cache said float32 while holding bf16 K/V; a mismatch failed in the kernel ("k_cache: expected
    dtype torch.float32 (same as q), got torch.bfloat16"), naming an argument the caller never passed."""
    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=42))
    c, T = 1, 3
    x, t, y, mask = make_inputs(cfg, B=2, T=T, shared_cond=c)
    ts = t[:, None].repeat(1, T)
    ts[:, :c] = 0
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = model.build_kv_cache(x[:1, :, :c])
            off = model(x, ts, y, mask, num_cond_latents=c)
            on = model(x[:, :, c:], t, y, mask, kv_cache=auto)  # same autocast: still works
        assert auto.keys[0].dtype == torch.bfloat16 and auto.dtype == torch.bfloat16
        assert rel_l2(on, off[:, :, c:]) < 2e-2
        with pytest.raises(ValueError, match=r"kv_cache: dtype torch.bfloat16, model dtype torch.float32.*autocast"):
            model(x[:, :, c:], t, y, mask, kv_cache=auto)
        plain = model.build_kv_cache(x[:1, :, :c])
        assert plain.dtype == torch.float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with pytest.raises(ValueError, match=r"kv_cache: dtype torch.float32, model dtype torch.float32 under "
                                                 r"torch.autocast\(torch.bfloat16\)"):
                model(x[:, :, c:], t, y, mask, kv_cache=plain)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_model_is_another_instance_for_the_kv_cache(how, tmp_path):
    """Was: ``copy.deepcopy`` / ``torch.save`` + ``torch.load`` kept the model's instance id, so a cache of the
    original used on the copy (same weights) was refused as stale with "the weights changed (loaded, replaced or
    edited in place)", which nothing had done; other instances are accepted after the shape checks."""
    import copy

    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=43))
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        torch.save(model, tmp_path / "m.pt")
        twin = torch.load(tmp_path / "m.pt", weights_only=False)
    c = 1
    x, t, y, mask = make_inputs(cfg, B=2, T=3, shared_cond=c)
    with torch.no_grad():
        mine, theirs = model.build_kv_cache(x[:1, :, :c]), twin.build_kv_cache(x[:1, :, :c])
        ref = twin(x[:, :, c:], t, y, mask, kv_cache=theirs)
        assert torch.equal(twin(x[:, :, c:], t, y, mask, kv_cache=mine), ref)
        assert torch.equal(model(x[:, :, c:], t, y, mask, kv_cache=theirs), ref)
        twin.load_state_dict(twin.state_dict())  # the copy's own caches still go stale with it
        with pytest.raises(ValueError, match="kv_cache: stale"):
            twin(x[:, :, c:], t, y, mask, kv_cache=theirs)
        model(x[:, :, c:], t, y, mask, kv_cache=mine)  # ... and the original's do not


def test_timestep_embedding_modulation_and_final_projection_stay_fp32_under_autocast():
    """Was: under ``torch.autocast(bfloat16)`` (an fp32 checkpoint run in mixed precision) the timestep embedding,
    every adaLN modulation and the final projection ran in bf16 (timestep embedding rel err 0.004 against fp64),
    where SPEC 6 computes them in fp32 (upstream wraps them in an fp32 autocast)."""
    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=44))
    x, _, y, mask = make_inputs(cfg, B=2, T=3)
    ts = torch.tensor([[0.0, 999.0, 999.0], [0.0, 3.0, 3.0]])
    seen = {}

    def keep(name):
        def hook(mod, args, out):
            seen.setdefault(name, []).append(out)
        return hook

    hooks = [model.t_embedder.register_forward_hook(keep("temb")),
             model.blocks[1].adaLN_modulation.register_forward_hook(keep("mod")),
             model.final_layer.register_forward_hook(keep("final"))]
    with torch.no_grad():
        model(x, ts, y, mask, num_cond_latents=1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x, ts, y, mask, num_cond_latents=1)
            model.build_kv_cache(x[:1, :, :1])  # the build's last block (forward_kv_only) too
    for h in hooks:
        h.remove()
    assert all(o.dtype == torch.float32 for outs in seen.values() for o in outs)
    plain, auto = seen["temb"][:2]
    assert torch.equal(auto, plain)
    assert torch.equal(seen["mod"][1], seen["mod"][0])
    assert len(seen["temb"]) == 3 and len(seen["mod"]) == 3


@pytest.mark.parametrize("zero_pad", [False, True])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_text_states_at_padded_positions_are_never_read(zero_pad, bad):
    """Was: NaN / inf text states at masked-out positions (uninitialised padding of a collated batch) made every
    output NaN: the varlen path attends to valid tokens only (upstream drops the padded ones), the zero-pad path's
    padded tokens are zero vectors (SPEC 6 step 3), yet 0 * NaN and a -inf score + NaN still reached the output."""
    cfg = tiny_config(text_tokens_zero_pad=zero_pad)
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=45))
    x, t, y, _ = make_inputs(cfg, B=2, T=3, L=6, shared_cond=1)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    poisoned = y.clone()
    poisoned[0, :, 4:] = bad
    ts = t[:, None].repeat(1, 3)
    ts[:, :1] = 0
    with torch.no_grad():
        cache = model.build_kv_cache(x[:1, :, :1])
        for kw, xs, tt in (({}, x, t), ({"num_cond_latents": 1}, x, ts), ({"kv_cache": cache}, x[:, :, 1:], t)):
            assert torch.equal(model(xs, tt, poisoned, mask, **kw), model(xs, tt, y, mask, **kw)), kw
