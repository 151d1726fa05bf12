"""Tiny random LongCat-Video checkpoints and LoRA files for CPU tests (model and pipeline tests).

Everything is written the way the released files are laid out, so the loaders are exercised on
the real formats:

* ``write_upstream_dit(folder, config, ...)``: upstream ``dit/``: ``config.json`` +
  ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` + ``diffusion_pytorch_model.safetensors.
  index.json`` (``shards > 1``) or a single ``diffusion_pytorch_model.safetensors``.
* ``write_fastvideo_transformer(folder, config, ...)``: FastVideo ``transformer/``:
  ``config.json`` with ``num_attention_heads`` and ``_class_name: LongCatTransformer3DModel`` +
  ``model.safetensors`` (or shards + ``model.safetensors.index.json``), keys renamed and fused
  projections split (SPEC 9).
* ``longcat_lora_tensors(...)`` / ``write_longcat_lora(path, ...)``: LongCat LoRA format (SPEC 8),
  plain ``lora_up.weight`` or split ``lora_up.blocks.{j}.weight``, with ``alpha_scale``.
* ``fastvideo_lora_tensors(longcat_tensors)`` / ``write_fastvideo_lora(path, ...)``: the same LoRA
  converted the way FastVideo's ``longcat_to_fastvideo.py`` converts it (``lora_A``/``lora_B``/
  ``lora_alpha`` per FastVideo module).
* ``lora_merged_state_dict(state_dict, longcat_tensors, multiplier)``: the reference merged-weight
  math (``W + up @ down * alpha_scale * multiplier`` per part), written independently of
  ``longcat_vc.lora``.

All tensors come from a seeded ``torch.Generator``: same seed, same checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from longcat_vc.config import DiTConfig

__all__ = [
    "tiny_config",
    "random_state_dict",
    "write_upstream_dit",
    "write_fastvideo_transformer",
    "write_checkpoint_root",
    "model_from_state_dict",
    "LORA_TARGETS_CFG_STEP",
    "LORA_TARGETS_REFINEMENT",
    "longcat_lora_tensors",
    "write_longcat_lora",
    "fastvideo_lora_tensors",
    "write_fastvideo_lora",
    "lora_merged_state_dict",
]


def tiny_config(**overrides) -> DiTConfig:
    """``DiTConfig.tiny()`` (hidden 64, depth 2, 2 heads of 32, caption 32) with ``overrides``."""
    return DiTConfig.tiny(**overrides)


def random_state_dict(config: DiTConfig, seed: int = 0, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """A random state dict with the model's exact names and shapes.

    Weights ``N(0, 1/fan_in)``, biases ``N(0, 0.1^2)``, norm weights ``1 + N(0, 0.1^2)`` (so a
    forgotten norm weight shows up), all from ``torch.Generator().manual_seed(seed)``.
    """
    from longcat_vc.dit import LongCatDiT

    shapes = {k: tuple(v.shape) for k, v in LongCatDiT(config, device="meta").state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("norm.weight") or "pre_crs_attn_norm.weight" in k:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif k.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[k] = t.to(dtype)
    return sd


def model_from_state_dict(config: DiTConfig, state_dict: Dict[str, torch.Tensor], dtype=torch.float32):
    """A ``LongCatDiT`` (eval, no grad) holding a copy of ``state_dict`` cast to ``dtype``."""
    from longcat_vc.dit import LongCatDiT

    m = LongCatDiT(config, device="meta")
    m.load_state_dict({k: v.to(dtype, copy=True) for k, v in state_dict.items()}, strict=True, assign=True)
    m.requires_grad_(False)
    return m.eval()


def _write_sharded(folder: str, tensors: Dict[str, torch.Tensor], stem: str, shards: int) -> List[str]:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    keys = list(tensors)
    if shards <= 1:
        name = f"{stem}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(folder, name))
        return [name]
    per = math.ceil(len(keys) / shards)
    weight_map = {}
    names = []
    for i in range(shards):
        chunk = keys[i * per:(i + 1) * per]
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in chunk}, os.path.join(folder, name))
        weight_map.update({k: name for k in chunk})
        names.append(name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(folder, f"{stem}.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


def write_upstream_dit(folder: str, config: DiTConfig, state_dict: Optional[Dict[str, torch.Tensor]] = None, *,
                       seed: int = 0, shards: int = 2, extra_config: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Writes an upstream ``dit/`` folder; returns the state dict written.

    Args:
        folder: output folder (created).
        config: model config; its ``config.json`` gets the upstream-only keys too
            (``enable_flashattn2``, ``cp_split_hw``...), which the loader must ignore.
        state_dict: tensors to write (default ``random_state_dict(config, seed)``).
        shards: > 1 writes ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` + index.json.
        extra_config: more ``config.json`` entries.
    """
    sd = random_state_dict(config, seed) if state_dict is None else state_dict
    _write_sharded(folder, sd, "diffusion_pytorch_model", shards)
    cfg = config.to_dict()
    cfg.pop("attn_backend")
    cfg.update({"_class_name": "LongCatVideoTransformer3DModel", "_diffusers_version": "0.35.0",
                "enable_flashattn3": False, "enable_flashattn2": True, "enable_xformers": False,
                "cp_split_hw": [1, 1]})
    cfg.update(extra_config or {})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sd


