"""Hostile-user round 41: the build (setup.py, the wheel's kernel sources), the JIT loader and the report."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_build_drops_kernel_sources_removed_since_the_last_build(tmp_path):
    """A kernel file deleted from csrc/ (bsa_bwd_sm90_ws.cu went in 5004d75) stayed in the reused build/lib
    copy (pip builds in-tree, setuptools keeps build/lib) and was shipped in longcat_kernels/_csrc: the
    installed sources then differed from the prebuilt _C's digest (prebuilt refused, a JIT build every time)
    and the JIT build compiled the stale file."""
    csrc = tmp_path / "lib" / "longcat_kernels" / "_csrc"
    csrc.mkdir(parents=True)
    (csrc / "bsa_bwd_sm90_ws.cu").write_text("// a kernel file removed from csrc/ since the last build\n")
    env = dict(os.environ, LONGCAT_KERNELS_SKIP_CUDA_BUILD="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path / "lib")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    from longcat_kernels._digest import SOURCE_SUFFIXES, csrc_digest

    want = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc")) if f.endswith(SOURCE_SUFFIXES))
    assert sorted(os.listdir(csrc)) == want
    assert csrc_digest(str(csrc)) == csrc_digest(os.path.join(ROOT, "csrc"))


@pytest.mark.parametrize("value,entry", [
    ("-arch=native", "native"), ("-arch native", "native"), ("-arch=all", "all"), ("-arch=all-major", "all-major"),
    ("-gencode=arch=compute_80,code=sm_80 -arch=all-major", "all-major"),
])
def test_cuda_archs_refuses_nvcc_target_shorthands_that_bypass_its_checks(monkeypatch, value, entry):
    """-arch=native/all/all-major passed verbatim: on an H100 native is sm_90 without the 'a' (the wgmma kernels
    built as stubs that trap at launch, the very target '9.0'/'sm_90' is refused for), without a GPU it is
    sm_75, and all/all-major include sm_75 and plain sm_90 (nvcc 13.0 --dryrun): the checks never saw a number."""
    from longcat_kernels import _envvars

    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", value)
    with pytest.raises(ValueError, match=rf"^LONGCAT_KERNELS_CUDA_ARCHS: {entry!r} .*got {value!r}"):
        _envvars.cuda_arch_flags_from_env()
    assert "LONGCAT_KERNELS_CUDA_ARCHS" in _envvars.setting_problems()


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's globals, with setuptools.setup a no-op (this machine's torch has no CUDA: no build)."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    return runpy.run_path(os.path.join(ROOT, "setup.py"))


def _fake_cuda_home(tmp_path, release):
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.88'\n")
    nvcc.chmod(0o755)
    return str(tmp_path / "cuda")


def test_setup_skips_the_extension_when_nvcc_and_torch_cuda_majors_differ(setup_py, monkeypatch, tmp_path):
    """torch cu128 with nvcc 13.0 (this machine's /usr/local/cuda) passed the build checks, then torch's
    BuildExtension raised RuntimeError('The detected CUDA version (%s) mismatches ...', '13.0', '12.8') (its
    %s never filled in): the whole install failed on the optional extension instead of the documented
    warning line and a pure-Python install."""
    import torch
    from torch.utils import cpp_extension

    monkeypatch.delenv("LONGCAT_KERNELS_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", _fake_cuda_home(tmp_path, "13.0"))
    reason = setup_py["_cuda_build_reason"]()
    assert reason is not None and "CUDA 13.0" in reason and "CUDA 12.8" in reason and "CUDA_HOME" in reason
    # a minor mismatch is a warning in torch: still built
    monkeypatch.setattr(torch.version, "cuda", "13.1")
    assert setup_py["_cuda_build_reason"]() is None


def test_an_interrupted_jit_build_is_tried_again_not_reported_as_loaded(monkeypatch):
    """Ctrl-C during the minutes-long first-use JIT build (a notebook's first CUDA call) left the loader 'tried'
    with no module and no error: every later call in the process got extension_error() None (the dispatcher
    then took the extension as loaded with no kernels), extension() raised 'ImportError: None', the report said
    'skipped: None', and the build was never tried again."""
    import torch

    from longcat_kernels import _ext

    def no_prebuilt():
        raise ImportError("No module named 'longcat_kernels._C'")

    def interrupted(why):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_load_prebuilt", no_prebuilt)
    monkeypatch.setattr(_ext, "_load_jit", interrupted)
    monkeypatch.setattr(_ext, "_STATE", {"tried": False, "module": None, "error": None, "how": None, "kernels": None})
    with pytest.raises(KeyboardInterrupt):
        _ext.load_extension()
    built = object()
    monkeypatch.setattr(_ext, "_load_jit", lambda why: built)
    assert _ext.load_extension() is built
    assert _ext.extension_status() == ("jit", None)


def test_jit_build_with_a_cuda_home_without_nvcc_says_so_before_building(monkeypatch, tmp_path, caplog):
    """A CUDA runtime image (/usr/local/cuda with libraries, no bin/nvcc) passed the JIT check (torch finds that
    CUDA_HOME), logged 'JIT-building csrc/ ... minutes the first time' and failed inside ninja: the kept reason
    was torch's 'Error building extension', not the missing compiler that setup.py names ('nvcc not found')."""
    import torch
    from torch.utils import cpp_extension

    from longcat_kernels import _ext

    calls = []
    home = tmp_path / "cuda"
    (home / "lib64").mkdir(parents=True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(home))
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: calls.append(kw))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("LONGCAT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS", raising=False)
    with caplog.at_level("WARNING", logger="longcat_kernels"), \
            pytest.raises(ImportError, match=r"JIT build needs nvcc: .*bin.nvcc not found.*CUDA_HOME"):
        _ext._load_jit()
    assert calls == [] and "JIT-building" not in caplog.text
    nvcc = home / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    _ext._load_jit()
    assert len(calls) == 1


@pytest.mark.parametrize("value", ["-arch=sm_80 -arch=sm_90a", "-arch=sm_80;-arch=sm_90a", "-arch sm_80 -arch=sm_120"])
def test_cuda_archs_refuses_a_second_arch_flag_nvcc_would_drop(monkeypatch, value):
    """nvcc keeps the last -arch of several ('incompatible redefinition for option gpu-architecture, the last value
    of this option was used', nvcc 13.0, a warning the JIT build does not show): '-arch=sm_80;-arch=sm_90a' built
    sm_90a alone, and on an A100 the extension had no kernels (auto ran Triton) for a target the user listed."""
    from longcat_kernels import _envvars

    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", value)
    with pytest.raises(ValueError, match=r"^LONGCAT_KERNELS_CUDA_ARCHS: nvcc keeps only the last -arch"):
        _envvars.cuda_arch_flags_from_env()
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "-arch=sm_90a -gencode=arch=compute_80,code=sm_80")
    assert _envvars.cuda_arch_flags_from_env() == ["-arch=sm_90a", "-gencode=arch=compute_80,code=sm_80"]


