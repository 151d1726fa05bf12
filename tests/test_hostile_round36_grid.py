"""Hostile round 36: grid helpers and hand-built BlockSelection objects."""

import numpy as np
import pytest
import torch

from longcat_kernels.grid import VideoGrid, as_triple, block_token_index, num_blocks, total_blocks
from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection


def _raster_blocks(grid, chunk):
    """SPEC 2 written out: blocks in raster order over (nt, nh, nw), slots in raster order over the chunk."""
    T, H, W = grid
    ct, ch, cw = chunk
    nt, nh, nw = (-(-g // c) for g, c in zip(grid, chunk))
    rows = []
    for bt in range(nt):
        for bh in range(nh):
            for bw in range(nw):
                rows.append([(t * H + h) * W + w if (t < T and h < H and w < W) else -1
                             for t in range(bt * ct, bt * ct + ct)
                             for h in range(bh * ch, bh * ch + ch)
                             for w in range(bw * cw, bw * cw + cw)])
    return torch.tensor(rows)


def test_block_token_index_matches_spec_enumeration():
    """Pins the index map (including partial edge blocks) against an independent SPEC 2 enumeration."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    for _ in range(40):
        grid = tuple(int(x) for x in torch.randint(1, 8, (3,), generator=g))
        chunk = tuple(int(torch.randint(1, gi + 2, (), generator=g)) for gi in grid)
        assert torch.equal(block_token_index(grid, chunk), _raster_blocks(grid, chunk)), (grid, chunk)


@pytest.mark.parametrize("t", [np.int64(2), torch.tensor(2)])
def test_video_grid_fields_are_plain_ints(t):
    """VideoGrid(t=<numpy int or 0-d tensor>) kept the object: num_tokens was a Tensor, as_triple(grid)
    returned a tensor inside the tuple, and the grid was == VideoGrid(2, ...) but hashed differently."""
    vg = VideoGrid(t, 3, 4)
    assert type(vg.t) is int and type(vg.num_tokens) is int
    assert all(type(x) is int for x in as_triple(vg))
    assert vg == VideoGrid(2, 3, 4) and hash(vg) == hash(VideoGrid(2, 3, 4))
    assert len({vg, VideoGrid(2, 3, 4)}) == 1


def test_as_triple_refuses_bool_tensor():
    """A 0-d bool tensor was accepted as 1 (a Python bool is refused)."""
    with pytest.raises(TypeError, match="grid"):
        as_triple((torch.tensor(True), 3, 4))
    with pytest.raises(TypeError, match="VideoGrid"):
        VideoGrid(torch.tensor(True), 3, 4)


def _hand_built(max_extra=3):
    gq, gk, cq, ck = (2, 2, 2), (4, 2, 2), (1, 2, 1), (2, 1, 2)
    B, H, Nq, Nk = 2, 3, total_blocks(gq, cq), total_blocks(gk, ck)
    perm = torch.stack([torch.randperm(Nk) for _ in range(B * H * Nq)]).view(B, H, Nq, Nk).int()
    idx = torch.cat([perm, torch.full((B, H, Nq, max_extra), -1, dtype=torch.int32)], -1)
    cnt = torch.randint(0, Nk + 1, (B, H, Nq), dtype=torch.int32)
    return idx, cnt, (gq, gk, cq, ck), Nk


def test_to_mask_and_density_of_valid_unusual_selection():
    """Unsorted ids, max_sel > Nk, counts 0 anywhere: to_mask/density equal a loop over the rows."""
    idx, cnt, geo, Nk = _hand_built()
    s = BlockSelection(idx, cnt, *geo)
    ref = torch.zeros(*cnt.shape, Nk, dtype=torch.bool)
    for pos in np.ndindex(*cnt.shape):
        for j in range(int(cnt[pos])):
            ref[pos + (int(idx[pos + (j,)]),)] = True
    assert torch.equal(s.to_mask(), ref)
    assert s.density() == pytest.approx(ref.double().mean().item())
    z = BlockSelection(torch.full_like(idx, -1), torch.zeros_like(cnt), *geo)
    assert not z.to_mask().any() and z.density() == 0.0


def test_to_mask_refuses_out_of_range_id():
    """An id == Nk inside counts was silently dropped by to_mask (it landed in the spare column); -1
    gave torch's 'index -1 is out of bounds' instead of naming the selection."""
    idx, cnt, geo, Nk = _hand_built()
    cnt[0, 0, 0] = 2
    for bad in (Nk, -1):
        idx[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="selection.indices"):
            BlockSelection(idx, cnt, *geo).to_mask()


def test_density_refuses_counts_past_max_sel():
    """counts > max_sel: density() reported counts / Nk (> 1 here) while to_mask crashed in scatter."""
    idx, cnt, geo, Nk = _hand_built()
    s = BlockSelection(idx, torch.full_like(cnt, Nk + 3), *geo)
    with pytest.raises(ValueError, match="selection.counts"):
        s.density()
    with pytest.raises(ValueError, match="selection.counts"):
        s.to_mask()


def test_to_refuses_a_dtype():
    """sel.to(torch.float32) / to(torch.int64) converted the int32 indices instead of moving them."""
    idx, cnt, geo, _ = _hand_built()
    s = BlockSelection(idx, cnt, *geo)
    for dt in (torch.float32, torch.int64):
        with pytest.raises((TypeError, RuntimeError)):
            s.to(dt)
    m = s.to("meta")
    assert m.indices.dtype == torch.int32 and m.indices.device.type == "meta" and m.grid_k == geo[1]


def test_num_blocks_of_video_grid():
    assert num_blocks(VideoGrid(5, 5, 5), (2, 2, 2)) == (3, 3, 3)


def test_params_selection_bad_chunk_q_names_it():
    """BlockSparseParams(chunk_q=4, selection=...) failed with "'int' object is not iterable"."""
    import longcat_kernels as lk
    from longcat_kernels.ops.block_sparse_attn.api import select_blocks

    q = torch.randn(1, 32, 1, 8)
    kc = torch.randn(1, 16, 1, 8)
    s = select_blocks(q, torch.cat([kc, q], 1), grid_q=(2, 4, 4), grid_k=(3, 4, 4), chunk_q=(1, 2, 2), sparsity=0.5)
    with pytest.raises(TypeError, match="block_sparse.chunk_q"):
        lk.attn_with_kv_cache(q, q, q, kc, kc, block_sparse=lk.BlockSparseParams(chunk_q=4, frame_hw=(4, 4), selection=s))
    out = lk.attn_with_kv_cache(q, q, q, kc, kc, block_sparse=lk.BlockSparseParams(frame_hw=(4, 4), selection=s))
    assert out.shape == q.shape
