"""Backend resolution: explicit backends never fall back silently; auto picks torch on CPU."""

import sys
import types

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import _backend
from longcat_kernels._backend import BackendUnavailableError, resolve_backend
from longcat_kernels.testing import make_qkv


def test_available_backends_reports_reasons():
    av = lk.available_backends()
    assert set(av) == {"torch", "triton", "cuda"}
    assert av["torch"] is None
    for b in ("triton", "cuda"):
        assert av[b] is None or isinstance(av[b], str) and av[b]
    if not torch.cuda.is_available():
        assert "CUDA" in av["cuda"]


def test_auto_is_torch_on_cpu():
    q, k, v = make_qkv(1, 8, 1, 64)
    for op in _backend.OPS:
        assert resolve_backend(op, "auto", q, k, v) == "torch"
        assert resolve_backend(op, "torch", q, k, v) == "torch"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_explicit_cuda_raises_on_cpu():
    q, k, v = make_qkv(1, 32, 1, 64)
    with pytest.raises(BackendUnavailableError, match=r"prefix_attn: backend 'cuda' unavailable: no CUDA device"):
        lk.prefix_attn(q, k, v, 3, backend="cuda")
    with pytest.raises(BackendUnavailableError, match=r"block_sparse_attn: backend 'cuda' unavailable"):
        lk.block_sparse_attn(q, k, v, grid_q=(2, 4, 4), chunk_q=(2, 2, 2), backend="cuda")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(1, 32, 1, 64)
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' unavailable: .*(TRITON_INTERPRET=1|import triton)"):
        lk.prefix_attn(q, k, v, 3, backend="triton")


def test_env_override(monkeypatch):
    q, k, v = make_qkv(1, 8, 1, 64)
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "torch")
    assert resolve_backend("prefix_attn", "auto", q, k, v) == "torch"
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "warp")
    with pytest.raises(ValueError, match=r"LONGCAT_KERNELS_BACKEND: expected one of"):
        resolve_backend("prefix_attn", "auto", q, k, v)
    if not torch.cuda.is_available():
        monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "cuda")
        with pytest.raises(BackendUnavailableError):
            lk.prefix_attn(q, k, v, 3)


def test_fp64_is_torch_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(1, 8, 1, 64, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match=r"dtype torch.float64 is supported by the torch backend only"):
        resolve_backend("prefix_attn", "triton", q, k, v)


@pytest.fixture
def fake_op(monkeypatch):
    """A fake op 'fake_op' in package 'fakepkg' whose triton module refuses head_dim 128."""
    mod = types.ModuleType("longcat_kernels.ops.fakepkg.triton")
    mod.fake_op_triton = lambda *a: "ran"
    mod.unsupported_reason = lambda impl, q, *rest: "head_dim 128 unsupported" if q.shape[-1] == 128 else None
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(_backend.OPS, "fake_op", "fakepkg")
    monkeypatch.setitem(_backend.OPS, "missing_op", "missingpkg")
    monkeypatch.setitem(_backend.PREFERENCE, "fake_op", ("cuda", "triton", "torch"))
    monkeypatch.setitem(_backend.PREFERENCE, "missing_op", ("cuda", "triton", "torch"))
    monkeypatch.setattr(_backend, "_MODULES", {})
    monkeypatch.setattr(_backend, "_TRITON_STATUS", (True, None))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return mod


def test_missing_module_and_hook(fake_op):
    q = torch.zeros(1, 4, 1, 64)
    assert resolve_backend("fake_op", "triton", q) == "triton"
    assert _backend.get_impl("fake_op", "triton")() == "ran"
    with pytest.raises(BackendUnavailableError, match=r"fake_op: backend 'triton' unavailable: head_dim 128 unsupported"):
        resolve_backend("fake_op", "triton", torch.zeros(1, 4, 1, 128))
    with pytest.raises(BackendUnavailableError, match=r"missing_op: backend 'triton' unavailable: not implemented \(no module"):
        resolve_backend("missing_op", "triton", q)
    assert "not implemented" in lk.available_backends("missing_op", device="cpu")["triton"]
    assert lk.available_backends("fake_op", device="cpu")["triton"] is None


def test_conftest_poisons_uninitialised_outputs():
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.ones(2))).all()
    assert torch.isnan(torch.empty_strided((2, 2), (2, 1))).all() and torch.isnan(torch.ones(1).new_empty(3)).all()
    assert torch.empty(3, dtype=torch.int32).dtype == torch.int32


def test_env_report(capsys):
    import json

    from longcat_kernels import env

    assert env.main([]) == 0
    text = capsys.readouterr().out
    assert "torch" in text and "auto ->" in text and "block_sparse_attn" in text
    assert env.main(["--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["backends"]["torch"] is None and set(info["ops"]) == set(_backend.OPS)
