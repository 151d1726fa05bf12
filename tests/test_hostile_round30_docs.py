"""Round 30: a new user's walk through the documentation (README, SEMANTICS, ARCHITECTURE, docstrings),
checking the claims that run on a CPU."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.dispatch import BackendUnavailableError

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("frame_offset,num_frames", [(3, None), (0, 0), (2, 0)])
def test_rope_tables_of_no_frames_are_empty_not_a_reshape_crash(frame_offset, num_frames):
    """``Rope3D.tables`` (documented: ``[num_frames*H*W, D]``) crashed in ``reshape`` with "cannot
    reshape tensor of 0 elements ... -1 ... ambiguous" for 0 frames (``frame_offset`` at the grid's end,
    or ``num_frames=0``), which its own range check lets through."""
    rope = lk.Rope3D((3, 4, 5), 64)
    cos, sin = rope.tables(frame_offset, num_frames)
    assert cos.shape == sin.shape == (0, 64) and cos.dtype == torch.float32


def test_rope_tables_slices_the_full_tables():
    """``tables(offset, n)`` is rows ``offset*H*W ..`` of the whole grid's tables (fresh grid sizes)."""
    g = tuple(int(v) for v in torch.randint(2, 6, (3,)))
    rope = lk.Rope3D(g, 32, theta=float(torch.empty(()).uniform_(100.0, 20000.0)))
    hw = g[1] * g[2]
    c_all, s_all = rope.tables(0)
    for off in range(g[0] + 1):
        c, s = rope.tables(off)
        assert torch.equal(c, c_all[off * hw:]) and torch.equal(s, s_all[off * hw:])


@pytest.mark.parametrize("kw,name", [(dict(frame_offset=1.0), "frame_offset"), (dict(frame_offset=None), "frame_offset"),
                                     (dict(num_frames=True), "num_frames"), (dict(num_frames=2.0), "num_frames")])
def test_rope_tables_non_int_arguments_are_named(kw, name):
    """A float ``frame_offset`` raised Python's "slice indices must be integers" (no argument named);
    ``frame_offset=None`` a TypeError from ``T - None``; now a TypeError naming the argument."""
    rope = lk.Rope3D((3, 4, 5), 64)
    with pytest.raises(TypeError, match=name):
        rope.tables(**kw)


def test_rope_tables_take_numpy_ints():
    rope = lk.Rope3D((3, 4, 5), 64)
    c, _ = rope.tables(np.int64(1), np.int32(2))
    assert torch.equal(c, rope.tables(1, 2)[0])


def test_fp8_forward_only_rule_is_about_y_as_the_readme_says():
    """README (Backends, "auto"): the fp8 ops with gradients take the torch reference and an explicit
    ``triton`` raises "forward only". That holds only when ``return_input=True`` asks for a ``y`` that
    needs gradients: ``q``/``s`` carry none, so without ``y`` Triton runs (the README said it always
    raised). Pins both halves and that ``y``'s gradient is silu(a) * b's."""
    a = torch.randn(6, 48, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(6, 48)
    if lk.available_backends("fp8_quantize")["triton"] is None:
        q, s = lk.fp8_silu_mul_quantize(a, b, backend="triton")
        assert not q.requires_grad and not s.requires_grad
        with pytest.raises(BackendUnavailableError, match="forward only"):
            lk.fp8_silu_mul_quantize(a, b, return_input=True, backend="triton")
    _, _, y = lk.fp8_silu_mul_quantize(a, b, return_input=True)
    g = torch.randn_like(y)
    (ga,) = torch.autograd.grad(y, a, g)
    a64 = a.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(torch.nn.functional.silu(a64) * b.double(), a64, g.double())
    torch.testing.assert_close(ga.double(), ref, rtol=1e-5, atol=1e-6)
    assert re.search(r"`return_input=True` asks for a `y` that needs gradients", README)


def test_fp8_layer_norm_weight_only_is_refused_as_the_docstring_says():
    """The docstring read "``weight``/``bias [K]`` or None", which reads as either one alone; a
    weight-only call (``nn.LayerNorm(bias=False)``) is refused with ValueError. The docstring now says
    both or neither; the affine result with both matches an fp64 LayerNorm."""
    assert "both or neither" in lk.fp8_layer_norm_quantize.__doc__
    x, w, b = torch.randn(5, 40), torch.randn(40), torch.randn(40)
    with pytest.raises(ValueError, match="both or neither"):
        lk.fp8_layer_norm_quantize(x, w)
    _, _, y = lk.fp8_layer_norm_quantize(x, w, b, return_input=True)
    ref = torch.nn.functional.layer_norm(x.double(), (40,), w.double(), b.double(), eps=1e-5)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
