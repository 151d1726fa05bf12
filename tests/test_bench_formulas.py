"""The benchmark's derived numbers pinned against independent hand computations on small shapes:
attention FLOPs (dense, cond/noisy prefix, cached K/V), block-sparse visited FLOPs with partial edge
blocks, the DiT step (cache off / on / build, CFG batch), rate units, the timed backward, and the
report's unit labels and ratio direction. Each hand count is written out term by term here, not
taken from ``bench.flops``."""

from __future__ import annotations

import json
import math

import pytest
import torch

# ----------------------------------------------------------------------------------------- attention


def test_dense_attention_flops_by_hand():
    from bench.flops import attn_flops

    # QK^T: Sq*Sk dot products of length D; PV: Sq*D dot products of length Sk; 2 FLOPs per MAC
    B, H, Sq, Sk, D = 2, 3, 5, 7, 8
    qk = 2 * Sq * Sk * D
    pv = 2 * Sq * D * Sk
    fwd = B * H * (qk + pv)
    assert attn_flops(B, H, Sq, Sk, D) == fwd == 6720
    # backward = 2.5 x forward: five products (S recomputed, dP, dV, dQ, dK) against the forward's two
    assert attn_flops(B, H, Sq, Sk, D, backward=True) == fwd * 3.5


def test_prefix_and_cached_kv_attention_flops_by_hand():
    from bench.flops import attn_flops, prefix_attn_flops

    B, H, D, hw = 2, 3, 8, 6
    c, T = 2, 5  # 2 cond frames of 5
    Sc, S = c * hw, T * hw
    Sn = S - Sc
    # cache off (SPEC 4): cond queries see cond keys only; noisy queries see cond + noisy keys
    by_hand = 4 * B * H * D * (Sc * Sc + Sn * S)
    assert prefix_attn_flops(B, H, S, Sc, D) == by_hand
    # cache on: only the noisy queries, over [cache; fresh] keys, per CFG sample
    assert attn_flops(B, H, Sn, Sc + Sn, D) == 4 * B * H * D * Sn * S


