"""Results writer: one JSON (machine header + config + rows of every suite) and one CSV per run.

A run writes to ``./bench-results/<device-slug>/`` under the current directory unless ``--out``
names another folder: never into the package (which may be installed read-only), and inside a
checkout that folder is git-ignored, so ``python -m bench`` leaves ``git status`` clean.
``bench/results/<device>/`` (``RESULTS_DIR``) holds the committed results the README table is
generated from; a run is copied there by hand (bench/results/README.md).

File names follow the one scheme of bench/results/: ``<topic>_<date>[_<commit>][_<part>].<ext>``,
here ``bench-<suites>[-quick]_<YYYYMMDDTHHMMSSZ>[_<commit>].json`` / ``.csv`` (ASCII).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LOCAL_DIR_NAME = "bench-results"  # under the current directory; listed in .gitignore
SCHEMA = "longcat-bench/1"

# CSV columns shown first when present; the rest follow in first-seen order.
_LEAD_COLUMNS = ("suite", "case", "backend", "status", "grid", "cond_frames", "cond_latents", "sparsity",
                 "ms", "ms_min", "spread", "runs", "tflops", "speedup", "ideal_speedup", "rel_l2", "tol")


def _clean(v):
    """JSON-safe value: non-finite floats become strings (JSON has no NaN/inf)."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def default_out_dir(machine: dict, cwd: Path | str | None = None) -> Path:
    """``<cwd>/bench-results/<device-slug>``: where a run writes when ``--out`` is not given."""
    return (Path.cwd() if cwd is None else Path(cwd)) / LOCAL_DIR_NAME / machine["device_slug"]


def result_stem(suites: list[str], quick: bool, stamp: str, commit: str | None) -> str:
    """``bench-<suites>[-quick]_<stamp>[_<commit>]`` (the bench/results naming scheme)."""
    tail = ""
    if commit and str(commit) not in ("None", "unknown"):
        tail = f"_{str(commit)[:7]}" + ("-dirty" if str(commit).endswith("-dirty") else "")
    return f"bench-{'-'.join(suites)}{'-quick' if quick else ''}_{stamp}{tail}"


