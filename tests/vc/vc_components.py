"""Tiny real components for the VC pipeline tests (no downloads).

* a tiny ``diffusers.AutoencoderKLWan`` (real architecture: 8x spatial, 4x temporal, z_dim 16),
* a tiny ``transformers.UMT5EncoderModel`` and a word-level tokenizer built here with
  ``tokenizers`` (saved as ``tokenizer.json``, loaded back through ``AutoTokenizer``),
* ``StandInDiT``: a small module obeying the LongCatDiT interface of DESIGN.md with the SPEC 4
  cond/noisy attention rule, used to test the pipeline logic independently of the real DiT,
* ``write_full_checkpoint``: the upstream checkpoint layout (dit/, vae/, text_encoder/, tokenizer/,
  scheduler/, lora/) with the real tiny LongCatDiT (``tiny_ckpt``) and a cfg-step LoRA file.
"""

from __future__ import annotations

import json
import os
import types

import torch
import torch.nn as nn
import torch.nn.functional as F

WORDS = (
    "a the an and of on in with to is cat dog person rides motorcycle road water forest hill "
    "camera moves slowly fast red blue green sky car walks runs video scene bright static "
    "overexposed blurred details subtitles style works paintings images overall gray worst "
    "quality low jpeg compression residue ugly incomplete extra fingers poorly drawn hands faces "
    "deformed disfigured misshapen limbs fused still picture messy background three legs many "
    "people walking backwards tones"
).split()

TEXT_DIM = 32


def build_tokenizer(folder: str):
    """Word-level tokenizer over ``WORDS`` (pad 0, eos 1, unk 2) saved to ``folder``; returns the loaded one."""
    from longcat_vc.testing import build_word_tokenizer

    return build_word_tokenizer(folder, WORDS)


def build_text_encoder(seed: int = 0):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    cfg = UMT5Config(
        vocab_size=len(WORDS) + 8,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        pad_token_id=0,
        eos_token_id=1,
    )
    return UMT5EncoderModel(cfg).eval()


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()


# ----------------------------------------------------------------------------- stand-in DiT


class _StandInCache:
    def __init__(self, k, v, num_frames, grid_hw):
        self.k, self.v = k, v
        self.num_frames = num_frames
        self.grid_hw = grid_hw
        self.dtype = k.dtype
        self.device = k.device

    @property
    def nbytes(self):
        return self.k.numel() * self.k.element_size() * 2


