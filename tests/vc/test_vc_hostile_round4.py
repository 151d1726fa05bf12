"""Hostile inputs of longcat_vc that used to pass silently or crash without naming the culprit (fourth
audit, 2026-12-06), one section per finding:

A. ``refine(use_kv_cache=False, offload_kv_cache=True)`` (and ``longcat-vc refine --no-kv-cache
   --offload-kv-cache``) silently ignored the offload, which ``__call__`` / ``extend`` refuse.
B. ``longcat-vc refine --seed`` beyond 64 bits: torch's overflow after the weights had loaded.
C. ``refine`` of a stage-1 output whose latents are not ``[1, z_dim, T, h, w]`` finite floats: a
   RuntimeError inside the VAE (channels), the second clip dropped silently (batch 2), NaN decoded to
   black frames and refined.
D. ``VideoFrames`` with a negative, zero, NaN or infinite fps was taken as "unknown" (no subsampling,
   silently), a string fps failed inside numpy; ``--input-fps inf`` did the same.
E. A FastVideo LoRA file naming one tensor twice (``x.lora_A`` and ``diffusion_model.x.lora_A`` or
   ``x.lora_A.weight``, which FastVideo reads as the same name): the later key won silently.
F. Distill mode with more than 50 steps: refused by the schedule only after the video was read (the
   CLI: after the weights had loaded), naming ``vc_timesteps: num_steps``.
G. A video whose frame size changes midway (concatenated MPEG-TS segments): numpy's "all input
   arrays must have the same shape", naming no file.
H. A VAE config whose ``latents_mean`` / ``latents_std`` do not hold z_dim finite numbers (std > 0):
   a bare ``view`` error after every component had loaded, or (std 0) Inf latents reported at the
   end as "a non-finite weight"; ``max_sequence_length=1.5`` became a 1-token prompt silently.
I. A LoRA loaded after ``quantize_dit_fp8`` (the refinement LoRA of an ``fp8=True`` pipeline is
   loaded on the first ``refine``) was cast to the e4m3 weight dtype without a scale: its small
   values flushed to zero and the refinement ran with a degraded adapter, silently.
J. An fp32 LoRA value beyond fp16's range loaded into an fp16 model became Inf silently (NaN outputs,
   reported only after the whole run); the DiT loader refuses the same for weights.
K. ``write_video`` to a folder: the error came after the encode, from the rename, naming the temporary
   file; with a trailing separator the temporary file was written beside the folder.
L. ``dtype=torch.float8_e4m3fn`` (for ``fp8=True``): "couldn't find storage object Float8_e4m3fnStorage"
   from the text encoder's loader, or ``"sum_cpu" not implemented for 'Float8_e5m2'`` from the DiT's.
M. An image (or a folder of image frames) with an EXIF orientation tag, as phone photos carry, was read
   unrotated: a sideways clip, silently (the display rotation of video files is applied).
N. ``LongCatDiT.from_pretrained(device=...)``: "meta" gave a CheckpointError blaming the checkpoint
   ("parameters left uninitialised"), "cuda" without CUDA torch's AssertionError at the first tensor,
   "gpu" torch's RuntimeError; the pipeline's device checks now serve both.
O. An animated PNG or WebP was read as a one-frame video (its first frame): with ``num_cond_frames=1``
   the clip's first frame silently conditioned the continuation instead of its last.
P. ``refine`` on a context-parallel pipeline did not broadcast rank 0's latents (``__call__`` does): with
   ``generator=None`` and ranks whose global RNGs differ, each rank denoised its own noise and the
   sharded attention mixed them (rel. L2 0.31 / 1.10 from the single-process refine on 2 ranks).
Q. ``refine`` on a pipeline built by hand (no ``from_pretrained``): "refinement LoRA file not found:
   None", naming neither the missing piece nor how to give it.
R. ``LongCatDiT.from_pretrained(strict=None)`` (or 0, "") ignored unexpected checkpoint keys silently,
   as ``strict=False`` does; every other switch takes bools only.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

from longcat_vc import cli
from longcat_vc.pipeline import VideoContinuationPipeline
from longcat_vc.video_io import write_video
from vc_components import forbid_model_work, random_frames

REFINE_SIZE = (64, 64)




@pytest.fixture
def no_model(refine_pipe, monkeypatch):
    return forbid_model_work(refine_pipe, monkeypatch)


_frames = random_frames


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("s1") / "s1.mp4")
    write_video(path, _frames(9, 32, 64), fps=15)
    return path


def _cli(argv, capsys):
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


# ------------------------------------------------------------------ A: the refine's offload without the cache
def test_refine_offload_without_cache_is_refused(no_model):
    with pytest.raises(ValueError, match=r"^offload_kv_cache=True needs use_kv_cache=True"):
        no_model.refine(_frames(5, 36, 64), "a cat", video=_frames(12, 40, 72), num_cond_frames=5,
                        resolution=REFINE_SIZE, num_inference_steps=2, use_kv_cache=False, offload_kv_cache=True,
                        progress=False)


def test_cli_refine_offload_without_cache_exits_2_before_load(stage1_file, tmp_path, capsys):
    # a checkpoint folder that does not exist: reaching the load would exit 1, not 2
    rc, err = _cli(["refine", stage1_file, "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o.mp4"),
                    "--device", "cpu", "--no-kv-cache", "--offload-kv-cache"], capsys)
    assert rc == 2 and "--offload-kv-cache needs the KV cache" in err, err


# ------------------------------------------------------------------ B: the refine command's seed range
@pytest.mark.parametrize("seed", [str(2 ** 64), str(-2 ** 63 - 1)])
def test_cli_refine_seed_beyond_64_bits_exits_2_before_load(stage1_file, tmp_path, capsys, seed):
    rc, err = _cli(["refine", stage1_file, "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o.mp4"),
                    "--device", "cpu", "--seed", seed], capsys)
    assert rc == 2 and "--seed must fit in 64 bits" in err, err


# ------------------------------------------------------------------ C: a stage-1 output's latents
@pytest.mark.parametrize("latents, match", [
    (torch.zeros(1, 8, 2, 4, 8), r"\[1, 16, T, h, w\].*\[1, 8, 2, 4, 8\]"),  # was a RuntimeError in the VAE
    (torch.zeros(2, 16, 2, 4, 8), r"\[1, 16, T, h, w\].*\[2, 16, 2, 4, 8\]"),  # the second clip was dropped
    (torch.zeros(1, 16, 2, 4, 8, dtype=torch.int64), "floating"),
    (torch.full((1, 16, 2, 4, 8), float("nan")), "NaN"),  # decoded to black frames, then refined
])
def test_stage1_latents_checked_before_decode(no_model, latents, match):
    from longcat_vc.pipeline import VideoContinuationOutput

    st1 = VideoContinuationOutput(None, latents, 15.0, 12, 4, (32, 64), {})
    with pytest.raises(ValueError, match="stage1.latents.*" + match):
        no_model.refine(st1, video=None, resolution=REFINE_SIZE, num_inference_steps=2, progress=False)


# ------------------------------------------------------------------ D: VideoFrames.fps and --input-fps
BAD_FPS = [-30.0, 0.0, float("nan"), float("inf"), "30", True]


@pytest.mark.parametrize("fps", BAD_FPS)
def test_video_frames_with_a_bad_fps_are_refused(no_model, fps):
    from longcat_vc.video_io import VideoFrames

    with pytest.raises(ValueError, match=r"VideoFrames.fps must be None \(unknown\) or a positive finite number"):
        no_model(VideoFrames(_frames(12, 32, 64), fps), "a cat", resolution=(32, 64), num_frames=9,
                 num_cond_frames=5, num_inference_steps=1, guidance_scale=1.0, progress=False)
    with pytest.raises(ValueError, match=r"VideoFrames.fps must be None"):  # the refine's cond video too
        no_model.refine(_frames(5, 36, 64), video=VideoFrames(_frames(12, 40, 72), fps), num_cond_frames=5,
                        resolution=REFINE_SIZE, progress=False)


def test_video_frames_with_a_good_fps_still_subsample():
    from longcat_vc.video_io import VideoFrames, as_video_frames

    assert as_video_frames(VideoFrames(_frames(2, 4, 4), np.float32(30.0))).fps == 30.0
    assert as_video_frames(VideoFrames(_frames(2, 4, 4), None)).fps is None


@pytest.mark.parametrize("fps", ["inf", "1e999"])
def test_cli_input_fps_must_be_finite(stage1_file, tmp_path, capsys, fps):
    rc, err = _cli(["continue", stage1_file, "--prompt", "a cat", "--checkpoint", str(tmp_path / "none"),
                    "--out", str(tmp_path / "o.mp4"), "--device", "cpu", "--input-fps", fps], capsys)
    assert rc == 2 and "--input-fps must be a positive finite number" in err, err


# ------------------------------------------------------------------ E: FastVideo LoRA keys naming one tensor twice
@pytest.mark.parametrize("spelling", ["diffusion_model.{}", "transformer.{}", "{}.weight"])
def test_fastvideo_lora_naming_a_tensor_twice_is_refused(tmp_path, spelling):
    from safetensors.torch import save_file
    from tiny_ckpt import fastvideo_lora_tensors, model_from_state_dict, random_state_dict, tiny_config, \
        write_longcat_lora

    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg))
    fv = fastvideo_lora_tensors(write_longcat_lora(str(tmp_path / "lc.safetensors"), cfg))
    fv = {k: v.clone().contiguous() for k, v in fv.items()}
    fv[spelling.format("blocks.0.ffn.w1.lora_A")] = fv["blocks.0.ffn.w1.lora_A"] * 3
    path = str(tmp_path / "fv.safetensors")
    save_file(fv, path)
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.w1: .*lora_A.* name the same tensor"):
        model.load_lora(path, "x")


# ------------------------------------------------------------------ F: distill steps beyond its 50-point grid
def test_distill_steps_beyond_the_grid_named_before_the_video_is_read(refine_pipe, tmp_path):
    p = refine_pipe
    distill = VideoContinuationPipeline(p.dit, p.vae, p.text_encoder, p.tokenizer, {"shift": 12.0}, mode="distill")
    missing = str(tmp_path / "not_there.mp4")  # reading it would raise FileNotFoundError first
    with pytest.raises(ValueError, match=r"^num_inference_steps: distill mode supports at most 50 steps.*got 51"):
        distill(missing, "a cat", num_inference_steps=51, progress=False)
    with pytest.raises(ValueError, match=r"^num_inference_steps: distill mode supports at most 50"):
        distill.extend(missing, "a cat", num_inference_steps=51, progress=False)


def test_cli_distill_steps_beyond_the_grid_exit_2_before_load(stage1_file, tmp_path, capsys):
    rc, err = _cli(["continue", stage1_file, "--prompt", "a cat", "--checkpoint", str(tmp_path / "none"),
                    "--out", str(tmp_path / "o.mp4"), "--device", "cpu", "--mode", "distill", "--steps", "51"], capsys)
    assert rc == 2 and "--steps: distill mode supports at most 50 steps" in err, err


# ------------------------------------------------------------------ G: a video whose frame size changes midway
def test_video_with_a_size_change_midway_is_named(tmp_path):
    av = pytest.importorskip("av")
    from longcat_vc.video_io import VideoReadError, read_video

    def segment(h, w, path):
        with av.open(path, "w", format="mpegts") as c:
            s = c.add_stream("libx264", rate=15)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for fr in _frames(4, h, w):
                for p in s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        with open(path, "rb") as f:
            return f.read()

    path = str(tmp_path / "ab.ts")  # MPEG-TS segments concatenate byte-wise into one stream
    with open(path, "wb") as f:
        f.write(segment(32, 48, str(tmp_path / "a.ts")) + segment(48, 64, str(tmp_path / "b.ts")))
    with pytest.raises(VideoReadError, match=r"ab\.ts: the frame size changes within the video: .* 48x32, .* 64x48"):
        read_video(path)


# ------------------------------------------------------------------ H: the pipeline's constructor arguments
def _stand_in_parts(tmp_path):
    from vc_components import StandInDiT, build_text_encoder, build_tokenizer, build_vae

    return StandInDiT().eval(), build_vae(), build_text_encoder(), build_tokenizer(str(tmp_path / "tok"))


@pytest.mark.parametrize("name, values, match", [
    ("latents_mean", [0.0] * 15, "latents_mean: expected 16 .z_dim. finite numbers"),
    ("latents_std", [1.0] * 15 + [0.0], "latents_std: expected 16 .z_dim. finite positive numbers"),
    ("latents_std", [1.0] * 15 + [float("nan")], "latents_std: expected 16"),
    ("latents_mean", None, "latents_mean: expected 16"),
])
def test_vae_latent_stats_checked_at_construction(tmp_path, name, values, match):
    dit, vae, te, tok = _stand_in_parts(tmp_path)
    vae.register_to_config(**{name: values})
    with pytest.raises(ValueError, match="VAE config " + match):
        VideoContinuationPipeline(dit, vae, te, tok, {"shift": 12.0})


@pytest.mark.parametrize("value, exc", [(1.5, TypeError), (0, ValueError), (None, TypeError), ("512", TypeError)])
def test_max_sequence_length_is_a_positive_int(tmp_path, value, exc):
    dit, vae, te, tok = _stand_in_parts(tmp_path)
    with pytest.raises(exc, match="max_sequence_length"):
        VideoContinuationPipeline(dit, vae, te, tok, {"shift": 12.0}, max_sequence_length=value)


# ------------------------------------------------------------------ I: a LoRA loaded into fp8 weights
def test_lora_loaded_after_fp8_quantisation_keeps_the_compute_dtype(tmp_path):
    from longcat_vc.fp8 import quantize_dit_fp8
    from test_fp8 import make_inputs
    from tiny_ckpt import LORA_TARGETS_REFINEMENT, model_from_state_dict, random_state_dict, tiny_config, \
        write_longcat_lora

    cfg = tiny_config()
    sd = random_state_dict(cfg, seed=3)
    path = str(tmp_path / "l.safetensors")
    write_longcat_lora(path, cfg, targets=LORA_TARGETS_REFINEMENT, seed=5)
    before = model_from_state_dict(cfg, sd)  # loaded, then quantised: the adapters stay fp32
    before.load_lora(path, "r")
    before.enable_loras(["r"])
    quantize_dit_fp8(before, emulate=True)
    after = model_from_state_dict(cfg, sd)  # quantised, then loaded: as refine() does with fp8=True
    quantize_dit_fp8(after, emulate=True)
    after.load_lora(path, "r")
    after.enable_loras(["r"])
    qkv = after.blocks[0].attn.qkv
    assert qkv.weight.dtype == torch.float8_e4m3fn
    assert qkv.lora_adapters["r"].down.dtype == torch.float32 and qkv.lora_adapters["r"].parts[0].up.dtype == torch.float32
    x, t, y, mask = make_inputs(cfg, B=2, T=3)
    with torch.no_grad():
        torch.testing.assert_close(after(x, t, y, mask), before(x, t, y, mask), rtol=0, atol=0)


# ------------------------------------------------------------------ J: LoRA values overflowing the model dtype
def test_lora_overflowing_the_model_dtype_is_refused_and_changes_nothing(tmp_path):
    from safetensors.torch import save_file
    from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora
    from longcat_vc.lora import longcat_lora_key

    cfg = tiny_config()
    model = model_from_state_dict(cfg, random_state_dict(cfg), dtype=torch.float16)
    good = str(tmp_path / "good.safetensors")
    lc = write_longcat_lora(good, cfg)
    model.load_lora(good, "r")
    big = {k: v.clone().contiguous() for k, v in lc.items()}
    key = longcat_lora_key("blocks.1.ffn.w2", "lora_down.weight")
    big[key][0, 0] = 1e6  # finite in fp32, Inf in fp16
    bad = str(tmp_path / "big.safetensors")
    save_file(big, bad)
    with pytest.raises(ValueError, match=r"overflow the model dtype .* blocks\.1\.ffn\.w2 \(torch\.float16\)"):
        model.load_lora(bad, "r")
    # the adapters loaded before are untouched
    assert torch.isfinite(model.blocks[1].ffn.w2.lora_adapters["r"].down).all()
    model32 = model_from_state_dict(cfg, random_state_dict(cfg))  # fp32 holds it
    model32.load_lora(bad, "r")


# ------------------------------------------------------------------ K: write_video to a folder
@pytest.mark.parametrize("trailing", [False, True])
def test_write_video_to_a_folder_is_refused_before_encoding(tmp_path, monkeypatch, trailing):
    from longcat_vc import video_io

    folder = tmp_path / "out.mp4"
    folder.mkdir()
    monkeypatch.setattr(video_io, "_write_av", lambda *a, **k: pytest.fail("encoded before the path check"))
    monkeypatch.setattr(video_io, "_write_imageio_ffmpeg", lambda *a, **k: pytest.fail("encoded before the path check"))
    path = str(folder) + (os.sep if trailing else "")
    with pytest.raises(IsADirectoryError, match=r"write_video: path must be a file, got the folder .*out\.mp4"):
        video_io.write_video(path, _frames(3, 16, 16), 15)
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"] and os.listdir(folder) == []


# ------------------------------------------------------------------ L: an 8-bit float as the load dtype
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_load_dtype_is_refused_with_the_fp8_switch_named(refine_ckpt, dtype):
    from longcat_vc import LongCatDiT

    with pytest.raises(ValueError, match=r"^dtype: expected a floating torch.dtype of 16 bits.*fp8=True"):
        VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=dtype, device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"^dtype: expected a floating torch.dtype of 16 bits"):
        LongCatDiT.from_pretrained(os.path.join(refine_ckpt, "dit"), dtype=dtype, progress=False)


# ------------------------------------------------------------------ M: EXIF orientation of image inputs
@pytest.mark.parametrize("as_folder", [False, True])
def test_exif_orientation_of_images_is_applied(tmp_path, as_folder):
    from PIL import Image

    from longcat_vc.video_io import read_video

    pixels = np.zeros((20, 40, 3), np.uint8)  # stored 40 wide, 20 high; a red left column
    pixels[:, :4] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(2 if as_folder else 1):
        Image.fromarray(pixels).save(str(folder / f"f{i}.png"), exif=exif)
    frames = read_video(str(folder) if as_folder else str(folder / "f0.png")).frames
    expected = np.rot90(pixels, -1)  # clockwise: the left column becomes the top row
    assert frames.shape[1:] == (40, 20, 3)
    np.testing.assert_array_equal(frames[0], expected)
    plain = tmp_path / "plain.png"  # no tag: as stored
    Image.fromarray(pixels).save(str(plain))
    np.testing.assert_array_equal(read_video(str(plain)).frames[0], pixels)


# ------------------------------------------------------------------ N: the DiT loader's device
@pytest.mark.parametrize("device, exc, match", [
    ("meta", ValueError, r"^device: expected a device that holds data, got meta"),
    ("gpu", ValueError, r"^device: expected a device such as 'cpu', 'cuda' or 'cuda:0', got 'gpu'"),
    (0.5, TypeError, r"^device: expected a str or torch.device"),
] + ([] if torch.cuda.is_available() else [
    ("cuda", ValueError, r"^device: expected an available device, got cuda but CUDA is not available"),
    (1, ValueError, r"^device: expected an available device, got cuda:1"),
]))
def test_dit_loader_device_is_checked_before_loading(refine_ckpt, device, exc, match):
    from longcat_vc import LongCatDiT

    with pytest.raises(exc, match=match):
        LongCatDiT.from_pretrained(os.path.join(refine_ckpt, "dit"), device=device, progress=False)
    with pytest.raises(exc, match=match):  # before the folder is looked at
        LongCatDiT.from_pretrained(os.path.join(refine_ckpt, "not_there"), device=device, progress=False)


# ------------------------------------------------------------------ O: animated PNG / WebP
@pytest.mark.parametrize("ext", [".png", ".webp"])
def test_animated_png_and_webp_are_read_whole(tmp_path, ext):
    from PIL import Image

    from longcat_vc.video_io import read_video

    frames = [np.full((16, 24, 3), 40 * i, np.uint8) for i in range(5)]
    path = str(tmp_path / f"clip{ext}")
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=50, loop=0,
                   **({"lossless": True} if ext == ".webp" else {}))
    vf = read_video(path)
    assert vf.num_frames == 5 and vf.fps == pytest.approx(20.0)
    np.testing.assert_array_equal(vf.frames[:, 0, 0, 0], [0, 40, 80, 120, 160])
    assert read_video(path, target_fps=10.0).num_frames == 3  # subsampled by its frame rate (stride 2)


def test_multi_image_tiff_and_jpeg_are_still_one_image(tmp_path):
    # not an animation: only PNG / WebP animations are read as clips (a JPEG's MPO gain map neither)
    from PIL import Image

    from longcat_vc.video_io import read_video

    path = str(tmp_path / "pages.tif")
    pages = [Image.fromarray(np.full((8, 8, 3), 60 * i, np.uint8)) for i in range(3)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert Image.open(path).n_frames == 3
    vf = read_video(path)
    assert vf.num_frames == 1 and vf.frames[0, 0, 0, 0] == 0
    mpo = str(tmp_path / "photo.jpg")  # a JPEG with a second image (as phones store a gain map)
    pages[0].save(mpo, save_all=True, append_images=[Image.fromarray(np.zeros((4, 4, 3), np.uint8))], format="MPO")
    assert Image.open(mpo).n_frames == 2
    assert read_video(mpo).frames.shape == (1, 8, 8, 3)


# ------------------------------------------------------------------ P: refine under context parallelism
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(os.path.dirname(_HERE))


def _cp_refine_worker(rank: int, world: int, init: str, out: str, ckpt: str) -> None:
    """One rank: the context-parallel refine with this rank's own global RNG state, and the
    single-process refine with rank 0's; writes their rel. L2 distance."""
    import json

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    kw = dict(dtype=torch.float32, device="cpu", attn_backend="torch", progress=False)
    cp = VideoContinuationPipeline.from_pretrained(ckpt, process_group=dist.group.WORLD, **kw)
    args = dict(video=_frames(12, 40, 72, seed=1), num_cond_frames=5, resolution=REFINE_SIZE, num_inference_steps=2,
                generator=None, output_type="latent", progress=False)
    torch.manual_seed(100 + rank)  # the ranks' global RNGs differ
    lat = cp.refine(_frames(5, 36, 64), "a cat", **args).latents
    sp = VideoContinuationPipeline.from_pretrained(ckpt, **kw)
    torch.manual_seed(100)  # rank 0's
    ref = sp.refine(_frames(5, 36, 64), "a cat", **args).latents
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rel": float((lat - ref).norm() / ref.norm())}, f)
    dist.destroy_process_group()


