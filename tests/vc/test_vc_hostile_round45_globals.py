"""Round 45 (torch's process-wide state and threads as they reach longcat_vc).

* one pipeline (or two pipelines sharing a DiT) called from two threads at once: ``use_bsa`` (and
  ``refine``'s LoRA/BSA swap, ``set_mode``, the eval-mode switch) flips state of the shared DiT for
  the length of a call, so the other thread's call ran with block-sparse attention it did not ask
  for and returned other latents without a word. Calls on one DiT now run one after the other.
* a Python float timestep was built in torch's default dtype (bf16 under ``set_default_dtype``) and
  rounded there before the weight dtype: an fp32 DiT saw 987.654 as 988.
"""

from __future__ import annotations

import threading

import pytest
import torch

from longcat_vc.pipeline import VideoContinuationPipeline
from vc_components import full_checkpoint_in, tiny_vc_latents, tiny_vc_video


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return full_checkpoint_in(tmp_path_factory, "ckpt45")


_video, _run = tiny_vc_video, tiny_vc_latents


def test_two_threads_on_one_dit_do_not_see_each_others_use_bsa(ckpt):
    """A call with ``use_bsa=True`` in one thread switched BSA on for a concurrent default call in another
    thread on the same DiT (rel. L2 of its latents against the same call alone ~1e-1)."""
    pipe = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="distill",
                                                     attn_backend="torch")
    other = VideoContinuationPipeline(pipe.dit, pipe.vae, pipe.text_encoder, pipe.tokenizer,
                                      {"shift": pipe.shift}, mode="distill")  # a second pipeline, same DiT
    dense, sparse = _run(pipe), _run(pipe, use_bsa=True)
    assert not torch.allclose(dense, sparse)

    inside, done = threading.Event(), threading.Event()
    forward = pipe.dit.forward

    def slow_forward(*a, **k):  # the BSA call holds its state while the other thread runs
        if threading.current_thread().name == "bsa" and not inside.is_set():
            inside.set()
            done.wait(3.0)
        return forward(*a, **k)

    out, errors = {}, []

    def bsa():
        try:
            out["bsa"] = _run(pipe, use_bsa=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    def plain(p, key):
        try:
            inside.wait(10.0)
            out[key] = _run(p)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
        finally:
            done.set()

    pipe.dit.forward = slow_forward
    try:
        threads = [threading.Thread(target=bsa, name="bsa"), threading.Thread(target=plain, args=(other, "other"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        del pipe.dit.forward
    assert not errors, errors
    assert pipe.dit.config.enable_bsa is False
    torch.testing.assert_close(out["bsa"], sparse, rtol=0, atol=0)
    torch.testing.assert_close(out["other"], dense, rtol=0, atol=0)


@pytest.mark.parametrize("default", [torch.bfloat16, torch.float16])
def test_python_float_timestep_is_not_rounded_to_the_default_dtype(default):
    """A Python float timestep was made a tensor in torch's default dtype: under
    ``torch.set_default_dtype(torch.bfloat16)`` (a common way to build big models) an fp32 DiT saw
    987.654 as 988 (rel. L2 of the output 0.037 against the same timestep as an fp32 tensor; fp16: 0.016)."""
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config

    cfg = tiny_config()
    m = model_from_state_dict(cfg, random_state_dict(cfg))
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    x = torch.randn(1, 16, 4, 8, 8, generator=g)
    y = torch.randn(1, 1, 5, cfg.caption_channels, generator=g)
    with torch.no_grad():
        ref = m(x, torch.tensor([987.654], dtype=torch.float32), y)
        old = torch.get_default_dtype()
        torch.set_default_dtype(default)
        try:
            out = m(x, 987.654, y)
            out_list = m(x, [987.654], y)
        finally:
            torch.set_default_dtype(old)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(out_list, ref, rtol=0, atol=0)
