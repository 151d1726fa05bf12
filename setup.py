"""Build script: pure Python package plus, when possible, the CUDA extension ``longcat_kernels._C``.

The extension is built only when a CUDA-enabled torch is importable in the build environment and
nvcc of torch's CUDA major version is found (``CUDA_HOME``/``nvcc`` on PATH). Otherwise the build prints one warning line and
installs the pure-Python package (Triton and PyTorch backends still work). Environment:

- ``LONGCAT_KERNELS_SKIP_CUDA_BUILD=1``: never build the extension.
- ``LONGCAT_KERNELS_CUDA_ARCHS``: targets, ``"9.0a;8.0"`` or nvcc ``-gencode`` flags; default: the
  visible GPU's own target (``sm_90a`` on Hopper), ``sm_90a`` without a GPU.
Both are parsed by ``longcat_kernels/_envvars.py`` (loaded by path: the package is not importable
while building); a bad value stops the build with the variable's name.
- ``TORCH_CUDA_ARCH_LIST`` (torch's own) is not read: the build passes its own targets; one warning line
  when it names other targets and ``LONGCAT_KERNELS_CUDA_ARCHS`` is not set.
- ``MAX_JOBS``: parallel compile jobs (ninja); default from free RAM (about 4 GB a job).

With pip's default build isolation torch is not importable while building; the package then
JIT-builds the same sources at first use on a CUDA machine with nvcc (cached; one log line;
``LONGCAT_KERNELS_JIT=0`` opts out), or use ``pip install --no-build-isolation -e .`` to build here.
"""

import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _package_module(name: str):
    """``longcat_kernels/<name>.py`` loaded by path: the package is not importable while building."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_lk{name}", os.path.join(HERE, "longcat_kernels", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ENV = _package_module("_envvars")
DIGEST = _package_module("_digest")
# sha1 over the kernel sources, as ``longcat_kernels._ext`` computes it for the installed package
csrc_digest = DIGEST.csrc_digest


def _warn(msg: str) -> None:
    print(f"WARNING: longcat-kernels: {msg}; the CUDA extension is skipped (triton/torch backends still work)",
          file=sys.stderr)


def _nvcc_release(nvcc: str):
    """The CUDA release of ``nvcc`` (``"13.0"``), None if ``nvcc --version`` does not say."""
    import re
    import subprocess

    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _cuda_build_reason():
    """None if the CUDA extension can be built here, else why not."""
    if ENV.env_flag("LONGCAT_KERNELS_SKIP_CUDA_BUILD", False):
        return "LONGCAT_KERNELS_SKIP_CUDA_BUILD=1"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001
        if isinstance(e, ModuleNotFoundError) and (e.name or "torch").split(".")[0] == "torch":
            # the interpreter named: `pip` of another Python than the one with torch gave the same advice to a
            # user who had passed --no-build-isolation (the H100 machine: `pip` is not its torch venv's)
            return (f"torch is not importable in the build environment ({sys.executable}: {type(e).__name__}); "
                    "use --no-build-isolation, with the pip of the Python that has torch (`python -m pip`)")
        # an installed torch that fails to load (a missing CUDA library): the cause, not the isolation advice
        return f"torch failed to import in the build environment ({type(e).__name__}: {e})"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc not found (set CUDA_HOME)"
    release = _nvcc_release(nvcc)
    if release is not None and release.split(".")[0] != torch.version.cuda.split(".")[0]:
        # torch's BuildExtension raises on it (a message with its %s unfilled): the whole install failed
        return (f"nvcc {nvcc} is CUDA {release}, torch {torch.__version__} was built with CUDA {torch.version.cuda} "
                f"(torch builds no extension across CUDA major versions); set CUDA_HOME to a CUDA "
                f"{torch.version.cuda.split('.')[0]}.x toolkit")
    if not os.path.isdir(os.path.join(HERE, "csrc")):
        return "no csrc/ directory"
    if not ENV.cuda_arch_flags_from_env() and torch.cuda.is_available():
        # the default target is the visible GPU's own: sm_70/sm_75 failed the whole install minutes into
        # nvcc (mma.sync bf16, cp.async need sm_80), while the triton/torch backends run there
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) < (8, 0):
            return (f"the visible GPU has compute capability {major}.{minor}, the csrc kernels need 8.0 or newer "
                    "(LONGCAT_KERNELS_CUDA_ARCHS builds for another GPU)")
    return None


def _max_jobs_from_ram() -> None:
    """Sets MAX_JOBS for the nvcc build (``_envvars.build_jobs``: the user's value checked, else from RAM)."""
    os.environ["MAX_JOBS"] = str(ENV.build_jobs())


def _warn_torch_arch_list(archs=None) -> None:
    """One warning line when TORCH_CUDA_ARCH_LIST is set to other targets than ``archs`` (the build's) and
    LONGCAT_KERNELS_CUDA_ARCHS is not: our -gencode flags make torch drop it, so its targets were ignored
    without a word."""
    msg = ENV.torch_arch_list_ignored(archs)
    if msg:
        print(f"WARNING: longcat-kernels: {msg}", file=sys.stderr)


def _csrc_extensions():
    """The CUDAExtension list for csrc/. Called only when buildable.

    Targets from ``LONGCAT_KERNELS_CUDA_ARCHS`` (e.g. ``"9.0a;8.0"``), default the visible GPU's
    own (``sm_90a`` on Hopper: the wgmma kernels need the ``a`` target), ``sm_90a`` without a GPU.
    """
    import torch
    from torch.utils.cpp_extension import CUDAExtension

    _max_jobs_from_ram()
    csrc = os.path.join(HERE, "csrc")
    sources = sorted(os.path.join("csrc", f) for f in os.listdir(csrc) if f.endswith((".cu", ".cpp")))
    archs = ENV.cuda_arch_flags(torch.cuda.get_device_capability() if torch.cuda.is_available() else None)
    _warn_torch_arch_list(archs)
    nvcc = ENV.NVCC_FLAGS + archs
    return [
        CUDAExtension(
            name="longcat_kernels._C",
            sources=sources,
            include_dirs=[csrc],
            extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc},
        )
    ]


