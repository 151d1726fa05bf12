"""Hostile file formats (audit 16): checkpoint folders and LoRA files that loaded silently wrong or
failed with an unclear message, one test per finding:

A. A LongCat LoRA whose ``alpha_scale`` is 0 loaded as an adapter that changes nothing, without a
   word (rank 0 and FastVideo ``lora_alpha`` 0 were already refused).
B. A PyTorch pickle (``torch.save``: a ``.bin`` LoRA, a pickle named ``.safetensors``, a ``dit/`` folder
   holding only ``pytorch_model.bin``) was refused (never unpickled) with safetensors' "header too
   large" or "no DiT checkpoint here", not saying what the file is or what to do.
C. ``DiTConfig.from_json`` kept the last of a key repeated in ``config.json`` silently (a second
   ``text_tokens_zero_pad`` switched the text masking without a word), and a non-UTF-8 file raised a
   bare UnicodeDecodeError naming no file.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tiny_ckpt import longcat_lora_tensors, model_from_state_dict, random_state_dict, tiny_config

from longcat_vc.dit import LongCatDiT
from longcat_vc.loading import CheckpointError
from longcat_vc.lora import load_lora, longcat_lora_key


@pytest.fixture(scope="module")
def tiny_base():
    cfg = tiny_config()
    return cfg, random_state_dict(cfg)


# ---------------------------------------------------------------------------- A
@pytest.mark.parametrize("zero", [torch.tensor(0.0), torch.tensor([-0.0])])
def test_longcat_lora_alpha_scale_zero_is_refused_naming_the_module(tmp_path, tiny_base, zero):
    cfg, sd = tiny_base
    t = longcat_lora_tensors(cfg)
    t[longcat_lora_key("blocks.1.ffn.w2", "alpha_scale")] = zero
    f = str(tmp_path / "lora.safetensors")
    save_file(t, f)
    model = model_from_state_dict(cfg, sd)
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.w2\.alpha_scale: 0 switches the adapter off"):
        load_lora(model, f, "x")
    assert not any(getattr(m, "lora_adapters", None) for m in model.modules())


# ---------------------------------------------------------------------------- B
def _never_unpickled(monkeypatch):
    import pickle

    def boom(*a, **k):  # pragma: no cover - reached only if a loader unpickles
        raise AssertionError("a checkpoint file was unpickled")

    monkeypatch.setattr(torch, "load", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)


@pytest.mark.parametrize("legacy", [False, True])
def test_pickled_lora_is_named_as_pickle_and_not_unpickled(tmp_path, tiny_base, monkeypatch, legacy):
    cfg, sd = tiny_base
    f = str(tmp_path / "lora.bin")
    torch.save(longcat_lora_tensors(cfg), f, _use_new_zipfile_serialization=not legacy)
    model = model_from_state_dict(cfg, sd)
    _never_unpickled(monkeypatch)
    with pytest.raises(ValueError, match=r"lora\.bin: not a readable safetensors file .*PyTorch pickle.*never unpickled"):
        load_lora(model, f, "x")


def test_pickle_named_safetensors_in_a_dit_folder_is_named_as_pickle(tmp_path, tiny_base, monkeypatch):
    cfg, sd = tiny_base
    cfg.to_json(str(tmp_path / "config.json"))
    torch.save(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _never_unpickled(monkeypatch)
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.safetensors: .*PyTorch pickle"):
        LongCatDiT.from_pretrained(str(tmp_path), progress=False)


def test_dit_folder_with_only_bin_weights_names_them(tmp_path, tiny_base, monkeypatch):
    cfg, sd = tiny_base
    d = tmp_path / "dit"
    d.mkdir()
    cfg.to_json(str(d / "config.json"))
    torch.save(sd, str(d / "pytorch_model.bin"))
    _never_unpickled(monkeypatch)
    with pytest.raises(CheckpointError, match=r"no DiT checkpoint here .*dit/pytorch_model\.bin.*never unpickled"):
        LongCatDiT.from_pretrained(str(tmp_path), progress=False)


# ---------------------------------------------------------------------------- C
def test_config_json_with_a_repeated_key_is_refused(tmp_path):
    from longcat_vc.config import DiTConfig

    f = tmp_path / "config.json"
    f.write_text('{"hidden_size": 64, "num_heads": 2, "depth": 2, "text_tokens_zero_pad": true, '
                 '"caption_channels": 32, "text_tokens_zero_pad": false}')
    with pytest.raises(ValueError, match=r"config\.json: key\(s\) \['text_tokens_zero_pad'\] given more than once"):
        DiTConfig.from_json(str(f))


def test_config_json_not_utf8_names_the_file(tmp_path):
    from longcat_vc.config import DiTConfig

    f = tmp_path / "config.json"
    f.write_bytes(b"\xff\xfe{\x00")
    with pytest.raises(ValueError, match=r"DiTConfig\.from_json: .*config\.json is not valid JSON"):
        DiTConfig.from_json(str(f))
