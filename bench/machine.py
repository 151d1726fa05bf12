"""Machine header written with every result: GPU, driver, CUDA, torch, triton, commit, date."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
# Source folders hashed into `source_sha` (identifies the code when the copy has no .git, e.g. on the device).
_SOURCE_DIRS = ("longcat_kernels", "longcat_vc", "csrc", "bench")
_SOURCE_SUFFIXES = (".py", ".cu", ".cuh", ".cpp", ".h")


def _run(cmd: list[str], timeout: float = 10.0) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _imported_version() -> str | None:
    try:
        import longcat_kernels
    except Exception:  # noqa: BLE001 - a header field, the run reports the import failure itself
        return None
    return getattr(longcat_kernels, "__version__", None)


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """HEAD commit (+ "-dirty" when tracked files changed); env LONGCAT_KERNELS_BENCH_COMMIT wins.

    Only a source checkout of this repository has a commit: when the bench package is installed
    (e.g. into a virtual environment inside another git project), the git work tree around it is
    not ours, and its commit would be recorded as the one measured; that gives None."""
    from longcat_kernels._envvars import bench_commit

    env = bench_commit()
    if env:
        return env
    top = _run(["git", "rev-parse", "--show-toplevel"])
    try:
        ours = top is not None and Path(top).resolve() == REPO_ROOT.resolve()
    except OSError:
        ours = False
    if not ours:
        return None
    head = _run(["git", "rev-parse", "HEAD"])
    if head is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + ("-dirty" if dirty else "")


def source_sha() -> str:
    """sha256 (first 12 hex) over the project's source files, in path order."""
    h = hashlib.sha256()
    for d in _SOURCE_DIRS:
        base = REPO_ROOT / d
        if not base.is_dir():
            continue
        for p in sorted(base.rglob("*")):
            if p.is_file() and p.suffix in _SOURCE_SUFFIXES and "results" not in p.parts:
                h.update(str(p.relative_to(REPO_ROOT)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:12]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def slug(text: str) -> str:
    """Lower-case folder-safe name: "NVIDIA H100 80GB HBM3" -> "h100-80gb-hbm3"."""
    text = re.sub(r"\b(nvidia|geforce|intel\(r\)|\(r\)|\(tm\)|cpu|@.*)", " ", text.lower())
    text = re.sub(r"[^a-z0-9]+", "-", text).strip("-")
    return text[:40] or "unknown"


def results_folder(gpu: str | None, cpu: str | None) -> str | None:
    """Folder name under bench/results/ of a device named ``gpu`` (the GPU model alone, "h100": the folder
    the team's other results use) or, without one, ``cpu`` ("cpu-<slug>"); None without either. What
    ``device_slug`` names for the machine it runs on, and ``bench.writer`` checks a result header's against."""
    if gpu:
        return slug(gpu).split("-")[0]
    return None if cpu is None else "cpu-" + slug(cpu)


def device_slug(device: torch.device) -> str:
    """Folder name under bench/results/ for results measured on ``device``."""
    if device.type == "cuda":
        return results_folder(torch.cuda.get_device_name(device), None)
    return results_folder(None, cpu_name())


def _backends() -> dict[str, str | None] | None:
    try:
        import longcat_kernels

        return dict(longcat_kernels.available_backends())
    except Exception as e:  # the header must never stop a benchmark
        return {"error": f"{type(e).__name__}: {e}"}


def check_settings() -> None:
    """Raises ``ValueError`` naming the variable on a ``LONGCAT_KERNELS_*`` value a run would trip over later:
    a bad ``LONGCAT_KERNELS_BENCH_COMMIT`` (the header, which the GPU scripts take as informative, was
    replaced by an error and the results recorded no commit) or a bad knob of the package (every case errored
    after the setup). Run by ``python -m bench`` and the GPU scripts before anything is built."""
    from longcat_kernels._envvars import bench_commit, check_environment

    bench_commit()
    check_environment()


def check_script_args(parser, args, *, out: str = "file", upstream: bool = False) -> None:
    """The up-front checks of the GPU scripts (memory_modes, pipeline_e2e, refine_step, wan_step), through
    ``parser.error`` (exit 2) before anything is built: ``args.out`` a JSON file path (``out="file"``: they
    write it at the end of the run, where "" or a folder failed with every number lost) or a folder
    (``out="folder"``: ``os.makedirs("")`` was a bare FileNotFoundError); ``check_settings``; with
    ``upstream``, ``args.upstream`` None or a LongCat-Video checkout ("" was taken as "not given", a wrong
    folder reported as "upstream unavailable" only after our own timings)."""
    import os  # noqa: PLC0415

    if out not in ("file", "folder"):
        raise ValueError(f"out: expected 'file' or 'folder', got {out!r}")
    if not args.out.strip() or (out == "file" and os.path.isdir(args.out)):
        what = "a JSON file path" if out == "file" else "a folder for the timings JSON"
        parser.error(f"--out: expected {what}, got {args.out!r}" + (" (a folder)" if args.out.strip() else ""))
    try:  # a bad LONGCAT_KERNELS_BENCH_COMMIT cost the results their machine header, found at the end
        check_settings()
    except ValueError as e:
        parser.error(str(e))
    if upstream and args.upstream is not None and not os.path.isdir(os.path.join(args.upstream, "longcat_video")):
        parser.error(f"--upstream: expected a LongCat-Video checkout (the folder holding longcat_video/), got "
                     f"{args.upstream!r}")


def machine_header(device: torch.device | str) -> dict:
    """Everything needed to compare a result with another machine's."""
    from longcat_kernels._envvars import BENCH_ONLY, settings

    device = torch.device(device)
    info: dict = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "numpy": _version("numpy"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "commit": git_commit(),
        "source_sha": source_sha(),
        # the imported package's version: the installed distribution's metadata named another copy when bench
        # ran from a checkout beside a pip-installed release
        "longcat_kernels": _imported_version(),
        "backends": _backends(),
        # LONGCAT_KERNELS_BACKEND changes what a backend "auto" row ran, DETERMINISTIC the backward kernel:
        # a results file without them could not tell
        # (BENCH_COMMIT is the "commit" field above)
        "settings": {k: v for k, v in settings().items() if k not in BENCH_ONLY},
    }
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        smi = _run(
            ["nvidia-smi", f"--id={idx}", "--query-gpu=driver_version,clocks.max.sm,power.limit",
             "--format=csv,noheader,nounits"]
        )
        fields = [f.strip() for f in smi.split(",")] if smi else []
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            driver=fields[0] if fields else None,
            sm_clock_max_mhz=fields[1] if len(fields) > 1 else None,
            power_limit_w=fields[2] if len(fields) > 2 else None,
        )
    else:
        info.update(gpu=None, driver=None)
    return info


