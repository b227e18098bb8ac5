"""The GPU run scripts stay runnable: each one's --smoke mode (tiny sizes, CPU) writes its results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, real_corpus

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
    loss stays that of the all-Triton model (Triton's interpreter on CPU, fp32 kernels on a GPU)."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_profile_train as prof

    from minigpt import ffn, norm
    from minigpt.config import ModelConfig
    from minigpt.model import MiniGPT

    cfg = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=16, kernels="triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels need CUDA tensors
    x = torch.randint(0, 61, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(0)
    base = MiniGPT(cfg).to(device)
    _, want = base(x, x)
    for component in prof.ABLATIONS:
        torch.manual_seed(0)
        model = MiniGPT(cfg).to(device)
        prof.put_back(model, component)
        ops = [m.ops for m in model.modules() if hasattr(m, "ops")]
        swapped = {
            "rms_norm": all(o.rms_norm is norm.rms_norm_reference and o._add_rms_norm is norm.add_rms_norm_reference
                            for o in ops),
            "swiglu": all(o.swiglu is ffn.swiglu_reference for o in ops),
            "rope": all(o.rope_qk == o._rope_qk_reference for o in ops),
            "attention": all(o.attn_backend == "sdpa" for o in ops),
            "lm_loss": not model.ops.triton,  # only the model's: the norms' decide the fused residual path
        }
        assert [c for c, done in swapped.items() if done] == [component]
        _, got = model(x, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown component 'norm'"):
        prof.put_back(base, "norm")


def test_profile_script_rejects_unknown_ablation():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_profile_train.py"), "--ablations", "attention,norm"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown --ablations norm: choose from rms_norm" in proc.stderr


def test_ddp_script_breakdown_and_merge(tmp_path):
    """gpu_ddp.py on CPU (two gloo ranks): the no_sync timing launches no all-reduce and the replicas drift apart, the
    synced timing all-reduces every step and keeps them identical (so a breakdown that timed the wrong mode fails);
    --rows reruns two rows and --merge keeps the earlier file's other rows, labelled with the run that measured them."""
    data = tmp_path / "head.txt"
    data.write_text((FIXTURES / "shakespeare_head.txt").read_text()[:30_000])
    earlier = {"provenance": {"commit": "abc1234", "date": "2026-01-01T00:00:00+00:00"}, "steps": 60, "allreduce_medium_run": {"world_size": 2},
               "rows": [{"name": "small_1gpu", "status": "ok", "tokens_per_s": 1.0},
                        {"name": "medium_2gpu_weak", "status": "ok", "preset": "medium", "gpus": 2, "tokens_per_s": 2.0}]}
    (tmp_path / "earlier.json").write_text(json.dumps(earlier))
    _run("gpu_ddp.py", "--rows", "small_1gpu,small_2gpu_strong", "--presets", "small", "--breakdown-batch", "16", "--data", str(data),
         "--work", str(tmp_path / "work"), "--merge", str(tmp_path / "earlier.json"), out=tmp_path)
    results = json.loads((tmp_path / "ddp_scaling.json").read_text())

    assert [r["name"] for r in results["rows"]] == ["small_1gpu", "small_2gpu_strong", "medium_2gpu_weak"]
    assert results["rows"][0]["tokens_per_s"] > 1.0 and "run" not in results["rows"][0]  # remeasured, by this run
    assert results["rows"][2]["run"] == {"commit": "abc1234", "date": "2026-01-01T00:00:00+00:00"}
    assert results["allreduce_medium_run"] == {"world_size": 2} and results["merged_from"]["rows_kept"] == ["medium_2gpu_weak"]
    assert results["merged_from"]["provenance"]["commit"] == "abc1234"
    assert results["loss_agreement"]["small"]["steps_compared"] >= 1 and "small_strong" in results["efficiency"]

    [b] = results["breakdown"]
    assert (b["preset"], b["micro_batch"], b["status"], b["world_size"]) == ("small", 16, "ok", 2)
    assert b["profile"]["sync"]["allreduces_per_step"] >= 1 and b["profile"]["no_sync"]["allreduces_per_step"] == 0
    assert b["param_spread"]["sync"] == 0.0 and b["param_spread"]["no_sync"] > 0
    assert b["grad_dtypes"] == ["torch.float32"] and b["grad_bytes"] == 4 * b["n_params"]
    assert b["step_ms_sync"] > 0 and b["step_ms_no_sync"] == max(b["step_ms_no_sync_ranks"]) > 0
    assert b["exposed_allreduce_ms"] == pytest.approx(b["step_ms_sync"] - b["step_ms_no_sync"])
    assert b["allreduce_ms"] > 0 and results["allreduce"]["world_size"] == 2


