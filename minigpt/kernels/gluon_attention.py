"""Causal FlashAttention for Hopper (sm_90) in Gluon: the forward in FlashAttention-3's schedule, and a backward.

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
compiles every overlapped variant `gpu_flash_attention.py --gluon` times and asserts neither appears (nor a
spill).

K and V blocks stream through a ring of STAGES shared-memory slots filled by TMA copies, each slot with an
mbarrier that the copy signals; a slot is refilled once every warp has waited for the matmul reading it.
`_gluon_attn_fwd_ws_kernel` moves the copies to a load warp of their own (`gl.warp_specialize`, 24
registers a thread, the rest to the compute warps): the compute warps then issue no copies and wait at
no barrier across the CTA, and hand each slot back with an mbarrier arrival (FlashAttention-3's
producer/consumer split). With two consumer warpgroups, each with 64 of the program's 128 query rows and
240 registers a thread, sharing the K/V ring, it is FlashAttention-3's layout. The two run free
("cooperative") or pass a turn back and forth through two mbarriers ("ping-pong", FlashAttention-3's
inter-warpgroup schedule), so that one issues its matmuls while the other runs its softmax:

    consumer 0:  [S, PV issued] softmax ........ [S, PV issued] softmax ........
    consumer 1:  ..... wait ....[S, PV issued] softmax ........ [S, PV issued] ...

On the H200 the turns bought nothing over running free (gpu_flash_attention.py --gluon: 0.98-1.03x), and
the two-consumer kernel is the fastest from 4096 keys at D=128 and at 16384 keys at D=64; at shorter
sequences the plain kernel's 64 x 64 programs, several to an SM, are.

Memory traffic per (batch, head): Q and O once (2 T D elements), K and V once per query block
(T / BLOCK_M * T D / 2 elements each, causal), as in the FlashAttention-2 loop order of the Triton kernel.

The backward has two kernels here too, each the portable one's loop with its operands placed by hand (the
preprocess, delta = rowsum(dO * O), stays the portable kernel's): `_gluon_attn_bwd_dkdv_kernel` keeps a block of
K and V in shared memory and streams Q and dO tiles past it through a TMA ring (four wgmmas a step: S^T, dP^T,
then dV and dK from registers), and `_gluon_attn_bwd_dq_kernel` is the forward's loop with dP and dQ in place
of the online softmax (three). Neither is warp-specialised: several programs share an SM. Traffic per (batch,
head), causal: the dK/dV kernel reads K and V once and Q and dO once per key block (T / BLOCK_N * T D / 2
elements each); the dQ kernel reads Q and dO once and K and V once per query block, as the forward does.

`_gluon_attn_bwd_onepass_kernel` is the backward in one pass, cuDNN's and FlashAttention-3's: the dK/dV
kernel's step with a fifth matmul, dQ_part = dS K, added into an fp32 accumulator by TMA bulk reductions (five
matmuls a tile instead of seven, for T^2 / (2 * 128) * D * 4 bytes of adds a head). It is warp-specialised,
FlashAttention-3's split: a load warp, two compute warpgroups of 64 keys sharing each Q and dO tile and taking
turns at the step's dQ matmul (at heads of 128 each computes half of its columns instead), and a reduction
warp. `gluon_attention_backward` runs the dK/dV and dQ kernels, either, or the one pass; `backward_plan` says
which the H200 measured faster than the portable ones.

Limits, checked by `gluon_attention_forward`: causal self-attention (queries and keys the same length, no
cache offset), bf16 or fp16, D 64 or 128, T a multiple of both tiles, q, k, v either the model's per-head
views of [B, T, H * D] projections or contiguous [B, H, T, D] (`_layout`), and a GPU of compute capability
9.x. Gluon has no CPU interpreter, so the kernel runs only there; on CPU the tests compile it for sm_90a
and read ptxas's report. The library uses it through `minigpt.ops.flash_attention`, on Hopper, for the
forward over the inputs `covers` accepts, at `default_plan`'s tile, and for their backward the kernels of
`backward_plan` (`flash_attention_backward` takes this forward's o and log-sum-exp as its own). The
backward variants measured and not adopted live in `scripts/`: the dK/dV kernel warp-specialised
(`gluon_ws_backward.py`) and the one pass without warp specialisation or by atomic adds
(`gluon_onepass_backward.py`); they share this module's steps (`_key_block`, `_step_queries`, `_dkdv_issue`,
`_store_dk_dv`, `_bwd_load_partition`).
"""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from functools import partial
from typing import NamedTuple

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
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
LOG2E_ = gl.constexpr(LOG2E)
# Gluon is experimental and renames things: Triton 3.6 calls the CTA-wide barrier thread_barrier, 3.7 barrier.
_cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier
HEAD_DIMS = (64, 128)
SCHEDULES = ("overlap", "sequential", "warp-specialised", "cooperative", "ping-pong")


class GluonTile(NamedTuple):
    """Query rows and keys per program, warps (4 per 64 query rows: one warpgroup each) and K/V ring slots."""

    block_m: int
    block_n: int
    num_warps: int
    stages: int


DEFAULT_TILE = GluonTile(128, 128, 8, 2)  # two consumer warpgroups: the fastest at long sequences (--gluon's rounds)
DEFAULT_SCHEDULE = "cooperative"  # as fast as the ping-pong there, and simpler
BWD_TILE = GluonTile(64, 64, 4, 2)  # dK/dV: 64 queries a step, 64 keys a program (--gluon-backward's fastest)
DQ_TILE = GluonTile(64, 64, 4, 2)  # dQ: 64 queries a program, 64 keys a step
ONE_PASS_TILE = GluonTile(64, 128, 8, 2)  # one pass: 64 queries a step, 128 keys a program on two warpgroups
ONE_PASS_FROM = {64: 4096, 128: 16384}  # head size -> the length from which `backward_plan` runs the one pass


class BackwardPlan(NamedTuple):
    """The Gluon kernels a causal backward runs (`gluon_attention_backward`'s tile, dq_tile, one_pass): the
    dK/dV kernel's tile, the dQ kernel's, or the one-pass kernel's in place of both; None: not that kernel
    (the portable one, where the one pass is not run)."""

    dkdv: GluonTile | None
    dq: GluonTile | None
    one_pass: GluonTile | None


@triton.constexpr_function
def _mma_layout(num_warps, n):
    """wgmma's accumulator layout for a [rows, n] tile: 16-row instructions, the warps stacked along the rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.jit
def _program(n_heads, group_size, q_br, q_hr, q_hc, kv_br, kv_hr, kv_hc, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr):
    """What program (query block, batch * head) of grid (T / BLOCK_M, B * H) works on, longest blocks first:
    its query block pid_m, pid_bh, the (row, column) in Q's and O's matrix of its first query, and in K's and
    V's of key 0 (GQA: query head h reads key/value head h // group_size), and its key blocks up to the
    diagonal and those below it. Element (b, h, t) of a [B, H, T, D] tensor sits at row b * br + h * hr + t,
    column h * hc of its matrix (`_matrix`: br, hr, hc are T, 0, D for the model's [B, T, H, D] memory order)."""
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    kv_h = h // group_size
    n_blocks = ((pid_m + 1) * BLOCK_M + BLOCK_N - 1) // BLOCK_N
    n_full = (pid_m * BLOCK_M) // BLOCK_N
    q_at = (b * q_br + h * q_hr + pid_m * BLOCK_M, h * q_hc)
    kv_at = (b * kv_br + kv_h * kv_hr, kv_h * kv_hc)
    return pid_m, pid_bh, q_at, kv_at, n_blocks, n_full


@gluon.jit
def _tiles(q_desc, k_desc, v_desc, STAGES: gl.constexpr, Q_TILES: gl.constexpr):
    """Shared memory for Q tiles [Q_TILES, rows, D] (one per consumer) and the K, V rings [STAGES, BLOCK_N, D],
    in the descriptors' layouts."""
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [Q_TILES, q_desc.block_type.shape[0], q_desc.block_type.shape[1]], q_desc.layout)
    k_ring = gl.allocate_shared_memory(k_desc.dtype, [STAGES, k_desc.block_type.shape[0], k_desc.block_type.shape[1]], k_desc.layout)
    v_ring = gl.allocate_shared_memory(v_desc.dtype, [STAGES, v_desc.block_type.shape[0], v_desc.block_type.shape[1]], v_desc.layout)
    return q_smem, k_ring, v_ring


@gluon.jit
def _barriers(N: gl.constexpr, ARRIVALS: gl.constexpr):
    """N mbarriers [N, 1], each completing its phase on ARRIVALS arrivals (a TMA copy's, or partitions')."""
    bars = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(N):
        mbarrier.init(bars.index(i), count=ARRIVALS)
    return bars


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
def _softmax_of_block(s, block, n_full, m_i, l_i, qk_scale, rows, BLOCK_N: gl.constexpr):
    """`_softmax_block` of key block `block`, masked only if it straddles the diagonal (block >= n_full)."""
    cols = block * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s.type.layout))
    if block >= n_full:
        p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, True)
    else:
        p, alpha, l_i, m_i = _softmax_block(s, m_i, l_i, qk_scale, rows, cols, False)
    return p, alpha, l_i, m_i


@gluon.jit
def _first_block(q_smem, k_ring, q_ready, k_ready, s_zero, m_i, l_i, qk_scale, rows, n_full, BLOCK_N: gl.constexpr):
    """S_0 = Q K_0^T once Q (its mbarrier q_ready) and K_0 have landed, and its softmax: P_0 and the running l, m."""
    mbarrier.wait(q_ready, 0)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q_smem, k_ring.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    p, _alpha, l_i, m_i = _softmax_of_block(s, 0, n_full, m_i, l_i, qk_scale, rows, BLOCK_N)
    return p, l_i, m_i