def write_fastvideo_transformer(folder: str, config: DiTConfig, state_dict: Optional[Dict[str, torch.Tensor]] = None,
                                *, seed: int = 0, shards: int = 1) -> Dict[str, torch.Tensor]:
    """Writes a FastVideo ``transformer/`` folder from an upstream-named state dict; returns the
    upstream-named state dict (the one a correct loader must reproduce)."""
    from longcat_vc.loading import to_fastvideo_state_dict

    sd = random_state_dict(config, seed) if state_dict is None else state_dict
    _write_sharded(folder, to_fastvideo_state_dict(sd), "model", shards)
    cfg = config.to_dict()
    cfg.pop("attn_backend")
    cfg["num_attention_heads"] = cfg.pop("num_heads")
    cfg["_class_name"] = "LongCatTransformer3DModel"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sd


def write_checkpoint_root(root: str, config: DiTConfig, *, layout: str = "upstream", seed: int = 0,
                          shards: int = 2) -> Dict[str, torch.Tensor]:
    """``root/dit/`` (layout "upstream") or ``root/transformer/`` ("fastvideo"); returns the state dict."""
    if layout == "upstream":
        return write_upstream_dit(os.path.join(root, "dit"), config, seed=seed, shards=shards)
    if layout == "fastvideo":
        return write_fastvideo_transformer(os.path.join(root, "transformer"), config, seed=seed, shards=shards)
    raise ValueError(f"layout: expected 'upstream' or 'fastvideo', got {layout!r}")


# ------------------------------------------------------------------------------------ LoRA
# (module path pattern with {i} for the block, number of up blocks in the split form)
LORA_TARGETS_CFG_STEP: Tuple[Tuple[str, int], ...] = (
    ("blocks.{i}.attn.qkv", 3),
    ("blocks.{i}.attn.proj", 1),
    ("blocks.{i}.cross_attn.q_linear", 1),
    ("blocks.{i}.cross_attn.kv_linear", 2),
    ("blocks.{i}.ffn.w1", 1),
    ("blocks.{i}.ffn.w2", 1),
    ("blocks.{i}.ffn.w3", 1),
)
LORA_TARGETS_REFINEMENT: Tuple[Tuple[str, int], ...] = LORA_TARGETS_CFG_STEP + (
    ("blocks.{i}.adaLN_modulation.1", 6),
    ("final_layer.adaLN_modulation.1", 2),
    ("final_layer.linear", 1),
)


def _lkey(module: str, suffix: str) -> str:
    return "lora___lorahyphen___" + module.replace(".", "___lorahyphen___") + "." + suffix


