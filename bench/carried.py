"""Pure-Python wheels carried to a machine without a package index (the device machine).

The GPU scripts (``bench/*_gpu.py``) run where ``pip`` cannot reach a registry; packages they need
beyond torch travel as wheels in ``.gpu_carry/vc_wheels/`` (an ignored folder) and go on
``sys.path`` (a pure-Python wheel is importable as a zip) only when the package is not installed.
"""

from __future__ import annotations

import glob
import os
import sys
import types
from typing import Iterable, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def use_carried_wheels(modules: Iterable[str], notes: List[str]) -> None:
    """For each module that does not import, put its carried wheel (if any) first on ``sys.path``.

    Args:
        modules: import names whose wheel file names start with ``<name>-``.
        notes: gets one line per wheel used (recorded in the script's JSON).
    """
    wheels = sorted(glob.glob(os.path.join(REPO, ".gpu_carry", "vc_wheels", "*.whl")))
    for mod in modules:
        try:
            __import__(mod)
            continue
        except ImportError:
            pass
        found = [w for w in wheels if os.path.basename(w).lower().startswith(mod + "-")]
        if found:
            sys.path.insert(0, found[-1])
            notes.append(f"{mod} imported from carried wheel {os.path.basename(found[-1])}")


def stub_ftfy_if_missing(notes: List[str]) -> None:
    """The pipeline's prompt cleaning calls ``ftfy.fix_text``; where ftfy is neither installed nor
    carried, an identity stand-in (the benches' prompts are ASCII) is registered and noted."""
    try:
        import ftfy  # noqa: F401
    except ImportError:
        stub = types.ModuleType("ftfy")
        stub.fix_text = lambda text, *a, **k: text
        sys.modules["ftfy"] = stub
        notes.append("ftfy not installed: identity fix_text stub (ASCII prompts)")
