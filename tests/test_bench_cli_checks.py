"""The benchmark CLI refuses what it cannot measure honestly: bad arguments fail at parsing with the
flag named, a run that times nothing exits non-zero, results are labelled with what ran."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import machine


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_only_from_a_checkout_of_this_repo(tmp_path, monkeypatch):
    """bench installed into a venv inside another git project must not record that project's commit."""
    monkeypatch.delenv("LONGCAT_KERNELS_BENCH_COMMIT", raising=False)
    try:
        _git(tmp_path, "init", "-q")
        _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "other project")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git unavailable")
    other = _git(tmp_path, "rev-parse", "HEAD")
    site = tmp_path / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(machine, "REPO_ROOT", site)  # where an installed bench/ lives
    assert machine.git_commit() is None
    monkeypatch.setattr(machine, "REPO_ROOT", tmp_path)  # a checkout: its own commit
    assert machine.git_commit() == other


# keeps a run that (wrongly) got past the checks short: one suite, one cond length, nothing started
_CHEAP = ["--quick", "--suite", "cache", "--cond-frames", "13", "--time-limit", "1e-9", "--no-write"]



@pytest.mark.parametrize("argv, flag", [
    (["--suite="], "--suite"),
    (["--suite", " , "], "--suite"),
    (["--suite", "cache,cache"], "--suite"),
    (["--time-limit", "0"], "--time-limit"),
    (["--time-limit", "-1"], "--time-limit"),
    (["--time-limit", "nan"], "--time-limit"),
    (["--budget", "0"], "--budget"),
    (["--budget", "-1"], "--budget"),
    (["--budget", "nan"], "--budget"),
    (["--budget", "inf"], "--budget"),
    (["--backends", "trton", "--suite", "bsa"], "--backends"),
    (["--backends", ","], "--backends"),
    (["--sparsity", "1.5", "--suite", "bsa"], "--sparsity"),
    (["--sparsity", "nan", "--suite", "bsa"], "--sparsity"),
    (["--sparsity=-0.5", "--suite", "bsa"], "--sparsity"),
    (["--cond-frames", "0"], "--cond-frames"),
    (["--cond-frames", "x"], "--cond-frames"),
    (["--shapes="], "--shapes"),
    (["--shapes", "3x5"], "--shapes"),
    (["--device", "foo"], "--device"),
    (["--device", "meta"], "--device"),
    (["--plot"], "--no-write"),  # --plot with --no-write: plots are files
    # the DiT suites run one attention backend: the second name was dropped silently
    (["--backends", "torch,triton", "--suite", "cache"], "--backends"),
    (["--backends", "torch,triton", "--suite", "bsa,pipeline"], "--backends"),
])
def test_cli_refuses_bad_arguments_before_running(argv, flag, capsys):
    from bench.cli import main

    with pytest.raises(SystemExit) as ei:
        main(_CHEAP + argv)
    assert flag in str(ei.value.code), ei.value.code
    assert "== suite" not in capsys.readouterr().out  # refused before any suite started


def test_cli_backend_names_are_the_kernel_package_names():
    from bench.cli import KERNEL_BACKENDS
    from longcat_kernels.dispatch import BACKENDS

    assert set(KERNEL_BACKENDS) == set(BACKENDS)


def test_cli_run_that_timed_nothing_fails(capsys):
    from bench.cli import main

    assert main(_CHEAP) == 1  # every case skipped by --time-limit
    out = capsys.readouterr().out
    assert "NO case was timed" in out and "all cases passed" not in out, out[-2000:]


def test_cli_out_naming_a_file_fails_before_timing(tmp_path, capsys):
    from bench.cli import main

    f = tmp_path / "afile"
    f.write_text("hi")
    argv = ["--quick", "--suite", "cache", "--cond-frames", "13", "--out", str(f)]
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert "--out" in str(ei.value.code) and str(f) in str(ei.value.code), ei.value.code
    assert "== suite" not in capsys.readouterr().out
    assert f.read_text() == "hi"


