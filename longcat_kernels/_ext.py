"""Loads the compiled extension ``longcat_kernels._C`` once and keeps the failure reason.

Never imported at package import time: the first caller that needs the ``"cuda"`` backend (or
``available_backends()``) triggers the load. A failed load is remembered with its reason so that
``backend="cuda"`` raises it and ``available_backends()`` reports it; nothing falls back silently.

The csrc engineer may add a JIT path (``torch.utils.cpp_extension.load``) in ``_load_jit`` for
source checkouts; it is tried only when ``LONGCAT_KERNELS_JIT=1``.
"""

from __future__ import annotations

import os
import threading
from typing import Optional

__all__ = ["load_extension", "extension_error", "extension"]

_LOCK = threading.Lock()
_STATE = {"tried": False, "module": None, "error": None}


def _load_prebuilt():
    from . import _C  # noqa: PLC0415 - the compiled module registers torch.ops.longcat_kernels.*

    return _C


def _csrc_dir():
    """The csrc/ folder of a source checkout (None in an installed wheel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(os.path.dirname(here), "csrc")
    return path if os.path.isfile(os.path.join(path, "ops.cpp")) else None


def cuda_arch_flags(capability=None):
    """nvcc target flags: ``LONGCAT_KERNELS_CUDA_ARCHS`` if set, else the device's own target.

    Hopper (9.0) builds for ``sm_90a`` (wgmma/setmaxnreg need the ``a`` target); other devices for
    their own ``sm_XY``. ``LONGCAT_KERNELS_CUDA_ARCHS`` holds nvcc flags verbatim, e.g.
    ``"-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=sm_80"``.
    """
    env = os.environ.get("LONGCAT_KERNELS_CUDA_ARCHS", "").strip()
    if env:
        return env.split()
    if capability is None:
        return ["-gencode=arch=compute_90a,code=sm_90a"]
    major, minor = capability
    suffix = "a" if (major, minor) == (9, 0) else ""
    return [f"-gencode=arch=compute_{major}{minor}{suffix},code=sm_{major}{minor}{suffix}"]


# nvcc flags shared by setup.py and the JIT build
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


def _load_jit():
    """JIT-builds csrc/ with ``torch.utils.cpp_extension.load`` (ninja) and loads the ops.

    The build folder is cached per torch version, CUDA version, target flags and source hash under
    ``$LONGCAT_KERNELS_CACHE`` (default ``~/.cache/longcat_kernels``), so a second process reuses it.
    Returns ``torch.ops.longcat_kernels`` (the library registers its ops when loaded).
    """
    import hashlib  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from torch.utils import cpp_extension  # noqa: PLC0415

    src = _csrc_dir()
    if src is None:
        raise ImportError("JIT build needs a source checkout (csrc/ not found next to the package)")
    if torch.version.cuda is None:
        raise ImportError(f"JIT build needs a CUDA build of torch, got {torch.__version__}")
    if cpp_extension.CUDA_HOME is None:
        raise ImportError("JIT build needs nvcc: CUDA_HOME not found (set CUDA_HOME)")
    sources = sorted(
        os.path.join(src, f) for f in os.listdir(src) if f.endswith((".cu", ".cpp"))
    )
    headers = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith((".h", ".cuh")))
    arch = cuda_arch_flags(torch.cuda.get_device_capability())
    digest = hashlib.sha1()
    for path in sources + headers:
        with open(path, "rb") as f:
            digest.update(f.read())
    digest.update(" ".join(arch + NVCC_FLAGS).encode())
    tag = f"torch{torch.__version__}_cu{torch.version.cuda}".replace(".", "_").replace("+", "_")
    root = os.environ.get("LONGCAT_KERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "longcat_kernels"))
    build_dir = os.path.join(root, "jit", f"{tag}_{digest.hexdigest()[:12]}")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(
        name="longcat_kernels_C",
        sources=sources,
        extra_cflags=["-O3"],
        extra_cuda_cflags=NVCC_FLAGS + arch,
        extra_include_paths=[src],
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("LONGCAT_KERNELS_VERBOSE_BUILD", "0") == "1",
    )
    return torch.ops.longcat_kernels


def load_extension():
    """Returns the loaded extension module, or None (see ``extension_error()``)."""
    with _LOCK:
        if not _STATE["tried"]:
            _STATE["tried"] = True
            try:
                import torch  # noqa: PLC0415

                if not torch.cuda.is_available():
                    raise ImportError("no CUDA device (torch.cuda.is_available() is False)")
                try:
                    _STATE["module"] = _load_prebuilt()
                except ImportError as e:
                    if os.environ.get("LONGCAT_KERNELS_JIT", "0") == "1":
                        _STATE["module"] = _load_jit()
                    else:
                        raise ImportError(
                            f"longcat_kernels._C is not built ({e}); build it with `pip install -e .` on a "
                            "machine with nvcc and a CUDA torch, or set LONGCAT_KERNELS_JIT=1"
                        ) from e
            except Exception as e:  # noqa: BLE001 - any failure is kept as the reason
                _STATE["module"] = None
                _STATE["error"] = f"{type(e).__name__}: {e}"
        return _STATE["module"]


def extension():
    """The loaded extension; raises ImportError with the kept reason if it is unavailable."""
    mod = load_extension()
    if mod is None:
        raise ImportError(_STATE["error"])
    return mod


def extension_error() -> Optional[str]:
    """None if the extension is loaded, else why not."""
    load_extension()
    return _STATE["error"]
