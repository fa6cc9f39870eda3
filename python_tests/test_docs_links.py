"""The documentation holds together: every relative Markdown link in README.md and docs/*.md reaches an existing
file and every ``#anchor`` an existing heading of it (GitHub's anchor rule); every ``docs/<page>.md#anchor``
named in the code resolves the same way; no file cites the specification that is not in the repository; and
every test the bad-input table names exists."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md"] + sorted(DOCS.glob("*.md"))
SOURCE_SUFFIXES = {".py", ".md", ".h", ".cu", ".cuh", ".cpp", ".txt"}
SKIPPED_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "runs", "data"}
CITATION = "\x53PEC \u00a7"  # escaped, so that this file does not cite it

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
DOC_REFERENCE = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation except '-' and '_' dropped, each space a '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> List[str]:
    """The anchors of ``page``'s headings (outside code blocks), repeats numbered as GitHub numbers them."""
    seen: Dict[str, int] = {}
    out = []
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.+)", line)
        if m:
            base = anchor(m.group(1))
            out.append(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return out


def source_files() -> Iterator[Path]:
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
        for name in files:
            if Path(name).suffix in SOURCE_SUFFIXES:
                yield Path(folder) / name


def unresolved(target: Path, fragment: str) -> str:
    """Why ``target#fragment`` does not resolve, or ''."""
    if not target.exists():
        return f"{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target} does not exist"
    if fragment and target.suffix == ".md" and fragment not in anchors(target):
        return f"{target.relative_to(ROOT)} has no heading #{fragment}"
    return ""


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_reaches_a_file_and_a_heading(page):
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text(encoding="utf-8")))
    broken = []
    for link in LINK.findall(text):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        path, _, fragment = link.partition("#")
        why = unresolved((page.parent / path).resolve() if path else page, fragment)
        if why:
            broken.append(f"({link}): {why}")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


def test_the_docs_pages_exist_and_the_index_names_each():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    for page in ("usage", "demo", "build", "algorithms", "protocol", "store-format", "request-log", "results",
                 "bad-input", "architecture"):
        assert (DOCS / f"{page}.md").is_file(), f"docs/{page}.md is missing"
        assert f"]({page}.md)" in index, f"docs/README.md does not link {page}.md"


def test_every_docs_reference_in_the_code_resolves():
    broken = []
    for path in source_files():
        for page, fragment in DOC_REFERENCE.findall(path.read_text(encoding="utf-8", errors="replace")):
            why = unresolved(DOCS / page, fragment)
            if why:
                broken.append(f"{path.relative_to(ROOT)}: docs/{page}#{fragment}: {why}")
    assert not broken, broken


def test_no_file_cites_the_specification_outside_the_repository():
    citing = [str(p.relative_to(ROOT)) for p in source_files()
              if CITATION in p.read_text(encoding="utf-8", errors="replace")]
    assert not citing, f"{CITATION!r} in {citing}: cite the docs/ page that explains it"


def test_every_test_the_bad_input_table_names_exists():
    missing = []
    for row in (DOCS / "bad-input.md").read_text(encoding="utf-8").splitlines():
        if not row.startswith("| ") or row.startswith("| input"):
            continue
        test_file = None
        for name in re.findall(r"`([^`]+)`", row.rstrip(" |").rsplit(" | ", 1)[1]):
            m = re.fullmatch(r"(test_\w+\.py)(?:::(\w+))?|(test_\w+)", name)
            if not m:
                continue
            test_file = m.group(1) or test_file  # a bare name is in the file named before it
            function = m.group(2) or m.group(3)
            source = ROOT / "python_tests" / test_file
            if not source.is_file():
                missing.append(test_file)
            elif function and not re.search(rf"^def {function}\(", source.read_text(encoding="utf-8"), re.M):
                missing.append(f"{test_file}::{function}")
    assert not missing, f"docs/bad-input.md names tests that do not exist: {missing}"


def test_the_anchor_rule():
    assert anchor("The paper's training protocol") == "the-papers-training-protocol"
    assert anchor("masked_sgd_ and masked_adam_") == "masked_sgd_-and-masked_adam_"
    assert anchor("Exact tier (replay)") == "exact-tier-replay"
