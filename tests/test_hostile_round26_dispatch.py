"""Hostile-user round 26: kernel choice, the settings it reads and the extension loader."""

from __future__ import annotations

import pytest
import torch

from longcat_kernels import _envvars
from longcat_kernels.dispatch import Facts, choose_kernel


# ---------------------------------------------------------------------------------------------
# the cuDNN route on GPUs cuDNN SDPA does not run on
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [(7, 0), (7, 5)])
@pytest.mark.parametrize("op", ["attn_with_kv_cache", "prefix_attn"])
def test_auto_does_not_send_pre_ampere_gpus_to_cudnn_sdpa(op, cap):
    """auto picked ``triton_prologue_cudnn`` for a dense fp16 cached-KV call on a T4 / V100 (sm 7.x):
    torch's cuDNN SDPA takes sm 8.0+ only, so the forced ``SDPBackend.CUDNN_ATTENTION`` call failed with
    torch's "No available kernel" instead of running the fused Triton kernel, which takes these inputs."""
    f = Facts(capability=cap, csrc_kernels=(), dtype="float16", head_dim=128)
    c = choose_kernel(op, f, "auto")
    assert c.impl == "triton_fused", c
    # Ampere and later keep the measured-fastest cuDNN route
    assert choose_kernel(op, f._replace(capability=(8, 0)), "auto").impl == "triton_prologue_cudnn"


def test_cudnn_route_called_directly_on_pre_ampere_refuses(monkeypatch):
    """``cudnn_available(q)`` (the direct route's own check) said yes on sm 7.x: the call failed inside
    torch's SDPA instead of raising ``BackendUnavailableError`` with the reason."""
    from types import SimpleNamespace

    from longcat_kernels import dispatch
    from longcat_kernels.ops.kv_cache_attn import cudnn

    # a CUDA tensor's metadata (this machine has no GPU): what the check reads
    q = SimpleNamespace(device=SimpleNamespace(type="cuda", index=0), dtype=torch.float16, shape=(1, 4, 2, 64))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(dispatch, "_capability", lambda d: (7, 5))
    assert cudnn.cudnn_available(q) is False
    monkeypatch.setattr(dispatch, "_capability", lambda d: (9, 0))
    assert cudnn.cudnn_available(q) is True


# ---------------------------------------------------------------------------------------------
# LONGCAT_KERNELS_CUDA_ARCHS / the JIT build for targets the kernels cannot be built for
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["7.5", "9.0a;7.0", "8.0a", "8.6a;8.0", "-gencode=arch=compute_75,code=sm_75",
                                   "-arch=sm_70", "-gencode arch=compute_80a,code=sm_80a"])
def test_cuda_archs_targets_the_kernels_cannot_build_for_are_refused(monkeypatch, value):
    """``7.5`` / ``7.0`` (the mma.sync bf16 and cp.async kernels need sm 8.0) and an ``a`` target before
    Hopper (``8.0a``: no such nvcc target) parsed fine and failed minutes into the build; a JIT build then
    left the extension skipped and ``auto`` ran Triton without a word."""
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", value)
    with pytest.raises(ValueError, match=r"^LONGCAT_KERNELS_CUDA_ARCHS: ") as e:
        _envvars.cuda_arch_flags_from_env()
    assert repr(value) in str(e.value)
    assert "LONGCAT_KERNELS_CUDA_ARCHS" in _envvars.setting_problems()


@pytest.mark.parametrize("value", ["8.0", "8.6;8.9", "9.0a", "10.0a;12.0", "-gencode=arch=compute_100a,code=sm_100a",
                                   "-arch=sm_120"])  # -arch=native: refused since round 41 (sm_90 on Hopper)
def test_cuda_archs_buildable_targets_still_parse(monkeypatch, value):
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", value)
    assert _envvars.cuda_arch_flags_from_env()


def test_jit_build_on_a_pre_ampere_device_is_refused_before_compiling(monkeypatch, tmp_path):
    """On a T4 / V100 with nvcc the first CUDA call JIT-built ``csrc/`` for sm_75 / sm_70 (the device's own
    target) for minutes, to fail (mma.sync bf16, cp.async need sm 8.0); now refused at once, naming why."""
    from torch.utils import cpp_extension

    from longcat_kernels import _ext

    calls = []
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    (tmp_path / "cuda" / "bin").mkdir(parents=True)  # the JIT build checks for bin/nvcc (not run here)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    monkeypatch.setenv("LONGCAT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS", raising=False)
    with pytest.raises(ImportError, match=r"compute capability 8\.0 or newer.*7\.5"):
        _ext._load_jit()
    assert calls == []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    _ext._load_jit()
    assert len(calls) == 1


# ---------------------------------------------------------------------------------------------
# a corrupt sources digest beside a prebuilt _C
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"\x80" * 40])
def test_corrupt_sources_digest_is_a_stale_build_not_a_decode_error(tmp_path, content):
    """A ``_C.csrc_sha1`` that is not text (a truncated copy, a bad sync) raised ``UnicodeDecodeError``
    from the loader: not an ImportError, so neither the JIT build took over nor did the reason say which
    file; now it reads as a digest that does not match (ImportError naming the file: rebuild)."""
    from longcat_kernels import _ext

    so = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"")
    (tmp_path / _ext.SOURCES_FILE).write_bytes(content)
    with pytest.raises(ImportError, match=r"was built from other kernel sources"):
        _ext._check_prebuilt_sources(str(so))


def test_setup_on_a_pre_ampere_gpu_skips_the_extension(monkeypatch, tmp_path):
    """``pip install --no-build-isolation .`` on a T4 / V100 with nvcc built the extension for the visible
    GPU's own sm_75 / sm_70 and failed the whole install minutes into nvcc; now the extension is skipped
    with the one warning line (the triton/torch backends run there), unless LONGCAT_KERNELS_CUDA_ARCHS
    asks for other targets."""
    import os
    import runpy

    import setuptools
    from torch.utils import cpp_extension

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("LONGCAT_KERNELS_SKIP_CUDA_BUILD", "1")  # loading setup.py builds nothing
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    g = runpy.run_path(os.path.join(root, "setup.py"))
    monkeypatch.delenv("LONGCAT_KERNELS_SKIP_CUDA_BUILD")
    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS", raising=False)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    reason = g["_cuda_build_reason"]()
    assert reason is not None and "compute capability 7.5" in reason and "8.0" in reason
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "8.0")  # building for another GPU is still possible
    assert g["_cuda_build_reason"]() is None
    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    assert g["_cuda_build_reason"]() is None


@pytest.mark.parametrize("name", ["longcat_kernels_backend", "Longcat_Kernels_JIT"])
def test_wrong_case_setting_warns_like_a_misspelt_one(monkeypatch, name):
    """Environment names are case-sensitive: ``longcat_kernels_backend=torch`` set nothing, and unlike a
    misspelt ``LONGCAT_KERNEL_BACKEND`` it was not even warned about (the look-alike scan matched upper
    case only): the user's backend choice was ignored without a word."""
    import longcat_kernels as lk

    monkeypatch.setenv(name, "torch")
    monkeypatch.setattr(_envvars, "_scanned", False)
    q = torch.randn(1, 8, 1, 8)
    with pytest.warns(UserWarning, match=rf"{name}: not a longcat_kernels setting"):
        lk.prefix_attn(q, q, q, 0)
