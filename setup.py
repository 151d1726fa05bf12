"""Build script: pure Python package plus, when possible, the CUDA extension ``longcat_kernels._C``.

The extension is built only when a CUDA-enabled torch is importable in the build environment and
nvcc is found (``CUDA_HOME``/``nvcc`` on PATH). Otherwise the build prints one warning line and
installs the pure-Python package (Triton and PyTorch backends still work). Environment:

- ``LONGCAT_KERNELS_SKIP_CUDA_BUILD=1``: never build the extension.
- ``LONGCAT_KERNELS_CUDA_ARCHS``: arch list for nvcc (filled in with the csrc build).
- ``MAX_JOBS``: parallel compile jobs (ninja).

With pip's default build isolation torch is not importable while building; use
``pip install --no-build-isolation -e .`` on a CUDA machine to build the extension.
"""

import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(msg: str) -> None:
    print(f"WARNING: longcat-kernels: {msg}; the CUDA extension is skipped (triton/torch backends still work)",
          file=sys.stderr)


def _cuda_build_reason():
    """None if the CUDA extension can be built here, else why not."""
    if os.environ.get("LONGCAT_KERNELS_SKIP_CUDA_BUILD", "0") == "1":
        return "LONGCAT_KERNELS_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001
        return f"torch is not importable in the build environment ({type(e).__name__}); use --no-build-isolation"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc not found (set CUDA_HOME)"
    if not os.path.isdir(os.path.join(HERE, "csrc")):
        return "no csrc/ directory"
    return None


def _csrc_extensions():
    """The CUDAExtension list for csrc/ (filled in by the csrc build). Called only when buildable."""
    return []


def cuda_extensions():
    """Extension modules to build: [] (with one warning line) when CUDA cannot be built here."""
    reason = _cuda_build_reason()
    if reason is not None:
        _warn(reason)
        return []
    return _csrc_extensions()


def _cmdclass(exts):
    if not exts:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


_EXTS = cuda_extensions()

setup(ext_modules=_EXTS, cmdclass=_cmdclass(_EXTS))
