"""Round 37: process-wide state (environment read per call vs kept by torch.compile, stamp table growth)."""

import gc
import pathlib

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels.dispatch import BackendUnavailableError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _qkv():
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))
    return [torch.randn(1, 16, 2, 32, generator=g) for _ in range(3)]


def test_compiled_graph_keeps_traced_backend_until_dynamo_reset_and_readme_says_so(monkeypatch):
    """A ``torch.compile``d op silently kept the backend chosen at its trace after
    ``LONGCAT_KERNELS_BACKEND`` changed (even ``cuda`` on CPU tensors, which an eager call refuses),
    and the README said only that every call checks the variables. Pinned: eager follows the change at
    once, compiled code after ``torch._dynamo.reset()``; the README documents the difference."""
    q, k, v = _qkv()
    f = lambda q, k, v: lk.prefix_attn(q, k, v, prefix_len=8)  # noqa: E731
    monkeypatch.delenv("LONGCAT_KERNELS_BACKEND", raising=False)
    exp = lk.prefix_attn(q.double(), k.double(), v.double(), prefix_len=8, backend="torch")
    torch._dynamo.reset()
    try:
        cf = torch.compile(f, backend="eager", fullgraph=True)
        torch.testing.assert_close(cf(q, k, v).double(), exp, rtol=1e-5, atol=1e-5)
        monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "cuda")
        with pytest.raises(BackendUnavailableError, match="LONGCAT_KERNELS_BACKEND=cuda"):
            f(q, k, v)
        torch._dynamo.reset()
        with pytest.raises(Exception, match="LONGCAT_KERNELS_BACKEND=cuda"):  # dynamo wraps the error
            torch.compile(f, backend="eager", fullgraph=True)(q, k, v)
    finally:
        torch._dynamo.reset()
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "a `torch.compile`d graph may keep the kernels chosen when it was traced" in readme
    assert "`LONGCAT_KERNELS_BACKEND` reliably reaches it only after `torch._dynamo.reset()`" in readme


def test_tensor_stamps_do_not_grow_with_freed_tensors():
    """``tensor_stamp`` keeps one table entry per live tensor: 1000 stamped then freed tensors (and
    a replaced weight) must leave the table as it was (a leak would grow it per DiT weight swap)."""
    from longcat_vc import kv_cache

    gc.collect()
    n0 = len(kv_cache._TENSOR_STAMPS)
    keep = torch.randn(3)
    s_keep = kv_cache.tensor_stamp(keep)
    seen = set()
    for _ in range(1000):
        t = torch.randn(2)
        seen.add(kv_cache.tensor_stamp(t))
        del t
    gc.collect()
    assert len(seen) == 1000  # never reused, even when id() is
    assert len(kv_cache._TENSOR_STAMPS) == n0 + 1
    assert kv_cache.tensor_stamp(keep) == s_keep
    del keep
    gc.collect()
    assert len(kv_cache._TENSOR_STAMPS) == n0
