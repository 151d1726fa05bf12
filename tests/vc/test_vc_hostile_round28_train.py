"""Round 28 (LoRA training through the DiT): a forward that needs gradients through the cond-prefix
block-sparse path or a KV cache (both inference only) is refused at the DiT with a message about
training, not deep in ``attn_with_kv_cache`` with advice ("call it under torch.no_grad()") that a
training loop cannot follow."""

from __future__ import annotations

import pytest
import torch

from longcat_vc import training as tr
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

BSA = {"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]}


def _peft_model(bsa: bool):
    cfg = tiny_config(enable_bsa=bsa, bsa_params=BSA if bsa else None, attn_backend="torch")
    dit = model_from_state_dict(cfg, random_state_dict(cfg, seed=int(torch.randint(0, 1000, ())))).train()
    return dit, tr.add_lora(dit, tr.lora_config(rank=4, alpha=8))


@pytest.mark.parametrize("c", [1, 2])
def test_cond_prefix_with_bsa_under_grad_is_refused_as_a_training_limit(c):
    """With BSA on, ``model(x, t, y, num_cond_latents=c)`` with gradients failed inside
    ``attn_with_kv_cache`` ("q: attn_with_kv_cache is forward-only ... call it under torch.no_grad() or
    detach the input"), naming an op the user never called and advice that silently gives a training loop
    no gradients; now a ValueError naming num_cond_latents and block-sparse attention."""
    _, model = _peft_model(bsa=True)
    x = torch.randn(1, 16, 4, 8, 8)
    t = torch.tensor([[0.0] * c + [500.0] * (4 - c)])
    y = torch.randn(1, 1, 5, 32)
    with pytest.raises(ValueError, match="num_cond_latents.*block-sparse"):
        model(x, t, y, num_cond_latents=c)
    with torch.no_grad():  # inference is unchanged
        assert torch.isfinite(model(x, t, y, num_cond_latents=c)).all()


def test_all_cond_frames_with_bsa_still_train():
    """``num_cond_latents == T`` with BSA runs block_sparse_attn alone (it has a backward): not refused."""
    _, model = _peft_model(bsa=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    out = model(torch.randn(1, 16, 4, 8, 8), torch.zeros(1, 4), torch.randn(1, 1, 5, 32), num_cond_latents=4)
    out.square().mean().backward()
    # all-cond frames skip cross-attention (its adapters get no gradient); self-attention's must
    attn = [p for n, p in model.named_parameters() if p.requires_grad and ".attn." in n]
    assert attn and all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0 for p in attn)


def test_cond_prefix_dense_trains_and_matches_the_oracle():
    """The dense cond-prefix path (no BSA) stays trainable: the refusal above must not catch it. Its LoRA
    gradients match the same model with the prefix attention replaced by the fp64 masked oracle."""
    import longcat_kernels as lk
    from longcat_kernels.testing.oracle import attention_oracle, prefix_mask

    cfg = tiny_config(attn_backend="torch")
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 1000, ())))
    x, y = torch.randn(1, 16, 4, 4, 4), torch.randn(1, 1, 5, 32)
    t = torch.tensor([[0.0, 0.0, 600.0, 600.0]])
    seed = int(torch.randint(0, 2**31, ()))
    real = lk.prefix_attn

    def oracle(q, k, v, P, backend=None):
        return attention_oracle(q, k, v, prefix_mask(q.shape[1], P))[0].to(q.dtype)

    grads = []
    for fn in (real, oracle):
        lk.prefix_attn = fn
        try:
            torch.manual_seed(seed)
            model = tr.add_lora(model_from_state_dict(cfg, sd).train(), tr.lora_config(rank=4, alpha=8))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
            model(x, t, y, num_cond_latents=2)[:, :, 2:].square().mean().backward()
        finally:
            lk.prefix_attn = real
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()))


def test_kv_cache_forward_under_grad_is_refused_as_a_training_limit():
    """A forward with ``kv_cache`` and gradients (a training loop reusing the inference cache) failed deep in
    ``attn_with_kv_cache``; now a ValueError naming kv_cache as inference only."""
    dit, model = _peft_model(bsa=False)
    model.eval()
    y = torch.randn(1, 1, 5, 32)
    with torch.no_grad():
        cache = dit.build_kv_cache(torch.randn(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="kv_cache.*inference only"):
        model(torch.randn(1, 16, 2, 4, 4), torch.tensor([500.0]), y, kv_cache=cache)
