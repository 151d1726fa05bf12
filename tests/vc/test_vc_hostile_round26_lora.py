"""Round 26 (weights in and out: checkpoint loading, LoRA files, fuse/unfuse, fp8): hostile inputs that gave
silently wrong results."""

from __future__ import annotations

import copy

import pytest
import torch

from tiny_ckpt import LORA_TARGETS_CFG_STEP, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora

QKV = "blocks.0.attn.qkv"


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.fixture
def lora_model(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=_seed())
    path = str(tmp_path / "a.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=_seed())
    m = model_from_state_dict(cfg, sd)
    m.load_lora(path, "a")
    m.enable_loras(["a"])
    return m, sd


def test_deepcopied_model_guards_its_own_fused_adapters(lora_model):
    """``copy.deepcopy`` of a DiT with a LoRA (a teacher / EMA copy) kept the adapters' weak references
    (copied as they are): each copied part still pointed at the ORIGINAL adapter, so a part's scale could
    change while the COPY was fused (the guard asked the original, unfused one) and the copy's unfuse then
    subtracted another delta than it had added: its base weights were lost without a word."""
    m, sd = lora_model
    c = copy.deepcopy(m)
    c.fuse_lora()
    part = c.get_submodule(QKV).lora_adapters["a"].parts[0]
    with pytest.raises(RuntimeError, match="cannot change while the adapter is fused"):
        part.scale = part.scale * 3.0
    c.unfuse_lora()
    torch.testing.assert_close(c.get_submodule(QKV).weight, sd[QKV + ".weight"], rtol=0, atol=1e-5)
    # the original was never fused and may still change
    m.get_submodule(QKV).lora_adapters["a"].parts[0].scale = 0.25


def test_deepcopied_model_counts_its_own_lora_changes(lora_model):
    """A multiplier change on the copy's adapter bumped the ORIGINAL model's state counter and not the
    copy's: a KV cache the copy built before the change was still taken as fresh (stale K/V, silently)."""
    m, _ = lora_model
    c = copy.deepcopy(m)
    before_m, before_c = m._state_version, c._state_version
    c.get_submodule(QKV).lora_adapters["a"].multiplier = 0.3
    assert c._state_version > before_c
    assert m._state_version == before_m
    assert m.get_submodule(QKV).lora_adapters["a"].multiplier == 1.0


def test_fastvideo_parts_of_mixed_dtypes_keep_their_precision(tmp_path):
    """A FastVideo file whose ``to_q.lora_A`` is fp16 and ``to_k``/``to_v``'s fp32 (files merged from
    several sources): the parts' down matrices were concatenated in the FIRST part's dtype, so the fp32
    parts were rounded to fp16 on an fp32 model (and an fp32 value above 65504 became Inf, refused as an
    overflow of "the model dtype" although the model is fp32)."""
    from safetensors.torch import save_file

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=_seed())
    m = model_from_state_dict(cfg, sd)
    qkv = m.get_submodule(QKV)
    C, o, r = qkv.in_features, qkv.out_features // 3, 2
    g = torch.Generator().manual_seed(_seed())
    t, ref = {}, torch.zeros(qkv.out_features, C, dtype=torch.float64)
    for j, (nm, dt) in enumerate((("to_q", torch.float16), ("to_k", torch.float32), ("to_v", torch.float32))):
        A = (0.2 * torch.randn(r, C, generator=g)).to(dt)
        A[0, 0] = 1.0 + 2.0 ** -20  # not an fp16 value
        B = 0.2 * torch.randn(o, r, generator=g)
        t[f"blocks.0.self_attn.{nm}.lora_A"], t[f"blocks.0.self_attn.{nm}.lora_B"] = A, B
        ref[j * o:(j + 1) * o] = B.double() @ A.double()
    path = str(tmp_path / "fv.safetensors")
    save_file(t, path)
    m.load_lora(path, "a")
    delta = qkv.lora_adapters["a"].delta_weight(torch.float64, qkv.out_features)
    torch.testing.assert_close(delta, ref, rtol=0, atol=1e-12)


