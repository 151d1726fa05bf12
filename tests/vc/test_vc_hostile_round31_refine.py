"""Round 31: the refinement's public helpers (SPEC 11) against computations written from SPEC 11's text, and
the run path's pixels / sliding-window bookkeeping pinned against independent constructions."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longcat_vc.refine import BUCKETS_720P_F64, refine_bucket, refine_padding, refine_timesteps


def _ref_schedule(shift, steps, t_thresh):
    """SPEC 7's plain schedule (sigmas linspace(1, 0.001, steps), shifted, x1000) in fp64, then SPEC 11's
    ``[t_thresh*1000] + [t < t_thresh*1000]`` and sigmas ``t / 1000`` plus a final 0."""
    s = np.linspace(1.0, 0.001, steps)
    ts = shift * s / (1 + (shift - 1) * s) * 1000
    th = t_thresh * 1000
    ts = np.concatenate([[th], ts[ts < th]])
    return ts, np.concatenate([ts / 1000, [0.0]])


@pytest.mark.parametrize("t_thresh", [0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("shift,steps", [(12.0, 50), (3.0, 37)])
def test_refine_timesteps_match_spec_text(t_thresh, shift, steps):
    """Pins the t_thresh schedule (first timestep t_thresh*1000, then only the base schedule's smaller ones;
    sigmas t/1000 and a final 0) against an fp64 construction from SPEC 7/11's text."""
    ts, sig = refine_timesteps(shift, steps, t_thresh)
    rts, rsig = _ref_schedule(shift, steps, t_thresh)
    assert ts.shape == (len(rts),) and sig.shape == (len(rts) + 1,)
    np.testing.assert_allclose(ts.double().numpy(), rts, atol=1e-3)
    np.testing.assert_allclose(sig.double().numpy(), rsig, atol=1e-6)
    assert torch.all(ts[1:] < ts[:-1])  # no duplicate of the threshold


@pytest.mark.parametrize("t_thresh,err", [(1.5, ValueError), (-0.2, ValueError), (0, ValueError), (0.0, ValueError),
                                          (float("nan"), TypeError), (float("inf"), TypeError), (True, TypeError),
                                          ("0.5", TypeError)])
def test_refine_timesteps_refuses_t_thresh_outside_unit_interval(t_thresh, err):
    """refine_timesteps (public, in __all__) took any t_thresh: 1.5 gave a first sigma of 1.5 (above pure
    noise) followed by the whole base schedule, -0.2 a negative timestep, NaN a NaN schedule, 0 a single
    no-op step at t=0, True the t=1000 schedule. It now refuses them as refine() does (check_t_thresh)."""
    with pytest.raises(err, match="t_thresh"):
        refine_timesteps(12.0, 50, t_thresh)


