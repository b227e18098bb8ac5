"""`python -m minigpt bench serve --quick` runs end to end on CPU (smoke sizes) so it cannot rot."""

import json

import pytest

from minigpt.bench import main as bench_main

pytest.importorskip("transformers")


def test_bench_serve_quick_writes_json_plot_and_table(tmp_path, capsys):
    assert bench_main(["serve", "--quick", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "serve.json").read_text())
    assert (tmp_path / "serve.png").stat().st_size > 0
    assert {"gpu", "dtype", "torch", "triton", "commit", "date", "weights"} <= set(data["provenance"])
    assert [r["batch"] for r in data["decode"]] == [1, 4]
    for r in data["decode"]:
        assert r["engine_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0
    res = data["trace"]["results"]
    assert set(res) == {"continuous", "dynamic (article)", "continuous, HF subset", "HF static, HF subset"}
    assert res["continuous"]["requests"] == data["trace"]["requests"]
    assert res["HF static, HF subset"]["requests"] == data["trace"]["hf_subset"]
    out = capsys.readouterr().out
    assert "decode tokens/s" in out and out.rstrip().splitlines()[-1].startswith("ratios:")
