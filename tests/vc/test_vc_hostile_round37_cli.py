"""Round 37: ``longcat-vc`` subcommands other than a plain ``continue`` (refine, extend, continue --refine)
under hostile flags; each test fails on the code before."""

import os

import numpy as np
import pytest

from longcat_vc import cli
from vc_components import CLI_RUN as RUN, cli_fixtures, run_cli_without_loading


ckpt, video = cli_fixtures()


@pytest.mark.parametrize("exc, rc", [(KeyboardInterrupt, 130), (OSError(28, "No space left on device"), 1)])
@pytest.mark.parametrize("command", ["continue", "extend"])
def test_stop_after_out_is_written_says_it_was_written(ckpt, video, tmp_path, capsys, monkeypatch, exc, rc, command):
    """The --out video is renamed into place before the --timings-json file is written: an interruption
    there said "interrupted (no output written)" with the new --out on disk, and an error there (disk full)
    said nothing of it, so the user took the (replaced) --out for the old one or a failed run's. The
    message now says that --out was written and --timings-json was not."""
    def stop(*a, **k):
        raise exc

    monkeypatch.setattr(cli.json, "dump", stop)
    out, tj = str(tmp_path / "o.mp4"), str(tmp_path / "t.json")
    got = cli.main([command, video, "--prompt", "a", "--checkpoint", ckpt, "--out", out, "--timings-json", tj,
                    "--seed", str(np.random.default_rng().integers(0, 2**31))] + RUN)
    err = capsys.readouterr().err
    assert got == rc, err
    assert os.path.isfile(out) and not os.path.exists(tj)
    last = err.strip().splitlines()[-1]
    assert "no output written" not in last, last
    assert f"{out} was written" in last and f"--timings-json {tj} was not" in last, last


def test_refine_resolution_480p_is_refused_naming_the_flag(video, tmp_path, capsys, monkeypatch):
    """``refine --resolution`` shares continue's parser type, which takes 480p and, for a bad value, lists
    "480p, 720p or HEIGHTxWIDTH": the refine help says 720p or multiples of 64. ``--resolution 480p`` then
    failed with "resolution must be '720p' or (height, width)", naming no flag. Refine's --resolution now
    takes 720p or HEIGHTxWIDTH only, and an error names the flag and refine's choices."""
    ck = str(tmp_path / "ck")
    os.makedirs(os.path.join(ck, "lora"))
    open(os.path.join(ck, "lora", "refinement_lora.safetensors"), "w").close()
    base = ["refine", video, "--checkpoint", ck, "--out", str(tmp_path / "o.mp4"), "--device", "cpu"]
    for bad in ("480p", "480"):
        with pytest.raises(SystemExit) as e:
            run_cli_without_loading(capsys, base + ["--resolution", bad], monkeypatch)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "--resolution" in err and "720p or HEIGHTxWIDTH" in err and "480p, 720p" not in err, err


@pytest.mark.parametrize("command", ["continue", "refine"])
def test_a_repeated_prompt_is_refused_where_one_is_taken(video, tmp_path, capsys, monkeypatch, command):
    """``extend`` takes --prompt once per segment; ``continue`` and ``refine`` take one, and a repeated
    --prompt (the extend habit, or a script adding its own) kept the last one and dropped the others
    without a word. It is now a usage error (exit 2) naming the flag; one --prompt still runs."""
    words = [f"w{i}" for i in np.random.default_rng().permutation(9)[:2]]
    base = [command, video, "--checkpoint", str(tmp_path / "ck"), "--out", str(tmp_path / "o.mp4"), "--device", "cpu"]
    if command == "continue":
        base += ["--cond-frames", "5", "--frames", "9"]
    with pytest.raises(SystemExit) as e:
        run_cli_without_loading(capsys, base + ["--prompt", words[0], "--prompt", words[1]], monkeypatch)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--prompt" in err and "once" in err, err
    seen = []
    from longcat_vc import pipeline

    def spy(*a, **k):
        seen.append(1)
        raise AssertionError("loaded")

    monkeypatch.setattr(pipeline.VideoContinuationPipeline, "from_pretrained", spy)
    monkeypatch.setattr(pipeline, "check_checkpoint", lambda *a, **k: None)
    if command == "refine":
        os.makedirs(tmp_path / "ck" / "lora", exist_ok=True)
        (tmp_path / "ck" / "lora" / "refinement_lora.safetensors").write_bytes(b"")
        base += ["--resolution", "64x128"]
    assert cli.main(base + ["--prompt", words[0]]) == 1 and seen == [1], capsys.readouterr().err
