"""One dispatch point between the model and its kernels: plain PyTorch or the book's Triton kernels.

``Ops(kernels)`` is chosen once, from ``ModelConfig.kernels``, and every module calls its methods
(``ops.rms_norm``, ``ops.add_rms_norm``, ``ops.rope_qk``, ``ops.swiglu``, ``ops.attention``,
``ops.lm_loss``) instead of deciding for itself. With ``"torch"`` they are the library's
reference functions; with ``"triton"`` they are the kernels of ``minigpt.kernels``, registered
here as PyTorch custom ops (namespace ``minigpt::``) with

- a fake (meta) implementation, so ``torch.compile`` can trace shapes without running a kernel,
- an autograd formula that calls a second custom op for the backward kernel,

so that ``torch.compile(model)`` compiles the whole model into one graph: a plain
``torch.autograd.Function`` around a Triton launch makes Dynamo break the graph there.

On a GPU each op is a ``torch.library.triton_op``: Inductor traces into it, sees the Triton
launches (`minigpt.kernels._launch.launcher` wraps them with ``wrap_triton`` while tracing) and
calls the kernels from its generated code, as it calls its own. An opaque ``custom_op`` would
cost a Python dispatch per call and per backward, which made the compiled training step of
`small` host-bound (issue 12: 41.6 ms of wall time for 15.6 ms of GPU kernels on the H200). In
Triton's CPU interpreter, which cannot run on fake tensors, the ops are ``custom_op``s with the
explicit fakes below. Two ops are opaque on purpose: attention's forward and backward on a Hopper GPU,
written in Gluon (`hopper_attention`), whose launches need the tensors' addresses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from minigpt.kernels import flash_attention as _fa
from minigpt.kernels import fused_linear_cross_entropy as _flce
from minigpt.kernels import rms_norm as _rms
from minigpt.kernels import rope as _rope
from minigpt.kernels import swiglu as _swiglu
from minigpt.kernels._launch import INTERPRET, as_rows

__all__ = ["KERNELS", "Ops"]

KERNELS = ("torch", "triton")


def _kernel_op(name: str, fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """Register the decorated function as the op ``minigpt::<name>``.

    A ``triton_op`` (its own fake: the function run on fake tensors, launches recorded) on a GPU;
    in the CPU interpreter a ``custom_op`` with `fake`, which computes the output shapes by hand.
    """
    def register(fn: Callable[..., Any]) -> Any:
        if not INTERPRET:
            return torch.library.triton_op(f"minigpt::{name}", fn, mutates_args=())
        op = torch.library.custom_op(f"minigpt::{name}", fn, mutates_args=())
        op.register_fake(fake)
        return op
    return register


# ------------------------------------------------------- RMSNorm, with the residual add before it
def _add_rms_norm_fake(x, delta, weight, eps, out_dtype):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = x.numel() // x.shape[-1]
    s = x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, delta.dtype)) if delta is not None else x.new_empty(0)
    return s, x.new_empty(x.shape, dtype=out_dtype), x.new_empty(rows, dtype=acc)


@_kernel_op("add_rms_norm", fake=_add_rms_norm_fake)
def _add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float,
                  out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """s = x + delta [..., D], y = rms_norm(s) [..., D] in out_dtype, rstd [N], from one kernel.

    Without delta it is a plain RMSNorm: s is x itself, which an op may not return, so it comes
    back empty.
    """
    n = x.shape[-1]
    s, y, rstd = _rms.add_rms_norm_forward(as_rows(x, n), None if delta is None else as_rows(delta, n), weight,
                                           eps, out_dtype)
    return x.new_empty(0) if s is None else s.view(x.shape), y.view(x.shape), rstd


def _add_rms_norm_backward_fake(dy, ds, s, weight, rstd, x_dtype, delta_dtype):
    split = delta_dtype != x_dtype
    return s.new_empty(s.shape, dtype=x_dtype), s.new_empty(s.shape if split else (0,), dtype=delta_dtype), \
        weight.new_empty(weight.shape)


@_kernel_op("add_rms_norm_backward", fake=_add_rms_norm_backward_fake)
def _add_rms_norm_backward(dy: Tensor, ds: Tensor | None, s: Tensor, weight: Tensor, rstd: Tensor,
                           x_dtype: torch.dtype, delta_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, ddelta, dweight); ddelta is empty unless delta's dtype differs from x's (it equals dx)."""
    n = s.shape[-1]
    dx, ddelta, dw = _rms.add_rms_norm_backward(as_rows(dy, n), None if ds is None else as_rows(ds, n),
                                                as_rows(s, n), weight, rstd, x_dtype, delta_dtype)
    return dx.view(s.shape), s.new_empty(0, dtype=delta_dtype) if ddelta is None else ddelta.view(s.shape), dw


