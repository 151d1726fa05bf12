"""The DiT under benchmark: embedded default configs, random weights, inputs, FLOPs."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from bench import flops as _flops
from bench.shapes import GRIDS, Grid


@dataclass(frozen=True)
class DiTBenchConfig:
    """What the cache/pipeline suites run: model config, latent grid, batch, text length."""

    dit: object  # longcat_vc.DiTConfig
    grid: Grid
    batch: int
    text_len: int
    name: str

    def describe(self) -> str:
        c = self.dit
        return (f"{self.name}: DiT hidden {c.hidden_size}, heads {c.num_heads} (head_dim {c.head_dim}), "
                f"depth {c.depth}, grid {self.grid} ({self.grid.tokens} tokens), B{self.batch}, "
                f"text {self.text_len} tokens, attn_backend {c.attn_backend!r}")


def default_configs(ctx, *, batch: int = 2) -> list[DiTBenchConfig]:
    """One config per ``--shapes`` grid (``ctx.grids``), else the one of ``default_config``."""
    bc = _base_config(ctx, batch)
    return [dataclasses.replace(bc, grid=g) for g in ctx.grids] if ctx.grids else [bc]


def default_config(ctx, *, batch: int = 2) -> DiTBenchConfig:
    """The config of a single-grid caller (``ctx.grids`` None or one grid); see ``default_configs``."""
    if ctx.grids and len(ctx.grids) > 1:
        raise ValueError(f"default_config: one grid expected, got {len(ctx.grids)} "
                         f"({', '.join(map(str, ctx.grids))}); use default_configs")
    return default_configs(ctx, batch=batch)[0]


def _base_config(ctx, batch: int) -> DiTBenchConfig:
    """GPU: real width (hidden 4096, 32 heads), 480p 93 frames, depth 8; CPU: a small DiT; quick: tiny."""
    from longcat_vc import DiTConfig

    backend = (ctx.backends or ["auto"])[0]
    if ctx.quick:
        cfg = DiTConfig.tiny(depth=ctx.depth or 1, attn_backend=backend, text_tokens_zero_pad=True)
        grid, text_len, name = GRIDS["tiny"], 8, "quick"
    elif ctx.is_cuda:
        cfg = DiTConfig.longcat_video(depth=ctx.depth or 8, attn_backend=backend)
        grid, text_len, name = GRIDS["480p"], 512, "gpu-default"
    else:
        cfg = DiTConfig.tiny(hidden_size=128, num_heads=2, caption_channels=128, adaln_tembed_dim=64,
                             frequency_embedding_size=256, depth=ctx.depth or 2, attn_backend=backend,
                             text_tokens_zero_pad=True)
        grid, text_len, name = GRIDS["cpu"], 32, "cpu-default"
    return DiTBenchConfig(dit=cfg, grid=grid, batch=batch, text_len=text_len, name=name)


@torch.no_grad()
def init_random_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights with unit-scale activations: W ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2),
    1-D scales ~ 1 + N(0, 0.1^2). Nothing zero-initialised, so no branch is trivially zero."""
    for name, p in model.named_parameters():
        buf = torch.empty(p.shape, device=p.device, dtype=torch.float32)
        if p.dim() >= 2:
            fan_in = p[0].numel()
            buf.normal_(0.0, fan_in ** -0.5, generator=generator)
        elif name.endswith("bias"):
            buf.normal_(0.0, 0.02, generator=generator)
        else:
            buf.normal_(1.0, 0.1, generator=generator)
        p.copy_(buf)


def build_model(ctx, bc: DiTBenchConfig):
    """The DiT on ctx.device in ctx.dtype with random weights, shared across the cases of a suite."""
    key = ("dit", repr(bc.dit), str(ctx.device), str(ctx.dtype))
    model = ctx.shared.get(key)
    if model is None:
        for k in [k for k in ctx.shared if isinstance(k, tuple) and k[0] == "dit"]:
            del ctx.shared[k]  # one model at a time
        if ctx.is_cuda:
            torch.cuda.empty_cache()
        from longcat_vc import LongCatDiT

        model = LongCatDiT(bc.dit, device=ctx.device, dtype=ctx.dtype)
        init_random_(model, ctx.generator(1234))
        model = model.eval().requires_grad_(False)
        ctx.shared[key] = model
    return model


def make_inputs(ctx, bc: DiTBenchConfig, num_cond: int, n_sets: int, offset: int = 0) -> list[dict]:
    """Random VC inputs: full latents (cond frames shared by the CFG batch), timesteps, text."""
    from longcat_kernels.testing import make_tensor

    gen = ctx.generator(100 + offset)
    dev, dt = ctx.device, ctx.dtype
    T, H, W = bc.grid.shape
    B, C = bc.batch, bc.dit.in_channels
    ph, pw = bc.dit.patch_size[1], bc.dit.patch_size[2]
    sets = []
    for _ in range(n_sets):
        cond = make_tensor((1, C, num_cond, H * ph, W * pw), dt, dev, generator=gen)
        noisy = make_tensor((B, C, T - num_cond, H * ph, W * pw), dt, dev, generator=gen)
        latents = torch.cat([cond.expand(B, -1, -1, -1, -1), noisy], dim=2)
        t = torch.rand(B, 1, device=dev, generator=gen) * 800 + 100
        t_full = t.expand(B, T).clone()
        t_full[:, :num_cond] = 0  # cond frames are clean (timestep 0), as the cache assumes
        text = make_tensor((B, 1, bc.text_len, bc.dit.caption_channels), dt, dev, generator=gen)
        mask = torch.ones(B, bc.text_len, device=dev, dtype=torch.long)
        sets.append(dict(cond=cond, noisy=noisy, latents=latents, t_full=t_full,
                         t_noisy=t_full[:, num_cond:].contiguous(), text=text, mask=mask))
    return sets


def forward_off(model, s: dict, num_cond: int):
    return model(s["latents"], s["t_full"], s["text"], s["mask"], num_cond_latents=num_cond)


def forward_on(model, s: dict, cache):
    return model(s["noisy"], s["t_noisy"], s["text"], s["mask"], kv_cache=cache)


def step_flops(bc: DiTBenchConfig, num_cond: int, cache: bool) -> float:
    """FLOPs of one DiT forward of this config (cache off: all T frames; on: the noisy ones)."""
    return _flops.dit_step_flops(bc.dit, bc.grid.shape, batch=bc.batch, num_cond_latents=num_cond,
                                 kv_cache=cache, text_len=bc.text_len)


def build_flops(bc: DiTBenchConfig, num_cond: int) -> float:
    """FLOPs of the cache build: one forward over the cond frames, batch 1, no cross-attention."""
    return _flops.kv_cache_build_flops(bc.dit, bc.grid.shape, num_cond_latents=num_cond)


def depth_scaled_bound(base: float, dtype: torch.dtype, depth: int) -> float:
    """A cache on/off parity bound set at depth <= 8, at ``depth``: in half precision the two paths round
    differently in every layer and their difference grows like a random walk, sqrt(depth / 8) above
    depth 8 (bf16, random weights, 480p: 6.2e-3 at depth 8, 1.3e-2 at 48); fp32 stays exact."""
    return base if dtype == torch.float32 else base * math.sqrt(max(depth, 8) / 8)


def mem_mb(nbytes: float) -> float:
    """``nbytes`` in MiB (2**20 bytes; the JSON fields ``cache_mb``/``build_peak_mb`` keep their names, the
    tables say MiB: 4,680 MiB is the 4.9 GB of SPEC 10)."""
    return nbytes / 2**20 if nbytes is not None and math.isfinite(nbytes) else float("nan")
