"""CI smoke tests of the benchmark suite (bench/): FLOP formulas, refusal on parity failure,
`python -m bench --quick` end to end on CPU, the pytest-benchmark path on tiny shapes, and the
README table generator."""

from __future__ import annotations

import csv
import json
import math
import os
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


def test_cli_quick_end_to_end(tmp_path):
    """`python -m bench --quick --suite all` on CPU: parity passes, tables print, JSON + CSV written."""
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--suite", "all", "--out", str(tmp_path)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "ideal" in r.stdout and "all cases passed parity" in r.stdout
    (jpath,) = tmp_path.glob("*.json")
    doc = json.loads(jpath.read_text())
    assert doc["machine"]["torch"] == torch.__version__ and doc["machine"]["date"]
    rows = doc["rows"]
    assert {r["suite"] for r in rows} == {"cache", "bsa", "cached-attn", "pipeline"}
    assert all(r["status"] in ("ok", "skipped") for r in rows)
    on = [r for r in rows if r["suite"] == "cache" and r.get("mode") == "on"]
    assert len(on) == 5 and all(math.isfinite(r["speedup"]) and r["ideal_speedup"] > 1 for r in on)
    (cpath,) = tmp_path.glob("*.csv")
    with cpath.open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)

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
