"""Round 54: ``torch.ops.longcat_kernels.bsa_bwd`` called directly checks its saved and incoming tensors
(``do``, ``out``, ``lse``, ``dlse``) as the forward ops check theirs; ``bsa_topk`` refuses 0-dim scores."""

from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.triton_interpret

G, C = [2, 3, 5], [1, 2, 4]
NQ = 2 * 2 * 2
B, S, H, D = 1, 30, 2, 16


def _ops():
    importlib.import_module("longcat_kernels.ops.block_sparse_attn.triton")
    return torch.ops.longcat_kernels


def _case():
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    q, k, v = (torch.randn(B, S, H, D, generator=gen) for _ in range(3))
    idx = torch.stack([torch.randperm(NQ, generator=gen)[:3] for _ in range(B * H * NQ)]).view(B, H, NQ, 3)
    cnt = torch.randint(1, 4, (B, H, NQ), generator=gen)
    idx, cnt = idx.to(torch.int32), cnt.to(torch.int32)
    out, lse = _ops().bsa_fwd(q, k, v, idx, cnt, G, G, C, C, 0.25)
    do = torch.randn(B, S, H, D, generator=gen)
    return q, k, v, idx, cnt, out, lse, do


def _bwd(q, k, v, idx, cnt, out, lse, do, dlse=None):
    return _ops().bsa_bwd(do, q, k, v, out, lse, idx, cnt, G, G, C, C, 0.25, False, dlse)


BAD = {
    # [B, H, Sq, D]: the numel of q, read with q's strides (the rows of another head)
    "do_bhsd": ("do", lambda t: t["do"].transpose(1, 2).contiguous()),
    "do_half": ("do", lambda t: t["do"].half()),
    "out_short": ("out", lambda t: t["out"][:, :-5]),
    "lse_bsh": ("lse", lambda t: t["lse"].transpose(1, 2).contiguous()),
    "lse_half": ("lse", lambda t: t["lse"].half()),
    "lse_flat": ("lse", lambda t: t["lse"].reshape(-1)),
    "dlse_bsh": ("dlse", lambda t: torch.randn(B, S, H)),
    "dlse_int": ("dlse", lambda t: torch.zeros(B, H, S, dtype=torch.int32)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bsa_bwd_rejects_bad_grad_inputs(case):
    """Each of these ran: a transposed ``do`` or a ``[B, Sq, H]`` lse gave gradients from the wrong rows,
    silently; a shorter ``out`` read past its end; an fp16 lse moved every row's exp."""
    q, k, v, idx, cnt, out, lse, do = _case()
    t = {"do": do, "out": out, "lse": lse, "dlse": None}
    name, make = BAD[case]
    t[name] = make(t)
    with pytest.raises(ValueError, match=rf"bsa_bwd: {name}: expected"):
        _bwd(q, k, v, idx, cnt, t["out"], t["lse"], t["do"], t["dlse"])


def test_bsa_bwd_good_call_matches_autograd():
    """The checked call still runs and gives the fp64 reference's autograd gradients, dlse included."""
    from longcat_kernels.ops.block_sparse_attn.reference import block_sparse_attn_reference
    from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection
    q, k, v, idx, cnt, out, lse, do = _case()
    dlse = torch.randn_like(lse)
    dq, dk, dv = _bwd(q, k, v, idx, cnt, out, lse, do, dlse)
    sel = BlockSelection(idx, cnt, tuple(G), tuple(G), tuple(C), tuple(C))
    qr, kr, vr = (x.double().requires_grad_() for x in (q, k, v))
    o64, l64 = block_sparse_attn_reference(qr, kr, vr, sel, 0.25)
    torch.autograd.backward((o64, l64), (do.double(), dlse.to(l64.dtype)))
    for got, want in ((dq, qr.grad), (dk, kr.grad), (dv, vr.grad)):
        assert torch.isfinite(got).all()
        err = (got.double() - want).norm() / want.norm()
        assert err < 1e-5, err


def test_bsa_topk_rejects_0dim_scores():
    """A 0-dim score tensor raised IndexError ("tuple index out of range") from ``scores.shape[-1]``."""
    with pytest.raises(ValueError, match="bsa_topk: scores: expected"):
        _ops().bsa_topk(torch.randn(()), 1)
    got = _ops().bsa_topk(torch.tensor([0.5, 2.0, -1.0]), 1)  # one row still runs
    assert got.tolist() == [1]
