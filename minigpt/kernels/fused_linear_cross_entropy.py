"""Linear layer + cross-entropy without ever holding the full [N, V] logits.

The language-model head turns hidden states h [N, dim] into logits h @ W^T [N, V]; with V = 128k
and N = 16k tokens that tensor alone is 4 GiB in bf16, and eager training keeps two or three of
them alive. Here the rows are processed in chunks: for each chunk the logits are computed with a
cuBLAS matmul, the cross-entropy kernel of `minigpt.kernels.cross_entropy` turns them *in place*
into their gradient, and the gradients of h and W are accumulated right away
(dh = dlogits @ W, dW += dlogits^T @ h). dW is accumulated *inside* the matmul (``addmm_``: cuBLAS
adds the product to dW as it writes it), not as a product followed by an addition, which would
read and write the whole [V, dim] dW once more per chunk; as in Liger-Kernel it is kept in the
weight's dtype (fp32 accumulation inside each matmul), except fp16, whose range a sum over many
rows could overflow, which accumulates in fp32. Peak extra memory is one chunk of logits plus dW.
The kernel writes each chunk's gradient already divided by the count of valid targets (the mean),
so dh and dW need no pass of their own; fp16 chunks are the exception, kept unscaled
(softmax - onehot, in [-1, 1]) and divided at the end, because 1 / n_valid of a small probability
would underflow fp16.

As in `cross_entropy`, all gradients are computed in the forward pass (when grad is enabled)
and backward only scales them by the upstream scalar. The loss is the fp32 mean over rows whose
target is not `ignore_index` (0 with zero gradients when all are ignored).
Layers: `fused_linear_cross_entropy_forward` (launcher: chunk loop) ->
`FusedLinearCrossEntropyFunction` -> `fused_linear_cross_entropy`.
"""

from __future__ import annotations

import torch
import triton

from ._launch import check_tensors
from .cross_entropy import cross_entropy_forward

MAX_CHUNKS = 8


def chunk_rows(n_rows: int, vocab_size: int, dim: int) -> int:
    """Rows per chunk: a power of two such that a chunk of logits is about as big as h itself,
    but no more than ``MAX_CHUNKS`` chunks.

    Each chunk costs about eight launches from Python (~20 us each on the book's H200 VM), so the
    memory-first rule alone (Liger-Kernel's: 64 chunks for 16k tokens of a 384-wide model with a
    32k vocabulary) made a compiled training step host-bound; 8 chunks keep the logits at 1/8 of
    their full size (scripts/gpu_profile_train.py --diagnose measured the step on the H200).
    """
    by_memory = triton.next_power_of_2(triton.cdiv(n_rows, triton.cdiv(vocab_size, dim)))
    return max(1, by_memory, triton.cdiv(n_rows, MAX_CHUNKS))


def fused_linear_cross_entropy_forward(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, need_dh: bool, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Loss of h [N, dim] @ weight[V, dim]^T against targets [N], chunk by chunk over N.

    Returns (mean loss, dh [N, dim] or None, dW [V, dim] or None); the loss is accumulated in
    fp32 (fp64 for fp64 inputs), dW in weight's dtype (fp32 for fp16), returned in weight's dtype.
    """
    n_rows, dim = h.shape
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    n_valid = (targets != ignore_index).sum().clamp(min=1)
    scale_late = h.dtype == torch.float16  # fp16: unscaled chunk gradients (module docstring)
    grad_div = torch.ones_like(n_valid) if scale_late else n_valid
    dh = torch.empty_like(h) if need_dh else None
    dw_dtype = torch.float32 if weight.dtype == torch.float16 else weight.dtype
    dw = None
    loss_sum = torch.zeros((), dtype=acc, device=h.device)
    step = chunk_rows(n_rows, weight.shape[0], dim)
    for start in range(0, n_rows, step):
        h_chunk = h[start:start + step]
        logits = h_chunk @ weight.t()
        grad = logits if (need_dh or need_dw) else None
        loss_sum += cross_entropy_forward(logits, targets[start:start + step], ignore_index, grad_div, grad).sum()
        if dh is not None:
            torch.matmul(logits, weight, out=dh[start:start + step])
        if need_dw:
            if dw is None:
                dw = (logits.t() @ h_chunk).to(dw_dtype)
            elif dw.dtype == logits.dtype:
                # dW += dlogits^T h inside the matmul, in place. Traced by torch.compile it becomes an
                # addmm into a new buffer, which ATen starts with a copy of dW (13 us per chunk at
                # `small` on the H200: results/train/profile_small_ce.json), still less traffic than
                # a matmul and an add.
                dw.addmm_(logits.t(), h_chunk)
            else:
                dw += logits.t() @ h_chunk
    if need_dw and dw is None:  # no rows at all
        dw = torch.zeros(weight.shape, dtype=dw_dtype, device=weight.device)
    if scale_late:
        dh = None if dh is None else dh.div_(n_valid)
        dw = None if dw is None else dw / n_valid
    return loss_sum / n_valid, dh, None if dw is None else dw.to(weight.dtype)


def _check(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    check_tensors("fused_linear_cross_entropy", h=h, weight=weight)
    if h.ndim < 2:
        raise ValueError(f"fused_linear_cross_entropy: h must be [N, dim] or [B, T, dim], got {tuple(h.shape)}")
    if weight.ndim != 2 or weight.shape[1] != h.shape[-1]:
        raise ValueError(
            f"fused_linear_cross_entropy: weight must be [V, dim] with dim = {h.shape[-1]} (h's last "
            f"dimension), got {tuple(weight.shape)}"
        )
    if weight.dtype != h.dtype:
        raise ValueError(f"fused_linear_cross_entropy: h ({h.dtype}) and weight ({weight.dtype}) must share a dtype")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError("fused_linear_cross_entropy: targets must be an int64 (or int32) tensor of class ids")
    if tuple(targets.shape) != tuple(h.shape[:-1]):
        raise ValueError(
            f"fused_linear_cross_entropy: targets must have shape {tuple(h.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if targets.device != h.device:
        raise ValueError(f"fused_linear_cross_entropy: targets are on {targets.device} but h on {h.device}")


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper: gradients come from forward; backward multiplies them by the upstream scalar."""

    @staticmethod
    def forward(
        ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, need_dh: bool, need_dw: bool
    ) -> torch.Tensor:
        loss, dh, dw = fused_linear_cross_entropy_forward(
            h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1), ignore_index, need_dh, need_dw
        )
        ctx.h_shape = h.shape
        ctx.save_for_backward(*(g for g in (dh, dw) if g is not None))
        ctx.need = (need_dh, need_dw)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        saved = iter(ctx.saved_tensors)
        dh = next(saved) if ctx.need[0] else None
        dw = next(saved) if ctx.need[1] else None
        if dh is not None:
            dh = (dh * grad_output.to(dh.dtype)).view(ctx.h_shape)
        if dw is not None:
            dw = dw * grad_output.to(dw.dtype)
        return dh, dw, None, None, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean cross-entropy of logits h @ weight^T (h [..., dim], weight [V, dim]) against targets [...].

    Equal to `cross_entropy(h @ weight.t(), targets)` but never materialises [N, V] logits.
    """
    _check(h, weight, targets)
    grad_on = torch.is_grad_enabled()
    return FusedLinearCrossEntropyFunction.apply(
        h, weight, targets, ignore_index, grad_on and h.requires_grad, grad_on and weight.requires_grad
    )
