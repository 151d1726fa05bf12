"""Hostile round 43: the examples (examples/train_lora_bsa.py, examples/wan_diffusers_bsa.py)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_example_fails_loudly_when_the_reloaded_adapter_differs(tmp_path, monkeypatch):
    """The reload check was only printed: an adapter that reloaded to other outputs exited 0."""
    from longcat_vc.dit import LongCatDiT

    ex = _load("train_lora_bsa")
    # a loader that loses the adapter: the reloaded model runs without it
    monkeypatch.setattr(LongCatDiT, "enable_loras", lambda self, names: self.disable_loras())
    with pytest.raises(SystemExit, match=r"reload.*differs"):
        ex.main(["--tiny", "--attn", "dense", "--steps", "2", "--out", str(tmp_path)])


def test_train_example_json_records_the_arguments_it_ran_with(tmp_path):
    """--json's header recorded sys.argv (the caller's, e.g. pytest's) when main(argv) was called."""
    ex = _load("train_lora_bsa")
    argv = ["--tiny", "--attn", "dense", "--steps", "1", "--out", str(tmp_path), "--json", str(tmp_path / "r.json")]
    assert ex.main(argv) == 0
    assert json.load(open(tmp_path / "r.json"))["header"]["argv"] == argv


@pytest.mark.parametrize("bad", ["1.5", "-0.1", "1", "nan"])
def test_train_example_refuses_a_sparsity_outside_0_1_as_a_usage_error(bad, capsys):
    """(round 74) ``--sparsity 1.5`` trained nothing and ended in a traceback from the first BSA call."""
    ex = _load("train_lora_bsa")
    with pytest.raises(SystemExit) as e:
        ex.main(["--tiny", "--attn", "bsa", "--steps", "1", "--sparsity", bad])
    assert e.value.code == 2 and "--sparsity must be in [0, 1)" in capsys.readouterr().err


def test_wan_example_layers_is_not_silently_ignored():
    """--layers was ignored on the CPU (always 2 blocks) and with --model-id (all of the model's blocks)."""
    import argparse

    import torch

    pytest.importorskip("diffusers")
    ex = _load("wan_diffusers_bsa")
    m = ex.build(argparse.Namespace(model_id=None, layers=3), torch.device("cpu"), torch.float32)
    assert len(m.blocks) == 3
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "wan_diffusers_bsa.py"),
                        "--model-id", "/nonexistent/model", "--layers", "3"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and "--layers" in r.stderr and "--model-id" in r.stderr, (r.stdout + r.stderr)[-2000:]
