"""Round 58: long-running processes (a server generating videos for hours, a training loop). Every cache
filled per call stays bounded, and what the caller drops (inputs, outputs, KV caches, models, pipelines)
is freed: a weak reference dies after ``del`` + ``gc.collect()``. Tiny shapes, CPU."""
from __future__ import annotations

import copy
import gc
import io
import warnings
import weakref

import numpy as np
import pytest
import torch
from helpers import folder_module

import longcat_kernels as lk
from longcat_kernels import dispatch
from longcat_kernels import grid as grid_mod
from longcat_kernels.ops.block_sparse_attn import selection as selection_mod




def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _tiny_dit(seed=None):
    tc = folder_module("vc", "tiny_ckpt")
    cfg = tc.tiny_config()
    return cfg, tc.model_from_state_dict(cfg, tc.random_state_dict(cfg, seed=_seed() if seed is None else seed))


def _dit_inputs(cfg, T, H, W, g):
    x = torch.randn(2, cfg.in_channels, T, H, W, generator=g)
    x[1:, :, :1] = x[:1, :, :1]
    t = torch.rand(2, generator=g) * 1000
    y = torch.randn(2, 1, 5, cfg.caption_channels, generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)
    return x, t, y, mask


def _all_dead(refs) -> bool:
    gc.collect()
    return all(r() is None for r in refs)


# ---------------------------------------------------------------------- bugs fixed in this round
def test_dit_device_move_drops_rope_tables_of_the_old_device():
    """``dit.to(other device)`` kept the per-grid Rope3D tables of the old device alive in ``dit._ropes``
    (up to 17 grids: GPU memory a server offloading its DiT to the CPU never got back)."""
    cfg, dit = _tiny_dit()
    g = torch.Generator().manual_seed(_seed())
    refs = []
    with torch.no_grad():
        for T, H, W in ((2, 4, 6), (3, 4, 4), (2, 6, 4)):
            dit(*_dit_inputs(cfg, T, H, W, g))
    for rope in dit._ropes.values():
        refs += [weakref.ref(rope), weakref.ref(rope.cos_t)]
        refs += [weakref.ref(c) for c, _ in rope._tables.values()]
    del rope
    assert refs and not _all_dead(refs)
    dit.to("meta")
    assert _all_dead(refs)


def test_dit_device_move_and_back_gives_the_same_output():
    cfg, dit = _tiny_dit()
    g = torch.Generator().manual_seed(_seed())
    inp = _dit_inputs(cfg, 3, 4, 6, g)
    with torch.no_grad():
        a = dit(*inp, num_cond_latents=1)
        dit.to("cpu")
        dit.to(torch.float64).to(torch.float32)  # same values (fp32 -> fp64 -> fp32 is exact)
        b = dit(*inp, num_cond_latents=1)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)


def test_dit_copy_and_save_leave_the_rope_tables_behind():
    """A deep copy duplicated the cached tables of every grid seen, ``torch.save(dit)`` wrote them to the file."""
    cfg, dit = _tiny_dit()
    fresh = copy.deepcopy(dit)
    buf0 = io.BytesIO()
    torch.save(fresh, buf0)
    g = torch.Generator().manual_seed(_seed())
    inp = _dit_inputs(cfg, 2, 16, 16, g)  # 128 tokens per frame: tables far larger than the slack below
    with torch.no_grad():
        for T in (2, 3, 4):
            out = dit(*_dit_inputs(cfg, T, 16, 16, g), num_cond_latents=1)
        out = dit(*inp)
    assert dit._ropes
    twin = copy.deepcopy(dit)
    assert twin._ropes == {}
    buf1 = io.BytesIO()
    torch.save(dit, buf1)
    assert len(buf1.getvalue()) - len(buf0.getvalue()) < 8192
    with torch.no_grad():
        again = twin(*inp)
        buf1.seek(0)
        loaded = torch.load(buf1, weights_only=False)
        from_file = loaded(*inp)
    assert torch.isfinite(out).all()
    assert torch.equal(again, out) and torch.equal(from_file, out)
    assert dit._ropes  # the original keeps its own


