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
        kw["MAX_JOBS"] = os.environ.get("MAX_JOBS")  # what torch's ninja call would read
        deadline = time.monotonic() + 5.0
        while os.path.exists(os.path.join(kw["build_directory"], "lock")):
            if time.monotonic() > deadline:
                raise TimeoutError("torch would wait on the lock file forever")
            time.sleep(0.05)
        calls.append(kw)

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    (tmp_path / "cuda" / "bin").mkdir(parents=True)  # the JIT build checks for bin/nvcc (not run here)
    (tmp_path / "cuda" / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "cuda"))
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


# ---------------------------------------------------------------------------------------------
# the testing helpers users call
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 6, 8), (1, 2, 3, 4, 5)])
def test_make_tensor_permuted_needs_a_4d_shape(shape):
    # permuted=True on another rank returned a contiguous tensor: a "strided inputs" test that
    # tested contiguous ones
    from longcat_kernels.testing import make_tensor

    with pytest.raises(ValueError, match=r"^permuted: needs a 4-D \(B, S, H, D\) shape, got"):
        make_tensor(shape, permuted=True)
    assert not make_tensor((2, 6, 3, 8), permuted=True).is_contiguous()


@pytest.mark.parametrize("kw,msg", [
    (dict(grid=(4.5, 4, 4)), r"^grid: expected \(t, h, w\) positive ints, got \(4.5, 4, 4\)"),
    (dict(grid=(2, 4, 4), grid_k=(3.9, 4, 4)), r"^grid_k: expected \(Tk, 4, 4\) with Tk >= 2, got \(3.9, 4, 4\)"),
    (dict(grid=(2, 4, 4), noise=float("inf")), r"^noise: expected a finite value >= 0, got inf"),
    (dict(grid=(2, 4, 4), corr=(8.0, float("inf"), 4.0)), r"^corr: expected three positive finite"),
])
def test_make_video_qkv_refuses_values_it_silently_changed(kw, msg):
    # a fractional grid was truncated to another grid; noise=inf gave all-NaN q, k, v
    from longcat_kernels.testing import make_video_qkv

    with pytest.raises(ValueError, match=msg):
        make_video_qkv(1, heads=2, head_dim=8, **kw)


@pytest.mark.parametrize("prefix_len,err", [(-2, ValueError), (13, ValueError), (2.5, TypeError), (True, TypeError)])
def test_prefix_attn_two_calls_refuses_a_prefix_the_op_refuses(prefix_len, err):
    # -2 split at S - 2 (prefix queries over all but the last two keys); 2.5 ran as 2: a baseline
    # that silently computed another rule than lk.prefix_attn (which refuses these)
    import torch

    import longcat_kernels as lk
    from longcat_kernels.testing import make_qkv
    from longcat_kernels.testing.baselines import prefix_attn_two_calls

    q, k, v = make_qkv(1, 12, 2, 8)
    with pytest.raises(err, match=r"^prefix_len: expected"):
        prefix_attn_two_calls(q, k, v, prefix_len, impl="math")
    with pytest.raises(err, match=r"^prefix_len: expected"):
        lk.prefix_attn(q, k, v, prefix_len)
    torch.testing.assert_close(prefix_attn_two_calls(q, k, v, 5, impl="math"), lk.prefix_attn(q, k, v, 5),
                               atol=1e-5, rtol=1e-5)


def test_baselines_refuse_a_cache_of_a_partial_frame():
    # prebuilt_kv_inputs rotated the fresh keys at frame Sc // hw: with a cache of 1.5 frames the
    # baseline silently used the wrong positions
    import torch

    from longcat_kernels import Rope3D
    from longcat_kernels.testing import make_qkv
    from longcat_kernels.testing.baselines import prebuilt_kv_inputs, unfused_kv_cache_attn

    rope = Rope3D((4, 2, 2), 12)
    q, k, v = make_qkv(1, 8, 2, 12)
    kc, vc = torch.randn(1, 6, 2, 12), torch.randn(1, 6, 2, 12)
    with pytest.raises(ValueError, match=r"^k_cache, q: expected whole frames of 4 tokens .*got 6 cache and 8 fresh"):
        prebuilt_kv_inputs(q, k, v, kc, vc, rope=rope)
    with pytest.raises(ValueError, match=r"^k_cache, q: expected whole frames of 4 tokens"):
        unfused_kv_cache_attn(q[:, :6], k[:, :6], v[:, :6], kc, vc, rope=rope, impl="math")
    prebuilt_kv_inputs(q, k, v, kc[:, :4], vc[:, :4], rope=rope)  # whole frames still run


