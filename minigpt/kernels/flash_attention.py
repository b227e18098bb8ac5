"""FlashAttention in Triton: exact attention without ever building the T x T score matrix.

Standard attention computes S = scale * Q K^T, P = softmax(S), O = P V. Written as three
separate ops it stores S and P in HBM: Theta(N d + N^2) reads and writes for a sequence of
N tokens and head size d, and the N^2 term dominates for long sequences.

FlashAttention (Dao et al. 2022; FlashAttention-2, Dao 2023) tiles the computation so that a
block of queries stays in on-chip SRAM (registers and shared memory, size M) while blocks of
keys and values stream past it. The softmax is computed *online*: for each query row we keep
the running maximum m and the running sum l of exp(s - m), and rescale the output accumulator
whenever m grows. The result is exact (not an approximation) and HBM traffic drops to
Theta(N^2 d^2 / M) element reads: each of the N / B_r query blocks (B_r ~ M / d rows fit in
SRAM) reads all of K and V once (2 N d elements), i.e. (N d / M) * 2 N d. That is d^2 / M
times the N^2 of the naive version (about 0.1 for d = 64 and ~100 KB of SRAM), and S and P,
which the naive version writes and reads back several times, never touch HBM at all.

The backward pass does not store P either: the forward saves only the log-sum-exp
L = m + log(l) per row (fp32, [B, H, T]), and the backward recomputes P = exp(S - L) block by
block. With D = rowsum(dO * O) (the "preprocess" kernel), the gradients are

    dV = P^T dO        dP = dO V^T        dS = P * (dP - D)        dQ = scale * dS K
    dK = scale * dS^T Q

Layout of this file (Liger-Kernel style):
    Triton kernels        _attn_fwd_kernel (one query block: _attn_fwd_block), _attn_bwd_preprocess_kernel,
                          _attn_bwd_dkdv_kernel, _attn_bwd_dq_kernel, _attn_bwd_dq_convert_kernel
    launchers             flash_attention_forward, flash_attention_backward
    autograd.Function     FlashAttentionFunction
    plain function        flash_attention

Choices worth knowing:
    * GQA / MQA: query head h reads key/value head h // (H // Hkv) by pointer arithmetic;
      K and V are never repeated in memory.
    * dK, dV: one program per (key block, kv head) loops over all query heads of its GQA group
      and all query blocks, accumulating in fp32 registers: no atomics, deterministic.
    * dQ: a separate kernel, one program per (query block, query head), loops over key blocks.
      It recomputes Q K^T and dO V^T a second time (the price of avoiding atomic adds on dQ),
      exactly as the FlashAttention-2 paper suggests for a deterministic backward. The other way,
      dQ added up with atomics by the dK/dV kernel (ATOMIC_DQ, `flash_attention_backward`'s
      atomic_dq), is here too, measured and slower in Triton on an H200, even with its adds done
      by TMA bulk reductions.
    * Causal: blocks entirely above the diagonal are skipped (the loop bound stops at the
      diagonal); only the blocks that straddle the diagonal or the sequence end are masked.
    * exp2 instead of exp: log2(e) is folded into the softmax scale once, so every element
      costs one multiply and one exp2 (a single hardware instruction on NVIDIA GPUs).
    * Head sizes: the kernels' tiles are BLOCK_D = 32, 64 or 128 wide. A head of any other
      size up to 128 runs in the next of these (e.g. 40 in a 64-wide tile): its columns past D
      are loaded as zeros (a masked load), which add nothing to q . k, P V or the gradients,
      and are never stored. The price is the padded FLOPs, not a copy: q, k, v and the
      gradients keep their D columns in HBM. The launcher tells the compiler that such rows
      start 16 bytes apart (ALIGN, when every stride allows it), so they still load as vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import INTERPRET, LN2, LOG2E, check_tensors, device_capability, launcher

SUPPORTED_HEAD_DIMS = (32, 64, 128)  # the kernels' tile widths (BLOCK_D); other head dims up to 128 run masked in the next one
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _aligned(s0, s1, s2, ALIGN: tl.constexpr):
    """Three strides unchanged, written so that the compiler knows each is a multiple of ALIGN
    elements (the launcher checked it). A 40-wide head has row strides like 40 or 640 that
    Triton does not specialise on (only multiples of 16 are); without the hint its rows would
    load element by element instead of as 16-byte vectors."""
    if ALIGN > 1:
        s0 = (s0 // ALIGN) * ALIGN
        s1 = (s1 // ALIGN) * ALIGN
        s2 = (s2 // ALIGN) * ALIGN
    return s0, s1, s2


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a [rows, BLOCK_D] tile: zeros in rows past the sequence (only if MASK_ROWS) and in the
    columns past the head size (only if the head is narrower than its tile, not EVEN_D)."""
    if MASK_ROWS and EVEN_D:
        x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    elif MASK_ROWS:
        x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def _store_tile(ptrs, x, row_ok, d_ok, EVEN_D: tl.constexpr):
    """Store a [rows, BLOCK_D] tile's rows in range and, of a narrow head, only its real columns."""
    if EVEN_D:
        tl.store(ptrs, x, mask=row_ok[:, None])
    else:
        tl.store(ptrs, x, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _atomic_add_tile(ptrs, x, row_ok, d_ok, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Add a [rows, BLOCK_D] fp32 tile into memory with atomics, masked like `_load_tile`. Relaxed:
    only the sum matters, and the kernel that reads it runs after this one ends."""
    if MASK_ROWS and EVEN_D:
        tl.atomic_add(ptrs, x, mask=row_ok[:, None], sem="relaxed")
    elif MASK_ROWS:
        tl.atomic_add(ptrs, x, mask=row_ok[:, None] & d_ok[None, :], sem="relaxed")
    elif EVEN_D:
        tl.atomic_add(ptrs, x, sem="relaxed")
    else:
        tl.atomic_add(ptrs, x, mask=d_ok[None, :], sem="relaxed")


@triton.jit
def _key_range(start_m, seq_k, q_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys one query block visits: [0, hi_full) needs no mask, [hi_full, hi) does.

    Causal: the block's first query (row start_m * BLOCK_M, at key position + q_offset) sees every
    key up to its position, so the unmasked range ends at the last whole BLOCK_N block before it;
    keys after the block's last query are never visited (above the diagonal).
    """
    if CAUSAL:
        hi_full = ((start_m * BLOCK_M + q_offset) // BLOCK_N) * BLOCK_N
        hi = tl.minimum((start_m + 1) * BLOCK_M + q_offset, seq_k)
    else:
        hi_full = (seq_k // BLOCK_N) * BLOCK_N
        hi = seq_k
    return hi_full, hi


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, stride_kt,
    offs_m, offs_n, offs_d, d_ok,
    lo, hi, seq_k, q_offset, qk_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Stream key/value blocks [lo, hi) past one query block, updating the online softmax.

    Query row i sits at key position i + q_offset (q_offset = Tk - Tq: the queries are the last
    Tq positions, e.g. a prompt after a cached prefix), so causal row i sees keys j <= i + q_offset.

    acc [BLOCK_M, D] fp32 un-normalised output, l_i [BLOCK_M] running sum of exp2, m_i
    [BLOCK_M] running max (both in log2 units). MASK=False is the fast path for blocks that
    are fully inside the sequence and fully below the causal diagonal: no bounds checks, no
    where(). MASK=True handles the diagonal block(s) and the ragged end of the sequence.
    """
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n                                     # key positions [BLOCK_N]
        kv_offs = cols[:, None] * stride_kt + offs_d[None, :]       # [BLOCK_N, BLOCK_D]
        k = _load_tile(k_base + kv_offs, cols < seq_k, d_ok, MASK, EVEN_D)
        # Scores in log2 units: s = (q . k) * scale * log2(e).          [BLOCK_M, BLOCK_N]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASK:
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + q_offset)
            s = tl.where(keep, s, float("-inf"))
        # Online softmax: new running max, rescale the old sum and accumulator by
        # alpha = 2^(m_old - m_new) <= 1, then add this block's contribution.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + kv_offs, cols < seq_k, d_ok, MASK, EVEN_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd_block(
    start_m, pid_bh, Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    n_heads, group_size, seq_len, seq_k, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """Attention of query block start_m (rows start_m * BLOCK_M ...) of (batch, head) pid_bh (int64):
    writes its O rows and LSE. qk_scale = softmax scale * log2(e), fp32. Shapes as `_attn_fwd_kernel`."""
    q_offset = seq_k - seq_len
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    kv_head = head // group_size                   # GQA: query head -> its key/value head

    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len

    # The query block is loaded once and stays on chip for the whole loop.
    q = _load_tile(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], row_ok, d_ok, True, EVEN_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Key range split in two: [0, hi_full) needs no masking, [hi_full, hi) does.
    hi_full, hi = _key_range(start_m, seq_k, q_offset, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, offs_m, offs_n, offs_d, d_ok,
        0, hi_full, seq_k, q_offset, qk_scale, BLOCK_N, False, CAUSAL, PRECISION, EVEN_D,
    )
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kt, offs_m, offs_n, offs_d, d_ok,
        hi_full, hi, seq_k, q_offset, qk_scale, BLOCK_N, True, CAUSAL, PRECISION, EVEN_D,
    )

    # Normalise once at the end, and save LSE = ln(sum exp(s)) for the backward pass.
    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * LN2   # log2 units -> natural log
    tl.store(LSE + pid_bh * seq_len + offs_m, lse, mask=row_ok)
    o_base = O + batch * stride_ob + head * stride_oh
    _store_tile(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(O.dtype.element_ty), row_ok, d_ok, EVEN_D)


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    n_heads, group_size, seq_len, seq_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program = one block of BLOCK_M queries of one (batch, head). Grid (ceil(Tq/BLOCK_M), B*H).

    Q, O [B, H, Tq, D]; K, V [B, Hkv, Tk, D] with Tq = seq_len <= Tk = seq_k when causal (the
    queries are the last Tq positions); LSE [B, H, Tq] fp32 (natural log). D = HEAD_DIM runs in
    tiles BLOCK_D >= D wide, its columns masked unless EVEN_D (D == BLOCK_D).
    """
    stride_qb, stride_qh, stride_qt = _aligned(stride_qb, stride_qh, stride_qt, ALIGN)
    stride_kb, stride_kh, stride_kt = _aligned(stride_kb, stride_kh, stride_kt, ALIGN)
    stride_vb, stride_vh, stride_vt = _aligned(stride_vb, stride_vh, stride_vt, ALIGN)
    stride_ob, stride_oh, stride_ot = _aligned(stride_ob, stride_oh, stride_ot, ALIGN)
    # Causal query blocks near the end of the sequence have the most work: hand them out
    # first so that the short ones fill the gaps at the end of the launch.
    if CAUSAL:
        start_m = tl.cdiv(seq_len, BLOCK_M) - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    # fold log2(e) into the scale once; fp32 explicitly, because Inductor, when it launches this
    # kernel from a compiled graph, types a Python float argument as fp64 (Triton's JIT: fp32)
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E
    _attn_fwd_block(
        start_m, tl.program_id(1).to(tl.int64), Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
        n_heads, group_size, seq_len, seq_k, qk_scale,
        HEAD_DIM, BLOCK_D, EVEN_D, BLOCK_M, BLOCK_N, CAUSAL, PRECISION,
    )


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _row_block(n_heads, seq_len, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Where a program of the small row kernels (grid (ceil(T/BLOCK_M), B*H)) works: its (batch, head)
    index pid_bh, batch, head, its rows offs_m [BLOCK_M] and columns offs_d [BLOCK_D], and their masks."""
    pid_bh = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    return pid_bh, pid_bh // n_heads, pid_bh % n_heads, offs_m, offs_d, offs_d < HEAD_DIM, offs_m < seq_len


@triton.jit
def _attn_bwd_preprocess_kernel(
    O, DO, DELTA, DQ_ACC,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    n_heads, seq_len,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
    ZERO_DQ: tl.constexpr,
):
    """DELTA[b, h, t] = sum_d dO * O (fp32). Grid (ceil(T/BLOCK_M), B*H).

    D_i = rowsum(dO_i * O_i) equals rowsum(P_i * dP_i), the term softmax's backward subtracts:
    computing it once here saves a reduction over all keys inside the main backward loops.
    With ZERO_DQ it also zeroes the same rows of DQ_ACC [B*H, T, HEAD_DIM] fp32, the one-pass
    backward's atomic accumulator (a memset launch saved).
    """
    stride_ob, stride_oh, stride_ot = _aligned(stride_ob, stride_oh, stride_ot, ALIGN)
    stride_dob, stride_doh, stride_dot = _aligned(stride_dob, stride_doh, stride_dot, ALIGN)
    pid_bh, batch, head, offs_m, offs_d, d_ok, row_ok = _row_block(n_heads, seq_len, HEAD_DIM, BLOCK_D, BLOCK_M)
    o = _load_tile(O + batch * stride_ob + head * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                   row_ok, d_ok, True, EVEN_D)
    do = _load_tile(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                    row_ok, d_ok, True, EVEN_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh * seq_len + offs_m, delta, mask=row_ok)
    if ZERO_DQ:
        acc_ptrs = DQ_ACC + (pid_bh * seq_len + offs_m[:, None]) * HEAD_DIM + offs_d[None, :]
        tl.store(acc_ptrs, tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    q_base, do_base, stride_qt, stride_dot, lse_base, delta_base, DQ_ACC, bh,
    offs_n, offs_d, d_ok, lo, hi, seq_len, q_offset, qk_scale,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr, ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
):
    """Stream query blocks [lo, hi) of one query head past one key/value block.

    Works on transposed tiles (keys along rows) so that dK and dV accumulate as
    dV += P^T dO and dK += dS^T Q without transposing the accumulators. Returns dk, dv
    [BLOCK_N, BLOCK_D] fp32 (dk still missing the final factor `scale`).

    ATOMIC_DQ: also add this key block's share of dQ, dS K [BLOCK_M, D], to the query rows of
    (batch, head) bh in the fp32 accumulator DQ_ACC [B*H, T, HEAD_DIM]; the programs of the other
    key blocks add theirs, in an order the hardware picks. DQ_TMA: DQ_ACC is a tensor descriptor
    and the tile goes as one bulk reduction (`cp.reduce.async.bulk`, sm_90+): the TMA unit reads
    it from shared memory and adds it in L2 while the loop goes on, where `tl.atomic_add` issues
    an atomic per element from the registers. Rows past the sequence (all zero) it drops itself.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m0                                    # query positions [BLOCK_M]
        row_ok = rows < seq_len
        q = _load_tile(q_base + rows[:, None] * stride_qt + offs_d[None, :], row_ok, d_ok, MASK, EVEN_D)
        do = _load_tile(do_base + rows[:, None] * stride_dot + offs_d[None, :], row_ok, d_ok, MASK, EVEN_D)
        if MASK:
            lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
            delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
        else:
            lse = tl.load(lse_base + rows)
            delta = tl.load(delta_base + rows)
        # Recompute P^T = exp(S^T - LSE) in log2 units.                    [BLOCK_N, BLOCK_M]
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
        p_t = tl.exp2(s_t - lse[None, :] * LOG2E)
        if MASK:
            keep = rows[None, :] < seq_len
            if CAUSAL:
                keep = keep & (rows[None, :] + q_offset >= offs_n[:, None])
            p_t = tl.where(keep, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        # dS^T = P^T * (dP^T - D), with dP^T = V dO^T.
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk = tl.dot(ds_t, q, dk, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=PRECISION)           # [BLOCK_M, BLOCK_D]
            if DQ_TMA:
                DQ_ACC.atomic_add([bh.to(tl.int32), start_m, 0], dq.reshape(1, BLOCK_M, HEAD_DIM))  # [1, BLOCK_M, D]: D fills the tile
            else:
                dq_ptrs = DQ_ACC + (bh * seq_len + rows[:, None]) * HEAD_DIM + offs_d[None, :]
                _atomic_add_tile(dq_ptrs, dq, row_ok, d_ok, MASK, EVEN_D)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    n_heads, n_kv_heads, group_size, seq_len, seq_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, DQ_TMA: tl.constexpr,
):
    """One program = one block of BLOCK_N keys of one (batch, kv head). Grid (ceil(Tk/BLOCK_N), B*Hkv).

    seq_len = Tq queries, seq_k = Tk keys (Tq <= Tk when causal: query i sits at key i + Tk - Tq).

    Loops over the group_size query heads that share this kv head and over their query
    blocks, so the GQA sum over heads happens in registers (no atomics). DK and DV share one
    layout (stride_dk*), as both are freshly allocated [B, Hkv, T, D] tensors.
    ATOMIC_DQ (the one-pass backward): dQ too, added into DQ_ACC [B*H, Tq, HEAD_DIM] fp32
    with atomics (DQ_TMA: by TMA bulk reductions, DQ_ACC a descriptor), from the dS this
    program computes anyway.
    """
    stride_qb, stride_qh, stride_qt = _aligned(stride_qb, stride_qh, stride_qt, ALIGN)
    stride_kb, stride_kh, stride_kt = _aligned(stride_kb, stride_kh, stride_kt, ALIGN)
    stride_vb, stride_vh, stride_vt = _aligned(stride_vb, stride_vh, stride_vt, ALIGN)
    stride_dob, stride_doh, stride_dot = _aligned(stride_dob, stride_doh, stride_dot, ALIGN)
    stride_dkb, stride_dkh, stride_dkt = _aligned(stride_dkb, stride_dkh, stride_dkt, ALIGN)
    start_n = tl.program_id(0) * BLOCK_N
    pid_bkv = tl.program_id(1).to(tl.int64)
    batch = pid_bkv // n_kv_heads
    kv_head = pid_bkv % n_kv_heads

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    col_ok = offs_n < seq_k
    q_offset = seq_k - seq_len
    # This key/value block stays on chip for the whole program.
    k = _load_tile(K + batch * stride_kb + kv_head * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :],
                   col_ok, d_ok, True, EVEN_D)
    v = _load_tile(V + batch * stride_vb + kv_head * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :],
                   col_ok, d_ok, True, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E

    # Query range: causal skips queries before this key block (they cannot see it). The
    # diagonal rows [diag_lo, lo) (whole BLOCK_M blocks around the queries at key positions
    # start_n .. start_n + BLOCK_N) are masked; full query blocks after them are not; the ragged
    # last query block is masked again.
    full_end = (seq_len // BLOCK_M) * BLOCK_M
    if CAUSAL:
        diag_lo = (tl.maximum(start_n - q_offset, 0) // BLOCK_M) * BLOCK_M
        lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - q_offset, 0), BLOCK_M) * BLOCK_M
    else:
        diag_lo = 0
        lo = 0
    lo = tl.minimum(lo, seq_len)
    tail_start = tl.maximum(lo, full_end)
    for g in range(group_size):
        head = kv_head * group_size + g
        q_base = Q + batch * stride_qb + head * stride_qh
        do_base = DO + batch * stride_dob + head * stride_doh
        lse_base = LSE + (batch * n_heads + head) * seq_len
        delta_base = DELTA + (batch * n_heads + head) * seq_len
        bh = batch * n_heads + head
        if CAUSAL:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_base, delta_base, DQ_ACC, bh,
                offs_n, offs_d, d_ok, diag_lo, lo, seq_len, q_offset, qk_scale, BLOCK_M, True, CAUSAL, PRECISION, EVEN_D,
                HEAD_DIM, ATOMIC_DQ, DQ_TMA,
            )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_base, delta_base, DQ_ACC, bh,
            offs_n, offs_d, d_ok, lo, tail_start, seq_len, q_offset, qk_scale, BLOCK_M, False, CAUSAL, PRECISION, EVEN_D,
            HEAD_DIM, ATOMIC_DQ, DQ_TMA,
        )
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, stride_qt, stride_dot, lse_base, delta_base, DQ_ACC, bh,
            offs_n, offs_d, d_ok, tail_start, seq_len, seq_len, q_offset, qk_scale, BLOCK_M, True, CAUSAL, PRECISION, EVEN_D,
            HEAD_DIM, ATOMIC_DQ, DQ_TMA,
        )

    # S = scale * Q K^T, so dK = scale * dS^T Q.
    dk = dk * tl.cast(sm_scale, tl.float32)
    out_offs = batch * stride_dkb + kv_head * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :]
    _store_tile(DK + out_offs, dk.to(DK.dtype.element_ty), col_ok, d_ok, EVEN_D)
    _store_tile(DV + out_offs, dv.to(DV.dtype.element_ty), col_ok, d_ok, EVEN_D)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse, delta,
    k_base, v_base, stride_kt,
    offs_m, offs_n0, offs_d, d_ok, lo, hi, seq_k, q_offset, qk_scale,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    """Stream key/value blocks [lo, hi) past one query block: dQ += dS K (without `scale`)."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n0
        kv_offs = cols[:, None] * stride_kt + offs_d[None, :]
        k = _load_tile(k_base + kv_offs, cols < seq_k, d_ok, MASK, EVEN_D)
        v = _load_tile(v_base + kv_offs, cols < seq_k, d_ok, MASK, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.exp2(s - lse[:, None])
        if MASK:
            keep = cols[None, :] < seq_k
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + q_offset)
            p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    n_heads, group_size, seq_len, seq_k, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program = one block of BLOCK_M queries of one (batch, head). Grid (ceil(T/BLOCK_M), B*H).

    Same loop structure as the forward, with the recomputed P in place of the online softmax.
    """
    stride_qb, stride_qh, stride_qt = _aligned(stride_qb, stride_qh, stride_qt, ALIGN)
    stride_kb, stride_kh, stride_kt = _aligned(stride_kb, stride_kh, stride_kt, ALIGN)
    stride_vb, stride_vh, stride_vt = _aligned(stride_vb, stride_vh, stride_vt, ALIGN)
    stride_dob, stride_doh, stride_dot = _aligned(stride_dob, stride_doh, stride_dot, ALIGN)
    stride_dqb, stride_dqh, stride_dqt = _aligned(stride_dqb, stride_dqh, stride_dqt, ALIGN)
    q_offset = seq_k - seq_len
    num_m_blocks = tl.cdiv(seq_len, BLOCK_M)
    if CAUSAL:
        start_m = num_m_blocks - 1 - tl.program_id(0)
    else:
        start_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    batch = pid_bh // n_heads
    head = pid_bh % n_heads
    kv_head = head // group_size

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    row_ok = offs_m < seq_len
    q = _load_tile(Q + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                   row_ok, d_ok, True, EVEN_D)
    do = _load_tile(DO + batch * stride_dob + head * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :],
                    row_ok, d_ok, True, EVEN_D)
    lse = tl.load(LSE + pid_bh * seq_len + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + pid_bh * seq_len + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = tl.cast(sm_scale, tl.float32) * LOG2E
    k_base = K + batch * stride_kb + kv_head * stride_kh
    v_base = V + batch * stride_vb + kv_head * stride_vh

    hi_full, hi = _key_range(start_m, seq_k, q_offset, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, offs_m, offs_n0, offs_d, d_ok,
        0, hi_full, seq_k, q_offset, qk_scale, BLOCK_N, False, CAUSAL, PRECISION, EVEN_D,
    )
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse, delta, k_base, v_base, stride_kt, offs_m, offs_n0, offs_d, d_ok,
        hi_full, hi, seq_k, q_offset, qk_scale, BLOCK_N, True, CAUSAL, PRECISION, EVEN_D,
    )
    dq = dq * tl.cast(sm_scale, tl.float32)
    dq_offs = batch * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :]
    _store_tile(DQ + dq_offs, dq.to(DQ.dtype.element_ty), row_ok, d_ok, EVEN_D)


