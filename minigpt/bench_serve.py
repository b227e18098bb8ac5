"""Serving benchmark: `python -m minigpt bench serve [--quick] [--out DIR]` (default results/serve; smoke runs: runs/).

Two measurements, side by side in one process on one card, on models with RANDOM weights (speed
does not depend on what the weights say; greedy decoding with no stop token makes every run
produce exactly the tokens asked for):

1. Decode tokens/s at batch 1, 16, 64 for the `small` and `medium` presets: the minigpt engine
   (paged KV cache, CUDA-graph decode) vs Hugging Face `LlamaForCausalLM.generate` on the same
   weights (exported with `minigpt.hf.save_hf`), next to two floors: the engine's own CUDA-graph
   replay with no host work (what a step costs on the GPU), and the bandwidth floor (weights +
   KV cache read once per step at the card's measured copy bandwidth).
2. A fixed-seed request trace (prompt and output lengths uniform in [16, 512], all requests
   queued at t=0): total output tokens/s, time to first token (TTFT) and time per output token
   (TPOT), median and p90, for continuous batching, the article's dynamic batching (a batch runs
   until its longest request ends) and HF `generate` on padded static batches. HF runs on a
   subsample of the trace (its first requests; stated in the JSON) to bound the time, and the
   continuous engine is run on the same subsample for a like-for-like ratio.

On CPU (or with --quick) everything runs at smoke size so the pipeline is tested in CI.
Results: `OUT/serve.json`, `OUT/serve.png`; a short table is printed last.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minigpt import measure, runtime
from minigpt.cli import Parser
from minigpt.config import ModelConfig
from minigpt.model import MiniGPT
from minigpt.serve import Engine, SamplingParams

__all__ = ["main", "make_trace"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _sizes(smoke: bool) -> dict:
    if smoke:
        tiny: dict[str, Any] = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128)
        return dict(presets={"smoke": ModelConfig(**tiny)}, batches=[1, 4], prompt_len=8, new_tokens=8,
                    trace_n=12, trace_lo=4, trace_hi=24, hf_trace_n=8, max_batch_size=4, graph_reps=3)
    return dict(presets={p: ModelConfig.preset(p) for p in ("small", "medium")}, batches=[1, 16, 64], prompt_len=128,
                new_tokens=128, trace_n=512, trace_lo=16, trace_hi=512, hf_trace_n=128, max_batch_size=64, graph_reps=50)


def _build(config: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int = 0) -> MiniGPT:
    torch.manual_seed(seed)
    return MiniGPT(config).to(device=device, dtype=dtype).eval()


def _hf_model(model: MiniGPT, device: torch.device, dtype: torch.dtype):
    """The same weights as a transformers ``LlamaForCausalLM`` (via ``save_hf``); generation never stops early."""
    from transformers import LlamaForCausalLM

    from minigpt.hf import save_hf

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        hf = LlamaForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()  # type: ignore[arg-type]
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf


# ---------------------------------------------------------------------------- floors
def copy_bandwidth_gbs(device: torch.device) -> float | None:
    """Device copy bandwidth (read + write bytes / s) in GB/s from `minigpt.measure.ceilings`; None on CPU."""
    return measure.ceilings(quick=True)["copy_gbps"] if device.type == "cuda" else None


def bandwidth_floor_tokens_per_s(model: MiniGPT, batch: int, context: int, gbs: float | None) -> float | None:
    """Tokens/s if a decode step only had to read every weight once plus each row's KV cache."""
    if gbs is None:
        return None
    c = model.config
    elsize = model.tok_emb.weight.element_size()
    weights = sum(p.numel() for p in model.parameters()) * elsize  # tied embedding counted once
    assert c.n_kv_heads is not None  # resolved in ModelConfig.__post_init__
    kv = 2 * c.n_layers * batch * context * c.n_kv_heads * c.head_dim * elsize
    return batch / ((weights + kv) / (gbs * 1e9))


