"""SwiGLU's gating as a Triton kernel: silu(gate) * up, elementwise.

In a SwiGLU MLP, down(silu(gate(x)) * up(x)), eager PyTorch writes silu(gate) to memory and reads
it back for the product; the fused kernel reads gate and up once and writes the result once. The
backward recomputes silu from the saved inputs instead of storing it. Layers:
`_swiglu_fwd_kernel` / `_swiglu_bwd_kernel` -> `swiglu_forward` / `swiglu_backward` ->
`SwiGLUFunction` -> `swiglu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import acc_dtype, as_rows, check_tensors, launcher

BLOCK = 1024


@triton.jit
def _row_offsets(offs, n_cols, stride, CONTIGUOUS: tl.constexpr):
    """Element offset of flat index `offs` in a [rows, n_cols] tensor with row stride `stride`.

    The integer division is skipped (at compile time) when all tensors are contiguous.
    """
    if CONTIGUOUS:
        idx = offs
    else:
        idx = (offs // n_cols) * stride + offs % n_cols
    return idx


@triton.jit
def _swiglu_fwd_kernel(
    G, U, Y, n_elements, n_cols, stride_g, stride_u,
    CONTIGUOUS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = silu(g) * u over a flat block of BLOCK elements (y contiguous, g/u row-strided).

    Memory traffic per element: read g and u, write y (2 + 2 + 2 bytes in bf16), against 10 for
    eager PyTorch (silu reads g and writes s; the product reads s and u and writes y).
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G + _row_offsets(offs, n_cols, stride_g, CONTIGUOUS), mask=mask, other=0.0).to(ACC)
    u = tl.load(U + _row_offsets(offs, n_cols, stride_u, CONTIGUOUS), mask=mask, other=0.0).to(ACC)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DY, G, U, DG, DU, n_elements, n_cols, stride_dy, stride_g, stride_u,
    CONTIGUOUS: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """dg = dy * u * sig(g) * (1 + g * (1 - sig(g))),  du = dy * silu(g).

    Memory traffic per element: read dy, g, u and write dg, du (10 bytes in bf16); silu is
    recomputed from g, which costs a few flops and saves storing (and re-reading) it.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(DY + _row_offsets(offs, n_cols, stride_dy, CONTIGUOUS), mask=mask, other=0.0).to(ACC)
    g = tl.load(G + _row_offsets(offs, n_cols, stride_g, CONTIGUOUS), mask=mask, other=0.0).to(ACC)
    u = tl.load(U + _row_offsets(offs, n_cols, stride_u, CONTIGUOUS), mask=mask, other=0.0).to(ACC)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DG + offs, (dy * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * silu).to(DU.dtype.element_ty), mask=mask)


def _contiguous(*rows: torch.Tensor) -> bool:
    return all(t.stride(0) == t.shape[1] for t in rows)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel on 2D gate/up [N, F] (unit column stride): y [N, F] contiguous."""
    n_elements, n_cols = gate.numel(), gate.shape[1]
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if n_elements:
        launcher(_swiglu_fwd_kernel, gate)[(triton.cdiv(n_elements, BLOCK),)](
            gate, up, y, n_elements, n_cols, gate.stride(0), up.stride(0),
            CONTIGUOUS=_contiguous(gate, up), ACC=acc_dtype(gate), BLOCK=BLOCK, num_warps=4,
        )
    return y


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward kernel on 2D [N, F] tensors: (dgate, dup), contiguous."""
    n_elements, n_cols = gate.numel(), gate.shape[1]
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if n_elements:
        launcher(_swiglu_bwd_kernel, gate)[(triton.cdiv(n_elements, BLOCK),)](
            dy, gate, up, dg, du, n_elements, n_cols, dy.stride(0), gate.stride(0), up.stride(0),
            CONTIGUOUS=_contiguous(dy, gate, up), ACC=acc_dtype(gate), BLOCK=BLOCK, num_warps=4,
        )
    return dg, du


def _check(gate: torch.Tensor, up: torch.Tensor) -> None:
    check_tensors("swiglu", gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate and up must have the same dtype, got {gate.dtype} and {up.dtype}")
    if gate.ndim < 1:
        raise ValueError("swiglu: gate and up must have at least one dimension, got scalars")


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper: saves only gate and up (silu is recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        n_cols = gate.shape[-1]
        g2, u2 = as_rows(gate, n_cols), as_rows(up, n_cols)
        ctx.save_for_backward(g2, u2)
        ctx.shape = gate.shape
        return swiglu_forward(g2, u2).view(gate.shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        g2, u2 = ctx.saved_tensors
        dg, du = swiglu_backward(as_rows(dy, g2.shape[1]), g2, u2)
        return dg.view(ctx.shape), du.view(ctx.shape)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for two tensors of the same shape [..., F]; returns [..., F].

    gate and up may be row-strided views (e.g. the two halves of one fused linear output).
    """
    _check(gate, up)
    return SwiGLUFunction.apply(gate, up)