class StandInDiT(nn.Module):
    """Interface twin of ``LongCatDiT`` for pipeline tests: per-voxel tokens, one attention
    layer with the SPEC 4 rule (cond queries see cond keys, noisy queries see all), cross-attention
    for noisy tokens only, per-frame timestep embedding; cond tokens at timestep 0 give the cache."""

    def __init__(self, hidden: int = 16, caption_channels: int = TEXT_DIM, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.config = types.SimpleNamespace(
            in_channels=16, out_channels=16, patch_size=(1, 2, 2), caption_channels=caption_channels,
            enable_bsa=False,
        )
        self.inp = nn.Linear(16, hidden)
        self.temb = nn.Linear(1, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.txt = nn.Linear(caption_channels, hidden)
        self.out = nn.Linear(hidden, 16)
        self.lora = nn.Linear(hidden, 16, bias=False)
        self.loras = {}
        self.active = []
        self.bsa_calls = 0
        self.calls = []

    def load_lora(self, path, name, multiplier=1.0):
        from safetensors.torch import load_file

        self.loras[name] = load_file(path)

    def enable_loras(self, names):
        for n in names:
            if n not in self.loras:
                raise KeyError(f"LoRA {n!r} not loaded")
        self.active = list(names)

    def disable_loras(self):
        self.active = []

    def _tokens(self, x, t):
        b, _, T, H, W = x.shape
        tok = x.permute(0, 2, 3, 4, 1).float()  # [B,T,H,W,16]
        tt = t.float().view(b, T, 1, 1, 1) / 1000.0
        h = self.inp(tok) + self.temb(tt.expand(b, T, H, W, 1))
        return h.reshape(b, T * H * W, -1)

    def build_kv_cache(self, cond_latents, *, offload=False):
        b, _, c, H, W = cond_latents.shape
        h = self._tokens(cond_latents, torch.zeros(b, c, device=cond_latents.device))
        _, k, v = self.qkv(h).chunk(3, dim=-1)
        if offload:
            k, v = k.cpu(), v.cpu()
        return _StandInCache(k, v, c, (H, W))

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask=None, *,
                num_cond_latents=0, kv_cache=None):
        x = hidden_states
        b, _, T, H, W = x.shape
        self.calls.append({"T": T, "cache": kv_cache is not None, "bsa": bool(self.config.enable_bsa)})
        if timestep.dim() == 1:
            timestep = timestep[:, None].expand(b, T)
        h = self._tokens(x, timestep)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        hw = H * W
        if kv_cache is not None:
            kc, vc = kv_cache.k.to(h.device), kv_cache.v.to(h.device)
            kc, vc = kc.expand(b, -1, -1), vc.expand(b, -1, -1)
            attn = F.scaled_dot_product_attention(q, torch.cat([kc, k], 1), torch.cat([vc, v], 1))
            n_cond_tok = 0
        else:
            n_cond_tok = num_cond_latents * hw
            S = T * hw
            mask = torch.ones(S, S, dtype=torch.bool, device=h.device)
            mask[:n_cond_tok, n_cond_tok:] = False
            attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        txt = encoder_hidden_states[:, 0].float()
        m = encoder_attention_mask.float() if encoder_attention_mask is not None else torch.ones(txt.shape[:2])
        pooled = (txt * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
        cross = self.txt(pooled)[:, None, :].expand(b, h.shape[1], -1).clone()
        cross[:, :n_cond_tok] = 0
        y = h + attn + cross
        out = self.out(y)
        if self.active:
            out = out + 0.5 * self.lora(y)
        return out.reshape(b, T, H, W, 16).permute(0, 4, 1, 2, 3).float()


# ----------------------------------------------------------------------------- checkpoints


def write_lora_file(path: str) -> None:
    """A placeholder LoRA file for the stand-in (any tensors)."""
    from safetensors.torch import save_file

    save_file({"dummy": torch.zeros(1)}, path)


def write_common(ckpt: str, *, shift: float = 12.0, seed: int = 0):
    """vae/, text_encoder/, tokenizer/, scheduler/ of the upstream layout; returns the modules."""
    os.makedirs(ckpt, exist_ok=True)
    vae = build_vae(seed)
    vae.save_pretrained(os.path.join(ckpt, "vae"))
    te = build_text_encoder(seed)
    te.save_pretrained(os.path.join(ckpt, "text_encoder"))
    tok = build_tokenizer(os.path.join(ckpt, "tokenizer"))
    os.makedirs(os.path.join(ckpt, "scheduler"), exist_ok=True)
    with open(os.path.join(ckpt, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": shift}, f)
    return vae, te, tok


def write_full_checkpoint(root: str, *, seed: int = 0, shift: float = 12.0, shards: int = 2):
    """A complete tiny checkpoint in the upstream layout with the real ``LongCatDiT``
    (``tiny_ckpt``: sharded ``dit/``), the common components and ``lora/cfg_step_lora.safetensors``
    (LongCat format, split up-blocks, cfg-step targets). Returns the DiT config."""
    from tiny_ckpt import LORA_TARGETS_CFG_STEP, tiny_config, write_checkpoint_root, write_longcat_lora

    cfg = tiny_config(caption_channels=TEXT_DIM)
    write_checkpoint_root(root, cfg, layout="upstream", seed=seed, shards=shards)
    write_common(root, shift=shift, seed=seed)
    os.makedirs(os.path.join(root, "lora"), exist_ok=True)
    write_longcat_lora(os.path.join(root, "lora", "cfg_step_lora.safetensors"), cfg,
                       targets=LORA_TARGETS_CFG_STEP, seed=seed + 1)
    return cfg


REFINE_BSA_PARAMS = {"sparsity": 0.5, "cdf_threshold": None, "chunk_3d_shape_q": [4, 4, 4],
                     "chunk_3d_shape_k": [4, 4, 4]}


def write_refinement_lora(root: str, config, *, seed: int = 7) -> str:
    """``root/lora/refinement_lora.safetensors``: a random LongCat-format LoRA with the refinement
    targets (cfg-step targets + adaLN of every block and of the final layer, final linear; split
    up-blocks, alpha_scale 0.5). Returns the path."""
    from tiny_ckpt import LORA_TARGETS_REFINEMENT, write_longcat_lora

    path = os.path.join(root, "lora", "refinement_lora.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_longcat_lora(path, config, targets=LORA_TARGETS_REFINEMENT, seed=seed)
    return path


def refine_checkpoint_in(tmp_path_factory, name: str) -> str:
    """A fresh ``write_refine_checkpoint`` folder for a module-scoped fixture; skips where diffusers
    (the checkpoint's VAE) is missing: CI installs the vc extra, the GPU machine has none."""
    import pytest

    pytest.importorskip("diffusers")
    root = str(tmp_path_factory.mktemp(name))
    write_refine_checkpoint(root)
    return root


# the flags of a cheap ``longcat-vc`` run on the refine checkpoint (tiny sizes, one step, the torch path)
def full_checkpoint_in(tmp_path_factory, name: str) -> str:
    """A fresh ``write_full_checkpoint`` folder for a module-scoped fixture."""
    root = str(tmp_path_factory.mktemp(name))
    write_full_checkpoint(root)
    return root


def tiny_vc_video():
    """9 random frames of 32x48, the same every call (the small pipeline tests' input)."""
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (9, 32, 48, 3), dtype=np.uint8)


def tiny_vc_latents(pipe, **kw):
    """The latents of one small seeded pipeline call on ``tiny_vc_video()`` (13 frames, 5 cond, 2 steps, guidance 1);
    ``kw`` overrides the call's arguments."""
    import torch

    args = dict(resolution=(32, 48), num_frames=13, num_cond_frames=5, guidance_scale=1.0, num_inference_steps=2,
                progress=False, output_type="latent", generator=torch.Generator().manual_seed(11))
    args.update(kw)
    return pipe(tiny_vc_video(), "a person rides a motorcycle", **args).latents


CLI_RUN = ["--device", "cpu", "--dtype", "fp32", "--attn-backend", "torch", "--no-progress", "--frames", "9",
           "--cond-frames", "5", "--steps", "1", "--resolution", "32x64", "--mode", "distill"]


def cli_input_video(tmp_path_factory) -> str:
    """A 16-frame 36x70 random mp4 at 15 fps (fresh every run), the input of the CLI tests."""
    import numpy as np

    from longcat_vc.video_io import write_video

    frames = np.random.default_rng().integers(0, 256, (16, 36, 70, 3), dtype=np.uint8)
    path = str(tmp_path_factory.mktemp("in") / "in.mp4")
    write_video(path, frames, fps=15)
    return path


def cli_fixtures():
    """The module-scoped ``ckpt`` (a refine checkpoint) and ``video`` (an input file) fixtures of the CLI test
    modules: ``ckpt, video = cli_fixtures()`` at module level."""
    import pytest

    @pytest.fixture(scope="module", name="ckpt")
    def _ckpt(tmp_path_factory):
        return refine_checkpoint_in(tmp_path_factory, "ckpt")

    @pytest.fixture(scope="module", name="video")
    def _video(tmp_path_factory):
        return cli_input_video(tmp_path_factory)

    return _ckpt, _video


def cli_seed() -> str:
    """A fresh random ``--seed`` value."""
    import numpy as np

    return str(np.random.default_rng().integers(0, 2**31))


def write_refine_checkpoint(root: str, *, seed: int = 0, shift: float = 12.0):
    """``write_full_checkpoint`` whose DiT config carries ``bsa_params`` (sparsity 0.5 so that the
    tiny grids keep some key blocks; chunks 4x4x4) plus the refinement LoRA. Returns the config."""
    from tiny_ckpt import tiny_config

    cfg = write_full_checkpoint(root, seed=seed, shift=shift)
    path = os.path.join(root, "dit", "config.json")
    with open(path) as f:
        d = json.load(f)
    d["bsa_params"] = dict(REFINE_BSA_PARAMS)
    with open(path, "w") as f:
        json.dump(d, f, indent=2)
    write_refinement_lora(root, cfg, seed=seed + 7)
    return tiny_config(caption_channels=TEXT_DIM, bsa_params=dict(REFINE_BSA_PARAMS))


class NoModel:
    """Stands in for a model part in input-check tests: any use fails, naming what was reached."""

    def __getattr__(self, name):
        raise AssertionError(f"model work before the input checks: {name}")

    def __call__(self, *a, **k):
        raise AssertionError("model work before the input checks: a forward")


def forbid_model_work(pipe, monkeypatch):
    """``pipe`` with its VAE, DiT forward and decoder replaced by ``NoModel`` (restored by monkeypatch)."""
    monkeypatch.setattr(pipe, "vae", NoModel())
    monkeypatch.setattr(pipe.dit, "forward", NoModel())
    monkeypatch.setattr(pipe, "decode_latents", NoModel())
    return pipe


def random_frames(n, h, w, seed=0):
    """``[n, h, w, 3]`` uint8 frames of uniform noise."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------
# helpers shared by the hostile-input test files


def run_cli_without_loading(capsys, argv, monkeypatch):
    """Runs the CLI with model loading made to fail loudly (every argument error must come first):
    ``(exit code, stderr)``."""
    from longcat_vc import cli, pipeline

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the argument error was found")

    monkeypatch.setattr(pipeline.VideoContinuationPipeline, "from_pretrained", boom)
    monkeypatch.setattr(pipeline, "check_checkpoint", lambda *a, **k: None)
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def run_two_ranks(script: str, args_for_rank, root: str, here: str, timeout: float = 240, world: int = 2):
    """Runs ``python script *args_for_rank(r)`` for ranks 0 .. world-1 (default 2) on CPU (gloo workers,
    Triton in the interpreter, no ``WORLD_SIZE`` inherited), each killed if still running after ``timeout``
    s: ``(return codes, logs)``."""
    import subprocess
    import sys

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([root, here] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH")
                                                          else [])))
    env.setdefault("TRITON_INTERPRET", "1")
    env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(script), *args_for_rank(r)], env=env, cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs], logs


def init_gloo_rank(rank: int, world: int, init: str, timeout_s: float) -> None:
    """In a ``run_two_ranks`` worker: one CPU thread, the gloo group through the file ``init``, a short
    collective timeout (a rank left waiting fails fast instead of after the default 30 min)."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))


def error_text(fn) -> str:
    """``fn()``'s error as ``"Type: message"``, or ``"no error"`` (a worker's result, compared by the test)."""
    try:
        fn()
        return "no error"
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"


def finish_rank(res: dict, out: str, rank: int) -> None:
    """The end of a ``run_two_ranks`` worker: wait for the other rank, write ``res`` to
    ``out/rank{rank}.json`` (read back by ``two_rank_results``), leave the group."""
    import json

    import torch.distributed as dist

    dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def two_rank_results(script: str, tmp, extra, root: str, here: str, timeout: float = 240, world: int = 2) -> list:
    """Runs ``script --worker RANK WORLD tmp/init tmp *extra`` as ``world`` (default 2) gloo ranks
    (``run_two_ranks``), checks every one exited 0 (else fails with their logs' tails) and returns their
    ``finish_rank`` results."""
    import json

    codes, logs = run_two_ranks(script, lambda r: ["--worker", str(r), str(world), str(tmp / "init"), str(tmp), *extra],
                                root, here, timeout=timeout, world=world)
    detail = " ".join(map(str, extra)) + "\n" + "\n".join(f"--- rank {r} (rc {c})\n{log[-3000:]}"
                                                           for r, (c, log) in enumerate(zip(codes, logs)))
    assert codes == [0] * world, detail
    return [json.load(open(tmp / f"rank{r}.json")) for r in range(world)]


def released_pipeline_stand_in(mode: str):
    """What the refinement's fit check reads of a pipeline: the released model's config (width and
    depth, no weights), the memory plan of ``mode``, CPU, bf16."""
    from longcat_vc.config import DiTConfig
    from longcat_vc.memory import memory_plan

    class _Dit(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = DiTConfig()

    return types.SimpleNamespace(device=torch.device("cpu"), dit=_Dit(), _memory=memory_plan(mode),
                                 vae_scale_temporal=4, dtype=torch.bfloat16)


def fused_and_unfused_equal(ref, model, lora, x, t, y, mask):
    """What a user does after an interrupted streamed call: load, enable and fuse the LoRA file ``lora`` as "r" on
    both models, run, disable (unfuse), run; the streamed ``model`` must equal ``ref`` bit for bit both times."""
    for m in (ref, model):
        m.load_lora(lora, "r")
        m.enable_loras(["r"])
        m.fuse_lora()
    with torch.no_grad():
        fused_r, fused_s = ref(x, t, y, mask), model(x, t, y, mask)
    for m in (ref, model):
        m.disable_loras()
    with torch.no_grad():
        base_r, base_s = ref(x, t, y, mask), model(x, t, y, mask)
    assert torch.isfinite(fused_s).all() and torch.isfinite(base_s).all()
    assert not torch.allclose(fused_r, base_r, atol=1e-4)
    assert torch.equal(fused_r, fused_s), f"fused: max |diff| {(fused_r - fused_s).abs().max().item()}"
    assert torch.equal(base_r, base_s), f"unfused: max |diff| {(base_r - base_s).abs().max().item()}"
