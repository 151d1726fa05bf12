"""Loading the DiT from the released checkpoint layouts (SPEC 9), strictly and without a random model.

Layouts:

* upstream ``dit/``: ``config.json`` + ``diffusion_pytorch_model.safetensors`` or shards
  ``diffusion_pytorch_model-0000k-of-0000n.safetensors`` with ``*.safetensors.index.json``
  (``weight_map``: key -> shard file). Keys are exactly ``LongCatDiT.state_dict()``'s.
* FastVideo ``transformer/``: ``config.json`` (``num_attention_heads``) + ``model.safetensors``
  (or shards + index) with renamed keys and split fused projections (``attn.qkv`` ->
  ``self_attn.to_q/to_k/to_v``, ``cross_attn.kv_linear`` -> ``cross_attn.to_k/to_v``); mapping in
  ``fastvideo_sources``. Detected from the tensor names.

The model skeleton is built on the meta device (no memory, no random init), every key is checked
against the file headers before any tensor is read (missing, unexpected and shape-mismatched keys
are listed by name in one ``CheckpointError``), then tensors are read one at a time, converted to
the requested dtype/device and assigned. Peak host memory is one tensor (plus its fused partners).
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, Iterable, List, Optional, Tuple, Type, Union

import torch
import torch.nn as nn

from longcat_kernels._validate import check_bool

from .config import DiTConfig

__all__ = [
    "CheckpointError",
    "load_dit",
    "resolve_dit_dir",
    "fastvideo_sources",
    "to_fastvideo_state_dict",
    "read_checkpoint_index",
    "check_device",
]


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded (message says what and where)."""


def _safe_open(path: str):
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
        hint = ""
        if _looks_pickled(path):  # safetensors' own words ("header too large") did not say what the file is
            hint = ("; it is a PyTorch pickle (torch.save / .bin / .pt), which is never unpickled here (unpickling "
                    "runs code from the file): convert it to safetensors")
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e}){hint}") from None


