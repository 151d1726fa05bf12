"""Context parallelism (``longcat_vc.parallel``) on CPU with gloo: the sharded DiT equals the
single-process DiT (fp32, rel. L2 < 1e-5).

Each test starts 2 or 4 worker processes (this file run as a script, ``--worker``; rendezvous
through a file in the test's tmp dir, so no port is needed; a hard timeout kills them). Every
worker builds the same tiny model (seeded state dict) and the same fresh random inputs (seed drawn
by the test, printed on failure), runs the single-process reference itself and the sharded forward,
and writes the relative L2 errors as JSON; the test asserts on them. The CLI test runs
``torchrun --standalone`` (free port chosen by torchrun) on the tiny checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOL = 1e-5
WORKER_TIMEOUT_S = 150

_GPU_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _env() -> dict:
    env = dict(os.environ)
    for k, v in _GPU_ENV.items():
        env.setdefault(k, v)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, HERE] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["CUDA_VISIBLE_DEVICES"] = ""  # gloo on CPU, whatever the machine
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TRITON_INTERPRET", "1")
    return env


def _launch(world: int, scenario: str, tmp_path, timeout: float = WORKER_TIMEOUT_S) -> list:
    """Runs ``scenario`` on ``world`` worker processes; returns each rank's result dict."""
    seed = random.randrange(2**31)
    init = str(tmp_path / f"init_{scenario}_{world}")
    out = tmp_path / f"out_{scenario}_{world}"
    out.mkdir()
    procs = []
    logs = []
    for rank in range(world):
        log = open(tmp_path / f"log_{scenario}_{world}_{rank}.txt", "w+")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", scenario, str(rank), str(world), init,
             str(out), str(seed)],
            env=_env(), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        ))
    deadline = time.monotonic() + timeout
    timed_out = False
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    if timed_out:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    detail = f"seed {seed}\n" + "\n".join(f"--- rank {r} (rc {p.returncode})\n{t[-3000:]}"
                                           for r, (p, t) in enumerate(zip(procs, texts)))
    assert not timed_out, f"workers did not finish within {timeout:.0f} s\n{detail}"
    assert all(p.returncode == 0 for p in procs), detail
    results = []
    for rank in range(world):
        with open(out / f"rank{rank}.json") as f:
            results.append(json.load(f))
    return results


def _check(results: list, tol: float = TOL) -> None:
    """Every ``rel_*`` entry of every rank below ``tol`` (and finite)."""
    bad = []
    for rank, res in enumerate(results):
        for k, v in res.items():
            if k.startswith("rel_") and not (isinstance(v, float) and v < tol):
                bad.append(f"rank {rank}: {k} = {v}")
    assert not bad, "sharded != single process:\n" + "\n".join(bad)


# ============================================================================ tests

_RUNS = {}


