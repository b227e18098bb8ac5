"""Multi-GPU scaling of the trainer (DDP over NCCL) on one host: weak and strong scaling, all-reduce cost.

Runs ``torchrun -m minigpt train`` (the user's command line) for each row below on Gutenberg
BPE-20k, ``torch.compile``, bf16, ``--steps`` steps, and reads rank 0's ``metrics.jsonl``:

- weak scaling: the same micro-batch per rank (32 x 1024 tokens) on 1 and 2 GPUs;
- strong scaling: the same global batch (32 x 1024) as 1 x 32 and 2 x 16 sequences; the trainer
  draws the same windows for both, so their per-step losses must agree to bf16 noise.

Then one job of 2 ranks (torchrun) measures what a DDP step costs:

- an all-reduce benchmark: the time to all-reduce one fp32 gradient buffer of each model's size,
  which is what DDP moves per step (in buckets, overlapped with the backward pass);
- a step-time breakdown (``--breakdown-batch``): the trainer's own step (``Trainer.train_step``:
  compiled, bf16 autocast, fused AdamW) timed as it runs, with DDP all-reducing the gradients
  during the backward pass, and inside ``no_sync()``, which skips the all-reduce. The difference
  is the all-reduce time the backward pass did not hide; it sits beside the benchmark's time for
  the same bytes. A profiler window counts the all-reduces per step in each mode and splits the
  GPU time into NCCL kernels and the rest.

Writes ``<out>/ddp_scaling.json`` and ``<out>/ddp_scaling.png``. ``--rows`` reruns some rows only;
``--merge`` keeps the other rows of an earlier file, each labelled with the run that measured it.
Each row took about a minute on H200s (mostly compilation); the breakdown, an estimated 45 s per
configuration (not yet timed): every row plus the breakdown does not fit one 10-minute call (``--budget-minutes``
skips what would not finish), so split it with ``--rows`` and ``--merge``.

    MINIGPT_DATA_DIR=.carry/data python scripts/gpu_ddp.py --out $OUT      # needs 2 GPUs
    MINIGPT_DATA_DIR=.carry/data python scripts/gpu_ddp.py --out $OUT --rows medium_1gpu,medium_2gpu_strong \
        --merge results/train/ddp_scaling.json                             # two rows and the breakdown
    python scripts/gpu_ddp.py --smoke --out /tmp/ddp                       # CPU: gloo, tiny model
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
from gpu_train_common import REPO, Deadline, fmt, print_table, profile_events, provenance, pyplot, save_figure, sync, write_json

from minigpt import bench, distributed
from minigpt.monitor import read_metrics
from minigpt.train import Trainer

ROWS = [  # name, preset, GPUs, micro-batch per rank
    ("small_1gpu", "small", 1, 32),
    ("small_2gpu_weak", "small", 2, 32),
    ("small_2gpu_strong", "small", 2, 16),
    ("medium_1gpu", "medium", 1, 32),
    ("medium_2gpu_weak", "medium", 2, 32),
    ("medium_2gpu_strong", "medium", 2, 16),
]
COMM_ENV = {"NCCL_NVLS_ENABLE": "0", "PYTHONPATH": str(REPO)}  # NVLink multicast (NVLS) off, as the book's 2-GPU machines need
SMOKE_ENV = {"CUDA_VISIBLE_DEVICES": ""}  # --smoke runs its ranks on the CPU (gloo) even where GPUs are, so 2 ranks fit one GPU's machine


def train_argv(preset: str, batch: int, args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The ``python -m minigpt train`` flags of one configuration. The scaling rows hand them to torchrun and the
    step-time breakdown parses them with the CLI's own parser, so both train the same model on the same data."""
    argv = ["--preset", preset, "--out-dir", str(run_dir), "--max-steps", str(args.steps), "--log-interval", "10",
            "--eval-interval", str(args.steps), "--eval-batches", "4", "--sample-tokens", "0", "--no-progress",
            "--save-interval", "0", "--cache-dir", str(Path(args.work) / "cache")]
    if args.smoke:
        return [*argv, "--data", args.data or "shakespeare", "--tokenizer", "char", "--block-size", "32", "--batch-size", str(batch // 8),
                       "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "1"]
    return [*argv, "--data", args.data or "gutenberg", "--tokenizer", args.tokenizer, "--val-fraction", "0.05", "--block-size", "1024",
                   "--batch-size", str(batch), "--lr", "6e-4", "--warmup-steps", "10", "--compile"]


def train_row(name: str, preset: str, gpus: int, batch: int, args: argparse.Namespace) -> dict:
    run_dir = Path(args.work) / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "minigpt", "train",
           *train_argv(preset, batch, args, run_dir)]
    env = {**os.environ, **COMM_ENV, "OMP_NUM_THREADS": "4", **(SMOKE_ENV if args.smoke else {})}
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


# ---- the job of 2 ranks: all-reduce benchmark and step-time breakdown ------------------------------------------------------------


def allreduce_ms(n: int, device: torch.device, reps: int = 10) -> float:
    """Median ms to all-reduce one fp32 buffer of ``n`` elements over the process group (3 untimed calls first); every call
    starts together on all ranks (barrier) and is waited for, so it is the collective's own time."""
    import torch.distributed as dist

    buf = torch.ones(n, dtype=torch.float32, device=device)
    times = []
    for i in range(reps + 3):
        dist.barrier()
        sync()
        t = time.perf_counter()
        dist.all_reduce(buf)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def allreduce_bench(sizes: dict[str, int], device: torch.device) -> dict:
    """All-reduce time of one fp32 buffer of each size, and the bus bandwidth it reaches."""
    world = torch.distributed.get_world_size()
    res: dict = {}
    for name, n in sizes.items():
        ms = allreduce_ms(n, device)
        # ring all-reduce moves 2 (w-1)/w of the buffer through each GPU's link: the "bus bandwidth"
        res[name] = {"elements": n, "bytes": 4 * n, "median_ms": ms, "bus_gb_s": 4 * n * 2 * (world - 1) / world / (ms / 1000) / 1e9}
    res["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    res["world_size"] = world
    return res


def trainer_step(trainer: Trainer, synced: bool) -> Callable[[], torch.Tensor]:
    """One optimizer step as `minigpt.train` runs it; with ``synced=False`` inside DDP's ``no_sync()``: the same
    forward, backward and AdamW, but the backward pass all-reduces no gradients (each rank steps on its own)."""
    ddp = trainer.ddp
    if ddp is None:
        raise ValueError("the step-time breakdown needs DDP: run it under torchrun with 2 ranks")

    def step() -> torch.Tensor:
        with nullcontext() if synced else ddp.no_sync():
            return trainer.train_step()[0]
    return step


def param_spread(model: torch.nn.Module) -> float:
    """Largest difference of any parameter between the ranks: 0 while DDP averages every gradient (the replicas take
    identical steps), above 0 once a rank has stepped on gradients the others did not see."""
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    return float((distributed.max_across_ranks(flat) + distributed.max_across_ranks(-flat)).max())


def comm_profile(step: Callable[[], torch.Tensor], steps: int) -> dict:
    """Per step, from a torch.profiler window: the all-reduces and broadcasts launched (host ops, any backend), the NCCL
    kernels run, and the GPU time of the NCCL kernels and of all other kernels (0 on a CPU). NCCL kernels run on their
    own stream beside the backward's, so the two times overlap: their sum is not the step time. One step runs first,
    unprofiled: DDP decides whether a forward broadcasts the model's buffers (RoPE tables) from whether the step before
    synced."""
    step()
    events = profile_events(step, steps, host=True)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    nccl = sum(e.device_time for e in kernels if "nccl" in e.name.lower())
    return {"allreduces_per_step": sum(e.name == "c10d::allreduce_" for e in events) / steps,
            "broadcasts_per_step": sum(e.name == "c10d::broadcast_" for e in events) / steps,
            "nccl_kernels_per_step": sum("nccl" in e.name.lower() for e in kernels) / steps,
            "nccl_kernel_ms": nccl / 1e3 / steps, "other_kernel_ms": (sum(e.device_time for e in kernels) - nccl) / 1e3 / steps}


def time_modes(trainer: Trainer, steps: int, warmup: int, rounds: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """ms per step with the all-reduce ("sync") and without ("no_sync"), alternating ``rounds`` times so that drift (clocks,
    temperature) hits both; and the parameter spread after each mode's first round. Sync goes first, while the
    replicas are still identical: after no_sync they never are again."""
    ms: dict[str, list[float]] = {"sync": [], "no_sync": []}
    spread = {}
    for r in range(rounds):
        for mode in ms:
            ms[mode].append(1e3 * bench.seconds_per_step(trainer_step(trainer, mode == "sync"), steps, warmup))
            if r == 0:
                spread[mode] = param_spread(trainer.model)
    return ms, spread


def breakdown(trainer: Trainer, args: argparse.Namespace) -> dict:
    """Compute vs all-reduce of one DDP step. ``exposed_allreduce_ms`` = sync step - the slowest rank's no_sync step
    (a synced step waits for the slower rank): the all-reduce time not hidden behind the backward pass."""
    s = dict(steps=2, warmup=1, rounds=2, profile_steps=2) if args.smoke else dict(steps=args.breakdown_steps, warmup=3, rounds=3, profile_steps=3)
    ms, spread = time_modes(trainer, s["steps"], s["warmup"], s["rounds"])
    profile = {mode: comm_profile(trainer_step(trainer, mode == "sync"), s["profile_steps"]) for mode in ms}
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)  # DDP's buckets hold gradients in the parameters' dtype
    sync_ms = statistics.median(ms["sync"])
    no_sync_ranks = distributed.gather_objects(statistics.median(ms["no_sync"]))
    return {"status": "ok", "n_params": sum(p.numel() for p in params), "grad_dtypes": sorted({str(p.dtype) for p in params}),
            "grad_bytes": grad_bytes, "tokens_per_step": trainer.tokens_per_step, "world_size": trainer.world_size,
            "step_ms_sync": sync_ms, "step_ms_no_sync": max(no_sync_ranks), "step_ms_no_sync_ranks": no_sync_ranks,
            "exposed_allreduce_ms": sync_ms - max(no_sync_ranks), "rounds_ms": ms,
            "allreduce_ms": allreduce_ms(grad_bytes // 4, trainer.device), "param_spread": spread, "profile": profile, "settings": s}


def breakdown_configs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(preset, micro-batch per rank) of the breakdown, batch-major: the first batch of every preset before the second,
    so a run that is short of time drops whole batch sizes."""
    batches = [int(b) for b in args.breakdown_batch.split(",") if b.strip() not in ("", "0", "none")]
    return [(preset, b) for b in batches for preset in args.presets.split(",")]


def ranks_job(args: argparse.Namespace, sizes: dict[str, int]) -> None:
    """Under torchrun: the all-reduce benchmark, then each breakdown configuration; rank 0 writes ``<work>/ranks.json``."""
    from minigpt.__main__ import build_parser, train_config_from_args
    from minigpt.data import load_corpus

    info = distributed.setup_distributed()
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    deadline = Deadline(args.budget_minutes)
    res = {"allreduce": allreduce_bench({n: 1000 for n in sizes} if args.smoke else sizes, device), "breakdown": []}
    save = (lambda: write_json(Path(args.work) / "ranks.json", res)) if info.master else (lambda: None)
    save()  # after each measurement: a job stopped by its timeout still hands back what it measured
    corpus = None
    for preset, batch in breakdown_configs(args):
        rec: dict = {"preset": preset, "micro_batch": batch}
        if not distributed.broadcast_object(deadline.left_min() > (0.02 if args.smoke else 1.2)):  # rank 0 decides for all
            res["breakdown"].append({**rec, "status": "skipped", "error": "out of time"})
            continue
        cfg = train_config_from_args(build_parser().parse_args(["train", *train_argv(preset, batch, args, Path(args.work) / f"bd_{preset}_{batch}")]))
        corpus = corpus or load_corpus(cfg.data, cfg.val_fraction)
        torch._dynamo.reset()  # each model compiles afresh: no guards or dynamic shapes left over from the last one
        try:  # every rank runs the same code, so an error here is raised on all of them and the next configuration can run
            res["breakdown"].append({**rec, **breakdown(Trainer(cfg, corpus), args)})
        except Exception as err:
            res["breakdown"].append({**rec, "status": "failed", "error": f"{type(err).__name__}: {err}"[-1500:]})
        save()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    torch.distributed.destroy_process_group()


def run_ranks_job(args: argparse.Namespace, deadline: Deadline) -> dict:
    """Start `ranks_job` under torchrun with 2 ranks and read what it measured (or the error)."""
    minutes = max(deadline.left_min() - 0.3, 0.5)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(Path(__file__).resolve()), "--ranks-job",
           "--work", args.work, "--presets", args.presets, "--breakdown-batch", args.breakdown_batch, "--breakdown-steps", str(args.breakdown_steps),
           "--steps", str(args.steps), "--tokenizer", args.tokenizer, "--budget-minutes", f"{minutes:.2f}"]
    cmd += (["--data", args.data] if args.data else []) + (["--smoke"] if args.smoke else [])
    out = Path(args.work) / "ranks.json"
    out.unlink(missing_ok=True)
    try:
        proc = subprocess.run(cmd, env={**os.environ, **COMM_ENV, **(SMOKE_ENV if args.smoke else {})}, capture_output=True,
                              text=True, timeout=60 * minutes + 60)
        error = proc.stderr[-1500:] if proc.returncode != 0 else None
    except subprocess.TimeoutExpired as e:
        error = f"the job of 2 ranks timed out after {e.timeout:.0f} s"
    res = json.loads(out.read_text()) if out.is_file() else {"allreduce": {"error": error}, "breakdown": []}
    if error:  # what the job measured before it failed is kept; the error says where it stopped
        res["breakdown"].append({"status": "failed", "error": error})
    return res


# ---- results ---------------------------------------------------------------------------------------------------------------


def merge_earlier(results: dict, old: dict, path: Path) -> None:
    """Keep the rows of an earlier ddp_scaling.json (``old``, read from ``path``) that this run did not measure, or
    measured without success, and its other keys this run does not write (e.g. ``allreduce_medium_run``): a run of a
    few ``--rows`` adds to the published file instead of replacing it. A kept row gets ``run`` (commit and date of
    the run that measured it) unless it has one; rows without ``run`` are this file's own run."""
    run = {"commit": old["provenance"]["commit"], "date": old["provenance"]["date"]}
    kept = {r["name"]: {"run": run, **r} for r in old["rows"] if r.get("status") == "ok"}
    failed = {r["name"]: r.get("error") for r in results["rows"] if r.get("status") != "ok" and r["name"] in kept}
    mine = {r["name"] for r in results["rows"]} - set(failed)
    rows = [r for r in results["rows"] if r["name"] in mine] + [r for name, r in kept.items() if name not in mine]
    order = [name for name, *_ in ROWS]
    results["rows"] = sorted(rows, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    derived = {"provenance", "rows", "steps", "allreduce", "efficiency", "loss_agreement", "breakdown"}
    for key, value in old.items():
        if key not in derived and key not in results:
            results[key] = value
    results["merged_from"] = {"file": str(path), "provenance": old["provenance"],
                              "rows_kept": [name for name in kept if name not in mine],
                              "failed_here_kept_earlier": failed}


def compare_rows(results: dict) -> None:
    """Weak and strong scaling efficiency against the same model on one GPU, and the loss agreement of the strong rows."""
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


def selected_rows(args: argparse.Namespace) -> list[str]:
    """The row names ``--rows`` asks for, by default every row of ``--presets``."""
    if args.rows is None:
        return [name for name, preset, *_ in ROWS if preset in args.presets.split(",")]
    return [n for n in args.rows.split(",") if n and n != "none"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "results/train"))
    p.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny model and steps")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--tokenizer", default=str(REPO / "results/train/gutenberg_tokenizer.json"))
    p.add_argument("--data", default=None, help="corpus or text file (default: gutenberg; shakespeare with --smoke)")
    p.add_argument("--work", default="/tmp/minigpt_ddp")
    p.add_argument("--budget-minutes", type=float, default=8.5)
    p.add_argument("--row-timeout", type=int, default=240)
    p.add_argument("--presets", default="small,medium", help="comma-separated presets to scale (rows of ROWS) and to break down")
    p.add_argument("--rows", default=None, help="comma-separated row names to run (default: every row of --presets; 'none' for none)")
    p.add_argument("--breakdown-batch", default="16,32", help="micro-batches per rank of the step-time breakdown ('none' to skip it)")
    p.add_argument("--breakdown-steps", type=int, default=10, help="timed steps per round of the breakdown (3 rounds per mode)")
    p.add_argument("--merge", type=Path, default=None, help="an earlier ddp_scaling.json whose rows this run did not measure are kept")
    p.add_argument("--ranks-job", action="store_true", help=argparse.SUPPRESS)  # internal: the torchrun'd benchmark and breakdown
    args = p.parse_args(argv)
    from minigpt.config import ModelConfig

    sizes = {n: ModelConfig.preset(n).num_params() for n in ("small", "medium")}
    if args.ranks_job:
        ranks_job(args, sizes)
        return 0
    names = selected_rows(args)
    unknown = sorted(set(names) - {name for name, *_ in ROWS})
    if unknown:
        p.error(f"unknown row {', '.join(unknown)}: choose from {', '.join(name for name, *_ in ROWS)}")
    earlier = json.loads(args.merge.read_text()) if args.merge else None  # read first: --out may be the same file
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        args.steps = 4
    deadline = Deadline(args.budget_minutes)
    gpus = torch.cuda.device_count()
    results = {"provenance": {**provenance(), "gpus": [torch.cuda.get_device_name(i) for i in range(gpus)]}, "steps": args.steps, "rows": []}
    for name, preset, n, batch in ROWS:
        if name not in names:
            continue
        if not args.smoke and n > gpus:
            results["rows"].append({"name": name, "status": "skipped", "error": f"needs {n} GPUs, {gpus} present"})
            continue
        if deadline.left_min() < (0.05 if args.smoke else 1.5):
            results["rows"].append({"name": name, "status": "skipped", "error": "out of time"})
            continue
        rec = train_row(name, preset, n, batch, args)
        results["rows"].append(rec)
        print(f"{name}: {rec['status']} tok/s {fmt(rec.get('tokens_per_s'), ',.0f')} ({rec['wall_s']:.0f} s)", flush=True)
        write_json(out / "ddp_scaling.json", results)
    ranks = run_ranks_job(args, deadline)
    results["allreduce"] = ranks["allreduce"]
    results["breakdown"] = ranks["breakdown"]
    if earlier is not None:
        merge_earlier(results, earlier, args.merge)
    compare_rows(results)
    write_json(out / "ddp_scaling.json", results)
    plot(results, out / "ddp_scaling.png")
    report(results)
    return 0


def report(results: dict) -> None:
    print_table(f"DDP scaling, {results['provenance']['gpu']}, {results['provenance']['dtype']}",
                ["row", "GPUs", "global batch", "tokens/s", "MFU %", "status"],
                [[r["name"], r.get("gpus", "-"), r.get("global_batch", "-"), fmt(r.get("tokens_per_s"), ",.0f"),
                  fmt(r.get("mfu") and 100 * r["mfu"], ".1f"), r["status"]] for r in results["rows"]])
    ok = [b for b in results["breakdown"] if b.get("status") == "ok"]
    print_table("DDP step breakdown (ms per step, 2 ranks)",
                ["preset", "micro", "sync", "no_sync", "exposed all-reduce", "all-reduce alone", "all-reduces/step (sync, no_sync)", "NCCL kernels"],
                [[b["preset"], b["micro_batch"], f"{b['step_ms_sync']:.2f}", f"{b['step_ms_no_sync']:.2f}", f"{b['exposed_allreduce_ms']:.2f}",
                  f"{b['allreduce_ms']:.2f}", f"{b['profile']['sync']['allreduces_per_step']:g}, {b['profile']['no_sync']['allreduces_per_step']:g}",
                  f"{b['profile']['sync']['nccl_kernel_ms']:.2f}"] for b in ok])
    print("efficiency", results.get("efficiency"), "loss agreement", results.get("loss_agreement"), "allreduce", results["allreduce"])
    missing = [(b.get("preset"), b.get("micro_batch"), str(b.get("error"))[-300:]) for b in results["breakdown"] if b.get("status") != "ok"]
    if missing:
        print("breakdown not measured:", missing)


def plot(results: dict, path: Path) -> None:
    """Tokens/s of each row; beside it, when measured, each breakdown configuration's step: the no_sync step (compute)
    plus the exposed all-reduce, with a mark where a step would end if the all-reduce were not overlapped at all."""
    plt = pyplot()
    rows = [r for r in results["rows"] if r.get("status") == "ok" and r.get("tokens_per_s")]
    parts = [b for b in results.get("breakdown", []) if b.get("status") == "ok"]
    if plt is None or not rows + parts:
        return
    fig, axes = plt.subplots(1, 2 if parts else 1, figsize=(12 if parts else 7, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.barh([r["name"] for r in rows][::-1], [r["tokens_per_s"] for r in rows][::-1], color="tab:blue")
    ax.set(xlabel="training tokens/s (rank 0's log, compile, bf16)", title="DDP on one host")
    if parts:
        ax = axes[0][1]
        labels = [f"{b['preset']} {b['micro_batch']}/rank" for b in parts]
        compute = [b["step_ms_no_sync"] for b in parts]
        ax.barh(labels, compute, color="tab:blue", label="step in no_sync() (no all-reduce)")
        exposed = [max(b["exposed_allreduce_ms"], 0.0) for b in parts]  # a negative difference is timing noise: drawn as none
        ax.barh(labels, exposed, left=compute, color="tab:red", label="exposed all-reduce (sync - no_sync)")
        ax.plot([c + b["allreduce_ms"] for c, b in zip(compute, parts, strict=True)], labels, "k|", ms=14, label="no_sync + all-reduce alone")
        ax.set(xlabel="ms per step (2 ranks)", title="Where a DDP step goes")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3)
    save_figure(fig, path, "Gutenberg BPE-20k", results["provenance"])


if __name__ == "__main__":
    raise SystemExit(main())
