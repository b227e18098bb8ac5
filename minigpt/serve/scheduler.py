"""Which tokens run in the next forward pass: continuous batching and the article's dynamic batching.

A *step* is one forward pass over a packed batch: every running sequence in its decode phase
contributes one token, and sequences still reading their prompt contribute a *chunk* of it
(chunked prefill), all within ``max_num_tokens`` tokens and ``max_batch_size`` sequences.

- ``"continuous"`` (iteration-level batching, Yu et al. 2022, Orca): a waiting request joins at
  the next step if the budget and the KV blocks allow; a finished one leaves at once.
- ``"dynamic"`` (the article's ``dynamic_batching``): requests are grouped into batches up front;
  a batch runs until its *longest* request finishes, and only then does the next batch start.
  Slots freed by short requests stay idle: this is the cost continuous batching removes.

When a running sequence needs a new KV block and none is free, the most recently admitted
running sequence is *preempted*: its blocks are freed and it goes back to the front of the queue,
to be recomputed (prompt + tokens generated so far) when memory allows. Outputs are unchanged.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import torch

from .paged_cache import BlockAllocator, blocks_for
from .params import SamplingParams

__all__ = ["SCHEDULERS", "ScheduledBatch", "Scheduler", "Sequence", "dynamic_batching"]

SCHEDULERS = ("continuous", "dynamic")


def dynamic_batching(requests: Seq[int], max_batch_size: int, max_tokens: int) -> list[list[int]]:
    """The article's policy: group requests, in arrival order, into batches of at most
    ``max_batch_size`` requests and ``max_tokens`` tokens in total.

    ``requests[i]`` is the token count of request i (prompt + tokens to generate); returns the
    batches as lists of request indices. A request larger than ``max_tokens`` gets a batch alone.
    """
    if max_batch_size < 1 or max_tokens < 1:
        raise ValueError(f"max_batch_size and max_tokens must be >= 1, got {max_batch_size}, {max_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for i, n in enumerate(requests):
        if current and (len(current) == max_batch_size or tokens + n > max_tokens):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        tokens += n
    if current:
        batches.append(current)
    return batches


@dataclass(eq=False)  # compared by identity: `seq in running` must not compare token lists
class Sequence:
    """One request's state: its tokens, how many of them have K/V in the cache, and its blocks."""

    request_id: str
    prompt: list[int]
    params: SamplingParams
    arrival: int
    output: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    blocks: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None
    finish_reason: str | None = None
    first_token_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_total(self) -> int:
        """Tokens this sequence can ever hold in the cache (the last sampled token is never fed)."""
        return len(self.prompt) + self.params.max_tokens - 1


@dataclass
class ScheduledBatch:
    """One step's work: (sequence, number of new tokens), decodes (1 token each) first."""

    decodes: list[Sequence]
    prefills: list[tuple[Sequence, int]]

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    """Owns the waiting queue, the running set and the block allocator."""

    def __init__(self, allocator: BlockAllocator, block_size: int, max_batch_size: int, max_num_tokens: int,
                 policy: str = "continuous"):
        if policy not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {policy!r}; choose one of {SCHEDULERS}")
        if max_batch_size < 1 or max_num_tokens < max_batch_size:
            raise ValueError(f"need max_batch_size >= 1 and max_num_tokens >= max_batch_size, got "
                             f"{max_batch_size} and {max_num_tokens}")
        self.allocator, self.block_size = allocator, block_size
        self.max_batch_size, self.max_num_tokens, self.policy = max_batch_size, max_num_tokens, policy
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0
        self._batch_ids: set[str] = set()  # dynamic policy: the members of the current batch
        self._counter = itertools.count()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._free(seq)
        self._batch_ids.discard(seq.request_id)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _free(self, seq: Sequence) -> None:
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make ``seq`` own blocks for ``num_tokens`` tokens; False (nothing allocated) if too few are free."""
        need = blocks_for(num_tokens, self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.allocator.num_free:
            return False
        seq.blocks += self.allocator.allocate(need)
        return True

    def _preempt_last(self, keep: Sequence) -> Sequence | None:
        """Preempt the most recently admitted running sequence other than ``keep``; returns it (None if none)."""
        for victim in reversed(self.running):
            if victim is not keep:
                self.running.remove(victim)
                self._free(victim)
                self.waiting.appendleft(victim)
                self.num_preemptions += 1
                return victim
        return None

    def _admit_dynamic_batch(self) -> None:
        """Dynamic policy: when the previous batch is done, the next group of waiting requests forms one."""
        if self._batch_ids and any(s.request_id in self._batch_ids for s in self.running):
            return
        if self._batch_ids and any(s.request_id in self._batch_ids for s in self.waiting):
            return  # a preempted member is still to be resumed: the batch is not done
        sizes = [s.max_total + 1 for s in self.waiting]
        if sizes:  # the batch's token budget is the KV cache itself, so a batch never preempts
            first = dynamic_batching(sizes, self.max_batch_size, self.allocator.capacity * self.block_size)[0]
            self._batch_ids = {self.waiting[i].request_id for i in first}

    def schedule(self) -> ScheduledBatch:
        """Pick this step's tokens and make sure every picked token has a KV slot."""
        decodes: list[Sequence] = []
        preempted: set[int] = set()
        for seq in list(self.running):
            if id(seq) in preempted or seq.num_computed < seq.num_tokens - 1:
                continue  # preempted meanwhile, or still in its prompt
            while not self._grow(seq, seq.num_tokens):
                victim = self._preempt_last(keep=seq)
                if victim is None:
                    raise MemoryError("a single sequence does not fit in the KV cache; raise num_blocks")
                preempted.add(id(victim))
            decodes.append(seq)
        if preempted:
            decodes = [s for s in decodes if id(s) not in preempted]
        budget = self.max_num_tokens - len(decodes)
        prefills: list[tuple[Sequence, int]] = []
        for seq in self.running:  # sequences part-way through their prompt continue first
            if budget > 0 and seq.num_computed < seq.num_tokens - 1:
                n = self._chunk(seq, budget)
                if n:
                    prefills.append((seq, n))
                    budget -= n
        if self.policy == "dynamic":
            self._admit_dynamic_batch()
        while self.waiting and budget > 0 and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            if self.policy == "dynamic" and seq.request_id not in self._batch_ids:
                break
            n = self._chunk(seq, budget)
            if not n:
                break
            self.waiting.popleft()
            self.running.append(seq)
            prefills.append((seq, n))
            budget -= n
        if not decodes and not prefills and self.running:
            # every running sequence is stuck mid-prompt without blocks: free the newest and retry
            if self._preempt_last(keep=self.running[0]) is not None:
                return self.schedule()
        return ScheduledBatch(decodes, prefills)

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """Prompt tokens of ``seq`` to compute now (all but the last known token are prefill), 0 if no blocks."""
        remaining = seq.num_tokens - seq.num_computed  # prefill runs up to and including the last token
        n = min(remaining, budget)
        free_slots = (len(seq.blocks) + self.allocator.num_free) * self.block_size - seq.num_computed
        n = min(n, free_slots)
        if n <= 0:
            return 0
        self._grow(seq, seq.num_computed + n)
        return n
