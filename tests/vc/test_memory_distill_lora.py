"""from_pretrained's memory check counts the cfg-step LoRA that distill mode loads (it stays resident,
fused or not): its rank equivalent from the file's header, none in basic mode."""

import os

import torch

from longcat_vc.memory import estimate_peak_bytes
from longcat_vc.pipeline import CFG_STEP_LORA_FILE, _fit_shape


def test_distill_counts_the_cfg_step_lora(tmp_path):
    from tiny_ckpt import LORA_TARGETS_CFG_STEP, tiny_config, write_longcat_lora

    cfg = tiny_config()
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "lora"))
    write_longcat_lora(os.path.join(root, CFG_STEP_LORA_FILE), cfg, targets=LORA_TARGETS_CFG_STEP, seed=1)
    basic = _fit_shape(cfg, root, "basic", torch.bfloat16, False)
    distill = _fit_shape(cfg, root, "distill", torch.bfloat16, True)
    assert "lora_rank" not in basic and basic["dtype_bytes"] == 2 and basic["fp8"] is False
    assert distill["lora_rank"] > 0 and distill["fp8"] is True
    shape = dict(height=64, width=64, num_frames=13, num_cond_frames=5, batch=2)
    assert (estimate_peak_bytes(cfg, "resident", **shape, **dict(distill, fp8=False))["peak"]
            > estimate_peak_bytes(cfg, "resident", **shape, **basic)["peak"])


def test_distill_without_the_file_counts_no_lora(tmp_path):
    # the file's absence is check_checkpoint's to report; the estimate does not guess
    from tiny_ckpt import tiny_config

    assert _fit_shape(tiny_config(), str(tmp_path), "distill", torch.float16, False)["lora_rank"] == 0
