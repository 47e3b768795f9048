"""The docs say what the code does: citations, links, the README's figures and the results' data.

Code, tests and the README cite contracts as "docs/<file>.md §<n>" (several sections:
"docs/ops.md §2.5 and §4.4"); the docs cite each other as "[ops.md §3](ops.md)". Each
cited file must exist and have a heading numbered <n> ("## 3. ..." or "### 3.2 ...").
Nothing may cite the old external brief any more. Markdown links point at files and
headings that exist; the README's figures that come from the code (the shipped model's
size, the demo's budget) match it; every line of benchmarks/data/*.csv is a figure of the
section of benchmarks/history/ it names.
"""

from __future__ import annotations

import csv
import inspect
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


# --- links between the markdown files --------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.glob("*.md")), ROOT / "benchmarks" / "RESULTS.md",
            *sorted((ROOT / "benchmarks" / "history").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """The anchors of the headings of ``doc`` ("-1", "-2", ... on repeats, as GitHub numbers them)."""
    seen: dict[str, int] = {}
    in_code = False
    for line in read(doc).splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading and not in_code:
            base = slug(heading.group(1))
            seen[base] = seen.get(base, -1) + 1
            seen[f"{base}-{seen[base]}" if seen[base] else base] = 0
    return set(seen)


def broken_link(source: Path, target: str) -> str | None:
    """Why ``target`` (a link written in ``source``) leads nowhere, or None."""
    if re.match(r"[a-z]+:", target):
        return None  # a web address
    path, _, anchor = target.partition("#")
    doc = (source.parent / path).resolve() if path else source
    if not doc.exists():
        return f"{path} does not exist"
    if anchor and anchor not in anchors(doc):
        return f"{doc.relative_to(ROOT)} has no heading with the anchor #{anchor}"
    return None


def test_markdown_links_lead_to_files_and_headings_that_exist():
    broken = [f"{doc.relative_to(ROOT)}: {target}: {why}"
              for doc in MARKDOWN for target in LINK.findall(read(doc))
              if (why := broken_link(doc, target))]
    assert not broken, "\n".join(broken)


# --- the README's figures that come from the code -----------------------------------------------------------

README = ROOT / "README.md"


def test_readme_reads_in_five_minutes():
    lines = len(read(README).splitlines())
    assert lines <= 250, f"README.md has {lines} lines; keep it to 250 and move the rest to docs/"


@pytest.mark.parametrize("folder", ["model", "model_sdxl"])
def test_readme_states_the_shipped_model_size(folder):
    model = ROOT / "vico" / "toyworld" / folder
    megabytes = round(sum(f.stat().st_size for f in model.rglob("*") if f.is_file()) / 1e6)
    stated = re.findall(rf"`vico/toyworld/{folder}`, (\d+) MB", read(README))
    assert stated, f"README.md should give the shipped model's size as `vico/toyworld/{folder}`, <n> MB"
    assert stated == [str(megabytes)] * len(stated), f"the shipped model is {megabytes} MB, README says {stated}"


def test_readme_states_the_demo_budget_of_the_code():
    from vico.toyworld import demo, world

    text = " ".join(read(README).split())
    samples = inspect.signature(demo.run).parameters["samples"].default
    batches = {recipe["batch_size"] for recipe in demo.DEMO_RECIPES.values()}
    assert len(batches) == 1, f"the demo's methods train at different batches {batches}: say which in README.md"
    expected = [
        f"Textual Inversion ({demo.TI_STEPS} steps) and ViCo ({demo.VICO_STEPS} steps)",
        f"batch {batches.pop()}",
        f"{samples} samples on each of the {len(world.BACKGROUNDS)} backgrounds ({', '.join(world.BACKGROUNDS)})",
    ]
    missing = [phrase for phrase in expected if phrase not in text]
    assert not missing, f"README.md's demo paragraph should say (as vico/toyworld/demo.py does): {missing}"


def test_methods_doc_states_the_toy_recipe_of_the_code():
    from vico.toyworld import demo

    text = " ".join(read(DOCS / "methods.md").split())
    phrase = (f"{demo.TOY_STEPS['textual-inversion']} steps for Textual Inversion, "
              f"{demo.TOY_STEPS['vico']} for ViCo")
    assert phrase in text, f"docs/methods.md §8 should say {phrase!r}, as vico/toyworld/demo.py does"


# --- benchmarks/data: figures copied from the dated history -----------------------------------------------------

CSV_COLUMNS = ["op", "shape", "backend", "dtype", "metric", "value", "unit", "device", "date", "command", "source"]


def history_sections() -> dict[str, str]:
    """"benchmarks/history/<file>#<anchor>" -> the section's text, over every file of benchmarks/history/."""
    out = {}
    for doc in sorted((ROOT / "benchmarks" / "history").glob("*.md")):
        parts = re.split(r"^## (.*)$", read(doc), flags=re.M)
        for title, body in zip(parts[1::2], parts[2::2]):
            out[f"benchmarks/history/{doc.name}#{slug(title)}"] = title + body
    return out


def test_every_result_figure_is_one_of_its_section():
    sections = history_sections()
    files = sorted((ROOT / "benchmarks" / "data").glob("*.csv"))
    assert files, "benchmarks/data/ holds the figures as CSV, one file per device"
    wrong = []
    for path in files:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == CSV_COLUMNS, f"{path.name}: columns {reader.fieldnames}"
            for line, row in enumerate(reader, 2):
                section = sections.get(row["source"])
                if section is None:
                    wrong.append(f"{path.name}:{line}: no section {row['source']}")
                elif not (row["value"] in section and row["date"] in section
                          and row["command"] in " ".join(section.split())):
                    wrong.append(f"{path.name}:{line}: {row['value']} / {row['date']} / {row['command']!r} "
                                 f"not in {row['source']}")
    assert not wrong, "\n".join(wrong[:20])
