"""`python -m bench`: the cache on/off benchmark (default) and the kernel suites, as tables + files.

Examples:
    python -m bench                          # cache on/off, best device, embedded default config
    python -m bench --suite all --plot       # every suite; PNG plots when matplotlib is installed
    python -m bench --suite bsa --shapes 720p,480p --backends triton,cuda
    python -m bench --quick                  # seconds-long smoke run (CI)

Results go to ./bench-results/<device>/ under the current directory (git-ignored in a checkout),
or to --out; the committed results under bench/results/ are only ever changed by hand.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import sys
import time
from pathlib import Path

import torch

from bench import machine as _machine
from bench import writer
from bench.shapes import COND_FRAMES, SPARSITIES, cond_latents, parse_grid
from bench.suites import SUITES, Context, load_suite, run_case
from bench.timing import SPREAD_LEGEND

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}
# suites that time the whole DiT (one attention backend per run) rather than kernels per backend
MODEL_SUITES = ("cache", "pipeline")
# the suites that read each per-suite flag (--shapes, --backends, --dtype: every suite)
SUITE_READERS = {"--sparsity": ("bsa",), "--depth": MODEL_SUITES, "--cond-frames": ("cache", "cached-attn", "pipeline")}
# --backends names: longcat_kernels' backend names (longcat_kernels.dispatch.BACKENDS; a test keeps them equal)
KERNEL_BACKENDS = ("auto", "torch", "triton", "cuda")


def _csv(text: str | None, conv=str) -> list | None:
    if not text:
        return None
    return [conv(x.strip()) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="LongCat-Video VC benchmarks: KV cache on/off speedup (measured vs ideal) and "
        "our kernels vs PyTorch SDPA, with parity checked before every timing.",
    )
    p.add_argument("--suite", default="cache", help="cache | bsa | cached-attn | pipeline | all, or a "
                   "comma-separated list (default: cache)")
    p.add_argument("--shapes", default=None, help="comma-separated grids: presets 480p, 720p, cpu, tiny, "
                   "bsa-cpu, bsa-tiny, or TxHxW (default: per suite and device)")
    p.add_argument("--backends", default=None, help="comma-separated kernel backends to time: torch, triton, "
                   "cuda, auto (default: every available one except the torch reference on GPU)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--depth", type=int, default=None, help="DiT depth for the cache/pipeline suites "
                   "(default: 8 on GPU, 2 on CPU, 1 with --quick)")
    p.add_argument("--cond-frames", default=None, help="comma-separated cond frame counts "
                   f"(default: {','.join(map(str, COND_FRAMES))})")
    p.add_argument("--sparsity", default=None, help="comma-separated sparsity levels for the bsa suite "
                   f"(default: {','.join(map(str, SPARSITIES))})")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", default=None, help="results folder (default: ./bench-results/<device>/ under the "
                   "current directory)")
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    p.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions (smoke test)")
    p.add_argument("--plot", action="store_true", help="also write PNG plots (needs matplotlib: pip install "
                   "'longcat-kernels[plot]')")
    p.add_argument("--budget", type=float, default=None, help="scale every case's timing budget (default 1; not "
                   "with --quick, whose cases run a fixed 2-3 times)")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; cases not started by then are "
                   "reported as skipped (results are written after every suite either way)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and weights (default 0)")
    return p


def _suites(arg: str) -> list[str]:
    names = list(SUITES) if arg.strip() == "all" else [s.strip() for s in arg.split(",") if s.strip()]
    if not names:
        raise SystemExit(f"--suite: expected one of {', '.join(SUITES)} or all (or a comma-separated list), "
                         f"got {arg!r}")
    for n in names:
        if n not in SUITES:
            raise SystemExit(f"--suite: expected one of {', '.join(SUITES)} or all, got {n!r}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"--suite: {', '.join(dup)} named more than once")
    return names


def _list_arg(flag: str, text: str | None, conv=str) -> list | None:
    """A comma-separated flag value; None when the flag is absent, SystemExit when given but empty."""
    if text is None:
        return None
    try:
        values = _csv(text, conv)
    except ValueError as e:
        raise SystemExit(f"{flag}: {e}") from None
    if not values:
        raise SystemExit(f"{flag}: got an empty list ({text!r}); leave the flag out for the default")
    return values


def _no_repeats(flag: str, values, key=lambda v: v, what: str = "") -> None:
    """SystemExit when two values of a list flag are the same case (``key``): each would be timed again and
    the tables, keyed by it, would keep one and pair the others' speedups across the repeats."""
    seen: dict = {}
    for v in values:
        k = key(v)
        if k in seen:
            a, b = (getattr(x, "name", x) for x in (seen[k], v))  # a Grid by its preset name or TxHxW
            same = f"{a} and {b}" + (f" give the same {what}" if what else " repeat a value")
            raise SystemExit(f"{flag}: expected distinct values, got {same}")
        seen[k] = v


