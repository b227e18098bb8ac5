"""Memory traffic (bytes read from and written to HBM), counted rather than guessed.

Two instruments used by the SwiGLU and FlashAttention chapters:

- ``TrafficCounter``: a ``TorchDispatchMode`` that records every ATen op an eager PyTorch
  computation runs (forward or backward) with the bytes it reads and writes. This is the memory
  model of unfused eager execution: each op reads its inputs from HBM and writes its outputs back.
  Views (transpose, expand, reshape without copy) move nothing and are not recorded.
- ``standard_attention_hbm_bytes`` / ``flash_attention_hbm_bytes``: closed forms for the HBM
  traffic of three-op attention (Dao et al. 2022, Algorithm 0) and of the tiled FlashAttention
  forward in the FlashAttention-1 loop order (outer loop over key/value blocks) or the
  FlashAttention-2 order (outer loop over query blocks), per (batch, head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = [
    "OpTraffic",
    "TrafficCounter",
    "flash_attention_hbm_bytes",
    "standard_attention_hbm_bytes",
    "tensor_bytes",
]

# Ops that allocate or re-label memory without touching its contents.
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
               "lift_fresh"}
# In-place ops that overwrite their first argument without reading it.
_WRITE_ONLY_FIRST = {"fill_", "zero_", "copy_", "normal_", "uniform_"}


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements ``t`` addresses: a broadcast (stride-0) dimension counts once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=True):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


@dataclass
class OpTraffic:
    """One ATen op and the bytes it read and wrote."""

    name: str
    read: int
    written: int


class TrafficCounter(TorchDispatchMode):
    """Record the ATen ops run inside ``with TrafficCounter() as c:`` and their HBM bytes.

    ``c.ops`` lists ``OpTraffic`` in execution order; ``c.read``, ``c.written``, ``c.total`` sum
    them. Backward passes are recorded too when ``.backward()`` runs inside the block. Custom
    kernels (Triton launches) are invisible to it: count those from their loads and stores.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[OpTraffic] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__.split(".")[0]
        if getattr(func, "is_view", False) or name in _NO_TRAFFIC:
            return out
        inputs = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
        mutable = func._schema.is_mutable
        if mutable:
            written_tensors = [a for a, arg in zip(args, func._schema.arguments, strict=False)  # trailing defaults are not in args
                               if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write]
            if name in _WRITE_ONLY_FIRST and inputs:
                inputs = inputs[1:]
        else:
            written_tensors = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        read = sum(tensor_bytes(t) for t in inputs)
        written = sum(tensor_bytes(t) for t in written_tensors)
        self.ops.append(OpTraffic(name, read, written))
        return out

    @property
    def read(self) -> int:
        return sum(o.read for o in self.ops)

    @property
    def written(self) -> int:
        return sum(o.written for o in self.ops)

    @property
    def total(self) -> int:
        return self.read + self.written

    def table(self) -> list[dict[str, Any]]:
        """The recorded ops as rows ``{"op", "read", "written"}`` (bytes), for printing."""
        return [{"op": o.name, "read": o.read, "written": o.written} for o in self.ops]


def _check_sizes(**sizes: int) -> None:
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


def standard_attention_hbm_bytes(seq_len: int, head_dim: int, elem_bytes: int = 2) -> int:
    """HBM bytes of S = Q K^T, P = softmax(S), O = P V as three unfused ops, per (batch, head).

    Reads Q, K (2 N d), writes S (N^2); reads S, writes P (2 N^2); reads P, V, writes O
    (N^2 + 2 N d): ``(4 N d + 4 N^2) * elem_bytes``, i.e. Theta(N d + N^2).
    """
    _check_sizes(seq_len=seq_len, head_dim=head_dim, elem_bytes=elem_bytes)
    n, d = seq_len, head_dim
    return (4 * n * d + 4 * n * n) * elem_bytes


def _kv_rows_seen(q_block: int, block_m: int, block_n: int, n: int, causal: bool) -> int:
    """Key rows loaded for query block ``q_block``: all N, or (causal) the key blocks up to the diagonal."""
    if not causal:
        return n
    last_row = min((q_block + 1) * block_m, n) - 1
    return min((last_row // block_n + 1) * block_n, n)


def flash_attention_hbm_bytes(seq_len: int, head_dim: int, block_m: int, block_n: int, order: str = "fa2",
                              causal: bool = False, elem_bytes: int = 2, stat_bytes: int = 4) -> int:
    """HBM bytes of a tiled attention forward, per (batch, head), with query blocks of ``block_m``
    rows and key/value blocks of ``block_n`` rows (the last block of each may be shorter).

    ``order="fa2"`` (FlashAttention-2): for each query block, load it once, stream every visible
    K/V block past it, write its O rows and one log-sum-exp per row (``stat_bytes``) once.
    ``order="fa1"`` (FlashAttention-1, Algorithm 1): O, the row max m and row sum l start in HBM
    (written once); for each K/V block (loaded once), every query block it touches reads Q_i, O_i,
    m_i, l_i and writes O_i, m_i, l_i back. Causal: a block pair is visited iff it holds at least
    one unmasked score. Both orders read all of K and V once per query block, so the traffic is
    Theta(N^2 d / block_m); with block_m ~ M / d rows fitting in on-chip memory of M elements
    that is Theta(N^2 d^2 / M), not Theta(N d).
    """
    _check_sizes(seq_len=seq_len, head_dim=head_dim, block_m=block_m, block_n=block_n,
                 elem_bytes=elem_bytes, stat_bytes=stat_bytes)
    if order not in ("fa1", "fa2"):
        raise ValueError(f"order must be 'fa1' or 'fa2', got {order!r}")
    n, d = seq_len, head_dim
    n_q_blocks = -(-n // block_m)
    rows = [min(block_m, n - i * block_m) for i in range(n_q_blocks)]
    if order == "fa2":
        kv = sum(2 * _kv_rows_seen(i, block_m, block_n, n, causal) * d for i in range(n_q_blocks))
        return (2 * n * d + kv) * elem_bytes + n * stat_bytes
    total = 2 * n * d * elem_bytes + n * (d * elem_bytes + 2 * stat_bytes)  # K, V once; init O, m, l
    for i, r in enumerate(rows):
        n_kv_blocks = -(-_kv_rows_seen(i, block_m, block_n, n, causal) // block_n)
        per_visit = r * (3 * d * elem_bytes + 4 * stat_bytes)  # read Q_i, O_i, m_i, l_i; write O_i, m_i, l_i
        total += n_kv_blocks * per_visit
    return total
