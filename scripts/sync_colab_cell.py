"""Write the Colab set-up cell of every chapter from `repository` in _config.yml.

The cell sits right below the chapter's title cell, tagged `colab-install` (found by tests) and
`hide-input` (collapsed on the rendered page). In Colab it shallow-clones the book's repository,
so that chapters reading `results/` find it, installs `minigpt[notebooks]` from that clone and moves into
its `notebooks/` folder; elsewhere it does nothing. A fork changes `repository.url`/`branch` in
_config.yml once and runs this script; tests/test_book.py fails while any notebook disagrees.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
TAG = "colab-install"
TAGS = [TAG, "hide-input"]

# The cell's logic: a function the tests call against a local clone (no network), then one guarded call.
_CELL = '''# Colab set-up: fetch the book's repository (shallow) so results/ is there, install minigpt from it.
import os, subprocess, sys


def fetch_book(url, branch, dest, install=True):
    """Shallow-clone `url`@`branch` into `dest` once, pip-install it with what the chapters import
    beyond the library (the [notebooks] extra: the server, the openai client, transformers), return
    its notebooks/ folder."""
    if not os.path.isdir(os.path.join(dest, ".git")):
        clone = ["git", "clone", "--quiet", "--depth", "1", "--branch", branch, url, dest]
        if subprocess.run(clone).returncode != 0:
            raise RuntimeError("could not clone " + url + " (branch " + branch + "); for a fork, set repository.url "
                               "and branch in _config.yml and run scripts/sync_colab_cell.py")
    if install:  # not -e: importable at once
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", os.path.abspath(dest) + "[notebooks]"], check=True)
    return os.path.join(os.path.abspath(dest), "notebooks")


if "google.colab" in sys.modules:
    os.chdir(fetch_book("{url}", "{branch}", os.path.expanduser("~/minigpt-book")))'''


def install_cell_source(root: Path = ROOT) -> str:
    """The set-up cell's source for the repository named in `root`/_config.yml."""
    repo = yaml.safe_load((root / "_config.yml").read_text())["repository"]
    return _CELL.replace("{url}", repo["url"].rstrip("/")).replace("{branch}", repo["branch"])


def sync(nb: nbformat.NotebookNode, source: str) -> bool:
    """Put the set-up cell right after the title cell (moving or creating it); True if nb changed."""
    old = [i for i, c in enumerate(nb.cells) if TAG in c.metadata.get("tags", [])]
    if len(old) > 1:
        raise ValueError(f"{len(old)} cells are tagged {TAG!r}; keep one")
    title = next((i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.lstrip().startswith("# ")),
                 None)
    if title is None:
        raise ValueError("no title cell ('# N. Title') to put the Colab cell under")
    if old:
        cell = nb.cells[old[0]]
        if old[0] == title + 1 and cell.source == source and cell.metadata.get("tags") == TAGS:
            return False
        nb.cells.pop(old[0])
        title = title - 1 if old[0] < title else title
    else:
        cell = nbformat.v4.new_code_cell()
    cell.source, cell.metadata["tags"], cell.outputs, cell.execution_count = source, list(TAGS), [], None
    nb.cells.insert(title + 1, cell)
    return True


def main() -> int:
    source = install_cell_source()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if sync(nb, source):
            nbformat.write(nb, path)
            print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
