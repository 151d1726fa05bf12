"""Round 74 (a new user's walk through README.md, DESIGN.md and examples/): a bench grid whose
--cond-frames leave no noisy latent errored the whole suite (the other grids went untimed) instead of
being skipped as the README says; the README's torch.compile snippet failed as written; a selection of
another grid in attn_with_kv_cache was refused naming ``grid_k``, an argument the op does not have;
the out-of-memory hint told a user who had set ``PYTORCH_ALLOC_CONF=expandable_segments:True`` to set it."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch

import longcat_kernels as lk

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _readme_block(after: str, fence: str = "python") -> str:
    """The first ```fence block after the text ``after`` in the README."""
    i = README.index(after)
    m = re.compile(r"```" + fence + r"\n(.*?)```", re.S).search(README, i)
    assert m, after
    return m.group(1)


# ----------------------------------------------------------------------------- bench: --cond-frames per grid


def test_bench_grid_without_noisy_latent_is_skipped_and_other_grids_still_run(capsys):
    """``--shapes 24x2x4,4x2x4 --cond-frames 29``: 29 frames = 8 latents, none noisy on the 4-frame grid.
    cases() raised for that grid, so both suites reported one ERROR and timed nothing, not even 24x2x4."""
    from bench.cli import main

    rc = main(["--quick", "--suite", "cache,cached-attn", "--cond-frames", "29", "--shapes", "24x2x4,4x2x4",
               "--no-write"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "ERROR" not in out and "FAILED" not in out, out
    assert re.search(r"24x2x4/c8/on\s", out) and re.search(r"24x2x4/c8/kv-cache\s", out), out
    assert "4x2x4/c8/kv-cache" in out and "29 cond frames = 8 cond latents leave no noisy latent on grid 4x2x4" in out
    assert "4 skipped" in out  # cache off/on/build + cached-attn kv-cache of the 4-frame grid


@pytest.mark.parametrize("suite", ["cache", "cached-attn"])
def test_bench_every_cond_value_left_out_is_skipped_not_an_error(suite):
    """Every --cond-frames value leaving no noisy latent: each reported as skipped with the reason (README),
    not a ValueError out of cases()."""
    from bench.shapes import parse_grid
    from bench.suites import Context, load_suite

    ctx = Context(device=torch.device("cpu"), dtype=torch.float32, log=lambda m: None, quick=True,
                  cond_frames=(93, 97), grids=[parse_grid("24x2x4")])
    cs = load_suite(suite).cases(ctx)
    assert cs and all(c.skip and "no noisy latent" in c.skip for c in cs), [(c.name, c.skip) for c in cs]
    assert {c.params["cond_frames"] for c in cs} == {93, 97}


# ----------------------------------------------------------------------------- README snippets


def test_readme_compile_snippet_runs_as_written_after_the_merging_example(monkeypatch):
    """The ``torch.compile`` line uses the ``grid`` of the merging example just above it, (2, 4, 4): with
    the default 4x4x4 chunk it raised ``chunk_q: expected each chunk size <= grid_q``. Run both blocks as
    written (dynamo's eager backend, fullgraph kept, so no inductor build) and compare with eager."""
    merge = _readme_block("Results over disjoint key sets merge exactly")
    compiled = _readme_block("`np.float32` `sparsity` as a tensor", fence="")
    assert "torch.compile(" in compiled and "fullgraph=True" in compiled
    real = torch.compile

    def eager_compile(fn, **kw):
        assert kw.get("fullgraph") is True
        return real(fn, backend="eager", **{k: v for k, v in kw.items() if k != "backend"})

    monkeypatch.setattr(torch, "compile", eager_compile)
    torch._dynamo.reset()
    ns: dict = {}
    exec(compile(merge, "README.md", "exec"), ns)
    exec(compile(compiled, "README.md", "exec"), ns)
    got = ns["out"]
    kw = dict(grid_q=ns["grid"], chunk_q=(1, 2, 2), sparsity=0.875)
    want = lk.block_sparse_attn(ns["q"], ns["k"], ns["v"], **kw)
    assert torch.isfinite(got).all() and got.abs().amax() > 0  # a chunk keeping 0 blocks printed zeros
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch._dynamo.reset()


def test_readme_dit_alone_snippet_cache_on_equals_cache_off(capsys):
    """The ```py DiT block (not run by test_readme, which takes ```python only): runs on the tiny config
    and prints a relative difference below the stated ~1e-7 scale (fp32), never NaN."""
    code = _readme_block("The DiT alone (`longcat_vc.LongCatDiT`", fence="py")
    exec(compile(code, "README.md", "exec"), {})
    val = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert val == val and val < 1e-5


# ----------------------------------------------------------------------------- attn_with_kv_cache selection errors


def _cache_inputs(Tn=2, Tc=2, H=4, W=6, heads=2, D=16):
    rope = lk.Rope3D((Tc + Tn, H, W), D)
    q, k, v = (torch.randn(1, Tn * H * W, heads, D) for _ in range(3))
    kc, vc = (torch.randn(1, Tc * H * W, heads, D) for _ in range(2))
    return rope, q, k, v, kc, vc


def test_cache_selection_of_another_key_grid_names_block_sparse_selection():
    """A selection built for a [cache; fresh] key grid, passed with no cache: the error read
    ``grid_k: expected (4, 4, 6) (selection.grid_k) or nothing with selection=`` though the op has no
    grid_k argument; it names ``block_sparse.selection.grid_k`` and the call's own key grid now."""
    rope, q, k, v, kc, vc = _cache_inputs()
    sel = lk.select_blocks(q, torch.cat([kc, k], 1), grid_q=(2, 4, 6), grid_k=(4, 4, 6), chunk_q=(2, 2, 2),
                           sparsity=0.5)
    bs = lk.BlockSparseParams(selection=sel, sparsity=None)
    with pytest.raises(ValueError, match=r"^block_sparse\.selection\.grid_k: expected the key grid .*\(2, 4, 6\), "
                                         r"got \(4, 4, 6\)"):
        lk.attn_with_kv_cache(q, k, v, rope=rope, block_sparse=bs)
    with pytest.raises(ValueError, match=r"^block_sparse\.selection\.grid_q: expected q's grid .*\(1, 4, 6\), "
                                         r"got \(2, 4, 6\)"):
        lk.attn_with_kv_cache(q[:, :24], k[:, :24], v[:, :24], kc, vc, rope=rope, block_sparse=bs)
    # the matching call runs, equal to block_sparse_attn over the explicit concatenation (after RoPE)
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope, block_sparse=bs)
    qr, kr = lk.apply_rope_3d(q, rope, frame_offset=2), lk.apply_rope_3d(k, rope, frame_offset=2)
    want = lk.block_sparse_attn(qr, torch.cat([kc, kr], 1), torch.cat([vc, v], 1), selection=sel)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_attn_with_kv_cache_gqa_as_its_docstring_now_says():
    """The docstring gave k/v/cache ``heads`` like q's; GQA (fewer kv heads dividing q's) is taken, dense."""
    doc = inspect.getdoc(lk.attn_with_kv_cache)
    assert "GQA" in doc and "heads_kv" in doc
    rope, q, _, _, kc, vc = _cache_inputs(heads=4)
    k, v = torch.randn(1, q.shape[1], 2, 16), torch.randn(1, q.shape[1], 2, 16)
    kc, vc = kc[:, :, :2].contiguous(), vc[:, :, :2].contiguous()
    out = lk.attn_with_kv_cache(q, k, v, kc, vc, rope=rope)
    rep = [t.repeat_interleave(2, dim=2) for t in (k, v, kc, vc)]
    want = lk.attn_with_kv_cache(q, *rep, rope=rope)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- OOM hint


_FRAG = ("CUDA out of memory. Tried to allocate 2.00 GiB. Of the allocated memory 12.50 GiB is allocated by "
         "PyTorch, and 10.40 GiB is reserved by PyTorch but unallocated.")


@pytest.mark.parametrize("var", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_oom_hint_does_not_ask_for_expandable_segments_already_set(monkeypatch, var):
    """torch reads either variable (the CLI's own default checks both): with
    ``PYTORCH_ALLOC_CONF=expandable_segments:True`` the error still said to set it."""
    from longcat_vc.stages import _oom_error

    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    kw = dict(use_kv_cache=True, offload_kv_cache=False, memory="resident", cause=RuntimeError(_FRAG))
    assert "fragmentation" in str(_oom_error("denoising", **kw))
    monkeypatch.setenv(var, "max_split_size_mb:512, expandable_segments:True")
    msg = str(_oom_error("denoising", **kw))
    assert "fragmentation" not in msg and "offload_kv_cache=True" in msg


def test_bench_run_with_every_case_skipped_exits_1_naming_the_reason(capsys):
    """README: a run in which no case was timed exits 1; the cases are skipped with the reason (not ERROR)."""
    from bench.cli import main

    rc = main(["--quick", "--suite", "cached-attn", "--cond-frames", "93", "--shapes", "24x2x4", "--no-write"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "ERROR" not in out and "93 cond frames = 24 cond latents leave no noisy latent" in out, out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_cache_is_no_cache_with_rope_and_block_sparse(backend):
    """README: a cache of 0 tokens is the same as no cache (rope frames from 0, block-sparse key grid = fresh)."""
    rope, q, k, v, _, _ = _cache_inputs(Tn=2, Tc=1)
    empty = torch.randn(1, 0, q.shape[2], q.shape[3])
    for bs in (None, lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))):
        a = lk.attn_with_kv_cache(q, k, v, empty, empty, rope=rope, block_sparse=bs, backend=backend)
        b = lk.attn_with_kv_cache(q, k, v, rope=rope, block_sparse=bs, backend=backend)
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
