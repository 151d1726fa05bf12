"""Round 80: mutation testing of the numbers we publish (bench/ FLOP formulas, timing harness, derived
columns, results index; longcat_vc/flops.py; the memory estimate and fit check of longcat_vc/memory.py and
memory_report.py).

Found: 72 single-point mutants, each applied alone to the product code and run against the existing tests
that name the function (bench formula / smoke / round 26, 33, 41, 53 bench files; vc memory, refine-fit and
round 28 / 40 memory files). 20 survived as test gaps and are killed by the tests below (each verified:
fails with its mutant applied, passes on the product code); 2 are equivalent (explained in the table).
No product bug: every survivor's code computes what its docstring says, it was only unpinned: the
block-sparse density in the DiT FLOP count; the percentile index and the matmul peak's 2 n^3; the ratio
direction of the bsa / cached-attn / cache-MFU columns and the bsa baseline choice; median vs mean / min
of a case's row and its TFLOP/s; the memory estimate's cache-off activations, streamed text encoder, build
activations and bytes, encode working set, context-parallel slots; the fit check's margin (check and hint)
and the stage it names.

Columns: id, file, mutation, result under the existing tests, result under this file ("-": not targeted,
the existing tests kill it), note.

    F1   bench/flops.py               bench.flops.attn_flops: 4 -> 2 FLOPs per (q,k,d)               killed   -
    F2   bench/flops.py               BWD_FACTOR 2.5 -> 2.0                                          killed   -
    F3   bench/flops.py               attn_flops backward: x BWD instead of x (1 + BWD)              killed   -
    F4   bench/flops.py               prefix_attn_flops: noisy queries see only noisy keys           killed   -
    F5   bench/flops.py               prefix_attn_flops: cond queries see all keys                   killed   -
    F6   bench/flops.py               visited_pairs: mean query-block size instead of each block's   killed   -
    F7   bench/flops.py               visited_pairs: key block 0 taken as padding (idx > 0)          killed   -
    F8   bench/flops.py               bsa_effective_flops: 4 -> 2                                    killed   -
    F9   bench/flops.py               bsa_effective_flops backward: x BWD instead of x (1 + BWD)     killed   -
    F10  bench/flops.py               dit_step_flops cache on: noisy keys only                       killed   -
    F11  bench/flops.py               dit_step_flops cache off: prefix rule dropped (cond sees all keys) killed   -
    F12  bench/flops.py               kv_cache_build_flops: skipped attention 4 -> 2                 killed   -
    F13  bench/flops.py               kv_cache_build_flops: final layer not subtracted               killed   -
    F14  bench/flops.py               ideal_cache_speedup inverted (on / off)                        killed   -
    F15  bench/flops.py               tflops: ms taken as seconds                                    killed   -
    F16  bench/flops.py               kv_cache_build_flops: skipped proj 2C^2 -> 6C^2                killed   -
    V1   longcat_vc/flops.py          dit_forward_flops: proj 2C^2 dropped                           killed   killed
    V2   longcat_vc/flops.py          FFN 6CF -> 4CF                                                 killed   killed
    V3   longcat_vc/flops.py          self-attention 4C -> 2C                                        killed   killed
    V4   longcat_vc/flops.py          cond queries over all keys                                     killed   killed
    V5   longcat_vc/flops.py          cross-attention for cond tokens too                            killed   killed
    V6   longcat_vc/flops.py          text kv 4C^2 -> 2C^2                                           killed   killed
    V7   longcat_vc/flops.py          final linear dropped from outside                              killed   killed
    V8   longcat_vc/flops.py          caption C^2 term dropped                                       killed   killed
    V9   longcat_vc/flops.py          self_attn_density ignored                                      survived killed   gap: killed by this file
    V10  longcat_vc/flops.py          cross-attention 4CL -> 2CL                                     killed   killed
    T1   bench/timing.py              summarize: median -> mean                                      killed   killed
    T2   bench/timing.py              _percentile: q*(n-1) -> q*n                                    survived killed   gap: killed by this file
    T3   bench/timing.py              reps_for: est / budget                                         killed   killed
    T4   bench/timing.py              warm-up: policy.warmup calls only (inputs not all visited)     killed   killed
    T5   bench/timing.py              first timed run not subtracted from reps                       killed   killed
    T6   bench/timing.py              spread: / p80 instead of / median                              killed   killed
    T7   bench/timing.py              interleaved: min of rounds instead of median                   killed   killed
    T8   bench/timing.py              matmul peak: n^3 instead of 2 n^3                              survived killed   gap: killed by this file
    T9   bench/timing.py              spread mark at 2x SPREAD_LIMIT                                 killed   killed
    T10  bench/timing.py              min_ms = slowest run                                           killed   killed
    T11  bench/timing.py              spread from p10/p90                                            killed   killed
    T12  bench/timing.py              reps_for: min/max clamp order swapped                          survived survived equivalent: min_reps <= max_reps is enforced by TimingPolicy, so both clamp orders agree
    S1   bench/suites/bsa.py          bsa.finish speedup inverted                                    survived killed   gap: killed by this file
    S2   bench/suites/bsa.py          bsa.finish: slowest dense SDPA as baseline                     survived killed   gap: killed by this file
    S3   bench/suites/cache.py        cache.finish ideal_speedup inverted                            killed   -
    S4   bench/suites/__init__.py     run_case TFLOP/s from min_ms                                   survived killed   gap: killed by this file
    S5   bench/suites/pipeline.py     pipeline ms_per_step = total ms                                survived killed   gap: killed by this file
    S6   bench/suites/cached_attn.py  cached_attn vs_prebuilt inverted                               survived killed   gap: killed by this file
    S7   bench/suites/cache.py        cache MFU inverted                                             survived killed   gap: killed by this file
    S8   bench/suites/__init__.py     run_case ms = mean                                             survived killed   gap: killed by this file
    S9   bench/writer.py              latest_results: first file wins, not newest date               killed   killed
    S10  bench/suites/bsa.py          bsa gating share inverted                                      survived killed   gap: killed by this file
    M1   longcat_vc/memory.py         estimate: 1 streamed block resident instead of 2               killed   killed
    M2   longcat_vc/memory.py         KV cache: K only (no factor 2)                                 killed   killed
    M3   longcat_vc/memory.py         offloaded cache: 1 layer instead of 2                          killed   killed
    M4   longcat_vc/memory.py         cache off: cond tokens' activations dropped                    survived killed   gap: killed by this file
    M5   longcat_vc/memory.py         activations: batch dropped                                     killed   killed
    M6   longcat_vc/memory.py         streamed text encoder: 0 bytes in text stage                   survived killed   gap: killed by this file
    M7   longcat_vc/memory.py         denoise: cache term dropped                                    killed   killed
    M8   longcat_vc/memory.py         cache_build: activations dropped                               survived killed   gap: killed by this file
    M9   longcat_vc/memory.py         fit: need < budget (boundary refused)                          killed   killed
    M10  longcat_vc/memory.py         fit: margin not applied                                        survived killed   gap: killed by this file
    M11  longcat_vc/memory.py         hint: mode offered without the margin                          survived killed   gap: killed by this file
    M12  longcat_vc/memory.py         fp8 scales 2 bytes                                             killed   killed
    M13  longcat_vc/memory.py         LoRA 30C -> 20C                                                killed   killed
    M14  longcat_vc/memory.py         usable_bytes: allocator's free blocks ignored                  killed   killed
    M15  longcat_vc/memory.py         usable_bytes: allocated not subtracted from the cap            killed   killed
    M16  longcat_vc/memory.py         sp slots: floor instead of ceil                                survived killed   gap: killed by this file
    M17  longcat_vc/memory.py         cfg_parallel: batch not halved                                 killed   killed
    M18  longcat_vc/memory.py         error names the smallest stage                                 survived killed   gap: killed by this file
    M19  longcat_vc/memory.py         vae_encode: decode working set dropped                         survived killed   gap: killed by this file
    M20  longcat_vc/memory.py         build activations: bytes per element dropped                   survived killed   gap: killed by this file
    M21  longcat_vc/memory.py         cond latents ceil(cf/4) for 1+(cf-1)//4                        survived survived equivalent: 1 + (n - 1) // 4 == ceil(n / 4) for every n >= 0 (num_cond_frames >= 0 is enforced)
    M22  longcat_vc/memory.py         context parallel: cache not split across ranks                 killed   killed
    R1   longcat_vc/memory_report.py  memory_report table in GB (1e9) not GiB                        killed   -
    R2   longcat_vc/memory_report.py  memory_report --refine: cond frames not doubled                killed   -
"""

