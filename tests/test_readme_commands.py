"""Every command in README.md runs as written, on CPU, at smoke size.

Rules of the extractor (the README is written to them):

1. Commands come from fenced code blocks tagged ``bash``, ``sh``, ``shell`` or ``console``, one per
   line; a trailing ``\\`` joins the next line, ``# comments`` are dropped, a leading ``$ `` prompt is
   removed. ``python`` blocks are library examples, not commands, and are not run.
2. Not run: ``make ...`` (the README's set-up commands: CI runs them around this very test),
   ``pip``/``git``/``cd``/``jupyter`` (network or interactive), and any command whose comment says
   ``GPU-only``. ``python -m minigpt bench ...`` is run and must refuse with its one-line "needs a
   CUDA GPU" message (exit 2), except ``bench serve``, which runs at smoke size with ``--quick`` appended.
   ``python -m minigpt serve ...`` is started on a free port (its ``--port`` replaced), must answer
   ``GET /health`` with 200 within 120 s, and is then stopped.
3. ``python`` is this interpreter; ``torchrun`` is ``python -m torch.distributed.run`` (gloo on CPU).
4. Smoke size: ``... minigpt train`` gets tiny-model flags appended (argparse keeps the last value),
   ``scripts/*.py`` get ``--smoke --out <tmp>``; ``generate``/``export`` run as written.
5. All commands run in README order in one temporary directory (``scripts/`` linked in), offline,
   with ``MINIGPT_DATA_DIR`` holding small stand-ins for the three corpora built from
   ``tests/fixtures`` under their real names, so ``--data gutenberg`` works as written.
"""

from __future__ import annotations

import importlib.util
import json
import lzma
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
SHELL_TAGS = ("bash", "sh", "shell", "console")
NOT_RUN = ("make", "pip", "pip3", "git", "cd", "jupyter")
SMOKE_TRAIN = (
    "--model.dim 32 --model.n_layers 2 --model.n_heads 4 --model.n_kv_heads 2 --model.ffn_dim 64 --block-size 32 --batch-size 2 "
    "--max-minutes 0 --eval-interval 2 --eval-batches 1 --log-interval 1 --sample-tokens 0 --bpe-vocab-size 300 --no-compile --no-progress"
).split()


def extract_commands(markdown: str) -> list[tuple[str, str]]:
    """``(command, comment)`` pairs from the shell code blocks of ``markdown``, in order."""
    out = []
    for block in re.findall(r"^```(\w+)[^\n]*\n(.*?)^```", markdown, flags=re.M | re.S):
        tag, body = block
        if tag.lower() not in SHELL_TAGS:
            continue
        pending = ""
        for line in body.splitlines():
            line = pending + line.strip()
            pending = ""
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            words, comment = [], ""
            for word in shlex.split(line):  # quoted text stays one word, so a quoted '#' is not a comment
                if word.startswith("#"):
                    comment = line[line.index(word, sum(len(w) for w in words)) :]
                    break
                words.append(word)
            if words and words[0] == "$":
                words = words[1:]
            if words:
                out.append((shlex.join(words), comment))
    return out


def _argv(command: str, out: Path) -> list[str] | None:
    """The argv that runs ``command`` at smoke size, or None when rule 2 says it is not run."""
    words = shlex.split(command)
    if words[0] in NOT_RUN:
        return None
    if words[0] == "python":
        words = [sys.executable, *words[1:]]
    elif words[0] == "torchrun":
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    else:
        raise AssertionError(f"README command {command!r} starts with {words[0]!r}: add a rule for it to {__file__}")
    if "minigpt" in words and words[words.index("minigpt") + 1 : words.index("minigpt") + 2] == ["train"]:
        words += [*SMOKE_TRAIN, "--max-steps", "4" if "--resume" in words else "2"]
    if _subcommand(words) == ["bench", "serve"]:
        words += ["--quick", "--out", str(out / "serve")]
    if any(w.startswith("scripts/") and w.endswith(".py") for w in words):
        words += ["--smoke", "--out", str(out)]
    return words


