"""LoRA training findings of the third audit (2026-12-06); each test fails on the code before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
from longcat_vc import training as tr  # noqa: E402
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _dit():
    cfg = tiny_config(attn_backend="torch")
    return model_from_state_dict(cfg, random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()))))


def test_a_misspelt_target_beside_good_ones_is_refused():
    # peft raises only when no target matches: "ffn.w_typo" was dropped silently
    cfg = tr.lora_config(rank=2, targets=("attn.qkv", "ffn.w_typo", "cross_attn.q_linear"))
    with pytest.raises(ValueError, match=r"add_lora: targets \['ffn.w_typo'\] match no nn.Linear"):
        tr.add_lora(_dit(), cfg)
    tr.add_lora(_dit(), tr.lora_config(rank=2, targets=("attn.qkv", "cross_attn.q_linear")))  # both exist


@pytest.mark.parametrize("a", [float("nan"), 0.0, -1.0, float("inf")])
def test_alpha_pattern_values_checked_like_alpha(a):
    with pytest.raises(ValueError, match=r"alpha_pattern\['ffn.w1'\]: expected a finite positive number"):
        tr.lora_config(rank=2, alpha_pattern={"ffn.w1": a})


def test_a_diverged_adapter_is_not_saved(tmp_path):
    m = tr.add_lora(_dit(), tr.lora_config(rank=2, init_lora_weights=False))
    with torch.no_grad():
        next(p for n, p in m.named_parameters() if "lora_B" in n).fill_(float("nan"))
    path = str(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="the adapter holds NaN/Inf"):
        tr.save_longcat_lora(m, path)
    assert not os.path.exists(path)


def _example(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train_lora_bsa.py"), "--tiny",
                           "--attn", "dense", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.parametrize("flag", ["--steps", "--rank", "--depth", "--text-len", "--lr"])
def test_example_refuses_zero_instead_of_taking_the_default(tmp_path, flag):
    r = _example(flag, "0", cwd=tmp_path)
    assert r.returncode == 2 and flag in r.stderr, r.stderr[-2000:]


def test_example_checks_outputs_before_training_and_stops_on_a_nan_loss(tmp_path):
    r = _example("--json", str(tmp_path / "missing" / "x.json"), cwd=tmp_path)
    assert r.returncode == 2 and "--json" in r.stderr and "step 0" not in r.stdout
    (tmp_path / "file").write_text("x")
    r = _example("--out", str(tmp_path / "file"), cwd=tmp_path)
    assert r.returncode == 2 and "--out" in r.stderr and "step 0" not in r.stdout
    # a folder that cannot be created (its parent is a file) failed only when saving, after the training
    r = _example("--out", str(tmp_path / "file" / "sub"), cwd=tmp_path)
    assert r.returncode == 2 and "--out" in r.stderr and "cannot create" in r.stderr and "step 0" not in r.stdout
    r = _example("--lr", "1e30", "--steps", "3", "--out", str(tmp_path / "o"), cwd=tmp_path)
    assert r.returncode != 0 and "training diverged" in r.stderr, (r.stdout[-1500:], r.stderr[-1500:])
    assert not os.path.exists(tmp_path / "o" / "lora_dense.safetensors")
    r = _example("--steps", "2", "--json", str(tmp_path / "ok.json"), "--out", str(tmp_path / "ok"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.load(open(tmp_path / "ok.json"))["results"][0]["lr"] == 3e-3


def test_orthogonal_init_is_savable_and_round_trips(tmp_path):
    # refused as "rewrites the base weights": peft's orthogonal init sets lora_A / lora_B only
    dit = _dit()
    base = {k: v.clone() for k, v in dit.state_dict().items()}
    m = tr.add_lora(dit, tr.lora_config(rank=4, init_lora_weights="orthogonal")).eval()
    assert all(torch.equal(v, base[k]) for k, v in m.get_base_model().state_dict().items() if k in base)
    path = str(tmp_path / "o.safetensors")
    tr.save_longcat_lora(m, path)
    from test_dit import make_inputs

    x, t, y, mask = make_inputs(m.get_base_model().config, B=1, T=2)
    with torch.no_grad():
        want = m(x, t, y, mask)
        d = m.unload()
        d.load_lora(path, "o")
        d.enable_loras(["o"])
        got = d(x, t, y, mask)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

