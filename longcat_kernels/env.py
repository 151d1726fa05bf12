"""Environment report: ``python -m longcat_kernels.env`` (add ``--json`` for machine-readable output).

Prints Python/torch/CUDA/triton versions, whether the compiled extension loads (and why not), the
``LONGCAT_KERNELS_*`` settings, and for every op which backends can run and what ``"auto"`` picks.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any, Dict

__all__ = ["report", "main"]


def report() -> Dict[str, Any]:
    import torch

    from . import __version__
    from ._backend import OPS, PREFERENCE, available_backends, op_backend_status, triton_interpret, triton_status
    from ._ext import extension_error

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
        "extension_error": extension_error(),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("LONGCAT_KERNELS_")},
        "backends": available_backends(),
        "ops": {},
    }
    if info["triton_error"] is None:
        import triton

        info["triton"] = triton.__version__
    device = "cuda" if cuda else "cpu"
    probe = torch.zeros(1, 1, 1, 64, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
    for op in OPS:
        status = {b: op_backend_status(op, b, probe, check_inputs=False) for b in ("torch", "triton", "cuda")}
        if device == "cpu":
            auto = "torch"
        else:
            auto = next((b for b in PREFERENCE[op] if status[b] is None), "torch")
        info["ops"][op] = {"auto": auto, "backends": status}
    return info


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    info = report()
    if "--json" in argv:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"longcat-kernels {info['longcat_kernels']}  python {info['python']}  ({info['platform']})")
    print(f"torch {info['torch']}  CUDA build {info['torch_cuda']}  device {info['device']}"
          + (f" (sm {info['capability']})" if info["capability"] else ""))
    print(f"triton {info['triton'] or '-'}" + (f"  [{info['triton_error']}]" if info["triton_error"] else "")
          + ("  TRITON_INTERPRET=1" if info["triton_interpret"] else ""))
    print(f"extension longcat_kernels._C: {'loaded' if info['extension_error'] is None else info['extension_error']}")
    print("settings: " + (", ".join(f"{k}={v}" for k, v in info["env"].items()) or "(no LONGCAT_KERNELS_* set)"))
    print("backends on this machine:")
    for b, r in info["backends"].items():
        print(f"  {b:7s} {'ok' if r is None else 'unavailable: ' + r}")
    print(f"ops on {'cuda' if info['cuda_available'] else 'cpu'} tensors (auto -> chosen backend):")
    for op, d in info["ops"].items():
        line = ", ".join(f"{b}: {'ok' if r is None else r}" for b, r in d["backends"].items())
        print(f"  {op:22s} auto -> {d['auto']:6s} | {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
