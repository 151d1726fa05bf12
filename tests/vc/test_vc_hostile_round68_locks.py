"""Round 68 hostile audit: the locks of rounds 64-66 (``lora.model_lock``, the Triton interpreter's launch lock,
``kv_cache.tensor_stamp``'s) under deadlock-prone use.

* a pipeline on ``torch.compile(dit)`` and one on ``dit`` keyed the DiT's lock and LoRA owner on the
  wrapper: two locks and two owners for one DiT, and the basic pipeline's calls ran with the distill
  pipeline's cfg-step LoRA (rel. L2 0.17) without a word. ``lora.compiled_original`` is the key now.
* an adapter's ``multiplier`` (or a part's ``scale``) set from another thread during ``fuse_lora`` went in
  between a module's delta and its fused flag: the unfuse subtracted another delta and the base weights
  were lost. The change waits for the fuse now (and is then refused as fused).

Every thread joins with a timeout: a deadlock fails the test instead of hanging it."""
from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch

from longcat_vc import lora as L
from longcat_vc.lora import model_lock
from longcat_vc.pipeline import CFG_STEP_LORA, VideoContinuationPipeline
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora
from vc_components import full_checkpoint_in, tiny_vc_latents

JOIN_S = 60


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _thread(fn):
    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001 - inspected by the test
            box["err"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, box


def _lora_model(tmp_path):
    cfg = tiny_config(attn_backend="torch")
    m = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    path = str(tmp_path / f"l{_seed()}.safetensors")
    write_longcat_lora(path, cfg, seed=_seed())
    m.load_lora(path, "a")
    m.enable_loras(["a"])
    return m


def _first_adapter(m):
    return next(mod.lora_adapters["a"] for _, mod in L._lora_linears(m) if "a" in mod.lora_adapters)


def _other_holds_lock(lock):
    """True when another thread holds ``lock`` (an acquire from a fresh thread times out)."""
    got = []
    th = threading.Thread(target=lambda: got.append(lock.acquire(timeout=0.2)) or (got[0] and lock.release()),
                          daemon=True)
    th.start()
    th.join(JOIN_S)
    return got == [False]


# ------------------------------------------------------------------ torch.compile(dit) is that DiT
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return full_checkpoint_in(tmp_path_factory, "ckpt68")


def test_pipeline_on_compiled_dit_shares_the_dit_lora_owner(ckpt):
    basic = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="basic",
                                                      attn_backend="torch")
    ref_basic = tiny_vc_latents(basic)
    assert torch.isfinite(ref_basic).all()
    basic.dit.load_lora(f"{ckpt}/lora/cfg_step_lora.safetensors", CFG_STEP_LORA)
    compiled = torch.compile(basic.dit, backend="eager")
    distill = VideoContinuationPipeline(compiled, basic.vae, basic.text_encoder, basic.tokenizer,
                                        {"shift": basic.shift}, mode="distill")
    assert model_lock(compiled) is model_lock(basic.dit)
    ref_distill = tiny_vc_latents(distill)
    assert torch.isfinite(ref_distill).all() and not torch.allclose(ref_distill, ref_basic)
    torch.testing.assert_close(tiny_vc_latents(basic), ref_basic, rtol=0, atol=0)
    assert basic.dit.active_loras == []
    torch.testing.assert_close(tiny_vc_latents(distill), ref_distill, rtol=0, atol=0)
    assert basic.dit.active_loras == [CFG_STEP_LORA]


def test_fuse_on_the_dit_waits_for_a_call_through_its_compiled_wrapper(tmp_path):
    m = _lora_model(tmp_path)
    compiled = torch.compile(m, backend="eager")
    held, release = threading.Event(), threading.Event()

    def hold():
        with model_lock(compiled):  # what a pipeline call on torch.compile(dit) holds
            held.set()
            release.wait(JOIN_S)

    th, _ = _thread(hold)
    assert held.wait(JOIN_S)
    fuser, box = _thread(m.fuse_lora)
    fuser.join(0.5)
    assert fuser.is_alive(), "fuse_lora on the DiT did not wait for the call on torch.compile(dit)"
    release.set()
    th.join(JOIN_S)
    fuser.join(JOIN_S)
    assert not fuser.is_alive() and "err" not in box
    assert L.fused_loras(m) == ["a"]


