"""Hostile inputs of longcat_vc that used to pass silently (second audit, 2026-12-06): NaN weights
decoded to black frames, string booleans in config.json, LoRA files with NaN or alpha 0, adapters
enabled twice, peft settings the LongCat format cannot hold, and arguments ignored without a word."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_vc import cli
from longcat_vc.config import DiTConfig
from longcat_vc.pipeline import VideoContinuationPipeline
from tiny_ckpt import (
    LORA_TARGETS_REFINEMENT,
    model_from_state_dict,
    random_state_dict,
    tiny_config,
    write_fastvideo_lora,
    write_longcat_lora,
)
from vc_components import StandInDiT, build_text_encoder, build_tokenizer, build_vae

SIZE = (32, 48)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {"tok": build_tokenizer(str(d / "tokenizer")), "te": build_text_encoder(), "vae": build_vae()}


def _pipe(parts, dit=None):
    return VideoContinuationPipeline(dit or StandInDiT().eval(), parts["vae"], parts["te"], parts["tok"], {"shift": 12.0})


def _video(n=9):
    return np.random.default_rng(0).integers(0, 256, (n, *SIZE, 3), dtype=np.uint8)


RUN = dict(resolution=SIZE, num_frames=13, num_cond_frames=5, num_inference_steps=2, progress=False)


@pytest.mark.parametrize("output_type", ["np", "latent"])
def test_non_finite_latents_raise_instead_of_black_frames(parts, output_type):
    pipe = _pipe(parts)
    fwd = pipe.dit.forward
    pipe.dit.forward = lambda *a, **k: fwd(*a, **k) * float("nan")  # a NaN weight, in effect
    with pytest.raises(FloatingPointError, match="denoised latents hold NaN/Inf"):
        pipe(_video(), "a cat", guidance_scale=1.0, output_type=output_type, **RUN)


def test_ignored_arguments_raise(parts):
    pipe = _pipe(parts)
    with pytest.raises(ValueError, match=r"^negative_prompt is used only with classifier-free guidance"):
        pipe(_video(), "a cat", "a dog", guidance_scale=1.0, **RUN)
    with pytest.raises(ValueError, match=r"^offload_kv_cache=True needs use_kv_cache=True"):
        pipe(_video(), "a cat", use_kv_cache=False, offload_kv_cache=True, **RUN)
    with pytest.raises(ValueError, match=r"^negative_prompt is used only"):
        pipe.extend(_video(), "a cat", negative_prompt="a dog", guidance_scale=1.0, segments=1, **RUN)


def test_numpy_guidance_is_a_number(parts):
    pipe = _pipe(parts)
    a = pipe(_video(), "a cat", guidance_scale=np.float32(2.0), generator=3, output_type="latent", **RUN)
    b = pipe(_video(), "a cat", guidance_scale=2.0, generator=3, output_type="latent", **RUN)
    assert torch.equal(a.latents, b.latents)
    with pytest.raises(TypeError, match="guidance_scale must be a finite real number"):
        pipe(_video(), "a cat", guidance_scale=np.bool_(True), **RUN)


def test_dit_out_channels_must_match_the_vae(parts):
    dit = StandInDiT().eval()
    dit.config.out_channels = 32
    with pytest.raises(ValueError, match=r"DiT out_channels \(32\) must equal the VAE z_dim"):
        _pipe(parts, dit)


@pytest.mark.parametrize("field,value,exc,msg", [
    ("enable_bsa", "false", TypeError, "enable_bsa: expected a JSON bool"),   # "false" was truthy: BSA on
    ("text_tokens_zero_pad", "false", TypeError, "text_tokens_zero_pad: expected a JSON bool"),
    ("enable_bsa", 0, TypeError, "enable_bsa: expected a JSON bool"),
    ("patch_size", [1, 2.7, 2], ValueError, "patch_size: expected three ints"),  # was truncated to 2
    ("mlp_ratio", "4", ValueError, "mlp_ratio: expected a positive finite number"),
    ("mlp_ratio", float("nan"), ValueError, "mlp_ratio: expected a positive finite number"),
    # bsa_params go through the kernels' own checks at load time, on the settings the DiT will pass
    ("bsa_params", {"sparsity": 1.5}, ValueError, r"bsa_params: sparsity: expected a float in \[0, 1\)"),
    ("bsa_params", {"chunk_3d_shape_q": [0, 4, 4]}, ValueError, "bsa_params: chunk_3d_shape_q: expected 3 positive"),
    ("bsa_params", {"chunk_3d_shape_k": [4, 4.0, 4]}, TypeError, "bsa_params: chunk_3d_shape_k: expected a tuple of 3"),
    ("bsa_params", {"cdf_threshold": "0.9"}, TypeError, r"bsa_params: cdf_threshold: expected a float in \[0, 1\]"),
    ("bsa_params", {"cdf_threshold": float("nan")}, ValueError, r"bsa_params: cdf_threshold: expected a float"),
    # both rules off: was accepted at load and failed at the first BSA forward
    ("bsa_params", {"sparsity": None, "cdf_threshold": None}, ValueError, "bsa_params: sparsity/cdf_threshold: "
     "expected at least one selection rule"),
])
def test_config_field_types(field, value, exc, msg):
    with pytest.raises(exc, match=rf"^DiTConfig.{msg}"):
        tiny_config(**{field: value})
    tiny_config(enable_bsa=False, bsa_params={"sparsity": 0.9, "chunk_3d_shape_q": [4, 4, 4]})  # still fine
    assert DiTConfig(mlp_ratio=3.5, depth=1).mlp_ratio == 3.5


@pytest.fixture(scope="module")
def base():
    cfg = tiny_config()
    return cfg, random_state_dict(cfg, seed=5)


def test_lora_with_non_finite_values_is_refused(tmp_path, base):
    cfg, sd = base
    p = str(tmp_path / "l.safetensors")
    t = write_longcat_lora(p, cfg, targets=LORA_TARGETS_REFINEMENT, rank=2)
    key = next(k for k in t if k.endswith("lora_down.weight"))
    t[key][0, 0] = float("inf")
    save_file(t, p)
    m = model_from_state_dict(cfg, sd)
    module_key = key[len("lora___lorahyphen___"):].replace("___lorahyphen___", ".")  # the message names the module
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN/Inf\) in {module_key}"):
        m.load_lora(p, "x")
    with pytest.raises(TypeError, match="load_lora: path must be a str or os.PathLike, got int"):
        m.load_lora(123, "x")


def test_fastvideo_alpha_zero_is_refused(tmp_path, base):
    cfg, sd = base
    lc, fv = str(tmp_path / "lc.safetensors"), str(tmp_path / "fv.safetensors")
    t = write_longcat_lora(lc, cfg, targets=LORA_TARGETS_REFINEMENT, rank=2)
    write_fastvideo_lora(fv, t)
    ft = load_file(fv)
    for k in ft:
        if k.endswith("lora_alpha"):
            ft[k] = torch.tensor(0.0)
    save_file(ft, fv)
    with pytest.raises(ValueError, match=r"lora_alpha: 0 is ambiguous"):
        model_from_state_dict(cfg, sd).load_lora(fv, "x")


def test_enabling_an_adapter_twice_is_refused(tmp_path, base):
    cfg, sd = base
    p = str(tmp_path / "l.safetensors")
    write_longcat_lora(p, cfg, targets=LORA_TARGETS_REFINEMENT, rank=2)
    m = model_from_state_dict(cfg, sd)
    m.load_lora(p, "a")
    with pytest.raises(ValueError, match=r"enable_loras: name\(s\) \['a'\] given more than once"):
        m.enable_loras(["a", "a"])
    m.enable_loras(["a"])


def test_peft_settings_the_longcat_format_cannot_hold():
    pytest.importorskip("peft")
    import peft

    from longcat_vc import training as tr

    with pytest.raises(ValueError, match=r"^lora_config: modules_to_save="):
        tr.lora_config(rank=4, alpha=8, modules_to_save=["final_layer.linear"])
    for init in ("pissa", "olora"):
        with pytest.raises(ValueError, match=rf"^lora_config: init_lora_weights='{init}' rewrites the base weights"):
            tr.lora_config(rank=4, alpha=8, init_lora_weights=init)
    cfg = tiny_config(attn_backend="torch")
    dit = model_from_state_dict(cfg, random_state_dict(cfg, seed=1))
    raw = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], modules_to_save=["final_layer.linear"])
    with pytest.raises(ValueError, match=r"^add_lora: config: modules_to_save="):
        tr.add_lora(dit, raw)
    tr.lora_config(rank=4, alpha=8, init_lora_weights="gaussian")  # leaves the base alone: fine


@pytest.fixture
def in_video(tmp_path):
    from longcat_vc.video_io import write_video

    p = str(tmp_path / "in.mp4")
    write_video(p, np.zeros((9, 32, 48, 3), np.uint8), fps=15)
    return p


@pytest.mark.parametrize("extra,expect", [
    (["--mode", "distill", "--negative-prompt", "x"], "--negative-prompt needs --guidance > 1"),
    (["--guidance", "1", "--negative-prompt", "x"], "--negative-prompt needs --guidance > 1"),
    (["--no-kv-cache", "--offload-kv-cache"], "--offload-kv-cache needs the KV cache"),
    (["--seed", str(2 ** 70)], "--seed must fit in 64 bits"),
    (["--guidance", "inf"], "--guidance must be >= 1 and finite"),
    (["--device", "cpu", "--attn-backend", "cuda"], "--attn-backend cuda needs a CUDA device"),
])
def test_cli_refuses_ignored_or_unusable_flags_before_loading(tmp_path, capsys, monkeypatch, in_video, extra, expect):
    from longcat_vc import pipeline

    def boom(*a, **k):
        raise AssertionError("weights were loaded before the argument error was found")

    monkeypatch.setattr(pipeline.VideoContinuationPipeline, "from_pretrained", boom)
    monkeypatch.setattr(pipeline, "check_checkpoint", lambda *a, **k: None)
    argv = ["continue", in_video, "--prompt", "a", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o.mp4"),
            "--cond-frames", "5", "--frames", "9"] + extra
    rc = cli.main(argv)
    assert rc == 2 and expect in capsys.readouterr().err


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.bool_])
def test_video_frames_of_another_dtype_are_refused(parts, dtype):
    from longcat_vc.video_io import VideoFrames

    frames = (_video() / 255.0).astype(dtype) if dtype is np.float32 else _video().astype(dtype)
    with pytest.raises(TypeError, match=r"VideoFrames.frames must be uint8 \[F, H, W, 3\], got dtype"):
        _pipe(parts)(VideoFrames(frames, 15.0, None), "a cat", **RUN)


def test_seed_beyond_64_bits_and_bad_sigma_ranges_are_named(parts):
    with pytest.raises(ValueError, match=r"^generator: an int seed must fit in 64 bits"):
        _pipe(parts)(_video(), "a cat", generator=2 ** 64, **RUN)
    pytest.importorskip("peft")
    from longcat_vc.training import sample_sigmas

    for kw, msg in ((dict(shift=float("inf")), "shift must be a positive finite number"),
                    (dict(sigma_min=2.0), r"sigma_min must be a number in \[0, 1\)"),
                    (dict(sigma_min=-1.0), r"sigma_min must be a number in \[0, 1\)")):
        with pytest.raises(ValueError, match=msg):
            sample_sigmas(4, **kw)
    s = sample_sigmas(64, shift=3.0)
    assert bool(((s > 0) & (s <= 1)).all())


@pytest.mark.parametrize("zero_pad", [True, False])
def test_text_mask_values_other_than_one_mean_valid_on_both_paths(zero_pad):
    from test_dit import make_inputs

    cfg = tiny_config(text_tokens_zero_pad=zero_pad, attn_backend="torch")
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=2)).eval()
    x, t, y, mask = make_inputs(cfg, T=2)
    assert bool((mask == 0).any())
    with torch.no_grad():
        ref = m(x, t, y, encoder_attention_mask=mask)
        scaled = m(x, t, y, encoder_attention_mask=mask * 2.5)  # 2.5 scaled y by 2.5 with zero-pad
    assert torch.equal(ref, scaled)


def test_load_lora_on_a_peft_wrapped_dit_says_so(tmp_path, base):
    pytest.importorskip("peft")
    from longcat_vc import training as tr

    cfg, sd = base
    p = str(tmp_path / "l.safetensors")
    write_longcat_lora(p, cfg, targets=LORA_TARGETS_REFINEMENT, rank=2)
    m = tr.add_lora(model_from_state_dict(cfg, sd), tr.lora_config(rank=2, alpha=2))
    with pytest.raises(ValueError, match=r"^load_lora: the model carries peft adapters"):
        m.get_base_model().load_lora(p, "x")


def test_missing_lora_file_is_named_as_a_lora(tmp_path, base):
    cfg, sd = base
    with pytest.raises(FileNotFoundError, match=r"^LoRA file not found: .*nope.safetensors"):
        model_from_state_dict(cfg, sd).load_lora(str(tmp_path / "nope.safetensors"), "x")
