"""Round 66 (interruption and partial failure): an exception or a KeyboardInterrupt part way through a call
leaves the objects it changes consistent, and a re-run gives a clean run's result.

Fixed this round:

* ``apply_block_sparse_attention`` interrupted after the first block's processor: the hooks stayed registered
  and some blocks ran our processor without the model's record, so a second apply was refused ("a copy of an
  applied model?") and ``remove_block_sparse_attention`` was a no-op: the model stayed half-applied for good.
  The install is now all or nothing.
* ``fuse_lora`` / ``unfuse_lora`` failing part way (out of memory for one module's delta) changed the weights of
  the modules done so far without bumping the model's state counter: a KV cache built before passed the
  compiled forward's check (the counter only) as fresh.
* the bench writer left its half-written ``.json.tmp`` / ``.csv.tmp`` beside the results when interrupted, and
  the GPU scripts (``wan_step_gpu``, ``refine_step_gpu``, ...) rewrote their JSON in place with ``json.dump``:
  a kill (or a value whose ``str()`` failed) while writing lost the parts written before.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
import threading

import pytest
import torch

from helpers import folder_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _seed() -> int:
    return int(torch.randint(0, 2**31, ()).item())


def _finite_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.isfinite(a).all() and torch.isfinite(b).all() and torch.equal(a, b))


# ------------------------------------------------------------------ diffusers: apply / remove block-sparse attention

def _wan_inputs(F=2, H=8, W=12, seed=None):
    g = torch.Generator().manual_seed(_seed() if seed is None else seed)
    return dict(hidden_states=torch.randn(1, 4, F, H, W, generator=g), timestep=torch.tensor([300]),
                encoder_hidden_states=torch.randn(1, 7, 24, generator=g), return_dict=False)


def _no_hooks(m) -> bool:
    return not m._forward_hooks and not m._forward_pre_hooks and not m.rope._forward_hooks


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("where", ["processor", "set_processor"])
def test_apply_block_sparse_interrupted_part_way_leaves_the_model_as_it_was(monkeypatch, exc, where):
    pytest.importorskip("diffusers")
    from helpers import tiny_wan

    import longcat_kernels as lk
    from longcat_kernels.integrations import diffusers as integ

    P = lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2))
    seed = _seed()
    m, clean = tiny_wan(seed=seed % 1000), tiny_wan(seed=seed % 1000)
    originals = [b.attn1.processor for b in m.blocks]
    calls = []
    if where == "processor":
        real = integ.BlockSparseWanAttnProcessor.__init__

        def init(self, *a, **k):
            calls.append(1)
            if len(calls) == 2:  # the second block's processor: the first block is already ours
                raise exc("interrupted")
            real(self, *a, **k)

        monkeypatch.setattr(integ.BlockSparseWanAttnProcessor, "__init__", init)
    else:
        attn = m.blocks[1].attn1

        def fail(proc):
            raise exc("interrupted")

        monkeypatch.setattr(attn, "set_processor", fail)
    with pytest.raises(exc):
        integ.apply_block_sparse_attention(m, P, backend="torch")
    monkeypatch.undo()
    assert [b.attn1.processor for b in m.blocks] == originals
    assert _no_hooks(m) and getattr(m, integ._ATTR, None) is None
    # the model is as before: a dense forward equals a never-touched model's, and apply runs again
    x = _wan_inputs()
    with torch.no_grad():
        assert _finite_equal(m(**x)[0], clean(**x)[0])
    integ.apply_block_sparse_attention(m, P, backend="torch")
    integ.apply_block_sparse_attention(clean, P, backend="torch")
    with torch.no_grad():
        assert _finite_equal(m(**x)[0], clean(**x)[0])
    integ.remove_block_sparse_attention(m)
    assert [b.attn1.processor for b in m.blocks] == originals and _no_hooks(m)


def test_remove_block_sparse_interrupted_part_way_completes_on_a_second_call(monkeypatch):
    """(pinned) an interrupted remove keeps the record: a second remove puts every processor back."""
    pytest.importorskip("diffusers")
    from helpers import tiny_wan

    import longcat_kernels as lk
    from longcat_kernels.integrations import diffusers as integ

    m = tiny_wan(seed=_seed() % 1000)
    originals = [b.attn1.processor for b in m.blocks]
    integ.apply_block_sparse_attention(m, lk.BlockSparseParams(sparsity=0.5, chunk_q=(1, 2, 2)), backend="torch")
    attn = m.blocks[1].attn1
    real = attn.set_processor

    def fail(proc):
        raise KeyboardInterrupt

    monkeypatch.setattr(attn, "set_processor", fail)
    with pytest.raises(KeyboardInterrupt):
        integ.remove_block_sparse_attention(m)
    monkeypatch.setattr(attn, "set_processor", real)
    integ.remove_block_sparse_attention(m)
    assert [b.attn1.processor for b in m.blocks] == originals
    assert _no_hooks(m) and getattr(m, integ._ATTR, None) is None


# ------------------------------------------------------------------ LoRA fuse / unfuse, fp8 quantisation

def _tiny_dit(seed):
    tc = folder_module("vc", "tiny_ckpt")
    cfg = tc.tiny_config()
    return cfg, tc.model_from_state_dict(cfg, tc.random_state_dict(cfg, seed=seed))


def _dit_inputs(cfg, seed, B=1, T=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, 4, 6, generator=g)
    t = torch.rand(B, generator=g) * 1000
    y = torch.randn(B, 1, 7, cfg.caption_channels, generator=g)
    return x, t, y, torch.ones(B, 7, dtype=torch.long)


def _with_lora(tmp_path, seed):
    tc = folder_module("vc", "tiny_ckpt")
    cfg, m = _tiny_dit(seed)
    path = str(tmp_path / "lora.safetensors")
    if not os.path.exists(path):
        tc.write_longcat_lora(path, cfg)
    m.load_lora(path, "a")
    m.enable_loras(["a"])
    return cfg, m


def _fail_on_nth_fuse(monkeypatch, method, n, exc):
    from longcat_vc.lora import LoRALinear

    real = getattr(LoRALinear, method)
    done = []

    def patched(self):
        if self.lora_active:
            done.append(1)
            if len(done) == n:
                raise exc("CUDA out of memory (simulated)")
        return real(self)

    monkeypatch.setattr(LoRALinear, method, patched)


@pytest.mark.parametrize("exc", [torch.OutOfMemoryError, KeyboardInterrupt])
def test_fuse_lora_failing_part_way_marks_kv_caches_stale_and_completes_on_a_rerun(tmp_path, monkeypatch, exc):
    from longcat_vc.lora import _lora_linears, fused_loras

    seed = _seed()
    cfg, m = _with_lora(tmp_path, seed)
    _, clean = _with_lora(tmp_path, seed)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    x, t, y, mask = _dit_inputs(cfg, seed)
    with torch.no_grad():
        cache = m.build_kv_cache(x[:, :, :1])
    _fail_on_nth_fuse(monkeypatch, "_fuse", 3, exc)
    with pytest.raises(exc):
        m.fuse_lora()
    monkeypatch.undo()
    part = [bool(mod.lora_fused) for _, mod in _lora_linears(m) if mod.lora_active]
    assert part.count(True) == 2 and not all(part)  # two modules fused, the rest not: each knows its own state
    # the weights changed: a cache built before is stale for the eager check and for the traced (counter) check
    with pytest.raises(ValueError, match="stale"):
        m._check_cache_counter(cache)
    with pytest.raises(ValueError, match="stale"), torch.no_grad():
        m(x[:, :, 1:], t, y, mask, num_cond_latents=1, kv_cache=cache)
    # a re-run completes the fuse: exactly a clean fuse's weights and output
    m.fuse_lora()
    clean.fuse_lora()
    assert fused_loras(m) == ["a"]
    with torch.no_grad():
        assert _finite_equal(m(x, t, y, mask), clean(x, t, y, mask))
    m.unfuse_lora()
    for k, v in m.state_dict().items():  # within the documented 1 ulp of the round trip
        torch.testing.assert_close(v, base[k], rtol=1e-6, atol=1e-7)


def test_unfuse_lora_failing_part_way_marks_kv_caches_stale_and_completes_on_a_rerun(tmp_path, monkeypatch):
    from longcat_vc.lora import fused_loras

    seed = _seed()
    cfg, m = _with_lora(tmp_path, seed)
    _, clean = _with_lora(tmp_path, seed)
    m.fuse_lora()
    clean.fuse_lora()
    x, t, y, mask = _dit_inputs(cfg, seed)
    with torch.no_grad():
        cache = m.build_kv_cache(x[:, :, :1])
    _fail_on_nth_fuse(monkeypatch, "_unfuse", 2, torch.OutOfMemoryError)
    with pytest.raises(torch.OutOfMemoryError):
        m.unfuse_lora()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="stale"):
        m._check_cache_counter(cache)
    m.unfuse_lora()
    clean.unfuse_lora()
    assert fused_loras(m) == []
    with torch.no_grad():
        assert _finite_equal(m(x, t, y, mask), clean(x, t, y, mask))


def test_quantize_dit_fp8_interrupted_part_way_then_rerun_equals_a_clean_quantisation(monkeypatch):
    """(pinned) the modules converted so far stay converted; a second call converts the rest only."""
    import longcat_vc.fp8 as fp8

    seed = _seed()
    cfg, m = _tiny_dit(seed)
    _, clean = _tiny_dit(seed)
    n_all = len(fp8.quantize_dit_fp8(clean, emulate=True))
    real, calls = fp8.quantize_rows, []

    def interrupted(w):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(w)

    monkeypatch.setattr(fp8, "quantize_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fp8.quantize_dit_fp8(m, emulate=True)
    monkeypatch.undo()
    assert len(fp8.quantize_dit_fp8(m, emulate=True)) == n_all - 3
    x, t, y, mask = _dit_inputs(cfg, seed)
    with torch.no_grad():
        assert _finite_equal(m(x, t, y, mask), clean(x, t, y, mask))


def test_a_failed_lora_call_leaves_the_model_lock_free(tmp_path, monkeypatch):
    """(pinned) the LoRA lock is released by an exception: another thread's fuse does not wait on it."""
    from longcat_vc.lora import model_lock

    cfg, m = _with_lora(tmp_path, _seed())
    _fail_on_nth_fuse(monkeypatch, "_fuse", 1, RuntimeError)
    with pytest.raises(RuntimeError):
        m.fuse_lora()
    monkeypatch.undo()
    got = []
    th = threading.Thread(target=lambda: got.append(model_lock(m).acquire(timeout=10)), daemon=True)
    th.start()
    th.join(20)
    assert got == [True]


