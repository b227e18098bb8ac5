"""The GPU run scripts stay runnable: each one's --smoke mode (tiny sizes, CPU) writes its results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import real_corpus

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, out: Path) -> dict:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--smoke", "--out", str(out), *args],
                          capture_output=True, text=True, timeout=600, cwd=out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_shakespeare_script_smoke(tmp_path):
    real_corpus("shakespeare")
    _run("gpu_train_shakespeare.py", "--parts", "b", "--rows", "2017 baseline,+ RoPE", "--no-shrink", "--name", "abl", out=tmp_path)
    results = json.loads((tmp_path / "abl.json").read_text())
    assert set(results["ablation"]) == {"2017 baseline", "+ RoPE"} and results["runs"] == {}
    assert results["plan"]["ablation_iters"] == results["plan"]["ablation_iters_asked"]
    assert all(r["steps"] > 0 and r["val_loss"] > 0 for r in results["ablation"].values())
    assert results["provenance"]["gpu"] == "cpu"


def test_shakespeare_script_rejects_unknown_row(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_train_shakespeare.py"), "--smoke", "--rows", "+ ALiBi",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ablation row" in proc.stderr


def test_gutenberg_script_smoke(tmp_path):
    real_corpus("gutenberg")
    _run("gpu_train_gutenberg.py", out=tmp_path)
    results = json.loads((tmp_path / "gutenberg.json").read_text())
    assert {"small", "medium"} <= set(results["runs"])
    assert results["runs"]["small"]["val_bpb"] > 0


def test_gutenberg_script_medium_only(tmp_path):
    real_corpus("gutenberg")
    _run("gpu_train_gutenberg.py", "--small-minutes", "0", "--bench-steps", "0", "--name", "med", out=tmp_path)
    results = json.loads((tmp_path / "med.json").read_text())
    assert results["runs"]["small"] == {"skipped": "not requested (--small-minutes 0.0)"}
    assert results["runs"]["medium"]["steps"] > 0 and results["throughput"] == {}
    assert results["metrics_files"] == ["med_medium.jsonl"] and (tmp_path / "med_tokenizer.json").is_file()


def test_profile_script_puts_each_component_back(monkeypatch):
    """gpu_profile_train's ablation swaps exactly the named component to PyTorch, and the model's
    loss stays that of the all-Triton model (Triton's interpreter on CPU)."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_profile_train as prof

    from minigpt import ffn, norm
    from minigpt.config import ModelConfig
    from minigpt.model import MiniGPT

    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, kernels="triton")
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    base = MiniGPT(cfg)
    _, want = base(x, x)
    for component in prof.ABLATIONS:
        torch.manual_seed(0)
        model = MiniGPT(cfg)
        prof.put_back(model, component)
        ops = [m.ops for m in model.modules() if hasattr(m, "ops")]
        swapped = {
            "rms_norm": all(o.rms_norm is norm.rms_norm_reference for o in ops),
            "swiglu": all(o.swiglu is ffn.swiglu_reference for o in ops),
            "rope": all(o.rope_qk == o._rope_qk_reference for o in ops),
            "attention": all(o.attn_backend == "sdpa" for o in ops),
            "lm_loss": not any(o.triton for o in ops),
        }
        assert [c for c, done in swapped.items() if done] == [component]
        _, got = model(x, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown component 'norm'"):
        prof.put_back(base, "norm")
