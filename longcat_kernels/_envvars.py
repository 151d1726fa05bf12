"""The product's environment variables, each read by one parser that raises on a bad value.

=================================  ==============================================================
``LONGCAT_KERNELS_BACKEND``        ``auto`` | ``torch`` | ``triton`` | ``cuda`` (any case, stripped; empty:
                                   unset): replaces ``"auto"`` for the ops that backend implements
                                   (``cuda``: not select_blocks / qk_norm_rope / fp8_quantize, which
                                   keep auto's choice), then an explicit request: it never falls back
``LONGCAT_KERNELS_JIT``            ``1`` (default) | ``0``: JIT-build ``csrc/`` at first use when no
                                   prebuilt extension is found (``0``: never)
``LONGCAT_KERNELS_SKIP_CUDA_BUILD`` ``0`` (default) | ``1``: never build the extension at install
``LONGCAT_KERNELS_CUDA_ARCHS``     targets of the extension build: ``"9.0a;8.0"`` (compute
                                   capabilities, ``;``/``,``/space separated) or nvcc
                                   ``-gencode=...`` flags verbatim (``;``/space separated; one ``-arch`` at most); default: the device's own
                                   (``sm_90a`` at install without a device). Hopper is ``9.0a``:
                                   a plain ``9.0``/``sm_90`` is refused (its wgmma kernels trap), so are
                                   targets before 8.0, an ``a`` target before Hopper (no build) and
                                   nvcc's ``-arch=native``/``all``/``all-major`` (plain sm_90, sm_75)
``LONGCAT_KERNELS_CACHE``          JIT build cache folder (default ``~/.cache/longcat_kernels``; a relative
                                   one is resolved against the working directory where first read)
``LONGCAT_KERNELS_VERBOSE_BUILD``  ``0`` (default) | ``1``: verbose JIT build
``LONGCAT_KERNELS_DETERMINISTIC``  ``0`` (default) | ``1``: asks for a deterministic BSA backward (as does
                                   ``torch.use_deterministic_algorithms(True)``); the shipped backward
                                   has no atomics and is deterministic either way (value still checked)
``LONGCAT_KERNELS_FUSE_ISLANDS``   ``1`` (default) | ``0``: ``longcat_vc`` runs the DiT's fp32 elementwise
                                   islands eagerly instead of ``torch.compile``-fused on CUDA
``LONGCAT_KERNELS_BENCH_COMMIT``   ``bench`` only: the commit a results file records where the tree
                                   has no ``.git`` (the device machine); hex, 7-40 digits
=================================  ==============================================================

Imports nothing but ``os`` and ``re``: ``setup.py`` loads this file by path at build time.
"""

from __future__ import annotations

import os
import re
from typing import List, Optional

__all__ = ["env_flag", "backend_override", "setting_problems", "cuda_arch_flags_from_env", "cuda_arch_flags", "NVCC_FLAGS",
           "cache_dir", "check_removed",
           "torch_arch_list_ignored",
           "check_environment", "bench_commit", "settings", "unknown_settings", "KNOWN", "REMOVED", "BENCH_ONLY"]

BACKENDS = ("auto", "torch", "triton", "cuda")

KNOWN = (
    "LONGCAT_KERNELS_BACKEND",
    "LONGCAT_KERNELS_JIT",
    "LONGCAT_KERNELS_SKIP_CUDA_BUILD",
    "LONGCAT_KERNELS_CUDA_ARCHS",
    "LONGCAT_KERNELS_CACHE",
    "LONGCAT_KERNELS_VERBOSE_BUILD",
    "LONGCAT_KERNELS_DETERMINISTIC",
    "LONGCAT_KERNELS_FUSE_ISLANDS",
    "LONGCAT_KERNELS_BENCH_COMMIT",
)

# kernel-variant knobs that existed until the kernel choice moved into dispatch.py: the winners are
# now fixed by the inputs, the losers left the build (numbers in csrc/NOTES.md). Setting one raises
# rather than being ignored.
REMOVED = (
    "LONGCAT_KERNELS_CUDA_IMPL",
    "LONGCAT_KERNELS_SM90WS_VARIANT",
    "LONGCAT_KERNELS_SM90WS_BSA_VARIANT",
    "LONGCAT_KERNELS_SM90_WARPGROUPS",
    "LONGCAT_KERNELS_SM90_BSA_STAGES",
)


