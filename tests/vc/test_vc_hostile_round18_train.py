"""Hostile-user round 18 (training): a peft model saved through a wrapper (DataParallel /
DistributedDataParallel's ``module.``, peft's own ``LoraModel`` at ``.base_model``) got the wrapper's
attribute path written into every LongCat key, so the file matched no module of the DiT; the own-LoRA
check of the loss and the save did not see through such a wrapper either; a non-int ``rank_pattern``
value failed deep in torch (``empty(): argument 'size'``)."""
from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from longcat_vc import training as tr  # noqa: E402
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config  # noqa: E402


def _setup(seed=5):
    cfg = tiny_config(attn_backend="torch")
    sd = random_state_dict(cfg, seed=seed)
    torch.manual_seed(seed)
    m = tr.add_lora(model_from_state_dict(cfg, sd), tr.lora_config(rank=4, alpha=8, init_lora_weights=False))
    return cfg, sd, m


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 1, 5, 32, generator=g), torch.tensor([500.0])


def _assert_reloads(m, cfg, sd, path):
    """The saved file, loaded into a fresh DiT of the same base weights, gives the trained model's output."""
    x, y, s = _inputs()
    with torch.no_grad():
        want = m(x, s, y)
    fresh = model_from_state_dict(cfg, sd)
    fresh.load_lora(path, "saved")
    fresh.enable_loras(["saved"])
    with torch.no_grad():
        got = fresh(x, s, y)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("wrap", ["data_parallel", "lora_model"])
def test_a_wrapped_peft_model_saves_the_dits_module_names(tmp_path, wrap):
    cfg, sd, m = _setup()
    want_keys = set(tr.longcat_lora_state_dict(m))
    wrapped = torch.nn.DataParallel(m) if wrap == "data_parallel" else m.base_model
    # the keys were "lora___lorahyphen___module___lorahyphen___base_model___...": a file load_lora refused
    assert set(tr.longcat_lora_state_dict(wrapped)) == want_keys
    names = tr.save_longcat_lora(wrapped, tmp_path / "w.safetensors")
    assert names[0].startswith("blocks.")
    _assert_reloads(m, cfg, sd, tmp_path / "w.safetensors")


def test_a_wrapped_peft_model_with_own_loras_active_is_refused(tmp_path):
    cfg, sd, m = _setup()
    own = tmp_path / "own.safetensors"
    tr.save_longcat_lora(m, own)
    dit = model_from_state_dict(cfg, sd)
    dit.load_lora(own, "own")
    model = torch.nn.DataParallel(tr.add_lora(dit, tr.lora_config(rank=4, alpha=8)))
    dit.enable_loras(["own"])
    x, y, _ = _inputs()
    with pytest.raises(ValueError, match=r"^flow_matching_loss: the DiT has its own LoRAs \['own'\] active"):
        tr.flow_matching_loss(model, x, y)
    with pytest.raises(ValueError, match=r"^longcat_lora_state_dict: the DiT has its own LoRAs \['own'\] active"):
        tr.save_longcat_lora(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_a_wrapped_peft_model_is_checked_against_its_config(tmp_path):
    # the config check of the save (a hand-made config peft accepted) looked for peft_config on the wrapper
    cfg = tiny_config(attn_backend="torch")
    dit = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    m = peft.get_peft_model(dit, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["attn.qkv"]))
    m.peft_config["default"].bias = "all"  # changed after wrapping: only the config tells
    with pytest.raises(ValueError, match=r"^longcat_lora_state_dict: bias='all'"):
        tr.save_longcat_lora(torch.nn.DataParallel(m), tmp_path / "b.safetensors")
    assert not (tmp_path / "b.safetensors").exists()


@pytest.mark.parametrize("value", [2.5, 4.0, True, float("nan"), "4"])
def test_rank_pattern_values_are_checked_like_rank(value):
    with pytest.raises(ValueError, match=r"^lora_config: rank_pattern\['attn\.qkv'\]: expected a positive int"):
        tr.lora_config(rank=4, alpha=8, rank_pattern={"attn.qkv": value})


def test_int_rank_pattern_saves_per_layer_ranks_that_reload(tmp_path):
    cfg = tiny_config(attn_backend="torch")
    sd = random_state_dict(cfg, seed=2)
    torch.manual_seed(0)
    m = tr.add_lora(model_from_state_dict(cfg, sd),
                    tr.lora_config(rank=4, alpha=8, init_lora_weights=False, rank_pattern={"blocks.1.attn.qkv": 6},
                                   alpha_pattern={"ffn.w2": 3.0}, use_rslora=True))
    d = tr.longcat_lora_state_dict(m)
    key = "lora___lorahyphen___blocks___lorahyphen___{}___lorahyphen___attn___lorahyphen___qkv.lora_down.weight"
    assert d[key.format(0)].shape[0] == 12 and d[key.format(1)].shape[0] == 18
    tr.save_longcat_lora(m, tmp_path / "r.safetensors")
    _assert_reloads(m, cfg, sd, tmp_path / "r.safetensors")


def _fp8_setup():
    cfg = tiny_config(attn_backend="torch")
    sd = random_state_dict(cfg, seed=4)
    g = torch.Generator().manual_seed(0)
    x0, y = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 1, 5, 32, generator=g)
    return cfg, sd, x0, y


@pytest.mark.parametrize("targets", [["adaLN_modulation.1"], ["ffn.w1"]])
def test_quantising_a_dit_that_carries_peft_adapters_is_refused(targets):
    from longcat_vc.fp8 import Fp8Linear, quantize_dit_fp8

    cfg, sd, x0, y = _fp8_setup()
    m = tr.add_lora(model_from_state_dict(cfg, sd), tr.lora_config(rank=4, alpha=8, targets=targets,
                                                                    init_lora_weights=False))
    # adapters beside the fp8 linears: quantised, then trained with 30-60% wrong adapter gradients (no
    # gradient flows through the fp8 activations); on them: "blocks.0.ffn.w1 is a Linear, expected LoRALinear"
    for what in (m.get_base_model(), m):
        with pytest.raises(ValueError, match=r"^quantize_dit_fp8: dit: .*peft adapters \(add_lora\)"):
            quantize_dit_fp8(what, emulate=True)
    assert not any(isinstance(mod, Fp8Linear) for mod in m.modules())
    tr.flow_matching_loss(m, x0, y).backward()


def test_training_through_fp8_weights_is_refused_whatever_the_order():
    from longcat_vc.fp8 import quantize_dit_fp8

    cfg, sd, x0, y = _fp8_setup()
    dit = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(dit, emulate=True)
    # peft by hand around the quantised DiT (add_lora refuses it): the loss trained on, wrong gradients
    m = peft.get_peft_model(dit, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["adaLN_modulation.1"]))
    with pytest.raises(ValueError, match=r"^flow_matching_loss: the DiT's weights are fp8"):
        tr.flow_matching_loss(m, x0, y)
    with torch.no_grad():  # evaluating stays possible
        assert torch.isfinite(tr.flow_matching_loss(m, x0, y))


def test_a_module_holding_the_trained_dit_and_a_frozen_teacher_saves_the_students_names():
    cfg, sd, m = _setup()
    want_keys = set(tr.longcat_lora_state_dict(m))

    class Distill(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = model_from_state_dict(cfg, sd)
            self.student = m

    assert set(tr.longcat_lora_state_dict(Distill())) == want_keys
