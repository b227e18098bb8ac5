"""Shared test setup: importing minigpt first sets TRITON_INTERPRET=1 on machines without CUDA,
before any Triton kernel module is imported (kernels then run on CPU tensors).

Text for unit tests comes from ``tests/fixtures/`` (small excerpts, see its README), so the suite
passes on a fresh clone with no data folder and no network. A test that needs a whole corpus asks
``real_corpus(name)``: it skips, saying why, when the corpus is on no data dir. Tests run with
``MINIGPT_OFFLINE=1`` (nothing is downloaded) unless ``MINIGPT_TEST_DOWNLOAD=1``.
"""

import os
from pathlib import Path

import pytest

import minigpt  # noqa: F401
from minigpt.data import DataNotFoundError, data_search_dirs, find_data_file

FIXTURES = Path(__file__).parent / "fixtures"
if os.environ.get("MINIGPT_TEST_DOWNLOAD", "0") != "1":
    os.environ["MINIGPT_OFFLINE"] = "1"  # no test downloads a corpus by accident (subprocesses inherit this)


def real_corpus(name: str) -> Path:
    """The path of the real corpus ``name``, or skip the calling test with the reason."""
    try:
        return find_data_file(name)
    except DataNotFoundError:
        where = ", ".join(str(d) for d in data_search_dirs())
        pytest.skip(f"needs the real {name} corpus, found in none of {where} (set MINIGPT_DATA_DIR, or MINIGPT_TEST_DOWNLOAD=1 to download it)")


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """The first 40,000 characters of Tiny Shakespeare."""
    return (FIXTURES / "shakespeare_head.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def tinystories_text() -> str:
    """The first ~150 kB of our TinyStories excerpt: whole stories, each followed by a blank line."""
    return (FIXTURES / "tinystories_head.txt").read_text(encoding="utf-8")
