"""Loads the compiled extension ``longcat_kernels._C`` once and keeps the failure reason.

Never imported at package import time: the first call on CUDA tensors (the chooser needs to know
which csrc kernels exist) triggers the load. Order: the prebuilt ``_C`` (built at install when the
build saw a CUDA torch and nvcc; not loaded if the kernel sources changed since it was built, by the
digest ``setup.py`` writes next to it: ``_C.csrc_sha1``); else, in a source checkout with nvcc, a JIT build of ``csrc/``
cached under ``LONGCAT_KERNELS_CACHE`` (one log line; ``LONGCAT_KERNELS_JIT=0`` opts out). A failed
load is remembered with its reason so that ``backend="cuda"`` raises it and
``python -m longcat_kernels.env`` reports it (``extension_status()``: prebuilt, jit or skipped).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Optional, Tuple

from ._digest import csrc_digest
from ._envvars import NVCC_FLAGS, build_jobs, cache_dir, cuda_arch_flags, env_flag, torch_arch_list_ignored

__all__ = ["load_extension", "extension_error", "extension", "extension_status", "csrc_kernels"]

log = logging.getLogger("longcat_kernels")
_LOCK = threading.Lock()
_STATE = {"tried": False, "module": None, "error": None, "how": None, "kernels": None}


# written by setup.py next to the built _C: the digest of the csrc/ it was built from
SOURCES_FILE = "_C.csrc_sha1"


def _check_prebuilt_sources(so_path: str) -> None:
    """Raises ImportError if the ``_C`` at ``so_path`` was built from other sources than the package's.

    In a source checkout the built ``_C`` stays (ignored by git) while ``csrc/`` moves on: after a
    pull or an edit without a rebuild the old kernels were loaded and ran, silently. A build without
    the digest file (older setup.py) is not checked."""
    side = os.path.join(os.path.dirname(so_path), SOURCES_FILE)
    src = _csrc_dir()
    if src is None or not os.path.isfile(side):
        return
    # bytes: a digest file that is not text (a truncated copy) is a mismatch, not a UnicodeDecodeError that
    # was no ImportError (the JIT build never took over) and did not name the file
    with open(side, "rb") as f:
        built = f.read().decode("ascii", "replace").strip()
    now = csrc_digest(src)
    if built != now:
        raise ImportError(
            f"{so_path} was built from other kernel sources than {src} (changed since the build: "
            f"{SOURCES_FILE} {built[:12]}, sources now {now[:12]}); rebuild it with "
            "`pip install --no-build-isolation -e .`"
        )


def _load_prebuilt():
    import importlib.util  # noqa: PLC0415

    # checked before the import: a loaded _C registers its ops, and the JIT build could not replace them
    spec = importlib.util.find_spec(f"{__package__}._C")
    if spec is not None and spec.origin:
        _check_prebuilt_sources(spec.origin)
    from . import _C  # noqa: PLC0415 - the compiled module registers torch.ops.longcat_kernels.*

    return _C


def _csrc_dir():
    """The kernel sources: ``csrc/`` of a source checkout (editable install), else the copy that
    ``setup.py`` puts into an installed package (``longcat_kernels/_csrc``); None if neither."""
    here = os.path.dirname(os.path.abspath(__file__))
    for path in (os.path.join(os.path.dirname(here), "csrc"), os.path.join(here, "_csrc")):
        if os.path.isfile(os.path.join(path, "ops.cpp")):
            return path
    return None


def _load_jit(prebuilt_error: str = "not built"):
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
        raise ImportError("JIT build needs the kernel sources (neither csrc/ next to the package nor "
                          "longcat_kernels/_csrc found)")
    if torch.version.cuda is None:
        raise ImportError(f"JIT build needs a CUDA build of torch, got {torch.__version__}")
    if cpp_extension.CUDA_HOME is None:
        raise ImportError("JIT build needs nvcc: CUDA_HOME not found (set CUDA_HOME)")
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        # a CUDA runtime image has /usr/local/cuda (which torch takes) without the compiler: the build failed
        # inside ninja, minutes after the log line, with torch's "Error building extension"
        raise ImportError(f"JIT build needs nvcc: {nvcc} not found (CUDA_HOME={cpp_extension.CUDA_HOME!r} has no "
                          "compiler, e.g. a CUDA runtime image); set CUDA_HOME to a CUDA toolkit")
    sources = sorted(
        os.path.join(src, f) for f in os.listdir(src) if f.endswith((".cu", ".cpp"))
    )
    cap = tuple(torch.cuda.get_device_capability())
    if cap < (8, 0):
        # the device's own target (sm_70/sm_75) failed minutes into the build: mma.sync bf16, cp.async
        raise ImportError(f"the csrc kernels need a GPU of compute capability 8.0 or newer, this one has "
                          f"{cap[0]}.{cap[1]} (the triton and torch backends run here)")
    arch = cuda_arch_flags(cap)
    # the sources' digest (the one setup.py writes beside a prebuilt _C) and the target flags
    digest = hashlib.sha1((csrc_digest(src) + " " + " ".join(arch + NVCC_FLAGS)).encode())
    tag = f"torch{torch.__version__}_cu{torch.version.cuda}".replace(".", "_").replace("+", "_")
    root = cache_dir()
    build_dir = os.path.join(root, "jit", f"{tag}_{digest.hexdigest()[:12]}")
    try:
        os.makedirs(build_dir, exist_ok=True)
        lock = open(os.path.join(build_dir, "longcat.lock"), "a")  # noqa: SIM115 - closed below
    except OSError as e:
        raise OSError(f"LONGCAT_KERNELS_CACHE: cannot write the JIT build folder {build_dir} under {root!r} "
                      f"({type(e).__name__}: {e}); set LONGCAT_KERNELS_CACHE to a writable folder") from e
    # the prebuilt's import error is named: one built for another torch fails with an undefined symbol,
    # and "no prebuilt extension" sent the user looking for a build that is there
    log.warning(
        "longcat_kernels: no usable prebuilt extension (%s); JIT-building csrc/ into %s (cached; minutes the "
        "first time; LONGCAT_KERNELS_JIT=0 skips it)", prebuilt_error, build_dir)
    ignored = torch_arch_list_ignored(arch)
    if ignored:
        log.warning("longcat_kernels: %s", ignored)
    jobs = build_jobs()  # a bad MAX_JOBS raises before the build; unset: from RAM (nvcc jobs take ~4 GB each)
    with lock, _environ(MAX_JOBS=str(jobs)):
        _lock_build_dir(lock, build_dir)
        cpp_extension.load(
            name="longcat_kernels_C",
            sources=sources,
            extra_cflags=["-O3"],
            extra_cuda_cflags=NVCC_FLAGS + arch,
            extra_include_paths=[src],
            build_directory=build_dir,
            is_python_module=False,
            verbose=env_flag("LONGCAT_KERNELS_VERBOSE_BUILD", False),
        )
    return torch.ops.longcat_kernels


@contextlib.contextmanager
def _environ(**values):
    """``os.environ`` with ``values`` set for the block, restored after (the JIT build runs inside the
    user's process: its MAX_JOBS must not leak into their later builds)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _lock_build_dir(lock, build_dir: str) -> None:
    """Holds ``build_dir`` for this process (an ``flock`` on ``longcat.lock``, released by the OS when
    the file closes or the process dies), then removes torch's own ``lock`` file if one is left.

    ``cpp_extension.load`` guards a build folder with a plain ``lock`` file that only a clean exit
    removes: after a build killed mid-way (SIGTERM/SIGKILL, a job time limit) every later process waited
    on it forever, silently. Every loader of this folder takes the flock first, so a ``lock`` file seen
    while holding it is a dead process's."""
    try:
        import fcntl  # noqa: PLC0415 - POSIX only
    except ImportError:
        return
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.warning("longcat_kernels: another process is building the extension in %s; waiting for it", build_dir)
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    except OSError as e:  # a file system without flock: torch's own lock file only, as before
        log.warning("longcat_kernels: cannot lock %s (%s); a lock file left by a killed build is not cleared",
                    build_dir, e)
        return
    stale = os.path.join(build_dir, "lock")
    if os.path.exists(stale):
        log.warning("longcat_kernels: removing %s, left by a JIT build that was killed", stale)
        os.remove(stale)


def load_extension():
    """Returns the loaded extension module, or None (see ``extension_error()``)."""
    jit = env_flag("LONGCAT_KERNELS_JIT", True)  # a bad value raises here, not as a load failure
    refused = None
    with _LOCK:
        if not _STATE["tried"]:
            _STATE["tried"] = True
            try:
                import torch  # noqa: PLC0415

                if not torch.cuda.is_available():
                    raise ImportError("no CUDA device (torch.cuda.is_available() is False)")
                try:
                    _STATE["module"] = _load_prebuilt()
                    _STATE["how"] = "prebuilt"
                except ImportError as e:
                    if not jit:
                        raise ImportError(
                            f"longcat_kernels._C is not built ({e}) and LONGCAT_KERNELS_JIT=0 skips the JIT "
                            "build; build it with `pip install --no-build-isolation -e .` on a machine with "
                            "nvcc and a CUDA torch, or unset LONGCAT_KERNELS_JIT"
                        ) from e
                    try:
                        # a bad MAX_JOBS raises here, naming it, as setup.py does: kept as a JIT build failure
                        # it left the extension skipped and "auto" ran Triton for the process without a word
                        build_jobs()
                    except ValueError as bad:
                        refused = bad
                        raise
                    try:
                        _STATE["module"] = _load_jit(f"{type(e).__name__}: {e}")
                    except Exception as e2:
                        raise ImportError(f"longcat_kernels._C is not built ({e}); JIT build failed: "
                                          f"{type(e2).__name__}: {e2}") from e2
                    _STATE["how"] = "jit"
            except Exception as e:  # noqa: BLE001 - any failure is kept as the reason
                if e is refused:  # not a load failure: raised on every call until fixed, then built
                    _STATE["tried"] = False
                    raise
                _STATE["module"] = None
                _STATE["how"] = "skipped"
                _STATE["error"] = f"{type(e).__name__}: {e}"
            except BaseException:
                # Ctrl-C (or SystemExit) during the minutes-long JIT build is no result: it left "tried" with
                # neither module nor error (taken as loaded, "ImportError: None"), never built again
                _STATE["tried"] = False
                raise
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


def extension_status() -> Tuple[str, Optional[str]]:
    """(``"prebuilt"`` | ``"jit"`` | ``"skipped"``, reason when skipped)."""
    load_extension()
    return _STATE["how"], _STATE["error"]


def csrc_kernels() -> Tuple[str, ...]:
    """csrc kernel families the loaded extension can run on the current device, as it reports them
    (``torch.ops.longcat_kernels.available_kernels()``: e.g. ``("sm90_ws", "sm90", "sm80")``)."""
    if _STATE["kernels"] is None:
        if load_extension() is None:
            return ()
        import torch  # noqa: PLC0415

        names = torch.ops.longcat_kernels.available_kernels()
        _STATE["kernels"] = tuple(n for n in names.split(",") if n)
    return _STATE["kernels"]
