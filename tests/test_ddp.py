"""DDP: 2 CPU processes (torchrun, gloo) train exactly like 1 process with the same global batch;
only rank 0 prints and writes; a two-rank run resumes exactly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

REPO = Path(__file__).resolve().parents[1]
ARGS = ["--block-size", "16", "--lr-decay-steps", "4", "--warmup-steps", "1", "--log-interval", "1", "--eval-interval", "2",
        "--eval-batches", "4", "--sample-tokens", "0", "--no-progress", "--model.dim", "32", "--model.n_layers", "2",
        "--model.n_heads", "4", "--model.n_kv_heads", "2"]


def _run(cmd, env):
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _records(run_dir):
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "train"], [r for r in rows if r["type"] == "eval"], rows[0]


def test_two_gloo_ranks_match_one_process(tmp_path):
    data = tmp_path / "head.txt"
    data.write_text((FIXTURES / "shakespeare_head.txt").read_text()[:30_000])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINIGPT_CACHE_DIR": str(tmp_path / "cache"),
           "CUDA_VISIBLE_DEVICES": ""}  # gloo on the CPU, also on a machine with fewer GPUs than ranks
    one = [sys.executable, "-m", "minigpt", "train", "--data", str(data), "--batch-size", "6", *ARGS]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "minigpt", "train",
           "--data", str(data), "--batch-size", "3", *ARGS]
    _run([*one, "--out-dir", str(tmp_path / "one"), "--max-steps", "4"], env)
    proc = _run([*two, "--out-dir", str(tmp_path / "two"), "--max-steps", "4"], env)

    one_train, one_eval, one_cfg = _records(tmp_path / "one")
    two_train, two_eval, two_cfg = _records(tmp_path / "two")
    assert two_cfg["world_size"] == 2 and one_cfg["world_size"] == 1
    assert two_cfg["tokens_per_step"] == one_cfg["tokens_per_step"] == 6 * 16
    assert len(one_train) == len(two_train) == 4  # rank 1 appended nothing
    for a, b in zip(one_train, two_train, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert [e["val_loss"] for e in two_eval] == pytest.approx([e["val_loss"] for e in one_eval], rel=1e-5)
    assert (tmp_path / "two" / "ckpt.pt").is_file() and (tmp_path / "two" / "tokenizer.json").is_file()

    # only rank 0 prints and writes
    assert proc.stdout.count("tokens/step") == 1 and proc.stdout.count("val_loss=") == 1, proc.stdout
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) <= 1
    assert not list((tmp_path / "two").glob("*.tmp"))

    # a two-rank run stopped at step 2 and resumed on two ranks == the straight two-rank run
    _run([*two, "--out-dir", str(tmp_path / "cut"), "--max-steps", "2"], env)
    _run([*two, "--out-dir", str(tmp_path / "cut"), "--max-steps", "4", "--resume"], env)
    cut_train, _, _ = _records(tmp_path / "cut")
    assert [r["loss"] for r in cut_train] == [r["loss"] for r in two_train]


def test_more_ranks_than_gpus_is_refused_in_one_line(monkeypatch):
    """torchrun with more ranks on a node than it has GPUs: a one-line error naming both fixes, before
    CUDA's "invalid device ordinal"."""
    import torch

    from minigpt import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: pytest.fail(f"set_device({d}) reached"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"local rank 1, but this machine shows 1 CUDA GPU.*--nproc-per-node 1.*CUDA_VISIBLE_DEVICES="):
        distributed.setup_distributed()