# ------------------------------------------------------------------ the bench writer and the GPU scripts' JSON

MACHINE = {"date": "2026-01-01T00:00:00Z", "device_slug": "cpu-x", "cpu": "x"}


def _rows(n):
    return [dict(suite="pipeline", case=f"c{i}", backend="torch", status="ok", ms=1.0 + i) for i in range(n)]


def test_write_results_interrupted_in_the_json_leaves_the_previous_file_and_no_tmp(tmp_path, monkeypatch):
    from bench import writer

    jpath, cpath = writer.write_results(tmp_path, MACHINE, {"quick": True}, _rows(2), "run")
    before_j, before_c = jpath.read_text(), cpath.read_text()
    real_write = writer.Path.open

    def cut(self, *a, **k):
        f = real_write(self, *a, **k)
        if self.name.endswith(".json.tmp"):
            w = f.write

            def half(text):
                w(text[: len(text) // 2])
                raise KeyboardInterrupt

            f.write = half
        return f

    monkeypatch.setattr(writer.Path, "open", cut)
    with pytest.raises(KeyboardInterrupt):
        writer.write_results(tmp_path, MACHINE, {"quick": True}, _rows(3), "run")
    monkeypatch.undo()
    assert jpath.read_text() == before_j and cpath.read_text() == before_c
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.csv", "run.json"]
    assert len(writer.load_results(jpath)["rows"]) == 2


def test_write_results_interrupted_in_the_csv_leaves_no_tmp(tmp_path, monkeypatch):
    from bench import writer

    _, cpath = writer.write_results(tmp_path, MACHINE, {"quick": True}, _rows(2), "run")
    before = cpath.read_text()
    real, n = csv.DictWriter.writerow, []

    def killed(self, row):
        n.append(1)
        if len(n) > 1:
            raise KeyboardInterrupt
        return real(self, row)

    monkeypatch.setattr(csv.DictWriter, "writerow", killed)
    with pytest.raises(KeyboardInterrupt):
        writer.write_results(tmp_path, MACHINE, {"quick": True}, _rows(3), "run")
    monkeypatch.undo()
    assert cpath.read_text() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class _Bad:
    """A value the GPU scripts' ``json.dump(..., default=str)`` writes with ``str()``, which fails."""

    def __str__(self):
        raise KeyboardInterrupt


def test_write_json_failing_mid_document_keeps_the_previous_file(tmp_path):
    from bench import writer

    out = tmp_path / "r.json"
    writer.write_json(out, {"part": 1}, indent=2, default=str)
    before = out.read_text()
    with pytest.raises(KeyboardInterrupt):
        writer.write_json(out, {"part": 2, "late": _Bad()}, indent=2, default=str)
    assert out.read_text() == before and json.loads(before) == {"part": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_wan_step_script_interrupted_while_writing_keeps_the_previous_result_file(tmp_path, monkeypatch):
    """``json.dump(res, open(out, "w"))``: the file was truncated when opened, then the dump stopped at the bad
    value: the previous run's whole result was replaced by half a document."""
    pytest.importorskip("diffusers")
    import bench.machine

    spec = importlib.util.spec_from_file_location("r66_wan_step", os.path.join(ROOT, "bench", "wan_step_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "wan.json"
    out.write_text('{"previous": "run"}\n')
    monkeypatch.setattr(bench.machine, "machine_header", lambda device: {"gpu": _Bad()})
    monkeypatch.setattr(mod, "check", lambda *a: {"ok": False})
    with pytest.raises(KeyboardInterrupt):
        mod.main(["--out", str(out)])
    assert json.loads(out.read_text()) == {"previous": "run"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wan.json"]
