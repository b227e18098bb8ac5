"""Rotary position embeddings (Su et al. 2021): rotate each (q, k) feature pair by an angle
proportional to the token's position, so that q_m · k_n depends only on m - n.

Pair i of a head of size D turns at frequency ``inv_freq[i] = theta^(-2i/D)``; at position p its
angle is ``p * inv_freq[i]``. Two memory layouts exist for "pair i":

- rotate-half (GPT-NeoX, Hugging Face Llama; used here): pair i = features (i, i + D/2);
- interleaved (original Meta Llama, complex-number form): pair i = features (2i, 2i + 1).

They compute the same function only if the rows of W_q and W_k are permuted accordingly
(:func:`interleaved_to_half`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "apply_rope",
    "apply_rope_interleaved",
    "interleaved_to_half",
    "rope_cache",
    "rope_frequencies",
]


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: Mapping | None = None) -> torch.Tensor:
    """Angular frequency of each pair, ``[head_dim // 2]`` fp32, after optional context scaling.

    ``scaling`` is None or ``{"type": "linear" | "ntk", "factor": s}``:

    - linear (position interpolation, Chen et al. 2023): every frequency / s, i.e. positions are
      squeezed into the trained range;
    - ntk (NTK-aware, bloc97 2023): theta * s^(D / (D - 2)), which leaves the fastest pair
      unchanged and slows the slowest pair by exactly s.
    """
    if head_dim <= 0 or head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even, positive head_dim, got {head_dim}")
    if theta <= 0:
        raise ValueError(f"theta must be positive, got {theta}")
    kind, factor = None, 1.0
    if scaling is not None:
        kind, factor = scaling.get("type"), float(scaling.get("factor", 1.0))
        if kind not in ("linear", "ntk"):
            raise ValueError(f"unknown RoPE scaling type {kind!r}; choose 'linear' or 'ntk'")
        if factor < 1.0:
            raise ValueError(f"RoPE scaling factor must be >= 1, got {factor}")
    if kind == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if kind == "linear":
        inv_freq = inv_freq / factor
    return inv_freq.float()


def rope_cache(
    seq_len: int,
    head_dim: int,
    theta: float = 10000.0,
    scaling: Mapping | None = None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[seq_len, head_dim // 2]``: the rotation of every pair at every position.

    Angles are computed in float64 and rounded once, so long contexts keep their precision.
    ``dtype`` defaults to fp32.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    inv_freq = rope_frequencies(head_dim, theta, scaling).double()
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    dtype = dtype or torch.float32
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"apply_rope expects x of shape [B, T, H, D], got {tuple(x.shape)}")
    T, D = x.shape[1], x.shape[3]
    if cos.shape != (T, D // 2) or sin.shape != (T, D // 2):
        raise ValueError(
            f"cos/sin must be [T, D/2] = [{T}, {D // 2}] for x {tuple(x.shape)}, got "
            f"{tuple(cos.shape)} and {tuple(sin.shape)}; slice the cache to the positions of x"
        )


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x[B, T, H, D]`` (rotate-half layout) by ``cos, sin[T, D/2]``; math in >= fp32.

    out[..., :D/2] = x1 * cos - x2 * sin,   out[..., D/2:] = x2 * cos + x1 * sin.
    """
    _check(x, cos, sin)
    half = x.shape[-1] // 2
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos.to(compute)[:, None, :], sin.to(compute)[:, None, :]
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation in the interleaved layout: pair i = features (2i, 2i+1), as complex numbers."""
    _check(x, cos, sin)
    compute = torch.promote_types(x.dtype, torch.float32)
    xc = torch.view_as_complex(x.to(compute).reshape(*x.shape[:-1], -1, 2).contiguous())
    rot = torch.complex(cos.to(compute), sin.to(compute))
    return torch.view_as_real(xc * rot[:, None, :]).flatten(-2).to(x.dtype)


def interleaved_to_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the output rows of a q/k projection ``[n_heads * D, in]`` from interleaved to rotate-half.

    Within each head, row 2i goes to i and row 2i+1 to i + D/2, so that
    ``apply_rope(x @ W_half.T) == permuted(apply_rope_interleaved(x @ W.T))`` and attention
    scores (dot products within a head) are unchanged. This is the permutation Hugging Face's
    Llama conversion script applies to Meta's checkpoints.
    """
    rows = weight.shape[0]
    if rows % n_heads != 0 or (rows // n_heads) % 2 != 0:
        raise ValueError(f"weight rows {rows} must be n_heads ({n_heads}) times an even head_dim")
    D = rows // n_heads
    return weight.view(n_heads, D // 2, 2, -1).transpose(1, 2).reshape(rows, -1)
