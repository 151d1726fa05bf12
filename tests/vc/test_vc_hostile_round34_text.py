"""Hostile-user round 34: the text side of the VC pipeline (``longcat_vc.text.encode_prompts``): a bad
``max_length`` (0 ran untruncated, True ran as 1 token), a non-floating ``dtype`` (the embeddings were
cast to integers), and a truncation warning attributed to torch's ``no_grad`` wrapper."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

from longcat_vc.text import clean_prompt, encode_prompts
from vc_components import WORDS, build_text_encoder, build_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_tokenizer(str(tmp_path_factory.mktemp("tok34") / "tokenizer"))


def _prompt(n: int) -> str:
    words = [w for w in WORDS if w.isalpha()]
    return " ".join(random.choice(words) for _ in range(n))


def test_encode_prompts_matches_an_independent_tokenize_and_encode(tok):
    """Reference check (SPEC 7): cleaned prompt, padded to max_length, encoder's last hidden state
    [B, 1, L, C] and the tokenizer's mask, against a direct fp64 computation."""
    enc = build_text_encoder(seed=random.randrange(1000)).double()
    prompts = ["  " + _prompt(5) + " &amp;amp;\t\n", "", _prompt(3) + " \U0001f431 \x07"]
    embeds, mask = encode_prompts(tok, enc, prompts, max_length=12)
    assert embeds.shape[:3] == (3, 1, 12) and mask.dtype == torch.int64
    cleaned = [clean_prompt(p) for p in prompts]
    ref = tok(cleaned, padding="max_length", max_length=12, truncation=True, return_tensors="pt")
    torch.testing.assert_close(mask, ref.attention_mask)
    torch.testing.assert_close(embeds[:, 0], enc(ref.input_ids, ref.attention_mask).last_hidden_state)


@pytest.mark.parametrize("bad, err", [(0, ValueError), (-3, ValueError), (True, TypeError), (2.0, TypeError),
                                      (None, TypeError)])
def test_a_bad_max_length_is_named(tok, bad, err):
    """max_length=0 returned untruncated [B, 1, n_tokens, C] embeddings (the tokenizer reads 0 as "no
    limit") under a warning saying 0 tokens were kept; True ran as 1 token; -1, None and floats failed
    deep inside the tokenizer or the truncation check without naming max_length."""
    with pytest.raises(err, match="max_length"):
        encode_prompts(tok, build_text_encoder(), [_prompt(6)], max_length=bad)


def test_a_non_floating_dtype_is_refused(tok):
    """dtype=torch.int64 (or bool) cast the text embeddings to integers without a word."""
    for dt in (torch.int64, torch.bool):
        with pytest.raises(TypeError, match="dtype"):
            encode_prompts(tok, build_text_encoder(), [_prompt(4)], max_length=8, dtype=dt)


def test_the_truncation_warning_points_at_the_callers_line(tok):
    """The truncation warning's stacklevel skipped one frame too few: it was attributed to torch's
    ``utils/_contextlib.py`` (the ``no_grad`` wrapper), so a filter on the caller's module missed it."""
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        encode_prompts(tok, build_text_encoder(), [_prompt(30)], max_length=8)
    msgs = [x for x in w if "tokens" in str(x.message)]
    assert msgs and msgs[0].filename == __file__, [m.filename for m in msgs]