def test_check_close_names_a_baseline_of_another_shape():
    # a baseline of another shape was reported as "the baseline itself is NaN/inf"
    import torch

    from longcat_kernels.testing import check_close

    e = torch.randn(2, 3, 4)
    msg = check_close(e, e, torch.randn(2, 4, 3))
    assert msg == "output: baseline shape (2, 4, 3) != expected (2, 3, 4)"


# ---------------------------------------------------------------------------------------------
# the examples
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,msg", [(["--layers", "0"], "--layers: expected a positive number of blocks, got 0"),
                                      (["--sparsity", "nan"], "--sparsity: expected a float in [0, 1), got nan")])
def test_wan_example_refuses_bad_flags_before_running(args, msg):
    # --layers 0 built the GPU model with no transformer block: "rel L2 0", equal step times, nothing
    # measured; --sparsity 1.5 failed only after two full model runs
    import os
    import subprocess
    import sys

    pytest.importorskip("diffusers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(root, "examples", "wan_diffusers_bsa.py"), *args],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 2 and msg in r.stderr and "rel L2" not in r.stdout, (r.stdout + r.stderr)[-2000:]


@pytest.mark.parametrize("value", ["hopper", "9.0"])
def test_bad_cuda_archs_raises_on_any_call_as_the_report_says(monkeypatch, capsys, value):
    # the report listed it as INVALID and said "every op call raises", but calls ran: on a GPU without
    # a prebuilt extension the JIT build failed on it and auto ran Triton without a word
    import torch

    import longcat_kernels as lk
    from longcat_kernels import env

    monkeypatch.setenv("LONGCAT_KERNELS_CUDA_ARCHS", value)
    env.main([])
    assert "every op call raises" in capsys.readouterr().out
    q = torch.randn(1, 8, 1, 8)
    with pytest.raises(ValueError, match=r"^LONGCAT_KERNELS_CUDA_ARCHS: "):
        lk.prefix_attn(q, q, q, 0)


# ---------------------------------------------------------------------------------------------
# setup.py
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's globals, with setuptools.setup a no-op (this machine's torch has no CUDA: no build)."""
    import os
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return runpy.run_path(os.path.join(root, "setup.py"))


@pytest.mark.parametrize("value", ["0", "four", "-2"])
def test_setup_refuses_a_max_jobs_torch_would_drop(setup_py, monkeypatch, value):
    # torch ignores a MAX_JOBS that is not all digits and passes "0" to ninja as -j 0 (no limit): the
    # RAM-based default was skipped too, so the nvcc jobs were as many as ninja likes
    monkeypatch.setenv("MAX_JOBS", value)
    with pytest.raises(ValueError, match=rf"^MAX_JOBS: expected a positive number of parallel compile jobs, got '{value}'"):
        setup_py["_max_jobs_from_ram"]()


def test_setup_max_jobs_blank_is_unset_and_spaces_are_stripped(setup_py, monkeypatch):
    import os

    monkeypatch.setenv("MAX_JOBS", " 3 ")
    setup_py["_max_jobs_from_ram"]()
    assert os.environ["MAX_JOBS"] == "3"  # torch's isdigit() test dropped " 3 "
    monkeypatch.setenv("MAX_JOBS", "")
    setup_py["_max_jobs_from_ram"]()
    assert os.environ["MAX_JOBS"].isdigit() and int(os.environ["MAX_JOBS"]) >= 1


@pytest.mark.parametrize("kw,msg", [(dict(factor=float("nan")), r"^factor: expected a finite number >= 0, got nan"),
                                    (dict(floor=float("nan")), r"^floor: expected a finite number >= 0, got nan"),
                                    (dict(floor=-1e-3), r"^floor: expected a finite number >= 0, got -0.001")])
def test_check_close_refuses_a_nan_or_negative_tolerance(kw, msg):
    # a NaN tolerance failed every comparison as "rel L2 0.000e+00 > tol nan": an accuracy failure of
    # the kernel under test, for a bad argument of the test
    import torch

    from longcat_kernels.testing import assert_close, check_close

    e = torch.randn(3, 4)
    for fn in (check_close, assert_close):
        with pytest.raises(ValueError, match=msg):
            fn(e, e, e, **kw)


@pytest.mark.parametrize("dtype", ["int32", "int8", "bool"])
def test_make_tensor_refuses_a_non_floating_dtype(dtype):
    # normal samples cast to integers: a tensor of mostly zeros, -1 and 1
    import torch

    from longcat_kernels.testing import make_qkv, make_tensor

    with pytest.raises(ValueError, match=rf"^dtype: expected a floating dtype, got torch.{dtype}"):
        make_tensor((2, 3), getattr(torch, dtype))
    with pytest.raises(ValueError, match="^dtype: expected a floating dtype"):
        make_qkv(1, 4, 2, 8, dtype=getattr(torch, dtype))
    assert make_tensor((2, 3), torch.float8_e4m3fn).dtype == torch.float8_e4m3fn


def test_bsa_token_mask_refuses_a_block_mask_of_other_grids():
    # a block mask from other grids or chunks (more blocks than these give) was indexed by its first
    # blocks: a token mask for another selection, and an oracle that silently tested something else
    import torch

    from longcat_kernels.testing import bsa_token_mask

    grid, chunk = (2, 4, 4), (1, 2, 2)  # 8 blocks
    ok = bsa_token_mask(torch.ones(1, 1, 8, 8, dtype=torch.bool), grid, grid, chunk, chunk)
    assert ok.shape == (1, 1, 32, 32) and bool(ok.all())
    with pytest.raises(ValueError, match=r"^block_mask: expected \[B, H, 8, 8\] blocks for grid_q \(2, 4, 4\)"):
        bsa_token_mask(torch.ones(1, 1, 16, 8, dtype=torch.bool), grid, grid, chunk, chunk)


def test_jit_log_names_why_the_prebuilt_extension_was_not_used(fake_jit, monkeypatch, caplog):
    # a prebuilt _C built for another torch fails to import (undefined symbol); the JIT line said
    # "no prebuilt extension", sending the user looking for a build that is there
    import torch

    from longcat_kernels import _ext

    def broken():
        raise ImportError("longcat_kernels/_C.so: undefined symbol: _ZN3c104impl")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_ext, "_load_prebuilt", broken)
    monkeypatch.setattr(_ext, "_STATE", {"tried": False, "module": None, "error": None, "how": None, "kernels": None})
    with caplog.at_level("WARNING", logger="longcat_kernels"):
        assert _ext.load_extension() is not None
    assert _ext._STATE["how"] == "jit"
    assert "no usable prebuilt extension (ImportError: longcat_kernels/_C.so: undefined symbol" in caplog.text


# ---------------------------------------------------------------------------------------------
# a prebuilt _C from other sources (a checkout keeps the ignored build while csrc/ moves on)
# ---------------------------------------------------------------------------------------------
def test_setup_and_package_agree_on_the_sources_digest(setup_py, tmp_path):
    import os

    from longcat_kernels import _ext

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert setup_py["csrc_digest"](os.path.join(root, "csrc")) == _ext.csrc_digest(_ext._csrc_dir())
    so = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"")
    setup_py["write_sources_digest"](str(so))
    assert (tmp_path / _ext.SOURCES_FILE).read_text().strip() == _ext.csrc_digest(_ext._csrc_dir())


def test_prebuilt_extension_from_other_sources_is_not_loaded(monkeypatch, tmp_path):
    # an editable install keeps longcat_kernels/_C*.so (git-ignored) while csrc/ changes with a pull or an
    # edit: the old kernels were imported and ran, silently; now refused before the import (a loaded _C
    # registers its ops), so the JIT build of the current sources takes over or the error says rebuild
    import importlib.machinery
    import importlib.util

    from longcat_kernels import _ext

    so = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    so.write_bytes(b"not a library")  # importing it would fail differently
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *a):
        if name == "longcat_kernels._C":
            return importlib.machinery.ModuleSpec(name, None, origin=str(so))
        return real_find_spec(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    (tmp_path / _ext.SOURCES_FILE).write_text("0" * 40 + "\n")
    with pytest.raises(ImportError, match=r"was built from other kernel sources than .*rebuild it with "
                                          r"`pip install --no-build-isolation -e .`"):
        _ext._load_prebuilt()
    # the digest of the current sources: the check passes and the import itself is attempted
    (tmp_path / _ext.SOURCES_FILE).write_text(_ext.csrc_digest(_ext._csrc_dir()) + "\n")
    with pytest.raises(ImportError) as e:
        _ext._load_prebuilt()
    assert "other kernel sources" not in str(e.value)


def test_jit_build_on_a_file_system_without_flock_still_builds(fake_jit, monkeypatch, caplog):
    # some network/FUSE file systems refuse flock (ENOLCK/EOPNOTSUPP): the build must go on as before
    # (torch's lock file only), not fail on the lock meant to make it safer
    import errno
    import fcntl

    from longcat_kernels import _ext

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with caplog.at_level("WARNING", logger="longcat_kernels"):
        _ext._load_jit()
    assert len(fake_jit) == 1 and "cannot lock" in caplog.text


def test_check_close_says_when_the_reference_is_nan():
    # a NaN in the oracle was reported as "rel L2 inf > tol ...": the kernel's error
    import torch

    from longcat_kernels.testing import check_close

    a = torch.randn(2, 3)
    e = a.double().clone()
    e[0, 1] = float("nan")
    assert check_close(a, e) == "output: the expected (reference) tensor has 1 NaN of 6 entries"


def test_sdist_ships_the_kernel_sources(tmp_path):
    # `python -m build` (and `pip install` of an sdist) builds the wheel from the sdist, which had no
    # csrc/: no extension at install ("no csrc/ directory") and none at first use ("JIT build needs the
    # kernel sources"), from a checkout that has them
    import os
    import shutil
    import subprocess
    import sys
    import tarfile

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src = tmp_path / "src"
    src.mkdir()
    for f in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(root, f), src / f)
    for d in ("csrc", "longcat_kernels"):
        shutil.copytree(os.path.join(root, d), src / d, ignore=shutil.ignore_patterns("__pycache__", "*.so", "_csrc"))
    env = dict(os.environ, LONGCAT_KERNELS_SKIP_CUDA_BUILD="1")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=src,
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (sdist,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    want = {f"csrc/{f}" for f in os.listdir(os.path.join(root, "csrc")) if f.endswith((".cu", ".cpp", ".h", ".cuh"))}
    assert "csrc/ops.cpp" in want and want <= names, sorted(want - names)


def test_jit_build_limits_nvcc_jobs_by_ram_and_checks_max_jobs(fake_jit, monkeypatch):
    # the JIT build ran as many nvcc jobs as ninja likes (cores + 2, ~4 GB each): the RAM-based limit of
    # setup.py did not apply to it, and a bad MAX_JOBS reached torch (dropped, or 0 = no limit)
    import os

    from longcat_kernels import _envvars, _ext

    monkeypatch.delenv("MAX_JOBS", raising=False)
    _ext._load_jit()
    assert fake_jit[-1]["MAX_JOBS"] == str(_envvars.build_jobs())
    assert "MAX_JOBS" not in os.environ  # set for the build only: the user's process keeps its environment
    monkeypatch.setenv("MAX_JOBS", "0")
    with pytest.raises(ValueError, match="MAX_JOBS: expected a positive number"):
        _ext._load_jit()
    monkeypatch.setenv("MAX_JOBS", " 3 ")
    _ext._load_jit()
    assert fake_jit[-1]["MAX_JOBS"] == "3" and os.environ["MAX_JOBS"] == " 3 "
