"""A causal FlashAttention forward for Hopper (sm_90) in Gluon, FlashAttention-3's schedule written out.

Our Triton forward (`minigpt.kernels.flash_attention`) is a `tl.dot` loop: the compiler decides when each
matmul is issued and waited for, and `gpu_flash_attention.py --gemms-only` measured that it overlaps little
of the softmax with the matmuls. Gluon (`triton.experimental.gluon`, in Triton 3.6) is Triton's lower
level: layouts, shared memory, TMA copies, mbarriers and asynchronous warpgroup matmuls (`wgmma`) are
written by hand. This kernel uses that to issue the work in FlashAttention-3's order (Shah et al., 2024,
"intra-warpgroup overlap"). Iteration j of the key loop:

    issue S_{j+1} = Q K_{j+1}^T          (async wgmma, tensor cores)
    issue O += P_j V_j                   (async wgmma, queued behind it)
    wait for S_{j+1}
    softmax of S_{j+1} -> P_{j+1}         (CUDA cores, exp2 on the SFU) while P_j V_j still runs
    wait for P_j V_j; rescale O by alpha_{j+1}

Every matmul an iteration issues is waited for inside it. A schedule that leaves P_j V_j in flight across
the loop's back edge reads as a hazard to ptxas, which then serialises every wgmma ("C7514"); one that holds
two 128-wide score tiles at once runs out of registers ("C7511"). `ptxas_warnings` reports both, and a test
compiles every tile the script times and asserts neither appears.

K and V blocks stream through a ring of STAGES shared-memory slots filled by TMA copies, each slot with an
mbarrier that the copy signals; a slot is refilled once every warp has waited for the matmul reading it.
`_gluon_attn_fwd_ws_kernel` moves the copies to a load warp of their own (`gl.warp_specialize`, 24
registers a thread, the rest to the compute warps): the compute warps then issue no copies and wait at
no barrier across the CTA, and hand each slot back with an mbarrier arrival (FlashAttention-3's
producer/consumer split, without its ping-pong between two compute warpgroups).
Memory traffic per (batch, head): Q and O once (2 T D elements), K and V once per query block
(T / BLOCK_M * T D / 2 elements each, causal), as in the FlashAttention-2 loop order of the Triton kernel.

Limits, checked by `gluon_attention_forward`: causal self-attention (queries and keys the same length, no
cache offset), bf16 or fp16, q, k, v contiguous [B, H, T, D] with D 64 or 128 and T a multiple of both
tiles, and a GPU of compute capability 9.x. Gluon has no CPU interpreter, so the kernel runs only there;
on CPU the tests compile it for sm_90a and read ptxas's report.
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from typing import NamedTuple

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

from minigpt.kernels._launch import LN2, LOG2E

_LN2 = gl.constexpr(LN2)
# Gluon is experimental and renames things: Triton 3.6 calls the CTA-wide barrier thread_barrier, 3.7 barrier.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
HEAD_DIMS = (64, 128)


class GluonTile(NamedTuple):
    """Query rows and keys per program, warps (4 per 64 query rows: one warpgroup each) and K/V ring slots."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int


DEFAULT_TILE = GluonTile(64, 64, 4, 2)  # the fastest at most shapes measured (gpu_flash_attention.py --gluon)