def _doc(date="2026-01-01T00:00:00Z"):
    machine_ = {"device_slug": "cpu-x", "cpu": "x", "torch": "2", "commit": None}
    if date is not None:
        machine_["date"] = date
    return {"schema": "longcat-bench/1", "machine": machine_, "config": {"quick": False, "dtype": "float32"},
            "rows": [{"suite": "pipeline", "case": "distill/on", "backend": "torch", "status": "ok", "ms": 1.0,
                      "mode_name": "distill", "cache": "on", "steps": 2, "batch": 1, "cond_frames": 13}]}


def test_report_names_the_file_and_field_of_an_incomplete_result(tmp_path):
    from bench import report

    d = tmp_path / "cpu-x"
    d.mkdir()
    (d / "bench-pipeline_20260102T000000Z.json").write_text(json.dumps(_doc()))
    (d / "other-tool.json").write_text(json.dumps({"not": "ours"}))  # another tool's JSON: ignored
    assert "Denoising loop" in report.render(tmp_path)
    bad = d / "bench-pipeline_20260101T000000Z.json"
    bad.write_text(json.dumps(_doc(date=None)))
    with pytest.raises(ValueError, match=r"bench-pipeline_20260101T000000Z\.json.*machine\.date"):
        report.render(tmp_path)
    with pytest.raises(SystemExit, match="machine.date"):
        report.main(["--results", str(tmp_path)])


def _ctx(**kw):
    import torch

    from bench.suites import Context

    return Context(device=torch.device("cpu"), dtype=torch.float32, log=lambda msg: None, **kw)


def test_dit_and_cached_attn_suites_run_every_shapes_grid():
    """--shapes tiny,8x2x2: the cache, cached-attn and pipeline suites time both grids (the second
    was dropped while the results' config listed it)."""
    from bench.shapes import GRIDS, parse_grid
    from bench.suites import cache, cached_attn, pipeline

    grids = [GRIDS["tiny"], parse_grid("8x2x2")]
    for mod in (cache, cached_attn, pipeline):
        cs = mod.cases(_ctx(quick=True, grids=grids, cond_frames=(13,)))
        assert {c.params["grid"] for c in cs} == {"24x2x4", "8x2x2"}, mod.NAME
        assert len({c.id for c in cs}) == len(cs), mod.NAME  # names carry the grid


def test_cache_finish_and_report_keep_grids_apart():
    from bench import report
    from bench.shapes import GRIDS, parse_grid
    from bench.suites import cache

    ctx = _ctx(quick=True, grids=[parse_grid("8x2x2"), GRIDS["tiny"]], cond_frames=(13,))
    rows = [dict(suite="cache", case=c.name, backend=c.backend, status="ok", **c.params,
                 ms=(2.0 if c.params["mode"] == "off" else 1.0) * (1 if c.params["grid"] == "8x2x2" else 3))
            for c in cache.cases(ctx)]
    rows = cache.finish(ctx, rows)
    on = {r["grid"]: r for r in rows if r["mode"] == "on"}
    assert on["8x2x2"]["speedup"] == on["24x2x4"]["speedup"] == 2.0
    assert on["8x2x2"]["ideal_speedup"] != on["24x2x4"]["ideal_speedup"]  # each grid's own FLOPs
    text = report.cache_table({"rows": rows, "config": {"dtype": "float32"}})
    assert "grid 8x2x2" in text and "grid 24x2x4" in text


def test_pipeline_refine_rows_label_what_ran():
    """--cond-frames 77: the refine loop runs its own 4 cond latents (13 frames), not 77 frames."""
    from bench.suites import pipeline

    cs = pipeline.cases(_ctx(quick=True, cond_frames=(77,)))
    for c in cs:
        p = c.params
        if p["mode_name"] == "refine":
            assert (p["cond_frames"], p["cond_latents"]) == (13, 4), p
        else:
            assert (p["cond_frames"], p["cond_latents"]) == (77, 20), p