def longcat_lora_tensors(config: DiTConfig, *, rank: int = 4, targets: Sequence[Tuple[str, int]] = LORA_TARGETS_REFINEMENT,
                         split: bool = True, alpha_scale: Optional[float] = 0.5, seed: int = 1,
                         scale: float = 0.2) -> Dict[str, torch.Tensor]:
    """Random LoRA in LongCat's format for every block (SPEC 8).

    Args:
        rank: r per part (``lora_down`` has ``n*r`` rows for an n-way split target).
        targets: (module pattern, n) pairs; ``{i}`` is replaced by each block index.
        split: True writes ``lora_up.blocks.{j}.weight [out/n, r]`` for n > 1 (the released
            files' form); False writes one plain ``lora_up.weight [out, n*r]`` for every target.
        alpha_scale: written as a 0-d tensor; None omits the key.
        scale: std of the random up/down entries (non-zero up, unlike a fresh LoRA).
    """
    from longcat_vc.dit import LongCatDiT

    model = LongCatDiT(config, device="meta")
    g = torch.Generator().manual_seed(seed)
    out: Dict[str, torch.Tensor] = {}
    for pattern, n in targets:
        modules = [pattern.format(i=i) for i in range(config.depth)] if "{i}" in pattern else [pattern]
        for mpath in modules:
            lin = model.get_submodule(mpath)
            fin, fout = lin.in_features, lin.out_features
            out[_lkey(mpath, "lora_down.weight")] = scale * torch.randn(n * rank, fin, generator=g)
            if split and n > 1:
                for j in range(n):
                    out[_lkey(mpath, f"lora_up.blocks.{j}.weight")] = scale * torch.randn(fout // n, rank, generator=g)
            else:
                out[_lkey(mpath, "lora_up.weight")] = scale * torch.randn(fout, n * rank, generator=g)
            if alpha_scale is not None:
                out[_lkey(mpath, "alpha_scale")] = torch.tensor(float(alpha_scale))
    return out


def write_longcat_lora(path: str, config: DiTConfig, **kwargs) -> Dict[str, torch.Tensor]:
    """Writes ``longcat_lora_tensors(config, **kwargs)`` to ``path``; returns the tensors."""
    from safetensors.torch import save_file

    t = longcat_lora_tensors(config, **kwargs)
    save_file(t, path)
    return t


_FV_TARGETS = {
    "attn.qkv": ["self_attn.to_q", "self_attn.to_k", "self_attn.to_v"],
    "attn.proj": ["self_attn.to_out"],
    "cross_attn.q_linear": ["cross_attn.to_q"],
    "cross_attn.kv_linear": ["cross_attn.to_k", "cross_attn.to_v"],
    "ffn.w1": ["ffn.w1"],
    "ffn.w2": ["ffn.w2"],
    "ffn.w3": ["ffn.w3"],
    "adaLN_modulation.1": ["adaln_linear_1"],
}


def _fv_paths(module: str) -> List[str]:
    if module == "final_layer.adaLN_modulation.1":
        return ["final_layer.adaln_linear"]
    if module == "final_layer.linear":
        return ["final_layer.proj"]
    parts = module.split(".")
    prefix, rest = ".".join(parts[:2]), ".".join(parts[2:])
    return [f"{prefix}.{t}" for t in _FV_TARGETS[rest]]


def fastvideo_lora_tensors(longcat: Dict[str, torch.Tensor], *, weight_suffix: bool = False,
                           prefix: str = "") -> Dict[str, torch.Tensor]:
    """Converts LongCat LoRA tensors the way FastVideo's converter does (split form only for
    multi-target modules): per FastVideo target ``lora_A`` (its rows of ``lora_down``), ``lora_B``
    (its up block; block-diagonal for a split single target) and ``lora_alpha = alpha_scale * r``.

    Args:
        weight_suffix: write ``.lora_A.weight`` instead of ``.lora_A`` (both spellings occur).
        prefix: key prefix (e.g. ``"diffusion_model."``, which FastVideo strips).
    """
    mods: Dict[str, dict] = {}
    for k, t in longcat.items():
        name, suffix = k.split(".", 1)
        module = name[len("lora___lorahyphen___"):].replace("___lorahyphen___", ".")
        mods.setdefault(module, {})[suffix] = t
    out: Dict[str, torch.Tensor] = {}
    sfx = ".weight" if weight_suffix else ""
    for module, e in mods.items():
        targets = _fv_paths(module)
        down = e["lora_down.weight"]
        alpha_scale = float(e["alpha_scale"]) if "alpha_scale" in e else 1.0
        blocks = [e[f"lora_up.blocks.{j}.weight"] for j in range(6) if f"lora_up.blocks.{j}.weight" in e]
        n = len(targets)
        if n > 1:
            if not blocks:
                raise ValueError(f"{module}: FastVideo's converter needs the split form for a {n}-target module")
            r = down.shape[0] // n
            for j, path in enumerate(targets):
                out[f"{prefix}{path}.lora_A{sfx}"] = down[j * r:(j + 1) * r].contiguous()
                out[f"{prefix}{path}.lora_B{sfx}"] = blocks[j].contiguous()
                out[f"{prefix}{path}.lora_alpha"] = torch.tensor(alpha_scale * r, dtype=torch.float32)
        else:
            if blocks:
                o, r = blocks[0].shape
                B = torch.zeros(o * len(blocks), r * len(blocks))
                for j, b in enumerate(blocks):
                    B[j * o:(j + 1) * o, j * r:(j + 1) * r] = b
            else:
                B = e["lora_up.weight"]
            out[f"{prefix}{targets[0]}.lora_A{sfx}"] = down.contiguous()
            out[f"{prefix}{targets[0]}.lora_B{sfx}"] = B.contiguous()
            out[f"{prefix}{targets[0]}.lora_alpha"] = torch.tensor(alpha_scale * down.shape[0], dtype=torch.float32)
    return out


def write_fastvideo_lora(path: str, longcat: Dict[str, torch.Tensor], **kwargs) -> Dict[str, torch.Tensor]:
    """Writes ``fastvideo_lora_tensors(longcat, **kwargs)`` to ``path``; returns the tensors."""
    from safetensors.torch import save_file

    t = fastvideo_lora_tensors(longcat, **kwargs)
    save_file(t, path)
    return t


def lora_merged_state_dict(state_dict: Dict[str, torch.Tensor], longcat: Dict[str, torch.Tensor],
                           multiplier: float = 1.0, default_alpha_scale: float = 0.5) -> Dict[str, torch.Tensor]:
    """Reference merge (SPEC 8) in fp64: ``W[rows_j] += up_j @ down[rank rows_j] * alpha_scale * multiplier``."""
    sd = {k: v.double().clone() for k, v in state_dict.items()}
    mods: Dict[str, dict] = {}
    for k, t in longcat.items():
        name, suffix = k.split(".", 1)
        module = name[len("lora___lorahyphen___"):].replace("___lorahyphen___", ".")
        mods.setdefault(module, {})[suffix] = t.double()
    for module, e in mods.items():
        W = sd[module + ".weight"]
        down = e["lora_down.weight"]
        s = float(e["alpha_scale"]) if "alpha_scale" in e else default_alpha_scale
        ups = [e[f"lora_up.blocks.{j}.weight"] for j in range(16) if f"lora_up.blocks.{j}.weight" in e]
        if ups:
            n = len(ups)
            r, o = down.shape[0] // n, W.shape[0] // n
            for j, up in enumerate(ups):
                W[j * o:(j + 1) * o] += up @ down[j * r:(j + 1) * r] * s * multiplier
        else:
            W += e["lora_up.weight"] @ down * s * multiplier
    return sd


def tiny_model_with_lora(tmp_path, name: str = "a", fuse: bool = False):
    """``(model, state_dict)``: a tiny fp32 DiT from fresh random weights with a random rank-4 LoRA ``name``
    loaded from ``tmp_path`` and enabled (fused with ``fuse=True``); ``state_dict`` holds the base weights."""
    import copy

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=int(torch.randint(0, 2**31, ())))
    m = model_from_state_dict(cfg, copy.deepcopy(sd))
    path = str(tmp_path / f"{name}.safetensors")
    write_longcat_lora(path, cfg, rank=4)
    m.load_lora(path, name)
    m.enable_loras([name])
    if fuse:
        m.fuse_lora()
    return m, sd
