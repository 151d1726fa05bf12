"""Round 56: the diffusers integration across diffusers' Wan family (VACE, SkyReels-V2, Wan-Animate, Wan 2.2's two
experts) and the diffusers / peft / accelerate features used around an applied model (LoRA, fused QKV, attention
backends, offloading, gradient checkpointing, save_pretrained, torch.compile and peft wrappers). Tiny random fp32
models on CPU: at sparsity 0 the applied model equals diffusers' own."""
from __future__ import annotations

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import (  # noqa: E402
    SkyReelsV2Transformer3DModel, WanAnimateTransformer3DModel, WanTransformer3DModel, WanVACETransformer3DModel,
)

import longcat_kernels as lk  # noqa: E402
from longcat_kernels.integrations.diffusers import (  # noqa: E402
    BlockSparseWanAttnProcessor, apply_block_sparse_attention, remove_block_sparse_attention,
)

HEADS, HEAD_DIM, TEXT_DIM = 2, 16, 24
COMMON = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
              out_channels=4, text_dim=TEXT_DIM, freq_dim=16, ffn_dim=48, num_layers=2, rope_max_seq_len=32)
P0 = lk.BlockSparseParams(sparsity=0.0, chunk_q=(2, 2, 2))


def _rand(m, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return m.eval()


def _wan(seed=0):
    return _rand(WanTransformer3DModel(**COMMON), seed)


def _inputs(F=3, H=8, W=12, seed=None):
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, ())) if seed is None else seed)
    return dict(hidden_states=torch.randn(1, 4, F, H, W, generator=g), timestep=torch.tensor([300]),
                encoder_hidden_states=torch.randn(1, 7, TEXT_DIM, generator=g))


def _run(m, inp):
    with torch.no_grad():
        out = m(**inp, return_dict=False)[0]
    assert torch.isfinite(out).all()
    return out


def _close(a, b, atol=1e-5):
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _procs(m):
    return {n: type(mod.processor).__name__ for n, mod in m.named_modules() if callable(getattr(mod, "set_processor", None))}


# ---- the Wan family ---------------------------------------------------------------------------------------------

def test_vace_main_blocks_only_attn2_and_vace_blocks_untouched():
    m = _rand(WanVACETransformer3DModel(**COMMON, vace_layers=[0, 1], vace_in_channels=6))
    inp = _inputs()
    inp["control_hidden_states"] = torch.randn(1, 6, 3, 8, 12)
    ref = _run(m, inp)
    apply_block_sparse_attention(m, P0, backend="torch", fused_prologue=True)
    procs = _procs(m)
    assert {n for n, p in procs.items() if p == "BlockSparseWanAttnProcessor"} == {"blocks.0.attn1", "blocks.1.attn1"}
    assert procs["blocks.0.attn2"] == procs["vace_blocks.0.attn1"] == "WanAttnProcessor"  # as the README says
    _close(_run(m, inp), ref)


@pytest.mark.parametrize("num_frame_per_block", [1, 2])
@pytest.mark.parametrize("diffusion_forcing", [False, True])
def test_skyreels_v2_diffusion_forcing(num_frame_per_block, diffusion_forcing):
    m = _rand(SkyReelsV2Transformer3DModel(**COMMON, inject_sample_info=True, num_frame_per_block=num_frame_per_block))
    inp = _inputs(F=4)
    inp.update(enable_diffusion_forcing=diffusion_forcing, fps=torch.tensor([0]),
               timestep=torch.tensor([[300, 200, 100, 50]]) if diffusion_forcing else torch.tensor([300]))
    ref = _run(m, inp)
    apply_block_sparse_attention(m, P0, backend="torch", fused_prologue=True)
    _close(_run(m, inp), ref)  # num_frame_per_block > 1: the block-causal mask goes to diffusers' processor


def test_wan_animate_face_adapter_untouched():
    m = _rand(WanAnimateTransformer3DModel(
        **{**COMMON, "in_channels": 12}, latent_channels=4, image_dim=20, motion_encoder_size=16,
        motion_encoder_channel_sizes={"16": 8, "8": 8, "4": 8}, motion_style_dim=8, motion_dim=4,
        motion_encoder_dim=8, face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=1))
    F = 3
    inp = dict(hidden_states=torch.randn(1, 12, F, 8, 12), timestep=torch.tensor([300]),
               encoder_hidden_states=torch.randn(1, 512, TEXT_DIM), encoder_hidden_states_image=torch.randn(1, 5, 20),
               pose_hidden_states=torch.randn(1, 4, F - 1, 8, 12), face_pixel_values=torch.randn(1, 3, 9, 16, 16))
    ref = _run(m, inp)
    apply_block_sparse_attention(m, P0, backend="torch", fused_prologue=True)
    assert _procs(m)["face_adapter.0"] == "WanAnimateFaceBlockAttnProcessor"
    _close(_run(m, inp), ref)