# ------------------------------------------------------------------ adapter edits during a fuse
@pytest.mark.parametrize("edit", ["multiplier", "scale"])
def test_adapter_edit_from_another_thread_during_fuse_keeps_base_weights(tmp_path, monkeypatch, edit):
    m = _lora_model(tmp_path)
    base = {k: v.clone() for k, v in m.state_dict().items()}
    a = _first_adapter(m)
    inside, go = threading.Event(), threading.Event()
    real_fuse, real_delta = L.LoRALinear._fuse, L.LoRAAdapter.delta_weight
    state = {"fusing": False}

    def fuse(self):
        state["fusing"] = True
        try:
            return real_fuse(self)
        finally:
            state["fusing"] = False

    def delta(self, *args, **kw):
        d = real_delta(self, *args, **kw)
        if state["fusing"] and self is a and not inside.is_set():
            inside.set()
            go.wait(2)  # the edit, if it does not wait for the fuse, lands here
        return d

    monkeypatch.setattr(L.LoRALinear, "_fuse", fuse)
    monkeypatch.setattr(L.LoRAAdapter, "delta_weight", delta)

    def change():
        if edit == "multiplier":
            a.multiplier = 3.0
        else:
            a.parts[0].scale = a.parts[0].scale * 3.0

    fuser, fbox = _thread(m.fuse_lora)
    assert inside.wait(JOIN_S)
    editor, ebox = _thread(change)
    editor.join(0.5)
    go.set()
    fuser.join(JOIN_S)
    editor.join(JOIN_S)
    assert not fuser.is_alive() and not editor.is_alive()
    assert "err" not in fbox
    monkeypatch.undo()
    m.unfuse_lora()
    for k, v in m.state_dict().items():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, base[k], rtol=1e-6, atol=1e-6)
    # the edit waited for the fuse and was then refused as the adapter is fused
    assert isinstance(ebox.get("err"), RuntimeError) and "fused" in str(ebox["err"])


def test_adapter_edit_needs_no_lock_of_an_unowned_adapter_and_bumps_the_owner(tmp_path):
    """(pinned) the edit under the model's lock, re-entrant: inside a held lock it goes through and counts."""
    m = _lora_model(tmp_path)
    a = _first_adapter(m)
    v0 = m._state_version
    with model_lock(m):
        a.multiplier = 0.5
    assert m._state_version > v0 and a.multiplier == 0.5
    free = L.LoRAAdapter("x", torch.randn(2, 4), [], 1.0)  # no owner: no lock taken
    free.multiplier = 2.0
    assert free.multiplier == 2.0


# ------------------------------------------------------------------ copies, pickles, interrupts
def test_deepcopy_and_pickle_of_a_locked_model_work_and_get_their_own_lock(tmp_path):
    m = _lora_model(tmp_path)
    m.fuse_lora()
    lock = model_lock(m)
    with lock:  # a copy made inside a call (holding the lock) copies no lock
        c = copy.deepcopy(m)
        p = pickle.loads(pickle.dumps(m))
    for other in (c, p):
        assert model_lock(other) is not lock
        # the copy's LoRA calls do not wait for the original's lock
        with lock:
            th, box = _thread(other.unfuse_lora)
            th.join(JOIN_S)
            assert not th.is_alive() and "err" not in box
            assert not _other_holds_lock(model_lock(other))


