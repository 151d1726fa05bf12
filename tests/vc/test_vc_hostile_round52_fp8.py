"""Hostile inputs of the fp8 inference mode (audit 52b, 2026-12-07).

A. An ``Fp8Linear`` whose own ``weight`` (e4m3) or ``weight_scale`` was set to require grad ran with grad
   enabled: the emulation handed back an e4m3 gradient for the e4m3 weight, the real GEMM failed with
   "derivative for aten::_scaled_mm is not implemented". Now refused, naming the tensor.
B. A ``torch.func.jvp`` (or forward-mode AD) over an fp8 DiT: the fp8 layers checked ``requires_grad``
   only, which a forward tangent does not set; the quantisation dropped the tangent, so a jvp through the
   text states came back all zero, through the timestep partial, silently (the unquantised DiT refuses).

The rest pins verified behaviour: the emulated and ``torch._scaled_mm`` forward against an fp64
dequantised matmul written here, non-finite / zero / huge weight rows, odd features refused before any
conversion, dtype moves, the state-dict round trip, conversion twice, LoRA loaded before or after.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora

from longcat_vc.fp8 import E4M3_MAX, FP8_TARGETS, Fp8Linear, quantize_dit_fp8


def _seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


def _quantised(cfg=None, seed=None):
    cfg = cfg or tiny_config()
    q = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed() if seed is None else seed))
    quantize_dit_fp8(q, emulate=True)
    return cfg, q


def _set_emulate(model, emulate):
    for m in model.modules():
        if isinstance(m, Fp8Linear):
            m.emulate = emulate


def _scaled_mm_or_skip(fn):
    try:
        return fn()
    except NotImplementedError as e:  # a CPU build without fp8 _scaled_mm
        pytest.skip(f"torch._scaled_mm unavailable on this CPU build: {e}")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------- A
@pytest.mark.parametrize("emulate", [True, False])
@pytest.mark.parametrize("what", ["weight", "weight_scale"])
def test_an_fp8_weight_that_requires_grad_is_refused(what, emulate):
    cfg, q = _quantised()
    _set_emulate(q, emulate)
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.no_grad():
        want = _scaled_mm_or_skip(lambda: q(x, t, y, mask))
    assert torch.isfinite(want).all()
    getattr(q.blocks[-1].ffn.w2, what).requires_grad_(True)  # the last fp8 linear: nothing after it checks
    with pytest.raises(RuntimeError, match=rf"Fp8Linear: {what} requires grad.*torch\.no_grad"):
        q(x, t, y, mask)
    with torch.no_grad():  # inference still runs, unchanged
        assert torch.equal(q(x, t, y, mask), want)


@pytest.mark.parametrize("emulate", [True, False])
def test_an_fp8_linear_whose_bias_requires_grad_is_refused_on_every_path(emulate):
    """The emulation's bias gradient was right, the real GEMM's call raised "derivative for aten::_scaled_mm
    is not implemented": both refuse it now, alike."""
    _, q = _quantised()
    lin = q.blocks[0].attn.proj
    lin.emulate = emulate
    a = torch.randn(5, lin.in_features)
    with torch.no_grad():
        want = _scaled_mm_or_skip(lambda: lin(a))
    lin.bias.requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"Fp8Linear: bias requires grad"):
        lin(a)
    with torch.no_grad():
        assert torch.equal(lin(a), want)


# ---------------------------------------------------------------------------------------------- B
def test_a_jvp_through_the_text_states_of_an_fp8_dit_is_refused_not_zero():
    cfg, q = _quantised()
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    v = torch.randn_like(y)
    with pytest.raises(RuntimeError, match=r"no gradient flows through fp8 quantisation"):
        torch.func.jvp(lambda yy: q(x, t, yy, mask), (y,), (v,))
    with pytest.raises(RuntimeError, match=r"no gradient flows through fp8 quantisation"):
        torch.func.jvp(lambda tt: q(x, tt, y, mask), (t,), (torch.ones_like(t),))
    with torch.no_grad():
        assert torch.isfinite(q(x, t, y, mask)).all()


@pytest.mark.parametrize("how", ["func.jvp", "forward_ad", "func.grad", "vmap(grad)"])
def test_an_fp8_linear_refuses_every_differentiation_of_its_input(how):
    _, q = _quantised()
    lin = q.blocks[0].attn.proj
    a, v = torch.randn(3, lin.in_features), torch.randn(3, lin.in_features)
    with pytest.raises(RuntimeError, match=r"Fp8Linear: an input requires grad"):
        if how == "func.jvp":
            torch.func.jvp(lin, (a,), (v,))
        elif how == "forward_ad":
            with fwAD.dual_level():
                lin(fwAD.make_dual(a, v))
        elif how == "func.grad":
            torch.func.grad(lambda r: lin(r).sum())(a)
        else:
            torch.func.vmap(torch.func.grad(lambda r: lin(r).sum()))(a)


