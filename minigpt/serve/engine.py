"""The inference engine: requests in, tokens out, one scheduled step at a time.

``Engine`` ties together the paged KV cache (``paged_cache``), the scheduler (``scheduler``) and
the packed forward pass (``runner``). ``generate`` is the batch API; ``add_request`` / ``step`` /
``abort`` are what a server loop drives: every ``step`` runs one forward pass and returns the
tokens it produced, so a request can stream its output while others join and leave the batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from minigpt.model import MiniGPT
from minigpt.sampling import sample_next

from .paged_cache import BlockAllocator, PagedKVCache, blocks_for
from .params import SamplingParams
from .runner import GRAPH_TOKENS, ModelRunner, StepInputs
from .scheduler import ScheduledBatch, Scheduler, Sequence

__all__ = ["Engine", "StepOutput"]


@dataclass
class StepOutput:
    """Tokens one request produced in one step. ``finish_reason``: "length" | "stop" | "abort" | None."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None = None


class Engine:
    """Continuous-batching inference over a paged KV cache for a ``MiniGPT`` model.

    ``max_batch_size`` sequences and ``max_num_tokens`` tokens per step at most; the cache holds
    ``num_blocks`` blocks of ``block_size`` tokens (default: enough for ``max_batch_size`` full
    contexts, so preemption only happens when you ask for fewer). ``scheduler``: "continuous" or
    "dynamic" (see ``minigpt.serve.scheduler``). ``cuda_graphs`` (default: on CUDA) replays
    every step of up to 512 tokens (decode rows and prompt chunks; ``runner.GRAPH_TOKENS``) from
    CUDA graphs; ``cuda_graphs=True`` on CPU runs the same padded, static inputs eagerly (to test
    them without a GPU). ``fused`` (default: on CUDA, Llama-style
    models) uses fused q/k/v and gate/up matmuls and the Triton RMSNorm/RoPE/SwiGLU kernels; it
    copies those weights once, so build the engine after the last change to the weights.
    """

    def __init__(self, model: MiniGPT, max_batch_size: int = 64, max_num_tokens: int = 8192, block_size: int = 16,
                 num_blocks: int | None = None, scheduler: str = "continuous", cuda_graphs: bool | None = None,
                 fused: bool | None = None):
        if not isinstance(model, MiniGPT):
            raise ValueError(f"Engine needs a MiniGPT model, got {type(model).__name__}")
        for name, v in dict(max_batch_size=max_batch_size, max_num_tokens=max_num_tokens, block_size=block_size).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.model = model.eval()
        cfg = model.config
        self.max_seq_len = cfg.max_seq_len
        self.block_size = block_size
        self.max_blocks_per_seq = blocks_for(cfg.max_seq_len, block_size)
        if num_blocks is None:
            num_blocks = max_batch_size * self.max_blocks_per_seq + 1
        self.allocator = BlockAllocator(num_blocks)
        weight = model.tok_emb.weight
        self.device = weight.device
        assert cfg.n_kv_heads is not None  # resolved in ModelConfig.__post_init__
        self.cache = PagedKVCache(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim,
                                  device=weight.device, dtype=weight.dtype)
        self.scheduler = Scheduler(self.allocator, block_size, max_batch_size, max_num_tokens, scheduler)
        use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if fused is None:
            fused = self.device.type == "cuda" and ModelRunner.can_fuse(cfg)
        self.runner = ModelRunner(model, self.cache, max_batch_size, self.max_blocks_per_seq, use_graphs, fused,
                                  graph_tokens=min(max_num_tokens, GRAPH_TOKENS))
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[StepOutput] = []  # abort notices, returned by the next step
        self._ids = itertools.count()
        self._arrival = itertools.count()
        self.last_step = (0, 0)  # (decode rows, prefill tokens) of the last step: what `bench serve` breaks time down by

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt_ids: Seq[int], params: SamplingParams, request_id: str | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for a prompt that cannot be served."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = [int(t) for t in prompt_ids]
        V = self.model.config.vocab_size
        if not prompt:
            raise ValueError("prompt must hold at least one token")
        if any(not 0 <= t < V for t in prompt):
            raise ValueError(f"prompt token ids must be in [0, {V})")
        if len(prompt) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                             f"context of {self.max_seq_len} tokens; shorten the prompt or ask for fewer tokens")
        if blocks_for(len(prompt) + params.max_tokens - 1, self.block_size) > self.allocator.capacity:
            raise ValueError(f"this request needs more KV blocks than the cache has ({self.allocator.capacity}); "
                             "raise num_blocks")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        gen = None
        if params.seed is not None and params.temperature > 0:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
        seq = Sequence(request_id, prompt, params, next(self._arrival), generator=gen)
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its blocks; the next ``step`` reports it with reason "abort"."""
        seq = self._seqs.pop(str(request_id), None)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        self._pending.append(StepOutput(seq.request_id, [], True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> dict:
        """Blocks used/free, sequences running/waiting, tokens cached, preemptions so far."""
        running = self.scheduler.running
        return {
            "blocks_total": self.allocator.capacity,
            "blocks_used": self.allocator.num_used,
            "blocks_free": self.allocator.num_free,
            "block_size": self.block_size,
            "tokens_cached": sum(s.num_computed for s in running),
            "num_running": len(running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
        }

    # ------------------------------------------------------------------ one step
    def _slot(self, seq: Sequence, pos: int) -> int:
        return seq.blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def _prepare(self, batch: ScheduledBatch) -> tuple[StepInputs, list[Sequence]]:
        ids, pos, slots, rows, row_seqs = [], [], [], [], []
        tables, ctx_lens = [], []
        for seq in batch.decodes:
            p = seq.num_tokens - 1
            ids.append(seq.output[-1] if seq.output else seq.prompt[-1])
            pos.append(p)
            slots.append(self._slot(seq, p))
            tables.append(seq.blocks)
            ctx_lens.append(p + 1)
            rows.append(len(ids) - 1)
            row_seqs.append(seq)
        prefills = []
        for seq, n in batch.prefills:
            c = seq.num_computed
            start = len(ids)
            ids += seq.tokens[c:c + n]
            pos += range(c, c + n)
            slots += [self._slot(seq, p) for p in range(c, c + n)]
            blocks = torch.tensor(seq.blocks[:blocks_for(c + n, self.block_size)], dtype=torch.long)
            prefills.append((start, n, c + n, blocks.to(self.device)))
            if c + n == seq.num_tokens:
                rows.append(start + n - 1)
                row_seqs.append(seq)
        M = max((len(t) for t in tables), default=1)
        padded = torch.tensor([t + [0] * (M - len(t)) for t in tables], dtype=torch.int32).view(len(tables), M)
        dev = self.device
        packed = torch.tensor([ids, pos, slots], dtype=torch.long).to(dev, non_blocking=True)  # one copy, not three
        inp = StepInputs(
            input_ids=packed[0],
            positions=packed[1],
            slots=packed[2],
            num_decodes=len(batch.decodes),
            block_tables=padded.to(dev, non_blocking=True),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32).to(dev, non_blocking=True),
            prefills=prefills,
            logit_rows=torch.tensor(rows, dtype=torch.long).to(dev, non_blocking=True),
        )
        return inp, row_seqs

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        out = logits.argmax(dim=-1).tolist()  # greedy rows, and the default for all
        for i, seq in enumerate(seqs):
            p = seq.params
            if p.temperature > 0:
                out[i] = int(sample_next(logits[i:i + 1], p.temperature, p.top_k, p.top_p, seq.generator)[0])
        return out

    def step(self) -> list[StepOutput]:
        """Run one forward pass; returns one ``StepOutput`` per request that got a token (plus aborts)."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        self.last_step = (len(batch.decodes), sum(n for _, n in batch.prefills))
        inp, row_seqs = self._prepare(batch)
        logits = self.runner.run(inp)
        for seq in batch.decodes:
            seq.num_computed += 1
        for seq, n in batch.prefills:
            seq.num_computed += n
        for seq, tok in zip(row_seqs, self._sample(logits, row_seqs), strict=True):
            seq.output.append(tok)
            reason = None
            if tok in seq.params.stop_token_ids:
                reason = "stop"
            elif len(seq.output) >= seq.params.max_tokens:
                reason = "length"
            if reason is not None:
                seq.finish_reason = reason
                self.scheduler.remove(seq)
                del self._seqs[seq.request_id]
            outputs.append(StepOutput(seq.request_id, [tok], reason is not None, reason))
        return outputs

    # ------------------------------------------------------------------ batch API
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """New tokens for every prompt, in prompt order (runs the engine until all are done)."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; pass one, or one per prompt")
        ids: list[str] = []
        try:
            for p, sp in zip(prompts, params, strict=True):
                ids.append(self.add_request(p, sp))
        except ValueError:
            for i in ids:  # all or nothing: a bad prompt leaves no half-added batch behind
                self.abort(i)
            self._pending.clear()
            raise
        results: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished():
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id] += out.new_token_ids
        return [results[i] for i in ids]
