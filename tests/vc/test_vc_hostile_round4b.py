"""Hostile inputs of the KV cache, memory modes, context parallelism and fp8 layers that used to pass
silently or crash deep inside (audit 4b, 2026-12-06), one section per finding:

A. ``fuse_lora`` / ``unfuse_lora`` (and ``enable_loras``, ``disable_loras``, ``set_mode``, which unfuse
   first) refused by an fp8 layer only after the LoRA linears before it (the adaLN linears come first
   in every block) had been fused or unfused: the refusal left the model half fused.
B. ``load_state_dict`` of an unquantised state dict into an fp8-quantised DiT (or of a quantised one
   into an unquantised DiT): ``copy_`` cast the bf16 weights into the e4m3 parameters under the old
   scales (or the e4m3 values into bf16 without their scales). ``strict=False`` ran on with garbage
   weights silently; ``strict=True`` reported the missing / unexpected ``weight_scale`` keys only
   after the weights had been overwritten.
C. ``.to(dtype)`` / ``.half()`` / ``.float()`` of an fp8-quantised DiT converted the e4m3 weights and
   their fp32 scales to that dtype like any floating tensor: the scales were rounded (bf16) and the next
   forward failed inside the GEMM (``expected m1 and m2 to have the same dtype``, or ``_scaled_mm``'s
   "Invalid scaling configuration").
D. A KV cache built before a dtype round trip of the DiT (``.to(torch.bfloat16).to(torch.float32)``,
   ``.half().float()``: weights rounded, dtype as before) was accepted as fresh and mixed with the
   rounded weights silently: ``.to()`` swaps ``.data``, which keeps the identity and version counter
   the staleness fingerprint reads.
E. ``apply_memory_mode`` of a streaming pipeline (balanced -> low, as allowed) with another device:
   the attached block streamer kept the DiT's blocks and embedders on the old device while the text
   encoder and the VAE moved, and the next call failed deep inside on mixed devices (on CPU: diffusers'
   "Device 'meta' does not have a corresponding module").
F. ``enable_context_parallel(cfg_parallel="no")`` (or ``0``/``1``, ``None``) took the truthiness:
   ``"no"`` split the ranks into CFG groups (on an odd world: "cfg_parallel needs an even number of
   ranks", about a flag the caller had said no to).
G. A ``ShardedKVCache`` (a context-parallel rank's heads) given to the model after
   ``disable_context_parallel()`` was refused as "tensors of shape [1, S, 1, D], expected [1, S, 2, D]",
   which says nothing of the sharding; it is named now.
H. ``pipe.set_mode("distill", fuse_lora=True)`` on a pipeline whose DiT is fp8-quantised: the cfg-step
   LoRA was enabled, then ``fuse_lora`` was refused by the fp8 layers with ``pipe.mode`` still "basic":
   a later basic-mode call ran with the distill LoRA active, silently.
"""

from __future__ import annotations

import pytest
import torch

from test_dit import make_inputs
from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora

from longcat_vc.fp8 import Fp8Linear, quantize_dit_fp8
from longcat_vc.lora import fused_loras


@pytest.fixture(scope="module")
def base():
    cfg = tiny_config()
    return cfg, random_state_dict(cfg, seed=3)


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- A: fp8 fuse/unfuse refusals


def test_fp8_fuse_refusal_changes_no_module(tmp_path, base):
    cfg, sd = base
    path = str(tmp_path / "r.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=5)  # adaLN targets too
    m = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(m, emulate=True)
    m.load_lora(path, "r")
    m.enable_loras(["r"])
    before = _weights(m)
    with pytest.raises(ValueError, match="fuse_lora: the weights are fp8"):
        m.fuse_lora()
    assert fused_loras(m) == [] and _same(_weights(m), before)


@pytest.mark.parametrize("call", ["unfuse_lora", "disable_loras", "enable_loras"])
def test_fp8_unfuse_refusal_changes_no_module(tmp_path, base, call):
    cfg, sd = base
    path = str(tmp_path / "r.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=5)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(path, "r")
    m.enable_loras(["r"])
    m.fuse_lora()
    quantize_dit_fp8(m, emulate=True)  # quantised with the LoRA fused in
    before = _weights(m)
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.no_grad():
        out = m(x, t, y, mask)
    with pytest.raises(ValueError, match="unfuse_lora: these fp8 weights were quantised with the LoRA fused in"):
        if call == "enable_loras":
            m.enable_loras([])
        else:
            getattr(m, call)()
    assert fused_loras(m) == ["r"] and _same(_weights(m), before)
    assert all(mod.lora_fused for n, mod in m.named_modules() if n.endswith("adaLN_modulation.1"))
    with torch.no_grad():
        assert torch.equal(m(x, t, y, mask), out)


# ----------------------------------------------------------------------------- B: load_state_dict vs fp8


@pytest.mark.parametrize("strict", [True, False])
def test_unquantised_state_dict_into_fp8_model_is_refused_before_copying(base, strict):
    cfg, sd = base
    q = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(q, emulate=True)
    before = _weights(q)
    with pytest.raises(ValueError, match=r"load_state_dict: the state dict and the model disagree on fp8 "
                                         r"quantisation.*blocks\.0\.attn\.qkv: fp8 \(quantize_dit_fp8\) expects "
                                         r"weight float8_e4m3fn with weight_scale, got weight torch\.float32 without"):
        q.load_state_dict(sd, strict=strict)
    assert _same(_weights(q), before)


@pytest.mark.parametrize("strict", [True, False])
def test_quantised_state_dict_into_unquantised_model_is_refused_before_copying(base, strict):
    cfg, sd = base
    q = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(q, emulate=True)
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=4))
    before = _weights(m)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.qkv: not fp8 \(LoRALinear\), got an fp8 weight_scale"):
        m.load_state_dict(q.state_dict(), strict=strict)
    assert _same(_weights(m), before)