def replace_file(path: Path | str, write) -> None:
    """Writes ``path`` whole or not at all: ``write(f)`` fills a temporary file beside it (text, newline=""),
    which then replaces ``path``. An exception or a KeyboardInterrupt while writing leaves ``path`` as it
    was and removes the temporary file (a half-written ``.tmp`` was left in the results folder)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path | str, doc, *, indent: int = 1, default=None) -> None:
    """``doc`` as JSON into ``path`` through ``replace_file``: the GPU scripts rewrite their result file after
    each part ("a time-out keeps what ran"), and ``json.dump`` into the file opened with "w" truncated it
    first: a run killed while writing (or a value whose ``str()`` failed) lost the parts written before."""
    text = json.dumps(doc, indent=indent, default=default)  # first: a value JSON cannot write touches no file
    replace_file(path, lambda f: f.write(text + "\n"))


def write_results(out_dir: Path | str, machine: dict, config: dict, rows: list[dict], stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.csv`` under ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA, "machine": machine, "config": config, "rows": rows}
    jpath = out_dir / f"{stem}.json"
    # rewritten after every suite: a run killed mid-write must leave the previous whole file, not half of it
    write_json(jpath, _clean(doc))

    cols: list[str] = [c for c in _LEAD_COLUMNS if any(c in r for r in rows)]
    for r in rows:
        for k in r:
            if k not in cols and not isinstance(r[k], (dict, list)):
                cols.append(k)
    cols += ["device", "commit", "date"]
    cpath = out_dir / f"{stem}.csv"

    def write_csv(f) -> None:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        dev = machine.get("gpu") or machine.get("cpu")
        for r in rows:
            w.writerow({**r, "device": dev, "commit": machine.get("commit"), "date": machine.get("date")})

    replace_file(cpath, write_csv)  # replaced whole, as the JSON (it was cut short in place)
    return jpath, cpath


def check_document(doc: dict, path: Path | str) -> dict:
    """``doc`` (a parsed ``SCHEMA`` document) when it has the fields the report reads; else a
    ValueError naming ``path`` and the field."""
    for key, typ in (("machine", dict), ("config", dict), ("rows", list)):
        if not isinstance(doc.get(key), typ):
            got = "missing" if key not in doc else f"a {type(doc[key]).__name__}"
            raise ValueError(f"{path}: field {key!r} must be a {'JSON object' if typ is dict else 'list'}, "
                             f"got {got}")
    date = doc["machine"].get("date")
    if not _is_utc_stamp(date):
        # the newest file of a suite is picked by comparing these strings: "unknown" (or any other text)
        # sorted after every real date and shadowed the newer runs
        raise ValueError(f"{path}: field 'machine.date' must be a UTC time YYYY-MM-DDTHH:MM:SSZ, got "
                         f"{'missing' if 'date' not in doc['machine'] else repr(date)}")
    if not isinstance(doc["config"].get("quick"), bool):
        # missing read as a full run (a smoke run's numbers in the README); "false" as a quick one
        raise ValueError(f"{path}: field 'config.quick' must be true or false, got "
                         f"{'missing' if 'quick' not in doc['config'] else repr(doc['config']['quick'])}")
    _check_device(doc["machine"], path)
    seen: dict = {}
    for i, r in enumerate(doc["rows"]):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: rows[{i}] must be a JSON object, got a {type(r).__name__}")
        _check_row_fields(r, i, path)
        _check_row_times(r, i, path)
        # the tables key their cells by the case: a repeated timed row (a hand merge) showed one of them, unsaid
        # (rows not timed are not read by the tables: an error row beside a timed one of the same case is kept)
        if r.get("status") != "ok":
            continue
        key = tuple(r.get(k) for k in ("suite", "case", "backend", "grid"))
        if key in seen:
            raise ValueError(f"{path}: rows[{i}] repeats rows[{seen[key]}] (suite {key[0]!r}, case {key[1]!r}, "
                             f"backend {key[2]!r}); keep one of them")
        seen[key] = i
    _check_cache_speedups(doc["rows"], path)
    return doc


def _check_cache_speedups(rows: list[dict], path: Path | str) -> None:
    """A cache suite's ``speedup`` is its cache-off row's ``ms`` over its own (bench.suites.cache.finish): one
    edited by hand, or left from before its times were, went into the README table as measured."""
    off = {(r.get("grid"), r.get("cond_latents")): r for r in rows
           if r.get("suite") == "cache" and r.get("mode") == "off" and r.get("status") == "ok"}
    for i, r in enumerate(rows):
        if r.get("suite") != "cache" or r.get("mode") != "on" or r.get("speedup") is None:
            continue
        base = off.get((r.get("grid"), r.get("cond_latents")))
        sp = r["speedup"]
        want = base["ms"] / r["ms"] if base is not None and r.get("status") == "ok" else None
        if want is None or not (isinstance(sp, (int, float)) and math.isclose(sp, want, rel_tol=1e-6)):
            got = "no timed cache-off row to compute it from" if want is None else f"off/on ms = {want:.6g}"
            raise ValueError(f"{path}: rows[{i}] (suite 'cache', case {r.get('case')!r}): field 'speedup' is "
                             f"{sp!r} but {got}")


def _check_device(m: dict, path: Path | str) -> None:
    """The device folder the header names (``device_slug``) is that of the device it ran on: an edited
    ``gpu`` (an H200 run relabelled for h100/) was reported as measured there."""
    given = m.get("device_slug")
    if given is not None and not (isinstance(given, str) and given):
        raise ValueError(f"{path}: field 'machine.device_slug' must be a non-empty string, got {given!r}")
    want = device_folder(m)
    if given is not None and want is not None and given != want:
        what = f"gpu {m['gpu']!r}" if m.get("gpu") else f"cpu {m['cpu']!r}"
        raise ValueError(f"{path}: field 'machine.device_slug' is {given!r} but the run's {what} belongs in "
                         f"{want!r}")


def device_folder(m: dict) -> str | None:
    """The results folder of the device a machine header names (``bench.machine.device_slug``), or None."""
    from bench.machine import results_folder  # noqa: PLC0415

    return results_folder(str(m["gpu"]) if m.get("gpu") else None, str(m["cpu"]) if m.get("cpu") else None)


def _finite_time(v, zero: bool = False) -> bool:
    """``v`` a finite number of milliseconds, > 0 (>= 0 with ``zero``)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (v >= 0 if zero else v > 0)


