"""The documents link only files that exist in the repository, and the code's "SPEC n" citations
name sections that docs/SEMANTICS.md has."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "ARCHITECTURE.md", "docs/SEMANTICS.md", "longcat_kernels/DESIGN.md", "bench/dev/README.md",
        "bench/results/README.md"]


def test_markdown_links_point_inside_the_repository():
    broken = []
    for doc in DOCS:
        path = ROOT / doc
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+://", target) or target.startswith("#"):
                continue
            resolved = (path.parent / target.split("#")[0]).resolve()
            if not resolved.exists() or ROOT not in resolved.parents:
                broken.append(f"{doc}: {target}")
    assert not broken, broken
    for doc in DOCS:
        assert "shared/docs" not in (ROOT / doc).read_text(), f"{doc} points outside the repository"


def test_spec_citations_name_existing_sections():
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "SEMANTICS.md").read_text(), re.M))
    assert sections == {str(i) for i in range(1, 13)}
    cited = set()
    for p in list(ROOT.glob("longcat_kernels/**/*.py")) + list(ROOT.glob("longcat_vc/**/*.py")) + \
            list(ROOT.glob("bench/**/*.py")):
        for group in re.findall(r"SPEC ((?:\d+(?:[ ,/-]+|\b))+)", p.read_text()):
            cited |= {(p.name, n) for n in re.findall(r"\d+", group)}
    assert cited, "no SPEC citations found: the pattern is wrong"
    missing = sorted((f, n) for f, n in cited if n not in sections)
    assert not missing, missing


def test_cited_result_files_exist():
    """Every ``bench/results/<device>/<file>`` named in the code, csrc or the documents exists."""
    sources = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", ROOT / "csrc" / "NOTES.md",
               ROOT / "longcat_kernels" / "DESIGN.md", ROOT / "bench" / "dev" / "README.md"]
    for pattern in ("longcat_kernels/**/*.py", "longcat_vc/**/*.py", "bench/**/*.py", "csrc/*.c*", "csrc/*.h",
                    "docs/*.md"):
        sources += sorted(ROOT.glob(pattern))
    missing, seen = [], 0
    for src in sources:
        for cited in re.findall(r"bench/results/[a-z0-9-]+/[A-Za-z0-9_.*-]*[A-Za-z0-9*]", src.read_text()):
            seen += 1
            if not list(ROOT.glob(cited)):
                missing.append(f"{src.relative_to(ROOT)}: {cited}")
    assert seen > 5, "no result citations found: the pattern is wrong"
    assert not missing, missing
