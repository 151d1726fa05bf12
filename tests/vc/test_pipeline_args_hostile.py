"""Hostile-user arguments of ``VideoContinuationPipeline.from_pretrained``: every argument is checked
before anything is read or loaded (so a missing checkpoint folder is not even looked at), with a
ValueError/TypeError naming it; a bad ``attn_backend`` is no longer reported as a broken checkpoint."""
from __future__ import annotations

import pytest
import torch

from longcat_vc.loading import CheckpointError
from longcat_vc.pipeline import VideoContinuationPipeline

MISSING = "/nonexistent/longcat-checkpoint"


def _load(ckpt=MISSING, **kw):
    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device=kw.pop("device", "cpu"), **kw)


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(vae_tiling="no"), TypeError, "vae_tiling: expected a bool"),   # "no" was truthy: tiling on
    (dict(vae_tiling=1), TypeError, "vae_tiling: expected a bool"),
    (dict(fp8="False"), TypeError, "fp8: expected a bool"),
    (dict(fuse_lora=None), TypeError, "fuse_lora: expected a bool"),
    (dict(cfg_parallel="yes"), TypeError, "cfg_parallel: expected a bool"),
    (dict(memory="tiny"), ValueError, "memory: expected one of"),
    (dict(memory=["low"]), ValueError, "memory: expected one of"),
    (dict(attn_backend="flash"), ValueError, "attn_backend: expected one of"),
    (dict(attn_backend=3), ValueError, "attn_backend: expected one of"),
    (dict(device="gpu"), ValueError, "device: expected a device such as"),   # was torch's RuntimeError
    (dict(device=0.5), TypeError, "device: expected a str or torch.device"),
    (dict(fp8=True), ValueError, r"fp8: fp8 GEMMs need .* got device cpu"),    # was raised after loading
    (dict(mode="turbo"), ValueError, "mode must be one of"),
    (dict(fuse_lora=True), ValueError, "fuse_lora=True applies to mode='distill'"),  # basic: was ignored silently
    (dict(cfg_parallel=True), ValueError, "cfg_parallel: expected False without a process_group"),
    (dict(memory="low", process_group=object()), ValueError, "memory='low' is not supported with a process_group"),
])
def test_bad_arguments_are_named_before_the_checkpoint_is_read(kw, exc, msg):
    # the folder does not exist: a CheckpointError here would mean the argument was not checked first
    with pytest.raises(exc, match=rf"^{msg}"):
        _load(**kw)


def test_checkpoint_dir_of_the_wrong_type_is_named():
    # was os.fspath's "expected str, bytes or os.PathLike object, not NoneType"
    with pytest.raises(TypeError, match=r"^checkpoint_dir: expected a str or os.PathLike folder, got NoneType"):
        _load(None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_cuda_device_without_cuda_is_named():
    with pytest.raises(ValueError, match=r"^device: expected an available device, got cuda"):
        _load(device="cuda")


def test_good_arguments_still_reach_the_checkpoint_check():
    with pytest.raises(CheckpointError):
        _load(memory="balanced", attn_backend="torch", vae_tiling=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vc_components import write_full_checkpoint

    root = str(tmp_path_factory.mktemp("ckpt"))
    write_full_checkpoint(root, seed=int(torch.randint(0, 999, ()).item()))
    return root


def test_real_checkpoint_bad_attn_backend_is_not_a_checkpoint_error(ckpt, monkeypatch):
    # used to load the text encoder and the VAE, then fail in the DiT's config and come back as
    # "CheckpointError: failed to load the DiT" about a checkpoint that is fine
    import longcat_vc.pipeline as pl

    monkeypatch.setattr(pl, "_load_umt5", lambda *a, **k: pytest.fail("loaded weights before checking"))
    with pytest.raises(ValueError, match=r"^attn_backend: expected one of"):
        _load(ckpt, attn_backend="flash2")
    with pytest.raises(TypeError, match=r"^vae_tiling: expected a bool"):
        _load(ckpt, vae_tiling="off")


def test_real_checkpoint_loads_with_the_flags(ckpt):
    pipe = _load(ckpt, attn_backend="torch", vae_tiling=True, memory="resident")
    assert pipe.dit.config.attn_backend == "torch" and pipe.vae.use_tiling and pipe.memory == "resident"
    pipe = _load(ckpt, vae_tiling=False)
    assert not pipe.vae.use_tiling


def test_set_mode_flags(ckpt):
    pipe = _load(ckpt)
    with pytest.raises(TypeError, match=r"^fuse_lora: expected a bool"):
        pipe.set_mode("distill", fuse_lora="no")  # was truthy: the LoRA merged into the weights
    with pytest.raises(TypeError, match=r"^lora_path: expected a str or os.PathLike"):
        pipe.set_mode("distill", lora_path=3)
    assert pipe.mode == "basic"
    with pytest.raises(ValueError, match=r"^fuse_lora=True applies to mode='distill'"):
        pipe.set_mode("basic", fuse_lora=True)  # was accepted and ignored
    assert pipe.mode == "basic"