@gluon.jit
def _softmax_block(s, m_i, l_i, qk_scale, rows, cols, MASK: gl.constexpr):
    """One online-softmax step on raw scores s [BLOCK_M, BLOCK_N] fp32. The running max m_i [BLOCK_M] stays in
    raw units (the scale is positive, so the max commutes with it); each exponent is one FMA and one exp2:
    p = 2^(s * scale * log2 e - m * scale * log2 e). Returns p, alpha = 2^(m_old - m_new) (scaled), l, m."""
    if MASK:
        s = gl.where(cols[None, :] <= rows[:, None], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_scaled = m_new * qk_scale
    alpha = gl.exp2(m_i * qk_scale - m_scaled)
    p = gl.exp2(s * qk_scale - m_scaled[:, None])
    return p, alpha, l_i * alpha + gl.sum(p, 1), m_new


@gluon.jit
def _load_kv_block(desc, bars, ring, block, row0, n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA copy of key/value block `block` (rows row0 + block * BLOCK_N ...) into ring slot block % STAGES,
    signalling that slot's mbarrier; nothing past the program's last block."""
    slot = block % STAGES
    ok = block < n_blocks
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(desc, [row0 + block * BLOCK_N, 0], bars.index(slot), ring.index(slot), pred=ok)


@gluon.jit
def _store_output(acc, l_i, m_i, rows, qk_scale, q_smem, o_desc, q_row, lse_row, row_o: gl.constexpr):
    """Normalise O once and write it through Q's shared-memory tile (same shape; Q is no longer read) with a
    TMA store; write LSE = ln(sum exp(s * scale)) [BLOCK_M], the backward's input, at lse_row + rows."""
    acc = acc / gl.convert_layout(l_i, row_o)[:, None]
    gl.store(lse_row + rows, (m_i * qk_scale + gl.log2(l_i)) * _LN2)
    _cta_barrier()
    q_smem.store(acc.to(q_smem.dtype))
    fence_async_shared()
    _cta_barrier()
    tma.async_copy_shared_to_global(o_desc, [q_row, 0], q_smem)
    tma.store_wait(0)


@gluon.jit
def _gluon_attn_fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seq_len, n_heads, group_size,
                           HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                           STAGES: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """One program = BLOCK_M queries of one (batch, head); grid (T / BLOCK_M, B * H), longest blocks first.

    q_desc, o_desc: TMA descriptors of Q, O viewed as [B * H * T, D] with [BLOCK_M, D] blocks; k_desc, v_desc
    of K, V as [B * Hkv * T, D] with [BLOCK_N, D] blocks. LSE [B, H, T] fp32 (natural log), for the backward.
    qk_scale = softmax scale * log2(e). OVERLAP=False waits for each matmul as soon as it is issued (the
    sequential schedule, to measure what the overlap buys).
    """
    dtype: gl.constexpr = q_desc.dtype
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    kv_bh = (pid_bh // n_heads) * (n_heads // group_size) + (pid_bh % n_heads) // group_size  # GQA
    q_row = pid_bh * seq_len + pid_m * BLOCK_M
    kv_row = kv_bh * seq_len
    n_blocks = ((pid_m + 1) * BLOCK_M + BLOCK_N - 1) // BLOCK_N    # key blocks up to the diagonal
    n_full = (pid_m * BLOCK_M) // BLOCK_N                          # those wholly below it: no mask

    # wgmma's accumulator layouts: S [BLOCK_M, BLOCK_N] and O [BLOCK_M, D]; P feeds P V from registers.
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        _load_kv_block(k_desc, k_bars, k_ring, i, kv_row, n_blocks, BLOCK_N, STAGES)
        _load_kv_block(v_desc, v_bars, v_ring, i, kv_row, n_blocks, BLOCK_N, STAGES)

    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)  # ignored: use_acc=False

    # Block 0: S_0 and its softmax, before the loop (slot k = block % STAGES, its fill number block // STAGES).
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bars.index(0), 0)
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    _cta_barrier()
    _load_kv_block(k_desc, k_bars, k_ring, STAGES, kv_row, n_blocks, BLOCK_N, STAGES)  # K_0's slot is free
    cols = gl.arange(0, BLOCK_N, layout=col_s)
    if n_full == 0:
        p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, True)
    else:
        p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, False)

    for j in range(0, n_blocks - 1):
        nxt = j + 1
        mbarrier.wait(k_bars.index(nxt % STAGES), (nxt // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_ring.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
        if not OVERLAP:
            s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.wait(v_bars.index(j % STAGES), (j // STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_ring.index(j % STAGES), acc, is_async=True)
        if OVERLAP:
            s = warpgroup_mma_wait(1, deps=(s,))                   # S_{j+1} done; P_j V_j still running
        else:
            acc = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(acc,)))
        cols = nxt * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_s)
        if nxt >= n_full:                                           # straddles the diagonal
            p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, True)
        else:
            p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, False)
        acc = warpgroup_mma_wait(0, deps=(acc,))                    # P_j V_j done
        acc = warpgroup_mma_init(acc * gl.convert_layout(alpha, row_o)[:, None])
        _cta_barrier()                                              # every warp is done with K_{j+1} and V_j
        _load_kv_block(k_desc, k_bars, k_ring, nxt + STAGES, kv_row, n_blocks, BLOCK_N, STAGES)
        _load_kv_block(v_desc, v_bars, v_ring, j + STAGES, kv_row, n_blocks, BLOCK_N, STAGES)

    last = n_blocks - 1
    mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_ring.index(last % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    _store_output(acc, l_i, m_i, rows, qk_scale, q_smem, o_desc, q_row, LSE + pid_bh * seq_len, row_o)


# ---------------------------------------------------------------- warp-specialised: a producer warp for the copies
@gluon.jit
def _ws_load_partition(q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, bars, q_row, kv_row, n_blocks,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp: Q, then K_b and V_b for every block b, each into its ring slot once the compute warps have
    released the block that held it (a fresh mbarrier counts as released: the first waits pass)."""
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, 0], q_bar, q_smem)
    for b in range(n_blocks):
        slot = b % STAGES
        released = ((b // STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(slot), released)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row + b * BLOCK_N, 0], k_ready.index(slot), k_ring.index(slot))
        mbarrier.wait(v_empty.index(slot), released)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [kv_row + b * BLOCK_N, 0], v_ready.index(slot), v_ring.index(slot))


@gluon.jit
def _ws_compute_partition(q_smem, k_ring, v_ring, bars, o_desc, LSE, qk_scale, pid_m, pid_bh, q_row, seq_len,
                          n_blocks, n_full, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, NUM_WARPS: gl.constexpr):
    """The compute warps: the loop of `_gluon_attn_fwd_kernel` (FlashAttention-3's order) with no copies to
    issue and no barrier across warps: each block's slot is handed back to the load warp by an mbarrier
    arrival once the matmul reading it has finished."""
    q_bar, k_ready, k_empty, v_ready, v_empty = bars
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NUM_WARPS, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)

    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)

    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.arrive(k_empty.index(0), count=1)
    cols = gl.arange(0, BLOCK_N, layout=col_s)
    if n_full == 0:
        p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, True)
    else:
        p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, False)

    for j in range(0, n_blocks - 1):
        nxt = j + 1
        k_slot = nxt % STAGES
        v_slot = j % STAGES
        mbarrier.wait(k_ready.index(k_slot), (nxt // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_ring.index(k_slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(v_slot), (j // STAGES) & 1)
        acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_ring.index(v_slot), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s,))                        # S_{j+1} done; P_j V_j still running
        mbarrier.arrive(k_empty.index(k_slot), count=1)
        cols = nxt * BLOCK_N + gl.arange(0, BLOCK_N, layout=col_s)
        if nxt >= n_full:
            p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, True)
        else:
            p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, False)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(v_empty.index(v_slot), count=1)
        acc = warpgroup_mma_init(acc * gl.convert_layout(alpha, row_o)[:, None])

    last = n_blocks - 1
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), v_ring.index(last % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    _store_output(acc, l_i, m_i, rows, qk_scale, q_smem, o_desc, q_row, LSE + pid_bh * seq_len, row_o)


@gluon.jit
def _gluon_attn_fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seq_len, n_heads, group_size,
                              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, num_warps: gl.constexpr):
    """`_gluon_attn_fwd_kernel`'s work split between partitions (same grid and arguments, always overlapped):
    num_warps compute warps and one load warp with 24 registers a thread, whose registers the compute
    warps take (the launch's maxnreg sets the pool)."""
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    kv_bh = (pid_bh // n_heads) * (n_heads // group_size) + (pid_bh % n_heads) // group_size
    q_row = pid_bh * seq_len + pid_m * BLOCK_M
    kv_row = kv_bh * seq_len
    n_blocks = ((pid_m + 1) * BLOCK_M + BLOCK_N - 1) // BLOCK_N
    n_full = (pid_m * BLOCK_M) // BLOCK_N

    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_ring = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=1)
    bars = (q_bar, k_ready, k_empty, v_ready, v_empty)
    gl.warp_specialize([
        (_ws_compute_partition, (q_smem, k_ring, v_ring, bars, o_desc, LSE, qk_scale, pid_m, pid_bh, q_row, seq_len,
                                 n_blocks, n_full, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, num_warps)),
        (_ws_load_partition, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, bars, q_row, kv_row, n_blocks,
                              BLOCK_N, STAGES)),
    ], [1], [24])


def _descriptor(x: torch.Tensor, block_rows: int):
    """Host TMA descriptor of x [..., D] as a [rows, D] matrix in [block_rows, D] blocks (128-byte swizzle)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[x.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, x.shape[-1]], dtype)
    return TensorDescriptor.from_tensor(x.reshape(-1, x.shape[-1]), [block_rows, x.shape[-1]], layout)


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: GluonTile) -> None:
    """ValueError naming what to change, for anything this kernel does not cover (see the module docstring)."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"q must be [B, H, T, D] and k, v [B, Hkv, T, D] alike; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"k, v {tuple(k.shape)} must share q's batch, length and head size, with a number of heads "
                         f"dividing q's {h}: this kernel is causal self-attention (use flash_attention otherwise)")
    if d not in HEAD_DIMS:
        raise ValueError(f"head size {d} not supported: {HEAD_DIMS} only (flash_attention runs the others)")
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must all be bf16 or fp16; got {q.dtype}, {k.dtype}, {v.dtype}")
    if t % tile.block_m or t % tile.block_n:
        raise ValueError(f"sequence length {t} must be a multiple of the tile's {tile.block_m} queries and "
                         f"{tile.block_n} keys: pad it, or use flash_attention")
    if tile.num_warps != 4 * (tile.block_m // 64) or tile.block_m % 64:
        raise ValueError(f"{tile}: block_m must be a multiple of 64 with 4 warps (one warpgroup) per 64 query rows")
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        raise ValueError("q, k, v must be contiguous [B, H, T, D] (TMA reads them as [B * H * T, D]): call .contiguous()")
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        raise ValueError(f"this Gluon kernel needs a Hopper GPU (compute capability 9.x); q is on {q.device}")


def gluon_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: GluonTile = DEFAULT_TILE,
                            overlap: bool = True, warp_specialize: bool = False,
                            maxnreg: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [B, H, T, D] over k, v [B, Hkv, T, D]: (o [B, H, T, D], lse [B, H, T] fp32,
    natural log), as `flash_attention_forward` returns them. overlap=False: the sequential schedule;
    warp_specialize: the copies from a load warp of their own (`_gluon_attn_fwd_ws_kernel`, always overlapped),
    maxnreg the registers per thread it divides between the partitions."""
    if warp_specialize and not overlap:
        raise ValueError("the warp-specialised kernel always overlaps: pass overlap=True with warp_specialize=True")
    check_inputs(q, k, v, tile)
    b, h, t, d = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
    kernel, flags = _kernel_and_flags(tile, overlap, warp_specialize, maxnreg)
    kernel[(t // tile.block_m, b * h)](
        _descriptor(q, tile.block_m), _descriptor(k, tile.block_n), _descriptor(v, tile.block_n),
        _descriptor(o, tile.block_m), lse, LOG2E / math.sqrt(d), t, h, h // k.shape[1],
        HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, STAGES=tile.stages, **flags)
    return o, lse


def _kernel_and_flags(tile: GluonTile, overlap: bool, warp_specialize: bool, maxnreg: int | None):
    """The kernel for a schedule and its launch keywords beyond the tile (without maxnreg when None)."""
    flags: dict = {"num_warps": tile.num_warps} | ({"maxnreg": maxnreg} if maxnreg else {})
    if warp_specialize:
        return _gluon_attn_fwd_ws_kernel, flags
    return _gluon_attn_fwd_kernel, flags | {"OVERLAP": overlap}


def compile_for_sm90(head_dim: int, tile: GluonTile, overlap: bool = True, warp_specialize: bool = False,
                     maxnreg: int | None = None):
    """The kernel compiled for sm_90a without a GPU (Triton's ptxas), as it would be for a bf16 launch."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    kernel, flags = _kernel_and_flags(tile, overlap, warp_specialize, maxnreg)
    x = torch.zeros(4 * max(tile.block_m, tile.block_n), head_dim, dtype=torch.bfloat16)
    q_ty, kv_ty = mangle_type(_descriptor(x, tile.block_m)), mangle_type(_descriptor(x, tile.block_n))
    signature = {"q_desc": q_ty, "k_desc": kv_ty, "v_desc": kv_ty, "o_desc": q_ty, "LSE": "*fp32", "qk_scale": "fp32",
                 "seq_len": "i32", "n_heads": "i32", "group_size": "i32"}
    options = {key: flags.pop(key) for key in ("num_warps", "maxnreg") if key in flags}
    constants = {"HEAD_DIM": head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "STAGES": tile.stages,
                 "num_warps": tile.num_warps, **flags}
    signature |= dict.fromkeys(constants, "constexpr")
    src = GluonASTSource(kernel, signature, constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def ptxas_warnings(kernel) -> list[str]:
    """ptxas's performance warnings (C75xx: wgmma serialised) and spill lines for a compiled kernel's PTX."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(kernel.asm["ptx"])
        proc = subprocess.run([ptxas, "--gpu-name", "sm_90a", "-v", ptx, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    return [line.strip() for line in proc.stderr.splitlines()
            if "C75" in line or ("spill" in line and not line.strip().startswith("0 bytes stack frame, 0 bytes spill"))]
