"""The benchmark CLI refuses what it cannot measure honestly: bad arguments fail at parsing with the
flag named, a run that times nothing exits non-zero, results are labelled with what ran."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from bench import machine


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_only_from_a_checkout_of_this_repo(tmp_path, monkeypatch):
    """bench installed into a venv inside another git project must not record that project's commit."""
    monkeypatch.delenv("LONGCAT_KERNELS_BENCH_COMMIT", raising=False)
    try:
        _git(tmp_path, "init", "-q")
        _git(tmp_path, "commit", "-q", "--allow-empty", "-m", "other project")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git unavailable")
    other = _git(tmp_path, "rev-parse", "HEAD")
    site = tmp_path / "venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    monkeypatch.setattr(machine, "REPO_ROOT", site)  # where an installed bench/ lives
    assert machine.git_commit() is None
    monkeypatch.setattr(machine, "REPO_ROOT", tmp_path)  # a checkout: its own commit
    assert machine.git_commit() == other
