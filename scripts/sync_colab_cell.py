"""Write the Colab install cell (first cell of every chapter) from `repository` in _config.yml.

A fork changes `repository.url`/`branch` in _config.yml once and runs this script;
tests/test_book.py fails while any notebook disagrees with _config.yml.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import yaml

ROOT = Path(__file__).resolve().parents[1]
TAG = "colab-install"


def install_cell_source(root: Path = ROOT) -> str:
    repo = yaml.safe_load((root / "_config.yml").read_text())["repository"]
    url = repo["url"].rstrip("/")
    return (
        "# On Colab, install minigpt from the book's repository (repository.url in _config.yml).\n"
        "import subprocess, sys\n"
        'if "google.colab" in sys.modules:\n'
        '    subprocess.run([sys.executable, "-m", "pip", "install", "-q", '
        f'"git+{url}@{repo["branch"]}"], check=True)'
    )


def main() -> int:
    source = install_cell_source()
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0] if nb.cells else None
        if first is None or TAG not in first.metadata.get("tags", []):
            cell = nbformat.v4.new_code_cell(source)
            cell.metadata["tags"] = [TAG]
            nb.cells.insert(0, cell)
        elif first.source != source:
            first.source = source
        else:
            continue
        nbformat.write(nb, path)
        print(f"updated {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