from __future__ import annotations

import json
import math
import os
import random

import pytest
import torch


def _seed() -> int:
    """A fresh seed per test run, put in every assert message."""
    return int.from_bytes(os.urandom(4), "little")

# ------------------------------------------------------------------------------------------ FLOPs


def test_dit_forward_flops_scales_only_self_attention_by_the_density():
    """Block-sparse attention visits a fraction d of the keys: only the self-attention products (QK^T, PV)
    shrink by d; the projections, FFN, cross-attention and embeddings do not. d was accepted and checked
    but no test read a count with d != 1 (dropping it from the formula passed)."""
    from longcat_vc.flops import dit_forward_flops
    from tests.test_bench_formulas import _cfg, _hand_terms

    seed = _seed()
    rng = random.Random(seed)
    cfg = _cfg()
    t = _hand_terms(cfg)
    C, depth = cfg.hidden_size, cfg.depth
    for _ in range(5):
        d = rng.uniform(0.05, 0.95)
        B, L = rng.randint(1, 3), rng.randint(0, 9)
        S = rng.randint(2, 200)
        Sc = rng.randint(0, S - 1)
        Sn = S - Sc
        dense = t["qkv"] + t["proj"] + t["ffn"]
        cross = t["cross_q"] + t["cross_out"] + 4 * C * L
        block = S * dense + d * 4 * C * (Sc * Sc + Sn * S) + Sn * cross + L * t["cross_kv"]
        want = B * (depth * block + S * (t["patch"] + t["final"]) + L * t["caption"])
        got = dit_forward_flops(cfg, S, S, L, B, prefix_tokens=Sc, self_attn_density=d)
        assert got == pytest.approx(want, rel=1e-12), (seed, d, B, L, S, Sc)
        # d = 0 leaves exactly the non-attention work
        got0 = dit_forward_flops(cfg, S, S, L, B, prefix_tokens=Sc, self_attn_density=0.0)
        assert got - got0 == pytest.approx(B * depth * d * 4 * C * (Sc * Sc + Sn * S), rel=1e-9), (seed, d)
