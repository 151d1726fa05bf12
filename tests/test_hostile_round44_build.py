"""Hostile-user round 44: the build and JIT knobs (MAX_JOBS, LONGCAT_KERNELS_CACHE, TORCH_CUDA_ARCH_LIST)."""

from __future__ import annotations

import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def no_prebuilt(monkeypatch, tmp_path):
    """``load_extension`` as on a CUDA machine with nvcc and no prebuilt ``_C``; ``cpp_extension.load`` recorded."""
    import torch
    from torch.utils import cpp_extension

    from longcat_kernels import _ext

    calls = []

    def no_c():
        raise ImportError("No module named 'longcat_kernels._C'")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(dict(kw, MAX_JOBS=os.environ.get("MAX_JOBS"))))
    monkeypatch.setattr(_ext, "_load_prebuilt", no_c)
    monkeypatch.setattr(_ext, "_STATE", {"tried": False, "module": None, "error": None, "how": None, "kernels": None})
    monkeypatch.setenv("LONGCAT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("LONGCAT_KERNELS_JIT", raising=False)
    return calls


@pytest.mark.parametrize("value", ["abc", "0", "-2"])
def test_bad_max_jobs_refuses_the_jit_build_instead_of_a_silent_triton_fallback(no_prebuilt, monkeypatch, value):
    """MAX_JOBS=abc/0/-2 with no prebuilt _C: the JIT build's ValueError was kept as a load failure, so
    extension_error() said 'JIT build failed' and backend='auto' ran Triton for the whole process without a
    word (setup.py refuses the same value naming MAX_JOBS); fixed, it is tried again and builds."""
    from longcat_kernels import _ext

    monkeypatch.setenv("MAX_JOBS", value)
    with pytest.raises(ValueError, match=rf"^MAX_JOBS: expected a positive number of parallel compile jobs, got '{value}'"):
        _ext.extension_error()
    assert no_prebuilt == []
    monkeypatch.setenv("MAX_JOBS", "2")
    assert _ext.extension_error() is None and _ext.extension_status()[0] == "jit"
    assert no_prebuilt[-1]["MAX_JOBS"] == "2"


def test_env_report_names_a_bad_max_jobs_instead_of_crashing(no_prebuilt, monkeypatch):
    """The environment report on such a machine: it must say MAX_JOBS is refused (not crash with it)."""
    from longcat_kernels import env

    monkeypatch.setenv("MAX_JOBS", "abc")
    info = env.report()
    assert "MAX_JOBS" in info["env_invalid"] and "'abc'" in info["env_invalid"]["MAX_JOBS"]
    assert info["extension"]["how"] == "skipped" and "MAX_JOBS" in info["extension"]["error"]
    assert no_prebuilt == []


def test_relative_cache_dir_is_resolved_once_to_an_absolute_path(monkeypatch, tmp_path):
    """LONGCAT_KERNELS_CACHE=kcache (relative) gave a relative cache_dir(): the JIT build folder then depended
    on the working directory (a new minutes-long build per directory, two caches); the env report showed the
    raw value only. Now it is resolved against the working directory where first read, and reported."""
    from longcat_kernels import _envvars, env

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.setattr(_envvars, "_CACHE_RESOLVED", {})
    monkeypatch.setenv("LONGCAT_KERNELS_CACHE", "kcache")
    monkeypatch.chdir(tmp_path / "a")
    first = _envvars.cache_dir()
    assert first == str(tmp_path / "a" / "kcache")
    monkeypatch.chdir(tmp_path / "b")
    assert _envvars.cache_dir() == first
    info = env.report()
    assert info["jit_cache"] == first and info["jit_cache_relative"]


def test_torch_cuda_arch_list_is_named_as_ignored(monkeypatch, caplog, no_prebuilt, capsys):
    """TORCH_CUDA_ARCH_LIST='8.0' (what torch's own extension builds read) was ignored without a word: the
    build passes -gencode flags (torch then skips its own list) for the device's own target or
    LONGCAT_KERNELS_CUDA_ARCHS; now setup.py and the JIT build say so in one warning line."""
    import runpy

    import setuptools

    from longcat_kernels import _envvars, _ext

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    with caplog.at_level("WARNING", logger="longcat_kernels"):
        _ext._load_jit()
    assert "TORCH_CUDA_ARCH_LIST" in caplog.text and "LONGCAT_KERNELS_CUDA_ARCHS" in caplog.text
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("LONGCAT_KERNELS_SKIP_CUDA_BUILD", "1")
    g = runpy.run_path(os.path.join(ROOT, "setup.py"))
    capsys.readouterr()
    g["_warn_torch_arch_list"]()
    assert "TORCH_CUDA_ARCH_LIST" in capsys.readouterr().err
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "8.0")  # ours set: it decides, nothing to say
    assert _envvars.torch_arch_list_ignored() is None


def test_torch_arch_list_naming_the_built_targets_is_not_warned(monkeypatch):
    """NVIDIA's containers set TORCH_CUDA_ARCH_LIST to the GPU's own target ('9.0a' on the H100 machine):
    the warning fired on every JIT build although the list named exactly what was built."""
    from longcat_kernels import _envvars

    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS", raising=False)
    built = ["-gencode=arch=compute_90a,code=sm_90a"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert _envvars.torch_arch_list_ignored(built) is None
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a+PTX")
    assert _envvars.torch_arch_list_ignored(built) is None
    for other in ("8.0", "9.0", "8.0;9.0a", "native", "9.0a 10.0"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", other)
        assert "TORCH_CUDA_ARCH_LIST" in _envvars.torch_arch_list_ignored(built), other


def test_setup_torch_missing_names_the_build_interpreter(monkeypatch, capsys):
    """`pip install --no-build-isolation -e .` with a `pip` of another Python than torch's (the H100 machine's
    PATH) was told 'use --no-build-isolation', the flag it had passed; the warning now names the interpreter
    that ran the build and points to `python -m pip`."""
    import builtins
    import runpy
    import sys

    import setuptools

    real_import = builtins.__import__

    def no_torch(name, *a, **k):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real_import(name, *a, **k)

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.delenv("LONGCAT_KERNELS_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    runpy.run_path(os.path.join(ROOT, "setup.py"))
    err = capsys.readouterr().err
    assert sys.executable in err and "python -m pip" in err, err
