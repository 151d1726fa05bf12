"""FP8 weights for the DiT blocks (opt-in, ``--fp8``): e4m3 weights with one fp32 scale per output
channel, activations quantised per token at run time, ``torch._scaled_mm`` row-wise GEMMs (fp8
tensor cores, Hopper / Ada, sm89+).

Math of one linear ``y = x W^T + b`` (``x [M, K]``, ``W [N, K]``)::

    s_w[n] = max_k |W[n, k]| / 448        Wq = e4m3(W / s_w[:, None])       (once, at quantise)
    s_x[m] = max_k |x[m, k]| / 448        xq = e4m3(x / s_x[:, None])       (every call)
    y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] Wq[n, k] + b[n]

Which linears: the seven large ones of every block (``attn.qkv``, ``attn.proj``, ``cross_attn.
q_linear/kv_linear/proj``, ``ffn.w1/w2/w3``), whose inputs are bf16 activations. The adaLN linears
(fp32 timestep input, SPEC 6 fp32 island), the embedders and the final layer stay in the model dtype.
Unfused LoRA adapters still run in the model dtype beside the fp8 GEMM; a fused LoRA must be
fused before quantising (the fused weights are what gets quantised) and cannot be unfused after.

The activation quantisation runs in ``longcat_kernels``' ``fp8_quantize`` kernels, fused with what
produces the activation: the adaLN ``modulate`` before qkv and the FFN, the cross-attention
LayerNorm before q_linear, ``silu(a) * b`` before w2 (the bf16 activation is then never written,
unless an unfused LoRA adapter needs it); the FFN's w1 and w3 share one quantised input. The
blocks hand such an ``Fp8Activation`` to ``Fp8Linear``; a plain tensor is quantised on entry.
Measured on the H200 (480p B2 cond 4 cache on, depth 6, ``bench/dev/fp8_step_dev.py``): the first
version (one ``torch.compile``d quantisation per linear) ran the step 1.134x bf16; the fusions
+2%, ``use_fast_accum`` +2.4% (step error vs bf16 unchanged: 0.02917 vs 0.02918 rel L2), and the
hand-written single-pass kernels replace compiled reductions that read each row two or three times.

GEMM accumulation: ``use_fast_accum=True`` (Hopper's fp8 MMA accumulates without the periodic
promotion to fp32 registers): 12-27% faster GEMMs at the DiT's shapes (H200: 1,230-1,325 vs
980-1,200 TF/s), and no measurable change of the step's error, which e4m3 rounding dominates.

Why our own and not torchao (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``
does the same math): torchao stores the weight as a tensor subclass, which our ``LoRALinear``
fuse/unfuse (in-place ``weight.copy_``) and the block streamer (``param.data`` swapped between
pinned CPU and device copies, ``record_stream``) would have to special-case; and the GPU machine
runs torch 2.11 without network, where a torchao wheel built for another torch release is an
untested combination. Tried here (torchao 0.18.0 wheel, torch 2.13 CPU): its compiled extensions
(``_C_mxfp8``, ``_C_cutlass_90a``) fail to load against this torch, and ``quantize_`` with
``Float8DynamicActivationFloat8WeightConfig`` refuses any device below sm89 outright, so nothing of
it can be tested off the GPU; nor does it fuse the quantisation into the producers above.

State dict: each converted linear holds ``weight`` float8_e4m3fn ``[N, K]`` and the buffer ``weight_scale``
``[N]`` fp32, so a quantised DiT's state dict is not the official layout (``from_pretrained`` refuses it:
unexpected ``weight_scale`` keys). Saved (``safetensors`` or ``torch.save``), it loads back bit for bit with
``load_state_dict`` into a DiT quantised the same way (``quantize_dit_fp8`` first, no LoRA fused); an
unquantised DiT refuses it (``check_fp8_state_dict``).

Inference only: the quantised activations carry no gradient, so the fp8 layers refuse an input that
requires grad while grad is enabled, or that a ``torch.func`` transform or forward-mode AD differentiates
(a backward or a jvp through them missed every fp8 path, silently), and an ``Fp8Linear`` whose own
``weight``, ``weight_scale`` or ``bias`` requires grad.

``emulate=True`` computes the same quantised values with a dequantised fp32 matmul: CPU tests of
the numerics, and no speed. Without it, quantising refuses devices without fp8 tensor cores. (torch
2.13's CPU build runs ``torch._scaled_mm`` row-wise too, slowly: the tests use it to check the
argument layout of the real call against the emulation.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Dict, List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from longcat_kernels import (
    fp8_layer_norm_quantize,
    fp8_modulate_quantize,
    fp8_quantize_rows,
    fp8_silu_mul_quantize,
)
from longcat_kernels._validate import check_bool, func_differentiated, needs_grad

from .lora import LoRALinear, carries_peft_adapters

E4M3_MAX = 448.0

__all__ = ["Fp8Linear", "Fp8Activation", "quantize_dit_fp8", "fp8_supported", "check_fp8_device", "FP8_TARGETS",
           "E4M3_MAX", "quantize_rows", "fp8_input_kind", "modulate_fp8", "layer_norm_fp8", "silu_mul_fp8",
           "to_fp8_activation", "check_fp8_state_dict", "check_fuse_before_quantising"]

FP8_TARGETS = ("attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
               "ffn.w1", "ffn.w2", "ffn.w3")


def fp8_supported(device) -> bool:
    """True when ``device`` is a CUDA device with fp8 tensor cores (compute capability >= 8.9)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def check_fp8_device(device) -> None:
    """Raises ValueError naming the device when it has no fp8 tensor cores (``fp8_supported``)."""
    device = torch.device(device)
    if not fp8_supported(device):
        cap = torch.cuda.get_device_capability(device) if device.type == "cuda" and torch.cuda.is_available() else None
        what = f"compute capability {cap[0]}.{cap[1]}" if cap else f"device {device}"
        raise ValueError(f"fp8: fp8 GEMMs need a CUDA GPU of compute capability >= 8.9 (Ada, Hopper), got {what}")


