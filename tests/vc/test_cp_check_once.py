"""Context parallel: a pipeline call checks that the ranks agree once, not once per DiT forward.

``VideoContinuationPipeline.__call__`` (and ``extend``'s segments, and ``refine``) check their whole
call with one ``same_call`` and broadcast rank 0's latents and text states; their cache build and
denoising loop then run inside ``ContextParallel.checked_region()``, where ``forward`` and
``build_kv_cache`` skip their own all-gather (before: one per step, a CFG batch included, plus one
for the cache build). Direct calls of the model outside a region stay checked. Two gloo ranks on CPU
(this file run as a script, ``--worker``), which write their findings as JSON for the tests.
"""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PG_TIMEOUT_S = 20  # a rank left waiting in a collective fails fast instead of after 30 min
SIZE = (32, 48)


def _worker(rank: int, world: int, init: str, out: str, ckpt: str) -> None:
    import torch.distributed as dist

    from longcat_vc import parallel
    from longcat_vc.pipeline import VideoContinuationPipeline
    from test_dit import make_inputs
    from vc_components import error_text, finish_rank, init_gloo_rank, random_frames

    init_gloo_rank(rank, world, init, PG_TIMEOUT_S)
    res = {}
    checks = []  # the `what` of every same_call that ran its all-gather, in order
    exit_ = parallel._SameCall.__exit__

    def counted_exit(self, *exc):
        checks.append(self.what)
        return exit_(self, *exc)

    parallel._SameCall.__exit__ = counted_exit
    attempt = error_text

    kw = dict(dtype=torch.float32, device="cpu", attn_backend="torch", progress=False)
    pipe = VideoContinuationPipeline.from_pretrained(ckpt, process_group=dist.group.WORLD, **kw)
    dit, cp = pipe.dit, pipe.dit.context_parallel
    forwards = [0]
    fwd = dit.forward

    def counted_forward(*a, **k):
        forwards[0] += 1
        return fwd(*a, **k)

    dit.forward = counted_forward
    args = dict(resolution=SIZE, num_frames=9, num_cond_frames=5, num_inference_steps=2, generator=7,
                progress=False)
    video = random_frames(7, 36, 52, seed=1)

    # (a) one check per call, CFG on, cache on and off; extend's segments; refine
    def run(key, fn):
        checks.clear()
        forwards[0] = 0
        o = fn()
        res[key] = dict(checks=list(checks), forwards=forwards[0], steps=o.timings.get("steps"))

    for cache in (True, False):
        run(f"call_cache_{cache}", lambda: pipe(video, "a red car", guidance_scale=2.0, use_kv_cache=cache,
                                                output_type="latent", **args))
    run("extend", lambda: pipe.extend(video, "a red car", segments=2, guidance_scale=2.0, **args))
    run("refine", lambda: pipe.refine(random_frames(5, 36, 64), "a cat", video=random_frames(12, 40, 72, seed=1),
                                      num_cond_frames=5, resolution=(64, 64), num_inference_steps=2, generator=None,
                                      output_type="latent", progress=False))
    # what the loop skips is now in the pipeline's own check: another cond latent count raises on every rank
    res["num_cond_differs"] = attempt(lambda: pipe(random_frames(13, 36, 52), "a red car", guidance_scale=2.0,
                                                   **dict(args, num_frames=13, num_cond_frames=5 + 4 * rank)))

    # (b) a direct call is checked as before
    x, t, y, mask = make_inputs(dit.config, B=2, T=3, H=4, W=6, seed=5, shared_cond=1)
    res["direct_num_cond_differs"] = attempt(lambda: dit(x, t, y, mask, num_cond_latents=rank))
    res["direct_latents_differ"] = attempt(lambda: dit(x + rank, t, y, mask))
    res["direct_build_differs"] = attempt(lambda: dit.build_kv_cache(x[:1, :, :1] + rank))

    # (c) a pipeline that raised mid-loop leaves no region behind
    calls = [0]

    def failing_forward(*a, **k):
        calls[0] += 1
        if calls[0] == 2:  # on every rank alike: no rank is left waiting
            raise RuntimeError("boom in step 2")
        return fwd(*a, **k)

    dit.forward = failing_forward
    res["mid_loop"] = attempt(lambda: pipe(video, "a red car", guidance_scale=2.0, output_type="latent", **args))
    dit.forward = fwd
    res["region_after_raise"] = cp.in_checked_region()
    checks.clear()
    res["direct_after_raise"] = attempt(lambda: dit(x, t, y, mask, num_cond_latents=rank))
    res["checks_after_raise"] = list(checks)

    # the region: nested, per thread, restored
    seen = {}
    with cp.checked_region():
        with cp.checked_region():
            pass
        seen["after_inner"] = cp.in_checked_region()
        th = threading.Thread(target=lambda: seen.__setitem__("other_thread", cp.in_checked_region()))
        th.start()
        th.join()
    seen["after_outer"] = cp.in_checked_region()
    res["region"] = seen

    finish_rank(res, out, rank)


