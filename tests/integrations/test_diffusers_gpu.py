"""The diffusers integration on the GPU: a random ``WanTransformer3DModel`` in bf16 with head_dim 64 and
64-token chunks (so ``"auto"`` reaches the compiled kernels), against the same model on the reference
backend (fp32) and against diffusers' own processors. The CPU tests (``test_diffusers_wan.py``) cover the
wiring in fp32; these check that what a user of a GPU gets is the same attention, forward and backward.
Every test records the kernel choices and asserts a compiled kernel ran where it should."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import WanTransformer3DModel  # noqa: E402

import longcat_kernels as lk  # noqa: E402
from longcat_kernels.dispatch import record_choices  # noqa: E402
from longcat_kernels.integrations.diffusers import (  # noqa: E402
    apply_block_sparse_attention, remove_block_sparse_attention,
)
from longcat_kernels.testing.tolerance import rel_l2  # noqa: E402

from helpers import tiny_wan  # noqa: E402

pytestmark = pytest.mark.triton_gpu

CHUNK = (4, 4, 4)  # 64 tokens: the block size of the csrc block-sparse kernel


def _model(layers: int = 2) -> WanTransformer3DModel:
    torch.seed()  # fresh weights every run
    return tiny_wan(num_layers=layers, head_dim=64, ffn_dim=96, rope_max_seq_len=64, scale=0.1, seed=None)


def _bf16(m: WanTransformer3DModel) -> WanTransformer3DModel:
    """bf16 as ``from_pretrained(torch_dtype=torch.bfloat16)`` loads it: the modules diffusers keeps in fp32
    (RoPE tables, time embedding, norms, modulation) stay fp32."""
    m.to(torch.bfloat16)
    keep = tuple(m._keep_in_fp32_modules or ())
    for name, mod in m.named_modules():
        if any(k in name.split(".") for k in keep):
            mod.float()
    for name, p in m.named_parameters(recurse=True):
        if name.split(".")[-1] in keep:
            p.data = p.data.float()
    return m


def _inputs(dtype, F=8, H=16, W=32):
    # grid (8, 8, 16): 1024 tokens, 16 query blocks of 4x4x4
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    x = torch.randn(1, 4, F, H, W, generator=g)
    txt = torch.randn(1, 7, 24, generator=g)
    return dict(hidden_states=x.to("cuda", dtype), timestep=torch.tensor([500], device="cuda"),
                encoder_hidden_states=txt.to("cuda", dtype), return_dict=False)


def _to(inp, dtype):
    return {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in inp.items()}


def _run(m, inp):
    with torch.no_grad():
        return m(**inp)[0]


def _kernels(choices, op):
    return {c.impl for c in choices if c.op == op}


@pytest.mark.parametrize("rule", [dict(sparsity=0.0), dict(sparsity=0.75), dict(sparsity=None, cdf_threshold=0.6)],
                         ids=["s0", "s0.75", "cdf0.6"])
def test_auto_bf16_matches_reference(rule):
    """Two layers, bf16: the model on ``"auto"`` against the same model on ``"torch"`` (the reference
    computes in fp32 from the same bf16 activations, so both select the same blocks; an fp32 model could
    flip a near-tie of the top-k), within twice what diffusers' own bf16 SDPA model loses against its fp32
    self plus the bf16 floor (the tolerance rule)."""
    m16 = _bf16(_model(layers=2).cuda())
    inp = _inputs(torch.bfloat16)
    base_err = rel_l2(_run(m16, inp), _run(copy.deepcopy(m16).float(), _to(inp, torch.float32)))
    mref = copy.deepcopy(m16)
    params = lk.BlockSparseParams(chunk_q=CHUNK, **rule)
    apply_block_sparse_attention(mref, params, backend="torch", dense_at_zero=False)
    apply_block_sparse_attention(m16, params, backend="auto", dense_at_zero=False)
    ref = _run(mref, inp)
    torch.cuda.synchronize()
    with record_choices() as got:
        out = _run(m16, inp)
    assert not torch.isnan(out).any()
    ran = _kernels(got, "block_sparse_attn")
    assert ran and "torch_reference" not in ran, got
    err = rel_l2(out, ref)
    assert err <= 2 * base_err + 4e-3, (err, base_err, ran)


def test_dense_at_zero_is_diffusers_attention_bf16():
    """Sparsity 0 with ``dense_at_zero``: the dense kernel (no grad) equals diffusers' bf16 model to bf16
    rounding over two layers, and removing the processors gives diffusers' output back bit for bit."""
    m = _bf16(_model(layers=2).cuda())
    inp = _inputs(torch.bfloat16)
    ref = _run(m, inp)
    ref32 = _run(copy.deepcopy(m).float(), _to(inp, torch.float32))
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=CHUNK))
    with record_choices() as got:
        out = _run(m, inp)
    ran = _kernels(got, "attn_with_kv_cache")
    assert ran and "torch_reference" not in ran, got
    assert rel_l2(out, ref32) <= 2 * rel_l2(ref, ref32) + 4e-3
    remove_block_sparse_attention(m)
    assert torch.equal(_run(m, inp), ref)