def quantize_rows(x: torch.Tensor):
    """``x [M, K]`` -> ``(xq [M, K] e4m3, scale [M, 1] fp32)`` with ``x ~= xq * scale`` per row (the
    reference of ``longcat_kernels``' ``fp8_quantize``: exact on any device; used for the weights)."""
    return fp8_quantize_rows(x, backend="torch")


FAST_ACCUM = True  # see the module docstring


class Fp8Activation(NamedTuple):
    """An activation already quantised for the fp8 GEMMs of ``Fp8Linear``.

    Attributes:
        q: ``[..., K]`` float8_e4m3fn.
        scale: ``[..., 1]`` fp32 (``activation ~= q * scale`` per row).
        x: the activation in the model dtype, or None when no consumer needs it (only unfused
            LoRA adapters do).
    """

    q: torch.Tensor
    scale: torch.Tensor
    x: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def fp8_input_kind(*linears: nn.Module) -> Optional[bool]:
    """None unless every module is an ``Fp8Linear`` (then the caller takes the plain path); else
    whether the activation is also needed in the model dtype (some has unfused LoRA adapters)."""
    need = False
    for m in linears:
        if not isinstance(m, Fp8Linear):
            return None
        need = need or bool(m.lora_active and not m.lora_fused)
    return need


def _check_no_grad(what: str, *ts) -> None:
    """RuntimeError when a gradient would have to flow through fp8 quantisation (metadata only): the
    quantised activation carries none, so a backward through an fp8 DiT (e.g. to its input latents, or
    to parameters before an fp8 linear) missed every path through the fp8 linears, silently (40% wrong
    on the tiny DiT). A ``torch.func`` transform or forward-mode AD over them too: a ``jvp`` of the DiT
    through its text states came back as an all-zero tangent, through its timestep a partial one."""
    if needs_grad(*ts) or func_differentiated(*ts):
        raise RuntimeError(f"{what}: an input requires grad (or is differentiated by torch.func / forward-mode AD), "
                           "but no gradient flows through fp8 quantisation "
                           "(quantize_dit_fp8 is for inference): run under torch.no_grad(), or use the "
                           "unquantised DiT for gradients")


