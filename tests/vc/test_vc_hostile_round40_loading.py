"""Round 40 (hostile audit, loading): DiT checkpoint folders, LoRA files and the pipeline's VAE, one test
per finding:

A. A FastVideo LoRA adapting ``time_embedder.linear_1/2`` or ``caption_embedder.linear_1/2`` (the
   FastVideo names, SPEC 9, of ``t_embedder.mlp.0/2`` and ``y_embedder.y_proj.0/2``, Linear modules the
   LongCat format adapts) was refused as keys that "match no Linear module of the model".
B. A VAE whose decoder weights hold NaN loaded without a word: the DiT latents stay finite (the NaN
   check before decoding passes), and the decoded NaN pixels became black frames (a NaN text encoder
   weight was found only after the whole denoising run, as NaN latents).
C. ``strict=False`` (unexpected keys ignored) on an upstream checkpoint holding one extra tensor whose
   name looks FastVideo (``...self_attn...``, ``patch_embed...``) read the whole folder as the FastVideo
   layout and refused it, listing every model key as "missing".
D. ``from_pretrained`` given the checkpoint's ``.safetensors`` or ``config.json`` file said "checkpoint
   folder not found" for a path that exists (the pipeline's checkpoint root too).
E. ``device="cuda:1"`` on a one-GPU machine passed the device check and failed at the first tensor with
   torch's "invalid device ordinal".
F. A lora_A/lora_B LoRA naming the model's own (upstream) modules (``blocks.0.attn.qkv``) was refused as
   keys that "match no Linear module of the model", with no word of the names such files are read with.
G. ``encode_prompts`` given a dict encoded its keys; bytes failed as "prompt must be a str, got int".
H. ``encode_prompts(dtype=torch.float8_e4m3fn)`` cast the embeddings to e4m3 without a word.
I. ``encode_prompts(device=...)`` was read by torch only after the encoder ran, naming no argument.
J. A config.json of another model (``vae/``'s, a Wan transformer's) given to the DiT loader failed on a
   field it does not have, or on every key "missing", never saying it is another model's config.
K. The pipeline on CUDA (or with a process group) refused a checkpoint root holding a FastVideo
   ``transformer/`` beside ``dit/`` ("pass the one to load explicitly"), though it always loads ``dit/``.
L. Shards an index lists but the folder lacks (an interrupted download) were named one at a time, or, with
   none left, reported as "no DiT checkpoint here".
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_ckpt import model_from_state_dict, write_upstream_dit

from longcat_vc.dit import LongCatDiT
from longcat_vc.loading import CheckpointError


# ---------------------------------------------------------------------------- A
def test_fastvideo_lora_on_the_embedders_loads_as_its_longcat_twin(tmp_path, tiny_base):
    """FastVideo LoRA keys of ``time_embedder.linear_1`` / ``caption_embedder.linear_2`` were refused as
    matching no Linear module; they adapt ``t_embedder.mlp.0`` / ``y_embedder.y_proj.2`` (SPEC 9 names)."""
    from longcat_vc.lora import longcat_lora_key

    cfg, sd = tiny_base
    g = torch.Generator().manual_seed(5)
    r = 4
    targets = {"t_embedder.mlp.0": "time_embedder.linear_1", "t_embedder.mlp.2": "time_embedder.linear_2",
               "y_embedder.y_proj.0": "caption_embedder.linear_1", "y_embedder.y_proj.2": "caption_embedder.linear_2"}
    ref = model_from_state_dict(cfg, sd)
    longcat, fastvideo = {}, {}
    for ours, theirs in targets.items():
        lin = ref.get_submodule(ours)
        down = 0.2 * torch.randn(r, lin.in_features, generator=g)
        up = 0.2 * torch.randn(lin.out_features, r, generator=g)
        longcat[longcat_lora_key(ours, "lora_down.weight")] = down
        longcat[longcat_lora_key(ours, "lora_up.weight")] = up
        longcat[longcat_lora_key(ours, "alpha_scale")] = torch.tensor(0.5)
        fastvideo[f"{theirs}.lora_A"] = down
        fastvideo[f"{theirs}.lora_B"] = up
        fastvideo[f"{theirs}.lora_alpha"] = torch.tensor(0.5 * r)
    save_file(longcat, str(tmp_path / "lc.safetensors"))
    save_file(fastvideo, str(tmp_path / "fv.safetensors"))
    assert sorted(ref.load_lora(str(tmp_path / "lc.safetensors"), "x")) == sorted(targets)
    ref.enable_loras(["x"])
    ref.fuse_lora()
    got = model_from_state_dict(cfg, sd)
    assert sorted(got.load_lora(str(tmp_path / "fv.safetensors"), "x")) == sorted(targets)
    got.enable_loras(["x"])
    got.fuse_lora()
    for ours in targets:
        w = ours + ".weight"
        assert not torch.equal(got.state_dict()[w], sd[w])
        torch.testing.assert_close(got.state_dict()[w], ref.state_dict()[w], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------- B
@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory):
    from vc_components import write_full_checkpoint

    root = str(tmp_path_factory.mktemp("r40ckpt"))
    write_full_checkpoint(root)
    return root


@pytest.mark.parametrize("sub,fname,key", [
    ("vae", "diffusion_pytorch_model.safetensors", "decoder.conv_out.weight"),
    ("text_encoder", "model.safetensors", "encoder.block.0.layer.1.DenseReluDense.wo.weight"),
])
def test_vae_or_text_encoder_with_a_nan_weight_is_refused_at_load(ckpt_root, tmp_path, sub, fname, key):
    """A NaN in the VAE decoder's weights loaded silently (only the decoded frames, black, showed it); one in
    the text encoder was found only after the whole denoising, as NaN latents."""
    from longcat_vc.pipeline import VideoContinuationPipeline

    root = str(tmp_path / "ck")
    shutil.copytree(ckpt_root, root)
    path = os.path.join(root, sub, fname)
    sd = load_file(path)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = float("nan")
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"(?s){sub}.*non-finite.*{key}"):
        VideoContinuationPipeline.from_pretrained(root, dtype=torch.float32, device="cpu", attn_backend="torch",
                                                  progress=False)


# ---------------------------------------------------------------------------- C
@pytest.mark.parametrize("extra", ["extra.self_attn.scale", "patch_embed.proj.weight"])
def test_strict_false_ignores_a_stray_fastvideo_looking_key_of_an_upstream_checkpoint(tmp_path, tiny_base, extra):
    """One unexpected tensor named like a FastVideo key made the loader read an upstream checkpoint as
    FastVideo's layout and refuse it (every model key "missing") although strict=False ignores extras."""
    cfg, sd = tiny_base
    write_upstream_dit(str(tmp_path), cfg, {**sd, extra: torch.zeros(3)}, shards=1)
    model = LongCatDiT.from_pretrained(str(tmp_path), strict=False, progress=False)
    for k, v in sd.items():
        assert torch.equal(model.state_dict()[k], v), k
    with pytest.raises(CheckpointError, match=rf"upstream dit/ layout.*1 unexpected key.*{extra}"):
        LongCatDiT.from_pretrained(str(tmp_path), progress=False)


