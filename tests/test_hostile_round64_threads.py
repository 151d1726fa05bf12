"""Round 64 hostile audit: concurrency and re-entrancy (a server's request threads, DataLoader workers).

Several Python threads calling the public ops (torch reference and the Triton CPU interpreter) and the
``longcat_vc`` DiT / LoRA API at once must give the single-threaded answers; forked and spawned DataLoader
workers must run the ops after the parent already did."""
from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import dispatch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "vc"))

from longcat_vc.lora import fused_loras  # noqa: E402
from tiny_ckpt import model_from_state_dict, random_state_dict, tiny_config, write_longcat_lora  # noqa: E402


def _seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()))


def _in_threads(fn, args_list):
    """Runs ``fn(*args)`` for each args in its own thread, all released together; returns the results
    (an exception in a thread is raised here)."""
    barrier = threading.Barrier(len(args_list))
    out, errors = [None] * len(args_list), []

    def run(i, args):
        try:
            barrier.wait()
            out[i] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i, a)) for i, a in enumerate(args_list)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    if errors:
        raise errors[0]
    return out


def _assert_same(got, ref):
    for g, r in zip(got, ref):
        assert torch.isfinite(r).all()
        assert torch.equal(g, r)


# ---------------------------------------------------------------------- LoRA state from two threads
@pytest.fixture
def lora_model(tmp_path):
    cfg = tiny_config(attn_backend="torch")
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    path = str(tmp_path / "a.safetensors")
    write_longcat_lora(path, cfg, seed=_seed())
    model.load_lora(path, "a")
    model.enable_loras(["a"])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    model.fuse_lora()
    fused = {k: v.clone() for k, v in model.state_dict().items()}
    model.unfuse_lora()
    assert any(not torch.equal(base[k], fused[k]) for k in base)
    return model, base, fused


def _max_err(model, want):
    sd = model.state_dict()
    return max((sd[k] - want[k]).abs().max().item() for k in want)


def test_fuse_lora_from_two_threads_fuses_once(lora_model):
    """Both threads' ``fuse_lora`` found nothing fused and added the delta: W + 2 delta, and the unfuse
    took one back (base weights lost, 0.23 off on the tiny model, every later output wrong)."""
    model, base, fused = lora_model
    for _ in range(5):
        _in_threads(model.fuse_lora, [(), ()])
        assert _max_err(model, fused) < 1e-6
        assert fused_loras(model) == ["a"]
        model.unfuse_lora()
        assert _max_err(model, base) < 1e-6


def test_unfuse_lora_from_two_threads_subtracts_once(lora_model):
    model, base, fused = lora_model
    for _ in range(5):
        model.fuse_lora()
        _in_threads(model.unfuse_lora, [(), ()])
        assert _max_err(model, base) < 1e-6


def test_enable_fuse_disable_from_threads_leave_consistent_weights(lora_model):
    """Mixed LoRA calls from several threads end in a state some serial order gives: after a final
    ``disable_loras`` the base weights are back exactly (up to the fuse round trip)."""
    model, base, fused = lora_model
    calls = [model.fuse_lora, model.unfuse_lora, lambda: model.enable_loras(["a"]), model.fuse_lora,
             model.disable_loras, lambda: model.enable_loras(["a"])]
    for _ in range(3):
        _in_threads(lambda f: f(), [(c,) for c in calls])
        model.disable_loras()
        assert _max_err(model, base) < 1e-6


# ---------------------------------------------------------------------- Triton interpreter
def _interp_ops(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 16, 2, 16, generator=g) for _ in range(3))
    rope = lk.Rope3D((1, 4, 4), 16)
    w = torch.rand(16, generator=g) + 0.5
    qn, kn = lk.qk_norm_rope(q, k, w, w, rope, backend="triton")
    o = lk.prefix_attn(q, k, v, 8, backend="triton")
    o2 = lk.attn_with_kv_cache(q[:, 8:], k[:, 8:], v[:, 8:], k[:, :8], v[:, :8], backend="triton")
    fq, fs = lk.fp8_quantize_rows(q.reshape(-1, 16), backend="triton")[:2]
    return [qn, kn, o, o2, fq.float(), fs]


@pytest.mark.triton_interpret
def test_interpreted_triton_ops_from_threads_match_single_thread():
    """The Triton CPU interpreter keeps a launch's grid and patched ``tl`` functions in module globals: two
    threads launching at once failed with ``InterpreterError("ValueError('x >= grid_dim[0]')")``."""
    seeds = [_seed() + i for i in range(4)]
    ref = [_interp_ops(s) for s in seeds]
    for got, r in zip(_in_threads(_interp_ops, [(s,) for s in seeds]), ref):
        _assert_same(got, r)


def _bsa_train(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 32, 1, 16, generator=g).requires_grad_() for _ in range(3))
    o = lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), sparsity=0.5, backend="triton")
    o.square().sum().backward()
    return [o.detach(), q.grad, k.grad, v.grad]


