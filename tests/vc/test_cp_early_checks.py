"""Context parallel: what the DiT config and the process group alone decide is refused before any
weights load, and the CLI refuses ``--device cuda:N`` with ``--context-parallel``.

A. ``VideoContinuationPipeline.from_pretrained(..., process_group=...)`` with a DiT whose heads do not
   divide by the ranks (32 heads on 3 ranks), or ``cfg_parallel`` on an odd world, was refused by
   ``ContextParallel`` in ``dit.enable_context_parallel``, after every rank had loaded the text
   encoder, the VAE and the whole DiT (minutes on the released weights). ``from_pretrained`` now runs
   the same check (``parallel.check_context_parallel``) on ``dit/config.json`` first, on CPU too (the
   config was read only on CUDA, for the memory check). Here every loader fails loudly if reached,
   and the 3-head checkpoint's weights are the 2-head tiny model's: reaching the DiT load would be a
   CheckpointError, not the ValueError asserted.
B. ``--device cuda:0 --context-parallel 2``: torchrun gives every rank the same argv and
   ``init_distributed`` keeps an explicit index, so every rank took cuda:0. The CLI refuses it
   before anything loads, naming both flags and what to pass.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PG_TIMEOUT_S = 20


def _forbid_loading(monkeypatch=None):
    """Every weight loader of ``from_pretrained`` raises (an AssertionError, which its ``load`` wraps
    into a CheckpointError naming the component) and is counted in the returned list."""
    import transformers

    from longcat_vc import pipeline
    from longcat_vc.dit import LongCatDiT

    reached = []

    def boom(what):
        def f(*a, **k):
            reached.append(what)
            raise AssertionError(f"{what} loaded before the context-parallel check")
        return f

    targets = [(pipeline, "_load_umt5", boom("text encoder")), (pipeline, "_load_vae", boom("VAE")),
               (LongCatDiT, "from_pretrained", classmethod(boom("DiT"))),
               (transformers.AutoTokenizer, "from_pretrained", boom("tokenizer"))]
    for obj, name, fn in targets:
        if monkeypatch is not None:
            monkeypatch.setattr(obj, name, fn)
        else:  # a worker process: nothing to restore
            setattr(obj, name, fn)
    return reached


def _write_heads_checkpoint(root: str, num_heads: int, hidden_size: int) -> None:
    """The tiny full checkpoint whose ``dit/config.json`` says ``num_heads`` / ``hidden_size``; the
    weights stay the tiny 2-head model's (loading them would fail on their shapes)."""
    from vc_components import write_full_checkpoint

    write_full_checkpoint(root)
    path = os.path.join(root, "dit", "config.json")
    with open(path) as f:
        d = json.load(f)
    key = "num_heads" if "num_heads" in d else "num_attention_heads"
    d[key], d["hidden_size"] = num_heads, hidden_size
    with open(path, "w") as f:
        json.dump(d, f, indent=2)