# ---------------------------------------------------------------------------- decode throughput
def decode_engine(engine: Engine, batch: int, prompt_len: int, new_tokens: int, graph_reps: int) -> dict:
    """Engine decode tokens/s (first step = prefill, excluded) and its CUDA-graph replay floor."""
    dev = engine.device
    g = torch.Generator().manual_seed(batch)
    V = engine.model.config.vocab_size
    for _ in range(2):  # the first pass captures the graphs
        for _ in range(batch):
            engine.add_request(torch.randint(0, V, (prompt_len,), generator=g).tolist(), SamplingParams(new_tokens, temperature=0))
        engine.step()  # prefill of every prompt, first tokens
        _sync(dev)
        t0, steps = time.perf_counter(), 0
        while engine.has_unfinished():
            engine.step()
            steps += 1
        _sync(dev)
        dt = time.perf_counter() - t0
    runner = engine.runner
    out = {"engine_tokens_per_s": batch * steps / dt, "engine_step_ms": 1e3 * dt / steps, "graph_tokens_per_s": None,
           "cuda_graphs": runner.cuda_graphs, "fused_kernels": runner.fused}
    if runner.cuda_graphs:
        bucket = next(b for b in runner.buckets if b >= batch)
        graph, _ = runner._graphs[bucket]
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(graph_reps):
            graph.replay()
        _sync(dev)
        step = (time.perf_counter() - t0) / graph_reps
        out.update(graph_tokens_per_s=batch / step, graph_step_ms=1e3 * step)
    return out


def decode_hf(hf, batch: int, prompt_len: int, new_tokens: int, device: torch.device) -> dict:
    """HF ``generate`` decode tokens/s: (tokens of a long run - a 1-token run) / the time difference
    (the 1-token run: the fastest of three)."""
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, hf.config.vocab_size, (batch, prompt_len), generator=g).to(device)
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        _sync(device)
        if out.shape[1] != prompt_len + n:
            raise RuntimeError(f"HF generate stopped early ({out.shape[1] - prompt_len} of {n} tokens)")
        return time.perf_counter() - t0

    run(2)  # warm-up
    # The fastest of three 1-token runs: a slow one (a busy host) would make the difference, and the
    # rate, too large or even negative; the long run's own noise only makes the rate look lower.
    t1 = min(run(1) for _ in range(3))
    tn = run(new_tokens)
    if tn <= t1:
        raise RuntimeError(f"HF decode timing: {new_tokens} new tokens took no longer than 1 ({tn:.4f} s vs {t1:.4f} s); "
                           "raise new_tokens")
    return {"hf_tokens_per_s": batch * (new_tokens - 1) / (tn - t1), "hf_step_ms": 1e3 * (tn - t1) / (new_tokens - 1)}


# ---------------------------------------------------------------------------- request trace
def make_trace(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """``n`` requests ``(prompt ids, output length)``, both lengths uniform in [lo, hi], fixed seed."""
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(lo, hi))], rng.randint(lo, hi)) for _ in range(n)]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def _summary(first: list[float], done: list[float], lens: list[int], wall: float) -> dict:
    tpot = [(d - f) / (n - 1) for f, d, n in zip(first, done, lens, strict=True) if n > 1]
    return {"requests": len(lens), "output_tokens": sum(lens), "wall_s": wall, "tokens_per_s": sum(lens) / wall,
            "ttft_median_s": statistics.median(first), "ttft_p90_s": _pct(first, 0.9),
            "tpot_median_ms": 1e3 * statistics.median(tpot) if tpot else None,
            "tpot_p90_ms": 1e3 * _pct(tpot, 0.9) if tpot else None}


def trace_engine(engine: Engine, trace: list[tuple[list[int], int]]) -> dict:
    """Queue every request at t=0 and step until all are done; per-request first/last token times,
    and the steps split by kind (`step_breakdown`)."""
    _sync(engine.device)
    t0 = time.perf_counter()
    ids = [engine.add_request(p, SamplingParams(n, temperature=0)) for p, n in trace]
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    count: dict[str, int] = {i: 0 for i in ids}
    steps: list[tuple[int, int, float]] = []  # (decode rows, prefill tokens, seconds) per step
    now = 0.0
    while engine.has_unfinished():
        outs = engine.step()  # returns sampled tokens to the host, so the step's GPU work is done
        before, now = now, time.perf_counter() - t0
        steps.append((*engine.last_step, now - before))
        for o in outs:
            first.setdefault(o.request_id, now)
            count[o.request_id] += len(o.new_token_ids)
            if o.finished:
                done[o.request_id] = now
    bad = [i for (_, n), i in zip(trace, ids, strict=True) if count[i] != n]
    if bad:
        raise RuntimeError(f"{len(bad)} requests got the wrong number of tokens")
    summary = _summary([first[i] for i in ids], [done[i] for i in ids], [n for _, n in trace], max(done.values()))
    return {**summary, "steps": step_breakdown(steps[1:])}  # the first step also holds adding the requests


