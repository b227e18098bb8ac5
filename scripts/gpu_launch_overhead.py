"""Where does an elementwise kernel's time go at mid-size shapes: the kernel, or the Python around it?

RMSNorm forward. For x [16384, D] bf16 it times, with triton.testing.do_bench (medians), each layer of the call:

    copy       y.copy_(x): the same bytes moved, the bandwidth ceiling at this size
    kernel     the forward Triton kernel launched directly, with the launcher's tiles
    launcher   rms_norm_forward: + the output allocations
    function   minigpt.kernels.rms_norm without grad: + input checks and reshapes
    autograd   the same with x requiring grad: + autograd.Function bookkeeping
    graph      the function replayed from a CUDA graph (minigpt.measure.time_graph): GPU time alone

and the CPU cost of one call of each layer: 2000 back-to-back calls on a 1-row input (so the GPU
is idle and the host is the bottleneck), wall time / 2000. When that cost exceeds the kernel's
GPU time, a timing loop measures Python, not the kernel.

RoPE forward, at the benchmark's shapes (q and k rotated, as a model does): q and k in one launch
(`apply_rope_qk`) against two launches (`apply_rope` twice), each called and replayed from a CUDA graph.

    python scripts/gpu_launch_overhead.py --out results/     # writes launch_overhead.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from minigpt import measure, runtime
from minigpt.kernels import rms_norm as kernel_module
from minigpt.kernels.rms_norm import rms_norm
from minigpt.kernels.rope import apply_rope, apply_rope_qk
from minigpt.rope import rope_cache

ROWS, EPS = 16384, 1e-6
ROPE_SHAPES = [(8, 2048, 12, 64), (8, 2048, 32, 128), (4, 4096, 32, 128)]  # (B, T, H, D), as in minigpt.bench
LAYERS = ("copy", "kernel", "launcher", "function", "autograd", "graph")


def callables(x: torch.Tensor, w: torch.Tensor) -> dict:
    """One zero-argument callable per layer (the CUDA graph is captured here)."""
    n_rows, n_cols = x.shape
    y, rstd = torch.empty_like(x), torch.empty(n_rows, device=x.device)
    block_m, block_n, num_warps = kernel_module._blocks(n_cols)
    xg = x.detach().clone().requires_grad_()

    def kernel():
        kernel_module._rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_m),)](
            x, w, y, rstd, n_rows, n_cols, x.stride(0), y.stride(0), EPS,
            ACC=kernel_module.acc_dtype(x), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
        )

    def function():
        with torch.no_grad():
            return rms_norm(x, w, EPS)

    return {
        "copy": lambda: y.copy_(x),
        "kernel": kernel,
        "launcher": lambda: kernel_module.rms_norm_forward(x, w, EPS),
        "function": function,
        "autograd": lambda: rms_norm(xg, w, EPS),
        "graph": function,  # timed by measure.time_graph: the same call, replayed from a CUDA graph
    }


def time_layer(layer: str, fn) -> float:
    return measure.time_graph(fn) if layer == "graph" else do_bench(fn)


def rope_row(b: int, t: int, h: int, d: int, dtype: torch.dtype) -> dict:
    """GB/s (minimal bytes: read and write q and k) of RoPE in one launch and in two, called and graphed."""
    q, k = (torch.randn(b, t, h, d, device="cuda", dtype=dtype) for _ in range(2))
    cos, sin = rope_cache(t, d, device="cuda")
    out = torch.empty_like(q)

    def one_launch():
        with torch.no_grad():
            return apply_rope_qk(q, k, cos, sin)

    def two_launches():
        with torch.no_grad():
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    ms = {"copy": measure.time_graph(lambda: (out.copy_(q), out.copy_(k))),
          "one_launch": do_bench(one_launch), "one_launch_graph": measure.time_graph(one_launch),
          "two_launches": do_bench(two_launches), "two_launches_graph": measure.time_graph(two_launches)}
    n_bytes = 4 * q.numel() * q.element_size()
    return {"B": b, "T": t, "H": h, "D": d, "bytes": n_bytes, "ms": ms, "gbps": {n: n_bytes / v / 1e6 for n, v in ms.items()}}


def cpu_us_per_call(fn, calls: int = 2000) -> float:
    """Host time of one call when the GPU work is negligible: back-to-back calls, one sync at the end."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[384, 1024, 2048, 4096, 8192], help="row widths D")
    parser.add_argument("--out", type=Path, default=None, help="folder for launch_overhead.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_launch_overhead.py needs a CUDA GPU")
    dtype = torch.bfloat16
    print(runtime.describe(), flush=True)

    tiny = callables(torch.randn(1, 384, device="cuda", dtype=dtype), torch.randn(384, device="cuda", dtype=dtype))
    cpu_us = {layer: cpu_us_per_call(fn) for layer, fn in tiny.items()}

    rows = []
    for hidden in args.hidden:
        x = torch.randn(ROWS, hidden, device="cuda", dtype=dtype)
        w = torch.randn(hidden, device="cuda", dtype=dtype)
        fns = callables(x, w)
        ms = {layer: time_layer(layer, fns[layer]) for layer in LAYERS}
        n_bytes = 2 * x.numel() * x.element_size()  # read x, write y (the weight and rstd are negligible)
        rows.append({"rows": ROWS, "hidden": hidden, "bytes": n_bytes, "ms": ms,
                     "gbps": {layer: n_bytes / t / 1e6 for layer, t in ms.items()}})
        del x, w, fns

    rope = [rope_row(*shape, dtype) for shape in ROPE_SHAPES]

    result = {"provenance": measure.provenance(), "dtype": str(dtype), "cpu_us_per_call": cpu_us, "rows": rows, "rope": rope}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "launch_overhead.json").write_text(json.dumps(result, indent=1))

    print("\nCPU cost of one call (1-row input, GPU idle): " + ", ".join(f"{k} {v:.1f} us" for k, v in cpu_us.items()))
    print(f"RMSNorm forward, x [{ROWS}, D] {dtype}: GB/s of the minimal bytes (read x, write y)")
    print(f"{'D':>5} | " + " ".join(f"{layer:>9}" for layer in LAYERS) + " | graph us")
    for r in rows:
        print(f"{r['hidden']:>5} | " + " ".join(f"{r['gbps'][layer]:9.0f}" for layer in LAYERS) + f" | {r['ms']['graph'] * 1e3:8.1f}")
    print("RoPE forward on q and k, GB/s of the minimal bytes (copy = graphed copy of q and k)")
    for r in rope:
        g = r["gbps"]
        print(f"  B={r['B']} T={r['T']} H={r['H']} D={r['D']}: copy {g['copy']:.0f} | one launch {g['one_launch']:.0f}, "
              f"graph {g['one_launch_graph']:.0f} | two launches {g['two_launches']:.0f}, graph {g['two_launches_graph']:.0f}")


if __name__ == "__main__":
    main()
