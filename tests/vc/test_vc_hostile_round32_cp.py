"""Round 32 (context parallelism): hostile uses that gave silently wrong results.

A. Ranks whose models differ in their LoRA state. ``forward``, ``build_kv_cache`` and the pipeline compared
   the ranks' inputs (shapes and value checksums) but not the model: a LoRA enabled on one rank only, or
   given another multiplier there, ran to the end and returned, on every rank, one result that mixed two
   models (each rank computes its token shard's projections and FFN with its own weights), without a word.
   Now the ranks also compare ``LongCatDiT.rank_state()`` (a CRC of the dtype, block-sparse settings and
   LoRA state: metadata only) and every rank raises naming the model state. A LoRA fused on one rank and
   unfused on the other is the same model and still runs.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PG_TIMEOUT_S = 20  # a rank left waiting fails fast
SIZE = (32, 48)
FIELD = "model state (dtype, attention settings, LoRA"


def _worker(rank: int, world: int, init: str, out: str, ckpt: str, seed: str) -> None:
    import torch.distributed as dist

    from longcat_vc.pipeline import CFG_STEP_LORA_FILE, VideoContinuationPipeline
    from test_dit import make_inputs, rel_l2
    from tiny_ckpt import LORA_TARGETS_CFG_STEP, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora
    from vc_components import error_text, finish_rank, init_gloo_rank, random_frames

    seed = int(seed)
    init_gloo_rank(rank, world, init, PG_TIMEOUT_S)
    res = {}

    # A: the DiT with a LoRA, a 3x3 token grid (5 + 4 slots on the two ranks)
    cfg = tiny_config(hidden_size=128, num_heads=4)
    sd = random_state_dict(cfg, seed=seed % 1009)
    path = os.path.join(out, "a.safetensors")
    if rank == 0:
        write_longcat_lora(path, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=seed % 1013)
    dist.barrier()
    ref, m = model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)
    for model in (ref, m):
        model.load_lora(path, "a")
        model.enable_loras(["a"])
    m.enable_context_parallel()
    x, t, y, mask = make_inputs(cfg, B=2, T=3, H=6, W=6, seed=seed, shared_cond=1)
    with torch.no_grad():
        want = ref(x, t, y, mask)
        want_cache = ref(x[:, :, 1:], t, y, mask, kv_cache=ref.build_kv_cache(x[:1, :, :1]))
        res["rel_lora"] = rel_l2(m(x, t, y, mask), want)
        res["rel_lora_cache"] = rel_l2(m(x[:, :, 1:], t, y, mask, kv_cache=m.build_kv_cache(x[:1, :, :1])), want_cache)
        if rank == 1:
            m.fuse_lora()  # the same model, fused on one rank only: runs
        res["rel_fused_on_one_rank"] = rel_l2(m(x, t, y, mask), want)
        m.unfuse_lora()
        if rank == 1:
            m.get_submodule("blocks.0.attn.qkv").lora_adapters["a"].multiplier = 0.5
        res["multiplier_differs"] = error_text(lambda: m(x, t, y, mask))
        res["multiplier_differs_build"] = error_text(lambda: m.build_kv_cache(x[:1, :, :1]))
        if rank == 1:
            m.get_submodule("blocks.0.attn.qkv").lora_adapters["a"].multiplier = 1.0
            m.disable_loras()
        res["lora_on_one_rank"] = error_text(lambda: m(x, t, y, mask))
        if rank == 1:
            m.enable_loras(["a"])
        res["rel_same_again"] = rel_l2(m(x, t, y, mask), want)

    # A: the pipeline (basic mode), a LoRA the user enabled on rank 1 only
    kw = dict(dtype=torch.float32, device="cpu", attn_backend="torch", progress=False)
    args = dict(resolution=SIZE, num_frames=9, num_cond_frames=5, guidance_scale=1.0, generator=7,
                output_type="latent", progress=False, num_inference_steps=1)
    video = random_frames(7, 36, 52, seed=seed % 1019)
    cp = VideoContinuationPipeline.from_pretrained(ckpt, process_group=dist.group.WORLD, **kw)
    cp.dit.load_lora(os.path.join(ckpt, CFG_STEP_LORA_FILE), "extra")
    if rank == 1:
        cp.dit.enable_loras(["extra"])
    res["pipeline_lora_on_one_rank"] = error_text(lambda: cp(video, "a red car", **args))
    cp.dit.enable_loras(["extra"])
    lat = cp(video, "a red car", **args).latents
    sp = VideoContinuationPipeline.from_pretrained(ckpt, **kw)
    sp.dit.load_lora(os.path.join(ckpt, CFG_STEP_LORA_FILE), "extra")
    sp.dit.enable_loras(["extra"])
    ref_lat = sp(video, "a red car", **args).latents
    res["rel_pipeline_lora"] = float((lat - ref_lat).norm() / ref_lat.norm())
    finish_rank(res, out, rank)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("diffusers")
    from vc_components import two_rank_results, write_full_checkpoint

    tmp = tmp_path_factory.mktemp("round32_cp")
    ckpt = str(tmp / "ckpt")
    write_full_checkpoint(ckpt, seed=4)
    seed = random.randrange(2**31)
    print(f"seed {seed}")
    return two_rank_results(__file__, tmp, [ckpt, str(seed)], ROOT, HERE)


def test_lora_ranks_with_the_same_state_equal_the_single_process(results):
    """The control: with the same LoRA on both ranks (uneven 3x3 token grid, cache on and off, the LoRA
    fused on one rank only) the sharded DiT and pipeline equal the single process."""
    for r in results:
        for k in ("rel_lora", "rel_lora_cache", "rel_fused_on_one_rank", "rel_same_again", "rel_pipeline_lora"):
            assert r[k] < 1e-5, (k, r[k])


@pytest.mark.parametrize("key", ["multiplier_differs", "multiplier_differs_build", "lora_on_one_rank"])
def test_dit_ranks_with_another_lora_state_raise_on_every_rank(results, key):
    """A LoRA multiplier changed, or a LoRA disabled, on one rank only: the forward (and the cache build)
    mixed the two models' outputs silently; now every rank raises naming the model state."""
    for r in results:
        msg = r[key]
        assert msg.startswith("ValueError: context parallel: the ranks called") and FIELD in msg, msg


def test_pipeline_ranks_with_another_lora_state_raise_on_every_rank(results):
    """A LoRA enabled on one rank's pipeline only: the continuation denoised with a mix of the two models
    silently; now every rank raises naming the model state."""
    for r in results:
        msg = r["pipeline_lora_on_one_rank"]
        assert msg.startswith("ValueError: context parallel: the ranks called the pipeline with different") \
            and FIELD in msg, msg


def test_rank_state_is_stable_metadata():
    """``rank_state`` is the same for two processes' equal models (no per-process ``hash``) and moves with
    a LoRA multiplier, not with a fuse."""
    import subprocess

    code = ("import torch,sys;sys.path[:0]=[%r,%r];from tiny_ckpt import *;cfg=tiny_config();"
            "m=model_from_state_dict(cfg,random_state_dict(cfg,seed=1));print(m.rank_state())") % (ROOT, HERE)
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout for s in (1, 2)}
    assert len(outs) == 1, outs


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7])