def test_wan22_two_experts_keep_their_own_grids():
    m1, m2 = _wan(1), _wan(2)
    inp, small = _inputs(), _inputs(F=2, H=6, W=6)
    r1, r2, s2 = _run(m1, inp), _run(m2, inp), _run(m2, small)
    for m in (m1, m2):
        apply_block_sparse_attention(m, P0, backend="torch", fused_prologue=True)
    for _ in range(2):
        _close(_run(m1, inp), r1)
        _close(_run(m2, small), s2)
        _close(_run(m2, inp), r2)


def test_wan_animate_2_is_refused_unchanged():
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2Transformer3DModel
    m = WanAnimate2Transformer3DModel(dim=32, ffn_dim=48, freq_dim=16, text_dim=24, num_heads=2, num_layers=2,
                                      in_dim=4, out_dim=4)
    with pytest.raises(TypeError, match="transformer: expected"):
        apply_block_sparse_attention(m, P0)
    assert not m._forward_pre_hooks and not hasattr(m, "_longcat_block_sparse")


# ---- diffusers / peft features around an applied model ----------------------------------------------------------

def _lora_sd(seed):
    g = torch.Generator().manual_seed(seed)
    inner = HEADS * HEAD_DIM
    return {f"blocks.{i}.attn1.{p}.lora_{ab}.weight": torch.randn(*((4, inner) if ab == "A" else (inner, 4)), generator=g) * 0.3
            for i in range(2) for p in ("to_q", "to_k", "to_v", "to_out.0") for ab in "AB"}


@pytest.mark.parametrize("fused", [False, True])
def test_lora_adapters_fuse_and_unload(fused):
    pytest.importorskip("peft")
    inp = _inputs()
    ref_m = _wan()
    base = _run(ref_m, inp)
    m = _wan()
    apply_block_sparse_attention(m, P0, backend="torch", fused_prologue=fused)
    for mm in (ref_m, m):
        mm.load_lora_adapter(_lora_sd(1), adapter_name="a", prefix=None)
        mm.load_lora_adapter(_lora_sd(2), adapter_name="b", prefix=None)
        mm.set_adapters(["a", "b"], [0.7, 0.4])
    ref = _run(ref_m, inp)
    assert (ref - base).abs().max() > 0.1  # the adapters change the output
    _close(_run(m, inp), ref)
    m.fuse_lora()
    _close(_run(m, inp), ref)
    m.unfuse_lora()
    m.unload_lora()
    _close(_run(m, inp), base)
    assert isinstance(m.blocks[0].attn1.processor, BlockSparseWanAttnProcessor)


def test_lora_at_sparsity_half_equals_merged_weights():
    """The processor runs the adapted projections: LoRA on to_q/k/v/out equals the same weights merged by hand."""
    pytest.importorskip("peft")
    params = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))
    inp = _inputs()
    m = _wan()
    m.load_lora_adapter(_lora_sd(3), adapter_name="a", prefix=None)
    merged = _wan()
    sd = _lora_sd(3)
    with torch.no_grad():
        for i in range(2):
            for p in ("to_q", "to_k", "to_v", "to_out.0"):
                lin = merged.get_submodule(f"blocks.{i}.attn1.{p}")
                lin.weight += sd[f"blocks.{i}.attn1.{p}.lora_B.weight"] @ sd[f"blocks.{i}.attn1.{p}.lora_A.weight"]
    dense_lora = _run(m, inp)
    for mm in (m, merged):
        apply_block_sparse_attention(mm, params, backend="torch")
    out = _run(m, inp)
    _close(out, _run(merged, inp), atol=1e-4)
    assert (out - dense_lora).abs().max() > 1e-3  # really sparse


@pytest.mark.parametrize("before", [False, True])
def test_fuse_qkv_projections_before_or_after_apply(before):
    inp = _inputs()
    m = _wan()
    ref = _run(m, inp)
    if before:
        m.fuse_qkv_projections()
    apply_block_sparse_attention(m, P0, backend="torch", fused_prologue=True)
    if not before:
        m.fuse_qkv_projections()
    assert m.blocks[0].attn1.fused_projections
    _close(_run(m, inp), ref)
    m.unfuse_qkv_projections()
    _close(_run(m, inp), ref)
    remove_block_sparse_attention(m)
    assert type(m.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"


def test_set_attention_backend_reaches_the_original_processor():
    m = _wan()
    inp = _inputs()
    ref = _run(m, inp)
    apply_block_sparse_attention(m, P0, backend="torch")
    m.set_attention_backend("native")
    _close(_run(m, inp), ref)
    remove_block_sparse_attention(m)
    assert str(m.blocks[0].attn1.processor._attention_backend.value) == "native"
    m.reset_attention_backend()
    assert m.blocks[1].attn1.processor._attention_backend is None


@pytest.mark.parametrize("how", ["leaf_level", "block_level", "accelerate"])
def test_offloading_hooks(how):
    inp = _inputs()
    m = _wan()
    ref = _run(m, inp)
    apply_block_sparse_attention(m, P0, backend="torch", fused_prologue=True)
    if how == "accelerate":
        accelerate = pytest.importorskip("accelerate")
        accelerate.cpu_offload(m, execution_device=torch.device("cpu"))
    else:
        m.enable_group_offload(torch.device("cpu"), offload_type=how, num_blocks_per_group=1)
    _close(_run(m, inp), ref)


@pytest.mark.parametrize("how", ["leaf_level", "block_level", "accelerate"])
def test_offloading_enabled_before_apply_at_sparsity_half_then_remove(how):
    params = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))
    inp = _inputs()
    want = _run(apply_block_sparse_attention(_wan(), params, backend="torch", fused_prologue=False), inp)
    m = _wan()
    ref = _run(m, inp)
    if how == "accelerate":
        pytest.importorskip("accelerate").cpu_offload(m, execution_device=torch.device("cpu"))
    else:
        m.enable_group_offload(torch.device("cpu"), offload_type=how, num_blocks_per_group=1)
    apply_block_sparse_attention(m, params, backend="torch", fused_prologue=True)
    out = _run(m, inp)
    _close(out, want)
    assert (out - ref).abs().max() > 1e-3
    remove_block_sparse_attention(m)
    _close(_run(m, inp), ref, atol=0)