def _check_row_times(row: dict, i: int, path: Path | str) -> None:
    """A timed row's median and minimum are finite times > 0 (min <= median) from >= 1 run: the writer stores
    NaN/inf as strings, which the tables printed as "-" or "nan" and ordered by (a TypeError)."""
    if row.get("status") != "ok":
        return
    where = f"{path}: rows[{i}] (suite {row.get('suite')!r}, case {row.get('case')!r})"
    if "ms" in row and not _finite_time(row["ms"]):
        raise ValueError(f"{where}: field 'ms' must be a finite time > 0, got {row['ms']!r}")
    if "ms_min" in row and not _finite_time(row["ms_min"], zero=True):
        raise ValueError(f"{where}: field 'ms_min' must be a finite time >= 0, got {row['ms_min']!r}")
    if "ms_min" in row and row["ms_min"] > row.get("ms", math.inf):
        raise ValueError(f"{where}: field 'ms_min' {row['ms_min']!r} is above the median 'ms' {row['ms']!r}")
    runs = row.get("runs")
    if "runs" in row and not (isinstance(runs, int) and not isinstance(runs, bool) and runs >= 1):
        raise ValueError(f"{where}: field 'runs' must be an integer >= 1, got {runs!r}")


# fields the report's tables and plots index the timed rows of each suite by (a row without one was a
# bare KeyError naming neither the file nor the row)
# (and the time: the cached-attn table picks its best row by "ms", a KeyError without it)
_ROW_FIELDS = {
    "cache": ("backend", "mode", "cond_frames", "cond_latents", "ms"),
    "bsa": ("backend", "kind", "grid", "mode", "chunk", "sparsity", "ms"),
    "cached-attn": ("backend", "op", "cond_latents", "ms"),
    "pipeline": ("ms",),
}


def _check_row_fields(row: dict, i: int, path: Path | str) -> None:
    """A timed (``status`` ok) row has the fields the report reads for its suite."""
    if row.get("status") != "ok":
        return
    missing = [k for k in _ROW_FIELDS.get(row.get("suite"), ()) if k not in row]
    if missing:
        raise ValueError(f"{path}: rows[{i}] (suite {row.get('suite')!r}, case {row.get('case')!r}): expected the "
                         f"fields {list(_ROW_FIELDS[row['suite']])} that the report reads, missing {missing}")


def _is_utc_stamp(date) -> bool:
    """Whether ``date`` is a ``YYYY-MM-DDTHH:MM:SSZ`` time (the machine header's format), which orders as text."""
    if not isinstance(date, str) or len(date) != 20 or not date.endswith("Z"):
        return False
    try:
        _dt.datetime.strptime(date, "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return False
    return True


def load_results(path: Path | str) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: expected a {SCHEMA!r} document")
    return check_document(doc, path)


def _ours(path: Path) -> bool:
    """Whether ``path`` starts like a document of ours (its schema field comes first)."""
    try:
        with path.open("rb") as f:
            head = f.read(200)
    except OSError:
        return False
    return f'"schema": "{SCHEMA}"'.encode() in head


def latest_results_filtered(results_dir: Path | str = RESULTS_DIR) -> dict[str, dict[str, dict]]:
    """``latest_results`` without quick (smoke) runs and without suites whose rows all failed."""
    return latest_results(results_dir, skip_quick=True)


def latest_results(results_dir: Path | str = RESULTS_DIR, skip_quick: bool = False) -> dict[str, dict[str, dict]]:
    """For each device folder, each suite -> the newest result document that has rows for it."""
    out: dict[str, dict[str, dict]] = {}
    root = Path(results_dir)
    if not root.is_dir():
        return out
    for dev_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for jp in sorted(dev_dir.glob("*.json")):
            try:
                text = jp.read_text()
                doc = json.loads(text)
            except (OSError, ValueError):  # not JSON (JSONDecodeError is a ValueError)
                if _ours(jp):
                    # a results file cut short: skipping it silently reported the older file in its place
                    raise ValueError(f"{jp}: a {SCHEMA!r} results file that is not valid JSON (cut short while "
                                     "written?); fix or remove it") from None
                continue
            if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:  # another tool's JSON
                continue
            check_document(doc, jp)  # ours but incomplete: an error naming the file and field
            slug = doc["machine"].get("device_slug") or device_folder(doc["machine"])
            if slug is not None and slug != dev_dir.name:
                # another device's run (newer) replaced this device's table, labelled with the other device
                raise ValueError(f"{jp}: a run on device {slug!r} in the folder {dev_dir.name!r}; move it to "
                                 f"{slug}/ beside it")
            doc["_path"] = str(jp)
            if skip_quick and doc.get("config", {}).get("quick"):
                continue
            ok_suites = {r.get("suite") for r in doc["rows"] if r.get("status") == "ok"}
            for suite in ok_suites if skip_quick else {r.get("suite") for r in doc["rows"]}:
                prev = out.setdefault(dev_dir.name, {}).get(suite)
                if prev is None or doc["machine"]["date"] >= prev["machine"]["date"]:
                    out[dev_dir.name][suite] = doc
    return out
