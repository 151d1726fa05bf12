"""Round 41 (bench audit, CPU): a dense fwd+bwd baseline timed with a wrong gradient, the README
pipeline table without the grid of its rows, a timing budget ignored without warm-up, a speedup column
named after the wrong baseline, a README bsa table of headers alone, --budget read by nothing under
--quick, a cache plot line zig-zagging between grids, failing backends vanishing from the README tables,
a gating check 16x too loose at sparsity 0.9375."""

from __future__ import annotations

import torch


def _dense_bwd_case(ctx):
    from bench.shapes import Grid
    from bench.suites import bsa

    grid = Grid("g", 4, 4, 4)
    return bsa._dense_case(ctx, grid, (1, 2, 16), "default", backward=True)


def test_dense_fwd_bwd_baseline_refused_with_a_wrong_gradient(monkeypatch):
    """The dense fwd+bwd SDPA baseline checked its forward output only: an SDPA whose backward was off by
    10% (rel. L2 0.1 on dq/dk/dv) passed with rel. L2 ~4e-7 and was timed as the baseline every fwd+bwd
    speedup divides. Its gradients are now compared to the fp32 math SDPA's too."""
    from bench.suites import Context, run_case
    from longcat_kernels.testing import baselines as BL

    real = BL.sdpa_bshd

    class _ScaledGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx_, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx_, g):
            return g * 1.1

    def wrong(q, k, v, *, impl="default", scale=None):
        if impl == "math":  # the oracle stays right
            return real(q, k, v, impl=impl, scale=scale)
        return real(_ScaledGrad.apply(q), _ScaledGrad.apply(k), _ScaledGrad.apply(v), impl=impl, scale=scale)

    monkeypatch.setattr(BL, "sdpa_bshd", wrong)
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, quick=True, log=lambda s: None)
    row = run_case(ctx, _dense_bwd_case(ctx))
    assert row["status"] == "parity-failed", row
    # and the right SDPA still passes
    monkeypatch.setattr(BL, "sdpa_bshd", real)
    row = run_case(ctx, _dense_bwd_case(ctx))
    assert row["status"] == "ok" and row["rel_l2"] < 1e-5, row


def test_report_pipeline_table_names_the_grid_of_each_row():
    """The README pipeline table had no grid (nor depth): a --shapes tiny,6x2x2 run rendered two
    "distill | off" rows of different times that nothing told apart (and a GPU run's 48x44x80 refine
    rows read as if on the 480p grid of its distill rows). Each row now names its grid, the caption
    the depth."""
    from bench import report

    def row(grid, mode, cache, ms):
        return dict(suite="pipeline", case=f"{grid}/{mode}/{cache}", backend="auto", status="ok", grid=grid,
                    mode_name=mode, steps=2, batch=1, cond_frames=13, cond_latents=4, depth=1, cache=cache,
                    ms=ms, ms_per_step=ms / 2)

    rows = [row("24x2x4", "distill", "off", 100.0), row("24x2x4", "distill", "on", 50.0),
            row("6x2x2", "distill", "off", 10.0), row("6x2x2", "distill", "on", 8.0)]
    doc = {"machine": {}, "config": {"dtype": "float32"}, "rows": rows}
    text = report.pipeline_table(doc)
    lines = [ln for ln in text.splitlines() if ln.startswith("| ") and "distill" in ln]
    assert len(lines) == 4
    assert all("24x2x4" in ln for ln in lines[:2]) and all("6x2x2" in ln for ln in lines[2:]), text
    assert "depth 1" in text, text


def test_measure_without_warmup_keeps_to_its_budget():
    """measure() with warmup=0 (the pipeline suite: its parity check is the warm-up) sized the repetitions
    from an estimate of 0 s, i.e. always max_reps: the suite's 15 s budget and --budget were ignored (3
    whole denoising loops per case whatever they cost). The first timed run now sizes the rest."""
    import time

    from bench.timing import TimingPolicy, measure

    calls = []

    def slow(x):
        calls.append(x)
        time.sleep(0.05)

    t = measure(slow, [(0,), (1,)], "cpu", TimingPolicy(warmup=0, min_reps=1, max_reps=3, budget_s=0.01))
    assert t.runs == 1 and len(calls) == 1, (t, calls)
    calls.clear()
    t = measure(slow, [(0,), (1,)], "cpu", TimingPolicy(warmup=0, min_reps=1, max_reps=3, budget_s=10.0))
    assert t.runs == 3 and calls == [0, 1, 0], (t, calls)  # the first run is one of the samples, inputs rotate
    assert t.min_ms >= 50


