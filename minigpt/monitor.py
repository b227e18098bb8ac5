"""Monitoring a training run: what to log each step, where it goes, and when to worry.

Per logged step the trainer records loss, perplexity, learning rate, the global gradient norm
(before clipping) and one norm per *layer group* (embeddings, attention, feed-forward, norms,
an untied head), the update-to-weight ratio ``||dW|| / ||W||`` of the step (AdamW's steps are
~lr in size per element, so a healthy ratio sits near 1e-3; 1e-1 means the weights are being
rewritten, 1e-5 that nothing learns), tokens/s, MFU and peak GPU memory. ``RunLog`` writes these
records to ``metrics.jsonl`` and, when the ``tensorboard`` package is installed, to TensorBoard
event files in the same folder (``tensorboard --logdir runs/``). ``SpikeDetector`` flags a loss
or gradient norm far above its recent median, and ``plot_run`` draws a run's dashboard.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tarfile
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

__all__ = ["GROUPS", "PUBLISHED_RUNS", "RunLog", "SpikeDetector", "WeightSnapshot", "group_grad_norms", "load_published_runs",
           "param_group_of", "plot_run", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
GROUPS = ("embed", "attn", "ffn", "norm", "head")


def param_group_of(name: str) -> str:
    """The layer group of a parameter name of ``MiniGPT`` (``blocks.3.attn.wq.weight`` -> ``attn``)."""
    module = name.rsplit(".", 1)[0].split(".")[-1]  # the owning module: tok_emb, attn_norm, wq, lm_head, ...
    if module in ("tok_emb", "pos_emb"):
        return "embed"
    if module == "lm_head":
        return "head"
    if module.endswith("norm"):
        return "norm"
    if ".attn." in name:
        return "attn"
    if ".ffn." in name:
        return "ffn"
    raise ValueError(f"parameter {name!r} belongs to no monitoring group; extend minigpt.monitor.param_group_of")


def _grouped(model: torch.nn.Module, grads: bool) -> dict[str, list[torch.Tensor]]:
    out: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        t = p.grad if grads else p.detach()
        if t is not None:
            out.setdefault(param_group_of(name), []).append(t)
    return out


def _norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of a list of tensors taken as one vector (fp32; foreach: one kernel per dtype/device)."""
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(tensors)]))


def group_grad_norms(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{group: ||grad||}`` as 0-d device tensors (no host sync: read them when logging)."""
    return {g: _norm(ts) for g, ts in _grouped(model, grads=True).items()}


class WeightSnapshot:
    """Weights before an optimizer step, to measure the step: ``ratio()`` = ||W_after - W_before|| / ||W_before||.

    Holds one copy of the weights, so the trainer takes it only on logged steps.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def ratio(self) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        deltas = torch._foreach_sub([params[n].detach() for n in self.before], list(self.before.values()))
        return _norm(list(deltas)) / _norm(list(self.before.values())).clamp_min(1e-12)


class SpikeDetector:
    """Flags a value far above its recent median: a loss spike or a gradient-norm spike.

    ``update(step, loss, grad_norm)`` returns a one-line warning or None. A gradient norm above
    ``grad_factor`` x the median of the last ``window`` logged norms is a spike, and so is a loss
    more than ``loss_jump`` (relative) above the median of its window; the first ``min_history``
    values only fill the windows (the start of training is all "spikes").
    """

    def __init__(self, window: int = 20, grad_factor: float = 4.0, loss_jump: float = 0.1, min_history: int = 5):
        if window < min_history or min_history < 1 or grad_factor <= 1 or loss_jump <= 0:
            raise ValueError("SpikeDetector needs window >= min_history >= 1, grad_factor > 1 and loss_jump > 0")
        self.grad_factor, self.loss_jump, self.min_history = grad_factor, loss_jump, min_history
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)

    def update(self, step: int, loss: float, grad_norm: float | None = None) -> str | None:
        msgs = []
        if len(self.losses) >= self.min_history:
            med = statistics.median(self.losses)
            if loss > med * (1 + self.loss_jump):
                msgs.append(f"loss {loss:.4g} vs recent median {med:.4g}")
        if grad_norm is not None and len(self.norms) >= self.min_history:
            med = statistics.median(self.norms)
            if grad_norm > self.grad_factor * med:
                msgs.append(f"grad norm {grad_norm:.4g} = {grad_norm / med:.1f}x the recent median {med:.4g}")
        self.losses.append(loss)
        if grad_norm is not None:
            self.norms.append(grad_norm)
        return f"spike at step {step}: " + "; ".join(msgs) if msgs else None

    def scan(self, records: Iterable[dict]) -> list[dict]:
        """Run the detector over a run's train records; the spikes as ``{"step", "message"}``."""
        out = []
        for r in records:
            if r.get("type") == "train" and r.get("loss") is not None:
                msg = self.update(r["step"], r["loss"], r.get("grad_norm"))
                if msg:
                    out.append({"step": r["step"], "message": msg})
        return out