def format_header(info: dict) -> str:
    """The header as a few human-readable lines."""
    dev = info.get("gpu") or f"CPU {info.get('cpu')} ({info.get('torch_threads')} threads)"
    lines = [
        f"device : {dev}" + (f", driver {info['driver']}" if info.get("driver") else "")
        + (f", {info['gpu_memory_gib']} GiB, sm_{info['capability'].replace('.', '')}" if info.get("gpu") else ""),
        f"stack  : torch {info['torch']}, CUDA {info.get('cuda')}, cuDNN {info.get('cudnn')}, "
        f"triton {info.get('triton')}, python {info['python']}",
        f"source : commit {info.get('commit') or 'unknown'}, source_sha {info['source_sha']}, {info['date']}",
    ]
    if info.get("settings"):
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in info["settings"].items()))
    be = info.get("backends")
    if be:
        lines.append("backends: " + ", ".join(f"{k}={'ok' if v is None else 'no'}" for k, v in be.items()))
    return "\n".join(lines)


def cap_process_memory(gib: float | None, device: torch.device | str | int | None = None) -> float:
    """Caps this process's CUDA caching allocator at ``gib`` GiB of ``device`` (None: uncapped) and
    returns the fraction set. ``torch.cuda.set_per_process_memory_fraction`` refuses a bare
    ``"cuda"``: the device is indexed here (the current device when it has no index)."""
    if gib is not None and (isinstance(gib, bool) or not isinstance(gib, (int, float)) or not gib > 0):
        raise ValueError(f"gib: expected a number > 0 or None, got {gib!r}")
    if device is None or isinstance(device, int):
        index = torch.cuda.current_device() if device is None else device
    else:
        dev = torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"device: expected a CUDA device, got {dev}")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    frac = 1.0 if gib is None else min(1.0, gib * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(frac, index)
    return frac