# ---------------------------------------------------------------------------------------------- pins
@pytest.mark.parametrize("emulate", [True, False])
def test_fp8_linear_equals_an_fp64_dequantised_matmul(emulate):
    """``y = (e4m3(x / s_x) s_x) (e4m3(W / s_w) s_w)^T + b``, computed here in fp64 from the definition,
    for leading dims, a token count that is no multiple of 16, a zero input row and a zero weight row."""
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=_seed())
    sd["blocks.0.attn.qkv.weight"][5] = 0.0
    w = sd["blocks.0.attn.qkv.weight"].double()
    b = sd["blocks.0.attn.qkv.bias"].double()
    q = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(q, emulate=True)
    lin = q.blocks[0].attn.qkv
    lin.emulate = emulate
    x = torch.randn(2, 7, lin.in_features) * torch.logspace(-2, 2, 7)[None, :, None]
    x[1, 3] = 0.0

    def rows(t):  # the quantisation, from the docstring's formula
        s = t.abs().amax(-1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        s = s.float().double()
        return (t / s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).double() * s

    want = rows(x.double()) @ rows(w).T + b
    with torch.no_grad():
        got = _scaled_mm_or_skip(lambda: lin(x))
    assert got.shape == (2, 7, lin.out_features) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    tol = 1e-6 if emulate else 1e-4  # (fast accumulation order)
    assert _rel(got, want) < tol, _rel(got, want)
    assert torch.allclose(got[..., 5].double(), b[5].expand(2, 7), atol=1e-6)  # the zero weight row: bias only
    assert torch.allclose(got[1, 3].double(), b, atol=1e-6)  # the zero input row
    assert _rel(got, x.double() @ w.T + b) > 1e-4  # it is really quantised


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
def test_a_non_finite_weight_row_is_nan_never_clamped_finite(value):
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=_seed())
    sd["blocks.0.ffn.w1.weight"][3, 7] = value
    sd["blocks.0.ffn.w1.weight"][9] = 3e38  # huge but finite: kept to within e4m3 rounding
    q = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(q, emulate=True)
    lin = q.blocks[0].ffn.w1
    s, dq = lin.weight_scale, lin.dequantized_weight()
    assert torch.isnan(s[3]) and torch.isnan(dq[3]).all()
    others = torch.ones(lin.out_features, dtype=torch.bool)
    others[3] = False
    assert torch.isfinite(s[others]).all() and (s[others] > 0).all() and torch.isfinite(dq[others]).all()
    assert torch.allclose(dq[9].double(), torch.full((lin.in_features,), 3e38, dtype=torch.float64), rtol=1e-6)
    with torch.no_grad():
        out = lin(torch.randn(4, lin.in_features))
    others[9] = False  # (3e38 times the input may overflow fp32: inf there is right)
    assert torch.isnan(out[:, 3]).all() and torch.isfinite(out[:, others]).all()


def test_odd_features_are_refused_before_any_linear_is_converted():
    cfg = tiny_config(hidden_size=40, num_heads=2)  # 40 % 16 != 0
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    with pytest.raises(ValueError, match=r"fp8: blocks\.0\.attn\.qkv has in/out features 40/120; .*multiples of 16"):
        quantize_dit_fp8(m, emulate=True)
    assert not any(isinstance(x, Fp8Linear) for x in m.modules())


@pytest.mark.parametrize("conv", ["half", "bfloat16", "float"])
def test_a_dtype_move_after_converting_keeps_e4m3_weights_and_fp32_scales(conv):
    cfg, q = _quantised()
    fp8_keys = [k for k, v in q.state_dict().items() if v.dtype == torch.float8_e4m3fn or k.endswith(".weight_scale")]
    before = {k: q.state_dict()[k].clone() for k in fp8_keys}
    getattr(q, conv)()
    after = q.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k].view(torch.uint8), v.view(torch.uint8)) if v.dtype.itemsize == 1 \
            else torch.equal(after[k], v), k
    lin = q.blocks[0].ffn.w2
    assert lin.act_dtype == q.dtype
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.no_grad():
        out = lin(torch.randn(3, lin.in_features, dtype=q.dtype))
        full = q(x.to(q.dtype), t, y.to(q.dtype), mask)
    assert out.dtype == q.dtype and torch.isfinite(out).all() and torch.isfinite(full).all()


def test_state_dict_round_trip_and_converting_twice(tmp_path):
    from safetensors.torch import load_file, save_file

    cfg = tiny_config()
    seed = _seed()
    _, q = _quantised(cfg, seed)
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.no_grad():
        want = q(x, t, y, mask)
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, str(tmp_path / "q.safetensors"))
    _, other = _quantised(cfg, seed + 1)
    other.load_state_dict(load_file(str(tmp_path / "q.safetensors")))
    with torch.no_grad():
        assert torch.equal(other(x, t, y, mask), want)
    assert quantize_dit_fp8(other, emulate=True) == []  # twice: a no-op
    with torch.no_grad():
        assert torch.equal(other(x, t, y, mask), want)
    plain = model_from_state_dict(cfg, random_state_dict(cfg, seed=seed))
    with pytest.raises(ValueError, match=r"disagree on fp8 quantisation"):
        plain.load_state_dict(q.state_dict())


def test_a_lora_loaded_after_converting_equals_one_loaded_before(tmp_path):
    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=_seed())
    path = str(tmp_path / "l.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=_seed())
    before, after = model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)
    before.load_lora(path, "r")
    before.enable_loras(["r"])
    quantize_dit_fp8(before, emulate=True)
    quantize_dit_fp8(after, emulate=True)
    after.load_lora(path, "r")
    after.enable_loras(["r"])
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.no_grad():
        a, b = before(x, t, y, mask), after(x, t, y, mask)
        after.disable_loras()
        base = after(x, t, y, mask)
    assert torch.isfinite(a).all() and _rel(b, a) < 1e-6 and _rel(base, a) > 1e-3
    for name in FP8_TARGETS:
        assert isinstance(after.blocks[0].get_submodule(name), Fp8Linear)
