"""Rotary position embedding (RoPE) as a Triton kernel, rotate-half (GPT-NeoX / HF Llama) layout.

Same arguments and result as `minigpt.rope.apply_rope`: for x [B, T, H, D] with halves
x1 = x[..., :D/2], x2 = x[..., D/2:] and cos/sin [T, D/2],
    out = cat(x1*cos - x2*sin, x2*cos + x1*sin)
computed in fp32 and cast back to x's dtype. A rotation's inverse is the rotation by the opposite
angle, so the backward pass is the same kernel with sin -> -sin. Layers:
`_rope_kernel` -> `rope_launch` -> `RoPEFunction` -> `apply_rope`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import acc_dtype, check_tensors, num_warps_for


@triton.jit
def _rope_kernel(
    X, COS, SIN, Y,
    seq_len, n_heads, half,
    stride_xb, stride_xt, stride_xh, stride_yb, stride_yt, stride_yh, stride_cs,
    INVERSE: tl.constexpr, ACC: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rotate all heads of one token (b, t): a [BLOCK_H, BLOCK_D] tile per half.

    Memory traffic per element: read x once, write y once (2 + 2 bytes in bf16). The token's
    cos/sin row (D/2 values each) is loaded once and reused by every head, which is what makes
    this cheaper than eager PyTorch, whose broadcasted ops each go back to HBM.
    """
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)
    h = tl.arange(0, BLOCK_H)
    d_mask = d < half
    mask = (h < n_heads)[:, None] & d_mask[None, :]
    cos = tl.load(COS + t * stride_cs + d, mask=d_mask, other=0.0).to(ACC)[None, :]
    sin = tl.load(SIN + t * stride_cs + d, mask=d_mask, other=0.0).to(ACC)[None, :]
    if INVERSE:
        sin = -sin
    x_ptrs = X + b * stride_xb + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    y_ptrs = Y + b * stride_yb + t * stride_yt + h[:, None] * stride_yh + d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(ACC)
    tl.store(y_ptrs, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptrs + half, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Launch one program per token on x [B, T, H, D] (any strides, unit stride along D).

    Returns a new contiguous [B, T, H, D] tensor in x's dtype; `inverse` rotates by -angle.
    """
    batch, seq_len, n_heads, head_dim = x.shape
    y = torch.empty((batch, seq_len, n_heads, head_dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    half = head_dim // 2
    block_h, block_d = triton.next_power_of_2(n_heads), triton.next_power_of_2(half)
    _rope_kernel[(batch * seq_len,)](
        x, cos, sin, y, seq_len, n_heads, half,
        x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2), cos.stride(0),
        INVERSE=inverse, ACC=acc_dtype(x), BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=num_warps_for(2 * block_h * block_d),
    )
    return y


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


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper: saves only cos and sin; backward is the inverse rotation of dy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return rope_launch(x, cos, sin, inverse=False)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dy = dy if dy.stride(3) == 1 else dy.contiguous()
        return rope_launch(dy, cos, sin, inverse=True), None, None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, T, H, D] by the angles in cos/sin [T, D/2]; returns a new [B, T, H, D].

    x may be any strided view with a contiguous last dimension (e.g. q from a fused qkv linear).
    cos and sin are treated as constants: no gradient flows to them.
    """
    _check(x, cos, sin)
    return RoPEFunction.apply(x, cos, sin)