@gluon.jit
def _issue_block(j, p, acc, q_smem, k_ring, v_ring, k_ready, v_ready, s_zero, STAGES: gl.constexpr,
                 OVERLAP: gl.constexpr):
    """First half of iteration j of the key loop (block b sits in ring slot b % STAGES, on its (b // STAGES)-th
    fill): issue S_{j+1} = Q K_{j+1}^T and O += P_j V_j as asynchronous wgmmas, once their blocks have landed.
    OVERLAP=False waits for each as soon as it is issued (the sequential schedule). Returns S's and O's handles."""
    o_layout: gl.constexpr = acc.type.tensor_type.layout  # acc is an accumulator handle (warpgroup_mma_init)
    nxt = j + 1
    mbarrier.wait(k_ready.index(nxt % STAGES), (nxt // STAGES) & 1)
    s = warpgroup_mma(q_smem, k_ring.index(nxt % STAGES).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    if not OVERLAP:
        s = warpgroup_mma_wait(0, deps=(s,))
    mbarrier.wait(v_ready.index(j % STAGES), (j // STAGES) & 1)
    p16 = gl.convert_layout(p.to(q_smem.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    acc = warpgroup_mma(p16, v_ring.index(j % STAGES), acc, is_async=True)
    if not OVERLAP:
        acc = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(acc,)))
    return s, acc


@gluon.jit
def _finish_block(j, s, acc, m_i, l_i, qk_scale, rows, n_full, BLOCK_N: gl.constexpr, OVERLAP: gl.constexpr):
    """Second half of iteration j: wait for S_{j+1}, its softmax while P_j V_j runs (OVERLAP), wait for P_j V_j,
    rescale O by alpha_{j+1}. Returns P_{j+1}, O, m, l. When it returns, no matmul reads K_{j+1} or V_j."""
    o_layout: gl.constexpr = acc.type.tensor_type.layout
    if OVERLAP:
        s = warpgroup_mma_wait(1, deps=(s,))                       # S_{j+1} done; P_j V_j still running
    p, alpha, l_i, m_i = _softmax_of_block(s, j + 1, n_full, m_i, l_i, qk_scale, rows, BLOCK_N)
    acc = warpgroup_mma_wait(0, deps=(acc,))                        # P_j V_j done
    acc = warpgroup_mma_init(acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None])
    return p, acc, m_i, l_i


@gluon.jit
def _next_block(j, p, acc, m_i, l_i, q_smem, k_ring, v_ring, k_ready, v_ready, s_zero, qk_scale, rows, n_full,
                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr):
    """Iteration j of the key loop, `_issue_block` then `_finish_block`: returns P_{j+1}, O, m, l."""
    s, acc = _issue_block(j, p, acc, q_smem, k_ring, v_ring, k_ready, v_ready, s_zero, STAGES, OVERLAP)
    return _finish_block(j, s, acc, m_i, l_i, qk_scale, rows, n_full, BLOCK_N, OVERLAP)


@gluon.jit
def _last_block(p, acc, v_ring, v_ready, last, STAGES: gl.constexpr):
    """O += P_last V_last, waited for: the finished, unnormalised O."""
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    p16 = gl.convert_layout(p.to(v_ring.dtype), gl.DotOperandLayout(operand_index=0, parent=acc.type.tensor_type.layout, k_width=2))
    acc = warpgroup_mma(p16, v_ring.index(last % STAGES), acc, is_async=True)
    return warpgroup_mma_wait(0, deps=(acc,))


@gluon.jit
def _store_output(acc, l_i, m_i, rows, qk_scale, q_smem, o_desc, o_at, lse_row):
    """Normalise O once and write it through Q's shared-memory tile (same shape; Q is no longer read) with a
    TMA store at (row, column) o_at of O's matrix; write LSE = ln(sum exp(s * scale)) [BLOCK_M], the backward's
    input, at lse_row + rows."""
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, acc.type.layout))[:, None]
    gl.store(lse_row + rows, (m_i * qk_scale + gl.log2(l_i)) * _LN2)
    _cta_barrier()
    q_smem.store(acc.to(q_smem.dtype))
    fence_async_shared()
    _cta_barrier()
    tma.async_copy_shared_to_global(o_desc, [o_at[0], o_at[1]], q_smem)
    tma.store_wait(0)


@gluon.jit
def _load_kv_block(desc, bars, ring, block, kv_at, n_blocks, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA copy of key/value block `block` (key 0 at (row, column) kv_at of the matrix) into ring slot
    block % STAGES, signalling that slot's mbarrier; nothing past the program's last block."""
    slot = block % STAGES
    ok = block < n_blocks
    mbarrier.expect(bars.index(slot), desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(desc, [kv_at[0] + block * BLOCK_N, kv_at[1]], bars.index(slot), ring.index(slot),
                                    pred=ok)


@gluon.jit
def _initial_state(pid_m, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr, NUM_WARPS: gl.constexpr):
    """The program's query rows [BLOCK_M], running max (-inf) and sum (0), O (0, as a wgmma accumulator) and the
    zero tile S's wgmmas are given (ignored: use_acc=False), in wgmma's layouts."""
    s_layout: gl.constexpr = _mma_layout(NUM_WARPS, BLOCK_N)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_s)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=row_s)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=row_s)
    o_layout: gl.constexpr = _mma_layout(NUM_WARPS, HEAD_DIM)
    acc = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=o_layout))
    return rows, m_i, l_i, acc, gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)


@gluon.jit
def _gluon_attn_fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seq_len, n_heads, group_size,
                           q_br, q_hr, q_hc, kv_br, kv_hr, kv_hc, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr, OVERLAP: gl.constexpr, num_warps: gl.constexpr):
    """One program = BLOCK_M queries of one (batch, head); grid (T / BLOCK_M, B * H), longest blocks first.

    q_desc, o_desc: TMA descriptors of Q's and O's 2-D matrices (`_matrix`) in [BLOCK_M, D] blocks, k_desc,
    v_desc of K's and V's in [BLOCK_N, D] blocks; (q_br, q_hr, q_hc) and (kv_br, kv_hr, kv_hc) place each
    head's rows in them (`_layout`; O shares Q's). LSE [B, H, T] fp32 (natural log), for the backward.
    qk_scale = softmax scale * log2(e). The same warps issue the copies and compute: a slot is refilled after
    a barrier across the program. OVERLAP=False waits for each matmul as soon as it is issued (the sequential
    schedule, to measure what the overlap buys).
    """
    pid_m, pid_bh, q_at, kv_at, n_blocks, n_full = _program(n_heads, group_size, q_br, q_hr, q_hc, kv_br, kv_hr,
                                                             kv_hc, BLOCK_M, BLOCK_N)
    q_tiles, k_ring, v_ring = _tiles(q_desc, k_desc, v_desc, STAGES, 1)
    q_smem = q_tiles.index(0)
    q_bar, k_ready, v_ready = _barriers(1, 1), _barriers(STAGES, 1), _barriers(STAGES, 1)
    mbarrier.expect(q_bar.index(0), q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_at[0], q_at[1]], q_bar.index(0), q_smem)
    for i in gl.static_range(STAGES):
        _load_kv_block(k_desc, k_ready, k_ring, i, kv_at, n_blocks, BLOCK_N, STAGES)
        _load_kv_block(v_desc, v_ready, v_ring, i, kv_at, n_blocks, BLOCK_N, STAGES)

    rows, m_i, l_i, acc, s_zero = _initial_state(pid_m, BLOCK_M, BLOCK_N, HEAD_DIM, num_warps)
    p, l_i, m_i = _first_block(q_smem, k_ring, q_bar.index(0), k_ready, s_zero, m_i, l_i, qk_scale, rows, n_full, BLOCK_N)
    _cta_barrier()
    _load_kv_block(k_desc, k_ready, k_ring, STAGES, kv_at, n_blocks, BLOCK_N, STAGES)  # K_0's slot is free
    for j in range(0, n_blocks - 1):
        p, acc, m_i, l_i = _next_block(j, p, acc, m_i, l_i, q_smem, k_ring, v_ring, k_ready, v_ready, s_zero,
                                       qk_scale, rows, n_full, BLOCK_N, STAGES, OVERLAP)
        _cta_barrier()                                              # every warp is done with K_{j+1} and V_j
        _load_kv_block(k_desc, k_ready, k_ring, j + 1 + STAGES, kv_at, n_blocks, BLOCK_N, STAGES)
        _load_kv_block(v_desc, v_ready, v_ring, j + STAGES, kv_at, n_blocks, BLOCK_N, STAGES)
    acc = _last_block(p, acc, v_ring, v_ready, n_blocks - 1, STAGES)
    _store_output(acc, l_i, m_i, rows, qk_scale, q_smem, o_desc, q_at, LSE + pid_bh * seq_len)


# ---------------------------------------------------------------- warp-specialised: a load warp for the copies
@gluon.jit
def _ws_load_partition(q_desc, k_desc, v_desc, q_tiles, k_ring, v_ring, bars, q_at, kv_at, n_blocks,
                       BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr):
    """One warp: each consumer's Q tile, then K_b and V_b for every block b, each into its ring slot once every
    consumer has released the block that held it (a fresh mbarrier counts as released: the first waits pass)."""
    q_ready, k_ready, k_empty, v_ready, v_empty, _turn = bars
    for c in gl.static_range(CONSUMERS):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [q_at[0] + c * q_desc.block_type.shape[0], q_at[1]], q_ready.index(c),
                                        q_tiles.index(c))
    for b in range(n_blocks):
        released = ((b // STAGES) & 1) ^ 1
        mbarrier.wait(k_empty.index(b % STAGES), released)
        _load_kv_block(k_desc, k_ready, k_ring, b, kv_at, n_blocks, BLOCK_N, STAGES)
        mbarrier.wait(v_empty.index(b % STAGES), released)
        _load_kv_block(v_desc, v_ready, v_ring, b, kv_at, n_blocks, BLOCK_N, STAGES)


@gluon.jit
def _ws_compute_partition(q_tiles, k_ring, v_ring, bars, o_desc, LSE, qk_scale, pid_m, pid_bh, q_at, seq_len,
                          n_blocks, n_full, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                          STAGES: gl.constexpr, NUM_WARPS: gl.constexpr, CONSUMER: gl.constexpr,
                          CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr):
    """A consumer: `_gluon_attn_fwd_kernel`'s loop over the program's query rows pid_m * CONSUMERS * ROWS +
    CONSUMER * ROWS ..., with no copies to issue and no barrier across the program; each block's slot goes back
    to the load warp by an mbarrier arrival once no matmul of this consumer reads it.

    Two consumers with PINGPONG take turns to issue their matmuls: consumer c waits for its turn barrier,
    issues S_{j+1} and P_j V_j, and hands the turn to the other, so that one's softmax runs while the other's
    matmuls occupy the tensor cores (FlashAttention-3's inter-warpgroup schedule). Without, they run free
    (CUTLASS calls that split of one tile between two warpgroups "cooperative")."""
    q_ready, k_ready, k_empty, v_ready, v_empty, turn = bars
    q_smem = q_tiles.index(CONSUMER)
    rows, m_i, l_i, acc, s_zero = _initial_state(pid_m * CONSUMERS + CONSUMER, ROWS, BLOCK_N, HEAD_DIM, NUM_WARPS)
    p, l_i, m_i = _first_block(q_smem, k_ring, q_ready.index(CONSUMER), k_ready, s_zero, m_i, l_i, qk_scale, rows,
                               n_full, BLOCK_N)
    mbarrier.arrive(k_empty.index(0), count=1)
    for j in range(0, n_blocks - 1):
        if PINGPONG:  # consumer 0 goes first: its first wait is on the parity a fresh barrier has completed
            mbarrier.wait(turn.index(CONSUMER), (j + 1 - CONSUMER) & 1)
        s, acc = _issue_block(j, p, acc, q_smem, k_ring, v_ring, k_ready, v_ready, s_zero, STAGES, True)
        if PINGPONG:
            mbarrier.arrive(turn.index((CONSUMER + 1) % CONSUMERS), count=1)
        p, acc, m_i, l_i = _finish_block(j, s, acc, m_i, l_i, qk_scale, rows, n_full, BLOCK_N, True)
        mbarrier.arrive(k_empty.index((j + 1) % STAGES), count=1)
        mbarrier.arrive(v_empty.index(j % STAGES), count=1)
    acc = _last_block(p, acc, v_ring, v_ready, n_blocks - 1, STAGES)
    _store_output(acc, l_i, m_i, rows, qk_scale, q_smem, o_desc, (q_at[0] + CONSUMER * ROWS, q_at[1]),
                  LSE + pid_bh * seq_len)


@gluon.jit
def _gluon_attn_fwd_ws_kernel(q_desc, k_desc, v_desc, o_desc, LSE, qk_scale, seq_len, n_heads, group_size,
                              q_br, q_hr, q_hc, kv_br, kv_hr, kv_hc, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, CONSUMERS: gl.constexpr, PINGPONG: gl.constexpr,
                              CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """`_gluon_attn_fwd_kernel`'s work split between partitions (same grid and arguments, always overlapped):
    one load warp with 24 registers a thread, and CONSUMERS compute partitions of num_warps warps, each with
    BLOCK_M / CONSUMERS query rows (q_desc's block) and the K/V ring shared. One consumer is the default
    partition (the launch's maxnreg sets the register pool it takes the load warp's share of); a second is a
    worker with CONSUMER_REGS registers a thread; with PINGPONG the two take turns (`_ws_compute_partition`)."""
    pid_m, pid_bh, q_at, kv_at, n_blocks, n_full = _program(n_heads, group_size, q_br, q_hr, q_hc, kv_br, kv_hr,
                                                             kv_hc, BLOCK_M, BLOCK_N)
    q_tiles, k_ring, v_ring = _tiles(q_desc, k_desc, v_desc, STAGES, CONSUMERS)
    bars = (_barriers(CONSUMERS, 1), _barriers(STAGES, 1), _barriers(STAGES, CONSUMERS), _barriers(STAGES, 1),
            _barriers(STAGES, CONSUMERS), _barriers(CONSUMERS, 1))
    rows: gl.constexpr = BLOCK_M // CONSUMERS
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_ws_compute_partition, (q_tiles, k_ring, v_ring, bars, o_desc, LSE, qk_scale, pid_m, pid_bh, q_at,
                                     seq_len, n_blocks, n_full, HEAD_DIM, rows, BLOCK_N, STAGES, num_warps, 0, 1, False)),
            (_ws_load_partition, (q_desc, k_desc, v_desc, q_tiles, k_ring, v_ring, bars, q_at, kv_at, n_blocks,
                                  BLOCK_N, STAGES, CONSUMERS)),
        ], [1], [24])
    else:
        gl.warp_specialize([
            (_ws_compute_partition, (q_tiles, k_ring, v_ring, bars, o_desc, LSE, qk_scale, pid_m, pid_bh, q_at,
                                     seq_len, n_blocks, n_full, HEAD_DIM, rows, BLOCK_N, STAGES, num_warps, 0, 2, PINGPONG)),
            (_ws_compute_partition, (q_tiles, k_ring, v_ring, bars, o_desc, LSE, qk_scale, pid_m, pid_bh, q_at,
                                     seq_len, n_blocks, n_full, HEAD_DIM, rows, BLOCK_N, STAGES, num_warps, 1, 2, PINGPONG)),
            (_ws_load_partition, (q_desc, k_desc, v_desc, q_tiles, k_ring, v_ring, bars, q_at, kv_at, n_blocks,
                                  BLOCK_N, STAGES, CONSUMERS)),
        ], [num_warps, 1], [CONSUMER_REGS, 24])


# ---------------------------------------------------------------- backward: dK and dV of one key block
@gluon.jit
def _load_q_do_block(q_desc, do_desc, bars, q_ring, do_ring, step, n_steps, n_q, m0, q_at, do_at,
                     BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """TMA copies of the Q and dO tiles of `step` (query head g = step // n_q of the group, query block
    m0 + step % n_q) into ring slot step % STAGES, both signalling that slot's mbarrier; nothing past n_steps.
    q_at, do_at: (row, column) of the group's first head's query 0 in the matrix, and (rows, columns) from one
    head to the next (`_layout`'s hr, hc)."""
    slot = step % STAGES
    ok = step < n_steps
    g = step // n_q
    t = (m0 + step % n_q) * BLOCK_M
    mbarrier.expect(bars.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(q_desc, [q_at[0] + g * q_at[2] + t, q_at[1] + g * q_at[3]], bars.index(slot),
                                    q_ring.index(slot), pred=ok)
    tma.async_copy_global_to_shared(do_desc, [do_at[0] + g * do_at[2] + t, do_at[1] + g * do_at[3]],
                                    bars.index(slot), do_ring.index(slot), pred=ok)


@gluon.jit
def _query_rows(LSE, DELTA, head_row, start, BLOCK_M: gl.constexpr, s_layout: gl.constexpr):
    """The positions `rows` [BLOCK_M] of a dK/dV step's queries (from `start`), with their LSE * log2 e and
    Delta read from row head_row + rows of LSE and DELTA [B * H, T] fp32, in S^T's column layout."""
    rows = start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    stats = head_row + rows
    return rows, gl.load(LSE + stats) * LOG2E_, gl.load(DELTA + stats)


@gluon.jit
def _key_block(seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """What program (key block, batch * kv head) of grid (T / BLOCK_N, B * Hkv) works on, the longest first (key
    block 0 sees every query): its batch b, the group's first query head h0, its first key start_n, the (row,
    column) of its K and V block, those of the group's first head's Q and dO rows with the step from one head
    to the next (`_load_q_do_block`'s q_at, do_at), its first query block m0 (the diagonal's), the query blocks
    n_q from there to the end, and its steps, n_q for each of the group's heads."""
    pid_n = gl.program_id(0)
    pid_bkv = gl.program_id(1)
    n_kv_heads = n_heads // group_size
    b, kv_h = pid_bkv // n_kv_heads, pid_bkv % n_kv_heads
    start_n = pid_n * BLOCK_N
    h0 = kv_h * group_size                                          # the group's first query head
    kv_at = (b * kv_br + kv_h * kv_hr + start_n, kv_h * kv_hc)
    q_at = (b * q_br + h0 * q_hr, h0 * q_hc, q_hr, q_hc)           # + g * (hr rows, hc columns) for head h0 + g
    do_at = (b * do_br + h0 * do_hr, h0 * do_hc, do_hr, do_hc)
    m0 = start_n // BLOCK_M                                         # first query block that sees these keys
    n_q = seq_len // BLOCK_M - m0
    return b, h0, start_n, kv_at, q_at, do_at, m0, n_q, group_size * n_q


@gluon.jit
def _dkdv_issue(k_smem, v_smem, q_t, do_t, dk, dv, s_zero, keys, rows, lse, delta, qk_scale, masked,
                a_layout: gl.constexpr):
    """The matmuls of one step of the dK/dV loop, for the keys of k_smem, v_smem [keys, D] and the queries of
    the ring slot's q_t, do_t [BLOCK_M, D] (lse * log2 e and delta of the queries `rows`; `masked` where their
    block overlaps `keys`): S^T and dP^T issued together, P^T and dS^T formed in registers, dV and dK issued
    with them as A operands and left in flight. Returns (dk, dv, ds_t): the accumulators, and dS^T [keys,
    BLOCK_M] in q's dtype (the one-pass backward's dQ reads it)."""
    s_t = warpgroup_mma(k_smem, q_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    dp_t = warpgroup_mma(v_smem, do_t.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    s_t = warpgroup_mma_wait(1, deps=(s_t,))
    p_t = gl.exp2(s_t * qk_scale - lse[None, :])
    if masked:
        p_t = gl.where(rows[None, :] >= keys[:, None], p_t, 0.0)
    dv = warpgroup_mma(gl.convert_layout(p_t.to(q_t.dtype), a_layout), do_t, dv, is_async=True)
    dp_t = warpgroup_mma_wait(1, deps=(dp_t,))
    ds_t = (p_t * (dp_t - delta[None, :])).to(q_t.dtype)
    dk = warpgroup_mma(gl.convert_layout(ds_t, a_layout), q_t, dk, is_async=True)
    return dk, dv, ds_t


@gluon.jit
def _dkdv_step(k_smem, v_smem, q_t, do_t, dk, dv, s_zero, keys, rows, lse, delta, qk_scale, masked,
               a_layout: gl.constexpr):
    """One step of the dK/dV loop (`_dkdv_issue`'s arguments): its four matmuls issued, then waited for.
    Returns (dk, dv), ready for the next step's matmuls."""
    dk, dv, _ = _dkdv_issue(k_smem, v_smem, q_t, do_t, dk, dv, s_zero, keys, rows, lse, delta, qk_scale, masked,
                            a_layout)
    dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
    return warpgroup_mma_init(dk), warpgroup_mma_init(dv)


@gluon.jit
def _step_queries(step, ready, LSE, DELTA, b, n_heads, h0, seq_len, n_q, m0, BLOCK_M: gl.constexpr,
                  STAGES: gl.constexpr, s_layout: gl.constexpr):
    """Step `step` of a dK/dV loop (`_key_block`'s b, h0, n_q, m0): its ring slot, once its Q and dO tiles have
    landed, its query block j from the diagonal's, and its queries' rows, LSE * log2 e and Delta
    (`_query_rows`)."""
    slot = step % STAGES
    j = step % n_q
    rows, lse, delta = _query_rows(LSE, DELTA, (b * n_heads + h0 + step // n_q) * seq_len, (m0 + j) * BLOCK_M,
                                   BLOCK_M, s_layout)
    mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
    return slot, j, rows, lse, delta


@gluon.jit
def _store_dk_dv(dk, dv, k_smem, v_smem, dk_desc, dv_desc, kv_at, sm_scale):
    """A dK/dV program's results out through K's and V's shared-memory tiles, which its matmuls no longer read,
    by TMA stores. S = scale * Q K^T, so dK = scale * dS^T Q."""
    k_smem.store((dk * sm_scale).to(k_smem.dtype))
    v_smem.store(dv.to(v_smem.dtype))
    fence_async_shared()
    _cta_barrier()
    tma.async_copy_shared_to_global(dk_desc, [kv_at[0], kv_at[1]], k_smem)
    tma.async_copy_shared_to_global(dv_desc, [kv_at[0], kv_at[1]], v_smem)
    tma.store_wait(0)


@gluon.jit
def _gluon_attn_bwd_dkdv_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, LSE, DELTA, qk_scale, sm_scale,
                                seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc,
                                kv_br, kv_hr, kv_hc, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                BLOCK_N: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):
    """dK and dV of BLOCK_N keys of one (batch, kv head); grid (T / BLOCK_N, B * Hkv), longest programs first.

    The portable kernel's loop (`flash_attention._attn_bwd_dkdv_kernel`) with its operands placed by hand:
    K and V stay in shared memory for the whole program (wgmma's A operands, not registers), Q and dO tiles
    of BLOCK_M queries stream through a ring of STAGES slots filled by TMA copies, and each step issues its
    four matmuls as asynchronous wgmmas, two at a time:

        S^T = K Q^T,  dP^T = V dO^T                (issued together, waited for together)
        P^T = exp2(S^T * scale log2 e - LSE log2 e),  dS^T = P^T (dP^T - Delta)     (registers)
        dV += P^T dO,  dK += dS^T Q                 (A from registers, B from the ring slot)

    Transposed tiles (keys along rows), so that dK and dV accumulate without a transpose. The queries run
    from the diagonal block to the end (causal: earlier ones cannot see these keys), masked only where their
    block overlaps the keys', and over the group_size query heads sharing this kv head (GQA, summed in
    registers). LSE and DELTA [B, H, T] fp32 (natural log; Delta = rowsum(dO * O)). num_warps = BLOCK_N / 16:
    each warp holds 16 keys' rows of every accumulator."""
    b, h0, start_n, kv_at, q_at, do_at, m0, n_q, n_steps = _key_block(
        seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc, BLOCK_M, BLOCK_N)
    n_masked = (BLOCK_N + BLOCK_M - 1) // BLOCK_M                   # blocks overlapping the keys' positions

    k_smem = gl.allocate_shared_memory(k_desc.dtype, [BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [BLOCK_N, HEAD_DIM], v_desc.layout)
    q_ring = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    kv_bar, ready = _barriers(1, 1), _barriers(STAGES, 1)
    mbarrier.expect(kv_bar.index(0), k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [kv_at[0], kv_at[1]], kv_bar.index(0), k_smem)
    tma.async_copy_global_to_shared(v_desc, [kv_at[0], kv_at[1]], kv_bar.index(0), v_smem)
    for i in gl.static_range(STAGES):
        _load_q_do_block(q_desc, do_desc, ready, q_ring, do_ring, i, n_steps, n_q, m0, q_at, do_at, BLOCK_M,
                         STAGES)

    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_M)       # S^T, dP^T [BLOCK_N, BLOCK_M]
    acc_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)    # dK, dV [BLOCK_N, D]
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    keys = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
    dk = warpgroup_mma_init(gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout))
    dv = warpgroup_mma_init(gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=acc_layout))
    mbarrier.wait(kv_bar.index(0), 0)
    for step in range(n_steps):
        slot, j, rows, lse, delta = _step_queries(step, ready, LSE, DELTA, b, n_heads, h0, seq_len, n_q, m0, BLOCK_M,
                                                  STAGES, s_layout)
        dk, dv = _dkdv_step(k_smem, v_smem, q_ring.index(slot), do_ring.index(slot), dk, dv, s_zero, keys, rows, lse,
                            delta, qk_scale, j < n_masked, a_layout)
        _cta_barrier()                                              # every warp is done with this slot
        _load_q_do_block(q_desc, do_desc, ready, q_ring, do_ring, step + STAGES, n_steps, n_q, m0, q_at, do_at,
                         BLOCK_M, STAGES)
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))                  # the accumulators' handles as tensors
    _cta_barrier()                                                  # no warp reads K or V any more
    _store_dk_dv(dk, dv, k_smem, v_smem, dk_desc, dv_desc, kv_at, sm_scale)


# ---------------------------------------------------------------- backward: dQ of one query block
@gluon.jit
def _gluon_attn_bwd_dq_kernel(q_desc, k_desc, v_desc, do_desc, dq_desc, LSE, DELTA, qk_scale, sm_scale, seq_len,
                              n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc,
                              HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                              STAGES: gl.constexpr, num_warps: gl.constexpr):
    """dQ of BLOCK_M queries of one (batch, head); grid (T / BLOCK_M, B * H), longest blocks first.

    The forward's loop (`_gluon_attn_fwd_kernel`: Q in shared memory, K and V blocks up to the diagonal
    through a TMA ring) with the backward's three matmuls a step in place of the online softmax:

        S = Q K^T,  dP = dO V^T                     (issued together)
        P = exp2(S * scale log2 e - LSE log2 e),  dS = P (dP - Delta)      (registers)
        dQ += dS K                                   (A from registers, B the ring slot)

    dQ [B, H, T, D] is written in Q's memory order (`output_like`) through Q's shared-memory tile."""
    pid_m, pid_bh, q_at, kv_at, n_blocks, n_full = _program(n_heads, group_size, q_br, q_hr, q_hc, kv_br, kv_hr,
                                                             kv_hc, BLOCK_M, BLOCK_N)
    b, h = pid_bh // n_heads, pid_bh % n_heads
    do_at = (b * do_br + h * do_hr + pid_m * BLOCK_M, h * do_hc)
    q_tiles, k_ring, v_ring = _tiles(q_desc, k_desc, v_desc, STAGES, 1)
    q_smem = q_tiles.index(0)
    do_smem = gl.allocate_shared_memory(do_desc.dtype, [BLOCK_M, HEAD_DIM], do_desc.layout)
    q_bar, k_ready, v_ready = _barriers(1, 1), _barriers(STAGES, 1), _barriers(STAGES, 1)
    mbarrier.expect(q_bar.index(0), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_at[0], q_at[1]], q_bar.index(0), q_smem)
    tma.async_copy_global_to_shared(do_desc, [do_at[0], do_at[1]], q_bar.index(0), do_smem)
    for i in gl.static_range(STAGES):
        _load_kv_block(k_desc, k_ready, k_ring, i, kv_at, n_blocks, BLOCK_N, STAGES)
        _load_kv_block(v_desc, v_ready, v_ring, i, kv_at, n_blocks, BLOCK_N, STAGES)

    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)       # S, dP [BLOCK_M, BLOCK_N]
    acc_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)    # dQ [BLOCK_M, D]
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    lse = gl.load(LSE + pid_bh * seq_len + rows) * LOG2E_
    delta = gl.load(DELTA + pid_bh * seq_len + rows)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
    dq = warpgroup_mma_init(gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, layout=acc_layout))
    mbarrier.wait(q_bar.index(0), 0)
    for j in range(n_blocks):
        slot = j % STAGES
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        s = warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(slot), (j // STAGES) & 1)
        dp = warpgroup_mma(do_smem, v_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s,))
        p = gl.exp2(s * qk_scale - lse[:, None])
        if j >= n_full:
            cols = j * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
            p = gl.where(cols[None, :] <= rows[:, None], p, 0.0)
        dp = warpgroup_mma_wait(0, deps=(dp,))
        ds = p * (dp - delta[:, None])
        dq = warpgroup_mma(gl.convert_layout(ds.to(q_smem.dtype), a_layout), k_ring.index(slot), dq, is_async=True)
        dq = warpgroup_mma_init(warpgroup_mma_wait(0, deps=(dq,)))
        _cta_barrier()                                              # every warp is done with K_j and V_j
        _load_kv_block(k_desc, k_ready, k_ring, j + STAGES, kv_at, n_blocks, BLOCK_N, STAGES)
        _load_kv_block(v_desc, v_ready, v_ring, j + STAGES, kv_at, n_blocks, BLOCK_N, STAGES)
    dq = warpgroup_mma_wait(0, deps=(dq,))                          # the accumulator's handle as a tensor
    # S = scale * Q K^T, so dQ = scale * dS K. Q's tile takes it to the TMA store.
    _cta_barrier()
    q_smem.store((dq * sm_scale).to(q_smem.dtype))
    fence_async_shared()
    _cta_barrier()
    tma.async_copy_shared_to_global(dq_desc, [q_at[0], q_at[1]], q_smem)
    tma.store_wait(0)


