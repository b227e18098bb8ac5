"""Where a compiled training step spends its time, with and without the book's Triton kernels.

For one preset (compiled, bf16 autocast, fused AdamW, random tokens, as `bench kernels --train`):
- step time of ``kernels="torch"``, ``kernels="triton"``, and ``"triton"`` with one component at a
  time put back to PyTorch (RMSNorm, RoPE, SwiGLU, attention, LM loss): which kernel costs what;
- a `torch.profiler` table of the GPU kernels of three steps for "torch" and "triton": total GPU
  time per kernel, so the difference has names.

    python scripts/gpu_profile_train.py --preset small --out $OUT/profile.json     # needs a GPU
    python scripts/gpu_profile_train.py --preset medium --ablations attention --out $OUT/profile_medium.json
    python scripts/gpu_profile_train.py --diagnose          # graph breaks, and two candidate fixes timed
    TORCH_LOGS=output_code python scripts/gpu_profile_train.py --host --out $OUT/host 2> $OUT/host/code.log

``--host`` asks where the host time of the compiled step goes, for "torch" and "triton": wall and
enqueue time per step (enqueue = the host's share while the GPU queue does not fill), the time
with the garbage collector's generations frozen, the step as CUDA-graph replays
(``mode="reduce-overhead"``: the GPU's share alone), the host cost of one op call compiled alone,
and the Python functions of five steps by own time (cProfile, one text file per variant).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from gpu_train_common import kernel_table

from minigpt import bench, measure
from minigpt.config import ModelConfig
from minigpt.model import MiniGPT

ABLATIONS = ("rms_norm", "rope", "swiglu", "attention", "lm_loss")


def put_back(model: MiniGPT, component: str) -> None:
    """Swap one component of a kernels="triton" model back to its PyTorch reference."""
    if component not in ABLATIONS:
        raise ValueError(f"unknown component {component!r}; choose one of {', '.join(ABLATIONS)}")
    from minigpt import ffn, norm
    if component == "lm_loss":
        model.ops.triton = False
        return
    if component == "attention":
        return bench.sdpa_attention(model)
    for m in model.modules():
        ops = getattr(m, "ops", None)
        if ops is None:
            continue
        if component == "rms_norm":
            ops.rms_norm, ops._add_rms_norm = norm.rms_norm_reference, norm.add_rms_norm_reference
        elif component == "swiglu":
            ops.swiglu = ffn.swiglu_reference
        elif component == "rope":
            ops.rope_qk = ops._rope_qk_reference


def make_step(preset: str, kernels: str, without: str | None, batch: int, seq_len: int, vocab: int,
              compile_mode: str | None = None):
    """`bench.train_step` of a compiled ``preset`` in bf16 on CUDA, with ``without`` put back to PyTorch."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, vocab_size=vocab, max_seq_len=seq_len, kernels=kernels)
    edit = (lambda model: put_back(model, without)) if without else None
    return bench.train_step(cfg, True, "cuda", torch.bfloat16, batch, seq_len, edit=edit, compile_mode=compile_mode)


def step_ms(step, steps: int = 10) -> float:
    return 1e3 * bench.seconds_per_step(step, steps)


