"""peft LoRA training on the DiT (longcat_vc.training): loss goes down with BSA + activation
checkpointing in the loop, the saved LongCat-format file reproduces the peft model through
``load_lora``, base state-dict names survive, checkpointing leaves gradients unchanged."""

from __future__ import annotations

import pytest
import torch

import longcat_kernels
from longcat_vc import training as tr
from longcat_vc.lora import LORA_PREFIX
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

BSA = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}


def _cfg(bsa: bool = True):
    return tiny_config(enable_bsa=bsa, bsa_params=BSA if bsa else None, attn_backend="torch")


def _batch(seed=None, B=2, T=4, H=8, W=8, L=5):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    x0 = torch.randn(B, 16, T, H, W, generator=g)
    y = torch.randn(B, 1, L, 32, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, L - 1:] = 0
    noise = torch.randn(x0.shape, generator=g)
    sigmas = torch.rand(B, generator=g) * 0.8 + 0.1
    return x0, y, mask, noise, sigmas


def _trained_model(cfg, sd, targets=tr.LORA_TARGETS_CFG_STEP, init=True):
    dit = model_from_state_dict(cfg, sd).train()
    return tr.add_lora(dit, tr.lora_config(rank=4, alpha=8, targets=targets, init_lora_weights=init))


def _max_rel(a, b):
    assert not a.isnan().any() and not b.isnan().any()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@pytest.mark.parametrize("bsa", [True, False])
def test_lora_training_loss_decreases_and_file_reloads(tmp_path, monkeypatch, bsa):
    cfg = _cfg(bsa)
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 1000, ())))
    names = list(sd)
    model = _trained_model(cfg, sd)
    assert tr.enable_activation_checkpointing(model) == cfg.depth

    calls = {"bsa": 0}
    real = longcat_kernels.block_sparse_attn

    def spy(*a, **k):
        calls["bsa"] += 1
        return real(*a, **k)

    monkeypatch.setattr(longcat_kernels, "block_sparse_attn", spy)
    x0, y, mask, noise, sigmas = _batch()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(4):
        loss = tr.flow_matching_loss(model, x0, y, mask, sigmas=sigmas, noise=noise)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.995, losses
    # BSA forward per block, and again when checkpointing recomputes it in backward
    assert calls["bsa"] == (2 * cfg.depth * 4 if bsa else 0)

    model.eval()
    path = tmp_path / "trained.safetensors"
    adapted = tr.save_longcat_lora(model, path)
    assert len(adapted) == 7 * cfg.depth
    with torch.no_grad():
        x_s = (1 - sigmas.view(-1, 1, 1, 1, 1)) * x0 + sigmas.view(-1, 1, 1, 1, 1) * noise
        want = model(x_s, sigmas * 1000, y, mask)
    base = model.unload()  # the DiT with its own modules back; adapters dropped
    tr.disable_activation_checkpointing(base)
    assert list(base.state_dict()) == names
    for k in names:  # base weights were frozen
        assert torch.equal(base.state_dict()[k], sd[k]), k
    fresh = model_from_state_dict(cfg, sd)
    fresh.load_lora(path, "trained")
    with torch.no_grad():
        plain = fresh(x_s, sigmas * 1000, y, mask)
        fresh.enable_loras(["trained"])
        got = fresh(x_s, sigmas * 1000, y, mask)
    assert _max_rel(got, want) < 1e-5
    assert _max_rel(plain, want) > 1e-4  # training did change the model


@pytest.mark.parametrize("targets", ["cfg_step", "refinement"])
@pytest.mark.parametrize("split_fused", [True, False])
def test_saved_file_layout_and_reload(tmp_path, targets, split_fused):
    cfg = _cfg(True)
    sd = random_state_dict(cfg, seed=5)
    tg = tr.LORA_TARGETS_CFG_STEP if targets == "cfg_step" else tr.LORA_TARGETS_REFINEMENT
    model = _trained_model(cfg, sd, targets=tg, init=False)  # random A and B: a nonzero adapter
    model.eval()
    tensors = tr.longcat_lora_state_dict(model, split_fused=split_fused)
    assert all(k.startswith(LORA_PREFIX) for k in tensors)
    qkv = "lora___lorahyphen___blocks___lorahyphen___0___lorahyphen___attn___lorahyphen___qkv"
    assert tensors[qkv + ".alpha_scale"].ndim == 0 and float(tensors[qkv + ".alpha_scale"]) == 2.0
    if split_fused:
        assert tuple(tensors[qkv + ".lora_down.weight"].shape) == (12, 64)
        assert tuple(tensors[qkv + ".lora_up.blocks.2.weight"].shape) == (64, 4)
        assert qkv + ".lora_up.weight" not in tensors
    else:
        assert tuple(tensors[qkv + ".lora_up.weight"].shape) == (192, 4)
    n_mod = (7 * cfg.depth) if targets == "cfg_step" else (8 * cfg.depth + 2)
    assert len({k.split(".")[0] for k in tensors}) == n_mod
    if targets == "refinement":
        fl = "lora___lorahyphen___final_layer___lorahyphen___adaLN_modulation___lorahyphen___1"
        assert (fl + ".lora_up.blocks.1.weight" in tensors) == split_fused

    path = tmp_path / "a.safetensors"
    tr.save_longcat_lora(model, path, split_fused=split_fused)
    x0, y, mask, noise, sigmas = _batch()
    with torch.no_grad():
        want = model(x0, sigmas * 1000, y, mask)
    fresh = model_from_state_dict(cfg, sd)
    assert len(fresh.load_lora(path, "a")) == n_mod
    fresh.enable_loras(["a"])
    with torch.no_grad():
        got = fresh(x0, sigmas * 1000, y, mask)
    assert _max_rel(got, want) < 1e-5


def test_checkpointing_keeps_gradients():
    cfg = _cfg(True)
    sd = random_state_dict(cfg, seed=11)
    model = _trained_model(cfg, sd, init=False)
    x0, y, mask, noise, sigmas = _batch()
    grads = []
    for ckpt in (False, True):
        (tr.enable_activation_checkpointing if ckpt else tr.disable_activation_checkpointing)(model)
        model.zero_grad(set_to_none=True)
        tr.flow_matching_loss(model, x0, y, mask, sigmas=sigmas, noise=noise).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert _max_rel(grads[1][n], grads[0][n]) < 1e-5, n
    assert any(g.abs().max() > 0 for g in grads[0].values())


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        tr.lora_config(rank=0)
    with pytest.raises(ValueError, match="use_dora"):
        tr.lora_config(use_dora=True)
    cfg = _cfg(True)
    dit = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    with pytest.raises(ValueError, match="no peft LoRA adapter"):
        tr.longcat_lora_state_dict(dit)
    with pytest.raises(TypeError, match="LoraConfig"):
        tr.add_lora(dit, {"r": 4})
    x0, y, mask, noise, _ = _batch()
    with pytest.raises(ValueError, match="sigmas"):
        tr.flow_matching_loss(dit, x0, y, mask, sigmas=torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="shift"):
        tr.sample_sigmas(2, shift=0)
