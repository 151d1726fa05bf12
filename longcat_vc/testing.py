"""Stand-ins for checkpoint parts when none can be downloaded: a small word-level tokenizer built on
the spot in place of the UMT5 tokenizer. Used by the tests (``tests/vc/vc_components.py``) and the
random-weight pipeline benchmark (``bench/pipeline_e2e_gpu.py``); like ``longcat_kernels.testing``,
part of the package so that neither has to import the other."""

from __future__ import annotations

from typing import Iterable


def build_word_tokenizer(folder: str, words: Iterable[str]):
    """A lower-casing, whitespace-split word-level tokenizer over ``words`` (pad 0, eos 1, unk 2;
    eos appended to every text), saved to ``folder`` and returned as loaded back through
    ``transformers.AutoTokenizer``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )
    fast.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)
