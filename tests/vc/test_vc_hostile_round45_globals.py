"""Round 45 (torch's process-wide state and threads as they reach longcat_vc).

* one pipeline (or two pipelines sharing a DiT) called from two threads at once: ``use_bsa`` (and
  ``refine``'s LoRA/BSA swap, ``set_mode``, the eval-mode switch) flips state of the shared DiT for
  the length of a call, so the other thread's call ran with block-sparse attention it did not ask
  for and returned other latents without a word. Calls on one DiT now run one after the other.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from longcat_vc.pipeline import VideoContinuationPipeline
from vc_components import write_full_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt45"))
    write_full_checkpoint(root)
    return root


def _video():
    return np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)


def _run(pipe, **kw):
    args = dict(resolution=(32, 48), num_frames=13, num_cond_frames=5, guidance_scale=1.0, num_inference_steps=2,
                progress=False, output_type="latent", generator=torch.Generator().manual_seed(11))
    args.update(kw)
    return pipe(_video(), "a person rides a motorcycle", **args).latents


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
