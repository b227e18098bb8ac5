"""Memory traffic (bytes read from and written to HBM), counted rather than guessed.

Three instruments, used by the SwiGLU, FlashAttention and kernel-benchmark chapters:

- ``TrafficCounter``: a ``TorchDispatchMode`` that records every ATen op an eager PyTorch
  computation runs (forward or backward) with the bytes it reads and writes. This is the memory
  model of unfused eager execution: each op reads its inputs from HBM and writes its outputs back.
  Views (transpose, expand, reshape without copy) move nothing and are not recorded.
- ``standard_attention_hbm_bytes`` / ``flash_attention_hbm_bytes``: closed forms for the HBM
  traffic of three-op attention (Dao et al. 2022, Algorithm 0) and of the tiled FlashAttention
  forward in the FlashAttention-1 loop order (outer loop over key/value blocks) or the
  FlashAttention-2 order (outer loop over query blocks), per (batch, head).
- ``training_step_floor_bytes``: the fewest HBM bytes the work of a training step other than its
  matmuls and attention can move, per component, when every matmul is a separate cuBLAS kernel:
  a floor to hold measured step times against (chapter 11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from minigpt.config import ModelConfig

__all__ = [
    "OpTraffic",
    "TrafficCounter",
    "flash_attention_hbm_bytes",
    "standard_attention_hbm_bytes",
    "tensor_bytes",
    "training_step_floor_bytes",
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


# ------------------------------------------------------------ the floor of a training step's bytes
_TABLE_BYTES = 4  # RoPE's cos/sin tables are fp32 buffers (`minigpt.rope.rope_cache`)


def _norms_floor(n: int, d: int, layers: int, act: int, resid: int, master: int) -> int:
    """RMSNorm with the residual add before it, forward and backward, for all 2 L + 1 norms.

    Per element of [n, d], a block norm's forward reads x and delta, writes s = x + delta (the
    residual stream) and y (for the matmuls): 2 resid + 2 act. Its backward reads the partial
    gradients of y that its m matmuls wrote (m = 3 for q, k, v; 2 for gate, up), ds (the stream's
    gradient from the next norm) and s; it writes dx (resid, the stream's gradient) and ddelta
    (act, for the matmul that made delta): (m + 1) act + 3 resid. The first norm has no delta:
    x0 is gathered from the embedding table wherever it is read (never stored), and its
    backward scatters dx0 into the table's gradient without writing it: r + a forward,
    3 a + 2 r backward. The last norm's s has no later reader, so its backward recomputes it
    from x and delta (6 bytes) rather than store and reload it (8): r + 2 a forward, 3 a + 2 r
    backward (one partial gradient, from the loss). Every norm reads its weight forward and
    backward and writes its weight's gradient (3 d master); rstd is recomputed in the backward.
    """
    block_fwd = (2 * layers - 1) * (2 * resid + 2 * act)
    block_bwd = (layers - 1) * (4 * act + 3 * resid) + layers * (3 * act + 3 * resid)
    ends = (resid + act) + (3 * act + 2 * resid) + (resid + 2 * act) + (3 * act + 2 * resid)  # first, last
    return n * d * (block_fwd + block_bwd + ends) + (2 * layers + 1) * 3 * d * master


def _rope_floor(n: int, seq_len: int, q_width: int, k_width: int, head_dim: int, layers: int, act: int) -> int:
    """RoPE on q and k in one pass: read q, k, write the rotated q', k' (kept for the attention's
    backward); the backward rotates dq', dk' back the same way. 4 passes of n (q_width + k_width)
    act per layer, plus the cos and sin tables [T, head_dim / 2], read once by each of the 2 passes."""
    return layers * (4 * n * (q_width + k_width) * act + 2 * 2 * seq_len * (head_dim // 2) * _TABLE_BYTES)


def _swiglu_floor(n: int, ffn_dim: int, layers: int, act: int) -> int:
    """The gate h = silu(g) * u: forward reads g, u, writes h (down_proj reads it, and its weight
    gradient reads it again: kept); backward reads dh, g, u, writes dg, du. 8 passes of [n, F] act."""
    return layers * 8 * n * ffn_dim * act


def _loss_floor(n: int, vocab: int, act: int, id_bytes: int) -> int:
    """Cross-entropy between the logits matmul and the two matmuls of its gradient (fused linear
    cross-entropy, chunked or not): read the logits [n, V] and the targets, write dlogits [n, V]
    (in place). The scale by the loss's upstream gradient (1) and the mean's 1 / n are folded in."""
    return 2 * n * vocab * act + n * id_bytes


def _adamw_floor(matmul_params: int, other_params: int, act: int, master: int) -> int:
    """One fused AdamW pass: read p, m, v and write them (6 master bytes a parameter), read g. A
    matmul's weight gradient is read as the matmul wrote it (act; its cast to fp32 fused here) and
    the pass also writes the act copy of the weight that the next step's matmuls read (the
    autocast cast, fused here). Norm weights (and an untied embedding table) have master-dtype
    gradients and no copy."""
    return (matmul_params + other_params) * 6 * master + matmul_params * 2 * act + other_params * master


def training_step_floor_bytes(config: ModelConfig, batch: int, seq_len: int, *, act_bytes: int = 2,
                              resid_bytes: int = 4, master_bytes: int = 4, id_bytes: int = 8,
                              grad_clip: bool = False) -> dict[str, int]:
    """The fewest HBM bytes one training step (forward, backward, AdamW) of ``config`` on
    ``batch x seq_len`` tokens must move outside its matmuls and its attention, by component.

    The design this floor holds for: every matmul (q, k, v, o, gate, up, down projections and the
    LM head, forward and both backward products) is a separate cuBLAS kernel that reads its
    operands from HBM and writes its output there, and attention is a separate kernel
    (FlashAttention / cuDNN) reading q', k', v and writing o (and their gradients). Their bytes
    are not counted here. Each other kernel must read every tensor it needs once and write once
    every tensor a later kernel needs; anything that can be recomputed from what the kernel reads
    anyway is not stored. The cheapest legal fusions are assumed:

    - residual add fused into the norm after it, and the partial gradients that the matmuls
      reading a norm's output send back summed inside that norm's backward (``_norms_floor``;
      accumulating them inside cuBLAS instead, beta = 1, moves the same bytes in the matmuls);
    - RoPE on q and k in one pass, q' and k' kept for the attention's backward (``_rope_floor``);
    - the SwiGLU gate reading g, u and writing h; its backward reading dh, g, u and writing dg,
      du (``_swiglu_floor``);
    - the loss as a fused linear cross-entropy with the matmuls outside it: one read of the logits,
      one write of their gradient (``_loss_floor``);
    - AdamW as one fused pass that also casts the gradients and writes the weights' low-precision
      copy, so no separate cast kernel exists (``_adamw_floor``);
    - the embedding never stored: its rows are gathered by the norms that read x0, and dx0 is
      scattered into the table's gradient by the first norm's backward. What is left are the token
      ids, read by each of those three kernels; the scatter's read-modify-write of the gradient's
      rows depends on the tokens and is not counted (it can be as small as one row).

    Dtypes, as the model runs under autocast (`minigpt.model.MiniGPT`, `minigpt.train`):
    ``act_bytes`` for matmul inputs and outputs, norm outputs and the attention's and gate's
    tensors (bf16: 2); ``resid_bytes`` for the residual stream and its gradient (fp32: 4, since
    the embedding is an fp32 parameter and ``x + delta`` promotes); ``master_bytes`` for
    parameters, their fp32 gradients (norm weights) and AdamW's two moments (fp32: 4);
    ``id_bytes`` for token ids and targets (int64: 8). Dropout is 0 (a mask would add traffic)
    and scalars (the loss, the count of targets) are not counted. ``grad_clip`` (as
    `minigpt.train` does, not the benchmark's step) adds one read of every gradient: the global
    norm needs all of them before AdamW may scale any.

    Needs the design the kernels implement: pre-norm RMSNorm, RoPE, SwiGLU. Returns bytes per
    component, keys "RMSNorm + residual", "RoPE", "SwiGLU gate", "loss (cross-entropy)", "AdamW",
    "embedding" (and "gradient clipping" with ``grad_clip``); their sum is the step's floor.
    """
    _check_sizes(batch=batch, seq_len=seq_len, act_bytes=act_bytes, resid_bytes=resid_bytes,
                 master_bytes=master_bytes, id_bytes=id_bytes)
    design = (config.norm, config.norm_position, config.pos_encoding, config.mlp)
    if design != ("rmsnorm", "pre", "rope", "swiglu") or config.dropout > 0:
        raise ValueError(f"the floor is worked out for pre-norm RMSNorm, RoPE, SwiGLU and no dropout; got norm, "
                         f"norm_position, pos_encoding, mlp = {design}, dropout = {config.dropout}")
    assert config.n_kv_heads is not None and config.ffn_dim is not None  # resolved in ModelConfig.__post_init__
    n, d, hd, layers = batch * seq_len, config.dim, config.head_dim, config.n_layers
    matmul_params = config.matmul_params()
    other_params = config.num_params() - matmul_params
    floor = {
        "RMSNorm + residual": _norms_floor(n, d, layers, act_bytes, resid_bytes, master_bytes),
        "RoPE": _rope_floor(n, seq_len, config.n_heads * hd, config.n_kv_heads * hd, hd, layers, act_bytes),
        "SwiGLU gate": _swiglu_floor(n, config.ffn_dim, layers, act_bytes),
        "loss (cross-entropy)": _loss_floor(n, config.vocab_size, act_bytes, id_bytes),
        "AdamW": _adamw_floor(matmul_params, other_params, act_bytes, master_bytes),
        "embedding": 3 * n * id_bytes,
    }
    if grad_clip:
        floor["gradient clipping"] = matmul_params * act_bytes + other_params * master_bytes
    return floor
