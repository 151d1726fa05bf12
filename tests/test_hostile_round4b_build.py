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
