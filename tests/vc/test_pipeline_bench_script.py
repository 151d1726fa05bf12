"""bench/pipeline_e2e_gpu.py runs (``--smoke``: CPU, tiny components) and writes its JSON."""

import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_pipeline_e2e_script_smoke(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "pipeline_e2e_gpu.py"), "--out", str(tmp_path), "--smoke",
         "--depth", "1", "--modes", "distill", "--no-warmup"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = glob.glob(str(tmp_path / "pipeline_e2e_depth1_*.json"))
    doc = json.load(open(path))
    assert [(x["mode"], x["kv_cache"]) for x in doc["runs"]] == [("distill", True), ("distill", False)]
    assert all(x["finite"] and x["steps"] == 2 for x in doc["runs"])
    assert doc["summary"]["distill"]["latents_rel_l2_cache_on_vs_off"] < 1e-5  # fp32, guidance 1
    assert "machine" in doc and doc["config"]["smoke"] is True
