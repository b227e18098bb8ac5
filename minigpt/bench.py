"""Kernel benchmark: `python -m minigpt bench kernels [--ops ...] [--quick] [--out FILE]`.

Every op is timed in one process on one card against its peers: our Triton kernel, eager
PyTorch (the library's reference code), `torch.compile` of that same eager code, Liger-Kernel
where it has the op (skipped if not installed), and for attention PyTorch SDPA with each of its
backends. Each record is the median of `triton.testing.do_bench`, which flushes the L2 cache
(by writing a 256 MB buffer) before every repetition, so inputs are always read from HBM.

Bandwidth-bound ops report GB/s computed from the *minimal* bytes the op must move (the same
count for every implementation, so GB/s ratios are speed ratios); attention and the fused linear
cross-entropy report TFLOP/s. The card's own ceilings (device copy GB/s, 8192^3 matmul TFLOP/s)
are measured in the same run. Results: `results/kernels.json` and a plot `kernels_<op>.png` per
op beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from minigpt import runtime

OPS = ("rms_norm", "swiglu", "rope", "cross_entropy", "attention", "fused_linear_cross_entropy")
PASSES = ("fwd", "fwd+bwd")


@dataclass
class Case:
    """One op at one shape: how to build its inputs and what each pass costs."""

    op: str
    shape: dict
    make: Callable[[], tuple]  # -> (inputs, upstream gradient(s) or None for a scalar loss)
    impls: dict[str, Callable]
    bytes: dict[str, float] = field(default_factory=dict)  # pass -> minimal bytes moved
    flops: dict[str, float] = field(default_factory=dict)  # pass -> floating-point operations


# ---------------------------------------------------------------------------- peers and grid
def _liger() -> dict[str, Callable]:
    """Liger-Kernel's functional ops, or {} when it is not installed."""
    try:
        from liger_kernel.transformers import functional as lf
    except ImportError:
        return {}
    return {
        "rms_norm": lambda x, w: lf.liger_rms_norm(x, w, 1e-6),
        "swiglu": lf.liger_swiglu,
        # Liger takes q, k as [B, H, T, D] views of [B, T, H, D] storage and returns the same layout.
        "rope": lambda q, k, cos2, sin2: tuple(
            o.transpose(1, 2) for o in lf.liger_rope(q.transpose(1, 2), k.transpose(1, 2), cos2, sin2)
        ),
        "cross_entropy": lf.liger_cross_entropy,
        "fused_linear_cross_entropy": lf.liger_fused_linear_cross_entropy,
    }


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _attention_shapes(seqs: list[int], head_dims: list[int], tokens: int, heads: int) -> list[tuple]:
    """(B, H, T, D) with B * T = tokens, so every sequence length does similar work per token."""
    return [(max(1, tokens // t), heads, t, d) for d in head_dims for t in seqs]


# Sizes per op. "smoke" is a CPU-sized grid for testing the benchmark pipeline itself.
GRIDS = {
    "full": {
        "rms_norm": [(16384, d) for d in (384, 1024, 2048, 4096, 8192)] + [(65536, 4096)],  # (rows, hidden)
        "swiglu": [(16384, f) for f in (1024, 2816, 5632, 11008)],  # (rows, ffn)
        "rope": [(8, 2048, 12, 64), (8, 2048, 32, 128), (4, 4096, 32, 128)],  # (B, T, H, D)
        "cross_entropy": [(4096, 20000), (4096, 128256), (16384, 20000), (16384, 32000), (16384, 128256)],  # (N, V)
        "fused_linear_cross_entropy": [(16384, 2048, 32000), (16384, 2048, 128256)],  # (N, dim, V)
        "attention": _attention_shapes([512, 1024, 2048, 4096, 8192, 16384], [64, 128], 16384, 16),  # (B, H, T, D)
    },
    "quick": {
        "rms_norm": [(4096, 2048)],
        "swiglu": [(4096, 2816)],
        "rope": [(2, 1024, 12, 64)],
        "cross_entropy": [(4096, 20000)],
        "fused_linear_cross_entropy": [(4096, 1024, 32000)],
        "attention": _attention_shapes([1024], [64], 16384, 16),
    },
    "smoke": {
        "rms_norm": [(5, 48)],
        "swiglu": [(5, 40)],
        "rope": [(1, 4, 2, 8)],
        "cross_entropy": [(3, 50)],
        "fused_linear_cross_entropy": [(6, 8, 50)],
        "attention": [(1, 2, 16, 32)],
    },
}
NAIVE_ATTENTION_MAX_T = 4096  # the eager T x T score matrix beyond this costs more memory than it teaches


def build_cases(ops: list[str], grid: str, dtype: torch.dtype, device: torch.device | str = "cuda") -> list[Case]:
    """The benchmark cases of `ops` at the sizes of GRIDS[grid], inputs created on `device`."""
    from torch.nn.attention import SDPBackend

    from minigpt import kernels
    from minigpt.attention import naive_attention
    from minigpt.ffn import swiglu_reference
    from minigpt.norm import rms_norm_reference
    from minigpt.rope import apply_rope, rope_cache

    liger = _liger()
    elt = torch.empty((), dtype=dtype).element_size()
    sizes = GRIDS[grid]
    cases: list[Case] = []

    def rand(*shape: int, grad: bool = True, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)

    def labels(n: int, v: int) -> torch.Tensor:
        return torch.randint(0, v, (n,), device=device)

    def add(op, shape, make, impls, bytes_=None, flops=None):
        if op in ops:
            if op in liger and "liger" not in impls:
                impls["liger"] = liger[op]
            cases.append(Case(op, shape, make, impls, bytes_ or {}, flops or {}))

    rms_eager = lambda x, w: rms_norm_reference(x, w, 1e-6)  # noqa: E731
    rms_impls = {"triton": lambda x, w: kernels.rms_norm(x, w, 1e-6), "eager": rms_eager, "compile": _compiled(rms_eager)}
    for rows, dim in sizes["rms_norm"]:
        add("rms_norm", {"rows": rows, "hidden": dim},
            lambda rows=rows, dim=dim: ((rand(rows, dim), rand(dim)), rand(rows, dim, grad=False)),
            dict(rms_impls), {"fwd": 2 * rows * dim * elt, "fwd+bwd": 5 * rows * dim * elt})

    swi_impls = {"triton": kernels.swiglu, "eager": swiglu_reference, "compile": _compiled(swiglu_reference)}
    for rows, ffn in sizes["swiglu"]:
        add("swiglu", {"rows": rows, "ffn": ffn},
            lambda rows=rows, ffn=ffn: ((rand(rows, ffn), rand(rows, ffn)), rand(rows, ffn, grad=False)),
            dict(swi_impls), {"fwd": 3 * rows * ffn * elt, "fwd+bwd": 8 * rows * ffn * elt})

    def rope_qk(rope_fn):
        """Rotate q and k (as a model does), with the half-width tables our API takes."""
        def run(q, k, cos2, sin2):
            half = cos2.shape[-1] // 2
            return rope_fn(q, cos2[:, :half], sin2[:, :half]), rope_fn(k, cos2[:, :half], sin2[:, :half])
        return run

    rope_impls = {"triton": rope_qk(kernels.apply_rope), "eager": rope_qk(apply_rope), "compile": _compiled(rope_qk(apply_rope))}
    for b, t, h, d in sizes["rope"]:
        def make_rope(b=b, t=t, h=h, d=d):
            cos, sin = rope_cache(t, d, device=device)
            full = [torch.cat([c, c], dim=-1) for c in (cos, sin)]  # Liger takes [T, D] tables
            return (rand(b, t, h, d), rand(b, t, h, d), *full), (rand(b, t, h, d, grad=False), rand(b, t, h, d, grad=False))
        n = b * t * h * d
        add("rope", {"B": b, "T": t, "H": h, "D": d}, make_rope, dict(rope_impls), {"fwd": 4 * n * elt, "fwd+bwd": 8 * n * elt})

    ce_eager = lambda x, t: F.cross_entropy(x, t)  # noqa: E731
    ce_impls = {
        "triton": lambda x, t: kernels.cross_entropy(x, t),
        "triton_inplace": lambda x, t: kernels.cross_entropy(x, t, inplace_grad=True),
        "eager": ce_eager,
        "eager_fp32": lambda x, t: F.cross_entropy(x.float(), t),
        "compile": _compiled(ce_eager),
    }
    for n, v in sizes["cross_entropy"]:
        add("cross_entropy", {"N": n, "V": v}, lambda n=n, v=v: ((rand(n, v, scale=4), labels(n, v)), None),
            dict(ce_impls), {"fwd": n * v * elt, "fwd+bwd": 3 * n * v * elt})

    flce_impls = {"triton": kernels.fused_linear_cross_entropy, "eager": lambda h, w, t: F.cross_entropy(h @ w.t(), t)}
    for n, dim, v in sizes["fused_linear_cross_entropy"]:
        add("fused_linear_cross_entropy", {"N": n, "dim": dim, "V": v},
            lambda n=n, dim=dim, v=v: ((rand(n, dim), rand(v, dim, scale=dim**-0.5), labels(n, v)), None),
            dict(flce_impls), flops={"fwd": 2 * n * dim * v, "fwd+bwd": 6 * n * dim * v})

    def sdpa(backend):
        return lambda q, k, v: _sdpa_with(backend, q, k, v)

    attn_impls = {
        "triton": lambda q, k, v: kernels.flash_attention(q, k, v, causal=True),
        "sdpa_flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa_cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
        "sdpa_efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION),
    }
    for b, h, t, d in sizes["attention"]:
        impls = dict(attn_impls)
        if t <= NAIVE_ATTENTION_MAX_T:
            impls["eager"] = lambda q, k, v: naive_attention(q, k, v, causal=True)
        fwd_flops = 4 * b * h * t * t * d / 2  # causal: half the score matrix
        add("attention", {"B": b, "H": h, "T": t, "D": d},
            lambda b=b, h=h, t=t, d=d: (tuple(rand(b, h, t, d) for _ in range(3)), rand(b, h, t, d, grad=False)),
            impls, flops={"fwd": fwd_flops, "fwd+bwd": 3.5 * fwd_flops})
    return cases


def _sdpa_with(backend, q, k, v):
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# ------------------------------------------------------------------------------- measurement
def _runner(fn: Callable, inputs: tuple, grad_out, pass_: str) -> Callable[[], None]:
    """A no-argument closure running one pass; backward via autograd.grad (no .grad accumulation).

    `fn` returns a tensor or a tuple of tensors; `grad_out` matches it (None for a scalar loss).
    """
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]

    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, leaves, grad_out)
    return run


def _peak_mb(run: Callable[[], None]) -> float:
    """Peak memory (MiB) allocated by one call of `run` above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def measure_ceilings(quick: bool) -> dict:
    """The card's own limits: device-to-device copy bandwidth and bf16 matmul throughput."""
    import triton

    n = 2**27 if quick else 2**29  # 256 MiB / 1 GiB of bf16
    src = torch.empty(n, device="cuda", dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    copy_gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    del src, dst
    size = 8192
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    return {"copy_gbps": round(copy_gbps, 1), "matmul_bf16_tflops": round(2 * size**3 / ms / 1e9, 1)}


def run_cases(cases: list[Case], quick: bool, provenance: dict) -> tuple[list[dict], list[dict]]:
    """Time every (case, impl, pass); returns (records, skipped) where skipped notes failures."""
    import triton

    warmup, rep = (5, 20) if quick else (10, 50)
    records, skipped = [], []
    for case in cases:
        inputs, grad_out = case.make()
        for impl, fn in case.impls.items():
            for pass_ in PASSES:
                run = _runner(fn, inputs, grad_out, pass_)
                try:
                    run()  # compile / JIT outside the timed region
                    ms = triton.testing.do_bench(run, warmup=warmup, rep=rep, return_mode="median")
                    peak = _peak_mb(run) if pass_ == "fwd+bwd" else None
                except Exception as err:  # noqa: BLE001  (recorded in "skipped" and printed, never dropped)
                    first_line = (str(err).splitlines() or [""])[0][:200]
                    skipped.append({"op": case.op, "impl": impl, "pass": pass_, "shape": case.shape,
                                    "error": f"{type(err).__name__}: {first_line}"})
                    torch.cuda.empty_cache()
                    continue
                rec = {"op": case.op, "impl": impl, "pass": pass_, "shape": case.shape, "median_ms": round(ms, 5)}
                if pass_ in case.bytes:
                    rec["gbps"] = round(case.bytes[pass_] / ms / 1e6, 1)
                if pass_ in case.flops:
                    rec["tflops"] = round(case.flops[pass_] / ms / 1e9, 2)
                if peak is not None:
                    rec["peak_mem_mb"] = round(peak, 1)
                records.append({**rec, **provenance})
        del inputs, grad_out
        torch.cuda.empty_cache()
    return records, skipped


# ------------------------------------------------------------------------------------ targets
def _ratio(records: list[dict], op: str, pass_: str, num: str, den: str, key: str = "median_ms",
           where: Callable[[dict], bool] = lambda s: True) -> list[float]:
    """Per shape: records[den][key] / records[num][key] (a speed-up of `num` when key is time)."""
    by = {(r["impl"], json.dumps(r["shape"], sort_keys=True)): r for r in records if r["op"] == op and r["pass"] == pass_}
    out = []
    for (impl, shape), r in by.items():
        other = by.get((den, shape))
        if impl == num and other is not None and where(r["shape"]) and key in r and key in other:
            out.append(other[key] / r[key])
    return out


def compute_targets(records: list[dict], ceilings: dict) -> list[dict]:
    """The project's speed goals as measured ratios (min and max over the qualifying shapes)."""
    copy = ceilings.get("copy_gbps")
    mid_seq = lambda s: 1024 <= s["T"] <= 8192  # noqa: E731
    specs = [
        ("RMSNorm fwd / copy bandwidth (hidden >= 2048)", 0.85,
         [r["gbps"] / copy for r in records if copy and r["op"] == "rms_norm" and r["impl"] == "triton"
          and r["pass"] == "fwd" and r["shape"]["hidden"] >= 2048]),
        ("RMSNorm fwd speed-up vs Liger", 1.0, _ratio(records, "rms_norm", "fwd", "triton", "liger")),
        ("RMSNorm fwd+bwd speed-up vs torch.compile", 1.0, _ratio(records, "rms_norm", "fwd+bwd", "triton", "compile")),
        ("SwiGLU fwd speed-up vs eager", 2.5, _ratio(records, "swiglu", "fwd", "triton", "eager")),
        ("RoPE fwd+bwd speed-up vs eager", 3.0, _ratio(records, "rope", "fwd+bwd", "triton", "eager")),
        ("Cross-entropy fwd+bwd speed-up vs eager", 2.0, _ratio(records, "cross_entropy", "fwd+bwd", "triton", "eager")),
        ("Cross-entropy peak memory / eager's (V=20000; lower is better)", 0.5,
         [1 / x for x in _ratio(records, "cross_entropy", "fwd+bwd", "triton", "eager", "peak_mem_mb", lambda s: s["V"] == 20000)]),
        ("FlashAttention fwd speed vs SDPA flash (T 1k-8k)", 0.9, _ratio(records, "attention", "fwd", "triton", "sdpa_flash", where=mid_seq)),
        ("FlashAttention fwd+bwd speed vs SDPA flash (T 1k-8k)", 0.7, _ratio(records, "attention", "fwd+bwd", "triton", "sdpa_flash", where=mid_seq)),
    ]
    targets = []
    for name, goal, ratios in specs:
        if not ratios:
            continue
        lower_is_better = "lower is better" in name
        worst = max(ratios) if lower_is_better else min(ratios)
        targets.append({
            "target": name, "goal": goal, "min": round(min(ratios), 3), "max": round(max(ratios), 3),
            "n_shapes": len(ratios), "met": bool(worst <= goal if lower_is_better else worst >= goal),
        })
    return targets


# -------------------------------------------------------------------------------- reporting
def plot_op(records: list[dict], op: str, path: Path, provenance: dict) -> None:
    """One figure per op: throughput per shape, one line per implementation, fwd and fwd+bwd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in records if r["op"] == op]
    if not recs:
        return
    metric = "gbps" if "gbps" in recs[0] else "tflops"
    shapes = list(dict.fromkeys(json.dumps(r["shape"]) for r in recs))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=False)
    for ax, pass_ in zip(axes, PASSES):
        for impl in dict.fromkeys(r["impl"] for r in recs):
            pts = {json.dumps(r["shape"]): r[metric] for r in recs if r["impl"] == impl and r["pass"] == pass_}
            xs = [i for i, s in enumerate(shapes) if s in pts]
            ax.plot(xs, [pts[shapes[i]] for i in xs], marker="o", label=impl)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([" ".join(f"{k}={v}" for k, v in json.loads(s).items()) for s in shapes], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("GB/s" if metric == "gbps" else "TFLOP/s")
        ax.set_title(pass_)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{op}: {provenance['gpu']}, {provenance['dtype']}, torch {provenance['torch']}, triton {provenance['triton']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(records: list[dict], targets: list[dict], ceilings: dict) -> str:
    """Plain-text summary: per op and pass the median ms of each impl, then the target ratios."""
    lines = [f"ceilings: copy {ceilings.get('copy_gbps')} GB/s, bf16 matmul {ceilings.get('matmul_bf16_tflops')} TFLOP/s"]
    rows: dict[tuple, dict] = {}
    for r in records:
        rows.setdefault((r["op"], json.dumps(r["shape"]), r["pass"]), {})[r["impl"]] = r["median_ms"]
    impls = list(dict.fromkeys(r["impl"] for r in records))
    lines.append(f"{'op':<28}{'shape':<40}{'pass':<9}" + "".join(f"{i:>15}" for i in impls) + "   (ms)")
    for (op, shape, pass_), by in rows.items():
        cells = "".join(f"{by[i]:>15.4f}" if i in by else f"{'-':>15}" for i in impls)
        lines.append(f"{op:<28}{' '.join(f'{k}={v}' for k, v in json.loads(shape).items()):<40}{pass_:<9}{cells}")
    lines.append("")
    lines.append(f"{'target':<66}{'goal':>6}{'min':>8}{'max':>8}  met")
    for t in targets:
        lines.append(f"{t['target']:<66}{t['goal']:>6}{t['min']:>8}{t['max']:>8}  {'yes' if t['met'] else 'NO'}")
    return "\n".join(lines)


def _write(path: Path, ceilings: dict, prov: dict, records: list[dict], skipped: list[dict], wall_s: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"ceilings": {**ceilings, **prov}, "targets": compute_targets(records, ceilings),
               "records": records, "skipped": skipped, "wall_s": round(wall_s, 1)}
    path.write_text(json.dumps(payload, indent=1))


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minigpt bench", description=__doc__.splitlines()[0])
    parser.add_argument("suite", choices=["kernels", "serve"], help="what to benchmark (serve: python -m minigpt bench serve --help)")
    parser.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--quick", action="store_true", help="one small size per op: a fast smoke check")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON results file; plots go beside it (default results/kernels.json, none with --quick)")
    args = parser.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in OPS]
    if unknown or not args.ops:
        parser.error(f"unknown op(s) {unknown or args.ops}; choose from {','.join(OPS)}")
    if args.out is None and not args.quick:
        args.out = Path("results/kernels.json")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the kernel benchmark; returns a process exit code (2 when there is no CUDA GPU)."""
    if argv and argv[0] == "serve":  # the serving benchmark has its own flags (minigpt/bench_serve.py)
        from minigpt.bench_serve import main as serve_main

        return serve_main(argv[1:])
    args = _parse(argv)
    if not torch.cuda.is_available():
        print("error: `bench kernels` needs a CUDA GPU: Triton's CPU interpreter cannot time kernels "
              "(run it on a GPU machine, e.g. scripts/gpu_kernels.sh)", file=sys.stderr)
        return 2
    for name in ("recompile_limit", "cache_size_limit"):  # one compiled graph per shape and pass
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    prov = {**{k: v for k, v in runtime.provenance().items() if k in ("gpu", "dtype", "torch", "triton")},
            "commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    start = time.time()
    ceilings = measure_ceilings(args.quick)
    records, skipped = [], []
    for op in args.ops:
        t0 = time.time()
        recs, skips = run_cases(build_cases([op], "quick" if args.quick else "full", runtime.dtype()), args.quick, prov)
        records += recs
        skipped += skips
        print(f"[bench] {op}: {len(recs)} records, {len(skips)} skipped, {time.time() - t0:.1f} s", flush=True)
        if args.out is not None:  # after every op, so a run cut short still leaves its results
            _write(args.out, ceilings, prov, records, skipped, time.time() - start)
            plot_op(records, op, args.out.parent / f"{args.out.stem}_{op}.png", prov)
    targets = compute_targets(records, ceilings)
    for s in skipped:
        print(f"[bench] skipped {s['op']} {s['impl']} {s['pass']} {s['shape']}: {s['error']}")
    print(summary_table(records, targets, ceilings))
    return 0
