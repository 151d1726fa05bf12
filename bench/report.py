"""README benchmark table and PNG plots, generated from the committed results (never typed by hand).

    python -m bench.report            # print the markdown that goes between the README markers
    python -m bench.report --write    # replace it in README.md
    python -m bench.report --check    # exit 1 if README.md is out of date with bench/results/
    python -m bench.report --plot     # PNGs next to each device's newest results (needs matplotlib)

Quick (smoke) runs are never reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench import writer
from bench.timing import SPREAD_LEGEND, ms_cell

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"


def _f(v, spec=".2f", suffix=""):
    if v is None or isinstance(v, str):
        return "-" if v is None else v
    return format(v, spec) + suffix


def _pct(v) -> str:
    """A fraction as a percentage cell; "-" when absent or 0, as written when not a number (the writer
    stores NaN/Inf as strings: ``100 * "nan"`` was the string repeated 100 times)."""
    if not v:
        return "-"
    return _f(100 * v if isinstance(v, (int, float)) else v, ".0f", "%")


def _md(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _device_name(doc: dict) -> str:
    m = doc["machine"]
    return m.get("gpu") or f"CPU {m.get('cpu')}"


def _source(doc: dict) -> str:
    m = doc["machine"]
    rel = Path(doc["_path"]).resolve()
    try:
        rel = rel.relative_to(README.parent)
    except ValueError:
        pass
    settings = "".join(f", {k}={v}" for k, v in (m.get("settings") or {}).items())
    return (f"{_device_name(doc)}, torch {m.get('torch')}, CUDA {m.get('cuda')}, triton {m.get('triton')}, "
            f"commit {str(m.get('commit') or 'unknown')[:12]}{settings}, {m.get('date')} "
            f"([{rel.name}]({rel.as_posix()}))")


def _rows(doc: dict, suite: str) -> list[dict]:
    return [r for r in doc["rows"] if r.get("suite") == suite]


def cache_table(doc: dict) -> str:
    rows = _rows(doc, "cache")
    grids = list(dict.fromkeys(r.get("grid") for r in rows if r.get("cond_latents") is not None))
    if len(grids) > 1:  # --shapes with several grids: one table per grid
        return "\n\n".join(_cache_grid_table(doc, [r for r in rows if r.get("grid") == g]) for g in grids)
    return _cache_grid_table(doc, rows)


def _cache_grid_table(doc: dict, rows: list[dict]) -> str:
    by: dict = {}
    for r in rows:
        by.setdefault(r.get("cond_latents"), {})[r.get("mode")] = r
    body = []
    cfg = ""
    for c in sorted(k for k in by if k is not None):
        off, on, bld = (by[c].get(m, {}) for m in ("off", "on", "build"))
        any_r = off or on or bld
        cfg = f"depth {any_r.get('depth')}, hidden {any_r.get('hidden')}, grid {any_r.get('grid')}, B{any_r.get('batch')}"

        def ms(r, spec=".1f"):
            return ms_cell(r, spec) if r.get("status") == "ok" else (r.get("status") or "-")

        body.append([str(any_r.get("cond_frames")), str(c), ms(off), ms(on), _f(on.get("speedup"), ".2f", "x"),
                     _f(on.get("ideal_speedup"), ".2f", "x"), ms(bld), _f(bld.get("cache_mb"), ".0f"),
                     _pct(off.get("mfu")), _pct(on.get("mfu"))])
    head = ["cond frames", "cond latents", "cache off ms/step", "cache on ms/step", "speedup", "ideal (FLOPs)",
            "cache build ms", "cache MiB", "MFU off", "MFU on"]
    return f"DiT step, {cfg}, {doc['config'].get('dtype')}:\n\n" + _md(head, body)


def _dims(rows: list[dict]) -> str:
    r = next((r for r in rows if r.get("heads")), None)
    return f"B{r['batch']} H{r['heads']} D{r['head_dim']}" if r else ""


def _pivot(rows: list[dict], key) -> tuple[list[str], list[tuple]]:
    """Implementations (in order of appearance) and row keys (in order of appearance)."""
    impls, keys = [], []
    for r in rows:
        if r["backend"] not in impls:
            impls.append(r["backend"])
        if key(r) not in keys:
            keys.append(key(r))
    return impls, keys


def bsa_table(doc: dict) -> str:
    rows = [r for r in _rows(doc, "bsa") if r.get("status") == "ok" and r.get("kind") in ("dense", "gated")]
    if not rows:
        return ""
    dense = [r for r in rows if r["kind"] == "dense"]
    sparse = [r for r in rows if r["kind"] != "dense"]
    if not sparse:
        # the dense baselines timed, no block-sparse case (all failed parity, errored or were skipped): the
        # table was its headers alone, without the dense times or a word of what happened
        untimed = [r.get("status") for r in _rows(doc, "bsa") if r.get("kind") not in (None, "dense")]
        what = ", ".join(f"{untimed.count(st)} {st}" for st in dict.fromkeys(untimed)) or "none in this run"
        base = "; ".join(f"{r['grid']} {r['mode']} {r['backend']} {ms_cell(r)} ms" for r in dense)
        return (f"Block-sparse attention, {_dims(rows)}, {doc['config'].get('dtype')}: no block-sparse case was "
                f"timed ({what}; the reasons are in the results file); dense SDPA: {base}")
    impls, keys = _pivot(sparse, lambda r: (r["grid"], r["mode"], r["chunk"], r["sparsity"]))
    by = {(r["grid"], r["mode"], r["chunk"], r["sparsity"], r["backend"]): r for r in sparse}
    base = {}
    for r in dense:
        base.setdefault((r["grid"], r["mode"]), []).append(f"{r['backend']} {ms_cell(r)}")
    body = []
    for g, mode, chunk, sp in keys:
        cells = []
        for b in impls:
            r = by.get((g, mode, chunk, sp, b))
            cells.append("-" if r is None else
                         f"{ms_cell(r)} ms, {_f(r.get('speedup'), '.2f', 'x')}, {_f(r.get('tflops'), '.0f')} TF/s")
        body.append([g, mode, chunk, _f(sp, "g"), ", ".join(base.get((g, mode), ["-"]))] + cells)
    head = ["grid", "pass", "chunk", "sparsity", "dense SDPA ms"] + [f"{b}: ms, vs dense, TFLOP/s (visited)" for b in impls]
    return f"Block-sparse attention (gating included), {_dims(rows)}, {doc['config'].get('dtype')}:\n\n" + _md(head, body)


def cached_attn_table(doc: dict) -> str:
    rows = [r for r in _rows(doc, "cached-attn") if r.get("status") == "ok"]
    if not rows:
        return ""
    impls, keys = _pivot(rows, lambda r: (r.get("grid"), r["op"], r["cond_latents"], r.get("seq_q"), r.get("seq_k")))
    by = {(r.get("grid"), r["op"], r["cond_latents"], r["backend"]): r for r in rows}
    several = len({k[0] for k in keys}) > 1  # --shapes with several grids: a grid column
    body = []
    for g, op, c, sq, sk in keys:
        ours = [r for (gg, o, cc, b), r in by.items() if (gg, o, cc) == (g, op, c) and r.get("speedup") is not None]
        best = min(ours, key=lambda r: r["ms"]) if ours else None
        cells = [ms_cell(by[(g, op, c, b)]) if (g, op, c, b) in by else "-" for b in impls]
        body.append(([str(g)] if several else []) + [op, str(c), f"{sq} x {sk}"] + cells + [
            f"{best['backend']}: {_f(best.get('speedup'), '.2f', 'x')}" if best else "-",
            _f(best.get("vs_prebuilt"), ".2f", "x") if best else "-"])
    head = (["grid"] if several else []) + ["op", "cond latents", "q x kv"] + [f"{b} ms" for b in impls] + ["best vs unfused / 2 calls",
                                                                            "best vs prebuilt"]
    return (f"Cached-KV attention, {_dims(rows)}, {doc['config'].get('dtype')} (ours: RoPE fused, cache not "
            "repeated, no concatenation; prebuilt: SDPA alone on inputs built beforehand):\n\n" + _md(head, body))


def pipeline_table(doc: dict) -> str:
    rows = [r for r in _rows(doc, "pipeline") if r.get("status") == "ok"]
    # the grid of each row: the refine rows run their own grid, and --shapes runs several (rows told apart by nothing)
    body = [[str(r.get("grid", "-")), r.get("mode_name"), str(r.get("steps")), str(r.get("batch")),
             str(r.get("cond_frames")), r.get("cache"), ms_cell(r, ".0f"), ms_cell(r, ".1f", "ms_per_step"),
             _f(r.get("speedup"), ".2f", "x")] for r in rows]
    head = ["grid", "mode", "steps", "batch", "cond frames", "cache", "denoise ms", "ms/step", "speedup"]
    depths = ", ".join(str(d) for d in dict.fromkeys(r.get("depth") for r in rows))
    return (f"Denoising loop, DiT depth {depths}, {doc['config'].get('dtype')} (cache build included when on):\n\n"
            + _md(head, body)) if body else ""


def _failed_note(doc: dict, suite: str) -> str:
    """The cases of ``suite`` that failed parity or errored, under its table: the tables show timed rows only,
    and a backend that failed vanished from them without a word (its column gone, another named the best)."""
    bad = [r for r in _rows(doc, suite) if r.get("status") in ("parity-failed", "error")]
    if not bad:
        return ""
    names = [f"{r.get('case')} {r.get('backend')}: {r.get('status')}" for r in bad]
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return f"\n\nNot timed in this run (see the results file): {'; '.join(names[:8])}{more}."


_TABLES = {"cache": cache_table, "bsa": bsa_table, "cached-attn": cached_attn_table, "pipeline": pipeline_table}


def render(results_dir: Path | str = writer.RESULTS_DIR) -> str:
    """Markdown for every device folder's newest non-quick result of each suite."""
    latest = writer.latest_results_filtered(results_dir)
    if not latest:
        return "_No committed benchmark results yet: run `python -m bench --suite all` and commit bench/results/._"
    parts = []
    for dev, suites in latest.items():
        for suite in ("cache", "cached-attn", "bsa", "pipeline"):
            doc = suites.get(suite)
            if doc is None:
                continue
            t = _TABLES[suite](doc)
            if t:
                parts.append(f"**{suite}** on {_source(doc)}\n\n{t}" + _failed_note(doc, suite))
    return "\n\n".join([SPREAD_LEGEND + "."] + parts) if parts else ""


