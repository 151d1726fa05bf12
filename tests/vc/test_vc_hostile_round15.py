"""Hostile-user round 15: silently wrong results in the text / CFG path (a text encoder left in
training mode, CFG-zero on mismatched or half-precision predictions, an empty prompt list)."""

from __future__ import annotations

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
