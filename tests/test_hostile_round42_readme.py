"""Round 42: the documentation as a contract (README, ARCHITECTURE, DESIGN, public docstrings), each claim
checked against the code on a CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import dispatch
from longcat_kernels._validate import MAX_SCALE

ROOT = Path(__file__).resolve().parent.parent
README = " ".join((ROOT / "README.md").read_text().split())
ARCHITECTURE = " ".join((ROOT / "ARCHITECTURE.md").read_text().split())


def test_readme_cdf_rule_is_the_spec_rule_not_the_smallest_set_reaching_the_mass():
    """README (Block-sparse attention) said the cdf rule keeps "the smallest set reaching a softmax mass",
    but the code (SPEC 2: ``searchsorted(cdf, threshold, right=True)``) keeps the blocks whose cumulative
    mass stays ``<= cdf_threshold``: a query block whose top block alone holds 0.96 of the mass keeps 0
    blocks at ``cdf_threshold=0.5`` (outputs zeros), where the README's rule keeps 1."""
    torch.manual_seed(0)
    q, k = torch.randn(1, 8, 1, 16) * 3, torch.randn(1, 8, 1, 16) * 3
    sel = lk.select_blocks(q, k, grid_q=(2, 2, 2), chunk_q=(1, 2, 2), sparsity=None, cdf_threshold=0.5)
    assert sel.counts.tolist() == [[[0, 0]]]  # the code's (SPEC's) rule: nothing within 0.5
    assert "smallest set reaching" not in README
    assert re.search(r"cumulative softmax mass stays within `cdf_threshold`", README)


def test_scale_bound_in_error_and_readme_is_not_above_the_true_bound():
    """``scale=2.3587e38``, the largest scale the README allowed ("at most ... 2.3587e38"), was refused
    with "expected at most ... = 2.3587e+38, ..., got 2.3587e+38": the bound, rounded up to 5 digits
    (the true one is 2.358648e38), read as the value refused. The message now prints the exact bound and
    the README a figure that is accepted."""
    with pytest.raises(ValueError, match="scale") as e:
        lk.prefix_attn(*(torch.randn(1, 4, 1, 8) for _ in range(3)), 2, scale=2.3587e38)
    bound = float(re.search(r"= ([0-9.e+]+)", str(e.value)).group(1))
    assert bound == MAX_SCALE < 2.3587e38
    m = re.search(r"at most fp32's maximum / log2\(e\), about ([0-9.]+e[0-9]+)", README)
    assert m and float(m.group(1)) <= MAX_SCALE
    out = lk.prefix_attn(*(torch.randn(1, 4, 1, 8) for _ in range(3)), 2, scale=float(m.group(1)))
    assert out.shape == (1, 4, 1, 8)


def test_gqa_k_v_with_different_head_counts_names_k_heads():
    """``attn_with_kv_cache(q 4 heads, k 2 heads, v 4 heads)`` said "v: expected a number of heads dividing
    q's 4 heads (same for k and v), got 4": 4 does divide 4, the mismatch with k's 2 heads went unnamed."""
    q = torch.randn(1, 8, 4, 8)
    with pytest.raises(ValueError) as e:
        lk.attn_with_kv_cache(q, torch.randn(1, 8, 2, 8), torch.randn(1, 8, 4, 8))
    msg = str(e.value)
    assert msg.startswith("v:") and "expected 2 heads (same as k" in msg and "got 4" in msg
    with pytest.raises(ValueError, match="expected 2 heads .same as k_cache"):
        lk.flash_attn_with_kvcache(q, torch.randn(1, 8, 2, 8), torch.randn(1, 8, 4, 8))


def test_rope3d_docstrings_state_the_smallest_head_dim():
    """``Rope3D`` documented ``head_dim: D, even`` (DESIGN: any even D), but refuses D < 6
    ("expected an even int >= 6"): the documented contract accepted ``head_dim=2`` / ``4``."""
    with pytest.raises(ValueError, match=">= 6"):
        lk.Rope3D((2, 2, 2), 4)
    assert ">= 6" in lk.Rope3D.__doc__.split("head_dim:")[1].split("\n")[0]
    design = " ".join((ROOT / "longcat_kernels" / "DESIGN.md").read_text().split())
    assert re.search(r"`Rope3D\(grid: tuple\[int,int,int\], head_dim: int.*?even D >= 6", design)


def test_architecture_names_kernel_choice_fields_as_the_code_has_them():
    """ARCHITECTURE.md wrote ``KernelChoice(backend, impl, reason)``; the namedtuple is
    ``(op, backend, impl, reason)``, so ``backend, impl, reason = choice`` as documented raised
    "too many values to unpack"."""
    assert dispatch.KernelChoice._fields == ("op", "backend", "impl", "reason")
    assert "KernelChoice(op, backend, impl, reason)" in ARCHITECTURE
    assert "KernelChoice(backend, impl, reason)" not in ARCHITECTURE


@pytest.mark.parametrize("op", ["qk_norm_rope", "select_blocks"])
def test_docstrings_do_not_offer_a_cuda_backend_the_op_lacks(op):
    """``qk_norm_rope``'s and ``select_blocks``' docstrings listed ``"cuda"`` among their backends as if
    it ran; both raise ``BackendUnavailableError`` ("no csrc kernel") on every machine. They now say so."""
    x = torch.randn(1, 8, 1, 8)
    call = {"qk_norm_rope": lambda: lk.qk_norm_rope(x, x, torch.ones(8), torch.ones(8), backend="cuda"),
            "select_blocks": lambda: lk.select_blocks(x, x, grid_q=(2, 2, 2), chunk_q=(1, 1, 1), backend="cuda")}
    with pytest.raises(lk.BackendUnavailableError, match="no csrc kernel"):
        call[op]()
    doc = " ".join(getattr(lk, op).__doc__.split())
    assert re.search(r'backend \(str\): ``"auto"``, ``"torch"`` or ``"triton"``', doc)
    assert "no csrc" in doc


@pytest.mark.parametrize("public,dispatch_name", [
    ("fp8_quantize_rows", "fp8_quantize"), ("fp8_layer_norm_quantize", "fp8_quantize"),
    ("fp8_modulate_quantize", "fp8_quantize"), ("fp8_silu_mul_quantize", "fp8_quantize"),
    ("flash_attn_with_kvcache", "attn_with_kv_cache"),
])
def test_available_backends_takes_the_public_op_names(public, dispatch_name):
    """``available_backends(op)`` ("op: the op to ask about") refused the public names ``fp8_quantize_rows``,
    ``fp8_layer_norm_quantize``, ... and ``flash_attn_with_kvcache`` with ValueError ("expected one of
    [..., 'fp8_quantize', ...]"): only the dispatcher's internal names passed. They now answer as the op they
    dispatch as."""
    for device in ("cpu", "cuda"):
        assert lk.available_backends(public, device) == lk.available_backends(dispatch_name, device)
    with pytest.raises(ValueError, match="op: expected one of"):
        lk.available_backends("apply_rope_3d")  # no backend choice: still not an op name here
