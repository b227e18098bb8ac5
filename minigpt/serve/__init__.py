"""Serving: a continuous-batching engine over a paged KV cache, and an OpenAI-compatible server.

``SamplingParams`` says how to pick tokens, ``Engine`` runs requests, ``python -m minigpt serve``
(``minigpt.serve.server``) puts the engine behind HTTP.
"""

from .engine import Engine, StepOutput
from .paged_cache import BlockAllocator, PagedKVCache
from .params import SamplingParams
from .scheduler import dynamic_batching

__all__ = ["Engine", "StepOutput", "SamplingParams", "BlockAllocator", "PagedKVCache", "dynamic_batching"]