# ---------------------------------------------------------------------------- D
@pytest.mark.parametrize("fname", ["diffusion_pytorch_model.safetensors", "config.json"])
def test_a_file_given_for_the_checkpoint_folder_is_named_as_a_file(tmp_path, tiny_base, fname):
    """A checkpoint file given for the folder was "checkpoint folder not found" though the path exists."""
    cfg, sd = tiny_base
    write_upstream_dit(str(tmp_path), cfg, sd, shards=1)
    path = str(tmp_path / fname)
    with pytest.raises(CheckpointError, match=rf"{fname} is a file.*pass the folder holding it \({tmp_path}\)"):
        LongCatDiT.from_pretrained(path, progress=False)


def test_a_file_given_for_the_pipeline_checkpoint_root_is_named_as_a_file(tmp_path):
    """The pipeline's check said "checkpoint folder not found" for a file given as the checkpoint root."""
    from longcat_vc.pipeline import VideoContinuationPipeline

    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(CheckpointError, match=r"config\.json is a file; pass the checkpoint root folder"):
        VideoContinuationPipeline.from_pretrained(str(path), dtype=torch.float32, device="cpu", progress=False)


# ---------------------------------------------------------------------------- E
def test_a_cuda_index_past_the_visible_devices_is_refused_naming_the_device(monkeypatch, tmp_path, tiny_base):
    """``device="cuda:1"`` on a one-GPU machine passed ``check_device`` (CUDA is available) and failed at the
    first tensor with torch's "invalid device ordinal" (in the pipeline: a CheckpointError blaming a component)."""
    from longcat_vc.loading import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert check_device("cuda:0") == torch.device("cuda:0")
    assert check_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match=r"device: expected a visible CUDA device .*cuda:0.*got cuda:1 with 1 visible"):
        check_device("cuda:1")
    cfg, sd = tiny_base
    write_upstream_dit(str(tmp_path), cfg, sd, shards=1)
    with pytest.raises(ValueError, match=r"device: .*got cuda:3"):
        LongCatDiT.from_pretrained(str(tmp_path), device=3, progress=False)