def test_context_parallel_refine_denoises_rank0s_latents(refine_ckpt, tmp_path):
    import json

    from vc_components import run_two_ranks

    codes, logs = run_two_ranks(__file__, lambda r: ["--cp-refine-worker", str(r), "2", str(tmp_path / "init"),
                                                     str(tmp_path), refine_ckpt], _ROOT, _HERE)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    rel = [json.load(open(tmp_path / f"rank{r}.json"))["rel"] for r in range(2)]
    assert max(rel) < 1e-5, rel


# ------------------------------------------------------------------ Q: refine on a hand-built pipeline
def test_refine_on_a_hand_built_pipeline_says_how_to_give_the_lora(refine_pipe):
    from longcat_vc import CheckpointError

    p = refine_pipe
    hand = VideoContinuationPipeline(p.dit, p.vae, p.text_encoder, p.tokenizer, {"shift": 12.0})
    assert hand.refinement_lora_path is None and "refinement_lora" not in p.dit.lora_names
    with pytest.raises(CheckpointError, match=r"set pipe.refinement_lora_path .* or load it with "
                                              r"pipe.dit.load_lora\(path, 'refinement_lora'\)"):
        hand.refine(_frames(5, 36, 64), resolution=REFINE_SIZE, num_inference_steps=2, progress=False)


