"""FP8 weights for the DiT blocks (opt-in, ``--fp8``): e4m3 weights with one fp32 scale per output
channel, activations quantised per token at run time, ``torch._scaled_mm`` row-wise GEMMs (fp8
tensor cores, Hopper / Ada, sm89+).

Math of one linear ``y = x W^T + b`` (``x [M, K]``, ``W [N, K]``)::

    s_w[n] = max_k |W[n, k]| / 448        Wq = e4m3(W / s_w[:, None])       (once, at quantise)
    s_x[m] = max_k |x[m, k]| / 448        xq = e4m3(x / s_x[:, None])       (every call)
    y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] Wq[n, k] + b[n]               (fp32 accumulate)

Which linears: the seven large ones of every block (``attn.qkv``, ``attn.proj``, ``cross_attn.
q_linear/kv_linear/proj``, ``ffn.w1/w2/w3``), whose inputs are bf16 activations. The adaLN linears
(fp32 timestep input, SPEC 6 fp32 island), the embedders and the final layer stay in the model dtype.
Unfused LoRA adapters still run in the model dtype beside the fp8 GEMM; a fused LoRA must be
fused before quantising (the fused weights are what gets quantised) and cannot be unfused after.

Why our own and not torchao (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``
does the same math): torchao stores the weight as a tensor subclass, which our ``LoRALinear``
fuse/unfuse (in-place ``weight.copy_``) and the block streamer (``param.data`` swapped between
pinned CPU and device copies, ``record_stream``) would have to special-case; and the GPU machine
runs torch 2.11 without network, where a torchao wheel built for another torch release is an
untested combination. Tried here (torchao 0.18.0 wheel, torch 2.13 CPU): its compiled extensions
(``_C_mxfp8``, ``_C_cutlass_90a``) fail to load against this torch, and ``quantize_`` with
``Float8DynamicActivationFloat8WeightConfig`` refuses any device below sm89 outright, so nothing of
it can be tested off the GPU. The whole GEMM path is one ``torch._scaled_mm`` call plus the per-token
quantisation (``torch.compile``d into one kernel on CUDA), so a small class carries it.

``emulate=True`` computes the same quantised values with a dequantised fp32 matmul: CPU tests of
the numerics, and no speed. Without it, quantising refuses devices without fp8 tensor cores. (torch
2.13's CPU build runs ``torch._scaled_mm`` row-wise too, slowly: the tests use it to check the
argument layout of the real call against the emulation.)
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import LoRALinear

__all__ = ["Fp8Linear", "quantize_dit_fp8", "fp8_supported", "check_fp8_device", "FP8_TARGETS", "E4M3_MAX",
           "quantize_rows"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
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
    """``x [M, K]`` -> ``(xq [M, K] e4m3, scale [M, 1] fp32)`` with ``x ~= xq * scale`` per row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = amax.clamp(min=1e-12) / E4M3_MAX
    xq = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return xq, scale


_compiled_quantize = None


def _quantize_act(x: torch.Tensor):
    global _compiled_quantize
    if x.is_cuda:
        # One fused kernel instead of four passes over the activations (abs-max, divide, clamp, cast).
        if _compiled_quantize is None:
            _compiled_quantize = torch.compile(quantize_rows, dynamic=True)
        return _compiled_quantize(x)
    return quantize_rows(x)


class Fp8Linear(LoRALinear):
    """A ``LoRALinear`` whose ``weight [N, K]`` is e4m3 with ``weight_scale [N]`` fp32 per output channel.

    Built only by ``quantize_dit_fp8`` (which converts ``LoRALinear`` modules in place). ``forward``
    takes ``x [..., K]`` in bf16/fp16 and returns ``[..., N]`` in ``x.dtype``.
    """

    emulate: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        x2 = x.reshape(-1, K)
        xq, sx = _quantize_act(x2)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.emulate:
            w = self.weight.float() * self.weight_scale[:, None]
            y = F.linear(xq.float() * sx, w).to(x.dtype)
            if bias is not None:
                y = y + bias
        else:
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.weight_scale[None, :],
                                 bias=bias, out_dtype=x.dtype)
        y = y.view(*x.shape[:-1], y.shape[-1])
        if self.lora_active and not self.lora_fused:
            for adapter in self.lora_active:
                y = adapter.add_to(x, y)
        return y

    def dequantized_weight(self) -> torch.Tensor:
        """``[N, K]`` fp32 ``Wq * s_w``."""
        return self.weight.float() * self.weight_scale[:, None]

    def _fuse(self) -> None:
        if self.lora_active and not self.lora_fused:
            raise ValueError("fuse_lora: the weights are fp8; fuse the LoRA before quantising (quantize_dit_fp8 after fuse_lora)")

    def _unfuse(self) -> None:
        if self.lora_fused:
            raise ValueError("unfuse_lora: these fp8 weights were quantised with the LoRA fused in; reload the "
                             "model to change LoRAs")


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
    mod.weight = nn.Parameter(wq, requires_grad=False)
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
            ``in``/``out`` features are not multiples of 16 (``_scaled_mm``'s rule).
    """
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
