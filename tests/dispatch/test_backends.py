"""Backend resolution seen from the public ops: explicit backends never fall back silently; auto
picks torch on CPU. The full decision table is in tests/dispatch/test_dispatch.py."""

import pytest
import torch

import longcat_kernels as lk
from longcat_kernels import dispatch
from longcat_kernels._backend import BackendUnavailableError
from longcat_kernels.testing import make_qkv


def test_available_backends_reports_reasons():
    av = lk.available_backends()
    assert set(av) == {"torch", "triton", "cuda"}
    assert av["torch"] is None
    for b in ("triton", "cuda"):
        assert av[b] is None or isinstance(av[b], str) and av[b]
    if not torch.cuda.is_available():
        assert "CUDA" in av["cuda"]


def test_auto_is_torch_on_cpu(monkeypatch):
    monkeypatch.delenv("LONGCAT_KERNELS_BACKEND", raising=False)
    q, k, v = make_qkv(1, 8, 1, 64)
    for op in dispatch.OPS:
        assert dispatch.choose(op, q, k, v).impl == "torch_reference"
        assert dispatch.choose(op, q, k, v, requested="torch").impl == "torch_reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine")
def test_explicit_cuda_raises_on_cpu():
    q, k, v = make_qkv(1, 32, 1, 64)
    with pytest.raises(BackendUnavailableError, match=r"prefix_attn: backend 'cuda' unavailable: needs CUDA tensors"):
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
    assert dispatch.choose("prefix_attn", q, k, v).impl == "torch_reference"
    monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "warp")
    with pytest.raises(ValueError, match=r"LONGCAT_KERNELS_BACKEND: expected one of"):
        dispatch.choose("prefix_attn", q, k, v)
    if not torch.cuda.is_available():
        monkeypatch.setenv("LONGCAT_KERNELS_BACKEND", "cuda")
        with pytest.raises(BackendUnavailableError):
            lk.prefix_attn(q, k, v, 3)


def test_fp64_is_torch_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = make_qkv(1, 8, 1, 64, dtype=torch.float64)
    with pytest.raises(BackendUnavailableError, match=r"dtype float64 is supported by the torch backend only"):
        dispatch.choose("prefix_attn", q, k, v, requested="triton")


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
    assert set(info["ops"]) == set(dispatch.OPS)
    assert all(d["backends"]["torch"] == "torch_reference" for d in info["ops"].values())
