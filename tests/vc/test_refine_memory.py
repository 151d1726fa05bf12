"""The refinement under the memory modes (issue 17): its KV cache follows ``offload_kv_cache`` /
the memory mode like the continuation's (at 720p with 26 cond frames the cache is ~20.6 GiB: before
this, ``memory="low"`` kept it on the GPU during refinement); out-of-memory errors say what to try;
the pipeline's switches take bools only (``use_bsa="no"`` switched block-sparse attention on);
``longcat-vc refine`` takes the memory flags."""

import os

import numpy as np
import pytest
import torch

from longcat_vc.memory import memory_plan
from longcat_vc.pipeline import VCOutOfMemoryError, VideoContinuationPipeline
from vc_components import NoModel, write_refine_checkpoint

RES = (64, 128)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_refine_memory"))
    write_refine_checkpoint(root)
    return root


@pytest.fixture
def pipe(ckpt):
    return VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", attn_backend="torch")


def _frames(n, h=32, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _spy_cache(pipe, seen):
    orig = pipe.dit.build_kv_cache

    def spy(x, *a, offload=False, **k):
        seen.append(offload)
        return orig(x, *a, offload=offload, **k)

    pipe.dit.build_kv_cache = spy


def _refine(pipe, **kw):
    return pipe.refine(_frames(6, seed=1), "a cat", video=_frames(12, seed=2), num_cond_frames=5, resolution=RES,
                       num_inference_steps=4, generator=3, output_type="latent", progress=False, **kw)


def test_refine_cache_offload_reaches_the_cache_and_is_exact(pipe):
    seen = []
    _spy_cache(pipe, seen)
    base = _refine(pipe).latents
    off = _refine(pipe, offload_kv_cache=True).latents
    on = _refine(pipe, offload_kv_cache=False).latents
    assert seen == [False, True, False]
    assert not torch.isnan(base).any()
    assert torch.equal(base, off) and torch.equal(base, on)


def test_refine_cache_follows_the_memory_mode(pipe, monkeypatch):
    seen = []
    _spy_cache(pipe, seen)
    monkeypatch.setattr(pipe, "_memory", memory_plan("low"))
    _refine(pipe)
    _refine(pipe, offload_kv_cache=False)  # an explicit choice wins
    monkeypatch.setattr(pipe, "_memory", memory_plan("balanced"))
    _refine(pipe)
    assert seen == [True, False, False]


def _oom(*a, **k):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_refine_oom_in_cache_build_says_what_to_try(pipe):
    pipe.dit.build_kv_cache = _oom
    with pytest.raises(VCOutOfMemoryError, match="refinement's KV cache") as e:
        _refine(pipe)
    msg = str(e.value)
    assert "--offload-kv-cache" in msg and "memory='low'" in msg


def test_refine_oom_while_denoising_in_low_mode_offers_no_done_fix(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "_memory", memory_plan("low"))
    monkeypatch.setattr(pipe.dit, "forward", _oom)
    with pytest.raises(VCOutOfMemoryError, match="while refining") as e:
        _refine(pipe)
    msg = str(e.value)
    assert "offload-kv-cache" not in msg and "memory='low'" not in msg and "smaller resolution" in msg


def test_continuation_oom_hints_unchanged_in_substance(pipe):
    pipe.dit.build_kv_cache = _oom
    with pytest.raises(VCOutOfMemoryError, match="building the KV cache.*offload-kv-cache"):
        pipe(_frames(9), "a cat", resolution=(32, 64), num_frames=13, num_cond_frames=5, num_inference_steps=1,
             guidance_scale=1.0, progress=False)


_BAD = [(dict(use_bsa="no"), "use_bsa"), (dict(use_bsa=1), "use_bsa"), (dict(use_kv_cache="no"), "use_kv_cache"),
        (dict(offload_kv_cache="yes"), "offload_kv_cache"), (dict(offload_kv_cache=0), "offload_kv_cache"),
        (dict(progress="no"), "progress")]


# refine has no use_bsa switch (it always runs block-sparse attention)
@pytest.mark.parametrize("call, kw, name", [(c, kw, n) for c in ("call", "extend", "refine") for kw, n in _BAD
                                            if not (c == "refine" and n == "use_bsa")])
def test_switches_take_bools_only(pipe, monkeypatch, call, kw, name):
    monkeypatch.setattr(pipe, "vae", NoModel())
    monkeypatch.setattr(pipe, "encode_text", NoModel())
    with pytest.raises(TypeError, match=f"{name} must be a bool"):
        if call == "call":
            pipe(_frames(9), "a cat", resolution=(32, 64), num_frames=13, num_cond_frames=5, **kw)
        elif call == "extend":
            pipe.extend(_frames(9), "a cat", segments=2, resolution=(32, 64), num_frames=13, num_cond_frames=5, **kw)
        else:
            pipe.refine(_frames(6), "a cat", video=_frames(12), num_cond_frames=5, resolution=RES, **kw)


def test_none_is_accepted_where_it_means_the_default(pipe):
    out = pipe(_frames(9), "a cat", resolution=(32, 64), num_frames=13, num_cond_frames=5, num_inference_steps=1,
               guidance_scale=1.0, offload_kv_cache=None, output_type="latent", progress=False)
    assert out.latents is not None


def test_cli_refine_takes_the_memory_flags(ckpt, tmp_path, capsys, monkeypatch):
    from longcat_vc.cli import main
    from longcat_vc.video_io import write_video

    s1, vid = str(tmp_path / "s1.mp4"), str(tmp_path / "in.mp4")
    write_video(s1, _frames(6, seed=1), fps=15)
    write_video(vid, _frames(12, seed=2), fps=15)
    loads, refines = [], []
    orig_load = VideoContinuationPipeline.from_pretrained.__func__
    orig_refine = VideoContinuationPipeline.refine

    def load_spy(cls, *a, **k):
        loads.append(k)
        return orig_load(cls, *a, **k)

    def refine_spy(self, *a, **k):
        refines.append((self.memory, k.get("offload_kv_cache")))
        return orig_refine(self, *a, **k)

    monkeypatch.setattr(VideoContinuationPipeline, "from_pretrained", classmethod(load_spy))
    monkeypatch.setattr(VideoContinuationPipeline, "refine", refine_spy)
    common = ["refine", s1, "--video", vid, "--cond-frames", "5", "--checkpoint", ckpt, "--device", "cpu",
              "--dtype", "fp32", "--attn-backend", "torch", "--no-progress", "--resolution", "64x128",
              "--steps", "4", "--seed", "1"]
    for i, extra in enumerate((["--memory", "low"], ["--memory", "balanced", "--offload-kv-cache", "--vae-tiling"])):
        out = str(tmp_path / f"o{i}.mp4")
        rc = main(common + ["--out", out] + extra)
        err = capsys.readouterr().err
        assert rc == 0, err
        assert os.path.exists(out)
    assert [(k["memory"], k["fp8"], k["vae_tiling"]) for k in loads] == [("low", False, False),
                                                                          ("balanced", False, True)]
    assert refines == [("low", None), ("balanced", True)]
    with pytest.raises(SystemExit) as e:
        main(common + ["--out", str(tmp_path / "bad.mp4"), "--memory", "tiny"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


# torch's message of the OOM measured on the H200 (720p refine at depth 48, memory="low", 24 GiB cap)
_TORCH_OOM = ("CUDA out of memory. Tried to allocate 2.89 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
              "115.99 GiB is free. Including non-PyTorch memory, this process has 23.68 GiB memory in use. 24.00 GiB "
              "allowed; Of the allocated memory 12.53 GiB is allocated by PyTorch, and 10.41 GiB is reserved by "
              "PyTorch but unallocated. If reserved but unallocated memory is large try setting "
              "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.")


def test_refine_oom_from_fragmentation_names_the_allocator_setting(pipe, monkeypatch):
    def oom(*a, **k):
        raise torch.OutOfMemoryError(_TORCH_OOM)

    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(pipe, "_memory", memory_plan("low"))
    monkeypatch.setattr(pipe.dit, "forward", oom)
    with pytest.raises(VCOutOfMemoryError, match=r"10\.4 GiB were reserved but unallocated.*expandable_segments:True"):
        _refine(pipe)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # already set: not offered again
    with pytest.raises(VCOutOfMemoryError) as e:
        _refine(pipe)
    assert "expandable_segments" not in str(e.value)


def test_fragmentation_is_read_in_any_unit():
    from longcat_vc.stages import _fragmented_gib

    assert _fragmented_gib(RuntimeError(_TORCH_OOM)) == pytest.approx(10.41)
    assert _fragmented_gib(RuntimeError("and 512.00 MiB is reserved by PyTorch but unallocated")) == pytest.approx(0.5)
    assert _fragmented_gib(RuntimeError("CUDA out of memory.")) == 0.0 and _fragmented_gib(None) == 0.0
