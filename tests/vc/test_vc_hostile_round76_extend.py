"""Round 76: long video (``extend``, SPEC 7) and its sliding-window 720p refinement (SPEC 11) under hostile use:
window arithmetic at the edges, prompt lists, seeds across segments, cache/BSA/memory-mode equality, an interrupt
between segments, and the CLI's report of ``extend --refine`` (the one bug: its summary showed stage 1 as the
refinement). The rest pins verified behaviour."""

import json
import re

import numpy as np
import pytest
import torch

from longcat_vc import cli
from longcat_vc.pipeline import VideoContinuationPipeline
from vc_components import CLI_RUN as RUN, cli_fixtures, cli_seed, random_frames

ckpt, video = cli_fixtures()

KW = dict(resolution=(32, 48), guidance_scale=1.0, num_inference_steps=1, progress=False)


def _seed():
    return int(np.random.default_rng().integers(0, 2 ** 31))


@pytest.fixture(scope="module")
def pipe(ckpt):
    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch")


def test_cli_extend_refine_reports_stage1_and_the_refinement_apart(ckpt, video, tmp_path, capsys, monkeypatch):
    """``extend --refine``: the summary line labelled "refine (720p)" showed the 480p segments' text / encode /
    denoise / decode and step count (the refinement's windows were in no line, and --timings-json had them only
    as a list); now, as ``continue --refine``: a "stage 1 (480p)" line, then the refinement's sums over its
    windows under "refine (720p)", the JSON's stage-1 part under "stage1", and the total counts both."""
    from longcat_vc import refine

    monkeypatch.setattr(refine, "BUCKETS_720P_F64", {"0.50": (64, 128)})  # a tiny "720p" bucket
    out, tj = str(tmp_path / "o.mp4"), str(tmp_path / "t.json")
    rc = cli.main(["extend", video, "--prompt", "a", "--segments", "2", "--checkpoint", ckpt, "--out", out,
                   "--refine", "--seed", cli_seed(), "--timings-json", tj] + RUN)
    err = capsys.readouterr().err
    assert rc == 0, err
    t = json.load(open(tj))["timings"]
    wins = t["refine"]
    assert len(wins) == 2 and len(t["stage1"]["segments"]) == 2
    # 2 windows x 5 refine steps (t_thresh 0.5 of 50); stage 1: 2 segments x 1 distill step
    assert t["steps"] == sum(w["steps"] for w in wins) == 10 and t["stage1"]["steps"] == 2
    assert t["denoise"] == pytest.approx(sum(w["denoise"] for w in wins))
    assert all(np.isfinite(v) and v >= 0 for v in (t["total"], t["stage1"]["total"], t["load"], t["write"]))
    assert "stage 1 (480p)" in err and re.search(r"refine \(720p\) timings.*\(10 steps", err), err
    line_total = float(re.search(r"refine \(720p\) timings.*total ([0-9.]+)", err).group(1))
    assert abs(t["load"] + t["total"] + t["write"] - line_total) < 0.02


@pytest.mark.filterwarnings("ignore:block-sparse gating")
@pytest.mark.parametrize("spatial", [False, True])
def test_refine_windows_follow_spec_11_exactly(pipe, monkeypatch, spatial):
    """A 1-frame input, 3 segments of 9 frames with 1 cond frame: windows of 9 stage-1 frames at starts 0, 8, 16 (start +=
    num_frames - num_cond_frames), the last ending exactly at the stage-1 video's end; prompt ""; the first
    window without cond frames, each later one conditioned on the whole previous window's refined frames
    (its last 2 (1 spatial) taken); the output: the input, then the refined frames less the first window's
    refined cond frames."""
    import longcat_vc.refine as rm

    calls, real = [], rm.run_refine

    def spy(p, stage1, prompt="", **kw):
        out = real(p, stage1, prompt, **kw)
        calls.append((stage1.copy(), prompt, kw["video"], kw["num_cond_frames"], out.model_frames))
        return out

    monkeypatch.setattr(rm, "run_refine", spy)
    seed = _seed()
    v = random_frames(1, 30, 50, seed % 1000)  # a 1-frame input
    out = pipe.extend(v, "a cat", segments=3, num_frames=9, num_cond_frames=1, generator=seed, refine=True,
                      spatial_refine_only=spatial, refine_resolution=(64, 64), refine_steps=1, **KW)
    rnc = 1 if spatial else 2
    assert [c[1] for c in calls] == ["", "", ""] and [c[3] for c in calls] == [None, rnc, rnc]
    assert calls[0][2] is None and all(c[2] is calls[k][4] for k, c in enumerate(calls[1:]))
    assert all(c[0].shape == (9, 32, 48, 3) for c in calls)
    for a, b in zip(calls, calls[1:]):  # consecutive windows share the 1 stage-1 frame at the stride's edge
        assert np.array_equal(a[0][-1:], b[0][:1])
    per = 9 if spatial else 18
    assert all(c[4].shape == (per, 64, 64, 3) for c in calls)
    n_new = 3 * (per - rnc)
    assert out.frames.shape == (1 + n_new, 30, 50, 3) and out.num_new_frames == n_new
    assert out.num_input_frames == 1 and np.array_equal(out.frames[:1], v) and out.frames.dtype == np.uint8
    assert out.fps == (15.0 if spatial else 30.0) and out.size == (64, 64) and len(out.timings["refine"]) == 3