def check_removed() -> None:
    """Raises ``ValueError`` if a removed kernel-variant variable (``REMOVED``) is set."""
    for name in REMOVED:
        if name in os.environ:
            raise ValueError(
                f"{name}: removed (set to {os.environ[name]!r}); the kernel follows from the inputs "
                "(longcat_kernels/dispatch.py; pass backend= to choose a backend), the lost variants' numbers "
                "are in csrc/NOTES.md. Unset it."
            )


# the boolean knobs, with their defaults (each is also read where it is used)
FLAGS = {
    "LONGCAT_KERNELS_JIT": True,
    "LONGCAT_KERNELS_SKIP_CUDA_BUILD": False,
    "LONGCAT_KERNELS_VERBOSE_BUILD": False,
    "LONGCAT_KERNELS_DETERMINISTIC": False,
    "LONGCAT_KERNELS_FUSE_ISLANDS": True,
}
# any case: names are case-sensitive, a lower-case longcat_kernels_backend set nothing without a word
_LOOKALIKE = re.compile(r"^LONGCAT_?KERNELS?_", re.IGNORECASE)
_scanned = False


def check_environment(scan: bool = True) -> None:
    """Run by the dispatcher on each eager call (a few microseconds): raises on a removed variable or
    a bad value of any boolean knob, of the backend or of the build targets (a bad
    ``LONGCAT_KERNELS_CUDA_ARCHS`` was only a JIT load failure: ``auto`` then ran Triton without a word,
    while the environment report said every call raises); the first call also warns about variables that
    look like ours but are not (``LONGCAT_KERNEL_BACKEND``, a plural ``..._BACKENDS``): a misspelt
    knob would otherwise be ignored without a word.

    ``scan=False`` (the dispatcher inside a ``torch.compile`` trace) leaves the once-per-process flag
    alone: a trace that read and flipped it left a graph whose guard on it failed on the next call
    (the first compile of every process compiled twice); the first eager call scans instead."""
    global _scanned
    check_removed()
    for name, check in _setting_checks().items():
        if name in os.environ:
            check()
    if _scanned or not scan:
        return
    _scanned = True
    unknown = unknown_settings()
    if unknown:
        import warnings  # noqa: PLC0415 (this file imports only os and re at load: setup.py reads it)

        warnings.warn(
            f"{', '.join(unknown)}: not a longcat_kernels setting, ignored (misspelt?). Known: {', '.join(KNOWN)}",
            UserWarning, stacklevel=3,
        )


def unknown_settings() -> List[str]:
    """The variables set that look like ours but are not (``LONGCAT_KERNEL_BACKEND``, ``..._BACKENDS``, any
    case), sorted: what ``check_environment`` warns about and the environment report lists."""
    return sorted(k for k in os.environ if _LOOKALIKE.match(k) and k not in KNOWN and k not in REMOVED)


_CHECKS: dict = {}


def _setting_checks() -> dict:
    """``{name: check}`` for every setting whose value can be refused (the boolean knobs, the backend,
    the build targets): the one table that ``check_environment`` runs and ``setting_problems`` reports."""
    if not _CHECKS:
        _CHECKS.update({name: (lambda n=name, d=default: env_flag(n, d)) for name, default in FLAGS.items()})
        _CHECKS["LONGCAT_KERNELS_BACKEND"] = backend_override
        _CHECKS["LONGCAT_KERNELS_CUDA_ARCHS"] = cuda_arch_flags_from_env
    return _CHECKS


# read by ``bench`` alone: checked there and reported by ``setting_problems``, never by the op calls
BENCH_ONLY = ("LONGCAT_KERNELS_BENCH_COMMIT",)