def test_gradient_checkpointing_toggled_after_apply():
    inp = _inputs()

    def grads(m):
        m.zero_grad()
        out = m(**inp, return_dict=False)[0]
        out.square().mean().backward()
        g = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        assert torch.isfinite(g).all()
        return out.detach(), g

    m = _wan().train()
    ref = grads(m)
    apply_block_sparse_attention(m, P0, backend="torch")
    m.enable_gradient_checkpointing()
    for got in (grads(m), grads(m)):
        _close(got[0], ref[0])
        _close(got[1], ref[1])
    m.disable_gradient_checkpointing()
    _close(grads(m)[1], ref[1])


def test_save_pretrained_of_an_applied_model_is_the_plain_model(tmp_path):
    inp = _inputs()
    plain = _wan()
    plain.save_pretrained(tmp_path / "plain")
    m = _wan()
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(2, 2, 2)), backend="torch")
    m.save_pretrained(tmp_path / "applied")
    cfg = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("plain", "applied")]
    assert cfg[0] == cfg[1]
    loaded = WanTransformer3DModel.from_pretrained(tmp_path / "applied").eval()
    assert not hasattr(loaded, "_longcat_block_sparse") and not loaded._forward_pre_hooks
    assert type(loaded.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), plain.state_dict().values()))
    # a loaded model runs bit-identically to the plain model loaded the same way
    _close(_run(loaded, inp), _run(WanTransformer3DModel.from_pretrained(tmp_path / "plain").eval(), inp), atol=0)


# ---- wrappers: torch.compile's OptimizedModule, peft's PeftModel (bugs fixed in round 56) ------------------------

def test_apply_to_a_torch_compile_wrapper_patches_the_model_inside():
    """Was: hooks on the wrapper, processors on the model: calling the model itself raised 'RoPE tables of a
    forward the pre-forward hook did not see'."""
    params = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))
    inp = _inputs()
    want = _run(apply_block_sparse_attention(_wan(), params, backend="torch"), inp)
    m = _wan()
    c = torch.compile(m, backend="eager")
    assert apply_block_sparse_attention(c, params, backend="torch") is c
    _close(_run(m, inp), want, atol=0)
    _close(_run(c, inp), want, atol=0)
    assert remove_block_sparse_attention(m) is m
    assert type(m.blocks[0].attn1.processor).__name__ == "WanAttnProcessor" and not m._forward_pre_hooks
    assert not c._forward_pre_hooks and not m.rope._forward_hooks


@pytest.mark.parametrize("order", ["apply_then_wrap", "wrap_then_apply"])
def test_peft_model_wrapper_apply_and_remove(order):
    """Was: remove of a PeftModel made after apply raised AttributeError halfway (processors back, the marker
    left: the model could not be applied again); apply to the PeftModel then remove of the model was a no-op."""
    peft = pytest.importorskip("peft")
    inp = _inputs()
    m = _wan()
    ref = _run(m, inp)
    cfg = peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"])
    if order == "apply_then_wrap":
        apply_block_sparse_attention(m, P0, backend="torch")
        pm = peft.get_peft_model(m, cfg)
    else:
        pm = peft.get_peft_model(m, cfg)
        apply_block_sparse_attention(pm, P0, backend="torch")
    _close(_run(pm, inp), ref)
    _close(_run(m, inp), ref)
    remove_block_sparse_attention(pm if order == "apply_then_wrap" else m)
    assert type(m.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
    assert not hasattr(m, "_longcat_block_sparse") and not m._forward_pre_hooks and not pm._forward_pre_hooks
    apply_block_sparse_attention(m, P0, backend="torch")  # can be applied again
    _close(_run(pm, inp), ref)