def update_readme(text: str, readme: Path = README) -> tuple[str, str]:
    """(old, new) README contents with ``text`` between the markers."""
    old = readme.read_text()
    i, j = old.find(START), old.find(END)
    if i < 0 or j < i:
        raise ValueError(f"{readme}: expected the markers {START} ... {END}, not found")
    new = old[: i + len(START)] + "\n" + text.strip() + "\n" + old[j:]
    return old, new


def require_matplotlib():
    """The ``matplotlib.pyplot`` module (Agg backend); SystemExit naming the extra when missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot: matplotlib is not installed; install the plot extra: "
                         "pip install 'longcat-kernels[plot]' (or pip install matplotlib)") from None
    return plt


def plot_results(doc: dict, out_dir: Path | str, stem: str = "bench") -> list[Path]:
    """PNG plots of one result document: speedup vs cond frames, speedup vs sparsity."""
    plt = require_matplotlib()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    dev = _device_name(doc)
    on = sorted((r for r in doc["rows"] if r.get("suite") == "cache" and r.get("mode") == "on"
                 and r.get("status") == "ok" and r.get("speedup")), key=lambda r: r["cond_frames"])
    if on:
        fig, ax = plt.subplots(figsize=(6, 4))
        # one line per grid (--shapes with several: one line zig-zagged between the grids' speedups)
        grids = list(dict.fromkeys(r.get("grid") for r in on))
        for g in grids:
            pts = [r for r in on if r.get("grid") == g]
            tag = f", {g}" if len(grids) > 1 else ""
            x = [r["cond_frames"] for r in pts]
            ax.plot(x, [r["speedup"] for r in pts], "o-", label=f"measured{tag}")
            ax.plot(x, [r.get("ideal_speedup") for r in pts], "s--", label=f"ideal (FLOP ratio){tag}")
        ax.set_xlabel("conditioning frames (of 93)")
        ax.set_ylabel("cache on / off speedup per DiT step")
        ax.set_title(f"KV cache speedup, {dev}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
        p = out_dir / f"{stem}_plot-cache.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    sp = [r for r in doc["rows"] if r.get("suite") == "bsa" and r.get("kind") == "gated" and r.get("mode") == "fwd"
          and r.get("chunk") == "4x4x4" and r.get("status") == "ok" and r.get("speedup")]
    if sp:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key in sorted({(r["grid"], r["backend"]) for r in sp}):
            pts = sorted((r["sparsity"], r["speedup"]) for r in sp if (r["grid"], r["backend"]) == key)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{key[1]} {key[0]}")
        xs = sorted({r["sparsity"] for r in sp})
        ax.plot(xs, [1 / (1 - s) for s in xs], "k:", label="ideal 1/(1-s)")
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel("speedup vs dense SDPA (fwd, gating incl.)")
        ax.set_title(f"Block-sparse attention, {dev}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        p = out_dir / f"{stem}_plot-bsa.png"
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)
    return written


def _check_exists(flag: str, path: str, folder: bool) -> None:
    """SystemExit unless ``path`` is an existing folder (``folder``) or file: a mistyped --results read as
    "no results" and --write replaced the README's table with the placeholder."""
    p = Path(path)
    if not (p.is_dir() if folder else p.is_file()):
        got = "a file" if p.is_file() else "a folder" if p.is_dir() else "nothing there"
        raise SystemExit(f"{flag}: expected an existing {'folder' if folder else 'file'}, got {path} ({got})")