def _positive(flag: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise SystemExit(f"{flag}: expected a finite number > 0, got {value:g}")


def _budget(args) -> float:
    """The --budget of the run (1 when the flag is left out)."""
    return 1.0 if args.budget is None else args.budget


def _check_seed(seed: int) -> None:
    """A seed torch's generators take with the suites' small offsets added (beyond, every case errored
    with "Overflow when unpacking long long")."""
    if not -(2**63) <= seed < 2**63:
        raise SystemExit(f"--seed: expected an int in [-2**63, 2**63), got {seed}")


def _device(arg: str | None) -> torch.device:
    if arg is None:  # "" is refused below: it ran on the default device as if the flag were left out
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(arg)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected cpu, cuda or cuda:N, got {arg!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device: CUDA requested but torch.cuda.is_available() is False")
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            raise SystemExit(f"--device: {arg} requested but this machine has {n} CUDA device(s)")
    return device


def _check_args(args) -> tuple[list[str], tuple, tuple[int, ...], tuple[float, ...], list[str] | None]:
    """Every flag checked before anything runs: (suites, grids, cond frames, sparsities, backends)."""
    try:  # the commit the results record (a bad value was a traceback from the machine header), the knobs
        _machine.check_settings()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    suites = _suites(args.suite)
    if args.plot and args.no_write:
        raise SystemExit("--plot: the plots are files written beside the results; it cannot be combined "
                         "with --no-write")
    _positive("--budget", args.budget)
    if args.budget is not None and args.quick:
        # the smoke run's policy is fixed: the budget was read by nothing and recorded in the results' config
        raise SystemExit(f"--budget {args.budget:g}: --quick times every case a fixed 2-3 times and reads no "
                         "budget; drop one of them")
    _positive("--time-limit", args.time_limit)
    if args.depth is not None and args.depth < 1:
        raise SystemExit(f"--depth: expected >= 1, got {args.depth}")
    _check_seed(args.seed)
    try:
        grids = [parse_grid(g) for g in _list_arg("--shapes", args.shapes) or ()] or None
    except ValueError as e:
        raise SystemExit(f"--shapes: {e}") from None
    _no_repeats("--shapes", grids or (), key=lambda g: g.shape, what="grid")
    cond = tuple(_list_arg("--cond-frames", args.cond_frames, int) or COND_FRAMES)
    bad = [f for f in cond if f < 1]
    if bad:
        raise SystemExit(f"--cond-frames: expected frame counts >= 1, got {bad[0]}")
    _no_repeats("--cond-frames", cond, key=cond_latents, what="conditioning latents (SPEC 7: 13 -> 4)")
    sparsities = tuple(_list_arg("--sparsity", args.sparsity, float) or SPARSITIES)
    bad = [s for s in sparsities if not 0 <= s < 1]  # NaN fails too
    if bad:
        raise SystemExit(f"--sparsity: expected levels in [0, 1) (the fraction of key blocks skipped), got {bad[0]:g}")
    _no_repeats("--sparsity", sparsities)
    backends = _list_arg("--backends", args.backends)
    for b in backends or ():
        if b not in KERNEL_BACKENDS:
            raise SystemExit(f"--backends: unknown backend {b!r}; expected a comma-separated list of "
                             f"{', '.join(KERNEL_BACKENDS)}")
    _no_repeats("--backends", backends or ())
    if args.out is not None and args.no_write:
        raise SystemExit(f"--out {args.out}: --no-write writes no files; drop one of them")
    if args.out is not None and not args.out.strip():
        # an empty folder read as "not given": the results went to the default folder without a word
        raise SystemExit(f"--out: expected a results folder, got {args.out!r}; leave the flag out for the default")
    model = [s for s in suites if s in MODEL_SUITES]
    if backends and len(backends) > 1 and model:
        # the DiT of these suites runs one attention backend (the first): the others would be dropped silently
        raise SystemExit(f"--backends {','.join(backends)}: the {' and '.join(model)} suite(s) run the DiT with one "
                         f"attention backend; give one backend, or run them apart from the kernel suites "
                         f"(--suite {','.join(s for s in suites if s not in MODEL_SUITES) or 'bsa,cached-attn'})")
    # a flag no selected suite reads was recorded in the results' config and ignored without a word
    for flag, given, readers in (("--sparsity", args.sparsity, SUITE_READERS["--sparsity"]),
                                 ("--depth", args.depth, SUITE_READERS["--depth"]),
                                 ("--cond-frames", args.cond_frames, SUITE_READERS["--cond-frames"])):
        if given is not None and not any(s in readers for s in suites):
            raise SystemExit(f"{flag}: read by the {', '.join(readers)} suite(s) only, none of which runs "
                             f"(--suite {','.join(suites)}); drop {flag} or add one of them to --suite")
    return suites, grids, cond, sparsities, backends


def _status_line(row: dict) -> str:
    head = f"  {row['case']:<34} {row['backend']:<12}"
    if row["status"] == "ok":
        extra = f"  {row['tflops']:.3g} TFLOP/s" if row.get("tflops") else ""
        spread = row.get("spread")
        spread = f"{100 * spread:.0f}%" if spread is not None else "-"
        return (f"{head} {row['ms']:10.3f} ms median  (min {row['ms_min']:.3f}, spread {spread}, n={row['runs']}, "
                f"rel.L2 {row.get('rel_l2', float('nan')):.2g}){extra}")
    return f"{head} {row['status'].upper()}: {row.get('reason', '')}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    suites, grids, cond, sparsities, backends = _check_args(args)
    if args.plot:
        from bench.report import require_matplotlib

        require_matplotlib()  # before the run, not after it
    device = _device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)

    # fp32 means fp32 (no TF32) so CPU and GPU fp32 parity bounds agree
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    header = _machine.machine_header(device)
    out_dir = Path(args.out) if args.out else writer.default_out_dir(header)
    if not args.no_write:
        # before anything is timed: a bad folder must not cost a suite's run
        what = "--out" if args.out else "results folder (set another with --out)"
        if out_dir.exists() and not out_dir.is_dir():
            raise SystemExit(f"{what}: {out_dir} exists and is not a folder")
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SystemExit(f"{what}: cannot create {out_dir}: {e.strerror or e}") from None
        if not os.access(out_dir, os.W_OK | os.X_OK):
            raise SystemExit(f"{what}: {out_dir} is not writable")
    print(_machine.format_header(header), flush=True)
    ctx = Context(device=device, dtype=dtype, quick=args.quick, grids=grids, backends=backends,
                  depth=args.depth, cond_frames=cond, sparsities=sparsities, budget=_budget(args), seed=args.seed)
    if device.type == "cuda":
        # in the dtype the suites run: a bf16 ceiling under --dtype fp32 read an fp32 step at its own peak as ~7% MFU
        peak, t = _timing_peak(device, dtype)
        ctx.peak_tflops = peak
        header["matmul_peak_tflops"] = round(peak, 1)
        header["matmul_peak_dtype"] = str(dtype).replace("torch.", "")
        print(f"ceiling: {header['matmul_peak_dtype']} matmul 8192^3 {peak:.0f} TFLOP/s ({t.median_ms:.3f} ms, "
              f"n={t.runs}), the MFU denominator of this run", flush=True)

    all_rows: list[dict] = []
    bad = 0
    t_start = time.perf_counter()
    config = {"suites": suites, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "quick": args.quick, "shapes": args.shapes, "backends": args.backends, "depth": args.depth,
              "cond_frames": list(cond), "sparsities": list(sparsities), "budget": _budget(args),
              "seed": args.seed, "argv": sys.argv[1:] if argv is None else list(argv)}
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = writer.result_stem(suites, args.quick, stamp, header.get("commit"))
    jpath = cpath = None
    for name in suites:
        print(f"\n== suite {name} ({device}, {str(dtype).replace('torch.', '')}) ==", flush=True)
        t0 = time.perf_counter()
        rows = []
        try:
            mod = load_suite(name)
            cases = mod.cases(ctx)
            for case in cases:
                if args.time_limit is not None and time.perf_counter() - t_start > args.time_limit:
                    row = {"suite": case.suite, "case": case.name, "backend": case.backend, **case.params,
                           "status": "skipped", "reason": f"--time-limit {args.time_limit:g} s reached"}
                else:
                    row = run_case(ctx, case)
                rows.append(row)
                print(_status_line(row), flush=True)
            rows = mod.finish(ctx, rows)
            print(f"\n{mod.table(rows)}\n({SPREAD_LEGEND})", flush=True)
        except Exception as e:  # e.g. the model package is missing: the suite is reported, the run goes on
            rows.append({"suite": name, "case": "-", "backend": "-", "status": "error",
                         "reason": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
            print(_status_line(rows[-1]), flush=True)
        ctx.free()
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        bad += sum(r["status"] in ("parity-failed", "error") for r in rows)
        all_rows += rows
        config["wall_s"] = round(time.perf_counter() - t_start, 1)
        if not args.no_write:
            # rewritten after every suite, so a run cut short still leaves its finished suites
            jpath, cpath = writer.write_results(out_dir, header, config, all_rows, stem)

    if jpath is not None:
        print(f"wrote {jpath}\nwrote {cpath}")
        if args.plot:
            from bench import report

            for p in report.plot_results(writer.load_results(jpath), out_dir, stem):
                print(f"wrote {p}")
    timed = sum(r["status"] == "ok" for r in all_rows)
    skipped = sum(r["status"] == "skipped" for r in all_rows)
    idle = [n for n in suites if not any(r["status"] == "ok" for r in all_rows if r.get("suite") == n)]
    counts = f"{timed} case(s) timed, {skipped} skipped" + (f"; nothing timed in: {', '.join(idle)}" if idle else "")
    if timed == 0:
        failed = f"; {bad} FAILED parity or errored" if bad else ""
        print(f"total {time.perf_counter() - t_start:.0f} s; NO case was timed ({counts}{failed}): this run "
              "measured nothing (the reasons are above)")
        return 1
    # an explicit --backends whose kernels were all skipped (the cuda extension missing, a CPU machine):
    # the baselines were timed and the run exited 0 as if it had measured what was asked
    untimed = [b for b in (backends or ()) if not any(r.get("backend") == b and r["status"] == "ok" for r in all_rows)]
    print(f"total {time.perf_counter() - t_start:.0f} s; "
          + ("all cases passed parity" if bad == 0 else f"{bad} case(s) FAILED parity or errored") + f" ({counts})")
    if untimed:
        print(f"--backends {','.join(backends)}: NOTHING was timed for {', '.join(untimed)} (the reasons are above); "
              "exit 1")
        return 1
    return 1 if bad else 0


def _timing_peak(device, dtype):
    from bench.timing import matmul_peak_tflops

    return matmul_peak_tflops(device, dtype)
