"""Hostile inputs of context parallelism and the memory modes (sixth audit, 2026-12-06), one section
per finding:
A. Context parallel, ranks that do not make the same call. An argument error on one rank only (a KV
   cache sharded for another rank, a stale cache on the rank whose weights changed) raised there, and
   the other ranks waited in the first all-to-all until the process group's timeout (30 min by default
   for gloo); ranks passing latents of other shapes aborted the process inside gloo (``terminate
   called after throwing gloo::EnforceNotMet``); ranks passing another ``num_cond_latents``, text
   length, text mask or input values ran to the end and returned one result that mixes the ranks'
   inputs, silently (each rank ran its token shard with its own inputs). Now ``forward`` and
   ``build_kv_cache`` agree on the call (one small all-gather of the shapes and value checksums)
   before the first collective, and every rank raises.
B. The context-parallel pipeline broadcast rank 0's latents and text states but not its text mask:
   ranks given different prompts (the same length after padding) denoised rank 0's text states under
   their own masks, silently (a mix of neither prompt). Ranks given another number of steps, guidance
   or frames waited forever (or aborted) in a collective; now every rank raises naming the field.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# Short: before the fix rank 0 waited here for rank 1, which had raised (the default is 30 min).
PG_TIMEOUT_S = 20
SIZE = (32, 48)


def _worker(rank: int, world: int, init: str, out: str, ckpt: str) -> None:
    import torch.distributed as dist

    from longcat_vc.pipeline import VideoContinuationPipeline
    from test_dit import make_inputs
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config
    from vc_components import finish_rank, init_gloo_rank, random_frames

    init_gloo_rank(rank, world, init, PG_TIMEOUT_S)
    res = {}

    def attempt(key, fn):
        try:
            fn()
            res[key] = "no error"
        except Exception as e:  # noqa: BLE001 - the message is the result
            res[key] = f"{type(e).__name__}: {e}"

    # A: the DiT
    cfg = tiny_config(hidden_size=128, num_heads=4)
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=3))
    m.enable_context_parallel()
    x, t, y, mask = make_inputs(cfg, B=2, T=3, H=4, W=6, seed=5, shared_cond=1)
    with torch.no_grad():
        cache = m.build_kv_cache(x[:1, :, :1])
        bad = m.build_kv_cache(x[:1, :, :1])
        if rank == 1:
            bad.sp_rank = 0  # only this rank's cache is of another layout
        attempt("one_rank_bad_cache", lambda: m(x[:, :, 1:], t, y, mask, kv_cache=bad))
        attempt("num_cond_differs", lambda: m(x, t, y, mask, num_cond_latents=rank))
        attempt("frames_differ", lambda: m(x[:, :, :3 - rank], t, y, mask))
        attempt("cond_latents_differ", lambda: m.build_kv_cache(x[:1, :, :1] + rank))
        res["same_call_still_runs"] = bool(torch.isfinite(m(x[:, :, 1:], t, y, mask, kv_cache=cache)).all())

    # B: the pipeline (2 heads: 1 per rank)
    kw = dict(dtype=torch.float32, device="cpu", attn_backend="torch", progress=False)
    args = dict(resolution=SIZE, num_frames=9, num_cond_frames=5, guidance_scale=1.0, generator=7,
                output_type="latent", progress=False)
    video = random_frames(7, 36, 52, seed=1)
    cp = VideoContinuationPipeline.from_pretrained(ckpt, process_group=dist.group.WORLD, **kw)
    prompt = "a red car" if rank == 0 else "an old blue truck drives slowly along the wet coast road at night"
    lat = cp(video, prompt, num_inference_steps=1, **args).latents
    sp = VideoContinuationPipeline.from_pretrained(ckpt, **kw)
    ref = sp(video, "a red car", num_inference_steps=1, **args).latents  # rank 0's prompt
    res["rel_rank0_prompt"] = float((lat - ref).norm() / ref.norm())
    # 1 and 2 requested steps give the same enhance_hf schedule (11 DiT steps); 20 gives more
    attempt("steps_differ", lambda: cp(video, "a red car", num_inference_steps=1 + 19 * rank, **args))
    # a video only rank 0 can read (rank 1 fails in the pipeline's argument phase, before any check of the
    # denoising call): rank 0 waited in the next collective until the process group's timeout
    missing = os.path.join(out, "only_on_rank0.mp4")
    attempt("video_unreadable_on_one_rank", lambda: cp(video if rank == 0 else missing, "a red car",
                                                       num_inference_steps=1, **args))
    ext = {k: v for k, v in args.items() if k != "output_type"}
    attempt("extend_video_unreadable_on_one_rank", lambda: cp.extend(video if rank == 0 else missing, "a red car",
                                                                      num_inference_steps=1, **ext))
    finish_rank(res, out, rank)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("diffusers")
    from vc_components import two_rank_results, write_full_checkpoint

    tmp = tmp_path_factory.mktemp("round6_cp")
    ckpt = str(tmp / "ckpt")
    write_full_checkpoint(ckpt, seed=4)
    return two_rank_results(__file__, tmp, [ckpt], ROOT, HERE)


def test_an_argument_error_on_one_rank_raises_on_every_rank(results):
    r0, r1 = (r["one_rank_bad_cache"] for r in results)
    assert r1.startswith("ValueError: kv_cache: sharded for sequence-parallel rank 0 of 2"), r1
    assert r0.startswith("RuntimeError: context parallel: rank(s) [1] of the group raised in forward"), r0


@pytest.mark.parametrize("key, field", [("num_cond_differs", "num_cond_latents: rank 0: 0, rank 1: 1"),
                                        ("frames_differ", "latent frames: rank 0: 3, rank 1: 2"),
                                        ("cond_latents_differ", "cond_latents (checksum)")])
def test_ranks_with_other_inputs_raise_on_every_rank(results, key, field):
    for r in results:
        msg = r[key]
        assert msg.startswith("ValueError: context parallel: the ranks called") and field in msg, msg
    assert all(r["same_call_still_runs"] for r in results)


def test_pipeline_ranks_with_other_prompts_denoise_rank0s_text(results):
    rel = [r["rel_rank0_prompt"] for r in results]
    assert max(rel) < 1e-5, rel


def test_pipeline_ranks_with_other_steps_raise_on_every_rank(results):
    for r in results:
        msg = r["steps_differ"]
        assert msg.startswith("ValueError: context parallel: the ranks called the pipeline with different") \
            and "denoising steps: rank 0: 11, rank 1: " in msg, msg


@pytest.mark.parametrize("key", ["video_unreadable_on_one_rank", "extend_video_unreadable_on_one_rank"])
def test_an_error_before_the_denoising_call_on_one_rank_raises_on_every_rank(results, key):
    r0, r1 = (r[key] for r in results)
    assert not r1.startswith("RuntimeError: context parallel") and r1 != "no error", r1
    assert r0.startswith("RuntimeError: context parallel: rank(s) [1] of the group raised in "), r0


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