def settings() -> dict:
    """``{name: value}`` of the ``LONGCAT_KERNELS_*`` variables set, sorted by name (what the environment
    report and the bench results record)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("LONGCAT_KERNELS_")}


def setting_problems() -> dict:
    """``{name: why}`` for each ``LONGCAT_KERNELS_*`` variable set to a value the package (or ``bench``,
    ``BENCH_ONLY``) refuses (the checks the readers run), for the environment report: it lists them
    instead of failing on the first."""
    out = {}
    for name in REMOVED:
        if name in os.environ:
            out[name] = "removed: unset it (the kernel follows from the inputs)"
    # a bad bench commit was not listed here: the report showed it as a setting, bench then raised
    checks = {**_setting_checks(), "LONGCAT_KERNELS_BENCH_COMMIT": bench_commit}
    for name, check in checks.items():
        if name in os.environ:
            try:
                check()
            except ValueError as e:
                out[name] = str(e)
    return out


def bench_commit() -> Optional[str]:
    """``LONGCAT_KERNELS_BENCH_COMMIT`` (stripped), or None when unset/empty; raises unless 7-40 hex digits."""
    raw = os.environ.get("LONGCAT_KERNELS_BENCH_COMMIT", "").strip()
    if raw == "":
        return None
    if not re.fullmatch(r"[0-9a-fA-F]{7,40}", raw):
        raise ValueError(f"LONGCAT_KERNELS_BENCH_COMMIT: expected a commit hash (7-40 hex digits), got "
                         f"{os.environ['LONGCAT_KERNELS_BENCH_COMMIT']!r}")
    return raw


def env_flag(name: str, default: bool) -> bool:
    """``name`` as a boolean: unset or empty -> ``default``; ``0``/``1`` (also false/true, no/yes,
    off/on). Anything else raises ``ValueError`` naming the variable."""
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}: expected 0 or 1 (or false/true, no/yes, off/on), got {os.environ[name]!r}")


def backend_override() -> Optional[str]:
    """``LONGCAT_KERNELS_BACKEND`` (lower-cased), or None when unset/empty; raises on other names."""
    raw = os.environ.get("LONGCAT_KERNELS_BACKEND", "").strip().lower()
    if raw == "":
        return None
    if raw not in BACKENDS:
        raise ValueError(f"LONGCAT_KERNELS_BACKEND: expected one of {BACKENDS}, got {os.environ['LONGCAT_KERNELS_BACKEND']!r}")
    return raw


_CAP = re.compile(r"^(\d+)\.(\d+)(a?)$")
# nvcc target flags; given bare, the value is the next word ("-gencode arch=compute_90a,code=sm_90a")
_FLAGS = ("-gencode", "-arch", "--generate-code", "-code")
# Hopper without the arch-specific "a": the wgmma/setmaxnreg kernels compile to stubs that trap at
# launch, while the extension reports them available on an H100 (its binary is sm_90)
_PLAIN_SM90 = re.compile(r"(?:compute|sm)_90(?![0-9a-z])")


# nvcc's target shorthands (-arch=native, -arch all-major): no number for the checks to read
_SHORTHAND = re.compile(r"^(?:-arch=)?(native|all|all-major)$")
# a target in a verbatim flag: compute_80, sm_90a, sm_100a (the number is major * 10 + minor)
_TARGET = re.compile(r"(?:compute|sm)_(\d+)([a-z]?)(?![0-9a-z])")


def _unbuildable(raw: str, entry: str, cc: int, arch_specific: bool) -> Optional[ValueError]:
    """Why the kernels cannot be built for target ``cc`` (``major * 10 + minor``), else None: nvcc failed
    on it minutes into the build (a JIT build then left the extension skipped and "auto" ran Triton)."""
    if cc < 80:
        return ValueError(
            f"LONGCAT_KERNELS_CUDA_ARCHS: the kernels need compute capability 8.0 or newer (mma.sync bf16, "
            f"cp.async): {entry!r} cannot be built; expected e.g. '9.0a;8.0', got {raw!r}")
    if arch_specific and cc < 90:
        return ValueError(
            f"LONGCAT_KERNELS_CUDA_ARCHS: {entry!r}: arch-specific ('a') targets start with Hopper (9.0a); "
            f"expected e.g. '9.0a;8.0', got {raw!r}")
    return None


def _plain_sm90_error(raw: str, entry: str) -> ValueError:
    return ValueError(
        f"LONGCAT_KERNELS_CUDA_ARCHS: Hopper needs the arch-specific target 9.0a (sm_90a): {entry!r} builds the "
        f"wgmma kernels as stubs that trap at launch; expected e.g. '9.0a;8.0', got {raw!r}"
    )


def _verbatim_flags(raw: str) -> Optional[List[str]]:
    """``raw`` split into nvcc target flags if every word is one (or the value of a bare one), else None.

    ``;`` separates flags as it separates capabilities: no nvcc flag contains one, and two ``;``-joined
    ``-gencode=...`` reached nvcc as one flag, a JIT build failure after which ``auto`` ran Triton."""
    words = raw.replace(";", " ").split()
    out: List[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if not w.startswith(_FLAGS):
            return None
        out.append(w)
        if w in _FLAGS:
            if i + 1 == len(words) or words[i + 1].startswith("-"):
                # a bare flag without its value reached nvcc, which failed minutes into the build
                raise ValueError(f"LONGCAT_KERNELS_CUDA_ARCHS: {w} needs a value (e.g. '-gencode arch=compute_90a,code=sm_90a' "
                                 f"or '9.0a'), got {raw!r}")
            out.append(words[i + 1])
            i += 1
        elif w.endswith("="):
            raise ValueError(f"LONGCAT_KERNELS_CUDA_ARCHS: {w!r} has no value (e.g. '-gencode=arch=compute_90a,code=sm_90a' "
                             f"or '9.0a'), got {raw!r}")
        i += 1
    return out


def cuda_arch_flags_from_env() -> Optional[List[str]]:
    """nvcc target flags from ``LONGCAT_KERNELS_CUDA_ARCHS``, or None when unset/empty.

    ``"9.0a;8.0"`` -> ``["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80"]``;
    flags starting with ``-gencode``/``-arch``/``--generate-code`` pass verbatim (also nvcc's
    ``-gencode arch=...,code=...`` with a space). Raises ``ValueError`` on anything else, and on a
    plain Hopper target (``9.0``, ``sm_90``, ``compute_90``: the Hopper kernels need ``9.0a``).
    """
    raw = os.environ.get("LONGCAT_KERNELS_CUDA_ARCHS", "").strip()
    if raw == "":
        return None
    flags_given = _verbatim_flags(raw)
    if flags_given is not None:
        archs = [f for f in flags_given if f == "-arch" or f.startswith("-arch=")]
        if len(archs) > 1:
            # nvcc warns "incompatible redefinition for option 'gpu-architecture'" (hidden in a JIT build) and
            # builds the last alone: an A100 listed first got no kernels
            raise ValueError(
                f"LONGCAT_KERNELS_CUDA_ARCHS: nvcc keeps only the last -arch of {len(archs)}; list several targets "
                f"as capabilities, e.g. '9.0a;8.0', or -gencode flags, got {raw!r}")
        for f in flags_given:
            m = _SHORTHAND.match(f)
            if m is not None:
                # no number for the checks below: native is sm_90 (no "a") on an H100 and sm_75 without a GPU,
                # all/all-major include sm_75 and plain sm_90
                raise ValueError(
                    f"LONGCAT_KERNELS_CUDA_ARCHS: {m.group(1)!r} builds targets the kernels cannot use (native: "
                    f"sm_90 without the 'a' on Hopper, sm_75 without a GPU; all/all-major: sm_75 and plain sm_90); "
                    f"unset it for the visible GPU's own target (9.0a on Hopper) or list targets, e.g. '9.0a;8.0', "
                    f"got {raw!r}")
            if _PLAIN_SM90.search(f):
                raise _plain_sm90_error(raw, f)
            for m in _TARGET.finditer(f):
                err = _unbuildable(raw, f, int(m.group(1)), m.group(2) == "a")
                if err is not None:
                    raise err
        return flags_given
    toks = [t for t in re.split(r"[;,\s]+", raw) if t]
    flags = []
    for t in toks:
        m = _CAP.match(t)
        if m is None:
            raise ValueError(
                "LONGCAT_KERNELS_CUDA_ARCHS: expected compute capabilities like '9.0a;8.0' or nvcc "
                f"-gencode flags, got {raw!r} (bad entry {t!r})"
            )
        cc = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        if cc == "90":
            raise _plain_sm90_error(raw, t)
        err = _unbuildable(raw, t, int(m.group(1)) * 10 + int(m.group(2)), m.group(3) == "a")
        if err is not None:
            raise err
        flags.append(_gencode(cc))
    return flags


def _gencode(cc: str) -> str:
    """nvcc's flag building target ``cc`` (``"90a"``, ``"80"``) as its own SASS."""
    return f"-gencode=arch=compute_{cc},code=sm_{cc}"


