"""Prompt cleaning and UMT5 text encoding of the VC pipeline (SPEC 7).

Cleaning follows LongCat-Video: ``ftfy.fix_text``, HTML-unescape twice, strip, collapse every run
of whitespace to one space. Encoding pads to ``max_length`` (512) tokens and returns the UMT5
encoder's last hidden state as ``[B, 1, L, C]`` plus the ``[B, L]`` attention mask.
"""

from __future__ import annotations

import contextlib
import html
import numbers
import os
from typing import Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from longcat_kernels._validate import user_stacklevel

__all__ = ["DEFAULT_NEGATIVE_PROMPT", "clean_prompt", "encode_prompts"]

# The negative prompt LongCat-Video's demos pass for basic (CFG) continuation.
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
)

MAX_SEQUENCE_LENGTH = 512


def _whitespace_re():
    # `regex` (a transformers dependency) is what upstream uses; `re` matches the same \s set
    # for the text we see, and is the fallback.
    try:
        import regex as re_mod
    except ImportError:  # pragma: no cover - regex ships with transformers
        import re as re_mod
    return re_mod.compile(r"\s+")


_WS = _whitespace_re()


def clean_prompt(text: str) -> str:
    """ftfy fix, HTML unescape twice, collapse whitespace, strip.

    Raises:
        TypeError: ``text`` is not a str.
        ImportError: ``ftfy`` is not installed (``pip install ftfy`` or ``longcat-kernels[vc]``).
    """
    if not isinstance(text, str):
        raise TypeError(f"prompt must be a str, got {type(text).__name__}")
    try:
        import ftfy
    except ImportError as e:
        raise ImportError(
            "prompt cleaning needs the 'ftfy' package: pip install ftfy (or longcat-kernels[vc])"
        ) from e
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WS.sub(" ", text).strip()


@torch.no_grad()
def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: Union[str, Sequence[str]],
    *,
    max_length: int = MAX_SEQUENCE_LENGTH,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    names: Optional[Sequence[str]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clean, tokenize (pad/truncate to ``max_length``) and encode prompts with UMT5.

    Args:
        tokenizer: a ``transformers`` tokenizer (UMT5's, from ``tokenizer/``).
        text_encoder: ``transformers.UMT5EncoderModel`` (any module returning
            ``.last_hidden_state [B, L, C]`` from ``(input_ids, attention_mask)``).
        prompts (str | list[str]): B prompts.
        max_length (int): padded length L (512 upstream).
        device: where the results go (default: the encoder's device): a str, ``torch.device`` or CUDA
            index, checked first (``loading.check_device``).
        dtype: dtype of the embeddings (default: the encoder's dtype), floating, 16 bits or more.
        names (list[str] | None): what the truncation warning calls each prompt (default
            ``"prompt {i}"``), e.g. ``["negative_prompt", "prompt"]`` for a CFG batch.

    Returns:
        (embeds, mask): ``embeds [B, 1, L, C]`` in ``dtype``, ``mask [B, L]`` int64 on ``device``.

    The encoder runs in eval mode (no dropout) whatever mode it is in; its modes are restored after.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    elif prompts is None or isinstance(prompts, (bytes, bytearray, Mapping)) or not isinstance(prompts, Iterable):
        # (a dict was encoded as its keys, bytes as their ints: "prompt must be a str, got int")
        raise TypeError(f"prompts: expected a str or a list of str, got {type(prompts).__name__}")
    prompts = list(prompts)
    odd = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if odd:
        raise TypeError(f"prompts: expected a str or a list of str, got a list holding {odd[0]}")
    prompts: List[str] = [clean_prompt(p) for p in prompts]
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
        # (True ran as 1 token; None and floats failed inside the tokenizer without naming it)
        raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
    if max_length < 1:  # (0 ran untruncated: the tokenizer reads it as "no limit")
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    max_length = int(max_length)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        # (an integer dtype cast the embeddings to integers)
        raise TypeError(f"dtype: expected a floating torch.dtype for the text embeddings, got {dtype!r}")
    if dtype is not None and torch.finfo(dtype).bits < 16:  # (e4m3 embeddings: 3 mantissa bits, up to 6% off)
        raise ValueError(f"dtype: expected a floating torch.dtype of 16 bits or more for the text embeddings, "
                         f"got {dtype}")
    if device is not None:  # checked before encoding (torch read it only after the encoder ran, naming no argument)
        from .loading import check_device

        device = check_device(f"cuda:{device}" if isinstance(device, int) and not isinstance(device, bool) else device)
    if not prompts:  # was an IndexError from inside the tokenizer
        raise ValueError("prompts: expected at least one prompt (a str or a non-empty list of str), got none")
    if names is None:
        names = [f"prompt {i}" for i in range(len(prompts))]
    elif isinstance(names, str) or len(names) != len(prompts):
        raise ValueError(f"names: expected a list of {len(prompts)} str (one per prompt), got {names!r}")
    enc_param = next(text_encoder.parameters())
    device = device if device is not None else enc_param.device
    dtype = dtype or enc_param.dtype
    tok = tokenizer(
        prompts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    if bool((tok.attention_mask.sum(dim=1) >= max_length).any()):  # only a full row can have been cut
        _warn_truncated(tokenizer, prompts, max_length, names)
    ids = tok.input_ids.to(enc_param.device)
    mask = tok.attention_mask.to(enc_param.device)
    with _eval_mode(text_encoder):
        hidden = text_encoder(ids, mask).last_hidden_state  # [B, L, C]
    embeds = hidden.to(device=device, dtype=dtype).unsqueeze(1)  # [B, 1, L, C]
    return embeds, mask.to(device=device, dtype=torch.int64)


@contextlib.contextmanager
def _eval_mode(module):
    """``module`` in eval mode inside, each submodule's own mode restored after: UMT5 built from a config
    (or after ``.train()``) is in training mode, and its dropout (0.1) made the embeddings random."""
    modes = [(m, m.training) for m in module.modules()] if hasattr(module, "modules") else []
    if not any(training for _, training in modes):
        yield
        return
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _warn_truncated(tokenizer, prompts: List[str], max_length: int, names: Sequence[str]) -> None:
    """Warn when a prompt is longer than ``max_length`` tokens: the encoder sees only its first
    ``max_length`` (as upstream), and the dropped end of the prompt was lost without a word."""
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]]
    long = [(i, n) for i, n in enumerate(lengths) if n > max_length]
    if long:
        import warnings  # noqa: PLC0415

        which = ", ".join(f"{names[i]}: {n} tokens" for i, n in long)
        # attributed to the user's line: a fixed stacklevel (past no_grad's wrapper) pointed at
        # pipeline.py when the pipeline encoded, so a filter on the caller's module missed it
        warnings.warn(f"{which}; the text encoder takes {max_length} tokens, the rest is dropped (as upstream): "
                      f"shorten the prompt", UserWarning, stacklevel=user_stacklevel(os.path.dirname(__file__)))