# ------------------------------------------------------------------ R: the DiT loader's strict switch
@pytest.mark.parametrize("strict", [None, 0, "", "no"])
def test_dit_loader_strict_takes_a_bool(refine_ckpt, strict):
    from longcat_vc import LongCatDiT

    with pytest.raises(TypeError, match=r"strict"):
        LongCatDiT.from_pretrained(os.path.join(refine_ckpt, "dit"), strict=strict, progress=False)


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--cp-refine-worker":
    _cp_refine_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])


def test_a_near_miss_config_key_warns_naming_the_field():
    # config.json with 'text_token_zero_pad' (misspelt): the key was ignored for forward compatibility and
    # text_tokens_zero_pad silently kept its default (False; the released config says true)
    import dataclasses
    import warnings

    from longcat_vc import DiTConfig

    d = dataclasses.asdict(DiTConfig.tiny())
    d.pop("attn_backend")
    d.pop("text_tokens_zero_pad")
    with pytest.warns(UserWarning, match=r"unknown key 'text_token_zero_pad' ignored \(did you mean 'text_tokens_zero_pad'"):
        cfg = DiTConfig.from_dict(dict(d, text_token_zero_pad=True))
    assert cfg._ignored_keys == ("text_token_zero_pad",)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # upstream-only keys, diffusers' keys and far-off new keys stay quiet
        DiTConfig.from_dict(dict(d, _class_name="LongCatVideoTransformer3DModel", enable_flashattn2=True,
                                 cp_split_hw=[1, 1], some_future_switch=1))


