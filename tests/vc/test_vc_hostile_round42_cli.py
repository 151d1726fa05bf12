"""Round 42: the ``longcat-vc`` command and its outputs end to end on a tiny random checkpoint, under hostile
use; each test fails on the code before."""

import json
import os
import stat
import threading

import pytest

from longcat_vc import cli
from vc_components import CLI_RUN as RUN, cli_fixtures, cli_seed


ckpt, video = cli_fixtures()


_seed = cli_seed


def test_timings_json_dash_goes_to_stdout(ckpt, video, tmp_path, capsys, monkeypatch):
    """``--timings-json -`` (the usual "stdout" path; stdout otherwise stays empty, so ``... | jq`` is the natural
    use) wrote a file named "-" in the working folder and nothing on stdout, without a word. It now writes the
    JSON on stdout, and no file."""
    monkeypatch.chdir(tmp_path)
    seed = _seed()
    rc = cli.main(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", "o.mp4",
                   "--timings-json", "-", "--seed", seed] + RUN)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert sorted(os.listdir(tmp_path)) == ["o.mp4"]
    got = json.loads(cap.out)
    assert got["seed"] == int(seed) and got["timings"]["steps"] == 1 and got["size"] == [32, 64]


def test_timings_json_into_a_fifo_is_written_into_it_not_replaced(ckpt, video, tmp_path, capsys):
    """``--timings-json`` naming a FIFO (``mkfifo``, or the ``/dev/stdout`` of a pipe): the atomic write renamed a
    regular file over it, so the reader got nothing (blocked for ever) and the FIFO was gone. A path that exists
    and is no regular file (FIFO, character device) is now written into, in place."""
    fifo = str(tmp_path / "timings.fifo")
    os.mkfifo(fifo)
    got = {}

    def reader():
        with open(fifo, encoding="utf-8") as f:
            got["text"] = f.read()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    seed = _seed()
    rc = cli.main(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                   "--timings-json", fifo, "--seed", seed] + RUN)
    err = capsys.readouterr().err
    if t.is_alive():  # unblock the reader so that the test process can end
        with open(fifo, "w"):
            pass
    t.join(10)
    assert rc == 0, err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was replaced by a regular file"
    assert json.loads(got.get("text") or "null")["seed"] == int(seed)


def test_timings_json_through_a_symlink_replaces_its_target_not_the_link(ckpt, video, tmp_path, capsys):
    """``--timings-json`` naming a symlink (``/dev/stdout`` when stdout is redirected to a file): the atomic rename
    replaced the link itself with a regular file (as root, ``/dev/stdout`` of the whole container) and left the
    file it pointed to as it was. The link's target is now replaced, and the link kept."""
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    os.symlink(target, link)
    seed = _seed()
    rc = cli.main(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                   "--timings-json", str(link), "--seed", seed] + RUN)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert os.path.islink(link), "the symlink was replaced by a regular file"
    assert json.loads(target.read_text())["seed"] == int(seed)


@pytest.mark.parametrize("spatial", [False, True])
def test_refine_takes_the_stage1_cond_frames_from_the_stage1_file(ckpt, video, tmp_path, capsys, spatial):
    """``continue --cond-frames 5 --stage1-out S`` then ``refine S --video IN`` (the README's two-run workflow):
    refine took 26 cond frames (2 x the default 13) whatever stage 1 used, so the refinement's cond frames from
    the input were laid over 2 x 13 - 2 x 5 = 16 refined frames of generated content (8 with --spatial-only)
    and those frames were dropped from the output, without a word (here 24 frames written instead of 40).
    ``continue --stage1-out`` now records the stage-1 cond count in the file, and refine's default is twice it
    (once with --spatial-only), as ``continue --refine`` does in one run."""
    from longcat_vc.video_io import read_video

    s1, out = str(tmp_path / "s1.mp4"), str(tmp_path / "r.mp4")
    run = [a if a != "9" else "17" for a in RUN]  # 17 frames: 34 refine frames, more than 26
    rc = cli.main(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                   "--stage1-out", s1, "--seed", _seed()] + run)
    assert rc == 0, capsys.readouterr().err
    rc = cli.main(["refine", s1, "--video", video, "--checkpoint", ckpt, "--out", out, "--seed", _seed(),
                   "--device", "cpu", "--dtype", "fp32", "--attn-backend", "torch", "--no-progress", "--steps", "2",
                   "--resolution", "64x128"] + (["--spatial-only"] if spatial else []))
    err = capsys.readouterr().err
    assert rc == 0, err
    n_refined, nc = (17, 5) if spatial else (34, 10)
    assert read_video(out).num_frames == 16 + n_refined - nc, err


def _pipe_path(data: bytes) -> str:
    """A ``/dev/fd/N`` path of a pipe fed ``data`` by a thread (as ``cat in.mp4 | longcat-vc ... /dev/stdin``)."""
    r, w = os.pipe()

    def feed():
        with os.fdopen(w, "wb") as f:
            f.write(data)

    threading.Thread(target=feed, daemon=True).start()
    return f"/dev/fd/{r}"


def test_a_video_piped_in_is_read_not_called_empty(video):
    """``read_video("/dev/stdin")`` of a piped video (``cat in.mp4 | longcat-vc continue /dev/stdin ...``):
    a pipe's size is 0, so "the file is empty" refused it before any byte was read; PyAV reads it. The empty-file
    check now applies to regular files only."""
    from longcat_vc.video_io import read_video

    with open(video, "rb") as f:
        data = f.read()
    got = read_video(_pipe_path(data), target_fps=15.0)
    assert got.frames.shape == (16, 36, 70, 3) and got.fps == 15.0


def test_continue_refine_reads_a_piped_input_once(ckpt, video, tmp_path, capsys, monkeypatch):
    """``continue --refine`` read the input twice (at ~15 fps for stage 1, at ~30 fps for the refinement's cond
    frames): a piped input is gone after the first read, so the second failed with "cannot read video: Invalid
    data". A piped input is now read once and subsampled to both rates."""
    from longcat_vc import pipeline

    with open(video, "rb") as f:
        path = _pipe_path(f.read())
    seen = {}

    def stop(self, video, *a, **k):  # stage 1 and the refinement need no run here: the reads are what is tested
        seen["frames"] = video.num_frames
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline.VideoContinuationPipeline, "__call__", stop)
    monkeypatch.setattr(pipeline.VideoContinuationPipeline, "check_refine_fits_ahead", lambda *a, **k: None)
    rc = cli.main(["continue", path, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                   "--refine", "--seed", _seed()] + RUN)
    err = capsys.readouterr().err
    assert rc == 130 and seen.get("frames") == 16, err