@pytest.fixture(scope="module")
def run_world(tmp_path_factory):
    """``run_world(n)``: the results of all scenarios on ``n`` ranks (one launch per ``n``, cached)."""

    def get(world: int) -> list:
        if world not in _RUNS:
            _RUNS[world] = _launch(world, "all", tmp_path_factory.mktemp(f"cp{world}"))
        return _RUNS[world]

    yield get
    _RUNS.clear()


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_dit_equals_single_process(world, run_world):
    results = [r["sp"] for r in run_world(world)]
    _check(results)
    r0 = results[0]
    for key in ("rel_full", "rel_prefix_cfg_b2", "rel_cache_on", "rel_cache_on_vs_off", "rel_cache_b1",
                "rel_cache_unsharded_input", "rel_cache_keys", "rel_cache_values", "rel_uneven_prefix",
                "rel_uneven_cache", "rel_bsa_prefix", "rel_bsa_cache", "rel_offload_cache"):
        assert key in r0, key
    # The comparison can fail: dropping the cond/noisy rule changes the output by far more than TOL.
    assert r0["control_prefix_rule"] > 1e-3
    # Every rank holds heads/world heads of the cache, a different slice per rank.
    heads = [r["cache_heads"] for r in results]
    assert heads == [[4 // world * r, 4 // world * (r + 1)] for r in range(world)]
    assert all(r["cache_shape"][2] == 4 // world for r in results)
    assert all(r["outputs_identical_across_ranks"] for r in results)


@pytest.mark.parametrize("world", [2, 4])
def test_cfg_parallel_equals_single_process(world, run_world):
    results = [r["cfg"] for r in run_world(world)]
    _check(results)
    for key in ("rel_cfg_cache_b2", "rel_cfg_prefix_b2", "rel_cfg_cache_b1", "rel_cfg_cache_per_sample"):
        assert key in results[0], key
    sp = world // 2
    assert [r["cache_heads"] for r in results] == [[4 // sp * (r % sp), 4 // sp * (r % sp + 1)] for r in range(world)]


def test_heads_not_divisible_is_a_clear_error(run_world):
    for res in (r["errors"] for r in run_world(4)):
        msg = res["heads_error"]
        assert "num_heads=2" in msg and "divisible" in msg and "size 4" in msg, msg
        msg = res["cfg_heads_error"]
        assert "num_heads=3" in msg and "cfg_parallel" in msg, msg
        assert res["cfg_halves_ok"] is True
        assert "kv_cache" in res["layout_error"] and "sharded for sequence-parallel rank" in res["layout_error"]


def test_the_dit_forward_is_the_only_forward():
    """Context parallelism hooks into ``LongCatDiT.forward`` / ``build_kv_cache`` and
    ``Attention``; ``longcat_vc.parallel`` defines no forward of its own and runs no model layer."""
    import ast

    import longcat_vc.parallel as par
    from longcat_vc.parallel import ContextParallel, _ShardedAttention

    for cls in (ContextParallel, _ShardedAttention):
        for name in ("forward", "build_kv_cache", "self_attention", "qkv_heads", "_local_plan"):
            assert not hasattr(cls, name), f"{cls.__name__}.{name}"
    for name in ("shard_tokens", "gather_tokens", "local_cache", "split_batch", "shard_cache"):
        assert callable(getattr(ContextParallel, name)), name
    with open(par.__file__, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    layers = {"blocks", "x_embedder", "t_embedder", "y_embedder", "final_layer", "unpatchify", "qkv", "proj",
              "q_norm", "k_norm", "cross_attn", "ffn", "_attend", "_embed_text", "_embed_timestep", "_step_plan",
              "_record_kv"}
    touched = sorted({n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} & layers)
    assert not touched, f"longcat_vc.parallel runs model layers itself: {touched}"
    kernels = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               and "longcat_kernels" in ((n.module or "") if isinstance(n, ast.ImportFrom) else n.names[0].name)]
    assert not kernels, "longcat_vc.parallel calls attention kernels itself"


def test_cli_rejects_context_parallel_without_torchrun(tmp_path, capsys, monkeypatch):
    from longcat_vc import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    inp = tmp_path / "in.mp4"
    inp.write_bytes(b"")
    rc = cli.main(["continue", str(inp), "--prompt", "p", "--checkpoint", str(tmp_path), "--out",
                   str(tmp_path / "o.mp4"), "--context-parallel", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and "torchrun --nproc-per-node 2" in err, err


def test_torchrun_cli_context_parallel_matches_single_process(tmp_path, capsys):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from longcat_vc import cli
    from longcat_vc.video_io import read_video, write_video
    from vc_components import write_full_checkpoint

    ckpt = str(tmp_path / "ckpt")
    write_full_checkpoint(ckpt, seed=4)
    rng = np.random.default_rng(5)
    inp = str(tmp_path / "in.mp4")
    write_video(inp, rng.integers(0, 256, (7, 36, 52, 3), dtype=np.uint8), fps=15)
    # basic mode, guidance 2: CFG batch 2 through the KV cache, sequence parallel over 2 ranks
    # (the tiny DiT has 2 heads: 1 per rank); 32x48 -> a 2x3 token grid per frame.
    common = ["--mode", "basic", "--steps", "1", "--guidance", "2.0", "--frames", "9", "--cond-frames", "5",
              "--resolution", "32x48", "--dtype", "fp32", "--device", "cpu", "--no-progress", "--seed", "7"]
    ref = str(tmp_path / "ref.mp4")
    rc = cli.main(["continue", inp, "--prompt", "a red car", "--checkpoint", ckpt, "--out", ref] + common)
    assert rc == 0, capsys.readouterr().err

    out = str(tmp_path / "cp.mp4")
    tj = str(tmp_path / "t.json")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "longcat_vc.cli", "continue", inp, "--prompt", "a red car", "--checkpoint", ckpt, "--out", out,
           "--timings-json", tj, "--context-parallel", "2"] + common
    try:
        p = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:  # pragma: no cover - only on a hang
        pytest.fail(f"torchrun did not finish within {WORKER_TIMEOUT_S} s: {e}")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    # One writer, one summary.
    assert p.stderr.count("wrote ") == 1, p.stderr[-3000:]
    assert "ContextParallel(world=2, rank=0, sp=2, cfg=1, heads=2) (gloo)" in p.stderr, p.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt", "in.mp4", "ref.mp4", "cp.mp4", "t.json"])
    a, b = read_video(ref).frames, read_video(out).frames
    assert a.shape == b.shape == (7 + 4, 36, 52, 3)
    # Latents agree to fp32 rounding, so the decoded, encoded videos agree up to codec noise.
    assert np.abs(a.astype(int) - b.astype(int)).mean() < 0.5
    t = json.load(open(tj))
    assert t["seed"] == 7 and t["timings"]["steps"] >= 1


# ============================================================================ worker side


def _poison_empty() -> None:
    """As tests/conftest.py: unwritten buffers are NaN, so a missed copy fails the comparison."""
    orig_empty, orig_like = torch.empty, torch.empty_like

    def empty(*a, **k):
        t = orig_empty(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    def empty_like(*a, **k):
        t = orig_like(*a, **k)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty, torch.empty_like = empty, empty_like


def _models(cfg, seed):
    from tiny_ckpt import model_from_state_dict, random_state_dict

    sd = random_state_dict(cfg, seed=seed)
    return model_from_state_dict(cfg, sd), model_from_state_dict(cfg, sd)


def _inputs(cfg, seed, B, T, H, W, c):
    from test_dit import make_inputs

    x, t, y, mask = make_inputs(cfg, B=B, T=T, H=H, W=W, seed=seed, shared_cond=c)
    ts = t[:, None].repeat(1, T)
    ts[:, :c] = 0
    return x, t, ts, y, mask


def _scenario_sp(rank, world, seed):
    import torch.distributed as dist
    from test_dit import rel_l2
    from tiny_ckpt import tiny_config

    from longcat_vc.parallel import ShardedKVCache

    res = {}
    cfg = tiny_config(hidden_size=128, num_heads=4)
    ref, cp = _models(cfg, seed % 997)
    cp.enable_context_parallel()
    with torch.no_grad():
        # no cond latents, CFG batch 2 (hw = 2*3 = 6 tokens per frame)
        x, t, ts, y, mask = _inputs(cfg, seed, 2, 4, 4, 6, 2)
        res["rel_full"] = rel_l2(cp(x, t, y, mask), ref(x, t, y, mask))
        # cache off with 2 cond latents (prefix rule), cond timesteps 0
        off_cp = cp(x, ts, y, mask, num_cond_latents=2)
        off_ref = ref(x, ts, y, mask, num_cond_latents=2)
        res["rel_prefix_cfg_b2"] = rel_l2(off_cp, off_ref)
        res["control_prefix_rule"] = rel_l2(off_cp, ref(x, ts, y, mask))
        # outputs are the same tensor on every rank
        gathered = [torch.zeros_like(off_cp) for _ in range(world)]
        dist.all_gather(gathered, off_cp.contiguous())
        res["outputs_identical_across_ranks"] = all(torch.equal(g, gathered[0]) for g in gathered)
        # KV cache built sharded (batch 1, shared by the CFG batch)
        cache_cp = cp.build_kv_cache(x[:1, :, :2])
        cache_ref = ref.build_kv_cache(x[:1, :, :2])
        assert isinstance(cache_cp, ShardedKVCache) and cache_cp.sp_size == world
        h0 = cache_cp.head_start
        hl = cache_cp.heads_local
        res["cache_heads"] = [h0, h0 + hl]
        res["cache_shape"] = list(cache_cp.keys[0].shape)
        res["rel_cache_keys"] = max(rel_l2(a, b[:, :, h0:h0 + hl]) for a, b in zip(cache_cp.keys, cache_ref.keys))
        res["rel_cache_values"] = max(rel_l2(a, b[:, :, h0:h0 + hl]) for a, b in zip(cache_cp.values, cache_ref.values))
        on_cp = cp(x[:, :, 2:], t, y, mask, kv_cache=cache_cp)
        res["rel_cache_on"] = rel_l2(on_cp, ref(x[:, :, 2:], t, y, mask, kv_cache=cache_ref))
        res["rel_cache_on_vs_off"] = rel_l2(on_cp, off_ref[:, :, 2:])
        # an unsharded cache is accepted (heads sliced)
        res["rel_cache_unsharded_input"] = rel_l2(cp(x[:, :, 2:], t, y, mask, kv_cache=cache_ref), on_cp)
        # batch 1 (guidance 1)
        res["rel_cache_b1"] = rel_l2(cp(x[:1, :, 2:], t[:1], y[:1], mask[:1], kv_cache=cache_cp),
                                     ref(x[:1, :, 2:], t[:1], y[:1], mask[:1], kv_cache=cache_ref))
        # offloaded cache (CPU: plain copies)
        cache_off = cp.build_kv_cache(x[:1, :, :2], offload=True)
        res["rel_offload_cache"] = rel_l2(cp(x[:, :, 2:], t, y, mask, kv_cache=cache_off), on_cp)

        # uneven: 3x3 = 9 tokens per frame (5+4 slots on 2 ranks, 3+3+3+0 on 4), 1 cond latent
        x, t, ts, y, mask = _inputs(cfg, seed + 1, 2, 3, 6, 6, 1)
        off_ref = ref(x, ts, y, mask, num_cond_latents=1)
        res["rel_uneven_prefix"] = rel_l2(cp(x, ts, y, mask, num_cond_latents=1), off_ref)
        cache_cp = cp.build_kv_cache(x[:1, :, :1])
        res["rel_uneven_cache"] = rel_l2(cp(x[:, :, 1:], t, y, mask, kv_cache=cache_cp), off_ref[:, :, 1:])

    # block-sparse attention (per head, whole grids after the all-to-all)
    cfg_b = tiny_config(hidden_size=128, num_heads=4, enable_bsa=True,
                        bsa_params={"sparsity": 0.5, "chunk_3d_shape_q": [2, 2, 2], "chunk_3d_shape_k": [2, 2, 2]})
    ref, cp = _models(cfg_b, seed % 991)
    cp.enable_context_parallel()
    with torch.no_grad():
        x, t, ts, y, mask = _inputs(cfg_b, seed + 2, 2, 6, 8, 8, 2)  # 6 frames of 4x4 tokens
        off_ref = ref(x, ts, y, mask, num_cond_latents=2)
        res["rel_bsa_prefix"] = rel_l2(cp(x, ts, y, mask, num_cond_latents=2), off_ref)
        res["rel_bsa_cache"] = rel_l2(cp(x[:, :, 2:], t, y, mask, kv_cache=cp.build_kv_cache(x[:1, :, :2])),
                                      ref(x[:, :, 2:], t, y, mask, kv_cache=ref.build_kv_cache(x[:1, :, :2])))
    return res


def _scenario_cfg(rank, world, seed):
    from test_dit import rel_l2
    from tiny_ckpt import tiny_config

    res = {}
    cfg = tiny_config(hidden_size=128, num_heads=4)
    ref, cp = _models(cfg, seed % 983)
    handler = cp.enable_context_parallel(cfg_parallel=True)
    assert handler.cfg_size == 2 and handler.sp_size == world // 2
    with torch.no_grad():
        x, t, ts, y, mask = _inputs(cfg, seed, 2, 4, 6, 6, 2)  # 9 tokens per frame
        off_ref = ref(x, ts, y, mask, num_cond_latents=2)
        res["rel_cfg_prefix_b2"] = rel_l2(cp(x, ts, y, mask, num_cond_latents=2), off_ref)
        cache_cp = cp.build_kv_cache(x[:1, :, :2])
        h0 = cache_cp.head_start
        res["cache_heads"] = [h0, h0 + cache_cp.heads_local]
        cache_ref = ref.build_kv_cache(x[:1, :, :2])
        on_ref = ref(x[:, :, 2:], t, y, mask, kv_cache=cache_ref)
        res["rel_cfg_cache_b2"] = rel_l2(cp(x[:, :, 2:], t, y, mask, kv_cache=cache_cp), on_ref)
        res["rel_cfg_cache_vs_off"] = rel_l2(on_ref, off_ref[:, :, 2:])
        # odd batch: both CFG groups run it
        res["rel_cfg_cache_b1"] = rel_l2(cp(x[:1, :, 2:], t[:1], y[:1], mask[:1], kv_cache=cache_cp),
                                         ref(x[:1, :, 2:], t[:1], y[:1], mask[:1], kv_cache=cache_ref))
        # a per-sample cache (batch 2) is split with the batch
        cache_cp2 = cp.build_kv_cache(x[:, :, :2])
        res["rel_cfg_cache_per_sample"] = rel_l2(cp(x[:, :, 2:], t, y, mask, kv_cache=cache_cp2),
                                                 ref(x[:, :, 2:], t, y, mask, kv_cache=ref.build_kv_cache(x[:, :, :2])))
    return res


def _scenario_errors(rank, world, seed):
    import torch.distributed as dist
    from tiny_ckpt import tiny_config

    from longcat_vc import LongCatDiT

    res = {}
    m = LongCatDiT(tiny_config(), device="meta")  # 2 heads
    try:
        m.enable_context_parallel()
        res["heads_error"] = "no error"
    except ValueError as e:
        res["heads_error"] = str(e)
    res["cfg_halves_ok"] = m.enable_context_parallel(cfg_parallel=True).sp_size == world // 2
    m3 = LongCatDiT(tiny_config(hidden_size=96, num_heads=3), device="meta")
    try:
        m3.enable_context_parallel(cfg_parallel=True)
        res["cfg_heads_error"] = "no error"
    except ValueError as e:
        res["cfg_heads_error"] = str(e)
    # a cache sharded for another layout is refused with a clear message
    cfg = tiny_config(hidden_size=128, num_heads=4)
    ref, cp = _models(cfg, 5)
    cp.enable_context_parallel()
    cache = cp.build_kv_cache(torch.randn(1, 16, 1, 4, 6, generator=torch.Generator().manual_seed(seed)))
    cache.sp_rank = (cache.sp_rank + 1) % world
    try:
        cp(torch.randn(1, 16, 2, 4, 6), torch.ones(1), torch.randn(1, 1, 5, cfg.caption_channels), kv_cache=cache)
        res["layout_error"] = "no error"
    except ValueError as e:
        res["layout_error"] = str(e)
    dist.barrier()
    return res


def _scenario_all(rank, world, seed):
    res = {"sp": _scenario_sp(rank, world, seed), "cfg": _scenario_cfg(rank, world, seed + 7)}
    if world == 4:
        res["errors"] = _scenario_errors(rank, world, seed)
    return res


_SCENARIOS = {"sp": _scenario_sp, "cfg": _scenario_cfg, "errors": _scenario_errors, "all": _scenario_all}


def _worker_main(argv) -> None:
    scenario, rank, world, init, out, seed = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4], int(argv[5])
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    for k, v in _GPU_ENV.items():
        os.environ.setdefault(k, v)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=WORKER_TIMEOUT_S))
    _poison_empty()
    try:
        res = _SCENARIOS[scenario](rank, world, seed)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2:])
