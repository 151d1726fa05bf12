"""Round-6 documentation audit: claims of the README, DESIGN.md, docstrings and --help texts that were
false, each pinned against what the code does (CPU, fast)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.dispatch import BackendUnavailableError, Facts, choose_kernel

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_qk_norm_rope_torch_output_is_bshd_contiguous_without_rope():
    """DESIGN.md: op outputs are BSHD-contiguous (the Triton prologue's are); the torch path without a
    rope returned a strided input's layout."""
    q = torch.randn(1, 4, 32, 64).transpose(1, 2)  # [B, S, H, D] view of a BHSD tensor
    k = torch.randn(1, 4, 32, 64).transpose(1, 2)
    w = torch.ones(64)
    for rope in (None, lk.Rope3D((2, 4, 4), 64)):
        qo, ko = lk.qk_norm_rope(q, k, w, w, rope, backend="torch")
        assert qo.is_contiguous() and ko.is_contiguous()
        ref_q, _ = lk.qk_norm_rope(q.contiguous(), k.contiguous(), w, w, rope, backend="torch")
        assert torch.equal(qo, ref_q)
    out_q = torch.empty(1, 4, 32, 64).transpose(1, 2)  # a given output is written and returned as is
    qo, _ = lk.qk_norm_rope(q, k, w, w, out_q=out_q, backend="torch")
    assert qo is out_q and torch.equal(qo, lk.qk_norm_rope(q, k, w, w, backend="torch")[0])


def test_prefix_attn_takes_gqa_as_its_docstring_says():
    q = torch.randn(1, 32, 4, 16)
    k, v = torch.randn(1, 32, 2, 16), torch.randn(1, 32, 2, 16)
    out = lk.prefix_attn(q, k, v, prefix_len=8)
    want = lk.prefix_attn(q, k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2), prefix_len=8)
    torch.testing.assert_close(out, want)
    assert "fewer heads" in lk.prefix_attn.__doc__ and "same shapes" not in lk.prefix_attn.__doc__


def test_training_docstring_names_auto_bsa_choice_for_gradients():
    """longcat_vc.training said CUDA "auto" trains BSA on Triton; dispatch picks the csrc forward with
    the Triton backward where that forward applies."""
    from longcat_vc import training

    f = Facts(requires_grad=True, block_sparse=True, block_tokens=(64, 64))
    assert choose_kernel("block_sparse_attn", f, "auto").impl == "csrc_sm90_ws_triton_bwd"
    doc = training.__doc__
    assert "csrc_sm90_ws_triton_bwd" in doc and 'takes triton because' not in doc


@pytest.mark.parametrize("op", ["qk_norm_rope", "fp8_quantize"])
def test_forward_only_ops_explicit_backends_with_grad(op):
    """README / DESIGN: explicit triton raises "forward only"; cuda has no kernel for these ops."""
    f = Facts(requires_grad=True)
    with pytest.raises(BackendUnavailableError, match="forward only"):
        choose_kernel(op, f, "triton")
    with pytest.raises(BackendUnavailableError, match="no csrc kernel"):
        choose_kernel(op, f, "cuda")
    with pytest.raises(BackendUnavailableError, match="forward only"):
        choose_kernel("prefix_attn", f, "cuda")


def test_vae_tiling_help_and_encode_is_tiled(tmp_path, monkeypatch):
    """--vae-tiling said "tiled VAE decode"; diffusers' AutoencoderKLWan.enable_tiling tiles the encode
    too (from_pretrained's docstring says so)."""
    from longcat_vc import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("continue", "extend", "refine"):
        act = next(a for a in sub[name]._actions if a.dest == "vae_tiling")
        assert "encode and decode" in act.help

    sys.path.insert(0, str(ROOT / "tests" / "vc"))
    try:
        from vc_components import build_vae
    finally:
        sys.path.pop(0)
    vae = build_vae()
    vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16, tile_sample_stride_height=8,
                      tile_sample_stride_width=8)
    calls = []
    orig = type(vae).tiled_encode

    def spy(self, x, *a, **k):
        calls.append(tuple(x.shape))
        return orig(self, x, *a, **k)

    monkeypatch.setattr(type(vae), "tiled_encode", spy)
    with torch.no_grad():
        vae.encode(torch.randn(1, 3, 1, 32, 32))
    assert calls


def test_cli_docstring_states_the_refined_output_rate():
    from longcat_vc import cli

    assert "after a refinement: 30 fps" in cli.__doc__


def test_readme_layout_lists_every_example():
    layout = re.search(r"## Layout\n\n```\n(.*?)```", README, flags=re.S).group(1)
    for p in sorted((ROOT / "examples").glob("*.py")):
        assert p.name in layout, p.name
