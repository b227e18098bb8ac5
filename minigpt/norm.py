"""RMSNorm (Zhang & Sennrich 2019): LayerNorm without the mean.

LayerNorm:  y = (x - mean(x)) / sqrt(var(x) + eps) * w + b
RMSNorm:    y = x / sqrt(mean(x^2) + eps) * w

The two agree when the features already have zero mean (and b = 0). RMSNorm needs one
reduction (sum of squares) instead of two (mean, then variance), and no bias.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from minigpt.ops import Ops

__all__ = ["RMSNorm", "add_rms_norm_reference", "make_norm", "rms_norm_reference"]


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dim of ``x[..., D]`` with ``weight[D]``; statistics in fp32.

    Normalises in fp32, casts back to ``x.dtype``, then scales by ``weight`` (the order used by
    Hugging Face Llama, so exported checkpoints give the same numbers).
    """
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float,
                           out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-norm residual add and the norm after it: ``(s, rms_norm(s).to(out_dtype))``, s = x + delta.

    s is x itself when delta is None. (`minigpt.ops` runs the two in one Triton kernel.)
    """
    s = x if delta is None else x + delta
    return s, rms_norm_reference(s, weight, eps).to(out_dtype)


class RMSNorm(nn.Module):
    """RMSNorm module: ``x[..., dim] -> same shape``. Uses the Triton kernel (via `minigpt.ops`) when ``use_triton``."""

    def __init__(self, dim: int, eps: float = 1e-5, use_triton: bool = False):
        super().__init__()
        self.eps = eps
        self.ops = Ops("triton" if use_triton else "torch")
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, norm(s))`` with s = x + delta: the residual add in front of this norm, done by its kernel
        (see `minigpt.model.Block.forward_fused`). Under autocast norm(s) is in the autocast dtype."""
        return self.ops.add_rms_norm(x, delta, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def make_norm(kind: str, dim: int, eps: float, use_triton: bool = False) -> nn.Module:
    """The block's normalisation layer: "rmsnorm" (weight only) or "layernorm" (weight + bias)."""
    if kind == "rmsnorm":
        return RMSNorm(dim, eps, use_triton=use_triton)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; choose 'rmsnorm' or 'layernorm'")