def test_ddp_script_rejects_unknown_row(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_ddp.py"), "--smoke", "--rows", "small_4gpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown row small_4gpu" in proc.stderr


def test_serve_profile_script_smoke(tmp_path):
    """Every step's phases are timed once: a step of up to GRAPH_TOKENS tokens, prompt chunks included, is
    one replay; on a CPU the replay runs the eager pass inside it, which must not count twice."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_profile_serve.py"), "--smoke", "--out",
                           str(tmp_path / "steps.json")], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = json.loads((tmp_path / "steps.json").read_text())["kinds"]
    dec, mix = kinds["decode only"], kinds["with prefill"]
    assert dec["steps"] > 0 and mix["steps"] > 0 and mix["mean_prefill_tokens"] > 0
    assert dec["host_ms"]["replay"] > 0 and dec["host_ms"]["eager pass"] == 0  # nested: counted once, as the replay
    assert mix["host_ms"]["replay"] > 0 and mix["host_ms"]["eager pass"] == 0  # mixed steps are graphed too
    for k in (dec, mix):
        assert k["unaccounted_ms"] >= 0 and k["gpu_ms"] == {"replay": 0.0, "eager pass": 0.0}  # no CUDA events on a CPU


def test_kernel_sweep_script_smoke(tmp_path):
    """Every swept configuration of the RMSNorm and RoPE launchers runs (in the interpreter) and gives the
    heuristic's result; the summary names the heuristic, the best configuration and the copy for each op."""
    from minigpt.kernels._launch import interpreter_problem

    if problem := interpreter_problem():  # e.g. the GPU machine's Triton 3.6 beside NumPy 2.4
        pytest.skip(problem)
    _run("gpu_kernel_sweep.py", out=tmp_path)
    res = json.loads((tmp_path / "kernel_sweep.json").read_text())
    assert [s["op"] for s in res["summary"]] == ["rms_norm fwd", "rms_norm bwd", "rope fwd"]
    assert all(s["best"] and not s["wrong_configs"] and s["heuristic"] for s in res["summary"])
    swept = [r for r in res["rows"] if r["max_err"] is not None]
    assert len(swept) >= 5 and max(r["max_err"] for r in swept) < 1e-5  # fp32 on a CPU: the same numbers


FORWARD_SHAPES = [(2, 4, 2, 80, 40), (1, 2, 2, 37, 32)]  # (B, H, Hkv, T, D): GQA, odd lengths, a head of 40


def _forward_case(monkeypatch, shape, cpu_tol=1e-5):
    """gpu_flash_attention's module, q [B, H, T, D], k/v [B, Hkv, T, D] (fp32 on the CPU, where the
    interpreter runs; bf16 on a GPU), the float64 causal attention they must give, and the tolerance
    (``cpu_tol`` on the CPU, bf16 rounding on a GPU)."""
    import torch
    from test_flash_attention import reference

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_flash_attention as gfa

    cuda = torch.cuda.is_available()
    device, dtype, tol = ("cuda", torch.bfloat16, 2e-2) if cuda else ("cpu", torch.float32, cpu_tol)
    b, h, hkv, t, d = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, n, t, d, generator=gen).to(device, dtype) for n in (h, hkv, hkv))
    return gfa, q, k, v, reference(q.double(), k.double(), v.double(), causal=True)[0], tol


@pytest.mark.parametrize("shape", FORWARD_SHAPES)
def test_flash_attention_tma_forward_matches_float64(monkeypatch, shape):
    """The TMA-descriptor forward that `gpu_flash_attention.py --tma` times computes causal attention (odd
    lengths, GQA, a head narrower than its tile), so its timings compare equal work (TMA needs sm_90)."""
    import torch
    import triton

    from minigpt.kernels.flash_attention import BlockConfig

    if torch.cuda.is_available():
        if torch.cuda.get_device_capability() < (9, 0):
            pytest.skip("TMA tensor descriptors need compute capability 9.0")
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    gfa, q, k, v, want, tol = _forward_case(monkeypatch, shape)
    for tile in (BlockConfig(32, 16, 4, 3), BlockConfig(16, 16, 4, 3), BlockConfig(16, 32, 4, 3)):  # BLOCK_N > BLOCK_M too
        got = gfa.tma_forward(q, k, v, tile, warp_specialize=False)
        assert (got.double() - want).abs().max().item() < tol, tile


