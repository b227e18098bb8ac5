"""The kernel benchmark's CPU-testable parts: CLI parsing, the grid, target ratios, table, plots.

Timing itself needs a GPU (scripts/gpu_kernels.sh runs it); here synthetic records check that
ratios are computed the right way round and that reports are written.
"""

import pytest
import torch

from minigpt import bench

PROV = {"gpu": "test-gpu", "dtype": "bfloat16", "torch": "x", "triton": "y", "commit": "c", "date": "d"}


def rec(op, impl, pass_, shape, ms, **extra):
    return {"op": op, "impl": impl, "pass": pass_, "shape": shape, "median_ms": ms, **extra, **PROV}


def test_parse_defaults_and_errors():
    args = bench._parse(["kernels"])
    assert args.ops == list(bench.OPS) and str(args.out) == "results/kernels.json"
    assert bench._parse(["kernels", "--quick"]).out is None
    assert bench._parse(["kernels", "--ops", "rope, swiglu"]).ops == ["rope", "swiglu"]
    with pytest.raises(SystemExit):
        bench._parse(["kernels", "--ops", "rope,nope"])
    with pytest.raises(SystemExit):
        bench._parse(["models"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_main_without_cuda_says_so(capsys):
    assert bench.main(["kernels", "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("grid", list(bench.GRIDS))
def test_grid_has_every_op_with_a_cost_per_pass(grid):
    cases = bench.build_cases(list(bench.OPS), grid, torch.bfloat16)
    assert {c.op for c in cases} == set(bench.OPS)
    for c in cases:
        cost = c.bytes or c.flops
        assert set(cost) == set(bench.PASSES) and cost["fwd+bwd"] > cost["fwd"] > 0
        assert "triton" in c.impls and ("eager" in c.impls or c.shape.get("T", 0) > bench.NAIVE_ATTENTION_MAX_T)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run the kernels only in the interpreter")
def test_run_cases_end_to_end_on_smoke_grid(monkeypatch):
    """Every op and impl runs fwd and fwd+bwd on tiny CPU inputs; the GPU timer is stubbed."""
    monkeypatch.setattr(bench, "_compiled", lambda fn: fn)  # inductor on CPU would need a C++ toolchain
    monkeypatch.setattr(bench, "_peak_mb", lambda run: run() or 1.0)
    monkeypatch.setattr("triton.testing.do_bench", lambda fn, **kw: fn() or 0.5)
    cases = bench.build_cases(list(bench.OPS), "smoke", torch.float32, "cpu")
    records, skipped = bench.run_cases(cases, quick=True, provenance=PROV)
    ran = {(r["op"], r["impl"], r["pass"]) for r in records}
    for c in cases:
        for impl in c.impls:
            if not impl.startswith("sdpa"):  # SDPA backends may be unavailable on CPU: recorded as skipped
                assert {(c.op, impl, p) for p in bench.PASSES} <= ran, (c.op, impl, skipped)
    assert all(("gbps" in r) != ("tflops" in r) for r in records)
    assert all("peak_mem_mb" in r for r in records if r["pass"] == "fwd+bwd")


def test_targets_are_speedups_of_triton_over_peers():
    s = {"rows": 16, "hidden": 4096}
    ce = {"N": 8, "V": 20000}
    records = [
        rec("rms_norm", "triton", "fwd", s, 1.0, gbps=2700.0),
        rec("rms_norm", "liger", "fwd", s, 1.2),
        rec("rms_norm", "triton", "fwd+bwd", s, 2.0),
        rec("rms_norm", "compile", "fwd+bwd", s, 1.0),
        rec("cross_entropy", "triton", "fwd+bwd", ce, 1.0, peak_mem_mb=100.0),
        rec("cross_entropy", "eager", "fwd+bwd", ce, 3.0, peak_mem_mb=400.0),
    ]
    targets = {t["target"]: t for t in bench.compute_targets(records, {"copy_gbps": 3000.0})}
    assert targets["RMSNorm fwd / copy bandwidth (hidden >= 2048)"]["min"] == 0.9
    assert targets["RMSNorm fwd speed-up vs Liger"]["min"] == 1.2
    assert targets["RMSNorm fwd speed-up vs Liger"]["met"]
    rms_bwd = targets["RMSNorm fwd+bwd speed-up vs torch.compile"]
    assert rms_bwd["min"] == 0.5 and not rms_bwd["met"]
    assert targets["Cross-entropy fwd+bwd speed-up vs eager"]["min"] == 3.0
    mem = targets["Cross-entropy peak memory / eager's (V=20000; lower is better)"]
    assert mem["max"] == 0.25 and mem["met"]
    assert not any(t.startswith("FlashAttention") for t in targets)


def test_summary_and_plot(tmp_path):
    s1, s2 = {"N": 8, "V": 100}, {"N": 8, "V": 200}
    records = [rec("cross_entropy", i, p, s, ms, gbps=1.0 / ms) for i in ("triton", "eager") for p in bench.PASSES
               for s, ms in ((s1, 1.0), (s2, 2.0))]
    text = bench.summary_table(records, [], {"copy_gbps": 1.0, "matmul_bf16_tflops": 2.0})
    assert "cross_entropy" in text and "N=8 V=200" in text and "triton" in text
    path = tmp_path / "kernels_cross_entropy.png"
    bench.plot_op(records, "cross_entropy", path, PROV)
    assert path.stat().st_size > 1000
