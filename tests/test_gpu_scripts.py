"""The GPU run scripts stay runnable: each one's --smoke mode (tiny sizes, CPU) writes its results."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_shakespeare_script_smoke(tmp_path):
    _run("gpu_train_shakespeare.py", "--parts", "b", "--rows", "2017 baseline,+ RoPE", "--name", "abl", out=tmp_path)
    results = json.loads((tmp_path / "abl.json").read_text())
    assert set(results["ablation"]) == {"2017 baseline", "+ RoPE"} and results["runs"] == {}
    assert all(r["steps"] > 0 and r["val_loss"] > 0 for r in results["ablation"].values())
    assert results["provenance"]["gpu"] == "cpu"


def test_shakespeare_script_rejects_unknown_row(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_train_shakespeare.py"), "--smoke", "--rows", "+ ALiBi",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ablation row" in proc.stderr


def test_gutenberg_script_smoke(tmp_path):
    _run("gpu_train_gutenberg.py", out=tmp_path)
    results = json.loads((tmp_path / "gutenberg.json").read_text())
    assert {"small", "medium"} <= set(results["runs"])
    assert results["runs"]["small"]["val_bpb"] > 0
