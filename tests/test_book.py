"""The book's wiring: every notebook is in the toc, has the Colab cell from _config.yml, uses
tags rather than NBVAL comments, and tags at least one cell for nbval output checking."""

import importlib.util
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _toc_files() -> set[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return {ch["file"] for part in toc["parts"] for ch in part["chapters"]}


def _sync_module():
    spec = importlib.util.spec_from_file_location("sync_colab_cell", ROOT / "scripts" / "sync_colab_cell.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_config_has_colab_launch_and_no_execution():
    cfg = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert cfg["execute"]["execute_notebooks"] == "off"
    assert cfg["launch_buttons"]["colab_url"].startswith("https://colab.research.google.com")
    assert cfg["repository"]["url"].startswith("https://")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_wired_into_the_book(path):
    nb = nbformat.read(path, as_version=4)
    assert f"notebooks/{path.stem}" in _toc_files(), f"{path.name} is not in _toc.yml"
    first = nb.cells[0]
    assert first.source == _sync_module().install_cell_source(ROOT), "run scripts/sync_colab_cell.py"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any("NBVAL_" in c.source for c in code), "use cell tags, not # NBVAL comments"
    assert any("nbval-check-output" in c.metadata.get("tags", []) for c in code), "tag a deterministic cell"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
