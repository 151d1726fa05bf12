"""Configuration of the LongCat-Video DiT (SPEC 6).

``DiTConfig`` carries the field names of the upstream ``dit/config.json`` so a released config
loads as is; keys the upstream model uses only for its own attention switches
(``enable_flashattn2``, ``enable_flashattn3``, ``enable_xformers``, ``cp_split_hw``) or that
diffusers writes (``_class_name``, ``_diffusers_version``) are accepted and ignored (a ``_class_name``
without "LongCat" in it, another model's config, is refused). FastVideo's
converted ``transformer/config.json`` renames ``num_heads`` to ``num_attention_heads``; both
spellings load.

Our own field: ``attn_backend`` ("auto", "torch", "triton", "cuda"), passed to every
``longcat_kernels`` call. Block-sparse attention is switched by the upstream fields ``enable_bsa``
+ ``bsa_params`` (``sparsity``, ``cdf_threshold``, ``chunk_3d_shape_q``, ``chunk_3d_shape_k``).

Not diffusers' ``ConfigMixin``/``register_to_config``: it records the arguments of a ``ModelMixin``
subclass's ``__init__`` (our DiT is a plain ``nn.Module`` loading upstream names strictly) and would
neither merge FastVideo's ``num_attention_heads`` spelling nor validate the fields.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from longcat_kernels._validate import check_sparsity
from longcat_kernels.grid import as_triple
from longcat_kernels.ops.block_sparse_attn.api import DEFAULT_SPARSITY

__all__ = ["DiTConfig", "ATTN_BACKENDS"]

ATTN_BACKENDS = ("auto", "torch", "triton", "cuda")

# Upstream-only or bookkeeping keys that a config.json may carry and that we ignore.
_IGNORED_KEYS = frozenset(
    {
        "enable_flashattn2",
        "enable_flashattn3",
        "enable_xformers",
        "cp_split_hw",
        "_class_name",
        "_diffusers_version",
        "_name_or_path",
        "attention_head_dim",
        "num_channels_latents",
    }
)

_BOOL_FIELDS = frozenset({"text_tokens_zero_pad", "enable_bsa"})
_BSA_KEYS = ("sparsity", "cdf_threshold", "chunk_3d_shape_q", "chunk_3d_shape_k")


def _check_bsa_params(p: Dict[str, Any]) -> None:
    """The values of ``bsa_params`` at load time (else a bad one fails only at the first BSA forward):
    the kernels' own checks, on the settings ``DiTConfig.bsa_settings`` will pass them."""
    try:
        check_sparsity(p.get("sparsity", DEFAULT_SPARSITY), p.get("cdf_threshold"))
        for key in ("chunk_3d_shape_q", "chunk_3d_shape_k"):
            if p.get(key) is not None:
                as_triple(p[key], key)
    except (TypeError, ValueError) as e:
        raise type(e)(f"DiTConfig.bsa_params: {e}") from None