def test_setup_names_why_an_installed_torch_failed_to_import(setup_py, monkeypatch):
    """A torch that is installed but fails to import (OSError: a missing libcudnn / libcudart) was reported as
    'torch is not importable in the build environment (OSError); use --no-build-isolation': the cause dropped
    and the advice wrong (the build already saw the environment's site-packages)."""
    import builtins

    real_import = builtins.__import__

    def broken(name, *a, **kw):
        if name == "torch" or name.startswith("torch."):
            raise OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")
        return real_import(name, *a, **kw)

    monkeypatch.delenv("LONGCAT_KERNELS_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    reason = setup_py["_cuda_build_reason"]()
    assert "libcudnn.so.9: cannot open shared object file" in reason and "--no-build-isolation" not in reason

    def missing(name, *a, **kw):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'", name="torch")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", missing)
    assert "--no-build-isolation" in setup_py["_cuda_build_reason"]()


def test_wheel_built_without_the_extension_drops_an_earlier_builds_extension(tmp_path):
    """A wheel built without the extension (LONGCAT_KERNELS_SKIP_CUDA_BUILD=1, build isolation, a CPU node) from a
    tree whose reused build/lib held an earlier build's _C*.so and _C.csrc_sha1 shipped both in the
    py3-none-any wheel: installed, that binary (another torch, other targets: sm_80 alone on an H100) was loaded
    instead of the JIT build of the device's own target."""
    pkg = tmp_path / "lib" / "longcat_kernels"
    pkg.mkdir(parents=True)
    (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"an earlier build")
    (pkg / "_C.csrc_sha1").write_text("0" * 40 + "\n")
    env = dict(os.environ, LONGCAT_KERNELS_SKIP_CUDA_BUILD="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "-d", str(tmp_path / "lib")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in pkg.glob("_C.*")) == []
    assert (pkg / "_ext.py").is_file() and (pkg / "_csrc" / "ops.cpp").is_file()
