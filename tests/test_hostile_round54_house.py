"""Audit round 54 (the house): one helper per rule (the softmax scale default, blocks per axis, the "first N
names and how many more" list), and csrc/NOTES.md names only functions the source has."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = [p for p in sorted(ROOT.glob("longcat_kernels/**/*.py")) + sorted(ROOT.glob("longcat_vc/**/*.py"))
           + sorted(ROOT.glob("bench/**/*.py")) if "dev" not in p.relative_to(ROOT).parts]


def _source(rel: str) -> str:
    return (ROOT / rel).read_text()


def _writers(pattern: str) -> list:
    rx = re.compile(pattern)
    return sorted(str(p.relative_to(ROOT)) for p in PRODUCT if rx.search(p.read_text()))


# ---- csrc/NOTES.md ---------------------------------------------------------------------------------------

def _notes_head() -> str:
    text = _source("csrc/NOTES.md")
    return text[text.index("## Files"):text.index("## The two numbers")]


def test_csrc_notes_head_names_only_existing_identifiers():
    """The "Files" and "One kernel family" sections said a removed variant comes back as "one more
    instantiation in `dispatch_ws` / `dispatch_bsa_ws` / ...": neither function exists (the WS kernels
    have no variant flags left). Every backticked identifier there names something in csrc/ or the
    Python package (or a removed variable listed in `_envvars.REMOVED`)."""
    from longcat_kernels._envvars import REMOVED

    corpus = "\n".join(p.read_text() for p in sorted((ROOT / "csrc").glob("*.c*")) + sorted((ROOT / "csrc").glob("*.h")))
    corpus += "\n".join(p.read_text() for p in sorted(ROOT.glob("longcat_kernels/**/*.py")))
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", _notes_head()))
    assert len(names) > 8, "no identifiers found: the pattern is wrong"
    missing = sorted(n for n in names if n not in REMOVED and not re.search(rf"\b{n}\b", corpus))
    assert not missing, f"csrc/NOTES.md names what the source lacks: {missing}"


def test_csrc_notes_no_longer_promises_ws_variant_flags():
    head = " ".join(_notes_head().split())
    assert "dispatch_ws" not in head and "dispatch_bsa_ws" not in head
    for f in ("attn_fwd_sm90_ws.cu", "bsa_fwd_sm90_ws.cu"):
        # the WS kernels are templated on the element type only
        assert not re.search(r"template <typename T, (int|bool)", _source(f"csrc/{f}")), f


# ---- the softmax scale default: one helper ---------------------------------------------------------------

def test_scale_default_written_once():
    """``head_dim ** -0.5 if scale is None else float(scale)`` was written in 9 places (bsa api, kv-cache
    api x2, triton x2, cudnn x2, cuda x2); `_validate.default_scale` is the one rule now."""
    # the testing oracle keeps its own copy on purpose: it is the SPEC's independent statement
    assert _writers(r"\*\* -0\.5 if scale is None") == ["longcat_kernels/_validate.py",
                                                        "longcat_kernels/testing/oracle.py"]


@pytest.mark.parametrize("d", [4, 8, 16])
def test_default_scale_matches_explicit_head_dim_scale(d):
    import numpy as np

    import longcat_kernels as lk
    from longcat_kernels._validate import default_scale

    q, k, v = (torch.randn(2, 12, 2, d) for _ in range(3))
    assert default_scale(q, None) == d ** -0.5
    assert default_scale(q, np.float32(0.25)) == 0.25 and type(default_scale(q, np.float32(0.25))) is float
    a = lk.prefix_attn(q, k, v, 5, backend="torch")
    b = lk.prefix_attn(q, k, v, 5, scale=d ** -0.5, backend="torch")
    c = lk.prefix_attn(q, k, v, 5, scale=2.0 * d ** -0.5, backend="torch")
    assert torch.isfinite(a).all() and torch.equal(a, b) and not torch.allclose(a, c)


# ---- blocks per axis: grid.num_blocks -------------------------------------------------------------------

def test_blocks_per_axis_written_once():
    """``ceil(g / c)`` per axis was spelt ``-(-g // c)`` in grid.py, the BSA Triton geometry, the kv-cache
    Triton ``_nblk`` and the geometry check; all call `grid.num_blocks` / `total_blocks` now."""
    kernels = [p for p in _writers(r"-\(-\w+ // c\w*\)") if p.startswith("longcat_kernels/")]
    assert kernels == ["longcat_kernels/grid.py"]


@pytest.mark.parametrize("grid,chunk", [((3, 5, 7), (2, 2, 4)), ((1, 1, 1), (4, 4, 4)), ((4, 4, 8), (2, 2, 4))])
def test_block_geometry_check_counts_partial_blocks(grid, chunk):
    """`check_op_block_geometry` (now through `total_blocks`) still wants indices for every partial block."""
    from longcat_kernels._validate import check_op_block_geometry
    from longcat_kernels.grid import num_blocks, total_blocks

    n = total_blocks(grid, chunk)
    assert num_blocks(grid, chunk) == tuple(-(-g // c) for g, c in zip(grid, chunk))
    seq = grid[0] * grid[1] * grid[2]
    q = torch.randn(1, seq, 2, 8)
    idx, cnt = torch.zeros(1, 2, n, 1, dtype=torch.int32), torch.ones(1, 2, n, dtype=torch.int32)
    check_op_block_geometry("op", q, seq, list(grid), list(grid), list(chunk), list(chunk), idx, cnt)
    with pytest.raises(ValueError, match=rf"indices: expected shape \[1, 2, {n}, max_sel\]"):
        check_op_block_geometry("op", q, seq, list(grid), list(grid), list(chunk), list(chunk),
                                idx[:, :, :-1], cnt[:, :, :-1])


# ---- "a, b, c ... (+N more)": loading._list ---------------------------------------------------------------

def test_name_list_helper_written_once():
    """The "first N names ... (+k more)" rule was written in loading.py, lora.py (`_short_list`) and
    twice in pipeline.py; the LoRA "match no Linear module" line cut at 20 names with a bare " ..."."""
    assert _writers(r"more\)\"") == ["longcat_vc/loading.py"]
    import longcat_vc.lora as lora

    assert not hasattr(lora, "_short_list")


def test_name_list_helper_output():
    from longcat_vc.loading import _list

    names = [f"n{i}" for i in range(7)]
    assert _list(names, 7) == ", ".join(names)
    assert _list(names, 3) == "n0, n1, n2 ... (+4 more)"
    assert _list([], 3) == ""


def test_lora_unmatched_keys_message_counts_the_rest(tmp_path):
    """A LoRA file with 23 keys no module takes: the message names 20 and says how many more (it said " ...")."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests" / "vc"))
    try:
        from tiny_ckpt import LORA_TARGETS_CFG_STEP, model_from_state_dict, random_state_dict, tiny_config, \
            write_longcat_lora
    finally:
        sys.path.pop(0)
    cfg = tiny_config()
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=int(torch.randint(0, 1000, ()))))
    t = write_longcat_lora(str(tmp_path / "ok.safetensors"), cfg, targets=LORA_TARGETS_CFG_STEP, rank=2, seed=5)
    bad = dict(t)
    for i in range(23):
        bad[f"lora___lorahyphen___nowhere{i:02d}.lora_down.weight"] = torch.zeros(2, 8)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError) as e:
        m.load_lora(str(tmp_path / "bad.safetensors"), "bad")
    msg = str(e.value)
    assert "23 key(s) match no Linear module" in msg and "(+3 more)" in msg, msg
