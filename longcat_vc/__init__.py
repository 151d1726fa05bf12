"""longcat_vc: LongCat-Video video continuation on longcat_kernels.

Model side (this package's core): ``DiTConfig``, ``LongCatDiT`` (exact to the released
checkpoints, upstream and FastVideo layouts), ``KVCache`` (conditioning KV cache), LoRA
(``LongCatDiT.load_lora/enable_loras``), ``dit_forward_flops``. The pipeline
(``VideoContinuationPipeline``) is imported lazily so the model imports without video/text deps.
"""

from .config import DiTConfig
from .dit import LongCatDiT
from .flops import dit_forward_flops
from .kv_cache import KVCache
from .loading import CheckpointError

__all__ = ["DiTConfig", "LongCatDiT", "KVCache", "CheckpointError", "dit_forward_flops", "VideoContinuationPipeline"]


def __getattr__(name):
    if name == "VideoContinuationPipeline":
        from .pipeline import VideoContinuationPipeline

        return VideoContinuationPipeline
    raise AttributeError(f"module 'longcat_vc' has no attribute {name!r}")