def cuda_arch_flags(capability=None) -> List[str]:
    """nvcc target flags of the extension build (setup.py and the JIT build): ``LONGCAT_KERNELS_CUDA_ARCHS`` if
    set, else the device's own target; ``sm_90a`` without a device (``capability`` None).

    Hopper (9.0) builds for ``sm_90a`` (wgmma/setmaxnreg need the ``a`` target); other devices for
    their own ``sm_XY``. ``LONGCAT_KERNELS_CUDA_ARCHS``: ``"9.0a;8.0"`` or nvcc flags verbatim.
    """
    env = cuda_arch_flags_from_env()
    if env:
        return env
    if capability is None:
        return [_gencode("90a")]
    major, minor = capability
    return [_gencode(f"{major}{minor}" + ("a" if (major, minor) == (9, 0) else ""))]


# nvcc flags of the extension build besides its targets, shared by setup.py and the JIT build
NVCC_FLAGS = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]


def torch_arch_list_ignored(built: Optional[List[str]] = None) -> Optional[str]:
    """The warning to give when ``TORCH_CUDA_ARCH_LIST`` is set and ``LONGCAT_KERNELS_CUDA_ARCHS`` is not, else
    None: torch's extension builds read it, ours pass ``-gencode`` flags (torch then drops its list), so a
    user's ``TORCH_CUDA_ARCH_LIST="8.0"`` built the visible GPU's own target without a word. ``built``: the
    ``-gencode`` flags the build passes; a list naming exactly those targets (``"9.0a"`` on an H100, as
    NVIDIA's containers set it) is not warned about."""
    torch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not torch_list or os.environ.get("LONGCAT_KERNELS_CUDA_ARCHS", "").strip():
        return None
    if built is not None:
        wanted = set()
        for t in (t for t in re.split(r"[;,\s]+", torch_list) if t):
            m = _CAP.match(t[:-4] if t.endswith("+PTX") else t)
            if m is None:
                wanted = None
                break
            wanted.add(_gencode(f"{m.group(1)}{m.group(2)}{m.group(3)}"))
        if wanted == set(built):
            return None
    return (f"TORCH_CUDA_ARCH_LIST={torch_list!r} is ignored by the longcat_kernels extension build; set "
            f"LONGCAT_KERNELS_CUDA_ARCHS (e.g. '9.0a;8.0') to choose its targets (default: the visible GPU's own)")


