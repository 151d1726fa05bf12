"""Hostile-user round 53: the text conditioning path of the VC pipeline (prompt / negative prompt
encoding, the text mask, padding, truncation, extend's per-prompt reuse). Bug: the truncation warning
of a pipeline call was attributed to ``longcat_vc/pipeline.py``, not to the caller's line."""

from __future__ import annotations

import random
import warnings

import pytest
import torch

pytest.importorskip("diffusers")

from longcat_vc.pipeline import VideoContinuationPipeline  # noqa: E402
from longcat_vc.text import DEFAULT_NEGATIVE_PROMPT, encode_prompts  # noqa: E402
from vc_components import WORDS, tiny_vc_video, write_full_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt53"))
    write_full_checkpoint(root, seed=random.randrange(1000))
    return VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", progress=False)


def _prompt(n: int) -> str:
    words = [w for w in WORDS if w.isalpha()]
    return " ".join(random.choice(words) for _ in range(n))


def _latents(pipe, prompt, **kw):
    args = dict(resolution=(32, 48), num_frames=13, num_cond_frames=5, guidance_scale=1.0, num_inference_steps=2,
                progress=False, output_type="latent", generator=torch.Generator().manual_seed(11))
    args.update(kw)
    out = pipe(tiny_vc_video(), prompt, **args).latents
    assert torch.isfinite(out).all()
    return out


@pytest.fixture
def seq_len(pipe):
    old = pipe.max_sequence_length
    yield lambda n: setattr(pipe, "max_sequence_length", n)
    pipe.max_sequence_length = old


