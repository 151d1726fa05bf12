"""Round 39 (user knobs: environment variables and CLI flags): settings and flag values that were taken
without a word, or refused only after the model had loaded; each test fails on the code before."""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# ---------------------------------------------------------------------------------------------- env report
def test_env_report_names_lookalike_setting_names(monkeypatch, capsys):
    """``LONGCAT_KERNEL_BACKEND`` (singular) or a lower-case ``longcat_kernels_jit`` sets nothing: the op
    calls warn about it once per process, but the environment report (text and --json) listed only
    misspellings under the exact ``LONGCAT_KERNELS_`` prefix, so the report a user runs to see what is
    set said nothing of them."""
    from longcat_kernels import env

    monkeypatch.setenv("LONGCAT_KERNEL_BACKEND", "torch")
    monkeypatch.setenv("longcat_kernels_jit", "0")
    import warnings

    with warnings.catch_warnings():  # the op calls' once-per-process warning, if this process has not given it
        warnings.simplefilter("ignore", UserWarning)
        info = env.report()
    assert {"LONGCAT_KERNEL_BACKEND", "longcat_kernels_jit"} <= set(info["env_unknown"]), info["env_unknown"]
    assert env.main([]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if "not product settings" in ln]
    assert line and "LONGCAT_KERNEL_BACKEND" in line[0] and "longcat_kernels_jit" in line[0], out


def test_available_backends_refuses_an_empty_op_name():
    """``available_backends(op="")`` answered for attn_with_kv_cache (``op or default``): an empty name from
    a config was taken for the default op without a word."""
    import longcat_kernels as lk

    with pytest.raises(ValueError, match="op"):
        lk.available_backends(op="")
    assert set(lk.available_backends()) == {"torch", "triton", "cuda"}  # the default still works


# ---------------------------------------------------------------------------------------------- longcat-vc
@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from longcat_vc.video_io import write_video

    frames = np.random.default_rng().integers(0, 256, (16, 36, 70, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("in") / "in.mp4")
    write_video(path, frames, fps=15)
    return path


def _cli_without_loading(monkeypatch, capsys, argv):
    """``(exit status, stderr)`` of ``longcat-vc argv`` with the weights load made to fail loudly."""
    from longcat_vc import cli, pipeline

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the error was found")

    monkeypatch.setattr(pipeline.VideoContinuationPipeline, "from_pretrained", boom)
    monkeypatch.setattr(pipeline, "check_checkpoint", lambda *a, **k: None)
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def _continue(video, tmp_path, *extra):
    return ["continue", video, "--prompt", "a", "--checkpoint", str(tmp_path / "ck"), "--out",
            str(tmp_path / "o.mp4"), "--frames", "9", "--cond-frames", "5", *extra]


@pytest.mark.parametrize("name, value", [("LONGCAT_KERNELS_BACKEND", "trtion"),
                                         ("LONGCAT_KERNELS_FUSE_ISLANDS", "maybe"),
                                         ("LONGCAT_KERNELS_SM90_BSA_STAGES", "2")])
def test_cli_checks_the_environment_before_loading(video, tmp_path, monkeypatch, capsys, name, value):
    """A bad ``LONGCAT_KERNELS_*`` value (or a removed variable) was found by the first kernel call, after
    the weights had loaded (minutes for the real model). It is now exit 2 before the load, naming it."""
    monkeypatch.setenv(name, value)
    rc, err = _cli_without_loading(monkeypatch, capsys, _continue(video, tmp_path, "--device", "cpu"))
    assert rc == 2 and name in err and "weights were loaded" not in err, err


@pytest.mark.parametrize("backend, interpret", [("cuda", "1"), ("triton", "0")])
def test_cli_refuses_an_env_backend_the_device_cannot_run(video, tmp_path, monkeypatch, capsys, backend, interpret):
    """``--attn-backend cuda`` on cpu is refused before the load; ``LONGCAT_KERNELS_BACKEND=cuda`` (which
    replaces auto, and so the default backend) on cpu was found by the first attention call after the load.
    Triton on cpu without the interpreter likewise. An explicit --attn-backend torch still runs."""
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", backend)
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    for extra in ((), ("--attn-backend", "auto")):
        rc, err = _cli_without_loading(monkeypatch, capsys, _continue(video, tmp_path, "--device", "cpu", *extra))
        assert rc == 2 and "LONGCAT_KERNELS_BACKEND" in err and "weights were loaded" not in err, err
    rc, err = _cli_without_loading(monkeypatch, capsys,
                                   _continue(video, tmp_path, "--device", "cpu", "--attn-backend", "torch"))
    assert rc == 1 and "weights were loaded" in err, err  # past every check: the load


@pytest.mark.parametrize("extra, flag", [(("--device", "cpu", "--timings-json", ""), "--timings-json"),
                                         (("--device", ""), "--device"),
                                         (("--device", "meta"), "--device"),
                                         (("--device", "  "), "--device")])
def test_cli_refuses_empty_and_foreign_flag_values(video, tmp_path, monkeypatch, capsys, extra, flag):
    """``--timings-json ""`` wrote no timings without a word (the path was taken as "not given"),
    ``--device ""`` ran on the default device, ``--device meta`` was taken and failed after the load."""
    rc, err = _cli_without_loading(monkeypatch, capsys, _continue(video, tmp_path, *extra))
    assert rc == 2 and flag in err and "weights were loaded" not in err, err


# ---------------------------------------------------------------------------------------------- bench
_CHEAP = ["--quick", "--time-limit", "1e-9", "--no-write"]


@pytest.mark.parametrize("argv, flag", [
    (["--suite", "cache", "--out", ""], "--out"),
    (["--suite", "cache", "--device", ""], "--device"),
])
def test_bench_refuses_empty_flag_values(argv, flag, capsys):
    """``--out ""`` wrote to the default folder and ``--device ""`` ran on the default device, both
    without a word (an empty value was taken as "not given")."""
    from bench.cli import main

    with pytest.raises(SystemExit) as ei:
        main(["--quick", "--time-limit", "1e-9"] + argv)
    assert flag in str(ei.value.code), ei.value.code
    assert "== suite" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, flag", [
    (["--suite", "cache", "--sparsity", "0.5"], "--sparsity"),
    (["--suite", "bsa", "--depth", "2"], "--depth"),
    (["--suite", "bsa", "--cond-frames", "13"], "--cond-frames"),
    (["--suite", "bsa,cached-attn", "--depth", "2"], "--depth"),
])
def test_bench_refuses_flags_no_selected_suite_reads(argv, flag, capsys):
    """``--suite cache --sparsity 0.5`` (only the bsa suite reads the levels), ``--suite bsa --depth 2``
    (only the DiT suites build a DiT), ``--suite bsa --cond-frames 13``: the flag was recorded in the
    results' config and ignored without a word."""
    from bench.cli import main

    with pytest.raises(SystemExit) as ei:
        main(_CHEAP + argv)
    msg = str(ei.value.code)
    assert flag in msg and "suite" in msg, msg
    assert "== suite" not in capsys.readouterr().out


