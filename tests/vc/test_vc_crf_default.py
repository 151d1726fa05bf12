"""`continue --refine` wrote its 720p output at --crf 18 while `refine` and upstream's video-continuation demo
write the refined video at crf 10; now the default follows the output (10 with --refine, 18 otherwise), an
explicit --crf wins, and --stage1-out keeps 18 unless --crf is given."""

from __future__ import annotations

import numpy as np
import pytest

from longcat_vc.cli import _check_args_before_load, build_parser
from longcat_vc.video_io import write_video


@pytest.mark.parametrize("extra, crf, given", [([], 18, False), (["--refine"], 10, False),
                                               (["--refine", "--crf", "23"], 23, True), (["--crf", "5"], 5, True)])
def test_continue_crf_default_follows_the_output(tmp_path, extra, crf, given):
    inp = str(tmp_path / "in.mp4")
    write_video(inp, np.zeros((5, 32, 32, 3), np.uint8), fps=15)
    args = build_parser().parse_args(["continue", inp, "--prompt", "a cat", "--out", str(tmp_path / "o.mp4"),
                                      "--device", "cpu", "--checkpoint", str(tmp_path)] + extra)
    _check_args_before_load(args)
    assert args.crf == crf and getattr(args, "crf_given", True) is given


def test_refine_crf_default_unchanged(tmp_path):
    inp = str(tmp_path / "in.mp4")
    write_video(inp, np.zeros((5, 32, 32, 3), np.uint8), fps=15)
    args = build_parser().parse_args(["refine", inp, "--video", inp, "--out", str(tmp_path / "o.mp4"), "--device", "cpu",
                                      "--checkpoint", str(tmp_path)])
    _check_args_before_load(args)
    assert args.crf == 10
