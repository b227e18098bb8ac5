"""Decode attention over a paged KV cache: one new query per sequence, split-KV ("flash-decoding").

A decode step has one query row per sequence, so attention is a matrix-vector product per head:
memory-bound, and with a small batch there are too few (sequence, head) pairs to fill the GPU.
Flash-decoding (Dao et al. 2023) also splits each sequence's keys into ``S`` chunks: program
(b, kv_head, s) reads the blocks of chunk s through the block table, computes the partial
softmax of the ``G = H / Hkv`` query heads that share this KV head (GQA: K/V are read once per
group), and writes an unnormalised output with its running max ``m`` and sum ``l``. A short
reduction rescales the chunks by ``exp(m_s - max_s m_s)`` and normalises.

Shapes: q ``[B, H, D]``; k_cache, v_cache ``[num_blocks, block_size, Hkv, D]``; block_tables
``[B, max_blocks]`` (int32, padded with any valid id); context_lens ``[B]`` (>= 1) -> ``[B, H, D]``.
``paged_decode_attention_torch`` is the plain PyTorch path (CPU, and the reference).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._launch import check_tensors, launcher

__all__ = ["num_splits", "paged_decode_attention", "paged_decode_attention_torch"]


def _check(q, k_cache, v_cache, block_tables, context_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged decode attention wants q [B, H, D] and k/v caches [blocks, block_size, Hkv, D] of one shape; "
                         f"got q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    if k_cache.shape[3] != D or H % Hkv != 0:
        raise ValueError(f"head dims must match and H ({H}) must be a multiple of Hkv ({Hkv})")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or context_lens.shape != (B,):
        raise ValueError(f"block_tables must be [B={B}, max_blocks] and context_lens [B]; got "
                         f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}")
    if block_tables.is_floating_point() or context_lens.is_floating_point():
        raise ValueError("block_tables and context_lens must be integer tensors")


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 scale: float | None = None) -> torch.Tensor:
    """The same result by gathering each row's blocks and masking past its length (fp32 softmax; fp64 for fp64)."""
    _check(q, k_cache, v_cache, block_tables, context_lens)
    B, H, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    T = block_tables.shape[1] * bs
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    idx, acc = block_tables.long(), torch.promote_types(q.dtype, torch.float32)
    k = k_cache[idx].view(B, T, Hkv, D).to(acc)
    v = v_cache[idx].view(B, T, Hkv, D).to(acc)
    qg = q.view(B, Hkv, H // Hkv, D).to(acc)
    scores = torch.einsum("bhgd,bthd->bhgt", qg, k) * scale
    valid = torch.arange(T, device=q.device)[None, :] < context_lens[:, None]
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgt,bthd->bhgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(B, H, D).to(q.dtype)


@triton.jit
def _decode_split_kernel(Q, K, V, BT, CL, O, M, L,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_btb,
                         stride_ob, stride_oh, stride_os, stride_mb, stride_mh,
                         scale, blocks_per_split,
                         G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BS: tl.constexpr):
    b = tl.program_id(0)
    hkv = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(CL + b)
    g = tl.arange(0, GP)
    d = tl.arange(0, DP)
    t = tl.arange(0, BS)
    gmask = g < G
    dmask = d < D
    heads = hkv * G + g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0).to(tl.float32) * scale
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, DP], tl.float32)
    first = s * blocks_per_split
    end = tl.minimum(first + blocks_per_split, tl.cdiv(ctx, BS))
    for j in range(first, end):
        blk = tl.load(BT + b * stride_btb + j).to(tl.int64)
        tmask = j * BS + t < ctx
        kv_off = blk * stride_kb + t[:, None] * stride_ks + hkv * stride_kh + d[None, :]
        kvmask = tmask[:, None] & dmask[None, :]
        k = tl.load(K + kv_off, mask=kvmask, other=0.0).to(tl.float32)  # [BS, DP]
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GP, BS]
        scores = tl.where(tmask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        v = tl.load(V + kv_off, mask=kvmask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    o_ptr = O + b * stride_ob + heads[:, None] * stride_oh + s * stride_os + d[None, :]
    tl.store(o_ptr, acc, mask=gmask[:, None] & dmask[None, :])
    ml_off = b * stride_mb + heads * stride_mh + s
    tl.store(M + ml_off, m_i, mask=gmask)
    tl.store(L + ml_off, l_i, mask=gmask)


def num_splits(batch: int, n_kv_heads: int, max_blocks: int, target_programs: int = 264) -> tuple[int, int]:
    """``(splits, blocks_per_split)``: enough programs to fill the GPU (~2 per SM), at least one block each."""
    want = max(1, min(max_blocks, math.ceil(target_programs / max(1, batch * n_kv_heads))))
    per = math.ceil(max_blocks / want)
    return math.ceil(max_blocks / per), per


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor,
                           scale: float | None = None, splits: int | None = None) -> torch.Tensor:
    """Split-KV paged decode attention in Triton (see the module docstring); ``[B, H, D]``.

    The number of splits depends only on (B, Hkv, max_blocks), never on the lengths, so one
    CUDA graph per batch size serves every step.
    """
    _check(q, k_cache, v_cache, block_tables, context_lens)
    check_tensors("paged_decode_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    B, H, D = q.shape
    bs, Hkv = k_cache.shape[1], k_cache.shape[2]
    if bs & (bs - 1):
        raise ValueError(f"the Triton decode kernel needs a power-of-two block_size, got {bs}")
    max_blocks = block_tables.shape[1]
    S, per = num_splits(B, Hkv, max_blocks) if splits is None else (splits, math.ceil(max_blocks / splits))
    q = q.contiguous()
    k_cache, v_cache = k_cache.contiguous(), v_cache.contiguous()
    bt = block_tables.to(torch.int32).contiguous()
    cl = context_lens.to(torch.int32).contiguous()
    o = torch.empty(B, H, S, D, device=q.device, dtype=torch.float32)
    m = torch.empty(B, H, S, device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    G = H // Hkv
    launcher(_decode_split_kernel, q)[(B, Hkv, S)](
        q, k_cache, v_cache, bt, cl, o, m, l,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), bt.stride(0),
        o.stride(0), o.stride(1), o.stride(2), m.stride(0), m.stride(1),
        1.0 / math.sqrt(D) if scale is None else scale, per,
        G=G, GP=triton.next_power_of_2(G), D=D, DP=triton.next_power_of_2(D), BS=bs,
    )
    w = torch.exp(m - m.amax(dim=-1, keepdim=True))  # empty splits have m = -inf -> weight 0
    out = (o * w[..., None]).sum(dim=2) / (l * w).sum(dim=-1)[..., None]
    return out.to(q.dtype)
