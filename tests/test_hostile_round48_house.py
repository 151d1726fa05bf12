"""Audit round 48 (the house): dead code left the product, the documents name files that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _source(rel: str) -> str:
    return (ROOT / rel).read_text()


def test_bsa_cuda_has_no_unused_forward_alias():
    """`block_sparse_attn_fwd_cuda` was a second name of `bsa_forward_cuda` that nothing (dispatch, tests,
    bench) called: the registry names `bsa_forward_cuda`."""
    src = _source("longcat_kernels/ops/block_sparse_attn/cuda.py")
    assert "block_sparse_attn_fwd_cuda" not in src
    assert "def bsa_forward_cuda" in src and '"bsa_forward_cuda"' in _source("longcat_kernels/dispatch.py")


def test_grid_has_no_unused_token_block_id():
    """`grid.token_block_id` was called from nowhere in the repository (its last test use went away); the
    kernels and references use `block_token_index` / `token_to_slot`."""
    import longcat_kernels.grid as grid

    assert not hasattr(grid, "token_block_id")
    assert "token_block_id" not in grid.__all__


_REPO_PATH = re.compile(r"`((?:longcat_kernels|longcat_vc|bench|tests|csrc|docs|examples)/[A-Za-z0-9_./-]*)`")


def test_backticked_repo_paths_in_readme_and_architecture_exist():
    """Guard: every backticked repository path (`longcat_kernels/...py`, `bench/...`, `tests/...`) named in
    README.md and ARCHITECTURE.md exists (a `<placeholder>` or `*` pattern is skipped)."""
    seen, missing = 0, []
    for doc in ("README.md", "ARCHITECTURE.md"):
        for path in _REPO_PATH.findall(_source(doc)):
            path = path.rstrip(".,:")
            if "<" in path or "*" in path:
                continue
            seen += 1
            if not (ROOT / path).exists():
                missing.append(f"{doc}: {path}")
    assert seen > 20, "no paths found: the pattern is wrong"
    assert not missing, missing


def _private_kernel_imports() -> set:
    """(module, name) that longcat_vc imports from longcat_kernels other than its public API."""
    found = set()
    for p in sorted((ROOT / "longcat_vc").rglob("*.py")):
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longcat_kernels."):
                found |= {(node.module, a.name) for a in node.names}
    return found


def test_architecture_lists_every_private_kernel_helper_longcat_vc_imports():
    """ARCHITECTURE said longcat_vc imports, beside the public API, `_envvars.env_flag` only from `_envvars`;
    `cli.py` also imports `backend_override` and `check_environment` (its early check of LONGCAT_KERNELS_*)."""
    text = " ".join(_source("ARCHITECTURE.md").split())
    para = text[text.index("`longcat_vc` calls the ops only"):text.index("`config.py` (DiTConfig")]
    found = _private_kernel_imports()
    assert ("longcat_kernels._envvars", "env_flag") in found
    # the argument checks are named as a module (`_validate.py`), every other helper by name
    missing = sorted(f"{m}.{n}" for m, n in found
                     if not (m == "longcat_kernels._validate" and "`_validate.py`" in para) and f"{n}`" not in para)
    assert not missing, f"ARCHITECTURE's longcat_vc paragraph misses {missing}"


def test_video_io_has_no_unused_video_extensions():
    """`video_io.VIDEO_EXTENSIONS` was exported since the module was written and never read: `read_video` opens
    any container PyAV/ffmpeg can decode, so the list only suggested a restriction that does not exist."""
    import longcat_vc.video_io as vio

    assert not hasattr(vio, "VIDEO_EXTENSIONS") and "VIDEO_EXTENSIONS" not in vio.__all__
    assert ".png" in vio.IMAGE_EXTENSIONS  # the image list is used (frame folders, stills)


def test_dev_index_names_every_script_that_times_with_bench_timing():
    """bench/dev/README.md said "Seven scripts time with `bench/timing.py`" and left out
    `fp8_op_overhead_gpu.py` (`TimingPolicy`, `measure`): the closing paragraph names each such script."""
    index = _source("bench/dev/README.md")
    para = " ".join(index[index.rindex("time with `bench/timing.py` itself"):].split())
    users = sorted(p.name for p in (ROOT / "bench" / "dev").glob("*.py")
                   if re.search(r"^\s*(from bench\.timing import|import bench\.timing)", p.read_text(), re.M))
    assert len(users) >= 7
    assert not [u for u in users if f"`{u}`" not in para], users
    words = {7: "Seven", 8: "Eight", 9: "Nine", 10: "Ten"}
    assert f"{words[len(users)]} scripts time with" in " ".join(index.split())


def test_dev_index_names_the_private_helpers_the_pairs_kernel_imports():
    """bench/dev/README.md called `bsa_pairs_gpu_dev.py` "public API + the kernel beside it", but the script calls
    the Triton backend module's entry points and `bsa_pairs_triton.py` imports private helpers of
    `ops/block_sparse_attn` (`_geom`, `_launch`, ...): a rename there breaks it, and the index now says which."""
    index = _source("bench/dev/README.md")
    row = next(line for line in index.splitlines() if line.startswith("| `bsa_pairs_gpu_dev.py`"))
    state = row.split(" | ")[2]
    private = set()
    for p in ("bench/dev/bsa_pairs_triton.py", "bench/dev/bsa_pairs_gpu_dev.py"):
        for node in ast.walk(ast.parse(_source(p))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longcat_kernels.ops."):
                private |= {a.name for a in node.names if a.name.startswith("_")}
    assert private, "the pairs kernel imports no private helper any more: update this test"
    assert not [n for n in sorted(private) if f"`{n}`" not in state and f".{n}`" not in state], state


def test_dev_index_rows_of_runnable_scripts_name_the_private_helpers_they_import():
    """A runnable workshop script that imports a private helper of the product breaks when it is renamed; its
    row of bench/dev/README.md names each one (`bsa_fp8_fwd_gpu.py` imported `_triton_kernels._block_rows`,
    `fp8_op_overhead_gpu.py` calls `fp8_quant.triton._num_warps`: both unnamed)."""
    index = _source("bench/dev/README.md")
    missing = []
    for row in index.splitlines():
        m = re.match(r"\| `([a-z0-9_]+\.py)`(?: \(\+ `([a-z0-9_]+\.py)`\))? \|", row)
        if not m or not row.split(" | ")[2].startswith("runnable"):
            continue
        for script in filter(None, m.groups()):
            tree = ast.parse(_source(f"bench/dev/{script}"))
            used, aliases = [], set()
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longcat_kernels"):
                    mod = node.module.rsplit(".", 1)[-1]
                    for a in node.names:
                        aliases.add(a.asname or a.name)
                        name = a.name if a.name.startswith("_") else (mod if mod.startswith("_") else None)
                        if name:
                            used.append((name, f"{node.module}.{a.name}"))
                elif isinstance(node, ast.Import):
                    aliases |= {a.asname for a in node.names if a.asname and a.name.startswith("longcat_kernels.")}
            # a private attribute of an imported product module (`fq._num_warps`)
            used += [(node.attr, f"{node.value.id}.{node.attr}") for node in ast.walk(tree)
                     if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                     and node.value.id in aliases and node.attr.startswith("_") and not node.attr.startswith("__")]
            for name, what in used:
                if f"`{name}`" not in row and f".{name}`" not in row and f"`{name}." not in row:
                    missing.append(f"{script}: {what}")
    assert not missing, missing
