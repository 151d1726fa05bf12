"""Round 53 (bench audit): result files the report took as read (NaN/inf/negative times stored as strings,
a repeated case, a cache speedup edited apart from its times, an H200 run relabelled into h100/), timing
policies that timed no run, and a fresh CLI run round-tripping through ``bench.report --check``."""

from __future__ import annotations

import copy
import json
import random

import pytest

from bench import writer


def _doc():
    r = random.Random()
    off, on = r.uniform(50, 100), r.uniform(5, 40)
    common = dict(suite="cache", grid="8x8x14", cond_frames=13, cond_latents=4, depth=2, hidden=64, batch=1,
                  backend="torch", status="ok", runs=3)
    rows = [dict(common, case="c4/off", mode="off", ms=off, ms_min=off * 0.9),
            dict(common, case="c4/on", mode="on", ms=on, ms_min=on * 0.9, speedup=off / on)]
    machine = {"date": "2026-12-01T00:00:00Z", "device_slug": "h100", "gpu": "NVIDIA H100 80GB HBM3",
               "torch": "2.13.0"}
    return {"schema": writer.SCHEMA, "machine": machine, "config": {"quick": False, "dtype": "float32"},
            "rows": rows}


def _write(tmp_path, doc, folder="h100"):
    (tmp_path / folder).mkdir(exist_ok=True)
    p = tmp_path / folder / "bench-cache_20261201T000000Z.json"
    p.write_text(json.dumps(writer._clean(doc)))
    return p


def test_a_good_document_is_read(tmp_path):
    _write(tmp_path, _doc())
    assert writer.latest_results(tmp_path)["h100"]["cache"]["rows"][1]["speedup"] > 1


@pytest.mark.parametrize("key,value", [("ms", float("nan")), ("ms", float("inf")), ("ms", -1.0), ("ms", 0.0),
                                       ("ms", "12"), ("ms", True), ("ms_min", float("nan")), ("ms_min", -0.5),
                                       ("runs", 0), ("runs", 2.5)])
def test_report_refuses_a_timed_row_with_a_bad_time(tmp_path, key, value):
    doc = _doc()
    doc["rows"][0][key] = value  # NaN/inf go through the writer's string form, as a run stores them
    p = _write(tmp_path, doc)
    with pytest.raises(ValueError, match=rf"{p.name}: rows\[0\].*'{key}'"):
        writer.latest_results(tmp_path)


def test_report_refuses_a_minimum_above_the_median(tmp_path):
    doc = _doc()
    doc["rows"][1]["ms_min"] = doc["rows"][1]["ms"] * 2
    _write(tmp_path, doc)
    with pytest.raises(ValueError, match=r"rows\[1\].*ms_min.*above the median"):
        writer.latest_results(tmp_path)


def test_report_refuses_a_repeated_case(tmp_path):
    doc = _doc()
    doc["rows"].append(copy.deepcopy(doc["rows"][0]))
    _write(tmp_path, doc)
    with pytest.raises(ValueError, match=r"rows\[2\] repeats rows\[0\].*c4/off"):
        writer.latest_results(tmp_path)


def test_report_refuses_a_cache_speedup_apart_from_its_times(tmp_path):
    doc = _doc()
    doc["rows"][1]["speedup"] *= 1.5
    _write(tmp_path, doc)
    with pytest.raises(ValueError, match=r"rows\[1\].*'speedup'.*off/on ms"):
        writer.latest_results(tmp_path)
    doc = _doc()
    doc["rows"][0]["ms"] *= 1.1  # a re-timed off row whose on row kept the old speedup
    doc["rows"][0]["ms_min"] = doc["rows"][0]["ms"] * 0.9
    _write(tmp_path, doc)
    with pytest.raises(ValueError, match=r"'speedup'"):
        writer.latest_results(tmp_path)
    doc = _doc()
    doc["rows"][0]["status"] = "error"  # speedup with no timed off row
    _write(tmp_path, doc)
    with pytest.raises(ValueError, match=r"no timed cache-off row"):
        writer.latest_results(tmp_path)


