"""bench/memory_modes_gpu.py runs (``--smoke``: CPU, tiny components) and writes its JSON."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_memory_modes_script_smoke(tmp_path):
    out = tmp_path / "m.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "memory_modes_gpu.py"), "--out", str(out), "--smoke",
         "--depth", "2", "--variants", "distill", "--steps", "1", "--short-steps", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.load(open(out))
    rows = doc["dit_rows"]
    assert [(x["mode"], x["fp8"]) for x in rows] == [
        ("resident", False), ("balanced", False), ("low", False), ("resident", True), ("low", True)]
    assert all("error" not in x and x["finite"] for x in rows)
    # the streamed modes reproduce resident exactly; fp8 (emulated on CPU) is close, not equal
    assert all(x["equal_to_resident"] for x in rows if x["mode"] != "resident")
    fp8 = [x for x in rows if x["fp8"]]
    assert all(0 < x["rel_l2_step_vs_bf16"] < 0.1 for x in fp8)
    assert 0 < doc["fp8_short_run"]["rel_l2_final_latents_vs_bf16"] < 0.1
    assert doc["text"]["streamed_equal_to_resident"] is True
    assert set(doc["stage_table_gib"]) == {"distill/resident", "distill/balanced", "distill/low",
                                           "distill/resident/fp8", "distill/low/fp8"}
    assert "decode_480p_s" in doc["vae"]


@pytest.mark.skipif(not os.environ.get("LONGCAT_UPSTREAM_DIR"),
                    reason="set LONGCAT_UPSTREAM_DIR to a LongCat-Video checkout (upstream code is not in CI)")
def test_memory_modes_script_upstream_smoke(tmp_path):
    """--upstream: upstream's own DiT (random weights) measured at the same shapes, rows in the table."""
    out = tmp_path / "m.json"
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "memory_modes_gpu.py"), "--out", str(out), "--smoke",
         "--depth", "2", "--variants", "basic", "--modes", "resident", "--steps", "1", "--no-fp8",
         "--upstream", os.environ["LONGCAT_UPSTREAM_DIR"]],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.load(open(out))
    up = [x for x in doc["dit_rows"] if x["mode"] == "upstream"]
    assert len(up) == 1 and "error" not in up[0] and up[0]["finite"], doc.get("upstream")
    assert up[0]["ours_resident_speedup"] > 0
    assert "basic/upstream" in doc["stage_table_gib"]