def cuda_extensions():
    """Extension modules to build: [] (with one warning line) when CUDA cannot be built here."""
    reason = _cuda_build_reason()
    if reason is not None:
        _warn(reason)
        return []
    return _csrc_extensions()


def _build_py_with_csrc(with_ext: bool = True):
    """build_py that also copies csrc/ into the package (``longcat_kernels/_csrc``), so an installed
    wheel built without the extension can JIT-build it at first use (``longcat_kernels/_ext.py``).
    Without the extension (``with_ext`` False) it removes a ``_C`` that an earlier build left in build/lib."""
    from setuptools.command.build_py import build_py

    class BuildPyWithCsrc(build_py):
        def run(self):
            super().run()
            pkg = os.path.join(self.build_lib, "longcat_kernels")
            if not with_ext and os.path.isdir(pkg):
                # build/lib is reused: an earlier build's _C (another torch, other targets) went into this pure
                # wheel and was loaded instead of the JIT build of the device's own target
                for f in os.listdir(pkg):
                    if f.startswith("_C.") and (f.endswith((".so", ".pyd")) or f == "_C.csrc_sha1"):
                        os.remove(os.path.join(pkg, f))
            src = os.path.join(HERE, "csrc")
            if not os.path.isdir(src):
                return
            dst = os.path.join(self.build_lib, "longcat_kernels", "_csrc")
            # emptied first: build/lib is reused between builds, and a kernel file removed from csrc/ since
            # stayed in the wheel (compiled by the JIT build; a digest that refused the prebuilt _C)
            shutil.rmtree(dst, ignore_errors=True)
            os.makedirs(dst, exist_ok=True)
            for f in sorted(os.listdir(src)):
                if f.endswith(DIGEST.SOURCE_SUFFIXES):  # the sources the installed package digests
                    shutil.copy2(os.path.join(src, f), os.path.join(dst, f))

    return BuildPyWithCsrc


def write_sources_digest(ext_path: str) -> None:
    """Writes ``_C.csrc_sha1`` next to a built ``_C``: the package refuses a ``_C`` whose sources have
    changed since (a source checkout keeps the built file while csrc/ moves on)."""
    with open(os.path.join(os.path.dirname(ext_path), "_C.csrc_sha1"), "w") as f:
        f.write(csrc_digest(os.path.join(HERE, "csrc")) + "\n")


def _cmdclass(exts):
    out = {"build_py": _build_py_with_csrc(with_ext=bool(exts))}
    if not exts:
        return out
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildExtWithDigest(base):
        def run(self):
            super().run()
            for ext in self.extensions:  # the file imported: in the source tree when built in place
                path = self.get_ext_fullpath(ext.name)
                if os.path.exists(path):
                    write_sources_digest(path)

    out["build_ext"] = BuildExtWithDigest
    return out


_EXTS = cuda_extensions()

setup(ext_modules=_EXTS, cmdclass=_cmdclass(_EXTS))