def test_report_refuses_an_h200_run_relabelled_for_h100(tmp_path):
    doc = _doc()
    doc["machine"]["gpu"] = "NVIDIA H200"
    _write(tmp_path, doc)
    with pytest.raises(ValueError, match=r"device_slug.*'h100'.*H200.*'h200'"):
        writer.latest_results(tmp_path)
    del doc["machine"]["device_slug"]  # without the slug, the folder is checked against the GPU itself
    _write(tmp_path, doc)
    with pytest.raises(ValueError, match=r"'h200'.*folder 'h100'"):
        writer.latest_results(tmp_path)


@pytest.mark.parametrize("kw,name", [(dict(min_reps=0), "min_reps"), (dict(min_reps=-3), "min_reps"),
                                     (dict(min_reps=5, max_reps=2), "max_reps"), (dict(warmup=-1), "warmup"),
                                     (dict(budget_s=float("nan")), "budget_s"), (dict(budget_s=float("inf")), "budget_s"),
                                     (dict(budget_s=-1.0), "budget_s"), (dict(min_reps=2.0), "min_reps")])
def test_timing_policy_refuses_what_would_time_no_or_too_few_runs(kw, name):
    from bench.timing import TimingPolicy

    with pytest.raises(ValueError, match=rf"^{name}:"):
        TimingPolicy(**kw)


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_measure_reports_at_least_min_reps_runs(warmup):
    import time

    from bench.timing import TimingPolicy, measure

    calls = []

    def slow(i):
        calls.append(i)
        time.sleep(0.002)

    t = measure(slow, [(0,), (1,)], "cpu", TimingPolicy(warmup=warmup, min_reps=4, max_reps=6, budget_s=0.0))
    assert t.runs == 4 and len(calls) == 4 + (max(warmup, 2) if warmup else 0)
    assert 0 < t.min_ms <= t.median_ms


def test_measure_does_not_report_a_failed_run():
    from bench.timing import TimingPolicy, measure

    n = []

    def flaky(x):
        n.append(x)
        if len(n) == 4:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        measure(flaky, [(0,)], "cpu", TimingPolicy(warmup=1, min_reps=5, max_reps=5, budget_s=0.0))


def test_cli_run_round_trips_through_report_check(tmp_path, capsys, monkeypatch):
    """A fresh (non-quick) run: every header field, symlinked --out, then report --write / --check on it."""
    from bench import report
    from bench.cli import main

    real = tmp_path / "real"
    link = tmp_path / "results"
    real.mkdir()
    link.symlink_to(real, target_is_directory=True)
    header = __import__("bench.machine", fromlist=["x"]).machine_header("cpu")
    out = link / header["device_slug"]
    seed = random.randrange(1000)
    rc = main(["--suite", "cache", "--shapes", "tiny", "--cond-frames", "13", "--depth", "1", "--budget", "0.01",
               "--device", "cpu", "--seed", str(seed), "--out", str(out)])
    assert rc == 0, capsys.readouterr().out[-2000:]
    (jp,) = out.glob("*.json")
    doc = writer.load_results(jp)
    for key in ("date", "device_slug", "torch", "python", "cpu"):
        assert doc["machine"].get(key), key
    on = next(r for r in doc["rows"] if r.get("mode") == "on" and r["status"] == "ok")
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{report.START}\n{report.END}\n")
    assert report.main(["--results", str(link), "--readme", str(readme), "--write"]) == 0
    assert report.main(["--results", str(link), "--readme", str(readme), "--check"]) == 0
    assert f"{on['speedup']:.2f}x" in readme.read_text()
    doc["rows"][0]["ms"] = float("nan")  # a hand edit of the same file
    doc.pop("_path", None)
    jp.write_text(json.dumps(writer._clean(doc)))
    with pytest.raises(SystemExit, match=r"'ms' must be a finite time"):
        report.main(["--results", str(link), "--readme", str(readme), "--check"])
