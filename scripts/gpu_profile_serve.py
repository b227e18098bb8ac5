"""Where a serving step's time goes: each phase of every engine step, on the host and on the GPU.

It found why continuous batching once lost to the article's dynamic batching on `bench serve`'s
512-request trace: a step that carried a prompt chunk ran it in an eager pass, host-bound at about
30 ms (`results/serve/serve_steps_eager_prefill.json`); such steps are now graph replays
(`results/serve/serve_steps.json`). With ``--scheduler dynamic`` it found dynamic batching's eager
prefill waiting on cuDNN's per-length SDPA plans (`results/serve/serve_steps_dynamic_cudnn.json`).
It runs the trace (the `small` preset, random weights, bf16, warmed up as `bench serve` warms up)
and times the phases of every step:

- host ms of the scheduler (``Scheduler.schedule``), input packing (``Engine._prepare``), the
  graph replay (``ModelRunner._replay``), the eager pass over prompt chunks of longer steps
  (``ModelRunner._forward``) and sampling (``Engine._sample``, which waits for the GPU to finish);
- GPU ms of the replay and of the eager pass (CUDA events around each);

and prints the medians for decode-only steps and for steps with a prefill chunk, so the extra
cost of a mixed step has a name. A phase nested in another (the eager pass inside a replay that
cannot use a graph) counts for the outer one only.

    python scripts/gpu_profile_serve.py --out $OUT/serve_steps.json     # needs a GPU
    python scripts/gpu_profile_serve.py --scheduler dynamic --top-kernels 15 --out $OUT/serve_steps_dynamic.json
    python scripts/gpu_profile_serve.py --smoke --out /tmp/steps.json    # CPU: tiny model, host times only
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from gpu_train_common import fmt, kernel_table, print_table, write_json

from minigpt import bench_serve, measure, runtime
from minigpt.serve import Engine, SamplingParams

PHASES = {  # phase -> (object attribute that holds it, method name, timed on the GPU too?)
    "schedule": ("scheduler", "schedule", False),
    "prepare": ("engine", "_prepare", False),
    "replay": ("runner", "_replay", True),
    "eager pass": ("runner", "_forward", True),
    "sample": ("engine", "_sample", False),
}


class StepClock:
    """Wraps an engine's ``step`` and its phases with timers. ``steps``: one dict per ``engine.step()``
    with its decode rows, prefill tokens, wall ms, host ms per phase and (on CUDA, after ``finish``)
    GPU ms per phase. Whatever drives the engine (`bench_serve.trace_engine`) is timed as it runs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        self.steps: list[dict[str, Any]] = []
        self._host: dict[str, float] = {}
        self._events: list[tuple[int, str, Any, Any]] = []  # (step index, phase, start, end)
        self._depth = 0
        owners = {"engine": engine, "scheduler": engine.scheduler, "runner": engine.runner}
        for phase, (owner, name, gpu) in PHASES.items():
            obj = owners[owner]
            setattr(obj, name, self._timed(getattr(obj, name), phase, gpu and self.cuda))  # shadows the method
        engine_step = engine.step

        def step():
            self._host = {}
            t0 = time.perf_counter()
            outputs = engine_step()
            wall = 1e3 * (time.perf_counter() - t0)
            decodes, prefill = engine.last_step
            self.steps.append({"decode_rows": decodes, "prefill_tokens": prefill, "wall_ms": wall, "host_ms": self._host,
                               "gpu_ms": {}})
            return outputs
        engine.step = step  # type: ignore[method-assign]

    def _timed(self, fn, phase: str, gpu: bool):
        def timed(*args, **kwargs):
            if self._depth:  # nested in a timed phase: the outer phase holds this time
                return fn(*args, **kwargs)
            self._depth += 1
            start = end = None
            if gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._host[phase] = self._host.get(phase, 0.0) + 1e3 * (time.perf_counter() - t0)
                if gpu:
                    end.record()
                    self._events.append((len(self.steps), phase, start, end))
                self._depth -= 1
        return timed

    def finish(self) -> None:
        """Read the CUDA events (after a synchronize) into each step's ``gpu_ms``."""
        if self.cuda:
            torch.cuda.synchronize()
        for i, phase, start, end in self._events:
            gpu = self.steps[i]["gpu_ms"]
            gpu[phase] = gpu.get(phase, 0.0) + start.elapsed_time(end)
        self._events = []