def test_cached_attn_table_labels_the_prefix_speedup_baseline():
    """The printed cached-attn table put the prefix rows' speedup (vs the two-call SDPA) under the column
    "vs unfused": "c4/prefix torch 0.85" read as 0.85x of the unfused kv-cache path. The column now
    names both baselines, as the README table does ("vs unfused / 2 calls")."""
    from bench.suites import cached_attn

    rows = [dict(suite="cached-attn", case="c4/prefix", backend="sdpa-default-2call", status="ok", grid="24x2x4",
                 op="prefix", cond_frames=13, cond_latents=4, seq_q=192, seq_k=192, ms=2.0),
            dict(suite="cached-attn", case="c4/prefix", backend="torch", status="ok", grid="24x2x4", op="prefix",
                 cond_frames=13, cond_latents=4, seq_q=192, seq_k=192, ms=4.0)]
    from bench.suites import Context

    rows = cached_attn.finish(Context(device=torch.device("cpu"), dtype=torch.float32), rows)
    assert rows[1]["speedup"] == 0.5 and rows[1]["baseline"] == "sdpa-default-2call"
    header = cached_attn.table(rows).splitlines()[0]
    assert "vs unfused / 2call" in header, header


def test_report_bsa_table_says_when_no_block_sparse_case_was_timed():
    """A bsa run whose block-sparse cases all failed parity (or were skipped: a grid smaller than the
    chunk) but whose dense SDPA baselines were timed rendered a README table of headers alone: no row,
    no dense time, no word of the failures. It now says what happened to the block-sparse cases."""
    from bench import report

    common = dict(suite="bsa", grid="8x8x14", tokens=896, mode="fwd", batch=1, heads=2, head_dim=32)
    rows = [dict(common, case="dense", backend="sdpa-default", status="ok", kind="dense", chunk="-", sparsity=0.0,
                 ms=8.0),
            dict(common, case="s0.9375/gated", backend="triton", status="parity-failed", kind="gated",
                 chunk="4x4x4", sparsity=0.9375, reason="rel. L2 0.01 > tol 0.0001")]
    doc = {"machine": {}, "config": {"dtype": "float32"}, "rows": rows}
    text = report.bsa_table(doc)
    assert "parity-failed" in text and "sdpa-default 8.00" in text, text


def test_cli_refuses_budget_with_quick(capsys):
    """--quick --budget 20 ran the smoke run's fixed 2-3 runs per case and recorded budget 20 in the results'
    config: the flag was read by nothing (as --sparsity without the bsa suite, which is refused)."""
    import pytest

    from bench.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--quick", "--budget", "20", "--no-write", "--suite", "bsa"])
    assert "--budget" in str(e.value) and "--quick" in str(e.value), e.value


def test_cli_budget_default_still_one():
    """Without --budget the run's config records (and the policies use) a budget of 1."""
    from bench.cli import build_parser

    args = build_parser().parse_args([])
    from bench import cli

    assert cli._budget(args) == 1.0
    assert cli._budget(build_parser().parse_args(["--budget", "2.5"])) == 2.5


def test_cache_plot_draws_one_line_per_grid(monkeypatch, tmp_path):
    """The cache speedup plot drew the "on" rows of every grid as one line sorted by cond frames: a
    --shapes 480p,720p run zig-zagged between the two grids' speedups under one "measured" label. Each
    grid is now its own line (the bsa plot already keyed its lines by grid)."""
    from bench import report

    lines = []

    class _Ax:
        def plot(self, x, y, *a, label=None, **k):
            lines.append((label, list(x), list(y)))

        def __getattr__(self, name):
            return lambda *a, **k: None

    class _Fig:
        def tight_layout(self):
            pass

        def savefig(self, p, **k):
            open(p, "wb").close()

    class _Plt:
        def subplots(self, **k):
            return _Fig(), _Ax()

        def close(self, fig):
            pass

    monkeypatch.setattr(report, "require_matplotlib", lambda: _Plt())

    def on(grid, frames, c, sp):
        return dict(suite="cache", case=f"{grid}/c{c}/on", backend="auto", status="ok", mode="on", grid=grid,
                    cond_frames=frames, cond_latents=c, ms=1.0, speedup=sp, ideal_speedup=sp)

    rows = [on("24x30x52", 13, 4, 1.1), on("24x30x52", 61, 16, 2.5), on("24x44x80", 13, 4, 1.2),
            on("24x44x80", 61, 16, 2.6)]
    doc = {"machine": {"gpu": "X"}, "config": {}, "rows": rows}
    report.plot_results(doc, tmp_path)
    measured = [ln for ln in lines if ln[0].startswith("measured")]
    assert len(measured) == 2, lines
    assert sorted(m[2] for m in measured) == [[1.1, 2.5], [1.2, 2.6]], measured
    assert all("24x" in m[0] for m in measured), measured


