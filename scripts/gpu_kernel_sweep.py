"""Launch-parameter sweep of the bandwidth-bound kernels (issue 12): which tiles keep HBM busy.

The library picks tiles with one heuristic per launcher (`rms_norm._blocks` for the forward,
`rms_norm._bwd_tiles` for the backward, `rope._num_warps`). This script patches each heuristic
with every configuration of a small grid, so the timed code is the library's own launcher, and
times it by CUDA-graph replay (`minigpt.measure.time_graph`, L2 flushed before each replay):

    rms_norm fwd   x [16384, D] -> y          BLOCK_M rows per program x num_warps
    rms_norm bwd   dy, x -> dx, dw            BLOCK_M x num_warps x programs (per SM, or one tile each)
                                              x pipeline stages of the row loop (1 or 3)
    rope fwd       q, k [B, T, H, D] -> both  num_warps                 (Liger's kernel beside it)

Each row carries its GB/s on the minimal bytes and a copy of the same bytes timed the same way
(the bandwidth a perfect kernel could reach at that size), and every configuration's output is
compared with the heuristic's, so a fast wrong configuration shows as an error, not a winner.
The table printed last: per shape, the heuristic's time, the best configuration's, and the copy's.

    python scripts/gpu_kernel_sweep.py --out $OUT/kernel_sweep.json
    python scripts/gpu_kernel_sweep.py --smoke --out /tmp/sweep   # CPU interpreter, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
# Triton is imported by minigpt's kernels only after main() has set TRITON_INTERPRET for --smoke.

EPS = 1e-6
WARPS = (2, 4, 8, 16)
PROGRAMS_PER_SM = (1, 2, 4, 8, 16, 32, 0)  # 0: one tile per program
STAGES = (1, 3)  # the backward's row loop: plain, or software-pipelined 3 deep


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rms_fwd_configs(n_cols: int, smoke: bool) -> Iterator[tuple[int, int, int]]:
    block_n = _pow2(n_cols)
    for block_m in (1, 2, 4, 8, 16, 32):
        for warps in (4,) if smoke else WARPS:
            if block_m * block_n <= 32768 and (not smoke or block_m <= 2):
                yield block_m, block_n, warps


def rms_bwd_configs(n_rows: int, n_cols: int, sms: int, smoke: bool) -> Iterator[tuple[int, int, int, int, int]]:
    for block_m, block_n, warps in rms_fwd_configs(n_cols, smoke):
        if block_m * block_n > 16384:
            continue
        tiles = _cdiv(n_rows, block_m)
        for per_sm in (1, 0) if smoke else PROGRAMS_PER_SM:
            programs = tiles if per_sm == 0 else min(tiles, sms * per_sm)
            rows_per_program = _cdiv(_cdiv(n_rows, programs), block_m) * block_m
            for stages in STAGES if rows_per_program > block_m else (1,):  # one tile a program: no loop to pipeline
                yield block_m, block_n, warps, rows_per_program, stages


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |got - ref| / (|ref| + 1): one bf16 rounding step is ~0.004, a wrong configuration ~1."""
    return ((got.float() - ref.float()).abs() / (ref.float().abs() + 1)).max().item()


