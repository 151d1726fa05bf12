"""CI smoke tests of the benchmark suite (bench/): FLOP formulas, refusal on parity failure,
`python -m bench --quick` end to end on CPU, the pytest-benchmark path on tiny shapes, and the
README table generator."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)  # the CLI times the CPU reference, not the interpreter
    for k in [k for k in env if k.startswith("PYTEST_XDIST")]:
        # run under `pytest -n 2`, the child pytest saw a worker's variables and turned pytest-benchmark off
        # ("Can't have both --benchmark-only and --benchmark-disable")
        del env[k]
    return env


def test_ideal_cache_speedup_matches_spec10():
    from bench.flops import ideal_cache_speedup
    from bench.shapes import GRIDS, cond_latents
    from longcat_vc import DiTConfig

    cfg = DiTConfig.longcat_video()  # the released 48-layer model
    got = [ideal_cache_speedup(cfg, GRIDS["480p"].shape, num_cond_latents=cond_latents(f))
           for f in (13, 29, 45, 61, 77)]
    assert [round(g, 2) for g in got] == [1.09, 1.28, 1.65, 2.48, 5.17]
    # the benchmark's depth-8 model: the same within rounding (embeddings weigh a little more)
    cfg8 = DiTConfig.longcat_video(depth=8)
    assert ideal_cache_speedup(cfg8, GRIDS["480p"].shape, num_cond_latents=20) == pytest.approx(got[-1], rel=2e-3)


def test_shapes_from_presets():
    from bench.shapes import GRIDS, cond_latents, latent_grid, parse_grid

    assert latent_grid("480p", 93) == (24, 30, 52) and GRIDS["480p"].tokens == 37440
    assert latent_grid("720p", 93) == (24, 44, 80) and GRIDS["720p"].tokens == 84480
    assert [cond_latents(f) for f in (13, 29, 45, 61, 77)] == [4, 8, 12, 16, 20]
    assert parse_grid("3x5x7").shape == (3, 5, 7)
    with pytest.raises(ValueError, match="shape"):
        parse_grid("3x5")


def test_attention_flops():
    from bench.flops import attn_flops, prefix_attn_flops

    assert attn_flops(2, 32, 31200, 37440, 128) == 4 * 2 * 32 * 31200 * 37440 * 128
    assert attn_flops(1, 1, 10, 10, 8, backward=True) == 3.5 * 4 * 10 * 10 * 8
    assert prefix_attn_flops(1, 1, 10, 4, 8) == 4 * 8 * (4 * 4 + 6 * 10)


def test_bsa_effective_flops_counts_visited_token_pairs():
    import longcat_kernels as lk
    from bench.flops import bsa_effective_flops
    from longcat_kernels.testing import bsa_token_mask

    grid, chunk, D = (3, 5, 6), (2, 4, 4), 16  # partial edge blocks on every axis
    S = grid[0] * grid[1] * grid[2]
    q, k = torch.randn(2, S, 3, D), torch.randn(2, S, 3, D)
    sel = lk.select_blocks(q, k, grid_q=grid, chunk_q=chunk, sparsity=0.5, backend="torch")
    pairs = bsa_token_mask(sel.to_mask(), grid, grid, chunk, chunk).sum().item()
    assert pairs > 0
    assert bsa_effective_flops(sel, D, grid, chunk) == 4 * D * pairs


def test_timing_statistics_and_rotation():
    from bench.timing import TimingPolicy, measure, summarize

    t = summarize([3.0, 1.0, 2.0, 10.0], "x")
    assert (t.median_ms, t.min_ms, t.runs) == (2.5, 1.0, 4)
    seen = []
    t = measure(lambda i: seen.append(i), [(0,), (1,), (2,)], "cpu",
                TimingPolicy(warmup=1, min_reps=4, max_reps=4, budget_s=0.0))
    assert t.runs == 4 and set(seen) == {0, 1, 2}  # warm-up visits every input set, then rotation


def test_interleaved_rounds_order_and_medians():
    from bench.timing import TimingPolicy, interleaved

    calls = []
    fns = {"a": lambda i: calls.append(("a", i)), "b": lambda i: calls.append(("b", i))}
    pol = TimingPolicy(warmup=1, min_reps=2, max_reps=2, budget_s=0.0)
    ms, per = interleaved(fns, [(0,), (1,)], "cpu", pol, rounds=3)
    assert set(ms) == set(per) == {"a", "b"} and all(len(v) == 3 for v in per.values())
    assert all(ms[k] == sorted(per[k])[1] for k in ms)  # median of three rounds
    names = [n for n, _ in calls]
    # each round: a's warm-up + runs, then b's; three rounds
    assert names == (["a"] * 4 + ["b"] * 4) * 3, names
    with pytest.raises(ValueError, match="rounds"):
        interleaved(fns, [(0,)], "cpu", pol, rounds=0)


def test_case_refused_on_parity_failure_or_nan():
    from bench.suites import Case, Context, Prepared, rel_l2, run_case

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, quick=True)
    ref = torch.randn(64)
    for bad in (ref + 0.1 * torch.randn(64), torch.full((64,), float("nan"))):
        case = Case("t", "bad", "torch", {}, lambda bad=bad: Prepared(
            fn=lambda: None, inputs=[()], check=lambda: (rel_l2(bad, ref), 1e-5)))
        row = run_case(ctx, case)
        assert row["status"] == "parity-failed" and "ms" not in row, row
    good = Case("t", "good", "torch", {}, lambda: Prepared(fn=lambda: None, inputs=[()],
                                                           check=lambda: (rel_l2(ref, ref), 1e-5)))
    row = run_case(ctx, good)
    assert row["status"] == "ok" and row["ms"] >= 0
    broken = Case("t", "broken", "torch", {}, lambda: 1 / 0)
    assert run_case(ctx, broken)["status"] == "error"


def _git_status() -> str | None:
    try:
        r = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def test_cli_quick_end_to_end(tmp_path):
    """`python -m bench --quick --suite all` on CPU, run from another directory with no --out: parity
    passes, tables print, JSON + CSV land in ./bench-results/<device>/ there, the checkout's git
    status does not change and the README table still matches the committed results."""
    before = _git_status()
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--suite", "all"],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "ideal" in r.stdout and "all cases passed parity" in r.stdout
    assert "spread" in r.stdout and "min " in r.stdout
    assert _git_status() == before
    (jpath,) = tmp_path.glob("bench-results/*/*.json")
    assert re.fullmatch(r"bench-cache-bsa-cached-attn-pipeline-quick_\d{8}T\d{6}Z(_[0-9a-f]{7}(-dirty)?)?\.json",
                        jpath.name), jpath.name
    doc = json.loads(jpath.read_text())
    assert jpath.parent.name == doc["machine"]["device_slug"]
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["date"]
    rows = doc["rows"]
    assert {r["suite"] for r in rows} == {"cache", "bsa", "cached-attn", "pipeline"}
    assert all(r["status"] in ("ok", "skipped") for r in rows)
    for r in rows:
        if r["status"] == "ok":
            assert r["ms_min"] <= r["ms"] and r["spread"] >= 0 and r["runs"] >= 1, r
    on = [r for r in rows if r["suite"] == "cache" and r.get("mode") == "on"]
    assert len(on) == 5 and all(math.isfinite(r["speedup"]) and r["ideal_speedup"] > 1 for r in on)
    (cpath,) = tmp_path.glob("bench-results/*/*.csv")
    with cpath.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    chk = subprocess.run([sys.executable, "-m", "bench.report", "--check"], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=120)
    assert chk.returncode == 0, chk.stdout + chk.stderr

    # the README generator: quick runs are never reported; a full run is
    from bench import report

    dev = tmp_path / "results" / doc["machine"]["device_slug"]
    dev.mkdir(parents=True)
    (dev / jpath.name).write_text(jpath.read_text())
    assert "No committed benchmark results" in report.render(tmp_path / "results")
    doc["config"]["quick"] = False
    (dev / jpath.name).write_text(json.dumps(doc))
    text = report.render(tmp_path / "results")
    assert "| cond frames |" in text and "ideal (FLOPs)" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\nrest\n")
    old, new = report.update_readme(text, readme)
    assert "old" not in new and text.strip() in new and new.endswith("rest\n")
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 1
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme), "--write"]) == 0
    assert report.main(["--results", str(tmp_path / "results"), "--readme", str(readme), "--check"]) == 0


def test_pytest_benchmark_path(tmp_path):
    """`pytest bench/ --benchmark-only` on CPU (tiny shapes), a subset of cases of every suite."""
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "-k", "c4 or s0.9375-4x4x4-gated-fwd or dense-fwd or distill", f"--benchmark-json={out}"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    doc = json.loads(out.read_text())
    names = {b["name"] for b in doc["benchmarks"]}
    for suite in ("test_cache", "test_bsa", "test_cached_attn", "test_pipeline"):
        assert any(n.startswith(suite + "[") for n in names), (suite, sorted(names))
    assert all("rel_l2" in b["extra_info"] for b in doc["benchmarks"])


def test_default_results_folder_is_git_ignored(tmp_path):
    """Run from the checkout itself, the default folder (./bench-results/) is ignored by git."""
    from bench import writer

    out = writer.default_out_dir({"device_slug": "cpu-x"}, cwd=ROOT)
    assert out == ROOT / "bench-results" / "cpu-x"
    r = subprocess.run(["git", "check-ignore", "-q", str(out / "bench-cache_20260101T000000Z.json")], cwd=ROOT)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0, "bench-results/ is not git-ignored"
    assert writer.result_stem(["cache"], False, "20260101T000000Z", "0123456789ab-dirty") == \
        "bench-cache_20260101T000000Z_0123456-dirty"
    assert writer.result_stem(["bsa", "cache"], True, "20260101T000000Z", None) == "bench-bsa-cache-quick_20260101T000000Z"


def test_spread_is_reported_and_marked():
    from bench.timing import SPREAD_LIMIT, SPREAD_MARK, ms_cell, row_spread, summarize

    steady = summarize([10.0, 10.1, 10.0, 10.2, 10.1], "x")
    noisy = summarize([10.0, 14.0, 10.0, 19.0, 12.0], "x")
    assert steady.spread < SPREAD_LIMIT < noisy.spread
    assert noisy.spread == pytest.approx((noisy.p80_ms - noisy.p20_ms) / noisy.median_ms)
    assert summarize([5.0], "x").spread == 0.0
    assert ms_cell({"ms": steady.median_ms, "spread": steady.spread}) == "10.10"
    assert ms_cell({"ms": noisy.median_ms, "spread": noisy.spread}) == "12.00" + SPREAD_MARK
    # files written before `spread` existed: from their p20/p80
    assert row_spread({"ms": 10.0, "ms_p20": 9.0, "ms_p80": 12.0}) == pytest.approx(0.3)
    assert ms_cell({"ms": 10.0, "ms_p20": 9.0, "ms_p80": 12.0}, ".1f") == "10.0" + SPREAD_MARK
    assert ms_cell({"status": "error"}) == "-"


def test_plot_without_matplotlib_fails_first_with_the_extra_named(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from bench.cli import main\n"
            "main(['--quick', '--plot', '--out', sys.argv[1]])")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "longcat-kernels[plot]" in r.stderr, r.stderr[-2000:]
    assert not list(tmp_path.iterdir())  # refused before timing anything


def test_readme_table_matches_committed_results():
    from bench import report

    assert report.main(["--check"]) == 0


RESULT_NAME = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*_\d{8}(T\d{6}Z)?(_[0-9a-f]{7,40})?(_[a-z0-9]+(-[a-z0-9]+)*)?"
                         r"\.(json|csv|log|txt|md)")


def test_committed_results_follow_the_scheme_and_are_indexed():
    """Every committed result file follows the naming scheme and is listed (with what cites it) in
    bench/results/README.md; every file the index lists exists."""
    results = ROOT / "bench" / "results"
    index = (results / "README.md").read_text()
    table = index[index.index("## h100/"):index.index("## Renamed")]
    listed = set(re.findall(r"`([^`/ ]+\.(?:json|csv|log|txt|md))`", table))
    for stem in re.findall(r"`([^`/ ]+)\.json` \(\+ `\.csv`, `\.log`\)", table):
        listed |= {f"{stem}.csv", f"{stem}.log"}
    files = {p.name for p in (results / "h100").iterdir()}
    assert all(p.is_file() for p in (results / "h100").iterdir())  # one flat folder per device
    bad = sorted(f for f in files if not RESULT_NAME.fullmatch(f))
    assert not bad, f"names outside the scheme: {bad}"
    assert files == listed, f"not indexed: {sorted(files - listed)}; indexed but missing: {sorted(listed - files)}"


def test_cap_process_memory_indexes_the_device(monkeypatch):
    """torch refuses set_per_process_memory_fraction(frac, torch.device("cuda")): the helper the GPU
    scripts share passes an index (a bare "cuda" killed a 720p refine run after its warm-up)."""
    import torch

    from bench.machine import cap_process_memory

    calls = []

    class Props:
        total_memory = 100 * 2**30

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    assert cap_process_memory(48, torch.device("cuda")) == pytest.approx(0.48)
    assert cap_process_memory(24, "cuda:1") == pytest.approx(0.24)
    assert cap_process_memory(None, 2) == 1.0
    assert cap_process_memory(500) == 1.0
    assert calls == [(pytest.approx(0.48), 3), (pytest.approx(0.24), 1), (1.0, 2), (1.0, 3)]
    assert all(isinstance(d, int) for _, d in calls)
    for bad in (0, -1, True, "24"):
        with pytest.raises(ValueError, match="gib"):
            cap_process_memory(bad, 0)
    with pytest.raises(ValueError, match="CUDA"):
        cap_process_memory(24, "cpu")


def test_upstream_bsa_loader_reports_why(tmp_path, monkeypatch):
    """``bench.upstream.upstream_bsa``: (None, reason) without a checkout or with a broken one (the
    GPU scripts report it and time the rest)."""
    import sys

    from bench.upstream import upstream_bsa

    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader prepends the checkout
    assert upstream_bsa(None) == (None, "no --upstream")
    fn, why = upstream_bsa(str(tmp_path))
    assert fn is None and why.startswith("upstream import failed: ")