def test_a_pipeline_truncation_warning_points_at_the_callers_line(pipe, seq_len):
    """Round 34 pointed the warning of a direct ``encode_prompts`` call at the caller; through the pipeline
    (its main use) it still named ``longcat_vc/pipeline.py`` (``encode_text``), so a warnings filter on the
    user's module missed it."""
    seq_len(6)
    for call in (lambda: pipe.encode_text(_prompt(20)),
                 lambda: _latents(pipe, _prompt(3), guidance_scale=2.0, num_inference_steps=1)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            call()
        msgs = [x for x in w if "tokens; the text encoder takes 6" in str(x.message)]
        assert msgs and all(m.filename == __file__ for m in msgs), [(m.filename, str(m.message)) for m in w]


@pytest.mark.parametrize("g", [1.0, 2.0])
def test_padding_does_not_change_the_continuation(pipe, seq_len, g):
    """The mask's effect: the same prompt padded to 12 or to 40 tokens gives the same latents (the padded
    text tokens are masked out, not attended), with and without CFG."""
    prompt = _prompt(4)
    kw = dict(guidance_scale=g, negative_prompt="" if g > 1 else None)
    seq_len(12)
    a = _latents(pipe, prompt, **kw)
    seq_len(40)
    b = _latents(pipe, prompt, **kw)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_negative_prompt_none_empty_and_whitespace(pipe, seq_len):
    """Under CFG, None is the demo negative prompt (not ""), and a whitespace-only one is "" (cleaned); at
    guidance 1 a negative prompt (even "") is refused by name rather than ignored."""
    seq_len(96)  # the demo negative prompt fits untruncated in the tiny tokenizer
    prompt = _prompt(3)
    none = _latents(pipe, prompt, guidance_scale=2.0, num_inference_steps=1)
    demo = _latents(pipe, prompt, guidance_scale=2.0, num_inference_steps=1, negative_prompt=DEFAULT_NEGATIVE_PROMPT)
    empty = _latents(pipe, prompt, guidance_scale=2.0, num_inference_steps=1, negative_prompt="")
    blank = _latents(pipe, prompt, guidance_scale=2.0, num_inference_steps=1, negative_prompt=" \t\n ")
    torch.testing.assert_close(none, demo, rtol=0, atol=0)
    torch.testing.assert_close(empty, blank, rtol=0, atol=0)
    assert (none - empty).abs().max() > 1e-3
    for neg in ("", "x"):
        with pytest.raises(ValueError, match="negative_prompt"):
            _latents(pipe, prompt, negative_prompt=neg)


def test_truncation_keeps_the_eos_and_a_full_mask(pipe):
    """A prompt past max_length: exactly max_length tokens, all valid, the last one the eos (truncated,
    never wrapped into another row), equal to encoding the cut prompt with its eos."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    words = _prompt(25).split()
    with pytest.warns(UserWarning, match="25 words|26 tokens"):
        e, m = encode_prompts(tok, enc, " ".join(words), max_length=8)
    assert e.shape[:3] == (1, 1, 8) and m.tolist() == [[1] * 8]
    ref_e, ref_m = encode_prompts(tok, enc, " ".join(words[:7]), max_length=8)
    assert ref_m.tolist() == m.tolist()
    torch.testing.assert_close(e, ref_e, rtol=0, atol=0)
    ids = tok(" ".join(words), max_length=8, truncation=True)["input_ids"]
    assert ids[-1] == tok.eos_token_id


def test_empty_whitespace_and_odd_characters_encode_like_their_cleaned_text(pipe):
    """"" and whitespace-only prompts are one eos token (a valid row: the DiT needs one); control
    characters vanish and an emoji is one unknown token, the padding is identical in every case."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    e, m = encode_prompts(tok, enc, ["", " \t\r\n\u3000 ", "\x07\x1b"], max_length=10)
    assert m.sum(dim=1).tolist() == [1, 1, 1]
    torch.testing.assert_close(e[1], e[0], rtol=0, atol=0)
    torch.testing.assert_close(e[2], e[0], rtol=0, atol=0)
    p = _prompt(3)
    e2, m2 = encode_prompts(tok, enc, [p + " \U0001f431", p + " \u2603"], max_length=10)
    assert m2.sum(dim=1).tolist() == [5, 5] and torch.isfinite(e2).all()
    torch.testing.assert_close(e2[0], e2[1], rtol=0, atol=0)  # both the unknown token


def test_padding_does_not_change_the_valid_token_embeddings(pipe):
    """The encoder's states of the real tokens do not depend on how far the row is padded."""
    tok, enc = pipe.tokenizer, pipe.text_encoder
    prompts = [_prompt(random.randint(1, 5)) for _ in range(3)]
    a, ma = encode_prompts(tok, enc, prompts, max_length=8)
    b, mb = encode_prompts(tok, enc, prompts, max_length=30)
    assert torch.equal(ma, mb[:, :8]) and not mb[:, 8:].any()
    torch.testing.assert_close(a[:, :, :6], b[:, :, :6], rtol=1e-5, atol=1e-5)


def test_extend_encodes_each_distinct_prompt_once_and_uses_the_right_one(pipe, monkeypatch):
    """extend's per-call cache is keyed by the prompt (no stale reuse): segments with different prompts get
    their own embeddings, a repeated prompt reuses its first encoding."""
    p, q = _prompt(3), _prompt(4)
    while q == p:
        q = _prompt(4)
    encoded, seen = [], []
    orig_encode, orig_segment = pipe.encode_text, pipe._segment

    def encode(prompts, names=None):
        encoded.append(list(prompts))
        return orig_encode(prompts, names=names)

    def segment(frames, size_hw, text, **kw):
        seen.append(text)
        return orig_segment(frames, size_hw, text, **kw)

    monkeypatch.setattr(pipe, "encode_text", encode)
    monkeypatch.setattr(pipe, "_segment", segment)
    pipe.extend(tiny_vc_video(), [p, q, p], resolution=(32, 48), num_frames=9, num_cond_frames=5, guidance_scale=1.0,
                num_inference_steps=1, progress=False, generator=torch.Generator().manual_seed(1))
    assert encoded == [[p], [q]]
    monkeypatch.undo()
    for text, prompt in zip(seen, (p, q, p)):
        ref = pipe.encode_text([prompt])
        torch.testing.assert_close(text[0], ref[0], rtol=0, atol=0)
        assert torch.equal(text[1], ref[1])
