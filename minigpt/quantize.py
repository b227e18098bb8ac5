"""Int8 weight-only quantization: one symmetric scale per output channel, activations untouched.

A weight row ``w[j, :]`` (output channel j) is stored as int8 ``q[j, :] = round(w[j, :] / s_j)``
with ``s_j = max|w[j, :]| / 127``, so every row uses the full int8 range and the rounding error of
each weight is at most ``s_j / 2``. One scale per *row* rather than per tensor matters: a single
row with large weights would otherwise set the step size of every other row.

Because the scale belongs to the output channel, it factors out of the dot product:
``y_j = sum_i x_i w_ji ~= s_j * sum_i x_i q_ji``. ``Int8Linear`` therefore multiplies by the int8
matrix (cast to the activation dtype) and scales the output, never materialising the scaled
float weights. The tied LM head and token embedding share one int8 matrix: rows of the embedding
are the output channels of the head, so the same per-row scales serve both.

What it buys: weights at rest take 1 byte per parameter (plus 4 bytes per row). What it does not:
this eager ``F.linear`` casts the int8 matrix to the activation dtype on every call, so it reads no
fewer bytes per step than bf16 weights; a fused int8 matmul kernel is what turns the smaller
weights into faster memory-bound decoding.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Int8Embedding", "Int8Linear", "dequantize_weight", "quantize_int8", "quantize_weight", "weight_bytes"]

QMAX = 127  # symmetric: -127..127 (the int8 value -128 is never used, so negation stays exact)


def quantize_weight(w: torch.Tensor, per_channel: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``w[out, in]`` -> (``q[out, in]`` int8, ``scale[out]`` fp32) with ``w ~= q * scale[:, None]``.

    ``per_channel=False`` uses one scale for the whole matrix (repeated per row), for comparison.
    A row of zeros gets scale 0 and q = 0 (dequantizes exactly).
    """
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point():
        desc = f"{w.dtype} tensor of shape {tuple(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"quantize_weight needs a 2-D floating-point weight [out, in], got a {desc}")
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1) if per_channel else w32.abs().amax().expand(w32.shape[0])
    scale = amax / QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: q = 0 / 1 = 0
    q = torch.round(w32 / safe[:, None]).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.contiguous()


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q[out, in]`` int8 and ``scale[out]`` -> float weights ``q * scale[:, None]`` in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def _check_int8(layer: str, q_shape: str, s_shape: str, qweight: torch.Tensor, scale: torch.Tensor, hint: str = "") -> None:
    """One error for both int8 layers: an int8 matrix and one scale per row."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or scale.shape != (qweight.shape[0],):
        raise ValueError(f"{layer} needs int8 qweight {q_shape} and scale {s_shape}, got {qweight.dtype} "
                         f"{tuple(qweight.shape)} and {tuple(scale.shape)}{hint}")


class Int8Linear(nn.Module):
    """A bias-free linear layer with int8 weights: ``y = (x @ q^T) * scale``, x ``[..., in]`` -> ``[..., out]``."""

    qweight: torch.Tensor  # buffers: int8 [out, in] and its per-row scale [out]
    scale: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        _check_int8("Int8Linear", "[out, in]", "[out]", qweight, scale, "; build it with Int8Linear.from_linear")
        self.in_features, self.out_features = qweight.shape[1], qweight.shape[0]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear, per_channel: bool = True) -> Int8Linear:
        if linear.bias is not None:
            raise ValueError("Int8Linear has no bias (minigpt's linears are bias-free); quantize the bias-free layers only")
        return cls(*quantize_weight(linear.weight, per_channel))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (allocates; for code that inspects ``.weight``, not for the forward)."""
        return dequantize_weight(self.qweight, self.scale, self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8Embedding(nn.Module):
    """Token embedding with int8 rows: ``idx[...]`` -> ``q[idx] * scale[idx]`` ``[..., dim]`` in the scale's dtype."""

    qweight: torch.Tensor  # buffers: int8 [num, dim] and its per-row scale [num]
    scale: torch.Tensor

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        _check_int8("Int8Embedding", "[num, dim]", "[num]", qweight, scale)
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (allocates; for code that inspects ``.weight``)."""
        return dequantize_weight(self.qweight, self.scale, self.scale.dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.qweight).to(self.scale.dtype) * self.scale[idx].unsqueeze(-1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row"


def quantize_int8(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` and ``nn.Embedding`` of ``model`` in place by its int8 version; returns it.

    Norm weights (and any other parameter) stay in floating point. Modules that share one weight
    (minigpt's tied LM head and token embedding) keep sharing one int8 matrix and one scale
    vector. Gradients flow to the inputs (not to int8 weights): this is for inference.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"quantize_int8 needs an nn.Module, got {type(model).__name__}")
    if type(model) in (nn.Linear, nn.Embedding):
        raise ValueError("quantize_int8 replaces sub-modules in place; use Int8Linear.from_linear for a bare layer")
    shared: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(float weight) -> (q, scale)

    def quantized(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if id(weight) not in shared:
            shared[id(weight)] = quantize_weight(weight, per_channel)
        return shared[id(weight)]

    targets = [(name, m) for name, m in model.named_modules() if type(m) in (nn.Linear, nn.Embedding)]
    if not targets:
        raise ValueError("quantize_int8 found no nn.Linear or nn.Embedding to quantize (already quantized?)")
    for name, module in targets:
        if isinstance(module, nn.Linear):
            if module.bias is not None:
                raise ValueError(f"{name} has a bias; quantize_int8 handles bias-free linears only")
            new: nn.Module = Int8Linear(*quantized(module.weight))
        else:
            new = Int8Embedding(*quantized(module.weight))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's stored state (parameters and persistent buffers), each tensor counted once.

    Tied or shared tensors (same storage) count once; non-persistent buffers (minigpt's RoPE
    tables, recomputed at load) do not count, as they are not part of a checkpoint.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        key = (id(t), 0) if t.device.type == "meta" else (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total
