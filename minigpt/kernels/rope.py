"""Rotary position embedding (RoPE) as a Triton kernel, rotate-half (GPT-NeoX / HF Llama) layout.

Same arguments and result as `minigpt.rope.apply_rope`: for x [B, T, H, D] with halves
x1 = x[..., :D/2], x2 = x[..., D/2:] and cos/sin [T, D/2],
    out = cat(x1*cos - x2*sin, x2*cos + x1*sin)
computed in fp32 and cast back to x's dtype. A rotation's inverse is the rotation by the opposite
angle, so the backward pass is the same kernel with sin -> -sin. Layers:
`_rope_kernel` -> `rope_launch` -> `RoPEFunction` / `RoPEQKFunction` -> `apply_rope` /
`apply_rope_qk` (q and k in one launch, as a model calls it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import acc_dtype, check_tensors, launcher


@triton.jit
def _head_ptrs(X, b, t, n_heads, stride_b, stride_t, stride_h, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, half):
    """Pointers to the first halves of all heads of token (b, t) of X, [BLOCK_H, BLOCK_D], and their mask."""
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    mask = (h < n_heads)[:, None] & (d < half)[None, :]
    return X + b * stride_b + t * stride_t + h[:, None] * stride_h + d[None, :], mask


@triton.jit
def _rope_kernel(
    Q, K, COS, SIN, QO, KO,
    seq_len, n_q_heads, n_k_heads, half,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_qob, stride_qot, stride_qoh, stride_kob, stride_kot, stride_koh, stride_cs,
    INVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rotate every head of q *and* k at one token (b, t). Grid (B * T,).

    Memory traffic per element: read x once, write y once (2 + 2 bytes in bf16). The token's
    cos/sin row (D/2 values each) is loaded once and reused by every head of q and of k: one
    launch and one table read for both, where rotating q and k separately costs two launches
    and two table reads (and eager PyTorch goes back to HBM for every broadcasted op).
    All four loads (both halves of q and of k) are issued before the first store: the compiler
    does not move a load above a store that might alias it. On the H200 at D = 64 (8 warps),
    storing q before loading k took 43.8 us a forward pass, the loads first 34.8 us
    (`results/kernels.json` as of commit a6c4f76, and `results/kernel_sweep.json`).
    n_k_heads = 0 rotates q alone (the masked loads of k do nothing).
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half
    cos = tl.load(COS + t * stride_cs + d, mask=d_mask, other=0.0).to(ACC)[None, :]
    sin = tl.load(SIN + t * stride_cs + d, mask=d_mask, other=0.0).to(ACC)[None, :]
    if INVERSE:
        sin = -sin
    q_ptrs, q_mask = _head_ptrs(Q, b, t, n_q_heads, stride_qb, stride_qt, stride_qh, BLOCK_HQ, BLOCK_D, half)
    k_ptrs, k_mask = _head_ptrs(K, b, t, n_k_heads, stride_kb, stride_kt, stride_kh, BLOCK_HK, BLOCK_D, half)
    q1 = tl.load(q_ptrs, mask=q_mask, other=0.0).to(ACC)
    q2 = tl.load(q_ptrs + half, mask=q_mask, other=0.0).to(ACC)
    k1 = tl.load(k_ptrs, mask=k_mask, other=0.0).to(ACC)
    k2 = tl.load(k_ptrs + half, mask=k_mask, other=0.0).to(ACC)
    qo_ptrs, _ = _head_ptrs(QO, b, t, n_q_heads, stride_qob, stride_qot, stride_qoh, BLOCK_HQ, BLOCK_D, half)
    ko_ptrs, _ = _head_ptrs(KO, b, t, n_k_heads, stride_kob, stride_kot, stride_koh, BLOCK_HK, BLOCK_D, half)
    tl.store(qo_ptrs, (q1 * cos - q2 * sin).to(QO.dtype.element_ty), mask=q_mask)
    tl.store(qo_ptrs + half, (q2 * cos + q1 * sin).to(QO.dtype.element_ty), mask=q_mask)
    tl.store(ko_ptrs, (k1 * cos - k2 * sin).to(KO.dtype.element_ty), mask=k_mask)
    tl.store(ko_ptrs + half, (k2 * cos + k1 * sin).to(KO.dtype.element_ty), mask=k_mask)


def rope_launch(
    q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, inverse: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch one program per token on q [B, T, H, D] and k [B, T, Hkv, D] (or None): one launch.

    Any strides with unit stride along D. Returns new contiguous tensors in the inputs' dtypes;
    `inverse` rotates by -angle.
    """
    batch, seq_len, n_heads, head_dim = q.shape
    qo = torch.empty((batch, seq_len, n_heads, head_dim), dtype=q.dtype, device=q.device)
    ko = None if k is None else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if qo.numel() == 0:
        return qo, ko
    half = head_dim // 2
    kk, kko = (q, qo) if k is None else (k, ko)  # placeholders when there is no k (never read)
    assert kko is not None
    n_k_heads = 0 if k is None else k.shape[2]
    block_hq, block_hk = triton.next_power_of_2(n_heads), triton.next_power_of_2(max(1, n_k_heads))
    block_d = triton.next_power_of_2(half)
    launcher(_rope_kernel, q)[(batch * seq_len,)](
        q, kk, cos, sin, qo, kko, seq_len, n_heads, n_k_heads, half,
        q.stride(0), q.stride(1), q.stride(2), kk.stride(0), kk.stride(1), kk.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), kko.stride(0), kko.stride(1), kko.stride(2), cos.stride(0),
        INVERSE=inverse, ACC=acc_dtype(q), BLOCK_HQ=block_hq, BLOCK_HK=block_hk, BLOCK_D=block_d,
        num_warps=_num_warps(block_hq, block_hk if k is not None else 0, block_d),
    )
    return qo, ko


