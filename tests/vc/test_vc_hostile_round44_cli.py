"""Round 44: the ``longcat-vc`` command line misused as a user would; each test fails on the code before."""

import os

import pytest

from longcat_vc import cli
from longcat_vc.video_io import read_video
from vc_components import CLI_RUN as RUN, cli_fixtures, cli_seed


ckpt, video = cli_fixtures()


_seed = cli_seed


def test_timings_json_equal_to_out_is_named_as_out_not_as_the_input(ckpt, video, tmp_path, capsys):
    """``--timings-json O.mp4 --out O.mp4`` was refused as "--timings-json O.mp4 is the input O.mp4", sending the
    user to look at the input; it now says it is the same file as --out."""
    out = str(tmp_path / "o.mp4")
    rc = cli.main(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", out,
                   "--timings-json", out] + RUN)
    err = capsys.readouterr().err
    assert rc == 2
    assert "same file as --out" in err and "is the input" not in err, err


def test_dash_as_the_input_reads_stdin(ckpt, video, tmp_path, capsys, monkeypatch):
    """``... | longcat-vc continue - ...`` (the usual "stdin" path) failed with "input not found: -" (exit 1);
    ``-`` now reads stdin, as ``/dev/stdin`` does."""
    if not os.path.exists("/dev/stdin"):
        pytest.skip("no /dev/stdin")
    out = str(tmp_path / "o.mp4")
    r, w = os.pipe()
    data = open(video, "rb").read()
    pid = os.fork()
    if pid == 0:  # the writer: the pipe holds less than the file
        os.close(r)
        os.write(w, data)
        os._exit(0)
    os.close(w)
    saved = os.dup(0)
    os.dup2(r, 0)
    os.close(r)
    try:
        rc = cli.main(["continue", "-", "--prompt", "a", "--checkpoint", ckpt, "--out", out, "--seed", _seed()] + RUN)
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.waitpid(pid, 0)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert read_video(out).num_frames == 16 + 4


@pytest.mark.parametrize("flag", ["--out", "--stage1-out"])
def test_dash_as_an_output_video_says_stdout_is_not_supported(ckpt, video, tmp_path, capsys, flag):
    """``--out -`` was refused as "--out must be an .mp4 file, got -", as if a suffix were missing; an mp4 cannot
    be streamed to stdout (it is finished by seeking back), and the message now says so."""
    argv = ["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4")] + RUN
    argv[argv.index("--out") + 1 if flag == "--out" else len(argv):] = (
        ["-"] + argv[argv.index("--out") + 2:] if flag == "--out" else ["--stage1-out", "-"])
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert "stdout" in err and flag in err, err


def test_extend_takes_refine(ckpt, video, tmp_path, capsys, monkeypatch):
    """``extend --refine`` (SPEC 11's long-video refinement, which ``pipe.extend(refine=True)`` runs) was refused
    as "unrecognized arguments: --refine"; the command line now runs it: 30 fps output, refined new frames."""
    from longcat_vc import refine

    monkeypatch.setattr(refine, "BUCKETS_720P_F64", {"0.50": (64, 128)})  # a tiny "720p" bucket: minutes -> seconds
    out = str(tmp_path / "o.mp4")
    rc = cli.main(["extend", video, "--prompt", "a", "--segments", "2", "--checkpoint", ckpt, "--out", out,
                   "--refine", "--seed", _seed()] + RUN)
    err = capsys.readouterr().err
    assert rc == 0, err
    got = read_video(out)
    assert got.fps == pytest.approx(30.0)
    assert got.num_frames == 16 + 2 * 2 * (9 - 5), err  # the input at 30 fps (16) + 2 x the 8 new frames


def test_extend_refinement_flags_without_refine_are_refused(ckpt, video, tmp_path, capsys):
    """``extend --spatial-only`` / ``--t-thresh`` without ``--refine``: refused, not silently ignored."""
    rc = cli.main(["extend", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                   "--t-thresh", "0.3"] + RUN)
    err = capsys.readouterr().err
    assert rc == 2 and "--t-thresh" in err and "--refine" in err, err


def test_refine_dash_is_refused_naming_stdin(ckpt, video, tmp_path, capsys):
    """``refine - --video IN`` failed with "STAGE1 not found: -" (exit 1); refine reads STAGE1 twice (frames, tags),
    so stdin is refused as a usage error that says so."""
    rc = cli.main(["refine", "-", "--video", video, "--checkpoint", ckpt, "--out", str(tmp_path / "o.mp4"),
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "STAGE1 -" in err and "stdin" in err, err


def test_out_through_a_symlink_replaces_its_target_not_the_link(ckpt, video, tmp_path, capsys):
    """``--out LINK.mp4`` (a symlink to the real file): the atomic rename replaced the link with a regular file and
    left the file it pointed to as it was (round 42 fixed this for --timings-json only). The target is now
    replaced and the link kept, as for --timings-json."""
    target = tmp_path / "real.mp4"
    target.write_bytes(b"old")
    link = tmp_path / "link.mp4"
    os.symlink(target, link)
    rc = cli.main(["continue", video, "--prompt", "a", "--checkpoint", ckpt, "--out", str(link),
                   "--seed", _seed()] + RUN)
    err = capsys.readouterr().err
    assert rc == 0, err
    assert os.path.islink(link), "the link was replaced by a regular file"
    assert read_video(str(target)).num_frames == 16 + 4