@pytest.fixture(scope="module")
def results(refine_ckpt, tmp_path_factory):
    from vc_components import two_rank_results

    return two_rank_results(__file__, tmp_path_factory.mktemp("cp_check_once"), [refine_ckpt], ROOT, HERE, timeout=420)


@pytest.mark.parametrize("key", ["call_cache_True", "call_cache_False"])
def test_a_pipeline_call_checks_once_not_per_forward(results, key):
    for r in results:
        got = r[key]
        # the argument phase's own checks, then the denoising call's one; none from the DiT
        assert got["checks"][-1] == "the pipeline" and got["checks"].count("the pipeline") == 1, got
        assert not {"forward", "build_kv_cache"} & set(got["checks"]), got
        assert got["forwards"] == got["steps"] >= 2, got  # the DiT did run (CFG batched in one forward)


def test_extend_checks_once_per_segment(results):
    for r in results:
        got = r["extend"]
        assert got["checks"].count("the pipeline") == 2, got  # 2 segments
        assert not {"forward", "build_kv_cache"} & set(got["checks"]), got


def test_refine_checks_once(results):
    for r in results:
        got = r["refine"]
        assert got["checks"][-1] == "refine" and got["checks"].count("refine") == 1, got
        assert not {"forward", "build_kv_cache"} & set(got["checks"]), got
        assert got["forwards"] == got["steps"] >= 2, got


def test_pipeline_ranks_with_other_cond_frames_raise_on_every_rank(results):
    for r in results:
        msg = r["num_cond_differs"]
        assert msg.startswith("ValueError: context parallel: the ranks called the pipeline with different") \
            and "cond latent frames: rank 0: 2, rank 1: 3" in msg, msg


@pytest.mark.parametrize("key, field", [("direct_num_cond_differs", "num_cond_latents: rank 0: 0, rank 1: 1"),
                                        ("direct_latents_differ", "hidden_states (checksum)"),
                                        ("direct_build_differs", "cond_latents (checksum)")])
def test_a_direct_call_stays_checked(results, key, field):
    for r in results:
        msg = r[key]
        assert msg.startswith("ValueError: context parallel: the ranks called") and field in msg, msg


def test_a_pipeline_that_raised_mid_loop_leaves_the_direct_call_checked(results):
    for r in results:
        assert r["mid_loop"] == "RuntimeError: boom in step 2", r["mid_loop"]
        assert r["region_after_raise"] is False
        msg = r["direct_after_raise"]
        assert msg.startswith("ValueError: context parallel: the ranks called forward") \
            and "num_cond_latents: rank 0: 0, rank 1: 1" in msg, msg
        assert r["checks_after_raise"] == ["forward"], r["checks_after_raise"]


def test_the_region_nests_and_stays_on_its_thread(results):
    for r in results:
        assert r["region"] == {"after_inner": True, "other_thread": False, "after_outer": False}, r["region"]


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
