"""Estimator numbers pinned against independent counts (the audit of the memory estimate)."""

import io
import types
from contextlib import redirect_stdout

import pytest
import torch

from longcat_vc.config import DiTConfig
from longcat_vc.memory import GiB, MemoryModeError, estimate_peak_bytes

# One released block's linears (SPEC 6 shapes): (out, in) of the FP8_TARGETS weights
_FP8_LINEARS = [(12288, 4096), (4096, 4096), (4096, 4096), (8192, 4096), (4096, 4096),
                (11008, 4096), (4096, 11008), (11008, 4096)]
# the rest of a released block: adaLN [24576, 512] + bias, norm_cross w/b, biases of qkv/proj/q/kv/proj,
# q_norm/k_norm of both attentions
_BLOCK_REST = 24576 * 512 + 24576 + 2 * 4096 + (12288 + 4096 + 4096 + 8192 + 4096) + 4 * 128


def test_fp8_block_bytes_match_quantised_layout_at_released_config():
    cfg = DiTConfig.longcat_video()
    q = sum(o * i for o, i in _FP8_LINEARS)
    rows = sum(o for o, _ in _FP8_LINEARS)
    # e4m3 weights + fp32 scales per output channel + the rest in bf16, against bf16 everywhere
    saved_per_block = (q + _BLOCK_REST) * 2 - (q + 4 * rows + _BLOCK_REST * 2)
    bf16 = estimate_peak_bytes(cfg, "resident")
    fp8 = estimate_peak_bytes(cfg, "resident", fp8=True)
    # (the old 97%-of-a-block guess saved 12.23 GiB instead of 12.04)
    assert bf16["decode"] - fp8["decode"] == 48 * saved_per_block
    # the streamed modes hold two blocks
    bal, bal8 = estimate_peak_bytes(cfg, "balanced"), estimate_peak_bytes(cfg, "balanced", fp8=True)
    assert bal["decode"] - bal8["decode"] == 2 * saved_per_block


def test_fp8_estimate_matches_a_quantised_tiny_dit():
    from longcat_vc.dit import LongCatDiT
    from longcat_vc.fp8 import quantize_dit_fp8

    cfg = DiTConfig.tiny()
    dit = LongCatDiT(cfg).to(torch.bfloat16)
    before = sum(t.numel() * t.element_size() for t in dit.blocks.parameters())
    quantize_dit_fp8(dit, device="cpu", emulate=True)
    after = sum(t.numel() * t.element_size() for t in list(dit.blocks.parameters()) + list(dit.blocks.buffers()))
    after += sum(m.weight_scale.numel() * m.weight_scale.element_size() for m in dit.blocks.modules()
                 if hasattr(m, "weight_scale") and not any(m.weight_scale is b for b in dit.blocks.buffers()))
    shape = dict(height=64, width=64, num_frames=9, num_cond_frames=1)
    e16 = estimate_peak_bytes(cfg, "resident", **shape)
    e8 = estimate_peak_bytes(cfg, "resident", fp8=True, **shape)
    assert e16["decode"] - e8["decode"] == before - after


def test_fp8_lora_stays_in_compute_dtype():
    cfg = DiTConfig.longcat_video()
    plain = estimate_peak_bytes(cfg, "resident", fp8=True)
    lora = estimate_peak_bytes(cfg, "resident", fp8=True, lora_rank=128)
    # the adapters are stored in the activation dtype (lora._adapter_dtype), 2 bytes, not ~1
    assert lora["decode"] - plain["decode"] == 48 * 128 * 30 * 4096 * 2


def _fake_pipe(cfg, mode):
    from longcat_vc.memory import memory_plan

    dit = types.SimpleNamespace(config=cfg, modules=lambda: iter(()))
    return types.SimpleNamespace(device=torch.device("cuda"), dit=dit, _memory=memory_plan(mode),
                                 vae_scale_temporal=4, dtype=torch.bfloat16)


def test_refine_hint_prints_the_estimate_its_fit_was_decided_on():
    from longcat_vc.refine import check_refine_fits, refine_estimate_shape

    cfg = DiTConfig.longcat_video()
    size, n, nc = (704, 1280), 186, 26
    shape, _, _ = refine_estimate_shape(size, n, nc)
    res_off = estimate_peak_bytes(cfg, "resident", offload_kv_cache=True, **shape)["peak"]
    bal_off = estimate_peak_bytes(cfg, "balanced", offload_kv_cache=True, **shape)["peak"]
    bal_on = estimate_peak_bytes(cfg, "balanced", offload_kv_cache=False, **shape)["peak"]
    assert bal_off < bal_on
    # balanced fits with the caller's offloaded cache, not with its default resident cache
    budget = int(1.05 * (bal_off + bal_on) / 2)
    assert 1.05 * res_off > budget
    with pytest.raises(MemoryModeError) as ei:
        check_refine_fits(_fake_pipe(cfg, "resident"), size, n, nc, offload_kv_cache=True, budget_bytes=budget)
    msg = str(ei.value)
    assert "memory='balanced' fits" in msg, msg
    printed = float(msg.split("memory='balanced' fits, estimated ")[1].split(" GiB")[0])
    assert printed == pytest.approx(1.05 * bal_off / GiB, abs=0.051)
    assert printed * GiB <= budget


def test_report_720p_uses_the_pipelines_16_9_bucket():
    from longcat_vc.memory_report import main
    from longcat_vc.stages import bucket_size

    assert bucket_size(9, 16, "720p") == (704, 1312)
    buf = io.StringIO()
    with redirect_stdout(buf):
        main(["--resolution", "720p"])
    out = buf.getvalue()
    assert "704x1312" in out, out
    # 44 x 82 = 3608 tokens per frame (the old 704x1280 counted 3520: 0.61 GiB less at resident)
    est = estimate_peak_bytes(DiTConfig.longcat_video(), "resident", height=704, width=1312)
    row = next(line for line in out.splitlines() if line.startswith("resident"))
    assert float(row.split()[-1]) == round(est["peak"] / GiB, 2)
