"""Serving: a continuous-batching engine over a paged KV cache, and an OpenAI-compatible server.

``SamplingParams`` says how to pick tokens, ``Engine`` runs requests, ``python -m minigpt serve``
(``minigpt.serve.server``) puts the engine behind HTTP::

    engine = Engine(model, max_batch_size=64)            # paged KV cache, continuous batching
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_tokens=20, temperature=0))

    rid = engine.add_request([1, 2, 3], SamplingParams(20))  # or step by step, as a server does
    while engine.has_unfinished():
        for out in engine.step():                       # StepOutput(request_id, new_token_ids, finished, finish_reason)
            ...
    engine.stats()                                      # blocks used/free, running/waiting, preemptions
"""

from .engine import Engine, StepOutput
from .paged_cache import BlockAllocator, PagedKVCache
from .params import SamplingParams
from .scheduler import dynamic_batching

__all__ = ["BlockAllocator", "Engine", "PagedKVCache", "SamplingParams", "StepOutput", "dynamic_batching"]
