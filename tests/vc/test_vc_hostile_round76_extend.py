"""Round 76: long video (``extend``, SPEC 7) and its sliding-window 720p refinement (SPEC 11) under hostile use:
window arithmetic at the edges, prompt lists, seeds across segments, cache/BSA/memory-mode equality, an interrupt
between segments, and the CLI's report of ``extend --refine``."""

import json
import re

import numpy as np
import pytest
import torch

from longcat_vc import cli
from longcat_vc.pipeline import VideoContinuationPipeline
from longcat_vc.video_io import VideoFrames
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
