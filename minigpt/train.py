"""The trainer: AdamW + warmup/cosine, mixed precision, accumulation, DDP, eval, checkpoints.

One optimizer step: the sampler draws this rank's ``grad_accum`` micro-batches; each runs
forward under autocast (bf16 on sm_80+, fp16 with a GradScaler on older cards, fp32 on CPU) and
backward with loss / grad_accum (DDP all-reduces only on the last micro-step); gradients are
clipped to ``grad_clip`` and AdamW steps with the scheduled learning rate. Global batch =
``batch_size * world_size * grad_accum`` sequences of ``block_size`` tokens.

How long: ``max_steps`` steps (the LR decays over them), or ``max_minutes`` of wall clock (the LR
decays over the time), or both: the run stops at whichever limit comes first, the LR following
the steps. Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and stops; checkpoints
are also written at every evaluation, so ``--resume`` continues a run bit for bit.

Launch on several GPUs with ``torchrun --nproc_per_node N -m minigpt train ...``: every rank
reads its own slice of each global batch; only rank 0 prints, samples and writes files.
Set-up lives elsewhere (``distributed``, ``data``, ``monitor``, ``checkpoint``): ``Trainer.run``
is the loop, top to bottom.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
import sys
import threading
import time
import tomllib
from contextlib import nullcontext
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from . import distributed, runtime
from .checkpoint import CKPT_FILE, CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .data import (
    BatchSampler,
    Corpus,
    TokenData,
    bits_per_byte,
    check_length,
    default_cache_dir,
    eval_batches,
    load_corpus,
    make_tokenizer,
    prepare_splits,
)
from .model import MiniGPT
from .monitor import METRICS_FILE, RunLog, SpikeDetector, WeightSnapshot, group_grad_norms
from .tokenizer import Tokenizer

__all__ = [
    "NothingToDoError",
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "build_model_config",
    "default_batch_size",
    "load_recipe",
    "lr_at",
    "param_groups",
    "recipes",
    "train",
]


def _f(default: Any, help: str) -> Any:
    """A dataclass field with CLI help text (``python -m minigpt train --help`` shows it)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Every knob of a training run; each field is a ``--flag`` of ``python -m minigpt train``."""

    # data
    data: str = _f("shakespeare", "corpus: shakespeare, tinystories, gutenberg, or a path to .txt/.jsonl/.jsonl.xz")
    tokenizer: str = _f("char", "'char', 'bpe' (trained on the train split, cached), or a path to a tokenizer.json")
    bpe_vocab_size: int = _f(20000, "vocabulary size when training a BPE tokenizer")
    val_fraction: float = _f(0.1, "held-out fraction (characters for one-text corpora, documents otherwise)")
    cache_dir: str = _f("", "where tokenised corpora and trained tokenizers are cached ('' = $MINIGPT_CACHE_DIR or ~/.cache/minigpt/tokens)")
    # model
    preset: str = _f("tiny", "model size preset: tiny, small, medium (override fields with --model.FIELD VALUE)")
    model: dict = _f({}, "ModelConfig overrides, set on the CLI as --model.FIELD VALUE")  # noqa: RUF009 (_f gives a dict a default_factory)
    # batch and schedule
    block_size: int = _f(128, "context length of each training sequence (tokens)")
    batch_size: int | None = _f(None, "sequences per micro-batch per rank (default: 12 on CPU; on a GPU up to 32768 tokens "
                                         "per micro-batch, halved until the model fits in the card's free memory)")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_steps: int | None = _f(None, "optimizer steps; the LR decays over them (default: 200, or no step limit when "
                                        "--max-minutes is given). With --max-minutes too, the run stops at whichever comes first")
    max_minutes: float = _f(0.0, "time budget in minutes of training wall clock, resumed sessions included; alone, the LR decays "
                                 "over that time; with --max-steps, a hard stop (0 = no time limit)")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: float | None = _f(None, "final learning rate of the cosine decay (default: lr / 10)")
    warmup_steps: int = _f(20, "linear warmup steps")
    lr_decay_steps: int | None = _f(None, "steps over which the LR decays to min_lr (default: max_steps)")
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to >=2-D weights only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    # runtime
    device: str = _f("auto", "auto (cuda if available), cuda or cpu")
    dtype: str = _f("auto", "autocast dtype: auto (bf16 on sm_80+, fp16 on older GPUs, fp32 on CPU), float32, bfloat16, float16")
    compile: bool = _f(False, "torch.compile the model")
    seed: int = _f(1337, "seed of model init, dropout and the data stream")
    # eval, logging, checkpoints
    eval_interval: int = _f(100, "evaluate every N steps (and at the end)")
    eval_batches: int = _f(10, "validation batches per evaluation (the same windows every time)")
    log_interval: int = _f(10, "log train metrics every N steps")
    sample_tokens: int = _f(100, "tokens of text sampled at each evaluation (0 = none)")
    sample_prompt: str = _f("", "prompt of those samples ('' = start of a document)")
    out_dir: str = _f("runs/default", "run directory: ckpt.pt, tokenizer.json, metrics.jsonl, TensorBoard events")
    save_interval: int | None = _f(None, "checkpoint every N steps (default: at every evaluation; 0 = only at the end and on Ctrl-C)")
    resume: bool = _f(False, "continue the run in --out-dir from its checkpoint")
    overwrite: bool = _f(False, "start afresh in an --out-dir that already holds a run (its checkpoint and metrics are replaced)")
    tensorboard: bool = _f(True, "also write TensorBoard event files to --out-dir (when the tensorboard package is installed)")
    progress: bool = _f(True, "show tqdm progress bars")

    def __post_init__(self) -> None:
        if self.max_steps is None:
            self.max_steps = 0 if self.max_minutes > 0 else 200
        for name in ("bpe_vocab_size", "block_size", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{_flag(name)} must be >= 1, got {value}")
        for name in ("max_steps", "warmup_steps", "sample_tokens", "save_interval", "max_minutes", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{_flag(name)} must be >= 0, got {value}")
        if self.max_steps == 0 and self.max_minutes == 0:
            raise ValueError("--max-steps 0 means 'no step limit', so give --max-minutes > 0 (or --max-steps > 0)")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        for name, allowed in (("dtype", ("auto", "float32", "bfloat16", "float16")), ("device", ("auto", "cuda", "cpu"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{_flag(name)} {getattr(self, name)!r}: choose one of {', '.join(allowed)}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: give one")
        build_model_config(self, self.model.get("vocab_size", 256))  # a typo in --preset/--model.* fails now, not after data prep

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The train-config fields that fix the data stream: a resumed run must keep them.
_RESUME_MUST_MATCH = ("data", "val_fraction", "tokenizer", "bpe_vocab_size", "block_size", "batch_size", "grad_accum", "seed")


# ---- recipes: the published runs' settings, as small TOML files in minigpt/recipes/ ----------------


def recipes() -> list[str]:
    """Names of the recipes shipped with the package (``python -m minigpt train --recipe NAME``)."""
    return sorted(p.name[:-5] for p in resources.files("minigpt.recipes").iterdir() if p.name.endswith(".toml"))


def load_recipe(name: str) -> dict:
    """A recipe's TrainConfig fields (``[model]`` becomes the ``model`` overrides); a path to a .toml works too."""
    path = Path(name)
    if path.suffix == ".toml" and path.is_file():
        text = path.read_text()
    elif name in recipes():
        text = resources.files("minigpt.recipes").joinpath(f"{name}.toml").read_text()
    else:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(recipes())} or give a path to a .toml file")
    try:
        fields = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"recipe {name!r} is not valid TOML: {e}") from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"recipe {name!r} sets unknown field(s) {unknown}; see python -m minigpt train --help")
    return fields


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint (the message says how to resume)."""


class NothingToDoError(ValueError):
    """``--resume`` of a run that already reached its step or time limit."""


def lr_at(step: int, cfg: TrainConfig, time_fraction: float | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr.

    warmup:  lr * (step + 1) / (warmup_steps + 1)  for step < warmup_steps
    decay:   min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2,  p = progress through the decay in [0, 1]
    p counts steps over ``lr_decay_steps`` (default ``max_steps``); a time-limited run
    (``max_steps=0``) passes ``time_fraction`` = elapsed / max_minutes instead.
    """
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.max_steps == 0:
        if time_fraction is None:
            raise ValueError("a time-limited run (max_steps=0) needs time_fraction")
        p = time_fraction
    else:
        decay_steps = cfg.lr_decay_steps or cfg.max_steps
        assert decay_steps is not None  # max_steps is resolved in TrainConfig.__post_init__
        p = (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps)
    p = min(max(p, 0.0), 1.0)
    return min_lr + (cfg.lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices and embeddings (ndim >= 2) decay; norms' gains and biases do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    """The preset plus ``cfg.model`` overrides; vocab from the tokenizer, context = block_size.

    ``--model.vocab_size`` may pad the vocabulary up (e.g. to a multiple of 64), never below the
    tokenizer's; ``--model.max_seq_len`` may exceed block_size, never fall below it.
    """
    overrides = dict(cfg.model)
    v = overrides.setdefault("vocab_size", vocab_size)
    if v < vocab_size:
        raise ValueError(f"--model.vocab_size {v} is smaller than the tokenizer's {vocab_size} ids; drop it or raise it")
    t = overrides.setdefault("max_seq_len", cfg.block_size)
    if t < cfg.block_size:
        raise ValueError(f"--model.max_seq_len {t} is shorter than --block-size {cfg.block_size}")
    return ModelConfig.preset(cfg.preset, **overrides)


def default_batch_size(model_config: ModelConfig, block_size: int, device: torch.device) -> int:
    """12 sequences on CPU. On a GPU: 32768 tokens per micro-batch (where the published runs'
    throughput saturates), halved until a conservative memory estimate fits 80% of the free memory.

    Estimate: 16 bytes per parameter (fp32 weights, grads, two AdamW moments) + per token
    2 bytes x (10 dim + 4 ffn_dim) of bf16 activations per layer + 12 bytes x vocab of fp32 logits
    and their gradient; it over-counts (the published `small` run peaked at ~2/3 of it).
    """
    if device.type != "cuda":
        return 12
    c = model_config
    assert c.ffn_dim is not None  # resolved in ModelConfig.__post_init__
    fixed = 16 * c.num_params()
    per_token = 2 * (10 * c.dim + 4 * c.ffn_dim) * c.n_layers + 12 * c.vocab_size
    free, _ = torch.cuda.mem_get_info(device)
    batch = max(1, 32768 // block_size)
    while batch > 1 and fixed + batch * block_size * per_token > 0.8 * free:
        batch //= 2
    return batch


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return runtime.dtype() if device.type == "cuda" else torch.float32
    if device.type != "cuda" and cfg.dtype != "float32":
        raise ValueError(f"--dtype {cfg.dtype} needs a GPU; on CPU use float32 (or auto)")
    if cfg.dtype == "bfloat16" and not runtime.has_native_bf16():
        raise ValueError("this GPU has no native bf16 (it needs compute capability 8.0+): use --dtype float16 (or auto)")
    return getattr(torch, cfg.dtype)


def _check_out_dir(cfg: TrainConfig) -> None:
    """Refuse to clobber an earlier run unless asked to (--resume continues it, --overwrite replaces it)."""
    out = Path(cfg.out_dir)
    if cfg.resume or cfg.overwrite:
        return
    existing = [n for n in (CKPT_FILE, METRICS_FILE) if (out / n).exists()]
    if existing:
        raise ValueError(f"--out-dir {out} already holds a run ({', '.join(existing)}): continue it with --resume, "
                         "replace it with --overwrite, or pick another --out-dir")


class _StopOnSignal:
    """While active, SIGINT/SIGTERM set ``requested`` instead of killing the process mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict = {}

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Trainer:
    """Owns one run: data, tokenizer, model, optimizer, sampler; ``run()`` trains to the end.

    ``train_step()`` does one optimizer step and returns the (un-synced) loss and gradient norm,
    so scripts can time steps; ``evaluate()`` returns val loss, perplexity and bits per byte.
    ``corpus`` lets a script that trains several models load the corpus once (it must be
    ``cfg.data`` split with ``cfg.val_fraction``).
    """

    def __init__(self, cfg: TrainConfig, corpus: Corpus | None = None):
        self.dist = distributed.setup_distributed()
        self.rank, self.world_size, self.master = self.dist.rank, self.dist.world_size, self.dist.master
        self.device = runtime.pick_device(cfg.device, self.dist.local_rank)
        self.amp_dtype = _autocast_dtype(cfg, self.device)
        self.out_dir = Path(cfg.out_dir)
        _check_out_dir(cfg)
        ckpt = self._load_resume(cfg) if cfg.resume else None

        # data: tokenizer (rank 0 makes it, the others receive it), then the token caches
        corpus = corpus or load_corpus(cfg.data, cfg.val_fraction)
        cache = cfg.cache_dir or default_cache_dir()
        if ckpt is not None:
            self.tokenizer = Tokenizer.from_json(ckpt["tokenizer"])
        else:
            tok = make_tokenizer(cfg.tokenizer, corpus, cache, cfg.bpe_vocab_size, cfg.progress) if self.master else None
            self.tokenizer = Tokenizer.from_json(distributed.broadcast_object(tok.to_str() if tok else None))
        self.train_data, self.val_data = prepare_splits(corpus, self.tokenizer, cache, cfg.progress and self.master)
        # before the model: its position table is max_seq_len (>= block_size) long, so a --block-size no split
        # can fill (a typo'd 100000000) was an OOM kill while building it instead of this one line
        check_length(self.train_data.tokens, cfg.block_size, "train")
        check_length(self.val_data.tokens, cfg.block_size, "val")

        # model config; the batch size, once the model and the card are known
        self.model_config = build_model_config(cfg, self.tokenizer.vocab_size)
        if cfg.batch_size is None:
            cfg = dataclasses.replace(cfg, batch_size=default_batch_size(self.model_config, cfg.block_size, self.device))
        self.cfg = cfg
        assert cfg.batch_size is not None
        self._check_sample_length()
        if ckpt is not None:
            self._check_resume(ckpt)

        # model, optimizer, loss scaler (fp16 only), data stream
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.model = MiniGPT(self.model_config).to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                           eps=cfg.eps, fused=self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.sampler = BatchSampler(self.train_data, cfg.block_size, cfg.batch_size, cfg.grad_accum, self.rank, self.world_size, cfg.seed)
        self.step = 0
        self._t0 = time.time()
        self._elapsed_before = 0.0  # train wall clock of earlier (resumed) sessions
        self._time_fraction = 0.0
        self._interrupted = False
        self.last_lr = lr_at(0, cfg, 0.0)
        self.last_group_norms: dict[str, torch.Tensor] = {}
        torch.manual_seed(cfg.seed + self.rank)  # dropout masks differ across ranks
        random.seed(cfg.seed + self.rank)
        if ckpt is not None:
            self._restore(ckpt)
            self._check_work_left()

        self.compiled = torch.compile(self.model) if cfg.compile else self.model
        device_ids = [self.dist.local_rank] if self.device.type == "cuda" else None
        self.ddp = DDP(self.compiled, device_ids=device_ids) if self.world_size > 1 else None
        self.train_model: Any = self.ddp or self.compiled
        self.n_params = self.model.num_params()
        self.flops_per_token = self.model_config.flops_per_token(cfg.block_size)
        self.peak = runtime.peak_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * self.world_size

    # ---- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        """Train until max_steps / max_minutes (or Ctrl-C), evaluating, logging, saving; return a summary."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._t0 = time.time()
        log = RunLog(self.out_dir, enabled=self.master, tensorboard=cfg.tensorboard, append=cfg.resume)
        spikes = SpikeDetector()
        log.write({"type": "config", "model_config": self.model_config.to_dict(), "train_config": cfg.to_dict(), "n_params": self.n_params,
                   "world_size": self.world_size, "tokens_per_step": self.tokens_per_step, **runtime.provenance()})
        self._say(f"{self.n_params:,} parameters, {self.tokens_per_step:,} tokens/step "
                  f"({cfg.batch_size} x {cfg.block_size} x {cfg.grad_accum} accum x {self.world_size} ranks) on {runtime.provenance()['gpu']}")
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(total=cfg.max_steps or None, initial=self.step, desc="train", disable=not (cfg.progress and self.master))
        pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, loss, grad norm) not yet synced to the host
        interval_t, interval_steps, first_step_s = time.time(), 0, None
        timed_tokens, timed_s, last_eval = 0, 0.0, None
        with _StopOnSignal() as stop:
            while not self._should_stop(stop.requested):
                logging_step = (self.step + 1) % cfg.log_interval == 0 or self.step + 1 == cfg.max_steps
                snapshot = WeightSnapshot(self.model) if logging_step else None
                t_step = time.time()
                loss, norm = self.train_step(monitor=logging_step)
                if first_step_s is None:
                    loss.item()
                    first_step_s = time.time() - t_step  # includes torch.compile
                    interval_t = time.time()
                else:
                    interval_steps += 1
                pending.append((self.step, loss, norm))
                bar.update(1)

                if logging_step:
                    losses = self._check_finite(pending)
                    dt = time.time() - interval_t
                    tok_s = self.tokens_per_step * interval_steps / dt if interval_steps and dt > 0 else None
                    if tok_s is not None:
                        timed_tokens, timed_s = timed_tokens + self.tokens_per_step * interval_steps, timed_s + dt
                    rec = {"type": "train", "step": self.step, "loss": losses[-1], "ppl": math.exp(min(losses[-1], 700.0)),
                           "lr": self.last_lr, "grad_norm": float(norm), "grad_norms": {g: float(v) for g, v in self.last_group_norms.items()},
                           "update_ratio": float(snapshot.ratio()) if snapshot else None, "tokens_per_s": tok_s, "mfu": self.mfu(tok_s),
                           "elapsed_s": self.elapsed(), "mem_gb": self._mem_gb()}
                    log.write(rec)
                    warning = spikes.update(self.step, losses[-1], float(norm))
                    if warning:
                        log.warn(f"{warning} (grad clip {cfg.grad_clip:g}, lr {self.last_lr:.3g})")
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{self.last_lr:.2e}", tok_s=f"{tok_s or 0:,.0f}")
                    pending.clear()
                    interval_t, interval_steps = time.time(), 0

                if self.step % cfg.eval_interval == 0:
                    t_eval = time.time()
                    last_eval = self._eval_and_log(log)
                    interval_t += time.time() - t_eval  # eval time does not count against tokens/s
                save_every = cfg.eval_interval if cfg.save_interval is None else cfg.save_interval
                if save_every and self.step % save_every == 0:
                    t_save = time.time()
                    self.save()
                    interval_t += time.time() - t_save
            bar.close()
            if pending:  # the loop ended between log points: check the tail for NaN too
                self._check_finite(pending)
            if self._interrupted:
                path = self.save()
                log.write({"type": "interrupted", "step": self.step, "elapsed_s": self.elapsed()})
                log.close()
                raise TrainingInterrupted(f"interrupted at step {self.step}: checkpoint saved to {path or checkpoint_path(self.out_dir)}; "
                                          "continue with the same command plus --resume")

        if last_eval is None or last_eval["step"] != self.step:
            last_eval = self._eval_and_log(log)
        self.save()
        tok_s = timed_tokens / timed_s if timed_s > 0 else None
        summary = {**last_eval, "type": "summary", "steps": self.step, "tokens_seen": self.step * self.tokens_per_step,
                   "wall_s": self.elapsed(), "first_step_s": first_step_s, "tokens_per_s": tok_s, "mfu": self.mfu(tok_s),
                   "peak_mem_gb": self._mem_gb(), "n_params": self.n_params}
        log.write(summary)
        log.close()
        return summary

    def train_step(self, monitor: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (mean loss over micro-batches, grad norm before clipping) as device tensors.

        Keeps ``last_lr``; with ``monitor`` also ``last_group_norms`` (per layer group, before
        clipping: a few extra kernels, so only on logged steps).
        """
        cfg = self.cfg
        lr = lr_at(self.step, cfg, self._time_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        micro = self.sampler.next_step()
        total = torch.zeros((), device=self.device)
        for i, (x, y) in enumerate(micro):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            sync = self.ddp is None or i == len(micro) - 1  # DDP all-reduces gradients only on the last micro-batch
            with (nullcontext() if sync or self.ddp is None else self.ddp.no_sync()), self._autocast():
                _, loss = self.train_model(x, y)
                self.scaler.scale(loss / len(micro)).backward()
            total += loss.detach() / len(micro)
        self.scaler.unscale_(self.optimizer)
        if monitor:
            self.last_group_norms = group_grad_norms(self.model)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_lr = lr
        return total, norm

    def _should_stop(self, interrupted: bool = False) -> bool:
        """Step limit, time limit, or a signal. Under DDP all ranks must agree: rank 0's clock and
        any rank's signal decide, exchanged in one tiny all-reduce (every step for a time budget,
        else only on log steps, so a plain step-limited run keeps no per-step host sync)."""
        cfg = self.cfg
        frac = self.elapsed() / (60.0 * cfg.max_minutes) if cfg.max_minutes > 0 else 0.0
        if self.world_size > 1:
            if cfg.max_minutes > 0 or self.step % cfg.log_interval == 0:
                state = torch.tensor([frac if self.master else 0.0, float(interrupted)], dtype=torch.float64, device=self.device)
                frac, flag = distributed.max_across_ranks(state).tolist()
                interrupted = flag > 0
            else:
                interrupted = False  # acted on at the next exchange, by all ranks at once
        self._time_fraction = frac
        self._interrupted = interrupted  # the value all ranks agreed on: they all save, or none does
        max_steps = cfg.max_steps or 0  # 0: no step limit (a time budget)
        return frac >= 1.0 or interrupted or (max_steps > 0 and self.step >= max_steps)

    def _check_finite(self, pending: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[float]:
        """Rank-mean losses of the pending steps (one device sync); raise at the first NaN/inf."""
        values = distributed.mean_across_ranks(torch.stack([p[1] for p in pending])).tolist()
        for (step, _, _), v in zip(pending, values, strict=True):
            if not math.isfinite(v):
                raise TrainingDivergedError(
                    f"loss became {v} at step {step}: lower --lr, raise --warmup-steps, or train with "
                    "--dtype float32 to rule out an fp16/bf16 overflow"
                )
        return values

    # ---- evaluation and samples ---------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: TokenData | None = None) -> dict:
        """Mean loss on the fixed val windows, its perplexity and bits per byte (all ranks share the work)."""
        data = data or self.val_data
        cfg = self.cfg
        self.model.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)
        assert cfg.batch_size is not None  # set in __init__
        for x, y in eval_batches(data, cfg.block_size, cfg.batch_size, cfg.eval_batches, seed=cfg.seed, rank=self.rank, world_size=self.world_size):
            with self._autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))  # eager: no recompile for eval mode
            sums += torch.stack([loss.double(), torch.ones((), device=self.device, dtype=torch.float64)])
        sums = distributed.mean_across_ranks(sums)  # the ratio of means is the mean over all batches
        loss = (sums[0] / sums[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpb": bits_per_byte(loss, data.n_tokens, data.n_bytes)}

    def _eval_and_log(self, log: RunLog) -> dict:
        rec = {"type": "eval", "step": self.step, **self.evaluate()}
        if self.cfg.sample_tokens and self.master:
            rec["sample"] = self.sample(self.cfg.sample_tokens, self.cfg.sample_prompt)
        log.write(rec)
        if self.cfg.progress and self.master:  # beside the progress bar, not through it
            from tqdm.auto import tqdm

            tqdm.write(f"step {self.step}: val loss {rec['val_loss']:.4f}, {rec['val_bpb']:.3f} bits/byte"
                       + (f" | sample: {rec['sample'][:160]!r}" if rec.get("sample") else ""))
        return rec

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``; an empty prompt starts a document (EOS, or a newline for char models)."""
        if prompt:
            return self.tokenizer.encode(prompt)
        return start_ids(self.tokenizer)

    def _check_sample_length(self) -> None:
        n_prompt = len(self.prompt_ids(self.cfg.sample_prompt)) if self.cfg.sample_tokens else 0
        if n_prompt + self.cfg.sample_tokens > self.model_config.max_seq_len:
            raise ValueError(
                f"--sample-tokens {self.cfg.sample_tokens} after a {n_prompt}-token prompt exceeds the context "
                f"({self.model_config.max_seq_len} tokens): lower --sample-tokens or raise --model.max_seq_len"
            )

    @torch.no_grad()
    def sample(self, n_tokens: int, prompt: str = "", temperature: float = 0.8, top_k: int | None = 200, seed: int = 0) -> str:
        """Text sampled from the model (its own generator: the training RNG stream is untouched)."""
        ids = self.prompt_ids(prompt)
        if len(ids) + n_tokens > self.model_config.max_seq_len:
            raise ValueError(
                f"a sample of {n_tokens} tokens after a {len(ids)}-token prompt exceeds the context "
                f"max_seq_len={self.model_config.max_seq_len}: lower --sample-tokens or raise --model.max_seq_len"
            )
        g = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.tensor([ids], dtype=torch.long, device=self.device)
        with self._autocast():
            out = self.model.generate(idx, n_tokens, temperature=temperature, top_k=top_k, generator=g)
        return self.tokenizer.decode(out[0, len(ids):].tolist())

    # ---- checkpoints and resume ---------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything a checkpoint holds (collective under DDP: every rank must call it)."""
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device).cpu() if self.device.type == "cuda" else None,
            "python": random.getstate(),
        }
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed(),
            "rng": distributed.gather_objects(rng),
            "world_size": self.world_size,
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.to_str(),
        }

    def save(self) -> Path | None:
        """Checkpoint atomically to ``out_dir/ckpt.pt`` (rank 0 writes; all ranks must call)."""
        state = self.state_dict()
        if not self.master:
            return None
        return save_checkpoint(self.out_dir, state)

    @staticmethod
    def _load_resume(cfg: TrainConfig) -> dict:
        path = checkpoint_path(cfg.out_dir)
        if not path.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {path}; train without --resume first, or point --out-dir at the run")
        return load_checkpoint(path)

    def _check_resume(self, ckpt: dict) -> None:
        theirs = ckpt["model_config"]
        ours = self.model_config.to_dict()
        diff = {k: (theirs.get(k), ours[k]) for k in ours if theirs.get(k) != ours[k]}
        old = ckpt["train_config"]
        diff.update({k: (old.get(k), getattr(self.cfg, k)) for k in _RESUME_MUST_MATCH if old.get(k) != getattr(self.cfg, k)})
        if ckpt.get("world_size", 1) != self.world_size:
            diff["world_size"] = (ckpt.get("world_size", 1), self.world_size)
        if self.master and old.get("max_steps") != self.cfg.max_steps and not self.cfg.lr_decay_steps and not old.get("lr_decay_steps"):
            span = f"{self.cfg.max_steps} steps" if self.cfg.max_steps else "--max-minutes"
            print(f"note: --max-steps {old.get('max_steps')} -> {self.cfg.max_steps}: the learning rate now decays over {span}, "
                  f"not the checkpoint's schedule (pass --lr-decay-steps {old.get('max_steps')} to keep it)", file=sys.stderr)
        if diff:
            lines = "\n".join(f"  {k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise CheckpointError(f"cannot resume {checkpoint_path(self.cfg.out_dir)}: the run settings differ:\n{lines}\n"
                                  "resume with the original settings, or start a new run in another --out-dir")

    def _restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.sampler.load_state_dict(ckpt["sampler"])
        self.step = int(ckpt["step"])
        self._elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        rng = ckpt["rng"][self.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        random.setstate(_as_tuple(rng["python"]))

    def _check_work_left(self) -> None:
        cfg = self.cfg
        if cfg.max_steps and self.step >= cfg.max_steps:
            raise NothingToDoError(f"nothing left to do: the run in {cfg.out_dir} already reached step {self.step} of "
                                   f"--max-steps {cfg.max_steps}; raise --max-steps to train on")
        if cfg.max_minutes and self._elapsed_before >= 60 * cfg.max_minutes:
            raise NothingToDoError(f"nothing left to do: the run in {cfg.out_dir} already trained {self._elapsed_before / 60:.2f} min of "
                                   f"--max-minutes {cfg.max_minutes:g}; raise --max-minutes to train on")

    # ---- small helpers ------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds of training wall clock, counting earlier sessions of a resumed run."""
        return self._elapsed_before + time.time() - self._t0

    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _say(self, message: str) -> None:
        if self.master:
            print(message, flush=True)

    def mfu(self, tokens_per_s: float | None) -> float | None:
        """Model FLOPs utilisation: achieved training FLOP/s over the cards' peak (None off-GPU)."""
        if tokens_per_s is None or self.peak is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * self.world_size)

    def _mem_gb(self) -> float | None:
        return torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None


def start_ids(tokenizer: Tokenizer) -> list[int]:
    """The ids that begin a fresh document: EOS (which ends the previous one), else a newline."""
    if tokenizer.eos_id is not None:
        return [tokenizer.eos_id]
    try:
        return tokenizer.encode("\n")
    except ValueError:
        raise ValueError("this tokenizer has no EOS and no newline to start from: give a non-empty prompt") from None


def _as_tuple(x: Any) -> Any:
    """``random.setstate`` wants nested tuples; a checkpoint round trip may hand back lists."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def train(cfg: TrainConfig) -> dict:
    """Run a whole training job described by ``cfg``; returns the summary (val loss, bpb, speed)."""
    return Trainer(cfg).run()
