"""LongCatDiT.from_pretrained: upstream dit/ and FastVideo transformer/ layouts, strict key checks,
corrupt files, no random fp32 model materialised."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from longcat_vc import CheckpointError, LongCatDiT
from longcat_vc.loading import fastvideo_sources, to_fastvideo_state_dict
from test_dit import make_inputs
from tiny_ckpt import (
    model_from_state_dict,
    random_state_dict,
    tiny_config,
    write_checkpoint_root,
    write_fastvideo_transformer,
    write_upstream_dit,
)


def _same_weights(model, sd, dtype=torch.float32):
    got = model.state_dict()
    assert list(got) == list(sd) or set(got) == set(sd)
    for k, v in sd.items():
        assert got[k].dtype == dtype, k
        assert torch.equal(got[k], v.to(dtype)), k


@pytest.mark.parametrize("shards", [1, 3])
def test_upstream_layout_loads_strict(tmp_path, shards):
    cfg = tiny_config()
    sd = write_upstream_dit(str(tmp_path / "dit"), cfg, seed=21, shards=shards)
    assert os.path.isfile(tmp_path / "dit" / "diffusion_pytorch_model.safetensors.index.json") == (shards > 1)
    model = LongCatDiT.from_pretrained(str(tmp_path / "dit"))
    _same_weights(model, sd)
    assert model.config.hidden_size == 64 and not model.training
    assert all(not p.requires_grad for p in model.parameters())
    x, t, y, mask = make_inputs(cfg, T=2)
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask), model_from_state_dict(cfg, sd)(x, t, y, mask))


@pytest.mark.parametrize("shards", [1, 2])
def test_fastvideo_layout_loads_strict(tmp_path, shards):
    cfg = tiny_config(text_tokens_zero_pad=True)
    sd = write_fastvideo_transformer(str(tmp_path / "transformer"), cfg, seed=22, shards=shards)
    files = load_file(str(tmp_path / "transformer" / "model.safetensors")) if shards == 1 else None
    if files is not None:
        assert "blocks.0.self_attn.to_k.weight" in files and "patch_embed.proj.weight" in files
        assert "blocks.1.cross_attn.to_v.bias" in files and "final_layer.adaln_linear.weight" in files
    model = LongCatDiT.from_pretrained(str(tmp_path / "transformer"))
    _same_weights(model, sd)
    assert model.config.num_heads == cfg.num_heads and model.config.text_tokens_zero_pad


def test_root_folder_resolution_and_dtype_device(tmp_path):
    cfg = tiny_config()
    sd = write_checkpoint_root(str(tmp_path / "up"), cfg, layout="upstream", seed=23)
    write_checkpoint_root(str(tmp_path / "fv"), cfg, layout="fastvideo", seed=23)
    a = LongCatDiT.from_pretrained(str(tmp_path / "up"), dtype=torch.bfloat16, device="cpu")
    b = LongCatDiT.from_pretrained(str(tmp_path / "fv"), dtype=torch.bfloat16)
    _same_weights(a, sd, torch.bfloat16)
    _same_weights(b, sd, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and a.device.type == "cpu"
    c = LongCatDiT.from_pretrained(str(tmp_path / "up"), attn_backend="torch")
    assert c.config.attn_backend == "torch"


def test_no_random_model_is_materialised(tmp_path, monkeypatch):
    cfg = tiny_config()
    write_upstream_dit(str(tmp_path), cfg, seed=24)

    real_inits = []
    orig_k, orig_u = torch.nn.init.kaiming_uniform_, torch.nn.init.uniform_

    def spy(orig):
        def f(t, *a, **k):
            if not t.is_meta:
                real_inits.append(tuple(t.shape))
            return orig(t, *a, **k)
        return f

    monkeypatch.setattr(torch.nn.init, "kaiming_uniform_", spy(orig_k))
    monkeypatch.setattr(torch.nn.init, "uniform_", spy(orig_u))
    model = LongCatDiT.from_pretrained(str(tmp_path))
    assert not any(p.is_meta for p in model.parameters())
    assert real_inits == [], f"random init ran on real tensors while loading: {real_inits}"
    LongCatDiT(cfg)  # the spy does see a real construction
    assert real_inits


def test_fastvideo_key_mapping_matches_spec9():
    assert fastvideo_sources("blocks.3.attn.qkv.weight") == [
        "blocks.3.self_attn.to_q.weight", "blocks.3.self_attn.to_k.weight", "blocks.3.self_attn.to_v.weight"]
    assert fastvideo_sources("blocks.0.cross_attn.kv_linear.bias") == [
        "blocks.0.cross_attn.to_k.bias", "blocks.0.cross_attn.to_v.bias"]
    table = {
        "x_embedder.proj.weight": "patch_embed.proj.weight",
        "t_embedder.mlp.0.bias": "time_embedder.linear_1.bias",
        "t_embedder.mlp.2.weight": "time_embedder.linear_2.weight",
        "y_embedder.y_proj.0.weight": "caption_embedder.linear_1.weight",
        "y_embedder.y_proj.2.bias": "caption_embedder.linear_2.bias",
        "blocks.1.adaLN_modulation.1.weight": "blocks.1.adaln_linear_1.weight",
        "blocks.1.pre_crs_attn_norm.bias": "blocks.1.norm_cross.bias",
        "blocks.1.attn.proj.weight": "blocks.1.self_attn.to_out.weight",
        "blocks.1.attn.q_norm.weight": "blocks.1.self_attn.q_norm.weight",
        "blocks.1.cross_attn.q_linear.weight": "blocks.1.cross_attn.to_q.weight",
        "blocks.1.cross_attn.proj.bias": "blocks.1.cross_attn.to_out.bias",
        "blocks.1.cross_attn.k_norm.weight": "blocks.1.cross_attn.k_norm.weight",
        "blocks.1.ffn.w2.weight": "blocks.1.ffn.w2.weight",
        "final_layer.adaLN_modulation.1.bias": "final_layer.adaln_linear.bias",
        "final_layer.linear.weight": "final_layer.proj.weight",
    }
    for ours, theirs in table.items():
        assert fastvideo_sources(ours) == [theirs]
    sd = random_state_dict(tiny_config(), seed=25)
    fv = to_fastvideo_state_dict(sd)
    assert torch.equal(torch.cat([fv["blocks.0.self_attn.to_q.weight"], fv["blocks.0.self_attn.to_k.weight"],
                                  fv["blocks.0.self_attn.to_v.weight"]]), sd["blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------------- bad checkpoints
def _rewrite(folder, fn):
    """Loads the single safetensors file of ``folder``, applies ``fn`` to the dict, writes it back."""
    (name,) = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    path = os.path.join(folder, name)
    d = load_file(path)
    fn(d)
    save_file(d, path)


def test_missing_unexpected_mismatched_keys_listed_by_name(tmp_path):
    cfg = tiny_config()
    folder = str(tmp_path / "dit")
    write_upstream_dit(folder, cfg, seed=26, shards=1)

    def corrupt(d):
        del d["blocks.1.attn.k_norm.weight"]
        del d["final_layer.linear.bias"]
        d["blocks.0.extra.weight"] = torch.zeros(3)
        d["blocks.0.ffn.w2.weight"] = torch.zeros(64, 100)

    _rewrite(folder, corrupt)
    with pytest.raises(CheckpointError) as e:
        LongCatDiT.from_pretrained(folder)
    msg = str(e.value)
    assert "2 missing key(s): blocks.1.attn.k_norm.weight, final_layer.linear.bias" in msg
    assert "1 unexpected key(s): blocks.0.extra.weight" in msg
    assert "blocks.0.ffn.w2.weight: checkpoint [64, 100], model [64, 256]" in msg


def test_strict_false_ignores_only_unexpected(tmp_path):
    cfg = tiny_config()
    folder = str(tmp_path / "dit")
    sd = write_upstream_dit(folder, cfg, seed=27, shards=1)
    _rewrite(folder, lambda d: d.update({"ema.something": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected key.*ema.something"):
        LongCatDiT.from_pretrained(folder)
    _same_weights(LongCatDiT.from_pretrained(folder, strict=False), sd)
    _rewrite(folder, lambda d: d.pop("blocks.0.attn.qkv.bias"))
    with pytest.raises(CheckpointError, match="missing key.*blocks.0.attn.qkv.bias"):
        LongCatDiT.from_pretrained(folder, strict=False)


def test_fastvideo_missing_split_part_and_shape_listed(tmp_path):
    cfg = tiny_config()
    folder = str(tmp_path / "transformer")
    write_fastvideo_transformer(folder, cfg, seed=28)

    def corrupt(d):
        del d["blocks.1.self_attn.to_v.weight"]
        d["blocks.0.cross_attn.to_k.weight"] = torch.zeros(32, 64)

    _rewrite(folder, corrupt)
    with pytest.raises(CheckpointError) as e:
        LongCatDiT.from_pretrained(folder)
    msg = str(e.value)
    assert "FastVideo" in msg and "blocks.1.self_attn.to_v.weight" in msg
    assert "blocks.0.cross_attn.to_k.weight[32, 64] + blocks.0.cross_attn.to_v.weight[64, 64]" in msg


def test_config_mismatch_lists_shapes(tmp_path):
    write_upstream_dit(str(tmp_path), tiny_config(), seed=29, shards=1)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="missing key.*blocks.2.adaLN_modulation.1.bias"):
        LongCatDiT.from_pretrained(str(tmp_path))


def test_corrupt_and_truncated_safetensors_give_clear_errors(tmp_path):
    cfg = tiny_config()
    folder = tmp_path / "dit"
    write_upstream_dit(str(folder), cfg, seed=30, shards=2)
    shard = folder / "diffusion_pytorch_model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors: not a readable safetensors file"):
        LongCatDiT.from_pretrained(str(folder))
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="00002-of-00002.safetensors"):
        LongCatDiT.from_pretrained(str(folder))
    shard.unlink()
    with pytest.raises(CheckpointError, match="1 of the 2 shard file.*missing.*00002-of-00002"):
        LongCatDiT.from_pretrained(str(folder))


def test_bad_folders(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint folder not found"):
        LongCatDiT.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no DiT checkpoint here"):
        LongCatDiT.from_pretrained(str(tmp_path / "empty"))
    folder = tmp_path / "dit"
    write_upstream_dit(str(folder), tiny_config(), seed=31, shards=2)
    (folder / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json"):
        LongCatDiT.from_pretrained(str(folder))
    write_upstream_dit(str(folder), tiny_config(), seed=31, shards=2)
    idx = folder / "diffusion_pytorch_model.safetensors.index.json"
    j = json.loads(idx.read_text())
    j["weight_map"]["blocks.0.attn.ghost"] = "diffusion_pytorch_model-00001-of-00002.safetensors"
    idx.write_text(json.dumps(j))
    with pytest.raises(CheckpointError, match="listed in the index are missing from their shard: blocks.0.attn.ghost"):
        LongCatDiT.from_pretrained(str(folder))