def _token_block_ids(grid, chunk):
    """Pure-python block id of every token (t, h, w row-major; blocks row-major over the block grid)."""
    T, H, W = grid
    ct, ch, cw = chunk
    nh, nw = -(-H // ch), -(-W // cw)
    return [((t // ct) * nh + h // ch) * nw + w // cw for t in range(T) for h in range(H) for w in range(W)]


def test_bsa_visited_flops_by_token_enumeration_with_partial_blocks():
    from bench.flops import bsa_effective_flops
    from longcat_kernels import BlockSelection

    grid, chunk, D = (3, 5, 6), (2, 4, 4), 16  # partial edge blocks on every axis: 2x2x2 blocks
    nq = nk = 8
    # a hand-made selection, B1 H2, varying counts (0 .. 3), -1 padded
    rows = {
        (0, 0): [0], (0, 1): [7, 1], (0, 2): [], (0, 3): [2, 5, 6], (0, 4): [3], (0, 5): [4, 0],
        (0, 6): [6], (0, 7): [1, 2, 3],
        (1, 0): [5, 7], (1, 1): [], (1, 2): [0, 1, 2], (1, 3): [4], (1, 4): [6, 3], (1, 5): [7],
        (1, 6): [], (1, 7): [0],
    }
    idx = torch.full((1, 2, nq, 3), -1, dtype=torch.int32)
    cnt = torch.zeros((1, 2, nq), dtype=torch.int32)
    for (h, qb), ks in rows.items():
        idx[0, h, qb, :len(ks)] = torch.tensor(ks, dtype=torch.int32)
        cnt[0, h, qb] = len(ks)
    sel = BlockSelection(indices=idx, counts=cnt, grid_q=grid, grid_k=grid, chunk_q=chunk, chunk_k=chunk)
    ids = _token_block_ids(grid, chunk)
    pairs = sum(1 for (h, qb), ks in rows.items() for tq in ids if tq == qb for tk in ids if tk in ks)
    assert pairs > 0
    assert bsa_effective_flops(sel, D, grid, chunk) == 4 * D * pairs
    assert bsa_effective_flops(sel, D, grid, chunk, backward=True) == 3.5 * 4 * D * pairs
    # all blocks kept == dense
    full = BlockSelection(indices=torch.arange(nk, dtype=torch.int32).expand(1, 2, nq, nk).contiguous(),
                          counts=torch.full((1, 2, nq), nk, dtype=torch.int32),
                          grid_q=grid, grid_k=grid, chunk_q=chunk, chunk_k=chunk)
    S = 3 * 5 * 6
    assert bsa_effective_flops(full, D, grid, chunk) == 4 * 2 * S * S * D


def test_rate_units():
    from bench.flops import tflops

    # 1e12 FLOPs (SI tera, not 2**40) in 1000 ms is 1 TFLOP/s
    assert tflops(1e12, 1000.0) == pytest.approx(1.0)
    assert tflops(4 * 2 * 32 * 31200 * 37440 * 128, 64.6) == pytest.approx(592.5, abs=0.5)  # TARGETS.md row


# ----------------------------------------------------------------------------------------- DiT step


def _cfg():
    from longcat_vc import DiTConfig

    return DiTConfig.tiny(hidden_size=64, num_heads=2, caption_channels=32, adaln_tembed_dim=32,
                          frequency_embedding_size=32, depth=3, text_tokens_zero_pad=True)


def _hand_terms(cfg):
    """Per-token matmul FLOPs of the tiny config, written out from the module shapes."""
    C, F, P = cfg.hidden_size, cfg.ffn_hidden_size, cfg.patch_volume
    return dict(
        qkv=2 * C * 3 * C, proj=2 * C * C, ffn=2 * C * F * 3,  # w1, w3: C->F; w2: F->C
        cross_q=2 * C * C, cross_out=2 * C * C, cross_kv=2 * C * 2 * C,  # kv per text token
        patch=2 * cfg.in_channels * P * C, final=2 * C * P * cfg.out_channels,
        caption=2 * (cfg.caption_channels * C + C * C),
    )


def test_dit_step_flops_cache_off_and_on_by_hand():
    from bench.flops import dit_step_flops

    cfg = _cfg()
    t = _hand_terms(cfg)
    C, depth = cfg.hidden_size, cfg.depth
    grid, c, B, L = (5, 2, 4), 2, 2, 6
    hw = grid[1] * grid[2]
    S, Sc = grid[0] * hw, c * hw
    Sn = S - Sc
    dense_block = t["qkv"] + t["proj"] + t["ffn"]
    cross = t["cross_q"] + t["cross_out"] + 4 * C * L  # per noisy query token
    off_block = S * dense_block + 4 * C * (Sc * Sc + Sn * S) + Sn * cross + L * t["cross_kv"]
    off = B * (depth * off_block + S * (t["patch"] + t["final"]) + L * t["caption"])
    on_block = Sn * dense_block + 4 * C * Sn * S + Sn * cross + L * t["cross_kv"]
    on = B * (depth * on_block + Sn * (t["patch"] + t["final"]) + L * t["caption"])
    kw = dict(batch=B, num_cond_latents=c, text_len=L)
    assert dit_step_flops(cfg, grid, kv_cache=False, **kw) == off
    assert dit_step_flops(cfg, grid, kv_cache=True, **kw) == on
    # CFG: batch 2 is exactly twice batch 1 (text and all)
    assert dit_step_flops(cfg, grid, kv_cache=True, batch=1, num_cond_latents=c, text_len=L) * 2 == on


def test_kv_cache_build_flops_by_hand():
    """The build stops after the last block's K/V: no last-block attention/proj/FFN, no final layer
    (the old count was a whole forward: 11-12% too many FLOPs at depth 8)."""
    from bench.flops import kv_cache_build_flops

    cfg = _cfg()
    t = _hand_terms(cfg)
    C, depth = cfg.hidden_size, cfg.depth
    grid, c = (5, 2, 4), 2
    Sc = c * grid[1] * grid[2]
    full_block = Sc * (t["qkv"] + t["proj"] + t["ffn"]) + 4 * C * Sc * Sc
    by_hand = (depth - 1) * full_block + Sc * t["qkv"] + Sc * t["patch"]
    assert kv_cache_build_flops(cfg, grid, num_cond_latents=c) == by_hand


def test_dit_flops_match_the_model_matmuls():
    """The formulas against torch's FlopCounterMode on the model itself (linear/conv layers; the
    attention products are added by hand since the kernels are custom ops it may not see)."""
    from torch.utils.flop_counter import FlopCounterMode

    from bench.flops import dit_step_flops, kv_cache_build_flops
    from longcat_vc import LongCatDiT

    cfg = _cfg()
    torch.manual_seed(0)
    model = LongCatDiT(cfg, device="cpu", dtype=torch.float32).eval()
    grid, c, B, L = (5, 2, 4), 2, 2, 6
    T, H, W = grid
    C, depth, Dt = cfg.hidden_size, cfg.depth, cfg.adaln_tembed_dim
    ph, pw = cfg.patch_size[1], cfg.patch_size[2]
    hw = H * W
    S, Sc = T * hw, c * hw
    Sn = S - Sc
    cond = torch.randn(1, cfg.in_channels, c, H * ph, W * pw)
    noisy = torch.randn(B, cfg.in_channels, T - c, H * ph, W * pw)
    t_noisy = torch.full((B, T - c), 500.0)
    text = torch.randn(B, 1, L, cfg.caption_channels)
    mask = torch.ones(B, L, dtype=torch.long)

    def linear_flops(fn):
        """Counted FLOPs of the mm/addmm/conv ops (the projections), attention products excluded."""
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            fn()
        counts = fc.get_flop_counts()["Global"]
        return sum(v for k, v in counts.items() if "mm" in str(k) and "bmm" not in str(k)
                   or "convolution" in str(k))

    def small(frames, batch, adaln_blocks, final):
        """Per-frame timestep MLP + adaLN projections: left out of the formula on purpose (< 0.01%)."""
        te = 2 * (cfg.frequency_embedding_size * Dt + Dt * Dt)
        return batch * frames * (te + adaln_blocks * 2 * Dt * 6 * C + (2 * Dt * 2 * C if final else 0))

    cache = model.build_kv_cache(cond)
    on_counted = linear_flops(lambda: model(noisy, t_noisy, text, mask, kv_cache=cache))
    attn_on = B * depth * (4 * C * Sn * S + 4 * C * Sn * L)
    on = dit_step_flops(cfg, grid, batch=B, num_cond_latents=c, kv_cache=True, text_len=L)
    assert on_counted - small(T - c, B, depth, True) + attn_on == on

    build_counted = linear_flops(lambda: model.build_kv_cache(cond))
    attn_build = (depth - 1) * 4 * C * Sc * Sc  # the last block runs no attention
    assert build_counted - small(c, 1, depth, False) + attn_build == kv_cache_build_flops(cfg, grid, num_cond_latents=c)


# ----------------------------------------------------------------------------------------- timing


def test_timed_backward_does_not_accumulate_grads():
    """The fwd+bwd cases time what a training step does after zero_grad: gradients computed, not
    added into ``.grad`` (that was an extra read-modify-write of q, k, v per call)."""
    from bench.shapes import GRIDS
    from bench.suites import Context
    from bench.suites import bsa

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, quick=True, grids=[GRIDS["bsa-tiny"]],
                  sparsities=(0.9375,), log=lambda s: None)
    cases = [c for c in bsa.cases(ctx) if c.params.get("mode") == "fwd+bwd"]
    assert {c.params["kind"] for c in cases} == {"dense", "gated"}
    for case in cases:
        p = case.prepare()
        for _ in range(2):
            p.fn(*p.inputs[0])
        assert all(x.grad is None for x in p.inputs[0][:3]), case.id


# ----------------------------------------------------------------------------------------- report


def test_cache_size_is_mib_and_labelled_so():
    from bench import report
    from bench.suites import dit_common as dc

    # 48 layers x (K + V) x 6,240 cond tokens x 4096 x bf16: SPEC 10's 4.9 GB is 4,680 MiB
    nbytes = 48 * 2 * 6240 * 4096 * 2
    assert round(nbytes / 1e9, 1) == 4.9 and round(dc.mem_mb(nbytes)) == 4680
    doc = {"config": {"dtype": "bfloat16"}, "rows": [
        dict(suite="cache", mode=m, cond_frames=13, cond_latents=4, depth=48, hidden=4096, grid="24x30x52",
             batch=2, status="ok", ms=ms, cache_mb=4680.0, speedup=sp)
        for m, ms, sp in (("off", 110.0, None), ("on", 100.0, 1.1), ("build", 5.0, None))]}
    table = report.cache_table(doc)
    assert "cache MiB" in table and "cache MB" not in table
    assert "| 4680 |" in table and "1.10x" in table


def _doc(date, quick, rows):
    return {"schema": "longcat-bench/1", "machine": {"date": date, "gpu": "NVIDIA H100 80GB HBM3"},
            "config": {"quick": quick, "dtype": "bfloat16"}, "rows": rows}


def test_report_newest_non_quick_file_and_speedup_direction(tmp_path):
    from bench import report

    def bsa_rows(ours_ms):
        base = dict(suite="bsa", grid="24x44x80", mode="fwd", chunk="4x4x4", status="ok", batch=1, heads=32,
                    head_dim=128)
        return [dict(base, kind="dense", sparsity=0.0, backend="sdpa-cudnn", ms=200.0),
                dict(base, kind="gated", sparsity=0.9375, backend="cuda", ms=ours_ms, speedup=200.0 / ours_ms,
                     tflops=300.0)]

    d = tmp_path / "h100"
    d.mkdir()
    (d / "a.json").write_text(json.dumps(_doc("2026-12-01T00:00:00Z", False, bsa_rows(40.0))))
    (d / "b.json").write_text(json.dumps(_doc("2026-12-02T00:00:00Z", False, bsa_rows(20.0))))
    (d / "c.json").write_text(json.dumps(_doc("2026-12-03T00:00:00Z", True, bsa_rows(10.0))))  # quick: never
    text = report.render(tmp_path)
    assert "b.json" in text and "a.json" not in text and "c.json" not in text
    # dense / ours: 200 ms / 20 ms is "10.00x" faster than dense, never 0.10x
    assert "20.00 ms, 10.00x, 300 TF/s" in text
    assert math.isclose(200.0 / 20.0, 10.0)