@pytest.fixture(scope="module")
def three_head_ckpt(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    root = str(tmp_path_factory.mktemp("three_heads"))
    _write_heads_checkpoint(root, num_heads=3, hidden_size=96)
    return root


@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A single-process gloo group (world size 1), destroyed afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ A


def test_check_context_parallel_is_what_context_parallel_raises(gloo_world_of_one):
    from longcat_vc.parallel import ContextParallel, check_context_parallel

    with pytest.raises(ValueError) as early:
        check_context_parallel(gloo_world_of_one, num_heads=32, cfg_parallel=True)
    with pytest.raises(ValueError) as late:
        ContextParallel(gloo_world_of_one, num_heads=32, cfg_parallel=True)
    assert str(early.value) == str(late.value)
    assert "cfg_parallel needs an even number of ranks, got 1" in str(early.value)
    layout = check_context_parallel(gloo_world_of_one, num_heads=3)  # 1 rank divides any head count
    assert (layout.world_size, layout.sp_size, layout.cfg_size, layout.num_heads) == (1, 1, 1, 3)
    with pytest.raises(TypeError, match="cfg_parallel: expected a bool"):
        check_context_parallel(gloo_world_of_one, num_heads=2, cfg_parallel=1)


def test_check_context_parallel_without_a_process_group():
    import torch.distributed as dist

    from longcat_vc.parallel import check_context_parallel

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        check_context_parallel(None, num_heads=32)


def test_from_pretrained_refuses_cfg_parallel_on_an_odd_world_before_loading(three_head_ckpt, gloo_world_of_one,
                                                                              monkeypatch):
    from longcat_vc.pipeline import VideoContinuationPipeline

    reached = _forbid_loading(monkeypatch)
    with pytest.raises(ValueError, match="cfg_parallel needs an even number of ranks, got 1") as e:
        VideoContinuationPipeline.from_pretrained(three_head_ckpt, dtype=torch.float32, device="cpu",
                                                  process_group=gloo_world_of_one, cfg_parallel=True, progress=False)
    assert type(e.value) is ValueError and reached == []  # CheckpointError (a ValueError): a loader was reached


def test_from_pretrained_passes_the_check_then_loads(three_head_ckpt, gloo_world_of_one, monkeypatch):
    """One rank divides 3 heads: the check lets it through and the loading starts (what _forbid_loading
    catches), on CPU: the config is read for the check without a CUDA device."""
    from longcat_vc.loading import CheckpointError
    from longcat_vc.pipeline import VideoContinuationPipeline

    reached = _forbid_loading(monkeypatch)
    with pytest.raises(CheckpointError, match="loaded before the context-parallel check"):
        VideoContinuationPipeline.from_pretrained(three_head_ckpt, dtype=torch.float32, device="cpu",
                                                  process_group=gloo_world_of_one, progress=False)
    assert reached


def _worker(rank: int, world: int, init: str, out: str, ckpt: str) -> None:
    import torch.distributed as dist

    from longcat_vc.parallel import ContextParallel
    from longcat_vc.pipeline import VideoContinuationPipeline
    from vc_components import error_text, finish_rank, init_gloo_rank

    init_gloo_rank(rank, world, init, PG_TIMEOUT_S)
    reached = _forbid_loading()
    res = {}
    res["from_pretrained"] = error_text(lambda: VideoContinuationPipeline.from_pretrained(
        ckpt, dtype=torch.float32, device="cpu", process_group=dist.group.WORLD, progress=False))
    res["reached"] = list(reached)
    # what the DiT's enable_context_parallel raises for the same heads and group (after the load, before)
    res["context_parallel"] = error_text(lambda: ContextParallel(dist.group.WORLD, num_heads=3))
    finish_rank(res, out, rank)


@pytest.fixture(scope="module")
def two_ranks(three_head_ckpt, tmp_path_factory):
    from vc_components import two_rank_results

    return two_rank_results(__file__, tmp_path_factory.mktemp("cp_early"), [three_head_ckpt], ROOT, HERE)


def test_from_pretrained_refuses_heads_the_ranks_do_not_divide_before_loading(two_ranks):
    for res in two_ranks:
        assert res["reached"] == [], res  # no component loaded, the DiT least of all
        assert res["from_pretrained"].startswith(
            "ValueError: context parallel: num_heads=3 must be divisible by the sequence-parallel size 2"), res
        assert res["from_pretrained"] == res["context_parallel"], res  # the same check, the same message


# ------------------------------------------------------------------------------------------------ B


def _argv(tmp_path, *extra):
    src = tmp_path / "in.mp4"
    src.write_bytes(b"")  # only its existence is checked before the --device error
    return ["continue", str(src), "--prompt", "a", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o.mp4"),
            "--cond-frames", "5", "--frames", "9", *extra]


@pytest.mark.parametrize("index", ["0", "1"])
@pytest.mark.parametrize("cuda_available", [True, False])
def test_cli_refuses_a_device_index_with_context_parallel(tmp_path, capsys, monkeypatch, index, cuda_available):
    from vc_components import run_cli_without_loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc, err = run_cli_without_loading(capsys, _argv(tmp_path, "--device", f"cuda:{index}", "--context-parallel", "2"),
                                      monkeypatch)
    assert rc == 2, err
    assert (f"--device cuda:{index} with --context-parallel 2 puts every rank on cuda:{index}: pass --device cuda "
            "without an index; each rank takes cuda:LOCAL_RANK") in err, err


def test_cli_device_without_an_index_or_without_context_parallel_is_not_refused(tmp_path, capsys, monkeypatch):
    """``--device cuda`` with --context-parallel, and ``cuda:1`` alone, get past the device check: to the
    WORLD_SIZE check (no torchrun here) and to the loading (which run_cli_without_loading forbids)."""
    from vc_components import run_cli_without_loading

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rc, err = run_cli_without_loading(capsys, _argv(tmp_path, "--device", "cuda", "--context-parallel", "2"),
                                      monkeypatch)
    assert rc == 2 and "--context-parallel 2 needs 2 processes" in err, err
    from longcat_vc import cli

    args = cli.build_parser().parse_args(_argv(tmp_path, "--device", "cuda:1"))
    assert cli._device(args) == torch.device("cuda", 1)
    args = cli.build_parser().parse_args(_argv(tmp_path, "--device", "cpu", "--context-parallel", "2"))
    assert cli._device(args) == torch.device("cpu")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    sys.path.insert(0, HERE)
    _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