def _looks_pickled(path: str) -> bool:
    """Whether ``path`` starts like a ``torch.save`` file: a zip archive (default since torch 1.6) or a
    raw pickle (protocol 2+ opcode ``\\x80``). Only the first bytes are read."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _get_tensor(handle, path: str, key: str) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read tensor {key!r} ({type(e).__name__}: {e})") from None


def _has_non_finite(t: torch.Tensor) -> bool:
    """Whether a floating tensor holds NaN/Inf, at the cost of a sum: NaN and Inf always reach the
    sum, and only a finite sum that overflows (rare; fp16) pays for the exact elementwise check.
    On 2 CPU cores, per 4096 x 11008 fp32 tensor: sum ~5 ms, ``isfinite().all()`` ~130 ms, reading
    it from a warm page cache ~80 ms."""
    if not t.is_floating_point() or bool(torch.isfinite(t.sum())):
        return False
    return not bool(torch.isfinite(t).all())


def _open_safetensors_all(path: str) -> Dict[str, torch.Tensor]:
    """All tensors of one safetensors file, with clear errors for missing/corrupt files."""
    h = _safe_open(path)
    return {k: _get_tensor(h, path, k) for k in h.keys()}


# ---------------------------------------------------------------------- folder resolution
def resolve_dit_dir(path: Union[str, os.PathLike]) -> str:
    """The folder holding the DiT: ``path`` itself, or its ``dit/`` or ``transformer/`` subfolder."""
    path = os.fspath(path)
    if os.path.isfile(path):  # (was "checkpoint folder not found" for a file that exists)
        raise CheckpointError(f"checkpoint folder: {path} is a file; pass the folder holding it "
                              f"({os.path.dirname(os.path.abspath(path))})")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path}")

    def has_weights(d: str) -> bool:
        # an index counts (its shards all missing, a partial download: read_checkpoint_index names them)
        return bool(glob.glob(os.path.join(d, "*.safetensors"))
                    or glob.glob(os.path.join(d, "*.safetensors.index.json")))

    if os.path.isfile(os.path.join(path, "config.json")) and has_weights(path):
        return path
    found = [
        os.path.join(path, sub) for sub in ("dit", "transformer")
        if os.path.isdir(os.path.join(path, sub)) and os.path.isfile(os.path.join(path, sub, "config.json"))
        and has_weights(os.path.join(path, sub))
    ]
    if len(found) > 1:
        raise CheckpointError(
            f"{path}: holds both an upstream dit/ and a FastVideo transformer/ checkpoint; pass the one to load "
            f"explicitly ({found[0]} or {found[1]})"
        )
    if found:
        return found[0]
    pickles = sorted(os.path.relpath(p, path) for d in (path, os.path.join(path, "dit"), os.path.join(path, "transformer"))
                     for p in glob.glob(os.path.join(d, "*.bin")) + glob.glob(os.path.join(d, "*.pt"))
                     + glob.glob(os.path.join(d, "*.pth")))
    raise CheckpointError(
        f"{path}: no DiT checkpoint here (expected config.json + *.safetensors in the folder, or in its "
        f"dit/ or transformer/ subfolder)"
        + (f"; found PyTorch pickle file(s) {pickles[:5]}, which are never unpickled here (unpickling runs code "
           "from the file): convert them to safetensors" if pickles else "")
    )


def _read_weight_map(index_path: str) -> Dict[str, str]:
    """The ``weight_map`` of a ``*.safetensors.index.json``: a non-empty object of tensor name -> file
    name in the index's folder (a list, a null or list file, or a path leading out of the folder
    crashed later with a TypeError naming no file, or opened a file elsewhere)."""
    try:
        with open(index_path, "r", encoding="utf-8") as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index_path}: not a valid safetensors index ({type(e).__name__}: {e})") from None
    if not isinstance(index, dict) or "weight_map" not in index:
        raise CheckpointError(f"{index_path}: not a valid safetensors index (expected a JSON object with a "
                              f"'weight_map', got {type(index).__name__}"
                              + (f" with keys {sorted(index)[:10]})" if isinstance(index, dict) else ")"))
    weight_map = index["weight_map"]
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: 'weight_map' must be a non-empty object of tensor name -> shard file "
                              f"name, got {type(weight_map).__name__} {_short(weight_map)}")
    for k, v in weight_map.items():  # (keys: JSON object keys are always strings)
        if not isinstance(v, str) or v in ("", ".", "..") or os.path.basename(v) != v:
            raise CheckpointError(
                f"{index_path}: 'weight_map' entry {k!r}: {_short(v)}: expected a tensor name -> the file name of a "
                "shard in the index's folder (a string without a directory part)"
            )
    return weight_map


def _short(value, limit: int = 80) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[:limit] + "..."


def read_checkpoint_index(folder: str) -> Dict[str, Tuple[str, Tuple[int, ...], str]]:
    """Key -> (file, shape, dtype string) from the safetensors headers (no tensor data read).

    Uses ``*.safetensors.index.json`` when present (its ``weight_map`` must match the shards),
    otherwise every ``*.safetensors`` file of the folder.
    """
    indexes = sorted(glob.glob(os.path.join(folder, "*.safetensors.index.json")))
    if len(indexes) > 1:
        raise CheckpointError(f"{folder}: several index files {[os.path.basename(i) for i in indexes]}; keep one")
    if indexes:
        weight_map = _read_weight_map(indexes[0])
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
        if absent:  # (one at a time, as "checkpoint file not found" for the first)
            raise CheckpointError(f"{indexes[0]}: {len(absent)} of the {len(files)} shard file(s) it lists are missing "
                                  f"from {folder} (an interrupted download?): {_list(absent, 20)}")
    else:
        weight_map = None
        files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{folder}: no *.safetensors file")
    out: Dict[str, Tuple[str, Tuple[int, ...], str]] = {}
    stray: List[str] = []
    for fname in files:
        fpath = os.path.join(folder, fname)
        h = _safe_open(fpath)
        for k in h.keys():
            if weight_map is not None and weight_map.get(k) != fname:
                # a shard key the index lists nowhere or in another shard: the index and the shards disagree
                # (it was skipped: a model key was then reported "missing" although the shard holds it, and
                # strict loading ignored an unlisted extra tensor)
                where = f"the index places it in {weight_map[k]}" if k in weight_map else "the index does not list it"
                stray.append(f"{k} in {fname} ({where})")
                continue
            if k in out:
                raise CheckpointError(f"{folder}: tensor {k!r} appears in both {out[k][0]} and {fname}")
            try:
                sl = h.get_slice(k)
                out[k] = (fname, tuple(sl.get_shape()), str(sl.get_dtype()))
            except Exception as e:
                raise CheckpointError(f"{fpath}: bad header entry for {k!r} ({type(e).__name__}: {e})") from None
    if weight_map is not None:
        lost = sorted(k for k, f in weight_map.items() if k not in out)
        if lost:
            raise CheckpointError(
                f"{indexes[0]}: {len(lost)} key(s) listed in the index are missing from their shard: "
                + ", ".join(lost[:20]) + (" ..." if len(lost) > 20 else "")
            )
        if stray:
            raise CheckpointError(
                f"{indexes[0]}: the index's weight_map does not match the shards: {len(stray)} tensor(s) "
                f"not listed for the shard holding them: {_list(sorted(stray), 20)}"
            )
    return out


# ---------------------------------------------------------------------- FastVideo names
_FV_SIMPLE = [
    (re.compile(r"^x_embedder\.(.*)$"), r"patch_embed.\1"),
    (re.compile(r"^t_embedder\.mlp\.0\.(.*)$"), r"time_embedder.linear_1.\1"),
    (re.compile(r"^t_embedder\.mlp\.2\.(.*)$"), r"time_embedder.linear_2.\1"),
    (re.compile(r"^y_embedder\.y_proj\.0\.(.*)$"), r"caption_embedder.linear_1.\1"),
    (re.compile(r"^y_embedder\.y_proj\.2\.(.*)$"), r"caption_embedder.linear_2.\1"),
    (re.compile(r"^blocks\.(\d+)\.adaLN_modulation\.1\.(.*)$"), r"blocks.\1.adaln_linear_1.\2"),
    (re.compile(r"^blocks\.(\d+)\.pre_crs_attn_norm\.(.*)$"), r"blocks.\1.norm_cross.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(.*)$"), r"blocks.\1.self_attn.to_out.\2"),
    (re.compile(r"^blocks\.(\d+)\.attn\.(q_norm|k_norm)\.(.*)$"), r"blocks.\1.self_attn.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.q_linear\.(.*)$"), r"blocks.\1.cross_attn.to_q.\2"),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.proj\.(.*)$"), r"blocks.\1.cross_attn.to_out.\2"),
    (re.compile(r"^blocks\.(\d+)\.cross_attn\.(q_norm|k_norm)\.(.*)$"), r"blocks.\1.cross_attn.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.(w[123])\.(.*)$"), r"blocks.\1.ffn.\2.\3"),
    (re.compile(r"^final_layer\.adaLN_modulation\.1\.(.*)$"), r"final_layer.adaln_linear.\1"),
    (re.compile(r"^final_layer\.linear\.(.*)$"), r"final_layer.proj.\1"),
]
_FV_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_FV_KV = re.compile(r"^blocks\.(\d+)\.cross_attn\.kv_linear\.(weight|bias)$")


def fastvideo_sources(key: str) -> List[str]:
    """FastVideo tensor names whose row-concatenation (dim 0) is our tensor ``key`` (SPEC 9)."""
    m = _FV_QKV.match(key)
    if m:
        b, p = m.groups()
        return [f"blocks.{b}.self_attn.to_{x}.{p}" for x in ("q", "k", "v")]
    m = _FV_KV.match(key)
    if m:
        b, p = m.groups()
        return [f"blocks.{b}.cross_attn.to_{x}.{p}" for x in ("k", "v")]
    for pattern, repl in _FV_SIMPLE:
        if pattern.match(key):
            return [pattern.sub(repl, key)]
    raise KeyError(f"no FastVideo name for {key!r}")


def to_fastvideo_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Our (upstream) state dict -> FastVideo's converted layout (fused projections split)."""
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        srcs = fastvideo_sources(k)
        for name, part in zip(srcs, torch.chunk(v, len(srcs), dim=0)):
            out[name] = part.contiguous()
    return out