# ---------------------------------------------------------------- backward in one pass: dK, dV and dQ's partials
@builtin
def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
    """TMA bulk reduction: add the shared-memory tile src into the global block of tensor_desc at coord (PTX
    cp.reduce.async.bulk.tensor .add; waited for by `tma.store_wait`, as a TMA store). Triton 3.6 builds the op
    (`create_async_tma_reduce`, which its descriptor atomics lower to) but its Gluon exposes no function for it:
    this is `tma.async_copy_shared_to_global` with the reduction in place of the copy."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@triton.constexpr_function
def _dq_layout(num_warps, head_dim):
    """A dQ partial's accumulator [BLOCK_M, D]: each warpgroup a column block of D / (num_warps / 4)."""
    groups = num_warps // 4
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, groups], instr_shape=[16, head_dim // groups, 16])


@gluon.jit
def _bwd_load_partition(q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready, empty,
                        kv_at, q_at, do_at, n_steps, n_q, m0, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
                        PARTS: gl.constexpr = 2):
    """The load warp of a warp-specialised backward: the compute warpgroups' K and V blocks (PARTS of 64 keys,
    k_smem, v_smem [PARTS, 64, D]) once, then a Q and a dO tile a step into the ring (`_load_q_do_block`), each
    slot refilled once every compute warpgroup has arrived on its `empty` barrier."""
    mbarrier.expect(kv_bar.index(0), PARTS * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
    for c in gl.static_range(PARTS):
        tma.async_copy_global_to_shared(k_desc, [kv_at[0] + c * 64, kv_at[1]], kv_bar.index(0), k_smem.index(c))
        tma.async_copy_global_to_shared(v_desc, [kv_at[0] + c * 64, kv_at[1]], kv_bar.index(0), v_smem.index(c))
    for step in range(n_steps):
        mbarrier.wait(empty.index(step % STAGES), ((step // STAGES) & 1) ^ 1)  # the first pass finds every slot free
        _load_q_do_block(q_desc, do_desc, ready, q_ring, do_ring, step, n_steps, n_q, m0, q_at, do_at, BLOCK_M,
                         STAGES)


@gluon.jit
def _onepass_consumer(k_smem, v_smem, q_ring, do_ring, ds_smem, dq_tiles, bars, dk_desc, dv_desc, LSE, DELTA,
                      qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0,
                      HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, DQ_BUFFERS: gl.constexpr,
                      CONSUMER: gl.constexpr, CONSUMERS: gl.constexpr, SPLIT: gl.constexpr):
    """Compute warpgroup CONSUMER of `_gluon_attn_bwd_onepass_kernel`, keys CONSUMER * 64 ... of the program's:
    the dK/dV kernel's step (`_dkdv_issue`) over the load warp's ring, the slot handed back (`empty`) once the
    step's matmuls are done. Its dS^T goes to this step's half of ds_smem (`ds_full` once every warpgroup's is
    in); the warpgroup whose turn it is (step % CONSUMERS) runs the step's dQ matmul over all of them, releases
    the half (`ds_free`) and leaves the partial in a tile for the reduction warp (`dq_full`) once that has
    released the tile (`dq_free`). With SPLIT (heads of 128, where one warpgroup has no registers for a whole
    [BLOCK_M, 128] partial beside its dK and dV) every warpgroup runs each step's dQ matmul for its share of
    the columns, D / CONSUMERS, and fills that share of the tile. Its barriers are mbarriers and two over its
    own 128 threads a step."""
    kv_bar, ready, empty, ds_full, ds_free, dq_full, dq_free = bars
    s_layout: gl.constexpr = _mma_layout(4, BLOCK_M)               # S^T, dP^T [64, BLOCK_M]
    acc_layout: gl.constexpr = _mma_layout(4, HEAD_DIM)            # dK, dV [64, D]
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    k_t, v_t = k_smem.index(CONSUMER), v_smem.index(CONSUMER)
    keys = start_n + CONSUMER * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, s_layout))
    s_zero = gl.zeros([64, BLOCK_M], gl.float32, layout=s_layout)
    DQ_COLS: gl.constexpr = HEAD_DIM // CONSUMERS if SPLIT else HEAD_DIM  # the dQ columns this warpgroup computes
    COL0: gl.constexpr = CONSUMER * DQ_COLS if SPLIT else 0
    dq_zero = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, layout=_dq_layout(4, DQ_COLS))
    dk = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, layout=acc_layout))
    dv = warpgroup_mma_init(gl.zeros([64, HEAD_DIM], gl.float32, layout=acc_layout))
    n_masked = (64 * CONSUMERS + BLOCK_M - 1) // BLOCK_M            # query blocks overlapping the program's keys
    mbarrier.wait(kv_bar.index(0), 0)
    for step in range(n_steps):
        slot, j, rows, lse, delta = _step_queries(step, ready, LSE, DELTA, b, n_heads, h0, seq_len, n_q, m0, BLOCK_M,
                                                  STAGES, s_layout)
        dk, dv, ds_t = _dkdv_issue(k_t, v_t, q_ring.index(slot), do_ring.index(slot), dk, dv, s_zero, keys, rows, lse,
                                   delta, qk_scale, j < n_masked, a_layout)
        half = step % 2                                             # dS^T's buffer: step - 1's may still be read
        mbarrier.wait(ds_free.index(half), ((step // 2) & 1) ^ 1)  # step - 2's dQ matmul has read it (first pass: free)
        ds_smem.index(half * CONSUMERS + CONSUMER).store(ds_t)
        fence_async_shared()
        _cta_barrier()                                              # this warpgroup's threads (a named barrier)
        mbarrier.arrive(ds_full.index(half), count=1)
        if SPLIT or step % CONSUMERS == CONSUMER:
            mbarrier.wait(ds_full.index(half), (step // 2) & 1)    # every warpgroup's keys of dS^T are in
            dq = warpgroup_mma(ds_smem.index(half * CONSUMERS).permute((1, 0)),
                               k_smem.index(0).slice(COL0, DQ_COLS, dim=1), dq_zero, use_acc=False, is_async=True)
            for c in gl.static_range(1, CONSUMERS):                 # dQ_part = sum over warpgroups c of dS_c K_c
                dq = warpgroup_mma(ds_smem.index(half * CONSUMERS + c).permute((1, 0)),
                                   k_smem.index(c).slice(COL0, DQ_COLS, dim=1), dq, is_async=True)
            dv, dk, dq = warpgroup_mma_wait(0, deps=(dv, dk, dq))
            dk, dv = warpgroup_mma_init(dk), warpgroup_mma_init(dv)
            mbarrier.arrive(ds_free.index(half), count=1)
            mbarrier.arrive(empty.index(slot), count=1)
            tile = step % DQ_BUFFERS
            mbarrier.wait(dq_free.index(tile), ((step // DQ_BUFFERS) & 1) ^ 1)  # the first pass finds every tile free
            dq_tiles.index(tile).slice(COL0, DQ_COLS, dim=1).store(dq)
            fence_async_shared()
            _cta_barrier()
            mbarrier.arrive(dq_full.index(tile), count=1)
        else:
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
            dk, dv = warpgroup_mma_init(dk), warpgroup_mma_init(dv)
            mbarrier.arrive(empty.index(slot), count=1)
    for step in range(gl.maximum(n_steps - 2, 0), n_steps):       # the last dQ matmuls (the other's too) read K
        mbarrier.wait(ds_free.index(step % 2), (step // 2) & 1)
    dk, dv = warpgroup_mma_wait(0, deps=(dk, dv))
    _store_dk_dv(dk, dv, k_t, v_t, dk_desc, dv_desc, (kv_at[0] + CONSUMER * 64, kv_at[1]), sm_scale)


@gluon.jit
def _onepass_reducer(DQ, dq_tiles, dq_full, dq_free, seq_len, n_heads, b, h0, n_steps, n_q, m0,
                     BLOCK_M: gl.constexpr, DQ_BUFFERS: gl.constexpr):
    """The reduction warp of `_gluon_attn_bwd_onepass_kernel`: each step's dQ tile, once a compute warpgroup has
    filled it, added into DQ by a TMA bulk reduction; a tile is released when its reduction has read it, with
    up to DQ_BUFFERS - 1 reductions in flight."""
    for step in range(n_steps):
        tile = step % DQ_BUFFERS
        mbarrier.wait(dq_full.index(tile), (step // DQ_BUFFERS) & 1)
        _tma_reduce_add(DQ, [(b * n_heads + h0 + step // n_q) * seq_len + (m0 + step % n_q) * BLOCK_M, 0],
                        dq_tiles.index(tile))
        tma.store_wait(DQ_BUFFERS - 1)                              # the reduction of step - DQ_BUFFERS + 1 has read its tile
        if step >= DQ_BUFFERS - 1:
            mbarrier.arrive(dq_free.index((step - DQ_BUFFERS + 1) % DQ_BUFFERS), count=1)
    tma.store_wait(0)


@gluon.jit
def _gluon_attn_bwd_onepass_kernel(q_desc, k_desc, v_desc, do_desc, dk_desc, dv_desc, DQ, LSE, DELTA, qk_scale,
                                   sm_scale, seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc,
                                   kv_br, kv_hr, kv_hc, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
                                   STAGES: gl.constexpr, DQ_BUFFERS: gl.constexpr, CONSUMERS: gl.constexpr,
                                   SPLIT: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """dK and dV of 64 * CONSUMERS keys of one (batch, kv head), and their share of dQ added into DQ; grid
    (T / (64 * CONSUMERS), B * Hkv), longest programs first.

    cuDNN's and FlashAttention-2/3's backward in one pass: the dK/dV kernel's four matmuls a step and a fifth,
    dQ_part = dS K, whose [BLOCK_M, D] fp32 result a TMA bulk reduction adds into DQ (the descriptor of a zeroed
    [B * H * T, D] fp32 matrix in [BLOCK_M, D] blocks; `flash_attention_backward(atomic_dq=True)` scales and
    casts it). Five matmuls a tile instead of the two kernels' seven, for the adds. Warp-specialised as
    FlashAttention-3 is: a load warp streams Q and dO (`_bwd_load_partition`), CONSUMERS compute warpgroups
    hold 64 keys each (`_onepass_consumer`), and a reduction warp hands each step's dQ tile to the TMA unit,
    so that the compute warps neither issue copies nor wait for a reduction. With two, each step's dQ partial
    sums 128 keys' dS K, halving the adds a FLOP, and the two take turns to compute it.

    Shared memory at D=64, two warpgroups, 64 queries a step: K, V 32 KB, the Q/dO ring 16 KB a slot, dS^T
    32 KB (two steps' halves), the dQ tiles 16 KB each. Adds per (batch, head), causal: one [BLOCK_M, D] fp32
    tile per step, T^2 / (2 * 64 * CONSUMERS) * D * 4 bytes. The other arguments as
    `_gluon_attn_bwd_dkdv_kernel`'s; k_desc, v_desc, dk_desc, dv_desc in [64, D] blocks."""
    b, h0, start_n, kv_at, q_at, do_at, m0, n_q, n_steps = _key_block(
        seq_len, n_heads, group_size, q_br, q_hr, q_hc, do_br, do_hr, do_hc, kv_br, kv_hr, kv_hc, BLOCK_M,
        64 * CONSUMERS)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [CONSUMERS, 64, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [CONSUMERS, 64, HEAD_DIM], v_desc.layout)
    q_ring = gl.allocate_shared_memory(q_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], q_desc.layout)
    do_ring = gl.allocate_shared_memory(do_desc.dtype, [STAGES, BLOCK_M, HEAD_DIM], do_desc.layout)
    ds_smem = gl.allocate_shared_memory(q_desc.dtype, [2 * CONSUMERS, 64, BLOCK_M],   # [half, warpgroup] tiles
                                        gl.NVMMASharedLayout.get_default_for([64, BLOCK_M], q_desc.dtype))
    dq_tiles = gl.allocate_shared_memory(gl.float32, [DQ_BUFFERS, BLOCK_M, HEAD_DIM], DQ.layout)
    kv_bar, ready, empty = _barriers(1, 1), _barriers(STAGES, 1), _barriers(STAGES, CONSUMERS)
    readers: gl.constexpr = CONSUMERS if SPLIT else 1               # warpgroups running a step's dQ matmul
    dq_full, dq_free = _barriers(DQ_BUFFERS, readers), _barriers(DQ_BUFFERS, 1)
    bars = (kv_bar, ready, empty, _barriers(2, CONSUMERS), _barriers(2, readers), dq_full, dq_free)
    # (a partition's constexpr arguments must be written in its tuple: one built beforehand passes them as values)
    if CONSUMERS == 1:
        gl.warp_specialize([
            (_onepass_consumer, (k_smem, v_smem, q_ring, do_ring, ds_smem, dq_tiles, bars, dk_desc, dv_desc, LSE,
                                 DELTA, qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0,
                                 HEAD_DIM, BLOCK_M, STAGES, DQ_BUFFERS, 0, 1, False)),
            (_bwd_load_partition, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready,
                                   empty, kv_at, q_at, do_at, n_steps, n_q, m0, BLOCK_M, STAGES, 1)),
            (_onepass_reducer, (DQ, dq_tiles, dq_full, dq_free, seq_len, n_heads, b, h0, n_steps, n_q, m0, BLOCK_M,
                                DQ_BUFFERS)),
        ], [1, 1], [24, 24])
    else:
        gl.warp_specialize([
            (_onepass_consumer, (k_smem, v_smem, q_ring, do_ring, ds_smem, dq_tiles, bars, dk_desc, dv_desc, LSE,
                                 DELTA, qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0,
                                 HEAD_DIM, BLOCK_M, STAGES, DQ_BUFFERS, 0, 2, SPLIT)),
            (_onepass_consumer, (k_smem, v_smem, q_ring, do_ring, ds_smem, dq_tiles, bars, dk_desc, dv_desc, LSE,
                                 DELTA, qk_scale, sm_scale, seq_len, n_heads, b, h0, start_n, kv_at, n_steps, n_q, m0,
                                 HEAD_DIM, BLOCK_M, STAGES, DQ_BUFFERS, 1, 2, SPLIT)),
            (_bwd_load_partition, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_ring, do_ring, kv_bar, ready,
                                   empty, kv_at, q_at, do_at, n_steps, n_q, m0, BLOCK_M, STAGES, 2)),
            (_onepass_reducer, (DQ, dq_tiles, dq_full, dq_free, seq_len, n_heads, b, h0, n_steps, n_q, m0, BLOCK_M,
                                DQ_BUFFERS)),
        ], [4, 1, 1], [CONSUMER_REGS, 24, 24])


def _layout(x: torch.Tensor, offset_known: bool = True) -> tuple[int, int, int] | None:
    """Where element (b, h, t) of x [B, H, T, D] starts in the 2-D matrix its TMA descriptor reads: row
    b * br + h * hr + t, column h * hc, as (br, hr, hc). Two memory orders qualify: the model's [B, T, H, D]
    (its projections' outputs viewed per head: rows b * T + t, one head every D columns) and a contiguous
    [B, H, T, D] (rows (b * H + h) * T + t). None for any other, or where TMA cannot address the rows (a
    16-byte aligned start and row stride). Reads shapes and strides only, so it also answers for fake tensors;
    offset_known=False leaves out the start, which torch.compile's tracing cannot read (the launch checks it)."""
    b, h, t, d = x.shape
    sb, sh, st, sd = x.stride()
    if sd != 1 or (st * x.element_size()) % 16 or (offset_known and (x.storage_offset() * x.element_size()) % 16):
        return None
    if sh == d and st >= h * d and (b == 1 or sb == t * st):  # [B, T, H, D] in memory
        return t, 0, d
    if st == d and (h == 1 or sh == t * d) and (b == 1 or sb == h * t * d):  # contiguous [B, H, T, D]
        return h * t, t, 0
    return None


def _rows_at(x: torch.Tensor) -> tuple[int, int, int]:
    """`_layout(x)`, which the caller has checked exists."""
    layout = _layout(x)
    if layout is None:
        raise ValueError(f"strides {x.stride()} are not a layout this kernel reads (check_inputs says which are)")
    return layout


def _matrix(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D] (a layout `_layout` accepts) as the 2-D matrix of its rows: [B * T, H * D] with x's row
    stride for the model's order, [B * H * T, D] for a contiguous one."""
    b, h, t, d = x.shape
    _, _, hc = _rows_at(x)
    return torch.as_strided(x, (b * t, h * d), (x.stride(2), 1)) if hc else torch.as_strided(x, (b * h * t, d), (d, 1))


def output_like(q: torch.Tensor) -> torch.Tensor:
    """An empty O [B, H, T, D] in q's memory order ([B, T, H, D] or contiguous), so that `_layout` finds its rows
    where it finds q's (for a dense q, `torch.empty_like`'s strides)."""
    b, h, t, d = q.shape
    if _rows_at(q)[2]:
        return torch.empty(b, t, h, d, device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.empty(b, h, t, d, device=q.device, dtype=q.dtype)


def _descriptor(matrix: torch.Tensor, block_rows: int, head_dim: int):
    """Host TMA descriptor of a [rows, columns] matrix (`_matrix`) in [block_rows, head_dim] blocks (128-byte
    swizzle)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    dtype = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[matrix.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([block_rows, head_dim], dtype)
    return TensorDescriptor.from_tensor(matrix, [block_rows, head_dim], layout)


def covers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether this forward takes these inputs at `default_plan`'s tile (`check_inputs` but the device), from
    shapes, dtypes and strides only: fake tensors too, and traced by torch.compile, where a view's start is
    unknown (a misaligned one is left to the launch's error). The device is the caller's to check (`minigpt.ops`)."""
    if not causal or q.dim() != 4:
        return False
    tile, schedule = default_plan(q.shape[-1], q.shape[2])
    return _unsupported(q, k, v, tile, schedule, offset_known=not torch.compiler.is_compiling()) is None


def default_plan(head_dim: int, seq_len: int) -> tuple[GluonTile, str]:
    """The tile and schedule of the fastest variant the H200 measured at this head size and length
    (`gpu_flash_attention.py --gluon`'s rounds): two consumer warpgroups at 128 x 128 from 4096 keys at D=128
    and from 16384 at D=64; below, the plain kernel's 64 x 64 programs, several to an SM."""
    if seq_len >= (4096 if head_dim == 128 else 16384) and seq_len % 128 == 0:
        return DEFAULT_TILE, DEFAULT_SCHEDULE
    return GluonTile(64, 64, 4, 2), "overlap"


def backward_plan(head_dim: int, seq_len: int, one_pass: bool = True) -> BackwardPlan:
    """The Gluon kernels of the backward where the H200 measured it faster with them than with the portable
    kernels (`gpu_flash_attention.py --gluon-backward` and `--gluon-one-pass`): at heads of 64 from 4,096 keys
    the one pass on two warpgroups (1.04x the two kernels' speed at 4,096 keys, 1.12x at 16,384; 0.89x at
    1,024), and at heads of 128 from 16,384 keys (1.11x there; 0.995x at 4,096, 0.83x at 1,024), unless
    `torch.use_deterministic_algorithms` is on (its dQ's last bits vary from run to run); else the dK/dV and
    dQ kernels at heads of 128 (1.10-1.29x the portable backward's speed at 1,024-16,384 keys) and the dQ
    kernel alone at 64 (1.05-1.10x; the dK/dV kernel there is 0.97-1.05x). one_pass=False: the two kernels'
    plan, what the one pass is timed against. The inputs are ones `covers` takes (T a multiple of 64)."""
    if (one_pass and seq_len >= ONE_PASS_FROM.get(head_dim, seq_len + 1) and seq_len % ONE_PASS_TILE.block_n == 0
            and not torch.are_deterministic_algorithms_enabled()):
        return BackwardPlan(None, None, ONE_PASS_TILE)
    fits = seq_len % 64 == 0
    return BackwardPlan(BWD_TILE if head_dim == 128 and fits else None, DQ_TILE if fits else None, None)


def _unsupported_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offset_known: bool = True) -> str | None:
    """What the kernels (forward and backward) do not cover in these inputs, as the message naming the change, or
    None: shapes, head size, dtype and memory layout (`_layout`), read without touching the data."""
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        return f"q must be [B, H, T, D] and k, v [B, Hkv, T, D] alike; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
    b, h, t, d = q.shape
    if k.shape[0] != b or k.shape[2] != t or k.shape[3] != d or h % k.shape[1]:
        return (f"k, v {tuple(k.shape)} must share q's batch, length and head size, with a number of heads "
                f"dividing q's {h}: this kernel is causal self-attention (use flash_attention otherwise)")
    if d not in HEAD_DIMS:
        return f"head size {d} not supported: {HEAD_DIMS} only (flash_attention runs the others)"
    if q.dtype not in (torch.bfloat16, torch.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k, v must all be bf16 or fp16; got {q.dtype}, {k.dtype}, {v.dtype}"
    if any(_layout(x, offset_known) is None for x in (q, k, v)) or k.stride() != v.stride():
        return ("q, k, v must each be contiguous [B, H, T, D] or [B, T, H, D] in memory (a per-head view of "
                "a projection's output), k and v alike, 16-byte aligned: call .contiguous()")
    return None


def _unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: GluonTile, schedule: str,
                 offset_known: bool = True) -> str | None:
    """What the forward (and the dQ kernel, which shares its tiles) does not cover in these inputs, tile and
    schedule, as the message naming the change, or None (the module docstring's limits but the device)."""
    if schedule not in SCHEDULES:
        return f"schedule {schedule!r} unknown: one of {SCHEDULES}"
    if schedule in ("cooperative", "ping-pong") and tile.block_m != 128:
        return (f"the {schedule} schedule runs two consumers of 64 query rows: tile.block_m must be 128, not "
                f"{tile.block_m} (or pass schedule='overlap')")
    problem = _unsupported_inputs(q, k, v, offset_known)
    if problem is not None:
        return problem
    t = q.shape[2]
    if t % tile.block_m or t % tile.block_n:
        return (f"sequence length {t} must be a multiple of the tile's {tile.block_m} queries and "
                f"{tile.block_n} keys: pad it, or use flash_attention")
    if tile.num_warps != 4 * (tile.block_m // 64) or tile.block_m % 64:
        return f"{tile}: block_m must be a multiple of 64 with 4 warps (one warpgroup) per 64 query rows"
    return None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: GluonTile,
                 schedule: str = DEFAULT_SCHEDULE) -> None:
    """ValueError naming what to change, for anything this kernel does not cover (see the module docstring)."""
    _raise_if(_unsupported(q, k, v, tile, schedule), q)


def _raise_if(problem: str | None, q: torch.Tensor) -> None:
    """ValueError with `problem` (`_unsupported`'s message), or naming the device where q is not on a Hopper GPU."""
    if problem is not None:
        raise ValueError(problem)
    if not q.is_cuda or torch.cuda.get_device_capability(q.device)[0] != 9:
        raise ValueError(f"this Gluon kernel needs a Hopper GPU (compute capability 9.x); q is on {q.device}")


def _backward_operand(do: torch.Tensor, q: torch.Tensor, problem: str | None) -> torch.Tensor:
    """`_raise_if(problem, q)`, then do in a layout the backward kernels read (`_layout`), copied only if not."""
    _raise_if(problem, q)
    return do if _layout(do) is not None else do.contiguous()


def gluon_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: GluonTile = DEFAULT_TILE,
                            schedule: str = DEFAULT_SCHEDULE, maxnreg: int | None = None,
                            scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q [B, H, T, D] over k, v [B, Hkv, T, D]: (o [B, H, T, D], lse [B, H, T] fp32,
    natural log), as `flash_attention_forward` returns them. schedule: "overlap" (FlashAttention-3's
    intra-warpgroup overlap), "sequential" (each matmul waited for when issued), "warp-specialised" (the copies
    from a load warp of their own, `_gluon_attn_fwd_ws_kernel`), "cooperative" (that, with two consumer
    warpgroups of 64 query rows; tile.block_m 128) or "ping-pong" (the two taking turns at the tensor cores).
    maxnreg: the registers a thread of a warp-specialised launch, divided between its partitions (two
    consumers: by default the most that one program a SM can have). scale: the softmax's, 1 / sqrt(D) by
    default."""
    check_inputs(q, k, v, tile, schedule)
    b, h, t, d = q.shape
    o = output_like(q)  # its rows where q's are: one (row, column) formula finds both
    lse = torch.empty(b, h, t, device=q.device, dtype=torch.float32)
    kernel, constants, q_rows, options = _plan(schedule, tile, maxnreg)
    kernel[(t // tile.block_m, b * h)](
        _descriptor(_matrix(q), q_rows, d), _descriptor(_matrix(k), tile.block_n, d),
        _descriptor(_matrix(v), tile.block_n, d), _descriptor(_matrix(o), q_rows, d), lse,
        LOG2E * (1.0 / math.sqrt(d) if scale is None else scale), t, h,
        h // k.shape[1], *_rows_at(q), *_rows_at(k),
        HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, STAGES=tile.stages, **constants, **options)
    return o, lse


def _unsupported_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tile: GluonTile,
                          maxnreg: int | None = None) -> str | None:
    """`_unsupported` for the dK/dV kernel at `tile` (block_m queries a step, block_n keys a program) and a
    register cap `maxnreg`."""
    if maxnreg is not None and not (isinstance(maxnreg, int) and 24 <= maxnreg <= 255):
        return f"maxnreg {maxnreg!r}: registers a thread, an int from 24 to 255 (or None: the compiler's choice)"
    problem = _unsupported_inputs(q, k, v)
    if problem is not None:
        return problem
    t = q.shape[2]
    if t % tile.block_m or t % tile.block_n or (tile.block_n % tile.block_m and tile.block_m % tile.block_n):
        return (f"sequence length {t} must be a multiple of the backward tile's {tile.block_m} queries and "
                f"{tile.block_n} keys, one of them a multiple of the other")
    if tile.block_n % 64 or tile.num_warps != tile.block_n // 16:
        return f"{tile}: block_n must be a multiple of 64 with one warp per 16 keys (num_warps = block_n / 16)"
    return None


def gluon_attention_dkdv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                         delta: torch.Tensor, tile: GluonTile = BWD_TILE, scale: float | None = None,
                         maxnreg: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV [B, Hkv, T, D] (in k's memory order, `output_like`) of causal attention by
    `_gluon_attn_bwd_dkdv_kernel`, from q, k, v, the output's gradient do [B, H, T, D], the forward's lse and
    delta = rowsum(dO * O), both [B, H, T] fp32. The inputs' limits are the forward's. maxnreg caps the
    registers a thread (None: the compiler takes what it needs, 192 at D=64, so two 4-warp programs share an
    SM; at 168, three do, and a few registers spill)."""
    do = _backward_operand(do, q, _unsupported_backward(q, k, v, tile, maxnreg))
    b, h, t, d = q.shape
    dk, dv = output_like(k), output_like(k)  # their rows where k's are
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    _gluon_attn_bwd_dkdv_kernel[(t // tile.block_n, b * k.shape[1])](
        _descriptor(_matrix(q), tile.block_m, d), _descriptor(_matrix(k), tile.block_n, d),
        _descriptor(_matrix(v), tile.block_n, d), _descriptor(_matrix(do), tile.block_m, d),
        _descriptor(_matrix(dk), tile.block_n, d), _descriptor(_matrix(dv), tile.block_n, d),
        lse, delta, LOG2E * scale, scale, t, h, h // k.shape[1], *_rows_at(q), *_rows_at(do), *_rows_at(k),
        HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, STAGES=tile.stages, num_warps=tile.num_warps,
        **({"maxnreg": maxnreg} if maxnreg else {}))
    return dk, dv


def gluon_attention_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                       delta: torch.Tensor, tile: GluonTile = DQ_TILE, scale: float | None = None) -> torch.Tensor:
    """dQ [B, H, T, D] (in q's memory order) of causal attention by `_gluon_attn_bwd_dq_kernel`; the arguments
    as `gluon_attention_dkdv`'s, tile.block_m queries a program and tile.block_n keys a step."""
    do = _backward_operand(do, q, _unsupported(q, k, v, tile, "overlap"))
    b, h, t, d = q.shape
    dq = output_like(q)  # its rows where q's are
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    _gluon_attn_bwd_dq_kernel[(t // tile.block_m, b * h)](
        _descriptor(_matrix(q), tile.block_m, d), _descriptor(_matrix(k), tile.block_n, d),
        _descriptor(_matrix(v), tile.block_n, d), _descriptor(_matrix(do), tile.block_m, d),
        _descriptor(_matrix(dq), tile.block_m, d), lse, delta, LOG2E * scale, scale, t, h, h // k.shape[1],
        *_rows_at(q), *_rows_at(do), *_rows_at(k),
        HEAD_DIM=d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, STAGES=tile.stages, num_warps=tile.num_warps)
    return dq


def _onepass_launch(tile: GluonTile, buffers: int, head_dim: int) -> tuple[dict, dict]:
    """`_gluon_attn_bwd_onepass_kernel`'s constexprs and launch options for `tile` (block_n / 64 compute
    warpgroups), `buffers` dQ tiles and the head size. One warpgroup: 128 registers a thread over its 8 warps
    (the 1-warp load and reduction partitions are padded to a warpgroup), so that two programs share an SM;
    they keep 24 each and the compute warpgroup the rest (232). Two: `consumer_registers` of 12 warps, 240 for
    each compute warpgroup; at heads of 128 each computes a share of dQ's columns (SPLIT, `_onepass_consumer`)."""
    consumers = tile.block_n // 64
    maxnreg, consumer_regs = (128, 0) if consumers == 1 else consumer_registers(12, 8)
    constants = {"HEAD_DIM": head_dim, "BLOCK_M": tile.block_m, "STAGES": tile.stages, "DQ_BUFFERS": buffers,
                 "CONSUMERS": consumers, "SPLIT": head_dim == 128, "CONSUMER_REGS": consumer_regs, "num_warps": 4}
    return constants, {"num_warps": 4, "maxnreg": maxnreg}


def _dq_descriptor(dq_acc: torch.Tensor, block_m: int):
    """Host TMA descriptor of dq_acc (fp32, contiguous, [..., D]) as its [rows, D] matrix in [block_m, D] blocks."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    d = dq_acc.shape[-1]
    return TensorDescriptor.from_tensor(dq_acc.view(-1, d), [block_m, d],
                                        gl.NVMMASharedLayout.get_default_for([block_m, d], gl.float32))


def _unsupported_accumulator(q: torch.Tensor, dq_acc: torch.Tensor, buffers: int) -> str | None:
    """What is wrong with a one-pass kernel's fp32 dQ accumulator for q, or its count of dQ tiles, or None."""
    if buffers not in (1, 2, 3):
        return f"buffers {buffers!r}: 1 to 3 dQ tiles in flight"
    if dq_acc.numel() != q.numel() or dq_acc.dtype != torch.float32 or not dq_acc.is_contiguous():
        return f"dq_acc must be a contiguous fp32 tensor of q's {q.numel()} elements; got {dq_acc.dtype} {tuple(dq_acc.shape)}"
    return None


def _unsupported_one_pass(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dq_acc: torch.Tensor, tile: GluonTile,
                          buffers: int) -> str | None:
    """`_unsupported_backward` for the one-pass kernel at `tile` with `buffers` dQ tiles, and its accumulator."""
    problem = _unsupported_accumulator(q, dq_acc, buffers) or _unsupported_backward(q, k, v, tile)
    if problem is None and (tile.block_n not in (64, 128) or (q.shape[-1] == 128 and tile.block_n != 128)):
        return (f"the one-pass kernel runs 64 or 128 keys a program (a compute warpgroup each 64), heads of 128 on "
                f"two (on one its registers run out); got D={q.shape[-1]}, {tile}")
    return problem


def gluon_attention_dkdv_dq(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
                            delta: torch.Tensor, dq_acc: torch.Tensor, tile: GluonTile = ONE_PASS_TILE,
                            scale: float | None = None, buffers: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """dK, dV as `gluon_attention_dkdv` returns them, and dS K (unscaled) added into dq_acc (fp32, contiguous,
    [B * H, T, D], zeroed by the caller) by `_gluon_attn_bwd_onepass_kernel`: tile.block_m queries a step,
    tile.block_n keys a program (a compute warpgroup each 64), `buffers` dQ tiles in flight. The signature
    `flash_attention_backward(atomic_dq=True)` calls a dkdv_kernel with; dQ's last bits vary from run to run
    (the adds' order does)."""
    do = _backward_operand(do, q, _unsupported_one_pass(q, k, v, dq_acc, tile, buffers))
    b, h, t, d = q.shape
    dk, dv = output_like(k), output_like(k)  # their rows where k's are
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    constants, options = _onepass_launch(tile, buffers, d)
    _gluon_attn_bwd_onepass_kernel[(t // tile.block_n, b * k.shape[1])](
        _descriptor(_matrix(q), tile.block_m, d), _descriptor(_matrix(k), 64, d), _descriptor(_matrix(v), 64, d),
        _descriptor(_matrix(do), tile.block_m, d), _descriptor(_matrix(dk), 64, d), _descriptor(_matrix(dv), 64, d),
        _dq_descriptor(dq_acc, tile.block_m), lse, delta, LOG2E * scale, scale, t, h, h // k.shape[1],
        *_rows_at(q), *_rows_at(do), *_rows_at(k), **constants | options)
    return dk, dv


def gluon_attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                             lse: torch.Tensor, tile: GluonTile | None = BWD_TILE, dq_tile: GluonTile | None = DQ_TILE,
                             one_pass: GluonTile | None = None, scale: float | None = None,
                             maxnreg: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of causal attention: `flash_attention_backward` with this module's dK/dV kernel at `tile`
    (with `maxnreg`, `gluon_attention_dkdv`'s register cap) and its dQ kernel at `dq_tile` in place of the
    portable ones (None: the portable one); or, one_pass, the one-pass kernel at that tile in place of both
    (`gluon_attention_dkdv_dq`: tile and dq_tile None). The preprocess (delta = rowsum(dO * O)) is the
    portable one, and so is the one pass's last kernel (dQ scaled and cast). `backward_plan` gives the three."""
    from minigpt.kernels.flash_attention import flash_attention_backward

    if tile is None and maxnreg is not None:
        raise ValueError(f"maxnreg {maxnreg} caps the Gluon dK/dV kernel's registers: give it a tile, or drop maxnreg")
    if one_pass is not None:
        if tile is not None or dq_tile is not None:
            raise ValueError(f"one_pass {one_pass} computes dK, dV and dQ in one kernel: pass tile=None, dq_tile=None "
                             f"(got {tile}, {dq_tile})")
        kernel = partial(gluon_attention_dkdv_dq, tile=one_pass, scale=scale)
        return flash_attention_backward(do, q, k, v, o, lse, causal=True, scale=scale, atomic_dq=True,
                                        dkdv_kernel=kernel)
    dkdv_kernel = None if tile is None else partial(gluon_attention_dkdv, tile=tile, scale=scale, maxnreg=maxnreg)
    dq_kernel = None if dq_tile is None else partial(gluon_attention_dq, tile=dq_tile, scale=scale)
    return flash_attention_backward(do, q, k, v, o, lse, causal=True, scale=scale, atomic_dq=False,
                                    dkdv_kernel=dkdv_kernel, dq_kernel=dq_kernel)


def _plan(schedule: str, tile: GluonTile, maxnreg: int | None) -> tuple:
    """A schedule's kernel, the constexpr arguments that choose it beyond the tile, the rows of a Q tile (one
    consumer's) and the launch's compile options (warps of the default partition, registers a thread)."""
    regs = {"maxnreg": maxnreg} if maxnreg else {}
    if schedule in ("overlap", "sequential"):
        return _gluon_attn_fwd_kernel, {"OVERLAP": schedule == "overlap"}, tile.block_m, {"num_warps": tile.num_warps} | regs
    if schedule == "warp-specialised":
        return (_gluon_attn_fwd_ws_kernel, {"CONSUMERS": 1, "PINGPONG": False, "CONSUMER_REGS": 0}, tile.block_m,
                {"num_warps": tile.num_warps} | regs)
    # cooperative, ping-pong: Triton pads the load warp to a warpgroup, so the program has tile.num_warps + 4 warps. The pool
    # is maxnreg a thread over all of them (by default the most one program a SM can have: 64K / 384 -> 168);
    # the load warpgroup keeps 24 a thread, and the two consumers share the rest equally (240 each at 168).
    maxnreg, consumer_regs = consumer_registers(tile.num_warps + 4, tile.num_warps, maxnreg)
    constants = {"CONSUMERS": 2, "PINGPONG": schedule == "ping-pong", "CONSUMER_REGS": consumer_regs}
    return (_gluon_attn_fwd_ws_kernel, constants, tile.block_m // 2,
            {"num_warps": tile.num_warps // 2, "maxnreg": maxnreg})


def consumer_registers(warps: int, consumer_warps: int, maxnreg: int | None = None) -> tuple[int, int]:
    """(maxnreg, a consumer's registers) of a warp-specialised launch of `warps` warps in all, `consumer_warps`
    of them compute warpgroups and the rest 1-warp partitions at 24 registers a thread padded to a warpgroup:
    maxnreg by default the most one program a SM can have (64K / (32 * warps), 168 for 12 warps), what the
    24-register warpgroup leaves shared equally by the consumers (240 each at 168)."""
    maxnreg = maxnreg or 65536 // (32 * warps) // 8 * 8
    return maxnreg, (maxnreg * 32 * warps - 24 * 128) // (32 * consumer_warps) // 8 * 8


def _mangled_descriptor(head_dim: int, block_rows: int) -> str:
    """The signature type of a bf16 host TMA descriptor in [block_rows, head_dim] blocks (`_descriptor`), for
    compiling a kernel without a GPU."""
    from triton.runtime.jit import mangle_type

    return mangle_type(_descriptor(torch.zeros(4 * block_rows, head_dim, dtype=torch.bfloat16), block_rows, head_dim))


def _mangled_dq_descriptor(head_dim: int, block_m: int) -> str:
    """The signature type of a one-pass kernel's fp32 dQ accumulator descriptor (`_dq_descriptor`)."""
    from triton.runtime.jit import mangle_type

    return mangle_type(_dq_descriptor(torch.zeros(4 * block_m, head_dim), block_m))


def backward_signature(head_dim: int, block_m: int, block_n: int, outputs: dict[str, str]) -> dict[str, str]:
    """The signature of a backward kernel (this module's or a script's) as launched on bf16 tensors: the Q, K,
    V and dO descriptors (Q and dO in [block_m, D] blocks, K and V in [block_n, D]), then `outputs` (name ->
    type), then LSE, DELTA, the two scales and the twelve int32 lengths and strides every one of them takes."""
    q_ty, kv_ty = _mangled_descriptor(head_dim, block_m), _mangled_descriptor(head_dim, block_n)
    signature = {"q_desc": q_ty, "k_desc": kv_ty, "v_desc": kv_ty, "do_desc": q_ty, **outputs}
    signature |= {"LSE": "*fp32", "DELTA": "*fp32", "qk_scale": "fp32", "sm_scale": "fp32"}
    return signature | dict.fromkeys(("seq_len", "n_heads", "group_size", "q_br", "q_hr", "q_hc", "do_br", "do_hr",
                                      "do_hc", "kv_br", "kv_hr", "kv_hc"), "i32")


def compile_sm90(kernel, signature: dict[str, str], constants: dict, options: dict):
    """`kernel` compiled for sm_90a without a GPU (Triton's ptxas): `signature` the runtime arguments' types,
    `constants` its constexprs (num_warps among them), `options` the launch's (num_warps, maxnreg)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    src = GluonASTSource(kernel, signature | dict.fromkeys(constants, "constexpr"), constants)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_for_sm90(head_dim: int, tile: GluonTile, schedule: str = "overlap", maxnreg: int | None = None):
    """The kernel compiled for sm_90a without a GPU (Triton's ptxas), as it would be for a bf16 launch."""
    kernel, constants, q_rows, options = _plan(schedule, tile, maxnreg)
    q_ty, kv_ty = _mangled_descriptor(head_dim, q_rows), _mangled_descriptor(head_dim, tile.block_n)
    signature = {"q_desc": q_ty, "k_desc": kv_ty, "v_desc": kv_ty, "o_desc": q_ty, "LSE": "*fp32", "qk_scale": "fp32"}
    signature |= dict.fromkeys(("seq_len", "n_heads", "group_size", "q_br", "q_hr", "q_hc", "kv_br", "kv_hr", "kv_hc"),
                               "i32")
    constants = {"HEAD_DIM": head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "STAGES": tile.stages,
                 "num_warps": options["num_warps"], **constants}
    return compile_sm90(kernel, signature, constants, options)


def compile_backward_for_sm90(head_dim: int, tile: GluonTile = BWD_TILE, kernel: str = "dkdv", maxnreg: int | None = None):
    """The dK/dV kernel (kernel="dkdv"), the dQ kernel ("dq") or the one-pass kernel ("one-pass", two dQ tiles
    in flight) compiled for sm_90a without a GPU, as for a bf16 launch (`compile_for_sm90`'s): tile.block_m rows
    of Q and dO a block, tile.block_n keys a program or a step; maxnreg: a register cap, as
    `gluon_attention_dkdv` takes."""
    if kernel not in ("dkdv", "dq", "one-pass"):
        raise ValueError(f"kernel must be 'dkdv', 'dq' or 'one-pass', got {kernel!r}")
    if kernel == "one-pass":
        kv_ty = _mangled_descriptor(head_dim, 64)
        outputs = {"dk_desc": kv_ty, "dv_desc": kv_ty, "DQ": _mangled_dq_descriptor(head_dim, tile.block_m)}
        constants, options = _onepass_launch(tile, 2, head_dim)
        return compile_sm90(_gluon_attn_bwd_onepass_kernel, backward_signature(head_dim, tile.block_m, 64, outputs),
                            constants, options)
    kv_ty, q_ty = _mangled_descriptor(head_dim, tile.block_n), _mangled_descriptor(head_dim, tile.block_m)
    outputs = {"dk_desc": kv_ty, "dv_desc": kv_ty} if kernel == "dkdv" else {"dq_desc": q_ty}
    constants = {"HEAD_DIM": head_dim, "BLOCK_M": tile.block_m, "BLOCK_N": tile.block_n, "STAGES": tile.stages,
                 "num_warps": tile.num_warps}
    fn = _gluon_attn_bwd_dkdv_kernel if kernel == "dkdv" else _gluon_attn_bwd_dq_kernel
    return compile_sm90(fn, backward_signature(head_dim, tile.block_m, tile.block_n, outputs), constants,
                        {"num_warps": tile.num_warps} | ({"maxnreg": maxnreg} if maxnreg else {}))


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