def diagnose(args) -> None:
    """Graph breaks of the compiled kernels="triton" model (torch._dynamo.explain), then the step time
    with the launchers' input checks skipped and with the fused linear CE in at most 4 chunks."""
    from minigpt.kernels import flash_attention as fa
    from minigpt.kernels import fused_linear_cross_entropy as flce
    from minigpt.kernels import rms_norm, rope, swiglu
    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, vocab_size=args.vocab, max_seq_len=args.seq_len, kernels="triton")
    model = MiniGPT(cfg).cuda()
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len)).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ex = torch._dynamo.explain(model)(x, x)
    print(f"graphs {ex.graph_count}, graph breaks {ex.graph_break_count}")
    for r in ex.break_reasons[:6]:
        print("  break:", str(r.reason)[:300], "|", r.user_stack[-1] if r.user_stack else "")
    del model

    def timed(label: str) -> None:
        ms = step_ms(make_step(args.preset, "triton", None, args.batch, args.seq_len, args.vocab))
        print(f"{label:40s} {ms:8.2f} ms/step")

    timed("triton")
    noop = lambda *a, **k: None
    for mod, name in ((fa, "_check_inputs"), (rms_norm, "_check"), (rope, "_check_qk"), (swiglu, "_check"), (flce, "_check")):
        setattr(mod, name, noop)
    timed("triton, checks skipped")
    old = flce.chunk_rows
    flce.chunk_rows = lambda n, v, d: max(old(n, v, d), -(-n // 4))
    timed("triton, checks skipped, CE in <= 4 chunks")


def enqueue_ms(step, steps: int = 5) -> float:
    """Median host ms to issue one step that starts on an idle GPU: the host's share of a step whose
    launches fit in the GPU's queue (a hidden host sync would make it the whole step)."""
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    return statistics.median(times)


def op_host_us(calls: int = 200) -> dict:
    """Host microseconds per call of one compiled RMSNorm forward+backward on a small [64, 384]
    input (the GPU is idle most of the time), Triton op vs Inductor's own kernel."""
    from minigpt.ops import Ops
    res = {}
    for kernels in ("torch", "triton"):
        fn = Ops(kernels).rms_norm
        compiled = torch.compile(lambda x, w: fn(x, w, 1e-5).sum())  # noqa: B023  (compiled before the next loop turn)
        x = torch.randn(64, 384, device="cuda", requires_grad=True)
        w = torch.ones(384, device="cuda", requires_grad=True)
        for _ in range(3):
            compiled(x, w).backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            compiled(x, w).backward()
        torch.cuda.synchronize()
        res[kernels] = round(1e6 * (time.perf_counter() - t0) / calls, 1)
        torch._dynamo.reset()
    return res


def host(args) -> None:
    """The --host report (see the module docstring); JSON and cProfile texts in ``args.out``."""
    import cProfile
    import gc
    import io
    import pstats
    args.out.mkdir(parents=True, exist_ok=True)
    res: dict = {"provenance": measure.provenance(), "preset": args.preset, "vocab": args.vocab, "batch": args.batch,
                 "seq_len": args.seq_len, "op_host_us": op_host_us()}
    print("RMSNorm fwd+bwd compiled alone, host us/call:", res["op_host_us"], flush=True)
    for kernels in ("torch", "triton"):
        counters = torch._dynamo.utils.counters
        counters.clear()
        step = make_step(args.preset, kernels, None, args.batch, args.seq_len, args.vocab)
        row = {"step_ms": round(step_ms(step), 2), "enqueue_ms": round(enqueue_ms(step), 2),
               "graphs": dict(counters["stats"]), "graph_breaks": dict(counters["graph_break"])}
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
        (args.out / f"cprofile_{kernels}.txt").write_text(text.getvalue())
        gc.collect()
        gc.freeze()
        row["step_ms_gc_frozen"] = round(step_ms(step), 2)
        gc.unfreeze()
        del step
        torch.cuda.empty_cache()
        graphed = make_step(args.preset, kernels, None, args.batch, args.seq_len, args.vocab, "reduce-overhead")
        row["step_ms_cuda_graphs"] = round(step_ms(graphed), 2)
        row["enqueue_ms_cuda_graphs"] = round(enqueue_ms(graphed), 2)
        del graphed
        torch.cuda.empty_cache()
        res[kernels] = row
        print(kernels, row, flush=True)
        (args.out / "host.json").write_text(json.dumps(res, indent=1))
    print(f"\n{'':26s} {'torch':>8s} {'triton':>8s}")
    for key in ("step_ms", "enqueue_ms", "step_ms_gc_frozen", "step_ms_cuda_graphs", "enqueue_ms_cuda_graphs"):
        print(f"{key:26s} {res['torch'][key]:8.2f} {res['triton'][key]:8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--out", type=Path, default=Path("/tmp/profile_train.json"))
    p.add_argument("--diagnose", action="store_true", help="graph breaks and two candidate fixes, timed")
    p.add_argument("--host", action="store_true", help="where the host time of a step goes (--out: a folder)")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help=f"components put back one at a time ('' for none; of {', '.join(ABLATIONS)})")
    args = p.parse_args()
    ablations = [c for c in args.ablations.split(",") if c]
    unknown = sorted(set(ablations) - set(ABLATIONS))
    if unknown:
        p.error(f"unknown --ablations {', '.join(unknown)}: choose from {', '.join(ABLATIONS)}")
    if args.diagnose:
        return diagnose(args)
    if args.host:
        return host(args)
    torch._dynamo.config.cache_size_limit = 64
    res = {"provenance": measure.provenance(), "preset": args.preset, "vocab": args.vocab, "batch": args.batch, "seq_len": args.seq_len,
           "step_ms": {}, "kernels": {}}
    variants = [("torch", "torch", None), ("triton", "triton", None)] + [(f"triton - {c}", "triton", c) for c in ablations]
    for name, kernels, without in variants:
        step = make_step(args.preset, kernels, without, args.batch, args.seq_len, args.vocab)
        res["step_ms"][name] = round(step_ms(step), 2)
        print(f"{name:24s} {res['step_ms'][name]:8.2f} ms/step", flush=True)
        if without is None:
            res["kernels"][name] = kernel_table(step, top=40)
        del step
        torch.cuda.empty_cache()
        args.out.write_text(json.dumps(res, indent=1))
    for name, rows in res["kernels"].items():
        print(f"\n{name}: GPU ms per step, calls per step")
        for kname, ms, n in rows:
            print(f"  {ms:8.3f} {n:5d}  {kname}")


if __name__ == "__main__":
    main()