def test_keyboard_interrupt_in_a_pipeline_call_frees_the_dit_lock(ckpt, monkeypatch):
    pipe = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="distill",
                                                     attn_backend="torch")
    ref = tiny_vc_latents(pipe)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipe.dit, "forward", boom)
    with pytest.raises(KeyboardInterrupt):
        tiny_vc_latents(pipe)
    monkeypatch.undo()
    assert not _other_holds_lock(model_lock(pipe.dit))
    # another thread's call runs (no lock left held) and gives the same answer
    th, box = _thread(lambda: tiny_vc_latents(pipe))
    th.join(300)
    assert not th.is_alive() and "err" not in box
    assert torch.isfinite(box["out"]).all()
    torch.testing.assert_close(box["out"], ref, rtol=0, atol=0)


def test_two_pipelines_on_one_dit_in_two_threads_do_not_deadlock(ckpt):
    basic = VideoContinuationPipeline.from_pretrained(ckpt, dtype=torch.float32, device="cpu", mode="basic",
                                                      attn_backend="torch")
    basic.dit.load_lora(f"{ckpt}/lora/cfg_step_lora.safetensors", CFG_STEP_LORA)
    distill = VideoContinuationPipeline(torch.compile(basic.dit, backend="eager"), basic.vae, basic.text_encoder,
                                        basic.tokenizer, {"shift": basic.shift}, mode="distill")
    ref_b, ref_d = tiny_vc_latents(basic), tiny_vc_latents(distill)
    barrier = threading.Barrier(2)

    def run(p):
        barrier.wait(JOIN_S)
        return tiny_vc_latents(p)

    (tb, bb), (td, bd) = _thread(lambda: run(basic)), _thread(lambda: run(distill))
    tb.join(300)
    td.join(300)
    assert not tb.is_alive() and not td.is_alive(), "deadlock"
    assert "err" not in bb and "err" not in bd
    torch.testing.assert_close(bb["out"], ref_b, rtol=0, atol=0)
    torch.testing.assert_close(bd["out"], ref_d, rtol=0, atol=0)


def test_tensor_stamp_inside_a_weakref_callback_does_not_deadlock():
    """(pinned) a stamp taken from a freed tensor's weakref callback (the table's own callbacks run in
    whichever thread frees the tensor) neither waits on the stamp lock nor reuses a freed tensor's stamp."""
    import weakref

    from longcat_vc.kv_cache import tensor_stamp

    t = torch.randn(3)
    s0 = tensor_stamp(t)
    seen = []
    keep = torch.randn(2)
    ref = weakref.ref(t, lambda _: seen.append(tensor_stamp(keep)))
    del t
    assert len(seen) == 1 and seen[0] != s0 and ref() is None
    assert tensor_stamp(keep) == seen[0]
    assert tensor_stamp(torch.randn(3)) not in (s0, seen[0])


# ------------------------------------------------------------------ the Triton interpreter's launch lock
@pytest.mark.triton_interpret
def test_failed_interpreted_launch_frees_the_launch_lock_and_a_dit_call_holds_no_launch_lock():
    """(pinned) a launch that raises leaves the interpreter lock free, and the DiT lock held by a call does not
    keep another thread's interpreted op waiting (the launch lock is taken per launch only)."""
    import longcat_kernels as lk
    from longcat_kernels import dispatch
    from longcat_kernels.ops.fp8_quant.triton import fp8_rows_kernel

    with pytest.raises(Exception):  # noqa: B017 - any launch failure (wrong arguments)
        dispatch.launcher(fp8_rows_kernel, (1,))(torch.zeros(1))
    assert not _other_holds_lock(dispatch._INTERPRETER_LOCK)
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(_seed()))
    ref = lk.fp8_quantize_rows(x, backend="triton")[0].float()
    m = model_from_state_dict(tiny_config(attn_backend="torch"), random_state_dict(tiny_config(), seed=_seed()))
    release = threading.Event()
    holder, _ = _thread(lambda: model_lock(m).acquire() and release.wait(JOIN_S) and model_lock(m).release())
    th, box = _thread(lambda: lk.fp8_quantize_rows(x, backend="triton")[0].float())
    th.join(JOIN_S)
    release.set()
    holder.join(JOIN_S)
    assert not th.is_alive() and "err" not in box
    assert torch.isfinite(ref).all() and torch.equal(box["out"], ref)