# ---------------------------------------------------------------------------- F
def test_lora_a_b_file_with_upstream_module_names_says_which_names_it_expects(tmp_path, tiny_base):
    """A lora_A/lora_B file naming the model's own (upstream) modules (``blocks.0.attn.qkv``) was refused as
    keys that "match no Linear module of the model", although the model has exactly that Linear."""
    cfg, sd = tiny_base
    model = model_from_state_dict(cfg, sd)
    qkv = model.get_submodule("blocks.0.attn.qkv")
    save_file({"diffusion_model.blocks.0.attn.qkv.lora_A.weight": torch.randn(4, qkv.in_features),
               "diffusion_model.blocks.0.attn.qkv.lora_B.weight": torch.randn(qkv.out_features, 4)},
              str(tmp_path / "l.safetensors"))
    with pytest.raises(ValueError, match=r"(?s)blocks\.0\.attn\.qkv is this model's \(upstream\) module name;.*"
                                         r"FastVideo's module names.*self_attn\.to_q.*LongCat format"):
        model.load_lora(str(tmp_path / "l.safetensors"), "x")


# ---------------------------------------------------------------------------- G, H, I (text.encode_prompts)
@pytest.fixture(scope="module")
def tok_enc(tmp_path_factory):
    from vc_components import build_text_encoder, build_tokenizer

    return build_tokenizer(str(tmp_path_factory.mktemp("r40tok"))), build_text_encoder()


@pytest.mark.parametrize("prompts", [{"prompt": "a cat"}, b"a cat", None, ["a cat", b"a dog"]])
def test_encode_prompts_refuses_prompts_that_are_no_str_or_list_of_str(tok_enc, prompts):
    """A dict was encoded as its keys (the literal word "prompt"), bytes as "prompt must be a str, got int"
    (its bytes iterated), None as a bare "'NoneType' object is not iterable"."""
    from longcat_vc.text import encode_prompts

    tok, enc = tok_enc
    with pytest.raises(TypeError, match=r"^prompts: expected a str or a list of str, got "):
        encode_prompts(tok, enc, prompts, max_length=8)


def test_encode_prompts_refuses_an_8_bit_dtype(tok_enc):
    """``dtype=torch.float8_e4m3fn`` cast the embeddings to e4m3 (3 mantissa bits: up to 6% off each) silently."""
    from longcat_vc.text import encode_prompts

    tok, enc = tok_enc
    with pytest.raises(ValueError, match=r"^dtype: expected a floating torch.dtype of 16 bits or more"):
        encode_prompts(tok, enc, "a cat", max_length=8, dtype=torch.float8_e4m3fn)