@pytest.mark.triton_interpret
def test_interpreted_block_sparse_forward_backward_from_threads():
    seeds = [_seed() + i for i in range(3)]
    ref = [_bsa_train(s) for s in seeds]
    for got, r in zip(_in_threads(_bsa_train, [(s,) for s in seeds]), ref):
        _assert_same(got, r)


def test_launcher_takes_no_lock_for_compiled_kernels():
    class Kernel:  # a stand-in compiled kernel
        def __getitem__(self, grid):
            return lambda *a: ("launch", grid, dispatch._INTERPRETER_LOCK._is_owned())

    assert dispatch.launcher(Kernel(), (3,))(torch.zeros(1)) == ("launch", (3,), False)


# ---------------------------------------------------------------------- torch reference ops, choices
def _torch_ops(seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 32, 2, 8, generator=g) for _ in range(3))
    rope = lk.Rope3D((2, 4, 4), 8)
    w = torch.rand(8, generator=g) + 0.5
    with dispatch.record_choices() as got:
        out = [*lk.qk_norm_rope(q, k, w, w, rope, backend="torch"),
               lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(1, 2, 2), sparsity=0.5),
               lk.prefix_attn(q, k, v, 16),
               lk.attn_with_kv_cache(q[:, 16:], k[:, 16:], v[:, 16:], k[:, :16], v[:, :16], rope=rope)]
    mine = [c.op for c in got]
    return out, mine


def test_torch_ops_and_recorders_from_threads():
    """Results equal the single-threaded ones; each thread's ``record_choices`` lists at least its own
    calls' choices, in order (the recorders are process-wide, as documented: others' may be in between)."""
    seeds = [_seed() + i for i in range(6)]
    ref = [_torch_ops(s) for s in seeds]
    own = ref[0][1]
    assert {"qk_norm_rope", "block_sparse_attn", "prefix_attn", "attn_with_kv_cache"} <= set(own)
    for (got, mine), (r, _) in zip(_in_threads(_torch_ops, [(s,) for s in seeds]), ref):
        _assert_same(got, r)
        it = iter(mine)
        assert all(op in it for op in own), (mine, own)  # own choices form a subsequence
    assert not dispatch._RECORDERS


# ---------------------------------------------------------------------- DiT forward and KV cache builds
def test_dit_forward_and_kv_cache_builds_from_threads():
    from test_dit import make_inputs

    cfg = tiny_config(attn_backend="torch")
    model = model_from_state_dict(cfg, random_state_dict(cfg, seed=_seed()))
    inputs = [make_inputs(cfg, B=2, T=2, H=4, W=4, L=5, seed=_seed(), shared_cond=1) for _ in range(4)]

    def job(i):
        x, t, y, mask = inputs[i]
        with torch.no_grad():
            cache = model.build_kv_cache(x[:1, :, :1])
            return [model(x[:, :, 1:], t, y, mask, kv_cache=cache), model(x, t, y, mask, num_cond_latents=1)]

    ref = [job(i) for i in range(4)]
    for got, r in zip(_in_threads(job, [(i,) for i in range(4)]), ref):
        _assert_same(got, r)


# ---------------------------------------------------------------------- DataLoader workers
class _OpsDataset(torch.utils.data.Dataset):
    def __init__(self, seed):
        self.seed = seed

    def __len__(self):
        return 3

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed + i)
        q, k, v = (torch.randn(1, 16, 2, 16, generator=g) for _ in range(3))
        with dispatch.record_choices() as got:
            out = [lk.prefix_attn(q, k, v, 8, backend=b) for b in self.backends()]
        return out, [c.impl for c in got]

    @staticmethod
    def backends():
        return ("torch", "triton") if dispatch.triton_interpret() and dispatch.triton_status() is None else ("torch",)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_dataloader_workers_run_the_ops_after_the_parent(method):
    import multiprocessing as mp

    if method not in mp.get_all_start_methods():
        pytest.skip(f"start method {method!r} not available")
    ds = _OpsDataset(_seed())
    ref = [ds[i] for i in range(len(ds))]  # the parent used the ops (and the interpreter) first
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context=method)
    got = list(loader)
    assert len(got) == len(ref)
    for (out, impls), (r_out, r_impls) in zip(got, ref):
        assert impls == r_impls
        _assert_same(out, r_out)


# ---------------------------------------------------------------------- tensor stamps
def test_tensor_stamp_is_one_per_tensor_across_threads():
    """Two threads stamping a fresh tensor at once each got their own stamp (one replaced in the table):
    a KV cache built from the losing thread's fingerprint was then refused as stale ("the weights
    changed"), e.g. two requests' first ``build_kv_cache`` on a freshly loaded model."""
    from longcat_vc.kv_cache import tensor_stamp

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(300):
            ts = [torch.zeros(1) for _ in range(200)]
            a, b = _in_threads(lambda: [tensor_stamp(t) for t in ts], [(), ()])
            assert a == b == [tensor_stamp(t) for t in ts]
    finally:
        sys.setswitchinterval(old)