def modulate_fp8(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, want_x: bool, eps: float = 1e-6,
                 ) -> Fp8Activation:
    """adaLN ``modulate`` (``x [B, T, S, C]``, fp32 ``shift/scale [B, T|1, 1, C]``) fused with the
    quantisation; the activation comes back flattened to ``[B, T*S, C]``."""
    _check_no_grad("fp8 modulate", x, shift, scale)
    B, T, S, C = x.shape
    r = fp8_modulate_quantize(x, shift, scale, eps, return_input=want_x)
    return Fp8Activation(r[0].view(B, T * S, C), r[1].view(B, T * S, 1), r[2].view(B, T * S, C) if want_x else None)


def layer_norm_fp8(x: torch.Tensor, norm: nn.Module, want_x: bool) -> Fp8Activation:
    """``norm`` (an affine fp32 LayerNorm with ``weight``, ``bias``, ``eps``) fused with the quantisation."""
    _check_no_grad("fp8 layer_norm", x, norm.weight, norm.bias)
    r = fp8_layer_norm_quantize(x, norm.weight, norm.bias, norm.eps, return_input=want_x)
    return Fp8Activation(r[0], r[1], r[2] if want_x else None)


def silu_mul_fp8(a: torch.Tensor, b: torch.Tensor, want_x: bool) -> Fp8Activation:
    """The SwiGLU gate ``silu(a) * b`` fused with the quantisation."""
    _check_no_grad("fp8 silu_mul", a, b)
    r = fp8_silu_mul_quantize(a, b, return_input=want_x)
    return Fp8Activation(r[0], r[1], r[2] if want_x else None)


def to_fp8_activation(x, want_x: bool) -> Fp8Activation:
    """``x`` as an ``Fp8Activation`` (quantised here unless it already is one)."""
    if isinstance(x, Fp8Activation):
        return x
    _check_no_grad("Fp8Linear", x)
    q, s = fp8_quantize_rows(x)
    return Fp8Activation(q, s, x if want_x else None)


class Fp8Linear(LoRALinear):
    """A ``LoRALinear`` whose ``weight [N, K]`` is e4m3 with ``weight_scale [N]`` fp32 per output channel.

    Built only by ``quantize_dit_fp8`` (which converts ``LoRALinear`` modules in place). ``forward``
    takes ``x [..., K]`` in the model dtype, or an ``Fp8Activation``, and returns ``[..., N]`` in the
    model dtype (``act_dtype``, the weight's dtype before quantisation; a later ``.to(dtype)`` of the
    model sets it and keeps the e4m3 weight and fp32 scales).
    """

    emulate: bool = False
    act_dtype: torch.dtype = torch.bfloat16

    def forward(self, x) -> torch.Tensor:
        own = (self.weight, self.weight_scale, self.bias)
        # a weight set to require grad got an e4m3 gradient in the emulation, and "derivative for
        # aten::_scaled_mm is not implemented" on the GPU (one check of the three per call: the name on failure)
        if needs_grad(*own) or func_differentiated(*own):
            name = next(n for n, t in zip(("weight", "weight_scale", "bias"), own)
                        if needs_grad(t) or func_differentiated(t))
            raise RuntimeError(f"Fp8Linear: {name} requires grad, but fp8 layers are for inference "
                               "(quantize_dit_fp8): run under torch.no_grad(), or train the unquantised DiT")
        lora = bool(self.lora_active and not self.lora_fused)
        act = to_fp8_activation(x, lora)
        K = act.q.shape[-1]
        xq, sx = act.q.reshape(-1, K), act.scale.reshape(-1, 1)
        dt = self.act_dtype
        bias = None if self.bias is None else self.bias.to(dt)
        if self.emulate:
            y = F.linear(xq.float() * sx, self.dequantized_weight()).to(dt)
            if bias is not None:
                y = y + bias
        else:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale[None, :],
                                 bias=bias, out_dtype=dt, use_fast_accum=FAST_ACCUM)
        y = y.view(*act.q.shape[:-1], y.shape[-1])
        if lora:
            if act.x is None:
                raise RuntimeError("Fp8Linear: unfused LoRA adapters need the activation in the model dtype, but the "
                                   "Fp8Activation was made without it (fp8_input_kind decides)")
            for adapter in self.lora_active:
                y = adapter.add_to(act.x, y)
        return y

    def _apply(self, fn, recurse=True):
        # ``.to(dtype)`` / ``.half()`` / ``.float()`` convert every floating tensor, the e4m3 weight and
        # its fp32 scales too (rounded scales, then a dtype error inside the GEMM): they are kept, moved
        # only, and the new dtype becomes the activation dtype, as it is the rest of the model's.
        w, s = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != w.dtype:
            self.act_dtype = self.weight.dtype
            self.weight.data = w.to(self.weight.device)
        if self.weight_scale.dtype != s.dtype:
            self.weight_scale = s.to(self.weight_scale.device)
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """``[N, K]`` fp32 ``Wq * s_w``."""
        return self.weight.float() * self.weight_scale[:, None]

    def _check_fuse(self) -> None:
        if self.lora_active and not self.lora_fused:
            raise ValueError("fuse_lora: the weights are fp8; fuse the LoRA before quantising (quantize_dit_fp8 after fuse_lora)")

    def _check_unfuse(self) -> None:
        if self.lora_fused:
            raise ValueError("unfuse_lora: these fp8 weights were quantised with the LoRA fused in; reload the "
                             "model to change LoRAs")

    def _fuse(self) -> None:
        self._check_fuse()  # nothing to fuse otherwise: the LoRA is fused (before quantising) or inactive

    def _unfuse(self) -> None:
        self._check_unfuse()