@pytest.mark.parametrize("device,exc", [("cuda", ValueError), ("gpu", ValueError), (0, ValueError), (1.5, TypeError)])
def test_encode_prompts_checks_its_device_before_encoding(tok_enc, monkeypatch, device, exc):
    """``device`` was read by torch only after the encoder ran: "Torch not compiled with CUDA enabled"
    (AssertionError), "Expected one of cpu, cuda, ..." (RuntimeError), naming no argument."""
    from longcat_vc.text import encode_prompts

    tok, enc = tok_enc
    monkeypatch.setattr(enc, "forward", lambda *a, **k: pytest.fail("encoded before checking the device"))
    with pytest.raises(exc, match=r"^device: expected"):
        encode_prompts(tok, enc, "a cat", max_length=8, device=device)


# ---------------------------------------------------------------------------- J
def test_a_config_of_another_model_class_is_named_as_such(tmp_path):
    """The DiT loader pointed at ``vae/`` (or a Wan transformer) built a DiTConfig from a foreign config.json
    and failed on a field that file does not even have ("patch_size: expected three ints, got None",
    "hidden_size: expected a multiple of num_heads=12, got 4096"), or on every key "missing"."""
    from longcat_vc.config import DiTConfig
    from vc_components import write_full_checkpoint

    for cls_name, extra in (("WanTransformer3DModel", {"num_attention_heads": 12, "num_layers": 30}),
                            ("AutoencoderKLWan", {"patch_size": None, "z_dim": 16})):
        with pytest.raises(ValueError, match=rf"_class_name {cls_name!r} is not a LongCat-Video DiT"):
            DiTConfig.from_dict({"_class_name": cls_name, **extra})
    for ok in ("LongCatVideoTransformer3DModel", "LongCatTransformer3DModel"):
        assert DiTConfig.from_dict({"_class_name": ok}).hidden_size == 4096
    write_full_checkpoint(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"vae.config\.json.*'AutoencoderKLWan' is not a LongCat-Video DiT"):
        LongCatDiT.from_pretrained(str(tmp_path / "vae"), progress=False)


# ---------------------------------------------------------------------------- K
def test_pipeline_on_cuda_sizes_the_dit_it_loads_from_dit_even_beside_a_transformer_folder(tmp_path, monkeypatch):
    """On CUDA (or with a process group) the pipeline read the DiT config through ``resolve_dit_dir(root)``, which
    refuses a root holding both ``dit/`` and a FastVideo ``transformer/`` ("pass the one to load explicitly"),
    although the pipeline always loads ``dit/`` (and on CPU did so without a word)."""
    import longcat_vc.memory as memory
    from tiny_ckpt import tiny_config, write_fastvideo_transformer
    from vc_components import write_full_checkpoint

    from longcat_vc.pipeline import VideoContinuationPipeline

    write_full_checkpoint(str(tmp_path))
    write_fastvideo_transformer(str(tmp_path / "transformer"), tiny_config(depth=1))
    seen = []

    class Sized(Exception):
        pass

    def fits(cfg, *a, **k):
        seen.append(cfg)
        raise Sized

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(memory, "check_memory_fits", fits)
    with pytest.raises(Sized):
        VideoContinuationPipeline.from_pretrained(str(tmp_path), dtype=torch.float32, device="cuda", progress=False)
    assert seen[0].depth == LongCatDiT.from_pretrained(str(tmp_path / "dit"), progress=False).config.depth != 1


# ---------------------------------------------------------------------------- L
@pytest.mark.parametrize("keep", [(), (0,)])
def test_a_partial_download_names_every_missing_shard(tmp_path, tiny_base, keep):
    """Shards the index lists but the folder lacks (an interrupted download) were reported one at a time
    ("checkpoint file not found" for the first), or, with none left, as "no DiT checkpoint here" without a
    word of the index and the shards it expects."""
    cfg, sd = tiny_base
    write_upstream_dit(str(tmp_path), cfg, sd, shards=3)
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith("-of-00003.safetensors"))
    for i, f in enumerate(shards):
        if i not in keep:
            os.remove(tmp_path / f)
    gone = [f for i, f in enumerate(shards) if i not in keep]
    with pytest.raises(CheckpointError, match=rf"(?s){len(gone)} of the 3 shard file\(s\) .* missing.*"
                                              + ".*".join(g.replace(".", r"\.") for g in gone)):
        LongCatDiT.from_pretrained(str(tmp_path), progress=False)
