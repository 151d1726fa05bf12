"""Round 26 (bench audit): result files the README generator took for what they were not (a date it
could not order, a run of another device in a device's folder, a run of unknown quickness), and the
block-sparse suite's effective TFLOP/s counted from one input set's selection while the time is the
median over all of them."""

from __future__ import annotations

import json

import pytest
import torch


def _doc(date="2026-12-01T00:00:00Z", slug="h100", gpu="NVIDIA H100 80GB HBM3", quick=False, ms=20.0):
    base = dict(suite="bsa", grid="24x44x80", mode="fwd", chunk="4x4x4", status="ok", batch=1, heads=32,
                head_dim=128)
    rows = [dict(base, kind="dense", sparsity=0.0, backend="sdpa-cudnn", ms=200.0),
            dict(base, kind="gated", sparsity=0.9375, backend="cuda", ms=ms, speedup=200.0 / ms, tflops=300.0)]
    machine = {"date": date, "gpu": gpu}
    if slug is not None:
        machine["device_slug"] = slug
    config = {"dtype": "bfloat16"}
    if quick is not None:
        config["quick"] = quick
    return {"schema": "longcat-bench/1", "machine": machine, "config": config, "rows": rows}


def _write(d, name, doc):
    d.mkdir(exist_ok=True)
    (d / name).write_text(json.dumps(doc))


@pytest.mark.parametrize("date", ["unknown", "2026-12-09 00:00:00", "Mon Dec  7 2026", "2026-13-45T99:00:00Z"])
def test_report_refuses_a_date_it_cannot_order(tmp_path, date):
    """machine.date was compared as a string: "unknown" (or any text past "2") sorted after every real
    date, so a stale file with such a date shadowed every newer run of its suite in the README table."""
    from bench import report

    d = tmp_path / "h100"
    _write(d, "new.json", _doc("2026-12-05T00:00:00Z", ms=10.0))
    _write(d, "stale.json", _doc(date, ms=40.0))
    with pytest.raises(ValueError, match=r"stale\.json.*machine\.date"):
        report.render(tmp_path)
    with pytest.raises(SystemExit, match="machine.date"):
        report.main(["--results", str(tmp_path)])


def test_report_refuses_another_devices_run_in_a_device_folder(tmp_path):
    """An H200 run copied into bench/results/h100/ (newer) replaced the H100 table: the README showed
    the H200 numbers twice and the H100 ones nowhere, without a word."""
    from bench import report

    _write(tmp_path / "h100", "h100.json", _doc("2026-12-01T00:00:00Z", ms=20.0))
    _write(tmp_path / "h100", "h200.json", _doc("2026-12-02T00:00:00Z", slug="h200", gpu="NVIDIA H200", ms=10.0))
    with pytest.raises(ValueError, match=r"h200\.json.*h200.*h100"):
        report.render(tmp_path)
    # the same file in its own folder is fine
    (tmp_path / "h100" / "h200.json").unlink()
    _write(tmp_path / "h200", "h200.json", _doc("2026-12-02T00:00:00Z", slug="h200", gpu="NVIDIA H200", ms=10.0))
    text = report.render(tmp_path)
    assert "h100.json" in text and "h200.json" in text


@pytest.mark.parametrize("quick", [None, "false", 0])
def test_report_refuses_a_run_of_unknown_quickness(tmp_path, quick):
    """config.quick missing (or not true/false) read as a full run: a smoke run's numbers went to the
    README; "false" (a string) was truthy and hid a full run."""
    from bench import report

    _write(tmp_path / "h100", "a.json", _doc(quick=quick))
    with pytest.raises(ValueError, match=r"a\.json.*config\.quick"):
        report.render(tmp_path)