def _summary_writer(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: pip install tensorboard
        return None
    return SummaryWriter(log_dir=str(log_dir))


class RunLog:
    """A run's log: JSON lines in ``out_dir/metrics.jsonl`` plus TensorBoard scalars when available.

    Only the master rank writes (``enabled=False`` elsewhere). Numeric fields of ``train`` and
    ``eval`` records become TensorBoard scalars ``train/loss``, ``eval/val_loss``, ...; nested
    ``grad_norms`` become ``grad_norm/attn`` etc.
    """

    def __init__(self, out_dir: str | Path, enabled: bool = True, tensorboard: bool = True, append: bool = False):
        self.out_dir, self.enabled = Path(out_dir), enabled
        self.path = self.out_dir / METRICS_FILE
        self.writer = None
        if not enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if not append:
            self.path.unlink(missing_ok=True)
        self.writer = _summary_writer(self.out_dir) if tensorboard else None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and record.get("type") in ("train", "eval") and "step" in record:
            for key, value in _scalars(record):
                self.writer.add_scalar(f"{record['type']}/{key}" if "/" not in key else key, value, record["step"])

    def warn(self, message: str) -> None:
        """A one-line warning on stderr (master only), also kept in the JSONL as a ``warning`` record."""
        if not self.enabled:
            return
        print(f"warning: {message}", file=sys.stderr, flush=True)
        self.write({"type": "warning", "message": message})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _scalars(record: dict) -> Iterable[tuple[str, float]]:
    for key, value in record.items():
        if key == "grad_norms" and isinstance(value, dict):
            yield from ((f"grad_norm/{g}", v) for g, v in value.items() if v is not None)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "type") and math.isfinite(value):
            yield key, float(value)


def read_metrics(run: str | Path) -> list[dict]:
    """The records of a run directory's ``metrics.jsonl`` (or of a ``.jsonl`` file itself)."""
    path = Path(run)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no metrics at {path}: pass a run directory (the trainer's --out-dir) or its metrics.jsonl")
    return parse_metrics(path.read_text())


def parse_metrics(text: str) -> list[dict]:
    """The records of a ``metrics.jsonl`` text, one JSON object per line (blank lines skipped)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_metrics_archive(path: str | Path) -> dict[str, list[dict]]:
    """``{run name: records}`` of a ``.tar.gz`` of ``<run>.jsonl`` files, how the GPU scripts bundle
    the metrics of many runs (``scripts/gpu_train_common.bundle_metrics``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics archive at {path}: the GPU scripts write <name>_metrics.tar.gz into results/train")
    runs = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            f = tar.extractfile(m) if m.isfile() else None
            if f is not None:
                runs[m.name.removesuffix(".jsonl")] = parse_metrics(f.read().decode())
    return runs


PUBLISHED_RUNS = ("shakespeare", "shakespeare_run1", "ablation_full_1", "ablation_full_2", "gutenberg",
                  "gutenberg_medium_long", "gutenberg_throughput")  # the GPU scripts' records in results/train


def load_published_runs(train_dir: str | Path) -> dict[str, dict] | None:
    """``{file stem: record}`` of the published training runs in ``train_dir`` (``results/train``), which
    chapters 8 and 9 read; None if any is missing (a package installed without the repository)."""
    paths = {name: Path(train_dir) / f"{name}.json" for name in PUBLISHED_RUNS}
    if not all(path.is_file() for path in paths.values()):
        return None
    return {name: json.loads(path.read_text()) for name, path in paths.items()}


def plot_run(run: str | Path, title: str | None = None):
    """A run's dashboard in one figure: loss (train and val), learning rate, gradient norms (global,
    per group, the clipping threshold), update/weight ratio, tokens/s and MFU. Returns the figure.

    Works on any run's JSONL: panels whose fields a run did not log say so.
    """
    import matplotlib.pyplot as plt

    recs = read_metrics(run)
    cfg = next((r for r in recs if r["type"] == "config"), {})
    train = [r for r in recs if r["type"] == "train"]
    evals = [r for r in recs if r["type"] == "eval"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5))
    (a_loss, a_lr, a_gn), (a_upd, a_tps, a_mfu) = axes

    def series(rows, key):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def panel(ax, rows, key, label, **kw):
        xs, ys = series(rows, key)
        if xs:
            ax.plot(xs, ys, label=label, **kw)
        return bool(xs)

    panel(a_loss, train, "loss", "train")
    panel(a_loss, evals, "val_loss", "val", marker="o")
    a_loss.set_title("loss (nats/token)")
    panel(a_lr, train, "lr", "lr")
    a_lr.set_title("learning rate")
    panel(a_gn, train, "grad_norm", "global", color="k")
    for g in GROUPS:
        pts = [(r["step"], r["grad_norms"][g]) for r in train if r.get("grad_norms", {}).get(g) is not None]
        if pts:
            a_gn.plot(*zip(*pts, strict=True), label=g, lw=0.8)
    clip = cfg.get("train_config", {}).get("grad_clip")
    if clip:
        a_gn.axhline(clip, ls="--", color="r", lw=0.8, label=f"clip {clip:g}")
    a_gn.set_yscale("log")
    a_gn.set_title("gradient norm (before clipping)")
    if not panel(a_upd, train, "update_ratio", "||dW|| / ||W||"):
        a_upd.text(0.5, 0.5, "not logged by this run", ha="center", transform=a_upd.transAxes)
    a_upd.set_yscale("log" if any(r.get("update_ratio") for r in train) else "linear")
    a_upd.set_title("update / weight ratio")
    panel(a_tps, train, "tokens_per_s", "tokens/s")
    a_tps.set_title("tokens/s")
    if not panel(a_mfu, train, "mfu", "MFU"):
        a_mfu.text(0.5, 0.5, "no MFU (CPU or unknown card)", ha="center", transform=a_mfu.transAxes)
    a_mfu.set_title("model FLOPs utilisation")
    for ax in axes.flat:
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    gpu = cfg.get("gpu", "")
    fig.suptitle(title or f"{Path(run).name} ({gpu}, {cfg.get('dtype', '')})", fontsize=10)
    fig.tight_layout()
    return fig
