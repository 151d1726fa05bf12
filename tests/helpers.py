"""Test helpers shared by the op folders (``tests/block_sparse_attn``, ``tests/kv_cache_attn``,
``tests/rope``, ``tests/dispatch``): the device, the backend parameter lists with their markers, the
float64 lse/attention references used by the lse tests, and the compiled-extension (``cuda``
backend) helpers. Importable as ``helpers`` (``tests/`` is on ``sys.path`` through its conftest).
Not part of the product: nothing under ``longcat_kernels`` imports this."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch

from longcat_kernels.testing.oracle import attention_lowp, attention_oracle, bsa_token_mask

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# ``backend`` parameters; each backend carries the marker that skips it (with the reason) where it cannot run
TORCH = "torch"
TRITON = pytest.param("triton", marks=pytest.mark.triton_interpret if DEV == "cpu" else pytest.mark.triton_gpu)
CUDA = pytest.param("cuda", marks=pytest.mark.ext)
CPU_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.triton_interpret)]
GPU_BACKENDS = [pytest.param("triton", marks=pytest.mark.triton_gpu), pytest.param("cuda", marks=pytest.mark.ext)]


def randn(*shape, dtype=torch.float32):
    """Fresh standard-normal values on ``DEV``."""
    return torch.randn(*shape, dtype=dtype, device=DEV)


def n_blocks(grid, chunk):
    return (-(-grid[0] // chunk[0])) * (-(-grid[1] // chunk[1])) * (-(-grid[2] // chunk[2]))


# ----------------------------------------------------------------- float64 lse / attention references
def lse64(q, k, mask, scale):
    """float64 logsumexp of q k^T * scale over keys where mask [Sq, Sk] (or [B,H,Sq,Sk]) holds."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(s, dim=-1)


def out64(q, k, v, mask, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p, v.double())


def check_lse(lse, exp, B, H, S, tol=1e-4):
    assert lse.shape == (B, H, S) and lse.dtype == torch.float32
    assert not torch.isnan(lse).any(), "lse has NaN"
    inf = torch.isinf(exp)
    assert torch.equal(torch.isinf(lse) & (lse < 0), inf), "-inf rows differ"
    err = (lse.double() - exp).abs()[~inf].max().item() if (~inf).any() else 0.0
    assert err < tol, f"lse max abs err {err}"


# ----------------------------------------------------------------- compiled extension (backend "cuda")
FAMILIES = ("sm90_ws", "sm90", "sm80")


def csrc_impls():
    """The csrc kernel families this build/device can run ([] without CUDA)."""
    from longcat_kernels._ext import csrc_kernels

    return list(csrc_kernels()) if torch.cuda.is_available() else []


def restrict_family(monkeypatch, family):
    """Let the dispatcher see only ``family`` and the simpler ones (as the old env knob did)."""
    from longcat_kernels import _ext

    if family not in csrc_impls():
        pytest.skip(f"kernel family {family} is not available here (needs a Hopper GPU / sm_90a build)")
    monkeypatch.setitem(_ext._STATE, "kernels", FAMILIES[FAMILIES.index(family):])


@pytest.fixture(params=list(FAMILIES))
def impl(request, monkeypatch):
    """sm90_ws: the warp-specialised kernels where they apply, sm90 elsewhere. Imported by the test
    modules that use it: a conftest.py per op folder would be one more module named ``conftest``,
    and dynamo resolves the NaN-poisoning ``torch.empty`` of tests/conftest.py by that name."""
    restrict_family(monkeypatch, request.param)
    return request.param


def family64():
    """The family that runs head_dim 64 here (sm90 on Hopper, else sm80)."""
    return "sm90" if "sm90" in csrc_impls() else "sm80"


def poison_allocator(like: torch.Tensor):
    """The C++ ops allocate with ``at::empty`` (not reached by conftest's NaN ``torch.empty``): leave
    a NaN block in the caching allocator right before the call so an unwritten output shows as NaN."""
    x = torch.full((like.numel() * 2,), float("nan"), dtype=like.dtype, device=like.device)
    del x


def bsa_oracle(q, k, v, sel, scale):
    mask = bsa_token_mask(sel.to_mask(), sel.grid_q, sel.grid_k, sel.chunk_q, sel.chunk_k)
    out, lse = attention_oracle(q, k, v, mask, scale)
    return out, lse, attention_lowp(q, k, v, mask, scale), mask


def tiny_wan(num_layers: int = 2, head_dim: int = 16, ffn_dim: int = 48, rope_max_seq_len: int = 32,
             scale: float = 0.2, seed: Optional[int] = 0):
    """A tiny random diffusers ``WanTransformer3DModel``, fp32, eval (2 heads x ``head_dim``, text dim 24, patch
    1x2x2); every parameter randomised (zero-initialised norm biases would hide mistakes), ``* scale``; drawn
    after ``torch.manual_seed(seed)`` (None: from the RNG as it stands). Needs diffusers."""
    from diffusers import WanTransformer3DModel

    if seed is not None:
        torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=24, freq_dim=16, ffn_dim=ffn_dim, num_layers=num_layers, rope_max_seq_len=rope_max_seq_len,
    ).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return m


def folder_module(folder: str, module: str):
    """A helper module of another test folder (``tests/<folder>/<module>.py``): pytest puts only the running
    file's folder on sys.path."""
    path = str(Path(__file__).resolve().parent / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(module)