def test_segments_seeds_and_prompt_lists(pipe):
    """Same int seed: same video; a 2-segment run is the prefix of the 3-segment one (each segment draws on from
    the same generator); a 1-entry list equals the str; other prompts change the later segments only where they
    differ; segments 0 / bool / float / mismatched lists are refused naming the argument."""
    seed = _seed()
    v = random_frames(6, 30, 50, seed % 1000)
    kw = dict(num_frames=9, num_cond_frames=5, **KW)
    a = pipe.extend(v, "a cat", segments=3, generator=seed, **kw)
    assert a.frames.shape == (6 + 3 * 4, 30, 50, 3) and a.fps == 15.0 and a.num_new_frames == 12
    assert np.array_equal(pipe.extend(v, "a cat", segments=3, generator=seed, **kw).frames, a.frames)
    assert np.array_equal(pipe.extend(v, ["a cat"], segments=3, generator=seed, **kw).frames, a.frames)
    assert np.array_equal(pipe.extend(v, "a cat", segments=2, generator=seed, **kw).frames, a.frames[:14])
    b = pipe.extend(v, ("a cat", "a cat", "a dog"), generator=seed, **kw)
    assert np.array_equal(b.frames[:14], a.frames[:14]) and not np.array_equal(b.frames[14:], a.frames[14:])
    torch.manual_seed(seed)
    g1 = pipe.extend(v, "a cat", segments=2, **kw)
    torch.manual_seed(seed)
    assert np.array_equal(pipe.extend(v, "a cat", segments=2, **kw).frames, g1.frames)
    for bad, err in ((dict(segments=0), ValueError), (dict(segments=True), TypeError),
                     (dict(segments=2.0), TypeError)):
        with pytest.raises(err, match="segments"):
            pipe.extend(v, "a", **bad, **kw)
    with pytest.raises(ValueError, match="prompts has 2 entries but segments=3"):
        pipe.extend(v, ["a", "b"], segments=3, **kw)


@pytest.mark.filterwarnings("ignore:block-sparse gating")
def test_interrupt_between_segments_restores_state(pipe, monkeypatch):
    """A KeyboardInterrupt in the 2nd segment of an extend with use_bsa=True: it propagates, BSA and eval mode are
    back, and the next extend gives the uninterrupted result."""
    seed = _seed()
    v = random_frames(6, 30, 50, seed % 1000)
    kw = dict(num_frames=9, num_cond_frames=5, generator=seed, **KW)
    clean = pipe.extend(v, "a", segments=3, use_bsa=True, **kw)
    real, n = pipe._segment, [0]

    def seg(*a, **k):
        n[0] += 1
        if n[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(pipe, "_segment", seg)
    with pytest.raises(KeyboardInterrupt):
        pipe.extend(v, "a", segments=3, use_bsa=True, **kw)
    monkeypatch.undo()
    assert pipe.dit.config.enable_bsa is False and not pipe.dit.training
    assert np.array_equal(pipe.extend(v, "a", segments=3, use_bsa=True, **kw).frames, clean.frames)


def test_cache_on_off_and_memory_modes_agree_at_guidance_1(ckpt, pipe):
    """At guidance 1 the KV cache is a speed switch (to fp32 rounding: 1 grey level at most); memory "low" gives
    the resident result bit for bit (README)."""
    seed = _seed()
    v = random_frames(6, 30, 50, seed % 1000)
    kw = dict(num_frames=13, num_cond_frames=5, generator=seed, segments=2, **{**KW, "num_inference_steps": 2})
    on = pipe.extend(v, "a", **kw).frames
    off = pipe.extend(v, "a", use_kv_cache=False, **kw).frames
    assert np.abs(on.astype(int) - off).max() <= 1
    low = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                    memory="low")
    assert np.array_equal(low.extend(v, "a", **kw).frames, on)