def _is_fastvideo(keys: Iterable[str], expected: Optional[Iterable[str]] = None) -> bool:
    """Whether the checkpoint ``keys`` are FastVideo's names: those of more of the model's ``expected``
    keys than the upstream names are (one extra tensor named like FastVideo's, ignored with
    ``strict=False``, made a whole upstream checkpoint FastVideo's and refused: every key "missing").
    Without ``expected``, or when neither layout names any model key, by the FastVideo-only prefixes."""
    keys = set(keys)
    if expected is not None:
        expected = list(expected)
        upstream = sum(k in keys for k in expected)
        fastvideo = sum(s in keys for k in expected for s in fastvideo_sources(k))
        if upstream or fastvideo:
            return fastvideo > upstream
    return any(k.startswith(("patch_embed.", "time_embedder.", "caption_embedder.")) or ".self_attn." in k for k in keys)


# ---------------------------------------------------------------------- loading
def _list(names: List[str], limit: int = 30) -> str:
    """The first ``limit`` names, comma-separated, and how many more: every "these names" message of
    longcat_vc (the loaders, the LoRA matcher, the pipeline's VAE / text-encoder checks) uses this one."""
    return ", ".join(names[:limit]) + (f" ... (+{len(names) - limit} more)" if len(names) > limit else "")


_FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def check_dtype(dtype, name: str = "dtype") -> None:
    """``dtype`` is None or a floating ``torch.dtype`` of 16 bits or more (a string such as ``"bf16"`` is
    a TypeError naming the argument, not a confusing "invalid device" later; an 8-bit float such as
    ``torch.float8_e4m3fn`` failed deep in the loaders: fp8 weights are ``fp8=True``)."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"{name}: expected a floating torch.dtype (e.g. torch.bfloat16) or None, got {dtype!r}")
    if dtype is not None and torch.finfo(dtype).bits < 16:
        raise ValueError(f"{name}: expected a floating torch.dtype of 16 bits or more (bfloat16, float16, float32), "
                         f"got {dtype}; for fp8 DiT weights load in bfloat16 with fp8=True (--fp8)")


def check_device(device, name: str = "device") -> torch.device:
    """``device`` (a str or ``torch.device``) as a ``torch.device`` that weights can be loaded onto:
    parseable, CUDA available when asked for and its index visible, not ``meta`` (torch's own errors
    named no argument: an AssertionError "Torch not compiled with CUDA enabled" at the first tensor,
    "invalid device ordinal" for ``cuda:1`` on one GPU, and on ``meta`` a CheckpointError blaming the
    checkpoint for parameters left uninitialised)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"{name}: expected a str or torch.device (e.g. 'cuda:0') or None, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"{name}: expected a device such as 'cpu', 'cuda' or 'cuda:0', got {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: expected an available device, got {device} but CUDA is not available")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        # (passed, then torch's "invalid device ordinal" at the first tensor, which the pipeline blamed on a component)
        n = torch.cuda.device_count()
        raise ValueError(f"{name}: expected a visible CUDA device (cuda:0 .. cuda:{n - 1}), got {device} with {n} "
                         "visible (CUDA_VISIBLE_DEVICES renumbers them from 0)")
    if device.type == "meta":
        raise ValueError(f"{name}: expected a device that holds data, got {device} (weights cannot be loaded onto it)")
    return device


def _check_header_dtypes(folder: str, header: Dict[str, Tuple[str, Tuple[int, ...], str]],
                         keys: Iterable[str]) -> None:
    """Every tensor the model reads is floating and all share one dtype: an int64 tensor would
    become an integer parameter and an fp16 one in an fp32 checkpoint a mixed-dtype model."""
    keys = list(keys)
    dts = {k: header[k][2] for k in keys}
    bad = sorted(f"{k} ({d})" for k, d in dts.items() if d not in _FLOAT_DTYPES and not d.startswith("F8"))
    fp8 = sorted(f"{k} ({d})" for k, d in dts.items() if d.startswith("F8"))
    floats = [d for d in dts.values() if d in _FLOAT_DTYPES]
    problems = []
    if bad:
        problems.append(f"{len(bad)} non-floating tensor(s): {_list(bad)}")
    if fp8:  # (were called "non-floating")
        problems.append(f"{len(fp8)} 8-bit float tensor(s), which this loader does not read (for fp8 weights load the "
                        f"bf16/fp32 checkpoint and quantise it: fp8=True / --fp8, or quantize_dit_fp8): {_list(fp8)}")
    if floats:
        main = max(set(floats), key=floats.count)
        odd = sorted(f"{k} ({d})" for k, d in dts.items() if d in _FLOAT_DTYPES and d != main)
        if odd:
            problems.append(f"{len(odd)} tensor(s) not in the checkpoint's dtype {main}: {_list(odd)}")
    if problems:
        raise CheckpointError(f"{folder}: tensors of unexpected dtype: " + "; ".join(problems))


def load_dit(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
             device: Union[str, torch.device, None] = None, *, strict: bool = True,
             attn_backend: Optional[str] = None, progress: bool = True, cls: Type[nn.Module]):
    """Builds a ``cls`` (``LongCatDiT``) from a checkpoint folder; ``LongCatDiT.from_pretrained``
    is the entry point. The class is passed in so that this module never imports the model
    (``dit`` imports ``loading``, not the other way round).

    Args:
        path: an upstream ``dit/`` folder, a FastVideo ``transformer/`` folder, or a checkpoint root
            holding one of them.
        dtype: parameter dtype (e.g. ``torch.bfloat16``); None keeps the stored dtype.
        device: where the parameters go (default CPU): a str, ``torch.device`` or CUDA index,
            checked first (``check_device``: ValueError / TypeError naming it). Tensors are read
            one by one, converted and placed: no random fp32 model is ever materialised.
        strict: unexpected checkpoint keys are an error (True) or ignored (False). Missing and
            shape-mismatched keys are always errors.
        attn_backend: overrides ``config.attn_backend``.
        progress: a progress bar over the tensors read (1022 for the released model: minutes),
            like the pipeline's denoising bars (``progress=False``: none).
        cls: the model class (``LongCatDiT`` or a subclass), built as ``cls(config, device="meta")``.

    Returns:
        The model in eval mode with ``requires_grad=False`` parameters (inference).

    Raises:
        CheckpointError: missing folder/config/files, unreadable or corrupt safetensors,
            missing / unexpected / mismatched keys, each listed by name, and a tensor holding
            NaN/Inf (named with its file).
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"load_dit: cls must be the model class (LongCatDiT or a subclass), got {cls!r}")
    check_dtype(dtype)
    check_bool(progress, "progress")
    check_bool(strict, "strict")  # strict=None / 0 would ignore unexpected keys without a word
    if isinstance(device, int) and not isinstance(device, bool):
        device = f"cuda:{device}"  # an index, as torch.device reads one
    device = check_device(device) if device is not None else torch.device("cpu")
    folder = resolve_dit_dir(path)
    try:
        config = DiTConfig.from_json(os.path.join(folder, "config.json"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{folder}/config.json: {e}") from None
    if attn_backend is not None:
        config.attn_backend = attn_backend
        config.__post_init__()

    model = cls(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    header = read_checkpoint_index(folder)
    fastvideo = _is_fastvideo(header, expected)
    sources = {k: (fastvideo_sources(k) if fastvideo else [k]) for k in expected}

    missing: List[str] = []
    mismatched: List[str] = []
    used = set()
    for k, shape in expected.items():
        srcs = sources[k]
        absent = [s for s in srcs if s not in header]
        if absent:
            missing.extend(absent)
            continue
        used.update(srcs)
        shapes = [header[s][1] for s in srcs]
        if len(srcs) == 1:
            got = shapes[0]
        elif all(s == shapes[0] for s in shapes):
            got = (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])
        else:
            # parts of unequal rows (to_q one row longer, to_k one shorter) summed to the fused shape and
            # loaded with every row boundary between q/k/v shifted, silently
            got = None
        if got != shape:
            desc = " + ".join(f"{s}{list(sh)}" for s, sh in zip(srcs, shapes)) if len(srcs) > 1 else f"{list(shapes[0])}"
            part = (f" ({len(srcs)} equal parts of {[shape[0] // len(srcs)] + list(shape[1:])})"
                    if len(srcs) > 1 and shape[0] % len(srcs) == 0 else "")
            mismatched.append(f"{srcs[0] if len(srcs) == 1 else k}: checkpoint {desc}, model {list(shape)}{part}")
    unexpected = sorted(k for k in header if k not in used)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_list(sorted(missing))}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape-mismatched key(s): {_list(mismatched)}")
    if unexpected and strict:
        problems.append(f"{len(unexpected)} unexpected key(s): {_list(unexpected)}")
    if problems:
        layout = "FastVideo transformer/" if fastvideo else "upstream dit/"
        hint = ""
        if any(k.endswith(".weight_scale") for k in unexpected):
            # the state dict of a quantised DiT (longcat_vc.fp8: e4m3 weights + per-row scales), saved and given
            # as a checkpoint: "unexpected key(s) ...weight_scale" did not say what the file was
            hint = (" (the '.weight_scale' keys are those of a DiT quantised with longcat_vc.fp8.quantize_dit_fp8: "
                    "load the bf16 checkpoint and quantise it, or load this state dict into a DiT quantised the "
                    "same way with load_state_dict)")
        raise CheckpointError(f"{folder} ({layout} layout) does not match the config: " + "; ".join(problems) + hint)

    _check_header_dtypes(folder, header, sorted(used))
    handles: Dict[str, object] = {}

    def read(name: str) -> torch.Tensor:
        fname = header[name][0]
        if fname not in handles:
            handles[fname] = _safe_open(os.path.join(folder, fname))
        t = _get_tensor(handles[fname], os.path.join(folder, fname), name)
        if _has_non_finite(t):  # a NaN weight would turn every output into NaN (black frames)
            raise CheckpointError(f"{os.path.join(folder, fname)}: non-finite values (NaN/Inf) in tensor {name!r}")
        return t

    def place(k: str) -> None:
        parts = [read(s) for s in sources[k]]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if device.type != "cpu":
            t = t.to(device=device)
        if dtype is not None and t.is_floating_point():
            narrower = torch.finfo(dtype).max < torch.finfo(t.dtype).max
            t = t.to(dtype)
            if narrower and _has_non_finite(t):  # e.g. fp32 weights above 65504 loaded as fp16
                raise CheckpointError(f"{folder}: tensor {k!r} overflows {dtype} (finite in the checkpoint, "
                                      f"Inf once converted); load it in a wider dtype (bfloat16 or float32)")
        if t.data_ptr() == parts[0].data_ptr():
            # still the file's mmapped bytes (CPU, dtype kept): an own, aligned copy. The view sits at
            # the tensor's offset in the file, and CPU GEMM kernels take alignment-dependent paths,
            # so it could round differently from any copy of it (the block streamer's, a reload).
            t = t.clone()
        mod_name, _, attr = k.rpartition(".")
        module = model.get_submodule(mod_name)
        module._parameters[attr] = nn.Parameter(t.contiguous(), requires_grad=False)

    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm comes with the vc extra; the DiT alone loads without it, with no bar
        tqdm = None
    # the released model: 1022 tensors, 54 GB in fp32, minutes to read
    bar = tqdm(total=len(expected), desc="Loading DiT", leave=False, unit="tensor") if progress and tqdm else None
    try:
        for k in expected:
            place(k)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    leftover = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:  # pragma: no cover - guarded by the key check above
        raise CheckpointError(f"{folder}: parameters left uninitialised: {_list(leftover)}")
    model.eval()
    return model
