"""Helpers shared by the GPU training-run scripts: provenance, step timing, deadlines, output files."""

from __future__ import annotations

import json
import os
import sys
import tarfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from minigpt.measure import provenance  # noqa: F401  (re-exported for the scripts)
from minigpt.monitor import read_metrics
from minigpt.train import Trainer

REPO = Path(__file__).resolve().parents[1]

# The scripts compile many models of a few architectures in one process: keep dynamo from falling
# back to eager after its default 8 recompiles of the same forward.
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None where matplotlib is not installed (then no PNG)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: skipping the PNG (the JSON has every number)")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(trainer: Trainer, warmup: int, steps: int) -> dict:
    """Throughput of ``steps`` optimizer steps after ``warmup`` untimed ones (device-synchronised)."""
    for _ in range(warmup):
        trainer.train_step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    sync()
    s = time.perf_counter() - t
    tok_s = trainer.tokens_per_step * steps / s
    return {"ms_per_step": 1000 * s / steps, "tokens_per_s": tok_s, "mfu": trainer.mfu(tok_s), "steps": steps}


def profile_events(step: Callable[[], object], steps: int = 3, host: bool = False) -> list:
    """torch.profiler's events over ``steps`` calls of ``step``: the GPU kernels (where there is a GPU) and, with ``host``,
    the host-side ops too, where a collective shows up under its dispatcher name (``c10d::allreduce_``) on any backend."""
    from torch.profiler import ProfilerActivity, profile

    activities = ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []) + ([ProfilerActivity.CPU] if host else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    return list(prof.events())


def kernel_table(step: Callable[[], object], steps: int = 3, top: int = 12) -> list[tuple[str, float, int]]:
    """(kernel name, GPU ms per step, calls per step) of the ``top`` kernels over ``steps`` profiled calls of
    ``step``, then ``("ALL", total ms, total calls)`` per step."""
    total: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in profile_events(step, steps, host=not torch.cuda.is_available()):  # a CPU-only profile: no GPU kernels
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total[ev.name] += ev.device_time / 1e3 / steps
            calls[ev.name] += 1
    rows = sorted(total.items(), key=lambda kv: -kv[1])
    return ([(name[:90], round(ms, 3), calls[name] // steps) for name, ms in rows[:top]]
            + [("ALL", round(sum(total.values()), 3), sum(calls.values()) // steps)])


class Deadline:
    """Wall-clock budget of a whole script, so a device call never runs past its limit."""

    def __init__(self, minutes: float):
        self.end = time.time() + 60 * minutes

    def left_min(self) -> float:
        return (self.end - time.time()) / 60


def loss_curve(run_dir: Path, kind: str = "eval", key: str = "val_loss") -> tuple[list[int], list[float]]:
    rows = read_metrics(run_dir)
    pts = [(r["step"], r[key]) for r in rows if r["type"] == kind and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def bundle_metrics(run_dirs: dict[str, Path], out: Path, name: str) -> list[str]:
    """Copy each run's metrics.jsonl to ``out`` (<= 6 runs) or pack them into one ``name``.tar.gz."""
    if len(run_dirs) <= 6:
        files = []
        for run, d in run_dirs.items():
            dest = out / f"{name}_{run}.jsonl"
            dest.write_text((d / "metrics.jsonl").read_text())
            files.append(dest.name)
        return files
    with tarfile.open(out / f"{name}_metrics.tar.gz", "w:gz") as tar:
        for run, d in run_dirs.items():
            tar.add(d / "metrics.jsonl", arcname=f"{run}.jsonl")
    return [f"{name}_metrics.tar.gz"]


def save_figure(fig, path: Path, what: str, prov: dict) -> None:
    """Title a results figure with its corpus and provenance (card, dtype, versions) and write it."""
    fig.suptitle(f"{what}, {prov['gpu']}, {prov['dtype']}, torch {prov['torch']}, triton {prov['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))