def test_bsa_effective_flops_are_those_of_the_timed_input_sets():
    """The gated/reused cases rotate several input sets, each with its own selection, and report the
    median time over all of them; the FLOPs were those of the first set's selection only: on a grid
    not divisible by the chunk the visited-token count differs by several % between sets, and the
    effective TFLOP/s carried that error. They are now the mean over the sets' selections."""
    from bench.shapes import parse_grid
    from bench.suites import Context, bsa

    seed = int(torch.randint(0, 2**31, ()).item())
    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, log=lambda m: None, seed=seed)
    grid = parse_grid("8x6x10")  # not divisible by 4x4x4: edge blocks of 2 and 4 tokens
    bhd = (1, 2, 16)
    case = bsa._sparse_case(ctx, grid, bhd, 0.75, "torch", variant="reused")
    prep = case.prepare()
    sels = [inp[3] for inp in prep.inputs]
    assert len(sels) > 1
    # independent count: enumerate every visited (query token, key token) pair from the dense mask
    from longcat_kernels.grid import block_sizes

    sizes = block_sizes(grid.shape, (4, 4, 4)).double()
    per_set = []
    for s in sels:
        mask = s.to_mask().double()  # [B, H, Nq, Nk]
        per_set.append(4.0 * bhd[2] * float(torch.einsum("bhqk,q,k->", mask, sizes, sizes)))
    assert max(per_set) != min(per_set), "the sets' selections visit the same number of tokens: no test"
    expect = sum(per_set) / len(per_set)
    assert prep.flops == pytest.approx(expect, rel=1e-12)


def _ctx(**kw):
    from bench.suites import Context

    return Context(device=torch.device("cpu"), dtype=torch.float32, log=lambda m: None, **kw)


def test_quick_bsa_runs_every_sparsity_named():
    """--quick --suite bsa --sparsity 0.5,0.75 timed 0.75 alone: the smoke run's trim to LongCat's level
    (meant for the default levels) dropped an explicitly named level without a row or a word."""
    from bench.suites import bsa

    names = [c.name for c in bsa.cases(_ctx(quick=True, sparsities=(0.5, 0.75)))]
    assert any("/s0.5/" in n for n in names) and any("/s0.75/" in n for n in names), names
    # the default levels are still trimmed to 0.9375 in a smoke run
    names = [c.name for c in bsa.cases(_ctx(quick=True))]
    assert any("/s0.9375/" in n for n in names) and not any("/s0.5/" in n for n in names), names


def test_quick_cached_attn_runs_every_cond_frames_named():
    """--quick --suite cached-attn --cond-frames 13,29,45 timed 13 and 45 only: 29 dropped without a row,
    while the cache suite ran all three in the same run."""
    from bench.suites import cached_attn

    cs = cached_attn.cases(_ctx(quick=True, cond_frames=(13, 29, 45)))
    lat = {c.params.get("cond_latents") for c in cs if c.params.get("op") == "kv-cache"}
    assert lat == {4, 8, 12}, lat
    cs = cached_attn.cases(_ctx(quick=True))  # defaults: shortest and longest
    assert {c.params.get("cond_latents") for c in cs if c.params.get("op") == "kv-cache"} == {4, 20}


def test_report_names_a_timed_cached_attn_row_without_its_time(tmp_path):
    """A timed cached-attn row without "ms" (a file edited by hand, an older writer) was a bare
    KeyError('ms') traceback from the table's best-of pick, naming neither the file nor the row."""
    from bench import report

    base = {"suite": "cached-attn", "case": "c4/kv-cache", "status": "ok", "op": "kv-cache", "cond_latents": 4,
            "grid": "24x2x4", "seq_q": 160, "seq_k": 192, "batch": 2, "heads": 2, "head_dim": 32}
    rows = [dict(base, backend="unfused", ms=2.0), dict(base, backend="torch", speedup=2.0)]
    doc = _doc(slug="cpu-x", gpu=None)
    doc["machine"]["cpu"] = "x"
    doc["rows"] = rows
    _write(tmp_path / "cpu-x", "a.json", doc)
    with pytest.raises(ValueError, match=r"a\.json: rows\[1\].*missing \['ms'\]"):
        report.render(tmp_path)
    with pytest.raises(SystemExit, match=r"missing \['ms'\]"):
        report.main(["--results", str(tmp_path)])


def test_cached_attn_reports_a_named_backend_that_cannot_run_prefix_attn():
    """--backends torch,cuda without the extension: the kv-cache cases of cuda were reported skipped with
    the reason, its prefix_attn cases were left out without a row (the table had no trace of them)."""
    from bench.suites import cached_attn

    cs = cached_attn.cases(_ctx(quick=True, backends=["torch", "cuda"], cond_frames=(13,)))
    prefix = [c for c in cs if c.name.endswith("/prefix")]
    by = {c.backend: c for c in prefix}
    assert "torch" in by and by["torch"].skip is None
    assert "cuda" in by and by["cuda"].skip, [(c.backend, c.skip) for c in prefix]
    assert by["cuda"].params.get("op") == "prefix"