def _num_warps(block_hq: int, block_hk: int, block_d: int) -> int:
    """Warps per program (one token: q's and k's heads, both halves): 16 elements a thread.

    Measured on the H200 (`scripts/gpu_kernel_sweep.py`): 4 warps at D = 64 (12 heads) run at
    30.2 us against 34.8 us on 8 warps; 16 warps at D = 128 (32 heads) are the best of 1..16.
    """
    return min(16, max(1, triton.next_power_of_2(2 * (block_hq + block_hk) * block_d) // 512))


def _check(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    check_tensors("apply_rope", x=x, cos=cos, sin=sin)
    if x.ndim != 4:
        raise ValueError(f"apply_rope: x must be [B, T, H, D], got shape {tuple(x.shape)}")
    seq_len, head_dim = x.shape[1], x.shape[3]
    if head_dim % 2:
        raise ValueError(f"apply_rope: head dim D must be even to split into two halves, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != (seq_len, head_dim // 2):
            raise ValueError(
                f"apply_rope: {name} must be [T, D/2] = [{seq_len}, {head_dim // 2}] for x of shape "
                f"{tuple(x.shape)}, got {tuple(t.shape)}; slice the cache to the positions of x"
            )
    if x.stride(3) != 1:
        raise ValueError(
            f"apply_rope: x's last dimension must be contiguous (stride 1), got strides {x.stride()}; "
            "call .contiguous() first"
        )


def _check_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _check(q, cos, sin)
    _check(k, cos, sin)
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"apply_rope_qk: q [B, T, H, D] = {tuple(q.shape)} and k [B, T, Hkv, D] = {tuple(k.shape)} "
            "must agree on B, T and D"
        )
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"apply_rope_qk: q and k must share dtype and device, got {q.dtype}/{q.device} and {k.dtype}/{k.device}")


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(3) == 1 else x.contiguous()


def _tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin as the kernel reads them: unit stride along D/2 and one row stride for both (a slice
    of a wider table is used in place; copying it would cost two more launches per call)."""
    if cos.stride(1) == 1 and sin.stride() == cos.stride():
        return cos, sin
    return cos.contiguous(), sin.contiguous()


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper for one tensor: saves only cos and sin; backward rotates dy back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = _tables(cos, sin)
        ctx.save_for_backward(cos, sin)
        return rope_launch(x, None, cos, sin, inverse=False)[0]

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return rope_launch(_unit_last(dy), None, cos, sin, inverse=True)[0], None, None


class RoPEQKFunction(torch.autograd.Function):
    """Autograd wrapper for q and k together: one launch forward, one launch backward."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cos, sin = _tables(cos, sin)
        ctx.save_for_backward(cos, sin)
        return rope_launch(q, k, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dq: torch.Tensor, dk: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq, dk_rot = rope_launch(_unit_last(dq), _unit_last(dk), cos, sin, inverse=True)
        return dq, dk_rot, None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the angles in cos/sin [T, D/2]; returns a new [B, T, H, D].

    x may be any strided view with a contiguous last dimension (e.g. q from a fused qkv linear).
    cos and sin are treated as constants: no gradient flows to them.
    """
    _check(x, cos, sin)
    return RoPEFunction.apply(x, cos, sin)


def apply_rope_qk(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, T, H, D] and k [B, T, Hkv, D] in one launch: ``(apply_rope(q), apply_rope(k))``.

    A model always rotates both; doing it in one kernel reads the cos/sin row of each token once
    and pays one launch (forward and backward) instead of two.
    """
    _check_qk(q, k, cos, sin)
    return RoPEQKFunction.apply(q, k, cos, sin)
