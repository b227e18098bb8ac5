"""Drift test: the chapters' prose names only chapters and parts that _toc.yml has.

Chapter numbers are positions in _toc.yml (notebooks only, in order), parts are its captions and
titles are the notebooks' own "# N. Title" headings. Checked in every notebook's Markdown cells
and in book/intro.md: every "chapter N" / "chapters N-M" exists; every numbered title "N. Title"
written in a table or a link is chapter N's title; every link to a notebook points at a chapter
of the book, under its number; every part named in a map table is a caption of the toc.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]

CHAPTER_REF = re.compile(r"\b[Cc]hapters?\s+(\d+)((?:\s*(?:[-–]|to|and)\s*\d+)*)")
CH_ABBREV = re.compile(r"\b[Cc]h\.?\s+(\d+)\b")
LINKED_TITLE = re.compile(r"\[(\d+)\.\s+([^\]]+)\]\(([^)\s]+?\.ipynb)\)")
TABLE_TITLE = re.compile(r"^\s*(\d+)\.\s+(.+?)\s*$")
HEADING = re.compile(r"^#\s+(\d+)\.\s+(.+?)\s*$", re.M)


APPENDIX = re.compile(r"^(\d+[a-z])_")


def load_book(toc_path: Path = ROOT / "_toc.yml"):
    """(chapters, parts): chapters maps number -> (notebook stem, title, part caption)."""
    toc = yaml.safe_load(toc_path.read_text())
    chapters, parts = {}, []
    for part in toc["parts"]:
        parts.append(part["caption"])
        for entry in part["chapters"]:
            path = ROOT / (entry["file"] + ".ipynb")
            if not entry["file"].startswith("notebooks/"):
                continue
            title = None
            if path.exists():
                heading = HEADING.search(_first_heading(path))
                title = heading.group(2) if heading else None
            if APPENDIX.match(Path(entry["file"]).name):  # e.g. 11b_kernel_tables: an appendix of chapter 11, unnumbered
                continue
            chapters[len(chapters) + 1] = (Path(entry["file"]).name, title, part["caption"])
    return chapters, parts


def _first_heading(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return next((c.source for c in nb.cells if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")), "")


def prose_files() -> list[Path]:
    return [*sorted((ROOT / "notebooks").glob("*.ipynb")), ROOT / "book" / "intro.md"]


def prose(path: Path) -> str:
    if path.suffix == ".md":
        return path.read_text()
    nb = nbformat.read(path, as_version=4)
    return "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")


def _same_title(written: str, title: str | None) -> bool:
    if title is None:  # the notebook is in the toc but not on this checkout: the number is enough
        return True
    norm = lambda s: re.sub(r"[^a-z0-9]+", " ", s.lower()).strip()
    return norm(written).startswith(norm(title)) or norm(title).startswith(norm(written))


def bad_references(text: str, chapters: dict, parts: list[str]) -> list[str]:
    """Every reference in `text` to a chapter or part that the book (chapters, parts) does not have."""
    bad = []
    n = len(chapters)
    for match in CHAPTER_REF.finditer(text):
        numbers = [int(match.group(1))] + [int(x) for x in re.findall(r"\d+", match.group(2))]
        bad += [f"{match.group(0)!r}: no chapter {k} (the toc has {n})" for k in numbers if not 1 <= k <= n]
    for match in CH_ABBREV.finditer(text):
        if not 1 <= int(match.group(1)) <= n:
            bad.append(f"{match.group(0)!r}: no chapter {match.group(1)}")
    for number, written, link in LINKED_TITLE.findall(text):
        k = int(number)
        if k not in chapters:
            bad.append(f"link '{number}. {written}': no chapter {k}")
            continue
        stem, title, _ = chapters[k]
        if Path(link).stem != stem:
            bad.append(f"link '{number}. {written}' goes to {link}, but chapter {k} is {stem}")
        if not _same_title(written, title):
            bad.append(f"link '{number}. {written}': chapter {k} is titled {title!r}")
    part = None
    for line in text.splitlines():
        if not line.lstrip().startswith("|") or set(line.strip()) <= set("|-: "):
            part = None if not line.lstrip().startswith("|") else part
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "Part":
            part = "header"
            continue
        if part is None or len(cells) < 2:
            continue
        if cells[0]:
            part = re.sub(r"^[IVX]+\.\s*", "", cells[0])
            if part not in parts:
                bad.append(f"map row {line.strip()[:60]!r}: no part {part!r} in the toc ({parts})")
        title = TABLE_TITLE.match(re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", cells[1]))
        if title:
            k, written = int(title.group(1)), re.sub(r"\s*\(this chapter\)$", "", title.group(2))
            if k not in chapters:
                bad.append(f"map row '{k}. {written}': no chapter {k}")
            elif not _same_title(written, chapters[k][1]):
                bad.append(f"map row '{k}. {written}': chapter {k} is titled {chapters[k][1]!r}")
            elif chapters[k][2] != part:
                bad.append(f"map row '{k}. {written}': chapter {k} is in part {chapters[k][2]!r}, not {part!r}")
    return bad


@pytest.mark.parametrize("path", prose_files(), ids=lambda p: p.name)
def test_prose_names_only_chapters_and_parts_of_the_toc(path):
    chapters, parts = load_book()
    assert not bad_references(prose(path), chapters, parts)


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.name)
def test_title_is_numbered_by_its_place_in_the_toc(path):
    chapters, _ = load_book()
    appendix = APPENDIX.match(path.stem)
    if appendix:  # an appendix page is titled by its file prefix ('# 11b. ...') and sits in the toc
        assert f"notebooks/{path.stem}" in (ROOT / "_toc.yml").read_text(), f"{path.name} is not in _toc.yml"
        assert _first_heading(path).startswith(f"# {appendix.group(1)}. "), f"{path.name}: the title must read '# {appendix.group(1)}. Title'"
        return
    number = next((k for k, (stem, _, _) in chapters.items() if stem == path.stem), None)
    assert number is not None, f"{path.name} is not in _toc.yml"
    heading = HEADING.search(_first_heading(path))
    assert heading, f"{path.name}: the title must read '# {number}. Title'"
    assert int(heading.group(1)) == number, f"{path.name} is chapter {number}, its title says {heading.group(1)}"


def test_the_checker_catches_drift():
    chapters = {1: ("01_a", "Alpha", "First"), 2: ("02_b", "Beta", "Second")}
    parts = ["First", "Second"]
    ok = ("See chapter 2 and chapters 1-2.\n\n| Part | Chapter | What |\n|---|---|---|\n"
          "| First | 1. Alpha (this chapter) | x |\n| Second | [2. Beta](02_b.ipynb) | y |\n")
    assert bad_references(ok, chapters, parts) == []
    for wrong in ("as chapter 3 shows", "chapters 1-3", "(ch. 4)", "[2. Beta](03_c.ipynb)", "[2. Gamma](02_b.ipynb)",
                  "| Part | Chapter |\n|---|---|\n| Third | 2. Beta |",
                  "| Part | Chapter |\n|---|---|\n| First | 2. Beta |",
                  "| Part | Chapter |\n|---|---|\n| Second | 3. Delta |"):
        assert bad_references(wrong, chapters, parts), wrong
