"""CPU transliteration of the index logic of the wip sm90_ws BSA kernels (csrc/bsa_fwd_sm90_ws.cu union
walk and two key segments; csrc/bsa_bwd_sm90_ws.cu dkdv / dq), checked against the fp64 oracle.

Written in a session without device time to catch geometry mistakes before the first GPU run: block
origins (``b_origin``), slot tables (``geo_of``), TMA boxes (a 3D chunk at a block origin, rows outside
the tensor map's grid zero-filled; the second key segment at ``t0 - split``), the union bitmap walk,
the transposed selection (the real ``transpose_selection``), the lse/delta rows the dkdv producer
writes (+inf / 0 outside the grid), key-slot masking in dq, and the epilogues' token mapping. Tile
math is plain fp64 matmuls: what it cannot check is the wgmma fragment and descriptor layout (those
are the forward's, unchanged).

    python bench/dev/wip_bsa_ws_emulate.py      # prints OK per case, exits 1 on a mismatch
"""

from __future__ import annotations

import math
import random
import sys

import torch

from longcat_kernels.ops.block_sparse_attn.triton import transpose_selection
from longcat_kernels.testing import attention_oracle, bsa_token_mask

LOG2E = 1.4426950408889634


def b_origin(blk, nb, c):
    w0 = (blk % nb[2]) * c[2]
    h0 = ((blk // nb[2]) % nb[1]) * c[1]
    t0 = (blk // (nb[2] * nb[1])) * c[0]
    return t0, h0, w0


def geo_of(r, c):
    return r // (c[2] * c[1]), (r // c[2]) % c[1], r % c[2]


def box(x, b, h, grid, c, t0, h0, w0):
    """TMA box: 64 rows in slot order from x [B, S, H, D] viewed on ``grid``; outside -> 0."""
    D = x.shape[-1]
    tile = torch.zeros(64, D, dtype=x.dtype)
    for r in range(c[0] * c[1] * c[2]):
        dt, dh, dw = geo_of(r, c)
        t, hh, w = t0 + dt, h0 + dh, w0 + dw
        if 0 <= t < grid[0] and hh < grid[1] and w < grid[2]:
            tile[r] = x[b, (t * grid[1] + hh) * grid[2] + w, h]
    return tile


def nblocks(g, c):
    return [-(-g[a] // c[a]) for a in range(3)]


def fwd_emulate(q, kc, vc, kf, vf, idx, cnt, gq, gk, cq, ck, scale, union):
    """Forward over keys [seg0; seg1] (seg1 None: one segment), as the kernel walks them."""
    B, Sq, H, D = q.shape
    nbq, nbk = nblocks(gq, cq), nblocks(gk, ck)
    nq, nk_total = math.prod(nbq), math.prod(nbk)
    split = 0 if kf is None else kc.shape[1] // (gk[1] * gk[2])
    g0 = (split if split else gk[0], gk[1], gk[2])
    g1 = (gk[0] - split, gk[1], gk[2])
    out = torch.full((B, Sq, H, D), float("nan"), dtype=q.dtype)
    lse = torch.full((B, H, Sq), float("nan"), dtype=q.dtype)
    c2 = scale * LOG2E

    def load_kv(b, h, blk):
        t0, h0, w0 = b_origin(blk, nbk, ck)
        if split > 0 and t0 >= split:
            return (box(kf, b, h, g1, ck, t0 - split, h0, w0), box(vf, b, h, g1, ck, t0 - split, h0, w0))
        bb = 0 if kc.shape[0] == 1 else b
        return box(kc, bb, h, g0, ck, t0, h0, w0), box(vc, bb, h, g0, ck, t0, h0, w0)

    for b in range(B):
        bs = 0 if idx.shape[0] == 1 else b
        for h in range(H):
            for pair in range((nq + 1) // 2):
                lists = []
                for c in range(2):
                    qb = pair * 2 + c
                    if qb >= nq:
                        continue
                    n = min(int(cnt[bs, h, qb]), idx.shape[-1])
                    lists.append([int(x) for x in idx[bs, h, qb, :n] if 0 <= int(x) < nk_total])
                if union:
                    bits = {}
                    for c, lst in enumerate(lists):
                        for blk in lst:
                            bits[blk] = bits.get(blk, 0) | (1 << c)
                    walk = sorted(bits)  # the bitmap in ascending block order
                    walks = [[blk for blk in walk if bits[blk] >> c & 1] for c in range(len(lists))]
                else:
                    walks = lists
                for c, walk in enumerate(walks):
                    qb = pair * 2 + c
                    qt0, qh0, qw0 = b_origin(qb, nbq, cq)
                    Q = box(q, b, h, gq, cq, qt0, qh0, qw0)
                    m = torch.full((64,), -math.inf, dtype=q.dtype)
                    l = torch.zeros(64, dtype=q.dtype)
                    o = torch.zeros(64, D, dtype=q.dtype)
                    for blk in walk:
                        K, V = load_kv(b, h, blk)
                        s = Q @ K.T
                        t0, h0, w0 = b_origin(blk, nbk, ck)
                        for r in range(64):  # mask(): slots outside the key grid
                            dt, dh, dw = geo_of(r, ck)
                            if not (t0 + dt < gk[0] and h0 + dh < gk[1] and w0 + dw < gk[2]) or r >= math.prod(ck):
                                s[:, r] = -math.inf
                        mx = (s * c2).amax(1)
                        m_new = torch.maximum(m, mx)
                        m_use = torch.where(torch.isinf(m_new) & (m_new < 0), torch.zeros_like(m_new), m_new)
                        alpha = torch.exp2(m - m_use)
                        p = torch.exp2(s * c2 - m_use[:, None])
                        l = l * alpha + p.sum(1)
                        o = o * alpha[:, None] + p @ V
                        m = m_new
                    for r in range(64):  # epilogue
                        dt, dh, dw = geo_of(r, cq)
                        t, hh, w = qt0 + dt, qh0 + dh, qw0 + dw
                        if t < gq[0] and hh < gq[1] and w < gq[2]:
                            tok = (t * gq[1] + hh) * gq[2] + w
                            out[b, tok, h] = o[r] / l[r] if l[r] > 0 else 0.0
                            lse[b, h, tok] = math.log(2) * (m[r] + math.log2(l[r])) if l[r] > 0 else -math.inf
    return out, lse


def bwd_emulate(do, q, k, v, out, lse, idx, cnt, gq, gk, cq, ck, scale):
    B, Sq, H, D = q.shape
    nbq, nbk = nblocks(gq, cq), nblocks(gk, ck)
    nq, nk = math.prod(nbq), math.prod(nbk)
    if idx.shape[0] != B:
        idx, cnt = idx.expand(B, -1, -1, -1).contiguous(), cnt.expand(B, -1, -1).contiguous()
    t_off, t_q = transpose_selection(idx.to(torch.int32), cnt.to(torch.int32), nk)
    delta = (do * out).sum(-1).transpose(1, 2)
    c2 = scale * LOG2E
    dq = torch.full_like(q, float("nan"))
    dk = torch.full_like(k, float("nan"))
    dv = torch.full_like(v, float("nan"))
    for b in range(B):
        for h in range(H):
            # dkdv: per key block over the query blocks that selected it
            for kb in range(nk):
                kt0, kh0, kw0 = b_origin(kb, nbk, ck)
                K, V = box(k, b, h, gk, ck, kt0, kh0, kw0), box(v, b, h, gk, ck, kt0, kh0, kw0)
                acc_k = torch.zeros(64, D, dtype=q.dtype)
                acc_v = torch.zeros(64, D, dtype=q.dtype)
                base = (b * H + h) * nk + kb
                for i in range(int(t_off[base]), int(t_off[base + 1])):
                    qb = int(t_q[i])
                    if not 0 <= qb < nq:
                        continue
                    t0, h0, w0 = b_origin(qb, nbq, cq)
                    Q, dO = box(q, b, h, gq, cq, t0, h0, w0), box(do, b, h, gq, cq, t0, h0, w0)
                    l2 = torch.full((64,), math.inf, dtype=q.dtype)
                    dl = torch.zeros(64, dtype=q.dtype)
                    for r in range(64):  # the producer's lse/delta rows
                        dt, dh, dw = geo_of(r, cq)
                        t, hh, w = t0 + dt, h0 + dh, w0 + dw
                        if t < gq[0] and hh < gq[1] and w < gq[2] and r < math.prod(cq):
                            tok = (t * gq[1] + hh) * gq[2] + w
                            l2[r] = lse[b, h, tok] * LOG2E
                            dl[r] = delta[b, h, tok]
                    sT = K @ Q.T
                    dpT = V @ dO.T
                    pT = torch.exp2(sT * c2 - l2[None, :])
                    dsT = pT * (dpT - dl[None, :])
                    acc_v += pT @ dO
                    acc_k += dsT @ Q
                for r in range(64):
                    dt, dh, dw = geo_of(r, ck)
                    t, hh, w = kt0 + dt, kh0 + dh, kw0 + dw
                    if t < gk[0] and hh < gk[1] and w < gk[2]:
                        tok = (t * gk[1] + hh) * gk[2] + w
                        dk[b, tok, h] = acc_k[r] * scale
                        dv[b, tok, h] = acc_v[r]
            # dq: per query block over its selection
            for qb in range(nq):
                qt0, qh0, qw0 = b_origin(qb, nbq, cq)
                Q, dO = box(q, b, h, gq, cq, qt0, qh0, qw0), box(do, b, h, gq, cq, qt0, qh0, qw0)
                rl2 = torch.full((64,), math.inf, dtype=q.dtype)
                rdl = torch.zeros(64, dtype=q.dtype)
                for r in range(64):
                    dt, dh, dw = geo_of(r, cq)
                    t, hh, w = qt0 + dt, qh0 + dh, qw0 + dw
                    if t < gq[0] and hh < gq[1] and w < gq[2]:
                        tok = (t * gq[1] + hh) * gq[2] + w
                        rl2[r] = lse[b, h, tok] * LOG2E
                        rdl[r] = delta[b, h, tok]
                acc = torch.zeros(64, D, dtype=q.dtype)
                n = min(int(cnt[b, h, qb]), idx.shape[-1])
                for blk in [int(x) for x in idx[b, h, qb, :n]]:
                    if not 0 <= blk < nk:
                        continue
                    t0, h0, w0 = b_origin(blk, nbk, ck)
                    K, V = box(k, b, h, gk, ck, t0, h0, w0), box(v, b, h, gk, ck, t0, h0, w0)
                    s = Q @ K.T
                    dp = dO @ V.T
                    ok = torch.tensor([t0 + geo_of(r, ck)[0] < gk[0] and h0 + geo_of(r, ck)[1] < gk[1]
                                       and w0 + geo_of(r, ck)[2] < gk[2] for r in range(64)])
                    p = torch.where(ok[None, :], torch.exp2(s * c2 - rl2[:, None]), torch.zeros_like(s))
                    ds = p * (dp - rdl[:, None])
                    acc += ds @ K
                for r in range(64):
                    dt, dh, dw = geo_of(r, cq)
                    t, hh, w = qt0 + dt, qh0 + dh, qw0 + dw
                    if t < gq[0] and hh < gq[1] and w < gq[2]:
                        dq[b, (t * gq[1] + hh) * gq[2] + w, h] = acc[r] * scale
    return dq, dk, dv


def rand_selection(B, H, nq, nk, rng):
    m = max(1, nk // 2)
    idx = torch.full((B, H, nq, m), -1, dtype=torch.int64)
    cnt = torch.zeros((B, H, nq), dtype=torch.int64)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                n = rng.randint(0, m)
                sel = rng.sample(range(nk), n)
                idx[b, h, i, :n] = torch.tensor(sel, dtype=torch.int64)
                cnt[b, h, i] = n
    return idx, cnt


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main() -> int:
    rng = random.Random(1)
    torch.manual_seed(1)
    bad = 0
    D, H, scale = 128, 2, 128 ** -0.5
    cases = [((5, 6, 10), (4, 4, 4)), ((8, 8, 8), (4, 4, 4)), ((6, 5, 19), (2, 4, 8)), ((9, 9, 9), (4, 4, 4))]
    for gq, cq in cases:
        B = 2
        S = math.prod(gq)
        q, k, v, do = (torch.randn(B, S, H, D, dtype=torch.float64) for _ in range(4))
        nq = nk = math.prod(nblocks(gq, cq))
        idx, cnt = rand_selection(1, H, nq, nk, rng)
        from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection

        sel = BlockSelection(idx.expand(B, -1, -1, -1), cnt.expand(B, -1, -1), gq, gq, cq, cq)
        mask = bsa_token_mask(sel.to_mask(), gq, gq, cq, cq)
        qd, kd, vd = (x.clone().requires_grad_(True) for x in (q, k, v))
        ro, rl = attention_oracle(qd, kd, vd, mask, scale)
        rq, rk, rv = torch.autograd.grad(ro, (qd, kd, vd), do)
        for union in (False, True):
            out, lse = fwd_emulate(q, k, v, None, None, idx, cnt, gq, gq, cq, cq, scale, union)
            fin = torch.isfinite(rl)
            ok = rel(out, ro.detach()) < 1e-10 and torch.equal(torch.isfinite(lse), fin) and \
                float((lse[fin] - rl.detach()[fin]).abs().max()) < 1e-9
            bad += not ok
            print(f"{'OK' if ok else 'FAIL'} fwd union={union} grid {gq} chunk {cq}: rel {rel(out, ro.detach()):.1e}")
        out, lse = fwd_emulate(q, k, v, None, None, idx, cnt, gq, gq, cq, cq, scale, False)
        dq, dk, dv = bwd_emulate(do, q, k, v, out, lse, idx, cnt, gq, gq, cq, cq, scale)
        errs = [rel(a, b) for a, b in zip((dq, dk, dv), (rq, rk, rv))]
        ok = all(e < 1e-10 for e in errs)
        bad += not ok
        print(f"{'OK' if ok else 'FAIL'} bwd grid {gq} chunk {cq}: rel dq/dk/dv {errs[0]:.1e} {errs[1]:.1e} {errs[2]:.1e}")
    # two key segments: cache (batch 1) of c frames + T fresh frames
    for (c, T, hw, ck) in [(4, 5, (6, 10), (4, 4, 4)), (2, 6, (5, 19), (2, 4, 8))]:
        B = 2
        Hf, Wf = hw
        gq, gk = (T, Hf, Wf), (c + T, Hf, Wf)
        q = torch.randn(B, T * Hf * Wf, H, D, dtype=torch.float64)
        kc, vc = (torch.randn(1, c * Hf * Wf, H, D, dtype=torch.float64) for _ in range(2))
        kf, vf = (torch.randn(B, T * Hf * Wf, H, D, dtype=torch.float64) for _ in range(2))
        ka, va = torch.cat([kc.expand(B, -1, -1, -1), kf], 1), torch.cat([vc.expand(B, -1, -1, -1), vf], 1)
        nq, nk = math.prod(nblocks(gq, ck)), math.prod(nblocks(gk, ck))
        idx, cnt = rand_selection(1, H, nq, nk, rng)
        from longcat_kernels.ops.block_sparse_attn.selection import BlockSelection

        sel = BlockSelection(idx.expand(B, -1, -1, -1), cnt.expand(B, -1, -1), gq, gk, ck, ck)
        ro, rl = attention_oracle(q, ka, va, bsa_token_mask(sel.to_mask(), gq, gk, ck, ck), scale)
        for union in (False, True):
            out, lse = fwd_emulate(q, kc, vc, kf, vf, idx, cnt, gq, gk, ck, ck, scale, union)
            ok = rel(out, ro) < 1e-10
            bad += not ok
            print(f"{'OK' if ok else 'FAIL'} two segments c={c} union={union}: rel {rel(out, ro):.1e}")
    print("ALL OK" if not bad else f"{bad} FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