@pytest.mark.parametrize("shape", FORWARD_SHAPES)
def test_flash_attention_persistent_forward_matches_float64(monkeypatch, shape):
    """The persistent-grid forward that `gpu_flash_attention.py --persistent` times visits every (query block,
    head) tile exactly once whatever the number of programs (fewer programs than tiles, so each strides over
    several), so its timings compare equal work."""
    import torch

    from minigpt.kernels._launch import num_sms
    from minigpt.kernels.flash_attention import BlockConfig

    gfa, q, k, v, want, tol = _forward_case(monkeypatch, shape)
    b, h, t = q.shape[0], q.shape[1], q.shape[2]
    # one program per SM (4 in the interpreter): with 16-query tiles there are more tiles than programs
    assert q.is_cuda or -(-t // 16) * b * h > num_sms(torch.device("cpu"))
    for tile in (BlockConfig(32, 16, 4, 3), BlockConfig(16, 16, 4, 3)):
        got = gfa.persistent_forward(q, k, v, tile, per_sm=1)
        assert (got.double() - want).abs().max().item() < tol, tile


@pytest.mark.parametrize("shape", FORWARD_SHAPES)
def test_flash_attention_exp2_poly_forward_matches_float64(monkeypatch, shape):
    """The forward that `gpu_flash_attention.py --exp2-poly` times, half of whose exponentials come from a
    degree-3 polynomial, is causal attention to within the polynomial's 8e-5 (fp32 in the interpreter), so
    its timings compare equal work."""
    from minigpt.kernels.flash_attention import BlockConfig

    gfa, q, k, v, want, tol = _forward_case(monkeypatch, shape, cpu_tol=5e-4)
    for tile in (BlockConfig(32, 16, 4, 3), BlockConfig(16, 16, 4, 3)):  # several unmasked blocks per row
        got = gfa.poly_forward(q, k, v, tile)
        assert (got.double() - want).abs().max().item() < tol, tile


@pytest.mark.parametrize("shape", FORWARD_SHAPES)
def test_flash_attention_gemms_forward_is_the_causal_product_without_softmax(monkeypatch, shape):
    """The loop that `gpu_flash_attention.py --gemms-only` times does attention's two matmuls over exactly the
    causal tiles, no more: tril(Q K^T) V (scores rounded to the input dtype), against float64, at tiles with
    several unmasked blocks per row and BLOCK_N > BLOCK_M; a mask off by one key fails it."""
    from minigpt.kernels.flash_attention import BlockConfig

    gfa, q, k, v, _, tol = _forward_case(monkeypatch, shape)
    group = q.shape[1] // k.shape[1]
    kd, vd = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    s = (q.double() @ kd.transpose(-1, -2)).to(q.dtype).double().tril()  # [B, H, T, T], zero above the diagonal
    want = s @ vd
    for tile in (BlockConfig(32, 16, 4, 3), BlockConfig(16, 16, 4, 3), BlockConfig(16, 32, 4, 3)):
        got = gfa.gemms_forward(q, k, v, tile)
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err < tol, (tile, err)


@pytest.mark.parametrize("shape", FORWARD_SHAPES)
def test_flash_attention_gemms_backward_is_the_causal_products_without_softmax(monkeypatch, shape):
    """The backward that `gpu_flash_attention.py --gemms-only` times does the seven matmuls of ours over exactly
    the causal tiles: with S = Q K^T and dP = dO V^T, dQ = tril(S + dP) K, and per key/value head the sums over
    its query heads of dK = tril(dP)^T Q and dV = tril(S)^T dO, against float64; at dK/dV tiles with more keys
    than queries and the reverse, and a dQ tile with several unmasked blocks per row."""
    import torch

    from minigpt.kernels.flash_attention import BlockConfig, FlashConfig

    gfa, q, k, v, _, tol = _forward_case(monkeypatch, shape)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(q.device, q.dtype)
    group = q.shape[1] // k.shape[1]
    qd, dod = q.double(), do.double()
    kd, vd = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    s = (qd @ kd.transpose(-1, -2)).to(q.dtype).double().tril()     # [B, H, T, T]
    dp = (dod @ vd.transpose(-1, -2)).to(q.dtype).double().tril()
    want = {"dq": (s + dp).to(q.dtype).double() @ kd,
            "dk": (dp.transpose(-1, -2) @ qd).unflatten(1, (-1, group)).sum(2),
            "dv": (s.transpose(-1, -2) @ dod).unflatten(1, (-1, group)).sum(2)}
    for dkdv in (BlockConfig(16, 32, 4, 3), BlockConfig(32, 16, 4, 3)):
        cfg = FlashConfig(fwd=BlockConfig(32, 16, 4, 3), dkdv=dkdv, dq=BlockConfig(32, 16, 4, 3))
        for name, got in zip(("dq", "dk", "dv"), gfa.gemms_backward(q, k, v, do, cfg), strict=True):
            err = (got.double() - want[name]).abs().max().item() / want[name].abs().max().item()
            assert err < tol, (dkdv, name, err)


def test_pass_ms_times_the_forward_without_autograd_and_the_backward_with_the_given_gradient(monkeypatch):
    """`pass_ms`, which the --backward, --gemms-only and --flex rows time every SDPA and FlexAttention pass
    with: the forward replay records no autograd graph, the forward+backward one sends ``do`` back into
    the leaves and resets their gradients. A fake graph timer runs each call once and returns its order."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_flash_attention as gfa

    calls = []

    def fake_time_graph(fn, grad_to_none=()):
        for t in grad_to_none:
            t.grad = None
        out = fn()
        calls.append((torch.is_grad_enabled(), out, list(grad_to_none)))
        return float(len(calls))

    monkeypatch.setattr(gfa.measure, "time_graph", fake_time_graph)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    do = torch.tensor([3.0, -1.0])
    times = gfa.pass_ms(lambda: x * x, do, [x])
    assert times == {"fwd_ms": 1.0, "fwd_bwd_ms": 2.0}
    (fwd_grad, fwd_out, _), (_, _, leaves) = calls
    assert not fwd_grad and not fwd_out.requires_grad and leaves == [x]
    assert x.grad.tolist() == [6.0, -4.0]  # d(x^2)/dx * do


def test_a_forward_variant_that_disagrees_with_ours_stops_the_run(monkeypatch):
    """The script's variants are timed only after `agreement` checks them against our forward: relative error
    to our largest value, 1e-2 at most (beyond it a variant is wrong, not rounded differently)."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_flash_attention as gfa

    want = torch.tensor([[2.0, -4.0], [1.0, 0.5]])
    assert gfa.agreement(want + 0.02, want, "x") == pytest.approx(0.005)
    with pytest.raises(RuntimeError, match=r"medium: poly-exp2 forward \(64, 64\) disagrees with ours by 0\.0125"):
        gfa.agreement(want + torch.tensor([[0.0, 0.05], [0.0, 0.0]]), want, "medium: poly-exp2 forward (64, 64)")


@pytest.mark.parametrize(("t", "block_m", "block_n"), [(1024, 64, 64), (1024, 64, 128), (384, 64, 128), (256, 128, 64)])
def test_one_pass_adds_bytes_count_every_step(monkeypatch, t, block_m, block_n):
    """`dq_reduce_bytes`, the bytes of fp32 partials the one-pass backward adds (its TB/s column), against the
    causal tiles counted one by one: a step per (key block, query block) pair where a query of the block sees a key
    of the key block, and per query head of the group."""
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import gpu_flash_attention as gfa

    steps = sum(any(q >= kk for q in range(m, m + block_m) for kk in range(n, n + block_n))
                for n in range(0, t, block_n) for m in range(0, t, block_m))
    assert gfa.dq_reduce_bytes(2, 3, 4, t, 64, block_m, block_n) == 2 * 3 * 4 * steps * block_m * 64 * 4


@pytest.mark.parametrize(("args", "message"), [
    (["--variants", "atomics"], "add --gluon-one-pass"),
    (["--gluon-one-pass", "--dims", "40", "64"], "heads of 64 and 128"),
])
def test_flash_attention_script_refuses_one_pass_flags_it_cannot_honour(args, message):
    """--variants without --gluon-one-pass, or --gluon-one-pass at a head size the Gluon kernels do not take:
    one line from the parser (exit 2), before anything runs, not a silent or empty run."""
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_flash_attention.py"), *args], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
