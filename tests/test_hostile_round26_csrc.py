"""Hostile inputs, round 26 (the compiled extension's rope tables, called as registered ops): each test
names the out-of-bounds read it pins. The Python API builds the tables itself (`Rope3D`), so these reach
the kernel only through `torch.ops.longcat_kernels.*` called directly, which SPEC 12 users may do.

1. Each sin table was read with its cos table's sizes: a sin table with fewer rows or columns than its
   cos table was read past its end (garbage rotations, or a fault).
2. ``grid_h`` and ``grid_w`` both negative multiply to a positive token count per frame, and a negative
   ``frame_offset`` passed the coverage check (offset + frames <= rows): rows before the table were read.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.ext

GRID = (4, 8, 8)
D = 64


def _setup():
    from longcat_kernels.ops.block_sparse_attn.cuda import ops
    from longcat_kernels.ops.rope.api import Rope3D

    rope = Rope3D(GRID, D, device="cuda")
    tabs = [rope.cos_t, rope.sin_t, rope.cos_h, rope.sin_h, rope.cos_w, rope.sin_w]
    x = torch.randn(1, 2 * 64, 2, D, dtype=torch.bfloat16, device="cuda")
    return ops(), tabs, x


@pytest.mark.parametrize("which", [1, 3, 5])
@pytest.mark.parametrize("cut", ["rows", "cols"])
def test_rope_op_refuses_a_sin_table_smaller_than_its_cos_table(which, cut):
    o, tabs, x = _setup()
    t = tabs[which]
    tabs[which] = t[:-1].contiguous() if cut == "rows" else t[:, :-2].contiguous()
    with pytest.raises(RuntimeError, match="sin table must have its cos table's shape"):
        o.rope3d_cuda(x, *tabs, 8, 8, 0)
    q, k, v = (torch.randn(1, 128, 2, D, dtype=torch.bfloat16, device="cuda") for _ in range(3))
    with pytest.raises(RuntimeError, match="sin table must have its cos table's shape"):
        o.kv_cache_attn_fwd_cuda(q, k, v, None, None, *tabs, 8, 8, D**-0.5, "sm80")


@pytest.mark.parametrize("gh, gw, f0", [(-8, -8, 0), (8, 8, -1), (0, 8, 0)])
def test_rope_op_refuses_negative_grid_sizes_and_frame_offsets(gh, gw, f0):
    o, tabs, x = _setup()
    with pytest.raises(RuntimeError, match="must be positive and frame_offset"):
        o.rope3d_cuda(x, *tabs, gh, gw, f0)


def test_rope_op_still_matches_the_api_on_valid_tables():
    import longcat_kernels as lk
    from longcat_kernels.ops.rope.api import Rope3D

    o, tabs, x = _setup()
    x = x.float().to(torch.bfloat16)
    rope = Rope3D(GRID, D, device="cuda")
    got = o.rope3d_cuda(x, *tabs, 8, 8, 1)
    ref = lk.apply_rope_3d(x.float(), rope, frame_offset=1)  # fp32 on the device: Triton or torch
    err = (got.float() - ref).norm() / ref.norm()
    assert err < 1e-2, err
