"""FP8 weights (issue 17): storage dtype and scales, dequantisation error, the emulated forward
against the fp32 model, LoRA beside fp8 GEMMs, clear refusals where fp8 GEMMs do not exist.

The fp8 tensor-core path (``torch._scaled_mm``) needs CUDA sm89+: its speed and error at full size
are measured by ``bench/memory_modes_gpu.py``; here the same quantised values are checked through
the emulation (dequantised fp32 matmul)."""

from __future__ import annotations

import pytest
import torch

from longcat_vc.fp8 import E4M3_MAX, FP8_TARGETS, Fp8Linear, quantize_dit_fp8, quantize_rows
from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_quantize_rows_scales_and_error():
    w = torch.randn(48, 80, dtype=torch.float64) * torch.logspace(-3, 2, 48, dtype=torch.float64)[:, None]
    wq, s = quantize_rows(w)
    assert wq.dtype == torch.float8_e4m3fn and s.shape == (48, 1) and s.dtype == torch.float32
    # every row uses the full e4m3 range: its largest entry maps to +-448
    assert torch.allclose(wq.float().abs().amax(1), torch.full((48,), E4M3_MAX))
    deq = wq.double() * s.double()
    assert torch.isfinite(deq).all()
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 per entry (normal range)
    rel_rows = (deq - w).norm(dim=1) / w.norm(dim=1)
    assert rel_rows.max().item() < 0.04, rel_rows.max().item()
    assert _rel(deq, w) > 1e-4  # it is really quantised


def test_quantize_dit_emulated_matches_fp32(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()))
    ref, q = model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)
    done = quantize_dit_fp8(q, emulate=True)
    assert len(done) == cfg.depth * len(FP8_TARGETS)
    for i in range(cfg.depth):
        for name in FP8_TARGETS:
            m = q.blocks[i].get_submodule(name)
            assert isinstance(m, Fp8Linear) and m.weight.dtype == torch.float8_e4m3fn
            assert m.weight_scale.shape == (m.out_features,)
            w = ref.blocks[i].get_submodule(name).weight
            assert 1e-4 < _rel(m.dequantized_weight(), w) < 0.04
        # the fp32 islands stay in the model dtype
        assert q.blocks[i].adaLN_modulation[1].weight.dtype == torch.float32
    assert q.final_layer.linear.weight.dtype == torch.float32
    x, t, y, mask = make_inputs(cfg, B=2, T=3)
    with torch.no_grad():
        a, b = ref(x, t, y, mask), q(x, t, y, mask)
    assert torch.isfinite(b).all()
    assert 1e-4 < _rel(b, a) < 0.1, _rel(b, a)
    # quantising twice is a no-op
    assert quantize_dit_fp8(q, emulate=True) == []
    # the real torch._scaled_mm call (row-wise scales, transposed fp8 weight, bias) gives the emulated
    # result up to accumulation order (torch's CPU build has the op: checks the call's layout)
    try:
        for m in q.modules():
            if isinstance(m, Fp8Linear):
                m.emulate = False
        with torch.no_grad():
            c = q(x, t, y, mask)
    except (RuntimeError, NotImplementedError) as e:  # an older CPU build without fp8 _scaled_mm
        pytest.skip(f"torch._scaled_mm unavailable on this CPU build: {e}")
    assert torch.isfinite(c).all() and _rel(c, b) < 1e-4, _rel(c, b)