def test_video_frames_stride_checked_and_a_stride_without_fps_does_not_break_the_message():
    # VideoFrames(fps=None, stride=2) with too few frames raised TypeError (None * 2) inside the
    # error message; stride 0 / a string passed through
    import numpy as np

    from longcat_vc.video_io import VideoFrames, as_video_frames

    frames = np.zeros((3, 16, 16, 3), np.uint8)
    for bad in (0, -1, "2", 1.5, True):
        with pytest.raises(ValueError, match=r"VideoFrames\.stride must be an int >= 1"):
            as_video_frames(VideoFrames(frames, None, None, bad))
    assert as_video_frames(VideoFrames(frames, None, None, np.int64(2))).stride == 2


def test_too_short_video_frames_with_a_stride_but_no_fps_get_the_frame_count_message():
    import numpy as np

    from longcat_vc.pipeline import VideoContinuationPipeline
    from longcat_vc.video_io import VideoFrames

    pipe = VideoContinuationPipeline.__new__(VideoContinuationPipeline)  # _load_video reads no component
    with pytest.raises(ValueError, match=r"the video has 3 frames, fewer than num_cond_frames=5"):
        pipe._load_video(VideoFrames(np.zeros((3, 16, 16, 3), np.uint8), None, None, 2), 5)


def test_a_prompt_longer_than_the_text_length_warns(tmp_path):
    # a prompt beyond max_sequence_length tokens was cut to its first tokens (as upstream) without a word
    import warnings

    from longcat_vc.text import encode_prompts
    from vc_components import build_text_encoder, build_tokenizer

    tok = build_tokenizer(str(tmp_path / "tok"))
    enc = build_text_encoder()
    with pytest.warns(UserWarning, match=r"prompt 1: \d+ tokens; the text encoder takes 16 tokens"):
        encode_prompts(tok, enc, ["a cat", " ".join(["the cat rides a red car"] * 5)], max_length=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encode_prompts(tok, enc, ["a cat on the road"], max_length=16)