# LONGCAT_KERNELS_CACHE value -> the absolute folder it was resolved to when first read in this process
_CACHE_RESOLVED: dict = {}


def cache_dir() -> str:
    """JIT build cache root, an absolute path: ``LONGCAT_KERNELS_CACHE`` (a leading ``~`` expanded: a quoted
    ``"~/x"`` reaches us unexpanded and built into a folder named ``~`` under the working directory, a new
    minutes-long build per directory) or ``~/.cache/longcat_kernels``. A relative value is resolved against
    the working directory where this process first reads it (it was returned relative: the build folder
    moved with every ``os.chdir``); another process started elsewhere resolves it elsewhere (the environment
    report shows the folder)."""
    raw = os.environ.get("LONGCAT_KERNELS_CACHE", "").strip()
    if not raw:
        return os.path.join(os.path.expanduser("~"), ".cache", "longcat_kernels")
    if raw not in _CACHE_RESOLVED:
        _CACHE_RESOLVED[raw] = os.path.abspath(os.path.expanduser(raw))
    return _CACHE_RESOLVED[raw]


def build_jobs() -> int:
    """Parallel nvcc jobs for an extension build (``setup.py`` and the JIT build): ``MAX_JOBS`` if set
    (blank: unset), else from available RAM (about 4 GB per nvcc job, at most one per core; all cores
    when RAM cannot be read).

    torch reads MAX_JOBS only if ``str.isdigit()``: anything else (``" 4"``, ``"four"``) was dropped
    without a word and ``0`` reached ninja as ``-j 0`` (no limit), so neither got the RAM-based default:
    as many nvcc jobs as ninja likes, the memory this default exists to protect."""
    raw = os.environ.get("MAX_JOBS", "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"MAX_JOBS: expected a positive number of parallel compile jobs, got {os.environ['MAX_JOBS']!r}")
        return int(raw)
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.split()}
        free_gb = info.get("MemAvailable", info.get("MemFree", 0)) / 2**20
    except (OSError, ValueError, IndexError):
        return cores
    return max(1, min(cores, int(free_gb // 4)))


# filled at import rather than at first use: a torch.compile trace that filled it left a graph whose
# guard on the empty table failed on the next call
_setting_checks()