def test_bench_takes_flags_some_selected_suite_reads(capsys):
    from bench.cli import main

    rc = main(_CHEAP + ["--suite", "bsa,cache", "--sparsity", "0.5", "--depth", "1", "--cond-frames", "13"])
    assert rc == 1  # nothing timed under --time-limit 1e-9, but every flag was taken
    assert "== suite bsa" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- memory_report
@pytest.mark.parametrize("flag", ["--checkpoint", "--measured"])
def test_memory_report_refuses_empty_paths(flag, capsys):
    """``--checkpoint ""`` printed the released model's estimate and ``--measured ""`` the estimate instead of
    a measured table, both as if the flag had not been given."""
    from longcat_vc import memory_report

    with pytest.raises(SystemExit) as e:
        memory_report.main([flag, ""])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert flag in captured.err and "estimated" not in captured.out, captured


# ---------------------------------------------------------------------------------------------- GPU scripts
def _script(name):
    spec = importlib.util.spec_from_file_location(f"r39_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script, call, argv, flag", [
    ("memory_modes_gpu", "parse_args", ["--out", ""], "--out"),
    ("memory_modes_gpu", "parse_args", ["--out", "{tmp}"], "--out"),
    ("memory_modes_gpu", "parse_args", ["--out", "x.json", "--attn-backend", "trtion"], "--attn-backend"),
    ("pipeline_e2e_gpu", "parse_args", ["--out", ""], "--out"),
    ("pipeline_e2e_gpu", "parse_args", ["--out", "x", "--attn-backend", "trtion"], "--attn-backend"),
    ("refine_step_gpu", "main", ["--out", ""], "--out"),
    ("refine_step_gpu", "main", ["--out", "{tmp}"], "--out"),
    ("wan_step_gpu", "main", ["--out", ""], "--out"),
    ("wan_step_gpu", "main", ["--out", "{tmp}"], "--out"),
])
def test_gpu_scripts_refuse_an_out_or_backend_they_fail_on_later(script, call, argv, flag, capsys, tmp_path):
    """memory_modes / refine_step / wan_step wrote their JSON to --out at the end of the run: ``--out ""``
    or an existing folder failed there (FileNotFoundError / IsADirectoryError) with every number lost;
    pipeline_e2e's ``--out ""`` was a bare FileNotFoundError; ``--attn-backend trtion`` (free text) failed
    in DiTConfig after the text encoder and VAE were built. All are refused by the parser now."""
    argv = [str(tmp_path) if a == "{tmp}" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        getattr(_script(script), call)(argv)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("extra, flag", [(["--refine"], "--refine"), (["--frames", "185"], "--frames"),
                                         (["--checkpoint", "ck"], "--checkpoint")])
def test_memory_report_refuses_estimate_flags_beside_measured(extra, flag, tmp_path, capsys):
    """``--measured FILE --refine`` (or --frames, --checkpoint, ...) printed the measured table of the file,
    the estimate flags ignored without a word: the user read a 480p table as the refinement's."""
    import json

    from longcat_vc import memory_report

    path = tmp_path / "m.json"
    path.write_text(json.dumps({"stage_table_gib": {"basic/low": {"peak": 9.25}}}))
    with pytest.raises(SystemExit) as e:
        memory_report.main(["--measured", str(path)] + extra)
    assert e.value.code == 2
    assert flag in capsys.readouterr().err
    assert memory_report.main(["--measured", str(path)]) == 0


@pytest.mark.parametrize("script, call, argv", [
    ("memory_modes_gpu", "parse_args", ["--out", "x.json"]),
    ("pipeline_e2e_gpu", "parse_args", ["--out", "x"]),
    ("refine_step_gpu", "main", ["--out", "x.json"]),
])
@pytest.mark.parametrize("name, value", [("LONGCAT_KERNELS_BENCH_COMMIT", "not-a-sha"),
                                         ("LONGCAT_KERNELS_BACKEND", "trtion")])
def test_gpu_scripts_check_the_settings_up_front(script, call, argv, name, value, monkeypatch, capsys):
    """A bad LONGCAT_KERNELS_BENCH_COMMIT made the machine header raise, which these scripts catch as
    "informative only": the run went on and its JSON recorded {"error": ...} instead of the machine and
    commit. A bad package knob failed at the first kernel call, after the models were built. Both are
    refused by the parser now, naming the variable (as ``python -m bench`` does)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as e:
        getattr(_script(script), call)(argv)
    assert e.value.code == 2
    assert name in capsys.readouterr().err


def test_bench_cli_checks_the_package_settings_up_front(monkeypatch, capsys):
    """``LONGCAT_KERNELS_BACKEND=trtion python -m bench``: every suite ran its setup (on a GPU the matmul
    ceiling first) and each reported its first case as an error; refused before anything runs now."""
    from bench.cli import main

    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "trtion")
    with pytest.raises(SystemExit) as ei:
        main(_CHEAP + ["--suite", "bsa"])
    assert "LONGCAT_KERNELS_BACKEND" in str(ei.value.code)
    assert "== suite" not in capsys.readouterr().out


def test_bench_pipeline_reports_the_cond_frames_it_does_not_run():
    """``--suite pipeline --cond-frames 5,9``: the suite runs one conditioning (13 when named, else the
    first) and 9 was dropped without a row, while the results' config listed it. It is a skipped row
    with the reason now."""
    import torch

    from bench.suites import Context, load_suite

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, log=lambda m: None, quick=True, cond_frames=(5, 9))
    cs = load_suite("pipeline").cases(ctx)
    left = [c for c in cs if c.params.get("cond_frames") == 9]
    assert left and all(c.skip and "one conditioning" in c.skip for c in left), [(c.name, c.skip) for c in cs]
    assert any(c.params.get("cond_frames") == 5 and not c.skip for c in cs)


def test_memory_report_refuses_a_batch_the_refinement_does_not_run(capsys):
    """``--refine --batch 4`` printed the refinement's batch-1 table ("batch 1" in its title line) without
    a word about the --batch it replaced. Refused now; ``--refine --batch 1`` and ``--refine`` still run."""
    from longcat_vc import memory_report

    with pytest.raises(SystemExit) as e:
        memory_report.main(["--refine", "--batch", "4", "--depth", "2"])
    assert e.value.code == 2 and "--batch" in capsys.readouterr().err
    for extra in ([], ["--batch", "1"]):
        assert memory_report.main(["--refine", "--depth", "2"] + extra) == 0
    assert memory_report.main(["--depth", "2"]) == 0
    assert "batch 2" in capsys.readouterr().out  # the default without --refine is unchanged


@pytest.mark.parametrize("script, call, out", [("memory_modes_gpu", "parse_args", "x.json"),
                                               ("refine_step_gpu", "main", "x.json")])
def test_gpu_scripts_check_the_upstream_folder_up_front(script, call, out, tmp_path, capsys):
    """``--upstream ""`` was read as "not given": the run had no upstream numbers and said nothing; a folder
    without ``longcat_video/`` was found only after our own timings (reported "unavailable")."""
    for bad in ("", str(tmp_path)):
        with pytest.raises(SystemExit) as e:
            getattr(_script(script), call)(["--out", out, "--upstream", bad])
        assert e.value.code == 2
        assert "--upstream" in capsys.readouterr().err
    (tmp_path / "longcat_video").mkdir()
    if call == "parse_args":  # a checkout is taken
        assert _script(script).parse_args(["--out", out, "--upstream", str(tmp_path)]).upstream == str(tmp_path)


@pytest.mark.parametrize("device", ["", "meta", "mps"])
def test_available_backends_refuses_a_device_it_cannot_describe(device):
    """``available_backends(device="")`` raised torch's "Device string must not be empty" (naming no
    argument), ``device="meta"`` answered "torch: usable" for tensors no op computes on. A ValueError
    naming ``device`` now; "cpu", "cuda", "cuda:0" and a torch.device still answer."""
    import torch

    import longcat_kernels as lk

    with pytest.raises(ValueError, match="device"):
        lk.available_backends(device=device)
    for ok in ("cpu", "cuda", "cuda:0", torch.device("cpu")):
        assert set(lk.available_backends(device=ok)) == {"torch", "triton", "cuda"}


def test_cuda_archs_splits_verbatim_flags_on_semicolons(monkeypatch):
    """``LONGCAT_KERNELS_CUDA_ARCHS="-gencode=arch=compute_90a,code=sm_90a;-gencode=arch=compute_80,code=sm_80"``
    (``;`` separates the capability form) passed as ONE flag to nvcc, which refused it: the JIT build failed
    and ``auto`` ran Triton. ``;`` now separates flags too; a flag and a capability mixed is refused."""
    from longcat_kernels import _envvars as E

    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "-gencode=arch=compute_90a,code=sm_90a;-gencode=arch=compute_80,code=sm_80")
    assert E.cuda_arch_flags_from_env() == ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "-gencode=arch=compute_90a,code=sm_90a;8.0")
    with pytest.raises(ValueError, match="LONGCAT_KERNELS_CUDA_ARCHS"):
        E.cuda_arch_flags_from_env()
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "-gencode=arch=compute_90a,code=sm_90a;-arch=sm_90")
    with pytest.raises(ValueError, match="9.0a"):  # the plain-Hopper check sees the second flag
        E.cuda_arch_flags_from_env()


def test_bench_report_refuses_readme_without_write_or_check(tmp_path, capsys):
    """``python -m bench.report --readme docs/X.md`` printed the table to stdout and left X untouched without
    a word (--readme is read by --write / --check alone): a user who meant to update X thought it done."""
    from bench import report

    readme = tmp_path / "X.md"
    readme.write_text("x\n")
    with pytest.raises(SystemExit) as e:
        report.main(["--readme", str(readme)])
    assert e.value.code == 2 and "--readme" in capsys.readouterr().err


def test_bench_refuses_out_with_no_write(tmp_path, capsys):
    """``--out DIR --no-write`` printed the tables and wrote nothing to DIR without a word (as --plot with
    --no-write, refused since round 19, would have)."""
    from bench.cli import main

    with pytest.raises(SystemExit) as ei:
        main(_CHEAP + ["--suite", "cache", "--out", str(tmp_path / "r")])
    assert "--out" in str(ei.value.code) and "--no-write" in str(ei.value.code), ei.value.code
    assert "== suite" not in capsys.readouterr().out


@pytest.mark.parametrize("how", ["flag", "env"])
def test_cli_refuses_triton_bf16_on_cpu_before_loading(video, tmp_path, monkeypatch, capsys, how):
    """``--device cpu --dtype bf16 --attn-backend triton`` (TRITON_INTERPRET=1): the Triton CPU interpreter
    has no bfloat16, which the first attention call refused after the weights had loaded. Exit 2 before."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    extra = ["--device", "cpu", "--dtype", "bf16"]
    if how == "flag":
        extra += ["--attn-backend", "triton"]
    else:
        monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "triton")
    rc, err = _cli_without_loading(monkeypatch, capsys, _continue(video, tmp_path, *extra))
    assert rc == 2 and "bfloat16" in err and "weights were loaded" not in err, err
    rc, err = _cli_without_loading(monkeypatch, capsys, _continue(video, tmp_path, "--device", "cpu", "--dtype", "fp32",
                                                                  "--attn-backend", "triton"))
    assert rc == 1 and "weights were loaded" in err, err  # fp32 passes every check
