"""The trainer: AdamW + warmup/cosine, mixed precision, accumulation, DDP, eval, checkpoints.

One optimizer step: the sampler draws this rank's ``grad_accum`` micro-batches; each runs
forward under autocast (bf16 on sm_80+, fp16 with a GradScaler on older cards, fp32 on CPU) and
backward with loss / grad_accum (DDP all-reduces only on the last micro-step); gradients are
clipped to ``grad_clip`` and AdamW steps with the scheduled learning rate. Global batch =
``batch_size * world_size * grad_accum`` sequences of ``block_size`` tokens.

Launch on several GPUs with ``torchrun --nproc_per_node N -m minigpt train ...``: every rank
reads its own slice of each global batch, only rank 0 logs, samples and saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from . import runtime
from .checkpoint import CheckpointError, checkpoint_path, load_checkpoint, save_checkpoint
from .config import ModelConfig
from .data import BatchSampler, Corpus, TokenData, bits_per_byte, default_cache_dir, eval_batches, load_corpus, tokenize_split
from .model import MiniGPT
from .tokenizer import Tokenizer, load_tokenizer, train_bpe, train_char

__all__ = [
    "TrainConfig",
    "Trainer",
    "TrainingDivergedError",
    "train",
    "lr_at",
    "param_groups",
    "peak_flops",
    "build_model_config",
]


def _f(default: Any, help: str) -> Any:
    """A dataclass field with CLI help text (``python -m minigpt train --help`` shows it)."""
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


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
    model: dict = _f({}, "ModelConfig overrides, set on the CLI as --model.FIELD VALUE")
    # batch and schedule
    block_size: int = _f(128, "context length of each training sequence (tokens)")
    batch_size: int = _f(12, "sequences per micro-batch per rank")
    grad_accum: int = _f(1, "micro-batches accumulated per optimizer step")
    max_steps: int = _f(200, "optimizer steps; 0 = run for --max-minutes and decay the LR over that time")
    max_minutes: float = _f(0.0, "stop after this many minutes of training wall clock, resumed sessions included (then evaluate and save); 0 = no limit")
    lr: float = _f(1e-3, "peak learning rate")
    min_lr: Optional[float] = _f(None, "final learning rate of the cosine decay (default: lr / 10)")
    warmup_steps: int = _f(20, "linear warmup steps")
    lr_decay_steps: Optional[int] = _f(None, "steps over which the LR decays to min_lr (default: max_steps)")
    weight_decay: float = _f(0.1, "AdamW weight decay, applied to >=2-D weights only")
    beta1: float = _f(0.9, "AdamW beta1")
    beta2: float = _f(0.95, "AdamW beta2")
    eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0 = no clipping)")
    # runtime
    dtype: str = _f("auto", "autocast dtype: auto (bf16 on sm_80+, fp16 on older GPUs, fp32 on CPU), float32, bfloat16, float16")
    compile: bool = _f(False, "torch.compile the model")
    seed: int = _f(1337, "seed of model init, dropout and the data stream")
    # eval, logging, checkpoints
    eval_interval: int = _f(100, "evaluate every N steps (and at the end)")
    eval_batches: int = _f(10, "validation batches per evaluation (the same windows every time)")
    log_interval: int = _f(10, "log train metrics every N steps")
    sample_tokens: int = _f(100, "tokens of text sampled at each evaluation (0 = none)")
    sample_prompt: str = _f("", "prompt of those samples ('' = start of a document)")
    out_dir: str = _f("runs/default", "run directory: ckpt.pt, tokenizer.json, metrics.jsonl")
    save_interval: int = _f(0, "also checkpoint every N steps (0 = only at the end)")
    resume: bool = _f(False, "continue the run in --out-dir from its checkpoint")
    progress: bool = _f(True, "show tqdm progress bars")

    def __post_init__(self) -> None:
        for name in ("bpe_vocab_size", "block_size", "batch_size", "grad_accum", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_steps", "warmup_steps", "sample_tokens", "save_interval"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_steps == 0 and self.max_minutes <= 0:
            raise ValueError("max_steps=0 means 'train for --max-minutes', so set --max-minutes > 0 (or give --max-steps)")
        if self.max_minutes < 0 or self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("max_minutes, weight_decay and grad_clip must be >= 0 and lr > 0")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}: choose auto, float32, bfloat16 or float16")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The train-config fields that fix the data stream: a resumed run must keep them.
_RESUME_MUST_MATCH = ("data", "val_fraction", "tokenizer", "bpe_vocab_size", "block_size", "batch_size", "grad_accum", "seed")

# Dense bf16 tensor-core peaks (fp16 for cards without bf16), FLOP/s, by a substring of the name.
_PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("V100", 125e12),
    ("T4", 65e12),
)


def peak_flops(gpu_name: str) -> Optional[float]:
    """The card's dense bf16 (fp16 on T4/V100) peak in FLOP/s, or None when unknown (or CPU)."""
    for key, flops in _PEAK_FLOPS:
        if key in gpu_name:
            return flops
    return None


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