def top_kernels(engine: Engine, prompts: list[list[int]], k: int) -> list[dict[str, Any]]:
    """The ``k`` kernels with the most GPU time in the step that prefills ``prompts`` (queued together on
    an idle engine, 2 new tokens each; `gpu_train_common.kernel_table`), then the engine run to completion."""
    for p in prompts:
        engine.add_request(p, SamplingParams(2, temperature=0))
    rows = kernel_table(engine.step, steps=1, top=k)
    while engine.has_unfinished():
        engine.step()
    return [{"name": name, "calls": calls, "gpu_ms": ms} for name, ms, calls in rows]


def summarize(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Per kind of step (decode only, with prefill): count, median wall ms, median host and GPU ms per
    phase (0 where a step did not run the phase), and the median wall time no phase accounts for."""
    out: dict[str, Any] = {}
    for kind, rows in bench_serve.by_kind(steps, lambda s: s["prefill_tokens"]).items():
        if not rows:
            out[kind] = {"steps": 0}
            continue
        med = statistics.median
        out[kind] = {
            "steps": len(rows),
            "wall_ms": med([s["wall_ms"] for s in rows]),
            "mean_decode_rows": statistics.fmean(s["decode_rows"] for s in rows),
            "mean_prefill_tokens": statistics.fmean(s["prefill_tokens"] for s in rows),
            "host_ms": {p: med([s["host_ms"].get(p, 0.0) for s in rows]) for p in PHASES},
            "gpu_ms": {p: med([s["gpu_ms"].get(p, 0.0) for s in rows]) for p in PHASES if PHASES[p][2]},
            "unaccounted_ms": med([s["wall_ms"] - sum(s["host_ms"].values()) for s in rows]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("results/serve/serve_steps.json"))
    p.add_argument("--smoke", action="store_true", help="CPU: tiny model and trace; the decode rows still go through _replay")
    p.add_argument("--requests", type=int, default=None, help="requests of the trace (default: bench serve's 512)")
    p.add_argument("--scheduler", choices=("continuous", "dynamic"), default="continuous", help="the engine's policy")
    p.add_argument("--top-kernels", type=int, default=0, metavar="K",
                   help="after the trace, profile the step that prefills the trace's first max_batch_size prompts "
                        "(torch.profiler) and list its K kernels with the most GPU time")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    S = bench_serve._sizes(args.smoke or dev.type == "cpu")
    name, config = next(iter(S["presets"].items()))  # small (smoke: the tiny model), as bench serve's trace
    dtype = runtime.dtype() if dev.type == "cuda" else torch.float32
    model = bench_serve._build(config, dev, dtype)
    trace = bench_serve.make_trace(args.requests or S["trace_n"], S["trace_lo"], S["trace_hi"], config.vocab_size)
    # cuda_graphs=True also on a CPU: the decode rows then take the static path (_replay, run eagerly)
    engine = bench_serve.warm_engine(model, S["max_batch_size"], args.scheduler, trace, cuda_graphs=True)
    clock = StepClock(engine)
    t0 = time.perf_counter()
    bench_serve.trace_engine(engine, trace)
    wall_s = time.perf_counter() - t0
    clock.finish()
    kinds = summarize(clock.steps)
    res = {"provenance": measure.provenance(), "model": name, "requests": len(trace), "policy": args.scheduler,
           "wall_s": wall_s, "output_tokens": sum(n for _, n in trace), "kinds": kinds}
    if args.top_kernels:
        res["prefill_step_kernels"] = top_kernels(engine, [p for p, _ in trace[:S["max_batch_size"]]], args.top_kernels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, res)
    for kind, k in kinds.items():
        if not k["steps"]:
            continue
        rows = [[phase, fmt(k["host_ms"][phase], ".2f"), fmt(k["gpu_ms"].get(phase), ".2f") if dev.type == "cuda" else "-"]
                for phase in PHASES]
        rows.append(["(no phase)", fmt(k["unaccounted_ms"], ".2f"), "-"])
        print_table(f"{kind}: {k['steps']} steps, median {k['wall_ms']:.2f} ms, {k['mean_decode_rows']:.1f} decode rows, "
                    f"{k['mean_prefill_tokens']:.0f} prefill tokens ({res['provenance']['gpu']})",
                    ["phase", "host ms (median)", "GPU ms (median)"], rows)
    if args.top_kernels:
        print_table("kernels of one prefill step, by GPU time", ["kernel", "calls", "GPU ms"],
                    [[r["name"], r["calls"], fmt(r["gpu_ms"], ".3f")] for r in res["prefill_step_kernels"]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