def warm_engine(model: MiniGPT, max_batch_size: int, scheduler: str, trace: list[tuple[list[int], int]],
                cuda_graphs: bool | None = None) -> Engine:
    """An engine ready to time on `trace`: its decode graphs captured and a warm-up run of the trace's
    first ``2 * max_batch_size`` prompts (2 tokens each). Full-length prompts: Triton compiles a kernel
    variant per new shape class of the prefill (e.g. lengths divisible by 16 or not), and short
    warm-up prompts once left those compilations inside the first timed trace."""
    engine = Engine(model, max_batch_size=max_batch_size, scheduler=scheduler, cuda_graphs=cuda_graphs)
    if engine.runner.cuda_graphs:
        engine.runner.capture_all()  # graph capture stays out of the timed trace
    trace_engine(engine, [(p, 2) for p, _ in trace[:2 * max_batch_size]])
    return engine


def by_kind(steps: list, prefill_tokens: Callable[[Any], int]) -> dict[str, list]:
    """Engine steps split into "decode only" and "with prefill" (a prefill chunk beside any decodes)."""
    return {"decode only": [s for s in steps if prefill_tokens(s) == 0],
            "with prefill": [s for s in steps if prefill_tokens(s) > 0]}


def step_breakdown(steps: list[tuple[int, int, float]]) -> dict:
    """Steps of a trace by kind (`by_kind`): count, median ms, share of the wall time, mean decode rows
    and mean prefill tokens. Says where a policy's time goes."""
    out = {}
    for kind, rows in by_kind(steps, lambda s: s[1]).items():
        out[kind] = {"steps": len(rows),
                     "median_ms": 1e3 * statistics.median(r[2] for r in rows) if rows else None,
                     "share_of_time": sum(r[2] for r in rows) / max(sum(s[2] for s in steps), 1e-12),
                     "mean_decode_rows": statistics.fmean(r[0] for r in rows) if rows else None,
                     "mean_prefill_tokens": statistics.fmean(r[1] for r in rows) if rows else None}
    return out