def test_empty_selection_warning_registry_is_bounded():
    """One key per (grid, chunk, sparsity) that keeps no key block was kept for the life of the process."""
    selection_mod._WARNED_EMPTY.clear()
    D = 8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(300):
            H, W = 1 + i % 3, 1 + (i // 3) % 4
            q = torch.randn(1, 2 * H * W, 1, D)
            sel = lk.select_blocks(q, torch.randn_like(q), grid_q=(2, H, W), chunk_q=(1, 1, 1),
                                   sparsity=0.99 - 1e-5 * i, backend="torch")
            assert int(sel.counts.max()) == 0  # upstream's rule keeps int((1 - s) * Nk) = 0 blocks
            assert len(selection_mod._WARNED_EMPTY) <= 256
    # still warns once for a setting not seen (or forgotten), not again right after
    q = torch.randn(1, 4, 1, D)
    with pytest.warns(RuntimeWarning, match="keeps int"):
        lk.select_blocks(q, q, grid_q=(1, 2, 2), chunk_q=(1, 1, 1), sparsity=0.875, backend="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.select_blocks(q, q, grid_q=(1, 2, 2), chunk_q=(1, 1, 1), sparsity=0.875, backend="torch")


# ---------------------------------------------------------------------- verified behaviour, pinned
def test_kernel_ops_free_their_inputs_and_keep_global_caches_bounded():
    refs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(120):
            T, H, W, D = 1 + i % 3, 2 + i % 5, 2 + (i // 5) % 6, 8
            S = T * H * W
            grad = i % 2 == 0
            q, k, v = (torch.randn(1, S, 2, D, requires_grad=grad) for _ in range(3))
            o = lk.block_sparse_attn(q, k, v, grid_q=(T, H, W), chunk_q=(1, 2, 2), sparsity=0.5, backend="torch")
            assert torch.isfinite(o).all()
            if grad:
                o.sum().backward()
                assert torch.isfinite(q.grad).all()
            rope = lk.Rope3D((T + 1, H, W), D)
            qr = lk.apply_rope_3d(q.detach(), rope, frame_offset=1)
            w = torch.ones(D)
            qn, kn = lk.qk_norm_rope(q.detach(), k.detach(), w, w, rope, frame_offset=i % 2)
            kc, vc = torch.randn(1, H * W, 2, D), torch.randn(1, H * W, 2, D)
            o2 = lk.attn_with_kv_cache(q.detach(), k.detach(), v.detach(), kc, vc, backend="torch")
            sel = lk.select_blocks(q.detach(), k.detach(), grid_q=(T, H, W), chunk_q=(1, 2, 2), sparsity=0.5,
                                   backend="torch")
            o3 = lk.block_sparse_attn(q.detach(), k.detach(), v.detach(), grid_q=(T, H, W), chunk_q=(1, 2, 2),
                                      selection=sel, backend="torch")
            assert torch.isfinite(o2).all() and torch.isfinite(o3).all() and torch.isfinite(qn).all()
            refs += [weakref.ref(t) for t in (q, k, v, o, qr, qn, kn, kc, vc, o2, o3, sel.indices, rope.cos_t)]
            refs += [weakref.ref(rope), weakref.ref(sel)]
            del q, k, v, o, qr, qn, kn, kc, vc, o2, o3, rope, sel
    assert _all_dead(refs)
    assert len(grid_mod._DEVICE_CACHE) <= 65
    assert len(dispatch._MACHINE) <= 8 and len(dispatch._LAST) <= 16 and not dispatch._RECORDERS
    assert grid_mod.cache_split_aligned.cache_info().currsize <= 64


def test_rope_table_cache_is_bounded_per_rope():
    rope = lk.Rope3D((64, 1, 2), 8)
    for off in range(60):
        cos, sin = rope.tables(off, 3)
        assert cos.shape == (6, 8) and torch.isfinite(cos).all() and torch.isfinite(sin).all()
        assert len(rope._tables) <= 17


def test_dit_rope_cache_bounded_and_kv_caches_and_model_freed():
    from longcat_vc import kv_cache as kv_mod

    cfg, dit = _tiny_dit()
    g = torch.Generator().manual_seed(_seed())
    refs = []
    with torch.no_grad():
        for i in range(24):
            T, H, W = 2 + i % 2, 2 * (1 + i % 4), 2 * (1 + (i // 4) % 3)
            x, t, y, mask = _dit_inputs(cfg, T, H, W, g)
            cache = dit.build_kv_cache(x[:1, :, :1])
            out = dit(x[:, :, 1:], t, y, mask, kv_cache=cache)
            assert torch.isfinite(out).all()
            refs += [weakref.ref(x), weakref.ref(out), weakref.ref(cache), weakref.ref(cache.keys[0])]
            assert len(dit._ropes) <= 17
            del x, out, cache
    assert _all_dead(refs)
    n_params = sum(1 for _ in dit.parameters())
    before = len(kv_mod._TENSOR_STAMPS)
    assert before >= n_params  # the cache builds stamped every parameter
    model_refs = [weakref.ref(dit)] + [weakref.ref(p) for p in dit.parameters()]
    del dit
    assert _all_dead(model_refs)
    assert len(kv_mod._TENSOR_STAMPS) <= before - n_params
    assert all(r() is not None for r, _ in kv_mod._TENSOR_STAMPS.values())  # only live tensors keep stamps


def test_record_choices_leaves_no_recorder_behind():
    q = torch.randn(1, 4, 1, 8)
    for i in range(100):
        try:
            with dispatch.record_choices() as outer:
                with dispatch.record_choices() as inner:
                    lk.attn_with_kv_cache(q, q, q, backend="torch")
                    if i % 3 == 0:
                        raise KeyError("boom")
        except KeyError:
            pass
        assert len(inner) == 1 and len(outer) == 1
    assert dispatch._RECORDERS == []


def test_pipeline_and_its_dit_are_freed_after_calls(tmp_path):
    from longcat_vc.kv_cache import KVCache
    from longcat_vc.pipeline import VideoContinuationPipeline

    vc = folder_module("vc", "vc_components")
    vc.write_full_checkpoint(str(tmp_path))
    pipe = VideoContinuationPipeline.from_pretrained(str(tmp_path), dtype=torch.float32, device="cpu",
                                                     attn_backend="torch")
    rng = np.random.default_rng(_seed())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, (h, w) in enumerate(((32, 48), (48, 32))):
            out = pipe(rng.integers(0, 256, (9, h, w, 3), dtype=np.uint8), f"a cat {i}", resolution=(h, w),
                       num_frames=13, num_cond_frames=5, num_inference_steps=2, guidance_scale=1.0 + 3 * i,
                       generator=torch.Generator().manual_seed(i), output_type="latent", progress=False)
            assert torch.isfinite(out.latents).all()
            del out
    gc.collect()
    assert not any(type(o) is KVCache for o in gc.get_objects())
    refs = [weakref.ref(pipe), weakref.ref(pipe.dit)]
    del pipe
    assert _all_dead(refs)


def test_diffusers_processor_apply_remove_cycles_leave_nothing():
    pytest.importorskip("diffusers")
    from diffusers import WanTransformer3DModel

    from longcat_kernels.integrations.diffusers import (
        _ATTR, apply_block_sparse_attention, remove_block_sparse_attention,
    )

    torch.manual_seed(_seed())
    m = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                              out_channels=4, text_dim=24, freq_dim=16, ffn_dim=48, num_layers=2,
                              rope_max_seq_len=32).eval()
    params = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2), chunk_k=(1, 2, 2))
    hooks = (len(m._forward_pre_hooks), len(m._forward_hooks), len(m.rope._forward_hooks))
    for _ in range(20):
        apply_block_sparse_attention(m, params, backend="torch")
        remove_block_sparse_attention(m)
    assert (len(m._forward_pre_hooks), len(m._forward_hooks), len(m.rope._forward_hooks)) == hooks
    apply_block_sparse_attention(m, params, backend="torch")
    state = getattr(m, _ATTR).state
    refs = []
    for i in range(12):
        F, H, W = 1 + i % 3, 4 + 2 * (i % 2), 4 + 2 * ((i // 2) % 2)
        x = torch.randn(1, 4, F, H, W)
        with torch.no_grad():
            out = m(hidden_states=x, timestep=torch.tensor([300]), encoder_hidden_states=torch.randn(1, 7, 24),
                    return_dict=False)[0]
        assert torch.isfinite(out).all()
        refs += [weakref.ref(x), weakref.ref(out)]
        del x, out
    assert _all_dead(refs)
    assert len(state._grids) == 0
    model_refs = [weakref.ref(m), weakref.ref(state)]
    del m, state  # not removed first: the hooks and processors hold the model in collectable cycles only
    assert _all_dead(model_refs)
