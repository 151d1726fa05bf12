"""Row-wise float8 (e4m3) quantisation of activations, with fused LayerNorm / adaLN / SwiGLU prologues."""
