"""Causal self-attention with grouped-query heads (GQA) and a preallocated KV cache.

``n_heads`` query heads share ``n_kv_heads`` key/value heads: query head h reads KV head
``h // (n_heads // n_kv_heads)``. n_kv_heads = n_heads is classic multi-head attention (MHA),
n_kv_heads = 1 is multi-query attention (MQA). Fewer KV heads shrink the K/V projections and the
KV cache; they do not shrink the score matrix, which is still [n_heads, T_q, T_k].

Backends (all take q ``[B, H, Tq, D]``, k, v ``[B, Hkv, Tk, D]``; none repeats K/V in memory):

- "sdpa": ``torch.nn.functional.scaled_dot_product_attention`` with ``enable_gqa``;
- "naive": explicit softmax(q k^T / sqrt(D)) v in fp32, for teaching and as a reference;
- "triton": ``minigpt.kernels.flash_attention`` (training and prefill; a decode step with a
  cache offset falls back to SDPA, since one query row is a matrix-vector product).

The choice is made once, by `minigpt.ops.Ops` from ``ModelConfig.kernels`` / ``attn_backend``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from minigpt.config import ModelConfig
from minigpt.ops import Ops

__all__ = ["Attention", "KVCache", "kv_cache_bytes", "naive_attention", "sdpa_attention"]


def kv_cache_bytes(
    n_layers: int, n_tokens: int, n_kv_heads: int, head_dim: int, bytes_per_element: int = 2, batch: int = 1
) -> int:
    """Bytes of a KV cache: 2 (K and V) * layers * batch * tokens * kv_heads * head_dim * bytes/element."""
    for name, v in dict(n_layers=n_layers, n_tokens=n_tokens, n_kv_heads=n_kv_heads, head_dim=head_dim,
                        bytes_per_element=bytes_per_element, batch=batch).items():
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"kv_cache_bytes: {name} must be a non-negative int, got {v!r}")
    return 2 * n_layers * batch * n_tokens * n_kv_heads * head_dim * bytes_per_element


class KVCache:
    """Keys and values of every layer, preallocated for ``max_seq_len`` positions.

    ``k``, ``v``: ``[n_layers, batch, n_kv_heads, max_seq_len, head_dim]``. Decoding writes the
    new position in place instead of concatenating, so memory is allocated once.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_seq_len: int, head_dim: int,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_seq_len = max_seq_len

    @classmethod
    def for_model(cls, config: ModelConfig, batch_size: int, device=None, dtype=torch.float32) -> KVCache:
        assert config.n_kv_heads is not None  # resolved in ModelConfig.__post_init__
        return cls(config.n_layers, batch_size, config.n_kv_heads, config.max_seq_len, config.head_dim,
                   device=device, dtype=dtype)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v[B, Hkv, T, D]`` at positions ``start_pos..start_pos+T``; return all keys/values so far."""
        end = start_pos + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KV cache holds {self.max_seq_len} positions; writing up to {end} overflows it")
        if k.shape[0] != self.k.shape[1]:
            raise ValueError(f"KV cache was built for batch {self.k.shape[1]}, got batch {k.shape[0]}")
        self.k[layer, :, :, start_pos:end] = k
        self.v[layer, :, :, start_pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


def _causal_mask(tq: int, tk: int, device) -> torch.Tensor:
    """Boolean ``[tq, tk]``, True where allowed. Query i sits at absolute position tk - tq + i."""
    q_pos = torch.arange(tk - tq, tk, device=device)[:, None]
    return torch.arange(tk, device=device)[None, :] <= q_pos


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with GQA by reshaping, not repeating; scores in fp32.

    q ``[B, H, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` -> ``[B, H, Tq, D]``. Materialises the
    ``[B, H, Tq, Tk]`` score matrix: this is what FlashAttention avoids.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = H // Hkv
    qg = q.reshape(B, Hkv, g * Tq, D).float()  # the g query heads of a group share one K/V head
    scores = (qg @ k.float().transpose(-1, -2)) / math.sqrt(D)
    scores = scores.view(B, Hkv, g, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~_causal_mask(Tq, Tk, q.device), float("-inf"))
    p = F.dropout(torch.softmax(scores, dim=-1), dropout_p)
    out = p.view(B, Hkv, g * Tq, Tk) @ v.float()
    return out.view(B, H, Tq, D).to(q.dtype)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                   dropout_p: float = 0.0) -> torch.Tensor:
    """PyTorch's fused attention (flash / memory-efficient / cuDNN / math, chosen by PyTorch)."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask, is_causal = None, False
    if causal and Tq == Tk:
        is_causal = True
    elif causal and Tq > 1:
        mask = _causal_mask(Tq, Tk, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          enable_gqa=q.shape[1] != k.shape[1])


class Attention(nn.Module):
    """Multi-head causal self-attention: ``x[B, T, dim] -> [B, T, dim]`` (GQA, optional RoPE)."""

    def __init__(self, config: ModelConfig, layer_idx: int = 0):
        super().__init__()
        assert config.n_kv_heads is not None  # resolved in ModelConfig.__post_init__
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.layer_idx = layer_idx
        self.use_rope = config.pos_encoding == "rope"
        self.backend = "triton" if config.kernels == "triton" else config.attn_backend
        if self.backend == "triton" and config.dropout > 0:
            raise ValueError("the Triton attention kernel has no attention dropout; set dropout=0 "
                             "or use attn_backend='sdpa' with kernels='torch'")
        self.dropout = config.dropout
        self.q_proj = nn.Linear(config.dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.ops = Ops(config.kernels, config.attn_backend)

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                cache: KVCache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.use_rope:
            assert cos is not None and sin is not None, "a RoPE model passes its cos/sin tables"
            q, k = self.ops.rope_qk(q, k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, start_pos, k, v)
        y = self._attend(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.o_proj(y))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.ops.attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