def trace_hf(hf, trace: list[tuple[list[int], int]], batch_size: int, device: torch.device) -> dict:
    """HF ``generate`` on static batches in arrival order: prompts left-padded, each batch runs to its
    longest output; a request's tokens past its own length are wasted (not counted)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # records when each generation step's tokens come out
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    _sync(device)
    t0 = time.perf_counter()
    first, done = [], []
    for s in range(0, len(trace), batch_size):
        batch = trace[s:s + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device=device)
        clock = Clock()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=max(n for _, n in batch), do_sample=False, streamer=clock)
        steps = clock.times[1:]  # times[0] is the prompt being "put"
        first += [steps[0] - t0] * len(batch)
        done += [steps[n - 1] - t0 for _, n in batch]
    return _summary(first, done, [n for _, n in trace], max(done))


# ---------------------------------------------------------------------------- report
TRACE_POLICIES = ("continuous", "dynamic (article)", "continuous, HF subset", "HF static, HF subset")


def trace_record(model: str, n_requests: int, n_subset: int, sizes: dict, results: dict) -> dict:
    """The trace's JSON record: what was run and the ratios of whichever policies have results so far.

    ``partial`` is true until all four policies ran (a run cut short keeps what it measured)."""
    r = {k: v["tokens_per_s"] for k, v in results.items()}
    ratios = {}
    if "continuous" in r and "dynamic (article)" in r:
        ratios["continuous / dynamic"] = r["continuous"] / r["dynamic (article)"]
    if "continuous, HF subset" in r and "HF static, HF subset" in r:
        ratios["continuous / HF (same subset)"] = r["continuous, HF subset"] / r["HF static, HF subset"]
    return {"model": model, "requests": n_requests, "lengths": [sizes["trace_lo"], sizes["trace_hi"]], "hf_subset": n_subset,
            "max_batch_size": sizes["max_batch_size"], "arrival": "all requests queued at t=0", "results": results,
            "ratios": ratios, "partial": any(p not in results for p in TRACE_POLICIES)}


def _fmt(x, spec=".0f") -> str:
    return "-" if x is None else format(x, spec)


def summary_table(decode: list[dict], trace: dict) -> str:
    lines = ["decode tokens/s (random weights, greedy)",
             f"{'model':>8} {'batch':>5} {'engine':>9} {'HF':>8} {'x HF':>6} {'graph':>9} {'% graph':>7} {'bw floor':>9} {'% bw':>5}"]
    for r in decode:
        pg = None if r["graph_tokens_per_s"] is None else 100 * r["engine_tokens_per_s"] / r["graph_tokens_per_s"]
        pb = None if r["bw_floor_tokens_per_s"] is None else 100 * r["engine_tokens_per_s"] / r["bw_floor_tokens_per_s"]
        lines.append(f"{r['model']:>8} {r['batch']:>5} {r['engine_tokens_per_s']:>9.0f} {r['hf_tokens_per_s']:>8.0f} "
                     f"{r['engine_tokens_per_s'] / r['hf_tokens_per_s']:>6.1f} {_fmt(r['graph_tokens_per_s']):>9} "
                     f"{_fmt(pg, '.0f'):>7} {_fmt(r['bw_floor_tokens_per_s']):>9} {_fmt(pb, '.1f'):>5}")
    partial = " (partial: " + ", ".join(p for p in TRACE_POLICIES if p not in trace["results"]) + " not run)" if trace.get("partial") else ""
    lines += ["", f"request trace ({trace['model']}): {trace['requests']} requests, lengths {trace['lengths']}{partial}",
              f"{'policy':>22} {'reqs':>5} {'tok/s':>8} {'TTFT med':>9} {'TTFT p90':>9} {'TPOT med':>9} {'TPOT p90':>9}"]
    for name, r in trace["results"].items():
        lines.append(f"{name:>22} {r['requests']:>5} {r['tokens_per_s']:>8.0f} {r['ttft_median_s']:>8.2f}s {r['ttft_p90_s']:>8.2f}s "
                     f"{_fmt(r['tpot_median_ms'], '.2f'):>7}ms {_fmt(r['tpot_p90_ms'], '.2f'):>7}ms")
    lines.append("ratios: " + ", ".join(f"{k} {v:.1f}x" for k, v in trace["ratios"].items()))
    lines += ["", "engine steps by kind (time between step returns)",
              f"{'policy':>22} {'kind':>13} {'steps':>6} {'median':>9} {'% time':>7} {'decode rows':>11} {'prefill tok':>11}"]
    for name, r in trace["results"].items():
        for kind, k in r.get("steps", {}).items():
            lines.append(f"{name:>22} {kind:>13} {k['steps']:>6} {_fmt(k['median_ms'], '.2f'):>7}ms "
                         f"{100 * k['share_of_time']:>6.0f}% {_fmt(k['mean_decode_rows'], '.1f'):>11} "
                         f"{_fmt(k['mean_prefill_tokens'], '.0f'):>11}")
    return "\n".join(lines)


def plot(decode: list[dict], trace: dict, path: Path, prov: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in decode}, key=[r["model"] for r in decode].index)
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(5 * (len(models) + 1), 4.2))
    for ax, m in zip(axes[:-1], models, strict=True):  # the last axis is the trace
        rows = [r for r in decode if r["model"] == m]
        x = range(len(rows))
        for j, (key, label) in enumerate([("hf_tokens_per_s", "HF generate"), ("engine_tokens_per_s", "engine"),
                                          ("graph_tokens_per_s", "CUDA-graph floor"), ("bw_floor_tokens_per_s", "bandwidth floor")]):
            vals = [r[key] or 0 for r in rows]
            ax.bar([i + 0.2 * j for i in x], vals, width=0.2, label=label)
        ax.set_xticks([i + 0.3 for i in x], [str(r["batch"]) for r in rows])
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{m} (random weights)")
        ax.legend(fontsize=7)
    ax = axes[-1]
    names = list(trace["results"])
    ax.bar(names, [trace["results"][n]["tokens_per_s"] for n in names], color=["C1", "C2", "C0", "C1"][:len(names)])
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"request trace ({trace['model']})")
    ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.suptitle(f"{prov['gpu']}, {prov['dtype']}, torch {prov['torch']}, triton {prov['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(prog="python -m minigpt bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes (always on CPU): tests the pipeline, not the speed")
    p.add_argument("--out", type=Path, default=None,
                   help=f"output directory (default {PUBLISHED_OUT}; at smoke sizes {SMOKE_OUT}, so that a CPU run "
                        "never overwrites the published GPU numbers)")
    return p.parse_args(argv)


PUBLISHED_OUT, SMOKE_OUT = Path("results/serve"), Path("runs/bench_serve_smoke")


def out_dir(out: Path | None, smoke: bool) -> Path:
    """Where a run writes: ``--out`` if given, else the published results folder for a full run and a
    scratch folder (git-ignored ``runs/``) for a smoke run, whose numbers only test the pipeline."""
    return out if out is not None else SMOKE_OUT if smoke else PUBLISHED_OUT


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    smoke = args.quick or runtime.is_smoke()
    S = _sizes(smoke)
    dev, dt = runtime.device(), runtime.dtype()
    prov = {**measure.provenance(), "weights": "random (seed 0); speed does not depend on them"}
    import transformers

    prov["transformers"] = transformers.__version__
    start = time.time()
    gbs = copy_bandwidth_gbs(dev)
    decode: list[dict] = []
    trace_model: tuple[str, MiniGPT] | None = None
    out = out_dir(args.out, smoke)
    out.mkdir(parents=True, exist_ok=True)

    def write(trace_rec: dict | None) -> None:  # after every stage, so a run cut short keeps its numbers
        payload = {"provenance": prov, "copy_bandwidth_gbs": gbs, "decode": decode, "trace": trace_rec,
                   "wall_s": time.time() - start}
        (out / "serve.json").write_text(json.dumps(payload, indent=2) + "\n")

    for name, cfg in S["presets"].items():
        model = _build(cfg, dev, dt)
        trace_model = trace_model or (name, model)
        engine = Engine(model, max_batch_size=max(S["batches"]))
        hf = _hf_model(model, dev, dt)
        for B in S["batches"]:
            ctx = S["prompt_len"] + S["new_tokens"] // 2
            rec = {"model": name, "batch": B, "prompt_len": S["prompt_len"], "new_tokens": S["new_tokens"],
                   **decode_engine(engine, B, S["prompt_len"], S["new_tokens"], S["graph_reps"]),
                   **decode_hf(hf, B, S["prompt_len"], S["new_tokens"], dev),
                   "bw_floor_tokens_per_s": bandwidth_floor_tokens_per_s(model, B, ctx, gbs)}
            decode.append(rec)
            print(f"[bench serve] {name} batch {B}: engine {rec['engine_tokens_per_s']:.0f} tok/s, "
                  f"HF {rec['hf_tokens_per_s']:.0f} tok/s ({time.time() - start:.0f} s)", flush=True)
        del engine, hf
        write(None)
    assert trace_model is not None  # the loop above ran at least one preset
    name, model = trace_model
    trace = make_trace(S["trace_n"], S["trace_lo"], S["trace_hi"], model.config.vocab_size)
    sub = trace[:S["hf_trace_n"]]
    results = {}
    for label, sched, reqs in [("continuous", "continuous", trace), ("dynamic (article)", "dynamic", trace),
                               ("continuous, HF subset", "continuous", sub)]:
        engine = warm_engine(model, S["max_batch_size"], sched, trace)
        results[label] = trace_engine(engine, reqs)
        print(f"[bench serve] trace {label}: {results[label]['tokens_per_s']:.0f} tok/s ({time.time() - start:.0f} s)", flush=True)
        del engine
        write(trace_record(name, len(trace), len(sub), S, results))  # partial until HF has run
    hf = _hf_model(model, dev, dt)
    results["HF static, HF subset"] = trace_hf(hf, sub, S["max_batch_size"], dev)
    trace_rec = trace_record(name, len(trace), len(sub), S, results)
    write(trace_rec)
    plot(decode, trace_rec, out / "serve.png", prov)
    print(summary_table(decode, trace_rec))
    return 0
