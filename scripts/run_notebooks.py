"""Execute chapter notebooks with nbclient and write them (with outputs) to a folder.

Used on the GPU machine to produce the committed outputs:
    python scripts/run_notebooks.py notebooks/*.ipynb --out "$OUT/notebooks"
Prints one line per notebook (seconds, status) and exits non-zero if any cell failed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="folder for the executed copies")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.notebooks:
        if not path.exists():
            parser.error(f"{path} does not exist")
        nb = nbformat.read(path, as_version=4)
        client = NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        try:
            client.execute()
            status = "ok"
        except CellExecutionError as err:
            failed += 1
            status = "FAILED: " + str(err).strip().splitlines()[-1][:300]
        nbformat.write(nb, args.out / path.name)
        print(f"{path.name:40s} {time.perf_counter() - start:7.1f} s  {status}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
