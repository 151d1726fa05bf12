"""from_pretrained(dtype=fp16) keeps the UMT5 text encoder in bf16 (T5 activations overflow fp16, which
transformers clamps without a word; upstream runs the encoder in bf16); the embeddings reach the DiT in fp16."""

import torch

from vc_components import write_full_checkpoint


def test_fp16_pipeline_keeps_the_text_encoder_in_bf16(tmp_path):
    from longcat_vc.pipeline import VideoContinuationPipeline, _text_encoder_dtype

    assert _text_encoder_dtype(torch.float16) == torch.bfloat16
    assert _text_encoder_dtype(torch.bfloat16) == torch.bfloat16
    assert _text_encoder_dtype(torch.float32) == torch.float32
    ck = str(tmp_path / "ckpt")
    write_full_checkpoint(ck)
    pipe = VideoContinuationPipeline.from_pretrained(ck, dtype=torch.float16, device="cpu", attn_backend="torch",
                                                     progress=False)
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(pipe.dit.parameters()).dtype == torch.float16
    emb, mask = pipe.encode_text(["a cat", "a dog on a long walk"])
    assert emb.dtype == torch.float16 and torch.isfinite(emb).all() and mask.dtype == torch.int64
