"""GPU: peft LoRA training through ``attn_backend="auto"`` takes the Triton BSA forward + backward
(the csrc kernel and the Triton q/k prologue are forward only and must be skipped, not raise), and
its LoRA gradients equal the torch reference's (fp32)."""

from __future__ import annotations

import pytest
import torch

from longcat_vc import training as tr
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

pytestmark = pytest.mark.triton_gpu

BSA = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 4, 4], "chunk_3d_shape_k": [2, 4, 4]}


def _cfg(backend):
    # head_dim 64 (a Triton kernel size); token grid (4, 8, 8) = 8 blocks of 32 tokens
    return tiny_config(hidden_size=128, num_heads=2, enable_bsa=True, bsa_params=BSA, attn_backend=backend)


def _batch(device, B=2):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    x0 = torch.randn(B, 16, 4, 16, 16, generator=g)
    y = torch.randn(B, 1, 6, 32, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigmas = torch.rand(B, generator=g) * 0.8 + 0.1
    return [t.to(device) for t in (x0, y, noise, sigmas)]


def _grads(backend, sd, batch, dtype=torch.float32):
    cfg = _cfg(backend)
    torch.manual_seed(0)  # same random adapter init for both backends
    dit = model_from_state_dict(cfg, sd, dtype=dtype).cuda().train()
    model = tr.add_lora(dit, tr.lora_config(rank=4, alpha=4, init_lora_weights=False))
    tr.enable_activation_checkpointing(model)
    x0, y, noise, sigmas = batch
    loss = tr.flow_matching_loss(model, x0, y.to(dtype), sigmas=sigmas, noise=noise)
    loss.backward()
    return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}


def test_auto_trains_through_triton_bsa_backward(monkeypatch):
    from longcat_kernels.dispatch import record_choices

    cfg = _cfg("auto")
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 1000, ())))
    batch = _batch("cuda")
    with record_choices() as got:
        loss_auto, g_auto = _grads("auto", sd, batch)
    bsa = [c for c in got if c.op == "block_sparse_attn"]
    assert len(bsa) == 2 * cfg.depth  # forward + checkpoint recompute, per block
    # inputs need grad: the forward-only csrc kernel is not chosen, the Triton forward+backward is
    assert {(c.backend, c.impl) for c in bsa} == {("triton", "triton")}, bsa
    loss_ref, g_ref = _grads("torch", sd, batch)
    assert torch.isfinite(loss_auto) and abs(loss_auto.item() - loss_ref.item()) <= 1e-4 * abs(loss_ref.item())
    for n, g in g_ref.items():
        assert not g_auto[n].isnan().any(), n
        rel = float((g_auto[n] - g).norm() / g.norm().clamp_min(1e-12))
        assert rel < 1e-3, (n, rel)


def test_bf16_training_loss_decreases():
    cfg = _cfg("auto")
    sd = random_state_dict(cfg, seed=3)
    dit = model_from_state_dict(cfg, sd, dtype=torch.bfloat16).cuda().train()
    model = tr.add_lora(dit, tr.lora_config(rank=8, alpha=8))
    tr.enable_activation_checkpointing(model)
    x0, y, noise, sigmas = _batch("cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(8):
        loss = tr.flow_matching_loss(model, x0, y.bfloat16(), sigmas=sigmas, noise=noise)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert losses[-1] < losses[0] * 0.99, losses
