"""Round 52 (context parallelism): three ranks (token grids not divisible by the world size, ranks
holding no token at all), block-sparse attention, a cache built once and reused across steps, ranks
given different inputs, and a process group of another size than the one asked for."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PG_TIMEOUT_S = 20
WORLD = 3
TOL = 1e-5


def _inputs(cfg, seed, B, T, H, W, c):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    x[1:, :, :c] = x[:1, :, :c]
    t = torch.rand(B, generator=g) * 1000
    ts = t[:, None].repeat(1, T)
    ts[:, :c] = 0
    y = torch.randn(B, 1, 5, cfg.caption_channels, generator=g)
    mask = torch.ones(B, 5, dtype=torch.long)
    mask[0, 3:] = 0
    return x, t, ts, y, mask


def _worker(rank: int, world: int, init: str, out: str, seed: str) -> None:
    from test_dit import rel_l2
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config
    from vc_components import error_text, finish_rank, init_gloo_rank

    seed = int(seed)
    init_gloo_rank(rank, world, init, PG_TIMEOUT_S)
    res = {}

    def models(cfg, s):
        sd = random_state_dict(cfg, seed=s)
        return model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)

    cfg = tiny_config(hidden_size=96, num_heads=3)
    ref, cp = models(cfg, seed % 997)
    handler = cp.enable_context_parallel()
    res["sp"] = [handler.sp_size, handler.sp_rank]
    with torch.no_grad():
        # (H, W) latents -> token grids 2x2 (2+2+0 slots), 1x1 (1+0+0), 3x5 (5+5+5), 3x2 (2+2+2)
        for name, (H, W) in {"2x2": (4, 4), "1x1": (2, 2), "3x5": (6, 10), "3x2": (6, 4)}.items():
            x, t, ts, y, mask = _inputs(cfg, seed + len(name) + H * W, 2, 3, H, W, 1)
            res[f"rel_full_{name}"] = rel_l2(cp(x, t, y, mask), ref(x, t, y, mask))
            off_ref = ref(x, ts, y, mask, num_cond_latents=1)
            res[f"rel_prefix_{name}"] = rel_l2(cp(x, ts, y, mask, num_cond_latents=1), off_ref)
            cache_cp, cache_ref = cp.build_kv_cache(x[:1, :, :1]), ref.build_kv_cache(x[:1, :, :1])
            res[f"rel_cache_{name}"] = rel_l2(cp(x[:, :, 1:], t, y, mask, kv_cache=cache_cp),
                                             ref(x[:, :, 1:], t, y, mask, kv_cache=cache_ref))
            res[f"rel_cache_vs_prefix_{name}"] = rel_l2(cp(x[:, :, 1:], t, y, mask, kv_cache=cache_cp),
                                                       off_ref[:, :, 1:])
        # a cache built once, reused across steps (other timesteps, other noisy latents, batch 1 and 2)
        x, t, ts, y, mask = _inputs(cfg, seed + 7, 2, 3, 4, 6, 1)
        cache_cp, cache_ref = cp.build_kv_cache(x[:1, :, :1]), ref.build_kv_cache(x[:1, :, :1])
        worst = 0.0
        for step in range(3):
            xs = x[:, :, 1:] + 0.1 * step
            ty = t * (1 - step / 3)
            worst = max(worst, rel_l2(cp(xs, ty, y, mask, kv_cache=cache_cp), ref(xs, ty, y, mask, kv_cache=cache_ref)))
            worst = max(worst, rel_l2(cp(xs[:1], ty[:1], y[:1], mask[:1], kv_cache=cache_cp),
                                      ref(xs[:1], ty[:1], y[:1], mask[:1], kv_cache=cache_ref)))
        res["rel_cache_reused"] = worst
        res["cache_keys_unchanged"] = all(torch.equal(a, b) for a, b in zip(cache_cp.keys,
                                                                            cp.build_kv_cache(x[:1, :, :1]).keys))
        # ranks given different inputs: every rank raises (never a silent mix)
        bad = x.clone()
        if rank == 2:
            bad[0, 0, 2, 0, 0] += 1e-3
        res["differs_hidden"] = error_text(lambda: cp(bad, ts, y, mask, num_cond_latents=1))
        tb = ts.clone()
        if rank == 1:
            tb = tb.flip(0)
        res["differs_timestep"] = error_text(lambda: cp(x, tb, y, mask, num_cond_latents=1))
        mb = mask.clone()
        if rank == 0:
            mb[1, -1] = 0
        res["differs_mask"] = error_text(lambda: cp(x, ts, y, mb, num_cond_latents=1))
        cb = x[:1, :, :1].clone()
        if rank == 2:
            cb = cb.flip(-1)
        res["differs_build"] = error_text(lambda: cp.build_kv_cache(cb))
        other = cp.build_kv_cache(x[:1, :, :1] * 2)  # built by every rank, from other cond latents
        res["differs_sharded_cache"] = error_text(
            lambda: cp(x[:, :, 1:], t, y, mask, kv_cache=cache_cp if rank else other))
        res["differs_full_cache"] = error_text(
            lambda: cp(x[:, :, 1:], t, y, mask, kv_cache=cache_ref if rank else ref.build_kv_cache(x[:1, :, :1] * 2)))
        # and the group still works afterwards
        res["rel_after_errors"] = rel_l2(cp(x, t, y, mask), ref(x, t, y, mask))
        res["cfg_parallel_odd"] = error_text(lambda: cp.enable_context_parallel(cfg_parallel=True))

    # a LoRA on every rank (3x3 tokens: 3+3+3 slots; 2x2: 2+2+0), the cache built once, used twice
    import torch.distributed as dist

    from tiny_ckpt import LORA_TARGETS_CFG_STEP, write_longcat_lora

    path = os.path.join(out, "lora.safetensors")
    if rank == 0:
        write_longcat_lora(path, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=seed % 1013)
    dist.barrier()
    ref, cp = models(cfg, seed % 983)
    for m in (ref, cp):
        m.load_lora(path, "a")
        m.enable_loras(["a"])
    cp.enable_context_parallel()
    with torch.no_grad():
        for H, W in ((6, 6), (4, 4)):
            x, t, ts, y, mask = _inputs(cfg, seed + 11 + H, 2, 3, H, W, 1)
            res[f"rel_lora_prefix_{H}"] = rel_l2(cp(x, ts, y, mask, num_cond_latents=1),
                                                 ref(x, ts, y, mask, num_cond_latents=1))
            cache_cp, cache_ref = cp.build_kv_cache(x[:1, :, :1]), ref.build_kv_cache(x[:1, :, :1])
            for step in range(2):
                res[f"rel_lora_cache_{H}_{step}"] = rel_l2(cp(x[:, :, 1:], t / (step + 1), y, mask, kv_cache=cache_cp),
                                                           ref(x[:, :, 1:], t / (step + 1), y, mask, kv_cache=cache_ref))
        res["lora_control"] = rel_l2(ref(x, ts, y, mask, num_cond_latents=1),
                                     models(cfg, seed % 983)[0](x, ts, y, mask, num_cond_latents=1))

    cfg_b = tiny_config(hidden_size=96, num_heads=3, enable_bsa=True,
                        bsa_params={"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]})
    ref, cp = models(cfg_b, seed % 991)
    cp.enable_context_parallel()
    with torch.no_grad():
        x, t, ts, y, mask = _inputs(cfg_b, seed + 2, 2, 6, 8, 8, 2)  # 4x4 tokens: 6+6+4 slots
        off_ref = ref(x, ts, y, mask, num_cond_latents=2)
        res["rel_bsa_prefix"] = rel_l2(cp(x, ts, y, mask, num_cond_latents=2), off_ref)
        cache_cp, cache_ref = cp.build_kv_cache(x[:1, :, :2]), ref.build_kv_cache(x[:1, :, :2])
        for step in range(2):
            res[f"rel_bsa_cache_{step}"] = rel_l2(cp(x[:, :, 2:], t / (step + 1), y, mask, kv_cache=cache_cp),
                                                  ref(x[:, :, 2:], t / (step + 1), y, mask, kv_cache=cache_ref))

    # a process group of another size than asked for
    from longcat_vc.parallel import init_distributed

    os.environ["WORLD_SIZE"] = str(world)
    res["init_other_size"] = error_text(lambda: init_distributed(2, "cpu"))
    os.environ["WORLD_SIZE"] = "2"  # stale: the group that runs has 3 ranks
    res["init_other_size_stale_env"] = error_text(lambda: init_distributed(2, "cpu"))
    os.environ.pop("WORLD_SIZE")
    res["init_same_size_no_env"] = error_text(lambda: init_distributed(world, "cpu").world_size)
    finish_rank(res, out, rank)


def _launch(tmp, timeout: float = 150) -> list:
    from vc_components import two_rank_results

    return two_rank_results(os.path.abspath(__file__), tmp, [str(random.randrange(2**31))], ROOT, HERE, timeout=timeout,
                            world=WORLD)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _launch(tmp_path_factory.mktemp("round52_cp"))


def test_three_ranks_equal_the_single_process(results):
    """World 3 (heads 3): token grids of 4, 1, 15 and 6 tokens per frame (a rank with no token, two ranks
    with none, even splits), cache off and on, a cache reused across steps, block-sparse attention."""
    bad = []
    for r, res in enumerate(results):
        assert res["sp"] == [3, r]
        for k, v in res.items():
            if k.startswith("rel_") and not (isinstance(v, float) and v < TOL):  # NaN fails
                bad.append(f"rank {r}: {k} = {v}")
        assert res["cache_keys_unchanged"]
        assert res["lora_control"] > 1e-3  # the LoRA changes the output
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("key", ["differs_hidden", "differs_timestep", "differs_mask", "differs_build",
                                 "differs_full_cache", "differs_sharded_cache"])
def test_ranks_with_different_inputs_raise_on_every_rank(results, key):
    """Three ranks, one of them given other latents, timesteps, text mask, cond latents or KV cache: every
    rank raises. A sharded cache (each rank holds other heads, so its values were never compared) built
    from other cond latents on rank 0 only ran to the end and mixed the two conditionings silently."""
    for res in results:
        msg = res[key]
        assert msg.startswith("ValueError: context parallel: the ranks called"), msg
        if key.endswith("_cache"):
            assert "kv_cache keys and values" in msg, msg


def test_cfg_parallel_odd_world_is_refused(results):
    for res in results:
        assert res["cfg_parallel_odd"].startswith("ValueError: context parallel: cfg_parallel needs an even"), \
            res["cfg_parallel_odd"]


def test_init_distributed_checks_the_group_it_finds(results):
    """An initialised group of 3 and ``init_distributed(2)``: refused naming both sizes, also when a stale
    WORLD_SIZE=2 says otherwise (it returned the group of 3, silently); ``init_distributed(3)`` with the group
    initialised without torchrun's WORLD_SIZE returns it (it refused, saying WORLD_SIZE=1)."""
    for res in results:
        for key in ("init_other_size", "init_other_size_stale_env"):
            msg = res[key]
            assert msg.startswith("ValueError: --context-parallel 2 needs 2 processes") and "has 3 ranks" in msg, msg
        assert res["init_same_size_no_env"] == "no error", res["init_same_size_no_env"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