def _grads(m, inp):
    m.zero_grad(set_to_none=True)
    out = m(**inp)[0]
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_training_backward_bf16_matches_reference(checkpointing):
    """Training through the processor at sparsity 0.75 (the compiled block-sparse backward under ``"auto"``),
    with and without diffusers' gradient checkpointing, against the same bf16 model on the reference backend:
    the self-attention weights' gradients within the tolerance rule of the bf16 SDPA model's own gradients
    against fp32."""
    m16 = _bf16(_model(layers=1).cuda()).train()
    inp = _inputs(torch.bfloat16, F=8, H=16, W=16)
    _, g_base = _grads(copy.deepcopy(m16), inp)
    _, g_dense32 = _grads(copy.deepcopy(m16).float(), _to(inp, torch.float32))
    mref = copy.deepcopy(m16)
    params = lk.BlockSparseParams(sparsity=0.75, chunk_q=CHUNK)
    apply_block_sparse_attention(mref, params, backend="torch")
    apply_block_sparse_attention(m16, params, backend="auto")
    if checkpointing:
        m16.enable_gradient_checkpointing()
    _, g_ref = _grads(mref, inp)
    with record_choices() as got:
        _, g = _grads(m16, inp)
    ran = _kernels(got, "block_sparse_attn")
    assert ran and "torch_reference" not in ran, got
    names = [n for n in g_ref if ".attn1." in n and n.endswith("weight")]
    assert names
    for n in names:
        assert not torch.isnan(g[n]).any(), n
        base_err = rel_l2(g_base[n], g_dense32[n])
        err = rel_l2(g[n], g_ref[n])
        assert err <= 3 * base_err + 1e-2, (n, err, base_err)


def test_training_at_sparsity_zero_runs_sdpa_and_cuda_refuses():
    """Dense training (sparsity 0, ``dense_at_zero``): ``"auto"`` records SDPA (the dense kernel is forward
    only) and its gradients are diffusers' own; an explicit ``"cuda"`` refuses instead of switching."""
    m = _bf16(_model(layers=1).cuda()).train()
    base = copy.deepcopy(m)
    inp = _inputs(torch.bfloat16, F=4, H=16, W=16)
    _, g_base = _grads(base, inp)
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=CHUNK))
    with record_choices() as got:
        _, g = _grads(m, inp)
    assert _kernels(got, "attn_with_kv_cache") == {"torch_reference"}, got
    for n in g_base:
        assert rel_l2(g[n], g_base[n]) <= 2e-2, n
    remove_block_sparse_attention(m)
    apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.0, chunk_q=CHUNK), backend="cuda")
    with pytest.raises(lk.BackendUnavailableError):
        _grads(m, inp)


def test_torch_compile_of_applied_model_matches_eager():
    """``torch.compile`` of the whole applied transformer (the ops are ``torch.library`` ops) gives the eager
    answer on the GPU, at sparsity 0.75 on ``"auto"``: both against the reference backend (fp32 from the same
    bf16 activations, the same blocks selected) within the tolerance rule of ``test_auto_bf16_matches_reference``.
    (Compiled against eager directly, bounded by 1e-2, failed at 1.4e-2 on the H100, session 29: inductor's bf16
    fusions of the norms and projections round differently from eager, on top of the attention.)"""
    m = _bf16(_model(layers=2).cuda())
    inp = _inputs(torch.bfloat16, F=4, H=16, W=16)
    base_err = rel_l2(_run(m, inp), _run(copy.deepcopy(m).float(), _to(inp, torch.float32)))
    params = lk.BlockSparseParams(sparsity=0.75, chunk_q=CHUNK)
    mref = copy.deepcopy(m)
    apply_block_sparse_attention(mref, params, backend="torch")
    apply_block_sparse_attention(m, params)
    ref = _run(mref, inp)
    compiled = torch.compile(m)
    with record_choices() as got:
        eager = _run(m, inp)
    ran = _kernels(got, "block_sparse_attn")
    assert ran and "torch_reference" not in ran, got
    out = _run(compiled, inp)
    assert not torch.isnan(out).any()
    assert rel_l2(eager, ref) <= 2 * base_err + 4e-3, (rel_l2(eager, ref), base_err)
    assert rel_l2(out, ref) <= 2 * base_err + 4e-3, (rel_l2(out, ref), base_err)
