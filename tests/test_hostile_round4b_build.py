"""Hostile-user round 4b: the build, the extension loader, the environment and the testing helpers."""

from __future__ import annotations

import pytest

from longcat_kernels import _envvars


# ---------------------------------------------------------------------------------------------
# LONGCAT_KERNELS_CUDA_ARCHS
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,entry", [
    ("9.0", "9.0"),
    ("9.0;8.0", "9.0"),
    ("-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_90,code=sm_90"),
    ("-arch=sm_90", "-arch=sm_90"),
])
def test_cuda_archs_plain_hopper_target_is_refused(monkeypatch, value, entry):
    # "9.0" (no "a") built the wgmma kernels as stubs whose body is __trap(); the extension still
    # reported sm90_ws/sm90 available on an H100 (its binary is sm_90), so every csrc call on Hopper
    # died with a sticky CUDA launch failure instead of a build-time error
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", value)
    with pytest.raises(ValueError, match=r"^LONGCAT_KERNELS_CUDA_ARCHS: Hopper needs the arch-specific target 9.0a") as e:
        _envvars.cuda_arch_flags_from_env()
    assert repr(entry) in str(e.value) and repr(value) in str(e.value)
    assert "LONGCAT_KERNELS_CUDA_ARCHS" in _envvars.setting_problems()


@pytest.mark.parametrize("value", ["9.0a", "9.0a;8.0", "8.0", "8.9, 10.0a", "-gencode=arch=compute_90a,code=sm_90a"])
def test_cuda_archs_other_targets_still_parse(monkeypatch, value):
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", value)
    flags = _envvars.cuda_arch_flags_from_env()
    assert flags and all(f.startswith("-gencode=arch=compute_") for f in flags)


def test_cuda_archs_gencode_with_a_space(monkeypatch):
    # nvcc's own spelling "-gencode arch=...,code=..." was split into words and each word parsed as a
    # capability: "bad entry '-gencode'" for exactly the nvcc flags the variable documents
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS",
                       "-gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=sm_80")
    assert _envvars.cuda_arch_flags_from_env() == [
        "-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_80,code=sm_80"]
    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", "-gencode arch=compute_90,code=sm_90")
    with pytest.raises(ValueError, match="Hopper needs the arch-specific target 9.0a"):
        _envvars.cuda_arch_flags_from_env()


# ---------------------------------------------------------------------------------------------
# the JIT build (_ext._load_jit) with torch's compile step faked: this machine has no nvcc/CUDA torch
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_jit(monkeypatch, tmp_path):
    """``_load_jit`` as on a CUDA machine with nvcc; ``cpp_extension.load`` recorded; like torch's
    FileBaton it waits while a ``lock`` file is in the folder (torch: forever; here: 5 s, then raises)."""
    import os
    import time

    import torch
    from torch.utils import cpp_extension

    calls = []

    def load(**kw):
        deadline = time.monotonic() + 5.0
        while os.path.exists(os.path.join(kw["build_directory"], "lock")):
            if time.monotonic() > deadline:
                raise TimeoutError("torch would wait on the lock file forever")
            time.sleep(0.05)
        calls.append(kw)

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", "/usr/local/cuda")
    monkeypatch.setattr(cpp_extension, "load", load)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setenv("LONGCAT_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LONGCAT_KERNELS_CUDA_ARCHS", raising=False)
    return calls


def test_jit_build_after_a_killed_build_does_not_hang(fake_jit, caplog):
    # a build killed mid-way (SIGTERM from a job time limit, SIGKILL) leaves torch's "lock" file in
    # the build folder; every later process then waited on it forever after the "JIT-building" line
    import os

    from longcat_kernels import _ext

    _ext._load_jit()
    build_dir = fake_jit[-1]["build_directory"]
    open(os.path.join(build_dir, "lock"), "w").close()  # what the killed build left
    with caplog.at_level("WARNING", logger="longcat_kernels"):
        _ext._load_jit()
    assert len(fake_jit) == 2 and fake_jit[-1]["build_directory"] == build_dir
    assert "left by a JIT build that was killed" in caplog.text
    assert not os.path.exists(os.path.join(build_dir, "lock"))


def test_jit_build_waits_for_another_process_holding_the_folder(fake_jit, caplog):
    # a second process must not remove the lock of a build that is still running: it waits on the
    # folder's flock (held here by a child process) and says so
    import os
    import subprocess
    import sys
    import time

    from longcat_kernels import _ext

    _ext._load_jit()
    build_dir = fake_jit[-1]["build_directory"]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time\n"
        f"f = open({os.path.join(build_dir, 'longcat.lock')!r}, 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
        f"open({os.path.join(build_dir, 'lock')!r}, 'w').close(); print('held', flush=True); time.sleep(1.5)\n"
        f"import os; os.remove({os.path.join(build_dir, 'lock')!r})\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="longcat_kernels"):
            _ext._load_jit()
        assert time.monotonic() - t0 > 1.0
        assert "another process is building the extension" in caplog.text
        assert "left by a JIT build that was killed" not in caplog.text
    finally:
        holder.wait(timeout=30)


def test_jit_build_with_an_unwritable_cache_names_the_variable(fake_jit, monkeypatch, tmp_path):
    # the cache path under a regular file (or a read-only folder): a bare OS error that did not say
    # which setting chose the folder
    from longcat_kernels import _ext

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("LONGCAT_KERNELS_CACHE", str(blocker / "sub"))
    with pytest.raises(OSError, match=r"^LONGCAT_KERNELS_CACHE: cannot write the JIT build folder .*set "
                                      r"LONGCAT_KERNELS_CACHE to a writable folder"):
        _ext._load_jit()
    assert fake_jit == []