def test_fp8_check_leaves_torchs_own_state_dict_errors():
    from longcat_vc.config import DiTConfig
    from longcat_vc.dit import LongCatDiT

    m = LongCatDiT(DiTConfig.tiny(), device="meta")
    with pytest.raises(TypeError, match="Expected state_dict to be dict-like"):
        m.load_state_dict([("x_embedder.proj.weight", torch.zeros(1))])


def test_fp8_state_dict_loads_into_an_fp8_model_and_halves_are_refused(base):
    cfg, sd = base
    src = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(src, emulate=True)
    dst = model_from_state_dict(cfg, random_state_dict(cfg, seed=4))
    quantize_dit_fp8(dst, emulate=True)
    qsd = src.state_dict()
    half = {k: v for k, v in qsd.items() if not k.endswith("blocks.1.ffn.w2.weight_scale")}
    with pytest.raises(ValueError, match=r"blocks\.1\.ffn\.w2: .*got weight torch\.float8_e4m3fn without weight_scale"):
        dst.load_state_dict(half, strict=False)
    dst.load_state_dict(qsd)
    assert _same(_weights(dst), _weights(src))
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.no_grad():
        assert torch.equal(dst(x, t, y, mask), src(x, t, y, mask))


# ----------------------------------------------------------------------------- C: .to(dtype) of an fp8 model


@pytest.mark.parametrize("convert", ["to", "double"])
def test_dtype_conversion_keeps_fp8_weights_and_scales(base, convert):
    from test_dit import rel_l2

    cfg, sd = base
    q = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(q, emulate=True)
    fp8 = {n: (m.weight.detach().clone(), m.weight_scale.clone()) for n, m in q.named_modules() if isinstance(m, Fp8Linear)}
    x, t, y, mask = make_inputs(cfg, B=1, T=2)
    with torch.no_grad():
        ref = q(x, t, y, mask)
    q.to(torch.float64) if convert == "to" else q.double()
    assert q.dtype == torch.float64
    for n, m in q.named_modules():
        if isinstance(m, Fp8Linear):
            w, s = fp8[n]
            assert m.weight.dtype == torch.float8_e4m3fn and torch.equal(m.weight.float(), w.float()), n
            assert m.weight_scale.dtype == torch.float32 and torch.equal(m.weight_scale, s), n
            assert m.act_dtype == torch.float64, n
    with torch.no_grad():
        out = q(x.double(), t, y.double(), mask)
    # the activations are quantised from fp64 now: an e4m3 rounding boundary may fall differently
    assert out.dtype == torch.float32 and torch.isfinite(out).all() and rel_l2(out, ref) < 0.02
    q.to("cpu")  # a move only: nothing changes
    assert all(m.act_dtype == torch.float64 for m in q.modules() if isinstance(m, Fp8Linear))


# ----------------------------------------------------------------------------- D: KV cache after a dtype round trip


@pytest.mark.parametrize("trip", ["bf16", "half"])
def test_kv_cache_is_stale_after_a_dtype_round_trip(base, trip):
    cfg, sd = base
    m = model_from_state_dict(cfg, sd)
    x, t, y, mask = make_inputs(cfg, B=1, T=3)
    with torch.no_grad():
        cache = m.build_kv_cache(x[:, :, :1])
        m.to("cpu")  # a device move (exact) keeps it fresh
        m(x[:, :, 1:], t, y, mask, kv_cache=cache)
        if trip == "bf16":
            m.to(torch.bfloat16).to(torch.float32)
        else:
            m.half().float()
        with pytest.raises(ValueError, match=r"kv_cache: stale.*a dtype conversion"):
            m(x[:, :, 1:], t, y, mask, kv_cache=cache)
        fresh = m.build_kv_cache(x[:, :, :1])
        m(x[:, :, 1:], t, y, mask, kv_cache=fresh)


