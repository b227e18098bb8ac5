"""Multi-GPU scaling of the trainer (DDP over NCCL) on one host: weak and strong scaling, all-reduce cost.

Runs ``torchrun -m minigpt train`` (the user's command line) for each row below on Gutenberg
BPE-20k, ``torch.compile``, bf16, ``--steps`` steps, and reads rank 0's ``metrics.jsonl``:

- weak scaling: the same micro-batch per rank (32 x 1024 tokens) on 1 and 2 GPUs;
- strong scaling: the same global batch (32 x 1024) as 1 x 32 and 2 x 16 sequences; the trainer
  draws the same windows for both, so their per-step losses must agree to bf16 noise.

Then an all-reduce benchmark in the same process group size (``--allreduce`` under torchrun):
the time to all-reduce one fp32 gradient buffer of each model's size, which is what DDP moves per
step (in buckets, overlapped with the backward pass). Writes ``<out>/ddp_scaling.json`` and
``<out>/ddp_scaling.png``.

    MINIGPT_DATA_DIR=.carry/data python scripts/gpu_ddp.py --out $OUT      # needs 2 GPUs
    python scripts/gpu_ddp.py --smoke --out /tmp/ddp                       # CPU: gloo, tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from gpu_train_common import REPO, Deadline, fmt, print_table, provenance, pyplot, save_figure, write_json

from minigpt.monitor import read_metrics

ROWS = [  # name, preset, GPUs, micro-batch per rank
    ("small_1gpu", "small", 1, 32),
    ("small_2gpu_weak", "small", 2, 32),
    ("small_2gpu_strong", "small", 2, 16),
    ("medium_1gpu", "medium", 1, 32),
    ("medium_2gpu_weak", "medium", 2, 32),
]


def allreduce_bench(sizes: dict[str, int], out: Path) -> None:
    """Under torchrun: median time to all-reduce an fp32 buffer of each size (rank 0 writes JSON)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    res = {}
    for name, n in sizes.items():
        buf = torch.ones(n, dtype=torch.float32, device=dev)
        times = []
        for i in range(13):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            dist.all_reduce(buf)
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:
                times.append(time.perf_counter() - t)
        ms = 1000 * sorted(times)[len(times) // 2]
        world = dist.get_world_size()
        # ring all-reduce moves 2 (w-1)/w of the buffer through each GPU's link: the "bus bandwidth"
        res[name] = {"elements": n, "bytes": 4 * n, "median_ms": ms, "bus_gb_s": 4 * n * 2 * (world - 1) / world / (ms / 1000) / 1e9}
    if dist.get_rank() == 0:
        res["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if cuda else None
        res["world_size"] = dist.get_world_size()
        write_json(out / "allreduce.json", res)
    dist.destroy_process_group()


def train_row(name: str, preset: str, gpus: int, batch: int, args, work: Path) -> dict:
    run_dir = work / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "minigpt", "train",
           "--preset", preset, "--out-dir", str(run_dir), "--max-steps", str(args.steps), "--log-interval", "10",
           "--eval-interval", str(args.steps), "--eval-batches", "4", "--sample-tokens", "0", "--no-progress",
           "--save-interval", "0"]
    if args.smoke:
        cmd += ["--data", "shakespeare", "--tokenizer", "char", "--block-size", "32", "--batch-size", str(batch // 8),
                "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "1"]
    else:
        cmd += ["--data", "gutenberg", "--tokenizer", args.tokenizer, "--val-fraction", "0.05", "--cache-dir", str(work / "cache"),
                "--block-size", "1024", "--batch-size", str(batch), "--lr", "6e-4", "--warmup-steps", "10", "--compile"]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "4", "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.row_timeout)
    wall = time.perf_counter() - t
    rec = {"name": name, "preset": preset, "gpus": gpus, "micro_batch": batch, "global_batch": batch * gpus, "steps": args.steps, "wall_s": wall,
           "command": " ".join(cmd[1:]).replace(sys.executable, "python")}
    metrics = run_dir / "metrics.jsonl"
    if proc.returncode != 0 or not metrics.is_file():
        return {**rec, "status": "failed", "error": (proc.stderr or proc.stdout)[-1500:]}
    rows = read_metrics(metrics)
    summary = next(r for r in rows if r["type"] == "summary")
    cfg = next(r for r in rows if r["type"] == "config")
    rec.update(status="ok", n_params=summary["n_params"], tokens_per_step=cfg["tokens_per_step"], tokens_per_s=summary["tokens_per_s"],
               mfu=summary["mfu"], first_step_s=summary["first_step_s"], val_loss=summary["val_loss"], peak_mem_gb=summary["peak_mem_gb"],
               losses=[(r["step"], r["loss"]) for r in rows if r["type"] == "train"], gpu=cfg.get("gpu"),
               stdout_lines=len(proc.stdout.splitlines()))
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "results/train"))
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model and steps")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--tokenizer", default=str(REPO / "results/train/gutenberg_tokenizer.json"))
    p.add_argument("--work", default="/tmp/minigpt_ddp")
    p.add_argument("--budget-minutes", type=float, default=8.5)
    p.add_argument("--row-timeout", type=int, default=240)
    p.add_argument("--presets", default="small,medium", help="comma-separated presets to scale (rows of ROWS)")
    p.add_argument("--allreduce", action="store_true", help=argparse.SUPPRESS)  # internal: the torchrun'd benchmark
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    from minigpt.config import ModelConfig

    sizes = {n: ModelConfig.preset(n).num_params() for n in ("small", "medium")}
    if args.allreduce:
        allreduce_bench({n: 1000 for n in sizes} if args.smoke else sizes, work)
        return 0
    if args.smoke:
        args.steps = 4
    deadline = Deadline(args.budget_minutes)
    gpus = torch.cuda.device_count()
    results = {"provenance": {**provenance(), "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)]}, "steps": args.steps, "rows": []}
    for name, preset, n, batch in ROWS:
        if preset not in args.presets.split(","):
            continue
        if not args.smoke and n > gpus:
            results["rows"].append({"name": name, "status": "skipped", "error": f"needs {n} GPUs, {gpus} present"})
            continue
        if deadline.left_min() < (0.05 if args.smoke else 1.5):
            results["rows"].append({"name": name, "status": "skipped", "error": "out of time"})
            continue
        rec = train_row(name, preset, n, batch, args, work)
        results["rows"].append(rec)
        print(f"{name}: {rec['status']} tok/s {fmt(rec.get('tokens_per_s'), ',.0f')} ({rec['wall_s']:.0f} s)", flush=True)
        write_json(out / "ddp_scaling.json", results)
    ar = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(Path(__file__).resolve()), "--allreduce",
          "--work", str(work)] + (["--smoke"] if args.smoke else [])
    proc = subprocess.run(ar, env={**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    results["allreduce"] = json.loads((work / "allreduce.json").read_text()) if proc.returncode == 0 else {"error": proc.stderr[-1500:]}
    by = {r["name"]: r for r in results["rows"] if r.get("status") == "ok"}
    for preset in ("small", "medium"):
        one, weak = by.get(f"{preset}_1gpu"), by.get(f"{preset}_2gpu_weak")
        if one and weak and one["tokens_per_s"] and weak["tokens_per_s"]:
            results.setdefault("efficiency", {})[f"{preset}_weak"] = weak["tokens_per_s"] / (2 * one["tokens_per_s"])
        strong = by.get(f"{preset}_2gpu_strong")
        if one and strong and one["tokens_per_s"] and strong["tokens_per_s"]:
            results.setdefault("efficiency", {})[f"{preset}_strong"] = strong["tokens_per_s"] / (2 * one["tokens_per_s"])
            d = [abs(a[1] - b[1]) for a, b in zip(one["losses"], strong["losses"], strict=False)]
            results.setdefault("loss_agreement", {})[preset] = {"max_abs_diff": max(d), "steps_compared": len(d)}
    write_json(out / "ddp_scaling.json", results)
    plot(results, out / "ddp_scaling.png")
    print_table(f"DDP scaling, {results['provenance']['gpu']}, {results['provenance']['dtype']}",
                ["row", "GPUs", "global batch", "tokens/s", "MFU %", "status"],
                [[r["name"], r.get("gpus", "-"), r.get("global_batch", "-"), fmt(r.get("tokens_per_s"), ",.0f"),
                  fmt(r.get("mfu") and 100 * r["mfu"], ".1f"), r["status"]] for r in results["rows"]])
    print("efficiency", results.get("efficiency"), "loss agreement", results.get("loss_agreement"), "allreduce", results["allreduce"])
    return 0


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    rows = [r for r in results["rows"] if r.get("status") == "ok" and r.get("tokens_per_s")]
    if plt is None or not rows:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.barh([r["name"] for r in rows][::-1], [r["tokens_per_s"] for r in rows][::-1], color="tab:blue")
    ax.set(xlabel="training tokens/s (rank 0's log, compile, bf16)", title="DDP on one host")
    save_figure(fig, path, "Gutenberg BPE-20k", results["provenance"])


if __name__ == "__main__":
    raise SystemExit(main())
