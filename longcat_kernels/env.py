"""Environment report: ``python -m longcat_kernels.env`` (add ``--json`` for machine-readable output).

Prints Python/torch/CUDA/triton versions, how the compiled extension was obtained (prebuilt at
install, JIT-built at first use, or skipped and why), the ``LONGCAT_KERNELS_*`` settings, and for
every op exactly what ``longcat_kernels.dispatch.choose_kernel`` answers for representative inputs
of this machine (bf16 head_dim 128 on CUDA, fp32 on CPU): backend, implementation and reason, plus
why each explicit backend could or could not run.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any, Dict

__all__ = ["report", "op_choices", "main"]


def op_choices(device_type: str) -> Dict[str, Any]:
    """``{op: {"auto": KernelChoice as dict, "backends": {b: impl or "unavailable: ..."}}}``."""
    from ._backend import representative_facts
    from .dispatch import OPS, BackendUnavailableError, choose_kernel

    facts = representative_facts(device_type)
    out: Dict[str, Any] = {}
    for op in OPS:
        f = facts._replace(block_sparse=op.startswith("block_sparse"),
                           block_tokens=(64, 64) if op.startswith("block_sparse") else None)
        try:  # LONGCAT_KERNELS_BACKEND names a backend that cannot run here: say so, do not fail
            auto = choose_kernel(op, f, "auto")._asdict()
        except (BackendUnavailableError, ValueError) as e:
            auto = {"op": op, "backend": "-", "impl": "unavailable", "reason": str(e)}
        explicit = {}
        for b in ("torch", "triton", "cuda"):
            try:
                explicit[b] = choose_kernel(op, f._replace(env_backend=None), b).impl
            except BackendUnavailableError as e:
                explicit[b] = "unavailable: " + str(e).split(": ", 2)[-1]
        out[op] = {"auto": auto, "facts": f._asdict(), "backends": explicit}
    return out


def report() -> Dict[str, Any]:
    import torch

    from . import __version__
    from ._envvars import BENCH_ONLY, cache_dir, setting_problems, settings, unknown_settings
    from .dispatch import triton_interpret, triton_status

    cuda = torch.cuda.is_available()
    info: Dict[str, Any] = {
        "longcat_kernels": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))) if cuda else None,
        "triton": None,
        "triton_error": triton_status(),
        "triton_interpret": triton_interpret(),
        "env": settings(),
    }
    # every look-alike name (LONGCAT_KERNEL_BACKEND, a lower-case one), as the op calls' warning: the exact
    # LONGCAT_KERNELS_ prefix alone left a misspelt prefix out of the report run to see what is set
    info["env_unknown"] = unknown_settings()
    # the JIT build folder's root, absolute: a relative LONGCAT_KERNELS_CACHE follows the working directory
    raw_cache = os.environ.get("LONGCAT_KERNELS_CACHE", "").strip()
    info["jit_cache"] = cache_dir()
    info["jit_cache_relative"] = bool(raw_cache) and not os.path.isabs(os.path.expanduser(raw_cache))
    info["env_invalid"] = setting_problems()
    # the settings the op calls check (a bad bench-only one stops only bench)
    blocking = [k for k in info["env_invalid"] if k not in BENCH_ONLY]
    refused = None
    if cuda and not blocking:
        from ._ext import csrc_kernels, extension_status

        try:
            how, why = extension_status()
        except ValueError as e:  # a bad MAX_JOBS where the extension must be JIT-built: every CUDA call raises it
            refused = e
            info["env_invalid"]["MAX_JOBS"] = str(e)
            info["extension"] = {"how": "skipped", "error": f"JIT build refused: {e}", "kernels": []}
        else:
            info["extension"] = {"how": how, "error": why, "kernels": list(csrc_kernels())}
    elif cuda:
        info["extension"] = {"how": "skipped", "error": "invalid LONGCAT_KERNELS_* settings (listed above)",
                             "kernels": []}
    else:
        info["extension"] = {"how": "skipped", "error": "no CUDA device (torch.cuda.is_available() is False)",
                             "kernels": []}
    if info["triton_error"] is None:
        import triton

        info["triton"] = triton.__version__
    info["inputs"] = "bf16, head_dim 128, CUDA" if cuda else "fp32, head_dim 128, CPU"
    # every call checks the settings and would raise on the first invalid one: the report lists them
    # (env_invalid) and shows the choices as if they were unset
    saved = {k: os.environ.pop(k) for k in info["env_invalid"] if k in os.environ and k != "MAX_JOBS"}
    try:
        # with MAX_JOBS refused the CUDA choices cannot be known (each would raise it): none shown
        info["ops"] = {} if refused is not None else op_choices("cuda" if cuda else "cpu")
    finally:
        os.environ.update(saved)
    return info


def main(argv=None) -> int:
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(prog="python -m longcat_kernels.env",
                                     description="What works here and which kernel each op runs.")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    # an unknown or misspelt flag exits 2 naming it (it was ignored: a text report for '--jsno')
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from ._envvars import BENCH_ONLY

    info = report()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"longcat-kernels {info['longcat_kernels']}  python {info['python']}  ({info['platform']})")
    print(f"torch {info['torch']}  CUDA build {info['torch_cuda']}  device {info['device']}"
          + (f" (sm {info['capability']})" if info["capability"] else ""))
    print(f"triton {info['triton'] or '-'}" + (f"  [{info['triton_error']}]" if info["triton_error"] else "")
          + ("  TRITON_INTERPRET=1" if info["triton_interpret"] else ""))
    ext = info["extension"]
    line = {"prebuilt": "prebuilt (built at install)", "jit": "JIT-built at first use (cached)"}.get(
        ext["how"], f"skipped: {ext['error']}")
    kernels = f"; kernels: {', '.join(ext['kernels'])}" if ext["kernels"] else ""
    print(f"extension longcat_kernels._C: {line}{kernels}")
    print(f"JIT build cache: {info['jit_cache']}" + (
        " (LONGCAT_KERNELS_CACHE is relative: resolved against this working directory; a process started "
        "elsewhere uses another cache)" if info["jit_cache_relative"] else ""))
    print("settings: " + (", ".join(f"{k}={v}" for k, v in info["env"].items()) or "(no LONGCAT_KERNELS_* set)"))
    for k, why in info["env_invalid"].items():
        print(f"  INVALID {k}: {why}")
    if "MAX_JOBS" in info["env_invalid"]:
        print("  (every op call on CUDA raises until MAX_JOBS is fixed: the extension must be JIT-built here)")
    if any(k not in BENCH_ONLY and k != "MAX_JOBS" for k in info["env_invalid"]):
        print("  (every op call raises until these are fixed; the choices below are as if they were unset)")
    if any(k in BENCH_ONLY for k in info["env_invalid"]):
        print("  (python -m bench refuses to run until " + ", ".join(k for k in BENCH_ONLY if k in info["env_invalid"])
              + " is fixed)")
    if info["env_unknown"]:
        print("  not product settings (ignored by longcat_kernels): " + ", ".join(info["env_unknown"]))
    if not info["ops"]:
        return 0
    print(f"kernel choice per op for {info['inputs']} inputs (backend=auto; block-sparse: 64-token blocks):")
    for op, d in info["ops"].items():
        a = d["auto"]
        print(f"  {op:22s} auto -> {a['backend']:6s} {a['impl']:22s} ({a['reason']})")
        print(f"  {'':22s} explicit: " + "; ".join(f"{b}: {r}" for b, r in d["backends"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