def _check_has_results(folder: str) -> None:
    """SystemExit unless ``folder`` has ``<device>/`` folders with result documents: a folder one level
    off (``bench/results/h100``) also rendered the placeholder that --write put in the README."""
    try:
        found = writer.latest_results(folder)
    except ValueError:  # ours but incomplete: reported by render, naming the file and field
        return
    if not found:
        raise SystemExit(f"--results: expected a folder of <device>/ folders holding {writer.SCHEMA!r} result JSONs "
                         f"(like bench/results), got {folder} with none")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=None, help="results folder (default bench/results)")
    ap.add_argument("--readme", default=None, help="the README --write / --check update (default: the repository's)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="replace the table in the README")
    g.add_argument("--check", action="store_true", help="exit 1 if the README table is out of date")
    ap.add_argument("--plot", action="store_true", help="write PNG plots beside each device's newest results")
    args = ap.parse_args(argv)
    if args.results is None:  # the package's own (absent from a non-editable install: no results yet)
        args.results = str(writer.RESULTS_DIR)
    else:
        _check_exists("--results", args.results, folder=True)
        _check_has_results(args.results)
    if args.readme is not None and not (args.write or args.check):
        # read by --write / --check alone: "--readme X" printed the table to stdout, X untouched, without a word
        ap.error(f"--readme {args.readme}: only --write and --check use it; add one of them (or drop --readme)")
    if args.readme is None:
        args.readme = str(README)
    if args.write or args.check:
        _check_exists("--readme", args.readme, folder=False)
    if args.plot:
        require_matplotlib()
    try:
        text = render(args.results)
        if args.write or args.check:
            old, new = update_readme(text, Path(args.readme))
    except ValueError as e:  # a results file without a field the tables need, README markers missing
        raise SystemExit(f"error: {e}") from None
    rc = 0
    if args.write or args.check:
        if args.write:
            if new != old:
                writer.replace_file(args.readme, lambda f: f.write(new))  # whole or not at all
            print(f"{args.readme}: benchmark table {'updated' if new != old else 'already up to date'}")
        elif new != old:
            print(f"{args.readme}: benchmark table is out of date; run python -m bench.report --write")
            rc = 1
    else:
        print(text)
    if args.plot:
        for dev, suites in writer.latest_results_filtered(args.results).items():
            seen = set()
            for doc in suites.values():
                if doc["_path"] in seen:
                    continue
                seen.add(doc["_path"])
                p = Path(doc["_path"])
                for out in plot_results(doc, p.parent, p.stem):
                    print(f"wrote {out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