def _add_rms_norm_setup(ctx, inputs, output):
    x, delta, weight, _, _ = inputs
    s = x if delta is None else output[0]
    ctx.save_for_backward(s, weight, output[2])
    ctx.has_delta = delta is not None
    ctx.dtypes = (x.dtype, x.dtype if delta is None else delta.dtype)


def _add_rms_norm_grad(ctx, ds, dy, _drstd):
    s, weight, rstd = ctx.saved_tensors
    ds = ds if ctx.has_delta else None  # without delta, s is x: its other uses send their gradients to x
    dx, ddelta, dw = _add_rms_norm_backward(dy, ds, s, weight, rstd, *ctx.dtypes)
    if not ctx.has_delta:
        return dx, None, dw, None, None
    return dx, ddelta if ctx.dtypes[0] != ctx.dtypes[1] else dx, dw, None, None


_add_rms_norm.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)


# -------------------------------------------------------------------------------------- SwiGLU
def _swiglu_op_fake(gate, up):
    return gate.new_empty(gate.shape)


@_kernel_op("swiglu", fake=_swiglu_op_fake)
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    n = gate.shape[-1]
    return _swiglu.swiglu_forward(as_rows(gate, n), as_rows(up, n)).view(gate.shape)


def _swiglu_backward_fake(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


@_kernel_op("swiglu_backward", fake=_swiglu_backward_fake)
def _swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    n = gate.shape[-1]
    dg, du = _swiglu.swiglu_backward(as_rows(dy, n), as_rows(gate, n), as_rows(up, n))
    return dg.view(gate.shape), du.view(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dy):
    return _swiglu_backward(dy, *ctx.saved_tensors)


_swiglu_op.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


# ---------------------------------------------------------------------------------------- RoPE
def _rope_qk_fake(q, k, cos, sin, inverse):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@_kernel_op("rope_qk", fake=_rope_qk_fake)
def _rope_qk(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
    """q and k rotated in one launch (``inverse`` rotates back: the backward pass)."""
    unit = lambda t: t if t.stride(-1) == 1 else t.contiguous()
    qo, ko = _rope.rope_launch(unit(q), unit(k), cos.contiguous(), sin.contiguous(), inverse)
    assert ko is not None  # k was given
    return qo, ko


def _rope_setup(ctx, inputs, output):
    _, _, cos, sin, inverse = inputs
    ctx.save_for_backward(cos, sin)
    ctx.inverse = inverse


def _rope_grad(ctx, dq, dk):
    cos, sin = ctx.saved_tensors
    dq, dk = _rope_qk(dq, dk, cos, sin, not ctx.inverse)
    return dq, dk, None, None, None


_rope_qk.register_autograd(_rope_grad, setup_context=_rope_setup)


# ------------------------------------------------------------------------------ FlashAttention
def _flash_fake(q, k, v, causal, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@_kernel_op("flash_attention", fake=_flash_fake)
def _flash(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """o [B, H, T, D] and the fp32 log-sum-exp [B, H, T] (saved for backward)."""
    return _fa.flash_attention_forward(q, k, v, causal=causal, scale=scale)


def _flash_backward_fake(do, q, k, v, o, lse, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@_kernel_op("flash_attention_backward", fake=_flash_backward_fake)
def _flash_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool,
                    scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _fa.flash_attention_backward(do, q, k, v, o, lse, causal=causal, scale=scale)


def _flash_setup(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.causal, ctx.scale = causal, scale


def _flash_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_backward(do, q, k, v, o, lse, ctx.causal, ctx.scale)  # do: o's layout, a view
    return dq, dk, dv, None, None


_flash.register_autograd(_flash_grad, setup_context=_flash_setup)


# Attention on Hopper. Where the GPU is an sm_90 and Triton ships Gluon (3.6 on), the causal forward over the
# inputs it covers runs `minigpt.kernels.gluon_attention` (two warpgroups to a program, FlashAttention-3's
# layout: 1.10-1.45x our portable forward's speed and at cuDNN's, chapter 11's appendix 11c), and so do the
# backward's Gluon kernels `backward_plan` names (dK/dV, dQ, or both in one pass); the rest of the backward is ours.
# Both are opaque custom ops, not triton_ops: their launches build TMA descriptors from the tensors'
# addresses, which Inductor's tracing (fake tensors) does not have, so compiled code calls them through the
# dispatcher (one Python call per layer and pass) instead of launching them itself.
_HOPPER_UNKNOWN = object()
_hopper: Any = _HOPPER_UNKNOWN


def hopper_attention() -> Any:
    """`minigpt.kernels.gluon_attention` where the current GPU is a Hopper and Triton has Gluon, else None.

    Decided once per process (it initialises CUDA): by `Ops` when a model is built, else at the first call."""
    global _hopper
    if _hopper is _HOPPER_UNKNOWN:
        _hopper = None
        if not INTERPRET and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9:
            try:
                import minigpt.kernels.gluon_attention as gluon_attention
                _hopper = gluon_attention
            except ImportError:  # Triton before 3.6: no triton.experimental.gluon
                pass
    return _hopper


def _flash_hopper_fake(q, k, v, causal, scale):
    return hopper_attention().output_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("minigpt::flash_attention_hopper", mutates_args=())
def _flash_hopper(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """`_flash`'s o and lse from the Gluon forward, at the tile and schedule measured fastest for the shape."""
    gluon = hopper_attention()
    tile, schedule = gluon.default_plan(q.shape[-1], q.shape[2])
    return gluon.gluon_attention_forward(q, k, v, tile, schedule, scale=scale)


def _flash_hopper_backward_fake(do, q, k, v, o, lse, scale):
    """Gradients in the memory order each kernel writes: a Gluon kernel's in its input's (`output_like`), the
    portable ones' as `torch.empty_like`."""
    gluon = hopper_attention()
    plan = gluon.backward_plan(q.shape[-1], q.shape[2])
    dq = torch.empty_like(q) if plan.dq is None else gluon.output_like(q)  # the one pass: the portable last kernel's
    if plan.dkdv is None and plan.one_pass is None:
        return dq, torch.empty_like(k), torch.empty_like(v)
    return dq, gluon.output_like(k), gluon.output_like(k)


@torch.library.custom_op("minigpt::flash_attention_hopper_backward", mutates_args=())
def _flash_hopper_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                           scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """`_flash_backward`'s (dq, dk, dv) with the Gluon kernels `backward_plan` names."""
    gluon = hopper_attention()
    return gluon.gluon_attention_backward(do, q, k, v, o, lse, *gluon.backward_plan(q.shape[-1], q.shape[2]), scale)


def _flash_hopper_grad(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _flash_hopper_backward(do, q, k, v, o, lse, ctx.scale)  # the portable kernels where the plan has none
    return dq, dk, dv, None, None


_flash_hopper.register_fake(_flash_hopper_fake)
_flash_hopper.register_autograd(_flash_hopper_grad, setup_context=_flash_setup)
_flash_hopper_backward.register_fake(_flash_hopper_backward_fake)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    """`minigpt.kernels.flash_attention.flash_attention` through the custom op; on a Hopper GPU, the causal
    forward over inputs `gluon_attention.covers` through the Gluon kernel instead, and its backward through the
    Gluon kernels `gluon_attention.backward_plan` names (`hopper_attention`).

    q [B, H, Tq, D], k/v [B, Hkv, Tk, D] (views with a unit last stride, e.g. a KV-cache slice),
    any D <= 128: the kernels run a narrower head in a wider tile, masked, without copies.
    """
    _fa._check_inputs(q, k, v, causal=causal)
    scale = 1.0 / math.sqrt(q.shape[-1])
    hopper = hopper_attention()
    if hopper is not None and q.is_cuda and hopper.covers(q, k, v, causal):
        o, _ = _flash_hopper(q, k, v, causal, scale)
    else:
        o, _ = _flash(q, k, v, causal, scale)
    return o


# ------------------------------------------------------------------- linear + cross-entropy
def _linear_ce_fake(h, weight, targets, ignore_index, need_dh, need_dw):
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    return (h.new_empty((), dtype=acc), h.new_empty(h.shape if need_dh else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)))


@_kernel_op("linear_cross_entropy", fake=_linear_ce_fake)
def _linear_ce(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int, need_dh: bool,
               need_dw: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean loss, dh, dW) of h [N, dim] @ weight[V, dim]^T; gradients computed in the forward pass.

    A gradient that is not needed comes back as an empty tensor (custom ops return tensors).
    """
    loss, dh, dw = _flce.fused_linear_cross_entropy_forward(h, weight, targets, ignore_index, need_dh, need_dw)
    return loss, h.new_empty(0) if dh is None else dh, weight.new_empty(0) if dw is None else dw


def _linear_ce_setup(ctx, inputs, output):
    _, _, _, _, need_dh, need_dw = inputs
    ctx.save_for_backward(output[1], output[2])
    ctx.need = (need_dh, need_dw)


def _linear_ce_grad(ctx, dloss, _ddh, _ddw):
    dh, dw = ctx.saved_tensors
    return (dh * dloss.to(dh.dtype) if ctx.need[0] else None, dw * dloss.to(dw.dtype) if ctx.need[1] else None,
            None, None, None, None)


_linear_ce.register_autograd(_linear_ce_grad, setup_context=_linear_ce_setup)


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean CE of ``h[..., dim] @ weight[V, dim]^T`` against ``targets[...]`` without the [N, V] logits.

    Under autocast, h and weight are cast to the autocast dtype first, as ``nn.Linear`` would be.
    """
    if torch.is_autocast_enabled(h.device.type):
        dt = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dt), weight.to(dt)
    _flce._check(h, weight, targets)
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    grad = torch.is_grad_enabled()
    loss, _, _ = _linear_ce(h2, weight, t2, ignore_index, grad and h2.requires_grad, grad and weight.requires_grad)
    return loss


# -------------------------------------------------------------------------------- dispatch
def _rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return _add_rms_norm_triton(x, None, weight, eps, torch.promote_types(x.dtype, weight.dtype))[1]


def _add_rms_norm_triton(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float,
                         out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    _rms._check(x, weight, eps)
    if delta is None:
        return x, _add_rms_norm(x, None, weight, eps, out_dtype)[1]
    _rms._check_delta(x, delta)
    s, y, _ = _add_rms_norm(x, delta, weight, eps, out_dtype)
    return s, y


def _rope_qk_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    _rope._check_qk(q, k, cos, sin)
    return _rope_qk(q, k, cos, sin, False)


def _swiglu_triton(gate: Tensor, up: Tensor) -> Tensor:
    _swiglu._check(gate, up)
    return _swiglu_op(gate, up)


class Ops:
    """The model's hot-path functions, chosen once: ``Ops("torch")`` or ``Ops("triton")``.

    Shapes: ``rms_norm(x[..., D], w[D], eps)``; ``add_rms_norm(x, delta[..., D], w[D], eps)``;
    ``rope_qk(q[B, T, H, D], k[B, T, Hkv, D], cos, sin[T, D/2])``; ``swiglu(gate, up[..., F])``;
    ``attention(q[B, H, Tq, D], k, v[B, Hkv, Tk, D], dropout_p)`` (causal, queries at the end of
    the keys); ``lm_loss(h[B, T, dim], lm_head[V, dim], targets[B, T]) -> (logits or None, loss)``.
    The functions are bound in ``__init__``, so a forward pass does no lookups or imports to find
    them.
    """

    def __init__(self, kernels: str = "torch", attn_backend: str = "sdpa"):
        if kernels not in KERNELS:
            raise ValueError(f"unknown kernels {kernels!r}; choose one of {KERNELS}")
        # The reference implementations live in the modules that use Ops, so they are imported
        # here (once, when a model is built) rather than at the top of this module.
        from minigpt import attention, ffn, norm, rope

        self.kernels = kernels
        self.triton = kernels == "triton"
        self.attn_backend = "triton" if self.triton else attn_backend
        self.rms_norm = _rms_norm_triton if self.triton else norm.rms_norm_reference
        self._add_rms_norm = _add_rms_norm_triton if self.triton else norm.add_rms_norm_reference
        self.rope_qk = _rope_qk_triton if self.triton else self._rope_qk_reference
        self.swiglu = _swiglu_triton if self.triton else ffn.swiglu_reference
        self._apply_rope = rope.apply_rope
        self._naive, self._sdpa = attention.naive_attention, attention.sdpa_attention
        if self.triton:
            hopper_attention()  # decided here, outside any compiled region, not in the first traced forward

    def add_rms_norm(self, x: Tensor, delta: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        """(s, y): the residual stream s = x + delta (x itself when delta is None) and y = rms_norm(s).

        The add and the norm are one kernel with Triton (s is written once and normalised from
        registers). Under autocast y comes in the autocast dtype: it only feeds matmuls, which
        would cast it there anyway, so the kernel writes half the bytes and no cast kernel follows.
        """
        out_dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else \
            torch.promote_types(x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype), weight.dtype)
        return self._add_rms_norm(x, delta, weight, eps, out_dtype)

    def _rope_qk_reference(self, q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        return self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
        if self.attn_backend == "naive":
            return self._naive(q, k, v, causal=True, dropout_p=dropout_p)
        if self.attn_backend == "triton" and q.shape[2] > 1:  # training, prefill (also after a cached prefix)
            return flash_attention(q, k, v, causal=True)
        return self._sdpa(q, k, v, causal=True, dropout_p=dropout_p)  # a decode step: one query row

    def lm_loss(self, h: Tensor, weight: Tensor, targets: Tensor | None,
                ignore_index: int = -100) -> tuple[Tensor | None, Tensor | None]:
        """(logits, loss) of the LM head. With Triton kernels and targets, the loss is computed by the
        fused linear cross-entropy and the [B, T, V] logits are never built: logits is None."""
        if targets is None:
            return F.linear(h, weight), None
        if self.triton:
            return None, linear_cross_entropy(h, weight, targets, ignore_index)
        logits = F.linear(h, weight)
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss
