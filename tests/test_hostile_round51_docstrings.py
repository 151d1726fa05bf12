"""Round 51: docstring / README claims of the public APIs checked against behaviour (CPU, tiny shapes)."""

import dataclasses
import inspect
import math

import pytest
import torch

import longcat_kernels as lk
import longcat_vc
from longcat_vc import DiTConfig, LongCatDiT, dit_forward_flops


def _qkv(b=1, s=32, h=2, d=8):
    return tuple(torch.randn(b, s, h, d) for _ in range(3))


# ---- longcat_kernels: every __all__ name exists and carries a docstring ----------------------------

@pytest.mark.parametrize("name", [n for n in lk.__all__ if n != "__version__"])
def test_public_names_have_docstrings(name):
    obj = getattr(lk, name)
    assert inspect.getdoc(obj), name


def test_available_backends_accepts_public_function_names_and_refuses_callables():
    # the docstring: a public function's *name* dispatches as its op
    for name in ("fp8_quantize_rows", "fp8_layer_norm_quantize", "fp8_modulate_quantize",
                 "fp8_silu_mul_quantize", "flash_attn_with_kvcache"):
        r = lk.available_backends(op=name, device="cpu")
        assert set(r) == {"torch", "triton", "cuda"} and r["torch"] is None
    with pytest.raises(ValueError, match="op"):
        lk.available_backends(op="")
    with pytest.raises(ValueError, match="device"):
        lk.available_backends(device="xpu")
    assert "the name (a str)" in inspect.getdoc(lk.available_backends)


def test_select_blocks_documented_defaults_and_errors():
    q, k, _ = _qkv()
    with pytest.warns(RuntimeWarning, match="keeps int"):                # 0 of 8 blocks kept: warned
        sel = lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), backend="torch")
    assert sel.grid_k == (2, 4, 4) and sel.chunk_k == (1, 2, 2)        # grid_k / chunk_k defaults
    assert sel.indices.dtype == torch.int32 and sel.counts.dtype == torch.int32
    assert sel.indices.shape[:3] == sel.counts.shape == (1, 2, 8)
    assert int(sel.counts.max()) == int((1 - 0.9375) * 8)               # default sparsity 0.9375
    with pytest.raises(ValueError, match="sparsity"):
        lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), sparsity=1.0)
    with pytest.raises(ValueError, match="cdf_threshold"):
        lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), sparsity=None, cdf_threshold=1.5)
    with pytest.raises(ValueError, match="chunk_q"):
        lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(4, 2, 2))
    with pytest.raises(lk.BackendUnavailableError):
        lk.select_blocks(q, k, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), backend="cuda")


def test_block_sparse_attn_documented_returns():
    q, k, v = _qkv()
    out, lse = lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), sparsity=None,
                                    cdf_threshold=0.0, backend="torch", return_lse=True)
    # a query block with no key block: zeros, lse -inf, fp32 [B, H, S]
    assert out.is_contiguous() and out.dtype == q.dtype and not out.isnan().any()
    assert torch.equal(out, torch.zeros_like(out))
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 32) and bool((lse == -math.inf).all())
    with pytest.raises(ValueError, match="grid_q"):
        lk.block_sparse_attn(q, k, v)
    with pytest.raises(ValueError, match="scale"):
        lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), scale=3e38)


def test_cache_and_prefix_documented_errors():
    q, k, v = _qkv(b=2, s=16)
    kc, vc = torch.randn(1, 16, 2, 8), torch.randn(1, 16, 2, 8)
    with pytest.raises(ValueError, match="requires_grad"):
        lk.attn_with_kv_cache(q.clone().requires_grad_(), k, v, kc, vc)
    with pytest.raises(ValueError, match="k_cache/v_cache"):
        lk.attn_with_kv_cache(q, k, v, kc, None)
    empty = torch.randn(1, 0, 2, 8)
    torch.testing.assert_close(lk.attn_with_kv_cache(q, k, v, empty, empty, backend="torch"),
                               lk.attn_with_kv_cache(q, k, v, backend="torch"))    # seq_cache 0 == no cache
    with pytest.raises(ValueError, match="prefix_len"):
        lk.prefix_attn(q, k, v, 17)
    with pytest.raises(TypeError, match="prefix_len"):
        lk.prefix_attn(q, k, v, 3.0)
    rope = lk.Rope3D((2, 4, 4), 8)
    with pytest.raises(ValueError, match="rope"):
        lk.flash_attn_with_kvcache(q, kc, vc, rope=rope)                 # rope needs k
    sel = lk.select_blocks(torch.randn(2, 16, 2, 8), torch.randn(2, 32, 2, 8), grid_q=(1, 4, 4),
                           grid_k=(2, 4, 4), chunk_q=(1, 2, 2))
    with pytest.raises(ValueError, match="block_sparse"):                # docstring: a sparsity other than default raises
        lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope,
                              block_sparse=lk.BlockSparseParams(sparsity=0.5, selection=sel))


def test_rope_documented_defaults_and_errors():
    rope = lk.Rope3D((4, 6, 13), head_dim=128)
    assert tuple(rope.dims) == (44, 42, 42) and rope.theta == 10000.0 and rope.pairs == "interleaved"
    assert rope.cos_t.shape == (4, 44) and rope.cos_h.shape == (6, 42) and rope.cos_w.shape == (13, 42)
    assert rope.cos_t.dtype == torch.float32
    for hd in (4, 7):
        with pytest.raises(ValueError, match="head_dim"):
            lk.Rope3D((1, 2, 2), hd)
    x = torch.randn(1, 16, 2, 8, dtype=torch.float16)
    y = lk.apply_rope_3d(x, lk.Rope3D((2, 4, 4), 8), frame_offset=1)
    assert y.dtype == torch.float16 and y.is_contiguous() and not y.isnan().any()
    with pytest.raises(lk.BackendUnavailableError):
        lk.qk_norm_rope(x.float(), x.float(), torch.ones(8), torch.ones(8), backend="cuda")


def test_fp8_documented_contracts():
    x = torch.randn(2, 8, 64)
    q, s = lk.fp8_quantize_rows(x, backend="torch")
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (2, 8, 1) and s.dtype == torch.float32
    assert ((q.float() * s - x).norm() / x.norm()).item() < 0.05
    q64, _ = lk.fp8_quantize_rows(x.double(), backend="torch")            # float64: torch backend
    assert q64.shape == x.shape
    with pytest.raises(ValueError, match="weight/bias"):
        lk.fp8_layer_norm_quantize(x, torch.ones(64))
    with pytest.raises(TypeError, match="b"):
        lk.fp8_silu_mul_quantize(x, x.half())
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    _, _, y = lk.fp8_silu_mul_quantize(a, b, return_input=True, backend="torch")
    torch.testing.assert_close(y, torch.nn.functional.silu(a) * b)


# ---- longcat_vc ---------------------------------------------------------------------------------

def test_vc_public_names_have_docstrings():
    for name in longcat_vc.__all__:
        assert inspect.getdoc(getattr(longcat_vc, name)), name
    for m in ("from_pretrained", "load_lora", "enable_loras", "fuse_lora", "unfuse_lora", "disable_loras",
              "build_kv_cache", "forward"):
        assert inspect.getdoc(getattr(LongCatDiT, m)), m


@pytest.fixture(scope="module")
def tiny_dit():
    torch.manual_seed(0)
    return LongCatDiT(DiTConfig.tiny()).eval()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_dit_forward_refuses_non_finite_timestep(tiny_dit, bad):
    # was: a NaN/inf timestep returned an all-NaN (or garbage) prediction without an error
    cfg = tiny_dit.config
    x = torch.randn(2, 16, 2, 4, 4)
    text = torch.randn(2, 1, 3, cfg.caption_channels)
    with torch.no_grad():
        ok = tiny_dit(x, torch.tensor([500.0, 700.0]), text)
        assert ok.dtype == torch.float32 and ok.shape == x.shape and ok.isfinite().all()   # docstring: fp32
        with pytest.raises(ValueError, match="timestep"):
            tiny_dit(x, torch.tensor([bad, 700.0]), text)
        with pytest.raises(ValueError, match="timestep"):
            tiny_dit(x, torch.tensor([[500.0, bad], [1.0, 2.0]]), text)