def lr_at(step: int, cfg: TrainConfig, time_fraction: Optional[float] = None) -> float:
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


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "auto":
        return runtime.dtype() if device.type == "cuda" else torch.float32
    if device.type != "cuda" and cfg.dtype != "float32":
        raise ValueError(f"--dtype {cfg.dtype} needs a GPU; on CPU use float32 (or auto)")
    if cfg.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16: use --dtype float16 (or auto)")
    return getattr(torch, cfg.dtype)


def _make_tokenizer(cfg: TrainConfig, corpus, cache: Path) -> Tokenizer:
    if cfg.tokenizer == "char":
        return train_char(corpus.train + corpus.val, eos=corpus.mode == "by-document")
    if cfg.tokenizer == "bpe":
        path = cache / f"tokenizer-bpe{cfg.bpe_vocab_size}-{corpus.name}-{corpus.fingerprint[:16]}.json"
        if path.is_file():
            return load_tokenizer(path)
        tok = train_bpe(corpus.train, cfg.bpe_vocab_size, show_progress=cfg.progress)
        tok.save(path)
        return tok
    return load_tokenizer(cfg.tokenizer)


def _setup_distributed() -> tuple[int, int, int]:
    """(rank, local_rank, world_size); joins the process group torchrun describes, if any."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), local_rank, dist.get_world_size()


class Trainer:
    """Owns one run: data, tokenizer, model, optimizer, sampler; ``run()`` trains to the end.

    ``train_step()`` does one optimizer step and returns the (un-synced) loss tensor, so scripts
    can time steps; ``evaluate()`` returns val loss, perplexity and bits per byte. ``corpus``
    lets a script that trains several models load the corpus once (it must be ``cfg.data`` split
    with ``cfg.val_fraction``).
    """

    def __init__(self, cfg: TrainConfig, corpus: Optional[Corpus] = None):
        self.cfg = cfg
        self.rank, local_rank, self.world_size = _setup_distributed()
        self.master = self.rank == 0
        self.device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        self.amp_dtype = _autocast_dtype(cfg, self.device)
        self.out_dir = Path(cfg.out_dir)
        cache_root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        ckpt = self._load_resume() if cfg.resume else None

        corpus = corpus or load_corpus(cfg.data, cfg.val_fraction)
        if ckpt is not None:
            self.tokenizer = Tokenizer.from_json(ckpt["tokenizer"])
        elif self.master:
            self.tokenizer = _make_tokenizer(cfg, corpus, cache_root)
        if self.world_size > 1 and ckpt is None:  # rank 0 trains a BPE tokenizer once, others read it
            box = [self.tokenizer.to_str() if self.master else None]
            dist.broadcast_object_list(box, src=0)
            self.tokenizer = Tokenizer.from_json(box[0])
        if self.master:
            self.train_data = tokenize_split(corpus, "train", self.tokenizer, cache_root, cfg.progress)
            self.val_data = tokenize_split(corpus, "val", self.tokenizer, cache_root, cfg.progress)
        if self.world_size > 1:
            dist.barrier()  # the cache files exist now; the other ranks map them without re-tokenising
        if not self.master:
            self.train_data = tokenize_split(corpus, "train", self.tokenizer, cache_root, False)
            self.val_data = tokenize_split(corpus, "val", self.tokenizer, cache_root, False)

        self.model_config = build_model_config(cfg, self.tokenizer.vocab_size)
        n_prompt = len(self.prompt_ids(cfg.sample_prompt)) if cfg.sample_tokens else 0
        if n_prompt + cfg.sample_tokens > self.model_config.max_seq_len:
            raise ValueError(
                f"--sample-tokens {cfg.sample_tokens} after a {n_prompt}-token prompt exceeds the context "
                f"({self.model_config.max_seq_len} tokens): lower --sample-tokens or raise --model.max_seq_len"
            )
        if ckpt is not None:
            self._check_resume(ckpt)
        torch.manual_seed(cfg.seed)
        self.model = MiniGPT(self.model_config).to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
            fused=self.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.sampler = BatchSampler(self.train_data, cfg.block_size, cfg.batch_size, cfg.grad_accum, self.rank, self.world_size, cfg.seed)
        self.step = 0
        self._t0 = time.time()
        self._elapsed_before = 0.0  # train wall clock of earlier (resumed) sessions
        self._time_fraction = 0.0
        torch.manual_seed(cfg.seed + self.rank)  # dropout masks differ across ranks
        random.seed(cfg.seed + self.rank)
        if ckpt is not None:
            self._restore(ckpt)
        self.compiled = torch.compile(self.model) if cfg.compile else self.model
        self.ddp = DDP(self.compiled, device_ids=[local_rank] if self.device.type == "cuda" else None) if self.world_size > 1 else None
        self.train_model = self.ddp or self.compiled
        self.n_params = self.model.num_params()
        self.flops_per_token = self.model_config.flops_per_token(cfg.block_size)
        self.peak = peak_flops(runtime.gpu_name()) if self.device.type == "cuda" else None
        self.tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * self.world_size

    # ---- resume -------------------------------------------------------------------------------

    def _load_resume(self) -> dict:
        path = checkpoint_path(self.cfg.out_dir)
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
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        random.setstate(_as_tuple(rng["python"]))

    def state_dict(self) -> dict:
        """Everything a checkpoint holds (collective under DDP: every rank must call it)."""
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "python": random.getstate(),
        }
        rngs = [rng]
        if self.world_size > 1:
            rngs = [None] * self.world_size
            dist.all_gather_object(rngs, {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in rng.items()})
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "step": self.step,
            "elapsed_s": self.elapsed(),
            "rng": rngs,
            "world_size": self.world_size,
            "model_config": self.model_config.to_dict(),
            "train_config": self.cfg.to_dict(),
            "tokenizer": self.tokenizer.to_str(),
        }

    def save(self) -> Optional[Path]:
        """Checkpoint to ``out_dir/ckpt.pt`` (rank 0 writes; all ranks must call)."""
        state = self.state_dict()
        if not self.master:
            return None
        return save_checkpoint(self.out_dir, state)

    # ---- training -----------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Seconds of training wall clock, counting earlier sessions of a resumed run."""
        return self._elapsed_before + time.time() - self._t0

    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns (mean loss over micro-batches, grad norm) as device tensors."""
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
            sync = self.ddp is None or i == len(micro) - 1
            with (nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                _, loss = self.train_model(x, y)
                self.scaler.scale(loss / len(micro)).backward()
            total += loss.detach() / len(micro)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.last_lr = lr
        return total, norm

    def _mean_across_ranks(self, t: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world_size
        return t

    @torch.no_grad()
    def evaluate(self, data: Optional[TokenData] = None) -> dict:
        """Mean loss on the fixed val windows, its perplexity and bits per byte (all ranks share the work)."""
        data = data or self.val_data
        cfg = self.cfg
        self.model.eval()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)
        for x, y in eval_batches(data, cfg.block_size, cfg.batch_size, cfg.eval_batches, seed=cfg.seed, rank=self.rank, world_size=self.world_size):
            with self._autocast():
                _, loss = self.model(x.to(self.device), y.to(self.device))  # eager: no recompile for eval mode
            sums += torch.stack([loss.double(), torch.ones((), device=self.device, dtype=torch.float64)])
        if self.world_size > 1:
            dist.all_reduce(sums)
        loss = (sums[0] / sums[1]).item()
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_bpb": bits_per_byte(loss, data.n_tokens, data.n_bytes)}

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of ``prompt``; an empty prompt starts a document (EOS, or a newline for char models)."""
        if prompt:
            return self.tokenizer.encode(prompt)
        return start_ids(self.tokenizer)

    @torch.no_grad()
    def sample(self, n_tokens: int, prompt: str = "", temperature: float = 0.8, top_k: Optional[int] = 200, seed: int = 0) -> str:
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

    def _log(self, record: dict) -> None:
        if not self.master:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _should_stop(self) -> bool:
        """Step or wall-clock limit reached; under DDP rank 0's clock decides for all ranks."""
        cfg = self.cfg
        if cfg.max_minutes > 0:
            frac = torch.tensor([self.elapsed() / (60.0 * cfg.max_minutes)], dtype=torch.float64)
            if self.world_size > 1:
                frac = frac.to(self.device)
                dist.broadcast(frac, src=0)
            self._time_fraction = float(frac.item())
            if self._time_fraction >= 1.0:
                return True
        return cfg.max_steps > 0 and self.step >= cfg.max_steps

    def run(self) -> dict:
        """Train until max_steps / max_minutes, evaluating and logging; save; return a summary."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._t0 = time.time()
        if self.master and not cfg.resume:
            (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
        self._log({"type": "config", "model_config": self.model_config.to_dict(), "train_config": cfg.to_dict(), "n_params": self.n_params,
                   "world_size": self.world_size, "tokens_per_step": self.tokens_per_step, **runtime.provenance()})
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(total=cfg.max_steps or None, initial=self.step, desc="train", disable=not (cfg.progress and self.master))
        pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        interval_t, interval_steps, first_step_s = time.time(), 0, None
        timed_tokens, timed_s, last_eval = 0, 0.0, None
        while not self._should_stop():
            t_step = time.time()
            loss, norm = self.train_step()
            if first_step_s is None:
                loss.item()
                first_step_s = time.time() - t_step  # includes torch.compile
                interval_t = time.time()
            else:
                interval_steps += 1
            pending.append((self.step, loss, norm))
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                values = self._check_finite(pending)
                dt = time.time() - interval_t
                tok_s = self.tokens_per_step * interval_steps / dt if interval_steps and dt > 0 else None
                if tok_s is not None:
                    timed_tokens += self.tokens_per_step * interval_steps
                    timed_s += dt
                rec = {"type": "train", "step": self.step, "loss": values[-1], "lr": self.last_lr, "grad_norm": float(pending[-1][2]),
                       "tokens_per_s": tok_s, "mfu": self.mfu(tok_s), "elapsed_s": self.elapsed(), "mem_gb": self._mem_gb()}
                self._log(rec)
                bar.set_postfix(loss=f"{values[-1]:.4f}", lr=f"{self.last_lr:.2e}")
                pending.clear()
                interval_t, interval_steps = time.time(), 0
            if self.step % cfg.eval_interval == 0:
                t_eval = time.time()
                last_eval = self._eval_and_log()
                interval_t += time.time() - t_eval  # eval time does not count against tokens/s
            if cfg.save_interval and self.step % cfg.save_interval == 0:
                self.save()
        bar.close()
        if pending:  # the loop ended between log points: check the tail for NaN too
            self._check_finite(pending)
        if last_eval is None or last_eval["step"] != self.step:
            last_eval = self._eval_and_log()
        self.save()
        tok_s = timed_tokens / timed_s if timed_s > 0 else None
        summary = {**last_eval, "type": "summary", "steps": self.step, "tokens_seen": self.step * self.tokens_per_step,
                   "wall_s": self.elapsed(), "first_step_s": first_step_s, "tokens_per_s": tok_s, "mfu": self.mfu(tok_s),
                   "peak_mem_gb": self._mem_gb(), "n_params": self.n_params}
        self._log(summary)
        return summary

    def _check_finite(self, pending: list[tuple[int, torch.Tensor, torch.Tensor]]) -> list[float]:
        """Rank-mean losses of the pending steps (one device sync); raise at the first NaN/inf."""
        values = self._mean_across_ranks(torch.stack([p[1] for p in pending])).tolist()
        for (step, _, _), v in zip(pending, values):
            if not math.isfinite(v):
                raise TrainingDivergedError(
                    f"loss became {v} at step {step}: lower --lr, raise --warmup-steps, or train with "
                    "--dtype float32 to rule out an fp16/bf16 overflow"
                )
        return values

    def _eval_and_log(self) -> dict:
        rec = {"type": "eval", "step": self.step, **self.evaluate()}
        if self.cfg.sample_tokens and self.master:
            rec["sample"] = self.sample(self.cfg.sample_tokens, self.cfg.sample_prompt)
        self._log(rec)
        return rec

    def mfu(self, tokens_per_s: Optional[float]) -> Optional[float]:
        """Model FLOPs utilisation: achieved training FLOP/s over the cards' peak (None off-GPU)."""
        if tokens_per_s is None or self.peak is None:
            return None
        return tokens_per_s * self.flops_per_token / (self.peak * self.world_size)

    def _mem_gb(self) -> Optional[float]:
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