def test_a_model_with_a_lora_pickles_and_keeps_its_guards(lora_model):
    """``torch.save(model)`` (and any pickling: multiprocessing) of a DiT with a LoRA loaded failed with
    "cannot pickle 'weakref.ReferenceType' object", naming neither the LoRA nor a way out. The loaded copy
    computes what the original does, and its adapters still guard fuses and report changes to it."""
    import io

    m, _ = lora_model
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    c = torch.load(buf, weights_only=False)
    cfg = m.config
    x = torch.randn(1, cfg.in_channels, 2, 4, 4)
    t = torch.rand(1) * 1000
    y = torch.randn(1, 1, 5, cfg.caption_channels)
    with torch.no_grad():
        torch.testing.assert_close(c(x, t, y), m(x, t, y), rtol=0, atol=0)
    ad = c.get_submodule(QKV).lora_adapters["a"]
    before = c._state_version
    ad.multiplier = 0.5
    assert c._state_version > before
    c.fuse_lora()
    with pytest.raises(RuntimeError, match="cannot change while the adapter is fused"):
        ad.parts[0].scale = 2.0


def test_a_hand_loaded_refinement_lora_gives_way_to_a_new_path(refine_ckpt, tmp_path):
    """A refinement LoRA loaded by hand under its name before any ``refine`` is kept "while the path and its
    file stay as they were" (refine_state). Set ``pipe.refinement_lora_path`` to another file afterwards and
    the hand-loaded LoRA stayed in use, without a word: with no refine before the hand load, no path had been
    recorded to compare with."""
    import os

    from longcat_vc.pipeline import VideoContinuationPipeline
    from vc_components import TEXT_DIM, random_frames, write_refinement_lora

    def fresh():
        return VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                         attn_backend="torch", progress=False)

    def refine(pipe):
        return pipe.refine(random_frames(5, 36, 64, 1), "a cat", video=random_frames(12, 40, 72, 2),
                           num_cond_frames=5, resolution=(64, 64), generator=3, output_type="latent",
                           progress=False).latents

    os.makedirs(tmp_path / "hand")
    os.makedirs(tmp_path / "other")
    hand = write_refinement_lora(str(tmp_path / "hand"), tiny_config(caption_channels=TEXT_DIM), seed=_seed())
    other = write_refinement_lora(str(tmp_path / "other"), tiny_config(caption_channels=TEXT_DIM), seed=_seed())
    ref = fresh()
    ref.refinement_lora_path = other
    expected = refine(ref)

    pipe = fresh()
    pipe.dit.load_lora(hand, "refinement_lora")
    with_hand = refine(pipe)  # the hand-loaded LoRA, as documented
    assert not torch.equal(with_hand, expected)
    pipe.refinement_lora_path = other
    assert torch.equal(refine(pipe), expected)


def test_a_numpy_multiplier_is_taken_like_a_float(lora_model, tmp_path):
    """A LoRA multiplier read from a numpy array or config (``np.float32(0.5)``) was a TypeError "expected a
    finite float, got float32", although it is one (the pipeline's guidance_scale takes it); now it applies
    as the float: the adapter's delta scales by it, at load and when set."""
    import numpy as np

    m, _ = lora_model
    ad = m.get_submodule(QKV).lora_adapters["a"]
    d1 = ad.delta_weight(torch.float64)
    mult = float(np.float32(torch.rand(()).item() + 0.25))
    ad.multiplier = np.float32(mult)
    assert type(ad.multiplier) is float
    torch.testing.assert_close(ad.delta_weight(torch.float64), d1 * mult, rtol=1e-12, atol=1e-12)
    path = str(tmp_path / "b.safetensors")
    write_longcat_lora(path, m.config, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=_seed())
    m.load_lora(path, "b", multiplier=np.float64(mult))
    with pytest.raises(TypeError):
        ad.multiplier = np.bool_(True)