def test_pipeline_refine_never_times_an_empty_selection(monkeypatch):
    """The quick refine case keeps >= 1 key block in every block-sparse call (it kept 0 of the 1
    block of its cond grid: attention output zeros and the row said ok); a refine case whose
    selection would keep no block is skipped with the reason."""
    from longcat_kernels.ops.block_sparse_attn import selection

    from bench.suites import pipeline, run_case

    empty = []
    orig = selection.warn_if_keeps_nothing

    def spy(sparsity, cdf, nk, grid_k, chunk_k):
        if cdf is None and sparsity is not None and int((1 - sparsity) * nk) < 1:
            empty.append((sparsity, nk, tuple(grid_k), tuple(chunk_k)))
        return orig(sparsity, cdf, nk, grid_k, chunk_k)

    monkeypatch.setattr(selection, "warn_if_keeps_nothing", spy)
    ctx = _ctx(quick=True)
    (case,) = [c for c in pipeline.cases(ctx) if c.name == "refine/on"]
    assert case.skip is None
    row = run_case(ctx, case)
    assert row["status"] == "ok" and not empty, (row, empty)

    # CPU default chunks (4x4x4) on the tiny grid: the 4x2x4 cond grid is one key block
    from bench.shapes import GRIDS

    refine = [c for c in pipeline.cases(_ctx(grids=[GRIDS["tiny"]])) if c.params["mode_name"] == "refine"]
    assert refine and all(c.skip and "keeps no key block" in c.skip for c in refine), [c.skip for c in refine]
    assert run_case(ctx, refine[0])["status"] == "skipped"


def test_cache_parity_bound_scales_with_depth_in_half_precision_only():
    """bf16 cache on/off differ by 6.2e-3 at depth 8 and 1.3e-2 at depth 48 (H100, random weights:
    bench/results/h100/bench-cache_20261206T195253Z_047cea0.json was refused by a fixed 1e-2): the
    half-precision bound grows like sqrt(depth / 8); fp32 stays exact at any depth."""
    import torch

    from bench.suites.cache import tolerance

    assert tolerance(torch.bfloat16, 2) == tolerance(torch.bfloat16, 8) == 1e-2
    assert 1.3e-2 < tolerance(torch.bfloat16, 48) < 3e-2
    assert tolerance(torch.float16, 48) == tolerance(torch.bfloat16, 48)
    assert tolerance(torch.float32, 48) == tolerance(torch.float32, 2) == 1e-5


def test_cache_onoff_accuracy_script_runs(tmp_path):
    """bench/dev/cache_onoff_accuracy_gpu.py (to be run on a GPU) stays runnable: --smoke on CPU, tiny DiT;
    float64 on == off (the reference is exact), both bf16 paths near float64."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "dev", "cache_onoff_accuracy_gpu.py"), "--smoke",
                        "--out", str(tmp_path), "--depth", "2", "--grid", "4x4x4", "--cond", "2"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / "cache-onoff-accuracy_depth2.json"))
    assert res["fp64_on_vs_off"] < 1e-5
    for backend in ("auto", "torch"):
        vals = res[backend]
        assert set(vals) == {"off_vs_fp64", "on_vs_fp64", "on_vs_off"}
        assert all(0 < v < 5e-2 for v in vals.values()), vals


def test_head_dim_probe_script_runs(tmp_path):
    """bench/dev/head_dim_probe_gpu.py (to be run on a GPU) stays runnable: --smoke on CPU, torch backend."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "dev", "head_dim_probe_gpu.py"), "--smoke",
                        "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(tmp_path / "head-dim-probe.json"))
    assert len(res["rows"]) == 18 and res["bad"] == []
    assert all(row["status"] == "ok" and row["finite"] for row in res["rows"])