# ------------------------------------------------------------------------------------------ timing


def _ref_percentile(vals, q):
    """Linear interpolation between closest ranks (numpy's default), written out."""
    s = sorted(vals)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def test_summarize_median_min_percentiles_and_spread_on_skewed_samples():
    """Skewed random samples (a few slow outliers) so that median != mean, p20/p80 != p10/p90 and the
    spread's denominator (the median) differs from p80 or the mean."""
    from bench.timing import summarize

    seed = _seed()
    rng = random.Random(seed)
    for _ in range(20):
        n = rng.randint(2, 40)
        vals = [rng.uniform(1.0, 2.0) for _ in range(n)]
        for i in rng.sample(range(n), max(1, n // 5)):
            vals[i] *= rng.uniform(5, 50)  # outliers: the mean moves, the median hardly
        t = summarize(vals, "x")
        s = sorted(vals)
        med = (s[(n - 1) // 2] + s[n // 2]) / 2
        p20, p80 = _ref_percentile(vals, 0.2), _ref_percentile(vals, 0.8)
        assert t.median_ms == pytest.approx(med, rel=1e-12), (seed, vals)
        assert t.mean_ms == pytest.approx(sum(vals) / n, rel=1e-12), (seed, vals)
        assert (t.min_ms, t.runs) == (s[0], n), (seed, vals)
        assert (t.p20_ms, t.p80_ms) == (pytest.approx(p20, rel=1e-12), pytest.approx(p80, rel=1e-12)), (seed, vals)
        assert t.spread == pytest.approx((p80 - p20) / med, rel=1e-12), (seed, vals)
        assert not math.isnan(t.spread)


def test_measure_warmup_and_timed_call_counts(monkeypatch):
    """warmup > 0: max(warmup, len(inputs)) untimed calls (every input set once), then exactly
    clamp(budget / est) timed ones; warmup 0: the first timed call sizes the run and is one of the runs.
    The estimate is the last warm-up call (here a fake clock makes each call cost a known time)."""
    from bench import timing

    seed = _seed()
    rng = random.Random(seed)
    for _ in range(6):
        n_in = rng.randint(1, 5)
        warm = rng.randint(0, 6)
        cost_s = rng.choice([2.0**-6, 2.0**-5, 2.0**-4])  # exact in binary: a fake clock without rounding
        budget = rng.choice([0.1, 0.3, 0.7])  # no exact multiple of a cost
        lo, hi = rng.randint(1, 4), rng.randint(8, 40)
        now = [0.0]
        monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])
        calls = []

        def fn(i):
            calls.append(i)
            now[0] += cost_s

        pol = timing.TimingPolicy(warmup=warm, min_reps=lo, max_reps=hi, budget_s=budget)
        t = timing.measure(fn, [(i,) for i in range(n_in)], "cpu", pol)
        want_reps = max(lo, min(hi, int(budget / cost_s)))
        n_warm = max(warm, n_in) if warm > 0 else 0
        assert t.runs == want_reps, (seed, n_in, warm, cost_s, budget, lo, hi, t.runs)
        assert len(calls) == n_warm + want_reps, (seed, n_in, warm, len(calls))
        assert set(calls[:n_warm]) == (set(range(n_in)) if warm else set()), (seed, calls)
        # rotation continues through the inputs
        assert calls[n_warm:] == [i % n_in for i in range(want_reps)], (seed, calls)
        assert t.median_ms == pytest.approx(cost_s * 1e3), seed


def test_reps_for_is_budget_over_call_time_clamped():
    from bench.timing import TimingPolicy

    seed = _seed()
    rng = random.Random(seed)
    for _ in range(50):
        lo = rng.randint(1, 10)
        hi = rng.randint(lo, 200)
        budget = rng.uniform(0.0, 5.0)
        est = rng.uniform(1e-4, 1.0)
        want = min(hi, max(lo, math.floor(budget / est)))
        assert TimingPolicy(min_reps=lo, max_reps=hi, budget_s=budget).reps_for(est) == want, (seed, lo, hi, budget, est)
    assert TimingPolicy(min_reps=3, max_reps=9).reps_for(0.0) == 9


def test_interleaved_reports_the_median_of_round_medians(monkeypatch):
    """Round medians chosen so that their median, mean, min and max all differ."""
    from bench import timing

    seed = _seed()
    rng = random.Random(seed)
    rounds = rng.choice([3, 5, 7])
    per_round = {k: [rng.uniform(1, 100) for _ in range(rounds)] for k in ("a", "b")}
    it = {k: iter(v) for k, v in per_round.items()}

    def fake_measure(fn, inputs, device, policy):
        v = next(it[fn])
        return timing.Timing(v, v, v, v, v, 1, "fake", 0.0)

    monkeypatch.setattr(timing, "measure", fake_measure)
    ms, per = timing.interleaved({"a": "a", "b": "b"}, [()], "cpu", timing.TimingPolicy(), rounds)
    for k, v in per_round.items():
        assert per[k] == v, seed
        assert ms[k] == sorted(v)[rounds // 2], (seed, k, v)


def test_matmul_peak_is_two_n_cubed_over_the_median(monkeypatch):
    """The MFU denominator: 2 n^3 FLOPs per n x n matmul over its median time (not its minimum)."""
    from bench import timing

    seed = _seed()
    rng = random.Random(seed)
    med, mn = rng.uniform(1.0, 3.0), rng.uniform(0.1, 0.9)
    monkeypatch.setattr(timing, "measure", lambda fn, sets, dev, pol: timing.Timing(med, mn, med, mn, med, 5, "f", 0.1))
    n = rng.choice([8, 16, 24])
    peak, t = timing.matmul_peak_tflops("cpu", torch.float32, n=n)
    assert t.median_ms == med
    assert peak == pytest.approx(2 * n * n * n / (med / 1e3) / 1e12, rel=1e-12), (seed, n, med)


def test_spread_mark_follows_the_limit():
    """A row just above SPREAD_LIMIT is marked, one just below is not (read from the row's own spread)."""
    from bench.timing import SPREAD_LIMIT, SPREAD_MARK, ms_cell

    seed = _seed()
    rng = random.Random(seed)
    ms = rng.uniform(1, 100)
    assert ms_cell({"ms": ms, "spread": SPREAD_LIMIT * 1.01}).endswith(SPREAD_MARK), seed
    assert not ms_cell({"ms": ms, "spread": SPREAD_LIMIT * 0.99}).endswith(SPREAD_MARK), seed
    # older files: from p20 / p80, relative to the median
    p20 = ms * (1 - 0.03)
    assert ms_cell({"ms": ms, "ms_p20": p20, "ms_p80": p20 + ms * SPREAD_LIMIT * 1.05}).endswith(SPREAD_MARK), seed
    assert not ms_cell({"ms": ms, "ms_p20": p20, "ms_p80": p20 + ms * SPREAD_LIMIT * 0.95}).endswith(SPREAD_MARK), seed
# ------------------------------------------------------------------------------------------ derived columns


def _ctx(peak):
    from bench.suites import Context

    return Context(device=torch.device("cpu"), dtype=torch.float32, peak_tflops=peak, log=lambda s: None)


def test_bsa_finish_speedup_is_fastest_dense_over_sparse_and_mfu_over_the_peak():
    """speedup = (fastest dense SDPA of the same grid and pass) / (sparse ms): > 1 when the sparse kernel is
    faster; MFU = TFLOP/s / measured peak; the gating share = gating ms / gated forward ms."""
    from bench.suites import bsa

    seed = _seed()
    rng = random.Random(seed)
    peak = rng.uniform(100, 900)
    d_fast, d_slow = sorted(rng.uniform(1, 10) for _ in range(2))
    d_slow += 1.0  # two dense backends whose times differ
    g_ms, r_ms, gating_ms = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.01, 0.09)
    tf = rng.uniform(1, 500)
    common = dict(suite="bsa", grid="g1", status="ok")
    rows = [dict(common, kind="dense", mode="fwd", backend="slow", ms=d_slow, sparsity=0.0, chunk="-"),
            dict(common, kind="dense", mode="fwd", backend="fast", ms=d_fast, sparsity=0.0, chunk="-"),
            dict(common, kind="gated", mode="fwd", backend="triton", ms=g_ms, sparsity=0.9, chunk="4x4x4", tflops=tf),
            dict(common, kind="reused", mode="fwd", backend="triton", ms=r_ms, sparsity=0.9, chunk="4x4x4"),
            dict(common, kind="gating", mode="fwd", backend="triton", ms=gating_ms, sparsity=0.9, chunk="4x4x4")]
    rng.shuffle(rows)
    out = {(r["kind"], r["backend"]): r for r in bsa.finish(_ctx(peak), rows)}
    assert out[("gated", "triton")]["speedup"] == pytest.approx(d_fast / g_ms, rel=1e-12), seed
    assert out[("reused", "triton")]["speedup"] == pytest.approx(d_fast / r_ms, rel=1e-12), seed
    assert out[("gated", "triton")]["baseline"].startswith("fast "), seed
    assert out[("gated", "triton")]["mfu"] == pytest.approx(tf / peak, rel=1e-12), seed
    assert "speedup" not in out[("gating", "triton")], seed
    assert out[("gating", "triton")]["share_of_fwd"] == pytest.approx(gating_ms / g_ms, rel=1e-12), seed


def test_cache_finish_speedup_ideal_and_mfu_directions():
    from bench.suites import cache

    seed = _seed()
    rng = random.Random(seed)
    peak = rng.uniform(100, 900)
    off_ms, on_ms = rng.uniform(5, 10), rng.uniform(1, 4)
    tf_on = rng.uniform(1, 400)
    rows = [dict(suite="cache", grid="g", cond_latents=2, mode="off", status="ok", ms=off_ms),
            dict(suite="cache", grid="g", cond_latents=2, mode="on", status="ok", ms=on_ms, tflops=tf_on)]
    out = cache.finish(_ctx(peak), rows)
    on = out[1]
    assert on["speedup"] == pytest.approx(off_ms / on_ms, rel=1e-12), seed
    assert on["mfu"] == pytest.approx(tf_on / peak, rel=1e-12), seed


def test_cached_attn_finish_ratios_are_baseline_over_ours():
    from bench.suites import cached_attn

    seed = _seed()
    rng = random.Random(seed)
    ours, unf, pre_fast, pre_slow, two, pfx = (rng.uniform(1, 10) for _ in range(6))
    pre_fast, pre_slow = sorted((pre_fast, pre_slow))
    pre_slow += 1.0
    base = dict(suite="cached-attn", grid="g", cond_latents=3, status="ok")
    rows = [dict(base, op="cached", backend="triton", ms=ours),
            dict(base, op="cached", backend="unfused", ms=unf),
            dict(base, op="cached", backend="sdpa-prebuilt", ms=pre_slow),
            dict(base, op="cached", backend="cudnn-prebuilt", ms=pre_fast),
            dict(base, op="prefix", backend="sdpa-2call", ms=two),
            dict(base, op="prefix", backend="triton", ms=pfx)]
    out = cached_attn.finish(_ctx(None), rows)
    assert out[0]["speedup"] == pytest.approx(unf / ours, rel=1e-12), seed
    assert out[0]["vs_prebuilt"] == pytest.approx(pre_fast / ours, rel=1e-12), seed
    assert out[5]["speedup"] == pytest.approx(two / pfx, rel=1e-12), seed


def test_pipeline_finish_per_step_time_and_speedup():
    from bench.suites import pipeline

    seed = _seed()
    rng = random.Random(seed)
    steps = rng.randint(2, 50)
    off_ms, on_ms = rng.uniform(500, 900), rng.uniform(100, 400)
    rows = [dict(suite="pipeline", grid="g", mode_name="vc", cache="off", status="ok", ms=off_ms, steps=steps),
            dict(suite="pipeline", grid="g", mode_name="vc", cache="on", status="ok", ms=on_ms, steps=steps)]
    out = pipeline.finish(_ctx(None), rows)
    assert out[0]["ms_per_step"] == pytest.approx(off_ms / steps, rel=1e-12), seed
    assert out[1]["ms_per_step"] == pytest.approx(on_ms / steps, rel=1e-12), seed
    assert out[1]["speedup"] == pytest.approx(off_ms / on_ms, rel=1e-12), seed


def test_run_case_reports_the_median_and_a_rate_from_the_median(monkeypatch):
    """The row's ms is the median of the runs (not the mean, not the minimum), and TFLOP/s is the case's
    FLOPs over that median; a fake clock gives skewed run times so the three differ."""
    from bench import timing
    from bench.suites import Case, Prepared, run_case

    seed = _seed()
    rng = random.Random(seed)
    costs = [2.0**-rng.randint(4, 8) for _ in range(9)]
    costs[rng.randrange(9)] = 2.0  # one slow run
    warm = 1
    it = iter([2.0**-6] * warm + costs)
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def fn():
        now[0] += next(it)

    flops = rng.uniform(1e9, 1e12)
    pol = timing.TimingPolicy(warmup=warm, min_reps=9, max_reps=9, budget_s=0.0)
    case = Case("x", "c", "b", {}, lambda: Prepared(fn=fn, inputs=[()], check=None, flops=flops, policy=pol))
    row = run_case(_ctx(None), case)
    assert row["status"] == "ok", row
    med = sorted(costs)[4] * 1e3
    assert row["ms"] == pytest.approx(med, rel=1e-9), (seed, costs)
    assert row["ms_min"] == pytest.approx(min(costs) * 1e3, rel=1e-9), seed
    assert row["runs"] == 9, seed
    assert row["tflops"] == pytest.approx(flops / (med / 1e3) / 1e12, rel=1e-9), seed
    assert row["gflop"] == pytest.approx(flops / 1e9, rel=1e-12), seed


def test_results_index_takes_the_newest_run_whatever_the_file_order(tmp_path):
    """latest_results keeps, per device and suite, the document with the newest date; the folder lists
    files by name, which need not sort by date (a hand-renamed copy, a commit tag): the newer must win."""
    from bench import writer

    seed = _seed()
    rng = random.Random(seed)
    dev = tmp_path / "cpu-test"
    dev.mkdir()
    dates = ["2026-01-0%dT00:00:00Z" % d for d in (1, 2, 3)]
    names = ["a.json", "b.json", "c.json"]
    rng.shuffle(names)
    for name, date in zip(names, dates):
        doc = {"schema": writer.SCHEMA, "config": {"quick": False},
               "machine": {"date": date, "device_slug": "cpu-test", "gpu": None, "cpu": "test"},
               "rows": [{"suite": "pipeline", "case": "c", "backend": "b", "status": "ok", "ms": 1.0}]}
        (dev / name).write_text(json.dumps(doc))
    got = writer.latest_results(tmp_path)["cpu-test"]["pipeline"]
    assert got["machine"]["date"] == dates[-1], (seed, names)
# ------------------------------------------------------------------------------------------ memory


def _block_and_outside_params(cfg):
    """Parameters of one block and of the rest of the model, counted on a meta model here."""
    import dataclasses

    from longcat_vc.dit import LongCatDiT

    m = LongCatDiT(dataclasses.replace(cfg, depth=1), device="meta")
    blk = sum(p.numel() for p in m.blocks[0].parameters())
    return blk, sum(p.numel() for p in m.parameters()) - blk


def _stages_by_hand(cfg, mode, *, height, width, num_frames, num_cond_frames, batch, b, te_params, vae_params,
                    kv_cache=True, sp_size=1, cfg_parallel=False):
    """The estimate of ``longcat_vc.memory`` written out term by term from its documented model: weights of
    every component, the KV cache (SPEC 10: K and V of every cond token in every layer), activations
    (ACTIVATION_FACTOR x one [tokens, C] tensor per sample) and the VAE decode working set."""
    from longcat_vc.memory import ACTIVATION_FACTOR, VAE_DECODE_BYTES_PER_PIXEL

    blk, outside = _block_and_outside_params(cfg)
    C, depth = cfg.hidden_size, cfg.depth
    streams = mode != "resident"
    offload = mode == "low"
    t_lat = (num_frames - 1) // 4 + 1
    c = 1 + (num_cond_frames - 1) // 4  # SPEC 11: 13 cond frames -> 4 latents
    per_frame = (height // 16) * (width // 16)  # VAE 8x, patch 2x2
    slots = math.ceil(per_frame / sp_size)
    resident_blocks = 2 if streams else depth  # streamed: the computing block and the prefetched one
    dit_w = blk * b * resident_blocks + outside * b
    cache_all = 2 * (c * per_frame) * C * b * depth // sp_size if kv_cache else 0
    cache = 2 * cache_all // depth if offload else cache_all  # low: two layers' K/V on the device
    bl = batch // 2 if cfg_parallel and batch % 2 == 0 else batch
    denoise_tokens = (t_lat - c) * slots + (0 if kv_cache else c * slots)
    act_denoise = int(ACTIVATION_FACTOR * bl * denoise_tokens * C * b)
    act_build = int(ACTIVATION_FACTOR * c * slots * C * b)
    te_w, vae_w = te_params * b, vae_params * b
    te_text = te_w // 5 if streams else te_w  # streamed: UMT5's largest leaf, ~1/5 of it
    te_res = 0 if streams else te_w
    dec = int(VAE_DECODE_BYTES_PER_PIXEL * height * width)
    st = {"text": dit_w + te_text + vae_w, "vae_encode": dit_w + te_res + vae_w + dec,
          "cache_build": dit_w + te_res + vae_w + cache + act_build,
          "denoise": dit_w + te_res + vae_w + cache + act_denoise, "decode": dit_w + te_res + vae_w + dec}
    st["peak"] = max(st.values())
    return st


@pytest.mark.parametrize("mode", ["resident", "balanced", "low"])
def test_memory_estimate_every_stage_term_by_term(mode):
    """Every stage of the estimate against the hand model on random shapes, both cache settings, with and
    without CFG batch / context parallel: a term dropped (the cache in denoise, the build activations, the
    decode working set of the encode stage), the batch or the K-and-V factor lost, or the streamed block
    count wrong moves some stage by a term and fails here."""
    from longcat_vc.memory import estimate_peak_bytes
    from tests.vc.tiny_ckpt import tiny_config

    seed = _seed()
    rng = random.Random(seed)
    cfg = tiny_config(depth=rng.randint(3, 6))
    for _ in range(4):
        shape = dict(height=16 * rng.randint(1, 30), width=16 * rng.randint(1, 40))
        nf = 4 * rng.randint(2, 12) + 1
        ncf = rng.randint(1, nf - 5)
        batch, b = rng.randint(1, 4), rng.choice([2, 4])
        te, vae = rng.randint(0, 10**6), rng.randint(0, 10**5)
        for kv in (True, False):
            sp, cfgp = (rng.randint(1, 5), rng.random() < 0.5) if mode == "resident" else (1, False)
            got = estimate_peak_bytes(cfg, mode, num_frames=nf, num_cond_frames=ncf, batch=batch, dtype_bytes=b,
                                      text_encoder_params=te, vae_params=vae, kv_cache=kv, sp_size=sp,
                                      cfg_parallel=cfgp, **shape)
            want = _stages_by_hand(cfg, mode, num_frames=nf, num_cond_frames=ncf, batch=batch, b=b, te_params=te,
                                   vae_params=vae, kv_cache=kv, sp_size=sp, cfg_parallel=cfgp, **shape)
            assert got == want, (seed, mode, shape, nf, ncf, batch, b, kv, sp, cfgp)


def test_memory_estimate_fp8_scales_and_lora_bytes():
    """fp8: the large linears at 1 byte per weight plus one fp32 (4-byte) scale per output channel; LoRA rank r:
    r * 30 C elements per block in the compute dtype. Checked as a difference against the plain estimate,
    with the linears' shapes read off a meta block here."""
    import dataclasses

    from longcat_vc.dit import LongCatDiT
    from longcat_vc.fp8 import FP8_TARGETS
    from longcat_vc.memory import estimate_peak_bytes
    from tests.vc.tiny_ckpt import tiny_config

    seed = _seed()
    rng = random.Random(seed)
    cfg = tiny_config(depth=rng.randint(3, 6))
    blk = LongCatDiT(dataclasses.replace(cfg, depth=1), device="meta").blocks[0]
    ws = [blk.get_submodule(n).weight.shape for n in FP8_TARGETS]
    numel, rows = sum(s[0] * s[1] for s in ws), sum(s[0] for s in ws)
    b, rank = rng.choice([2, 4]), rng.randint(1, 64)
    for mode, nblocks in (("resident", cfg.depth), ("balanced", 2)):
        kw = dict(height=64, width=96, num_frames=17, num_cond_frames=5, dtype_bytes=b)
        base = estimate_peak_bytes(cfg, mode, **kw)["denoise"]
        fp8 = estimate_peak_bytes(cfg, mode, fp8=True, **kw)["denoise"]
        assert base - fp8 == nblocks * (numel * b - (numel * 1 + rows * 4)), (seed, mode)
        lora = estimate_peak_bytes(cfg, mode, lora_rank=rank, **kw)["denoise"]
        assert lora - base == nblocks * rank * 30 * cfg.hidden_size * b, (seed, mode, rank)


def test_fit_check_boundary_margin_and_hint_use_the_same_rule():
    """A mode fits when estimate x margin <= budget, exactly: at the boundary it is accepted, a byte below
    refused; the margin applies to the requested mode and to the mode the hint offers (a hint naming a mode
    that the check then refuses sent the user round in a circle)."""
    from longcat_vc.config import DiTConfig
    from longcat_vc.memory import MemoryModeError, check_memory_fits, estimate_peak_bytes

    seed = _seed()
    rng = random.Random(seed)
    cfg = DiTConfig.longcat_video()
    shape = dict(height=480, width=832, num_frames=93, num_cond_frames=rng.choice([13, 29, 45]),
                 batch=rng.choice([1, 2]))
    margin = rng.choice([1.0, 1.05, 1.25, 2.0])
    peaks = {m: estimate_peak_bytes(cfg, m, **shape)["peak"] for m in ("resident", "balanced", "low")}
    assert peaks["resident"] > peaks["balanced"] > peaks["low"], (seed, peaks)
    need = peaks["resident"] * margin
    assert check_memory_fits(cfg, "resident", "cuda:0", budget_bytes=need, margin=margin, **shape)["peak"] \
        == peaks["resident"], seed
    below = math.nextafter(need, 0)
    with pytest.raises(MemoryModeError, match=r"memory='resident'") as ei:
        check_memory_fits(cfg, "resident", "cuda:0", budget_bytes=below, margin=margin, **shape)
    assert f"needs about {need / 2**30:.1f} GiB" in str(ei.value), seed
    # the budget holds balanced's estimate but not estimate x margin: the hint must offer low, not balanced
    m2 = rng.choice([1.05, 1.1, 1.25])
    budget = peaks["balanced"] * (1 + m2) / 2
    assert peaks["balanced"] * m2 > budget >= peaks["low"] * m2, (seed, m2)
    with pytest.raises(MemoryModeError, match=r"memory='low' \(--memory low\) fits"):
        check_memory_fits(cfg, "resident", "cuda:0", budget_bytes=budget, margin=m2, **shape)
    # the stage named is the one holding the peak (resident, batch 2: denoise)
    est = estimate_peak_bytes(cfg, "resident", **shape)
    top = max((k for k in est if k != "peak"), key=est.get)
    with pytest.raises(MemoryModeError, match=rf"peak in stage '{top}'"):
        check_memory_fits(cfg, "resident", "cuda:0", budget_bytes=0, margin=margin, **shape)


def test_usable_bytes_is_free_plus_cached_under_the_cap(monkeypatch):
    """usable = min(driver free + allocator's reserved-but-unallocated, total x fraction - allocated) + own:
    each term is moved on its own with the others not binding."""
    from longcat_vc import memory as mem

    seed = _seed()
    rng = random.Random(seed)
    G = 2**30
    free, total = rng.randint(5, 20) * G, 80 * G
    alloc = rng.randint(1, 10) * G
    reserved = alloc + rng.randint(1, 10) * G
    frac, own = 1.0, rng.randint(0, 5) * G
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: alloc)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: reserved)
    monkeypatch.setattr(mem, "_memory_fraction", lambda d: frac)
    # the cap does not bind: free plus the allocator's free blocks
    assert mem.usable_bytes("cuda:0", own) == free + (reserved - alloc) + own, seed
    # the cap binds: total x fraction less what this process has allocated
    frac = (alloc + rng.randint(1, 4) * G) / total
    cap = int(total * frac) - alloc
    assert cap < free + (reserved - alloc), seed
    assert mem.usable_bytes("cuda:0", own) == cap + own, seed
