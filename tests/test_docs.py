"""The contracts the code cites live in docs/, and every citation names a section that exists.

Code, tests and the README cite contracts as "docs/<file>.md §<n>" (several sections:
"docs/ops.md §2.5 and §4.4"); the docs cite each other as "[ops.md §3](ops.md)". Each
cited file must exist and have a heading numbered <n> ("## 3. ..." or "### 3.2 ...").
Nothing may cite the old external brief any more.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_DIRS = {".git", ".venv", "venv", ".pytest_cache", ".benchmarks", "__pycache__", "build", "dist",
             ".wheels", "node_modules", "vico-demo", "toy-bench"}
TEXT_SUFFIXES = {".py", ".md", ".sh", ".cpp", ".h", ".cu", ".txt", ".toml", ".cfg", ".yml", ".yaml", ".rst"}
OLD_CITATION = "SPEC" + " §"  # split so that this file does not cite it
NUMBER = r"\d+(?:\.\d+)*"
CITATION = re.compile(rf"docs/([\w.-]+\.md)\s*§({NUMBER})((?:\s*(?:,|and|or|to|–)\s*§{NUMBER})*)")
DOC_LINK = re.compile(rf"\[([\w.-]+\.md)\s*§({NUMBER})((?:\s*(?:,|and|or|to|–)\s*§{NUMBER})*)\]")
MORE = re.compile(rf"§({NUMBER})")
HEADING = re.compile(rf"^#{{1,6}}\s+({NUMBER})\.?\s", re.M)


def repo_text_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in names:
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES or (path.suffix == "" and path.is_file()
                                                and path.stat().st_size < 200_000):
                files.append(path)
    return files


def read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return ""


def sections(doc: Path) -> set[str]:
    return set(HEADING.findall(read(doc)))


def citations() -> list[tuple[str, int, str, str]]:
    """(file, line, cited doc, section) for every citation in the repository."""
    found = []
    for path in repo_text_files():
        text = read(path)
        patterns = [CITATION] + ([DOC_LINK] if path.parent == DOCS else [])
        for pattern in patterns:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                for number in [m.group(2)] + MORE.findall(m.group(3)):
                    found.append((str(path.relative_to(ROOT)), line, m.group(1), number))
    return found


def test_no_citation_of_the_old_brief():
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path in repo_text_files()
            for i, line in enumerate(read(path).splitlines(), 1) if OLD_CITATION in line]
    assert not hits, "cite docs/<file>.md §<n> instead:\n" + "\n".join(hits)


def test_every_cited_section_exists():
    found = citations()
    assert len(found) >= 20, f"expected the code to cite docs/ (found {len(found)} citations)"
    missing = []
    for where, line, doc, number in found:
        target = DOCS / doc
        if not target.is_file():
            missing.append(f"{where}:{line}: docs/{doc} does not exist")
        elif number not in sections(target):
            missing.append(f"{where}:{line}: docs/{doc} has no section {number}")
    assert not missing, "\n".join(missing)


def test_docs_sections_are_numbered():
    for doc in DOCS.glob("*.md"):
        numbers = HEADING.findall(read(doc))
        assert numbers, f"{doc.name} has no numbered sections"
        assert len(numbers) == len(set(numbers)), f"{doc.name} numbers a section twice"
