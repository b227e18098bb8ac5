"""Absolute position encodings of the 2017 transformer: sinusoidal (fixed) and learned.

Both add a vector to the token embedding, so position enters the residual stream once, at the
bottom. RoPE (``minigpt.rope``) instead rotates queries and keys in every attention layer.
"""

from __future__ import annotations

import math

import torch

__all__ = ["sinusoidal_table"]


def sinusoidal_table(max_seq_len: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed table of Vaswani et al. (2017): ``[max_seq_len, dim]``, fp32.

    PE[p, 2i] = sin(p / base^(2i/dim)),  PE[p, 2i+1] = cos(p / base^(2i/dim)).
    """
    if dim % 2 != 0:
        raise ValueError(f"sinusoidal positions need an even dim, got {dim}")
    pos = torch.arange(max_seq_len, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    table = torch.zeros(max_seq_len, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)
    return table