def _subcommand(words: list[str]) -> list[str]:
    """The one or two words after ``minigpt`` (``['serve']``, ``['bench', 'serve']``), or []."""
    if "minigpt" not in words:
        return []
    rest = words[words.index("minigpt") + 1 :]
    return rest[:2] if rest[:1] == ["bench"] else rest[:1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_server(argv: list[str], cwd: Path, env: dict) -> None:
    """Start ``minigpt serve`` on a free port, wait for /health, stop it. Where the ``[serve]`` extra
    (starlette, uvicorn) is not installed, as on a bare GPU machine, it must refuse in one line naming it."""
    if "--port" in argv:
        i = argv.index("--port")
        argv = argv[:i] + argv[i + 2 :]
    port = _free_port()
    if any(importlib.util.find_spec(m) is None for m in ("starlette", "uvicorn")):
        proc = subprocess.run([*argv, "--port", str(port)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "pip install 'minigpt[serve]'" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
        return
    proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, f"serve exited early: {proc.stdout.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    assert r.status == 200
                    return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("serve did not answer /health within 120 s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _stand_in_corpora(root: Path) -> None:
    """Small files at the known corpora's paths, made from tests/fixtures."""
    shakespeare = (FIXTURES / "shakespeare_head.txt").read_text()
    stories = (FIXTURES / "tinystories_head.txt").read_text()
    (root / "tinyshakespeare").mkdir(parents=True)
    (root / "tinyshakespeare" / "input.txt").write_text(shakespeare)
    (root / "tinystories").mkdir()
    (root / "tinystories" / "tinystories_val_794k.txt").write_text(stories)
    (root / "gutenberg").mkdir()
    text = shakespeare + stories
    books = [{"author": "fixture", "title": f"part {i}", "text": text[i * len(text) // 10 : (i + 1) * len(text) // 10]} for i in range(10)]
    with lzma.open(root / "gutenberg" / "gutenberg_en_100M.jsonl.xz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(b) + "\n" for b in books)


def test_extractor_rules():
    md = """text
```bash
make test    # the CI command
$ python -m minigpt train --data x \\
    --out-dir "runs/a b"   # two lines
python -c "print('# not a comment')"  # a comment
```
```python
model(idx)
```
```console
torchrun --nproc_per_node 2 -m minigpt train   # DDP, GPU-only
```
"""
    cmds = extract_commands(md)
    assert [shlex.split(c) for c, _ in cmds] == [
        ["make", "test"],
        ["python", "-m", "minigpt", "train", "--data", "x", "--out-dir", "runs/a b"],
        ["python", "-c", "print('# not a comment')"],
        ["torchrun", "--nproc_per_node", "2", "-m", "minigpt", "train"],
    ]
    assert cmds[0][1] == "# the CI command" and "GPU-only" in cmds[3][1]
    assert _argv("make test", Path(".")) is None
    with pytest.raises(AssertionError, match="add a rule"):
        _argv("curl http://x", Path("."))


def test_every_readme_command_runs_on_cpu(tmp_path):
    cmds = extract_commands((ROOT / "README.md").read_text())
    assert cmds, "README.md has no shell code block"
    work = tmp_path / "work"
    work.mkdir()
    (work / "scripts").symlink_to(ROOT / "scripts")
    _stand_in_corpora(tmp_path / "data")
    env = {
        **os.environ,
        "MINIGPT_DATA_DIR": str(tmp_path / "data"),
        "MINIGPT_CACHE_DIR": str(tmp_path / "cache"),
        "MINIGPT_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
    }
    ran = []
    for command, comment in cmds:
        argv = _argv(command, tmp_path / "out")
        if argv is None or "GPU-only" in comment:
            continue
        if _subcommand(shlex.split(command)) == ["serve"]:
            _check_server(argv, work, env)
            ran.append(command)
            continue
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=300)
        if _subcommand(shlex.split(command)) == ["bench", "kernels"]:
            assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr, f"{command}: {proc.stderr[-2000:]}"
        else:
            assert proc.returncode == 0, f"README command failed: {command}\n{proc.stderr[-3000:]}"
        ran.append(command)
    assert ran, "no README command was run"