def check_fuse_before_quantising(model: nn.Module, what: str) -> None:
    """ValueError naming ``what`` (a request to fuse a LoRA) when ``model`` is fp8-quantised: fp8
    layers refuse ``fuse_lora``, so a caller that enables the LoRA first must ask before that."""
    if any(isinstance(m, Fp8Linear) for m in model.modules()):
        raise ValueError(f"{what}: the DiT's weights are fp8 (quantize_dit_fp8); a LoRA is fused before quantising "
                         "(from_pretrained(..., fuse_lora=True, fp8=True) does so), or runs unfused beside fp8 weights")


def check_fp8_state_dict(model: nn.Module, state_dict) -> None:
    """ValueError unless ``state_dict`` and ``model`` agree on which linears are fp8 (checked by
    ``LongCatDiT.load_state_dict`` before anything is copied: ``Tensor.copy_`` casts across dtypes,
    so an unquantised weight lands in an e4m3 parameter under the old scales, and an e4m3 weight in a
    bf16 one without its scales; strict loading would report the keys only after copying).

    Rule: an ``Fp8Linear`` takes its ``weight`` (float8_e4m3fn) and ``weight_scale`` together or
    neither; any other module takes no ``weight_scale``, and no other key an 8-bit float tensor (an
    e4m3 weight whose ``weight_scale`` keys were dropped loaded into an unquantised model, strict
    included, as the raw e4m3 values without their scales)."""
    if not isinstance(state_dict, Mapping):
        return  # nn.Module.load_state_dict's own TypeError names it
    bad = []
    for path, mod in model.named_modules():
        pre = f"{path}." if path else ""
        w, s = state_dict.get(pre + "weight"), state_dict.get(pre + "weight_scale")
        if isinstance(mod, Fp8Linear):
            if (w is None) != (s is None) or (w is not None and getattr(w, "dtype", None) != torch.float8_e4m3fn):
                got = "no weight" if w is None else f"weight {getattr(w, 'dtype', type(w).__name__)}"
                bad.append(f"{path}: fp8 (quantize_dit_fp8) expects weight float8_e4m3fn with weight_scale, got "
                           f"{got} {'with' if s is not None else 'without'} weight_scale")
        elif s is not None:
            bad.append(f"{path}: not fp8 ({type(mod).__name__}), got an fp8 weight_scale")
    fp8_weights = {(f"{n}." if n else "") + "weight" for n, m in model.named_modules() if isinstance(m, Fp8Linear)}
    for key, t in state_dict.items():
        dt = getattr(t, "dtype", None)
        if isinstance(dt, torch.dtype) and dt.is_floating_point and dt.itemsize == 1 and key not in fp8_weights \
                and key + "_scale" not in state_dict:  # (with its scale: named above)
            bad.append(f"{key}: {dt} outside an fp8 (quantize_dit_fp8) weight with its weight_scale (it would load "
                       "as its raw values, unscaled)")
    if bad:
        raise ValueError(
            "load_state_dict: the state dict and the model disagree on fp8 quantisation (load an unquantised "
            "state dict into an unquantised model and quantise after, or a quantised one into a model quantised "
            f"the same way): {'; '.join(bad[:3])}" + (f"; ... ({len(bad)} modules)" if len(bad) > 3 else "")
        )