def copy_of(nbytes: int, device: str) -> Callable[[], object]:
    """A device copy that reads and writes nbytes in total: the same traffic as a kernel's minimum."""
    src = torch.empty(nbytes // 4, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def timer(smoke: bool) -> Callable[[Callable[[], object]], float]:
    from minigpt import measure

    if smoke:  # the interpreter has no CUDA graphs or events: run once so the path is exercised
        return lambda fn: (fn(), 0.0)[1]
    return lambda fn: measure.time_graph(fn, reps=30)


def sweep(smoke: bool, device: str) -> list[dict]:
    from minigpt.kernels import rms_norm as rk
    from minigpt.kernels import rope as ropek
    from minigpt.rope import rope_cache

    time_ms = timer(smoke)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    elt = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)
    sms = rk.num_sms(torch.device(device))
    rows_out: list[dict] = []

    def row(op: str, shape: dict, config: dict, ms: float, nbytes: int, err: float | None = None) -> None:
        rows_out.append({"op": op, "shape": shape, "config": config, "ms": round(ms, 5),
                         "gbps": round(nbytes / ms / 1e6, 1) if ms else None, "max_err": err})

    def rms_shape(n_rows: int, n_cols: int) -> None:
        x, w, dy = rand(n_rows, n_cols), rand(n_cols), rand(n_rows, n_cols)
        shape = {"rows": n_rows, "hidden": n_cols}
        fwd_bytes, bwd_bytes = 2 * x.numel() * elt, 3 * x.numel() * elt
        y_ref, rstd = rk.rms_norm_forward(x, w, EPS)
        dx_ref, dw_ref = rk.rms_norm_backward(dy, x, w, rstd)
        row("rms_norm fwd", shape, {"heuristic": list(rk._blocks(n_cols))}, time_ms(lambda: rk.rms_norm_forward(x, w, EPS)), fwd_bytes)
        row("rms_norm fwd", shape, {"copy": True}, time_ms(copy_of(fwd_bytes, device)), fwd_bytes)
        for cfg in rms_fwd_configs(n_cols, smoke):
            with mock.patch.object(rk, "_blocks", lambda n, cfg=cfg: cfg):
                err = rel_err(rk.rms_norm_forward(x, w, EPS)[0], y_ref)
                row("rms_norm fwd", shape, {"block_m": cfg[0], "num_warps": cfg[2]},
                    time_ms(lambda: rk.rms_norm_forward(x, w, EPS)), fwd_bytes, err)
        heur = rk._bwd_tiles(n_rows, n_cols, x.device)
        row("rms_norm bwd", shape, {"heuristic": list(heur)}, time_ms(lambda: rk.rms_norm_backward(dy, x, w, rstd)), bwd_bytes)
        row("rms_norm bwd", shape, {"copy": True}, time_ms(copy_of(bwd_bytes, device)), bwd_bytes)
        for bcfg in rms_bwd_configs(n_rows, n_cols, sms, smoke):
            with mock.patch.object(rk, "_bwd_tiles", lambda *a, bcfg=bcfg: bcfg):
                dx, dw = rk.rms_norm_backward(dy, x, w, rstd)
                err = max(rel_err(dx, dx_ref), rel_err(dw, dw_ref))
                row("rms_norm bwd", shape, {"block_m": bcfg[0], "num_warps": bcfg[2], "rows_per_program": bcfg[3],
                                            "num_stages": bcfg[4]},
                    time_ms(lambda: rk.rms_norm_backward(dy, x, w, rstd)), bwd_bytes, err)

    def rope_shape(b: int, t: int, h: int, d: int, liger: Callable | None) -> None:
        q, k = rand(b, t, h, d), rand(b, t, h, d)
        cos, sin = rope_cache(t, d, device=device)
        cos, sin = cos.contiguous(), sin.contiguous()
        shape, nbytes = {"B": b, "T": t, "H": h, "D": d}, 4 * q.numel() * elt
        q_ref, k_ref = ropek.rope_launch(q, k, cos, sin, inverse=False)
        row("rope fwd", shape, {"heuristic": ropek._num_warps(*(_pow2(n) for n in (h, h, d // 2)))},
            time_ms(lambda: ropek.rope_launch(q, k, cos, sin, inverse=False)), nbytes)
        row("rope fwd", shape, {"copy": True}, time_ms(copy_of(nbytes, device)), nbytes)
        if liger is not None:
            full = [torch.cat([c, c], dim=-1) for c in (cos, sin)]
            qt, kt = q.clone().transpose(1, 2), k.clone().transpose(1, 2)  # Liger rotates [B, H, T, D] views in place
            row("rope fwd", shape, {"liger": True}, time_ms(lambda: liger(qt, kt, *full)), nbytes)
        for warps in (4,) if smoke else (1, 2, 4, 8, 16):
            with mock.patch.object(ropek, "_num_warps", lambda *a, warps=warps: warps):
                qo, ko = ropek.rope_launch(q, k, cos, sin, inverse=False)
                err = max(rel_err(qo, q_ref), rel_err(ko, k_ref))
                row("rope fwd", shape, {"num_warps": warps}, time_ms(lambda: ropek.rope_launch(q, k, cos, sin, inverse=False)),
                    nbytes, err)

    from minigpt.bench import GRIDS  # the shapes `bench kernels` judges the targets on

    grid = GRIDS["smoke" if smoke else "full"]
    for n_rows, n_cols in grid["rms_norm"]:
        rms_shape(n_rows, n_cols)
        if device == "cuda":
            torch.cuda.empty_cache()
    liger = None
    if not smoke:
        try:
            from liger_kernel.transformers.functional import liger_rope as liger
        except ImportError:
            print("liger_kernel is not installed: RoPE rows without Liger")
    for b, t, h, d in grid["rope"]:
        rope_shape(b, t, h, d, liger)
    return rows_out


def summary(rows: list[dict]) -> list[dict]:
    """Per (op, shape): the heuristic's ms, the best correct configuration and its ms, the copy's and Liger's ms."""
    out = []
    keys = list(dict.fromkeys((r["op"], json.dumps(r["shape"])) for r in rows))
    for op, shape in keys:
        rs = [r for r in rows if r["op"] == op and json.dumps(r["shape"]) == shape]
        pick = lambda key, rs=rs: next((r for r in rs if key in r["config"]), None)
        swept = [r for r in rs if r["max_err"] is not None and r["max_err"] <= 0.05]
        best = min(swept, key=lambda r: r["ms"]) if swept else None
        heur, copy, liger = pick("heuristic"), pick("copy"), pick("liger")
        out.append({"op": op, "shape": json.loads(shape), "heuristic": heur["config"]["heuristic"], "heuristic_ms": heur["ms"],
                    "best": best and best["config"], "best_ms": best and best["ms"], "copy_ms": copy["ms"],
                    "liger_ms": liger and liger["ms"],
                    "wrong_configs": [r["config"] for r in rs if r["max_err"] is not None and r["max_err"] > 0.05]})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for kernel_sweep.json")
    parser.add_argument("--smoke", action="store_true", help="CPU interpreter, tiny sizes, a few configurations")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before minigpt's kernels are imported
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --smoke for the CPU interpreter)")
    from minigpt.measure import provenance

    rows = sweep(args.smoke, "cpu" if args.smoke else "cuda")
    table = summary(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernel_sweep.json").write_text(json.dumps({"provenance": provenance(), "summary": table, "rows": rows}, indent=1))
    print(f"{'op':<14}{'shape':<36}{'heuristic ms':>13}{'best ms':>10}{'copy ms':>10}{'liger ms':>10}  best config")
    for s in table:
        fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "-"
        print(f"{s['op']:<14}{json.dumps(s['shape']):<36}{fmt(s['heuristic_ms']):>13}{fmt(s['best_ms']):>10}"
              f"{fmt(s['copy_ms']):>10}{fmt(s['liger_ms']):>10}  {s['best']}"
              + (f"  WRONG: {s['wrong_configs']}" if s["wrong_configs"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