@triton.jit
def _attn_bwd_dq_convert_kernel(
    DQ_ACC, DQ,
    stride_dqb, stride_dqh, stride_dqt,
    n_heads, seq_len, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """DQ = scale * DQ_ACC in DQ's dtype and layout, after the one-pass backward. Grid (ceil(T/BLOCK_M), B*H).

    Reads 4 and writes 2 bytes per element (bf16): for `medium`'s attention 63 MB, ~15 us a layer.
    """
    stride_dqb, stride_dqh, stride_dqt = _aligned(stride_dqb, stride_dqh, stride_dqt, ALIGN)
    pid_bh, batch, head, offs_m, offs_d, d_ok, row_ok = _row_block(n_heads, seq_len, HEAD_DIM, BLOCK_D, BLOCK_M)
    acc = tl.load(DQ_ACC + (pid_bh * seq_len + offs_m[:, None]) * HEAD_DIM + offs_d[None, :],
                  mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    dq = acc * tl.cast(sm_scale, tl.float32)
    _store_tile(DQ + batch * stride_dqb + head * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
                dq.to(DQ.dtype.element_ty), row_ok, d_ok, EVEN_D)


# ----------------------------------------------------------------------------------------------
# Tile sizes
# ----------------------------------------------------------------------------------------------


class BlockConfig(NamedTuple):
    """Tile shape and launch parameters of one kernel: BLOCK_M queries x BLOCK_N keys."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


class FlashConfig(NamedTuple):
    """Tile configs of the three main kernels (forward, dK/dV, dQ)."""

    fwd: BlockConfig
    dkdv: BlockConfig
    dq: BlockConfig


def flash_config(head_dim: int, capability: tuple[int, int] | None, interpret: bool,
                 seq_k: int | None = None) -> FlashConfig:
    """Pick tile sizes from the tile width (``head_dim``: 32, 64 or 128, see `padded_head_dim`), the
    GPU's compute capability, the interpreter flag and (sm_80/sm_90 only) the number of keys ``seq_k``.

    Shared memory decides: sm_80 / sm_90 (A100, H100, H200: 164-227 KB) take 3-stage software
    pipelines; any other sm_8x or newer (sm_86/89/12x: ~100 KB; sm_10x, not yet checked) take 2
    stages, which fit wherever sm_8x's do; sm_75 (T4: 64 KB, no async copies)
    takes small tiles and one stage (all checked to fit with Triton's compiler for each arch).
    The interpreter (~1 ms per program) takes small tiles so tests stay fast and still cross
    several blocks, diagonals and tails.
    Causal masking needs fwd/dq BLOCK_M and dkdv BLOCK_N to be multiples of the other block.
    """
    if interpret or capability is None:
        return FlashConfig(BlockConfig(32, 16, 4, 1), BlockConfig(16, 32, 4, 1), BlockConfig(32, 16, 4, 1))
    big = head_dim == 128
    if capability in ((8, 0), (9, 0)):
        # Fastest on an H100 (scripts/gpu_flash_attention.py --sweep, bf16, causal, T=4096).
        # Heads up to 64 on an H200 (--backward, results/flash_attention_backward.json): a
        # (64, 64, 4, 3) dQ tile, and up to 2048 keys 64-key dK/dV blocks (7% faster at `medium`'s
        # shape, 2-6% slower at 4096-8192 keys). dK/dV keeps two [BLOCK_N, D] fp32 accumulators
        # in registers: with D=128 a 64-key block is the most that 4 warps hold without spilling.
        # Forward: 128-query blocks on 8 warps from 16384 keys on (H200, --forward: 7% faster at D=128,
        # 4% at D=64; up to 8192 keys (64, 64, 4, 3) is within 2.2% or faster).
        short, long = seq_k is not None and seq_k <= 2048, seq_k is not None and seq_k >= 16384
        return FlashConfig(
            fwd=BlockConfig(128, 64, 8, 3) if long else BlockConfig(64, 64, 4, 3),
            dkdv=BlockConfig(32, 64 if big or short else 128, 4, 3),
            dq=BlockConfig(128, 64, 8, 3) if big else BlockConfig(64, 64, 4, 3),
        )
    if capability >= (8, 0):
        return FlashConfig(
            fwd=BlockConfig(128, 32 if big else 64, 8 if big else 4, 2),
            dkdv=BlockConfig(32, 64, 4, 2),
            dq=BlockConfig(64, 32, 4, 2),
        )
    return FlashConfig(
        fwd=BlockConfig(64, 32 if big else 64, 4, 1),
        dkdv=BlockConfig(16, 32 if big else 64, 4, 1),
        dq=BlockConfig(32 if big else 64, 16 if big else 32, 4, 1),
    )


def _default_config(x: torch.Tensor, seq_k: int) -> FlashConfig:
    return flash_config(padded_head_dim(x.shape[-1]), device_capability(x.device), INTERPRET, seq_k=seq_k)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


def padded_head_dim(head_dim: int) -> int:
    """The kernel tile width (BLOCK_D) a head of size ``head_dim`` runs in: the smallest supported size >= it."""
    if head_dim < 1:
        raise ValueError(f"flash_attention: head dim must be positive, got {head_dim}")
    for d in SUPPORTED_HEAD_DIMS:
        if head_dim <= d:
            return d
    raise ValueError(
        f"flash_attention: head dim {head_dim} not supported; the kernels run heads of up to "
        f"{SUPPORTED_HEAD_DIMS[-1]} in tiles {SUPPORTED_HEAD_DIMS} wide: split larger heads or use attn_backend='sdpa'"
    )


def _stride_align(head_dim: int, *tensors: torch.Tensor) -> int:
    """The kernels' ALIGN: 16 bytes in elements when the head is narrower than its tile and every
    batch, head and row stride of ``tensors`` is a multiple of that, else 1 (no hint). A full-width
    head needs none: its strides are multiples of 16 elements, which Triton specialises on itself."""
    if head_dim == padded_head_dim(head_dim):
        return 1
    align = 16 // tensors[0].element_size()
    return align if all(x.stride(i) % align == 0 for x in tensors for i in range(3)) else 1


def _head_args(head_dim: int, *tensors: torch.Tensor) -> dict:
    """The kernels' head-size constexprs: HEAD_DIM (D), its tile width BLOCK_D, EVEN_D (D fills the
    tile: no column masks are compiled in) and ALIGN (`_stride_align` of ``tensors``)."""
    block_d = padded_head_dim(head_dim)
    return dict(HEAD_DIM=head_dim, BLOCK_D=block_d, EVEN_D=head_dim == block_d, ALIGN=_stride_align(head_dim, *tensors))


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> None:
    """Raise ValueError with a hint for every input the kernels cannot handle."""
    check_tensors("flash_attention", q=q, k=k, v=v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != 4:
            raise ValueError(f"flash_attention: {name} must have shape [B, H, T, D], got {tuple(x.shape)}")
        if x.stride(-1) != 1:
            raise ValueError(f"flash_attention: {name}'s last dim must be contiguous (stride 1); call .contiguous()")
    if k.shape != v.shape:
        raise ValueError(f"flash_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    (b, h, t, d), (bk, hk, tk, dk) = q.shape, k.shape
    if (b, d) != (bk, dk):
        raise ValueError(
            f"flash_attention: q [B, H, Tq, D] = {tuple(q.shape)} and k/v [B, Hkv, Tk, D] = {tuple(k.shape)} "
            "must agree on B and D"
        )
    if causal and t > tk:
        raise ValueError(
            f"flash_attention: causal attention needs Tq <= Tk (the queries are the last Tq of the Tk "
            f"positions), got Tq={t} > Tk={tk}; pass the keys of the whole prefix"
        )
    if hk == 0 or h % hk != 0:
        raise ValueError(f"flash_attention: query heads ({h}) must be a multiple of key/value heads ({hk})")
    padded_head_dim(d)
    if b == 0 or t == 0 or tk == 0:
        raise ValueError(f"flash_attention: empty input q {tuple(q.shape)}, k {tuple(k.shape)}; B and T must be positive")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"flash_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); cast them to one dtype"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"flash_attention: dtype {q.dtype} not supported; use float16, bfloat16 or float32")
    if q.device.type == "cuda" and q.dtype == torch.bfloat16 and not INTERPRET:
        if torch.cuda.get_device_capability(q.device) < (8, 0):
            raise ValueError("flash_attention: bfloat16 needs an sm_80+ GPU (A100, H100); use float16 on this card")


def _dq_by_tma(q: torch.Tensor, head_dim: int) -> bool:
    """Whether the one-pass backward can add dQ up by TMA bulk reductions: a compiled launch (the
    interpreter has none) on an sm_90+ GPU, and a head that fills its tile (the descriptor's box)."""
    capability = device_capability(q.device)  # None in the interpreter and on the CPU
    return capability is not None and capability >= (9, 0) and head_dim == padded_head_dim(head_dim)


def _precision(dtype: torch.dtype) -> str | None:
    # fp32 inputs: exact fp32 products ("ieee") instead of TF32, so they can serve as a reference.
    # fp16/bf16: None keeps tl.dot's default (the setting only affects fp32 operands).
    return "ieee" if dtype == torch.float32 else None


def flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
    scale: float | None = None, config: FlashConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. q [B, H, Tq, D], k/v [B, Hkv, Tk, D] -> (o [B, H, Tq, D], lse [B, H, Tq] fp32).

    o takes q's memory layout, as the backward's gradients take q's, k's and v's (``empty_like``).
    The model's q, k, v are [B, H, T, D] views of its projections' outputs [B, T, H * D], and it
    reshapes o back to [B, T, H * D]: in that layout both ways are views, where contiguous
    [B, H, T, D] outputs would cost a transposing copy each, four per layer and step.

    Causal with Tq < Tk aligns the queries to the last Tq key positions (bottom-right), as for a
    prompt processed after a cached prefix.

    lse[b, h, i] = log(sum_j exp(scale * q_i . k_j)) over the keys row i attends to.
    `config` overrides the tile sizes (for tuning); default from `flash_config`. Any D <= 128
    (see `padded_head_dim`); scale defaults to 1/sqrt(D).
    """
    _check_inputs(q, k, v, causal=causal)
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv_heads = k.shape[1]
    sm_scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    cfg = (config or _default_config(q, k.shape[2])).fwd
    o = torch.empty_like(q)  # in q's layout: for the model's q, a [B, T, H, D] memory order (see above)
    lse = torch.empty((batch, n_heads, seq_len), device=q.device, dtype=torch.float32)
    head = _head_args(head_dim, q, k, v, o)
    grid = (triton.cdiv(seq_len, cfg.block_m), batch * n_heads)
    launcher(_attn_fwd_kernel, q)[grid](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        n_heads, n_heads // n_kv_heads, seq_len, k.shape[2], sm_scale,
        **head, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, PRECISION=_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def flash_attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool = True, scale: float | None = None, config: FlashConfig | None = None,
    atomic_dq: bool = False, dkdv_kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
    dq_kernel: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the three backward kernels. Returns (dq, dk, dv) shaped like (q, k, v).

    Preprocess computes delta = rowsum(dO * O). The dK/dV kernel parallelises over key blocks
    and kv heads. dQ comes one of two ways:

    * the dQ kernel (default), over query blocks and query heads, recomputes P and dP for dQ:
      7 matmuls per tile in all, no atomics, bit-identical each run;
    * ``atomic_dq=True``, cuDNN's and FlashAttention-2's CUDA design: the dK/dV kernel also adds
      dS K into an fp32 dQ accumulator with atomic adds, and a last kernel scales and casts it:
      P is recomputed once, 5 matmuls per tile, dQ's last bits vary from run to run. With an
      atomic per element (`tl.atomic_add`) the adds cost more than the recomputation saves: on
      an H200 (bf16, triton 3.6) 14% to 47% slower at every shape measured
      (results/flash_attention_backward.json, commit 29f5985). On
      sm_90+ (`_dq_by_tma`: compiled, a head that fills its tile) each [BLOCK_M, D] tile goes
      instead as one TMA bulk reduction: closer, and still not faster, at the best of six dK/dV
      tiles 1.00-1.14x the default's time at heads of 32-128 and 1,024-16,384 keys, and 1.20x
      with `medium`'s per-element adds (its head of 40 does not fill a tile)
      (`gpu_flash_attention.py --backward`, results/flash_attention_one_pass.json). So the
      default stays the dQ kernel.

    ``dkdv_kernel``, ``dq_kernel``: other kernels' launchers, called as ``dkdv_kernel(q, k, v, do, lse,
    delta) -> (dk, dv)`` and ``dq_kernel(...) -> dq`` in place of ours (`gluon_attention.gluon_attention_backward`
    passes Hopper's). With ``atomic_dq`` a given dK/dV kernel also gets the zeroed fp32 accumulator,
    ``dkdv_kernel(q, k, v, do, lse, delta, dq_acc)``, and adds dS K into it unscaled
    (`gluon_attention.gluon_attention_dkdv_dq`, the one pass Hopper runs at heads of 64 from 4,096 keys).
    """
    if do.shape != o.shape:
        raise ValueError(f"flash_attention backward: grad {tuple(do.shape)} must match output {tuple(o.shape)}")
    if do.stride(-1) != 1:
        do = do.contiguous()
    batch, n_heads, seq_len, head_dim = q.shape
    n_kv_heads = k.shape[1]
    group_size = n_heads // n_kv_heads
    sm_scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    cfg = config or _default_config(q, k.shape[2])
    precision = _precision(q.dtype)
    if atomic_dq and dq_kernel:
        raise ValueError("flash_attention_backward: atomic_dq adds dQ up in the dK/dV kernel; drop it or the dQ kernel given")
    # the gradients our kernels write, in the inputs' layouts (a given kernel allocates its own); ALIGN is
    # decided over every tensor our kernels touch
    our_dq = torch.empty_like(q) if dq_kernel is None else None
    our_dkdv = (torch.empty_like(k), torch.empty_like(v)) if dkdv_kernel is None else None
    head = _head_args(head_dim, q, k, v, o, do, *([our_dq] if our_dq is not None else []), *(our_dkdv or ())[:1])

    delta = torch.empty_like(lse)
    # atomic dQ: an fp32 accumulator [B*H, T, D], zeroed by the preprocess kernel
    dq_acc = q.new_empty((batch * n_heads, seq_len, head_dim), dtype=torch.float32) if atomic_dq else delta
    row_block = 64  # rows per program of the two small kernels (preprocess, dQ convert)
    launcher(_attn_bwd_preprocess_kernel, q)[(triton.cdiv(seq_len, row_block), batch * n_heads)](
        o, do, delta, dq_acc,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        n_heads, seq_len, **head, BLOCK_M=row_block, ZERO_DQ=atomic_dq,
    )

    if dkdv_kernel is not None:
        dk, dv = dkdv_kernel(q, k, v, do, lse, delta, dq_acc) if atomic_dq else dkdv_kernel(q, k, v, do, lse, delta)
    else:
        assert our_dkdv is not None
        dk, dv = our_dkdv
        c = cfg.dkdv
        dq_tma = atomic_dq and _dq_by_tma(q, head_dim)
        dq_arg = TensorDescriptor.from_tensor(dq_acc, [1, c.block_m, head_dim]) if dq_tma else dq_acc
        launcher(_attn_bwd_dkdv_kernel, q)[(triton.cdiv(k.shape[2], c.block_n), batch * n_kv_heads)](
            q, k, v, do, lse, delta, dk, dv, dq_arg,
            q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            do.stride(0), do.stride(1), do.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            n_heads, n_kv_heads, group_size, seq_len, k.shape[2], sm_scale,
            **head, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            CAUSAL=causal, PRECISION=precision, ATOMIC_DQ=atomic_dq, DQ_TMA=dq_tma,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    if atomic_dq:
        assert our_dq is not None  # atomic_dq takes no dQ kernel (checked above)
        dq = our_dq
        launcher(_attn_bwd_dq_convert_kernel, q)[(triton.cdiv(seq_len, row_block), batch * n_heads)](
            dq_acc, dq, dq.stride(0), dq.stride(1), dq.stride(2), n_heads, seq_len, sm_scale,
            **head, BLOCK_M=row_block,
        )
        return dq, dk, dv

    if dq_kernel is not None:
        return dq_kernel(q, k, v, do, lse, delta), dk, dv
    assert our_dq is not None
    dq = our_dq
    c = cfg.dq
    launcher(_attn_bwd_dq_kernel, q)[(triton.cdiv(seq_len, c.block_m), batch * n_heads)](
        q, k, v, do, lse, delta, dq,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        n_heads, group_size, seq_len, k.shape[2], sm_scale,
        **head, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        CAUSAL=causal, PRECISION=precision, num_warps=c.num_warps, num_stages=c.num_stages,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd and the public function
# ----------------------------------------------------------------------------------------------


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the fp32 LSE; the backward recomputes P."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = flash_attention_forward(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_backward(do, q, k, v, o, lse, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None,
) -> torch.Tensor:
    """Exact softmax attention, fused. q [B, H, Tq, D], k/v [B, Hkv, Tk, D] -> o [B, H, Tq, D].

    Causal needs Tq <= Tk: query i sits at position Tk - Tq + i (a prefill after a cached prefix).

    H must be a multiple of Hkv (GQA/MQA), D <= 128 (other than 32, 64, 128 it runs masked in
    the next of them), dtype fp16/bf16 (fp32 for the CPU interpreter and references); scale
    defaults to 1/sqrt(D). Differentiable.
    """
    return FlashAttentionFunction.apply(q, k, v, causal, scale)