def _ref_padding(n, nc):
    """SPEC 11's padding: cond latents ceil4(1 + ceil((nc-1)/4)), front-padded frames to fill them; noise
    latents ceil4(ceil(n_noise/4)) back-padded; without cond frames enough noise latents that the VAE's
    1 + 4(k-1) decoded frames cover every frame (refine_padding's documented exception)."""
    c = added = 0
    if nc > 0:
        c = 4 * -(-(1 + -(-(nc - 1) // 4)) // 4)
        added = 1 + (c - 1) * 4 - nc
    nn = n - nc
    nl = 4 * -(-(-(-nn // 4)) // 4)
    while nc == 0 and 1 + (nl - 1) * 4 < nn:
        nl += 4
    return {"cond_latents": c, "cond_added": added, "noise_latents": nl, "noise_added": nl * 4 - nn}


def test_refine_padding_every_boundary():
    """Pins the padding for every (frames, cond frames) up to 2 x 93 + 8: multiples of 4 latents, the frames
    the VAE sees (1 + 4(c - 1) cond, 4 per noise latent) and the decoded frames covering the refine frames."""
    for n in range(1, 195):
        for nc in range(0, n):
            p = refine_padding(n, nc)
            assert p == _ref_padding(n, nc), (n, nc)
            assert p["cond_latents"] % 4 == 0 and p["noise_latents"] % 4 == 0
            total = p["cond_added"] + n + p["noise_added"]
            lat = p["cond_latents"] + p["noise_latents"]
            assert total == (1 + 4 * (lat - 1) if nc > 0 else 4 * lat)
            assert 1 + 4 * (lat - 1) - p["cond_added"] >= n  # decoded frames after the front padding


@pytest.mark.parametrize("args", [(5, 7), (5, 5), (10, -3), (0, 0), (-4, 0), (6, 2.5), (6.0, 2), (True, 0),
                                  (6, 2, 0)])
def test_refine_padding_refuses_bad_counts(args):
    """refine_padding (public) returned nonsense for counts refine() never allows: num_cond_frames >= num_frames
    gave 0 noise latents (nothing refined) with negative noise frames, a negative num_cond_frames was ignored
    (noise frames counted past num_frames), 0 frames gave 4 noise latents of padding only, a float count gave
    fractional frame counts, and temporal=0 a ZeroDivisionError. Now TypeError / ValueError naming the count."""
    with pytest.raises((TypeError, ValueError), match="num_frames|num_cond_frames|temporal"):
        refine_padding(*args)


@pytest.mark.parametrize("hw", [(10, 0), (0, 10), (-480, 832), (480, -832)])
def test_refine_bucket_refuses_non_positive_sizes(hw):
    """refine_bucket (public) raised a bare ZeroDivisionError for width 0 and mapped a zero or negative
    height to the widest bucket (448 x 2048) without a word. Now ValueError naming the size."""
    with pytest.raises(ValueError, match="height|width"):
        refine_bucket(*hw)


def test_refine_bucket_fixed_points_and_ratio():
    """Every 720p bucket maps to itself (the long-video windows after the first pair a bucket-size video with
    frames of the same bucket), and a random size maps to the nearest ratio key (fp64, first on ties)."""
    for hw in BUCKETS_720P_F64.values():
        assert refine_bucket(*hw) == hw
    rng = np.random.default_rng()
    for _ in range(50):
        h, w = (int(v) for v in rng.integers(16, 4000, 2))
        keys = list(BUCKETS_720P_F64)
        d = [abs(float(k) - h / w) for k in keys]
        assert refine_bucket(h, w) == BUCKETS_720P_F64[keys[int(np.argmin(d))]]


# ---------------------------------------------------------------- run path, tiny checkpoint

SIZE = (64, 64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vc_components import write_refine_checkpoint

    root = str(tmp_path_factory.mktemp("ckpt_refine31"))
    write_refine_checkpoint(root)
    return root


@pytest.fixture(scope="module")
def pipe(ckpt):
    from longcat_vc.pipeline import VideoContinuationPipeline

    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                     mode="distill")


def _ref_pixels(s1, n_ref, size, nc):
    """fp64: per-frame bilinear (align_corners) to ``size``, /255, linear in time over ``n_ref`` frames with
    align_corners (frame j at position j (F-1)/(n_ref-1)), x2-1, SPEC 11's front/back padding."""
    x = F.interpolate(torch.from_numpy(s1).permute(0, 3, 1, 2).double(), size=size, mode="bilinear",
                      align_corners=True) / 255.0
    fn = x.shape[0]
    out = []
    for j in range(n_ref):
        pos = 0.0 if n_ref == 1 else j * (fn - 1) / (n_ref - 1)
        i0 = int(math.floor(pos))
        i1, w = min(i0 + 1, fn - 1), pos - i0
        out.append((1 - w) * x[i0] + w * x[i1])
    ref = torch.stack(out, 1)[None] * 2 - 1
    p = _ref_padding(n_ref, nc)
    return torch.cat([ref[:, :, :1].repeat(1, 1, p["cond_added"], 1, 1), ref,
                      ref[:, :, -1:].repeat(1, 1, p["noise_added"], 1, 1)], 2)


@pytest.mark.parametrize("fn,nc,spatial", [(5, 3, False), (6, 5, False), (7, 0, False), (8, 0, True), (9, 4, True)])
def test_refine_pixels_and_cond_padding_match_spec(pipe, monkeypatch, fn, nc, spatial):
    """Pins what the VAE encodes: the stage-1 frames resized, x2 in time with align_corners (x1 spatial-only),
    front-padded with the first frame and back-padded with the last; the cond clip front-padded to
    1 + 4(c-1) frames with copies of video[-nc]."""
    rng = np.random.default_rng()
    s1 = rng.integers(0, 256, (fn, 36, 64, 3), dtype=np.uint8)
    vid = rng.integers(0, 256, (12, 40, 72, 3), dtype=np.uint8)
    seen = []
    real = pipe.vae.encode

    def spy(x, *a, **k):
        seen.append(x.detach().clone())
        return real(x, *a, **k)

    monkeypatch.setattr(pipe.vae, "encode", spy)
    pipe.refine(s1, video=vid if nc else None, num_cond_frames=nc if nc else None, resolution=SIZE,
                spatial_refine_only=spatial, num_inference_steps=2, generator=1, progress=False, output_type="latent")
    ref = _ref_pixels(s1, fn if spatial else 2 * fn, SIZE, nc)
    assert seen[0].shape == ref.shape
    assert (seen[0].double() - ref).abs().max().item() < 1e-4
    if nc:
        p = _ref_padding(2 * fn if not spatial else fn, nc)
        cond = seen[1]
        assert cond.shape[2] == 1 + 4 * (p["cond_latents"] - 1) == p["cond_added"] + nc
        assert torch.equal(cond[:, :, :p["cond_added"]], cond[:, :, p["cond_added"]:p["cond_added"] + 1]
                           .expand(-1, -1, p["cond_added"], -1, -1))


@pytest.mark.parametrize("spatial", [False, True])
def test_extend_refine_windows_bookkeeping(pipe, monkeypatch, spatial):
    """Pins the long-video refinement against SPEC 11's text: window k is stage-1 frames [k(N-nc), k(N-nc)+N)
    (first clip with its cond frames, then each segment's new ones), windows after the first conditioned on
    the previous window's refined frames with 2nc (nc spatial-only) cond frames, and the output the input
    followed by window 0's and each later window's new refined frames minus the refined input cond frames:
    no duplicate, no gap, n (N - nc) x2 (x1) new frames."""
    import longcat_vc.refine as rm
    from PIL import Image

    from longcat_vc.stages import _resize_frames

    calls, segs = [], []
    real_refine, real_seg = rm.run_refine, pipe._segment

    def spy_refine(p, stage1, prompt="", **kw):
        out = real_refine(p, stage1, prompt, **kw)
        calls.append((stage1.copy(), None if kw["video"] is None else kw["video"].copy(), kw["num_cond_frames"],
                      prompt, out.model_frames.copy()))
        return out

    def spy_seg(*a, **k):
        r = real_seg(*a, **k)
        segs.append(r[2].copy())
        return r

    monkeypatch.setattr(rm, "run_refine", spy_refine)
    monkeypatch.setattr(pipe, "_segment", spy_seg)
    vid = np.random.default_rng().integers(0, 256, (11, 40, 72, 3), dtype=np.uint8)
    n, N, nc = 3, 9, 5
    out = pipe.extend(vid, "a cat", segments=n, num_frames=N, num_cond_frames=nc, resolution=(32, 64),
                      num_inference_steps=1, generator=4, progress=False, refine=True, refine_resolution=SIZE,
                      spatial_refine_only=spatial, refine_steps=2)
    rnc = nc if spatial else 2 * nc
    all_gen = np.concatenate([segs[0]] + [s[nc:] for s in segs[1:]])
    assert len(calls) == n
    for k, (s1, v, knc, prompt, _) in enumerate(calls):
        assert prompt == "" and np.array_equal(s1, all_gen[k * (N - nc):k * (N - nc) + N])
        if k == 0:
            assert v is None and knc is None
        else:
            assert np.array_equal(v, calls[k - 1][4]) and knc == rnc
    new = np.concatenate([calls[0][4]] + [c[4][rnc:] for c in calls[1:]])[rnc:]
    ref = np.concatenate([vid, _resize_frames(new, vid.shape[1:3], Image.BICUBIC)])
    assert out.num_new_frames == n * (N - nc) * (1 if spatial else 2) == ref.shape[0] - vid.shape[0]
    assert out.fps == (15.0 if spatial else 30.0)
    np.testing.assert_array_equal(out.frames, ref)


def test_extend_checks_the_first_windows_refinement_too(pipe, monkeypatch):
    """extend(refine=True, segments>1) checked, before the stage-1 segments, only a window with cond frames,
    on the premise that it is the largest. With the KV cache offloaded it is not: the first window (no cond
    frames: 48 noise latents against 40 + an offloaded cache at 720p) needs more, so a budget between the two
    passed the early check, ran every stage-1 segment, and refused the refinement only then. Both windows are
    now checked up front."""
    from longcat_vc import refine as rf
    from longcat_vc.memory import MemoryModeError
    from vc_components import released_pipeline_stand_in

    stand = released_pipeline_stand_in("resident")
    real = rf.check_refine_fits
    cond = real(stand, (704, 1280), 186, 26, offload_kv_cache=True, budget_bytes=10**15)["peak"]
    first = real(stand, (704, 1280), 186, 0, offload_kv_cache=True, budget_bytes=10**15)["peak"]
    assert first > cond  # the premise "windows with cond frames are the largest" fails when offloaded
    budget = int(cond * 1.05) + 1
    assert first * 1.05 > budget
    seen = []

    def at_720p(p, size, n_refine, nc, **kw):  # the tiny pipeline's windows, priced at the released geometry
        seen.append(nc)
        return real(stand, (704, 1280), 186, 26 if nc else 0, **dict(kw, budget_bytes=budget, lora_path=None))

    monkeypatch.setattr(rf, "check_refine_fits", at_720p)
    monkeypatch.setattr(pipe, "_segment", lambda *a, **k: pytest.fail("stage 1 ran before a refusal it could know"))
    vid = np.random.default_rng().integers(0, 256, (11, 40, 72, 3), dtype=np.uint8)
    with pytest.raises(MemoryModeError, match="0 of them cond"):
        pipe.extend(vid, "a cat", segments=2, num_frames=9, num_cond_frames=5, resolution=(32, 64),
                    num_inference_steps=1, progress=False, refine=True, refine_resolution=SIZE, refine_steps=2,
                    offload_kv_cache=True)
    assert sorted(seen) == [0, 10]