@dataclass
class DiTConfig:
    """Hyper-parameters of the LongCat-Video DiT, with the upstream ``config.json`` field names.

    Attributes:
        in_channels: latent channels in (16).
        out_channels: latent channels out (16).
        hidden_size: model width C (4096).
        depth: number of blocks (48).
        num_heads: attention heads; ``head_dim = hidden_size // num_heads`` (128).
        caption_channels: text-encoder width (4096, UMT5-XXL).
        mlp_ratio: SwiGLU width factor before the 2/3 rule (4).
        adaln_tembed_dim: timestep-embedding width feeding every adaLN (512).
        frequency_embedding_size: sinusoidal timestep features (256).
        patch_size: (pt, ph, pw) of the Conv3d patch embedding ((1, 2, 2); pt must be 1).
        text_tokens_zero_pad: True: padded text tokens become zero vectors and all L tokens are
            attended; False: only the valid tokens of each sample are attended (varlen).
        enable_bsa: use block-sparse self-attention (when the latent grid has more than 1 frame,
            as upstream).
        bsa_params: dict with ``sparsity``, ``cdf_threshold``, ``chunk_3d_shape_q``,
            ``chunk_3d_shape_k`` (upstream names); None -> LongCat's published values.
        attn_backend: backend of the ``longcat_kernels`` calls: "auto", "torch", "triton", "cuda".
    """

    in_channels: int = 16
    out_channels: int = 16
    hidden_size: int = 4096
    depth: int = 48
    num_heads: int = 32
    caption_channels: int = 4096
    mlp_ratio: float = 4
    adaln_tembed_dim: int = 512
    frequency_embedding_size: int = 256
    patch_size: Tuple[int, int, int] = (1, 2, 2)
    text_tokens_zero_pad: bool = False
    enable_bsa: bool = False
    bsa_params: Optional[Dict[str, Any]] = None
    attn_backend: str = "auto"

    def __setattr__(self, name: str, value: Any) -> None:
        # The bool switches are also flipped on a built model (model.config.enable_bsa = ..., as the
        # pipeline's BSA toggle does): a truthy "false" switched block-sparse attention / zero padding on.
        if name in _BOOL_FIELDS and not isinstance(value, bool):
            raise TypeError(f"DiTConfig.{name}: expected a JSON bool (true/false), got {value!r}")
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        # config.json is user-editable: a "false" string is truthy, 2.7 would truncate to 2
        ps = self.patch_size
        if not isinstance(ps, (list, tuple)) or not all(
                isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in ps):
            raise ValueError(f"DiTConfig.patch_size: expected three ints (1, ph, pw), got {ps!r}")
        self.patch_size = tuple(int(p) for p in ps)
        mr = self.mlp_ratio
        if isinstance(mr, bool) or not isinstance(mr, numbers.Real) or not (0 < mr < float("inf")):
            raise ValueError(f"DiTConfig.mlp_ratio: expected a positive finite number, got {mr!r}")
        for name in ("in_channels", "out_channels", "hidden_size", "depth", "num_heads",
                     "caption_channels", "adaln_tembed_dim", "frequency_embedding_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DiTConfig.{name}: expected a positive int, got {value!r}")
        if self.ffn_hidden_size < 1:  # (the SwiGLU FFN had no hidden unit: every block's FFN added 0)
            raise ValueError(f"DiTConfig.mlp_ratio: {mr!r} x hidden_size {self.hidden_size} gives a SwiGLU FFN of width "
                             f"{self.ffn_hidden_size}; expected mlp_ratio * hidden_size >= 2")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1 or min(self.patch_size) <= 0:
            raise ValueError(
                f"DiTConfig.patch_size: expected (1, ph, pw) (no temporal patching), got {self.patch_size}"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size: expected a multiple of num_heads={self.num_heads}, got {self.hidden_size}"
            )
        hd = self.head_dim
        if hd % 2 or (hd - 4 * (hd // 6)) <= 0 or (hd // 6) == 0:
            raise ValueError(
                f"DiTConfig: head_dim = hidden_size / num_heads must be even and >= 6 for the 3D RoPE "
                f"split (t, h, w), got {hd}"
            )
        if self.frequency_embedding_size % 2:
            raise ValueError(
                f"DiTConfig.frequency_embedding_size: expected an even number, got {self.frequency_embedding_size}"
            )
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"DiTConfig.attn_backend: expected one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.bsa_params is not None:
            if not isinstance(self.bsa_params, dict):
                raise TypeError(f"DiTConfig.bsa_params: expected a dict or None, got {type(self.bsa_params).__name__}")
            unknown = sorted(set(self.bsa_params) - set(_BSA_KEYS))
            if unknown:
                raise ValueError(f"DiTConfig.bsa_params: unknown keys {unknown}; expected a subset of {list(_BSA_KEYS)}")
            _check_bsa_params(self.bsa_params)

    # ------------------------------------------------------------------ derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def ffn_hidden_size(self) -> int:
        """SwiGLU width: ``256 * ceil(int(2 * mlp_ratio * hidden / 3) / 256)`` (11008 for 4096)."""
        h = int(2 * int(self.hidden_size * self.mlp_ratio) / 3)
        return 256 * ((h + 255) // 256)

    @property
    def patch_volume(self) -> int:
        return math.prod(self.patch_size)

    def bsa_settings(self) -> Dict[str, Any]:
        """Block-sparse settings with defaults filled in (LongCat: 0.9375, chunks (4,4,4))."""
        p = dict(self.bsa_params or {})
        chunk_q = tuple(p.get("chunk_3d_shape_q") or (4, 4, 4))
        chunk_k = tuple(p.get("chunk_3d_shape_k") or chunk_q)
        sparsity = p.get("sparsity", DEFAULT_SPARSITY)
        cdf = p.get("cdf_threshold", None)
        return {"sparsity": sparsity, "cdf_threshold": cdf, "chunk_q": chunk_q, "chunk_k": chunk_k}

    # ------------------------------------------------------------------ presets
    @classmethod
    def longcat_video(cls, **overrides: Any) -> "DiTConfig":
        """The released 13.6B model (SPEC 6); ``overrides`` replace fields (e.g. ``depth=8``)."""
        base = dict(
            text_tokens_zero_pad=True,
            bsa_params={
                "sparsity": 0.9375,
                "cdf_threshold": None,
                "chunk_3d_shape_q": [4, 4, 4],
                "chunk_3d_shape_k": [4, 4, 4],
            },
        )
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides: Any) -> "DiTConfig":
        """A CPU-test model: hidden 64, depth 2, 2 heads (head_dim 32), caption 32, tembed 32."""
        base = dict(
            in_channels=16,
            out_channels=16,
            hidden_size=64,
            depth=2,
            num_heads=2,
            caption_channels=32,
            mlp_ratio=4,
            adaln_tembed_dim=32,
            frequency_embedding_size=32,
            text_tokens_zero_pad=False,
        )
        base.update(overrides)
        return cls(**base)

    # ------------------------------------------------------------------ (de)serialisation
    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DiTConfig":
        """Build from a ``config.json`` dict (upstream or FastVideo names); ignores upstream-only keys."""
        if not isinstance(d, dict):
            raise TypeError(f"DiTConfig.from_dict: expected a dict, got {type(d).__name__}")
        d = dict(d)
        cls_name = d.get("_class_name")
        if isinstance(cls_name, str) and "longcat" not in cls_name.lower():
            # another model's config.json (the VAE's, a Wan transformer's) failed on a field it does not have
            # ("patch_size: expected three ints, got None") or built the default model: every key "missing"
            raise ValueError(f"DiTConfig.from_dict: _class_name {cls_name!r} is not a LongCat-Video DiT (expected "
                             "LongCatVideoTransformer3DModel, or FastVideo's LongCatTransformer3DModel); is this the "
                             "config.json of another component or model?")
        if "num_attention_heads" in d:
            heads = d.pop("num_attention_heads")
            if "num_heads" in d and d["num_heads"] != heads:
                raise ValueError(
                    f"DiTConfig.from_dict: num_heads={d['num_heads']} and num_attention_heads={heads} disagree"
                )
            d["num_heads"] = heads
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {}
        unknown = []
        for key, value in d.items():
            if key in names:
                kwargs[key] = value
            elif key not in _IGNORED_KEYS and not key.startswith("_"):
                unknown.append(key)
        # Unknown keys are ignored too (forward compatibility), but remembered for the curious; one that
        # is a near miss of a field is most likely misspelt (the field would take its default silently).
        near = {k: difflib.get_close_matches(k, sorted(names), n=1, cutoff=0.85) for k in unknown}
        near = {k: m[0] for k, m in near.items() if m and m[0] not in d}
        if near:
            warnings.warn("DiTConfig.from_dict: " + "; ".join(
                f"unknown key {k!r} ignored (did you mean {m!r}? that field keeps its default)"
                for k, m in sorted(near.items())), UserWarning, stacklevel=2)
        cfg = cls(**kwargs)
        # FastVideo's redundant sizes: ignored, but not when they contradict the model built (a config
        # without hidden_size built the default 4096-wide model, failing only at the state dict's shapes)
        for key, value, what in (
                ("attention_head_dim", cfg.head_dim,
                 f"head_dim = hidden_size {cfg.hidden_size} / num_heads {cfg.num_heads} = {cfg.head_dim}"),
                ("num_channels_latents", cfg.in_channels, f"in_channels={cfg.in_channels}")):
            if key in d and d[key] != value:
                raise ValueError(f"DiTConfig.from_dict: {key}={d[key]!r} contradicts {what}")
        cfg._ignored_keys = tuple(sorted(unknown))  # type: ignore[attr-defined]
        return cfg

    @classmethod
    def from_json(cls, path: "str | os.PathLike[str]") -> "DiTConfig":
        """Read a ``config.json`` file, or the ``config.json`` inside a folder."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"DiTConfig.from_json: no config file at {path}")
        def no_duplicates(pairs):
            # json keeps the last of a repeated key silently: {"text_tokens_zero_pad": true, ...,
            # "text_tokens_zero_pad": false} built the varlen model without a word
            seen = set()
            dup = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
            if dup:
                raise ValueError(f"DiTConfig.from_json: {path}: key(s) {dup} given more than once; keep one")
            return dict(pairs)

        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f, object_pairs_hook=no_duplicates)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # (a binary file's error named no file)
            raise ValueError(f"DiTConfig.from_json: {path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_dict(self) -> Dict[str, Any]:
        """Upstream-style dict (``num_heads`` spelling), JSON-serialisable."""
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    def to_json(self, path: "str | os.PathLike[str]", *, fastvideo: bool = False) -> None:
        """Write ``config.json`` (``fastvideo=True``: FastVideo's spelling and class name)."""
        d = self.to_dict()
        d.pop("attn_backend")
        if fastvideo:
            d["num_attention_heads"] = d.pop("num_heads")
            d["_class_name"] = "LongCatTransformer3DModel"
        else:
            d["_class_name"] = "LongCatVideoTransformer3DModel"
        text = json.dumps(d, indent=2)  # first: a value JSON cannot write left the old file truncated
        # whole or not at all: written beside, then renamed over (an interrupt or a full disk while writing
        # truncated the old config.json, which the checkpoint folder then failed to load)
        path = os.fspath(path)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise
