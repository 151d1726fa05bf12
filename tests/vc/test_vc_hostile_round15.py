"""Hostile-user round 15: silently wrong results in the text / CFG path (a text encoder left in
training mode, CFG-zero on mismatched or half-precision predictions, an empty prompt list)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from longcat_vc.schedule import cfg_zero
from longcat_vc.text import encode_prompts
from vc_components import build_text_encoder, build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(str(tmp_path_factory.mktemp("tok15") / "tokenizer"))


def test_a_text_encoder_in_training_mode_encodes_without_dropout(tok):
    # UMT5EncoderModel(config) is in training mode (dropout 0.1): the embeddings differed call to call
    enc = build_text_encoder()
    ref, _ = encode_prompts(tok, enc, ["a cat rides a red car"], max_length=16)
    enc.train()
    enc.encoder.block[0].eval()  # a mixed state must come back as it was
    for _ in range(3):
        e, _ = encode_prompts(tok, enc, ["a cat rides a red car"], max_length=16)
        assert torch.equal(e, ref)
    assert enc.training and not enc.encoder.block[0].training and enc.encoder.final_layer_norm.training


def test_an_empty_prompt_list_is_named(tok):
    # was IndexError: list index out of range, from inside the tokenizer
    with pytest.raises(ValueError, match=r"prompts: expected at least one prompt"):
        encode_prompts(tok, build_text_encoder(), [], max_length=16)


@pytest.mark.parametrize("shapes", [((2, 1, 4), (2, 4)), ((2, 4), (2, 1, 4)), ((2, 4, 1), (2, 4, 3))])
def test_cfg_zero_refuses_predictions_of_different_shapes(shapes):
    # [2, 1, 4] against [2, 4] broadcast to a [2, 2, 4] result without a word
    u, c = torch.randn(shapes[0]), torch.randn(shapes[1])
    with pytest.raises(ValueError, match=r"cfg_zero: uncond and cond must have the same shape"):
        cfg_zero(u, c, 4.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cfg_zero_in_half_precision_keeps_fp32_statistics(dtype):
    # fp16: the per-sample sums of 2*16*20*30*52 predictions overflowed to inf, st = inf/inf = NaN
    torch.manual_seed(0)
    u = torch.randn(2, 16, 20, 30, 52)
    c = u + 0.1 * torch.randn_like(u)
    u, c = u.to(dtype), c.to(dtype)
    ref = cfg_zero(u.double(), c.double(), 4.0)
    out = cfg_zero(u, c, 4.0)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    # as good as rounding the fp64 result (of the same inputs) to dtype, within 2x
    err = (out.double() - ref).norm() / ref.norm()
    floor = (ref.to(dtype).double() - ref).norm() / ref.norm()
    assert err <= 2 * floor + 1e-6, (float(err), float(floor))


LONG = " ".join(["the cat rides a red car"] * 5)  # 31 tokens with </s>; the default negative prompt is longer than 16 too


@pytest.fixture(scope="module")
def small_pipe(tok):
    from longcat_vc.pipeline import VideoContinuationPipeline
    from vc_components import StandInDiT, build_vae

    return VideoContinuationPipeline(StandInDiT().eval(), build_vae(), build_text_encoder(), tok, {"shift": 12.0},
                                     max_sequence_length=16)


def _clip():
    return np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)


@pytest.mark.parametrize("prompt, negative, expect", [
    (LONG, "a dog", r"^prompt: 31 tokens; the text encoder takes 16"),
    ("a cat", LONG, r"^negative_prompt: 31 tokens; the text encoder takes 16"),
])
def test_the_truncation_warning_names_the_prompt_the_user_gave(small_pipe, prompt, negative, expect):
    # with CFG the text batch is [negative; prompt]: the warning said "prompt 1" for the user's only prompt
    # and "prompt 0" for the negative prompt (which the user would take for the prompt)
    with pytest.warns(UserWarning, match=expect):
        small_pipe(_clip(), prompt, negative, resolution=(32, 48), num_frames=13, num_cond_frames=5,
                   num_inference_steps=1, generator=0, output_type="latent", progress=False)


def test_the_truncation_warning_of_extend_names_the_segments_prompt(small_pipe):
    with pytest.warns(UserWarning, match=r"^prompts\[1\]: 31 tokens") as rec:
        small_pipe.extend(_clip(), ["a cat", LONG], "a dog", resolution=(32, 48), num_frames=9, num_cond_frames=5,
                          num_inference_steps=1, generator=0, progress=False)
    assert not [w for w in rec if "tokens" in str(w.message) and "prompts[1]" not in str(w.message)]


@pytest.mark.parametrize("stage", ["continue", "refine"])
def test_a_dit_left_in_training_mode_denoises_in_eval_mode(refine_pipe, stage):
    """A DiT left in training mode (after LoRA training with peft: lora_dropout) denoised with its dropout on,
    every step dropping adapter activations at random; the pipeline runs it in eval mode and restores the mode."""
    from vc_components import random_frames

    dit = refine_pipe.dit
    seen = []
    handle = dit.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(m.training))
    dit.train()
    try:
        if stage == "refine":
            refine_pipe.refine(random_frames(5, 36, 64, 1), "a cat", video=random_frames(12, 40, 72, 2),
                               num_cond_frames=5, resolution=(64, 64), generator=3, output_type="latent",
                               progress=False)
        else:
            refine_pipe(random_frames(5, 36, 64, 1), "a cat", num_frames=9, num_cond_frames=5, resolution=(32, 32),
                        num_inference_steps=2, generator=3, output_type="latent", progress=False)
        assert seen and not any(seen), seen
        assert dit.training and dit.blocks[0].training  # given back as it was
    finally:
        handle.remove()
        dit.eval()
