"""Shared pytest setup.

- ``torch.empty`` / ``empty_like`` / ``empty_strided`` / ``Tensor.new_empty`` return NaN-filled float tensors during tests, so an output
  a kernel forgets to write fails the parity check instead of passing by luck.
- Markers (skip with a reason when the machine cannot run them):
  ``cuda`` (a CUDA device), ``triton_gpu`` (CUDA + triton, compiled kernels), ``ext`` (CUDA + the
  compiled extension), ``triton_interpret`` (Triton CPU interpreter: ``TRITON_INTERPRET=1``).
- On a machine without CUDA, ``TRITON_INTERPRET=1`` is set before any test module (and therefore any
  ``triton.py``) is imported, so ``backend="triton"`` runs CPU tensors in the interpreter.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:  # property tests (tests/test_properties.py, tests/vc/test_hardening.py)
    from hypothesis import HealthCheck, settings

    # "default": few tiny examples so the 2-core CPU CI stays fast (the Triton interpreter is slow);
    # "slow": HYPOTHESIS_PROFILE=slow for a deeper sweep. No deadline: interpreter timings vary.
    _hc = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]
    settings.register_profile("default", max_examples=12, deadline=None, suppress_health_check=_hc,
                              derandomize=False, print_blob=True)
    settings.register_profile("slow", max_examples=200, deadline=None, suppress_health_check=_hc,
                              print_blob=True)
    _profile = os.environ.get("HYPOTHESIS_PROFILE", "default")
    if _profile not in ("default", "slow"):
        raise ValueError(f"HYPOTHESIS_PROFILE: expected 'default' or 'slow', got {_profile!r}")
    settings.load_profile(_profile)
except ImportError:  # hypothesis is in the dev extra; tests that need it importorskip it
    pass

_orig_empty = torch.empty
_orig_empty_like = torch.empty_like
_orig_empty_strided = torch.empty_strided
_orig_new_empty = torch.Tensor.new_empty


def _nan_empty(*args, **kwargs):
    t = _orig_empty(*args, **kwargs)
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():  # tensors created with requires_grad=True (e.g. by inductor)
            t.fill_(float("nan"))
    return t


def _nan_empty_like(*args, **kwargs):
    t = _orig_empty_like(*args, **kwargs)
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():  # tensors created with requires_grad=True (e.g. by inductor)
            t.fill_(float("nan"))
    return t


def _nan_empty_strided(*args, **kwargs):
    t = _orig_empty_strided(*args, **kwargs)
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():  # inductor creates requires_grad=True buffers this way
            t.fill_(float("nan"))
    return t


def _nan_new_empty(self, *args, **kwargs):
    t = _orig_new_empty(self, *args, **kwargs)
    if t.is_floating_point() or t.is_complex():
        with torch.no_grad():
            t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def _poison_empty(monkeypatch):
    monkeypatch.setattr(torch, "empty", _nan_empty)
    monkeypatch.setattr(torch, "empty_like", _nan_empty_like)
    monkeypatch.setattr(torch, "empty_strided", _nan_empty_strided)
    monkeypatch.setattr(torch.Tensor, "new_empty", _nan_new_empty)
    yield


@pytest.fixture(autouse=True)
def _keep_allocator_env(monkeypatch):
    """``longcat-vc``'s main sets PYTORCH_CUDA_ALLOC_CONF when it is absent; every test gets the
    variables back as they were (setenv first so that monkeypatch records an absent one)."""
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)


def _triton_reason():
    from longcat_kernels._backend import triton_status

    return triton_status()


def _skip_reason(marker: str):
    if marker == "cuda":
        return None if torch.cuda.is_available() else "needs a CUDA device"
    if marker == "triton_gpu":
        if not torch.cuda.is_available():
            return "needs a CUDA device (compiled Triton kernels)"
        r = _triton_reason()
        if r is not None:
            return r
        from longcat_kernels.dispatch import triton_interpret

        if triton_interpret():
            return "TRITON_INTERPRET=1: compiled Triton kernels are not run in interpreter mode"
        return None
    if marker == "ext":
        if not torch.cuda.is_available():
            return "needs a CUDA device (compiled extension)"
        from longcat_kernels._ext import extension_error

        return extension_error()
    if marker == "triton_interpret":
        r = _triton_reason()
        if r is not None:
            return r
        from longcat_kernels.dispatch import triton_interpret

        if not triton_interpret():
            return "needs TRITON_INTERPRET=1 (set automatically on machines without CUDA)"
        return None
    return None


MARKERS = {
    "cuda": "needs a CUDA device",
    "triton_gpu": "needs CUDA + triton (compiled kernels)",
    "ext": "needs CUDA + the compiled longcat_kernels._C extension",
    "triton_interpret": "Triton kernels in the CPU interpreter (TRITON_INTERPRET=1)",
    "slow": "slow test (deselect with -m 'not slow')",
}


def pytest_configure(config):
    for name, doc in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    cache = {}
    for item in items:
        for name in ("cuda", "triton_gpu", "ext", "triton_interpret"):
            if item.get_closest_marker(name) is not None:
                if name not in cache:
                    cache[name] = _skip_reason(name)
                if cache[name] is not None:
                    item.add_marker(pytest.mark.skip(reason=f"[{name}] {cache[name]}"))


@pytest.fixture
def device():
    """``"cuda"`` when available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---- shared by the tests/vc files (module-scoped: each file gets its own); tests/vc has no conftest.py:
# a second module named "conftest" broke torch.compile guards on this one's globals


@pytest.fixture(scope="module")
def refine_ckpt(tmp_path_factory, request):
    """A refinement checkpoint (``vc_components.write_refine_checkpoint``) for this test file."""
    from vc_components import refine_checkpoint_in

    return refine_checkpoint_in(tmp_path_factory, "ckpt_" + request.module.__name__.rsplit(".", 1)[-1])


@pytest.fixture(scope="module")
def refine_pipe(refine_ckpt):
    """The pipeline on ``refine_ckpt``: fp32, CPU, the torch reference attention."""
    from longcat_vc.pipeline import VideoContinuationPipeline

    return VideoContinuationPipeline.from_pretrained(refine_ckpt, dtype=torch.float32, device="cpu",
                                                     attn_backend="torch")


@pytest.fixture(scope="module")
def tiny_base():
    """``(config, state dict)`` of the tiny DiT with random weights."""
    from tiny_ckpt import random_state_dict, tiny_config

    cfg = tiny_config()
    return cfg, random_state_dict(cfg, seed=3)
