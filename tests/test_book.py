"""The book's wiring: every notebook is in the toc, has the Colab cell from _config.yml right
under its title (collapsed), uses tags rather than NBVAL comments, tags at least one cell for nbval
output checking; and the Colab cell's logic fetches a repository with its results/ (tested against a
local clone, without network)."""

import importlib.util
import subprocess
import sys
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
    sync = _sync_module()
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "the title comes first"
    colab = nb.cells[1]
    assert colab.source == sync.install_cell_source(ROOT), "run scripts/sync_colab_cell.py"
    assert colab.metadata.get("tags") == sync.TAGS, "the Colab cell is tagged colab-install, hide-input"
    assert sum(sync.TAG in c.metadata.get("tags", []) for c in nb.cells) == 1
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any("NBVAL_" in c.source for c in code), "use cell tags, not # NBVAL comments"
    assert any("nbval-check-output" in c.metadata.get("tags", []) for c in code), "tag a deterministic cell"
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))


def _git(*args, cwd):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_colab_cell_clones_the_repository_with_its_results(tmp_path, monkeypatch):
    # A local repository stands in for the book's: the cell, as written for it, runs "in Colab".
    repo = tmp_path / "book"
    (repo / "results").mkdir(parents=True)
    (repo / "notebooks").mkdir()
    (repo / "results" / "kernels.json").write_text("{}")
    (repo / "notebooks" / "01_chapter.ipynb").write_text("{}")
    (repo / "_config.yml").write_text(f"repository:\n  url: file://{repo}\n  branch: main\n")
    _git("init", "-q", "-b", "main", cwd=repo)
    _git("add", ".", cwd=repo)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "book", cwd=repo)
    source = _sync_module().install_cell_source(repo)

    run = subprocess.run
    pip_calls = []

    def fake_run(cmd, *args, **kwargs):  # git runs for real; pip is recorded (no network here)
        if cmd[:3] == [sys.executable, "-m", "pip"]:
            pip_calls.append(cmd)
            return subprocess.CompletedProcess(cmd, 0)
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setitem(sys.modules, "google.colab", object())
    work = tmp_path / "content"  # the home folder of the Colab user
    work.mkdir()
    monkeypatch.setenv("HOME", str(work))
    monkeypatch.chdir(tmp_path)
    exec(compile(source, "colab-cell", "exec"), {})
    assert Path.cwd() == work / "minigpt-book" / "notebooks"
    assert (Path.cwd().parent / "results" / "kernels.json").exists(), "results/ must come with the clone"
    assert pip_calls == [[sys.executable, "-m", "pip", "install", "-q", str(work / "minigpt-book") + "[notebooks]"]]
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=Path.cwd(), capture_output=True, text=True)
    assert shallow.stdout.strip() == "true"
    exec(compile(source, "colab-cell", "exec"), {})  # run again from inside the clone: reuses it
    assert Path.cwd() == work / "minigpt-book" / "notebooks"


def test_colab_cell_names_the_fix_when_the_clone_fails(tmp_path, monkeypatch):
    """A repository URL that cannot be cloned (a fork not yet configured) is one line naming what to change."""
    repo = tmp_path / "book"
    repo.mkdir()
    (repo / "_config.yml").write_text(f"repository:\n  url: file://{tmp_path}/nowhere\n  branch: main\n")
    monkeypatch.setitem(sys.modules, "google.colab", object())
    monkeypatch.setenv("HOME", str(tmp_path / "content"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=r"could not clone .*set repository.url and branch in _config.yml"):
        exec(compile(_sync_module().install_cell_source(repo), "colab-cell", "exec"), {})


def test_colab_cell_does_nothing_outside_colab(tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "google.colab", raising=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(_sync_module().install_cell_source(ROOT), "colab-cell", "exec"), {})
    assert Path.cwd() == tmp_path and not any(tmp_path.iterdir())


def test_diagrams_are_drawn_by_the_script_and_shown(tmp_path):
    spec = importlib.util.spec_from_file_location("draw_figures", ROOT / "scripts" / "draw_figures.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.OUT = tmp_path
    mod.main()
    for name in mod.FIGURES:
        committed = ROOT / "book" / "figures" / name
        assert committed.exists() and committed.read_bytes() == (tmp_path / name).read_bytes(), \
            f"book/figures/{name} is stale: run scripts/draw_figures.py"
        chapter = ROOT / "notebooks"
        assert any(f"../book/figures/{name}" in c.source for p in chapter.glob("*.ipynb")
                   for c in nbformat.read(p, as_version=4).cells if c.cell_type == "markdown"), f"no chapter shows {name}"


def test_chapters_find_results_from_a_colab_clone(tmp_path, monkeypatch):
    """In Colab minigpt is pip-installed into site-packages (no results/ beside it) and the set-up cell leaves
    the chapter in clone/notebooks: runtime.results_dir() must find clone/results there, and take
    $MINIGPT_RESULTS_DIR first. (Chapters 7-11 looked beside the package only and found nothing in Colab.)"""
    from minigpt import runtime

    clone = tmp_path / "minigpt-book"
    (clone / "results").mkdir(parents=True)
    (clone / "notebooks").mkdir()
    monkeypatch.setattr(runtime, "__file__", str(tmp_path / "site-packages" / "minigpt" / "runtime.py"))
    monkeypatch.delenv("MINIGPT_RESULTS_DIR", raising=False)
    monkeypatch.chdir(clone / "notebooks")
    assert runtime.results_dir() == clone / "results"
    monkeypatch.chdir(clone)
    assert runtime.results_dir() == clone / "results"
    other = tmp_path / "mine"
    other.mkdir()
    monkeypatch.setenv("MINIGPT_RESULTS_DIR", str(other))
    assert runtime.results_dir() == other
    monkeypatch.delenv("MINIGPT_RESULTS_DIR")
    monkeypatch.chdir(tmp_path)
    assert runtime.results_dir() == tmp_path / "site-packages" / "results"  # none found: the path the message names
