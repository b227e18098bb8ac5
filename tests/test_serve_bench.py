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
    for name in ("continuous", "dynamic (article)"):  # every step counted once, by its kind
        kinds = res[name]["steps"]
        assert kinds["with prefill"]["steps"] >= 1 and kinds["with prefill"]["mean_prefill_tokens"] > 0
        assert abs(kinds["decode only"]["share_of_time"] + kinds["with prefill"]["share_of_time"] - 1) < 1e-9
    out = capsys.readouterr().out
    assert "decode tokens/s" in out and "ratios:" in out and "engine steps by kind" in out


def test_bench_serve_default_output_keeps_smoke_runs_out_of_results():
    """Without --out a smoke run (CPU or --quick) writes to runs/, never over the published GPU numbers."""
    from pathlib import Path

    from minigpt.bench_serve import out_dir

    assert out_dir(None, smoke=True) == Path("runs/bench_serve_smoke")
    assert out_dir(None, smoke=False) == Path("results/serve")
    assert out_dir(Path("x"), smoke=True) == Path("x")


def test_step_breakdown_splits_steps_by_kind():
    from minigpt.bench_serve import step_breakdown

    got = step_breakdown([(4, 0, 0.002), (3, 100, 0.010), (4, 0, 0.004), (4, 0, 0.003), (0, 300, 0.001)])
    dec, mix = got["decode only"], got["with prefill"]
    assert (dec["steps"], mix["steps"]) == (3, 2)
    assert dec["median_ms"] == pytest.approx(3.0) and mix["median_ms"] == pytest.approx(5.5)
    assert dec["share_of_time"] == pytest.approx(0.45) and mix["share_of_time"] == pytest.approx(0.55)
    assert mix["mean_decode_rows"] == 1.5 and mix["mean_prefill_tokens"] == 200
    assert step_breakdown([(1, 0, 0.001)])["with prefill"] == {
        "steps": 0, "median_ms": None, "share_of_time": 0.0, "mean_decode_rows": None, "mean_prefill_tokens": None}
