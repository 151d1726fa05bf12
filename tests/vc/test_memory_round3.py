"""Memory-mode findings of the third audit (2026-12-06); each test fails on the code before."""

from __future__ import annotations

import json
import types

import pytest
import torch

from longcat_vc import memory as M
from longcat_vc import memory_report
from longcat_vc.config import DiTConfig
from longcat_vc.dit import LongCatDiT


def _report(capsys, *argv):
    try:
        rc = memory_report.main(list(argv))
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_report_refuses_a_clip_with_no_frame_to_generate(capsys):
    # --cond-frames 93 of 13 frames printed a negative denoise estimate
    for frames, cond in ((13, 93), (93, 93), (13, 13)):
        rc, out, err = _report(capsys, "--frames", str(frames), "--cond-frames", str(cond))
        assert rc == 2 and "leaves no frame to generate" in err and "Traceback" not in err, (frames, cond, err)
    with pytest.raises(ValueError, match="leaves no frame to generate"):
        M.estimate_peak_bytes(DiTConfig.tiny(), "resident", num_frames=13, num_cond_frames=93)
    rc, out, _ = _report(capsys, "--frames", "17", "--cond-frames", "13")  # one noisy latent: fine
    assert rc in (0, None) and "estimated peak GiB" in out


def test_report_bad_values_and_files_are_one_line(capsys, tmp_path):
    rc, _, err = _report(capsys, "--depth", "0")
    assert rc == 2 and "--depth must be >= 1" in err
    rc, _, err = _report(capsys, "--measured", str(tmp_path / "missing.json"))
    assert rc == 2 and "cannot read" in err and "Traceback" not in err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"stage_table_gib": {"resident": {"denoise": "12.3"}}}))
    rc, _, err = _report(capsys, "--measured", str(bad))
    assert rc == 2 and "must map stages to numbers" in err


def test_report_refine_finds_the_lora_from_the_dit_folder(capsys, tmp_path):
    pytest.importorskip("diffusers")
    from vc_components import refine_checkpoint_in

    class _F:  # tmp_path_factory stand-in
        @staticmethod
        def mktemp(name):
            d = tmp_path / name
            d.mkdir()
            return d

    root = refine_checkpoint_in(_F, "ck")
    outs = []
    for ck in (root, root + "/dit"):
        rc, out, _ = _report(capsys, "--refine", "--checkpoint", ck)
        assert rc in (0, None) and "assumed" not in out
        outs.append(out)
    assert outs[0] == outs[1]  # the same LoRA rank, the same estimates
    (tmp_path / "ck" / "lora" / "refinement_lora.safetensors").unlink()
    rc, out, _ = _report(capsys, "--refine", "--checkpoint", root)
    assert "LoRA rank 128 assumed" in out


def test_switching_from_a_streaming_mode_is_refused():
    # balanced -> resident recorded "resident" with the block streamer's hooks still attached
    dit = LongCatDiT(DiTConfig.tiny(depth=2))
    te = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    pipe = types.SimpleNamespace(dit=dit, text_encoder=te, vae=torch.nn.Linear(2, 2))
    pytest.importorskip("accelerate")
    M.apply_memory_mode(pipe, "balanced", "cpu")
    with pytest.raises(ValueError, match=r"streams \(memory='balanced'\); switching to 'resident' needs a fresh"):
        M.apply_memory_mode(pipe, "resident", "cpu")
    assert pipe._memory.name == "balanced"
    M.apply_memory_mode(pipe, "low", "cpu")  # still streaming: allowed


def test_balanced_then_low_offloads_the_text_encoder_once(monkeypatch):
    # balanced -> low applied diffusers' group offloading to the text encoder a second time: on CUDA
    # (use_stream) that pins a second copy of every weight and then raises "Hook with name
    # lazy_prefetch_group_offloading already exists"
    pytest.importorskip("accelerate")
    real = M._group_offloading()
    calls = []

    def spy(module, **kw):
        calls.append(module)
        return real(module, **kw)

    monkeypatch.setattr(M, "_group_offloading", lambda: spy)
    dit = LongCatDiT(DiTConfig.tiny(depth=2))
    te = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    pipe = types.SimpleNamespace(dit=dit, text_encoder=te, vae=torch.nn.Linear(2, 2))
    M.apply_memory_mode(pipe, "balanced", "cpu")
    M.apply_memory_mode(pipe, "low", "cpu")
    M.offload_text_encoder(te, "cpu")  # idempotent when called directly too
    assert calls == [te] and pipe._memory.name == "low"
    with pytest.raises(ValueError, match=r"text_encoder: already offloaded to cpu, got meta"):
        M.offload_text_encoder(te, "meta")


def test_a_streaming_mode_without_accelerate_changes_nothing(monkeypatch):
    # the DiT's block streamer was attached before the text encoder's offloading found accelerate
    # missing: the pipeline streamed its blocks while its recorded plan still said 'resident'
    import importlib

    dit = LongCatDiT(DiTConfig.tiny(depth=2))
    te = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    pipe = types.SimpleNamespace(dit=dit, text_encoder=te, vae=torch.nn.Linear(2, 2))
    M.apply_memory_mode(pipe, "resident", "cpu")
    real = importlib.import_module

    def no_accelerate(name, *a, **k):
        if name == "accelerate":
            raise ImportError("No module named 'accelerate'")
        return real(name, *a, **k)

    monkeypatch.setattr(M.importlib, "import_module", no_accelerate)
    with pytest.raises(ImportError, match="pip install accelerate"):
        M.apply_memory_mode(pipe, "balanced", "cpu")
    assert getattr(dit, "_block_streamer", None) is None and pipe._memory.name == "resident"