def test_report_names_the_cases_a_table_leaves_out_for_failing(tmp_path):
    """The README tables show timed rows only: a run where the cuda kernel failed parity rendered the
    cached-attn table without its "cuda ms" column and named triton the best, with no word that cuda had
    failed (the newest run of a suite replaces the older table). The cases that failed parity or errored
    are now listed under the table."""
    import json

    from bench import report, writer

    machine = {"date": "2026-01-01T00:00:00Z", "device_slug": "x", "gpu": "X"}
    common = dict(suite="cached-attn", grid="24x2x4", op="kv-cache", cond_frames=13, cond_latents=4, seq_q=160,
                  seq_k=192, batch=2, heads=2, head_dim=32)
    rows = [dict(common, case="c4/kv-cache", backend="unfused", status="ok", ms=2.0),
            dict(common, case="c4/kv-cache", backend="triton", status="ok", ms=1.0, speedup=2.0),
            dict(common, case="c4/kv-cache", backend="cuda", status="parity-failed",
                 reason="rel. L2 0.3 > tol 0.01")]
    (tmp_path / "x").mkdir()
    doc = {"schema": writer.SCHEMA, "machine": machine, "config": {"quick": False, "dtype": "bfloat16"},
           "rows": rows}
    (tmp_path / "x" / "r.json").write_text(json.dumps(doc))
    text = report.render(tmp_path)
    assert "cuda ms" not in text
    assert "c4/kv-cache cuda: parity-failed" in text, text


def test_bsa_gating_check_refuses_wrong_blocks_at_high_sparsity(monkeypatch):
    """The gating check's measure was the fraction of differing entries of the whole [B, H, Nq, Nk] mask,
    bound 1%: at sparsity 0.9375 (6.25% of the entries kept) a gating that kept the wrong block for 2 of
    the 32 query blocks (6% of the kept blocks wrong) measured 0.0078 and was timed. The measure is now
    the fraction of kept blocks that differ (0 on H100/H200 in every committed run)."""
    import dataclasses

    import longcat_kernels as lk
    from bench.suites import Context, load_suite, run_case

    real = lk.select_blocks

    def wrong(q, k, *, backend="auto", **kw):
        sel = real(q, k, backend=backend, **kw)
        if backend == "torch":  # the oracle stays right
            return sel
        idx = sel.indices.clone()
        nk = sel.num_k_blocks
        idx[0, 0, :2, 0] = (idx[0, 0, :2, 0] + 1) % nk  # another block for two query blocks of head 0
        return dataclasses.replace(sel, indices=idx)

    monkeypatch.setattr(lk, "select_blocks", wrong)
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, quick=True, backends=["auto"],
                  log=lambda s: None)
    gating = [c for c in load_suite("bsa").cases(ctx) if c.params.get("kind") == "gating"]
    assert gating
    for case in gating:
        row = run_case(ctx, case)
        assert row["status"] == "parity-failed", row
    monkeypatch.setattr(lk, "select_blocks", real)
    for case in gating:
        row = run_case(ctx, case)
        assert row["status"] == "ok" and row["rel_l2"] == 0, row


def test_csv_rewrite_cut_short_leaves_the_previous_whole_file(tmp_path, monkeypatch):
    """The results are rewritten after every suite; the JSON through a temporary file, the CSV in place: a
    run killed while writing it (after its second suite) left a CSV cut short, the first suite's rows lost.
    The CSV is now replaced whole as well."""
    import csv

    import pytest

    from bench import writer

    machine = {"date": "2026-01-01T00:00:00Z", "device_slug": "cpu-x", "cpu": "x"}
    rows = [dict(suite="bsa", case=f"c{i}", backend="torch", status="ok", ms=1.0 + i) for i in range(3)]
    _, cpath = writer.write_results(tmp_path, machine, {"quick": True}, rows[:2], "run")
    before = cpath.read_text()

    real = csv.DictWriter.writerow
    n = {"rows": 0}

    def killed(self, row):
        n["rows"] += 1
        if n["rows"] > 1:
            raise KeyboardInterrupt
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.write_results(tmp_path, machine, {"quick": True}, rows, "run")
    assert cpath.read_text() == before