def test_dit_forward_documented_errors(tiny_dit):
    cfg = tiny_dit.config
    x = torch.randn(2, 16, 3, 4, 4)
    text = torch.randn(2, 1, 3, cfg.caption_channels)
    t = torch.tensor([500.0, 500.0])
    with torch.no_grad():
        with pytest.raises(ValueError, match="encoder_attention_mask"):
            tiny_dit(x, t, text, torch.zeros(2, 3).masked_fill(torch.arange(3) > 1, -math.inf))
        with pytest.raises(ValueError, match="num_cond_latents"):
            tiny_dit(x, t, text, num_cond_latents=4)
        cache = tiny_dit.build_kv_cache(x[:1, :, :1])
        assert cache.num_frames == 1 and cache.grid_hw == (2, 2) and len(cache.keys) == cfg.depth
        assert cache.keys[0].shape == (1, 4, cfg.num_heads, cfg.hidden_size // cfg.num_heads)
        with pytest.raises(ValueError, match="num_cond_latents"):
            tiny_dit(x[:, :, 1:], t, text, kv_cache=cache, num_cond_latents=2)
    with pytest.raises(ValueError, match="enable_loras"):
        tiny_dit.enable_loras(["nope"])
    with pytest.raises(ValueError, match="patch_size"):
        LongCatDiT(dataclasses.replace(cfg, patch_size=(2, 2, 2)))


def test_dit_forward_flops_validates_its_arguments():
    cfg = DiTConfig.tiny()
    assert dit_forward_flops(cfg, 10, 10, 3, 1) > 0
    # was: a negative tokens_q was reported as a prefix_tokens error; a density of 2 was counted silently
    with pytest.raises(ValueError, match="tokens_q"):
        dit_forward_flops(cfg, -10, 10, 3, 1)
    with pytest.raises(ValueError, match="tokens_kv"):
        dit_forward_flops(cfg, 10, -1, 3, 1)
    with pytest.raises(ValueError, match="batch"):
        dit_forward_flops(cfg, 10, 10, 3, 1.5)
    for bad in (2.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="self_attn_density"):
            dit_forward_flops(cfg, 10, 10, 3, 1, self_attn_density=bad)
    half = dit_forward_flops(cfg, 10, 10, 3, 1, self_attn_density=0.5)
    assert dit_forward_flops(cfg, 10, 10, 0, 1, self_attn_density=0.0) < half < dit_forward_flops(cfg, 10, 10, 3, 1)


def test_readme_python_signatures_exist():
    # the README's py (not run) snippets name these calls with these keywords
    sig = inspect.signature(LongCatDiT.from_pretrained)
    assert {"dtype", "device", "progress"} <= set(sig.parameters)
    assert {"offload"} <= set(inspect.signature(LongCatDiT.build_kv_cache).parameters)
    pipe = longcat_vc.VideoContinuationPipeline
    fp = inspect.signature(pipe.from_pretrained).parameters
    assert {"mode", "device", "process_group", "cfg_parallel", "memory"} <= set(fp)
    assert "generator" in inspect.signature(pipe.__call__).parameters
    assert "video" in inspect.signature(pipe.refine).parameters
    assert {"segments", "refine"} <= set(inspect.signature(pipe.extend).parameters)
    from longcat_kernels.integrations.diffusers import apply_block_sparse_attention, remove_block_sparse_attention
    assert len(inspect.signature(apply_block_sparse_attention).parameters) >= 2
    assert len(inspect.signature(remove_block_sparse_attention).parameters) >= 1
