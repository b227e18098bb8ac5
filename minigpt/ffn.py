"""The feed-forward half of a block: the 2017 GELU MLP and the gated SwiGLU (Shazeer 2020).

GELU MLP:  y = W2 · gelu(W1 x)                    two matrices, width 4*dim
SwiGLU:    y = W_down · (silu(W_gate x) ⊙ W_up x)  three matrices, width 8/3*dim (same params)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.ops import Ops

__all__ = ["GeluMLP", "SwiGLU", "swiglu_reference"]


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated activation ``silu(gate) * up``, with ``silu(g) = g * sigmoid(g)``."""
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """``x[..., dim] -> [..., dim]`` through a SwiGLU of width ``ffn_dim``; no biases (Llama)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0, use_triton: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.ops = Ops("triton" if use_triton else "torch")  # the gating: reference or fused kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x))))


class GeluMLP(nn.Module):
    """The 2017/GPT-2 MLP: ``x -> W2 gelu(W1 x)`` with width ``ffn_dim`` (4*dim by default)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.up_proj = nn.Linear(dim, ffn_dim, bias=False)
        self.down_proj = nn.Linear(ffn_dim, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x))))