@torch.no_grad()
def _convert(mod: LoRALinear, work_device: torch.device) -> None:
    w = mod.weight.data
    home = w.device
    wq, s = quantize_rows(w.to(work_device))
    pin = home.type == "cpu" and w.is_pinned()
    wq = wq.to(home)
    s = s.view(-1).to(home)
    if pin:
        wq, s = wq.pin_memory(), s.pin_memory()
    mod.__class__ = Fp8Linear
    mod.act_dtype = w.dtype
    mod.weight = nn.Parameter(wq, requires_grad=False)
    if mod.bias is not None:
        # frozen with the weight: fp8 linears are inference only, and a bias left requiring grad (every fresh
        # nn.Linear's) made the converted layer refuse a forward outside torch.no_grad()
        mod.bias.requires_grad_(False)
    mod.register_buffer("weight_scale", s)


@torch.no_grad()
def quantize_dit_fp8(dit: nn.Module, *, device=None, emulate: bool = False) -> List[str]:
    """Converts the large linears of ``dit.blocks`` (``FP8_TARGETS``) to ``Fp8Linear`` in place.

    Args:
        dit: a ``LongCatDiT`` (weights anywhere: CPU copies of a streamed model stay on the CPU).
        device: where the model computes (default: its ``device``): checked for fp8 support, and
            where the quantisation arithmetic runs.
        emulate (bool): allow devices without fp8 GEMMs (dequantised fp32 matmul: tests only).

    Returns:
        the converted module paths.

    Raises:
        ValueError: the device has no fp8 tensor cores (and not ``emulate``), or a linear's
            ``in``/``out`` features are not multiples of 16 (``_scaled_mm``'s rule), or the DiT
            carries peft adapters (``longcat_vc.training.add_lora``: train unquantised, quantise after).
    """
    check_bool(emulate, "emulate")  # a truthy "no" would emulate on a device without fp8 GEMMs, silently slow
    if carries_peft_adapters(dit):
        # peft adapters beside the fp8 linears trained on with wrong gradients (none flows through the fp8
        # activations); on them, "blocks.0.ffn.w1 is a Linear, expected LoRALinear"
        raise ValueError("quantize_dit_fp8: dit: expected a DiT without peft adapters, got one that carries peft "
                         "adapters (add_lora); no gradient flows through fp8 weights: save the adapter "
                         "(save_longcat_lora), unload() it, and quantise the DiT for inference after (load_lora)")
    device = torch.device(device) if device is not None else dit.device
    if not emulate:
        check_fp8_device(device)
    done: List[str] = []
    targets: Dict[str, LoRALinear] = {}
    for i, block in enumerate(dit.blocks):
        for name in FP8_TARGETS:
            mod = block.get_submodule(name)
            if isinstance(mod, Fp8Linear):
                continue
            if not isinstance(mod, LoRALinear):
                raise TypeError(f"fp8: blocks.{i}.{name} is a {type(mod).__name__}, expected LoRALinear")
            if mod.in_features % 16 or mod.out_features % 16:
                raise ValueError(
                    f"fp8: blocks.{i}.{name} has in/out features {mod.in_features}/{mod.out_features}; "
                    "fp8 GEMMs need multiples of 16"
                )
            targets[f"blocks.{i}.{name}"] = mod
    work = device if device.type == "cuda" else torch.device("cpu")
    for path, mod in targets.items():
        _convert(mod, work)
        mod.emulate = bool(emulate and not fp8_supported(device))
        done.append(path)
    return done