def test_fp8_with_unfused_lora_and_fuse_refused(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=3)
    ref, q = model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)
    path = str(tmp_path / "l.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=5)
    for m in (ref, q):
        m.load_lora(path, "r")
        m.enable_loras(["r"])
    quantize_dit_fp8(q, emulate=True)
    x, t, y, mask = make_inputs(cfg, B=2, T=3)
    with torch.no_grad():
        a, b = ref(x, t, y, mask), q(x, t, y, mask)
        q.disable_loras()
        base = q(x, t, y, mask)
    assert _rel(b, a) < 0.1 and _rel(base, a) > 2 * _rel(b, a)  # the adapters still act
    q.enable_loras(["r"])
    with pytest.raises(ValueError, match="fuse the LoRA before quantising"):
        q.fuse_lora()


def test_fp8_refuses_devices_without_fp8_gemms():
    cfg = tiny_config()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=0))
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*device cpu"):
        quantize_dit_fp8(m)
    assert not isinstance(m.blocks[0].attn.qkv, Fp8Linear)  # nothing converted


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp8_scaled_mm_matches_emulation_gpu():
    from longcat_vc.fp8 import fp8_supported

    if not fp8_supported("cuda"):
        pytest.skip("needs sm89+")
    lin = torch.nn.Linear(256, 384, bias=True, device="cuda", dtype=torch.bfloat16)
    from longcat_vc.lora import LoRALinear

    lin.__class__ = LoRALinear
    lin.lora_adapters, lin.lora_active, lin.lora_fused = {}, [], []
    from longcat_vc.fp8 import _convert

    ref_w = lin.weight.detach().float().clone()
    _convert(lin, torch.device("cuda"))
    x = torch.randn(3, 77, 256, device="cuda", dtype=torch.bfloat16)
    y = lin(x)
    lin.emulate = True
    y_emul = lin(x)
    assert torch.isfinite(y).all()
    assert _rel(y.float(), y_emul.float()) < 1e-2
    exact = torch.nn.functional.linear(x.float(), ref_w, lin.bias.float())
    assert _rel(y.float(), exact) < 0.06


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("cache", [False, True])
def test_fused_quantisation_equals_quantising_each_linear(tmp_path, monkeypatch, lora, cache):
    """The blocks hand fp8 linears activations quantised inside the producing op (adaLN modulate,
    cross-attention LayerNorm, SwiGLU gate; w1/w3 sharing one quantisation): the same values as
    producing the activation in the model dtype and quantising it in each ``Fp8Linear``. With
    unfused LoRA adapters the fused ops also return the activation for them."""
    import longcat_kernels as lk
    from longcat_vc.modules import block as block_mod

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ()).item()))
    q = model_from_state_dict(cfg, sd)
    if lora:
        path = str(tmp_path / "l.safetensors")
        write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=5)
        q.load_lora(path, "r")
        q.enable_loras(["r"])
    quantize_dit_fp8(q, emulate=True)
    x, t, y, mask = make_inputs(cfg, B=2, T=3)
    c = 1

    def run():
        with torch.no_grad():
            if cache:
                return q(x[:, :, c:], t, y, mask, kv_cache=kv)
            return q(x, t, y, mask)

    calls = []
    for name in ("fp8_modulate_quantize", "fp8_layer_norm_quantize", "fp8_silu_mul_quantize", "fp8_quantize_rows"):
        orig = getattr(lk, name)

        def spy(*a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(*a, **k)

        monkeypatch.setattr(f"longcat_vc.fp8.{name}", spy)
    with torch.no_grad():
        kv = q.build_kv_cache(x[:1, :, :c]) if cache else None
    calls.clear()  # the step's calls only (the cache build runs the blocks without cross-attention)
    fused = run()
    per_block = {n: calls.count(n) / cfg.depth for n in set(calls)}
    # per block: two modulates, one cross-attention LayerNorm, one gate; quantised on entry to their
    # linear: attn.proj, cross_attn.kv_linear (text states), cross_attn.proj
    assert per_block == {"fp8_modulate_quantize": 2, "fp8_layer_norm_quantize": 1, "fp8_silu_mul_quantize": 1,
                         "fp8_quantize_rows": 3}, per_block
    monkeypatch.setattr(block_mod, "fp8_input_kind", lambda *m: None)  # the blocks' plain path
    plain = run()
    assert torch.isfinite(fused).all()
    assert torch.equal(fused, plain), _rel(fused, plain)
