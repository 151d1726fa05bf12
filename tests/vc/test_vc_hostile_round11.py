"""Hostile-user round 11: peft LoRA variants the LongCat format cannot hold (aLoRA, KaSA, BD-LoRA)
are refused before training instead of saving a file that gives another model (or one load_lora
refuses)."""
from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from longcat_vc import training as tr  # noqa: E402
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config  # noqa: E402


def _dit(seed=3):
    cfg = tiny_config(attn_backend="torch")
    return model_from_state_dict(cfg, random_state_dict(cfg, seed=seed))


def _variants():
    out = []
    if hasattr(peft, "KasaConfig"):  # the saved file gave outputs 85% off the trained model's
        out.append(("kasa_config", lambda: peft.KasaConfig()))
    if hasattr(peft, "BdLoraConfig"):  # the saved file had block-diagonal shapes load_lora refused
        out.append(("use_bdlora", lambda: peft.BdLoraConfig(target_modules_bd_a=["attn.qkv"],
                                                            target_modules_bd_b=["attn.proj"], nblocks=2,
                                                            match_strict=False)))
    import dataclasses
    if any(f.name == "alora_invocation_tokens" for f in dataclasses.fields(peft.LoraConfig)):
        out.append(("alora_invocation_tokens", lambda: [1, 2]))  # saved file 46% off
    return out


@pytest.mark.parametrize("field,make", _variants(), ids=[v[0] for v in _variants()])
def test_peft_lora_variants_are_refused_before_training(field, make, tmp_path):
    with pytest.raises(ValueError, match=rf"^lora_config: {field}=.*a peft LoRA variant"):
        tr.lora_config(rank=4, alpha=8, **{field: make()})
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn.qkv", "attn.proj"], **{field: make()})
    with pytest.raises(ValueError, match=rf"^add_lora: config: {field}="):
        tr.add_lora(_dit(), cfg)
    # a model wrapped by hand: the save refuses too, and writes nothing
    m = peft.get_peft_model(_dit(), cfg)
    with pytest.raises(ValueError, match=rf"^longcat_lora_state_dict: {field}="):
        tr.save_longcat_lora(m, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()
    # and the layer-level check, for a model whose config is not at hand
    base = m.get_base_model()
    base.__dict__.pop("peft_config", None)
    with pytest.raises(ValueError, match=r"a peft LoRA variant \(\w+Variant\)"):
        tr.longcat_lora_state_dict(base)


def test_velora_only_changes_the_backward_and_stays_savable(tmp_path):
    if not hasattr(peft, "VeloraConfig"):
        pytest.skip("peft without VeLoRA")
    cfg = tiny_config(attn_backend="torch")
    sd = random_state_dict(cfg, seed=3)
    m = tr.add_lora(model_from_state_dict(cfg, sd),
                    tr.lora_config(rank=4, alpha=8, init_lora_weights=False, velora_config=peft.VeloraConfig())).eval()
    g = torch.Generator().manual_seed(0)
    x0, y, s = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 1, 5, 32, generator=g), torch.tensor([0.5])
    with torch.no_grad():
        want = m(x0, s * 1000, y, None)
    tr.save_longcat_lora(m, tmp_path / "v.safetensors")
    fresh = model_from_state_dict(cfg, sd)
    fresh.load_lora(tmp_path / "v.safetensors", "v")
    fresh.enable_loras(["v"])
    with torch.no_grad():
        got = fresh(x0, s * 1000, y, None)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_own_loras_enabled_after_add_lora_are_refused_by_the_loss_and_the_save(tmp_path):
    cfg = tiny_config(attn_backend="torch")
    sd = random_state_dict(cfg, seed=3)
    m = tr.add_lora(model_from_state_dict(cfg, sd), tr.lora_config(rank=4, alpha=8, init_lora_weights=False))
    own = tmp_path / "own.safetensors"
    tr.save_longcat_lora(m, own)
    dit = model_from_state_dict(cfg, sd)
    dit.load_lora(own, "own")  # loaded but off: add_lora accepts it
    model = tr.add_lora(dit, tr.lora_config(rank=4, alpha=8, init_lora_weights=False))
    # enabled (or fused) after add_lora: the training and the save went on silently, and the file held the
    # peft adapter alone, relative to base + "own"
    dit.enable_loras(["own"])
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 1, 5, 32, generator=g)
    with pytest.raises(ValueError, match=r"^flow_matching_loss: the DiT has its own LoRAs \['own'\] active"):
        tr.flow_matching_loss(model, x0, y, generator=g)
    with torch.no_grad():  # evaluating the combined model stays possible
        assert torch.isfinite(tr.flow_matching_loss(model, x0, y, generator=g))
    dit.fuse_lora()
    with pytest.raises(ValueError, match=r"^longcat_lora_state_dict: the DiT has its own LoRAs \['own'\] active"):
        tr.save_longcat_lora(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    dit.disable_loras()
    tr.save_longcat_lora(model, tmp_path / "x.safetensors")
    tr.flow_matching_loss(model, x0, y, generator=g).backward()


@pytest.mark.parametrize("batch", [0, -1, True, 2.0, "2"])
def test_sample_sigmas_names_a_bad_batch(batch):
    with pytest.raises(ValueError, match=r"^sample_sigmas: batch must be a positive int"):
        tr.sample_sigmas(batch)

