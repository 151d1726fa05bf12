"""Hostile-user calls of ``longcat_vc.training``: bad rank/alpha/dropout, add_lora twice, and
``save_longcat_lora`` to an existing file, a missing or unwritable folder, with a non-float dtype or
bad metadata: a named error, nothing lost, nothing half-written."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("peft")
from longcat_vc import training as tr  # noqa: E402
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config  # noqa: E402


def _dit(seed=1):
    cfg = tiny_config(attn_backend="torch")
    return model_from_state_dict(cfg, random_state_dict(cfg, seed=seed))


@pytest.fixture(scope="module")
def model():
    m = tr.add_lora(_dit(), tr.lora_config(rank=4, alpha=8, init_lora_weights=False))
    return m.eval()


@pytest.mark.parametrize("kw,exc,name", [
    (dict(rank=0), ValueError, "rank"), (dict(rank=-4), ValueError, "rank"),
    (dict(rank=4.0), TypeError, "rank"), (dict(rank="8"), TypeError, "rank"), (dict(rank=True), TypeError, "rank"),
    (dict(alpha=0), ValueError, "alpha"), (dict(alpha=-1.0), ValueError, "alpha"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=float("inf")), ValueError, "alpha"),      # was accepted: adapter scaled by inf
    (dict(alpha="64"), TypeError, "alpha"),
    (dict(dropout=1.5), ValueError, "dropout"),           # was peft/torch's unnamed "dropout probability" error
    (dict(dropout=1.0), ValueError, "dropout"), (dict(dropout=-0.1), ValueError, "dropout"),
    (dict(dropout="0.1"), TypeError, "dropout"),          # was float("0.1"), silently
])
def test_lora_config_bad_rank_alpha_dropout(kw, exc, name):
    with pytest.raises(exc, match=rf"^{name}: expected"):
        tr.lora_config(**kw)


def test_add_lora_twice_keeps_the_trained_adapters():
    dit = _dit()
    m = tr.add_lora(dit, tr.lora_config(rank=4, alpha=8))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p))  # "trained" weights
    before = {k: v.clone() for k, v in tr.longcat_lora_state_dict(m).items()}
    # a second call used to re-initialise the "default" adapter in place: lora_B back to zeros
    with pytest.raises(ValueError, match=r"^dit: expected a DiT without peft adapters"):
        tr.add_lora(dit, tr.lora_config(rank=4, alpha=8))
    with pytest.raises(ValueError, match=r"^dit: expected a DiT without peft adapters"):
        tr.add_lora(m, tr.lora_config(rank=4, alpha=8))  # the peft model itself
    after = tr.longcat_lora_state_dict(m)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("kw,exc,name", [
    (dict(fp32_adapters="no"), TypeError, "fp32_adapters"), (dict(adapter_name=""), TypeError, "adapter_name"),
    (dict(adapter_name=3), TypeError, "adapter_name"),
])
def test_add_lora_bad_flags(kw, exc, name):
    with pytest.raises(exc, match=rf"^{name}: expected"):
        tr.add_lora(_dit(), tr.lora_config(rank=4, alpha=8), **kw)


def test_save_refuses_an_existing_file_unless_overwrite(model, tmp_path):
    path = tmp_path / "lora.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=r"^path: .*lora.safetensors' exists; pass overwrite=True"):
        tr.save_longcat_lora(model, path)
    assert path.read_bytes() == b"precious"  # was silently replaced
    adapted = tr.save_longcat_lora(model, path, overwrite=True)
    from safetensors.torch import load_file

    got = load_file(str(path))
    want = tr.longcat_lora_state_dict(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want) and adapted


def test_save_to_a_missing_folder_a_folder_or_an_unwritable_place(model, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^path: the folder .*nope' of"):
        tr.save_longcat_lora(model, tmp_path / "nope" / "a.safetensors")
    with pytest.raises(IsADirectoryError, match=r"^path: expected a file path, got the folder"):
        tr.save_longcat_lora(model, tmp_path)
    with pytest.raises(TypeError, match=r"^path: expected a str or os.PathLike, got int"):
        tr.save_longcat_lora(model, 5)
    if os.path.isdir("/proc/self"):  # a folder nobody (root included) can create files in
        with pytest.raises(OSError, match=r"^path: could not write '/proc/self/a.safetensors'"):
            tr.save_longcat_lora(model, "/proc/self/a.safetensors")
    assert not (tmp_path / "nope").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw,exc,name", [
    (dict(dtype=torch.int8), TypeError, "dtype"),          # was: every weight rounded to an int8
    (dict(dtype="bf16"), TypeError, "dtype"),
    (dict(metadata=["a"]), TypeError, "metadata"),         # was AttributeError: 'list' has no 'items'
    (dict(metadata={"step": 10}), TypeError, "metadata"),
    (dict(metadata={"format": "np"}), ValueError, "metadata"),
    (dict(overwrite="yes"), TypeError, "overwrite"), (dict(split_fused=0), TypeError, "split_fused"),
])
def test_save_bad_arguments_write_nothing(model, tmp_path, kw, exc, name):
    path = tmp_path / "a.safetensors"
    with pytest.raises(exc, match=rf"^{name}: expected"):
        tr.save_longcat_lora(model, path, **kw)
    assert not path.exists()


def test_save_a_model_without_lora(tmp_path):
    path = tmp_path / "a.safetensors"
    with pytest.raises(ValueError, match="no peft LoRA adapter named 'default'"):
        tr.save_longcat_lora(_dit(), path)
    assert not path.exists()


def test_narrow_dtype_tells_an_overflow_from_a_diverged_adapter(tmp_path):
    # the save casts each adapter tensor once and scans the cast: a finite adapter beyond fp16 is an overflow
    # (save wider), a NaN one stays "diverged"
    m = tr.add_lora(_dit(), tr.lora_config(rank=2, init_lora_weights=False))
    sd = tr.longcat_lora_state_dict(m, dtype=torch.float16)
    assert all(t.dtype == torch.float16 for k, t in sd.items() if not k.endswith("alpha_scale"))
    b = next(p for n, p in m.named_parameters() if "lora_B" in n)
    path = str(tmp_path / "a.safetensors")
    with torch.no_grad():
        b.fill_(1e6)
    overflow = r"lora_B has values beyond the range of torch.float16 \(max \|value\| 1e\+06\)"
    with pytest.raises(ValueError, match=overflow):
        tr.save_longcat_lora(m, path, dtype=torch.float16)
    assert not os.path.exists(path)
    tr.save_longcat_lora(m, path, dtype=torch.float32)  # wider: saved
    with torch.no_grad():
        b.fill_(float("nan"))
    with pytest.raises(ValueError, match="the adapter holds NaN/Inf"):
        tr.save_longcat_lora(m, path, dtype=torch.float16, overwrite=True)