# ----------------------------------------------------------------------------- E: memory mode switch to another device


def test_memory_mode_switch_keeps_the_streaming_device():
    import types

    import longcat_vc.memory as M
    from longcat_vc.config import DiTConfig
    from longcat_vc.dit import LongCatDiT

    pytest.importorskip("accelerate")
    dit = LongCatDiT(DiTConfig.tiny(depth=2))
    pipe = types.SimpleNamespace(dit=dit, text_encoder=torch.nn.Linear(4, 4), vae=torch.nn.Linear(2, 2))
    M.apply_memory_mode(pipe, "balanced", "cpu")
    with pytest.raises(ValueError, match=r"apply_memory_mode: device: the DiT blocks stream to cpu, got meta"):
        M.apply_memory_mode(pipe, "low", "meta")
    assert pipe._memory.name == "balanced" and pipe.vae.weight.device.type == "cpu"
    M.apply_memory_mode(pipe, "low", torch.device("cpu"))
    assert pipe._memory.name == "low"


# ----------------------------------------------------------------------------- F: cfg_parallel must be a bool


@pytest.mark.parametrize("flag", ["no", "False", 1, None])
def test_cfg_parallel_must_be_a_bool(flag):
    from longcat_vc.config import DiTConfig
    from longcat_vc.dit import LongCatDiT

    m = LongCatDiT(DiTConfig.tiny(), device="meta")
    with pytest.raises(TypeError, match=rf"cfg_parallel: expected a bool \(True or False\), got {type(flag).__name__}"):
        m.enable_context_parallel(cfg_parallel=flag)
    assert m.context_parallel is None


# ----------------------------------------------------------------------------- G: a sharded cache without context parallelism


def test_sharded_cache_on_a_model_without_context_parallel_is_named(base):
    import dataclasses

    from longcat_vc.kv_cache import KVCache
    from longcat_vc.parallel import ShardedKVCache

    cfg, sd = base
    m = model_from_state_dict(cfg, sd)
    x, t, y, mask = make_inputs(cfg, B=1, T=3)
    with torch.no_grad():
        full = m.build_kv_cache(x[:, :, :1])
        fields = {f.name: getattr(full, f.name) for f in dataclasses.fields(KVCache)}
        fields.update(keys=[k[:, :, 1:] for k in full.keys], values=[v[:, :, 1:] for v in full.values])
        shard = ShardedKVCache(**fields, num_heads=2, head_start=1, sp_size=2, sp_rank=1)  # rank 1's half
        with pytest.raises(ValueError, match=r"kv_cache: sharded: heads 1\.\.1 of 2, built by context-parallel rank 1 "
                                             r"of 2, and this model runs without context parallelism"):
            m(x[:, :, 1:], t, y, mask, kv_cache=shard)
        whole = ShardedKVCache(**{f.name: getattr(full, f.name) for f in dataclasses.fields(KVCache)},
                               num_heads=2, head_start=0, sp_size=1, sp_rank=0)  # cfg_parallel on 2 ranks: all heads
        assert torch.equal(m(x[:, :, 1:], t, y, mask, kv_cache=whole), m(x[:, :, 1:], t, y, mask, kv_cache=full))


# ----------------------------------------------------------------------------- H: set_mode fuse on an fp8 pipeline


def test_set_mode_fuse_on_an_fp8_pipeline_is_refused_before_enabling(tmp_path, base):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from tiny_ckpt import LORA_TARGETS_CFG_STEP
    from vc_components import build_text_encoder, build_tokenizer, build_vae

    from longcat_vc.pipeline import VideoContinuationPipeline

    cfg, sd = base
    lora = str(tmp_path / "cfg.safetensors")
    write_longcat_lora(lora, cfg, targets=LORA_TARGETS_CFG_STEP, seed=5)
    dit = model_from_state_dict(cfg, sd)
    quantize_dit_fp8(dit, emulate=True)
    pipe = VideoContinuationPipeline(dit, build_vae(), build_text_encoder(), build_tokenizer(str(tmp_path / "tok")),
                                     {"shift": 12.0})
    with pytest.raises(ValueError, match=r"set_mode: fuse_lora=True: the DiT's weights are fp8"):
        pipe.set_mode("distill", lora_path=lora, fuse_lora=True)
    assert pipe.mode == "basic" and dit.active_loras == []
    assert not any(getattr(m, "lora_active", None) for m in dit.modules())
    pipe.set_mode("distill", lora_path=lora)  # unfused beside the fp8 weights: fine
    assert pipe.mode == "distill" and dit.active_loras == ["cfg_step_lora"]
